"""The whole loop on the embedded model: served answers -> feedback with corrections -> preference dataset ->
DPO job through the queue -> the corrected answers' log-probability margin over the model's own answers grows."""
from __future__ import annotations

import threading
import time

import pytest

QUESTIONS = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What is 2 + 2?", "2 + 2 equals 4."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What do bees make?", "Bees make honey."),
]


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_feedback_corrections_train_a_dpo_model_that_prefers_them(loralab_home, monkeypatch):
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app
    from loralab.engine.dpo import preference_margins
    from loralab.engine.models import load_for_inference
    from loralab.runner.worker import Worker
    from loralab.services import registry
    from loralab.settings import get_settings

    monkeypatch.setenv("LORALAB_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("LORALAB_WORKER_POLL_SECONDS", "0.2")
    settings = get_settings()  # the real engine
    with TestClient(create_app(settings, mount_web_ui=False), base_url="http://127.0.0.1") as client:
        # 1. users get answers from the base model and correct them
        served = {}
        for question, better in QUESTIONS:
            reply = client.post("/api/generate", json={
                "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
                "max_new_tokens": 16, "temperature": 0})
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            served[question] = answer["text"] if "text" in answer else answer["choices"][0]["text"]
            feedback = client.post("/api/feedback", json={"generation_id": answer["id"], "rating": 1,
                                                          "corrected": better, "user": "tester"})
            assert feedback.status_code == 201, feedback.text
        # 2. the feedback becomes a stored preference dataset
        stored = client.post("/api/feedback/preferences", json={"name": "from-feedback"})
        assert stored.status_code == 201, stored.text
        dataset = stored.json()["dataset"]
        records = client.get(f"/api/datasets/{dataset['id']}/preview").json()["records"]
        assert dataset["format"] == "preference" and dataset["rows"] == len(records) >= 4, (served, records)
        for record in records:  # corrected answer = chosen, the model's own answer = rejected
            question = record["messages"][-1]["content"]
            assert record["chosen"] == dict(QUESTIONS)[question]
            assert record["rejected"].strip() == served[question].strip()
        # 3. a DPO job on it, run by a worker like any other job
        job = client.post("/api/training/jobs", json={
            "dataset_id": dataset["id"], "method": "dpo", "beta": 0.1, "learning_rate": 1e-3, "max_steps": 3,
            "per_device_train_batch_size": 6, "max_seq_length": 128, "seed": 0, "model_name": "dpo-loop"})
        assert job.status_code == 201, job.text
        job = job.json()
        svc = client.app.state.services
        worker = Worker(svc.db, settings, notify=svc.hub.publish)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            deadline = time.time() + 800
            while (status := client.get(f"/api/training/jobs/{job['id']}").json())["status"] not in (
                    "succeeded", "failed", "cancelled") and time.time() < deadline:
                time.sleep(0.5)
        finally:
            worker.stop.set()
        assert status["status"] == "succeeded", status
        model = client.get(f"/api/models/{status['result_model_id']}").json()
        assert model["method"] == "dpo"
        adapter = registry.model_path(svc, model["id"])
    # 4. measured independently of TRL: summed log-probs of chosen minus rejected, before and after
    tuned, tokenizer = load_for_inference("smollm2-135m-instruct", adapter)
    with tuned.disable_adapter():
        before = preference_margins(tuned, tokenizer, records)
    after = preference_margins(tuned, tokenizer, records)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0, (before, after)
    assert sum(a > b for a, b in zip(after, before)) >= len(records) - 1, (before, after)
