"""Learning progress of the local user, kept in LORALAB_HOME/learn/progress.json (the service moves it to the database later)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from loralab.settings import get_settings


class ProgressError(ValueError):
    """The progress file exists but cannot be read."""


class QuizRecord(BaseModel):
    attempts: int = 0
    best_score: int = 0
    last_score: int = 0
    total: int = 0
    passed: bool = Field(False, description="Some attempt answered at least two thirds correctly.")
    last_at: float = 0.0


class TopicProgress(BaseModel):
    read_at: float | None = None
    quiz: QuizRecord | None = None
    steps: dict[str, float] = Field(default_factory=dict, description="Step id -> time it was done.")


class Progress(BaseModel):
    version: int = 1
    topics: dict[str, TopicProgress] = Field(default_factory=dict)

    def topic(self, topic_id: str) -> TopicProgress:
        return self.topics.get(topic_id) or TopicProgress()


def progress_path() -> Path:
    return get_settings().home / "learn" / "progress.json"


def load(path: Path | None = None) -> Progress:
    """The saved progress (empty when nothing has been recorded yet)."""
    path = path or progress_path()
    if not path.is_file():
        return Progress()
    try:
        return Progress.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as exc:
        raise ProgressError(f"{path} is not a valid progress file ({exc}); fix or delete it to start afresh") from None


def _save(progress: Progress, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".progress-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(progress.model_dump_json(indent=2))
        os.replace(tmp, path)  # atomic: a crash never leaves half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _update(topic_id: str, path: Path | None, change) -> Progress:
    path = path or progress_path()
    progress = load(path)
    entry = progress.topics.setdefault(topic_id, TopicProgress())
    change(entry)
    _save(progress, path)
    return progress


def record_read(topic_id: str, path: Path | None = None) -> Progress:
    """Mark a topic as read (now)."""
    def change(entry: TopicProgress) -> None:
        entry.read_at = time.time()

    return _update(topic_id, path, change)


def record_quiz(topic_id: str, score: int, total: int, path: Path | None = None) -> Progress:
    """Store one quiz attempt: keeps attempts, best and last score."""
    if total < 1 or not 0 <= score <= total:
        raise ValueError(f"quiz score must be between 0 and total (>= 1), got {score}/{total}")

    def change(entry: TopicProgress) -> None:
        record = entry.quiz or QuizRecord()
        record.attempts += 1
        record.best_score = max(record.best_score, score) if record.total == total else score
        record.last_score, record.total, record.last_at = score, total, time.time()
        record.passed = record.passed or 3 * score >= 2 * total
        entry.quiz = record

    return _update(topic_id, path, change)


def record_step(topic_id: str, step_id: str, path: Path | None = None) -> Progress:
    """Mark a hands-on step as done (the first time counts)."""
    def change(entry: TopicProgress) -> None:
        entry.steps.setdefault(step_id, time.time())

    return _update(topic_id, path, change)
