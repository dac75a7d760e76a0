"""The JSON progress store under LORALAB_HOME/learn/."""
from __future__ import annotations

import pytest

from loralab.learn import progress


def test_progress_round_trip(loralab_home):
    assert progress.load().topics == {}
    progress.record_read("lora")
    progress.record_quiz("lora", 2, 4)
    progress.record_quiz("lora", 4, 4)
    progress.record_quiz("lora", 1, 4)
    progress.record_step("first-fine-tune", "compare")
    path = loralab_home / "learn" / "progress.json"
    assert path.is_file()
    saved = progress.load()
    lora = saved.topic("lora")
    assert lora.read_at is not None
    assert (lora.quiz.attempts, lora.quiz.best_score, lora.quiz.last_score, lora.quiz.total) == (3, 4, 1, 4)
    assert lora.quiz.passed
    assert list(saved.topic("first-fine-tune").steps) == ["compare"]
    assert saved.topic("unknown").quiz is None


def test_bad_scores_and_corrupt_files_are_clear_errors(loralab_home):
    with pytest.raises(ValueError, match="between 0 and total"):
        progress.record_quiz("lora", 5, 4)
    path = loralab_home / "learn" / "progress.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(progress.ProgressError, match="delete it"):
        progress.load()
