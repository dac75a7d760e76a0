"""Feedback on served answers: record it, list it, summarise it, and turn it into a preference dataset."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loralab.services.context import Services
from loralab.store.errors import Invalid
from loralab.store.feedback import FeedbackFilter, FeedbackStore
from loralab.store.models import Feedback, Generation
from loralab.store.repo import new_id

MAX_TEXT = 100_000


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class FeedbackRequest(BaseModel):
    """A judgement of one answer: by its generation id, or by the input and output text."""

    model_config = ConfigDict(extra="forbid")

    generation_id: str | None = Field(None, description="The `id` returned with the answer (gen-…).")
    choice: int = Field(0, ge=0, le=7, description="Which choice of the answer (for n > 1).")
    input: str | list[Turn] | None = Field(None, description="Prompt text or chat turns, when there is no "
                                                              "generation id.")
    output: str | None = Field(None, max_length=MAX_TEXT, description="The answer text, when there is no "
                                                                       "generation id.")
    model: str | None = Field(None, max_length=300, description="Model that wrote `output` (without a "
                                                                 "generation id).")
    rating: int | None = Field(None, ge=1, le=5, description="Rating from 1 (bad) to 5 (excellent).")
    thumbs: Literal["up", "down"] | None = Field(None, description="Thumbs up or down.")
    corrected: str | None = Field(None, max_length=MAX_TEXT, description="A better answer (becomes `chosen` "
                                                                          "in a preference dataset).")
    comment: str | None = Field(None, max_length=10_000, description="Free comment.")
    user: str | None = Field(None, max_length=200, description="User or session id of whoever judged.")

    @model_validator(mode="after")
    def _complete(self) -> "FeedbackRequest":
        if self.generation_id is None and (self.output is None or self.input is None):
            raise ValueError("give generation_id, or both input and output")
        if self.generation_id is not None and (self.output is not None or self.input is not None):
            raise ValueError("give either generation_id or input + output, not both")
        if self.rating is None and self.thumbs is None and not self.corrected and not self.comment:
            raise ValueError("give at least one of rating, thumbs, corrected or comment")
        return self


def _store(svc: Services) -> FeedbackStore:
    return FeedbackStore(svc.db)


def generation_dict(row: Generation) -> dict[str, Any]:
    return {"id": row.id, "object": "generation", "requested_model": row.requested_model, "model": row.model,
            "base_model": row.base_model, "source": row.source, "input": row.input, "output": row.output,
            "outputs": row.outputs, "finish_reason": row.finish_reason, "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens, "ab_test_id": row.ab_test_id, "arm": row.arm,
            "subject": row.subject, "created_at": row.created_at}


def feedback_dict(row: Feedback) -> dict[str, Any]:
    return {"id": row.id, "object": "feedback", "generation_id": row.generation_id, "choice": row.choice,
            "model": row.model,
            "input": row.input, "output": row.output, "rating": row.rating, "thumbs": row.thumbs,
            "corrected": row.corrected, "comment": row.comment, "user": row.user, "ab_test_id": row.ab_test_id,
            "arm": row.arm, "created_at": row.created_at, "updated_at": row.updated_at}


def get_generation(svc: Services, generation_id: str) -> dict[str, Any]:
    from loralab.store.errors import NotFound

    try:
        return generation_dict(_store(svc).get_generation(generation_id))
    except Invalid as exc:
        raise NotFound(exc.message, code=exc.code, param="generation_id") from None


def submit(svc: Services, body: FeedbackRequest) -> dict[str, Any]:
    """Store feedback; a second judgement of the same answer by the same user updates the first."""
    store = _store(svc)
    fields: dict[str, Any] = {"rating": body.rating, "thumbs": body.thumbs, "corrected": body.corrected or None,
                              "comment": body.comment or None, "user": body.user}
    if body.generation_id is not None:
        gen = store.get_generation(body.generation_id)
        outputs = gen.outputs
        if outputs and body.choice >= len(outputs):  # no outputs yet: still streaming, text filled in at the end
            raise Invalid(f"choice {body.choice} does not exist: the answer has {len(outputs)} choice(s)",
                          param="choice")
        fields.update(generation_id=gen.id, choice=body.choice, model=gen.model, input=gen.input,
                      output=outputs[body.choice] if outputs else gen.output, ab_test_id=gen.ab_test_id, arm=gen.arm)
    else:
        text_input = ({"prompt": body.input} if isinstance(body.input, str)
                      else {"messages": [m.model_dump() for m in body.input]})
        fields.update(generation_id=None, choice=0, model=body.model, input=text_input, output=body.output,
                      ab_test_id=None, arm=None)
    row, created = store.save_feedback(fields, new_id("fb"))
    return {**feedback_dict(row), "created": created}


def make_filter(model: str | None = None, rating: int | None = None, min_rating: int | None = None,
                max_rating: int | None = None, thumbs: str | None = None, since: str | float | None = None,
                until: str | float | None = None, ab_test_id: str | None = None, user: str | None = None
                ) -> FeedbackFilter:
    """Check the filters (ratings 1-5, dates ISO 8601 or unix seconds) and build the store's filter."""
    for param, value in (("rating", rating), ("min_rating", min_rating), ("max_rating", max_rating)):
        if value is not None and not 1 <= value <= 5:
            raise Invalid(f"{param} must be between 1 and 5, got {value}", param=param)
    if thumbs not in (None, "up", "down"):
        raise Invalid(f"thumbs must be 'up' or 'down', got {thumbs!r}", param="thumbs")
    return FeedbackFilter(model=model or None, rating=rating, min_rating=min_rating, max_rating=max_rating,
                          thumbs=thumbs, since=_time(since, "since"), until=_time(until, "until"),
                          ab_test_id=ab_test_id or None, user=user or None)


