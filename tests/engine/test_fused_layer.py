"""The two-node decoder layer (engine.fused_layer) computes the stock layer's loss and gradients, keeping less."""
from __future__ import annotations

import types

import pytest
import torch

from loralab.engine.batching import PackedCollator, PaddedCollator, causal_lm_loss_sum
from loralab.engine.fastpath import fuse_lora_forward, lean_activations
from loralab.engine.fused_layer import fuse_decoder_layers


def _float64_rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _model(tiny_model_dir, attn: str, fused: bool, targets="all-linear", rank: int = 4, norms_trainable=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.engine.attention import register_packed_attention

    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # away from 1, so a wrong norm backward shows
            else:
                param.normal_(0, 0.5)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank + 1, target_modules=targets,
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    if norms_trainable:
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.requires_grad_(True)
    layers = model.config.num_hidden_layers
    if fused:
        fuse_lora_forward(model)
        lean_activations(model)
        assert fuse_decoder_layers(model) == layers
    else:
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(_float64_rms_norm, module)
    model.train()
    return model


def _features(lengths, seed=2):
    torch.manual_seed(seed)
    feats = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,)).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return feats


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fused_calls(model, calls: list):
    from loralab.engine import fused_layer

    nodes = fused_layer._nodes()
    for node in nodes:
        original = node.apply

        def counted(*args, _original=original, _node=node):
            calls.append(_node.__name__)
            return _original(*args)

        node.apply = counted
    return nodes


@pytest.mark.parametrize("case", ["all-linear", "attention-only", "one-example", "trainable-norms"])
def test_fused_layer_equals_stock_layer(tiny_model_dir, case, monkeypatch):
    lengths = (9,) if case == "one-example" else (7, 12, 5)
    targets = ["q_proj", "v_proj"] if case == "attention-only" else "all-linear"
    norms = case == "trainable-norms"
    feats = _features(lengths)
    fast = _model(tiny_model_dir, "loralab_packed_sdpa", fused=True, targets=targets, norms_trainable=norms)
    calls: list = []
    nodes = _fused_calls(fast, calls)
    try:
        fast_sum, fast_n = causal_lm_loss_sum(fast, PackedCollator()(feats))
        (fast_sum / fast_n).backward()
    finally:
        for node in nodes:
            del node.apply  # back to the class's own apply
    assert calls.count("AttentionHalf") == calls.count("MLPHalf") == fast.config.num_hidden_layers
    stock = _model(tiny_model_dir, "sdpa", fused=False, targets=targets, norms_trainable=norms)
    stock_sum, stock_n = causal_lm_loss_sum(stock, PaddedCollator(0)(feats), fused=False)
    (stock_sum / stock_n).backward()
    assert fast_n == stock_n
    torch.testing.assert_close(fast_sum, stock_sum, rtol=1e-10, atol=1e-10)
    fast_grads, stock_grads = _grads(fast), _grads(stock)
    assert fast_grads.keys() == stock_grads.keys()
    expected = 2 * (2 if case == "attention-only" else 7) * 2 + (2 * 2 if norms else 0)
    assert len(stock_grads) == expected
    for name, grad in stock_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_fused_layer_keeps_a_third_fewer_values(tiny_model_dir):
    """Bytes saved for backward inside the decoder layers: exactly the docstring's count, a third under stock."""
    feats = _features((20, 30))
    tokens = 50

    def saved_bytes(model) -> int:
        seen: dict[int, int] = {}
        inside = [False]

        def pack(t):
            if inside[0] and not isinstance(t, torch.nn.Parameter):  # weights are not activations
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        handles = []
        for module in model.modules():
            if type(module).__name__ == "LlamaDecoderLayer":
                handles.append(module.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)))
                handles.append(module.register_forward_hook(lambda *a: inside.__setitem__(0, False)))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss_sum(model, PackedCollator()(feats))
        for handle in handles:
            handle.remove()
        return sum(seen.values())

    lean = _model(tiny_model_dir, "loralab_packed_sdpa", fused=False)
    fuse_lora_forward(lean)
    lean_activations(lean)
    fused = _model(tiny_model_dir, "loralab_packed_sdpa", fused=True)
    config = fused.config
    h, i, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = config.num_key_value_heads * h // heads
    per_token_per_layer = 4 * h + 2 * kv + 2 * i + heads + 7 * 4 + 2  # r = 4 on all 7 projections
    got = saved_bytes(fused)
    rope = 2 * tokens * (h // heads)  # cos and sin, shared by every layer
    # the last layer's output shares one block with the tensors that layer keeps (fused_layer._slab)
    last_output = tokens * h
    assert got == (tokens * config.num_hidden_layers * per_token_per_layer + rope + last_output) * 8  # float64
    assert got < 0.75 * saved_bytes(lean)


def test_fused_layer_falls_back_where_it_does_not_apply(tiny_model_dir):
    """Padded batches, no-grad evaluation, dropout and merged adapters run the stock layer and give its results."""
    feats = _features((6, 9))
    fused = _model(tiny_model_dir, "sdpa", fused=True)
    calls: list = []
    nodes = _fused_calls(fused, calls)
    try:
        padded_sum, _ = causal_lm_loss_sum(fused, PaddedCollator(0)(feats))  # attention mask: stock layer
        with torch.no_grad():
            packed_eval, _ = causal_lm_loss_sum(fused, PackedCollator()(feats))  # no gradients: stock layer
    finally:
        for node in nodes:
            del node.apply
    assert calls == []
    stock = _model(tiny_model_dir, "sdpa", fused=False)
    stock_sum, _ = causal_lm_loss_sum(stock, PaddedCollator(0)(feats), fused=False)
    torch.testing.assert_close(padded_sum, stock_sum, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed_eval, stock_sum.detach(), rtol=1e-10, atol=1e-10)
