"""The Learn page in real headless Chromium, in Japanese: level 1 read and quizzed, the guided fine-tune run on the
embedded model, tokenizer and calculator used, and the progress still there after a reload (and on the dashboard)."""
from __future__ import annotations

import re

import pytest

from loralab.learn import course

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.model]

LONG = 600_000  # ms: training and generation share 2 cores with other test runs


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def open_learn(page) -> None:
    """Through the dashboard's quick link (with many pages the Learn tab may sit in the tab bar's overflow menu)."""
    page.locator("#dash-go-learn").click()
    expect(page.locator("#learn-progress")).to_be_visible(timeout=LONG)


def choose(page, slot: int, text: str) -> None:
    page.locator(f"#learn-q{slot}").get_by_label(text, exact=True).check()


def read_and_answer(page, topic: course.Topic, wrong_first: bool) -> None:
    """Open a topic, mark it read, answer its quiz (the first answer wrong if asked) and save the answers."""
    page.locator("#learn-topic").get_by_text(topic.title).click()
    expect(page.locator("#learn-body")).to_contain_text(topic.title, timeout=LONG)
    page.locator("#learn-read").click()
    expect(page.locator("#learn-read-status")).to_contain_text("既読です", timeout=LONG)
    for slot, question in enumerate(topic.quiz.questions):
        expect(page.locator(f"#learn-q{slot}")).to_contain_text(question.prompt, timeout=LONG)
        right = question.correct_choice
        if slot == 0 and wrong_first:
            wrong = next(c for c in question.choices if not c.correct)
            choose(page, slot, wrong.text)
            feedback = page.locator(f"#learn-fb{slot}")
            expect(feedback).to_contain_text("不正解です", timeout=LONG)
            expect(feedback).to_contain_text(wrong.explanation)  # why the chosen answer is wrong
            expect(feedback).to_contain_text(right.explanation)  # and why the right one is right
            expect(page.locator(f"#learn-q{slot} input").first).to_be_disabled(timeout=LONG)  # first answer counts
        else:
            choose(page, slot, right.text)
            expect(page.locator(f"#learn-fb{slot}")).to_contain_text("正解です", timeout=LONG)
    page.locator("#learn-submit").click()
    total = len(topic.quiz.questions)
    score = total - 1 if wrong_first else total
    expect(page.locator("#learn-quiz-result")).to_contain_text(f"得点 {score}/{total}", timeout=LONG)
    expect(page.locator("#learn-quiz-result")).to_contain_text("合格です")
    expect(page.locator("#learn-quiz-info")).to_contain_text(f"最新 {score}/{total}", timeout=LONG)


@pytest.mark.timeout(1500)
def test_level_one_in_japanese(open_page, screenshot_dir, ui_server):
    from loralab.learn.calculator import estimate_lora

    _, services = ui_server
    watch = open_page("ja-JP")
    page = watch.page
    expect(page.locator("#app-title")).to_contain_text("LoRA ファインチューニング スタジオ", timeout=LONG)
    expect(page.locator("#dash-go-learn")).to_contain_text("学習センターを開く", timeout=LONG)
    open_learn(page)
    expect(page.locator("#learn-progress")).to_contain_text("達成率", timeout=LONG)
    topics = course.list_topics("ja", 1)
    for topic in topics:
        expect(page.locator("#learn-topic")).to_contain_text(topic.title, timeout=LONG)
    for index, topic in enumerate(topics):
        read_and_answer(page, topic, wrong_first=index == 0)
    # retaking resets the quiz; the stored best stays
    page.locator("#learn-retake").click()
    expect(page.locator("#learn-q0 input").first).to_be_enabled(timeout=LONG)
    expect(page.locator("#learn-fb0")).to_have_text("")

    # the guided fine-tune: a real dataset, a real job on the embedded model, a real comparison
    page.locator("#learn-g-upload").click()
    expect(page.locator("#learn-g-status")).to_contain_text("準備ができました", timeout=LONG)
    dataset_id = re.search(r"ds-[0-9a-f]{24}", page.locator("#learn-g-status").inner_text()).group(0)
    assert services.repo.get_dataset(dataset_id).rows == 5
    page.locator("#learn-g-train").click()
    expect(page.locator("#learn-g-status")).to_contain_text("job-", timeout=LONG)
    job_id = re.search(r"job-[0-9a-f]{24}", page.locator("#learn-g-status").inner_text()).group(0)
    guided = page.locator("#learn-guided")
    expect(guided).to_contain_text(re.compile(r"ファインチューニング\*?\*?: ✓ 完了"), timeout=LONG)
    job = services.repo.get_job(job_id)
    assert job.status == "succeeded" and job.result_model_id in guided.inner_text()
    page.locator("#learn-g-compare").click()
    expect(page.locator("#learn-g-status")).to_contain_text("比較しました", timeout=LONG)
    compare = page.locator("#learn-compare")
    expect(compare).to_contain_text("What is loralab?", timeout=LONG)
    expect(compare).to_contain_text("学習後")
    expect(page.locator("#learn-progress")).to_contain_text("レベル 1: 既読 5/5、クイズ合格 5/5 ✓ 修了", timeout=LONG)

    # tools: the real tokenizer of the embedded model, and the calculator on its real config
    page.locator("#learn-tok-text textarea").fill("東京")
    page.locator("#learn-tok-run").click()
    expect(page.locator("#learn-tok-summary")).to_contain_text("が 4 トークン", timeout=LONG)
    expect(page.locator("#learn-tok-out .learn-token")).to_have_count(4)
    page.locator("#learn-calc-run").click()
    expected = estimate_lora("smollm2-135m-instruct", r=8).trainable_params
    expect(page.locator("#learn-calc-out")).to_contain_text(f"{expected:,}", timeout=LONG)
    expect(page.locator("#learn-calc-table")).to_contain_text("q_proj")
    page.locator("#learn-body").scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshot_dir / "learn-ja.png"), full_page=True)

    # the same browser opened again (a new tab: same localStorage, so the same learner id) sees its progress
    first, page = page, page.context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(watch.base_url + "/", wait_until="domcontentloaded")
    expect(page.locator("#app-title")).to_contain_text("LoRA ファインチューニング スタジオ", timeout=LONG)
    expect(page.locator("#dash-learn")).to_contain_text("✓ 修了", timeout=LONG)
    open_learn(page)
    expect(page.locator("#learn-progress")).to_contain_text("クイズ合格 5/5 ✓ 修了", timeout=LONG)
    expect(page.locator("#learn-topic")).to_contain_text("✓ ★ 1-01", timeout=LONG)
    expect(page.locator("#learn-guided")).to_contain_text(job_id)

    # the same page in English
    page.locator("#lang-toggle").get_by_text("English", exact=True).click()
    expect(page.locator("#tab-learn-button, [data-tab-id=learn]").first).to_have_text("Learn", timeout=LONG)
    expect(page.locator("#learn-progress")).to_contain_text("Level 1: read 5/5, quizzes passed 5/5 ✓ complete",
                                                            timeout=LONG)
    expect(page.locator("#learn-body")).to_contain_text(course.list_topics("en", 1)[0].title, timeout=LONG)
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshot_dir / "learn-en.png"), full_page=True)
    assert not errors, errors
    assert first.locator("#learn-progress").is_visible()