def _time(value: str | float | None, param: str) -> float | None:
    """Unix seconds from an ISO date/datetime (UTC unless it says otherwise) or a number."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{param} {value!r} is not a date: use YYYY-MM-DD, an ISO 8601 time or unix seconds",
                      param=param) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def list_feedback(svc: Services, flt: FeedbackFilter, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    if not 1 <= limit <= 1000 or offset < 0:
        raise Invalid("limit must be 1-1000 and offset >= 0", param="limit")
    rows, total = _store(svc).list_feedback(flt, limit, offset)
    return {"object": "list", "total": total, "offset": offset, "limit": limit,
            "data": [feedback_dict(row) for row in rows]}


def _summary(rows: list[Feedback]) -> dict[str, Any]:
    ratings = [r.rating for r in rows if r.rating is not None]
    up = sum(1 for r in rows if r.thumbs == "up")
    down = sum(1 for r in rows if r.thumbs == "down")
    return {"count": len(rows), "rated": len(ratings),
            "mean_rating": round(sum(ratings) / len(ratings), 3) if ratings else None,
            "thumbs_up": up, "thumbs_down": down, "thumbs_up_rate": round(up / (up + down), 3) if up + down else None,
            "corrections": sum(1 for r in rows if r.corrected)}


def stats(svc: Services, flt: FeedbackFilter) -> dict[str, Any]:
    """Counts, mean rating and thumbs per model, per UTC day, and per model and day."""
    rows = [fb for fb, _ in _store(svc).feedback_with_generations(flt)]
    by_model: dict[str, list[Feedback]] = defaultdict(list)
    by_day: dict[str, list[Feedback]] = defaultdict(list)
    by_model_day: dict[tuple[str, str], list[Feedback]] = defaultdict(list)
    for row in rows:
        day = datetime.fromtimestamp(row.created_at, timezone.utc).date().isoformat()
        model = row.model or "(unknown)"
        by_model[model].append(row)
        by_day[day].append(row)
        by_model_day[(model, day)].append(row)
    return {"total": _summary(rows),
            "by_model": [{"model": m, **_summary(r)} for m, r in sorted(by_model.items())],
            "by_day": [{"day": d, **_summary(r)} for d, r in sorted(by_day.items())],
            "by_model_day": [{"model": m, "day": d, **_summary(r)} for (m, d), r in sorted(by_model_day.items())]}


# ---- preference data --------------------------------------------------------------------------------------

def _prompt_turns(record_input: dict[str, Any] | None) -> list[dict[str, str]] | None:
    """The prompt as chat turns ending with a user turn (a raw prompt becomes one user turn); None if unusable."""
    if not record_input:
        return None
    if isinstance(record_input.get("messages"), list):
        turns = [{"role": m["role"], "content": m["content"]} for m in record_input["messages"]]
        return turns if turns and turns[-1]["role"] == "user" else None
    if isinstance(record_input.get("prompt"), str) and record_input["prompt"].strip():
        return [{"role": "user", "content": record_input["prompt"]}]
    return None  # token ids or several prompts


def _value(row: Feedback) -> float | None:
    if row.rating is not None:
        return float(row.rating)
    return None if row.thumbs is None else (5.0 if row.thumbs == "up" else 1.0)


def preference_records(svc: Services, flt: FeedbackFilter, min_gap: float = 1.0,
                       max_pairs_per_prompt: int = 3) -> dict[str, Any]:
    """Preference records from feedback: corrected answer > the model's answer; for one prompt, the
    higher-rated answer > each lower-rated one (mean score gap >= min_gap; thumbs up = 5, down = 1)."""
    if min_gap <= 0 or not 1 <= max_pairs_per_prompt <= 100:
        raise Invalid("min_gap must be > 0 and max_pairs_per_prompt 1-100", param="min_gap")
    rows = [fb for fb, _ in _store(svc).feedback_with_generations(flt)]
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    counts = {"feedback": len(rows), "from_corrections": 0, "from_ratings": 0, "skipped_no_prompt": 0,
              "duplicates": 0}
    scored: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    prompts: dict[str, list[dict[str, str]]] = {}

    def add(turns, chosen, rejected, source) -> None:
        key = json.dumps([turns, chosen, rejected], ensure_ascii=False)
        if key in seen:
            counts["duplicates"] += 1
            return
        seen.add(key)
        records.append({"messages": turns, "chosen": chosen, "rejected": rejected})
        counts[source] += 1

    for row in rows:
        turns = _prompt_turns(row.input)
        if turns is None or row.output is None:
            counts["skipped_no_prompt"] += 1
            continue
        if row.corrected and row.corrected.strip() and row.output.strip() \
                and row.corrected.strip() != row.output.strip():
            add(turns, row.corrected, row.output, "from_corrections")
        value = _value(row)
        if value is not None and row.output.strip():
            key = json.dumps(turns, ensure_ascii=False, sort_keys=True)
            prompts[key] = turns
            scored[key][row.output].append(value)
    for key, outputs in scored.items():
        means = sorted(((sum(v) / len(v), text) for text, v in outputs.items()), key=lambda x: -x[0])
        best_mean, best = means[0]
        for mean, text in means[1:1 + max_pairs_per_prompt]:
            if best_mean - mean >= min_gap and text.strip() != best.strip():
                add(prompts[key], best, text, "from_ratings")
    return {"records": records, "counts": {**counts, "records": len(records)}, "format": "preference"}


def store_preferences(svc: Services, name: str, flt: FeedbackFilter, min_gap: float = 1.0,
                      max_pairs_per_prompt: int = 3) -> dict[str, Any]:
    """Build the preference records and store them as a new version of dataset `name` (format preference)."""
    from loralab.services import datasets

    built = preference_records(svc, flt, min_gap, max_pairs_per_prompt)
    if not built["records"]:
        raise Invalid("the selected feedback holds no preference pairs: it needs corrected answers, or answers "
                      "to the same prompt rated at least min_gap apart", code="no_preference_data", param="filters")
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in built["records"]).encode("utf-8")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dataset = datasets.upload_dataset(svc, body, f"feedback-preferences-{stamp}.jsonl", name=name,
                                      format="preference")
    return {"dataset": dataset, "counts": built["counts"]}
