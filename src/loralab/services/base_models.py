"""Which base models a server request may name (the one policy for API and UI), and loading them off request threads.

A request may name the embedded model, a model under LORALAB_HOME/models, an entry of the operator's allow-list
(`allowed_base_models`: hub ids or absolute directories) or, only with `hub_access`, any hub id. Nothing is looked
up relative to the server's working directory, the hub is never called while hub access is off, and a refusal
reads the same whether or not a path exists on the server. Loads run on a small executor with a timeout, so
requests waiting for a model never occupy the threads every other synchronous route needs.
"""
from __future__ import annotations

import asyncio
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.services.context import Services
from loralab.spec import EMBEDDED_MODEL
from loralab.store.errors import Invalid, LoralabError

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_PART_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")  # one path component under LORALAB_HOME/models
MAX_LOADS_PER_CLIENT = 4  # model-loading requests one client address may have waiting at once
TOKENIZER_CACHE = 8  # tokenizers kept in memory (tokenize, dataset stats)
RETRY_AFTER_SECONDS = 30


class ModelBusy(LoralabError):
    """A model load took longer than the server waits (503), or a client has too many loads waiting (429)."""

    status, code = 503, "model_loading_timeout"

    def __init__(self, message: str, *, status: int = 503, code: str | None = None, param: str | None = None):
        super().__init__(message, code=code, param=param)
        self.status = status
        self.headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}


@dataclass(frozen=True)
class Allowed:
    """A base model a request may use: `value` is what a spec stores (embedded name, absolute dir, hub id)."""

    value: str
    kind: str  # "embedded" | "local" | "hub"


# ---- the policy ----------------------------------------------------------------------------------------------

def _refused(name: str, param: str) -> Invalid:
    """The same answer whether or not something of that name exists on the server's disk; no path in it."""
    hint = (f"use {EMBEDDED_MODEL}, a model under the server's models folder (GET /api/models lists them), or ask "
            "the operator to add it to LORALAB_ALLOWED_BASE_MODELS")
    shown = name if len(name) <= 100 and not name.startswith(("/", "~", "\\")) and ":" not in name else "this name"
    if HUB_ID_RE.fullmatch(name):
        return Invalid(f"base model {shown!r} is not available: this server does not load models from the Hugging "
                       f"Face Hub (LORALAB_HUB_ACCESS is off); {hint}", code="model_not_allowed", param=param)
    if _looks_like_path(name):
        return Invalid(f"base model paths are not accepted here: {hint}", code="model_not_allowed", param=param)
    return Invalid(f"base model {shown!r} not found: {hint}", code="model_not_found", param=param)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or "\\" in name or "/" in name or ":" in name or "\x00" in name


def _under_models(root: Path, name: str) -> Path | None:
    """`root/name` when `name` is one or two plain components naming a model directory or a .gguf file there."""
    if os.path.isabs(name):
        text = os.path.normpath(name)
        base = os.path.normpath(str(root))
        if not text.startswith(base + os.sep):
            return None
        name = text[len(base) + 1:]
    parts = name.split("/")
    if not 1 <= len(parts) <= 2 or not all(_PART_RE.fullmatch(p) and p not in (".", "..") for p in parts):
        return None
    path = root.joinpath(*parts)  # lexical: an operator's symlink inside the models folder is theirs to make
    if path.suffix == ".gguf":
        return path if path.is_file() else None
    return path if (path / "config.json").is_file() else None


def allow(svc: Services, name: str | None, param: str = "base_model") -> Allowed:
    """Check a base model named by a request against the policy; Invalid (model_not_found/_not_allowed) if not."""
    name = (name or "").strip() or EMBEDDED_MODEL
    settings = svc.settings
    if name == EMBEDDED_MODEL:
        return Allowed(EMBEDDED_MODEL, "embedded")
    local = _under_models(settings.models_dir, name)
    if local is not None:
        return Allowed(str(local), "local")
    if name in settings.allowed_base_models:
        if os.path.isabs(name):
            return Allowed(os.path.normpath(name), "local")
        if HUB_ID_RE.fullmatch(name):
            return Allowed(name, "hub")
    if settings.hub_access and HUB_ID_RE.fullmatch(name):
        return Allowed(name, "hub")
    raise _refused(name, param)


def check_base_model(svc: Services, name: str | None, param: str = "base_model") -> str:
    """The value a job or evaluation spec stores for an allowed base model (see `allow`)."""
    return allow(svc, name, param).value


