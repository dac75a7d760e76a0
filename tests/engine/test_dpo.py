"""DPO training: the run directory on a tiny Llama, data checks, reference semantics, cancel/resume, demo data,
and on the embedded model a log-probability margin (chosen minus rejected) that grows."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from loralab.engine.events import read_events
from loralab.engine.run import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, execute
from loralab.spec import DataSpec, TrainSpec

SHARED_DPO = Path(__file__).resolve().parents[3] / "shared" / "data" / "dpo_en_demo.json"
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "I refuse to answer that."},
    {"prompt": "Explain LoRA.", "chosen": "LoRA adds low-rank matrices to frozen weights.",
     "rejected": "No idea, go away."},
    {"prompt": "Say hello", "chosen": "hello world", "rejected": "whatever"},
    {"prompt": "日本の首都はどこですか？", "chosen": "東京です。", "rejected": "知りません。"},
] * 2


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def dpo_spec(model_dir, data, **overrides) -> TrainSpec:
    base = dict(base_model=str(model_dir), data=DataSpec(path=str(data)), method="dpo", learning_rate=5e-3,
                max_steps=4, per_device_train_batch_size=4, max_seq_length=64, seed=1)
    base.update(overrides)
    return TrainSpec(**base)


def run(run_dir: Path, spec: TrainSpec) -> int:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    return execute(run_dir, install_signals=False)


def lora_keys(path: Path) -> list[str]:
    with safe_open(path / "adapter_model.safetensors", "pt") as fh:
        return list(fh.keys())


def test_dpo_run_writes_the_run_directory(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run_dir = tmp_path / "run"
    assert run(run_dir, dpo_spec(tiny_model_dir, data)) == EXIT_OK

    names = {p.name for p in run_dir.iterdir()}
    assert names == {
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "spec.json", "summary.json", "metrics.jsonl", "events.jsonl", "README.md",
        "tensorboard",
    } - ({"chat_template.jinja"} - names)  # no checkpoints (save_steps=0) and no copy of the reference adapter
    keys = lora_keys(run_dir)
    assert keys and all(("lora_A" in k or "lora_B" in k) and ".ref." not in k for k in keys), keys

    events = read_events(run_dir)
    types = [e["type"] for e in events]
    assert types[0] == "started" and types[-1] == "done" and types.count("step") == 4
    assert events[0]["trainable_params"] > 0 and events[0]["beta"] == 0.1 and events[0]["loss_type"] == "sigmoid"
    steps = [e for e in events if e["type"] == "step"]
    for step in steps:
        assert math.isfinite(step["loss"]) and step["tokens"] > 0
        assert {"rewards_margin", "rewards_accuracy", "rewards_chosen", "rewards_rejected"} <= step.keys()
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert steps[-1]["rewards_margin"] > 0 and steps[-1]["loss"] < steps[0]["loss"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["reference"] == "base_model" and summary["total_steps"] == 4
    assert summary["final_rewards_margin"] == steps[-1]["rewards_margin"]
    assert summary["num_examples"] == len(PAIRS)


def test_sft_rows_with_dpo_and_missing_file_are_clear_errors(tmp_path, tiny_model_dir):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Say hi", "output": "hi"}] * 4)
    assert run(tmp_path / "a", dpo_spec(tiny_model_dir, sft)) == EXIT_ERROR
    error = read_events(tmp_path / "a")[-1]
    assert error["type"] == "error" and error["code"] == "data_invalid" and error["param"] == "data"
    assert "preference" in error["message"] and "sft.jsonl" in error["message"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + '\n{"prompt": "x", "chosen": "y"}\n', encoding="utf-8")
    assert run(tmp_path / "b", dpo_spec(tiny_model_dir, bad)) == EXIT_ERROR
    error = read_events(tmp_path / "b")[-1]
    assert error["code"] == "data_invalid" and "line 2" in error["message"]

    assert run(tmp_path / "c", dpo_spec(tiny_model_dir, tmp_path / "nope.jsonl")) == EXIT_ERROR
    assert read_events(tmp_path / "c")[-1]["param"] == "data.path"

    # prompts that fill max_seq_length leave nothing to compare
    long = write_jsonl(tmp_path / "long.jsonl", [{**p, "prompt": "word " * 200} for p in PAIRS])
    assert run(tmp_path / "d", dpo_spec(tiny_model_dir, long, max_seq_length=16)) == EXIT_ERROR
    error = read_events(tmp_path / "d")[-1]
    assert error["code"] == "data_too_small" and error["param"] == "max_seq_length"


def test_spec_rules_for_dpo_settings():
    data = {"path": "x.jsonl"}
    spec = TrainSpec(data=data, method="dpo")
    assert (spec.beta, spec.loss_type) == (0.1, "sigmoid")
    assert TrainSpec.model_validate_json(spec.model_dump_json()) == spec
    assert TrainSpec(data=data, method="dpo", beta=0.5, loss_type="ipo").beta == 0.5
    assert TrainSpec(data=data).beta is None
    for bad, word in (({"beta": 0.2}, "beta"), ({"loss_type": "ipo"}, "loss_type"),
                      ({"method": "dpo", "beta": 0}, "beta"), ({"method": "dpo", "loss_type": "nope"}, "loss_type"),
                      ({"method": "dpo", "distributed": {"strategy": "ddp", "nproc_per_node": 2}}, "one process")):
        with pytest.raises(ValueError, match=word):
            TrainSpec(data=data, **bad)


def test_continuing_an_adapter_makes_it_the_reference(tmp_path, tiny_model_dir):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": p["prompt"], "output": p["chosen"]} for p in PAIRS])
    start = tmp_path / "sft-run"
    assert run(start, TrainSpec(base_model=str(tiny_model_dir), data=DataSpec(path=str(sft)), max_steps=6,
                                learning_rate=1e-2, per_device_train_batch_size=4, max_seq_length=64)) == EXIT_OK
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    fresh, continued = tmp_path / "fresh", tmp_path / "continued"
    assert run(fresh, dpo_spec(tiny_model_dir, data, max_steps=1)) == EXIT_OK
    assert run(continued, dpo_spec(tiny_model_dir, data, max_steps=1, resume_from=str(start))) == EXIT_OK
    first = {d: next(e for e in read_events(d) if e["type"] == "step") for d in (fresh, continued)}
    # the policy starts from the SFT adapter (other log-probs than the base) ...
    assert abs(first[continued]["logps_chosen"] - first[fresh]["logps_chosen"]) > 1e-3
    # ... and so does the reference: at the first step policy and reference agree, so the rewards are zero
    assert first[continued]["rewards_chosen"] == pytest.approx(0, abs=1e-5)
    assert first[continued]["rewards_rejected"] == pytest.approx(0, abs=1e-5)
    assert json.loads((continued / "summary.json").read_text())["reference"] == "adapter"
    assert not (continued / "ref").exists()


def test_cancel_checkpoints_and_a_rerun_resumes(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 10)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = dpo_spec(tiny_model_dir, data, max_steps=-1, num_train_epochs=20, per_device_train_batch_size=1)
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "loralab.engine.run", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "step" for e in read_events(run_dir)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_CANCELLED, proc.stderr.read().decode()[-2000:]
    last = read_events(run_dir)[-1]
    assert last["type"] == "cancelled" and last["checkpoint"]
    ckpt = Path(last["checkpoint"])
    assert (ckpt / "trainer_state.json").is_file() and not (run_dir / "checkpoints" / "README.md").exists()
    assert all(".ref." not in k for k in lora_keys(ckpt))

    # a shorter spec in the same directory: the rerun resumes from the checkpoint and finishes
    stopped = last["step"]
    resumed_spec = spec.model_copy(update={"max_steps": stopped + 2})
    (run_dir / "spec.json").write_text(resumed_spec.model_dump_json())
    assert execute(run_dir, install_signals=False) == EXIT_OK
    started = [e for e in read_events(run_dir) if e["type"] == "started"]
    assert started[-1]["resumed_from_step"] == stopped
    steps = [e["step"] for e in read_events(run_dir) if e["type"] == "step"]
    assert steps[-2:] == [stopped + 1, stopped + 2]
    assert (run_dir / "adapter_model.safetensors").is_file()


def test_shared_dpo_demo_file_trains_as_it_is(tmp_path, tiny_model_dir):
    if not SHARED_DPO.is_file():
        pytest.skip(f"{SHARED_DPO} not present")
    run_dir = tmp_path / "run"
    spec = dpo_spec(tiny_model_dir, SHARED_DPO, max_steps=2, per_device_train_batch_size=2, max_seq_length=512)
    spec.data = DataSpec(path=str(SHARED_DPO), max_rows=12, validation_split=0.25)
    assert run(run_dir, spec) == EXIT_OK, read_events(run_dir)[-1]
    events = read_events(run_dir)
    started = next(e for e in events if e["type"] == "started")
    assert started["num_examples"] + started["validation_examples"] <= 12 and started["validation_examples"] == 3
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]
    assert any(e["type"] == "eval" and "rewards_margin" in e for e in events)
    assert len((run_dir / "validation.jsonl").read_text().splitlines()) == 3


def test_preference_margins_is_independent_of_training(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.engine.dpo import completion_logprob, preference_margins

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = {"messages": [{"role": "user", "content": "Say hello"}], "chosen": "hello world", "rejected": "bye"}
    margin = preference_margins(model, tokenizer, [record])[0]
    chosen = completion_logprob(model, tokenizer, record["messages"], "hello world")
    rejected = completion_logprob(model, tokenizer, record["messages"], "bye")
    assert margin == pytest.approx(chosen - rejected) and chosen < 0 and rejected < 0
    swapped = preference_margins(model, tokenizer, [{**record, "chosen": "bye", "rejected": "hello world"}])[0]
    assert swapped == pytest.approx(-margin)


# Six pairs where the chosen answer is polite and on topic and the rejected one is rude or wrong.
OWN_PAIRS = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Figure it out yourself."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have three legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue.", "Stop asking me things."),
    ("What is 2 + 2?", "2 + 2 equals 4.", "2 + 2 equals 7."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.", "I don't care."),
    ("What do bees make?", "Bees make honey.", "Bees make cheese."),
]


@pytest.mark.model
def test_dpo_on_embedded_model_grows_the_preference_margin(tmp_path):
    from loralab.engine.dpo import preference_margins
    from loralab.engine.models import load_for_inference

    rows = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in OWN_PAIRS]
    records = [{"messages": [{"role": "user", "content": q}], "chosen": c, "rejected": r} for q, c, r in OWN_PAIRS]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run_dir = tmp_path / "run"
    spec = TrainSpec(data=DataSpec(path=str(data)), method="dpo", beta=0.1, learning_rate=1e-3, max_steps=3,
                     per_device_train_batch_size=6, max_seq_length=128, seed=0)
    assert run(run_dir, spec) == EXIT_OK, read_events(run_dir)[-1]

    tuned, tokenizer = load_for_inference(spec.base_model, str(run_dir))
    with tuned.disable_adapter():  # the base model: the starting point and DPO's reference
        before = preference_margins(tuned, tokenizer, records)
    after = preference_margins(tuned, tokenizer, records)
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    assert mean_after > mean_before + 1.0, (before, after)
    assert sum(a > b for a, b in zip(after, before)) >= 5, (before, after)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_rewards_margin"] > 0 and summary["total_steps"] == 3
