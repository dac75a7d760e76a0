"""services.learning on SQLite and PostgreSQL: progress per user, quiz retakes, steps checked from real state,
the guided fine-tune through the real queue (fake engine), tokenizer view and calculator."""
from __future__ import annotations

import shutil

import pytest

from loralab.learn import course
from loralab.services import learning
from loralab.services.errors import Conflict, Invalid, NotFound


@pytest.fixture
def svc(settings):
    from loralab.services.context import open_services

    services = open_services(settings)
    yield services
    services.close()


def _answers(topic_id: str, wrong: int = 0) -> dict[str, str]:
    """Right answers for every question except the first `wrong` ones."""
    questions = course.get_topic(topic_id, "en").quiz.questions
    return {q.id: (next(c.id for c in q.choices if not c.correct) if i < wrong else q.correct_choice.id)
            for i, q in enumerate(questions)}


def _topics(progress: dict) -> dict[str, dict]:
    return {t["id"]: t for t in progress["topics"]}


def test_progress_is_per_user_and_keeps_best_and_latest(svc):
    first = learning.submit_quiz(svc, "b-alice", "lora", _answers("lora", wrong=2), "ja")
    total = first["total"]
    assert (first["score"], first["passed"], first["quiz"]["attempts"]) == (total - 2, False, 1)
    wrong_q = first["questions"][0]
    assert not wrong_q["correct"] and wrong_q["explanation"] != wrong_q["correct_explanation"]
    assert "。" in wrong_q["explanation"]  # graded in Japanese
    second = learning.submit_quiz(svc, "b-alice", "lora", _answers("lora"), "ja")
    third = learning.submit_quiz(svc, "b-alice", "lora", _answers("lora", wrong=3), "ja")
    assert second["passed"] and not third["passed"]
    quiz = third["quiz"]
    assert quiz["attempts"] == 3 and quiz["passed"]
    assert quiz["best"]["score"] == total and quiz["latest"]["score"] == total - 3
    assert quiz["latest"]["answers"] == _answers("lora", wrong=3)
    learning.mark_read(svc, "b-alice", "1-02")  # a topic code works too
    learning.mark_read(svc, "b-alice", "tokens")  # twice is once

    alice = learning.get_progress(svc, "b-alice", "ja")
    topics = _topics(alice)
    assert topics["tokens"]["read"] and not topics["lora"]["read"]
    assert topics["tokens"]["title"] == "トークンとトークン化"
    level1 = alice["levels"][0]
    assert (level1["level"], level1["read"], level1["quizzes_passed"], level1["complete"]) == (1, 1, 1, False)
    assert alice["summary"]["read"] == 1 and alice["summary"]["quizzes_passed"] == 1
    bob = learning.get_progress(svc, "b-bob")
    assert bob["summary"]["read"] == 0 and _topics(bob)["lora"]["quiz"] is None


def test_bad_input_names_the_field(svc):
    cases = [
        (lambda: learning.get_progress(svc, "bad user!"), Invalid, "user"),
        (lambda: learning.get_progress(svc, "b-x", "fr"), Invalid, "lang"),
        (lambda: learning.submit_quiz(svc, "b-x", "lora", {"count": "z"}), Invalid, "answers.count"),
        (lambda: learning.submit_quiz(svc, "b-x", "lora", {"nope": "a"}), Invalid, "answers.nope"),
        (lambda: learning.submit_quiz(svc, "b-x", "lora", {}), Invalid, "answers"),
        (lambda: learning.mark_read(svc, "b-x", "nope"), NotFound, "topic_id"),
        (lambda: learning.mark_step(svc, "b-x", "first-fine-tune", "nope"), Invalid, "step_id"),
        (lambda: learning.list_topics(svc, "en", 4), Invalid, "level"),
        (lambda: learning.check_answer("lora", "count", "z"), Invalid, "answers.count"),
    ]
    for call, error, param in cases:
        with pytest.raises(error) as info:
            call()
        assert info.value.param == param
    assert learning.get_progress(svc, "b-x")["summary"]["read"] == 0  # nothing was stored by the failures


def test_steps_are_checked_from_real_state(svc):
    from loralab.data import sample_path
    from loralab.services import datasets

    with pytest.raises(Conflict, match="no dataset has been uploaded"):
        learning.mark_step(svc, "b-carol", "datasets-chat-templates", "upload-chat-data")
    with pytest.raises(Conflict, match="calculator has not been used"):
        learning.mark_step(svc, "b-carol", "qlora-memory", "calc-memory")
    uploaded = datasets.upload_dataset(svc, sample_path("chat_sample").read_bytes(), "chat_sample.jsonl")
    progress = learning.mark_step(svc, "b-carol", "datasets-chat-templates", "upload-chat-data")
    steps = _topics(progress)["datasets-chat-templates"]["steps"]
    assert steps == [{"id": "upload-chat-data", "check": "dataset_uploaded", "done": True}]
    stored = {s.step_id: s for s in learning.LearningStore(svc.repo).steps("b-carol")}
    assert stored["upload-chat-data"].evidence == {"dataset_id": uploaded["id"]}
    # a self-reported kind of check is accepted on the learner's word
    learning.mark_step(svc, "b-carol", "export-gguf-ollama", "export-model")


