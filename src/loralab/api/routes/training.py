"""Training jobs: create, list, show, progress, metrics, logs, cancel, stream tickets and the SSE event stream."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from loralab.api.deps import events_scope, get_services, require_token, require_token_or_ticket
from loralab.services import jobs
from loralab.services.context import Services
from loralab.services.jobs import CreateJobRequest
from loralab.services.tickets import issue_ticket

router = APIRouter(prefix="/api/training/jobs", tags=["training"], dependencies=[Depends(require_token)])
# the event stream takes the token or a ticket (browsers' EventSource cannot send headers)
stream_router = APIRouter(prefix="/api/training/jobs", tags=["training"])


@router.post("", status_code=201)
def create(body: CreateJobRequest, svc: Services = Depends(get_services)) -> dict:
    """Queue a fine-tuning job on a stored dataset; a worker picks it up."""
    return jobs.create_job(svc, body)


@router.post("/estimate")
def estimate(body: CreateJobRequest, svc: Services = Depends(get_services)) -> dict:
    """Expected peak memory and tokens/s of a job request (the same body as POST), without queueing it."""
    return jobs.estimate_job(svc, body)


@router.get("")
def list_jobs(status: str | None = None, limit: int = Query(50, ge=1, le=500), after: str | None = None,
              svc: Services = Depends(get_services)) -> list[dict]:
    """Jobs, newest first; `after` = a job id to page past."""
    return jobs.list_jobs(svc, status, limit, after)


@router.get("/{job_id}")
def get_job(job_id: str, svc: Services = Depends(get_services)) -> dict:
    """Status, error {code, message, param}, progress and the resulting model id."""
    return jobs.get_job(svc, job_id)


@router.get("/{job_id}/progress")
def progress(job_id: str, svc: Services = Depends(get_services)) -> dict:
    return jobs.get_progress(svc, job_id)


@router.get("/{job_id}/metrics")
def metrics(job_id: str, after: int = Query(0, ge=0), svc: Services = Depends(get_services)) -> list[dict]:
    """Step and eval events (loss, learning rate, throughput...)."""
    return jobs.list_events(svc, job_id, after, 10000, types=("step", "eval"))


@router.get("/{job_id}/logs")
def logs(job_id: str, after: int = Query(0, ge=0), svc: Services = Depends(get_services)) -> dict:
    """Log and error events plus the tail of the engine's stderr."""
    return jobs.get_logs(svc, job_id, after)


@router.post("/{job_id}/cancel")
def cancel(job_id: str, svc: Services = Depends(get_services)) -> dict:
    """Cancel: queued jobs at once; running ones checkpoint and stop (status becomes cancelled)."""
    return jobs.cancel_job(svc, job_id)


@router.post("/{job_id}/ticket")
def ticket(job_id: str, svc: Services = Depends(get_services)) -> dict:
    """A short-lived ticket (LORALAB_STREAM_TICKET_SECONDS) that opens this job's event stream:
    `/events?ticket=...` or `/ws/training/{job_id}?ticket=...`, so the API token never goes in a URL."""
    jobs.get_job(svc, job_id)  # 404 for an unknown job
    return issue_ticket(svc, events_scope(job_id))


def _events_access(job_id: str, request: Request) -> None:
    require_token_or_ticket(request, events_scope(job_id))


@stream_router.get("/{job_id}/events", response_class=StreamingResponse, dependencies=[Depends(_events_access)])
async def events(job_id: str, after: int = Query(0, ge=0), last_event_id: str | None = Header(None),
                 svc: Services = Depends(get_services)):
    """Server-sent events: missed events first (after `after` or Last-Event-ID), then live; ends after the last.
    Needs the bearer token or `?ticket=` from POST /api/training/jobs/{job_id}/ticket."""
    if last_event_id and last_event_id.isdigit():
        after = max(after, int(last_event_id))
    stream = jobs.follow_events(svc, job_id, after)
    first = await anext(stream, None)  # raises 404 before the response starts

    async def body():
        event = first
        while event is not None:
            yield f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
            event = await anext(stream, None)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
