"""Evaluations: validate a request (models, dataset, base), queue it as a job; read summary, files, comparison."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from loralab.services.context import Services
from loralab.spec import EMBEDDED_MODEL, EvalSpec, _Strict
from loralab.store import evaluations as store
from loralab.store.errors import Invalid, NotFound
from loralab.store.models import Job
from loralab.store.paths import ID_PATTERNS, contain
from loralab.store.repo import TERMINAL

# Files of an evaluation's run directory that GET /api/evaluations/{id}/files/{name} serves.
REPORT_FILES = ("report.html", "report.en.html", "report.ja.html", "report.md", "results.csv", "summary.json",
                "metrics.png", "histogram.png")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".md": "text/markdown; charset=utf-8",
               ".csv": "text/csv; charset=utf-8", ".json": "application/json", ".png": "image/png"}
SETTINGS = ("max_new_tokens", "limit", "seed", "embeddings", "judge", "report_language")


class EvalOptions(_Strict):
    """What is scored and how: the dataset and the decoding/metric options shared by both request kinds."""

    dataset_id: str | None = Field(
        None, description="Dataset version with reference answers (default: the held-out split of the first "
        "fine-tuned model's training run, when it was trained with data.validation_split > 0).")
    max_new_tokens: int = EvalSpec.model_fields["max_new_tokens"]
    limit: int | None = EvalSpec.model_fields["limit"]
    seed: int = EvalSpec.model_fields["seed"]
    embeddings: bool = EvalSpec.model_fields["embeddings"]
    judge: bool = EvalSpec.model_fields["judge"]
    report_language: Literal["en", "ja"] = EvalSpec.model_fields["report_language"]


class EvaluationRequest(EvalOptions):
    """POST /api/evaluations: the base model and each fine-tuned version answer the same rows."""

    base_model: str | None = Field(
        None, description="Base model (default: the base of the fine-tuned models, else the embedded model).")
    model_ids: list[str] = Field(
        default_factory=list, max_length=8, description="Fine-tuned model ids (ft-...) to compare with the base.")


class CompareRequest(EvalOptions):
    """POST /api/evaluate/compare: two or more models side by side on one dataset."""

    models: list[str] = Field(
        min_length=2, max_length=9, description="Models to compare: fine-tuned ids (ft-...) and at most one base "
        "model name; every fine-tuned model must share that base.")
    wait: bool = Field(False, description="Answer when the evaluation has finished (200) instead of at once (202).")
    timeout_seconds: float = Field(600, gt=0, le=3600, description="With wait: give up waiting after this long, "
                                   "at most 600 s (the evaluation goes on; poll GET /api/evaluations/{id}).")

    @field_validator("models")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("models must be distinct")
        return value


# ---- creating -------------------------------------------------------------------------------------------------

def _adapter(svc: Services, model_id: str, index: int) -> tuple[str, Any]:
    """(adapter directory, registry row) of a fine-tuned model id; 404 when unknown, 422 when not an adapter."""
    from loralab.services import registry

    param = f"model_ids[{index}]"
    if not ID_PATTERNS["model"].fullmatch(model_id or ""):
        raise Invalid(f"{param} must be a fine-tuned model id like ft-..., got {model_id!r}; GET /api/models "
                      "lists them", code="invalid_model_id", param=param)
    try:
        row = svc.repo.get_model(model_id)
    except NotFound:
        raise NotFound(f"model {model_id} not found; GET /api/models lists the fine-tuned versions",
                       code="model_not_found", param=param) from None
    path = Path(registry.model_path(svc, model_id, param=param))
    if not (path / "adapter_config.json").is_file():
        raise Invalid(f"model {model_id} is not a LoRA adapter (method {row.method!r}); evaluations compare "
                      "adapters with their base model", code="not_an_adapter", param=param)
    return str(path), row


def _data_file(svc: Services, dataset_id: str | None, adapters: list[str]) -> Path:
    """The rows to score: a stored dataset version, or the held-out split saved with the first adapter."""
    from loralab.services.datasets import dataset_file

    if dataset_id is None:
        held = next((Path(a) / "validation.jsonl" for a in adapters if (Path(a) / "validation.jsonl").is_file()),
                    None)
        if held is None:
            raise Invalid("no dataset: give dataset_id (a dataset version with reference answers); the models have "
                          "no held-out split (train with data.validation_split > 0 to keep one)",
                          code="dataset_required", param="dataset_id")
        return held
    row = svc.repo.get_dataset(dataset_id)  # 404 dataset_not_found, param dataset_id
    return dataset_file(svc, row)


def _check_data(path: Path, limit: int | None) -> int:
    """Refuse data without reference answers now (422), not minutes later in the worker; return the row count."""
    from loralab.engine.evaluate import EvalError, load_examples

    try:
        examples, _ = load_examples(path, limit)
    except EvalError as exc:
        raise Invalid(exc.message.replace(str(path), "the dataset"), code=exc.code, param="dataset_id") from None
    if not examples:
        raise Invalid("the dataset has no rows to evaluate", code="empty_dataset", param="dataset_id")
    return len(examples)


def _pick_base(svc: Services, base_model: str | None, rows: list[Any], param: str) -> str:
    """The base model every adapter must have been trained on (422 base_model_mismatch otherwise)."""
    from loralab.services.jobs import check_base_model

    bases = list(dict.fromkeys(row.base_model for row in rows))
    if base_model is None:
        if len(bases) > 1:
            raise Invalid(f"the models were trained on different base models ({', '.join(bases)}); compare models "
                          "of one base model at a time", code="base_model_mismatch", param=param)
        return bases[0] if bases else EMBEDDED_MODEL
    base = check_base_model(svc, base_model)
    for row in rows:
        if row.base_model not in (base, base_model):
            raise Invalid(f"model {row.id} was trained on base model {row.base_model!r}, not {base_model!r}; "
                          f"evaluate it with base_model {row.base_model!r}", code="base_model_mismatch", param=param)
    return base


def _queue(svc: Services, base: str, model_ids: list[str], adapters: list[str], options: EvalOptions,
           label: str) -> dict[str, Any]:
    data = _data_file(svc, options.dataset_id, adapters)
    _check_data(data, options.limit)
    spec = EvalSpec(base_model=base, adapters=adapters, data_path=str(data),
                    **{k: getattr(options, k) for k in SETTINGS})
    row = store.create_evaluation_job(svc.repo, spec.model_dump(mode="json"), options.dataset_id, label, model_ids)
    svc.hub.publish(row.id)
    return evaluation_dict(svc, row, model_ids)


def create_evaluation(svc: Services, request: EvaluationRequest | dict[str, Any]) -> dict[str, Any]:
    """Validate and queue an evaluation of the base model and each fine-tuned version; a worker runs it."""
    if not isinstance(request, EvaluationRequest):
        request = EvaluationRequest.model_validate(request)
    if len(set(request.model_ids)) != len(request.model_ids):
        raise Invalid("model_ids must be distinct", param="model_ids")
    pairs = [_adapter(svc, model_id, i) for i, model_id in enumerate(request.model_ids)]
    base = _pick_base(svc, request.base_model, [row for _, row in pairs], "model_ids")
    label = " vs ".join(["base", *request.model_ids])
    return _queue(svc, base, request.model_ids, [path for path, _ in pairs], request, label)


def create_comparison(svc: Services, request: CompareRequest | dict[str, Any]) -> dict[str, Any]:
    """Queue one evaluation job scoring two or more models (fine-tuned ids and/or their base) on one dataset."""
    if not isinstance(request, CompareRequest):
        request = CompareRequest.model_validate(request)
    tuned = [m for m in request.models if ID_PATTERNS["model"].fullmatch(m)]
    bases = [m for m in request.models if m not in tuned]
    if len(bases) > 1:
        raise Invalid(f"models name {len(bases)} base models ({', '.join(bases)}); give at most one base model "
                      "and fine-tuned versions of it", code="base_model_mismatch", param="models")
    pairs = []
    for model_id in tuned:
        try:
            pairs.append(_adapter(svc, model_id, request.models.index(model_id)))
        except (Invalid, NotFound) as exc:
            exc.param = f"models[{request.models.index(model_id)}]"
            raise
    base = _pick_base(svc, bases[0] if bases else None, [row for _, row in pairs], "models")
    label = "compare: " + " vs ".join(request.models)
    return _queue(svc, base, tuned, [path for path, _ in pairs], request, label)


# ---- reading --------------------------------------------------------------------------------------------------

def _public_summary(done: dict[str, Any]) -> dict[str, Any]:
    """The done event's summary without server paths (data file, adapter directories)."""
    keep = ("models", "metrics", "improvement_pct", "delta", "tokenization", "embedding_model", "judge",
            "warnings", "eval_seconds", "chart_labels", "report_language")
    out = {k: done[k] for k in keep if k in done}
    data = done.get("data") or {}
    out["data"] = {k: v for k, v in data.items() if k != "path"}
    if "held-out" in str(data.get("source", "")):
        out["data"]["source"] = "held-out split"
    return out


