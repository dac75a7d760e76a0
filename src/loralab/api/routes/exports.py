"""Exports: status and files of export jobs (queued by POST /api/models/{id}/export), downloads, cancel."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from loralab.api.deps import get_services, require_token, require_token_or_ticket
from loralab.services import exports
from loralab.services.context import Services


def export_scope(job_id: str) -> str:
    """The ticket scope that opens one export's files (the UI's download links)."""
    return f"export:{job_id}"


def token_or_export_ticket(request: Request) -> None:
    """The bearer token; a file download also opens with `?ticket=` issued for its export (a link sends no header)."""
    job_id = request.path_params.get("job_id")
    if request.method in ("GET", "HEAD") and job_id and "name" in request.path_params:
        require_token_or_ticket(request, export_scope(job_id))
    else:
        require_token(request)


router = APIRouter(prefix="/api/exports", tags=["exports"], dependencies=[Depends(token_or_export_ticket)])


@router.get("")
def list_exports(model_id: str | None = None, status: str | None = None, limit: int = Query(50, ge=1, le=500),
                 svc: Services = Depends(get_services)) -> list[dict]:
    """Exports, newest first; `model_id` keeps one fine-tuned version's."""
    return exports.list_exports(svc, model_id, status, limit)


@router.get("/{job_id}")
def get_export(job_id: str, svc: Services = Depends(get_services)) -> dict:
    """Status, progress (stage, percent), error; once succeeded the files with their sizes and download URLs."""
    return exports.get_export(svc, job_id)


@router.get("/{job_id}/files/{name}")
def export_file(job_id: str, name: str, svc: Services = Depends(get_services)) -> FileResponse:
    """Download one exported file (streamed from disk, Range requests supported): a name listed in `files`.

    Needs the bearer token or a `?ticket=` for scope `export:<job id>`.
    """
    path, media_type = exports.export_file(svc, job_id, name)
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'",
               "Cache-Control": "no-store"}
    return FileResponse(path, media_type=media_type, filename=path.name, headers=headers,
                        content_disposition_type="attachment")


@router.post("/{job_id}/cancel")
def cancel(job_id: str, svc: Services = Depends(get_services)) -> dict:
    """Cancel a queued or running export; a running one stops at once and leaves no partial files."""
    return exports.cancel_export(svc, job_id)
