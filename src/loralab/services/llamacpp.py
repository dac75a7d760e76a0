"""The llama.cpp serving runtime behind the same worker interface as services/inference.py (`encode`, `submit`).

A base model (or a fully fine-tuned version) is written once as a GGUF file under LORALAB_HOME/gguf-cache; a LoRA
version is merged into its base and written the same way (`<ft-id>-<quant>.gguf`). Each GGUF is served by a
llama.cpp server child (engine/llamacpp.py) that batches every request on it; prompts are token ids from loralab's
own tokenizer and chat template, so answers, stop strings, `gen-...` records and feedback go through serving.py
exactly as with the transformers runtime. Which runtime serves a model: `runtime_for` (LORALAB_SERVING_RUNTIME).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

from loralab.engine import llamacpp as runtime
from loralab.services.inference import (AdapterError, Completion, Piece, Sampling, Stream, WorkerClosed,
                                       check_adapter, prompt_room)

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "transformers", "llamacpp")
MAX_SERVERS = 3  # llama.cpp children per base model (the base and recent adapters), least recently used stopped
STREAM_LIMITS = dict(max_connections=512, max_keepalive_connections=64)


class RuntimeUnavailable(ValueError):
    """LORALAB_SERVING_RUNTIME=llamacpp, but llama.cpp cannot serve this model here."""


@lru_cache(maxsize=1)
def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def runtime_for(setting: str, model_dir: str | os.PathLike[str] | None, *, known_llama: bool = False) -> str:
    """'llamacpp' or 'transformers' for a model directory under a LORALAB_SERVING_RUNTIME value.

    auto: llama.cpp on a CPU-only host when it is installed and the architecture is one the GGUF writer supports;
    transformers otherwise (GPUs, other architectures). `known_llama`: the embedded model before its conversion.
    """
    if setting not in RUNTIMES:
        raise RuntimeUnavailable(f"LORALAB_SERVING_RUNTIME must be one of {', '.join(RUNTIMES)}, got {setting!r}")
    if setting == "transformers":
        return "transformers"
    supported = known_llama or (model_dir is not None and runtime.supports(model_dir))
    if setting == "llamacpp":
        if not runtime.available():
            raise RuntimeUnavailable("LORALAB_SERVING_RUNTIME=llamacpp but llama.cpp is not installed: "
                                     "pip install 'loralab[llamacpp]', or set LORALAB_SERVING_RUNTIME=auto")
        if not supported:
            kind = runtime.model_type(model_dir) if model_dir is not None else None
            raise RuntimeUnavailable(f"llama.cpp cannot serve this model (architecture {kind!r}; supported: "
                                     "llama, mistral, qwen2): set LORALAB_SERVING_RUNTIME=auto or transformers")
        return "llamacpp"
    return "llamacpp" if supported and runtime.available() and not _has_gpu() else "transformers"


def gguf_name(home: Path, model_dir: str, adapter: str | None, quantization: str) -> str:
    """The cache file name of a served model: `<ft-id>-<quant>.gguf` for registry versions, else the base's name
    and a hash of where it is and when its files changed (a replaced base gets a new file)."""
    source = Path(adapter or model_dir)
    registry = (home / "registry").resolve()
    if source.resolve().parent == registry:
        return f"{source.name}-{quantization}.gguf"
    stamp = [str(source.resolve())]
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"):
        with_stat = source / name
        if with_stat.is_file():
            info = with_stat.stat()
            stamp.append(f"{name}:{info.st_size}:{info.st_mtime_ns}")
    digest = hashlib.sha1("|".join(stamp).encode()).hexdigest()[:12]
    prefix = "adapter" if adapter else "base"
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in source.name)[:64]
    return f"{prefix}-{label}-{digest}-{quantization}.gguf"


# ---- the event loop every llama.cpp stream runs on ---------------------------------------------------------------

class _Loop:
    """One asyncio loop thread with one HTTP client: each row is a task streaming from its llama.cpp child."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="loralab-llamacpp")
        self.thread.start()
        self.client = asyncio.run_coroutine_threadsafe(self._client(), self.loop).result()

    @staticmethod
    async def _client():
        import httpx

        return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(**STREAM_LIMITS))


_LOOP: _Loop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> _Loop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _Loop()
        return _LOOP


class _Row:
    """One sequence sent to llama.cpp; setting `cancelled` (Stream.close) cancels its task and so its request."""

    def __init__(self, index: int, prompt_ids: list[int], sampling: Sampling, max_tokens: int, out: queue.Queue):
        self.index, self.prompt_ids, self.sampling, self.max_tokens, self.out = index, prompt_ids, sampling, \
            max_tokens, out
        self.future = None
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self._cancelled = value
        if value and self.future is not None:
            self.future.cancel()  # thread-safe: cancels the task on the loop; closing the request stops the slot


class _Child:
    """A running llama.cpp server and the rows streaming from it (a child with rows is never stopped)."""

    def __init__(self, server: runtime.LlamaServer):
        self.server, self.active = server, 0


