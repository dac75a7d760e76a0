"""Resume a failed or cancelled training job from its newest checkpoint."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from loralab.api.deps import get_services, require_token
from loralab.services import resume
from loralab.services.context import Services

router = APIRouter(prefix="/api/training/jobs", tags=["training"], dependencies=[Depends(require_token)])


@router.post("/{job_id}/resume", status_code=201)
def resume_job(job_id: str, svc: Services = Depends(get_services)) -> dict:
    """Queue a new job that continues a failed or cancelled one from its newest checkpoint (same spec and data)."""
    return resume.resume_job(svc, job_id)
