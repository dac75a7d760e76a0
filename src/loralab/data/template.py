"""Tokenise canonical records with the tokenizer's own chat template, with the loss on assistant turns only."""
from __future__ import annotations

import bisect
import math
from typing import Any, Iterable

from jinja2 import TemplateError

IGNORE_INDEX = -100  # label value the loss skips (transformers' and PyTorch's convention)

# Used only when a tokenizer has no chat template (base models); ChatML, the most common layout.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Encoded = dict[str, list[int]]
Span = tuple[int, int]


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give a tokenizer without a chat template the default one, so training, saving and serving agree."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def render_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt text for generation: the conversation so far plus the assistant header."""
    return _render(messages, tokenizer, add_generation_prompt=True)


def encode_record(record: dict[str, Any], tokenizer: Any, max_seq_length: int | None,
                  assistant_only_loss: bool = True) -> Encoded:
    """Token ids and labels of one canonical record, truncated to max_seq_length (None = no limit).

    Chat labels cover each assistant turn's content and its end-of-turn token; text records are
    trained on every token. Preference records are encoded as prompt + chosen answer (SFT on chosen).
    """
    if "text" in record:
        ids = list(tokenizer(record["text"], add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
    else:
        messages = record["messages"]
        if "chosen" in record:
            messages = [*messages, {"role": "assistant", "content": record["chosen"]}]
        text, spans = _assistant_spans(messages, tokenizer)
        ids, labels = _tokenise(text, spans, tokenizer)
        if not assistant_only_loss:
            labels = list(ids)
    if max_seq_length is not None:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return {"input_ids": ids, "labels": labels}


def has_supervised_tokens(encoded: Encoded) -> bool:
    """Whether any token carries loss; rows without (e.g. answer truncated away) should be skipped."""
    return any(label != IGNORE_INDEX for label in encoded["labels"])


def encode_dataset(records: Iterable[dict[str, Any]], tokenizer: Any, max_seq_length: int | None,
                   assistant_only_loss: bool = True) -> list[Encoded]:
    """`encode_record` over many records, in order (rows without supervised tokens are kept)."""
    return [encode_record(r, tokenizer, max_seq_length, assistant_only_loss) for r in records]


def token_stats(items: Iterable[Encoded | int], max_seq_length: int | None = None, bins: int = 10) -> dict[str, Any]:
    """Length statistics of encoded rows (or plain lengths) for the dataset preview and the run plan.

    `truncated` counts rows that reached max_seq_length (cut, or exactly that long); `supervised_tokens`
    and `unsupervised_rows` are None when only lengths were given.
    """
    import numpy as np

    lengths: list[int] = []
    supervised: int | None = 0
    unsupervised: int | None = 0
    for item in items:
        if isinstance(item, dict):
            lengths.append(len(item["input_ids"]))
            count = sum(label != IGNORE_INDEX for label in item["labels"])
            if supervised is not None and unsupervised is not None:
                supervised += count
                unsupervised += count == 0
        else:
            lengths.append(int(item))
            supervised = unsupervised = None
    truncated = None if max_seq_length is None else sum(n >= max_seq_length for n in lengths)
    if not lengths:
        return {"rows": 0, "total_tokens": 0, "supervised_tokens": supervised, "unsupervised_rows": unsupervised,
                "min": 0, "max": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "truncated": truncated,
                "histogram": {"bins": [], "counts": []}}
    arr = np.asarray(lengths)
    step = max(1, math.ceil(int(arr.max()) / bins))
    edges = [i * step for i in range(bins + 1)]
    counts, _ = np.histogram(arr, bins=edges)
    return {
        "rows": len(lengths), "total_tokens": int(arr.sum()),
        "supervised_tokens": supervised, "unsupervised_rows": unsupervised,
        "min": int(arr.min()), "max": int(arr.max()), "mean": round(float(arr.mean()), 2),
        "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
        "truncated": truncated,
        "histogram": {"bins": edges, "counts": [int(c) for c in counts]},
    }


def _render(messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # templates may raise_exception(), e.g. on roles that do not alternate
        raise ValueError(f"the model's chat template rejects this conversation: {exc}; "
                         "reorder or merge the turns the way the message asks") from exc


def _assistant_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its assistant turns.

    Each span is what rendering messages[:i+1] adds to messages[:i] + generation prompt, so headers
    and any default system prompt the template injects stay unlabelled; trailing whitespace after the
    end-of-turn token is left out, since generation stops at that token.
    """
    full = _render(messages, tokenizer, add_generation_prompt=False)
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = None
        if i > 0:
            prompt = _render(messages[:i], tokenizer, add_generation_prompt=True)
            upto = _render(messages[: i + 1], tokenizer, add_generation_prompt=False)
            end = len(upto.rstrip())
            if upto.startswith(prompt) and full.startswith(upto) and end > len(prompt) >= cursor:
                span = (len(prompt), end)
        if span is None:  # templates that rewrite earlier turns: fall back to finding the content
            span = _find_content(full, message["content"], cursor, tokenizer.eos_token)
        if span is not None:
            spans.append(span)
            cursor = span[1]
    return full, spans


def _find_content(full: str, content: str, cursor: int, eos: str | None) -> Span | None:
    start = full.find(content, cursor)
    if start < 0:
        return None
    end = start + len(content)
    if eos and full.startswith(eos, end):
        end += len(eos)
    return start, end


def _tokenise(text: str, spans: list[Span], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids of the whole text, labelled where a token starts inside an assistant span."""
    offsets = None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc.get("offset_mapping")
    if offsets is None:  # tokenizers without offsets (Python/SentencePiece): encode span by span instead
        return _tokenise_pieces(text, spans, tokenizer)
    ids = list(enc["input_ids"])
    starts = [s for s, _ in spans]
    labels = []
    for token, (start, _) in zip(ids, offsets):
        k = bisect.bisect_right(starts, start) - 1
        labels.append(token if k >= 0 and start < spans[k][1] else IGNORE_INDEX)
    return ids, labels


def _tokenise_pieces(text: str, spans: list[Span], tokenizer: Any) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, supervised in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids)
        cursor = end
    return ids, labels
