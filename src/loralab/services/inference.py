"""Multi-adapter inference: one model per base, LoRA adapters switched per row, continuous batching with a KV cache."""
from __future__ import annotations

import hashlib
import json
import queue
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed-adapter batch
MAX_BATCH = 16  # rows decoded together by one base worker
MAX_ADAPTERS = 8  # LoRA adapters kept attached to one base (least recently used detached)
BATCH_WINDOW_S = 0.005  # an idle worker waits this long for more requests before its first forward
PREFILL_TOKENS = 4096  # padded prompt tokens prefilled in one forward (bounds memory and the stall of running rows)


class AdapterError(ValueError):
    """An adapter directory that cannot be served (missing, not LoRA)."""


class PromptTooLong(ValueError):
    """A prompt that leaves no room for a generated token in the model's context."""


class WorkerClosed(RuntimeError):
    """The base model was unloaded (least recently used) between lookup and submit: look it up again."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one row; rows with different settings share a batch."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass
class Piece:
    index: int
    text: str


@dataclass
class Completion:
    index: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length"


class _Row:
    """One sequence being generated: its prompt, settings, tokens so far and where its events go."""

    def __init__(self, index: int, prompt_ids: list[int], adapter: str | None, sampling: Sampling,
                 max_tokens: int, out: queue.Queue):
        self.index, self.prompt_ids, self.adapter, self.sampling = index, prompt_ids, adapter, sampling
        self.max_tokens, self.out = max_tokens, out
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.done = self.cancelled = False
        self._generator = None

    def generator(self, device):
        """The row's own seeded generator, on the device its logits are on (multinomial needs them together)."""
        import torch

        if self._generator is None:
            seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator


class Stream:
    """The events of one request: `Piece`s as text arrives, then one `Completion` per choice."""

    def __init__(self, rows: list[_Row], out: queue.Queue, prompt_tokens: int):
        self._rows, self._out, self.prompt_tokens = rows, out, prompt_tokens
        self._left = len(rows)

    def __iter__(self) -> Iterator[Piece | Completion]:
        while self._left:
            item = self._out.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            if isinstance(item, Completion):
                self._left -= 1
            yield item

    def result(self) -> list[Completion]:
        """Wait for every choice; completions ordered by index."""
        return sorted((e for e in self if isinstance(e, Completion)), key=lambda c: c.index)

    async def aiter(self) -> AsyncIterator[Piece | Completion]:
        """The same events for async callers: polls the queue, so no thread waits while rows are generated."""
        import asyncio

        delay = 0.001
        while self._left:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
                continue
            delay = 0.001
            if isinstance(item, BaseException):
                self.close()
                raise item
            if isinstance(item, Completion):
                self._left -= 1
            yield item

    async def aresult(self) -> list[Completion]:
        """result() without holding a thread."""
        return sorted([e async for e in self.aiter() if isinstance(e, Completion)], key=lambda c: c.index)

    def close(self) -> None:
        """Stop generating (the client went away); the worker drops the rows at its next step."""
        for row in self._rows:
            row.cancelled = True


def prompt_room(ids: list[int], vocab_size: int, context: int) -> int:
    """Tokens left for the answer after prompt `ids`; ValueError/PromptTooLong for an empty, foreign or too long one."""
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) for this model")
    room = context - len(ids)
    if room < 1:
        raise PromptTooLong(f"the prompt has {len(ids)} tokens but this model's context holds {context}: "
                            "shorten the messages")
    return room


def check_adapter(path: str) -> None:
    """Refuse a directory that is not a PEFT LoRA adapter before it reaches the worker."""
    config = Path(path) / "adapter_config.json"
    try:
        peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError):
        raise AdapterError(f"{path} is not a LoRA adapter directory (no readable adapter_config.json)") from None
    if peft_type != "LORA":
        raise AdapterError(f"{path} holds a {peft_type} adapter; only LoRA adapters are served")


