"""The learning-center course: load and validate topics (Markdown) and quizzes (YAML) in ja + en, and grade answers."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Lang = Literal["en", "ja"]
LANGS: tuple[Lang, ...] = ("en", "ja")
DATA_DIR = Path(__file__).parent
# What the platform can verify for a hands-on step; `manual` is ticked by the learner.
Check = Literal[
    "manual", "dataset_uploaded", "job_succeeded", "compared_answers", "calculator_used",
    "evaluation_run", "model_exported", "model_served",
]
_ID = r"^[a-z0-9][a-z0-9-]{0,62}$"
_FILE = re.compile(r"^(?P<level>[1-9])-(?P<order>\d{2})-(?P<slug>[a-z0-9][a-z0-9-]*)\.md$")


class CourseError(ValueError):
    """The course data on disk is invalid, or a caller asked for a topic, question or choice that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Choice(_Strict):
    id: str = Field(pattern=r"^[a-z]$", description="One letter, a-z, unique within its question.")
    text: str
    correct: bool = False
    explanation: str = Field(description="Why this choice is right, or why it is wrong.")


class Question(_Strict):
    id: str = Field(pattern=_ID)
    prompt: str
    choices: list[Choice]

    @property
    def correct_choice(self) -> Choice:
        return next(choice for choice in self.choices if choice.correct)

    def choice(self, choice_id: str) -> Choice:
        """The choice with this id, or a CourseError listing the valid ids."""
        for choice in self.choices:
            if choice.id == choice_id:
                return choice
        valid = ", ".join(c.id for c in self.choices)
        raise CourseError(f"question {self.id!r} has no choice {choice_id!r}; choose one of {valid}")


class Quiz(_Strict):
    topic_id: str
    questions: list[Question]


class Step(_Strict):
    id: str = Field(pattern=_ID)
    check: Check = Field(description="What the platform verifies to mark the step done ('manual' = self-reported).")
    instruction: str = Field(min_length=1)


class Topic(_Strict):
    id: str = Field(pattern=_ID)
    lang: Lang
    level: int = Field(ge=1, le=3)
    order: int = Field(ge=0, le=99, description="Position within the level (the nn of the file name).")
    title: str
    summary: str
    minutes: int = Field(ge=1, le=240, description="Estimated reading time.")
    body: str = Field(description="Markdown.")
    steps: list[Step] = Field(default_factory=list)
    quiz: Quiz

    @property
    def code(self) -> str:
        """Short course position such as '1-03'."""
        return f"{self.level}-{self.order:02d}"


class QuestionResult(_Strict):
    question_id: str
    choice_id: str | None = Field(description="What the learner chose (None = not answered).")
    correct: bool
    correct_choice_id: str
    explanation: str = Field(description="Explanation of the chosen choice (of the correct one when unanswered).")
    correct_explanation: str


class GradeResult(_Strict):
    topic_id: str
    lang: Lang
    score: int
    total: int
    percent: float
    passed: bool = Field(description="At least two thirds of the questions answered correctly.")
    questions: list[QuestionResult]


# ---- file formats -------------------------------------------------------------------------

class _Text(_Strict):
    en: str = Field(min_length=1)
    ja: str = Field(min_length=1)


class _RawChoice(_Strict):
    id: str = Field(pattern=r"^[a-z]$")
    text: _Text
    correct: bool = False
    explanation: _Text


class _RawQuestion(_Strict):
    id: str = Field(pattern=_ID)
    prompt: _Text
    choices: list[_RawChoice] = Field(min_length=2, max_length=6)

    @model_validator(mode="after")
    def _one_correct(self):
        ids = [c.id for c in self.choices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"choice ids must be unique, got {ids}")
        right = [c.id for c in self.choices if c.correct]
        if len(right) != 1:
            raise ValueError(f"exactly one choice must have correct: true, found {len(right)} ({right})")
        return self


class _QuizFile(_Strict):
    topic: str = Field(pattern=_ID)
    questions: list[_RawQuestion] = Field(min_length=3)

    @field_validator("questions")
    @classmethod
    def _unique(cls, questions):
        ids = [q.id for q in questions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"question ids must be unique, got {ids}")
        return questions

    def localised(self, lang: Lang) -> Quiz:
        return Quiz(topic_id=self.topic, questions=[
            Question(id=q.id, prompt=getattr(q.prompt, lang), choices=[
                Choice(id=c.id, text=getattr(c.text, lang), correct=c.correct,
                       explanation=getattr(c.explanation, lang))
                for c in q.choices
            ])
            for q in self.questions
        ])


