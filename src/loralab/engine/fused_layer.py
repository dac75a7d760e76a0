"""LoRA training of Llama-style decoder layers as two autograd nodes per layer, keeping only what backward needs.

The stock layer is ~40 autograd nodes (norms, projections, LoRA A and B, RoPE, attention, SwiGLU,
residual adds), each keeping its own inputs: 8,643 values per token per layer for SmolLM2 with
LoRA on every linear layer, counted with saved-tensor hooks. Here each half layer,
`x + attention(norm(x))` and `x + mlp(norm(x))`, is one node whose backward is written out, and
it keeps only:

- the half's input x and 1/rms (the normalised input is recomputed: one multiply),
- the LoRA A outputs (the inputs of the B matrices; r values per adapted projection),
- attention: the rotated query and key, the value, the attention output and its log-sum-exp,
- MLP: the gate and up projections (SiLU(gate) * up is recomputed for down_proj's LoRA gradient).

That is 4h + 2kv + 2i + heads + sum(r) + 2 values per token per layer (5,827 for SmolLM2, r 8,
all-linear: -33%), and the same arithmetic: the frozen base weights get no gradient, the A
matrices of projections that read the same input run as one thin matmul, and backward writes
gradients in place where it can. The float64 test in tests/engine/test_fused_layer.py checks
the loss and every gradient against the stock layers.

It applies only where it is exact: training with gradients on the CPU, one packed row (or one
sequence) without an attention mask and without a cache, fp32/fp64, no biases, no dropout, no
DoRA, frozen base weights and activation checkpointing off. Anything else runs the stock layer.
"""
from __future__ import annotations

import types

# Decoder layers whose forward is exactly Llama's: x + attn(norm(x)), then x + mlp(norm(x)), with
# RoPE applied as q * cos + rotate_half(q) * sin and a SwiGLU MLP.
FUSED_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer"}
FUSED_MODEL_TYPES = {"llama", "mistral"}  # the configs whose layers are those (used by engine.estimate)


def kept_values_per_token(dims: dict[str, int], lora_ranks: int) -> int:
    """Values one fused layer keeps per token: 4h + 2kv + 2i + heads + sum of LoRA ranks + 2 (two 1/rms)."""
    kv = dims["kv_heads"] * dims["head_dim"]
    return 4 * dims["hidden"] + 2 * kv + 2 * dims["intermediate"] + dims["heads"] + lora_ranks + 2


def _torch():
    import torch

    return torch


def _projection(proj):
    """(base weight, A, B, scaling) of a frozen Linear or a plain single-adapter PEFT LoRA Linear; else None."""
    torch = _torch()
    if type(proj) is torch.nn.Linear:
        if proj.bias is not None or proj.weight.requires_grad:
            return None
        return proj.weight, None, None, 0.0
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(proj) is not LoraLinear:
        return None
    active = proj.active_adapters
    if proj.disable_adapters or proj.merged or len(active) != 1 or getattr(proj, "fan_in_fan_out", False):
        return None
    name = active[0]
    if name not in proj.lora_A or name in getattr(proj, "lora_variant", {}):
        return None
    base, lora_a, lora_b = proj.base_layer, proj.lora_A[name], proj.lora_B[name]
    if type(base) is not torch.nn.Linear or base.bias is not None or base.weight.requires_grad:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    dropout = proj.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) != 0:
        return None
    return base.weight, lora_a.weight, lora_b.weight, float(proj.scaling[name])


# ----------------------------------------------------------------------------- shared pieces

def _norm(x, weight, eps):
    """(weight * x / rms(x), 1/rms) in x's dtype (fp32 or fp64 here)."""
    torch = _torch()
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    return (x * inv).mul_(weight), inv


