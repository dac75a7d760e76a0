"""All SQL: datasets, the job state machine (claim, lease, fence, requeue), job events and the model registry."""
from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loralab.store.db import Database
from loralab.store.errors import Conflict, IllegalTransition, Invalid, LeaseLost, NotFound
from loralab.store.models import MODEL_STAGES, Dataset, Deployment, Job, JobEvent, ModelVersion
from loralab.store.paths import check_id

TRANSITIONS: dict[str, set[str]] = {
    "validating_files": {"queued", "failed", "cancelled"},
    "queued": {"running", "failed", "cancelled"},
    "running": {"succeeded", "failed", "cancelled", "queued"},
    "succeeded": set(), "failed": set(), "cancelled": set(),
}
ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
TERMINAL_EVENTS = ("done", "error", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def check_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless the job state machine allows current -> new."""
    if new not in TRANSITIONS.get(current, set()):
        raise IllegalTransition(f"a {current} job cannot become {new}", param="status")


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one attempt of a job; (job_id, attempt, owner) is the fence for every write."""

    job_id: str
    attempt: int
    owner: str
    spec: dict[str, Any]
    dataset_id: str | None
    model_name: str


@dataclass(frozen=True)
class Reaped:
    job_id: str
    owner: str | None
    child_pid: int | None
    status: str


class Repo:
    """The only place that talks SQL; every method is one short transaction."""

    def __init__(self, db: Database):
        self.db = db
        self.dialect = db.engine.dialect.name

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """A transaction that may write (SQLite: holds the write lock from its start)."""
        with self.db.transaction() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction that only reads (SQLite: takes no lock, never waits for writers)."""
        with self.db.transaction(read_only=True) as session:
            yield session

    # ---- datasets -------------------------------------------------------------------------------------

    def add_dataset(self, **fields: Any) -> Dataset:
        """Insert a dataset version; the version number is one more than the newest of that name."""
        for _ in range(5):
            try:
                with self.tx() as s:
                    newest = s.scalar(select(func.max(Dataset.version)).where(Dataset.name == fields["name"]))
                    row = Dataset(version=(newest or 0) + 1, created_at=time.time(), **fields)
                    s.add(row)
                return row
            except IntegrityError:  # a concurrent upload took that version number: take the next
                continue
        raise Conflict(f"could not allocate a version for dataset {fields['name']!r}; retry the upload")

    def list_datasets(self, name: str | None = None) -> list[Dataset]:
        with self.read() as s:
            query = select(Dataset).order_by(Dataset.created_at.desc())
            if name:
                query = query.where(Dataset.name == name)
            return list(s.scalars(query))

    def get_dataset(self, dataset_id: str) -> Dataset:
        check_id("dataset", dataset_id)
        with self.read() as s:
            row = s.get(Dataset, dataset_id)
            if row is None:
                raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found", param="dataset_id")
            return row

    def update_dataset_stats(self, dataset_id: str, key: str, value: Any) -> Dataset:
        with self.tx() as s:
            row = s.get(Dataset, dataset_id, with_for_update=True)
            if row is None:
                raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found")
            row.stats = {**(row.stats or {}), key: value}
            return row

    def delete_dataset(self, dataset_id: str) -> Dataset:
        """Delete the row; refused while a queued or running job uses it."""
        check_id("dataset", dataset_id)
        with self.tx() as s:
            row = s.get(Dataset, dataset_id)
            if row is None:
                raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found")
            busy = s.scalars(select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE))).first()
            if busy:
                raise Conflict(f"dataset {dataset_id} is used by active job {busy}; cancel it or wait for it to finish",
                               code="dataset_in_use")
            s.delete(row)
            return row

    # ---- jobs: creation and user-driven transitions -----------------------------------------------

    def create_job(self, spec: dict[str, Any], dataset_id: str | None, model_name: str) -> Job:
        now = time.time()
        row = Job(id=new_id("job"), status="validating_files", spec=spec, dataset_id=dataset_id,
                  model_name=model_name, attempt=0, cancel_requested=False, progress={},
                  created_at=now, updated_at=now)
        with self.tx() as s:
            s.add(row)
        return row

    def count_waiting_jobs(self) -> int:
        """Jobs not started yet (validating_files or queued), of every kind: the queue's length."""
        with self.read() as s:
            return s.scalar(select(func.count()).select_from(Job)
                            .where(Job.status.in_(("validating_files", "queued")))) or 0

    def set_status(self, job_id: str, status: str, *, error: dict[str, Any] | None = None,
                   run_dir: str | None = None) -> Job:
        """A transition not made by a worker (validating_files -> queued/failed); illegal ones raise."""
        with self.tx() as s:
            row = self._job_for_update(s, job_id)
            check_transition(row.status, status)
            row.status, row.updated_at = status, time.time()
            if run_dir:
                row.run_dir = run_dir
            if error:
                row.error_code, row.error_message, row.error_param = error["code"], error["message"], error.get("param")
            if status in TERMINAL:
                row.finished_at = row.updated_at
                if status == "failed":
                    self._add_event(s, row, "error", {"code": row.error_code, "message": row.error_message,
                                                      "param": row.error_param})
            return row

    def list_jobs(self, status: str | None = None, limit: int = 100, after: str | None = None,
                  kind: str | None = "train") -> list[Job]:
        """Jobs newest first; training jobs only unless `kind` says otherwise (None = every kind)."""
        with self.read() as s:
            query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            if kind:
                query = query.where(Job.kind == kind)
            if status:
                query = query.where(Job.status == status)
            if after:
                anchor = s.get(Job, check_id("job", after))
                if anchor is not None:
                    query = query.where(Job.created_at < anchor.created_at)
            return list(s.scalars(query))

    def get_job(self, job_id: str) -> Job:
        check_id("job", job_id)
        with self.read() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFound(f"job {job_id} not found", code="job_not_found")
            return row

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job: one not yet running is cancelled at once; a running one is flagged for its worker."""
        with self.tx() as s:
            row = self._job_for_update(s, job_id)
            if row.status in TERMINAL:
                raise Conflict(f"job {job_id} already {row.status}; only queued or running jobs can be cancelled",
                               code="job_finished")
            row.cancel_requested, row.updated_at = True, time.time()
            if row.status != "running":
                row.status, row.finished_at = "cancelled", row.updated_at
                self._add_event(s, row, "cancelled", {"step": row.progress.get("step"), "checkpoint": None})
            return row

    def _job_for_update(self, s: Session, job_id: str) -> Job:
        check_id("job", job_id)
        row = s.get(Job, job_id, with_for_update=True)
        if row is None:
            raise NotFound(f"job {job_id} not found", code="job_not_found")
        return row

    # ---- jobs: worker side (claim, heartbeat, fence, finish, reap) ----------------------------------

    def claim_job(self, owner: str, lease_seconds: float) -> Claim | None:
        """Atomically take the oldest queued job (SKIP LOCKED on PostgreSQL, a guarded UPDATE on SQLite)."""
        with self.tx() as s:
            query = select(Job.id).where(Job.status == "queued").order_by(Job.created_at, Job.id).limit(1)
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            job_id = s.scalar(query)
            if job_id is None:
                return None
            now = time.time()
            result = s.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued")
                .values(status="running", attempt=Job.attempt + 1, lease_owner=owner,
                        lease_expires_at=now + lease_seconds, heartbeat_at=now, child_pid=None,
                        started_at=func.coalesce(Job.started_at, now), updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # another worker won between our SELECT and UPDATE
                return None
            row = s.get(Job, job_id, populate_existing=True)
            return Claim(row.id, row.attempt, owner, dict(row.spec), row.dataset_id, row.model_name)

    def _fenced(self, s: Session, claim: Claim) -> Job:
        row = s.get(Job, claim.job_id, with_for_update=True, populate_existing=True)
        if row is None or row.status != "running" or row.attempt != claim.attempt or row.lease_owner != claim.owner:
            raise LeaseLost(f"job {claim.job_id} attempt {claim.attempt} is no longer held by {claim.owner}")
        return row

    def heartbeat(self, claim: Claim, lease_seconds: float, *, child_pid: int | None = None,
                  run_dir: str | None = None) -> bool:
        """Renew the lease (fenced); return whether a cancel was requested."""
        with self.tx() as s:
            row = self._fenced(s, claim)
            now = time.time()
            row.lease_expires_at, row.heartbeat_at, row.updated_at = now + lease_seconds, now, now
            if child_pid is not None:
                row.child_pid = child_pid
            if run_dir is not None:
                row.run_dir = run_dir
            return row.cancel_requested

    def append_events(self, claim: Claim, events: list[tuple[int, dict[str, Any]]],
                      progress: dict[str, Any] | None = None) -> int:
        """Store (seq, event) pairs not stored yet (fenced); return how many were new."""
        with self.tx() as s:
            row = self._fenced(s, claim)
            newest = s.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == claim.job_id)) or 0
            added = 0
            for seq, event in events:
                if seq <= newest:
                    continue
                s.add(JobEvent(job_id=claim.job_id, seq=seq, type=str(event.get("type", "log"))[:30],
                               payload=event, attempt=claim.attempt, created_at=time.time()))
                newest, added = seq, added + 1
            if progress:
                row.progress = {**(row.progress or {}), **progress}
            row.updated_at = time.time()
            return added

    def events_seen(self, job_id: str) -> int:
        """The highest stored seq (= lines of events.jsonl already stored)."""
        with self.read() as s:
            return s.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0

    def finish_job(self, claim: Claim, status: str, *, error: dict[str, Any] | None = None,
                   model: dict[str, Any] | None = None, event: dict[str, Any] | None = None,
                   events: list[tuple[int, dict[str, Any]]] | None = None) -> Job:
        """End an attempt (fenced): final status, error, new model version and the closing events, in one commit."""
        with self.tx() as s:
            row = self._fenced(s, claim)
            check_transition(row.status, status)
            if events:
                newest = s.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == claim.job_id)) or 0
                for seq, item in events:
                    if seq > newest:
                        s.add(JobEvent(job_id=claim.job_id, seq=seq, type=str(item.get("type", "log"))[:30],
                                       payload=item, attempt=claim.attempt, created_at=time.time()))
                        newest = seq
                s.flush()
            now = time.time()
            row.status, row.updated_at, row.finished_at = status, now, now
            row.lease_owner, row.lease_expires_at, row.child_pid = None, None, None
            if error:
                row.error_code, row.error_message, row.error_param = error["code"], error["message"], error.get("param")
            if model:
                version = self._add_model(s, model)
                row.result_model_id = version.id
            if event:
                self._add_event(s, row, event["type"], event)
            return row

    def release_job(self, claim: Claim) -> Job:
        """Hand a running job back to the queue (fenced): the worker is shutting down, another one resumes it."""
        with self.tx() as s:
            row = self._fenced(s, claim)
            check_transition(row.status, "queued")
            row.status, row.updated_at = "queued", time.time()
            row.lease_owner, row.lease_expires_at, row.child_pid = None, None, None
            return row

    def _add_event(self, s: Session, row: Job, type_: str, payload: dict[str, Any]) -> None:
        """A closing event the engine did not write (queued cancel, crash, SIGKILL): appended after every line."""
        newest = s.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == row.id)) or 0
        payload = {"type": type_, "time": round(time.time(), 3), **payload}
        s.add(JobEvent(job_id=row.id, seq=newest + 1, type=type_, payload=payload, attempt=row.attempt,
                       created_at=time.time()))

    def reap_expired(self, max_attempts: int, now: float | None = None) -> list[Reaped]:
        """Requeue running jobs whose lease expired (or fail them after max_attempts, or cancel if asked)."""
        now = time.time() if now is None else now
        reaped: list[Reaped] = []
        with self.tx() as s:
            query = select(Job).where(Job.status == "running", Job.lease_expires_at < now)
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for row in s.scalars(query):
                owner, pid = row.lease_owner, row.child_pid
                if row.cancel_requested:
                    row.status, row.finished_at = "cancelled", now
                    self._add_event(s, row, "cancelled", {"step": row.progress.get("step"), "checkpoint": None})
                elif row.attempt >= max_attempts:
                    row.status, row.finished_at = "failed", now
                    row.error_code = "worker_lost"
                    row.error_message = (f"the worker running this job stopped responding {row.attempt} times "
                                         f"(max_attempts={max_attempts}); check the worker logs and resubmit")
                    self._add_event(s, row, "error", {"code": row.error_code, "message": row.error_message,
                                                      "param": None})
                else:
                    row.status = "queued"
                row.lease_owner, row.lease_expires_at, row.child_pid, row.updated_at = None, None, None, now
                reaped.append(Reaped(row.id, owner, pid, row.status))
        return reaped

    # ---- job events ------------------------------------------------------------------------------

    def events_after(self, job_id: str, after_seq: int = 0, limit: int = 1000,
                     types: tuple[str, ...] | None = None) -> list[JobEvent]:
        check_id("job", job_id)
        with self.read() as s:
            query = (select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                     .order_by(JobEvent.seq).limit(limit))
            if types:
                query = query.where(JobEvent.type.in_(types))
            return list(s.scalars(query))

    # ---- model registry ----------------------------------------------------------------------------

    def _add_model(self, s: Session, fields: dict[str, Any]) -> ModelVersion:
        newest = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == fields["name"]))
        now = time.time()
        row = ModelVersion(version=(newest or 0) + 1, stage="draft", deployed=False, created_at=now,
                           updated_at=now, **fields)
        s.add(row)
        s.flush()
        return row

    def list_models(self, name: str | None = None) -> list[ModelVersion]:
        with self.read() as s:
            query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version.desc())
            if name:
                query = query.where(ModelVersion.name == name)
            return list(s.scalars(query))

    def get_model(self, model_id: str) -> ModelVersion:
        check_id("model", model_id)
        with self.read() as s:
            row = s.get(ModelVersion, model_id)
            if row is None:
                raise NotFound(f"model {model_id} not found", code="model_not_found")
            return row

    def _model_for_update(self, s: Session, model_id: str) -> ModelVersion:
        check_id("model", model_id)
        row = s.get(ModelVersion, model_id, with_for_update=True)
        if row is None:
            raise NotFound(f"model {model_id} not found", code="model_not_found")
        return row

    def set_stage(self, model_id: str, stage: str) -> ModelVersion:
        """Move a version to draft/staging/production/archived; a new production version archives the old one."""
        if stage not in MODEL_STAGES:
            raise Invalid(f"unknown stage {stage!r}; use one of {', '.join(MODEL_STAGES)}", param="stage")
        with self.tx() as s:
            row = self._model_for_update(s, model_id)
            now = time.time()
            if stage == "production":
                s.execute(update(ModelVersion)
                          .where(ModelVersion.name == row.name, ModelVersion.stage == "production",
                                 ModelVersion.id != row.id)
                          .values(stage="archived", updated_at=now).execution_options(synchronize_session=False))
            row.stage, row.updated_at = stage, now
            return row

    def deploy(self, model_id: str, action: str = "deploy") -> ModelVersion:
        """Make this version the deployed one of its name (one per name) and record it in the history."""
        with self.tx() as s:
            row = self._model_for_update(s, model_id)
            if row.stage == "archived":
                raise Conflict(f"model {model_id} is archived; move it to staging or production before deploying",
                               code="model_archived")
            self._set_deployed(s, row, action)
            return row

    def _set_deployed(self, s: Session, row: ModelVersion, action: str) -> None:
        now = time.time()
        s.execute(update(ModelVersion).where(ModelVersion.name == row.name, ModelVersion.id != row.id)
                  .values(deployed=False, updated_at=now).execution_options(synchronize_session=False))
        row.deployed, row.updated_at = True, now
        s.add(Deployment(model_name=row.name, model_id=row.id, action=action, created_at=now))

    def rollback(self, model_id: str) -> ModelVersion:
        """Redeploy the version that was deployed before the current one of this model's name."""
        with self.tx() as s:
            row = self._model_for_update(s, model_id)
            history = list(s.scalars(select(Deployment).where(Deployment.model_name == row.name)
                                     .order_by(Deployment.id.desc())))
            current = next((h.model_id for h in history), None)
            for entry in history:
                if entry.model_id == current:
                    continue
                target = s.get(ModelVersion, entry.model_id, with_for_update=True)
                if target is not None:
                    self._set_deployed(s, target, "rollback")
                    return target
            raise Conflict(f"no earlier deployment of {row.name!r} to roll back to; deploy a version first",
                           code="nothing_to_roll_back")

    def deployment_history(self, name: str) -> list[Deployment]:
        with self.read() as s:
            return list(s.scalars(select(Deployment).where(Deployment.model_name == name).order_by(Deployment.id)))

    def delete_model(self, model_id: str, used_by: tuple[str, ...] = ()) -> ModelVersion:
        """Delete a version the caller found unused (`used_by` empty); refused while it is deployed, is what its
        name serves, or an active job or A/B test uses it. The caller removes its files."""
        with self.tx() as s:
            row = self._model_for_update(s, model_id)
            if row.deployed:
                raise Conflict(f"model {model_id} is deployed; deploy or roll back to another version first",
                               code="model_deployed")
            if row.stage == "production" and not s.scalars(select(ModelVersion.id).where(
                    ModelVersion.name == row.name, ModelVersion.deployed.is_(True))).first():
                raise Conflict(f"model {model_id} is the production version {row.name!r} serves; set another "
                               "version to production (or this one to archived) first", code="model_deployed")
            users = [*self._model_users(s, model_id), *(u for u in used_by if u)]
            if users:
                raise Conflict(f"model {model_id} is used by {', '.join(dict.fromkeys(users))}; cancel or finish the "
                               "jobs and stop the A/B tests first, then delete it", code="model_in_use")
            s.execute(delete(Deployment).where(Deployment.model_id == model_id))
            s.delete(row)
            return row

    @staticmethod
    def _model_users(s: Session, model_id: str) -> list[str]:
        """Active jobs (an evaluation scoring it, a training resuming from it, an export of it) and active A/B tests
        naming its id."""
        from pathlib import PurePath

        from loralab.store.models import AbTest, EvaluationModel

        users = list(s.scalars(select(Job.id).join(EvaluationModel, EvaluationModel.evaluation_id == Job.id)
                               .where(EvaluationModel.model_id == model_id, Job.status.in_(ACTIVE))))
        for job in s.scalars(select(Job).where(Job.status.in_(ACTIVE))):  # paths in specs: resume_from, adapters,
            spec = job.spec or {}                                          # an export's source
            paths = [spec.get("resume_from"), *(spec.get("adapters") or []), spec.get("source")]
            if job.id not in users and any(isinstance(p, str) and PurePath(p).name == model_id for p in paths):
                users.append(job.id)
        users += s.scalars(select(AbTest.id).where(AbTest.status == "active",
                                                   (AbTest.model_a == model_id) | (AbTest.model_b == model_id)))
        return users

    # ---- exports (jobs of kind "export"; the model id is in the spec) ------------------------------------------

    def queue_export(self, spec: dict[str, Any], name: str) -> tuple[Job, bool]:
        """Queue an export of `spec["model_id"]`, or return the queued/running one with the same format and
        quantization (False). The model row is locked, so a concurrent delete or twin request waits its turn."""
        model_id = spec["model_id"]
        with self.tx() as s:
            self._model_for_update(s, model_id)  # 404 when deleted meanwhile
            for row in s.scalars(self._exports(model_id).where(Job.status.in_(ACTIVE))):
                same = row.spec or {}
                if (same.get("format"), same.get("quantization")) == (spec.get("format"), spec.get("quantization")):
                    return row, False
            now = time.time()
            row = Job(id=new_id("job"), kind="export", status="queued", spec=spec, dataset_id=None,
                      model_name=name[:200], attempt=0, cancel_requested=False, progress={}, created_at=now,
                      updated_at=now)
            s.add(row)
            return row, True

    def get_export(self, job_id: str) -> Job:
        """The job row of an export; 404 for unknown ids and for other kinds of job."""
        check_id("job", job_id)
        with self.read() as s:
            row = s.get(Job, job_id)
            if row is None or row.kind != "export":
                raise NotFound(f"export {job_id} not found; GET /api/exports lists them", code="export_not_found")
            return row

    def list_exports(self, model_id: str | None = None, status: str | None = None, limit: int = 50) -> list[Job]:
        """Export jobs newest first; `model_id` keeps that fine-tuned version's."""
        with self.read() as s:
            query = self._exports(model_id).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            if status:
                query = query.where(Job.status == status)
            return list(s.scalars(query))

    @staticmethod
    def _exports(model_id: str | None = None):
        query = select(Job).where(Job.kind == "export")
        if model_id:  # JSON path: json_extract on SQLite, ->> on PostgreSQL
            query = query.where(Job.spec["model_id"].as_string() == model_id)
        return query