def _stop_cut(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index of the earliest stop string in text (searching from `start`), or -1."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of text can be sent: hold back a partial UTF-8 character and a possible start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return end - hold


class BaseWorker:
    """One loaded base model, its attached adapters and the scheduler thread that batches every request on it."""

    def __init__(self, key: str, model: Any, tokenizer: Any, *, max_adapters: int = MAX_ADAPTERS,
                 max_batch: int = MAX_BATCH, window_s: float = BATCH_WINDOW_S, placement: Any = None):
        self.key, self.model, self.tokenizer = key, model, tokenizer
        self.placement = placement  # the engine.hardware.InferencePlacement it was loaded with (None: unknown)
        # Inputs, masks, positions and fed-back tokens go where the input embeddings are (the first GPU of a
        # device map); each KV cache layer stays on its layer's device.
        from loralab.engine.generate import input_device

        self.device = input_device(model)
        self.max_adapters, self.max_batch, self.window_s = max_adapters, max_batch, window_s
        self.peft = None  # the PeftModel wrapper, once the first adapter is attached
        self.adapters: OrderedDict[str, str] = OrderedDict()  # adapter dir -> PEFT adapter name
        self._active: str | None = None
        self.tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent use from several threads
        self._cond = threading.Condition()
        self._pending: deque[_Row] = deque()
        self._closed = False
        self._rows: list[_Row] = []
        self._cache = self._mask = None
        config = model.config
        self.context = getattr(config, "max_position_embeddings", None) or 1 << 30
        eos = {tokenizer.eos_token_id}
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_ids = {e for e in eos if e is not None}
        self.vocab_size = getattr(config.get_text_config(), "vocab_size", None) or len(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad or 0
        self.steps = 0  # forward passes run (prefill + decode), for tests and benchmarks
        self.max_rows_seen = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"loralab-infer-{Path(key).name}")
        self._thread.start()

    # ---- request side (any thread) -------------------------------------------------------------

    def encode(self, *, messages: list[dict] | None = None, prompt: str | None = None) -> list[int]:
        """Token ids of a chat (template + generation prompt) or of a raw prompt (no special tokens added)."""
        from loralab.engine.generate import build_prompt

        with self.tokenizer_lock:
            text = build_prompt(self.tokenizer, messages, prompt)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, prompts: list[list[int]], adapter: str | None, samplings: list[Sampling]) -> Stream:
        """Queue one row per (prompt, sampling); events of all of them arrive on the returned stream."""
        if adapter is not None:
            check_adapter(adapter)
        out: queue.Queue = queue.Queue()
        rows = []
        for index, (ids, sampling) in enumerate(zip(prompts, samplings, strict=True)):
            room = prompt_room(ids, self.vocab_size, self.context)
            rows.append(_Row(index, ids, adapter, sampling, min(sampling.max_tokens, room), out))
        unique = {tuple(r.prompt_ids) for r in rows}
        stream = Stream(rows, out, sum(len(p) for p in unique))
        with self._cond:
            if self._closed:
                raise WorkerClosed(f"{self.key} was unloaded; retry the request")
            self._pending.extend(rows)
            self._cond.notify()
        return stream

    def close(self) -> None:
        """Finish the rows in flight, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    # ---- scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        while True:
            with self._cond:
                while not self._pending and not self._rows and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending and not self._rows:
                    return
                if not self._rows:  # idle: give concurrent requests a moment to arrive together
                    deadline = time.monotonic() + self.window_s
                    while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                new: list[_Row] = []
                longest = 0
                while self._pending and len(self._rows) + len(new) < self.max_batch:
                    row = self._pending[0]
                    size = max(longest, len(row.prompt_ids)) * (len(new) + 1)
                    if new and size > PREFILL_TOKENS:
                        break  # the rest join at the next step
                    self._pending.popleft()
                    if not row.cancelled:
                        new.append(row)
                        longest = max(longest, len(row.prompt_ids))
            try:
                with torch.inference_mode():
                    if new:
                        self._admit(new)
                    self._drop_finished()
                    if self._rows:
                        self._decode()
                        self._drop_finished()
            except Exception as exc:  # a failed forward fails every row in flight; the worker carries on
                for row in self._rows + new:
                    if not row.done:
                        row.done = True
                        row.out.put(RuntimeError(f"generation failed: {exc}"))
                self._rows, self._cache, self._mask = [], None, None

    def _admit(self, new: list[_Row]) -> None:
        """Prefill new rows in one left-padded forward and merge their KV cache into the running batch."""
        import torch
        from transformers import DynamicCache

        ready, admitting = [], {row.adapter for row in new}
        for row in new:
            try:
                if row.adapter is not None:
                    self._attach(row.adapter, admitting)
                ready.append(row)
            except Exception as exc:  # a broken adapter fails its own rows only
                row.done = True
                row.out.put(AdapterError(f"cannot load adapter {row.adapter}: {exc}"))
        if not ready:
            return
        length = max(len(r.prompt_ids) for r in ready)
        # Built on the CPU and copied once (one transfer, not one per row).
        ids = torch.full((len(ready), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ready), length), dtype=torch.long)
        for i, row in enumerate(ready):
            ids[i, length - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[i, length - len(row.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ready, ids, mask, positions, cache)
        self._merge(ready, cache, mask)
        self._accept(ready, self._choose(ready, logits))

    def _decode(self) -> None:
        """One step for every row: feed each row's last token, get its next one."""
        import torch

        ids = torch.tensor([[row.ids[-1]] for row in self._rows], device=self.device)
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits = self._forward(self._rows, ids, self._mask, positions, self._cache)
        self._accept(self._rows, self._choose(self._rows, logits))

    def _forward(self, rows: list[_Row], ids, mask, positions, cache):
        """Last-position logits for a batch; one adapter -> set_adapter, base only -> disable_adapter, else mixed."""
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        if self.peft is None:
            return self.model(**kwargs).logits[:, -1].float()
        names = [self.adapters[r.adapter] if r.adapter is not None else BASE for r in rows]
        distinct = set(names)
        if distinct == {BASE}:
            with self.peft.disable_adapter():
                return self.peft(**kwargs).logits[:, -1].float()
        if len(distinct) == 1:
            if self._active != names[0]:
                self.peft.set_adapter(names[0])
                self._active = names[0]
            return self.peft(**kwargs).logits[:, -1].float()
        return self.peft(**kwargs, adapter_names=names).logits[:, -1].float()

    def _attach(self, path: str, admitting: set[str | None]) -> None:
        """Load an adapter once (PEFT `load_adapter`); detach the least recently used beyond `max_adapters`."""
        if path in self.adapters:
            self.adapters.move_to_end(path)
        else:
            from peft import PeftModel

            name = "a" + hashlib.sha1(path.encode()).hexdigest()[:16]  # PEFT names become module keys: no dots
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
                self.peft.eval()
                self._active = name
            else:
                self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            self.adapters[path] = name
        in_use = {r.adapter for r in self._rows} | admitting | {path}
        for old in list(self.adapters):
            if len(self.adapters) <= self.max_adapters:
                break
            if old not in in_use:
                old_name = self.adapters.pop(old)
                if self._active == old_name:
                    self.peft.set_adapter(self.adapters[path])
                    self._active = self.adapters[path]
                self.peft.delete_adapter(old_name)

    def _merge(self, rows: list[_Row], cache, mask) -> None:
        """Append prefilled rows to the batch: left-pad the shorter KV cache with zeros (masked out)."""
        import torch

        if not self._rows:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            return

        def pad(t, n: int, dim: int):
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        old_len, new_len = self._mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)
        for old, add in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([pad(old.keys, length - old_len, 2), pad(add.keys, length - new_len, 2)])
            old.values = torch.cat([pad(old.values, length - old_len, 2), pad(add.values, length - new_len, 2)])
        self._mask = torch.cat([pad(self._mask, length - old_len, 1), pad(mask, length - new_len, 1)])
        self._rows.extend(rows)

    def _drop_finished(self) -> None:
        """Remove finished or cancelled rows from the batch, and KV columns no remaining row attends to."""
        import torch

        for row in self._rows:
            if row.cancelled:
                row.done = True
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])
        for layer in self._cache.layers:  # layers of a model spread over GPUs live on different devices
            at = index.to(layer.keys.device)
            layer.keys = layer.keys[at, :, first:]
            layer.values = layer.values[at, :, first:]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]

    def _choose(self, rows: list[_Row], logits) -> list[int]:
        """Next token of each row under its own settings (greedy rows in one argmax)."""
        import torch

        plain = [not self._penalised(r.sampling) and r.sampling.temperature == 0 for r in rows]
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, row in enumerate(rows):
            if plain[i]:
                out.append(greedy[i])
                continue
            scores, s = logits[i].clone(), row.sampling
            if s.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.ids)), device=scores.device)
                picked = scores[seen]
                scores[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
            if (s.frequency_penalty or s.presence_penalty) and row.ids:
                counts = torch.bincount(torch.tensor(row.ids, device=scores.device),
                                        minlength=scores.shape[0])[: scores.shape[0]].to(scores.dtype)
                scores -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(scores.dtype)
            if s.temperature == 0:
                out.append(int(scores.argmax()))
                continue
            probs = torch.softmax(scores / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > s.top_p  # keep the smallest set reaching top_p
                sorted_probs[outside] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            out.append(int(torch.multinomial(probs, 1, generator=row.generator(probs.device))))
        return out

    @staticmethod
    def _penalised(s: Sampling) -> bool:
        return s.repetition_penalty != 1.0 or bool(s.frequency_penalty) or bool(s.presence_penalty)

    def _accept(self, rows: list[_Row], tokens: list[int]) -> None:
        """Record each row's new token; send the text that is final; finish on end token, stop string or length."""
        for row, token in zip(rows, tokens, strict=True):
            if row.done:
                continue
            row.ids.append(token)
            if token in self.eos_ids:
                self._finish(row, "stop")
                continue
            with self.tokenizer_lock:
                text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            stops = row.sampling.stop
            cut = _stop_cut(text, stops, max(0, row.sent - max((len(s) for s in stops), default=0)))
            if cut >= 0:
                row.text = text[:cut]
                self._finish(row, "stop")
            elif len(row.ids) >= row.max_tokens:
                row.text = text
                self._finish(row, "length")
            else:
                row.text = text
                end = _safe_end(text, stops)
                if end > row.sent:
                    row.out.put(Piece(row.index, text[row.sent:end]))
                    row.sent = end

    @staticmethod
    def _finish(row: _Row, reason: str) -> None:
        row.done = True
        if len(row.text) > row.sent:
            row.out.put(Piece(row.index, row.text[row.sent:]))
            row.sent = len(row.text)
        row.out.put(Completion(row.index, row.text, len(row.prompt_ids), len(row.ids), reason))


class InferenceEngine:
    """Base workers keyed by resolved model path, least recently used closed beyond `max_bases`."""

    def __init__(self, max_bases: int = 2, **worker_options: Any):
        self.max_bases, self.worker_options = max_bases, worker_options
        self._lock = threading.Lock()
        self._workers: OrderedDict[str, BaseWorker] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}

    def loaded(self, key: str) -> BaseWorker | None:
        """The worker of an already resolved model path if it is loaded (never loads)."""
        with self._lock:
            worker = self._workers.get(key)
            if worker is not None:
                self._workers.move_to_end(key)
            return worker

    def worker(self, base: str, *, resolved: bool = False, settings: Any = None) -> BaseWorker:
        """The worker of a base model, loading it (once, in the caller's thread) when it is not loaded.
        `resolved=True`: `base` is already a loadable local directory (the server's policy resolved it).
        `settings`: the server's Settings (placement: LORALAB_INFERENCE_*; default: read from the environment)."""
        from loralab.engine.models import resolve_base_model

        key = base if resolved else resolve_base_model(base).path
        with self._lock:
            if key in self._workers:
                self._workers.move_to_end(key)
                return self._workers[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one thread loads a base; others wanting it wait for that copy
            with self._lock:
                if key in self._workers:
                    return self._workers[key]
            model, tokenizer, placement = _load(key, settings)
            worker = BaseWorker(key, model, tokenizer, placement=placement, **self.worker_options)
            with self._lock:
                self._workers[key] = worker
                self._loading.pop(key, None)
                while len(self._workers) > self.max_bases:
                    self._workers.popitem(last=False)[1].close()
            return worker

    def workers(self) -> list[BaseWorker]:
        """The loaded workers, least recently used first (for /api/system-info)."""
        with self._lock:
            return list(self._workers.values())

    def close(self) -> None:
        with self._lock:
            for worker in self._workers.values():
                worker.close()
            self._workers.clear()


def serving_placement(key: str, settings: Any = None):
    """The placement of a served base model: LORALAB_INFERENCE_DEVICE / _QUANTIZATION applied to its size by
    training's hardware rule (raises engine.hardware.PlacementError with what to change)."""
    from loralab.engine.models import inference_placement
    from loralab.settings import get_settings

    settings = settings or get_settings()
    return inference_placement(key, device=settings.inference_device, quantization=settings.inference_quantization)


def _load(key: str, settings: Any = None):
    from loralab.data.template import ensure_chat_template
    from loralab.engine.models import load_model, load_tokenizer

    placement = serving_placement(key, settings)
    model = load_model(key, placement=placement)
    model.eval()
    return model, ensure_chat_template(load_tokenizer(key)), placement


_ENGINE: InferenceEngine | None = None
_ENGINE_LOCK = threading.Lock()


def get_engine(max_bases: int = 2) -> InferenceEngine:
    """The process-wide engine (rebuilt when the base limit changes)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None or _ENGINE.max_bases != max_bases:
            if _ENGINE is not None:
                _ENGINE.close()
            _ENGINE = InferenceEngine(max_bases)
        return _ENGINE


def shutdown_engine() -> None:
    """Unload every model (tests, benchmarks, server shutdown)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is not None:
            _ENGINE.close()
        _ENGINE = None


def loaded_workers() -> list[BaseWorker]:
    """The base models loaded for serving in this process (none when nothing was served yet)."""
    with _ENGINE_LOCK:
        engine = _ENGINE
    return engine.workers() if engine is not None else []
