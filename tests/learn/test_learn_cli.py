"""`loralab learn` through typer's CliRunner: list, show, quiz from stdin, progress (in the database), calc."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from loralab.learn import course
from loralab.learn.cli import learn_app

WIDE = {"COLUMNS": "400"}  # no rich line wrapping, so whole sentences can be matched


def _progress(user: str = "local") -> dict[str, dict]:
    """Per-topic progress as the service (and so the web UI) sees it."""
    from loralab.services import learning
    from loralab.services.context import open_services

    svc = open_services()
    try:
        return {t["id"]: t for t in learning.get_progress(svc, user)["topics"]}
    finally:
        svc.close()


def _run(args, **kwargs):
    result = CliRunner().invoke(learn_app, args, env=WIDE, **kwargs)
    assert result.exit_code == 0, result.output
    return result.output


def test_list_in_both_languages():
    ja = _run(["list", "--lang", "ja"])
    en = _run(["list", "--lang", "en"])
    assert "レベル 1" in ja and "トークンとトークン化" in ja and "QLoRA と GPU メモリ" in ja
    assert "Level 3" in en and "Tokens and tokenisation" in en and "QLoRA and GPU memory" in en
    only_two = _run(["list", "--lang", "en", "--level", "2"])
    assert "The Transformer and attention" in only_two and "Tokens and tokenisation" not in only_two


def test_default_language_from_environment(monkeypatch):
    monkeypatch.delenv("LORALAB_LANG", raising=False)
    monkeypatch.setenv("LANG", "ja_JP.UTF-8")
    assert "トークンとトークン化" in _run(["list"])
    monkeypatch.setenv("LORALAB_LANG", "en")
    assert "Tokens and tokenisation" in _run(["list"])


def test_show_renders_markdown_and_marks_read():
    out = _run(["show", "first-fine-tune", "--lang", "en"])
    assert "Your first fine-tune" in out and "loralab demo" in out
    assert "**" not in out and "## " not in out  # rendered, not raw Markdown
    assert "compared_answers" in out  # the hands-on steps are listed with their checks
    assert _progress()["first-fine-tune"]["read"] and not _progress("someone")["first-fine-tune"]["read"]
    assert "はじめてのファインチューニング" in _run(["show", "1-05", "--lang", "ja"])


def test_unknown_topic_and_language_are_errors():
    runner = CliRunner()
    bad_topic = runner.invoke(learn_app, ["show", "nope", "--lang", "en"], env=WIDE)
    assert bad_topic.exit_code == 1 and "unknown topic 'nope'" in bad_topic.output
    bad_lang = runner.invoke(learn_app, ["list", "--lang", "fr"], env=WIDE)
    assert bad_lang.exit_code == 2 and "unsupported language" in bad_lang.output


def test_quiz_wrong_then_right_with_explanations_and_saved_progress():
    topic = course.get_topic("tokens", "en")
    first, *rest = topic.quiz.questions
    wrong = next(c for c in first.choices if not c.correct)
    # an invalid answer is asked again; then a wrong answer, then right ones (one given as a number)
    right_numbers = [str([c.id for c in q.choices].index(q.correct_choice.id) + 1) for q in rest]
    answers = ["zz", wrong.id, rest[0].correct_choice.id, *right_numbers[1:]]
    out = _run(["quiz", "tokens", "--lang", "en"], input="\n".join(answers) + "\n")
    assert "Please answer with one of" in out
    assert f"Not quite: the answer is {first.correct_choice.id})" in out
    assert wrong.explanation in out and first.correct_choice.explanation in out
    assert "✓ Correct." in out and rest[0].correct_choice.explanation in out
    total = len(topic.quiz.questions)
    assert f"Score: {total - 1}/{total}" in out

    saved = _progress()["tokens"]["quiz"]
    assert (saved["attempts"], saved["best"]["score"], saved["best"]["total"]) == (1, total - 1, total)
    assert saved["latest"]["answers"][first.id] == wrong.id  # the answers themselves are stored
    assert f"quiz {total - 1}/{total}" in _run(["list", "--lang", "en", "--level", "1"])


def test_quiz_in_japanese_accepts_full_width_letters():
    topic = course.get_topic("lora", "ja")
    letters = "".join(chr(ord(q.correct_choice.id) + 0xFEE0) for q in topic.quiz.questions)  # ａ, ｂ...
    out = _run(["quiz", "lora", "--lang", "ja"], input="\n".join(letters) + "\n")
    assert "✓ 正解です。" in out and "合格です" in out
    assert _progress()["lora"]["quiz"]["best"]["score"] == len(topic.quiz.questions)


def _done(user_step):
    return {s["id"]: s["done"] for s in _progress()[user_step]["steps"]}


def test_done_checks_real_state_before_marking_a_step():
    from loralab.data import sample_path
    from loralab.services import datasets
    from loralab.services.context import open_services

    refused = CliRunner().invoke(learn_app, ["done", "first-fine-tune", "upload-data", "--lang", "en"], env=WIDE)
    assert refused.exit_code == 1 and "no dataset has been uploaded yet" in refused.output
    assert _done("first-fine-tune")["upload-data"] is False
    svc = open_services()
    try:
        datasets.upload_dataset(svc, sample_path("basic_qa").read_bytes(), "basic_qa.jsonl")
    finally:
        svc.close()
    assert "upload-data" in _run(["done", "first-fine-tune", "upload-data", "--lang", "en"])
    assert _done("first-fine-tune") == {"run-demo": False, "upload-data": True, "train-own": False, "compare": False}
    bad = CliRunner().invoke(learn_app, ["done", "first-fine-tune", "nope", "--lang", "en"], env=WIDE)
    assert bad.exit_code == 1 and "run-demo" in bad.output


def test_calc_table_and_json(tiny_model_dir):
    out = _run(["calc", "--base-model", str(tiny_model_dir), "--r", "4", "--target-modules", "q_proj,v_proj",
                "--lang", "en"])
    assert "q_proj" in out and "v_proj" in out and "Trainable (LoRA) parameters: 896" in out
    data = json.loads(_run(["calc", "--base-model", str(tiny_model_dir), "--r", "4", "--json"]))
    assert "calc-ranks" in _run(["done", "hyperparameters", "calc-ranks", "--lang", "en"])  # calc was recorded
    assert data["trainable_params"] == 4096 and data["target_modules"] == "all-linear"
    bad = CliRunner().invoke(learn_app, ["calc", "--base-model", str(tiny_model_dir), "--target-modules", "wq"],
                             env=WIDE)
    assert bad.exit_code == 1 and "not found in this model" in bad.output
