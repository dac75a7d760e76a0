"""Health (public) and system information (token-protected)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from loralab.api.deps import get_services, require_token
from loralab.services import system
from loralab.services.context import Services

router = APIRouter(prefix="/api", tags=["system"])


@router.get("/health")
def health() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/system-info", dependencies=[Depends(require_token)])
def system_info(svc: Services = Depends(get_services)) -> dict:
    """CPUs, memory, disk, GPUs and library versions of the server."""
    return system.system_info(svc)
