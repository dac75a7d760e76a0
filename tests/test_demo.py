"""`loralab demo` end to end on the embedded model: the tuned answers reflect the 5 training answers."""
import pytest
from rich.console import Console

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_demo_teaches_the_sample_facts(tmp_path):
    from loralab.cli import fail, run_training
    from loralab.demo import run_demo

    out = Console(file=(tmp_path / "out.txt").open("w"), width=200)
    result = run_demo(out, out, tmp_path / "demo", 8, fail, run_training)
    assert len(result["after"]) == 5
    # The base model cannot know these made-up facts; after the fine-tune most answers are the training answers.
    learned = sum(a.strip().lower() == e.strip().lower() for a, e in zip(result["after"], result["expected"]))
    known_before = sum(b.strip().lower() == e.strip().lower() for b, e in zip(result["before"], result["expected"]))
    assert known_before == 0 and learned >= 4, result
    assert result["summary"]["final_loss"] < result["summary"]["first_loss"] / 10
    text = (tmp_path / "out.txt").read_text()
    assert "tokens/s" in text and "adapter:" in text and "peak memory" in text
