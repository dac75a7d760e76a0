"""The former progress file (LORALAB_HOME/learn/progress.json): read once and imported into the database by services.learning."""
from __future__ import annotations

import json
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