def test_guided_path_runs_a_real_job(svc, settings, set_scenario):
    from service_fixtures import wait_for, worker_threads

    set_scenario(total_steps=3, step_seconds=0.01)
    user = "b-dave"
    with pytest.raises(Conflict, match="step 1 first"):
        learning.guided_train(svc, user)
    with pytest.raises(Conflict, match="step 2 first"):
        learning.guided_compare(svc, user)
    assert [g["status"] for g in learning.guided_status(svc, user)] == ["todo", "todo", "todo"]

    uploaded = learning.guided_upload(svc, user)
    assert uploaded["created"] and uploaded["dataset"]["rows"] == 5
    assert learning.guided_upload(svc, user) == {**uploaded, "created": False}  # the same dataset is reused
    started = learning.guided_train(svc, user)
    job = started["job"]
    assert started["created"] and job["status"] == "queued" and job["dataset_id"] == uploaded["dataset"]["id"]
    assert job["hyperparameters"]["lora"]["r"] == 16 and job["base_model"] == "smollm2-135m-instruct"
    assert [g["status"] for g in learning.guided_status(svc, user)] == ["done", "running", "todo"]
    assert learning.guided_train(svc, user)["created"] is False  # no second job while one runs

    workers = worker_threads(svc.db, settings, notify=svc.hub.publish)
    start = next(workers)
    start()
    try:
        done = wait_for(lambda: (s := learning.guided_status(svc, user))[1]["status"] == "done" and s, timeout=60)
    finally:
        next(workers, None)
    model_id = done[1]["evidence"]["model_id"]
    assert model_id and svc.repo.get_job(job["id"]).result_model_id == model_id
    progress = learning.get_progress(svc, user)
    assert progress["summary"]["guided_done"] == 2
    # the topic step "train-own" (check job_succeeded) can now be marked from the same real state
    learning.mark_step(svc, user, "first-fine-tune", "train-own")


def test_tokenizer_view_and_calculator(svc, settings, tiny_model_dir):
    from loralab.learn.calculator import estimate_lora

    shutil.copytree(tiny_model_dir, settings.models_dir / "tiny")
    text = "LoRA は 東京 で"
    out = learning.tokenize(svc, text, "tiny")
    assert out["count"] == len(out["tokens"]) > 0 and out["characters"] == len(text)
    assert "".join(t["chars"] for t in out["tokens"]) == text  # the pieces give back the text
    assert any(t["partial"] for t in out["tokens"]) and not out["tokens"][0]["partial"]  # kana split into bytes
    assert all(isinstance(t["id"], int) for t in out["tokens"])
    with pytest.raises(Invalid) as info:
        learning.tokenize(svc, "", "tiny")
    assert info.value.param == "text"
    with pytest.raises(Invalid) as info:
        learning.tokenize(svc, "x", "../../etc")
    assert info.value.param == "base_model" or info.value.code == "bad_path"

    result = learning.calculate(svc, "b-erin", "tiny", r=4, lora_alpha=16, target_modules="q_proj,v_proj")
    expected = estimate_lora(str(settings.models_dir / "tiny"), r=4, target_modules="q_proj,v_proj")
    assert result["trainable_params"] == expected.trainable_params and result["scaling"] == 4.0
    assert result["adapter_bytes_fp32"] == 4 * expected.trainable_params
    assert learning.get_progress(svc, "b-erin")["tools"]["calculator"]["r"] == 4
    learning.mark_step(svc, "b-erin", "qlora-memory", "calc-memory")  # now satisfied
    for kwargs, param in (({"r": 0}, "r"), ({"target_modules": "wq"}, "target_modules"),
                          ({"lora_alpha": -1}, "lora_alpha")):
        with pytest.raises(Invalid) as info:
            learning.calculate(svc, "b-erin", "tiny", **kwargs)
        assert info.value.param == param


@pytest.mark.model
def test_japanese_tokens_of_the_embedded_model(svc):
    out = learning.tokenize(svc, "東京")
    assert out["count"] == 4  # the figure quoted in the course (topic "tokens")
    assert out["vocab_size"] == 49152
