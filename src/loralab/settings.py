"""Runtime settings from the environment (LORALAB_ prefix): where files live and the service's limits."""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

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
    # --- containers (issue 21) ---
    db_wait_seconds: float = Field(60.0, ge=0, description=(
        "How long the container entrypoint waits for the database to accept connections before it gives up "
        "(0 = try once)."))
    # --- inference placement (issue 18) ---
    inference_device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "Where the server loads models to generate (playground, /api/generate, /v1) and the default of `loralab "
        "generate`/`eval --device`: auto = CUDA (bf16, else fp16; spread over GPUs when one is too small) when "
        "present, else the CPU in fp32."))
    inference_quantization: Literal["none", "4bit"] = Field("none", description=(
        "4bit loads served models in 4-bit NF4 (bitsandbytes, as QLoRA training does) so big models fit small "
        "GPUs; needs CUDA and the bitsandbytes package. Also the default of `--load-in-4bit` and of evaluation jobs."))
    # --- Ray executor (issue 21) ---
    executor: Literal["local", "ray"] = Field("local", description=(
        "Where workers run the engine: local = a child process of the worker; ray = a job on the Ray cluster at "
        "ray_address (needs `pip install 'loralab[ray]'` and LORALAB_HOME on a filesystem the Ray nodes share)."))
    ray_address: str = Field("http://127.0.0.1:8265", description=(
        "Ray dashboard (job submission) address the ray executor submits jobs to."))
    ray_num_cpus: float = Field(0.0, ge=0, le=4096, description=(
        "CPUs Ray reserves for each job (entrypoint_num_cpus); 0 = none reserved, and the job runs on the head node."))
    ray_num_gpus: float = Field(0.0, ge=0, le=1024, description=(
        "GPUs Ray reserves for each job, per torchrun process (entrypoint_num_gpus); set it on GPU clusters, "
        "else Ray hides the GPUs from the engine."))
    ray_poll_seconds: float = Field(1.0, gt=0, le=60, description="How often a worker asks Ray for its job's status.")
    # --- shutdown, reverse proxy (issue 21) ---
    shutdown_timeout_seconds: float = Field(10.0, ge=0, le=3600, description=(
        "After SIGTERM, how long `loralab serve` lets requests in flight finish (uvicorn's timeout_graceful_shutdown) "
        "before it closes what is still open (live event streams); its workers checkpoint meanwhile, within "
        "cancel_grace_seconds. A container's stop grace period must exceed the larger of the two."))
    root_path: str = Field("", max_length=200, pattern=r"^(/[A-Za-z0-9._~-]+)*$", description=(
        "Path prefix the server is reached under behind a reverse proxy, e.g. /loralab (no trailing slash); the "
        "proxy may strip it or keep it. Empty = served at /."))
    forwarded_allow_ips: str = Field("127.0.0.1,::1", max_length=2000, description=(
        "Comma-separated addresses (or networks) of reverse proxies whose X-Forwarded-For/-Proto headers are "
        "trusted (uvicorn's forwarded_allow_ips): the client address they name is the one the failed-login "
        "rate limit counts. '*' trusts anyone who can reach the port."))
    # --- llama.cpp serving runtime (issue 18) ---
    serving_runtime: Literal["auto", "transformers", "llamacpp"] = Field("auto", description=(
        "What generates for the playground, /api/generate and /v1: llamacpp = llama.cpp (GGUF, CPU; needs `pip install "
        "'loralab[llamacpp]'`), transformers = the batching PyTorch decoder, auto = llama.cpp on a host without a "
        "CUDA GPU when it is installed and the model's architecture is llama, mistral or qwen2, else transformers."))
    llamacpp_quantization: Literal["f16", "q8_0"] = Field("q8_0", description=(
        "GGUF type models are served in by llama.cpp (written once per model under LORALAB_HOME/gguf-cache)."))
    llamacpp_parallel: int = Field(8, ge=1, le=64, description=(
        "Sequences one llama.cpp server decodes together (its slots); more requests wait for a free slot."))
    llamacpp_threads: int = Field(0, ge=0, le=1024, description=(
        "CPU threads of each llama.cpp server; 0 = llama.cpp's choice (the physical cores)."))
    llamacpp_context: int = Field(0, ge=0, le=1 << 20, description=(
        "Tokens of KV cache of each llama.cpp server, shared by its slots, and the longest prompt + answer; "
        "0 = the model's context length."))

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


