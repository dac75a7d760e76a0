"""The learning center over HTTP: topics without answers, graded quizzes, progress per user, field-named errors."""
from __future__ import annotations

from loralab.learn import course


def test_topics_quiz_and_progress(client):
    topics = client.get("/api/learn/topics", params={"lang": "ja", "level": 1}).json()
    assert [t["code"] for t in topics] == ["1-01", "1-02", "1-03", "1-04", "1-05"]
    assert topics[1]["title"] == "トークンとトークン化"
    topic = client.get("/api/learn/topics/lora", params={"lang": "en"}).json()
    assert topic["body"].startswith("#") or "LoRA" in topic["body"]
    assert "correct" not in str(topic["quiz"]) and "explanation" not in str(topic["quiz"])  # answers stay hidden

    question = course.get_topic("lora", "en").quiz.questions[0]
    wrong = next(c for c in question.choices if not c.correct)
    checked = client.post("/api/learn/topics/lora/check", json={"question_id": question.id, "choice_id": wrong.id})
    assert checked.status_code == 200
    assert checked.json()["correct"] is False and checked.json()["explanation"] == wrong.explanation

    answers = {q.id: q.correct_choice.id for q in course.get_topic("lora", "en").quiz.questions}
    graded = client.post("/api/learn/topics/lora/quiz", json={"user": "b-api", "answers": answers}).json()
    assert graded["passed"] and graded["score"] == graded["total"] and graded["quiz"]["attempts"] == 1
    read = client.post("/api/learn/progress", json={"user": "b-api", "topic_id": "1-02", "action": "read"})
    assert read.status_code == 200
    progress = client.get("/api/learn/progress", params={"user": "b-api", "lang": "ja"}).json()
    by_id = {t["id"]: t for t in progress["topics"]}
    assert by_id["tokens"]["read"] and by_id["lora"]["quiz"]["passed"]
    assert progress["summary"]["read"] == 1 and progress["summary"]["quizzes_passed"] == 1
    other = client.get("/api/learn/progress").json()  # default user "local" is someone else
    assert other["user"] == "local" and other["summary"]["read"] == 0


def test_errors_name_the_field(client):
    def check(response, status, param):
        assert response.status_code == status, response.text
        body = response.json()
        assert body["param"] == param and body["detail"], body

    check(client.post("/api/learn/topics/lora/quiz", json={"answers": {"count": "z"}}), 422, "answers.count")
    check(client.post("/api/learn/topics/lora/quiz", json={"user": "no spaces", "answers": {"count": "a"}}), 422,
          "user")
    check(client.get("/api/learn/topics/nope"), 404, "topic_id")
    check(client.get("/api/learn/topics", params={"lang": "fr"}), 422, "lang")
    check(client.post("/api/learn/progress", json={"topic_id": "lora", "action": "step"}), 422, "step_id")
    check(client.post("/api/learn/progress", json={"topic_id": "first-fine-tune", "action": "step",
                                                   "step_id": "upload-data"}), 409, "step_id")
    check(client.post("/api/learn/guided/train", json={"user": "b-api"}), 409, "step")
    check(client.post("/api/learn/calculator", json={"r": 0}), 422, "r")
    unknown = client.post("/api/learn/progress", json={"topic_id": "lora", "action": "read", "extra": 1})
    assert unknown.status_code == 422 and "extra" in unknown.text  # unknown keys are refused


def test_guided_upload_over_http(client):
    first = client.post("/api/learn/guided/upload", json={"user": "b-api"}).json()
    assert first["created"] and first["dataset"]["rows"] == 5
    assert client.get(f"/api/datasets/{first['dataset']['id']}").status_code == 200  # a real dataset row
    steps = client.get("/api/learn/guided", params={"user": "b-api"}).json()
    assert [(s["id"], s["status"]) for s in steps] == [("upload-sample", "done"), ("fine-tune", "todo"),
                                                       ("compare", "todo")]
