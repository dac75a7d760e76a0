"""Learn page: levels and topics, quizzes with instant feedback, tokenizer view, LoRA calculator, guided fine-tune.

Progress is saved per browser (an id kept in gr.BrowserState) through services.learning, in the database.
"""
from __future__ import annotations

import html
import os
import secrets
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from loralab.learn import course
from loralab.services import learning, registry
from loralab.services.errors import LoralabError
from loralab.spec import EMBEDDED_MODEL
from loralab.ui.i18n import format_bytes, format_count, register_strings, t

MAX_QUESTIONS = 6  # quiz files allow up to 6 questions; slots beyond a quiz's length are hidden
GUIDED_POLL_SECONDS = 2.0
TOKEN_EXAMPLE = "LoRA adapts a model. LoRA はモデルを効率よく調整します。"

register_strings({
    "tab.learn": ("Learn", "学習センター"),
    "learn.progress_title": ("Your progress", "あなたの進捗"),
    "learn.progress_line": ("**{percent}%** done: {read}/{topics} topics read, {passed}/{topics} quizzes passed, "
                            "guided steps {guided}/{guided_total}.",
                            "達成率 **{percent}%**: 既読 {read}/{topics} トピック、合格したクイズ {passed}/{topics}、"
                            "ガイド付きステップ {guided}/{guided_total}。"),
    "learn.level_line": ("Level {level}: read {read}/{topics}, quizzes passed {passed}/{topics}{complete}",
                         "レベル {level}: 既読 {read}/{topics}、クイズ合格 {passed}/{topics}{complete}"),
    "learn.complete": (" ✓ complete", " ✓ 修了"),
    "learn.level": ("Level {n}", "レベル {n}"),
    "learn.level_pick": ("Level", "レベル"),
    "learn.topic_pick": ("Topic", "トピック"),
    "learn.read": ("Mark as read", "読んだ"),
    "learn.read_done": ("✓ Read.", "✓ 既読です。"),
    "learn.minutes": ("{minutes} min read", "約 {minutes} 分"),
    "learn.steps": ("Hands-on steps", "ハンズオン"),
    "learn.check_steps": ("Check my hands-on steps", "ハンズオンの達成を確認"),
    "learn.step_ok": ("✓ {step}: done", "✓ {step}: 完了"),
    "learn.step_todo": ("○ {step}: to do: {reason}", "○ {step}: 未完了: {reason}"),
    "learn.quiz": ("Quiz", "クイズ"),
    "learn.quiz_info": ("Pick an answer to see at once whether it is right, and why.",
                        "答えを選ぶと、正解かどうかと、その理由がすぐに表示されます。"),
    "learn.right": ("✓ Correct. {explanation}", "✓ 正解です。{explanation}"),
    "learn.wrong": ("✗ Not quite. {explanation}\n\n**Right answer: {answer}**: {correct}",
                    "✗ 不正解です。{explanation}\n\n**正解: {answer}**: {correct}"),
    "learn.submit": ("Save my answers", "答えを提出"),
    "learn.retake": ("Retake the quiz", "クイズをやり直す"),
    "learn.unanswered": ("Answer every question first ({n} left).", "先にすべての問題に答えてください（残り {n} 問）。"),
    "learn.score": ("Score {score}/{total} ({percent:.0f}%). {verdict}",
                    "得点 {score}/{total}（{percent:.0f}%）。{verdict}"),
    "learn.passed": ("Passed: well done!", "合格です。お疲れさまでした！"),
    "learn.failed": ("Not passed yet (two thirds needed): reread the topic and retake the quiz.",
                     "まだ合格ではありません（3 分の 2 以上で合格）。トピックを読み直して再挑戦しましょう。"),
    "learn.attempts": ("Attempts: {attempts} · best {best}/{total} · latest {latest}/{total}{passed}",
                       "受験回数: {attempts} 回 · 最高 {best}/{total} · 最新 {latest}/{total}{passed}"),
    "learn.attempts_passed": (" · passed", " · 合格済み"),
    "learn.tokenizer": ("Tokenizer view", "トークナイザーを見る"),
    "learn.tok_info": ("Type any text (Japanese too) and see the real tokens and ids of the model's tokenizer.",
                       "日本語を含む任意のテキストを入力すると、モデルのトークナイザーが実際に作るトークンと ID が見られます。"),
    "learn.model": ("Base model", "ベースモデル"),
    "learn.text": ("Text", "テキスト"),
    "learn.tokenize": ("Tokenize", "トークン化"),
    "learn.tok_summary": ("{count} tokens for {chars} characters ({bytes} UTF-8 bytes): {ratio:.2f} tokens per "
                          "character. Dashed tokens hold only part of a character (its UTF-8 bytes shown).",
                          "{chars} 文字（UTF-8 で {bytes} バイト）が {count} トークンになりました（1 文字あたり "
                          "{ratio:.2f} トークン）。点線のトークンは文字の一部（UTF-8 のバイト）だけを持っています。"),
    "learn.calculator": ("LoRA calculator", "LoRA 計算機"),
    "learn.calc_info": ("Trainable parameters and adapter size, counted from the model's real config (as PEFT "
                        "counts them).",
                        "モデルの実際の設定から、学習するパラメーター数とアダプターのサイズを数えます（PEFT と同じ数え方）。"),
    "learn.r": ("Rank r", "ランク r"),
    "learn.alpha": ("lora_alpha (scale = alpha / r)", "lora_alpha（スケール = alpha / r）"),
    "learn.targets": ("Target modules", "対象モジュール"),
    "learn.targets_info": ("'all-linear' or names such as q_proj,v_proj", "「all-linear」または q_proj,v_proj などの名前"),
    "learn.calculate": ("Calculate", "計算する"),
    "learn.calc_result": ("**{trainable}** trainable parameters ({percent:.3f}% of {total}); adapter **{size32}** in "
                          "fp32, **{size16}** in fp16/bf16; update scaled by lora_alpha / r = {scaling:g}.",
                          "学習するパラメーターは **{trainable}**（全 {total} の {percent:.3f}%）。アダプターのサイズは "
                          "fp32 で **{size32}**、fp16/bf16 で **{size16}**。更新は lora_alpha / r = {scaling:g} 倍されます。"),
    "learn.col_module": ("Module", "モジュール"),
    "learn.col_count": ("Count", "個数"),
    "learn.col_shape": ("in → out", "入力 → 出力"),
    "learn.col_params": ("LoRA parameters", "LoRA パラメーター"),
    "learn.guided": ("Guided fine-tune (level 1)", "ガイド付きファインチューニング（レベル 1）"),
    "learn.guided_info": ("Three real steps on this server: upload the 5-row sample dataset, fine-tune the embedded "
                          "model on it (a real job in the queue), then ask the base and the tuned model the same "
                          "questions.",
                          "このサーバーで実際に動く 3 ステップです。5 行のサンプルデータセットをアップロードし、内蔵モデルを"
                          "それでファインチューニングし（キューに入る本物のジョブ）、ベースモデルと学習後のモデルに同じ質問をします。"),
    "learn.g.upload-sample": ("1. Upload the sample dataset", "1. サンプルデータセットをアップロード"),
    "learn.g.fine-tune": ("2. Fine-tune the embedded model", "2. 内蔵モデルをファインチューニング"),
    "learn.g.compare": ("3. Compare answers: base vs tuned", "3. 回答を比較（ベース vs 学習後）"),
    "learn.g_done": ("✓ done", "✓ 完了"),
    "learn.g_todo": ("○ to do", "○ 未完了"),
    "learn.g_running": ("⏳ training: {status} {percent}", "⏳ 学習中: {status} {percent}"),
    "learn.g_failed": ("✗ the job {status}: start it again", "✗ ジョブが{status}になりました。もう一度開始してください"),
    "learn.g_uploaded": ("Dataset {id} ({rows} rows) is ready.", "データセット {id}（{rows} 行）の準備ができました。"),
    "learn.g_started": ("Job {id} is {status}: training starts when a worker picks it up.",
                        "ジョブ {id} は{status}です。ワーカーが受け取ると学習が始まります。"),
    "learn.g_compared": ("Compared {n} questions: {matched} tuned answers equal the training answer.",
                         "{n} 問を比較しました。学習後の回答のうち {matched} 件が学習データの答えと一致しました。"),
    "learn.g_comparing": ("Generating answers with both models...", "両方のモデルで回答を生成しています..."),
    "learn.col_question": ("Question", "質問"),
    "learn.col_base": ("Base model", "ベースモデル"),
    "learn.col_tuned": ("Fine-tuned", "学習後"),
    "learn.dash_title": ("Learning center", "学習センター"),
    "learn.dash_go": ("Open the learning center", "学習センターを開く"),
})

