"""Several hosts: worker processes started from different working directories share one database and one
LORALAB_HOME; jobs spread over them, each runs once, and the worker that ran an attempt is on its `started` event."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import (  # noqa: E402,F401  (fixtures: a database per backend, fast timings, fake engine)
    SAMPLES, db, db_url, fast_env, repo, set_scenario, settings, wait_for)

WORKER = [sys.executable, "-c", "from loralab.cli import app; app()", "worker"]
JOBS = 6


@pytest.mark.slow
def test_two_worker_processes_share_the_queue(repo, settings, set_scenario, tmp_path):
    from loralab.services import datasets, jobs
    from loralab.services.context import open_services

    set_scenario(total_steps=10, step_seconds=0.1)
    hosts = {}
    for name in ("host-a", "host-b"):
        cwd = tmp_path / name  # its own working directory: nothing may depend on where a worker was started
        cwd.mkdir()
        log = cwd / "worker.log"
        with open(log, "wb") as out:
            hosts[name] = (subprocess.Popen(WORKER, cwd=cwd, stdout=out, stderr=subprocess.STDOUT), log)
    try:
        for proc, log in hosts.values():  # both are polling before any job exists
            wait_for(lambda: "started on" in log.read_text(errors="replace") or proc.poll() is not None, timeout=120)
            assert proc.poll() is None, log.read_text()
        svc = open_services(settings)
        try:
            dataset = datasets.upload_dataset(svc, (SAMPLES / "basic_qa.jsonl").read_bytes(), "basic_qa.jsonl")
            ids = [jobs.create_job(svc, {"dataset_id": dataset["id"], "max_steps": 10, "model_name": "shared"})["id"]
                   for _ in range(JOBS)]
        finally:
            svc.close()
        wait_for(lambda: all(repo.get_job(i).status == "succeeded" for i in ids), timeout=180, interval=0.2)
    finally:
        for proc, _ in hosts.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in hosts.values():
            proc.wait(timeout=60)
    ran_on = {}
    for job_id in ids:
        job = repo.get_job(job_id)
        assert job.attempt == 1  # claimed once: never by both
        starts = [e for e in repo.events_after(job_id) if e.type == "started"]
        assert len(starts) == 1
        ran_on[job_id] = starts[0].payload["worker"]
    pids = {str(proc.pid) for proc, _ in hosts.values()}
    assert {worker.split(":")[1] for worker in ran_on.values()} == pids, ran_on  # each worker ran at least one
    versions = sorted(repo.get_model(repo.get_job(i).result_model_id).version for i in ids)
    assert versions == list(range(1, JOBS + 1))  # versions allocated across processes without a clash
    for proc, _ in hosts.values():
        assert proc.returncode == 0  # SIGTERM while idle: a clean exit
