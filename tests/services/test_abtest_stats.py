"""The A/B statistics against textbook values, and the deterministic split."""
from __future__ import annotations

import math

import pytest

from loralab.services.abtests import arm_for, compare, score


def test_two_proportion_z_test_matches_hand_computation():
    a = [1.0] * 40 + [0.0] * 60  # 40%
    b = [1.0] * 55 + [0.0] * 45  # 55%
    out = compare(a, b, "thumbs_up_rate")
    pooled = 95 / 200
    z = 0.15 / math.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert out["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)
    low, high = out["arms"][0]["ci"]  # Wilson 95% for 40/100
    assert low == pytest.approx(0.3094, abs=1e-3) and high == pytest.approx(0.4980, abs=1e-3)


def test_sample_size_for_proportions_is_the_textbook_one():
    # 50% vs 60%, alpha 0.05 two-sided, power 0.8: 388 per arm (Fleiss without continuity correction)
    a = [1.0] * 50 + [0.0] * 50
    b = [1.0] * 60 + [0.0] * 40
    assert compare(a, b, "thumbs_up_rate")["min_sample_per_arm"] == 388
    assert compare(a, a, "thumbs_up_rate")["min_sample_per_arm"] is None


def test_mann_whitney_and_mean_interval():
    from scipy.stats import mannwhitneyu

    a, b = [2.0, 3.0, 2.0, 3.0, 4.0] * 4, [5.0, 4.0, 5.0, 4.0, 3.0] * 4
    out = compare(a, b, "mean_rating")
    assert out["p_value"] == pytest.approx(mannwhitneyu(a, b).pvalue)
    assert out["arms"][0]["value"] == pytest.approx(2.8) and out["arms"][1]["value"] == pytest.approx(4.2)
    low, high = out["arms"][1]["ci"]
    assert low < 4.2 < high and high - low < 1
    assert compare([3.0] * 5, [3.0] * 5, "mean_rating")["p_value"] == 1.0  # every value tied


def test_scores_and_split():
    assert score(None, "up", "thumbs_up_rate") == 1.0 and score(3, None, "thumbs_up_rate") == 0.0
    assert score(None, "down", "mean_rating") == 1.0 and score(4, "down", "mean_rating") == 4.0
    arms = [arm_for("ab-x", 0.3, f"user-{i}") for i in range(4000)]
    assert arms == [arm_for("ab-x", 0.3, f"user-{i}") for i in range(4000)]  # deterministic
    assert 0.27 < arms.count("A") / len(arms) < 0.33
    assert arms != [arm_for("ab-y", 0.3, f"user-{i}") for i in range(4000)]  # per test, not global
