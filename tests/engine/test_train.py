"""End-to-end engine tests on a tiny Llama built from a config (no network, a few seconds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loralab.engine.batching import PackedCollator, PaddedCollator, causal_lm_loss_sum
from loralab.engine.events import read_events
from loralab.engine.run import EXIT_ERROR, EXIT_OK, execute
from loralab.spec import DataSpec, TrainSpec

ROWS = [
    {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
    {"instruction": "Explain LoRA.", "output": "LoRA adds low-rank matrices to frozen weights."},
    {"instruction": "Say hello", "input": "world", "output": "hello world"},
    {"instruction": "日本の首都はどこですか？", "output": "東京です。"},
] * 2


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_spec(tiny_model_dir, data, validation_split=0.0, **overrides) -> TrainSpec:
    base = dict(
        base_model=str(tiny_model_dir), data=DataSpec(path=str(data), validation_split=validation_split), learning_rate=5e-3,
        num_train_epochs=5, per_device_train_batch_size=4, max_seq_length=64, seed=1,
    )
    base.update(overrides)
    return TrainSpec(**base)


def test_lora_run_writes_exact_files_and_learns(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(tiny_spec(tiny_model_dir, data).model_dump_json())
    assert execute(run_dir, install_signals=False) == EXIT_OK

    names = {p.name for p in run_dir.iterdir()}
    assert names == {
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "spec.json", "summary.json", "metrics.jsonl", "events.jsonl", "README.md",
        "tensorboard",
    } - ({"chat_template.jinja"} - names)
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    with safe_open(run_dir / "adapter_model.safetensors", "pt") as fh:
        keys = list(fh.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert all(m["tokens_per_s"] > 0 and m["learning_rate"] is not None for m in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("train_seconds", "real_tokens", "tokens_per_s", "peak_rss_mb", "final_loss", "trainable_params"):
        assert summary[key] is not None
    types = [e["type"] for e in read_events(run_dir)]
    assert types[0] == "started" and types[-1] == "done" and types.count("step") == 10


@pytest.mark.parametrize("attn", ["sdpa", "loralab_packed_sdpa"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    from loralab.engine.attention import register_packed_attention

    register_packed_attention()
    # float64 and large random weights: rounding stays tiny while attention leakage would show clearly
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.5)
    feats = []
    for n in (7, 12, 5):
        ids = torch.randint(3, model.config.vocab_size, (n,)).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    packed_sum, packed_n = causal_lm_loss_sum(model, PackedCollator()(feats))
    padded_sum, padded_n = causal_lm_loss_sum(model, PaddedCollator(0)(feats))
    if attn != "sdpa":  # padded batches always run on plain SDPA (the engine loads it when packing is off)
        model.set_attn_implementation("sdpa")
        padded_sum, padded_n = causal_lm_loss_sum(model, PaddedCollator(0)(feats))
        model.set_attn_implementation(attn)
    one_by_one = [causal_lm_loss_sum(model, PackedCollator()([f])) for f in feats]
    single_sum = sum(s for s, _ in one_by_one)
    assert packed_n == padded_n == sum(n for _, n in one_by_one)
    torch.testing.assert_close(packed_sum, single_sum, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(padded_sum, single_sum, rtol=1e-9, atol=1e-9)
    # attention that leaked across examples would change the loss by far more than that
    leaky = PackedCollator()(feats)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).unsqueeze(0)
    leaky_sum, _ = causal_lm_loss_sum(model, leaky)
    assert abs(float(leaky_sum - single_sum)) > 1e-3
    # the same loss as transformers' own full-logits computation
    ref = model(input_ids=torch.tensor([feats[1]["input_ids"]]), labels=torch.tensor([feats[1]["labels"]])).loss
    # (transformers upcasts the logits to float32, so its loss is only float32-accurate)
    torch.testing.assert_close(one_by_one[1][0] / one_by_one[1][1], ref.to(torch.float64), rtol=1e-6, atol=1e-6)


def test_full_finetune_and_validation_split(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run_dir = tmp_path / "full"
    spec = tiny_spec(tiny_model_dir, data, method="full", max_steps=3, learning_rate=1e-3,
                     validation_split=0.25, packing=False)
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    assert execute(run_dir, install_signals=False) == EXIT_OK
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "config.json").is_file()
    assert len((run_dir / "validation.jsonl").read_text().splitlines()) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "full" and summary["eval_loss"] is not None and summary["num_examples"] == 6


def test_continue_from_adapter(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    first, second = tmp_path / "a", tmp_path / "b"
    for run_dir, extra in ((first, {}), (second, {"resume_from": str(tmp_path / "a")})):
        run_dir.mkdir()
        (run_dir / "spec.json").write_text(tiny_spec(tiny_model_dir, data, max_steps=4, **extra).model_dump_json())
        assert execute(run_dir, install_signals=False) == EXIT_OK
    losses = [json.loads((d / "summary.json").read_text())["first_loss"] for d in (first, second)]
    assert losses[1] < losses[0]  # the second run starts where the first adapter left off


def test_bad_data_becomes_error_event(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"\n', encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(tiny_spec(tiny_model_dir, data).model_dump_json())
    assert execute(run_dir, install_signals=False) == EXIT_ERROR
    error = read_events(run_dir)[-1]
    assert error["type"] == "error" and error["code"] == "data_invalid" and "line 2" in error["message"]


def test_cancel_with_sigterm_checkpoints_and_exits_3(tmp_path, tiny_model_dir):
    import signal
    import time

    data = write_jsonl(tmp_path / "train.jsonl", ROWS * 50)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(
        tiny_spec(tiny_model_dir, data, num_train_epochs=50, per_device_train_batch_size=1).model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "loralab.engine.run", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "step" for e in read_events(run_dir)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 3, proc.stderr.read().decode()[-2000:]
    last = read_events(run_dir)[-1]
    assert last["type"] == "cancelled" and last["checkpoint"]
    assert (Path(last["checkpoint"]) / "adapter_model.safetensors").is_file()
    # running again resumes from that checkpoint
    started = [e for e in read_events(run_dir) if e["type"] == "started"]
    assert started[0]["resumed_from_step"] == 0


def test_micro_batches_give_the_same_gradient(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from loralab.engine.attention import register_packed_attention
    from loralab.engine.batching import split_packed

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64,
                                                 attn_implementation=register_packed_attention())
    torch.manual_seed(0)
    feats = []
    for n in (7, 12, 5, 9):
        ids = torch.randint(3, model.config.vocab_size, (n,)).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    batch = PackedCollator()(feats)
    pieces = split_packed(batch, 14)
    assert [p["input_ids"].shape[1] for p in pieces] == [7, 12, 14]  # whole examples, a long one alone
    grads = []
    for parts in ([batch], pieces):
        model.zero_grad()
        total = sum(causal_lm_loss_sum(model, p)[0] for p in parts)
        total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("available_mb,expect_on", [(1, True), (64 * 1024, False)])
def test_auto_checkpointing_follows_the_memory_estimate(tmp_path, tiny_model_dir, monkeypatch, available_mb,
                                                        expect_on):
    """gradient_checkpointing='auto' turns it on only when the estimate does not fit the memory available."""
    import loralab.engine.hardware as hardware

    monkeypatch.setattr(hardware, "available_memory_bytes", lambda device="cpu": available_mb * 2**20)
    seen = {}
    from transformers import Trainer

    original = Trainer.train

    def spy(self, *args, **kwargs):
        seen["on"] = self.args.activation_checkpointing
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = tiny_spec(tiny_model_dir, data, max_steps=2, gradient_checkpointing="auto")
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    assert execute(run_dir, install_signals=False) == EXIT_OK
    assert seen["on"] is expect_on
    logs = [e["message"] for e in read_events(run_dir) if e["type"] == "log"]
    assert any("activation checkpointing on" in m for m in logs) is expect_on
