"""Text generation with a loaded model: chat-templated or raw, whole or streamed, with stop strings."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from loralab.spec import GenerateSpec


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length"


def build_prompt(tokenizer, messages: list[dict] | None = None, prompt: str | None = None) -> str:
    """The exact text the model sees: chat template + generation prompt for messages, else the raw prompt."""
    if (messages is None) == (prompt is None):
        raise ValueError("give either messages or prompt")
    if messages is not None:
        if not messages:
            raise ValueError("messages is empty")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def _generate_kwargs(tokenizer, settings: GenerateSpec) -> dict:
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def input_device(model):
    """Where a model's inputs go: its input embeddings' device (the first GPU of a device map, also under PEFT and
    4-bit loading), else its first parameter's."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _encode(tokenizer, text: str, device):
    # The chat template already holds the special tokens; a raw prompt gets none added either.
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)


def generate(model, tokenizer, *, messages=None, prompt=None, settings: GenerateSpec | None = None) -> Generation:
    """Generate one completion; greedy when temperature is 0."""
    import torch

    settings = settings or GenerateSpec()
    inputs = _encode(tokenizer, build_prompt(tokenizer, messages, prompt), input_device(model))
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    with torch.inference_mode():
        out = model.generate(**inputs, **_generate_kwargs(tokenizer, settings))
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    ended = len(new_tokens) > 0 and int(new_tokens[-1]) == tokenizer.eos_token_id
    text, stopped = _cut_at_stop(tokenizer.decode(new_tokens, skip_special_tokens=True), settings.stop)
    finish = "stop" if ended or stopped or len(new_tokens) < settings.max_new_tokens else "length"
    return Generation(text, int(inputs["input_ids"].shape[1]), int(len(new_tokens)), finish)


def stream(model, tokenizer, *, messages=None, prompt=None, settings: GenerateSpec | None = None) -> Iterator[str]:
    """Yield text pieces as they are generated (a worker thread runs model.generate)."""
    import torch
    from transformers import TextIteratorStreamer

    settings = settings or GenerateSpec()
    inputs = _encode(tokenizer, build_prompt(tokenizer, messages, prompt), input_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode():
                model.generate(**inputs, streamer=streamer, **_generate_kwargs(tokenizer, settings))
        except BaseException as exc:  # surfaced to the consumer below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    emitted = ""
    for piece in streamer:
        text, stopped = _cut_at_stop(emitted + piece, settings.stop)
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
        if stopped:
            break
    thread.join(timeout=0 if thread.is_alive() else None)
    if errors:
        raise errors[0]
