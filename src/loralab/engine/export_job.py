"""An export as a queued job: run `export_model` for an ExportSpec in the engine child, with events and cancel."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
OUTPUT_DIR = "export"  # RUN_DIR/export holds the exported files; the API serves only the names the done event lists
TEXT_FILES = ("Modelfile", "README.md")  # written by export_model with paths in them (rewritten below)
PERCENT_STEP = 1.0  # tensor progress is reported when it moved by at least this many percent


def is_export(spec_text: str) -> bool:
    """Whether spec.json holds an ExportSpec (`"kind": "export"`)."""
    try:
        raw = json.loads(spec_text)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("kind") == "export"


class _Cancelled(BaseException):
    """SIGTERM during an export: a BaseException, so no `except Exception` on the way swallows it."""


@contextmanager
def _interrupt_on_sigterm(stop: threading.Event, enabled: bool):
    """While exporting, SIGTERM also interrupts the current step (a merge of a large model takes minutes)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(*_):
        stop.set()
        raise _Cancelled

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_export(spec, run_dir: Path, events, stop: threading.Event, interrupt: bool = False) -> int:
    """Run an ExportSpec into RUN_DIR/export: started, progress (per stage; per tensor for GGUF), done with the
    files (names and sizes), error, or cancelled (SIGTERM: the partial output is removed; exit 3)."""
    from loralab.engine.export import ExportError, export_model
    from loralab.engine.models import ModelNotFoundError

    run_dir = Path(run_dir)
    out = run_dir / OUTPUT_DIR
    for stale in run_dir.glob(f".{OUTPUT_DIR}.*"):  # staging left by a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    events.emit("started", kind="export", model_id=spec.model_id, format=spec.format,
                quantization=spec.quantization, total_steps=None, resumed_from_step=0)
    state: dict[str, Any] = {"stage": None, "percent": None, "first": None, "total": None}

    def progress(stage: str, done: int | None = None, total: int | None = None) -> None:
        if stop.is_set():
            raise _Cancelled
        percent = round(100.0 * done / total, 1) if total else None
        if stage == state["stage"] and percent is not None and state["percent"] is not None \
                and percent - state["percent"] < PERCENT_STEP and done != total:
            return  # a 7B model has ~300 tensors: about one event per percent is enough
        eta = None
        if total and done:
            state["first"] = state["first"] or (time.monotonic(), done)
            t0, d0 = state["first"]
            if done > d0:
                eta = round((time.monotonic() - t0) / (done - d0) * (total - done), 1)
        state.update(stage=stage, percent=percent, total=total or state["total"])
        # a stage without a count (merging, converting) is step 0 of 1: the job's percent reaches 100 at `done`
        events.emit("progress", stage=stage, step=done or 0, total_steps=total or 1, percent=percent, eta_s=eta)

    try:
        with _interrupt_on_sigterm(stop, interrupt):
            if stop.is_set():  # cancelled before the export began
                raise _Cancelled
            result = export_model(spec.source, spec.format, out, quantization=spec.quantization or "f16",
                                  base_model=spec.base_model, overwrite=True, name=spec.name, progress=progress)
    except _Cancelled:
        events.emit("cancelled", step=None, checkpoint=None)
        return EXIT_CANCELLED
    except ExportError as exc:
        events.emit("error", code="export_error", message=str(exc), param=None)
        return EXIT_ERROR
    except ModelNotFoundError as exc:
        events.emit("error", code="model_not_found", message=f"the base model cannot be loaded: {exc}",
                    param="base_model")
        return EXIT_ERROR
    except MemoryError:
        events.emit("error", code="out_of_memory", message="ran out of memory while exporting: merging loads the "
                    "base model in float32; use a worker with more memory", param=None)
        return EXIT_ERROR
    except OSError as exc:
        events.emit("error", code="export_write_failed", message=f"could not write the export "
                    f"({exc.strerror or type(exc).__name__}): free disk space under LORALAB_HOME and retry",
                    param=None)
        return EXIT_ERROR
    except Exception as exc:  # unexpected: keep the traceback for the logs, report a clean error
        events.emit("error", code="export_failed", message=f"{type(exc).__name__}: {exc}", param=None,
                    traceback=traceback.format_exc()[-4000:])
        return EXIT_ERROR
    _rewrite_paths(out, spec, Path(spec.source), Path(result.out_dir))
    files = [{"name": name, "size_bytes": (out / name).stat().st_size} for name in sorted(result.files)
             if "/" not in name and (out / name).is_file()]
    total = state["total"] or 1
    events.emit("done", kind="export", model_id=spec.model_id, format=spec.format, quantization=spec.quantization,
                architecture=result.architecture, name=spec.name, files=files,
                total_bytes=sum(f["size_bytes"] for f in files), warnings=list(result.warnings),
                ollama_command=f"ollama create {spec.name} -f Modelfile" if spec.format == "ollama" else None,
                export_seconds=round(time.monotonic() - started, 2), total_steps=total)
    return EXIT_OK


def _rewrite_paths(out: Path, spec, source: Path, target: Path) -> None:
    """The Modelfile and README name the server's directories; downloads show the model id and `.` instead."""
    home = os.environ.get("LORALAB_HOME")
    for name in TEXT_FILES:
        path = out / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        new = text.replace(f"cd {target}\n", "").replace(str(source), spec.model_id).replace(str(target), ".")
        for root in filter(None, {home, home and str(Path(home).resolve())}):
            new = new.replace(root.rstrip("/"), "LORALAB_HOME")
        if new != text:
            path.write_text(new, encoding="utf-8")
