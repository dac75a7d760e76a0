"""Chat-template encoding: labels fall exactly on assistant content + end-of-turn token."""
from __future__ import annotations

import pytest

from loralab.data.template import (
    IGNORE_INDEX, encode_dataset, encode_record, has_supervised_tokens, render_prompt, token_stats,
)

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "日本の首都はどこですか？"},
    {"role": "assistant", "content": "東京です。"},
]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def supervised_pieces(enc: dict, tokenizer) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    pieces, run = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return pieces


def assert_masks_assistant_turns(tokenizer) -> None:
    enc = encode_record(CHAT, tokenizer, max_seq_length=4096)
    end = "<|im_end|>"
    assert supervised_pieces(enc, tokenizer) == [f"The capital of France is Paris.{end}", f"東京です。{end}"]
    assert tokenizer.decode(enc["input_ids"]) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)


def test_labels_are_assistant_content_and_end_token(tokenizer):
    assert_masks_assistant_turns(tokenizer)


def test_all_tokens_when_not_assistant_only(tokenizer):
    enc = encode_record(CHAT, tokenizer, max_seq_length=4096, assistant_only_loss=False)
    assert enc["labels"] == enc["input_ids"]


def test_text_record_trains_on_every_token_plus_eos(tokenizer):
    enc = encode_record({"text": "質問: 日本の首都はどこですか？\n回答: 東京です。"}, tokenizer, max_seq_length=4096)
    assert enc["labels"] == enc["input_ids"] and enc["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc["input_ids"]) == "質問: 日本の首都はどこですか？\n回答: 東京です。<|im_end|>"


def test_preference_record_is_prompt_plus_chosen(tokenizer):
    record = {"messages": [{"role": "user", "content": "Q?"}], "chosen": "Paris.", "rejected": "Lyon."}
    assert supervised_pieces(encode_record(record, tokenizer, 4096), tokenizer) == ["Paris.<|im_end|>"]


def test_truncation_and_unsupervised_rows(tokenizer):
    full = encode_record(CHAT, tokenizer, max_seq_length=4096)
    short = encode_record(CHAT, tokenizer, max_seq_length=10)
    assert short["input_ids"] == full["input_ids"][:10] and len(short["labels"]) == 10
    assert not has_supervised_tokens(short) and has_supervised_tokens(full)
    text = encode_record({"text": "hi"}, tokenizer, max_seq_length=10)
    stats = token_stats([short, text], max_seq_length=10)
    assert stats["rows"] == 2 and stats["truncated"] == 1 and stats["unsupervised_rows"] == 1
    assert stats["total_tokens"] == 10 + len(text["input_ids"]) and stats["max"] == 10
    assert stats["supervised_tokens"] == len(text["input_ids"])
    assert sum(stats["histogram"]["counts"]) == 2
    assert len(stats["histogram"]["bins"]) == len(stats["histogram"]["counts"]) + 1


def test_token_stats_from_lengths():
    stats = token_stats([10, 20, 30, 40], max_seq_length=30)
    assert stats["min"] == 10 and stats["max"] == 40 and stats["mean"] == 25 and stats["p50"] == 25
    assert stats["truncated"] == 2 and stats["supervised_tokens"] is None
    assert token_stats([])["rows"] == 0


def test_render_prompt_and_encode_dataset(tokenizer):
    prompt = render_prompt(CHAT["messages"][:2], tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n")
    encoded = encode_dataset([CHAT, {"text": "hi"}], tokenizer, 4096)
    assert len(encoded) == 2 and all(has_supervised_tokens(e) for e in encoded)


def test_tokenizer_without_template_gets_chatml(tiny_model_dir):
    from transformers import AutoTokenizer

    from loralab.data.template import DEFAULT_CHAT_TEMPLATE, ensure_chat_template

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    assert supervised_pieces(encode_record(CHAT, bare, 4096), bare)[-1] == "東京です。<|im_end|>"
    assert ensure_chat_template(bare).chat_template == DEFAULT_CHAT_TEMPLATE


def test_tokenizer_without_offsets_encodes_piece_by_piece(tokenizer):
    class NoOffsets:
        """A tokenizer seen as a Python (slow) one: no offset mapping."""

        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    enc = encode_record(CHAT, NoOffsets(), 4096)
    assert supervised_pieces(enc, tokenizer) == ["The capital of France is Paris.<|im_end|>", "東京です。<|im_end|>"]


def test_template_errors_become_value_errors(tokenizer):
    strict = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    original = tokenizer.chat_template
    tokenizer.chat_template = strict
    try:
        with pytest.raises(ValueError, match="must alternate"):
            encode_record(CHAT, tokenizer, 4096)
    finally:
        tokenizer.chat_template = original


@pytest.mark.model
def test_masking_with_smollm2_tokenizer(embedded_model_dir):
    """SmolLM2's template injects a default system prompt; it must stay unlabelled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    assert_masks_assistant_turns(tokenizer)
    no_system = {"messages": CHAT["messages"][1:]}
    enc = encode_record(no_system, tokenizer, 4096)
    assert "SmolLM" in tokenizer.decode(enc["input_ids"])  # the injected default system prompt
    assert supervised_pieces(enc, tokenizer)[0] == "The capital of France is Paris.<|im_end|>"
