"""SQLAlchemy 2 table models: datasets, jobs, job events, fine-tuned model versions and deployments."""
from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
MODEL_STAGES = ("draft", "staging", "production", "archived")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Dataset(Base):
    """One immutable dataset version: the normalised records file plus what was learnt about it."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_datasets_name_version"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(20))
    rows: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(300))
    path: Mapped[str] = mapped_column(Text)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    """A fine-tuning job; `attempt` and `lease_owner` fence writes from a worker that lost its lease."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20), default="train", server_default="train")  # train | evaluation
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_id: Mapped[str | None] = mapped_column(String(40), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    child_pid: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    run_dir: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result_model_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class JobEvent(Base):
    """One line of a run's events.jsonl; `seq` is its 1-based line number, so replays never duplicate."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(30))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class ModelVersion(Base):
    """A fine-tuned model version with its lineage (base model, dataset version, job, spec, metrics)."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_models_name_version"),
        # At most one production and one deployed version per name, also under concurrent promotions (0005).
        Index("uq_models_production_name", "name", unique=True, sqlite_where=text("stage = 'production'"),
              postgresql_where=text("stage = 'production'")),
        Index("uq_models_deployed_name", "name", unique=True, sqlite_where=text("deployed"),
              postgresql_where=text("deployed")),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(300))
    method: Mapped[str] = mapped_column(String(20))
    dataset_id: Mapped[str | None] = mapped_column(String(40))
    job_id: Mapped[str | None] = mapped_column(String(40))
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(20), default="draft")
    deployed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Deployment(Base):
    """History of which version of a model name was deployed, newest last; rollback walks it back."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_id: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[float] = mapped_column(Float)


# ---- learning center (issue #8): progress per user ---------------------------------------------------------------


class LearnUser(Base):
    """A learner: 'local' for the CLI, a per-browser id from the web UI, any id an API client chooses."""

    __tablename__ = "learn_users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    imported_from: Mapped[str | None] = mapped_column(Text)


class LearnTopicRead(Base):
    """A topic a user has read (the first time counts)."""

    __tablename__ = "learn_topic_reads"

    user_id: Mapped[str] = mapped_column(String(64), ForeignKey("learn_users.id", ondelete="CASCADE"),
                                         primary_key=True)
    topic_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    read_at: Mapped[float] = mapped_column(Float)


class LearnQuizAttempt(Base):
    """One attempt at a topic's quiz (retakes add rows: best and latest are both kept), with the answers given."""

    __tablename__ = "learn_quiz_attempts"
    __table_args__ = (Index("ix_learn_quiz_attempts_user_topic", "user_id", "topic_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), ForeignKey("learn_users.id", ondelete="CASCADE"))
    topic_id: Mapped[str] = mapped_column(String(64))
    lang: Mapped[str] = mapped_column(String(5))
    score: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    passed: Mapped[bool] = mapped_column(Boolean)
    answers: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class LearnStep(Base):
    """A hands-on step a user has done (topic steps, and the guided steps under topic 'guided'), with evidence."""

    __tablename__ = "learn_steps"

    user_id: Mapped[str] = mapped_column(String(64), ForeignKey("learn_users.id", ondelete="CASCADE"),
                                         primary_key=True)
    topic_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    done_at: Mapped[float | None] = mapped_column(Float)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)


# ---- feedback, A/B tests (helper C) -----------------------------------------------------------------------

class Generation(Base):
    """One answer served by loralab (API, /v1, playground): what was asked, of which model, what came back."""

    __tablename__ = "generations"
    __table_args__ = (Index("ix_generations_ab_arm", "ab_test_id", "arm"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    requested_model: Mapped[str] = mapped_column(String(300))
    model: Mapped[str] = mapped_column(String(300), index=True)
    base_model: Mapped[str] = mapped_column(String(300))
    adapter: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(20))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    output: Mapped[str] = mapped_column(Text)
    outputs: Mapped[list[Any]] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    ab_test_id: Mapped[str | None] = mapped_column(String(40))
    arm: Mapped[str | None] = mapped_column(String(1))
    subject: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float, index=True)


class Feedback(Base):
    """A user's judgement of one answer: rating 1-5 and/or thumbs, an optional better answer and a comment."""

    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    generation_id: Mapped[str | None] = mapped_column(String(40), index=True)
    choice: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str | None] = mapped_column(String(300), index=True)
    input: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output: Mapped[str | None] = mapped_column(Text)
    rating: Mapped[int | None] = mapped_column(Integer)
    thumbs: Mapped[str | None] = mapped_column(String(4))
    corrected: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    user: Mapped[str | None] = mapped_column(String(200))
    ab_test_id: Mapped[str | None] = mapped_column(String(40), index=True)
    arm: Mapped[str | None] = mapped_column(String(1))
    created_at: Mapped[float] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float)


class AbTest(Base):
    """An A/B test between two served models behind the endpoint name `ab:<name>`."""

    __tablename__ = "ab_tests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    model_a: Mapped[str] = mapped_column(String(300))
    model_b: Mapped[str] = mapped_column(String(300))
    split: Mapped[float] = mapped_column(Float)
    metric: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    winner: Mapped[str | None] = mapped_column(String(1))
    promoted_model: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float)


class AbAssignment(Base):
    """The sticky arm of one user/session in one A/B test."""

    __tablename__ = "ab_assignments"

    ab_test_id: Mapped[str] = mapped_column(String(40), ForeignKey("ab_tests.id", ondelete="CASCADE"),
                                            primary_key=True)
    subject: Mapped[str] = mapped_column(String(200), primary_key=True)
    arm: Mapped[str] = mapped_column(String(1))
    created_at: Mapped[float] = mapped_column(Float)


# ---- evaluations (helper A) ----------------------------------------------------------------------------------
# An evaluation is a job row with kind="evaluation"; its scores live in the run directory (summary.json, reports)
# and in its `done` event. This table links it to the fine-tuned versions it scored, to list them by model.


class EvaluationModel(Base):
    """One fine-tuned model version scored by an evaluation job, with its place in the comparison."""

    __tablename__ = "evaluation_models"

    evaluation_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"),
                                               primary_key=True)
    model_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer)
