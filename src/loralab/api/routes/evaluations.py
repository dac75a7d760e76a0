"""Evaluations: queue one (base vs fine-tuned versions), list, show with summary, report files, compare, cancel."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from loralab.api.deps import get_services, require_token, require_token_or_ticket
from loralab.services import evaluations
from loralab.services.context import Services
from loralab.services.evaluations import CompareRequest, EvaluationRequest


def token_or_report_ticket(request: Request) -> None:
    """The bearer token; a report file also opens with `?ticket=` issued for its evaluation (the UI's links)."""
    evaluation_id = request.path_params.get("evaluation_id")
    if request.method == "GET" and evaluation_id and "name" in request.path_params:
        require_token_or_ticket(request, f"report:{evaluation_id}")
    else:
        require_token(request)


router = APIRouter(tags=["evaluations"], dependencies=[Depends(token_or_report_ticket)])
# report.html is self-contained: inline CSS and data: images, never scripts or requests elsewhere
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@router.post("/api/evaluations", status_code=202)
def create(body: EvaluationRequest, svc: Services = Depends(get_services)) -> dict:
    """Queue an evaluation: the base model and each fine-tuned model answer the dataset's rows and are scored."""
    return evaluations.create_evaluation(svc, body)


@router.get("/api/evaluations")
def list_evaluations(model_id: str | None = None, status: str | None = None,
                     limit: int = Query(50, ge=1, le=500), svc: Services = Depends(get_services)) -> list[dict]:
    """Evaluations, newest first; `model_id` keeps those that scored that fine-tuned version."""
    return evaluations.list_evaluations(svc, model_id, status, limit)


@router.get("/api/evaluations/{evaluation_id}")
def get_evaluation(evaluation_id: str, svc: Services = Depends(get_services)) -> dict:
    """Status, progress, error; once succeeded the summary, the side-by-side comparison and links to the files."""
    return evaluations.get_evaluation(svc, evaluation_id)


@router.get("/api/evaluations/{evaluation_id}/files/{name}")
def report_file(evaluation_id: str, name: str, svc: Services = Depends(get_services)) -> FileResponse:
    """report.html (.en.html, .ja.html), report.md, results.csv, summary.json, metrics.png, histogram.png.

    Needs the bearer token or a `?ticket=` for scope `report:<evaluation id>` (a browser link cannot send headers).
    """
    path, media_type = evaluations.report_file(svc, evaluation_id, name)
    headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=media_type, headers=headers)


@router.post("/api/evaluations/{evaluation_id}/cancel")
def cancel(evaluation_id: str, svc: Services = Depends(get_services)) -> dict:
    return evaluations.cancel_evaluation(svc, evaluation_id)


@router.post("/api/evaluate/compare", status_code=202, responses={200: {"description": "wait=true: finished"}})
async def compare(body: CompareRequest, svc: Services = Depends(get_services)):
    """Two or more models on one dataset in one evaluation job: 202 + id at once (GET it for the side-by-side
    `comparison`), or with `wait=true` 200 and the finished evaluation (202 if `timeout_seconds`, at most 600,
    passed first). The wait holds no server thread."""
    created = await run_in_threadpool(evaluations.create_comparison, svc, body)
    if not body.wait:
        return JSONResponse(created, status_code=202)
    view = await evaluations.wait_for_evaluation_async(svc, created["id"], body.timeout_seconds)
    return JSONResponse(view, status_code=200 if view["status"] in ("succeeded", "failed", "cancelled") else 202)