def resolve(svc: Services, value: str, param: str = "base_model"):
    """A loadable local directory for an allowed value (or a registry path): blocking, may convert GGUF or
    download (hub access on). Errors never carry a server path."""
    from loralab.engine.models import ModelNotFoundError, hub_snapshot, resolve_base_model

    settings = svc.settings
    try:
        if value == EMBEDDED_MODEL or os.path.isabs(value):
            return resolve_base_model(value, hub=False, models_root=settings.models_dir)
        local = _under_models(settings.models_dir, value)
        if local is not None:
            return resolve_base_model(str(local), hub=False, models_root=settings.models_dir)
        if HUB_ID_RE.fullmatch(value):
            allowed = settings.hub_access or value in settings.allowed_base_models
            if allowed:
                return hub_snapshot(value, local_files_only=not settings.hub_access)
    except ModelNotFoundError as exc:
        # engine messages about local files name server paths: say what is wrong without them
        message = str(exc) if HUB_ID_RE.fullmatch(value) and not os.path.isabs(value) else (
            "it is not a loadable transformers model (no config.json, a LoRA adapter, or unreadable files)")
        raise Invalid(f"cannot load base model {_label(svc, value)!r}: {message}", code="model_not_found",
                      param=param) from None
    raise _refused(value, param)


def _label(svc: Services, value: str) -> str:
    """A server path as the user may see it: relative to the models folder, else its last component."""
    try:
        return str(Path(value).relative_to(svc.settings.models_dir))
    except ValueError:
        return Path(value).name


# ---- loading off the request threads -------------------------------------------------------------------------

_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_INFLIGHT: dict[Any, Future] = {}
_TOKENIZERS: OrderedDict[str, Any] = OrderedDict()
_CLIENTS: dict[str, int] = {}


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_SIZE != size:
            if _POOL is not None:
                _POOL.shutdown(wait=False)  # loads already running finish; their results are cached
            _POOL, _POOL_SIZE = ThreadPoolExecutor(size, thread_name_prefix="loralab-model-load"), size
        return _POOL


def _submit(svc: Services, key: Any, fn: Callable[[], Any]) -> Future:
    """One future per key: concurrent requests for the same model share a single load."""
    with _LOCK:
        future = _INFLIGHT.get(key)
        if future is not None:
            return future
    pool = _pool(svc.settings.model_load_workers)
    with _LOCK:
        future = _INFLIGHT.get(key)
        if future is None:
            future = pool.submit(fn)
            _INFLIGHT[key] = future
            future.add_done_callback(lambda _f, k=key: _forget(k))
        return future


def _forget(key: Any) -> None:
    with _LOCK:
        _INFLIGHT.pop(key, None)


def _timeout(svc: Services, param: str) -> ModelBusy:
    return ModelBusy(f"the model is still loading after {svc.settings.model_load_timeout_seconds:g} s; try again "
                     "in a moment", code="model_loading_timeout", param=param)


def wait_load(svc: Services, key: Any, fn: Callable[[], Any], param: str = "base_model") -> Any:
    """Run a load on the bounded executor and wait for it here (sync callers: the web UI, the CLI's services)."""
    future = _submit(svc, key, fn)
    try:
        return future.result(timeout=svc.settings.model_load_timeout_seconds)
    except FutureTimeout:
        raise _timeout(svc, param) from None


async def await_load(svc: Services, key: Any, fn: Callable[[], Any], param: str = "base_model") -> Any:
    """Await a load on the bounded executor without holding a thread (async routes)."""
    future = _submit(svc, key, fn)
    try:
        # shield: a timed-out request stops waiting, the load goes on and its result is cached for the next one
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                      svc.settings.model_load_timeout_seconds)
    except asyncio.TimeoutError:
        raise _timeout(svc, param) from None