STEP_COLUMNS = ("learn.col_module", "learn.col_count", "learn.col_shape", "learn.col_params")
COMPARE_COLUMNS = ("learn.col_question", "learn.col_base", "learn.col_tuned")


def browser_secret(home: Path) -> str:
    """A per-installation key for the browser id (BrowserState encrypts with it), kept so ids survive restarts."""
    path = home / "learn" / "browser-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made earlier (or just now by another process)
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(16))
    return path.read_text().strip()


def ensure_user(user: str | None) -> str:
    """The browser's learner id, or a new one ('b-' + 16 hex digits) for a browser seen for the first time."""
    if isinstance(user, str) and learning.USER_RE.fullmatch(user):
        return user
    return f"b-{secrets.token_hex(8)}"


def _lang(lang: str | None) -> str:
    return lang if lang in ("en", "ja") else "en"


# ---- rendering ----------------------------------------------------------------------------------------------------

def progress_markdown(progress: dict[str, Any], lang: str) -> str:
    s = progress["summary"]
    lines = [f"### {t(lang, 'learn.progress_title')}",
             t(lang, "learn.progress_line", percent=f"{s['percent']:g}", read=s["read"], topics=s["topics"],
               passed=s["quizzes_passed"], guided=s["guided_done"], guided_total=s["guided_total"]), ""]
    for level in progress["levels"]:
        lines.append("- " + t(lang, "learn.level_line", level=level["level"], read=level["read"],
                              topics=level["topics"], passed=level["quizzes_passed"],
                              complete=t(lang, "learn.complete") if level["complete"] else ""))
    return "\n".join(lines)


