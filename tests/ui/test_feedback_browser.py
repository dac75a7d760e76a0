"""In Chromium: rate a playground answer (thumbs, stars, a better answer) and find it on the Feedback page."""
from __future__ import annotations

import re
import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.model]

LONG = 300_000  # ms: generation shares 2 cores with other test runs
BETTER = "Paris is the capital of France."


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def goto_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    expect(page.get_by_role("tab", name=name, exact=True)).to_have_attribute("aria-selected", "true")


@pytest.mark.timeout(900)
def test_rate_in_playground_then_see_it_on_the_feedback_page(open_page, ui_server, screenshot_dir):
    from loralab.store.feedback import FeedbackFilter, FeedbackStore

    _, services = ui_server
    watch = open_page("en-US")
    page = watch.page
    expect(page.locator("#app-title")).to_contain_text("LoRA fine-tuning studio", timeout=LONG)
    goto_tab(page, "Playground")
    expect(page.locator("#pg-model input")).to_have_value(re.compile("smollm2"), timeout=LONG)
    box = page.locator("#pg-max_new_tokens input").first
    box.fill("8")
    box.press("Tab")
    page.locator("#pg-prompt textarea").fill("What is the capital of France?")
    page.locator("#pg-prompt textarea").press("Enter")
    bot = page.locator("#pg-chat-a .message-row.bot-row, #pg-chat-a [data-testid=bot]").last
    expect(bot).to_have_text(re.compile(r"\S"), timeout=LONG)
    expect(page.locator("#pg-send")).to_be_enabled(timeout=LONG)

    page.locator("#pg-chat-a").get_by_role("button", name="Like").last.click()
    expect(page.locator("#pg-fb-status")).to_contain_text("Thumbs up saved for gen-", timeout=LONG)
    page.locator("#pg-fb-rating").get_by_text("4", exact=True).click()
    page.locator("#pg-fb-better textarea").fill(BETTER)
    page.locator("#pg-fb-send").click()
    expect(page.locator("#pg-fb-status")).to_contain_text("Feedback saved for gen-", timeout=LONG)
    page.screenshot(path=str(screenshot_dir / "playground-feedback.png"), full_page=True)

    # thumbs and the later rating of the same answer by the same session are one judgement
    store = FeedbackStore(services.db)
    rows, total = store.list_feedback(FeedbackFilter())
    assert total == 1 and rows[0].thumbs == "up" and rows[0].rating == 4 and rows[0].corrected == BETTER
    assert rows[0].model == "smollm2-135m-instruct" and rows[0].user
    deadline = time.monotonic() + LONG / 1000  # the answer may still be streaming: its text is filled in at the end
    while store.get_generation(rows[0].generation_id).finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.2)
    answer = store.get_generation(rows[0].generation_id).output
    assert answer and store.list_feedback(FeedbackFilter())[0][0].output == answer

    goto_tab(page, "Feedback")
    summary = page.locator("#fb-summary")
    expect(summary).to_contain_text("1 feedback", timeout=LONG)
    expect(summary).to_contain_text("4.00")
    expect(page.locator("#fb-table")).to_contain_text("Paris is the capital", timeout=LONG)
    expect(page.locator("#fb-by-model svg").first).to_be_attached(timeout=LONG)
    page.locator("#fb-pref-preview").click()
    expect(page.locator("#fb-pref-status")).to_contain_text("1 preference pairs: 1 from better answers",
                                                            timeout=LONG)
    expect(page.locator("#fb-pref-table")).to_contain_text("Paris is the capital")
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshot_dir / "feedback-page.png"), full_page=True)

    goto_tab(page, "A/B tests")
    expect(page.locator("#ab-results")).to_contain_text("No A/B tests yet", timeout=LONG)
