"""Training kernels that do the same arithmetic with less memory traffic than the stock modules.

Found by profiling a LoRA step on the CPU (docs/DESIGN.md, "Training engine details"):

- `linear_cross_entropy`: the vocabulary projection and the loss, chunk by chunk. The stock path
  materialises logits, log-softmax and their gradient ([targets x vocab] three times: ~430 MB for
  730 targets of a 49k vocabulary); here one chunk's logits become their gradient in place and
  then the hidden-state gradient at once, so only one chunk is ever held.
- `PackedAttention`: per-example causal attention over a packed row as one autograd node. The
  plain version (slice q/k/v per example, SDPA, concatenate) makes autograd zero-fill a full-size
  buffer for every slice's gradient and add them up; here each span's gradient is written
  straight into its place.
- `fuse_lora_forward`: `base(x) + B(A(x)) * scaling` as one `addmm` with `alpha=scaling`, so the
  scaling multiply and the add over the [tokens x out_features] output vanish (forward and backward).
- `lean_activations`: Llama-style RMSNorm keeps x and 1/rms (not x/rms too), the SwiGLU MLP keeps
  gate and up (silu(gate) is recomputed in backward), and packed attention repeats grouped key/value
  heads per span instead of keeping the repeated copies: about 30% fewer activation bytes per token.
"""
from __future__ import annotations

import types

IGNORE = -100
# Positions per chunk of the vocabulary projection: [chunk x vocab] floats of at most 16 MB (the only
# buffer of that size: log-sum-exp, softmax and its gradient are computed in it in place). The chunk is
# alive while every activation is, so it sets the step's peak: 16 MB chunks peaked ~30 MB under 32 MB
# ones on SmolLM2 at 512 tokens (jemalloc). Measured on 340 targets of a 49k vocabulary, loss + backward,
# with the blocked logits below: 16 MB ~300 ms, 32 MB ~260 ms, 48 MB ~255 ms (about 1% of a step).
CE_CHUNK_BYTES = 16 << 20
# On the CPU the chunk's logits are computed in column blocks of this many vocabulary rows: MKL runs
# [170, 576] @ [576, 49152] at ~127 GFLOP/s and the same product in 2048-column blocks at ~162 (at 340
# rows: 158 vs 174), since each block's weights stay in cache. GPUs get the one product.
CE_VOCAB_BLOCK = 2048
# Model types whose output layer is a plain projection of the last hidden state (no soft-capping or
# logit scaling), so the loss may be computed from the hidden states and the head weight.
PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3",
                     "olmo", "olmo2", "smollm3", "starcoder2"}


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------- chunked linear + cross-entropy