class _FrontMatter(_Strict):
    id: str = Field(pattern=_ID)
    level: int = Field(ge=1, le=3)
    title: str = Field(min_length=1)
    summary: str = Field(min_length=1)
    minutes: int = Field(ge=1, le=240)
    steps: list[Step] = Field(default_factory=list)


class Course(_Strict):
    """Every topic in every language, in course order."""

    topics: dict[Lang, list[Topic]]

    def list_topics(self, lang: Lang, level: int | None = None) -> list[Topic]:
        return [t for t in self.topics[check_lang(lang)] if level is None or t.level == level]

    def get_topic(self, topic_id: str, lang: Lang) -> Topic:
        """A topic by id (or by its code, e.g. '1-03')."""
        for topic in self.topics[check_lang(lang)]:
            if topic_id in (topic.id, topic.code):
                return topic
        known = ", ".join(t.id for t in self.topics[lang])
        raise CourseError(f"unknown topic {topic_id!r}; topics are: {known}")


def _format_validation(path: Path, exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        lines.append(f"{path}: {loc or '(file)'}: {err['msg']}")
    return lines


def _split_front_matter(path: Path, text: str) -> tuple[dict, str]:
    match = re.match(r"\A---\s*\n(.*?)\n---\s*\n(.*)\Z", text, re.S)
    if not match:
        raise CourseError(f"{path}: front matter: the file must start with a '---' YAML block closed by '---'")
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise CourseError(f"{path}: front matter: invalid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise CourseError(f"{path}: front matter: expected a mapping of id, level, title, summary, minutes")
    return meta, match.group(2).strip() + "\n"


def _load_quiz(path: Path, topic_id: str, errors: list[str]) -> _QuizFile | None:
    if not path.is_file():
        errors.append(f"{path}: missing: every topic needs a quiz file (topic {topic_id!r})")
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        quiz = _QuizFile.model_validate(raw)
    except yaml.YAMLError as exc:
        errors.append(f"{path}: invalid YAML: {exc}")
        return None
    except ValidationError as exc:
        errors.extend(_format_validation(path, exc))
        return None
    if quiz.topic != topic_id:
        errors.append(f"{path}: topic: is {quiz.topic!r} but the file is for topic {topic_id!r}")
        return None
    return quiz


def load_course(root: Path | str | None = None) -> Course:
    """Read `root`/content/{en,ja}/*.md and `root`/quizzes/*.yaml; every problem is reported with file and field."""
    if root is None:
        return _load_default()
    return _load(Path(root))


@lru_cache(maxsize=1)
def _load_default() -> Course:
    return _load(DATA_DIR)


def _load(root: Path) -> Course:
    errors: list[str] = []
    fronts: dict[Lang, dict[str, tuple[Path, _FrontMatter, int, str]]] = {}
    for lang in LANGS:
        fronts[lang] = {}
        folder = root / "content" / lang
        for path in sorted(folder.glob("*.md")):
            name = _FILE.match(path.name)
            if not name:
                errors.append(f"{path}: file name: must be <level>-<nn>-<slug>.md, e.g. 1-01-what-is-an-llm.md")
                continue
            try:
                meta, body = _split_front_matter(path, path.read_text(encoding="utf-8"))
                front = _FrontMatter.model_validate(meta)
            except CourseError as exc:
                errors.append(str(exc))
                continue
            except ValidationError as exc:
                errors.extend(_format_validation(path, exc, "front matter"))
                continue
            if front.id != name["slug"]:
                errors.append(f"{path}: front matter.id: is {front.id!r} but the file name says {name['slug']!r}")
            if front.level != int(name["level"]):
                errors.append(f"{path}: front matter.level: is {front.level} but the file name says {name['level']}")
            if front.id in fronts[lang]:
                errors.append(f"{path}: front matter.id: {front.id!r} is also used by {fronts[lang][front.id][0]}")
            fronts[lang][front.id] = (path, front, int(name["order"]), body)
        if not fronts[lang] and not errors:
            errors.append(f"{folder}: no topics found (expected <level>-<nn>-<slug>.md files)")

    en, ja = fronts["en"], fronts["ja"]
    for lang, mine, other in (("en", en, ja), ("ja", ja, en)):
        for topic_id, (path, _, _, _) in mine.items():
            if topic_id not in other:
                errors.append(f"{path}: translation: topic {topic_id!r} has no {'ja' if lang == 'en' else 'en'} version")
    for topic_id in en.keys() & ja.keys():
        (_, fe, oe, _), (pj, fj, oj, _) = en[topic_id], ja[topic_id]
        for field, a, b in (("level", fe.level, fj.level), ("order", oe, oj), ("minutes", fe.minutes, fj.minutes),
                            ("steps", [(s.id, s.check) for s in fe.steps], [(s.id, s.check) for s in fj.steps])):
            if a != b:
                errors.append(f"{pj}: front matter.{field}: {b!r} differs from the English version's {a!r}")

    quizzes = {tid: _load_quiz(root / "quizzes" / f"{tid}.yaml", tid, errors) for tid in sorted(en.keys() | ja.keys())}
    for path in sorted((root / "quizzes").glob("*.yaml")):
        if path.stem not in quizzes:
            errors.append(f"{path}: topic: no topic {path.stem!r} in content/ for this quiz")
    if errors:
        raise CourseError("invalid course data:\n  " + "\n  ".join(errors))

    topics: dict[Lang, list[Topic]] = {}
    for lang in LANGS:
        topics[lang] = sorted(
            (Topic(id=tid, lang=lang, level=front.level, order=order, title=front.title, summary=front.summary,
                   minutes=front.minutes, body=body, steps=front.steps, quiz=quizzes[tid].localised(lang))
             for tid, (_, front, order, body) in fronts[lang].items()),
            key=lambda t: (t.level, t.order, t.id),
        )
    return Course(topics=topics)


def check_lang(lang: str) -> Lang:
    """Validate a language code ('en' or 'ja')."""
    if lang not in LANGS:
        raise CourseError(f"unsupported language {lang!r}; use 'ja' or 'en'")
    return lang  # type: ignore[return-value]


def default_lang() -> Lang:
    """LORALAB_LANG if set, else 'ja' when the locale (LC_ALL, LC_MESSAGES, LANG) is Japanese, else 'en'."""
    wanted = os.environ.get("LORALAB_LANG", "").strip().lower()
    if wanted:
        return "ja" if wanted.startswith("ja") else "en"
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var, "")
        if value:
            return "ja" if value.lower().startswith("ja") else "en"
    return "en"


def list_topics(lang: Lang = "en", level: int | None = None) -> list[Topic]:
    """Topics in course order, optionally only one level."""
    return load_course().list_topics(lang, level)


def get_topic(topic_id: str, lang: Lang = "en") -> Topic:
    """One topic (with its quiz and steps) in one language."""
    return load_course().get_topic(topic_id, lang)


def grade_question(question: Question, choice_id: str | None) -> QuestionResult:
    """Mark one answer; an unknown choice id is a CourseError, None counts as unanswered (wrong)."""
    right = question.correct_choice
    chosen = question.choice(choice_id) if choice_id is not None else None
    return QuestionResult(
        question_id=question.id, choice_id=choice_id, correct=chosen is right,
        correct_choice_id=right.id, explanation=(chosen or right).explanation,
        correct_explanation=right.explanation,
    )


def grade(topic_id: str, answers: dict[str, str], lang: Lang = "en") -> GradeResult:
    """Score a quiz: answers maps question id -> choice id; unanswered questions count as wrong."""
    topic = get_topic(topic_id, lang)
    known = {q.id for q in topic.quiz.questions}
    unknown = sorted(set(answers) - known)
    if unknown:
        raise CourseError(f"topic {topic.id!r} has no question(s) {unknown}; questions are {sorted(known)}")
    results = [grade_question(q, answers.get(q.id)) for q in topic.quiz.questions]
    score, total = sum(r.correct for r in results), len(results)
    return GradeResult(
        topic_id=topic.id, lang=topic.lang, score=score, total=total,
        percent=round(100.0 * score / total, 1), passed=3 * score >= 2 * total, questions=results,
    )
