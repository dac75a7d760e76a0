"""SQL for generations, feedback, A/B tests and their sticky assignments."""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loralab.store.db import Database
from loralab.store.errors import Conflict, Invalid, NotFound
from loralab.store.models import AbAssignment, AbTest, Feedback, Generation

PATTERNS = {
    "generation": re.compile(r"^gen-[0-9a-f]{24}$"),
    "feedback": re.compile(r"^fb-[0-9a-f]{24}$"),
    "ab_test": re.compile(r"^ab-[0-9a-f]{24}$"),
}


@dataclass
class FeedbackFilter:
    """Which feedback rows a list, stats or preference build looks at (None = any)."""

    model: str | None = None
    rating: int | None = None
    min_rating: int | None = None
    max_rating: int | None = None
    thumbs: str | None = None
    since: float | None = None
    until: float | None = None
    ab_test_id: str | None = None
    user: str | None = None

    def apply(self, query):
        conditions = []
        if self.model:
            conditions.append(Feedback.model == self.model)
        if self.rating is not None:
            conditions.append(Feedback.rating == self.rating)
        if self.min_rating is not None:
            conditions.append(Feedback.rating >= self.min_rating)
        if self.max_rating is not None:
            conditions.append(Feedback.rating <= self.max_rating)
        if self.thumbs:
            conditions.append(Feedback.thumbs == self.thumbs)
        if self.since is not None:
            conditions.append(Feedback.created_at >= self.since)
        if self.until is not None:
            conditions.append(Feedback.created_at < self.until)
        if self.ab_test_id:
            conditions.append(Feedback.ab_test_id == self.ab_test_id)
        if self.user:
            conditions.append(Feedback.user == self.user)
        return query.where(*conditions) if conditions else query


