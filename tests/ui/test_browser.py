"""The web UI in real headless Chromium: upload -> preview -> train -> live chart -> chat, in English and Japanese."""
from __future__ import annotations

import re
import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LONG = 600_000  # ms: training and generation share 2 cores with other test runs
BAD_LINES = ('{"instruction": "ok", "output": "fine"}\n'
             '{"instruction": "broken" "output": "x"}\n'
             '{"instruction": "no answer"}\n'
             '[1, 2]\n')


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def goto_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    expect(page.get_by_role("tab", name=name, exact=True)).to_have_attribute("aria-selected", "true")


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Tab")


def shot(page, directory, name: str) -> None:
    page.wait_for_timeout(300)  # let charts finish their transition
    page.screenshot(path=str(directory / f"{name}.png"), full_page=True)


def current_step(page) -> int:
    match = re.search(r"(?:step|ステップ中) (\d+)", page.locator("#mon-summary").inner_text())
    return int(match.group(1)) if match else 0


def upload(page, path, status: str) -> None:
    page.locator("#ds-upload input[type=file]").set_input_files(str(path))
    expect(page.locator("#ds-status")).to_contain_text(status, timeout=LONG)


def check_bad_file(page, tmp_path, headers: tuple[str, ...]) -> None:
    """A broken file is refused and every problem is listed with its line and field."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text(BAD_LINES, encoding="utf-8")
    page.locator("#ds-upload input[type=file]").set_input_files(str(bad))
    errors = page.locator("#ds-errors")
    expect(errors).to_be_visible(timeout=LONG)
    for text in (*headers, "bad_json", "missing_field", "not_object", "output"):
        expect(errors).to_contain_text(text)
    rows = errors.locator("[role=row].virtual-row")
    texts = [rows.nth(i).inner_text() for i in range(rows.count())]
    lines = {text.split()[0] for text in texts if text.split()}
    assert {"2", "3", "4"} <= lines, texts


def train_and_watch(page, model_name: str, texts: dict[str, str], max_steps: int, watch_chart: bool) -> str:
    """Fill the form, start, watch the loss chart grow while the job runs; return the new model id."""
    expect(page.locator("#train-dataset input")).not_to_have_value("", timeout=LONG)
    page.locator("#train-recommend").click()
    expect(page.locator("#train-advice")).to_contain_text(texts["advice"], timeout=LONG)
    expect(page.locator("#train-estimate")).to_contain_text(texts["estimate"], timeout=LONG)
    for elem_id, value in (("train-max_steps", str(max_steps)), ("train-per_device_train_batch_size", "2"),
                           ("train-max_seq_length", "128"), ("train-warmup_steps", "0")):
        if elem_id == "train-warmup_steps":
            page.locator("#train-max_steps").scroll_into_view_if_needed()
            page.get_by_text(texts["more"], exact=True).click()
        fill(page, elem_id, value)
    page.locator("#train-model-name textarea, #train-model-name input").first.fill(model_name)
    page.wait_for_timeout(500)
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("job-", timeout=LONG)
    job_id = re.search(r"job-[\w-]+", page.locator("#train-status").inner_text()).group(0)
    expect(page.get_by_role("tab", name=texts["monitor"], exact=True)).to_have_attribute(
        "aria-selected", "true", timeout=LONG)
    summary = page.locator("#mon-summary")
    expect(summary).to_contain_text(job_id, timeout=LONG)
    if watch_chart:  # the chart keeps updating without a reload: its drawing changes between two observed steps
        deadline = time.monotonic() + LONG / 1000
        first = None
        while time.monotonic() < deadline:
            text = summary.inner_text()
            step = current_step(page)
            if 1 <= step < max_steps and first is None and page.locator("#mon-loss svg").count():
                first = (step, page.locator("#mon-loss").inner_html())
            if first and step > first[0] and page.locator("#mon-loss").inner_html() != first[1]:
                break
            if texts["failed"] in text or texts["succeeded"] in text:
                pytest.fail(f"the job ended before the chart was seen updating: {text}")
            page.wait_for_timeout(300)
        else:
            pytest.fail(f"the loss chart did not update: {summary.inner_text()}")
    expect(summary).to_contain_text(texts["succeeded"], timeout=LONG)
    expect(page.locator("#mon-loss svg [aria-roledescription='line mark']").first).to_be_attached()
    expect(summary).to_contain_text(f"{max_steps}")
    expect(page.locator("#mon-bar")).to_have_attribute("aria-valuenow", "100")
    model_id = re.search(r"ft-[\w-]+", summary.inner_text()).group(0)
    return model_id


def chat_side_by_side(page, model_id: str, texts: dict[str, str]) -> None:
    """Side-by-side: one prompt goes to the tuned model (left) and its base (right); both answer, streamed."""
    expect(page.locator("#pg-model input")).to_have_value(re.compile(model_id), timeout=LONG)
    page.locator("#pg-side input[type=checkbox]").check()
    expect(page.locator("#pg-compare input")).to_have_value(re.compile("smollm2-135m-instruct"))
    fill(page, "pg-max_new_tokens", "24")
    page.locator("#pg-prompt textarea").fill(texts["question"])
    page.locator("#pg-prompt textarea").press("Enter")
    for side in ("#pg-chat-a", "#pg-chat-b"):
        expect(page.locator(side)).to_contain_text(texts["question"], timeout=LONG)
        bot = page.locator(f"{side} .message-row.bot-row, {side} [data-testid=bot]").last
        expect(bot).to_have_text(re.compile(r"\S"), timeout=LONG)
    expect(page.locator("#pg-send")).to_be_enabled(timeout=LONG)


@pytest.mark.model
@pytest.mark.timeout(1500)
def test_english_flow(open_page, screenshot_dir, tmp_path):
    from loralab.data import sample_path

    watch = open_page("en-US")
    page = watch.page
    expect(page.locator("#app-title")).to_contain_text("LoRA fine-tuning studio", timeout=LONG)
    expect(page.locator("#lang-toggle input[value=en]")).to_be_checked()

    goto_tab(page, "Datasets")
    check_bad_file(page, tmp_path, ("Line", "Field", "Code", "Message"))
    upload(page, sample_path("basic_qa"), "format alpaca detected, 5 rows")
    expect(page.locator("#ds-errors")).to_be_hidden()
    expect(page.locator("#ds-preview")).to_contain_text("What is loralab?", timeout=LONG)
    expect(page.locator("#ds-page-info")).to_contain_text("Rows 1-5 of 5")
    expect(page.locator("#ds-hist-summary")).to_contain_text("tokens in all", timeout=LONG)
    shot(page, screenshot_dir, "datasets-en")

    goto_tab(page, "Train")
    texts = {"advice": "Recommended for", "estimate": "Trainable parameters", "more": "More settings",
             "monitor": "Job monitor", "succeeded": "succeeded", "failed": "Failed:"}
    expect(page.locator("#train-qlora input")).to_be_disabled()
    expect(page.locator("#train-qlora")).to_contain_text("needs a CUDA GPU")
    shot(page, screenshot_dir, "train-en")
    model_id = train_and_watch(page, "ui-en", texts, max_steps=8, watch_chart=True)
    shot(page, screenshot_dir, "monitor-en")

    page.locator("#mon-try").click()
    chat_side_by_side(page, model_id, {"question": "What is loralab?"})
    shot(page, screenshot_dir, "playground-en")

    goto_tab(page, "Models")
    expect(page.locator("#mdl-table")).to_contain_text(model_id, timeout=LONG)
    page.locator("#mdl-stage").get_by_text("staging", exact=True).click()
    page.locator("#mdl-set-stage").click()
    expect(page.locator("#mdl-status")).to_contain_text("stage staging", timeout=LONG)
    page.locator("#mdl-deploy").click()
    expect(page.locator("#mdl-status")).to_contain_text("deployed yes", timeout=LONG)
    expect(page.locator("#mdl-details")).to_contain_text("dataset_id", timeout=LONG)
    shot(page, screenshot_dir, "models-en")

    goto_tab(page, "Dashboard")
    expect(page.locator("#dash-recent")).to_contain_text("succeeded", timeout=LONG)
    expect(page.locator("#dash-system")).to_contain_text("CPU cores")
    shot(page, screenshot_dir, "dashboard-en")


@pytest.mark.model
@pytest.mark.timeout(1500)
def test_japanese_flow(open_page, screenshot_dir, tmp_path):
    from loralab.data import sample_path

    watch = open_page("ja-JP")
    page = watch.page
    expect(page.locator("#app-title")).to_contain_text("LoRA ファインチューニング スタジオ", timeout=LONG)
    for name in ("ダッシュボード", "データセット", "学習", "ジョブモニター", "プレイグラウンド", "モデル"):
        expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
    # the header switch changes every label at once, and back
    page.locator("#lang-toggle").get_by_text("English", exact=True).click()
    expect(page.get_by_role("tab", name="Job monitor", exact=True)).to_be_visible(timeout=LONG)
    page.locator("#lang-toggle").get_by_text("日本語", exact=True).click()
    expect(page.get_by_role("tab", name="ジョブモニター", exact=True)).to_be_visible(timeout=LONG)
    shot(page, screenshot_dir, "dashboard-ja")

    goto_tab(page, "データセット")
    check_bad_file(page, tmp_path, ("行", "フィールド", "コード", "メッセージ"))
    expect(page.locator("#ds-status")).to_contain_text("ファイルは保存されませんでした")
    upload(page, sample_path("basic_qa"), "検出された形式: alpaca")
    expect(page.locator("#ds-preview")).to_contain_text("What is loralab?", timeout=LONG)
    expect(page.locator("#ds-page-info")).to_contain_text("5 行中 1〜5 行目")
    expect(page.locator("#ds-hist-summary")).to_contain_text("トークン", timeout=LONG)
    shot(page, screenshot_dir, "datasets-ja")

    goto_tab(page, "学習")
    expect(page.locator("#train-learning_rate")).to_contain_text("AdamW の最大学習率")
    expect(page.locator("#train-qlora")).to_contain_text("CUDA GPU が必要")
    texts = {"advice": "おすすめ", "estimate": "学習するパラメーター", "more": "その他の設定",
             "monitor": "ジョブモニター", "succeeded": "成功", "failed": "失敗:"}
    shot(page, screenshot_dir, "train-ja")
    model_id = train_and_watch(page, "ui-ja", texts, max_steps=3, watch_chart=False)
    expect(page.locator("#mon-summary")).to_contain_text("結果: モデル")
    shot(page, screenshot_dir, "monitor-ja")

    page.locator("#mon-try").click()
    chat_side_by_side(page, model_id, {"question": "loralab とは何ですか？"})
    shot(page, screenshot_dir, "playground-ja")

    goto_tab(page, "モデル")
    expect(page.locator("#mdl-table")).to_contain_text(model_id, timeout=LONG)
    expect(page.locator("#mdl-table")).to_contain_text("下書き")
    shot(page, screenshot_dir, "models-ja")
