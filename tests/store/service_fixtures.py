"""Shared fixtures for service tests: each test gets SQLite, or its own PostgreSQL schema, and fast worker timings."""
from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import pytest

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fake_engine.py"
PG_ENV = "LORALAB_TEST_DATABASE_URL"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request, loralab_home):
    """A database URL: a SQLite file under LORALAB_HOME, or a fresh schema on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{loralab_home / 'loralab.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set")
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def fast_env(db_url, loralab_home, monkeypatch):
    """Environment for tight lease/heartbeat timings and the fake engine (inherited by worker subprocesses)."""
    scenario = loralab_home / "scenario.json"
    scenario.write_text("{}")
    env = {
        "LORALAB_DATABASE_URL": db_url,
        "LORALAB_LEASE_SECONDS": "1.5",
        "LORALAB_HEARTBEAT_SECONDS": "0.2",
        "LORALAB_WORKER_POLL_SECONDS": "0.1",
        "LORALAB_TAIL_SECONDS": "0.05",
        "LORALAB_EVENT_POLL_SECONDS": "0.1",
        "LORALAB_CANCEL_GRACE_SECONDS": "3",
        "LORALAB_ENGINE_COMMAND": json.dumps([sys.executable, str(FAKE_ENGINE), "--scenario", str(scenario)]),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def settings(fast_env):
    from loralab.settings import get_settings

    return get_settings()


@pytest.fixture
def set_scenario(settings):
    """Write the fake engine's scenario (see tests/fake_engine.py)."""
    def write(**fields):
        (settings.home / "scenario.json").write_text(json.dumps(fields))
    return write


@pytest.fixture
def db(settings):
    from loralab.store.db import open_database

    database = open_database(settings.resolved_database_url())
    yield database
    database.dispose()


@pytest.fixture
def repo(db):
    from loralab.store.repo import Repo

    return Repo(db)


SAMPLES = Path(__file__).resolve().parents[2] / "src" / "loralab" / "data" / "samples"


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def worker_threads(db, settings, **shared):
    """Generator behind worker fixtures: yields start(**kw) -> Worker (a thread each); stops and joins them after."""
    import threading

    from loralab.runner.worker import Worker

    started = []

    def start(**kwargs):
        worker = Worker(db, settings, **shared, **kwargs)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, _ in started:
        worker.stop.set()
    for _, thread in started:
        thread.join(30)
