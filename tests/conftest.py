"""Shared fixtures: an isolated LORALAB_HOME and a tiny Llama + tokenizer built locally (no network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Reference models that tests load straight from transformers: no hub kernels (transformers >= 5.25 turns them on,
# and every train()/eval() then puts the stock forwards back). The engine's own loaders pass use_kernels=False;
# tests/engine/test_fastpath.py checks that without this variable.
os.environ.setdefault("USE_HUB_KERNELS", "0")

from tiny_models import build_tiny_model  # noqa: E402  (tests/ is on sys.path)


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
    # tests of the batching PyTorch decoder use it; tests/serving opts into llama.cpp where it means to
    monkeypatch.setenv("LORALAB_SERVING_RUNTIME", "transformers")
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
