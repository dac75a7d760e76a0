"""The CLI: every bad input exits 1 naming line and field, never a traceback; training on real data files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loralab.cli import app

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


BAD_FILES = [
    ("broken.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2", "bad_json"),
    ("missing.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "line 2: output", None),
    ("empty_field.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "b"}\n',
     "line 2: instruction", None),
    ("role.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
     "line 1: messages[1].role", None),
    ("noassist.jsonl", b'{"messages": [{"role": "user", "content": "a"}]}\n', "line 1: messages", None),
    ("latin1.jsonl", '{"instruction": "caf\u00e9", "output": "b"}\n'.encode("latin-1"), "line 1", None),
    ("empty.jsonl", b"", "empty", None),
]


@pytest.mark.parametrize("name,content,expect,_", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_data_validate_reports_line_and_field(tmp_path, name, content, expect, _):
    path = tmp_path / name
    path.write_bytes(content)
    result = invoke("data", "validate", path, "--no-tokens")
    assert result.exit_code == 1
    assert expect in result.output


@pytest.mark.parametrize("name,content,expect,_", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_train_on_bad_data_exits_1_with_line(tmp_path, tiny_model_dir, name, content, expect, _):
    path = tmp_path / name
    path.write_bytes(content)
    result = invoke("train", "--base-model", tiny_model_dir, "--data", path, "--output", tmp_path / "run")
    assert result.exit_code == 1
    assert expect.split(":")[0] in result.output


def test_train_settings_errors_name_the_setting(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    result = invoke("train", "--data", data, "--output", tmp_path / "r", "--set", "lora.rank=4")
    assert result.exit_code == 1 and "lora.rank" in result.output and "unknown setting" in result.output
    result = invoke("train", "--data", data, "--output", tmp_path / "r", "--r", "0")
    assert result.exit_code == 1 and "lora.r" in result.output
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: [1\n")
    result = invoke("train", "--data", data, "--output", tmp_path / "r", "--config", config)
    assert result.exit_code == 1 and "not valid YAML" in result.output
    result = invoke("train", "--data", tmp_path / "nope.jsonl", "--output", tmp_path / "r",
                    "--base-model", tiny_model_dir)
    assert result.exit_code == 1 and "not found" in result.output


def test_unknown_base_model_is_a_clear_error(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    result = invoke("train", "--data", data, "--output", tmp_path / "r", "--base-model", "no-such-org/no-such-model")
    assert result.exit_code == 1
    assert "no-such-org/no-such-model" in result.output and "hub cannot be reached" in result.output
    result = invoke("generate", "--base-model", tmp_path / "missing-dir", "--prompt", "hi")
    assert result.exit_code == 1 and "not found" in result.output


def test_train_from_yaml_config_and_csv(tmp_path, tiny_model_dir):
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n", encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: {tiny_model_dir}\nmax_steps: 2\nlora:\n  r: 4\n")
    result = invoke("train", "--data", csv, "--output", tmp_path / "run", "--config", config, "--set", "seed=3")
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert spec["lora"]["r"] == 4 and spec["seed"] == 3 and spec["max_steps"] == 2
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_generate_with_tiny_model_and_adapter(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    assert invoke("train", "--base-model", tiny_model_dir, "--data", data, "--output", tmp_path / "run",
                  "--max-steps", "1").exit_code == 0
    result = invoke("generate", "--base-model", tiny_model_dir, "--adapter", tmp_path / "run", "--prompt", "hello",
                    "--max-new-tokens", "5")
    assert result.exit_code == 0
    result = invoke("generate", "--base-model", tiny_model_dir, "--prompt", "hello", "--raw", "--temperature", "0.7",
                    "--seed", "1", "--max-new-tokens", "3")
    assert result.exit_code == 0
    result = invoke("generate", "--base-model", tiny_model_dir, "--prompt", "hello", "--temperature", "-1")
    assert result.exit_code == 1 and "temperature" in result.output


@pytest.mark.model
@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "identity.json"])
def test_train_embedded_model_on_shared_data_unchanged(tmp_path, name):
    if not (SHARED / name).is_file():
        pytest.skip(f"{SHARED / name} not present")
    out = tmp_path / "run"
    result = invoke("train", "--data", SHARED / name, "--output", out, "--max-steps", "2", "--batch-size", "2",
                    "--max-seq-len", "128")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_steps"] == 2 and summary["base_model"] == "smollm2-135m-instruct"


@pytest.mark.model
def test_data_validate_prints_token_statistics(tmp_path):
    from loralab.data import sample_path

    result = invoke("data", "validate", sample_path("ja_qa"))
    assert result.exit_code == 0
    assert "20 rows" in result.output and "format text" in result.output and "supervised_tokens" in result.output


def test_eval_and_export_commands_on_tiny_model(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    run = tmp_path / "run"
    assert invoke("train", "--base-model", tiny_model_dir, "--data", data, "--output", run,
                  "--max-steps", "1").exit_code == 0
    result = invoke("eval", "--base-model", tiny_model_dir, "--adapter", run, "--data", data, "--out",
                    tmp_path / "eval", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "eval" / "results.csv").is_file()
    result = invoke("eval", "--base-model", tiny_model_dir, "--data", tmp_path / "missing.jsonl", "--out",
                    tmp_path / "eval2")
    assert result.exit_code == 1 and "missing.jsonl" in result.output

    result = invoke("export", run, "--format", "merged", "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "config.json").is_file()
    result = invoke("export", run, "--format", "merged", "--out", tmp_path / "merged")
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = invoke("export", run, "--format", "zip", "--out", tmp_path / "z")
    assert result.exit_code == 1 and "zip" in result.output


def test_learn_is_mounted():
    result = invoke("learn", "list", "--lang", "en")
    assert result.exit_code == 0 and "LoRA" in result.output


def test_qlora_on_cpu_is_refused_before_training_and_resume_errors(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    result = invoke("train", "--base-model", tiny_model_dir, "--data", data, "--output", tmp_path / "q",
                    "--method", "qlora")
    assert result.exit_code == 1 and "CUDA" in result.output
    assert not (tmp_path / "q" / "events.jsonl").exists()
    result = invoke("train", "--resume", tmp_path / "nothing")
    assert result.exit_code == 1 and "spec.json" in result.output
    result = invoke("train", "--resume", tmp_path / "nothing", "--r", "4")
    assert result.exit_code == 1 and "--resume takes the settings" in result.output


def test_resume_continues_a_stopped_run(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 8)
    run = tmp_path / "run"
    assert invoke("train", "--base-model", tiny_model_dir, "--data", data, "--output", run, "--max-steps", "2",
                  "--batch-size", "1", "--set", "save_steps=1").exit_code == 0
    spec = json.loads((run / "spec.json").read_text())
    spec["max_steps"] = 4  # the run had been meant to go on: resume it from checkpoint-2
    (run / "spec.json").write_text(json.dumps(spec))
    result = invoke("train", "--resume", run)
    assert result.exit_code == 0, result.output
    started = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines() if '"started"' in l]
    assert started[-1]["resumed_from_step"] == 2
    assert json.loads((run / "summary.json").read_text())["total_steps"] == 4


def test_train_dry_run_prints_the_estimate_and_trains_nothing(tmp_path, tiny_model_dir):
    data = SHARED / "alpaca_en_demo.json"
    out = tmp_path / "run"
    small = invoke("train", "--data", data, "--base-model", tiny_model_dir, "--output", out, "--dry-run", "--r", 4)
    assert small.exit_code == 0, small.output
    assert "estimate: peak memory about" in small.output and "tokens/s" in small.output
    assert not out.exists()
    bigger = invoke("train", "--data", data, "--base-model", tiny_model_dir, "--dry-run", "--batch-size", 64,
                    "--set", "micro_batch_tokens=100000")

    def gib(text):
        return float(text.split("peak memory about ")[1].split(" GiB")[0])

    assert gib(bigger.output) > gib(small.output)
