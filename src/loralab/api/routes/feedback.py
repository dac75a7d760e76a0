"""Feedback on served answers, its statistics, the generations it refers to, and preference datasets from it."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from loralab.api.deps import get_services, require_token
from loralab.services import feedback
from loralab.services.context import Services
from loralab.services.feedback import FeedbackRequest

router = APIRouter(prefix="/api", tags=["feedback"], dependencies=[Depends(require_token)])


class Filters(BaseModel):
    """Which feedback to use (all of it when empty)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Only feedback on this model (ft-… id or base model).")
    min_rating: int | None = Field(None, ge=1, le=5)
    max_rating: int | None = Field(None, ge=1, le=5)
    since: str | None = Field(None, description="From this date (YYYY-MM-DD, ISO 8601 or unix seconds).")
    until: str | None = Field(None, description="Before this date.")
    ab_test_id: str | None = None

    def build(self):
        return feedback.make_filter(model=self.model, min_rating=self.min_rating, max_rating=self.max_rating,
                                    since=self.since, until=self.until, ab_test_id=self.ab_test_id)


class PreferenceRequest(BaseModel):
    """Turn feedback into preference records (corrections, and higher- vs lower-rated answers to one prompt)."""

    model_config = ConfigDict(extra="forbid")

    filters: Filters = Field(default_factory=Filters)
    min_gap: float = Field(1.0, gt=0, le=4, description="Smallest mean-score gap between chosen and rejected.")
    max_pairs_per_prompt: int = Field(3, ge=1, le=100)
    name: str | None = Field(None, description="Dataset name to store under (store only).")
    limit: int = Field(50, ge=1, le=1000, description="Records returned by the preview.")


@router.post("/feedback", status_code=201)
def submit_feedback(body: FeedbackRequest, svc: Services = Depends(get_services)) -> dict:
    """Rate an answer (1-5 and/or thumbs), suggest a better one, comment; by generation id or input + output."""
    return feedback.submit(svc, body)


@router.get("/feedback")
def list_feedback(model: str | None = None, rating: int | None = None, min_rating: int | None = None,
                  max_rating: int | None = None, thumbs: Literal["up", "down"] | None = None,
                  since: str | None = Query(None, description="YYYY-MM-DD, ISO 8601 or unix seconds"),
                  until: str | None = None, ab_test_id: str | None = None, user: str | None = None,
                  limit: int = 100, offset: int = 0, svc: Services = Depends(get_services)) -> dict:
    """Feedback, newest first, filtered by model, rating, thumbs, date range, A/B test or user."""
    flt = feedback.make_filter(model, rating, min_rating, max_rating, thumbs, since, until, ab_test_id, user)
    return feedback.list_feedback(svc, flt, limit, offset)


@router.get("/feedback/stats")
def feedback_stats(model: str | None = None, since: str | None = None, until: str | None = None,
                   ab_test_id: str | None = None, svc: Services = Depends(get_services)) -> dict:
    """Counts, mean rating and thumbs per model, per UTC day, and per model and day."""
    return feedback.stats(svc, feedback.make_filter(model=model, since=since, until=until, ab_test_id=ab_test_id))


@router.post("/feedback/preferences/preview")
def preview_preferences(body: PreferenceRequest, svc: Services = Depends(get_services)) -> dict:
    """Dry run: the preference records the feedback would give (first `limit`) and the counts."""
    built = feedback.preference_records(svc, body.filters.build(), body.min_gap, body.max_pairs_per_prompt)
    return {**built, "records": built["records"][:body.limit], "total": len(built["records"])}


@router.post("/feedback/preferences", status_code=201)
def store_preferences(body: PreferenceRequest, svc: Services = Depends(get_services)) -> dict:
    """Store the preference records as a new dataset version (format preference), ready for DPO."""
    from loralab.services.errors import Invalid

    if not body.name:
        raise Invalid("name is required to store the dataset (the preview needs none)", param="name")
    return feedback.store_preferences(svc, body.name, body.filters.build(), body.min_gap, body.max_pairs_per_prompt)


@router.get("/generations/{generation_id}")
def get_generation(generation_id: str, svc: Services = Depends(get_services)) -> dict:
    """One recorded answer: requested and served model, input, output, A/B arm."""
    return feedback.get_generation(svc, generation_id)