def dashboard_markdown(svc, user: str | None, lang: str) -> str:
    """The learning progress shown on the dashboard (a browser never seen before has none yet)."""
    lang = _lang(lang)
    known = isinstance(user, str) and learning.USER_RE.fullmatch(user)
    try:
        progress = learning.get_progress(svc, user if known else "b-new", lang)
    except LoralabError as exc:  # never break the page-load chain the dashboard runs in
        return _error(lang, exc)
    text = progress_markdown(progress, lang)
    return text.replace(t(lang, "learn.progress_title"), t(lang, "learn.dash_title"), 1)


def topic_choices(progress: dict[str, Any], level: int) -> list[tuple[str, str]]:
    out = []
    for topic in progress["topics"]:
        if topic["level"] != level:
            continue
        marks = ("✓ " if topic["read"] else "") + ("★ " if topic["quiz"] and topic["quiz"]["passed"] else "")
        out.append((f"{marks}{topic['code']} {topic['title']}", topic["id"]))
    return out


def topic_markdown(topic: course.Topic, entry: dict[str, Any] | None, lang: str) -> str:
    done = {s["id"] for s in (entry or {}).get("steps", []) if s["done"]}
    parts = [f"## {topic.code} {topic.title}", f"*{topic.summary}* ({t(lang, 'learn.minutes', minutes=topic.minutes)})",
             "", topic.body]
    if topic.steps:
        parts += ["", f"### {t(lang, 'learn.steps')}"]
        parts += [f"{n}. {'✓ ' if s.id in done else ''}{s.instruction}" for n, s in enumerate(topic.steps, 1)]
    return "\n".join(parts)


def quiz_info(entry: dict[str, Any] | None, lang: str) -> str:
    quiz = (entry or {}).get("quiz")
    if not quiz:
        return t(lang, "learn.quiz_info")
    return t(lang, "learn.attempts", attempts=quiz["attempts"], best=quiz["best"]["score"],
             latest=quiz["latest"]["score"], total=quiz["best"]["total"],
             passed=t(lang, "learn.attempts_passed") if quiz["passed"] else "")


