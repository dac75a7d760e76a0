"""`loralab train --method dpo --beta ...`: trains on preference pairs; wrong data or a stray --beta is a clear error."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from loralab.cli import app

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "loralab" / "data" / "samples"
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_train_dpo_from_the_command_line(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    common = ("--base-model", tiny_model_dir, "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "96")
    result = invoke("train", "--method", "dpo", "--beta", "0.2", "--data", SAMPLES / "preference_sample.jsonl",
                    "--output", out, *common)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["beta"] == 0.2 and summary["total_steps"] == 2
    assert json.loads((out / "spec.json").read_text())["beta"] == 0.2

    wrong_data = invoke("train", "--method", "dpo", "--data", SAMPLES / "basic_qa.jsonl", "--output",
                        tmp_path / "b", *common)
    assert wrong_data.exit_code == 1 and "preference" in wrong_data.output and "(data)" in wrong_data.output

    stray = invoke("train", "--beta", "0.2", "--data", SAMPLES / "basic_qa.jsonl", "--output", tmp_path / "c",
                   *common)
    assert stray.exit_code == 1 and "beta" in stray.output and "dpo" in stray.output
    assert not (tmp_path / "c").exists()
