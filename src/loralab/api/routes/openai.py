"""OpenAI-compatible serving under /v1: models, chat completions and completions, whole or streamed (SSE)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from loralab.api.deps import get_services, require_token
from loralab.services import base_models, serving
from loralab.services.context import Services
from loralab.services.errors import LoralabError
from loralab.services.inference import Completion, Piece, Sampling, Stream

log = logging.getLogger(__name__)

CHAT_MAX_TOKENS = 512  # default when a chat request names no limit (capped by the model's context)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 8
MAX_STOPS = 4  # as OpenAI allows
MAX_STOP_CHARS = 256
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_CHOICES = 64  # prompts x n: rows one request may queue
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 200_000  # one message, prompt or content part
MAX_PROMPT_IDS = 32_768  # token ids of one prompt given as ids
SESSION_HEADER = "x-session-id"  # sticky A/B arm when the request has no `user`


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _from_exception(exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        problems = exc.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return openai_error(400, "the request body is not valid JSON: send a JSON object "
                                f"({first.get('ctx', {}).get('error', 'parse error')})", code="invalid_json")
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                            for e in problems[:5])
        return openai_error(400, f"invalid request: {message}", param=param, code="invalid_value")
    if isinstance(exc, StarletteHTTPException):  # FastAPI's HTTPException too; 400 = a body that cannot be parsed
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            return openai_error(400, "the request body cannot be read: send a UTF-8 JSON object", code="invalid_json")
        code = "invalid_api_key" if exc.status_code == 401 else None
        return openai_error(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
    if isinstance(exc, LoralabError):
        status = 404 if exc.code == "model_not_found" else 400 if exc.status == 422 else exc.status
        return openai_error(status, exc.message, param=exc.param, code=exc.code, headers=getattr(exc, "headers", None))
    log.exception("OpenAI-compatible request failed")
    return openai_error(500, f"the server failed to generate: {exc}", code="server_error")


class OpenAIRoute(APIRoute):
    """A route whose errors (auth, validation, service) come back in OpenAI's error shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except Exception as exc:  # every failure becomes an OpenAI error body
                return _from_exception(exc)

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(require_token)])


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use are accepted and ignored


class StreamOptions(_Open):
    include_usage: bool | None = None


class ContentPart(_Open):
    type: str = Field(max_length=64)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | Annotated[list[ContentPart], Field(max_length=64)] \
        | None = None
    name: str | None = Field(None, max_length=256)


class _Request(_Open):
    model: str = Field(min_length=1, max_length=300, description="A base model, an ft-… id, a model name (its deployed version), "
                                                 "name:<version|stage>, or production.")
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"give at most {MAX_STOPS} stop sequences of at most {MAX_STOP_CHARS} characters each")
        return value


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _bounded_prompt(cls, value):
        if isinstance(value, str):
            prompts = [value]
        elif value and all(isinstance(p, int) for p in value):
            prompts = [value]
        else:
            prompts = value
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"give at most {MAX_PROMPTS} prompts in one request (got {len(prompts)})")
        for prompt in prompts:
            if isinstance(prompt, str) and len(prompt) > MAX_TEXT_CHARS:
                raise ValueError(f"a prompt may have at most {MAX_TEXT_CHARS} characters")
            if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_IDS:
                raise ValueError(f"a prompt may have at most {MAX_PROMPT_IDS} token ids")
        return value
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


def _unsupported(param: str, what: str) -> LoralabError:
    return LoralabError(f"{what} is not supported by this server (`{param}`)", code="unsupported_parameter",
                        param=param)


def _sampling(body: _Request, max_tokens: int | None, default_max: int) -> Sampling:
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return Sampling(max_tokens=max_tokens or default_max,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                    stop=tuple(s for s in stops if s), frequency_penalty=body.frequency_penalty or 0.0,
                    presence_penalty=body.presence_penalty or 0.0)


def _chat_messages(body: ChatRequest) -> list[dict[str, str]]:
    if body.logprobs:
        raise _unsupported("logprobs", "logprobs")
    if body.tools:
        raise _unsupported("tools", "tool calling")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "structured output")
    out = []
    for i, message in enumerate(body.messages):
        if message.role == "tool":
            raise _unsupported(f"messages.{i}.role", "the tool role")
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise _unsupported(f"messages.{i}.content", "non-text content (images, audio, files)")
            content = "\n".join(part.text or "" for part in content)
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    return out


def _completion_inputs(body: CompletionRequest) -> list[dict[str, Any]]:
    if body.echo:
        raise _unsupported("echo", "echo")
    if body.suffix:
        raise _unsupported("suffix", "suffix (fill-in-the-middle)")
    if body.best_of not in (None, 1):
        raise _unsupported("best_of", "best_of")
    if body.logprobs:
        raise _unsupported("logprobs", "logprobs")
    prompt = body.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise LoralabError("prompt is empty", code="invalid_value", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"ids": list(prompt)}]
    return [{"prompt": p} if isinstance(p, str) else {"ids": list(p)} for p in prompt]


