"""Repository: migrations, the job state machine, atomic claims, fencing, reaping and the model registry."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from loralab.store.errors import Conflict, IllegalTransition, LeaseLost, NotFound
from loralab.store.repo import Repo, check_transition

SPEC = {"base_model": "x", "data": {"path": "/tmp/x.jsonl"}}


def queued_job(repo: Repo, name: str = "m"):
    job = repo.create_job(SPEC, None, name)
    return repo.set_status(job.id, "queued")


def test_migrations_create_tables_and_are_idempotent(db, settings):
    from loralab.store.db import migrate

    migrate(db.engine)
    names = set(sa.inspect(db.engine).get_table_names())
    assert {"datasets", "jobs", "job_events", "models", "deployments", "alembic_version"} <= names


def test_state_machine_rejects_illegal_transitions(repo):
    job = repo.create_job(SPEC, None, "m")
    with pytest.raises(IllegalTransition):
        repo.set_status(job.id, "succeeded")
    repo.set_status(job.id, "queued")
    repo.request_cancel(job.id)
    assert repo.get_job(job.id).status == "cancelled"
    with pytest.raises(IllegalTransition):
        repo.set_status(job.id, "queued")
    with pytest.raises(Conflict):
        repo.request_cancel(job.id)
    for final in ("succeeded", "failed", "cancelled"):
        with pytest.raises(IllegalTransition):
            check_transition(final, "running")
    assert [e.type for e in repo.events_after(job.id)] == ["cancelled"]


def test_bad_ids_are_not_found(repo):
    for bad in ("job-../../etc", "job-123", "'; drop table jobs; --"):
        with pytest.raises(NotFound):
            repo.get_job(bad)


def test_claim_race_threads_exactly_one_wins(repo):
    job = queued_job(repo)
    barrier = threading.Barrier(8)
    wins: list = []

    def race(i):
        barrier.wait()
        claim = repo.claim_job(f"w{i}", 30)
        if claim:
            wins.append(claim)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and wins[0].job_id == job.id and wins[0].attempt == 1
    assert repo.get_job(job.id).lease_owner == wins[0].owner


CLAIMER = """
import sys, time
from loralab.store.db import open_database
from loralab.store.repo import Repo
repo = Repo(open_database(sys.argv[1]))
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
claim = repo.claim_job(sys.argv[3], 30)
print(claim.job_id if claim else "none")
"""


def test_claim_race_processes_exactly_one_wins(repo, settings):
    job = queued_job(repo)
    start = time.time() + 2.5  # both interpreters are up and connected before the gun
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, settings.resolved_database_url(), str(start), f"p{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == sorted([job.id, "none"])


def test_stale_worker_is_fenced_out_after_requeue(repo):
    job = queued_job(repo)
    first = repo.claim_job("old", 0.01)
    time.sleep(0.05)
    reaped = repo.reap_expired(max_attempts=3)
    assert [(r.job_id, r.status) for r in reaped] == [(job.id, "queued")]
    second = repo.claim_job("new", 30)
    assert second.attempt == 2
    with pytest.raises(LeaseLost):
        repo.heartbeat(first, 30)
    with pytest.raises(LeaseLost):
        repo.append_events(first, [(1, {"type": "log"})])
    with pytest.raises(LeaseLost):
        repo.finish_job(first, "succeeded")
    assert repo.heartbeat(second, 30) is False


def test_events_are_deduplicated_by_seq(repo):
    queued_job(repo)
    claim = repo.claim_job("w", 30)
    events = [(i, {"type": "step", "step": i}) for i in (1, 2, 3)]
    assert repo.append_events(claim, events) == 3
    assert repo.append_events(claim, events + [(4, {"type": "step", "step": 4})]) == 1
    assert [e.seq for e in repo.events_after(claim.job_id, 1)] == [2, 3, 4]


def test_reaper_fails_after_max_attempts(repo):
    job = queued_job(repo)
    repo.claim_job("w", 0.0)
    time.sleep(0.01)
    assert repo.reap_expired(max_attempts=1)[0].status == "failed"
    row = repo.get_job(job.id)
    assert row.status == "failed" and row.error_code == "worker_lost"


def test_registry_stage_deploy_rollback_delete(repo):
    ids = []
    for i in range(2):
        queued_job(repo, "support-bot")
        claim = repo.claim_job("w", 30)
        row = repo.finish_job(claim, "succeeded", model=dict(
            id=f"ft-{i:024x}", name="support-bot", base_model="b", method="lora", dataset_id=None,
            job_id=claim.job_id, lineage={}, spec={}, metrics={"final_loss": 1.0}, path="/nowhere"))
        ids.append(row.result_model_id)
    versions = {m.id: m.version for m in repo.list_models("support-bot")}
    assert sorted(versions.values()) == [1, 2]
    repo.set_stage(ids[0], "production")
    repo.set_stage(ids[1], "production")
    assert repo.get_model(ids[0]).stage == "archived"
    repo.set_stage(ids[0], "staging")
    repo.deploy(ids[0])
    repo.deploy(ids[1])
    assert [m.id for m in repo.list_models() if m.deployed] == [ids[1]]
    with pytest.raises(Conflict):
        repo.delete_model(ids[1])
    assert repo.rollback(ids[1]).id == ids[0]
    assert repo.get_model(ids[0]).deployed and not repo.get_model(ids[1]).deployed
    repo.delete_model(ids[1])
    with pytest.raises(NotFound):
        repo.get_model(ids[1])
