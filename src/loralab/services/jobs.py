"""Training jobs: create (validated TrainSpec -> queued row), inspect, cancel, and read or follow their events."""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import Field

from loralab.services.context import Services
from loralab.services.datasets import dataset_file
from loralab.spec import DataSpec, TrainSpec, _Strict
from loralab.store.errors import Invalid, LoralabError, NotFound
from loralab.store.models import Job, JobEvent
from loralab.store.paths import ID_PATTERNS, contain
from loralab.store.repo import TERMINAL, TERMINAL_EVENTS

# A job whose estimated peak memory is above this many times the largest memory known to this host is refused
# (workers may run on bigger hosts than the API: set LORALAB_MAX_JOB_MEMORY_BYTES then).
MEMORY_MARGIN = 4


class QueueFull(LoralabError):
    status, code = 429, "queue_full"


MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,99}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class DataOptions(_Strict):
    """The `data` section of a job request: the file comes from `dataset_id`, so only these remain."""

    validation_split: float = DataSpec.model_fields["validation_split"]
    max_rows: int | None = DataSpec.model_fields["max_rows"]


class CreateJobRequest(TrainSpec):
    """A TrainSpec whose data file is a stored dataset (`dataset_id`) instead of a path; unknown keys are rejected."""

    dataset_id: str = Field(description="Dataset version to train on (id from POST /api/datasets/upload).")
    model_name: str | None = Field(
        None, description="Registry name of the resulting model (default: <base model>-<dataset name>)."
    )
    data: DataOptions = Field(default_factory=DataOptions, description="Validation split and row cap.")


def check_base_model(svc: Services, name: str) -> str:
    """Accept the embedded model, a model under LORALAB_HOME/models or an allowed hub id; never an arbitrary server path."""
    from loralab.services.base_models import check_base_model as allowed_base_model

    return allowed_base_model(svc, name)


def check_method_fits_data(method: str, dataset) -> None:
    """DPO trains on preference pairs and only on them; the other methods need instruction, chat or text rows."""
    preference = (dataset.stats or {}).get("canonical_format", dataset.format) == "preference"
    if method == "dpo" and not preference:
        raise Invalid(f"method 'dpo' needs a preference dataset (prompt/chosen/rejected rows) but dataset "
                      f"{dataset.id} holds {dataset.format} rows; pick a preference dataset or method 'lora'",
                      code="wrong_dataset_format", param="dataset_id")
    if method != "dpo" and preference:
        raise Invalid(f"dataset {dataset.id} holds preference pairs (prompt/chosen/rejected): train it with "
                      f"method 'dpo' (method '{method}' needs instruction, chat or text rows)",
                      code="wrong_dataset_format", param="method")


def _check_runtime(svc: Services, spec: TrainSpec) -> None:
    """Refuse at validation what this machine cannot run (QLoRA without CUDA, an unknown parallel config...)."""
    from loralab.engine.distributed import SHIPPED_CONFIGS, check_runtime, rendezvous_problem

    if spec.distributed.config and spec.distributed.config not in SHIPPED_CONFIGS:
        raise Invalid(f"distributed.config must be one of {', '.join(SHIPPED_CONFIGS)}", param="distributed.config")
    problem = rendezvous_problem(spec, svc.settings.distributed_hosts)
    if problem:
        raise Invalid(problem.message, code=problem.code, param=problem.param)
    problems = check_runtime(spec)
    if problems:
        raise Invalid(problems[0].message, code=problems[0].code, param=problems[0].param)


def create_job(svc: Services, request: CreateJobRequest | dict[str, Any]) -> dict[str, Any]:
    """Validate a job request and queue it; the API only inserts the row, a worker runs it."""
    spec, dataset, model_name = _job_spec(svc, request)
    check_queue_room(svc)
    check_memory(svc, spec)
    job = svc.repo.create_job(spec.model_dump(mode="json"), dataset.id, model_name)
    if not Path(spec.data.path).is_file():
        job = svc.repo.set_status(job.id, "failed", error={
            "code": "file_missing", "param": "dataset_id",
            "message": f"the stored file of dataset {dataset.id} is gone; upload the dataset again"})
    else:
        job = svc.repo.set_status(job.id, "queued")
    svc.hub.publish(job.id)
    return job_dict(job)


