"""A/B tests: route `ab:<name>` requests to model A or B (sticky per user/session), judge them from feedback."""
from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loralab.services.context import Services
from loralab.store.errors import Conflict, Invalid, LoralabError
from loralab.store.feedback import FeedbackStore
from loralab.store.models import AbTest
from loralab.store.paths import ID_PATTERNS

AB_PREFIX = "ab:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ALPHA = 0.05
POWER = 0.8
ARMS = ("A", "B")


class AbTestRequest(BaseModel):
    """A new A/B test between two served models."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100,
                      description="Endpoint name: clients ask for `ab:<name>`. Letters, digits, . _ -")
    model_a: str = Field(min_length=1, max_length=300, description="Arm A (the incumbent): ft-… id, model name, "
                                                                   "name:<version|stage> or a base model.")
    model_b: str = Field(min_length=1, max_length=300, description="Arm B (the challenger), same forms as model_a.")
    split: float = Field(0.5, gt=0.0, lt=1.0, description="Share of users/sessions routed to model A (0-1, "
                                                          "exclusive); the rest go to model B.")
    metric: Literal["mean_rating", "thumbs_up_rate"] = Field(
        "mean_rating", description="Success metric: mean rating (Mann-Whitney U test) or thumbs-up rate "
                                   "(two-proportion z-test).")


def _store(svc: Services) -> FeedbackStore:
    return FeedbackStore(svc.db)


def test_dict(row: AbTest) -> dict[str, Any]:
    return {"id": row.id, "object": "ab_test", "name": row.name, "endpoint": AB_PREFIX + row.name,
            "model_a": row.model_a, "model_b": row.model_b, "split": row.split, "metric": row.metric,
            "status": row.status, "winner": row.winner, "promoted_model": row.promoted_model,
            "created_at": row.created_at, "stopped_at": row.stopped_at}


def create_test(svc: Services, body: AbTestRequest) -> dict[str, Any]:
    """Check both arms resolve to two different served models, then start routing `ab:<name>`."""
    from loralab.services.serving import resolve_served_model

    if not NAME_RE.fullmatch(body.name):
        raise Invalid(f"A/B test name {body.name!r} is not allowed: use letters, digits, . _ - (up to 100)",
                      param="name")
    model_a, model_b = body.model_a.strip(), body.model_b.strip()
    if model_a == model_b:
        raise Invalid(f"model_b must differ from model_a (both are {model_a!r}): an A/B test compares two models",
                      code="same_model", param="model_b")
    targets = []
    for param, ref in (("model_a", model_a), ("model_b", model_b)):
        if ref.startswith(AB_PREFIX):
            raise Invalid(f"{param} cannot be another A/B endpoint ({ref!r})", param=param)
        try:
            targets.append(resolve_served_model(svc, ref)[:2])
        except LoralabError as exc:
            raise Invalid(f"{param}: {exc.message}", code=exc.code, param=param) from None
    if targets[0] == targets[1]:
        raise Invalid(f"model_a {model_a!r} and model_b {model_b!r} serve the same model; pick two different ones",
                      code="same_model", param="model_b")
    row = _store(svc).create_ab_test(id=_new_id(), name=body.name, model_a=model_a, model_b=model_b,
                                     split=body.split, metric=body.metric)
    return test_dict(row)


def _new_id() -> str:
    from loralab.store.repo import new_id

    return new_id("ab")


def list_tests(svc: Services, status: str | None = None) -> list[dict[str, Any]]:
    return [test_dict(row) for row in _store(svc).list_ab_tests(status)]


def get_test(svc: Services, test_id: str) -> dict[str, Any]:
    return test_dict(_store(svc).get_ab_test(test_id))


def arm_for(test_id: str, split: float, subject: str) -> str:
    """Deterministic arm of a subject: a hash of (test, subject) as a number in [0, 1) against the split."""
    digest = hashlib.sha256(f"{test_id}\x00{subject}".encode()).digest()
    return "A" if int.from_bytes(digest[:8], "big") / 2 ** 64 < split else "B"


def route(svc: Services, name: str, subject: str | None) -> tuple[AbTest, str, str]:
    """(test, arm, model reference) for a request to `ab:<name>`; sticky when a subject is known, else random."""
    store = _store(svc)
    test = store.routable_ab_test(name)
    if subject:
        arm = store.assign(test.id, subject, arm_for(test.id, test.split, subject))
    else:
        arm = "A" if random.random() < test.split else "B"
    return test, arm, test.model_a if arm == "A" else test.model_b


# ---- statistics -------------------------------------------------------------------------------------------

def score(rating: int | None, thumbs: str | None, metric: str) -> float | None:
    """One feedback row's value for a metric: thumbs-up rate uses thumbs (else rating >= 4 is up), mean rating
    uses the rating (else thumbs up = 5, down = 1)."""
    if metric == "thumbs_up_rate":
        if thumbs:
            return 1.0 if thumbs == "up" else 0.0
        return None if rating is None else float(rating >= 4)
    if rating is not None:
        return float(rating)
    return None if thumbs is None else (5.0 if thumbs == "up" else 1.0)


def compare(a: list[float], b: list[float], metric: str, alpha: float = ALPHA, power: float = POWER) -> dict:
    """Per-arm metric with a 95% interval, a two-sided p-value and the per-arm sample an 80%-power test needs."""
    if metric == "thumbs_up_rate":
        return _proportions(a, b, alpha, power)
    return _ratings(a, b, alpha, power)


def _proportions(a: list[float], b: list[float], alpha: float, power: float) -> dict:
    from scipy.stats import binomtest, norm

    arms = []
    for values in (a, b):
        n, up = len(values), int(sum(values))
        ci = None
        if n:
            interval = binomtest(up, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
            ci = [round(interval.low, 4), round(interval.high, 4)]
        arms.append({"n": n, "successes": up, "value": up / n if n else None, "ci": ci})
    p_value, needed = None, None
    if a and b:
        p1, p2, n1, n2 = arms[0]["value"], arms[1]["value"], len(a), len(b)
        pooled = (arms[0]["successes"] + arms[1]["successes"]) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        p_value = 1.0 if se == 0 else float(2 * norm.sf(abs(p2 - p1) / se))
        if p1 != p2:
            z_a, z_b, mean = norm.ppf(1 - alpha / 2), norm.ppf(power), (p1 + p2) / 2
            needed = math.ceil((z_a * math.sqrt(2 * mean * (1 - mean))
                                + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / (p1 - p2) ** 2)
    return {"test": "two-proportion z-test", "arms": arms, "p_value": p_value, "min_sample_per_arm": needed}


def _ratings(a: list[float], b: list[float], alpha: float, power: float) -> dict:
    from scipy.stats import mannwhitneyu, norm, t

    arms = []
    for values in (a, b):
        n = len(values)
        mean = sum(values) / n if n else None
        ci = None
        if n >= 2:
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            half = float(t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)
            ci = [round(mean - half, 4), round(mean + half, 4)]
        elif n == 1:
            ci = [mean, mean]
        arms.append({"n": n, "value": mean, "ci": ci})
    p_value, needed = None, None
    if a and b:
        p_value = float(mannwhitneyu(a, b, alternative="two-sided").pvalue)
        if math.isnan(p_value):  # every value tied: no evidence of a difference
            p_value = 1.0
        delta = arms[1]["value"] - arms[0]["value"]
        if delta:
            variance = _pooled_variance(a, b)
            z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
            # t-test sample size, scaled by Mann-Whitney's asymptotic relative efficiency (3/pi) under normality
            needed = max(2, math.ceil(2 * z * z * variance / delta ** 2 * math.pi / 3))
    return {"test": "Mann-Whitney U", "arms": arms, "p_value": p_value, "min_sample_per_arm": needed}


def _pooled_variance(a: list[float], b: list[float]) -> float:
    def ss(values):
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values)

    dof = len(a) + len(b) - 2
    return (ss(a) + ss(b)) / dof if dof > 0 else 0.0


def results(svc: Services, test_id: str) -> dict[str, Any]:
    """Per arm: model, requests, feedback count, metric and interval; the test, p-value and winner (if any)."""
    store = _store(svc)
    test = store.get_ab_test(test_id)
    return _results(store, test)


def _results(store: FeedbackStore, test: AbTest) -> dict[str, Any]:
    from loralab.store.feedback import FeedbackFilter

    requests = store.arm_requests(test.id)
    values: dict[str, list[float]] = {"A": [], "B": []}
    rows = store.feedback_with_generations(FeedbackFilter(ab_test_id=test.id))
    for fb, _gen in rows:
        value = score(fb.rating, fb.thumbs, test.metric)
        if value is not None and fb.arm in values:
            values[fb.arm].append(value)
    stats = compare(values["A"], values["B"], test.metric)
    arms = []
    for arm, stat in zip(ARMS, stats["arms"]):
        arms.append({"arm": arm, "model": test.model_a if arm == "A" else test.model_b,
                     "requests": requests.get(arm, 0), "feedback": sum(1 for fb, _ in rows if fb.arm == arm),
                     "scored": stat["n"], "metric": test.metric, "value": stat["value"], "ci95": stat["ci"],
                     **({"thumbs_up": stat["successes"]} if "successes" in stat else {})})
    p_value, needed = stats["p_value"], stats["min_sample_per_arm"]
    significant = p_value is not None and p_value < ALPHA
    enough = needed is not None and all(a["scored"] >= needed for a in arms)
    winner = None
    if significant and enough:
        winner = "B" if arms[1]["value"] > arms[0]["value"] else "A"
    if p_value is None:
        reason = "no feedback yet in one of the arms"
    elif not significant:
        reason = f"no significant difference (p = {p_value:.3g} >= {ALPHA})"
    elif not enough:
        reason = f"significant (p = {p_value:.3g}) but each arm needs {needed} scored answers; keep collecting"
    else:
        reason = f"arm {winner} is better (p = {p_value:.3g} < {ALPHA}, {needed} per arm needed)"
    subjects = store.subjects_by_arm(test.id)
    return {"test": test_dict(test), "arms": arms, "statistic": stats["test"], "p_value": p_value,
            "alpha": ALPHA, "power": POWER, "min_sample_per_arm": needed, "significant": significant,
            "winner": winner, "winner_model": None if winner is None else arms[ARMS.index(winner)]["model"],
            "reason": reason, "subjects": len(subjects),
            "sticky_violations": sum(1 for arms_seen in subjects.values() if len(arms_seen) > 1)}


def stop_test(svc: Services, test_id: str) -> dict[str, Any]:
    """Stop routing `ab:<name>`; the winner at this moment (if any) is kept with the test."""
    store = _store(svc)
    test = store.get_ab_test(test_id)
    if test.status == "stopped":
        return _results(store, test)
    outcome = _results(store, test)
    store.stop_ab_test(test.id, outcome["winner"])
    return _results(store, store.get_ab_test(test.id))


def promote_winner(svc: Services, test_id: str) -> dict[str, Any]:
    """Set the winning fine-tuned version's stage to production (and stop the test); base models are refused."""
    from loralab.services import registry
    from loralab.services.serving import resolve_served_model

    store = _store(svc)
    test = store.get_ab_test(test_id)
    outcome = _results(store, test)
    winner = test.winner if test.status == "stopped" and test.winner else outcome["winner"]
    if winner is None:
        raise Conflict(f"A/B test {test.name!r} has no winner to promote: {outcome['reason']}",
                       code="no_winner", param="test_id")
    reference = test.model_a if winner == "A" else test.model_b
    _base, adapter, label = resolve_served_model(svc, reference)
    if not ID_PATTERNS["model"].fullmatch(label):
        raise Conflict(f"the winner {reference!r} is a base model; only fine-tuned versions (ft-…) have a stage "
                       "to promote. Fine-tune it or deploy it by name instead", code="base_model", param="test_id")
    model = registry.set_stage(svc, label, "production")
    if test.status != "stopped":
        store.stop_ab_test(test.id, winner)
    store.set_promoted(test.id, winner, label)
    return {"test": test_dict(store.get_ab_test(test.id)), "winner": winner, "model": model}
