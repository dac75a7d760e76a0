"""The fast training kernels compute the same loss and gradients as the stock modules (checked in float64)."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from loralab.engine.batching import PackedCollator, PaddedCollator, causal_lm_loss_sum
from loralab.engine.fastpath import CE_VOCAB_BLOCK, fuse_lora_forward, lean_activations, linear_cross_entropy, plain_head


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("vocab", [17, 2 * CE_VOCAB_BLOCK + 17])  # the second is computed in vocabulary blocks
def test_linear_cross_entropy_matches_cross_entropy(chunk, vocab):
    torch.manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (10,))
    targets[[2, 7]] = -100
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(ref * 0.37, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    got_h, got_w = torch.autograd.grad(got * 0.37, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-12, atol=1e-12)
    # only the hidden states need a gradient (a frozen head): the weight's is not computed
    frozen = weight.detach()
    (only_h,) = torch.autograd.grad(linear_cross_entropy(hidden, frozen, targets, chunk=chunk) * 0.37, (hidden,))
    torch.testing.assert_close(only_h, ref_h, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk=chunk), ref.detach())


def _lora_model(tiny_model_dir, attn: str, fused: bool, full: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.engine.attention import register_packed_attention

    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.5)
        for name, param in model.named_parameters():
            if "norm" in name:  # norms away from 1, so their gradients are tested too
                param.uniform_(0.5, 1.5)
    torch.manual_seed(1)
    layers = model.config.num_hidden_layers
    if not full:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    if fused:
        assert fuse_lora_forward(model) == (0 if full else 7 * layers)
        assert lean_activations(model) == {"norms": 2 * layers + 1, "mlps": layers}
    else:  # transformers' RMSNorm computes in float32 even for float64 input: the reference keeps float64
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(_float64_rms_norm, module)
    model.train()
    return model


def _float64_rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_fast_path_equals_stock_path(tiny_model_dir, full):
    torch.manual_seed(2)
    feats = []
    for n in (7, 12, 5):
        ids = torch.randint(3, 300, (n,)).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    fast = _lora_model(tiny_model_dir, "loralab_packed_sdpa", fused=True, full=full)
    assert plain_head(fast) is not None
    fast_sum, fast_n = causal_lm_loss_sum(fast, PackedCollator()(feats), fused=True)
    (fast_sum / fast_n).backward()
    stock = _lora_model(tiny_model_dir, "sdpa", fused=False, full=full)
    stock_sum, stock_n = causal_lm_loss_sum(stock, PaddedCollator(0)(feats), fused=False)
    (stock_sum / stock_n).backward()
    assert fast_n == stock_n
    torch.testing.assert_close(fast_sum, stock_sum, rtol=1e-10, atol=1e-10)
    fast_grads, stock_grads = _grads(fast), _grads(stock)
    assert fast_grads.keys() == stock_grads.keys()
    assert len(fast_grads) == (len(list(stock.parameters())) if full else 2 * 7 * 2)
    for name, grad in stock_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_fused_lora_falls_back_when_the_adapter_is_off(tiny_model_dir):
    model = _lora_model(tiny_model_dir, "sdpa", fused=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, tuned, rtol=1e-9, atol=1e-9)


def test_engine_forwards_survive_train_and_eval(tiny_model_dir, monkeypatch):
    """transformers' hub kernels re-kernelize on every train()/eval() and would put the stock forwards back."""
    from loralab.engine import fastpath
    from loralab.engine.models import load_model

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = load_model(str(tiny_model_dir))
    assert lean_activations(model)["norms"] > 0
    model.train()
    model.eval()
    model.train()
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(m.forward.__func__ is fastpath._rms_norm_forward for m in norms)
