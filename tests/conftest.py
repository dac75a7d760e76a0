"""Shared fixtures: an isolated LORALAB_HOME and a tiny Llama + tokenizer built locally (no network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Explain LoRA. LoRA adds low-rank matrices to frozen weights.",
    "質問: 日本の首都はどこですか？\n回答: 東京です。",
    "user assistant system hello world tokens training model data",
] * 20


def build_tiny_model(target: Path, vocab_size: int = 384) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer and a ChatML template, saved to `target`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def loralab_home(tmp_path, monkeypatch, request) -> Path:
    """Every test gets its own LORALAB_HOME; the converted embedded model is shared through a link."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    if request.node.get_closest_marker("model"):
        request.getfixturevalue("embedded_model_dir")
    shared = _shared_models_dir()
    if shared is not None:
        (home / "models" / "smollm2-135m-instruct").symlink_to(shared / "smollm2-135m-instruct",
                                                              target_is_directory=True)
    monkeypatch.setenv("LORALAB_HOME", str(home))
    monkeypatch.delenv("LORALAB_DATABASE_URL", raising=False)
    monkeypatch.delenv("LORALAB_API_TOKEN", raising=False)
    return home


def _shared_models_dir() -> Path | None:
    """A per-machine cache of the converted embedded model, so model tests convert it only once."""
    root = Path(os.environ.get("LORALAB_TEST_MODELS", Path.home() / ".cache" / "loralab-test-models"))
    return root if (root / "smollm2-135m-instruct" / "config.json").is_file() else None


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The converted embedded model (converted once per machine into the shared test cache)."""
    root = Path(os.environ.get("LORALAB_TEST_MODELS", Path.home() / ".cache" / "loralab-test-models"))
    target = root / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        from loralab.engine.models import _convert_gguf, embedded_gguf_path

        _convert_gguf(embedded_gguf_path(), target)
    return target
