"""Datasets: upload (validated before anything is stored), list, show, preview, token stats, delete."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from loralab.api.deps import get_services, require_token
from loralab.services import datasets
from loralab.services.context import Services
from loralab.services.errors import Invalid, TooLarge

router = APIRouter(prefix="/api/datasets", tags=["datasets"], dependencies=[Depends(require_token)])

UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL, JSON, CSV or Parquet (UTF-8)."},
        "name": {"type": "string", "description": "Dataset name; the same name again makes a new version."},
        "format": {"type": "string", "default": "auto",
                   "enum": ["auto", "alpaca", "chat", "sharegpt", "text", "preference"]}}}}}}}
FORM_OVERHEAD_BYTES = 64 * 1024


@router.post("/upload", status_code=201, openapi_extra=UPLOAD_DOC)
async def upload(request: Request, svc: Services = Depends(get_services)) -> dict:
    """Upload a dataset file; 422 lists every problem as {line, field, code, message} and nothing is stored."""
    limit = svc.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD_BYTES:
        raise TooLarge(f"the upload is {declared} bytes, more than the {limit} allowed (LORALAB_MAX_UPLOAD_BYTES)",
                       code="file_too_large", param="file")
    async with request.form(max_files=1, max_fields=10) as form:
        upload_file = form.get("file")
        if upload_file is None or isinstance(upload_file, str):
            raise Invalid("no file in the form: send multipart/form-data with a 'file' part", param="file")
        name, fmt = form.get("name"), form.get("format") or "auto"
        filename = upload_file.filename or "upload.jsonl"
        # The part is spooled to a temporary file; the service reads it only once it holds an upload slot
        # (LORALAB_MAX_CONCURRENT_UPLOADS), so waiting uploads don't each keep their bytes in memory.
        return await run_in_threadpool(datasets.upload_dataset, svc, upload_file.file, filename,
                                       name=name if isinstance(name, str) and name else None, format=str(fmt))


@router.get("")
def list_datasets(name: str | None = None, svc: Services = Depends(get_services)) -> list[dict]:
    """All dataset versions, newest first (filter by name)."""
    return datasets.list_datasets(svc, name)


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, svc: Services = Depends(get_services)) -> dict:
    return datasets.get_dataset(svc, dataset_id)


@router.get("/{dataset_id}/preview")
def preview(dataset_id: str, offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200),
            svc: Services = Depends(get_services)) -> dict:
    """Normalised records offset..offset+limit."""
    return datasets.preview_dataset(svc, dataset_id, offset, limit)


@router.get("/{dataset_id}/stats")
def stats(dataset_id: str, base_model: str | None = None, max_seq_length: int | None = Query(None, ge=8),
          svc: Services = Depends(get_services)) -> dict:
    """Rows and token-length histogram with the base model's tokenizer (embedded by default; cached)."""
    return datasets.dataset_stats(svc, dataset_id, base_model, max_seq_length)


@router.delete("/{dataset_id}")
def delete(dataset_id: str, svc: Services = Depends(get_services)) -> dict:
    """Delete a dataset version and its files (409 while a queued or running job uses it)."""
    return datasets.delete_dataset(svc, dataset_id)