def _norm_backward(x, inv, weight, grad_normed, need_weight: bool):
    """Gradient of weight * x * inv with respect to x (and the weight), given d(output)."""
    xhat = x * inv
    gxhat = grad_normed * weight
    dot = (gxhat * xhat).mean(-1, keepdim=True)
    grad_w = (grad_normed * xhat).sum(0) if need_weight else None
    grad_x = gxhat.sub_(xhat.mul_(dot)).mul_(inv)
    return grad_x, grad_w


def _project(x, parts, lows, index: int, out=None):
    """x @ W.T + scaling * (A x) @ B.T, with A x taken from `lows` (the stacked thin matmul); into `out` if given."""
    torch = _torch()
    weight, a, b, scaling = parts
    out = torch.mm(x, weight.t(), out=out) if out is not None else x @ weight.t()
    if a is not None:
        out.addmm_(lows[index], b.t(), alpha=scaling)
    return out


def _stacked_lows(x, projections):
    """One matmul x @ [A1; A2; ...].T for every adapted projection reading x; returns (all, per-projection views)."""
    torch = _torch()
    adapters = [p[1] for p in projections if p[1] is not None]
    if not adapters:
        return None, [None] * len(projections)
    stacked = torch.cat(adapters) if len(adapters) > 1 else adapters[0]
    low = x @ stacked.t()
    views, at = [], 0
    for p in projections:
        if p[1] is None:
            views.append(None)
        else:
            views.append(low[:, at:at + p[1].shape[0]])
            at += p[1].shape[0]
    return low, views


def _projections_backward(x_in, grads, projections, low):
    """Backward of several projections reading x_in: returns d x_in and (dA, dB) per projection.

    grads[j] is d(output_j) [T, out_j]. x_in is the (recomputed) input, needed only for the A gradients.
    """
    torch = _torch()
    grad_x = None
    for g, (weight, _, _, _) in zip(grads, projections):
        grad_x = g @ weight if grad_x is None else grad_x.addmm_(g, weight)
    adapted = [j for j, p in enumerate(projections) if p[1] is not None]
    pairs: list = [(None, None)] * len(projections)
    if not adapted:
        return grad_x, pairs
    # The LoRA products are thin (r columns). MKL runs [T, out] @ [out, r] and [out, T] @ [T, r] 3-4x slower
    # than the same products transposed, so d(A x) is computed as rows of [sum r, T] and dB as (u.T @ g).T.
    ranks = [projections[j][1].shape[0] for j in adapted]
    grad_low_t = torch.empty((sum(ranks), x_in.shape[0]), dtype=x_in.dtype, device=x_in.device)
    at = 0
    for j, rank in zip(adapted, ranks):
        b, scaling = projections[j][2], projections[j][3]
        u = low[:, at:at + rank]
        pairs[j] = [None, torch.mm(u.t(), grads[j]).mul_(scaling).t()]
        torch.mm(b.t(), grads[j].t(), out=grad_low_t[at:at + rank]).mul_(scaling)
        at += rank
    stacked = torch.cat([projections[j][1] for j in adapted]) if len(adapted) > 1 else projections[adapted[0]][1]
    grad_x.addmm_(grad_low_t.t(), stacked)
    grad_stacked = grad_low_t @ x_in
    at = 0
    for j, rank in zip(adapted, ranks):
        pairs[j][0] = grad_stacked[at:at + rank]
        at += rank
    return grad_x, pairs


def _unpack(weights, scalings):
    """(W, A, B, scaling) per projection from the node's flat weight inputs (four slots per projection)."""
    return [tuple(weights[4 * j:4 * j + 3]) + (scalings[j],) for j in range(len(scalings))]


def _weight_grads(pairs):
    """The node's gradients for its flat weight inputs: none for W and the scaling slot, dA and dB."""
    grads = []
    for grad_a, grad_b in pairs:
        grads += [None, grad_a, grad_b, None]
    return grads


