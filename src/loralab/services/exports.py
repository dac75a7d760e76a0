"""Exports: check a fine-tuned version can be exported, queue it as a job (one per model + format + quantization
at a time), read its status and files."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from loralab.services.context import Services
from loralab.spec import EMBEDDED_MODEL, ExportFormat, ExportQuantization, ExportSpec, _Strict
from loralab.store.errors import Invalid, NotFound
from loralab.store.models import Job, ModelVersion
from loralab.store.paths import ID_PATTERNS, contain
from loralab.store.repo import ACTIVE, TERMINAL

OUTPUT_DIR = "export"  # engine.export_job.OUTPUT_DIR (not imported: that module is the engine child's)
MEDIA_TYPES = {".json": "application/json", ".md": "text/plain; charset=utf-8", ".jinja": "text/plain; charset=utf-8",
               ".txt": "text/plain; charset=utf-8", "": "text/plain; charset=utf-8"}  # "" = Modelfile
BINARY = "application/octet-stream"


class ExportRequest(_Strict):
    """POST /api/models/{id}/export: what to write."""

    format: ExportFormat = Field(description=ExportSpec.model_fields["format"].description)
    quantization: ExportQuantization = Field("f16", description="GGUF tensor type for gguf and ollama: f16 (16-bit "
                                             "floats) or q8_0 (8-bit, about half the size); ignored for merged.")


# ---- creating -------------------------------------------------------------------------------------------------

def _model_row(svc: Services, model_id: str) -> ModelVersion:
    """The fine-tuned version; 404 for unknown ids, 422 for base models (they have nothing to merge)."""
    from loralab.services import registry

    if not ID_PATTERNS["model"].fullmatch(model_id or ""):
        registry.get_model(svc, model_id)  # 404 model_not_found for names that are not base models either
        raise Invalid(f"{model_id} is a base model: only fine-tuned versions (ft-...) are exported; GET "
                      "/api/models?kind=fine_tuned lists them", code="not_fine_tuned", param="model_id")
    try:
        return svc.repo.get_model(model_id)
    except NotFound:
        raise NotFound(f"model {model_id} not found; GET /api/models?kind=fine_tuned lists the fine-tuned versions",
                       code="model_not_found", param="model_id") from None


def _source(svc: Services, row: ModelVersion) -> tuple[Path, str]:
    """(registry directory, 'adapter' | 'full') of a version whose files are complete."""
    from loralab.engine.export import ExportError, inspect_source

    path = contain(svc.settings.home / "registry", row.id)
    try:
        source = inspect_source(path, row.base_model or EMBEDDED_MODEL)
    except ExportError:
        raise Invalid(f"the files of model {row.id} are missing or incomplete (neither a LoRA adapter nor a model "
                      "with config.json and safetensors weights); it cannot be exported", code="model_files_missing",
                      param="model_id") from None
    return path, source.kind


def _config_dir(svc: Services, base: str) -> Path | None:
    """Where a base model's config.json is on this host already, if it is (hub ids may not be downloaded)."""
    if base == EMBEDDED_MODEL:
        return svc.settings.models_dir / EMBEDDED_MODEL
    return Path(base) if Path(base).is_absolute() else None


