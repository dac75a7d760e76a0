"""SQL of evaluation jobs: insert one queued (with its model links), list them, read their models and outcome."""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from loralab.store.errors import NotFound
from loralab.store.models import EvaluationModel, Job, JobEvent
from loralab.store.paths import check_id
from loralab.store.repo import Repo, new_id

KIND = "evaluation"


def create_evaluation_job(repo: Repo, spec: dict[str, Any], dataset_id: str | None, name: str,
                          model_ids: list[str]) -> Job:
    """Insert an already validated evaluation as a queued job, linked to the fine-tuned versions it scores."""
    now = time.time()
    row = Job(id=new_id("job"), kind=KIND, status="queued", spec=spec, dataset_id=dataset_id, model_name=name[:200],
              attempt=0, cancel_requested=False, progress={}, created_at=now, updated_at=now)
    with repo.tx() as s:
        s.add(row)
        s.flush()
        for position, model_id in enumerate(model_ids):
            s.add(EvaluationModel(evaluation_id=row.id, model_id=model_id, position=position))
    return row


def get_evaluation_job(repo: Repo, evaluation_id: str) -> Job:
    """The job row of an evaluation; 404 for unknown ids and for training jobs."""
    check_id("job", evaluation_id)
    with repo.read() as s:
        row = s.get(Job, evaluation_id)
        if row is None or row.kind != KIND:
            raise NotFound(f"evaluation {evaluation_id} not found; GET /api/evaluations lists them",
                           code="evaluation_not_found")
        return row


def list_evaluation_jobs(repo: Repo, model_id: str | None = None, status: str | None = None,
                         limit: int = 50) -> list[Job]:
    """Evaluation jobs, newest first; `model_id` keeps those that scored that fine-tuned version."""
    with repo.read() as s:
        query = select(Job).where(Job.kind == KIND).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        if model_id:
            query = query.where(Job.id.in_(select(EvaluationModel.evaluation_id)
                                           .where(EvaluationModel.model_id == model_id)))
        if status:
            query = query.where(Job.status == status)
        return list(s.scalars(query))


def evaluation_model_ids(repo: Repo, evaluation_ids: list[str]) -> dict[str, list[str]]:
    """{evaluation id: [fine-tuned model ids in comparison order]}."""
    if not evaluation_ids:
        return {}
    with repo.read() as s:
        rows = s.scalars(select(EvaluationModel).where(EvaluationModel.evaluation_id.in_(evaluation_ids))
                         .order_by(EvaluationModel.evaluation_id, EvaluationModel.position))
        out: dict[str, list[str]] = {i: [] for i in evaluation_ids}
        for row in rows:
            out[row.evaluation_id].append(row.model_id)
        return out


def done_payload(repo: Repo, evaluation_id: str) -> dict[str, Any] | None:
    """The newest `done` event of an evaluation (the summary), stored in the commit that made it succeeded."""
    with repo.read() as s:
        row = s.scalars(select(JobEvent).where(JobEvent.job_id == evaluation_id, JobEvent.type == "done")
                        .order_by(JobEvent.seq.desc()).limit(1)).first()
        return dict(row.payload) if row is not None else None