def quiz_slots(topic: course.Topic | None) -> list[Any]:
    """One Radio update per question slot (fresh and answerable) and one empty feedback per slot."""
    questions = topic.quiz.questions if topic else []
    radios, feedback = [], []
    for index in range(MAX_QUESTIONS):
        if index < len(questions):
            q = questions[index]
            radios.append(gr.Radio(choices=[(c.text, c.id) for c in q.choices], value=None,
                                   label=f"{index + 1}. {q.prompt}", visible=True, interactive=True))
        else:
            radios.append(gr.Radio(choices=[], value=None, visible=False))
        feedback.append(gr.Markdown("", visible=index < len(questions)))
    return radios + feedback


def feedback_text(result: dict[str, Any], question: course.Question, lang: str) -> str:
    if result["correct"]:
        return t(lang, "learn.right", explanation=result["explanation"])
    right = question.correct_choice
    return t(lang, "learn.wrong", explanation=result["explanation"], answer=right.text,
             correct=result["correct_explanation"])


def guided_markdown(steps: list[dict[str, Any]], lang: str) -> str:
    lines = []
    for step in steps:
        status, evidence = step["status"], step["evidence"]
        if status == "done":
            state = t(lang, "learn.g_done")
        elif status == "running":
            percent = evidence.get("progress")
            state = t(lang, "learn.g_running", status=t(lang, f"status.{evidence.get('job_status', 'queued')}"),
                      percent="" if percent is None else f"{percent:.0f}%")
        elif status == "failed":
            state = t(lang, "learn.g_failed", status=t(lang, f"status.{evidence.get('job_status', 'failed')}"))
        else:
            state = t(lang, "learn.g_todo")
        ids = " ".join(f"`{evidence[k]}`" for k in ("dataset_id", "job_id", "model_id") if evidence.get(k))
        lines.append(f"- **{t(lang, 'learn.g.' + step['id'])}**: {state} {ids}".rstrip())
    return "\n".join(lines)


def token_html(result: dict[str, Any], lang: str) -> str:
    """Token chips: the characters each token completes (or its bytes when it holds part of one) and its id."""
    chips = []
    for token in result["tokens"]:
        shown = token["chars"] if token["chars"] and not token["partial"] else (
            token["bytes"] or token["token"])
        if token["partial"] and token["chars"]:
            shown = f"{token['bytes'] or token['token']} → {token['chars']}"
        style = "border:1px dashed var(--neutral-400)" if token["partial"] else "border:1px solid var(--neutral-300)"
        text = html.escape(shown).replace(" ", "␣").replace("\n", "↵")
        chips.append(f'<span class="learn-token" title="{html.escape(token["token"])}" style="display:inline-block;'
                     f'margin:2px;padding:2px 6px;border-radius:6px;{style}"><span>{text}</span>'
                     f'<br><small style="color:var(--neutral-500)">{token["id"]}</small></span>')
    ratio = result["count"] / max(1, result["characters"])
    summary = t(lang, "learn.tok_summary", count=result["count"], chars=result["characters"], bytes=result["bytes"],
                ratio=ratio)
    return f'<p id="learn-tok-summary">{html.escape(summary)}</p><div>{"".join(chips)}</div>'


def base_choices(svc) -> list[str]:
    return [m["id"] for m in registry.base_models(svc) if m.get("available", True)] or [EMBEDDED_MODEL]


def _error(lang: str, exc: LoralabError) -> str:
    return t(lang, "common.error", message=exc.message)


# ---- layout ---------------------------------------------------------------------------------------------------------

