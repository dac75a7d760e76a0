"""Generation for the API and UI: resolve a model reference, keep a small LRU of loaded models, generate or stream."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loralab.services import registry
from loralab.services.context import Services
from loralab.services.jobs import check_base_model
from loralab.spec import EMBEDDED_MODEL, GenerateSpec
from loralab.store.errors import Invalid
from loralab.store.paths import ID_PATTERNS, contain


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(GenerateSpec):
    """What to run (a model id/name, or base_model + adapter) on what (prompt or messages), plus sampling settings."""

    model: str | None = Field(None, description="Fine-tuned model id (ft-…), a deployed model name, or a base model.")
    base_model: str | None = Field(None, description="Base model when no `model` is given (default: embedded).")
    adapter: str | None = Field(None, description="Fine-tuned model id whose adapter goes on `base_model`.")
    prompt: str | None = Field(None, description="Raw prompt text (no chat template).")
    messages: list[Message] | None = Field(None, description="Chat turns; the model's chat template is applied.")
    stream: bool = Field(False, description="Stream text pieces as server-sent events.")

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.model and (self.base_model or self.adapter):
            raise ValueError("give either model, or base_model (+ adapter), not both")
        return self

    def sampling(self) -> GenerateSpec:
        return GenerateSpec(**self.model_dump(include=set(GenerateSpec.model_fields)))


class ModelCache:
    """Loaded (model, tokenizer) pairs keyed by (base, adapter); least recently used evicted; one generation each."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str | None], tuple[Any, Any, threading.Lock]] = OrderedDict()
        self._loading: dict[tuple[str, str | None], threading.Lock] = {}

    def get(self, base: str, adapter: str | None):
        key = (base, adapter)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one thread loads a model; others wanting it wait instead of loading it again
            with self._lock:
                if key in self._items:
                    return self._items[key]
            from loralab.engine.models import load_for_inference

            model, tokenizer = load_for_inference(base, adapter)
            entry = (model, tokenizer, threading.Lock())
            with self._lock:
                self._items[key] = entry
                self._loading.pop(key, None)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHE: ModelCache | None = None
_CACHE_LOCK = threading.Lock()


def model_cache(svc: Services) -> ModelCache:
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None or _CACHE.size != svc.settings.generate_cache_size:
            _CACHE = ModelCache(svc.settings.generate_cache_size)
        return _CACHE


def resolve_target(svc: Services, request: GenerateRequest) -> tuple[str, str | None, str]:
    """(base model, adapter dir or None, label) for a request; only registry and models-dir paths are reachable."""
    if request.model:
        ref = request.model
        if ID_PATTERNS["model"].fullmatch(ref):
            return _version_target(svc, svc.repo.get_model(ref))
        deployed = registry.deployed_version(svc, ref)
        if deployed is not None:
            return _version_target(svc, deployed)
        return check_base_model(svc, ref), None, ref
    base = check_base_model(svc, request.base_model or EMBEDDED_MODEL)
    if request.adapter is None:
        return base, None, request.base_model or EMBEDDED_MODEL
    if ID_PATTERNS["model"].fullmatch(request.adapter):
        return base, registry.model_path(svc, request.adapter, "adapter"), request.adapter
    adapter = contain(svc.settings.home, request.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise Invalid(f"adapter {request.adapter!r} is not a LoRA adapter directory; give a fine-tuned model id",
                      param="adapter")
    return base, str(adapter), request.adapter


def _version_target(svc: Services, row) -> tuple[str, str | None, str]:
    files = registry.model_path(svc, row.id)
    if row.method == "full":
        return files, None, row.id
    return row.base_model, files, row.id  # base_model was checked when the job was created


def _load(svc: Services, request: GenerateRequest):
    from loralab.engine.models import ModelNotFoundError

    base, adapter, label = resolve_target(svc, request)
    try:
        return (*model_cache(svc).get(base, adapter), label)
    except ModelNotFoundError as exc:
        raise Invalid(str(exc), code="model_not_found", param="model") from None


def _inputs(request: GenerateRequest) -> dict[str, Any]:
    if request.messages is not None:
        return {"messages": [m.model_dump() for m in request.messages]}
    return {"prompt": request.prompt}


def generate_text(svc: Services, request: GenerateRequest) -> dict[str, Any]:
    """One whole completion."""
    from loralab.engine.generate import generate

    model, tokenizer, lock, label = _load(svc, request)
    with lock:
        result = generate(model, tokenizer, settings=request.sampling(), **_inputs(request))
    return {"model": label, **asdict(result)}


def stream_text(svc: Services, request: GenerateRequest) -> Iterator[str]:
    """Text pieces as they are generated (the model is loaded before the first piece, so errors come early)."""
    from loralab.engine.generate import stream

    model, tokenizer, lock, _ = _load(svc, request)

    def pieces() -> Iterator[str]:
        with lock:
            yield from stream(model, tokenizer, settings=request.sampling(), **_inputs(request))

    return pieces()