def _rotate_half(x):
    torch = _torch()
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _slab(like, length: int, widths: list[int]):
    """Contiguous [length, width] buffers carved from one allocation, in order.

    The tensors a half layer keeps for backward live and die together; taking them from one block
    keeps the heap from fragmenting around the half's temporaries (peak RSS ~60 MB lower on SmolLM2).
    """
    torch = _torch()
    block = torch.empty(length * sum(widths), dtype=like.dtype, device=like.device)
    views, at = [], 0
    for width in widths:
        views.append(block[at:at + length * width].view(length, width))
        at += length * width
    return views


def _rope_(x, cos, sin):
    """x * cos + rotate_half(x) * sin, written into x."""
    turned = _rotate_half(x).mul_(sin)
    return x.mul_(cos).add_(turned)


def _rotate_half_transposed(x):  # the adjoint of rotate_half: (y1, y2) -> (y2, -y1)
    torch = _torch()
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


# ----------------------------------------------------------------------------- the two nodes

def _make_nodes():
    from loralab.engine.fastpath import fold_heads as fold
    from loralab.engine.fastpath import repeat_heads as repeat

    torch = _torch()
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def heads_first(t, a, b):  # rows a:b of [T, H, D] as [1, H, n, D]
        return t[a:b].transpose(0, 1).unsqueeze(0)

    class AttentionHalf(torch.autograd.Function):
        """x + o_proj(attention(rope(q, k), v)) with q, k, v = projections of rms_norm(x); LoRA on any projection."""

        @staticmethod
        def forward(ctx, x, norm_weight, cos, sin, cfg, *weights):
            projections = _unpack(weights, cfg["scalings"])
            shape = x.shape
            length = shape[-2]
            heads, kv_heads, dim = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
            groups = heads // kv_heads
            flat = x.reshape(length, shape[-1])
            normed, inv = _norm(flat, norm_weight, cfg["eps"])
            low_in, lows = _stacked_lows(normed, projections[:3])
            hidden, kv_width = shape[-1], kv_heads * dim
            q_buf, k_buf, v_buf, out_buf, result = _slab(x, length, [heads * dim, kv_width, kv_width, heads * dim,
                                                                      hidden])
            q = _project(normed, projections[0], lows, 0, q_buf).view(length, heads, dim)
            k = _project(normed, projections[1], lows, 1, k_buf).view(length, kv_heads, dim)
            v = _project(normed, projections[2], lows, 2, v_buf).view(length, kv_heads, dim)
            del normed
            c, s = cos.reshape(length, 1, dim), sin.reshape(length, 1, dim)
            # rope in place (q, k become the rotated q, k): one temporary instead of three
            q_rot = _rope_(q, c, s)
            k_rot = _rope_(k, c, s)
            out = out_buf.view(length, heads, dim)
            lses = []
            for a, b in cfg["spans"]:
                o, lse = flash(heads_first(q_rot, a, b), repeat(heads_first(k_rot, a, b), groups),
                               repeat(heads_first(v, a, b), groups), 0.0, True, scale=cfg["scale"])
                out[a:b].copy_(o[0].transpose(0, 1))
                lses.append(lse)
            attn = out.view(length, heads * dim)
            low_out, lows_out = _stacked_lows(attn, projections[3:])
            result = _project(attn, projections[3], lows_out, 0, result).add_(flat)
            ctx.save_for_backward(flat, inv, norm_weight, cos, sin, low_in, q_rot, k_rot, v, out, low_out, *weights, *lses)
            ctx.cfg, ctx.shape = cfg, shape
            return result.view(shape)

        @staticmethod
        def backward(ctx, grad):
            cfg = ctx.cfg
            saved = ctx.saved_tensors
            flat, inv, norm_weight, cos, sin, low_in, q_rot, k_rot, v, out, low_out = saved[:11]
            weights = saved[11:27]
            lses = saved[27:]
            projections = _unpack(weights, cfg["scalings"])
            length = flat.shape[0]
            heads, kv_heads, dim = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
            groups = heads // kv_heads
            grad_out = grad.reshape(length, -1)
            attn = out.view(length, heads * dim)
            grad_attn, pairs_o = _projections_backward(attn, [grad_out], projections[3:], low_out)
            grad_o = grad_attn.view(length, heads, dim)
            grad_q = torch.empty_like(q_rot)
            grad_k = torch.empty_like(k_rot)
            grad_v = torch.empty_like(v)
            for (a, b), lse in zip(cfg["spans"], lses):
                dq, dk, dv = flash_backward(heads_first(grad_o, a, b), heads_first(q_rot, a, b),
                                            repeat(heads_first(k_rot, a, b), groups),
                                            repeat(heads_first(v, a, b), groups), heads_first(out, a, b), lse,
                                            0.0, True, scale=cfg["scale"])
                grad_q[a:b].copy_(dq[0].transpose(0, 1))
                grad_k[a:b].copy_(fold(dk, groups)[0].transpose(0, 1))
                grad_v[a:b].copy_(fold(dv, groups)[0].transpose(0, 1))
            del grad_attn, grad_o
            c, s = cos.reshape(length, 1, dim), sin.reshape(length, 1, dim)
            # rope: y = x * c + rotate_half(x) * s  =>  dx = dy * c + rotate_half^T(dy * s)
            grad_q = _rotate_half_transposed(grad_q * s).add_(grad_q.mul_(c))
            grad_k = _rotate_half_transposed(grad_k * s).add_(grad_k.mul_(c))
            normed, _ = _norm(flat, norm_weight, cfg["eps"])
            grads = [grad_q.view(length, -1), grad_k.view(length, -1), grad_v.view(length, -1)]
            grad_normed, pairs_in = _projections_backward(normed, grads, projections[:3], low_in)
            del normed, grads, grad_q, grad_k, grad_v
            grad_x, grad_w = _norm_backward(flat, inv, norm_weight, grad_normed, ctx.needs_input_grad[1])
            grad_x.add_(grad_out)
            return (grad_x.view(ctx.shape), grad_w, None, None, None, *_weight_grads(pairs_in + pairs_o))

    class MLPHalf(torch.autograd.Function):
        """x + down(silu(gate(n)) * up(n)) with n = rms_norm(x); LoRA on any of the three projections."""

        @staticmethod
        def forward(ctx, x, norm_weight, cfg, *weights):
            projections = _unpack(weights, cfg["scalings"])
            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            normed, inv = _norm(flat, norm_weight, cfg["eps"])
            low_in, lows = _stacked_lows(normed, projections[:2])
            width = projections[0][0].shape[0]
            gate, up, result = _slab(x, flat.shape[0], [width, width, shape[-1]])
            gate = _project(normed, projections[0], lows, 0, gate)
            up = _project(normed, projections[1], lows, 1, up)
            del normed
            mid = torch.nn.functional.silu(gate).mul_(up)
            low_mid, lows_mid = _stacked_lows(mid, projections[2:])
            result = _project(mid, projections[2], lows_mid, 0, result).add_(flat)
            del mid
            ctx.save_for_backward(flat, inv, norm_weight, low_in, gate, up, low_mid, *weights)
            ctx.cfg, ctx.shape = cfg, shape
            return result.view(shape)

        @staticmethod
        def backward(ctx, grad):
            cfg = ctx.cfg
            saved = ctx.saved_tensors
            flat, inv, norm_weight, low_in, gate, up, low_mid = saved[:7]
            weights = saved[7:]
            projections = _unpack(weights, cfg["scalings"])
            grad_out = grad.reshape(flat.shape)
            sig = torch.sigmoid(gate)
            silu = gate * sig
            mid = silu * up if projections[2][1] is not None else None
            grad_mid, pairs_mid = _projections_backward(mid, [grad_out], projections[2:], low_mid)
            del mid
            grad_up = silu.mul_(grad_mid)  # d up = d mid * silu(gate)
            # d gate = d mid * up * sig * (1 + gate * (1 - sig))
            grad_gate = torch.sub(1.0, sig).mul_(gate).add_(1.0).mul_(sig).mul_(up).mul_(grad_mid)
            del sig, grad_mid
            normed, _ = _norm(flat, norm_weight, cfg["eps"])
            grad_normed, pairs_in = _projections_backward(normed, [grad_gate, grad_up], projections[:2], low_in)
            del normed, grad_gate, grad_up
            grad_x, grad_w = _norm_backward(flat, inv, norm_weight, grad_normed, ctx.needs_input_grad[1])
            grad_x.add_(grad_out)
            return (grad_x.view(ctx.shape), grad_w, None, *_weight_grads(pairs_in + pairs_mid))

    return AttentionHalf, MLPHalf