def build(ctx) -> dict[str, Any]:
    """Lay out the Learn page; content is filled on load, on language change and by the page's own events."""
    labels = ctx.labels
    # rendered in connect(), outside the tabs: a component in a tab never visited is not mounted, so it would
    # not read its value from localStorage on page load
    user = gr.BrowserState(None, storage_key="loralab-learn-user", secret=browser_secret(ctx.svc.settings.home),
                           render=False)
    progress = gr.Markdown(elem_id="learn-progress")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            level = labels.add(gr.Radio([(t("en", "learn.level", n=n), n) for n in (1, 2, 3)], value=1,
                                        label=t("en", "learn.level_pick"), elem_id="learn-level"),
                               label="learn.level_pick",
                               choices=lambda lang: [(t(lang, "learn.level", n=n), n) for n in (1, 2, 3)])
            topic = labels.add(gr.Radio([], label=t("en", "learn.topic_pick"), elem_id="learn-topic"),
                               label="learn.topic_pick")
        with gr.Column(scale=3):
            body = gr.Markdown(elem_id="learn-body")
            with gr.Row():
                read = labels.add(gr.Button(t("en", "learn.read"), variant="primary", elem_id="learn-read", scale=0,
                                            min_width=160), value="learn.read")
                check_steps = labels.add(gr.Button(t("en", "learn.check_steps"), elem_id="learn-check-steps",
                                                   scale=0, min_width=220), value="learn.check_steps")
            read_status = gr.Markdown(elem_id="learn-read-status")
            labels.add(gr.Markdown(f"### {t('en', 'learn.quiz')}"), value=lambda lang: f"### {t(lang, 'learn.quiz')}")
            info = gr.Markdown(elem_id="learn-quiz-info")
            radios, feedback = [], []
            for index in range(MAX_QUESTIONS):
                radios.append(gr.Radio([], visible=False, elem_id=f"learn-q{index}"))
                feedback.append(gr.Markdown(visible=False, elem_id=f"learn-fb{index}"))
            with gr.Row():
                submit = labels.add(gr.Button(t("en", "learn.submit"), variant="primary", elem_id="learn-submit"),
                                    value="learn.submit")
                retake = labels.add(gr.Button(t("en", "learn.retake"), elem_id="learn-retake"), value="learn.retake")
            result = gr.Markdown(elem_id="learn-quiz-result")

    with labels.add(gr.Accordion(t("en", "learn.guided"), open=True, elem_id="learn-guided-box"),
                    label="learn.guided"):
        labels.add(gr.Markdown(t("en", "learn.guided_info")), value="learn.guided_info")
        guided = gr.Markdown(elem_id="learn-guided")
        with gr.Row():
            g_upload = labels.add(gr.Button(t("en", "learn.g.upload-sample"), elem_id="learn-g-upload"),
                                  value="learn.g.upload-sample")
            g_train = labels.add(gr.Button(t("en", "learn.g.fine-tune"), elem_id="learn-g-train"),
                                 value="learn.g.fine-tune")
            g_compare = labels.add(gr.Button(t("en", "learn.g.compare"), elem_id="learn-g-compare"),
                                   value="learn.g.compare")
        g_status = gr.Markdown(elem_id="learn-g-status")
        compare = labels.add(gr.Dataframe(pd.DataFrame([], columns=[t("en", k) for k in COMPARE_COLUMNS]),
                                          interactive=False, wrap=True, visible=False, elem_id="learn-compare",
                                          column_widths=["20%", "40%", "40%"]),
                             label="learn.g.compare")
        timer = gr.Timer(GUIDED_POLL_SECONDS, active=False)

    with labels.add(gr.Accordion(t("en", "learn.tokenizer"), open=True, elem_id="learn-tok-box"),
                    label="learn.tokenizer"):
        labels.add(gr.Markdown(t("en", "learn.tok_info")), value="learn.tok_info")
        with gr.Row():
            tok_model = labels.add(gr.Dropdown([EMBEDDED_MODEL], value=EMBEDDED_MODEL, label=t("en", "learn.model"),
                                               allow_custom_value=True, elem_id="learn-tok-model", scale=1),
                                   label="learn.model")
            tok_text = labels.add(gr.Textbox(TOKEN_EXAMPLE, label=t("en", "learn.text"), lines=2, max_length=5000,
                                             elem_id="learn-tok-text", scale=3), label="learn.text")
        tok_run = labels.add(gr.Button(t("en", "learn.tokenize"), elem_id="learn-tok-run"), value="learn.tokenize")
        tok_out = gr.HTML(elem_id="learn-tok-out")

    with labels.add(gr.Accordion(t("en", "learn.calculator"), open=True, elem_id="learn-calc-box"),
                    label="learn.calculator"):
        labels.add(gr.Markdown(t("en", "learn.calc_info")), value="learn.calc_info")
        with gr.Row():
            calc_model = labels.add(gr.Dropdown([EMBEDDED_MODEL], value=EMBEDDED_MODEL, label=t("en", "learn.model"),
                                                allow_custom_value=True, elem_id="learn-calc-model"),
                                    label="learn.model")
            calc_r = labels.add(gr.Number(8, precision=0, minimum=1, maximum=1024, label=t("en", "learn.r"),
                                          elem_id="learn-calc-r"), label="learn.r")
            calc_alpha = labels.add(gr.Number(16, label=t("en", "learn.alpha"), elem_id="learn-calc-alpha"),
                                    label="learn.alpha")
            calc_targets = labels.add(gr.Textbox("all-linear", label=t("en", "learn.targets"),
                                                 info=t("en", "learn.targets_info"), elem_id="learn-calc-targets"),
                                      label="learn.targets", info="learn.targets_info")
        calc_run = labels.add(gr.Button(t("en", "learn.calculate"), elem_id="learn-calc-run"), value="learn.calculate")
        calc_out = gr.Markdown(elem_id="learn-calc-out")
        calc_table = gr.Dataframe(pd.DataFrame([], columns=[t("en", k) for k in STEP_COLUMNS]), interactive=False,
                                  visible=False, elem_id="learn-calc-table")
    return {"user": user, "progress": progress, "level": level, "topic": topic, "body": body, "read": read,
            "check_steps": check_steps, "read_status": read_status, "info": info, "radios": radios,
            "feedback": feedback, "submit": submit, "retake": retake, "result": result, "guided": guided,
            "g_upload": g_upload, "g_train": g_train, "g_compare": g_compare, "g_status": g_status,
            "compare": compare, "timer": timer, "tok_model": tok_model, "tok_text": tok_text, "tok_run": tok_run,
            "tok_out": tok_out, "calc_model": calc_model, "calc_r": calc_r, "calc_alpha": calc_alpha,
            "calc_targets": calc_targets, "calc_run": calc_run, "calc_out": calc_out, "calc_table": calc_table}


