"""Runtime settings from the environment (LORALAB_ prefix): where files live and the service's limits."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORALAB_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".loralab", description="Root of every file loralab stores.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default is a SQLite file under home.")
    api_token: str | None = Field(None, description="When set, mutating and data-revealing routes need this bearer token.")
    max_upload_bytes: int = Field(100 * 1024 * 1024, description="Largest dataset upload accepted.")
    max_rows: int = Field(1_000_000, description="Most rows a dataset may have.")
    lease_seconds: float = Field(30.0, description="How long a worker's claim on a job lasts without a heartbeat.")
    cancel_grace_seconds: float = Field(20.0, description="Time a cancelled run gets to checkpoint before SIGKILL.")
    judge_url: str | None = Field(None, description="LLM-as-judge: base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1).")
    judge_model: str | None = Field(None, description="LLM-as-judge: model name sent to the judge endpoint.")
    judge_api_key: str | None = Field(None, description="LLM-as-judge: bearer token for the judge endpoint, if it needs one.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often a worker renews its lease and checks for cancel.")
    worker_poll_seconds: float = Field(1.0, gt=0, description="How often an idle worker looks for queued jobs and expired leases.")
    tail_seconds: float = Field(0.2, gt=0, description="How often a worker reads new lines of a run's events.jsonl.")
    event_poll_seconds: float = Field(0.5, gt=0, description="How often live streams check the database for events from other processes.")
    max_attempts: int = Field(3, ge=1, description="Times a job is started before a lost worker fails it for good.")
    engine_command: list[str] | None = Field(
        None, description="Engine command (JSON list) run with RUN_DIR appended; default: python -m loralab.engine.run."
    )
    generate_cache_size: int = Field(2, ge=1, description="Loaded models kept in memory for /api/generate.")

    @cached_property
    def models_dir(self) -> Path:
        return self.home / "models"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'loralab.db'}"


def get_settings() -> Settings:
    """Settings read from the environment now (not cached, so tests can change it)."""
    return Settings()