_NODES = None


def _nodes():
    global _NODES
    if _NODES is None:
        _NODES = _make_nodes()
    return _NODES


# ----------------------------------------------------------------------------- the layer forward

def _layer_plan(layer):
    """Everything about a layer the fused forward needs that does not change between calls, or None."""
    torch = _torch()
    from loralab.engine.fastpath import LLAMA_MLPS, LLAMA_NORMS

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    if attn is None or mlp is None or any(type(n).__name__ not in LLAMA_NORMS for n in norms):
        return None
    if type(mlp).__name__ not in LLAMA_MLPS or getattr(getattr(mlp, "config", None), "hidden_act", None) != "silu":
        return None
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return None
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    owners = (attn,) * 4 + (mlp,) * 3
    parts = [_projection(getattr(owner, name, None)) for owner, name in zip(owners, names)]
    if any(p is None for p in parts):
        return None
    config = attn.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = attn.head_dim
    if heads % kv_heads or norms[0].variance_epsilon != norms[1].variance_epsilon:
        return None
    if any(p[0].dtype not in (torch.float32, torch.float64) for p in parts):
        return None
    return {"parts": parts, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "scale": attn.scaling,
            "eps": float(norms[0].variance_epsilon), "dropout": float(getattr(attn, "attention_dropout", 0.0) or 0.0),
            "window": getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None}