def side_by_side(summary: dict[str, Any]) -> dict[str, Any]:
    """The aggregate table as rows: each metric's value per model, % change vs base, and which model is best."""
    from loralab.engine.metrics import LOWER_IS_BETTER
    from loralab.engine.report import TABLE_METRICS

    models = summary.get("models") or []
    metrics = summary.get("metrics") or {}
    rows = []
    for metric in TABLE_METRICS:
        values = {m: (metrics.get(m) or {}).get(metric) for m in models}
        if all(v is None for v in values.values()):
            continue
        lower = metric in LOWER_IS_BETTER or metric in ("mean_loss", "perplexity")
        scored = {m: v for m, v in values.items() if v is not None}
        best = None
        if metric not in ("answer_chars", "answer_tokens") and scored:
            target = (min if lower else max)(scored.values())
            winners = [m for m, v in scored.items() if v == target]
            best = winners[0] if len(winners) == 1 else None
        rows.append({"metric": metric, "values": values, "lower_is_better": lower, "best": best,
                     "improvement_pct": {m: (summary.get("improvement_pct") or {}).get(m, {}).get(metric)
                                         for m in models[1:]}})
    return {"models": models, "rows": rows}


def _files(svc: Services, row: Job) -> dict[str, str]:
    run_dir = contain(svc.settings.home / "runs", row.id)
    return {name: f"/api/evaluations/{row.id}/files/{name}" for name in REPORT_FILES if (run_dir / name).is_file()}


