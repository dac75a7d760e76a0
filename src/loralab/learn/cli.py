"""`loralab learn`: read the course, take quizzes in the terminal, track progress, and run the LoRA calculator.

Progress goes to the database through services.learning (user 'local' by default), so the CLI and the web UI share it.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from loralab.learn import course
from loralab.spec import EMBEDDED_MODEL

learn_app = typer.Typer(
    help="Learning center: a three-level course on LLM fine-tuning with quizzes (ja + en).",
    no_args_is_help=True,
)

_MSG = {
    "en": {
        "level": "Level {n}", "col_topic": "Topic", "col_id": "id", "col_min": "min", "col_status": "Status",
        "read": "read", "quiz": "quiz {s}/{t}", "none": "no topics",
        "steps": "Hands-on steps", "check": "check",
        "next": "Test yourself: loralab learn quiz {id}",
        "question": "Question {i}/{n}", "answer": "Your answer ({ids})",
        "invalid": "Please answer with one of: {ids}",
        "right": "✓ Correct.", "wrong": "✗ Not quite: the answer is {id}) {text}",
        "why_chosen": "Your choice:", "why_right": "Why {id} is right:",
        "score": "Score: {s}/{t} ({p:.0f}%)", "passed": "Passed. Well done!",
        "failed": "Not passed yet (two thirds needed): reread with `loralab learn show {id}` and try again.",
        "step_done": "Step {step} of {id} marked as done.", "unknown_step": "topic {id!r} has no step {step!r}; steps: {steps}",
        "module": "Module", "kind": "Type", "count": "Count", "shape": "in → out", "params": "LoRA params",
        "trainable": "Trainable (LoRA) parameters", "base": "Base model parameters", "percent": "Trainable share",
        "size32": "Adapter size (fp32)", "size16": "Adapter size (fp16/bf16)",
    },
    "ja": {
        "level": "レベル {n}", "col_topic": "トピック", "col_id": "ID", "col_min": "分", "col_status": "進捗",
        "read": "既読", "quiz": "クイズ {s}/{t}", "none": "トピックがありません",
        "steps": "ハンズオン", "check": "確認方法",
        "next": "理解度チェック: loralab learn quiz {id}",
        "question": "問題 {i}/{n}", "answer": "答え ({ids})",
        "invalid": "次のいずれかで答えてください: {ids}",
        "right": "✓ 正解です。", "wrong": "✗ 不正解です。正解は {id}) {text}",
        "why_chosen": "あなたの選択:", "why_right": "{id} が正しい理由:",
        "score": "得点: {s}/{t}（{p:.0f}%）", "passed": "合格です。お疲れさまでした！",
        "failed": "まだ合格ではありません（3 分の 2 以上で合格）。`loralab learn show {id}` で読み直してから再挑戦しましょう。",
        "step_done": "{id} のステップ {step} を完了にしました。", "unknown_step": "トピック {id!r} にステップ {step!r} はありません。ステップ: {steps}",
        "module": "モジュール", "kind": "種類", "count": "個数", "shape": "入力 → 出力", "params": "LoRA パラメータ",
        "trainable": "学習するパラメータ（LoRA）", "base": "ベースモデルのパラメータ", "percent": "学習する割合",
        "size32": "アダプタのサイズ（fp32）", "size16": "アダプタのサイズ（fp16/bf16）",
    },
}

LangOption = typer.Option(None, "--lang", "-l", help="ja or en (default: LORALAB_LANG, else the locale).")
UserOption = typer.Option("local", "--user", "-u", help="Learner id whose progress is read and saved.")


def _console() -> Console:
    return Console(highlight=False)  # created per call so it writes to the current stdout


def _lang(value: Optional[str]) -> course.Lang:
    if value is None:
        return course.default_lang()
    try:
        return course.check_lang(value.strip().lower())
    except course.CourseError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lang") from None


def _fail(message: str) -> None:
    _console().print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


def _topic(topic_id: str, lang: course.Lang) -> course.Topic:
    try:
        return course.get_topic(topic_id, lang)
    except course.CourseError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


@contextmanager
def _services() -> Iterator[Any]:
    """The services (database) for one command; a user error from them ends the command with its message."""
    from loralab.services.context import open_services
    from loralab.services.errors import LoralabError

    svc = None
    try:
        svc = open_services()
        yield svc
    except LoralabError as exc:
        _fail(exc.message)
    finally:
        if svc is not None:
            svc.close()


def _topic_progress(svc, user: str) -> dict[str, dict]:
    from loralab.services import learning

    return {t["id"]: t for t in learning.get_progress(svc, user)["topics"]}


@learn_app.command("list")
def list_cmd(
    lang: Optional[str] = LangOption,
    level: Optional[int] = typer.Option(None, "--level", min=1, max=3, help="Only this level (1-3)."),
    user: str = UserOption,
) -> None:
    """List the course topics with your progress."""
    language = _lang(lang)
    msg = _MSG[language]
    topics = course.list_topics(language, level)
    with _services() as svc:
        saved = _topic_progress(svc, user)
    console = _console()
    if not topics:
        console.print(msg["none"])
        return
    for lvl in sorted({t.level for t in topics}):
        table = Table(title=msg["level"].format(n=lvl), title_justify="left", expand=False)
        for column in ("#", msg["col_id"], msg["col_topic"], msg["col_min"], msg["col_status"]):
            table.add_column(column)
        for topic in (t for t in topics if t.level == lvl):
            state = saved[topic.id]
            status = []
            if state["read"]:
                status.append(msg["read"])
            if state["quiz"]:
                best = state["quiz"]["best"]
                status.append(msg["quiz"].format(s=best["score"], t=best["total"]))
            table.add_row(topic.code, topic.id, escape(topic.title), str(topic.minutes), ", ".join(status))
        console.print(table)


@learn_app.command("show")
def show_cmd(topic_id: str = typer.Argument(..., help="Topic id or code, e.g. tokens or 1-02."),
             lang: Optional[str] = LangOption, user: str = UserOption) -> None:
    """Read a topic (rendered Markdown) and its hands-on steps; marks it as read."""
    language = _lang(lang)
    msg = _MSG[language]
    topic = _topic(topic_id, language)
    console = _console()
    console.rule(f"[bold]{topic.code}  {escape(topic.title)}[/bold]")
    console.print(f"[italic]{escape(topic.summary)}[/italic]\n")
    console.print(Markdown(topic.body))
    from loralab.services import learning

    with _services() as svc:
        done = {s["id"] for s in _topic_progress(svc, user)[topic.id]["steps"] if s["done"]}
        learning.mark_read(svc, user, topic.id)
    if topic.steps:
        console.print(f"\n[bold]{msg['steps']}[/bold]")
        lines = [
            f"{number}. {'✓ ' if step.id in done else ''}{step.instruction} "
            f"*({msg['check']}: {step.check}, id: {step.id})*"
            for number, step in enumerate(topic.steps, 1)
        ]
        console.print(Markdown("\n".join(lines)))
    console.print("\n" + msg["next"].format(id=topic.id))


def _normalise_answer(raw: str, question: course.Question) -> str | None:
    """Map 'b', 'B', full-width 'ｂ' or '2' to a choice id; None when it is none of them."""
    text = unicodedata.normalize("NFKC", raw).strip().lower().rstrip(").")
    ids = [c.id for c in question.choices]
    if text in ids:
        return text
    if text.isdigit() and 1 <= int(text) <= len(ids):
        return ids[int(text) - 1]
    return None


@learn_app.command("quiz")
def quiz_cmd(topic_id: str = typer.Argument(..., help="Topic id or code."),
             lang: Optional[str] = LangOption, user: str = UserOption) -> None:
    """Answer a topic's quiz in the terminal (answers from stdin); feedback after each question."""
    language = _lang(lang)
    msg = _MSG[language]
    topic = _topic(topic_id, language)
    console = _console()
    questions = topic.quiz.questions
    console.rule(f"[bold]{topic.code}  {escape(topic.title)}[/bold]")
    answers: dict[str, str] = {}
    for number, question in enumerate(questions, 1):
        console.print(f"\n[bold]{msg['question'].format(i=number, n=len(questions))}[/bold]  {escape(question.prompt)}")
        for choice in question.choices:
            console.print(f"  {choice.id}) {escape(choice.text)}")
        ids = "/".join(c.id for c in question.choices)
        while True:
            chosen = _normalise_answer(typer.prompt(msg["answer"].format(ids=ids)), question)
            if chosen is not None:
                break
            console.print(msg["invalid"].format(ids=ids))
        answers[question.id] = chosen
        result = course.grade_question(question, chosen)
        if result.correct:
            console.print(f"[green]{msg['right']}[/green] {escape(result.explanation)}")
        else:
            right = question.correct_choice
            console.print(f"[red]{escape(msg['wrong'].format(id=right.id, text=right.text))}[/red]")
            console.print(f"  {msg['why_chosen']} {escape(result.explanation)}")
            console.print(f"  {msg['why_right'].format(id=right.id)} {escape(result.correct_explanation)}")
    from loralab.services import learning

    with _services() as svc:
        graded = learning.submit_quiz(svc, user, topic.id, answers, language)
    console.print("\n[bold]" + msg["score"].format(s=graded["score"], t=graded["total"], p=graded["percent"])
                  + "[/bold]")
    console.print(msg["passed"] if graded["passed"] else msg["failed"].format(id=topic.id))