def _usage(stream: Stream, completions: list[Completion]) -> dict[str, int]:
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": stream.prompt_tokens + completion_tokens}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(stream: Stream, head: dict[str, Any], count: int, first: Callable[[int], dict] | None,
                  piece: Callable[[Piece], dict], end: Callable[[Completion], dict], include_usage: bool,
                  recorder: serving.Recorder) -> AsyncIterator[str]:
    """SSE lines: an opening chunk per choice (chat), content chunks, a closing chunk per choice, usage, [DONE].
    Every chunk's `id` is the generation id; the answer is recorded before [DONE], so feedback can follow it."""
    completions: list[Completion] = []
    try:
        if first is not None:
            for index in range(count):
                yield _sse({**head, "choices": [first(index)]})
        async for event in stream.aiter():
            if isinstance(event, Piece):
                recorder.piece(event)
                yield _sse({**head, "choices": [piece(event)]})
            else:
                completions.append(event)
                yield _sse({**head, "choices": [end(event)]})
        await run_in_threadpool(recorder.finish, stream, completions)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(stream, completions)})
    except Exception as exc:  # after the 200 the error can only travel in the stream
        log.exception("streamed generation failed")
        yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                              "code": "server_error"}})
    finally:
        stream.close()
        recorder.finish(stream, completions, interrupted=True)  # no-op when already recorded
    yield _sse("[DONE]")


def _streaming(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/models")
def list_models(svc: Services = Depends(get_services)):
    """Models a client can name: base models, fine-tuned versions (ft-…) and names with a deployed version."""
    return {"object": "list", "data": [{"object": "model", **m} for m in serving.served_models(svc)]}


@router.get("/models/{model_id}")
def get_model(model_id: str, svc: Services = Depends(get_services)):
    for model in serving.served_models(svc):
        if model["id"] == model_id:
            return {"object": "model", **model}
    return openai_error(404, f"the model {model_id!r} does not exist; GET /v1/models lists them",
                        param="model", code="model_not_found")


def _subject(body: _Request, request: Request) -> str | None:
    """Who is asking, for sticky A/B arms: the OpenAI `user` field, else the X-Session-Id header."""
    return body.user or request.headers.get(SESSION_HEADER) or None


def _head(recorder: serving.Recorder, body: _Request, target: serving.Target) -> dict[str, Any]:
    head = {"id": recorder.id, "created": int(time.time()), "model": body.model,
            "system_fingerprint": target.label}
    if target.ab_test_id:
        head["ab_test"] = {"id": target.ab_test_id, "arm": target.arm, "model": target.label}
    return head


async def _open(svc: Services, body: _Request, request: Request, inputs: list[dict[str, Any]],
                sampling: Sampling, count: int) -> tuple[Stream, serving.Recorder, serving.Target]:
    """Route the model, load it on the bounded executor (awaited: no thread waits), then queue the rows."""
    if count * len(inputs) > MAX_CHOICES:
        raise LoralabError(f"prompts x n is {count * len(inputs)}; one request may ask for at most {MAX_CHOICES} "
                           "completions", code="invalid_value", param="n")
    target = await run_in_threadpool(serving.route_model, svc, body.model, _subject(body, request))
    await serving.worker_async(svc, target, base_models.client_of(request))  # the runtime's worker
    stream, recorder = await run_in_threadpool(serving.open_recorded, svc, target, inputs, sampling, count)
    return stream, recorder, target


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, svc: Services = Depends(get_services)):
    """Chat completion with any base model, fine-tuned adapter or `ab:<test>`; `stream: true` for SSE chunks."""
    messages = _chat_messages(body)
    sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, CHAT_MAX_TOKENS)
    count = body.n or 1
    stream, recorder, target = await _open(svc, body, request, [{"messages": messages}], sampling, count)
    head = _head(recorder, body, target)
    if not body.stream:
        completions = await stream.aresult()
        await run_in_threadpool(recorder.finish, stream, completions)
        return {**head, "object": "chat.completion", "usage": _usage(stream, completions), "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
             "logprobs": None, "finish_reason": c.finish_reason} for c in completions]}
    head["object"] = "chat.completion.chunk"
    await run_in_threadpool(recorder.start)  # the id is known to the client from the first chunk: feedback may arrive before the end
    return _streaming(_events(
        stream, head, count,
        lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
        lambda p: {"index": p.index, "delta": {"content": p.text}, "logprobs": None, "finish_reason": None},
        lambda c: {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason},
        bool(body.stream_options and body.stream_options.include_usage), recorder))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, svc: Services = Depends(get_services)):
    """Raw-text completion (no chat template) for one prompt or several; `stream: true` for SSE chunks."""
    inputs = _completion_inputs(body)
    sampling = _sampling(body, body.max_tokens, COMPLETION_MAX_TOKENS)
    count = body.n or 1
    stream, recorder, target = await _open(svc, body, request, inputs, sampling, count)
    head = {**_head(recorder, body, target), "object": "text_completion"}
    if not body.stream:
        done = await stream.aresult()
        await run_in_threadpool(recorder.finish, stream, done)
        return {**head, "usage": _usage(stream, done), "choices": [
            {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason} for c in done]}
    await run_in_threadpool(recorder.start)
    return _streaming(_events(
        stream, head, count * len(inputs), None,
        lambda p: {"index": p.index, "text": p.text, "logprobs": None, "finish_reason": None},
        lambda c: {"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish_reason},
        bool(body.stream_options and body.stream_options.include_usage), recorder))


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def unknown_url(path: str, request: Request):
    """Other OpenAI endpoints (embeddings, files, ...) are not served: say so in OpenAI's error shape."""
    return openai_error(404, f"Invalid URL ({request.method} /v1/{path}): this server serves /v1/models, "
                             "/v1/chat/completions and /v1/completions", code="unknown_url")
