"""Runtime settings from the environment (LORALAB_ prefix): where files live and the service's limits."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# A list setting is read from the environment as comma-separated words (`LORALAB_ALLOWED_HOSTS=a.example,b`).
Words = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORALAB_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".loralab", description="Root of every file loralab stores.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default is a SQLite file under home.")
    api_token: str | None = Field(None, description="When set, mutating and data-revealing routes need this bearer token "
                                   "(at least 16 characters; an empty value is an error, not 'auth off').")
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

    # --- network safety (issue 16) ---
    allowed_hosts: Words = Field(default_factory=list, description=(
        "Host names the server answers to besides loopback (localhost, 127.0.0.1, ::1), comma-separated; "
        "a request with any other Host header is refused (DNS rebinding). '*' allows any host."))
    cors_origins: Words = Field(default_factory=list, description=(
        "Browser origins (scheme://host[:port]) allowed to call the API cross-site, comma-separated; "
        "empty = same-origin only."))
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description=(
        "Largest request body of any route but dataset upload (JSON bodies), counted as it streams in."))
    max_concurrent_uploads: int = Field(2, ge=1, description="Dataset uploads parsed at the same time; more wait.")
    max_decoded_bytes: int = Field(1024 * 1024 * 1024, ge=1024, description=(
        "Largest decoded size of a dataset file (Parquet is compressed: its uncompressed size counts)."))
    auth_failures_per_minute: int = Field(20, ge=1, description=(
        "Failed token checks allowed per client address per minute; more answer 429."))
    ui_session_seconds: int = Field(12 * 3600, ge=60, description="How long a web UI login lasts.")
    stream_ticket_seconds: int = Field(60, ge=5, description=(
        "Lifetime of a signed ticket that opens an event stream or a report link without the token in the URL."))
    # --- model sources ---
    hub_access: bool = Field(False, description=(
        "Let the server load base models from the Hugging Face Hub by id (off: only the embedded model, "
        "LORALAB_HOME/models and allowed_base_models)."))
    allowed_base_models: Words = Field(default_factory=list, description=(
        "Extra base models an API/UI request may name: hub ids, or absolute directories on the server."))
    model_load_workers: int = Field(2, ge=1, description="Model loads that may run at the same time in the server.")
    model_load_timeout_seconds: float = Field(300.0, gt=0, description=(
        "A request waiting longer than this for a model to load gets 503."))
    # --- job bounds ---
    distributed_hosts: Words = Field(default_factory=list, description=(
        "Hosts a multi-node job may use as torchrun rendezvous (master_addr); empty = single-node only."))
    max_job_seconds: float = Field(7 * 24 * 3600.0, gt=0, description=(
        "Wall-clock limit of one job attempt; a job running longer is stopped with a checkpoint and failed."))
    max_queued_jobs: int = Field(100, ge=1, description="Queued jobs allowed at once; more are refused (429).")
    max_job_memory_bytes: int | None = Field(None, ge=1, description=(
        "Largest estimated peak memory (with activation checkpointing) a job may need; more is refused (422). "
        "Default: 4 x this host's RAM + GPU memory; set it when workers run on bigger hosts than the API."))

    @field_validator("api_token")
    @classmethod
    def _token_not_empty(cls, value: str | None) -> str | None:
        if value is not None and len(value.strip()) < 16:
            raise ValueError("LORALAB_API_TOKEN is set but empty or shorter than 16 characters; unset it to run "
                             "without a token on loopback, or set a long random one (python -c \"import secrets; "
                             "print(secrets.token_urlsafe(32))\")")
        return value

    @field_validator("allowed_hosts", "cors_origins", "allowed_base_models", "distributed_hosts", mode="before")
    @classmethod
    def _split_words(cls, value):
        if isinstance(value, str):
            return [word.strip() for word in value.split(",") if word.strip()]
        return value

    @cached_property
    def models_dir(self) -> Path:
        return self.home / "models"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'loralab.db'}"


def get_settings() -> Settings:
    """Settings read from the environment now (not cached, so tests can change it)."""
    return Settings()
