"""Child-process entry point: `python -m loralab.engine.run RUN_DIR` trains the spec in RUN_DIR/spec.json."""
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
        from loralab.spec import TrainSpec

        spec = TrainSpec.model_validate_json((run_dir / "spec.json").read_text(encoding="utf-8"))
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m loralab.engine.run RUN_DIR", file=sys.stderr)
        return 2

    def echo(event):  # the supervisor reads events.jsonl; stdout is a human-readable trace
        print(json.dumps(event, ensure_ascii=False), flush=True)

    quiet_libraries()
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
