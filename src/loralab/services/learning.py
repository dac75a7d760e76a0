"""Learning center use cases: course, quizzes, progress per user (in the database), tools and the guided fine-tune."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from loralab.learn import course
from loralab.services.context import Services
from loralab.store.errors import Conflict, Invalid, NotFound
from loralab.store.learning import LearningStore, LegacyProgress

LOCAL_USER = "local"
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
GUIDED_TOPIC = "guided"  # pseudo-topic holding the guided steps of the Learn page
TOOLS_TOPIC = "tools"  # pseudo-topic recording that a tool (the calculator) was used
# the guided path of level 1: each step is checked from real state (dataset row, job status, a comparison run)
GUIDED_STEPS: tuple[tuple[str, str], ...] = (("upload-sample", "dataset_uploaded"), ("fine-tune", "job_succeeded"),
                                             ("compare", "compared_answers"))
GUIDED_SAMPLE = "basic_qa"
GUIDED_DATASET_NAME = "learn-sample"
COMPARE_QUESTIONS = 3
SELF_REPORTED = ("manual", "evaluation_run", "model_exported", "model_served")


# ---- input checks --------------------------------------------------------------------------------------------------

def check_user(user: str | None) -> str:
    """A learner id: 'local' by default; letters, digits and . _ @ - (up to 64)."""
    user = LOCAL_USER if user is None or user == "" else user
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        raise Invalid(f"user {user!r} is not a valid learner id: use up to 64 letters, digits, '.', '_', '@' or '-'",
                      code="invalid_user", param="user")
    return user


def check_lang(lang: str | None) -> course.Lang:
    try:
        return course.check_lang(lang or "en")
    except course.CourseError as exc:
        raise Invalid(str(exc), code="invalid_lang", param="lang") from None


def _topic(topic_id: str, lang: course.Lang) -> course.Topic:
    try:
        return course.get_topic(topic_id, lang)
    except course.CourseError as exc:
        raise NotFound(str(exc), code="topic_not_found", param="topic_id") from None


def _store(svc: Services, user: str) -> LearningStore:
    """The learning tables; the first time the local user is seen, the old progress.json is imported once."""
    store = LearningStore(svc.repo)
    if user == LOCAL_USER and store.get_user(user) is None:
        store.ensure_user(user, _legacy(svc))
    return store


def _legacy(svc: Services) -> LegacyProgress | None:
    """The CLI's former LORALAB_HOME/learn/progress.json as rows to import (the file itself is left in place)."""
    from loralab.learn import progress

    path = svc.settings.home / "learn" / "progress.json"
    if not path.is_file():
        return None
    try:
        old = progress.load(path)
    except progress.ProgressError as exc:
        raise Invalid(str(exc), code="bad_progress_file", param="progress.json") from None
    legacy = LegacyProgress(source=str(path))
    for topic_id, entry in old.topics.items():
        if entry.read_at:
            legacy.reads[topic_id] = entry.read_at
        quiz = entry.quiz
        if quiz and quiz.attempts and quiz.total:
            # the file kept only best and last scores: import them as the first and the latest attempt
            scores = [quiz.best_score] + ([quiz.last_score] if quiz.attempts > 1 else [])
            for offset, score in enumerate(scores):
                legacy.attempts.append({
                    "topic_id": topic_id, "lang": "en", "score": score, "total": quiz.total,
                    "passed": 3 * score >= 2 * quiz.total, "answers": {},
                    "created_at": quiz.last_at - (len(scores) - 1 - offset)})
        for step_id, done_at in entry.steps.items():
            legacy.steps[(topic_id, step_id)] = done_at
    return legacy


# ---- course --------------------------------------------------------------------------------------------------------

def topic_summary(topic: course.Topic) -> dict[str, Any]:
    return {"id": topic.id, "code": topic.code, "level": topic.level, "order": topic.order, "title": topic.title,
            "summary": topic.summary, "minutes": topic.minutes, "questions": len(topic.quiz.questions),
            "steps": [{"id": s.id, "check": s.check, "instruction": s.instruction} for s in topic.steps]}