def _make_linear_ce():
    torch = _torch()

    def _head_logits(h, weight):
        if h.device.type != "cpu" or weight.shape[0] <= 2 * CE_VOCAB_BLOCK:
            return h @ weight.t()
        logits = torch.empty((h.shape[0], weight.shape[0]), dtype=h.dtype)
        for c in range(0, weight.shape[0], CE_VOCAB_BLOCK):
            torch.mm(h, weight[c:c + CE_VOCAB_BLOCK].t(), out=logits[:, c:c + CE_VOCAB_BLOCK])
        return logits

    class LinearCrossEntropy(torch.autograd.Function):
        """Summed cross-entropy of `hidden @ weight.T` against `targets` (IGNORE skipped), chunked."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_enabled = need_h or need_w
            acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 hidden states: fp32 softmax
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for a in range(0, hidden.shape[0], chunk):
                h, t = hidden[a:a + chunk], targets[a:a + chunk]
                logits = _head_logits(h, weight).to(acc)
                valid = t != IGNORE
                safe = t.clamp(min=0)
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                # log-sum-exp in place (torch.logsumexp would allocate a second [chunk x vocab] buffer)
                peak = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(peak).exp_()
                norm = probs.sum(-1, keepdim=True)
                lse = norm.log().add_(peak).squeeze(1)
                total += torch.where(valid, lse - picked, 0.0).sum()
                if not grad_enabled:
                    continue
                # d(sum loss)/d logits = softmax - onehot(target), zero on ignored rows; computed in place.
                probs.div_(norm)
                rows = torch.arange(probs.shape[0], device=probs.device)
                probs[rows, safe] -= 1.0
                if not bool(valid.all()):
                    probs.mul_(valid[:, None].to(probs.dtype))
                probs = probs.to(hidden.dtype)
                if need_h:
                    torch.mm(probs, weight, out=grad_h[a:a + chunk])
                if need_w:
                    grad_w.addmm_(probs.t().to(acc), h.to(acc))
            ctx.save_for_backward(grad_h, grad_w)
            ctx.has, ctx.weight_dtype = (need_h, need_w), weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            need_h, need_w = ctx.has
            gh = grad_h * grad_out.to(grad_h.dtype) if need_h else None
            gw = (grad_w * grad_out).to(ctx.weight_dtype) if need_w else None
            return gh, gw, None, None

    return LinearCrossEntropy


_LINEAR_CE = None


def linear_cross_entropy(hidden, weight, targets, chunk: int | None = None):
    """Summed next-token loss of hidden states [K, d] under the head `weight` [V, d]; targets [K]."""
    global _LINEAR_CE
    if _LINEAR_CE is None:
        _LINEAR_CE = _make_linear_ce()
    if chunk is None:
        chunk = max(16, CE_CHUNK_BYTES // (4 * int(weight.shape[0])))
    return _LINEAR_CE.apply(hidden, weight, targets, int(chunk))


def plain_head(model):
    """(decoder, head) when `model` (a causal LM, possibly inside PEFT) has a plain linear head, else None."""
    torch = _torch()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    decoder = getattr(lm, "model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    # A head that is itself a LoRA layer (lm_head in target_modules) keeps the stock path.
    if decoder is None or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in
           ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    return decoder, head


# ----------------------------------------------------------------------------- packed attention

def repeat_heads(t, groups: int):
    """[B, kv, T, D] -> [B, kv * groups, T, D]: each grouped key/value head repeated for its query heads."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def fold_heads(t, groups: int):
    """The gradient of `repeat_heads`: sum each key/value head's query group."""
    if groups == 1:
        return t
    b, h, n, d = t.shape
    return t.view(b, h // groups, groups, n, d).sum(2)


def _make_packed_attention():
    torch = _torch()
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    repeat, fold = repeat_heads, fold_heads

    class PackedAttention(torch.autograd.Function):
        """Causal attention inside each [a, b) span of a packed row.

        query is [1, heads, T, dim]; key and value may have fewer (grouped) heads: they are repeated
        per span inside the node, so the repeated copies are never kept for backward.
        """

        @staticmethod
        def forward(ctx, query, key, value, spans, scale):
            batch, heads, length, dim = query.shape
            groups = heads // key.shape[1]
            out = query.new_empty(batch, length, heads, dim).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
            lses = []
            for a, b in spans:
                o, lse = flash(query[:, :, a:b], repeat(key[:, :, a:b], groups), repeat(value[:, :, a:b], groups),
                               0.0, True, scale=scale)
                out[:, :, a:b].copy_(o)
                lses.append(lse)
            ctx.save_for_backward(query, key, value, out, *lses)
            ctx.spans, ctx.scale, ctx.groups = spans, scale, groups
            return out

        @staticmethod
        def backward(ctx, grad_out):
            query, key, value, out, *lses = ctx.saved_tensors
            groups = ctx.groups
            gq, gk, gv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
            for (a, b), lse in zip(ctx.spans, lses):
                dq, dk, dv = flash_backward(grad_out[:, :, a:b], query[:, :, a:b], repeat(key[:, :, a:b], groups),
                                            repeat(value[:, :, a:b], groups), out[:, :, a:b], lse, 0.0, True,
                                            scale=ctx.scale)
                gq[:, :, a:b].copy_(dq)
                gk[:, :, a:b].copy_(fold(dk, groups))
                gv[:, :, a:b].copy_(fold(dv, groups))
            return gq, gk, gv, None, None

    return PackedAttention


_PACKED = None


def packed_attention(query, key, value, spans: list[tuple[int, int]], scale: float):
    """Per-span causal attention as one autograd node; returns [1, T, heads, dim] (contiguous)."""
    global _PACKED
    if _PACKED is None:
        _PACKED = _make_packed_attention()
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads")
    return _PACKED.apply(query, key, value, spans, float(scale)).transpose(1, 2)


# ----------------------------------------------------------------------------- RMSNorm and SwiGLU

# Norm and MLP classes whose forward is exactly Llama's (weight * x / rms(x); down(silu(gate(x)) * up(x))).
LLAMA_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm"}
LLAMA_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP"}


def _make_norm_and_mlp():
    torch = _torch()

    class RMSNorm(torch.autograd.Function):
        """weight * x * rsqrt(mean(x^2) + eps), keeping only x and 1/rms for backward (not x/rms as well)."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            wide = x.to(torch.promote_types(x.dtype, torch.float32))  # like transformers: fp32 maths for bf16/fp16
            inv = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, inv, weight)
            return weight * (wide * inv).to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            x, inv, weight = ctx.saved_tensors
            normed = x.to(inv.dtype) * inv
            grad_normed = (grad * weight).to(inv.dtype)
            grad_x = inv * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (grad.to(inv.dtype) * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
            return grad_x.to(x.dtype), grad_w, None

    class SwiGLU(torch.autograd.Function):
        """silu(gate) * up, keeping gate and up for backward (silu(gate) is recomputed, not stored)."""

        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            sig = torch.sigmoid(gate)
            silu = gate * sig
            grad_up = grad * silu
            # d silu / d gate = sig * (1 + gate * (1 - sig))
            grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))
            return grad_gate, grad_up

    return RMSNorm, SwiGLU


_NORM_MLP = None


def _norm_mlp():
    global _NORM_MLP
    if _NORM_MLP is None:
        _NORM_MLP = _make_norm_and_mlp()
    return _NORM_MLP


def _rms_norm_forward(self, hidden_states):
    return _norm_mlp()[0].apply(hidden_states, self.weight, float(self.variance_epsilon))


def _swiglu_mlp_forward(self, x):
    return self.down_proj(_norm_mlp()[1].apply(self.gate_proj(x), self.up_proj(x)))


def lean_activations(model) -> dict[str, int]:
    """Give Llama-style RMSNorm and SwiGLU MLP modules forwards that keep fewer activations (same math)."""
    counts = {"norms": 0, "mlps": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in LLAMA_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["norms"] += 1
        elif (name in LLAMA_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu"
              and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))):
            module.forward = types.MethodType(_swiglu_mlp_forward, module)
            counts["mlps"] += 1
    return counts


# ----------------------------------------------------------------------------- LoRA

def _fused_lora_forward(self, x, *args, **kwargs):
    """`base(x) + scaling * B(A(x))` as one addmm, when the layer is a plain single-adapter LoRA in training."""
    torch = _torch()
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A
            or active[0] in getattr(self, "lora_variant", {}) or not isinstance(self.base_layer, torch.nn.Linear)):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if x.dtype != lora_a.weight.dtype or self.base_layer.weight.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    base = torch.nn.functional.linear(flat, self.base_layer.weight, self.base_layer.bias)
    low = torch.nn.functional.linear(self.lora_dropout[name](flat), lora_a.weight)
    out = torch.addmm(base, low, lora_b.weight.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_forward(model) -> int:
    """Give every PEFT LoRA Linear of `model` the fused forward (falls back per call); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count
