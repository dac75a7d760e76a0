"""Models: base models and fine-tuned versions; stage, deploy, rollback, delete, export."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from loralab.api.deps import get_services, require_token
from loralab.services import exports, registry
from loralab.services.context import Services
from loralab.services.exports import ExportRequest

router = APIRouter(prefix="/api/models", tags=["models"], dependencies=[Depends(require_token)])


class StageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["draft", "staging", "production", "archived"]


@router.get("")
def list_models(kind: Literal["base", "fine_tuned"] | None = None, svc: Services = Depends(get_services)) -> list[dict]:
    """Base models (the embedded one first) and fine-tuned versions with lineage."""
    return registry.list_models(svc, kind)


@router.get("/{model_id}")
def get_model(model_id: str, svc: Services = Depends(get_services)) -> dict:
    return registry.get_model(svc, model_id)


@router.get("/{model_id}/deployments")
def deployments(model_id: str, svc: Services = Depends(get_services)) -> list[dict]:
    """Deploy/rollback history of this model's name, oldest first."""
    return registry.deployment_history(svc, model_id)


@router.post("/{model_id}/stage")
def stage(model_id: str, body: StageRequest, svc: Services = Depends(get_services)) -> dict:
    """Move to draft/staging/production/archived (a new production version archives the previous one)."""
    return registry.set_stage(svc, model_id, body.stage)


@router.post("/{model_id}/deploy")
def deploy(model_id: str, svc: Services = Depends(get_services)) -> dict:
    return registry.deploy_model(svc, model_id)


@router.post("/{model_id}/rollback")
def rollback(model_id: str, svc: Services = Depends(get_services)) -> dict:
    """Redeploy the previously deployed version of this model's name."""
    return registry.rollback_model(svc, model_id)


@router.delete("/{model_id}")
def delete(model_id: str, svc: Services = Depends(get_services)) -> dict:
    """Delete a fine-tuned version and its files (409 while deployed, served by its name, or in use by an active
    evaluation, training job or A/B test)."""
    return registry.delete_model(svc, model_id)


@router.post("/{model_id}/export", status_code=202, responses={200: {"description": "the same export is already "
                                                                     "queued or running: that job"}})
def export(model_id: str, body: ExportRequest, svc: Services = Depends(get_services)):
    """Queue an export of a fine-tuned version: merged safetensors, GGUF (f16 or q8_0) or GGUF + Ollama Modelfile.

    202 with the new export job; 200 with the existing one when the same model, format and quantization is queued
    or running already. Follow it with GET /api/exports/{id} (files appear there once it succeeded).
    """
    view, created = exports.create_export(svc, model_id, body)
    return JSONResponse(view, status_code=202 if created else 200)


@router.get("/{model_id}/exports")
def model_exports(model_id: str, status: str | None = None, limit: int = Query(50, ge=1, le=500),
                  svc: Services = Depends(get_services)) -> list[dict]:
    """This fine-tuned version's exports, newest first."""
    return exports.list_exports(svc, model_id, status, limit)
