"""Under many writers SQLite's one write lock must not turn reads into 500s (found by benchmarks/load.py):
read-only transactions take no lock, and a writer that cannot get the lock in time is a 503 to retry."""
from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from loralab.store.db import open_database
from loralab.store.errors import DatabaseBusy
from loralab.store.repo import Repo

SPEC = {"base_model": "x", "data": {"path": "/tmp/x.jsonl"}}


@pytest.fixture
def busy_repo(tmp_path):
    """A SQLite repo with a 100 ms busy timeout, and a helper that holds the write lock from another thread."""
    db = open_database(f"sqlite:///{tmp_path / 'busy.db'}", lease_seconds=0.3)
    repo = Repo(db)
    job = repo.create_job(SPEC, None, "m")
    holding, release = threading.Event(), threading.Event()

    def hold_write_lock():
        with repo.tx() as s:
            s.execute(sa.text("UPDATE jobs SET model_name = 'held'"))
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold_write_lock, daemon=True)
    yield repo, job, thread, holding, release
    release.set()
    thread.join(30)
    db.dispose()


def test_reads_do_not_wait_for_the_write_lock_and_a_blocked_writer_is_busy(busy_repo):
    repo, job, thread, holding, release = busy_repo
    thread.start()
    assert holding.wait(30)
    # a read while another connection holds the write lock: no lock needed, it answers (committed state)
    assert repo.get_job(job.id).model_name == "m"
    assert [j.id for j in repo.list_jobs()] == [job.id]
    # a write cannot get the lock within the 100 ms busy timeout: a retryable 503, not an OperationalError
    with pytest.raises(DatabaseBusy) as caught:
        repo.create_job(SPEC, None, "other")
    assert caught.value.status == 503 and caught.value.code == "database_busy"
    release.set()
    thread.join(30)
    assert repo.get_job(job.id).model_name == "held"


def test_busy_database_is_a_503_with_retry_after(loralab_home, monkeypatch):
    from loralab.api.app import create_app
    from loralab.services import datasets
    from loralab.settings import Settings

    settings = Settings(home=loralab_home, database_url=None)

    def busy(*_args, **_kwargs):
        raise DatabaseBusy("the database is busy with other writes; try again in a few seconds")

    monkeypatch.setattr(datasets, "list_datasets", busy)
    with TestClient(create_app(settings, mount_web_ui=False), base_url="http://127.0.0.1") as client:
        response = client.get("/api/datasets")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["code"] == "database_busy"
