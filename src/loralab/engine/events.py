"""The events.jsonl writer: one JSON object a line, flushed at once so the supervisor can tail it."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/Infinity: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Appends typed events to RUN_DIR/events.jsonl (and step events to metrics.jsonl)."""

    def __init__(self, run_dir: Path, echo=None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.echo = echo  # optional callable(event) for CLI progress display
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def emit(self, type_: str, **fields: Any) -> dict:
        event = _clean({"type": type_, "time": round(time.time(), 3), **fields})
        if self.enabled:
            self._append("events.jsonl", event)
            if type_ == "step":
                self._append("metrics.jsonl", {k: v for k, v in event.items() if k not in ("type",)})
        if self.echo is not None:
            self.echo(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)


def read_events(run_dir: Path) -> list[dict]:
    """All events written so far (a partial last line is skipped)."""
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