# --- containers (issue 21): `.env.example`, generated from the fields above so the two never drift ---

# Variables that only compose.yaml reads (the stack's knobs, not loralab settings): (name, default, meaning).
# An empty default means compose.yaml requires the variable (`${NAME:?...}`).
COMPOSE_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("LORALAB_POSTGRES_PASSWORD", "", "Password of the stack's PostgreSQL user `loralab` (required; URL-safe "
     "characters only, it goes into LORALAB_DATABASE_URL)."),
    ("LORALAB_PUBLISH_ADDRESS", "127.0.0.1", "Host address the API/UI port is published on; 0.0.0.0 opens it to "
     "the network (then add the name users browse with to LORALAB_ALLOWED_HOSTS)."),
    ("LORALAB_PORT", "8000", "Host port of the API and web UI."),
    ("LORALAB_IMAGE", "loralab:cpu", "Image the api and CPU worker services run (built from docker/Dockerfile)."),
    ("LORALAB_BASE_IMAGE", "python:3.11-slim-bookworm", "Base of the CPU image: any Debian or Ubuntu image, with "
     "or without Python (python3, pip and venv are installed from apt when missing)."),
    ("LORALAB_CUDA_IMAGE", "loralab:cuda", "Image of the `gpu` profile's worker (built from docker/Dockerfile with "
     "TORCH_FLAVOR=cuda)."),
    ("LORALAB_CUDA_BASE_IMAGE", "nvidia/cuda:13.0.1-base-ubuntu24.04", "Base of the CUDA image: PyPI's torch "
     "brings its own CUDA 13.0 libraries, so an nvidia/cuda base image of CUDA 13.0 is enough (hosts need an NVIDIA "
     "driver that supports CUDA 13.0)."),
    ("LORALAB_GPU_COUNT", "all", "GPUs each `gpu` worker reserves: a number, or `all`."),
    ("LORALAB_POSTGRES_IMAGE", "postgres:17-bookworm", "PostgreSQL image of the stack's database."),
)

# Settings compose.yaml sets itself inside the containers (a value in .env is overridden there).
COMPOSE_SET = {"home": "/data", "database_url": "postgresql://loralab:${LORALAB_POSTGRES_PASSWORD}@db:5432/loralab"}


def _env_value(value) -> str:
    """A default as it is written in an env file: lists comma-separated (or JSON), home-relative paths with ~."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return "~" + text[len(home):] if text == home or text.startswith(home + "/") else text
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _comment(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent="# ", subsequent_indent="# ")


def env_example() -> str:
    """The text of `.env.example`: every compose variable and LORALAB_ setting with its default and meaning."""
    lines = [
        "# loralab: environment for `docker compose` (compose.yaml). Copy it to .env and fill in the required values.",
        "# Generated from src/loralab/settings.py by `loralab config env-example > .env.example`: do not edit by hand.",
        "# Compose reads .env for the ${...} in compose.yaml and hands every variable set here to the loralab containers.",
        "",
        "# ---- the compose stack ----",
        "",
    ]
    token = Settings.model_fields["api_token"]
    lines += _comment("Required. " + (token.description or ""))
    lines += ["# Make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'", "LORALAB_API_TOKEN=", ""]
    for name, default, meaning in COMPOSE_VARIABLES:
        lines += _comment(meaning)
        lines += [f"{name}={default}" if not default else f"# {name}={default}", ""]
    lines += ["# ---- loralab settings (all optional; the line shows the default) ----", ""]
    for name, field in Settings.model_fields.items():
        if name == "api_token":
            continue
        default = field.default_factory() if field.default_factory is not None else field.default
        text = field.description or ""
        if name in COMPOSE_SET:
            text += f" compose.yaml sets it to {COMPOSE_SET[name]} in the containers."
        if name == "engine_command":
            value = "" if default is None else json.dumps(default)
        else:
            value = _env_value(default)
        lines += _comment(text)
        lines += [f"# LORALAB_{name.upper()}={value}", ""]
    return "\n".join(lines[:-1]) + "\n"


if __name__ == "__main__":  # `python -m loralab.settings` prints .env.example (as `loralab config env-example` does)
    print(env_example(), end="")