def check_queue_room(svc: Services) -> None:
    """429 when `max_queued_jobs` jobs wait already (one global cap: there is one API token, no per-user identity)."""
    waiting = svc.repo.count_waiting_jobs()
    if waiting >= svc.settings.max_queued_jobs:
        raise QueueFull(f"the queue is full: {waiting} jobs are waiting (LORALAB_MAX_QUEUED_JOBS="
                        f"{svc.settings.max_queued_jobs}); wait for some to finish or cancel some, then retry")


def memory_limit_bytes(svc: Services) -> int:
    """The largest estimated peak a job may have: the setting, else MEMORY_MARGIN x this host's RAM + GPU memory."""
    if svc.settings.max_job_memory_bytes:
        return svc.settings.max_job_memory_bytes
    import psutil

    known = psutil.virtual_memory().total
    import sys

    torch = sys.modules.get("torch")  # GPUs counted only when torch is loaded already (no import for this)
    if torch is not None and torch.cuda.is_available():
        known += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return MEMORY_MARGIN * known


def _local_config_dir(svc: Services, base_model: str) -> Path | None:
    """The base model's directory when its config is on this host already (no conversion, no hub request)."""
    candidate = Path(base_model) if Path(base_model).is_absolute() else svc.settings.models_dir / base_model
    return candidate if (candidate / "config.json").is_file() else None


def check_memory(svc: Services, spec: TrainSpec) -> None:
    """Refuse a job whose estimated peak memory (with checkpointing, the least it can use) is far above any worker.

    The estimate needs the base model's config on this host; when it is not (a hub id not downloaded yet) or the
    estimate fails, the job is queued and the engine's own checks apply.
    """
    config_dir = _local_config_dir(svc, spec.base_model)
    if config_dir is None:
        return
    from loralab.engine.estimate import estimate_for_spec

    least = spec.model_copy(update={"base_model": str(config_dir), "gradient_checkpointing": "on"})
    try:
        peak = estimate_for_spec(least, tokens=None, measure=False)["peak_memory_bytes"]
    except Exception:  # an estimate is advice; a model it cannot read is the engine's to report
        return
    limit = memory_limit_bytes(svc)
    if peak > limit:
        raise Invalid(f"this job needs about {peak / 2**30:.1f} GiB even with gradient checkpointing, far more "
                      f"than the {limit / 2**30:.1f} GiB allowed (LORALAB_MAX_JOB_MEMORY_BYTES); lower "
                      "per_device_train_batch_size, max_seq_length or lora.r, or set micro_batch_tokens",
                      code="job_too_large", param="per_device_train_batch_size")


def estimate_job(svc: Services, request: CreateJobRequest | dict[str, Any]) -> dict[str, Any]:
    """What a job request would need before it is queued: peak memory, tokens/s, activation checkpointing."""
    from loralab.engine.estimate import estimate_for_spec
    from loralab.services.datasets import dataset_stats

    if not isinstance(request, CreateJobRequest):
        request = CreateJobRequest.model_validate(request)
    spec, dataset, _ = _job_spec(svc, request)
    tokens = None
    if dataset.format != "preference":  # token lengths with the base model's tokenizer, cached in the dataset row
        tokens = dataset_stats(svc, dataset.id, request.base_model, spec.max_seq_length)["tokens"]
    try:
        plan = estimate_for_spec(spec, tokens=tokens)
    except (ValueError, OSError) as exc:
        raise Invalid(f"cannot estimate this job: {exc}", code="estimate_failed", param="base_model") from None
    return {"object": "fine_tuning.estimate", "dataset_id": dataset.id, "base_model": spec.base_model,
            "method": spec.method, **plan}


def _job_spec(svc: Services, request: CreateJobRequest | dict[str, Any]):
    """The validated TrainSpec of a job request, its dataset row and the registry name it will get."""
    if not isinstance(request, CreateJobRequest):
        request = CreateJobRequest.model_validate(request)
    try:
        dataset = svc.repo.get_dataset(request.dataset_id)
    except NotFound:
        raise Invalid(f"dataset {request.dataset_id!r} not found; upload it first (POST /api/datasets/upload) "
                      "or pick an id from GET /api/datasets", code="dataset_not_found", param="dataset_id") from None
    check_method_fits_data(request.method, dataset)
    base_model = check_base_model(svc, request.base_model)
    fields = request.model_dump(exclude={"dataset_id", "model_name", "data", "base_model", "resume_from"})
    resume_from = None
    if request.resume_from:
        from loralab.services import registry

        resume_from = registry.model_path(svc, request.resume_from, param="resume_from")
    model_name = request.model_name or _default_model_name(base_model, dataset.name)
    if not MODEL_NAME_RE.fullmatch(model_name):
        raise Invalid(f"model_name {model_name!r} is not allowed: use up to 100 letters, digits, . _ -",
                      param="model_name")
    spec = TrainSpec(base_model=base_model, resume_from=resume_from,
                     data=DataSpec(path=str(dataset_file(svc, dataset)), format=dataset.stats.get(
                         "canonical_format", "auto"), **request.data.model_dump()), **fields)
    _check_runtime(svc, spec)
    return spec, dataset, model_name


