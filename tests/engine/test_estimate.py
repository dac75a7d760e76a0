"""The memory/speed estimator on the tiny model: monotonic, checkpointing helps, JSON-ready (no timing asserted)."""
from __future__ import annotations

import json

import pytest

from loralab.engine.estimate import Estimate, estimate, layer_activation_values, recommend

FLOPS = 1e11  # a fixed machine speed, so no test measures (or times) anything


def _est(model, **kw) -> Estimate:
    kw.setdefault("matmul_flops", FLOPS)
    return estimate(str(model), **kw)


def test_memory_grows_with_batch_seq_and_rank(tiny_model_dir):
    base = _est(tiny_model_dir, batch_size=2, max_seq_length=64, r=4)
    assert _est(tiny_model_dir, batch_size=4, max_seq_length=64, r=4).peak_memory_bytes > base.peak_memory_bytes
    assert _est(tiny_model_dir, batch_size=2, max_seq_length=128, r=4).peak_memory_bytes > base.peak_memory_bytes
    assert _est(tiny_model_dir, batch_size=2, max_seq_length=64, r=16).peak_memory_bytes > base.peak_memory_bytes


def test_tokens_per_s_falls_with_longer_sequences_and_full_training(tiny_model_dir):
    short = _est(tiny_model_dir, max_seq_length=32)
    long = _est(tiny_model_dir, max_seq_length=256)
    assert 0 < long.tokens_per_s < short.tokens_per_s
    assert _est(tiny_model_dir, method="full", max_seq_length=32).tokens_per_s < short.tokens_per_s


def test_checkpointing_lowers_activation_memory(tiny_model_dir):
    off = _est(tiny_model_dir, batch_size=4, max_seq_length=128)
    on = _est(tiny_model_dir, batch_size=4, max_seq_length=128, gradient_checkpointing=True)
    assert on.breakdown["activations"] < off.breakdown["activations"]
    assert on.peak_memory_bytes < off.peak_memory_bytes
    assert on.breakdown["weights"] == off.breakdown["weights"]


def test_full_needs_more_memory_than_lora(tiny_model_dir):
    lora = _est(tiny_model_dir)
    full = _est(tiny_model_dir, method="full")
    assert full.peak_memory_bytes > lora.peak_memory_bytes
    assert full.breakdown["trainable_state"] > lora.breakdown["trainable_state"]
    assert full.assumptions["trainable_params"] == full.assumptions["base_params"]


def test_bf16_weights_are_half_of_fp32(tiny_model_dir):
    fp32 = _est(tiny_model_dir)
    bf16 = _est(tiny_model_dir, dtype="bf16", device="cuda")
    assert bf16.breakdown["weights"] * 2 == fp32.breakdown["weights"]


def test_breakdown_adds_up_and_is_json_serialisable(tiny_model_dir):
    est = _est(tiny_model_dir, r=8, target_modules=["q_proj", "v_proj"])
    assert est.peak_memory_bytes == sum(est.breakdown.values())
    data = json.loads(json.dumps(est.to_dict()))
    assert data["assumptions"]["target_modules"] == ["q_proj", "v_proj"]
    assert data["assumptions"]["trainable_params"] > 0
    assert set(data) == {"peak_memory_bytes", "tokens_per_s", "breakdown", "assumptions"}


def test_fewer_targets_keep_fewer_activations(tiny_model_dir):
    some = _est(tiny_model_dir, target_modules=["q_proj", "v_proj"])
    every = _est(tiny_model_dir, target_modules="all-linear")
    assert some.breakdown["activations"] < every.breakdown["activations"]


def test_measure_false_gives_no_speed(tiny_model_dir):
    est = estimate(str(tiny_model_dir), measure=False)
    assert est.tokens_per_s is None
    assert est.peak_memory_bytes > 0


def test_layer_activation_count_matches_hand_count():
    dims = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "head_dim": 64, "vocab": 49152}
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # 4h (norms) + 2q + 2kv + heads (SDPA) + 3i (MLP) + 7r (LoRA) + 2; measured with saved-tensor hooks on the
    # engine's lean modules (engine.fastpath): 8643 (the stock modules keep 10179, SiLU's output as well).
    assert layer_activation_values(dims, names, 8, 0) == 4 * 576 + 2 * 576 + 2 * 192 + 9 + 3 * 1536 + 7 * 8 + 2
    assert layer_activation_values(dims, names, 8, 512) == layer_activation_values(dims, names, 8, 0) + 2 * 384 + 512


def test_recommend_turns_checkpointing_on_only_when_short(tiny_model_dir):
    plenty = recommend(str(tiny_model_dir), available_bytes=64 * 2**30, matmul_flops=FLOPS)
    assert plenty.gradient_checkpointing is False and plenty.fits
    need = plenty.without_checkpointing.peak_memory_bytes
    between = (need + plenty.with_checkpointing.peak_memory_bytes) // 2
    short = recommend(str(tiny_model_dir), available_bytes=int(between / 0.9), matmul_flops=FLOPS)
    assert short.gradient_checkpointing is True and short.fits
    hopeless = recommend(str(tiny_model_dir), available_bytes=1024, matmul_flops=FLOPS)
    assert hopeless.gradient_checkpointing is True and not hopeless.fits
    assert "batch_size" in hopeless.reason
    json.dumps(hopeless.to_dict())


def test_bad_arguments_are_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="method"):
        _est(tiny_model_dir, method="qlora")
    with pytest.raises(ValueError, match="dtype"):
        _est(tiny_model_dir, dtype="int8")


def test_hardware_speed_is_measured_once_and_cached(loralab_home, monkeypatch):
    from loralab.engine import estimate as mod

    calls = []
    monkeypatch.setattr(mod.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setattr(mod, "measure_matmul_flops", lambda *a, **k: calls.append(1) or 2.5e10)
    assert mod.hardware_flops("cpu") == 2.5e10
    assert mod.hardware_flops("cpu") == 2.5e10
    assert len(calls) == 1
    cached = json.loads((loralab_home / "hardware.json").read_text())
    assert [v["matmul_flops"] for v in cached.values()] == [2.5e10]


def test_a_speed_measured_on_a_busy_machine_is_measured_again(loralab_home, monkeypatch):
    from loralab.engine import estimate as mod

    speeds = iter([4e10, 1.8e11, 1.2e11])
    monkeypatch.setattr(mod, "measure_matmul_flops", lambda *a, **k: next(speeds))
    monkeypatch.setattr(mod.os, "getloadavg", lambda: (10.0, 10.0, 10.0))
    assert mod.hardware_flops("cpu") == 4e10  # busy: kept, but marked
    monkeypatch.setattr(mod.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert mod.hardware_flops("cpu") == 1.8e11  # measured again on a quiet machine
    assert mod.hardware_flops("cpu") == 1.8e11  # quiet measurement: cached, the third speed is never taken
