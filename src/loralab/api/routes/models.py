"""Models: base models and fine-tuned versions; stage, deploy, rollback, delete."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from loralab.api.deps import get_services, require_token
from loralab.services import registry
from loralab.services.context import Services

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