class LlamaCppWorker:
    """One base model served by llama.cpp: its tokenizer, and a server child per adapter (None = the base)."""

    runtime = "llamacpp"

    def __init__(self, key: str, tokenizer: Any, *, home: Path, quantization: str = "q8_0", parallel: int = 8,
                 threads: int = 0, context: int = 0, env: dict[str, str] | None = None,
                 max_servers: int = MAX_SERVERS):
        self.key, self.tokenizer, self.home = key, tokenizer, Path(home)
        self.quantization, self.parallel, self.threads, self.env = quantization, parallel, threads, env
        self.max_servers = max_servers
        self.tokenizer_lock = threading.Lock()
        config = _config(key)
        model_context = int(config.get("max_position_embeddings") or 4096)
        self.context = min(context, model_context) if context > 0 else model_context
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        self.vocab_size = int(vocab or len(tokenizer))
        self._children: OrderedDict[str | None, _Child] = OrderedDict()
        self._lock = threading.Lock()
        self._starting: dict[str | None, threading.Lock] = {}
        self._closed = False

    # ---- the same interface as inference.BaseWorker ---------------------------------------------------------------

    def encode(self, *, messages: list[dict] | None = None, prompt: str | None = None) -> list[int]:
        """Token ids of a chat (template + generation prompt) or of a raw prompt (no special tokens added)."""
        from loralab.engine.generate import build_prompt

        with self.tokenizer_lock:
            text = build_prompt(self.tokenizer, messages, prompt)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, prompts: list[list[int]], adapter: str | None, samplings: list[Sampling]) -> Stream:
        """Send one request per (prompt, sampling) to the adapter's llama.cpp child; events arrive on the stream."""
        out: queue.Queue = queue.Queue()
        rows = []
        for index, (ids, sampling) in enumerate(zip(prompts, samplings, strict=True)):
            room = prompt_room(ids, self.vocab_size, self.context)
            rows.append(_Row(index, ids, sampling, min(sampling.max_tokens, room), out))
        child = self.child(adapter, reserve=len(rows))
        unique = {tuple(r.prompt_ids) for r in rows}
        stream = Stream(rows, out, sum(len(p) for p in unique))
        loop = _event_loop()
        for row in rows:
            row.future = asyncio.run_coroutine_threadsafe(self._run(loop.client, child, row), loop.loop)
            row.future.add_done_callback(lambda _f, c=child: self._release(c))
        return stream

    def close(self) -> None:
        """Stop every child (rows in flight end with an error)."""
        with self._lock:
            self._closed = True
            children, self._children = list(self._children.values()), OrderedDict()
        for child in children:
            child.server.close()

    # ---- children ----------------------------------------------------------------------------------------------

    def prepare(self, adapter: str | None) -> None:
        """Build the GGUF and start its child now (the loading executor calls this), not on the first request."""
        self.child(adapter)

    def child(self, adapter: str | None, reserve: int = 0) -> _Child:
        """The running child of an adapter (None = base): built (GGUF) and started once, restarted if it died.
        `reserve` rows are counted as streaming from it (it is not stopped until they are released)."""
        if adapter is not None:
            check_adapter(adapter)
        with self._lock:
            if self._closed:
                raise WorkerClosed(f"{self.key} was unloaded; retry the request")
            found = self._children.get(adapter)
            if found is not None and found.server.alive():
                self._children.move_to_end(adapter)
                found.active += reserve
                return found
            starting = self._starting.setdefault(adapter, threading.Lock())
        with starting:
            with self._lock:
                found = self._children.get(adapter)
                if found is not None and found.server.alive():
                    found.active += reserve
                    return found
            if found is not None:
                log.warning("llama.cpp server for %s exited (%s); restarting it", Path(found.server.gguf).name,
                            found.server.log_tail()[-300:])
                found.server.close()
            try:
                gguf = runtime.build_gguf(adapter or self.key, self.gguf_path(adapter), self.quantization,
                                          base_model=self.key if adapter else None)
            except Exception as exc:
                if adapter is not None:
                    raise AdapterError(f"cannot serve adapter {Path(adapter).name} with llama.cpp: {exc}") from None
                raise
            server = runtime.LlamaServer(gguf, context=self.context, parallel=self.parallel, threads=self.threads,
                                         env=self.env)
            child = _Child(server)
            child.active = reserve
            with self._lock:
                self._children[adapter] = child
                self._children.move_to_end(adapter)
                stop = [k for k, c in self._children.items() if c.active == 0 and k != adapter]
                while len(self._children) > self.max_servers and stop:
                    self._children.pop(stop.pop(0)).server.close()
            return child

    def gguf_path(self, adapter: str | None) -> Path:
        return self.home / "gguf-cache" / gguf_name(self.home, self.key, adapter, self.quantization)

    def servers(self) -> dict[str | None, runtime.LlamaServer]:
        with self._lock:
            return {k: c.server for k, c in self._children.items()}

    # ---- one row ---------------------------------------------------------------------------------------------

    async def _run(self, client, child: _Child, row: _Row) -> None:
        """Stream one row from llama.cpp into its queue: pieces, then a Completion (or an error)."""
        s = row.sampling
        body = runtime.request_body(
            row.prompt_ids, max_tokens=row.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            stop=s.stop, repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty, penalty_tokens=self.context)
        text, tokens, reason = "", 0, "length"
        try:
            async with client.stream("POST", child.server.url + "/completion", json=body,
                                     headers=child.server.headers()) as response:
                if response.status_code != 200:
                    raise RuntimeError(_error_text(await response.aread(), response.status_code))
                async for event in _events(response):
                    if "error" in event:
                        raise RuntimeError(_error_text(json.dumps(event).encode(), 500))
                    piece = event.get("content") or ""
                    if piece:
                        text += piece
                        row.out.put(Piece(row.index, piece))
                    if event.get("stop"):
                        tokens = int(event.get("tokens_predicted") or 0)
                        reason = "length" if event.get("stop_type") in ("limit", "none", None) else "stop"
                        break
            row.out.put(Completion(row.index, text, len(row.prompt_ids), tokens, reason))
        except asyncio.CancelledError:
            pass  # the client went away: closing the request freed the slot
        except Exception as exc:  # noqa: BLE001 - this row fails; the others and the child carry on
            alive = child.server.alive()
            row.out.put(RuntimeError(f"generation failed: {exc}" if alive else
                                     "generation failed: the llama.cpp server stopped; retry the request"))

    def _release(self, child: _Child) -> None:
        with self._lock:
            child.active -= 1


