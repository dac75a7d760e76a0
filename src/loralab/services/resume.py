"""Resume a failed or cancelled job: a new queued job that starts from the old run's newest checkpoint."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from loralab.services.context import Services
from loralab.services.jobs import job_dict
from loralab.store.errors import Conflict, Invalid
from loralab.store.paths import contain

RESUMABLE = ("failed", "cancelled")


def runtime_problems(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """check_runtime for a stored spec, as dicts (the first one becomes the 422's message)."""
    from loralab.engine.distributed import check_runtime

    return [p.to_dict() for p in check_runtime(spec)]


def resume_job(svc: Services, job_id: str) -> dict[str, Any]:
    """Queue a continuation of a failed or cancelled job (same spec, dataset and model name) from its checkpoint.

    Terminal jobs stay terminal (the state machine never reopens them): the new job's run directory
    gets the old newest checkpoint hard-linked in, and the engine resumes from it with the same data order.
    """
    from loralab.engine.train import latest_checkpoint

    old = svc.repo.get_job(job_id)
    if old.status not in RESUMABLE:
        raise Conflict(f"job {job_id} is {old.status}; only failed or cancelled jobs can be resumed",
                       code="job_not_resumable")
    old_dir = contain(svc.settings.home / "runs", old.id)
    checkpoint = latest_checkpoint(old_dir)
    if checkpoint is None:
        raise Invalid(f"job {job_id} stopped before its first checkpoint, so there is nothing to resume; create "
                      "the job again (set save_steps so long jobs checkpoint as they go)", code="no_checkpoint")
    data_path = Path(old.spec.get("data", {}).get("path", ""))
    if not data_path.is_file():
        raise Invalid(f"the dataset file of job {job_id} is gone; upload the dataset again and create a new job",
                      code="file_missing", param="dataset_id")
    problems = runtime_problems(old.spec)
    if problems:
        first = problems[0]
        raise Invalid(first["message"], code=first["code"], param=first["param"])
    job = svc.repo.create_job(old.spec, old.dataset_id, old.model_name)
    target = contain(svc.settings.home / "runs", job.id) / "checkpoints" / checkpoint.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(checkpoint, target, copy_function=_link_or_copy)
    except OSError as exc:
        svc.repo.set_status(job.id, "failed", error={"code": "resume_failed", "param": None,
                                                     "message": f"could not copy {checkpoint}: {exc}"})
        raise
    job = svc.repo.set_status(job.id, "queued")
    svc.hub.publish(job.id)
    return {**job_dict(job), "resumed_from": {"job_id": old.id, "checkpoint": checkpoint.name,
                                              "step": int(checkpoint.name.rsplit("-", 1)[1])}}


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