class FeedbackStore:
    """The only SQL of the feedback and A/B features; every method is one short transaction."""

    def __init__(self, db: Database):
        self.db = db

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self.db.transaction() as session:
            yield session

    # ---- generations ------------------------------------------------------------------------------------

    def add_generation(self, **fields: Any) -> Generation:
        with self.tx() as s:
            row = Generation(created_at=time.time(), **fields)
            s.add(row)
        return row

    def finish_generation(self, generation_id: str, **fields: Any) -> None:
        """Complete a generation recorded when its stream opened; feedback given meanwhile gets the final text."""
        with self.tx() as s:
            row = s.get(Generation, generation_id, with_for_update=True)
            if row is None:
                return
            for key, value in fields.items():
                setattr(row, key, value)
            outputs = row.outputs or [row.output]
            for fb in s.scalars(select(Feedback).where(Feedback.generation_id == generation_id)):
                fb.output = outputs[fb.choice] if fb.choice < len(outputs) else row.output

    def get_generation(self, generation_id: str, param: str = "generation_id") -> Generation:
        """The generation, or Invalid naming `param` (an unknown id is a mistake in the request body)."""
        if not isinstance(generation_id, str) or not PATTERNS["generation"].fullmatch(generation_id):
            raise Invalid(f"{param} {generation_id!r} is not a generation id (gen- followed by 24 hex digits); "
                          "use the `id` returned with the answer", code="generation_not_found", param=param)
        with self.tx() as s:
            row = s.get(Generation, generation_id)
        if row is None:
            raise Invalid(f"no generation {generation_id!r}: use the `id` returned with the answer",
                          code="generation_not_found", param=param)
        return row

    def arm_requests(self, ab_test_id: str) -> dict[str, int]:
        with self.tx() as s:
            rows = s.execute(select(Generation.arm, func.count()).where(Generation.ab_test_id == ab_test_id)
                             .group_by(Generation.arm)).all()
        return {arm: count for arm, count in rows if arm}

    def subjects_by_arm(self, ab_test_id: str) -> dict[str, set[str]]:
        """Which subjects were served by which arm (a sticky test has every subject in one arm only)."""
        with self.tx() as s:
            rows = s.execute(select(Generation.subject, Generation.arm)
                             .where(Generation.ab_test_id == ab_test_id, Generation.subject.is_not(None))
                             .distinct()).all()
        out: dict[str, set[str]] = {}
        for subject, arm in rows:
            out.setdefault(subject, set()).add(arm)
        return out

    # ---- feedback ---------------------------------------------------------------------------------------

    def save_feedback(self, fields: dict[str, Any], new_id: str) -> tuple[Feedback, bool]:
        """Insert, or (same generation and user) update the earlier judgement: one row per answer and user."""
        now = time.time()
        with self.tx() as s:
            row = None
            if fields.get("generation_id"):
                row = s.scalars(select(Feedback).where(Feedback.generation_id == fields["generation_id"],
                                                       _same(Feedback.user, fields.get("user")))
                                .order_by(Feedback.created_at).limit(1).with_for_update()).first()
            if row is None:
                row = Feedback(id=new_id, created_at=now, updated_at=now, **fields)
                s.add(row)
                return row, True
            for key, value in fields.items():
                if value is not None:
                    setattr(row, key, value)
            row.updated_at = now
            return row, False

    def list_feedback(self, flt: FeedbackFilter, limit: int = 100, offset: int = 0) -> tuple[list[Feedback], int]:
        with self.tx() as s:
            total = s.scalar(flt.apply(select(func.count()).select_from(Feedback)))
            rows = list(s.scalars(flt.apply(select(Feedback)).order_by(Feedback.created_at.desc(), Feedback.id)
                                  .offset(offset).limit(limit)))
        return rows, int(total or 0)

    def feedback_with_generations(self, flt: FeedbackFilter) -> list[tuple[Feedback, Generation | None]]:
        with self.tx() as s:
            query = flt.apply(select(Feedback, Generation)
                              .outerjoin(Generation, Generation.id == Feedback.generation_id))
            return [(f, g) for f, g in s.execute(query.order_by(Feedback.created_at, Feedback.id)).all()]

    # ---- A/B tests -------------------------------------------------------------------------------------

    def create_ab_test(self, **fields: Any) -> AbTest:
        with self.tx() as s:
            busy = s.scalars(select(AbTest.id).where(AbTest.name == fields["name"], AbTest.status == "active")).first()
            if busy:
                raise Conflict(f"an A/B test named {fields['name']!r} is already running ({busy}); stop it first "
                               "or choose another name", code="ab_test_exists", param="name")
            row = AbTest(status="active", created_at=time.time(), **fields)
            s.add(row)
        return row

    def list_ab_tests(self, status: str | None = None) -> list[AbTest]:
        with self.tx() as s:
            query = select(AbTest).order_by(AbTest.created_at.desc())
            if status:
                query = query.where(AbTest.status == status)
            return list(s.scalars(query))

    def get_ab_test(self, ab_test_id: str) -> AbTest:
        if not isinstance(ab_test_id, str) or not PATTERNS["ab_test"].fullmatch(ab_test_id):
            raise NotFound(f"no A/B test {ab_test_id!r}: ids look like ab- followed by 24 hex digits",
                           code="ab_test_not_found", param="test_id")
        with self.tx() as s:
            row = s.get(AbTest, ab_test_id)
        if row is None:
            raise NotFound(f"no A/B test {ab_test_id!r}; GET /api/ab-tests lists them", code="ab_test_not_found",
                           param="test_id")
        return row

    def routable_ab_test(self, name: str) -> AbTest:
        """The active test behind `ab:<name>`: 404 if none ever existed, 409 if it was stopped."""
        with self.tx() as s:
            rows = list(s.scalars(select(AbTest).where(AbTest.name == name).order_by(AbTest.created_at.desc())))
        active = next((r for r in rows if r.status == "active"), None)
        if active is not None:
            return active
        if rows:
            raise Conflict(f"the A/B test {name!r} was stopped and no longer routes requests; use a model name "
                           f"(its winner was {rows[0].promoted_model or rows[0].winner or 'not declared'})",
                           code="ab_test_stopped", param="model")
        raise NotFound(f"no A/B test named {name!r}; GET /api/ab-tests lists them", code="model_not_found",
                       param="model")

    def assign(self, ab_test_id: str, subject: str, arm: str) -> str:
        """The subject's stored arm; `arm` is stored first if the subject is new (first writer wins)."""
        for _ in range(3):
            with self.tx() as s:
                row = s.get(AbAssignment, (ab_test_id, subject))
                if row is not None:
                    return row.arm
            try:
                with self.tx() as s:
                    s.add(AbAssignment(ab_test_id=ab_test_id, subject=subject, arm=arm, created_at=time.time()))
                return arm
            except IntegrityError:  # another request of the same subject stored it first: read theirs
                continue
        raise Conflict("could not store the A/B assignment; retry", code="ab_assignment_conflict")

    def stop_ab_test(self, ab_test_id: str, winner: str | None) -> AbTest:
        with self.tx() as s:
            row = s.get(AbTest, ab_test_id, with_for_update=True)
            if row.status != "stopped":
                row.status, row.stopped_at, row.winner = "stopped", time.time(), winner
            return row

    def set_promoted(self, ab_test_id: str, winner: str, model: str) -> AbTest:
        with self.tx() as s:
            row = s.get(AbTest, ab_test_id, with_for_update=True)
            row.winner, row.promoted_model = winner, model
            return row


def _same(column, value):
    return column.is_(None) if value is None else column == value
