"""engine.run dispatches an EvalSpec run directory: error and cancel follow the event contract (no model load)."""
from __future__ import annotations

import json
import threading

import pytest

from loralab.engine.events import read_events
from loralab.engine.run import EXIT_CANCELLED, EXIT_ERROR, execute, is_evaluation
from loralab.spec import EvalSpec


def write_run(tmp_path, tiny_model_dir, rows, **fields):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = EvalSpec(base_model=str(tiny_model_dir), data_path=str(data), embeddings=False, **fields)
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    return run_dir


def test_spec_kind_and_unknown_keys():
    assert is_evaluation('{"kind": "evaluation", "data_path": "x"}') and not is_evaluation('{"data": {}}')
    assert not is_evaluation("not json")
    with pytest.raises(ValueError, match="adapter"):
        EvalSpec(data_path="x", adapter=["y"])


def test_rows_without_reference_give_an_error_event(tmp_path, tiny_model_dir):
    run_dir = write_run(tmp_path, tiny_model_dir, [{"text": "no answer marker here"}])
    assert execute(run_dir, install_signals=False) == EXIT_ERROR
    events = read_events(run_dir)
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["code"] == "no_reference" and events[0]["param"] == "data" and "line 1" in events[0]["message"]


def test_invalid_eval_spec_names_the_field(tmp_path, tiny_model_dir):
    run_dir = write_run(tmp_path, tiny_model_dir, [{"text": "質問: a\n回答: b"}])
    raw = json.loads((run_dir / "spec.json").read_text())
    (run_dir / "spec.json").write_text(json.dumps({**raw, "max_new_tokens": 0}))
    assert execute(run_dir, install_signals=False) == EXIT_ERROR
    error = read_events(run_dir)[-1]
    assert error["code"] == "invalid_spec" and error["param"] == "max_new_tokens"


def test_stop_ends_the_evaluation_as_cancelled(tmp_path, tiny_model_dir):
    run_dir = write_run(tmp_path, tiny_model_dir, [{"text": "質問: 日本の首都は？\n回答: 東京です。"}])
    stop = threading.Event()
    stop.set()  # SIGTERM before the first answer
    assert execute(run_dir, install_signals=False, stop=stop) == EXIT_CANCELLED
    events = read_events(run_dir)
    assert [e["type"] for e in events] == ["cancelled"] and events[0]["checkpoint"] is None
    assert not (run_dir / "report.html").exists()