async def _events(response):
    async for line in response.aiter_lines():
        for event in runtime.iter_sse([line]):
            yield event


def _error_text(raw: bytes, status: int) -> str:
    try:
        error = json.loads(raw).get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = raw[:300].decode(errors="replace")
    return f"llama.cpp answered {status}: {message}"


def _config(model_dir: str) -> dict[str, Any]:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---- the process-wide set of llama.cpp workers ----------------------------------------------------------------------

class LlamaCppEngine:
    """llama.cpp workers keyed by resolved base path, least recently used closed beyond `max_bases`."""

    def __init__(self, max_bases: int = 2, **worker_options: Any):
        self.max_bases, self.worker_options = max_bases, worker_options
        self._lock = threading.Lock()
        self._workers: OrderedDict[str, LlamaCppWorker] = OrderedDict()

    def loaded(self, key: str) -> LlamaCppWorker | None:
        with self._lock:
            worker = self._workers.get(key)
            if worker is not None:
                self._workers.move_to_end(key)
            return worker

    def worker(self, key: str, tokenizer_loader) -> LlamaCppWorker:
        """The worker of a resolved base path (its tokenizer loaded once by `tokenizer_loader`)."""
        with self._lock:
            if key in self._workers:
                self._workers.move_to_end(key)
                return self._workers[key]
        worker = LlamaCppWorker(key, tokenizer_loader(key), **self.worker_options)
        with self._lock:
            if key in self._workers:  # another thread made it meanwhile
                return self._workers[key]
            self._workers[key] = worker
            while len(self._workers) > self.max_bases:
                self._workers.popitem(last=False)[1].close()
        return worker

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.values()), OrderedDict()
        for worker in workers:
            worker.close()


_ENGINE: LlamaCppEngine | None = None
_ENGINE_OPTIONS: tuple | None = None
_ENGINE_LOCK = threading.Lock()


def get_engine(settings) -> LlamaCppEngine:
    """The process-wide llama.cpp engine for these settings (rebuilt when they change)."""
    global _ENGINE, _ENGINE_OPTIONS
    from loralab.runner.supervisor import engine_env

    options = (settings.generate_cache_size, str(settings.home), settings.llamacpp_quantization,
               settings.llamacpp_parallel, settings.llamacpp_threads, settings.llamacpp_context)
    with _ENGINE_LOCK:
        if _ENGINE is None or _ENGINE_OPTIONS != options:
            if _ENGINE is not None:
                _ENGINE.close()
            env = {k: v for k, v in engine_env().items() if k != "LD_PRELOAD"}  # llama.cpp allocates itself
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                              env.get("PYTHONPATH")]))
            _ENGINE = LlamaCppEngine(settings.generate_cache_size, home=settings.home,
                                     quantization=settings.llamacpp_quantization, parallel=settings.llamacpp_parallel,
                                     threads=settings.llamacpp_threads, context=settings.llamacpp_context, env=env)
            _ENGINE_OPTIONS = options
        return _ENGINE


def shutdown_engine() -> None:
    """Stop every llama.cpp child (tests, benchmarks, server shutdown)."""
    global _ENGINE, _ENGINE_OPTIONS
    with _ENGINE_LOCK:
        if _ENGINE is not None:
            _ENGINE.close()
        _ENGINE, _ENGINE_OPTIONS = None, None