def list_topics(svc: Services, lang: str = "en", level: int | None = None) -> list[dict[str, Any]]:
    """Topics in course order (one level or all)."""
    language = check_lang(lang)
    if level is not None and level not in (1, 2, 3):
        raise Invalid(f"level must be 1, 2 or 3, got {level}", param="level")
    return [topic_summary(t) for t in course.list_topics(language, level)]


def get_topic(svc: Services, topic_id: str, lang: str = "en") -> dict[str, Any]:
    """A topic with its Markdown body and its quiz questions (without the answers: POST answers to be graded)."""
    topic = _topic(topic_id, check_lang(lang))
    questions = [{"id": q.id, "prompt": q.prompt, "choices": [{"id": c.id, "text": c.text} for c in q.choices]}
                 for q in topic.quiz.questions]
    return {**topic_summary(topic), "lang": topic.lang, "body": topic.body, "quiz": questions}


def check_answer(topic_id: str, question_id: str, choice_id: str, lang: str = "en") -> dict[str, Any]:
    """Instant feedback on one answer (nothing is stored): right or wrong, and both explanations."""
    topic = _topic(topic_id, check_lang(lang))
    question = next((q for q in topic.quiz.questions if q.id == question_id), None)
    if question is None:
        raise Invalid(f"topic {topic.id!r} has no question {question_id!r}", param="question_id")
    try:
        return course.grade_question(question, choice_id).model_dump()
    except course.CourseError as exc:
        raise Invalid(str(exc), param=f"answers.{question_id}") from None


def submit_quiz(svc: Services, user: str | None, topic_id: str, answers: dict[str, str],
                lang: str = "en") -> dict[str, Any]:
    """Grade a quiz attempt and store it (retakes add attempts); returns the score, explanations, best and latest."""
    user = check_user(user)
    topic = _topic(topic_id, check_lang(lang))
    if not isinstance(answers, dict) or not answers:
        raise Invalid("answers is empty: send {question id: choice id} for the quiz questions", param="answers")
    questions = {q.id: q for q in topic.quiz.questions}
    for question_id, choice_id in answers.items():
        if question_id not in questions:
            raise Invalid(f"topic {topic.id!r} has no question {question_id!r}; questions are "
                          f"{', '.join(questions)}", param=f"answers.{question_id}")
        try:
            questions[question_id].choice(choice_id)
        except course.CourseError as exc:
            raise Invalid(str(exc), param=f"answers.{question_id}") from None
    result = course.grade(topic.id, answers, topic.lang)
    store = _store(svc, user)
    store.add_attempt(user, topic.id, topic.lang, result.score, result.total, result.passed, dict(answers))
    return {**result.model_dump(), "user": user, "quiz": _quiz_summary(store.attempts(user, topic.id))}


def _quiz_summary(attempts: list) -> dict[str, Any] | None:
    if not attempts:
        return None
    best = max(attempts, key=lambda a: (a.score / a.total, a.created_at))
    latest = attempts[-1]
    return {"attempts": len(attempts), "passed": any(a.passed for a in attempts),
            "best": {"score": best.score, "total": best.total, "at": best.created_at},
            "latest": {"score": latest.score, "total": latest.total, "at": latest.created_at,
                       "answers": latest.answers}}


# ---- progress ------------------------------------------------------------------------------------------------------

def mark_read(svc: Services, user: str | None, topic_id: str) -> dict[str, Any]:
    user = check_user(user)
    topic = _topic(topic_id, "en")
    _store(svc, user).mark_read(user, topic.id)
    return get_progress(svc, user)


