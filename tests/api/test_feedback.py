"""Feedback over HTTP: every served answer gets an id, feedback refers to it, lists/stats/preferences read it back."""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import pytest

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def tiny(settings, tiny_model_dir):
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    return "tiny"


def sse_data(text: str) -> list:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line[6:] != "[DONE]"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_served_answer_has_a_generation_id(client, tiny):
    whole = client.post("/api/generate", json={"model": tiny, "messages": CHAT, "max_new_tokens": 3}).json()
    assert whole["id"].startswith("gen-")
    stored = client.get(f"/api/generations/{whole['id']}").json()
    assert stored["output"] == whole["text"] and stored["model"] == "tiny" and stored["source"] == "api"
    assert stored["input"] == {"messages": CHAT} and stored["completion_tokens"] == whole["completion_tokens"]

    streamed = client.post("/api/generate", json={"model": tiny, "prompt": "abc", "max_new_tokens": 3,
                                                  "stream": True})
    chunks = sse_data(streamed.text)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids != {whole["id"]}
    record = client.get(f"/api/generations/{ids.pop()}").json()
    assert record["output"] == "".join(c["text"] for c in chunks) and record["input"] == {"prompt": "abc"}

    chat = client.post("/v1/chat/completions", json={"model": tiny, "messages": CHAT, "max_tokens": 3}).json()
    assert chat["id"].startswith("gen-") and chat["object"] == "chat.completion"
    assert client.get(f"/api/generations/{chat['id']}").json()["output"] == chat["choices"][0]["message"]["content"]

    chunked = client.post("/v1/chat/completions", json={"model": tiny, "messages": CHAT, "max_tokens": 3,
                                                        "stream": True, "n": 2})
    chunks = sse_data(chunked.text)
    assert len({c["id"] for c in chunks}) == 1
    texts = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                     if c["choices"] and c["choices"][0]["index"] == i) for i in range(2)]
    assert client.get(f"/api/generations/{chunks[0]['id']}").json()["outputs"] == texts

    completion = client.post("/v1/completions", json={"model": tiny, "prompt": "abc", "max_tokens": 2}).json()
    stored = client.get(f"/api/generations/{completion['id']}").json()
    assert stored["output"] == completion["choices"][0]["text"] and stored["source"] == "openai"
    assert client.get("/api/generations/gen-" + "0" * 24).status_code == 404


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_feedback_by_id_list_filters_and_stats(client, tiny):
    ids = [client.post("/api/generate", json={"model": tiny, "prompt": f"p{i}", "max_new_tokens": 2}).json()["id"]
           for i in range(3)]
    first = client.post("/api/feedback", json={"generation_id": ids[0], "rating": 2, "user": "u1"})
    assert first.status_code == 201 and first.json()["created"] and first.json()["model"] == "tiny"
    again = client.post("/api/feedback", json={"generation_id": ids[0], "rating": 4, "comment": "better",
                                               "user": "u1"}).json()
    assert again["id"] == first.json()["id"] and not again["created"] and again["rating"] == 4
    client.post("/api/feedback", json={"generation_id": ids[1], "rating": 5, "thumbs": "up", "user": "u2"})
    client.post("/api/feedback", json={"generation_id": ids[2], "thumbs": "down", "corrected": "Better."})
    other = client.post("/api/feedback", json={"input": "q?", "output": "a.", "model": "elsewhere", "rating": 1})
    assert other.status_code == 201 and other.json()["generation_id"] is None

    listed = client.get("/api/feedback").json()
    assert listed["total"] == 4 and len(listed["data"]) == 4
    assert {f["rating"] for f in client.get("/api/feedback?model=tiny&min_rating=4").json()["data"]} == {4, 5}
    assert client.get("/api/feedback?thumbs=down").json()["data"][0]["corrected"] == "Better."
    assert client.get("/api/feedback?since=2999-01-01").json()["total"] == 0
    today = datetime.now(timezone.utc).date().isoformat()
    assert client.get(f"/api/feedback?since={today}").json()["total"] == 4

    stats = client.get("/api/feedback/stats").json()
    by_model = {m["model"]: m for m in stats["by_model"]}
    assert by_model["tiny"]["count"] == 3 and by_model["tiny"]["mean_rating"] == 4.5
    assert by_model["tiny"]["thumbs_up"] == 1 and by_model["tiny"]["thumbs_down"] == 1
    assert by_model["elsewhere"]["mean_rating"] == 1
    assert [d["day"] for d in stats["by_day"]] == [today] and stats["by_day"][0]["count"] == 4
    assert stats["total"]["corrections"] == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_feedback_during_a_stream_gets_the_final_text(client, tiny):
    """A thumbs click while the answer is still streaming is stored, and its text completed at the end."""
    from loralab.services import feedback, serving

    svc = client.app.state.services
    stream = serving.stream_text(svc, serving.GenerateRequest(model=tiny, prompt="abc", max_new_tokens=6),
                                 "playground", "session-1")
    first = next(stream)
    early = feedback.submit(svc, feedback.FeedbackRequest(generation_id=stream.id, thumbs="down", user="session-1"))
    assert early["output"] in ("", first) and early["created"]
    text = first + "".join(stream)
    stored = client.get(f"/api/generations/{stream.id}").json()
    assert stored["output"] == text and stored["finish_reason"] in ("stop", "length")
    assert stored["source"] == "playground" and stored["subject"] == "session-1"
    assert client.get("/api/feedback").json()["data"][0]["output"] == text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_bad_feedback_is_422_naming_the_field(client):
    def field(response):
        assert response.status_code == 422, response.text
        body = response.json()
        if isinstance(body["detail"], list):
            return body["detail"][0]["loc"][-1], body["detail"][0]["msg"]
        return body["param"], body["detail"]

    assert field(client.post("/api/feedback", json={"generation_id": "gen-" + "0" * 24, "rating": 6}))[0] == "rating"
    assert field(client.post("/api/feedback", json={"generation_id": "gen-" + "0" * 24, "rating": 0}))[0] == "rating"
    param, message = field(client.post("/api/feedback", json={"generation_id": "gen-" + "0" * 24, "rating": 3}))
    assert param == "generation_id" and "gen-" in message
    assert field(client.post("/api/feedback", json={"generation_id": "nope", "rating": 3}))[0] == "generation_id"
    assert field(client.post("/api/feedback", json={"generation_id": "gen-1", "thumbs": "sideways"}))[0] == "thumbs"
    assert "at least one" in field(client.post("/api/feedback", json={"input": "q", "output": "a"}))[1]
    assert field(client.get("/api/feedback?since=yesterday"))[0] == "since"
    assert field(client.get("/api/feedback?min_rating=9"))[0] == "min_rating"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_preference_dataset_from_feedback(client):
    q1 = [{"role": "user", "content": "What is 2+2?"}]
    posts = [
        {"input": q1, "output": "5", "rating": 1, "corrected": "4"},        # correction: 4 > 5
        {"input": q1, "output": "four", "rating": 5},                      # rated: four > 5 (gap 4)
        {"input": "Say hi", "output": "hello", "thumbs": "up"},             # rated: hello > go away
        {"input": "Say hi", "output": "go away", "thumbs": "down"},
        {"input": "Only one", "output": "lonely", "rating": 3},             # no pair
        {"input": "Close call", "output": "x", "rating": 4},                # gap 0: no pair
        {"input": "Close call", "output": "y", "rating": 4},
        {"input": "Medium", "output": "m1", "rating": 3},                   # rated, gap 1
        {"input": "Medium", "output": "m2", "rating": 2},
    ]
    for body in posts:
        assert client.post("/api/feedback", json=body).status_code == 201
    preview = client.post("/api/feedback/preferences/preview", json={}).json()
    records = preview["records"]
    assert preview["counts"]["from_corrections"] == 1 and preview["counts"]["from_ratings"] == 3
    assert {"messages": q1, "chosen": "4", "rejected": "5"} in records
    assert {"messages": q1, "chosen": "four", "rejected": "5"} in records
    assert {"messages": [{"role": "user", "content": "Say hi"}], "chosen": "hello", "rejected": "go away"} in records
    assert {"messages": [{"role": "user", "content": "Medium"}], "chosen": "m1", "rejected": "m2"} in records
    assert len(records) == preview["total"] == 4
    strict = client.post("/api/feedback/preferences/preview", json={"min_gap": 2}).json()
    assert strict["counts"]["from_ratings"] == 2 and strict["total"] == 3
    too_strict = client.post("/api/feedback/preferences/preview", json={"min_gap": 5})
    assert too_strict.status_code == 422 and too_strict.json()["detail"][0]["loc"][-1] == "min_gap"

    stored = client.post("/api/feedback/preferences", json={"name": "prefs"})
    assert stored.status_code == 201, stored.text
    dataset = stored.json()["dataset"]
    assert dataset["format"] == "preference" and dataset["rows"] == 4 and dataset["version"] == 1
    rows = client.get(f"/api/datasets/{dataset['id']}/preview").json()["records"]
    assert sorted(json.dumps(r, sort_keys=True) for r in rows) == sorted(json.dumps(r, sort_keys=True)
                                                                          for r in records)
    assert client.post("/api/feedback/preferences", json={"name": "prefs"}).json()["dataset"]["version"] == 2
    missing = client.post("/api/feedback/preferences", json={})
    assert missing.status_code == 422 and missing.json()["param"] == "name"
    empty = client.post("/api/feedback/preferences", json={"name": "x", "filters": {"model": "none"}})
    assert empty.status_code == 422 and empty.json()["code"] == "no_preference_data"