@contextmanager
def client_slot(client: str | None):
    """At most MAX_LOADS_PER_CLIENT model-loading requests per client address at once (429 beyond)."""
    key = client or "?"
    with _LOCK:
        if _CLIENTS.get(key, 0) >= MAX_LOADS_PER_CLIENT:
            raise ModelBusy(f"too many requests waiting for a model from this client (at most "
                            f"{MAX_LOADS_PER_CLIENT}); wait for them to finish", status=429,
                            code="too_many_model_loads")
        _CLIENTS[key] = _CLIENTS.get(key, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            left = _CLIENTS.get(key, 1) - 1
            if left:
                _CLIENTS[key] = left
            else:
                _CLIENTS.pop(key, None)


def client_of(request) -> str | None:
    """The client address of a Starlette request (the per-client limit's key)."""
    return request.client.host if request is not None and request.client else None


# ---- tokenizers ----------------------------------------------------------------------------------------------

def _cached_tokenizer(key: str):
    with _LOCK:
        if key in _TOKENIZERS:
            _TOKENIZERS.move_to_end(key)
            return _TOKENIZERS[key]
    return None


def _tokenizer_job(svc: Services, value: str, param: str) -> Callable[[], Any]:
    def job():
        from loralab.data.template import ensure_chat_template
        from loralab.engine.models import load_tokenizer

        resolved = resolve(svc, value, param)
        try:
            tokenizer = ensure_chat_template(load_tokenizer(resolved))
        except (OSError, ValueError) as exc:
            raise Invalid(f"cannot load the tokenizer of base model {_label(svc, value)!r}: {type(exc).__name__}",
                          code="model_not_found", param=param) from None
        with _LOCK:
            _TOKENIZERS[value] = tokenizer
            while len(_TOKENIZERS) > TOKENIZER_CACHE:
                _TOKENIZERS.popitem(last=False)
        return tokenizer
    return job


def tokenizer(svc: Services, name: str | None, param: str = "base_model", private: bool = False):
    """The tokenizer of an allowed base model (chat template ensured), cached; blocking. `private=True` gives a
    copy the caller may reconfigure (truncation, padding: a shared fast tokenizer refuses concurrent changes)."""
    import copy

    value = check_base_model(svc, name, param)
    found = _cached_tokenizer(value)
    if found is None:
        found = wait_load(svc, ("tokenizer", value), _tokenizer_job(svc, value, param), param)
    return copy.deepcopy(found) if private else found


async def tokenizer_async(svc: Services, name: str | None, client: str | None = None, param: str = "base_model"):
    """The tokenizer of an allowed base model, awaited (a per-client limit applies while it loads)."""
    value = check_base_model(svc, name, param)
    cached = _cached_tokenizer(value)
    if cached is not None:
        return cached
    with client_slot(client):
        return await await_load(svc, ("tokenizer", value), _tokenizer_job(svc, value, param), param)


# ---- generation workers ----------------------------------------------------------------------------------------

def _worker_job(svc: Services, base: str, param: str) -> Callable[[], Any]:
    def job():
        from loralab.engine.hardware import PlacementError
        from loralab.engine.models import ModelNotFoundError
        from loralab.services.inference import get_engine

        resolved = resolve(svc, base, param)
        try:
            return get_engine(svc.settings.generate_cache_size).worker(resolved.path, resolved=True,
                                                                       settings=svc.settings)
        except PlacementError as exc:  # LORALAB_INFERENCE_* and this server's hardware disagree: say what to change
            raise Invalid(f"cannot load base model {_label(svc, base)!r}: {exc}", code="placement_refused",
                          param=param) from None
        except (ModelNotFoundError, OSError, ValueError) as exc:
            raise Invalid(f"cannot load base model {_label(svc, base)!r}: {type(exc).__name__}",
                          code="model_not_found", param=param) from None
    return job


def _loaded_worker(svc: Services, base: str):
    """The worker of `base` when it is loaded already (no executor, no wait)."""
    from loralab.services.inference import get_engine

    if base == EMBEDDED_MODEL:
        key = str(svc.settings.models_dir / EMBEDDED_MODEL)
    else:
        local = Path(base) if os.path.isabs(base) else _under_models(svc.settings.models_dir, base)
        if local is None or local.suffix == ".gguf":
            return None
        key = os.path.realpath(local)
    return get_engine(svc.settings.generate_cache_size).loaded(key)


def worker(svc: Services, base: str, param: str = "model"):
    """The generation worker of a base (an allowed value or a registry path), loading it on the executor."""
    found = _loaded_worker(svc, base)
    if found is not None:
        return found
    return wait_load(svc, ("worker", base), _worker_job(svc, base, param), param)


async def worker_async(svc: Services, base: str, client: str | None = None, param: str = "model"):
    """The generation worker of a base, awaited without holding a thread (per-client limit while loading)."""
    found = _loaded_worker(svc, base)
    if found is not None:
        return found
    with client_slot(client):
        return await await_load(svc, ("worker", base), _worker_job(svc, base, param), param)