def mark_step(svc: Services, user: str | None, topic_id: str, step_id: str) -> dict[str, Any]:
    """Mark a topic's hands-on step done once the platform sees it done (manual steps: on the learner's word)."""
    user = check_user(user)
    topic = _topic(topic_id, "en")
    step = next((s for s in topic.steps if s.id == step_id), None)
    if step is None:
        raise Invalid(f"topic {topic.id!r} has no step {step_id!r}; steps: "
                      f"{', '.join(s.id for s in topic.steps) or '-'}", param="step_id")
    store = _store(svc, user)
    evidence = _evidence(svc, store, user, step.check)
    if evidence is None:
        raise Conflict(_NOT_YET[step.check], code="step_not_done", param="step_id")
    store.set_step(user, topic.id, step.id, done=True, evidence=evidence)
    return get_progress(svc, user)


_NOT_YET = {
    "dataset_uploaded": "no dataset has been uploaded yet: upload one (Datasets page or POST /api/datasets/upload)",
    "job_succeeded": "no training job has succeeded yet: train one and wait until it succeeds",
    "compared_answers": "no comparison has run yet: compare base and tuned answers on the Learn page "
                        "(or POST /api/learn/guided/compare)",
    "calculator_used": "the LoRA calculator has not been used yet: run it (Learn page, `loralab learn calc` or "
                       "POST /api/learn/calculator)",
}


def _evidence(svc: Services, store: LearningStore, user: str, check: str) -> dict[str, Any] | None:
    """What shows a check is satisfied now (None when it is not)."""
    if check in SELF_REPORTED:
        return {"self_reported": True}
    if check == "dataset_uploaded":
        rows = svc.repo.list_datasets()
        return {"dataset_id": rows[0].id} if rows else None
    if check == "job_succeeded":
        rows = svc.repo.list_jobs("succeeded", 1)
        return {"job_id": rows[0].id, "model_id": rows[0].result_model_id} if rows else None
    done = {(s.topic_id, s.step_id): s for s in store.steps(user) if s.done_at is not None}
    key = {"compared_answers": (GUIDED_TOPIC, "compare"), "calculator_used": (TOOLS_TOPIC, "calculator")}.get(check)
    if key in done:
        return dict(done[key].evidence)
    return None


def get_progress(svc: Services, user: str | None = None, lang: str = "en") -> dict[str, Any]:
    """Everything a learner has done: topics read, quiz best/latest, steps, guided path, and per-level totals."""
    user = check_user(user)
    language = check_lang(lang)
    store = _store(svc, user)
    reads = store.reads(user)
    attempts: dict[str, list] = {}
    for attempt in store.attempts(user):
        attempts.setdefault(attempt.topic_id, []).append(attempt)
    steps = {(s.topic_id, s.step_id): s for s in store.steps(user)}
    guided = _guided_state(svc, store, user, steps)
    topics, levels = [], {}
    for topic in course.list_topics(language):
        quiz = _quiz_summary(attempts.get(topic.id, []))
        entry = {"id": topic.id, "code": topic.code, "level": topic.level, "title": topic.title,
                 "read": topic.id in reads, "read_at": reads.get(topic.id), "quiz": quiz,
                 "steps": [{"id": s.id, "check": s.check,
                            "done": (topic.id, s.id) in steps and steps[(topic.id, s.id)].done_at is not None}
                           for s in topic.steps]}
        topics.append(entry)
        level = levels.setdefault(topic.level, {"level": topic.level, "topics": 0, "read": 0, "quizzes_passed": 0})
        level["topics"] += 1
        level["read"] += entry["read"]
        level["quizzes_passed"] += bool(quiz and quiz["passed"])
    guided_done = sum(g["status"] == "done" for g in guided)
    for level in levels.values():
        level["complete"] = level["read"] == level["quizzes_passed"] == level["topics"] and (
            level["level"] != 1 or guided_done == len(GUIDED_STEPS))
    total = len(topics)
    units = 2 * total + len(GUIDED_STEPS)
    done_units = sum(t["read"] for t in topics) + sum(bool(t["quiz"] and t["quiz"]["passed"]) for t in topics) \
        + guided_done
    tools = {s.step_id: s.evidence for (topic_id, _), s in steps.items() if topic_id == TOOLS_TOPIC}
    return {"user": user, "lang": language, "topics": topics, "levels": [levels[k] for k in sorted(levels)],
            "guided": guided, "tools": tools,
            "summary": {"topics": total, "read": sum(t["read"] for t in topics),
                        "quizzes_passed": sum(bool(t["quiz"] and t["quiz"]["passed"]) for t in topics),
                        "guided_done": guided_done, "guided_total": len(GUIDED_STEPS),
                        "percent": round(100.0 * done_units / units, 1)}}