@learn_app.command("done")
def done_cmd(topic_id: str = typer.Argument(..., help="Topic id or code."),
             step_id: str = typer.Argument(..., help="Step id as shown by `loralab learn show`."),
             lang: Optional[str] = LangOption, user: str = UserOption) -> None:
    """Mark a hands-on step as done (checked against real state: a dataset, a succeeded job...)."""
    language = _lang(lang)
    msg = _MSG[language]
    topic = _topic(topic_id, language)
    steps = [s.id for s in topic.steps]
    if step_id not in steps:
        _fail(msg["unknown_step"].format(id=topic.id, step=step_id, steps=", ".join(steps) or "-"))
    from loralab.services import learning

    with _services() as svc:
        learning.mark_step(svc, user, topic.id, step_id)
    _console().print(msg["step_done"].format(id=topic.id, step=step_id))


@learn_app.command("calc")
def calc_cmd(
    base_model: str = typer.Option(EMBEDDED_MODEL, "--base-model", help="Model name, local directory or .gguf file."),
    r: int = typer.Option(8, "--r", "-r", min=1, max=1024, help="LoRA rank."),
    target_modules: str = typer.Option("all-linear", "--target-modules",
                                       help="'all-linear' or names such as q_proj,v_proj."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    lang: Optional[str] = LangOption,
    user: str = UserOption,
) -> None:
    """LoRA calculator: trainable parameters and adapter size, from the model's real config."""
    from loralab.learn.calculator import CalculatorError, estimate_lora, format_bytes

    language = _lang(lang)
    msg = _MSG[language]
    try:
        result = estimate_lora(base_model, r=r, target_modules=target_modules)
    except CalculatorError as exc:
        _fail(str(exc))
        return
    from loralab.services.learning import record_calculator

    with _services() as svc:
        record_calculator(svc, user, base_model, r, result)
    console = _console()
    if as_json:
        console.print_json(result.model_dump_json())
        return
    console.print(f"[bold]{escape(base_model)}[/bold]  r={r}  target_modules={escape(str(result.target_modules))}")
    table = Table()
    for column in (msg["module"], msg["kind"], msg["count"], msg["shape"], msg["params"]):
        table.add_column(column, justify="left" if column in (msg["module"], msg["kind"]) else "right")
    for stat in result.modules:
        table.add_row(stat.name, stat.kind, str(stat.count), f"{stat.in_features} → {stat.out_features}",
                      f"{stat.params:,}")
    console.print(table)
    for key, value in (
        ("trainable", f"{result.trainable_params:,}"),
        ("base", f"{result.base_params:,}"),
        ("percent", f"{result.trainable_percent:.4f}%"),
        ("size32", f"{format_bytes(result.adapter_bytes_fp32)} ({result.adapter_bytes_fp32:,} B)"),
        ("size16", f"{format_bytes(result.adapter_bytes_16bit)} ({result.adapter_bytes_16bit:,} B)"),
    ):
        console.print(f"{msg[key]}: [bold]{value}[/bold]")
