"""Migrations on start: several processes opening one fresh database at once all succeed, schema at head."""
from __future__ import annotations

import fcntl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import db_url  # noqa: E402,F401  (fixture: SQLite file, or a fresh PostgreSQL schema)

from loralab.store.db import MIGRATIONS_DIR, open_database  # noqa: E402
from loralab.store.models import Base  # noqa: E402

PROCESSES = 4
# Each process imports everything first, says so, then waits for the go file: the migrations really overlap.
# A lease of 0.3 s gives SQLite a busy timeout of 100 ms, far shorter than creating the tables takes, so
# without the migration lock the losers fail with "database is locked" (3 of 4 did, before it existed).
START = """
import os, sys, time
from loralab.store.db import open_database
url, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
open_database(url, lease_seconds=0.3).dispose()
print("migrated", flush=True)
"""


def head_revisions() -> set[str]:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return set(ScriptDirectory.from_config(config).get_heads())


@pytest.mark.slow
def test_processes_starting_together_all_migrate(db_url, tmp_path):  # noqa: F811
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", START, db_url, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(PROCESSES)]
    try:
        for proc in procs:
            assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode(errors="replace")
        go.touch()
        results = [proc.communicate(timeout=180) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        assert out.endswith(b"migrated\n")
    db = open_database(db_url, migrate_schema=False)
    try:
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            assert set(ctx.get_current_heads()) == head_revisions()
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        db.dispose()


def test_start_on_current_schema_never_waits_for_a_migrator(loralab_home):
    url = f"sqlite:///{loralab_home / 'loralab.db'}"
    open_database(url).dispose()
    lock_path = loralab_home / "loralab.db.migrate-lock"
    assert lock_path.exists()  # the first start migrated under the lock
    with open(lock_path, "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as if another process were migrating right now
        opened = threading.Event()

        def start():
            open_database(url).dispose()
            opened.set()

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        # It reads the revision without the lock and finds nothing to do; were it to wait, it would wait 300 s.
        assert opened.wait(60)
        thread.join(5)
