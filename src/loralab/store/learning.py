"""All SQL of the learning center: learners, topics read, quiz attempts and hands-on steps, per user."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loralab.store.models import LearnQuizAttempt, LearnStep, LearnTopicRead, LearnUser
from loralab.store.repo import Repo


@dataclass
class LegacyProgress:
    """Rows to insert when a user's old progress.json is imported (see LearningStore.ensure_user)."""

    source: str
    reads: dict[str, float] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    steps: dict[tuple[str, str], float] = field(default_factory=dict)


class LearningStore:
    """The learning tables; every method is one short transaction (over the same database as `Repo`)."""

    def __init__(self, repo: Repo):
        self.repo = repo

    def _user(self, s: Session, user_id: str, now: float) -> None:
        if s.get(LearnUser, user_id) is None:
            s.add(LearnUser(id=user_id, created_at=now, last_seen_at=now, imported_from=None))
            s.flush()

    def ensure_user(self, user_id: str, legacy: LegacyProgress | None = None) -> bool:
        """Create the user row if missing, importing `legacy` in the same transaction; True if this call did."""
        with self.repo.tx() as s:
            if s.get(LearnUser, user_id) is not None:
                return False
        now = time.time()
        try:
            with self.repo.tx() as s:
                s.add(LearnUser(id=user_id, created_at=now, last_seen_at=now,
                                imported_from=legacy.source if legacy else None))
                s.flush()  # a second process importing at the same time fails here, and imports nothing
                if legacy:
                    for topic_id, read_at in legacy.reads.items():
                        s.add(LearnTopicRead(user_id=user_id, topic_id=topic_id, read_at=read_at))
                    for attempt in legacy.attempts:
                        s.add(LearnQuizAttempt(user_id=user_id, **attempt))
                    for (topic_id, step_id), done_at in legacy.steps.items():
                        s.add(LearnStep(user_id=user_id, topic_id=topic_id, step_id=step_id, done_at=done_at,
                                        evidence={"imported": legacy.source}, updated_at=done_at))
        except IntegrityError:
            return False
        return True

    def mark_read(self, user_id: str, topic_id: str) -> float:
        """Record that a topic was read; returns when it was first read."""
        now = time.time()
        for _ in range(3):
            try:
                with self.repo.tx() as s:
                    self._user(s, user_id, now)
                    row = s.get(LearnTopicRead, (user_id, topic_id))
                    if row is None:
                        s.add(LearnTopicRead(user_id=user_id, topic_id=topic_id, read_at=now))
                        return now
                    return row.read_at
            except IntegrityError:  # the same user read it in another tab at the same moment
                continue
        raise RuntimeError("could not record the topic as read")

    def add_attempt(self, user_id: str, topic_id: str, lang: str, score: int, total: int, passed: bool,
                    answers: dict[str, Any]) -> LearnQuizAttempt:
        now = time.time()
        with self.repo.tx() as s:
            self._user(s, user_id, now)
            row = LearnQuizAttempt(user_id=user_id, topic_id=topic_id, lang=lang, score=score, total=total,
                                   passed=passed, answers=answers, created_at=now)
            s.add(row)
            s.flush()
            return row

    def set_step(self, user_id: str, topic_id: str, step_id: str, *, done: bool,
                 evidence: dict[str, Any]) -> LearnStep:
        """Create or update a step; a step once done stays done (its first done time is kept)."""
        now = time.time()
        for _ in range(3):
            try:
                with self.repo.tx() as s:
                    self._user(s, user_id, now)
                    row = s.get(LearnStep, (user_id, topic_id, step_id))
                    if row is None:
                        row = LearnStep(user_id=user_id, topic_id=topic_id, step_id=step_id, done_at=None,
                                        evidence={}, updated_at=now)
                        s.add(row)
                    if row.done_at is None:
                        row.evidence = dict(evidence)
                        row.done_at = now if done else None
                    row.updated_at = now
                    s.flush()
                    return row
            except IntegrityError:
                continue
        raise RuntimeError("could not record the step")

    def reads(self, user_id: str) -> dict[str, float]:
        with self.repo.tx() as s:
            rows = s.scalars(select(LearnTopicRead).where(LearnTopicRead.user_id == user_id))
            return {row.topic_id: row.read_at for row in rows}

    def attempts(self, user_id: str, topic_id: str | None = None) -> list[LearnQuizAttempt]:
        """Quiz attempts, oldest first."""
        query = select(LearnQuizAttempt).where(LearnQuizAttempt.user_id == user_id)
        if topic_id is not None:
            query = query.where(LearnQuizAttempt.topic_id == topic_id)
        with self.repo.tx() as s:
            return list(s.scalars(query.order_by(LearnQuizAttempt.created_at, LearnQuizAttempt.id)))

    def steps(self, user_id: str) -> list[LearnStep]:
        with self.repo.tx() as s:
            return list(s.scalars(select(LearnStep).where(LearnStep.user_id == user_id)))

    def get_user(self, user_id: str) -> LearnUser | None:
        with self.repo.tx() as s:
            return s.get(LearnUser, user_id)
