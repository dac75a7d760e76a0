"""Worker + supervisor with the fake engine: success, cancel, SIGKILL escalation, crash, error, lost worker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab.runner.worker import Worker
from loralab.store.repo import Repo
from service_fixtures import wait_for, worker_threads


def queue_job(repo: Repo, settings) -> str:
    data = settings.home / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    spec = {"base_model": "smollm2-135m-instruct", "method": "lora", "data": {"path": str(data)}, "max_steps": 5}
    job = repo.create_job(spec, None, "fake-model")
    repo.set_status(job.id, "queued")
    return job.id


@pytest.fixture
def start_worker(db, settings):
    yield from worker_threads(db, settings)


def status_of(repo, job_id):
    return repo.get_job(job_id).status


def test_success_stores_events_progress_and_model_version(repo, settings, set_scenario, start_worker):
    set_scenario(total_steps=4, step_seconds=0.02)
    job_id = queue_job(repo, settings)
    start_worker()
    wait_for(lambda: status_of(repo, job_id) == "succeeded")
    job = repo.get_job(job_id)
    events = repo.events_after(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events] == ["started", "step", "step", "step", "step", "done"]
    assert job.progress["step"] == 4 and job.progress["percent"] == 100.0
    model = repo.get_model(job.result_model_id)
    assert model.name == "fake-model" and model.version == 1 and model.job_id == job_id
    assert model.metrics["total_steps"] == 4 and model.base_model == "smollm2-135m-instruct"
    files = {p.name for p in Path(model.path).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "summary.json", "spec.json"} <= files
    assert "events.jsonl" not in files and "checkpoints" not in files


def test_cancel_during_training_keeps_checkpoint(repo, settings, set_scenario, start_worker):
    set_scenario(total_steps=500, step_seconds=0.05)
    job_id = queue_job(repo, settings)
    start_worker()
    wait_for(lambda: (repo.get_job(job_id).progress.get("step") or 0) >= 3)
    pid = repo.get_job(job_id).child_pid
    assert pid
    asked = time.monotonic()
    repo.request_cancel(job_id)
    wait_for(lambda: status_of(repo, job_id) == "cancelled", timeout=10)
    assert time.monotonic() - asked < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    checkpoints = list((settings.home / "runs" / job_id / "checkpoints").glob("checkpoint-*"))
    assert checkpoints
    last = repo.events_after(job_id)[-1]
    assert last.type == "cancelled" and last.payload["checkpoint"]


def test_cancel_escalates_to_sigkill(repo, settings, set_scenario, start_worker, monkeypatch):
    settings.cancel_grace_seconds = 0.5
    set_scenario(total_steps=500, step_seconds=0.05, ignore_sigterm=True)
    job_id = queue_job(repo, settings)
    start_worker()
    wait_for(lambda: (repo.get_job(job_id).progress.get("step") or 0) >= 2)
    pid = repo.get_job(job_id).child_pid
    repo.request_cancel(job_id)
    wait_for(lambda: status_of(repo, job_id) == "cancelled", timeout=10)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert repo.events_after(job_id)[-1].type == "cancelled"


def test_crash_fails_with_stderr_tail(repo, settings, set_scenario, start_worker):
    set_scenario(total_steps=5, step_seconds=0.01, crash_at_step=3, crash_code=7)
    job_id = queue_job(repo, settings)
    start_worker()
    wait_for(lambda: status_of(repo, job_id) == "failed")
    job = repo.get_job(job_id)
    assert job.error_code == "engine_crashed"
    assert "code 7" in job.error_message and "Segmentation fault at step 3" in job.error_message
    assert repo.events_after(job_id)[-1].type == "error"


def test_error_event_fails_with_its_code(repo, settings, set_scenario, start_worker):
    set_scenario(total_steps=5, step_seconds=0.01, error_at_step=2)
    job_id = queue_job(repo, settings)
    start_worker()
    wait_for(lambda: status_of(repo, job_id) == "failed")
    job = repo.get_job(job_id)
    assert job.error_code == "out_of_memory" and "step 2" in job.error_message
    assert [e.type for e in repo.events_after(job_id)].count("error") == 1


def test_killed_worker_job_is_requeued_and_resumed(repo, settings, set_scenario, start_worker):
    set_scenario(total_steps=40, step_seconds=0.1, save_steps=2)
    job_id = queue_job(repo, settings)
    proc = subprocess.Popen([sys.executable, "-m", "loralab.runner.worker"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (repo.get_job(job_id).progress.get("step") or 0) >= 5, timeout=60)
        assert repo.get_job(job_id).attempt == 1
        orphan = repo.get_job(job_id).child_pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    start_worker()
    wait_for(lambda: status_of(repo, job_id) == "succeeded", timeout=60)
    job = repo.get_job(job_id)
    assert job.attempt == 2
    events = repo.events_after(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # nothing stored twice
    starts = [e for e in events if e.type == "started"]
    assert len(starts) == 2
    resumed = starts[1].payload["resumed_from_step"]
    checkpoints_before = [e.payload["step"] for e in events[: events.index(starts[1])] if e.type == "checkpoint"]
    assert resumed >= 4 and resumed == max(checkpoints_before)
    steps = {e.payload["step"] for e in events if e.type == "step"}
    assert steps == set(range(1, 41))
    assert events[-1].type == "done" and job.result_model_id
    assert not running(orphan)  # the dead worker's engine was killed before the job was resumed


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stopping_worker_hands_job_back(repo, settings, set_scenario, start_worker, db):
    set_scenario(total_steps=60, step_seconds=0.05)
    job_id = queue_job(repo, settings)
    first = start_worker()
    wait_for(lambda: (repo.get_job(job_id).progress.get("step") or 0) >= 2)
    first.stop.set()
    wait_for(lambda: status_of(repo, job_id) == "queued", timeout=10)
    assert "cancelled" not in [e.type for e in repo.events_after(job_id)]
    start_worker()
    wait_for(lambda: status_of(repo, job_id) == "succeeded", timeout=30)
    assert repo.get_job(job_id).attempt == 2


def test_database_blip_does_not_kill_the_run(repo, settings, set_scenario, db, monkeypatch):
    from sqlalchemy.exc import OperationalError

    set_scenario(total_steps=6, step_seconds=0.05)
    job_id = queue_job(repo, settings)
    worker = Worker(db, settings)
    real, failures = worker.repo.append_events, {"left": 3}

    def flaky(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.repo, "append_events", flaky)
    assert worker.run_once() == "succeeded"
    steps = [e.payload["step"] for e in repo.events_after(job_id) if e.type == "step"]
    assert steps == [1, 2, 3, 4, 5, 6] and failures["left"] == 0
