"""Graceful shutdown: SIGTERM to `loralab worker` or `loralab serve` checkpoints the running job, hands it back to the
queue, and another worker resumes it from that checkpoint; `serve` also lets requests in flight finish."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import (  # noqa: E402,F401  (fixtures: a database per backend, fast timings, fake engine)
    SAMPLES, db, db_url, fast_env, repo, set_scenario, settings, wait_for)


from live_server import TOKEN, start_server, stop_server  # noqa: E402  (tests/ is on sys.path)

WORKER = [sys.executable, "-c", "from loralab.cli import app; app()", "worker"]


def start_worker_process(log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`loralab worker` in a child process (its environment: this one's, so fast_env's settings apply)."""
    with open(log, "ab") as out:
        return subprocess.Popen(WORKER, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def queue_job(settings, max_steps: int, save_steps: int = 0, **extra) -> str:
    """Upload the sample dataset and queue a job through the service layer, as the API does."""
    from loralab.services import datasets, jobs
    from loralab.services.context import open_services

    svc = open_services(settings)
    try:
        dataset = datasets.upload_dataset(svc, (SAMPLES / "basic_qa.jsonl").read_bytes(), "basic_qa.jsonl")
        job = jobs.create_job(svc, {"dataset_id": dataset["id"], "max_steps": max_steps, "save_steps": save_steps,
                                    **extra})
    finally:
        svc.close()
    assert job["status"] == "queued", job
    return job["id"]


def step_of(repo, job_id: str) -> int:
    return repo.get_job(job_id).progress.get("step") or 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def check_resumed(repo, job_id: str, total_steps: int) -> tuple[list, list]:
    """The job ran twice, the second attempt from the checkpoint the first wrote when it was stopped."""
    events = repo.events_after(job_id)
    types = [e.type for e in events]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # nothing stored twice
    assert "cancelled" not in types and types.count("interrupted") == 1, types
    starts = [e for e in events if e.type == "started"]
    assert len(starts) == 2
    interrupted = events[types.index("interrupted")]
    assert interrupted.payload["checkpoint"] and interrupted.payload["step"] > 0
    stopped_at = interrupted.payload["step"]
    checkpoint_steps = [e.payload["step"] for e in events[: events.index(starts[1])] if e.type == "checkpoint"]
    assert starts[1].payload["resumed_from_step"] == stopped_at == max(checkpoint_steps)
    steps = [e.payload["step"] for e in events if e.type == "step"]
    assert steps == list(range(1, total_steps + 1))  # every step once: none lost, none trained twice
    assert events[-1].type == "done"
    return events, starts


@pytest.mark.slow
def test_sigterm_to_worker_process_hands_job_back_and_another_resumes_it(repo, settings, set_scenario, tmp_path):
    total = 300
    set_scenario(total_steps=total, step_seconds=0.1, save_steps=10)
    job_id = queue_job(settings, max_steps=total)
    first = start_worker_process(tmp_path / "first.log")
    second = None
    try:
        wait_for(lambda: step_of(repo, job_id) >= 12, timeout=60)
        engine_pid = repo.get_job(job_id).child_pid
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=settings.cancel_grace_seconds + 15) == 0, (tmp_path / "first.log").read_text()
        job = repo.get_job(job_id)
        assert job.status == "queued" and job.attempt == 1 and job.lease_owner is None
        assert not alive(engine_pid)
        assert "handing its job back" in (tmp_path / "first.log").read_text()
        set_scenario(total_steps=total, step_seconds=0.002, save_steps=10)  # the rest at full speed
        second = start_worker_process(tmp_path / "second.log")
        wait_for(lambda: repo.get_job(job_id).status == "succeeded", timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    job = repo.get_job(job_id)
    assert job.attempt == 2 and job.result_model_id
    _, starts = check_resumed(repo, job_id, total)
    assert starts[1].payload["resumed_from_step"] >= 12  # not the periodic checkpoint at 10: the one at SIGTERM
    assert starts[0].payload["worker"] != starts[1].payload["worker"]
    assert starts[0].payload["worker"].split(":")[1] == str(first.pid)
    assert starts[1].payload["worker"].split(":")[1] == str(second.pid)


def multipart_upload(first_half_sent: threading.Event, release: threading.Event):
    """A dataset upload whose body arrives in two parts: the second only once `release` is set."""
    boundary = "loralab-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"basic_qa.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    data = (SAMPLES / "basic_qa.jsonl").read_bytes()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head + data[: len(data) // 2]
        first_half_sent.set()
        release.wait(30)
        yield data[len(data) // 2:] + tail

    return body(), {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.slow
def test_sigterm_to_serve_finishes_requests_and_hands_jobs_back(tmp_path, set_scenario, fast_env, repo, settings):
    total = 300  # 30 s at this pace: still running when SIGTERM comes, however loaded the machine is
    set_scenario(total_steps=total, step_seconds=0.1, save_steps=0)
    env = {**{k: v for k, v in os.environ.items() if k.startswith("LORALAB_")}, "LORALAB_API_TOKEN": TOKEN,
           "LORALAB_SHUTDOWN_TIMEOUT_SECONDS": "3"}
    server = start_server(settings.home, env=env, args=["--workers", "1"], wait_seconds=300)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    second = None
    try:
        job_id = queue_job(settings, max_steps=total)  # once the server is up: its worker runs it
        wait_for(lambda: step_of(repo, job_id) >= 5, timeout=60)
        # In flight when SIGTERM arrives: an upload whose body is still coming, and a live event stream.
        sent, release, result = threading.Event(), threading.Event(), {}

        def upload():
            body, headers = multipart_upload(sent, release)
            with server.client() as client:
                result["upload"] = client.post("/api/datasets/upload", content=body, headers={**headers, **auth})

        streamed: list[dict] = []

        def stream():
            with server.client(timeout=60) as client, \
                    client.stream("GET", f"/api/training/jobs/{job_id}/events", headers=auth) as response:
                result["stream_status"] = response.status_code
                try:
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            streamed.append(json.loads(line[6:]))
                except httpx.HTTPError as exc:  # closed by the server at the end of its grace
                    result["stream_error"] = exc.__class__.__name__

        threads = [threading.Thread(target=upload), threading.Thread(target=stream)]
        for thread in threads:
            thread.start()
        assert sent.wait(30)
        wait_for(lambda: any(e["type"] == "step" for e in streamed), timeout=30)
        server.process.send_signal(signal.SIGTERM)

        def refused() -> bool:  # the listening socket is closed: new connections fail at once
            try:
                httpx.get(f"{server.url}/api/health", timeout=2)
            except httpx.ConnectError:
                return True
            except httpx.HTTPError:
                return False
            return False

        wait_for(refused, timeout=15)
        release.set()  # the request that was in flight completes after the server stopped accepting
        for thread in threads:
            thread.join(30)
        assert result["upload"].status_code == 201, result["upload"].text
        assert result["upload"].json()["rows"] > 0
        assert server.process.wait(timeout=30) == 0, server.output()[-3000:]
        job = repo.get_job(job_id)
        assert job.status == "queued" and job.attempt == 1, (job.status, job.progress, server.output()[-3000:])
        assert [e["type"] for e in streamed].count("interrupted") == 1, (  # seen live, before the stream closed
            [e["type"] for e in streamed][-5:], result, server.output()[-3000:])
        assert "Shutting down" in server.output()
        set_scenario(total_steps=total, step_seconds=0.002)  # the rest at full speed
        second = start_worker_process(tmp_path / "second.log")
        wait_for(lambda: repo.get_job(job_id).status == "succeeded", timeout=60)
    finally:
        stop_server(server)
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
    check_resumed(repo, job_id, total)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_engine_resumes_from_its_sigterm_checkpoint(loralab_home, monkeypatch, tmp_path):
    """The embedded model: SIGTERM to the worker mid-training, a second worker resumes from the engine's checkpoint."""
    from loralab.settings import get_settings
    from loralab.store.db import open_database
    from loralab.store.repo import Repo

    for key, value in {"LORALAB_HEARTBEAT_SECONDS": "0.5", "LORALAB_WORKER_POLL_SECONDS": "0.2",
                       "LORALAB_TAIL_SECONDS": "0.1", "LORALAB_CANCEL_GRACE_SECONDS": "60"}.items():
        monkeypatch.setenv(key, value)
    settings = get_settings()
    assert settings.engine_command is None  # the real engine
    total = 8
    job_id = queue_job(settings, max_steps=total, per_device_train_batch_size=1, max_seq_length=64,
                       gradient_accumulation_steps=1, logging_steps=1)
    db = open_database(settings.resolved_database_url())
    repo = Repo(db)
    first = start_worker_process(tmp_path / "first.log")
    second = None
    try:
        wait_for(lambda: step_of(repo, job_id) >= 3, timeout=240, interval=0.1)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=90) == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert repo.get_job(job_id).status == "queued"
        second = start_worker_process(tmp_path / "second.log")
        wait_for(lambda: repo.get_job(job_id).status in ("succeeded", "failed"), timeout=300, interval=0.2)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    job = repo.get_job(job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    check_resumed(repo, job_id, total)
    db.dispose()
