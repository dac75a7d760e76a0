"""Training jobs over HTTP: validation, lifecycle with the fake engine, late WebSocket/SSE clients, registry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from service_fixtures import wait_for


def job_status(client, job_id):
    return client.get(f"/api/training/jobs/{job_id}").json()["status"]


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_job_request_is_validated(client, dataset_id):
    ok = {"dataset_id": dataset_id, "max_steps": 2}
    assert client.post("/api/training/jobs", json={**ok, "learning_rat": 0.1}).status_code == 422
    assert client.post("/api/training/jobs", json={**ok, "lora": {"rank": 4}}).status_code == 422
    assert client.post("/api/training/jobs", json={**ok, "data": {"path": "/etc/passwd"}}).status_code == 422
    assert client.post("/api/training/jobs", json={**ok, "learning_rate": 5}).status_code == 422
    missing = client.post("/api/training/jobs", json={**ok, "dataset_id": "ds-" + "0" * 24})
    assert missing.status_code == 422 and missing.json()["param"] == "dataset_id"
    outside = client.post("/api/training/jobs", json={**ok, "base_model": "/etc"})
    assert outside.status_code == 422 and outside.json()["code"] == "model_not_allowed"
    created = client.post("/api/training/jobs", json={**ok, "lora": {"r": 4}})
    assert created.status_code == 201
    job = created.json()
    assert job["status"] == "queued" and job["hyperparameters"]["lora"]["r"] == 4
    assert job["model_name"] == "smollm2-135m-instruct-basic" and job["error"] is None
    assert "path" not in job["data"]


def test_job_lifecycle_metrics_logs_and_late_streams(client, dataset_id, set_scenario, run_worker):
    set_scenario(total_steps=12, step_seconds=0.08, stderr="engine says hello")
    job = client.post("/api/training/jobs", json={"dataset_id": dataset_id, "max_steps": 12,
                                                  "model_name": "bot"}).json()
    run_worker()
    wait_for(lambda: (client.get(f"/api/training/jobs/{job['id']}/progress").json()["step"] or 0) >= 4)
    # A WebSocket client that connects mid-run first gets every missed event, then follows to the end.
    with client.websocket_connect(f"/ws/training/{job['id']}") as ws:
        received = []
        while True:
            try:
                received.append(ws.receive_json())
            except Exception:
                break
    assert [e["seq"] for e in received] == list(range(1, len(received) + 1))
    assert received[0]["type"] == "started" and received[-1]["type"] == "done"
    assert received[-1]["job_status"] == "succeeded" and received[-1]["result_model_id"]
    assert [e["step"] for e in received if e["type"] == "step"] == list(range(1, 13))
    # Late SSE client after the end: the whole history, then the stream ends; ?after and Last-Event-ID resume.
    stream = client.get(f"/api/training/jobs/{job['id']}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert [e["seq"] for e in sse_events(stream.text)] == [e["seq"] for e in received]
    assert "id: 1\nevent: started\n" in stream.text
    tail = sse_events(client.get(f"/api/training/jobs/{job['id']}/events", params={"after": 10}).text)
    assert [e["seq"] for e in tail] == list(range(11, len(received) + 1))
    resumed = client.get(f"/api/training/jobs/{job['id']}/events", headers={"Last-Event-ID": "12"})
    assert sse_events(resumed.text)[0]["seq"] == 13
    # Late WebSocket with ?after
    with client.websocket_connect(f"/ws/training/{job['id']}?after={len(received) - 1}") as ws:
        assert ws.receive_json()["type"] == "done"
    done = client.get(f"/api/training/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["progress"]["percent"] == 100.0 and done["result_model_id"]
    metrics = client.get(f"/api/training/jobs/{job['id']}/metrics").json()
    assert [m["step"] for m in metrics] == list(range(1, 13)) and metrics[0]["loss"] == 2.0
    assert "engine says hello" in client.get(f"/api/training/jobs/{job['id']}/logs").json()["stderr_tail"]
    listed = client.get("/api/training/jobs", params={"status": "succeeded"}).json()
    assert [j["id"] for j in listed] == [job["id"]]


def test_live_sse_client_follows_running_job(client, dataset_id, set_scenario, run_worker):
    set_scenario(total_steps=8, step_seconds=0.05)
    job = client.post("/api/training/jobs", json={"dataset_id": dataset_id}).json()
    run_worker()
    wait_for(lambda: job_status(client, job["id"]) == "running")
    events = sse_events(client.get(f"/api/training/jobs/{job['id']}/events").text)
    assert events[0]["seq"] == 1 and events[-1]["type"] == "done"


def test_cancel_over_http(client, dataset_id, set_scenario, run_worker, settings):
    set_scenario(total_steps=500, step_seconds=0.05)
    job = client.post("/api/training/jobs", json={"dataset_id": dataset_id}).json()
    run_worker()
    wait_for(lambda: (client.get(f"/api/training/jobs/{job['id']}").json()["progress"]["step"] or 0) >= 2)
    assert client.post(f"/api/training/jobs/{job['id']}/cancel").json()["cancel_requested"] is True
    wait_for(lambda: job_status(client, job["id"]) == "cancelled", timeout=10)
    assert list((settings.home / "runs" / job["id"] / "checkpoints").iterdir())
    with client.websocket_connect(f"/ws/training/{job['id']}") as ws:
        events = []
        while True:
            try:
                events.append(ws.receive_json())
            except Exception:
                break
    assert events[-1]["type"] == "cancelled"
    again = client.post(f"/api/training/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "job_finished"


def test_crash_reports_error(client, dataset_id, set_scenario, run_worker):
    set_scenario(total_steps=5, step_seconds=0.01, crash_at_step=2, crash_code=9)
    job = client.post("/api/training/jobs", json={"dataset_id": dataset_id}).json()
    run_worker()
    wait_for(lambda: job_status(client, job["id"]) == "failed")
    error = client.get(f"/api/training/jobs/{job['id']}").json()["error"]
    assert error["code"] == "engine_crashed" and "Segmentation fault" in error["message"]


def test_unknown_job_and_ws(client):
    assert client.get("/api/training/jobs/job-" + "a" * 24).status_code == 404
    assert client.get("/api/training/jobs/nope/events").status_code == 404
    import pytest
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as info:
        with client.websocket_connect("/ws/training/job-" + "a" * 24) as ws:
            ws.receive_json()
    assert info.value.code == 4404


def test_registry_over_http(client, dataset_id, set_scenario, run_worker, settings):
    set_scenario(total_steps=2, step_seconds=0.01)
    run_worker()
    ids = []
    for _ in range(2):
        job = client.post("/api/training/jobs", json={"dataset_id": dataset_id, "model_name": "bot"}).json()
        wait_for(lambda: job_status(client, job["id"]) == "succeeded")
        ids.append(client.get(f"/api/training/jobs/{job['id']}").json()["result_model_id"])
    models = client.get("/api/models").json()
    assert models[0]["id"] == "smollm2-135m-instruct" and models[0]["kind"] == "base"
    tuned = {m["id"]: m for m in models if m["kind"] == "fine_tuned"}
    assert set(tuned) == set(ids) and {m["version"] for m in tuned.values()} == {1, 2}
    first = client.get(f"/api/models/{ids[0]}").json()
    assert first["lineage"]["dataset_id"] == dataset_id and first["lineage"]["job_id"]
    assert first["base_model"] == "smollm2-135m-instruct" and first["metrics"]["total_steps"] == 2
    assert client.get("/api/models/smollm2-135m-instruct").json()["embedded"] is True
    assert client.post(f"/api/models/{ids[0]}/stage", json={"stage": "staging"}).json()["stage"] == "staging"
    assert client.post(f"/api/models/{ids[0]}/stage", json={"stage": "gold"}).status_code == 422
    assert client.post(f"/api/models/{ids[0]}/deploy").json()["deployed"] is True
    assert client.post(f"/api/models/{ids[1]}/deploy").json()["deployed"] is True
    assert client.delete(f"/api/models/{ids[1]}").status_code == 409
    rolled = client.post(f"/api/models/{ids[1]}/rollback").json()
    assert rolled["id"] == ids[0] and rolled["deployed"] is True
    path = Path(settings.home / "registry" / ids[1])
    assert path.is_dir()
    assert client.delete(f"/api/models/{ids[1]}").status_code == 200
    assert not path.exists() and client.get(f"/api/models/{ids[1]}").status_code == 404
    assert client.delete("/api/models/smollm2-135m-instruct").status_code == 409


def test_estimate_a_job_before_queueing_it(client, settings, tiny_model_dir, dataset_id):
    """POST /api/training/jobs/estimate: the same body as a job, nothing queued, figures that follow the settings."""
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    body = {"dataset_id": dataset_id, "base_model": "tiny", "per_device_train_batch_size": 2}
    small = client.post("/api/training/jobs/estimate", json={**body, "lora": {"r": 4}})
    assert small.status_code == 200, small.text
    small = small.json()
    assert small["object"] == "fine_tuning.estimate" and small["gradient_checkpointing"] is False
    assert small["fits"] is True and small["tokens_per_s"] > 0
    parts = small["breakdown"]
    assert small["peak_memory_bytes"] == sum(parts.values()) and parts["weights"] > 0
    # sized from the dataset's real token lengths, not the 512-token worst case
    assert 0 < small["assumptions"]["seq_length"] < 512
    big = client.post("/api/training/jobs/estimate", json={**body, "lora": {"r": 64}}).json()
    full = client.post("/api/training/jobs/estimate", json={**body, "method": "full"}).json()
    assert big["breakdown"]["trainable_state"] > 8 * parts["trainable_state"] > 0
    assert full["breakdown"]["trainable_state"] > parts["trainable_state"]
    assert full["peak_memory_bytes"] > small["peak_memory_bytes"]
    assert client.get("/api/training/jobs").json() == []  # nothing was queued
    bad = client.post("/api/training/jobs/estimate", json={**body, "dataset_id": "ds-" + "0" * 24})
    assert bad.status_code == 422 and bad.json()["param"] == "dataset_id"
