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

    @cached_property
    def models_dir(self) -> Path:
        return self.home / "models"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'loralab.db'}"


def get_settings() -> Settings:
    """Settings read from the environment now (not cached, so tests can change it)."""
    return Settings()