# ---- events ---------------------------------------------------------------------------------------------------------

def connect(ctx) -> None:
    """Wire the page: everything goes through services.learning with the browser's learner id."""
    p = ctx.pages["learn"]
    svc = ctx.svc
    private = {"api_visibility": "private"}
    lang_in = ctx.lang
    p["user"].render()
    radios, feedback = p["radios"], p["feedback"]

    def topic_of(topic_id: str | None, lang: str) -> course.Topic | None:
        try:
            return course.get_topic(topic_id, _lang(lang)) if topic_id else None
        except course.CourseError:
            return None

    def entry_of(progress: dict[str, Any], topic_id: str | None) -> dict[str, Any] | None:
        return next((e for e in progress["topics"] if e["id"] == topic_id), None)

    def show_topic(user: str, level: int, topic_id: str | None, lang: str, keep_quiz: bool = False):
        """Progress, topic list, body, quiz info (+ a fresh quiz unless keep_quiz) for one topic."""
        lang = _lang(lang)
        progress = learning.get_progress(svc, user, lang)
        choices = topic_choices(progress, int(level or 1))
        ids = [value for _, value in choices]
        topic_id = topic_id if topic_id in ids else (ids[0] if ids else None)
        topic = topic_of(topic_id, lang)
        entry = entry_of(progress, topic_id)
        out = [progress_markdown(progress, lang), gr.Radio(choices=choices, value=topic_id),
               topic_markdown(topic, entry, lang) if topic else "", quiz_info(entry, lang)]
        if keep_quiz:
            return out
        return out + ["", ""] + quiz_slots(topic)

    page_outputs = [p["progress"], p["topic"], p["body"], p["info"]]
    quiz_outputs = [p["read_status"], p["result"], *radios, *feedback]

    def load(user: str | None, level: int, topic_id: str | None, lang: str):
        user = ensure_user(user)
        lang = _lang(lang)
        steps = learning.guided_status(svc, user)
        bases = base_choices(svc)
        running = any(s["status"] == "running" for s in steps)
        return [user, *show_topic(user, level, topic_id, lang), guided_markdown(steps, lang),
                gr.Timer(active=running), gr.Dropdown(choices=bases), gr.Dropdown(choices=bases)]

    load_outputs = [p["user"], *page_outputs, *quiz_outputs, p["guided"], p["timer"], p["tok_model"],
                    p["calc_model"]]
    ctx.on_language.append((load, [p["user"], p["level"], p["topic"], lang_in], load_outputs))
    ctx.tab_items["learn"].select(load, inputs=[p["user"], p["level"], p["topic"], lang_in], outputs=load_outputs,
                                  **private)

    p["level"].input(lambda u, lv, lg: show_topic(ensure_user(u), lv, None, lg),
                     inputs=[p["user"], p["level"], lang_in], outputs=page_outputs + quiz_outputs, **private)
    p["topic"].input(lambda u, lv, tp, lg: show_topic(ensure_user(u), lv, tp, lg),
                     inputs=[p["user"], p["level"], p["topic"], lang_in], outputs=page_outputs + quiz_outputs,
                     **private)

    def mark_read(user, level, topic_id, lang):
        lang = _lang(lang)
        if not topic_id:
            return [gr.update()] * 4 + [""]
        try:
            learning.mark_read(svc, user, topic_id)
        except LoralabError as exc:
            return [gr.update()] * 4 + [_error(lang, exc)]
        return [*show_topic(user, level, topic_id, lang, keep_quiz=True), t(lang, "learn.read_done")]

    p["read"].click(mark_read, inputs=[p["user"], p["level"], p["topic"], lang_in],
                    outputs=[*page_outputs, p["read_status"]], **private)

    def check_steps(user, level, topic_id, lang):
        lang = _lang(lang)
        topic = topic_of(topic_id, lang)
        if topic is None or not topic.steps:
            return [gr.update()] * 4 + [""]
        lines = []
        for step in topic.steps:
            try:
                learning.mark_step(svc, user, topic.id, step.id)
                lines.append("- " + t(lang, "learn.step_ok", step=step.id))
            except LoralabError as exc:
                lines.append("- " + t(lang, "learn.step_todo", step=step.id, reason=exc.message))
        return [*show_topic(user, level, topic_id, lang, keep_quiz=True), "\n".join(lines)]

    p["check_steps"].click(check_steps, inputs=[p["user"], p["level"], p["topic"], lang_in],
                           outputs=[*page_outputs, p["read_status"]], **private)

    def answer(index: int):
        def react(topic_id, choice_id, lang):
            lang = _lang(lang)
            topic = topic_of(topic_id, lang)
            if topic is None or choice_id is None or index >= len(topic.quiz.questions):
                return gr.update(), gr.update()
            question = topic.quiz.questions[index]
            try:
                result = learning.check_answer(topic.id, question.id, choice_id, lang)
            except LoralabError as exc:
                return _error(lang, exc), gr.update()
            # the first answer counts: the choice is locked until the quiz is retaken
            return feedback_text(result, question, lang), gr.Radio(interactive=False)
        return react

    for index, radio in enumerate(radios):
        radio.input(answer(index), inputs=[p["topic"], radio, lang_in], outputs=[feedback[index], radio], **private)

    def submit(user, level, topic_id, lang, *values):
        lang = _lang(lang)
        topic = topic_of(topic_id, lang)
        if topic is None:
            return [gr.update()] * 4 + [""]
        questions = topic.quiz.questions
        answers = {q.id: v for q, v in zip(questions, values) if v}
        if len(answers) < len(questions):
            return [gr.update()] * 4 + [t(lang, "learn.unanswered", n=len(questions) - len(answers))]
        try:
            graded = learning.submit_quiz(svc, user, topic.id, answers, lang)
        except LoralabError as exc:
            return [gr.update()] * 4 + [_error(lang, exc)]
        verdict = t(lang, "learn.passed" if graded["passed"] else "learn.failed")
        text = t(lang, "learn.score", score=graded["score"], total=graded["total"], percent=graded["percent"],
                 verdict=verdict)
        return [*show_topic(user, level, topic.id, lang, keep_quiz=True), text]

    p["submit"].click(submit, inputs=[p["user"], p["level"], p["topic"], lang_in, *radios],
                      outputs=[*page_outputs, p["result"]], **private)
    p["retake"].click(lambda tp, lg: ["", *quiz_slots(topic_of(tp, lg))], inputs=[p["topic"], lang_in],
                      outputs=[p["result"], *radios, *feedback], **private)

    # ---- tools
    def tokenize(model, text, lang):
        lang = _lang(lang)
        try:
            return token_html(learning.tokenize(svc, text or "", model or EMBEDDED_MODEL), lang)
        except LoralabError as exc:
            return f"<p>{html.escape(_error(lang, exc))}</p>"

    p["tok_run"].click(tokenize, inputs=[p["tok_model"], p["tok_text"], lang_in], outputs=[p["tok_out"]], **private)

    def calculate(user, model, r, alpha, targets, lang):
        lang = _lang(lang)
        try:
            out = learning.calculate(svc, user, model or EMBEDDED_MODEL, int(r or 0),
                                     None if alpha in (None, "") else float(alpha), targets or "all-linear")
        except (LoralabError, ValueError, TypeError) as exc:
            message = exc.message if isinstance(exc, LoralabError) else str(exc)
            return t(lang, "common.error", message=message), gr.update(visible=False)
        text = t(lang, "learn.calc_result", trainable=f"{out['trainable_params']:,}",
                 percent=out["trainable_percent"], total=format_count(out["total_params"]),
                 size32=format_bytes(out["adapter_bytes_fp32"]), size16=format_bytes(out["adapter_bytes_16bit"]),
                 scaling=out["scaling"])
        rows = [[m["name"], m["count"], f"{m['in_features']} → {m['out_features']}", f"{m['params']:,}"]
                for m in out["modules"]]
        table = pd.DataFrame(rows, columns=[t(lang, k) for k in STEP_COLUMNS])
        return text, gr.Dataframe(value=table, visible=True)

    p["calc_run"].click(calculate, inputs=[p["user"], p["calc_model"], p["calc_r"], p["calc_alpha"],
                                           p["calc_targets"], lang_in],
                        outputs=[p["calc_out"], p["calc_table"]], **private)

    # ---- guided fine-tune
    def guided_view(user, lang):
        steps = learning.guided_status(svc, user)
        progress = learning.get_progress(svc, user, lang)
        running = any(s["status"] == "running" for s in steps)
        return guided_markdown(steps, lang), progress_markdown(progress, lang), gr.Timer(active=running)

    guided_outputs = [p["guided"], p["progress"], p["timer"]]

    def upload(user, lang):
        lang = _lang(lang)
        try:
            info = learning.guided_upload(svc, user)["dataset"]
            message = t(lang, "learn.g_uploaded", id=info["id"], rows=info["rows"])
        except LoralabError as exc:
            message = _error(lang, exc)
        return (message, *guided_view(user, lang))

    def train(user, lang):
        lang = _lang(lang)
        try:
            job = learning.guided_train(svc, user)["job"]
            message = t(lang, "learn.g_started", id=job["id"], status=t(lang, f"status.{job['status']}"))
        except LoralabError as exc:
            message = _error(lang, exc)
        return (message, *guided_view(user, lang))

    def run_compare(user, lang):
        lang = _lang(lang)
        try:
            out = learning.guided_compare(svc, user)
        except LoralabError as exc:
            return (_error(lang, exc), gr.update(), *guided_view(user, lang))
        table = pd.DataFrame([[r["question"], r["base"], r["tuned"]] for r in out["rows"]],
                             columns=[t(lang, k) for k in COMPARE_COLUMNS])
        message = t(lang, "learn.g_compared", n=len(out["rows"]), matched=out["matched"])
        return (message, gr.Dataframe(value=table, visible=True), *guided_view(user, lang))

    inputs = [p["user"], lang_in]
    p["g_upload"].click(upload, inputs=inputs, outputs=[p["g_status"], *guided_outputs], **private)
    p["g_train"].click(train, inputs=inputs, outputs=[p["g_status"], *guided_outputs], **private)
    p["g_compare"].click(lambda lg: t(_lang(lg), "learn.g_comparing"), inputs=[lang_in], outputs=[p["g_status"]],
                         **private).then(run_compare, inputs=inputs,
                                         outputs=[p["g_status"], p["compare"], *guided_outputs], **private)
    p["timer"].tick(lambda u, lg: guided_view(u, _lang(lg)), inputs=inputs, outputs=guided_outputs, **private)
