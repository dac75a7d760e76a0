"""Child-process entry point: `python -m loralab.engine.run RUN_DIR` trains (or evaluates) RUN_DIR/spec.json."""
from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3


def execute(run_dir: Path, echo=None, install_signals: bool = True, stop: threading.Event | None = None) -> int:
    """Run the job in run_dir, turning every outcome into events and an exit code."""
    from pydantic import ValidationError

    from loralab.engine.distributed import die_with_parent, is_main_process, under_torchrun
    from loralab.engine.events import EventWriter

    run_dir = Path(run_dir)
    if under_torchrun():
        die_with_parent()  # ranks live in their own sessions: a SIGKILLed torchrun must take them along
    main = is_main_process()  # under torchrun only rank 0 writes events
    events = EventWriter(run_dir, echo=echo if main else None, enabled=main)
    stop = stop or threading.Event()
    if install_signals:
        # SIGTERM (cancel) lets the current step finish, writes a checkpoint and exits with 3.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        from loralab.spec import EvalSpec, TrainSpec

        text = (run_dir / "spec.json").read_text(encoding="utf-8")
        if is_evaluation(text):
            return run_evaluation(EvalSpec.model_validate_json(text), run_dir, events, stop)
        from loralab.engine.export_job import is_export, run_export

        if is_export(text):
            from loralab.spec import ExportSpec

            return run_export(ExportSpec.model_validate_json(text), run_dir, events, stop, interrupt=install_signals)
        spec = TrainSpec.model_validate_json(text)
    except FileNotFoundError:
        events.emit("error", code="spec_missing", message=f"{run_dir / 'spec.json'} not found", param=None)
        return EXIT_ERROR
    except ValidationError as exc:
        first = exc.errors()[0]
        events.emit("error", code="invalid_spec", message=str(exc), param=".".join(map(str, first["loc"])))
        return EXIT_ERROR
    from loralab.engine.train import EngineError, train

    try:
        result = train(spec, run_dir, events=events, stop=stop)
    except EngineError as exc:
        events.emit("error", code=exc.code, message=exc.message, param=exc.param, details=exc.details[:200])
        return EXIT_ERROR
    except MemoryError:
        events.emit("error", code="out_of_memory", message="ran out of memory: lower per_device_train_batch_size "
                    "or max_seq_length, or enable gradient_checkpointing", param=None)
        return EXIT_ERROR
    except Exception as exc:  # unexpected: keep the traceback for the logs, report a clean error
        if "out of memory" in str(exc).lower():
            events.emit("error", code="out_of_memory", message=str(exc), param=None)
        else:
            events.emit("error", code="training_failed", message=f"{type(exc).__name__}: {exc}", param=None,
                        traceback=traceback.format_exc()[-4000:])
        return EXIT_ERROR
    return EXIT_CANCELLED if result["status"] == "cancelled" else EXIT_OK


def is_evaluation(spec_text: str) -> bool:
    """Whether spec.json holds an EvalSpec (`"kind": "evaluation"`) rather than a TrainSpec."""
    try:
        raw = json.loads(spec_text)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("kind") == "evaluation"


class _Stopped(Exception):
    """SIGTERM arrived during an evaluation: it stops between answers (nothing to checkpoint)."""


def run_evaluation(spec, run_dir: Path, events, stop: threading.Event) -> int:
    """Run an EvalSpec: started, progress (one per answer), done with the summary; reports written into run_dir."""
    import time

    from loralab.engine.evaluate import EvalError, evaluate
    from loralab.settings import get_settings

    # Placed by the rule of serving and training (evaluate.place); the started event records where it really ran.
    quantization = get_settings().inference_quantization
    state = {"total": None, "step": 0, "started": None}

    def progress(event: dict) -> None:
        if stop.is_set():
            raise _Stopped
        stage = event.get("stage")
        if stage == "load":
            state["total"] = event["num_examples"] * event["num_models"]
            state["started"] = time.monotonic()
            placement = event.get("placement") or {}
            events.emit("started", total_steps=state["total"], num_examples=event["num_examples"],
                        num_models=event["num_models"], device=placement.get("device"), dtype=placement.get("dtype"),
                        quantization=placement.get("quantization"), placement=placement.get("reason"),
                        kind="evaluation", resumed_from_step=0)
        elif stage == "generate":
            state["step"] += 1
            elapsed = time.monotonic() - (state["started"] or time.monotonic())
            total, step = state["total"] or 0, state["step"]
            events.emit("progress", stage=stage, model=event.get("model"), step=step, total_steps=total,
                        eta_s=round(elapsed / step * (total - step), 1) if step and total else None)
        elif stage in ("score", "judge", "report") and event.get("message"):
            events.emit("progress", stage=stage, step=state["step"], total_steps=state["total"],
                        message=event["message"])
        elif stage == "warning":
            events.log(event.get("message", ""), level="warning")

    try:
        summary = evaluate(spec.base_model, spec.adapters, spec.data_path, run_dir, max_new_tokens=spec.max_new_tokens,
                           limit=spec.limit, judge=None if spec.judge else False, seed=spec.seed, progress=progress,
                           device=spec.device, quantization=quantization, embeddings=spec.embeddings,
                           report_language=spec.report_language)
    except _Stopped:
        events.emit("cancelled", step=state["step"], checkpoint=None)
        return EXIT_CANCELLED
    except EvalError as exc:
        events.emit("error", code=exc.code, message=exc.message, param=exc.param)
        return EXIT_ERROR
    except MemoryError:
        events.emit("error", code="out_of_memory", message="ran out of memory: lower max_new_tokens or limit",
                    param=None)
        return EXIT_ERROR
    except Exception as exc:  # unexpected: keep the traceback for the logs, report a clean error
        events.emit("error", code="evaluation_failed", message=f"{type(exc).__name__}: {exc}", param=None,
                    traceback=traceback.format_exc()[-4000:])
        return EXIT_ERROR
    events.emit("done", **done_fields(summary))
    return EXIT_OK


def done_fields(summary: dict) -> dict:
    """What an evaluation's `done` event carries: the summary without per-row detail (that stays in the files)."""
    keep = ("base_model", "adapters", "models", "data", "settings", "metrics", "improvement_pct", "delta",
            "tokenization", "embedding_model", "judge", "warnings", "eval_seconds", "files", "chart_labels",
            "report_language")
    out = {k: summary[k] for k in keep if k in summary}
    out["kind"] = "evaluation"
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m loralab.engine.run RUN_DIR", file=sys.stderr)
        return 2

    def echo(event):  # the supervisor reads events.jsonl; stdout is a human-readable trace
        print(json.dumps(event, ensure_ascii=False), flush=True)

    quiet_libraries()
    from loralab.engine.distributed import die_with_parent, under_torchrun

    if not under_torchrun():  # (ranks get SIGKILL with torchrun, in execute)
        die_with_parent(signal.SIGTERM)  # a worker that dies takes its engine along, via a checkpoint
    return execute(Path(argv[0]), echo=echo)


def quiet_libraries() -> None:
    """Keep the job log to what users act on: no weight-loading bars or library deprecation notices."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
