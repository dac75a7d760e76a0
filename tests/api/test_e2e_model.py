"""End to end with the embedded model and the real engine: upload -> train 2 steps -> live events -> registry -> generate."""
from __future__ import annotations

import threading

import pytest

from service_fixtures import SAMPLES


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_upload_train_watch_register_generate(loralab_home, monkeypatch):
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app
    from loralab.runner.worker import Worker
    from loralab.settings import get_settings

    monkeypatch.setenv("LORALAB_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("LORALAB_WORKER_POLL_SECONDS", "0.2")
    settings = get_settings()  # the real engine: no LORALAB_ENGINE_COMMAND
    assert settings.engine_command is None
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        data = (SAMPLES / "basic_qa.jsonl").read_bytes()
        dataset = client.post("/api/datasets/upload", files={"file": ("basic_qa.jsonl", data)}).json()
        job = client.post("/api/training/jobs", json={
            "dataset_id": dataset["id"], "max_steps": 2, "per_device_train_batch_size": 2,
            "max_seq_length": 128, "model_name": "e2e"}).json()
        assert job["status"] == "queued"
        svc = client.app.state.services
        worker = Worker(svc.db, settings, notify=svc.hub.publish)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            events = []
            with client.websocket_connect(f"ws://127.0.0.1/ws/training/{job['id']}") as ws:
                while True:
                    try:
                        events.append(ws.receive_json())
                    except Exception:
                        break
            types = [e["type"] for e in events]
            assert types[0] == "started" and types[-1] == "done", events[-1]
            assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]
            assert events[-1]["job_status"] == "succeeded" and events[-1]["result_model_id"]
            final = client.get(f"/api/training/jobs/{job['id']}").json()
            assert final["status"] == "succeeded" and final["progress"]["percent"] == 100.0
            model = client.get(f"/api/models/{final['result_model_id']}").json()
            assert model["name"] == "e2e" and model["version"] == 1
            assert model["lineage"]["dataset_id"] == dataset["id"] and model["lineage"]["job_id"] == job["id"]
            assert model["base_model"] == "smollm2-135m-instruct" and model["metrics"]["total_steps"] == 2
            reply = client.post("/api/generate", json={
                "model": model["id"], "messages": [{"role": "user", "content": "What is loralab?"}],
                "max_new_tokens": 8})
            assert reply.status_code == 200, reply.text
            assert reply.json()["completion_tokens"] >= 1 and reply.json()["model"] == model["id"]
        finally:
            worker.stop.set()
            thread.join(60)