def _fused_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                         use_cache=False, position_embeddings=None, **kwargs):
    from loralab.engine.attention import _segments

    torch = _torch()
    plan = None
    if (self.training and torch.is_grad_enabled() and attention_mask is None and past_key_values is None
            and position_ids is not None and position_embeddings is not None and hidden_states.device.type == "cpu"
            and hidden_states.dim() == 3 and hidden_states.shape[0] == 1
            and hidden_states.dtype in (torch.float32, torch.float64)
            and not getattr(self, "gradient_checkpointing", False)):
        plan = _layer_plan(self)  # looked up per call: adapters may be switched, merged or frozen between calls
    if (plan is None or plan["dropout"] or (plan["window"] is not None and hidden_states.shape[1] > plan["window"])
            or any(p[0].dtype != hidden_states.dtype for p in plan["parts"])):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
    attention_half, mlp_half = _nodes()
    cos, sin = position_embeddings
    parts = plan["parts"]
    cfg = {"heads": plan["heads"], "kv_heads": plan["kv_heads"], "head_dim": plan["head_dim"], "scale": plan["scale"],
           "eps": plan["eps"], "spans": _segments(position_ids), "scalings": [p[3] for p in parts[:4]]}
    weights = [t for p in parts[:4] for t in (p[0], p[1], p[2], None)]
    hidden = attention_half.apply(hidden_states, self.input_layernorm.weight, cos, sin, cfg, *weights)
    cfg_mlp = {"eps": plan["eps"], "scalings": [p[3] for p in parts[4:]]}
    weights = [t for p in parts[4:] for t in (p[0], p[1], p[2], None)]
    return mlp_half.apply(hidden, self.post_attention_layernorm.weight, cfg_mlp, *weights)


def fuse_decoder_layers(model) -> int:
    """Give every Llama-style decoder layer of `model` the two-node training forward (falls back per call)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in FUSED_LAYERS:
            module.forward = types.MethodType(_fused_layer_forward, module)
            count += 1
    return count