def test_feedback_store_on_each_backend(db, settings):
    """The SQL (upsert per answer and user, filters, sticky assignment) on SQLite and PostgreSQL."""
    from loralab.store.feedback import FeedbackFilter, FeedbackStore

    store = FeedbackStore(db)
    gen = store.add_generation(id="gen-" + "1" * 24, requested_model="m", model="m", base_model="b", adapter=None,
                               source="api", input={"prompt": "p"}, prompt_hash="h", output="o", outputs=["o"],
                               finish_reason="stop", prompt_tokens=1, completion_tokens=1, ab_test_id=None,
                               arm=None, subject=None)
    fields = {"generation_id": gen.id, "model": "m", "input": gen.input, "output": "o", "rating": 2, "thumbs": None,
              "corrected": None, "comment": None, "user": None, "ab_test_id": None, "arm": None}
    row, created = store.save_feedback(fields, "fb-" + "1" * 24)
    again, created_again = store.save_feedback({**fields, "rating": 5}, "fb-" + "2" * 24)
    assert created and not created_again and again.id == row.id
    _, created_other = store.save_feedback({**fields, "user": "someone"}, "fb-" + "3" * 24)
    assert created_other
    rows, total = store.list_feedback(FeedbackFilter(min_rating=3))
    assert total == 1 and rows[0].rating == 5 and rows[0].user is None
    test = store.create_ab_test(id="ab-" + "1" * 24, name="t", model_a="a", model_b="b", split=0.5,
                                metric="mean_rating")
    assert store.assign(test.id, "s", "B") == "B" and store.assign(test.id, "s", "A") == "B"
