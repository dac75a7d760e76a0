"""The course data: both languages, matching ids, one correct answer, explanations everywhere, clean Markdown."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from loralab.learn import course
from loralab.learn.course import DATA_DIR, LANGS, CourseError, load_course


def _quiz_files() -> list[Path]:
    return sorted((DATA_DIR / "quizzes").glob("*.yaml"))


def test_course_loads_with_enough_topics_in_every_level():
    loaded = load_course()
    for lang in LANGS:
        topics = loaded.list_topics(lang)
        assert len(topics) >= 12
        assert {t.level for t in topics} == {1, 2, 3}
        assert [t.code for t in topics] == sorted(t.code for t in topics)


def test_both_languages_have_the_same_topics_questions_choices_and_steps():
    loaded = load_course()
    en, ja = loaded.list_topics("en"), loaded.list_topics("ja")
    assert [t.id for t in en] == [t.id for t in ja]
    for te, tj in zip(en, ja):
        assert (te.level, te.order, te.minutes) == (tj.level, tj.order, tj.minutes)
        assert [(s.id, s.check) for s in te.steps] == [(s.id, s.check) for s in tj.steps]
        assert te.title != tj.title and te.body != tj.body, f"{te.id}: ja is not translated"
        assert [q.id for q in te.quiz.questions] == [q.id for q in tj.quiz.questions]
        for qe, qj in zip(te.quiz.questions, tj.quiz.questions):
            assert [(c.id, c.correct) for c in qe.choices] == [(c.id, c.correct) for c in qj.choices]
            assert qe.prompt != qj.prompt


def test_every_raw_question_has_one_correct_choice_and_explanations_in_both_languages():
    per_lang = {lang: 0 for lang in LANGS}
    assert len(_quiz_files()) >= 12
    for path in _quiz_files():
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert data["topic"] == path.stem
        assert len(data["questions"]) >= 3, path
        for question in data["questions"]:
            where = f"{path.name}:{question['id']}"
            for lang in LANGS:
                assert question["prompt"][lang].strip(), where
                per_lang[lang] += 1
            assert sum(bool(c.get("correct")) for c in question["choices"]) == 1, where
            assert len(question["choices"]) >= 3, where
            for choice in question["choices"]:
                for lang in LANGS:
                    assert choice["text"][lang].strip(), f"{where}:{choice['id']}"
                    assert len(choice["explanation"][lang].strip()) >= 10, f"{where}:{choice['id']}"
    assert per_lang["en"] >= 15 and per_lang["ja"] >= 15


def test_japanese_text_is_japanese():
    for topic in load_course().list_topics("ja"):
        body = topic.title + topic.summary + topic.body
        kana = sum("\u3040" <= ch <= "\u30ff" for ch in body)
        assert kana > 200 or kana > len(body) // 10, topic.id
        for question in topic.quiz.questions:
            assert any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in question.prompt)


def test_markdown_has_no_unrendered_emphasis():
    """CJK next to ** can leave literal asterisks (CommonMark flanking rules); catch it."""
    md = MarkdownIt("commonmark").enable("table")
    for lang in LANGS:
        for topic in load_course().list_topics(lang):
            for token in md.parse(topic.body):
                for child in token.children or []:
                    if child.type == "text":
                        assert "**" not in child.content, f"{lang}/{topic.id}: {child.content[:60]}"


def test_grade_scores_and_explains_each_answer():
    topic = course.get_topic("lora", "en")
    questions = topic.quiz.questions
    right = questions[0].correct_choice
    wrong = next(c for c in questions[1].choices if not c.correct)
    result = course.grade("lora", {questions[0].id: right.id, questions[1].id: wrong.id}, "en")
    assert (result.score, result.total, result.passed) == (1, len(questions), False)
    first, second, third = result.questions[:3]
    assert first.correct and first.explanation == right.explanation
    assert not second.correct and second.explanation == wrong.explanation
    assert second.correct_explanation == questions[1].correct_choice.explanation
    assert third.choice_id is None and not third.correct
    full = course.grade("1-04", {q.id: q.correct_choice.id for q in questions}, "ja")
    assert full.score == full.total and full.passed and full.percent == 100.0 and full.lang == "ja"


def test_grade_rejects_unknown_ids():
    with pytest.raises(CourseError, match="no choice 'z'"):
        course.grade("lora", {"count": "z"}, "en")
    with pytest.raises(CourseError, match="no question"):
        course.grade("lora", {"nope": "a"}, "en")
    with pytest.raises(CourseError, match="unknown topic"):
        course.get_topic("nope", "en")
    with pytest.raises(CourseError, match="unsupported language"):
        course.list_topics("fr")  # type: ignore[arg-type]


def _copy_course(tmp_path: Path) -> Path:
    root = tmp_path / "course"
    shutil.copytree(DATA_DIR / "content", root / "content")
    shutil.copytree(DATA_DIR / "quizzes", root / "quizzes")
    return root


def test_validation_errors_name_file_and_field(tmp_path):
    root = _copy_course(tmp_path)
    quiz = root / "quizzes" / "lora.yaml"
    data = yaml.safe_load(quiz.read_text(encoding="utf-8"))
    data["questions"][0]["choices"][0]["correct"] = True  # now two correct answers
    del data["questions"][1]["choices"][2]["explanation"]["ja"]
    quiz.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    page = root / "content" / "ja" / "1-02-tokens.md"
    page.write_text(page.read_text(encoding="utf-8").replace("minutes: 7", "minutes: seven"), encoding="utf-8")
    (root / "content" / "en" / "3-05-serving.md").unlink()

    with pytest.raises(CourseError) as info:
        load_course(root)
    message = str(info.value)
    assert f"{quiz}: questions.0: Value error, exactly one choice must have correct: true" in message
    assert f"{quiz}: questions.1.choices.2.explanation.ja: Field required" in message
    assert f"{page}: front matter.minutes:" in message
    assert "3-05-serving.md: translation: topic 'serving' has no en version" in message


def test_default_lang_follows_loralab_lang_then_locale(monkeypatch):
    for var in ("LORALAB_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(var, raising=False)
    assert course.default_lang() == "en"
    monkeypatch.setenv("LANG", "ja_JP.UTF-8")
    assert course.default_lang() == "ja"
    monkeypatch.setenv("LORALAB_LANG", "en")
    assert course.default_lang() == "en"