def evaluation_dict(svc: Services, row: Job, model_ids: list[str] | None = None,
                    done: dict[str, Any] | None = None) -> dict[str, Any]:
    """The API view of an evaluation: request, status, progress, error and (once succeeded) summary and files."""
    if model_ids is None:
        model_ids = store.evaluation_model_ids(svc.repo, [row.id])[row.id]
    spec = row.spec or {}
    progress = row.progress or {}
    error = {"code": row.error_code, "message": row.error_message, "param": row.error_param} \
        if row.error_code else None
    out = {"id": row.id, "object": "evaluation", "status": row.status, "name": row.model_name,
           "base_model": spec.get("base_model"), "model_ids": model_ids, "dataset_id": row.dataset_id,
           "data_source": "dataset" if row.dataset_id else "held-out split",
           "settings": {k: spec.get(k) for k in SETTINGS}, "error": error,
           "progress": {k: progress.get(k) for k in ("step", "total_steps", "percent", "eta_s", "stage")},
           "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
           "summary": None, "comparison": None, "files": {}}
    if row.status == "succeeded":
        done = done if done is not None else store.done_payload(svc.repo, row.id)
        if done:
            out["summary"] = _public_summary(done)
            out["comparison"] = side_by_side(out["summary"])
        out["files"] = _files(svc, row)
    return out


