"""Generation for the API and UI: resolve a model reference, keep a small LRU of loaded models, generate or stream."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loralab.services import registry
from loralab.services.context import Services
from loralab.services.inference import (AdapterError, Completion, Piece, PromptTooLong, Sampling, Stream,
                                       WorkerClosed)
from loralab.services.jobs import check_base_model
from loralab.spec import EMBEDDED_MODEL, GenerateSpec
from loralab.store.errors import Invalid, LoralabError
from loralab.store.paths import ID_PATTERNS, contain

log = logging.getLogger(__name__)
AB_PREFIX = "ab:"  # `model: "ab:<name>"` is routed by the active A/B test of that name


MAX_MESSAGES = 256  # chat turns in one request
MAX_TEXT_CHARS = 200_000  # characters of one message or prompt (the model's context is far smaller anyway)
MAX_STOPS = 4  # stop strings, as OpenAI allows
MAX_STOP_CHARS = 256


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class GenerateRequest(GenerateSpec):
    """What to run (a model id/name, or base_model + adapter) on what (prompt or messages), plus sampling settings."""

    model: str | None = Field(None, description="Fine-tuned model id (ft-…), a deployed model name, or a base model.")
    base_model: str | None = Field(None, description="Base model when no `model` is given (default: embedded).")
    adapter: str | None = Field(None, description="Fine-tuned model id whose adapter goes on `base_model`.")
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="Raw prompt text (no chat template).")
    messages: list[Message] | None = Field(None, max_length=MAX_MESSAGES,
                                           description="Chat turns; the model's chat template is applied.")
    stream: bool = Field(False, description="Stream text pieces as server-sent events.")
    user: str | None = Field(None, max_length=200, description="User or session id: keeps an A/B test's arm "
                                                               "sticky and is stored with the generation.")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in value):
            raise ValueError(f"give at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.model and (self.base_model or self.adapter):
            raise ValueError("give either model, or base_model (+ adapter), not both")
        return self

    def sampling(self) -> GenerateSpec:
        return GenerateSpec(**self.model_dump(include=set(GenerateSpec.model_fields)))


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


# ---- which runtime serves a model (LORALAB_SERVING_RUNTIME): transformers (inference.py) or llama.cpp ----------

class RuntimeFailed(LoralabError):
    """The llama.cpp runtime could not build or start a model (details in the server log)."""

    status, code = 503, "runtime_failed"


def _model_dir(svc: Services, base: str) -> tuple[str | None, bool]:
    """(config directory of a base value or registry path, or None; whether it is the embedded Llama)."""
    import os

    from loralab.services import base_models

    if base == EMBEDDED_MODEL:
        return str(svc.settings.models_dir / EMBEDDED_MODEL), True
    if os.path.isabs(base):
        return (base if os.path.isdir(base) else None), False
    local = base_models._under_models(svc.settings.models_dir, base)
    if local is not None:
        return (str(local) if local.is_dir() else None), False
    if base_models.HUB_ID_RE.fullmatch(base):  # the local cache only: deciding never downloads
        from loralab.engine.models import ModelNotFoundError, hub_snapshot

        try:
            return hub_snapshot(base, local_files_only=True).path, False
        except (ModelNotFoundError, OSError, ValueError):
            return None, False
    return None, False


_FELL_BACK: set[tuple[str, str | None]] = set()  # (base, adapter) llama.cpp failed to serve under `auto`


def runtime_of(svc: Services, base: str, adapter: str | None = None) -> str:
    """'llamacpp' or 'transformers': what serves this base (+ adapter) under the settings."""
    from loralab.services import llamacpp

    setting = svc.settings.serving_runtime
    if setting == "transformers":
        return "transformers"
    model_dir, known = _model_dir(svc, base)
    if setting == "auto" and (_fallback_key(model_dir or base), adapter) in _FELL_BACK:
        return "transformers"
    try:
        return llamacpp.runtime_for(setting, model_dir, known_llama=known)
    except llamacpp.RuntimeUnavailable as exc:
        raise Invalid(str(exc), code="runtime_unavailable", param="model") from None


def _llamacpp_job(svc: Services, base: str, adapter: str | None, param: str):
    def job():
        from loralab.engine.export import ExportError
        from loralab.engine.llamacpp import LlamaCppError
        from loralab.services import base_models, llamacpp

        resolved = base_models.resolve(svc, base, param)
        label = base_models._label(svc, base)
        try:
            worker = llamacpp.get_engine(svc.settings).worker(resolved.path, _llamacpp_tokenizer)
            worker.prepare(adapter)
            return worker
        except AdapterError as exc:
            raise Invalid(_shown(svc, str(exc)), code="bad_adapter", param="model") from None
        except (LlamaCppError, ExportError, OSError) as exc:
            log.exception("llama.cpp could not serve %s", label)
            raise RuntimeFailed(f"llama.cpp could not serve {label!r}: {_shown(svc, str(exc))}. Set "
                                "LORALAB_SERVING_RUNTIME=transformers to serve it with PyTorch instead",
                                param=param) from None
    return job


def _llamacpp_tokenizer(key: str):
    from loralab.data.template import ensure_chat_template
    from loralab.engine.models import load_tokenizer

    return ensure_chat_template(load_tokenizer(key))


def _shown(svc: Services, text: str) -> str:
    from loralab.runner.supervisor import shown_path

    return shown_path(text, svc.settings.home)


def _loaded_llamacpp(svc: Services, base: str, adapter: str | None):
    """The llama.cpp worker of a base when its child for `adapter` runs already (no executor, no wait)."""
    import os

    from loralab.services import llamacpp

    model_dir, _ = _model_dir(svc, base)
    worker = llamacpp.get_engine(svc.settings).loaded(os.path.realpath(model_dir)) if model_dir else None
    if worker is None:
        worker = llamacpp.get_engine(svc.settings).loaded(model_dir) if model_dir else None
    if worker is not None and any(k == adapter and s.alive() for k, s in worker.servers().items()):
        return worker
    return None


def _worker(svc: Services, base: str, adapter: str | None = None):
    """The worker that serves `base` (+ `adapter`) under the runtime setting, loaded on the bounded executor."""
    from loralab.services import base_models

    if runtime_of(svc, base, adapter) == "llamacpp":
        found = _loaded_llamacpp(svc, base, adapter)
        if found is not None:
            return found
        try:
            return base_models.wait_load(svc, ("llamacpp", base, adapter),
                                         _llamacpp_job(svc, base, adapter, "model"), "model")
        except RuntimeFailed:
            _fall_back(svc, base, adapter)
    return base_models.worker(svc, base)


def _fall_back(svc: Services, base: str, adapter: str | None) -> None:
    """Under `auto`, a model llama.cpp failed to build or start is served by transformers from now on."""
    if svc.settings.serving_runtime != "auto":
        raise
    log.warning("llama.cpp could not serve %s%s; serving it with transformers", _base_label(svc, base),
                f" + {Path(adapter).name}" if adapter else "")
    _FELL_BACK.add((_fallback_key(_model_dir(svc, base)[0] or base), adapter))


def _fallback_key(path: str) -> str:
    import os

    return os.path.realpath(path) if os.path.isabs(path) else path


async def worker_async(svc: Services, target: "Target", client: str | None = None):
    """_worker for async routes: awaited without holding a thread (per-client limit while loading)."""
    from starlette.concurrency import run_in_threadpool

    from loralab.services import base_models

    if await run_in_threadpool(runtime_of, svc, target.base, target.adapter) == "llamacpp":
        found = await run_in_threadpool(_loaded_llamacpp, svc, target.base, target.adapter)
        if found is not None:
            return found
        try:
            with base_models.client_slot(client):
                return await base_models.await_load(svc, ("llamacpp", target.base, target.adapter),
                                                    _llamacpp_job(svc, target.base, target.adapter, "model"), "model")
        except RuntimeFailed:
            _fall_back(svc, target.base, target.adapter)
    return await base_models.worker_async(svc, target.base, client)


def open_stream(svc: Services, base: str, adapter: str | None, inputs: list[dict[str, Any]],
                sampling: Sampling, n: int = 1) -> Stream:
    """Queue `n` choices per input ({messages}, {prompt} or {ids}) on the batching engine; choice i*n+j."""
    from jinja2 import TemplateError

    for attempt in range(3):
        worker = _worker(svc, base, adapter)
        prompts: list[list[int]] = []
        try:
            for item in inputs:
                ids = item["ids"] if "ids" in item else worker.encode(**item)
                prompts += [ids] * n
            seeds = [None if sampling.seed is None else sampling.seed + i % n for i in range(len(prompts))]
            return worker.submit(prompts, adapter, [replace(sampling, seed=seed) for seed in seeds])
        except WorkerClosed:
            if attempt == 2:
                raise
        except AdapterError as exc:
            raise Invalid(str(exc), code="bad_adapter", param="model") from None
        except PromptTooLong as exc:
            raise Invalid(str(exc), code="context_length_exceeded", param="messages") from None
        except (ValueError, TemplateError) as exc:  # empty or too long prompt, a template refusing the roles
            param = "messages" if "messages" in inputs[0] else "prompt"
            raise Invalid(str(exc), code="bad_prompt", param=param) from None
    raise AssertionError("unreachable")


def _sampling(spec: GenerateSpec) -> Sampling:
    return Sampling(max_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed,
                    stop=tuple(spec.stop), repetition_penalty=spec.repetition_penalty)


def target_of(svc: Services, request: GenerateRequest, subject: str | None = None) -> "Target":
    """Where a generate request goes (A/B arm, fine-tuned version or allowed base); nothing is loaded yet."""
    subject = request.user or subject
    if request.model and request.model.startswith(AB_PREFIX):
        return route_model(svc, request.model, subject)
    base, adapter, label = resolve_target(svc, request)
    return Target(base, adapter, label, request.model or label, subject=subject)


def _open(svc: Services, request: GenerateRequest, source: str = "api",
          subject: str | None = None, target: "Target | None" = None) -> tuple[Stream, "Recorder"]:
    if target is None:
        target = target_of(svc, request, subject)
    inputs = [_inputs(request)]
    stream = open_stream(svc, target.base, target.adapter, inputs, _sampling(request.sampling()))
    return stream, Recorder(svc, target, source, inputs)


def _inputs(request: GenerateRequest) -> dict[str, Any]:
    if request.messages is not None:
        return {"messages": [m.model_dump() for m in request.messages]}
    return {"prompt": request.prompt}


def generate_text(svc: Services, request: GenerateRequest, subject: str | None = None) -> dict[str, Any]:
    """One whole completion (batched with concurrent requests on the same base model), recorded with an id."""
    stream, recorder = _open(svc, request, "api", subject)
    done = stream.result()
    recorder.finish(stream, done)
    first = done[0]
    return {"id": recorder.id, "model": recorder.target.label, "text": first.text,
            "prompt_tokens": first.prompt_tokens, "completion_tokens": first.completion_tokens,
            "finish_reason": first.finish_reason, **recorder.ab_fields()}


async def generate_text_async(svc: Services, request: GenerateRequest, subject: str | None = None,
                              client: str | None = None) -> dict[str, Any]:
    """generate_text for async routes: the model loads on the bounded executor and no thread waits for tokens."""
    from starlette.concurrency import run_in_threadpool

    target = await run_in_threadpool(target_of, svc, request, subject)
    await worker_async(svc, target, client)
    stream, recorder = await run_in_threadpool(_open, svc, request, "api", subject, target)
    done = await stream.aresult()
    await run_in_threadpool(recorder.finish, stream, done)
    first = done[0]
    return {"id": recorder.id, "model": recorder.target.label, "text": first.text,
            "prompt_tokens": first.prompt_tokens, "completion_tokens": first.completion_tokens,
            "finish_reason": first.finish_reason, **recorder.ab_fields()}


async def stream_text_async(svc: Services, request: GenerateRequest, source: str = "api",
                            subject: str | None = None, client: str | None = None) -> "TextStream":
    """stream_text for async routes (iterate it with `async for piece in stream.aiter()`)."""
    from starlette.concurrency import run_in_threadpool

    target = await run_in_threadpool(target_of, svc, request, subject)
    await worker_async(svc, target, client)
    stream, recorder = await run_in_threadpool(_open, svc, request, source, subject, target)
    return await run_in_threadpool(TextStream, stream, recorder)  # records the open stream (a database write)


class TextStream:
    """Text pieces of one recorded generation; `id` is its generation id (recorded when the stream ends)."""

    def __init__(self, stream: Stream, recorder: "Recorder"):
        self.id, self.recorder, self._stream = recorder.id, recorder, stream
        recorder.start()
        self._pieces = self._run()

    def _run(self) -> Iterator[str]:
        completions: list[Completion] = []
        try:
            for event in self._stream:
                text = self._take(event, completions)
                if text is not None:
                    yield text
            self.recorder.finish(self._stream, completions)
        finally:
            self._end(completions)

    async def aiter(self):
        """The text pieces for async callers (no thread waits between pieces)."""
        completions: list[Completion] = []
        try:
            async for event in self._stream.aiter():
                text = self._take(event, completions)
                if text is not None:
                    yield text
            self.recorder.finish(self._stream, completions)
        finally:
            self._end(completions)

    def _take(self, event: Piece | Completion, completions: list[Completion]) -> str | None:
        """Record one event of the stream; the text to hand on for a piece, None for a completion."""
        if isinstance(event, Piece):
            self.recorder.piece(event)
            return event.text
        completions.append(event)
        return None

    def _end(self, completions: list[Completion]) -> None:
        self._stream.close()
        self.recorder.finish(self._stream, completions, interrupted=True)  # no-op after a normal end

    def cancel(self) -> None:
        """Stop generating and record what was sent (the client went away before or while reading)."""
        self._stream.close()
        self.recorder.finish(self._stream, [], interrupted=True)  # no-op after a normal end

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


def stream_text(svc: Services, request: GenerateRequest, source: str = "api",
                subject: str | None = None) -> TextStream:
    """Text pieces as they are generated (the model is loaded before the first piece, so errors come early)."""
    stream, recorder = _open(svc, request, source, subject)
    return TextStream(stream, recorder)


# ---- recording and A/B routing: every answer served gets a generation id -------------------------------------

@dataclass
class Target:
    """Where a request goes: base model, adapter, the label reported, and the A/B test arm that chose it."""

    base: str
    adapter: str | None
    label: str
    requested: str
    ab_test_id: str | None = None
    arm: str | None = None
    subject: str | None = None


def route_model(svc: Services, ref: str, subject: str | None = None) -> Target:
    """The target of an OpenAI-style `model` (see resolve_served_model), or of `ab:<name>` (an A/B test arm)."""
    ref = (ref or "").strip()
    if ref.startswith(AB_PREFIX):
        from loralab.services import abtests

        test, arm, arm_ref = abtests.route(svc, ref[len(AB_PREFIX):], subject)
        base, adapter, label = resolve_served_model(svc, arm_ref)
        return Target(base, adapter, label, ref, test.id, arm, subject)
    base, adapter, label = resolve_served_model(svc, ref)
    return Target(base, adapter, label, ref, subject=subject)


def _input_record(inputs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(inputs[0]) if len(inputs) == 1 else {"prompts": inputs}


class Recorder:
    """Writes one `generations` row when a served answer is complete (or cut short); its id goes to the client."""

    def __init__(self, svc: Services, target: Target, source: str, inputs: list[dict[str, Any]]):
        from loralab.store.repo import new_id

        self.svc, self.target, self.source = svc, target, source
        self.input = _input_record(inputs)
        self.id = new_id("gen")
        self._texts: dict[int, str] = {}
        self._done = self._started = False

    def ab_fields(self) -> dict[str, Any]:
        if self.target.ab_test_id is None:
            return {}
        return {"ab_test_id": self.target.ab_test_id, "arm": self.target.arm}

    def piece(self, piece: Piece) -> None:
        self._texts[piece.index] = self._texts.get(piece.index, "") + piece.text

    def start(self) -> None:
        """Record the generation as in progress (streams: feedback may come before the last piece)."""
        self._write(lambda store: store.add_generation(
            id=self.id, requested_model=self.target.requested[:300], model=self.target.label[:300],
            base_model=_base_label(self.svc, self.target.base)[:300], adapter=self.target.adapter,
            source=self.source, input=self.input, output="", outputs=[], prompt_hash=self._hash(),
            finish_reason=None, prompt_tokens=0, completion_tokens=0, ab_test_id=self.target.ab_test_id,
            arm=self.target.arm, subject=(self.target.subject or None) and self.target.subject[:200]))
        self._started = True

    def finish(self, stream: Stream, completions: list[Completion], interrupted: bool = False) -> None:
        """Store the answer once; a failure to record is logged, never turned into a failed request."""
        if self._done:
            return
        self._done = True
        by_index = {c.index: c for c in completions}
        count = max([*by_index, *self._texts, -1]) + 1
        outputs = [by_index[i].text if i in by_index else self._texts.get(i, "") for i in range(count)] or [""]
        reason = None if interrupted else (completions[0].finish_reason if completions else None)
        final = {"output": outputs[0], "outputs": outputs, "finish_reason": "cancelled" if interrupted else reason,
                 "prompt_tokens": stream.prompt_tokens,
                 "completion_tokens": sum(c.completion_tokens for c in completions)}
        if self._started:
            self._write(lambda store: store.finish_generation(self.id, **final))
            return
        self._write(lambda store: store.add_generation(
            id=self.id, requested_model=self.target.requested[:300], model=self.target.label[:300],
            base_model=_base_label(self.svc, self.target.base)[:300], adapter=self.target.adapter,
            source=self.source, input=self.input, prompt_hash=self._hash(), ab_test_id=self.target.ab_test_id,
            arm=self.target.arm, subject=(self.target.subject or None) and self.target.subject[:200], **final))

    def _hash(self) -> str:
        return hashlib.sha256(json.dumps(self.input, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _write(self, action) -> None:
        try:
            from loralab.store.feedback import FeedbackStore

            action(FeedbackStore(self.svc.db))
        except Exception:  # noqa: BLE001 - serving must not fail because the record could not be written
            log.exception("could not record generation %s", self.id)


def open_recorded(svc: Services, target: Target, inputs: list[dict[str, Any]], sampling: Sampling, n: int = 1,
                  source: str = "openai") -> tuple[Stream, Recorder]:
    """open_stream plus the recorder of this answer (the caller calls recorder.finish when it is complete)."""
    stream = open_stream(svc, target.base, target.adapter, inputs, sampling, n)
    return stream, Recorder(svc, target, source, inputs)


# ---- OpenAI-compatible serving: which names a client may ask for -------------------------------------------

STAGES = ("production", "staging", "draft", "archived")


def served_models(svc: Services) -> list[dict[str, Any]]:
    """What /v1/models lists: available base models, fine-tuned versions (ft-…), and names with a served version."""
    runtimes: dict[str, str] = {}

    def runtime(base: str) -> str:  # `runtime`: what would serve it now (llamacpp, transformers, or unavailable)
        if base not in runtimes:
            try:
                runtimes[base] = runtime_of(svc, base)
            except LoralabError:
                runtimes[base] = "unavailable"
        return runtimes[base]

    def served_base(row) -> str:
        return row.base_model if row.method != "full" else str(svc.settings.home / "registry" / row.id)

    out = [{"id": b["id"], "created": _created(svc.settings.models_dir / b["id"]), "owned_by": "loralab",
            "root": b["id"], "parent": None, "kind": "base", "runtime": runtime(b["id"])}
           for b in registry.base_models(svc) if b["available"]]
    groups: dict[str, list] = {}
    for row in svc.repo.list_models():  # ordered by name, newest version first
        base = _base_label(svc, row.base_model)
        out.append({"id": row.id, "created": int(row.created_at), "owned_by": "user", "root": base,
                    "parent": base, "kind": "fine_tuned", "name": row.name, "version": row.version,
                    "stage": row.stage, "deployed": row.deployed, "runtime": runtime(served_base(row))})
        groups.setdefault(row.name, []).append(row)
    names = {name: _named_version(rows, "") for name, rows in groups.items()}
    for name, row in names.items():
        if row is not None:
            out.append({"id": name, "created": int(row.created_at), "owned_by": "user",
                        "root": _base_label(svc, row.base_model), "parent": row.id, "kind": "deployed",
                        "name": name, "version": row.version, "stage": row.stage, "deployed": row.deployed,
                        "runtime": runtime(served_base(row))})
    return out


def resolve_served_model(svc: Services, ref: str) -> tuple[str, str | None, str]:
    """(base, adapter, label) for an OpenAI `model`: ft-id, name[:version or :stage], production, or a base."""
    from loralab.store.errors import NotFound

    ref = (ref or "").strip()
    if ID_PATTERNS["model"].fullmatch(ref):
        return _version_target(svc, svc.repo.get_model(ref))
    name, _, qualifier = ref.partition(":")
    rows = svc.repo.list_models(name) if name else []
    if rows:
        row = _named_version(rows, qualifier)
        if row is None:
            raise NotFound(f"model {ref!r}: no such version of {name!r}. Use {name} (its deployed version), "
                           f"{name}:<version number>, {name}:<stage> ({', '.join(STAGES)}) or an ft-… id",
                           code="model_not_found", param="model")
        return _version_target(svc, row)
    if ref == "production":
        return _version_target(svc, _the_deployed(svc))
    if not qualifier and any(b["id"] == ref and b["available"] for b in registry.base_models(svc)):
        return check_base_model(svc, ref), None, ref
    raise NotFound(f"the model {ref!r} does not exist; GET /v1/models lists the models served here",
                   code="model_not_found", param="model")


def _named_version(rows: list, qualifier: str):
    """The version of a name a qualifier picks: '' = deployed (else production), N = version N, a stage, latest."""
    if qualifier == "":
        return next((r for r in rows if r.deployed), None) or next((r for r in rows if r.stage == "production"), None)
    if qualifier == "latest":
        return rows[0] if rows else None  # newest first
    if qualifier.isdigit():
        return next((r for r in rows if r.version == int(qualifier)), None)
    return next((r for r in rows if r.stage == qualifier), None)


def _the_deployed(svc: Services):
    """`production`: the one deployed version (or the one production-stage version) across all names."""
    from loralab.store.errors import NotFound

    rows = svc.repo.list_models()
    for candidates in ([r for r in rows if r.deployed], [r for r in rows if r.stage == "production"]):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise Invalid("'production' is ambiguous: several model names are deployed ("
                          + ", ".join(sorted({r.name for r in candidates})) + "); give the model name instead",
                          code="ambiguous_model", param="model")
    raise NotFound("no model version is deployed: deploy one (POST /api/models/{id}/deploy) or give an ft-… id",
                   code="model_not_found", param="model")


def _base_label(svc: Services, base: str) -> str:
    try:
        return str(Path(base).relative_to(svc.settings.models_dir))
    except ValueError:
        return base


def _created(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0