# ---- tools: tokenizer view and LoRA calculator ---------------------------------------------------------------------

def _base(svc: Services, base_model: str | None) -> str:
    from loralab.services.base_models import check_base_model

    return check_base_model(svc, base_model)


def check_text(text: Any) -> str:
    """The tokenizer view's text: non-empty, at most 5000 characters (checked before any model is loaded)."""
    if not isinstance(text, str) or not text:
        raise Invalid("text is empty: type something to tokenize", param="text")
    if len(text) > 5000:
        raise Invalid(f"text has {len(text)} characters; the tokenizer view takes at most 5000", param="text")
    return text


def tokenize(svc: Services, text: str, base_model: str | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """The real tokens of `text` with a base model's tokenizer: id, token string and the text each one decodes to.
    `tokenizer`: already loaded (async routes load it with base_models.tokenizer_async)."""
    from loralab.services import base_models
    from loralab.spec import EMBEDDED_MODEL

    check_text(text)
    if tokenizer is None:
        tokenizer = base_models.tokenizer(svc, base_model)  # policy check, cached, bounded load with a timeout
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens = token_pieces(tokenizer, ids)
    return {"base_model": (base_model or "").strip() or EMBEDDED_MODEL, "characters": len(text),
            "bytes": len(text.encode("utf-8")), "count": len(ids), "tokens": tokens, "vocab_size": len(tokenizer)}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (tokens of byte-level BPE tokenizers are spelt in it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_pieces(tokenizer, ids: list[int]) -> list[dict[str, Any]]:
    """Per token: id, raw token, its bytes (byte-level BPE), `chars` = the characters it completes, and `partial`
    when a character is split over several tokens (kana and kanji often are: 3 UTF-8 bytes each). Joined, the
    `chars` give back the text."""
    decoder = _byte_decoder()
    out: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        token = str(token)
        data = bytes(decoder[ch] for ch in token) if token and all(ch in decoder for ch in token) else None
        entry = {"id": int(token_id), "token": token, "bytes": data.hex(" ") if data is not None else None,
                 "chars": "", "partial": False}
        out.append(entry)
        group.append(entry)
        decoded = tokenizer.decode([e["id"] for e in group])
        if decoded.endswith("\ufffd") and len(group) < 8:  # the character continues in the next token
            continue
        entry["chars"] = decoded
        if len(group) > 1:
            for member in group:
                member["partial"] = True
        group = []
    return out


def calculate(svc: Services, user: str | None, base_model: str | None = None, r: int = 8,
              lora_alpha: float | None = None, target_modules: str = "all-linear") -> dict[str, Any]:
    """LoRA calculator on the real model config (learn.calculator); recorded as used for the learner."""
    from loralab.learn.calculator import CalculatorError, estimate_lora

    user = check_user(user)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 1024:
        raise Invalid(f"r must be an integer from 1 to 1024, got {r!r}", param="r")
    alpha = float(2 * r if lora_alpha is None else lora_alpha)
    if alpha <= 0:
        raise Invalid(f"lora_alpha must be positive, got {lora_alpha!r}", param="lora_alpha")
    from loralab.services import base_models

    name = _base(svc, base_model)
    path = base_models.wait_load(svc, ("resolve", name), lambda: base_models.resolve(svc, name).path)
    try:
        result = estimate_lora(path, r=r, target_modules=target_modules)
    except CalculatorError as exc:
        param = "target_modules" if "target" in str(exc) else "base_model"
        raise Invalid(str(exc), param=param) from None
    out = {**result.model_dump(), "model": base_model or name, "lora_alpha": alpha, "scaling": alpha / r}
    record_calculator(svc, user, out["model"], r, result)
    return out


def record_calculator(svc: Services, user: str | None, base_model: str, r: int, result) -> None:
    """Note that the learner used the calculator (the check of steps such as 'calc-ranks')."""
    user = check_user(user)
    _store(svc, user).set_step(user, TOOLS_TOPIC, "calculator", done=True, evidence={
        "base_model": base_model, "r": r, "target_modules": result.target_modules,
        "trainable_params": result.trainable_params})


# ---- the guided fine-tune ------------------------------------------------------------------------------------------

def _guided_state(svc: Services, store: LearningStore, user: str, steps: dict | None = None) -> list[dict[str, Any]]:
    """The guided steps with their status from real state: the dataset row, the job's status, the comparison."""
    steps = steps if steps is not None else {(s.topic_id, s.step_id): s for s in store.steps(user)}
    out = []
    for step_id, check in GUIDED_STEPS:
        row = steps.get((GUIDED_TOPIC, step_id))
        evidence = dict(row.evidence) if row else {}
        status = "done" if row is not None and row.done_at is not None else "todo"
        if step_id == "fine-tune" and status == "todo" and evidence.get("job_id"):
            job = _job_or_none(svc, evidence["job_id"])
            if job is None:
                status = "todo"
            elif job.status == "succeeded":  # the job finished since we last looked: the step is done now
                evidence = {**evidence, "model_id": job.result_model_id}
                store.set_step(user, GUIDED_TOPIC, step_id, done=True, evidence=evidence)
                status = "done"
            else:
                status = {"failed": "failed", "cancelled": "failed"}.get(job.status, "running")
                evidence = {**evidence, "job_status": job.status, "progress": (job.progress or {}).get("percent")}
        out.append({"id": step_id, "check": check, "status": status, "evidence": evidence})
    return out


def _job_or_none(svc: Services, job_id: str):
    try:
        return svc.repo.get_job(job_id)
    except NotFound:
        return None


def guided_status(svc: Services, user: str | None) -> list[dict[str, Any]]:
    user = check_user(user)
    return _guided_state(svc, _store(svc, user), user)


def guided_upload(svc: Services, user: str | None) -> dict[str, Any]:
    """Step 1: upload the sample dataset (5 Q/A rows the base model cannot know) through the datasets service."""
    from loralab.data import sample_path
    from loralab.services import datasets

    user = check_user(user)
    store = _store(svc, user)
    current = _guided_state(svc, store, user)[0]
    dataset_id = current["evidence"].get("dataset_id")
    if current["status"] == "done" and dataset_id and _dataset_exists(svc, dataset_id):
        return {"dataset": datasets.get_dataset(svc, dataset_id), "created": False}
    path = sample_path(GUIDED_SAMPLE)
    info = datasets.upload_dataset(svc, path.read_bytes(), path.name, name=GUIDED_DATASET_NAME)
    store.set_step(user, GUIDED_TOPIC, "upload-sample", done=True, evidence={"dataset_id": info["id"]})
    return {"dataset": info, "created": True}


def _dataset_exists(svc: Services, dataset_id: str) -> bool:
    try:
        svc.repo.get_dataset(dataset_id)
        return True
    except NotFound:
        return False


def guided_request(dataset_id: str, model_name: str, **overrides: Any) -> dict[str, Any]:
    """The job request of step 2: the demo's settings (teach 5 facts to the 135M model in seconds on a CPU)."""
    from pathlib import Path

    from loralab.demo import demo_spec

    spec = demo_spec(Path("unused.jsonl"), epochs=8).model_dump(mode="json", exclude={"data"})
    spec.update(overrides)
    return {**spec, "dataset_id": dataset_id, "model_name": model_name}


def guided_train(svc: Services, user: str | None, **overrides: Any) -> dict[str, Any]:
    """Step 2: queue a LoRA fine-tune of the embedded model on the step-1 dataset (a real job, run by a worker)."""
    from loralab.services import jobs

    user = check_user(user)
    store = _store(svc, user)
    upload, train, _ = _guided_state(svc, store, user)
    dataset_id = upload["evidence"].get("dataset_id")
    if upload["status"] != "done" or not dataset_id or not _dataset_exists(svc, dataset_id):
        raise Conflict("step 1 first: upload the sample dataset (the dataset of step 1 is missing)",
                       code="step_not_done", param="step")
    if train["status"] in ("running", "done"):  # one job at a time; a finished one is not run again
        return {"job": jobs.get_job(svc, train["evidence"]["job_id"]), "created": False}
    name = re.sub(r"[^\w.-]+", "-", f"learn-{user}")[:100]
    job = jobs.create_job(svc, guided_request(dataset_id, name, **overrides))
    store.set_step(user, GUIDED_TOPIC, "fine-tune", done=job["status"] == "succeeded",
                   evidence={"job_id": job["id"], "dataset_id": dataset_id})
    return {"job": job, "created": True}


def guided_compare(svc: Services, user: str | None, questions: list[str] | None = None,
                   max_new_tokens: int = 40) -> dict[str, Any]:
    """Step 3: the same questions to the base model and the tuned one (greedy), side by side; recorded as done."""
    from loralab.services import serving
    from loralab.services.inference import Sampling

    user = check_user(user)
    store = _store(svc, user)
    train = _guided_state(svc, store, user)[1]
    model_id = train["evidence"].get("model_id")
    if train["status"] != "done" or not model_id:
        raise Conflict("step 2 first: the guided fine-tune has not succeeded yet", code="step_not_done",
                       param="step")
    if not 1 <= max_new_tokens <= 256:
        raise Invalid("max_new_tokens must be from 1 to 256", param="max_new_tokens")
    expected: list[str | None] = []
    if questions is None:
        from loralab.data import sample_path

        rows = [json.loads(line) for line in sample_path(GUIDED_SAMPLE).read_text(encoding="utf-8").splitlines()]
        questions = [r["instruction"] for r in rows[:COMPARE_QUESTIONS]]
        expected = [r["output"] for r in rows[:COMPARE_QUESTIONS]]
    questions = [q.strip() for q in questions if isinstance(q, str) and q.strip()]
    if not questions or len(questions) > 10:
        raise Invalid("give 1 to 10 non-empty questions", param="questions")
    base, adapter, _ = serving.resolve_target(svc, serving.GenerateRequest(model=model_id, prompt=""))
    inputs = [{"messages": [{"role": "user", "content": q}]} for q in questions]
    sampling = Sampling(max_tokens=max_new_tokens, temperature=0.0, seed=0)
    # both streams are queued before either is read, so the engine decodes base and tuned rows in one batch
    base_stream = serving.open_stream(svc, base, None, inputs, sampling)
    tuned_stream = serving.open_stream(svc, base, adapter, inputs, sampling)
    before = [c.text.strip() for c in base_stream.result()]
    after = [c.text.strip() for c in tuned_stream.result()]
    rows = [{"question": q, "base": b, "tuned": a, "expected": e}
            for q, b, a, e in zip(questions, before, after, expected + [None] * len(questions))]
    matched = sum(r["expected"] is not None and r["tuned"].lower() == r["expected"].lower() for r in rows)
    store.set_step(user, GUIDED_TOPIC, "compare", done=True,
                   evidence={"model_id": model_id, "questions": len(rows), "matched": matched})
    return {"model_id": model_id, "base_model": base, "rows": rows, "matched": matched}