def _default_model_name(base_model: str, dataset_name: str) -> str:
    base = Path(base_model).name.removesuffix(".gguf")
    name = re.sub(r"[^\w.-]+", "-", f"{base}-{dataset_name}").strip("-._")
    return (name or "model")[:100]


def job_dict(row: Job) -> dict[str, Any]:
    progress = row.progress or {}
    error = {"code": row.error_code, "message": row.error_message, "param": row.error_param} \
        if row.error_code else None
    return {
        "id": row.id, "object": "fine_tuning.job", "status": row.status, "model_name": row.model_name,
        "base_model": row.spec.get("base_model"), "method": row.spec.get("method"), "dataset_id": row.dataset_id,
        "hyperparameters": {k: v for k, v in row.spec.items() if k != "data"},
        "data": {k: v for k, v in row.spec.get("data", {}).items() if k != "path"},
        "error": error, "attempt": row.attempt, "cancel_requested": row.cancel_requested,
        "progress": {k: progress.get(k) for k in ("step", "total_steps", "percent", "loss", "eta_s")},
        "result_model_id": row.result_model_id,
        "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
    }


def list_jobs(svc: Services, status: str | None = None, limit: int = 50, after: str | None = None) -> list[dict]:
    if status is not None and status not in ("validating_files", "queued", "running", *TERMINAL):
        raise Invalid(f"unknown status {status!r}", param="status")
    return [job_dict(row) for row in svc.repo.list_jobs(status, max(1, min(limit, 500)), after)]


def get_job(svc: Services, job_id: str) -> dict[str, Any]:
    return job_dict(svc.repo.get_job(job_id))


def get_progress(svc: Services, job_id: str) -> dict[str, Any]:
    job = get_job(svc, job_id)
    return {"id": job["id"], "status": job["status"], **job["progress"]}


def cancel_job(svc: Services, job_id: str) -> dict[str, Any]:
    """Cancel: a queued job at once; a running one gets SIGTERM from its worker (checkpoint kept)."""
    row = svc.repo.request_cancel(job_id)
    svc.hub.publish(job_id)
    return job_dict(row)


def event_dict(row: JobEvent) -> dict[str, Any]:
    return {**row.payload, "seq": row.seq, "type": row.type}


def list_events(svc: Services, job_id: str, after: int = 0, limit: int = 1000,
                types: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    svc.repo.get_job(job_id)
    return [event_dict(e) for e in svc.repo.events_after(job_id, after, max(1, min(limit, 10000)), types)]


def get_logs(svc: Services, job_id: str, after: int = 0, tail_bytes: int = 16000) -> dict[str, Any]:
    """Log events plus the tail of the engine's stderr."""
    row = svc.repo.get_job(job_id)
    text = ""
    if row.run_dir:
        path = contain(svc.settings.home / "runs", row.id) / "stderr.log"
        if path.is_file():
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - tail_bytes))
                text = fh.read().decode("utf-8", errors="replace")
    return {"id": row.id, "events": list_events(svc, job_id, after, types=("log", "error")), "stderr_tail": text}


async def follow_events(svc: Services, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
    """Every event after `after` (stored ones first, then live), ending after done/error/cancelled."""
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(svc.repo.get_job, job_id)
    while True:
        status = (await run_in_threadpool(svc.repo.get_job, job_id)).status
        events = await run_in_threadpool(svc.repo.events_after, job_id, after, 500)
        for row in events:
            after = row.seq
            if row.type in TERMINAL_EVENTS:  # committed together with the final status: report the outcome
                job = await run_in_threadpool(svc.repo.get_job, job_id)
                yield {**event_dict(row), "job_status": job.status, "result_model_id": job.result_model_id}
                return
            yield event_dict(row)
        if not events:
            if status in TERMINAL:  # terminal status and nothing newer: the stream is complete
                return
            await svc.hub.wait(job_id, svc.settings.event_poll_seconds)