def get_evaluation(svc: Services, evaluation_id: str) -> dict[str, Any]:
    return evaluation_dict(svc, store.get_evaluation_job(svc.repo, evaluation_id))


def list_evaluations(svc: Services, model_id: str | None = None, status: str | None = None,
                     limit: int = 50) -> list[dict[str, Any]]:
    """Evaluations newest first; `model_id` keeps those that scored that fine-tuned version."""
    if model_id is not None and not ID_PATTERNS["model"].fullmatch(model_id):
        raise Invalid(f"model_id must be a fine-tuned model id like ft-..., got {model_id!r}", param="model_id")
    if status is not None and status not in ("queued", "running", *TERMINAL):
        raise Invalid(f"unknown status {status!r}", param="status")
    rows = store.list_evaluation_jobs(svc.repo, model_id, status, max(1, min(limit, 500)))
    links = store.evaluation_model_ids(svc.repo, [r.id for r in rows])
    return [evaluation_dict(svc, row, links[row.id]) for row in rows]


def latest_summary(svc: Services, model_id: str) -> dict[str, Any] | None:
    """The newest succeeded evaluation that scored `model_id` (for the Models page), or None."""
    rows = store.list_evaluation_jobs(svc.repo, model_id, "succeeded", 1)
    return evaluation_dict(svc, rows[0]) if rows else None


def report_file(svc: Services, evaluation_id: str, name: str) -> tuple[Path, str]:
    """(path, media type) of one report file of an evaluation, contained in its run directory."""
    row = store.get_evaluation_job(svc.repo, evaluation_id)
    if name not in REPORT_FILES:
        raise NotFound(f"no report file {name!r}; an evaluation has {', '.join(REPORT_FILES)}",
                       code="file_not_found", param="name")
    path = contain(contain(svc.settings.home / "runs", row.id), name)
    if not path.is_file():
        raise NotFound(f"{name} of evaluation {row.id} does not exist (yet): the evaluation is {row.status}",
                       code="file_not_found", param="name")
    return path, MEDIA_TYPES[path.suffix]


def cancel_evaluation(svc: Services, evaluation_id: str) -> dict[str, Any]:
    from loralab.services import jobs

    store.get_evaluation_job(svc.repo, evaluation_id)
    jobs.cancel_job(svc, evaluation_id)
    return get_evaluation(svc, evaluation_id)


MAX_WAIT_SECONDS = 600.0  # longest a compare request with wait=true is kept open


async def wait_for_evaluation_async(svc: Services, evaluation_id: str, timeout_seconds: float) -> dict[str, Any]:
    """Wait (holding no thread) until the evaluation is finished or `timeout_seconds` (at most 600) passed."""
    from starlette.concurrency import run_in_threadpool

    deadline = time.monotonic() + min(timeout_seconds, MAX_WAIT_SECONDS)
    while True:
        row = await run_in_threadpool(store.get_evaluation_job, svc.repo, evaluation_id)
        left = deadline - time.monotonic()
        if row.status in TERMINAL or left <= 0:
            return await run_in_threadpool(evaluation_dict, svc, row)
        await svc.hub.wait(evaluation_id, min(left, svc.settings.event_poll_seconds))


def wait_for_evaluation(svc: Services, evaluation_id: str, timeout_seconds: float) -> dict[str, Any]:
    """Block until the evaluation is finished or `timeout_seconds` (at most 600) passed; return its current view."""
    deadline = time.monotonic() + min(timeout_seconds, MAX_WAIT_SECONDS)
    while True:
        row = store.get_evaluation_job(svc.repo, evaluation_id)
        left = deadline - time.monotonic()
        if row.status in TERMINAL or left <= 0:
            return evaluation_dict(svc, row)
        svc.hub.wait_sync(evaluation_id, min(left, svc.settings.event_poll_seconds))