def _check_architecture(config_dir: Path | None, model_id: str) -> None:
    """GGUF is written for the architectures export_gguf knows; others are refused before queueing (when known)."""
    if config_dir is None or not (config_dir / "config.json").is_file():
        return  # not knowable here: the engine checks it first thing
    try:
        model_type = json.loads((config_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    from loralab.engine.export_gguf import SUPPORTED_ARCHITECTURES

    if model_type not in SUPPORTED_ARCHITECTURES:
        raise Invalid(f"GGUF export supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))} models; {model_id} is a "
                      f"{model_type!r} model: export it with format 'merged' (and convert that with llama.cpp's "
                      "convert_hf_to_gguf.py)", code="unsupported_architecture", param="format")


def ollama_name(row: ModelVersion) -> str:
    """A name `ollama create` accepts: the registry name in lower case, tagged with the version."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", row.name.lower()).strip("-._")[:80] or "loralab-model"
    return f"{cleaned}:v{row.version}"


def create_export(svc: Services, model_id: str, request: ExportRequest | dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Validate and queue an export of a fine-tuned version; (view, False) when the same one is queued or running."""
    from loralab.services.base_models import check_base_model
    from loralab.services.jobs import check_queue_room

    if not isinstance(request, ExportRequest):
        request = ExportRequest.model_validate(request)
    row = _model_row(svc, model_id)
    path, kind = _source(svc, row)
    base = check_base_model(svc, row.base_model, param="model_id") if kind == "adapter" else None
    if request.format != "merged":
        _check_architecture(path if kind == "full" else _config_dir(svc, base), row.id)
    spec = ExportSpec(model_id=row.id, source=str(path), base_model=base, format=request.format,
                      quantization=request.quantization, name=ollama_name(row)).model_dump(mode="json")
    for job in svc.repo.list_exports(row.id, limit=500):
        if job.status in ACTIVE and (job.spec.get("format"), job.spec.get("quantization")) == \
                (spec["format"], spec["quantization"]):
            return export_dict(svc, job), False  # idempotent: no second queue slot, no queue-full refusal
    check_queue_room(svc)
    label = f"export {row.name} v{row.version} {request.format}" + (f" {spec['quantization']}"
                                                                     if spec["quantization"] else "")
    job, created = svc.repo.queue_export(spec, label)
    if created:
        svc.hub.publish(job.id)
    return export_dict(svc, job), created


# ---- reading --------------------------------------------------------------------------------------------------

def _output_dir(svc: Services, row: Job) -> Path:
    return contain(contain(svc.settings.home / "runs", row.id), OUTPUT_DIR)


def _done(svc: Services, row: Job) -> dict[str, Any]:
    from loralab.store.evaluations import done_payload

    if row.status != "succeeded":
        return {}
    return done_payload(svc.repo, row.id) or {}


def export_dict(svc: Services, row: Job, done: dict[str, Any] | None = None) -> dict[str, Any]:
    """The API view of an export: request, status, progress, error; once succeeded its files (name, size, url)."""
    spec = row.spec or {}
    progress = row.progress or {}
    error = {"code": row.error_code, "message": row.error_message, "param": row.error_param} \
        if row.error_code else None
    out = {"id": row.id, "object": "export", "status": row.status, "model_id": spec.get("model_id"),
           "format": spec.get("format"), "quantization": spec.get("quantization"), "name": spec.get("name"),
           "label": row.model_name, "error": error, "cancel_requested": row.cancel_requested,
           "progress": {k: progress.get(k) for k in ("stage", "step", "total_steps", "percent", "eta_s")},
           "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
           "files": [], "total_bytes": None, "architecture": None, "warnings": [], "ollama_command": None}
    if row.status == "succeeded":
        done = done if done is not None else _done(svc, row)
        root = _output_dir(svc, row)
        out["files"] = [{"name": f["name"], "size_bytes": f["size_bytes"],
                         "url": f"/api/exports/{row.id}/files/{f['name']}"}
                        for f in done.get("files") or [] if (root / f["name"]).is_file()]
        out["total_bytes"] = sum(f["size_bytes"] for f in out["files"])
        out.update({k: done.get(k) for k in ("architecture", "ollama_command")})
        out["warnings"] = list(done.get("warnings") or [])
    return out


def get_export(svc: Services, job_id: str) -> dict[str, Any]:
    return export_dict(svc, svc.repo.get_export(job_id))


def list_exports(svc: Services, model_id: str | None = None, status: str | None = None,
                 limit: int = 50) -> list[dict[str, Any]]:
    """Exports newest first; with `model_id`, that fine-tuned version's (404 when the version is unknown)."""
    if model_id is not None:
        model_id = _model_row(svc, model_id).id
    if status is not None and status not in (*ACTIVE, *TERMINAL):
        raise Invalid(f"unknown status {status!r}; use one of {', '.join((*ACTIVE, *TERMINAL))}", param="status")
    return [export_dict(svc, row) for row in svc.repo.list_exports(model_id, status, max(1, min(limit, 500)))]


def export_file(svc: Services, job_id: str, name: str) -> tuple[Path, str]:
    """(path, media type) of one file an export produced: a name its `done` event lists, inside its directory."""
    row = svc.repo.get_export(job_id)
    if row.status != "succeeded":
        raise NotFound(f"export {row.id} has no files (yet): it is {row.status}", code="file_not_found",
                       param="name")
    names = [f["name"] for f in _done(svc, row).get("files") or []]
    if name not in names:
        raise NotFound(f"export {row.id} has no file {name!r}; its files are {', '.join(names)}",
                       code="file_not_found", param="name")
    path = contain(_output_dir(svc, row), name)
    if not path.is_file():
        raise NotFound(f"{name} of export {row.id} is gone from the server; export the model again",
                       code="file_not_found", param="name")
    return path, MEDIA_TYPES.get(path.suffix, BINARY)


def cancel_export(svc: Services, job_id: str) -> dict[str, Any]:
    """Cancel: a queued export at once; a running one gets SIGTERM (its partial files are removed)."""
    from loralab.services import jobs

    svc.repo.get_export(job_id)
    jobs.cancel_job(svc, job_id)
    return get_export(svc, job_id)
