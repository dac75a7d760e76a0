"""The Feedback and A/B pages' view functions (no browser): what they show for stored feedback and a test."""
from __future__ import annotations

import pytest

pytest.importorskip("gradio")


@pytest.fixture
def svc(tmp_path):
    from loralab.services.context import open_services
    from loralab.settings import Settings

    services = open_services(Settings(home=tmp_path / "home", database_url=None, api_token=None))
    yield services
    services.close()


def add_generation(svc, number: int, model: str, arm: str | None = None, ab_test_id: str | None = None) -> str:
    from loralab.store.feedback import FeedbackStore

    gen_id = f"gen-{number:024x}"
    FeedbackStore(svc.db).add_generation(
        id=gen_id, requested_model=model, model=model, base_model=model, adapter=None, source="api",
        input={"messages": [{"role": "user", "content": f"q{number % 3}"}]}, prompt_hash="h", output=f"a{number}",
        outputs=[f"a{number}"], finish_reason="stop", prompt_tokens=1, completion_tokens=1, ab_test_id=ab_test_id,
        arm=arm, subject=f"s{number}")
    return gen_id


def test_feedback_page_views(svc):
    from loralab.services import feedback
    from loralab.ui.feedback import preference_view, stats_view

    for number, rating in enumerate([5, 1, 4]):
        gen = add_generation(svc, number, "m1" if number < 2 else "m2")
        feedback.submit(svc, feedback.FeedbackRequest(generation_id=gen, rating=rating,
                                                      corrected="better" if rating == 1 else None))
    summary, by_model, by_day, table, models = stats_view(svc, "", "", "", "en")
    assert "**3** feedback" in summary and "3.33" in summary
    assert sorted(by_model.value["data"]) == [["m1", 3.0, 2], ["m2", 4.0, 1]] and len(table) == 3
    assert [row[1] for row in by_day.value["data"]] == [3]
    assert [c[1] for c in models.choices] == ["", "m1", "m2"]
    ja_summary, *_ = stats_view(svc, "m1", "", "", "ja")
    assert "**2** 件" in ja_summary and "3.00" in ja_summary
    error, *_ = stats_view(svc, "", "not a date", "", "en")
    assert error.startswith("Error:") and "since" in error
    status, pairs = preference_view(svc, False, "", 1, "", "", "", "en")
    assert status.startswith("1 preference pairs: 1 from better answers") and len(pairs) == 1
    status, _ = preference_view(svc, True, "prefs", 1, "", "", "", "en")
    assert "Stored dataset prefs v1" in status


def test_ab_page_results_view(svc, tmp_path):
    from loralab.services import feedback
    from loralab.store.feedback import FeedbackStore
    from loralab.ui.abtests import results_view

    assert results_view(svc, None, "en")[0] == "No A/B tests yet."
    test = FeedbackStore(svc.db).create_ab_test(id="ab-" + "1" * 24, name="t", model_a="m1", model_b="m2",
                                                split=0.5, metric="thumbs_up_rate")
    for number in range(40):
        arm = "AB"[number % 2]
        gen = add_generation(svc, number, "m1" if arm == "A" else "m2", arm, test.id)
        feedback.submit(svc, feedback.FeedbackRequest(generation_id=gen, thumbs="up" if arm == "B" else "down"))
    text, table = results_view(svc, test.id, "en")
    assert "ab:t" in text and "two-proportion z-test" in text and "winner: **B (m2)**" in text
    assert list(table.iloc[:, 2]) == [20, 20] and list(table.iloc[:, 4]) == ["0", "1"]
    ja_text, _ = results_view(svc, test.id, "ja")
    assert "勝者" in ja_text
