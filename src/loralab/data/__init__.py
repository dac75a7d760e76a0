"""Datasets: file formats, validation, chat templates and the sample datasets shipped with loralab."""
from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"

# name -> description; the demo uses basic_qa, small enough for a ~20 s LoRA run on a laptop.
SAMPLES: dict[str, str] = {
    "basic_qa": "5 alpaca Q/A rows about loralab itself; answers the base model cannot know (demo).",
    "tech_qa": "20 alpaca Q/A rows on machine learning, LLMs and LoRA.",
    "ja_qa": "20 Japanese plain-text rows '質問: ...\\n回答: ...' (continued pre-training style).",
    "chat_sample": "10 chat conversations (messages), some multi-turn, some with a system prompt.",
    "preference_sample": "10 preference rows (prompt, chosen, rejected) for DPO.",
}


def sample_path(name: str) -> Path:
    """The file of a shipped sample dataset, by name (with or without the .jsonl extension)."""
    stem = name.removesuffix(".jsonl")
    if stem not in SAMPLES:
        raise KeyError(f"unknown sample dataset {name!r}; choose one of {', '.join(SAMPLES)}")
    return SAMPLES_DIR / f"{stem}.jsonl"
