"""docker/entrypoint.sh outside a container: a fake `loralab` on PATH records how it was exec'd; the database
steps (wait, migrate) run for real against SQLite and, with LORALAB_TEST_DATABASE_URL, PostgreSQL."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
PG_ENV = "LORALAB_TEST_DATABASE_URL"
FAKE_LORALAB = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LORALAB_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "pid": os.getpid()}}) + "\\n")
"""


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from loralab.store.db import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


@pytest.fixture
def run(tmp_path, loralab_home):
    """Run the entrypoint with args and extra env; returns (completed process, calls the fake loralab got)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "loralab"
    fake.write_text(FAKE_LORALAB)
    fake.chmod(0o755)
    def go(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
        log = tmp_path / f"loralab-calls-{secrets.token_hex(4)}.jsonl"  # one per run: runs may overlap
        full_env = {key: value for key, value in os.environ.items() if not key.startswith("LORALAB_")}
        full_env.update({"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
                         "FAKE_LORALAB_LOG": str(log), "LORALAB_HOME": str(loralab_home)})
        full_env.update(env or {})
        process = subprocess.Popen(["sh", str(ENTRYPOINT), *args], env=full_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        stdout, stderr = process.communicate(timeout=timeout)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        result.pid = process.pid
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls
    return go


def sqlite_revision(path: Path) -> str | None:
    engine = create_engine(f"sqlite:///{path}")
    try:
        if "alembic_version" not in inspect(engine).get_table_names():
            return None
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


@pytest.mark.parametrize("role", ["serve", "worker"])
def test_serve_and_worker_migrate_then_exec_loralab(run, tmp_path, role):
    db_file = tmp_path / "fresh" / "loralab.db"  # its directory does not exist yet
    args = [role, "--port", "8001"] if role == "serve" else [role]
    result, calls = run(*args, env={"LORALAB_DATABASE_URL": f"sqlite:///{db_file}"})
    assert result.returncode == 0, result.stderr
    assert calls == [{"argv": args, "pid": calls[0]["pid"]}]
    assert sqlite_revision(db_file) == head_revision()
    assert "ready (schema migrated)" in result.stderr


def test_no_arguments_serves_the_api_for_a_container(run, loralab_home):
    result, calls = run()
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in calls] == [["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]]
    assert sqlite_revision(loralab_home / "loralab.db") == head_revision()  # the default database under home


def test_loralab_is_execd_not_forked(run, tmp_path):
    """exec: loralab replaces the entrypoint's shell (same pid), so `docker stop`'s SIGTERM reaches the worker."""
    for args in (["worker"], ["train", "--help"]):
        result, calls = run(*args, env={"LORALAB_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
        assert result.returncode == 0, result.stderr
        assert [c["pid"] for c in calls] == [result.pid]


@pytest.mark.parametrize("args", [["train", "--help"], ["export", "runs/a", "--format", "gguf"], ["eval", "--help"],
                                  ["--help"], ["data", "validate", "x.jsonl"]])
def test_other_commands_skip_the_database(run, args):
    """Sub-commands that need no service start at once, even with no database (`export`/`eval` are shell builtins)."""
    unreachable = {"LORALAB_DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:9/none", "LORALAB_DB_WAIT_SECONDS": "0"}
    result, calls = run(*args, env=unreachable)
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in calls] == [args]
    assert "database" not in result.stderr


def test_a_program_runs_as_is(run):
    result, calls = run("sh", "-c", "echo from-sh")
    assert result.returncode == 0 and result.stdout == "from-sh\n" and calls == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gives_up_on_an_unreachable_database_with_a_clear_message(run):
    port = free_port()
    started = time.monotonic()
    result, calls = run("worker", env={"LORALAB_DATABASE_URL": f"postgresql://loralab:s3cret-pw@127.0.0.1:{port}/x",
                                       "LORALAB_DB_WAIT_SECONDS": "2"})
    assert result.returncode == 1 and calls == []
    assert time.monotonic() - started >= 2  # it did wait (no upper bound asserted: the machine may be busy)
    assert "did not accept connections within 2 s" in result.stderr
    assert "LORALAB_DB_WAIT_SECONDS" in result.stderr and "LORALAB_DATABASE_URL" in result.stderr
    assert "s3cret-pw" not in result.stderr and "***" in result.stderr


def test_a_bad_setting_stops_it_before_loralab(run, tmp_path):
    result, calls = run("serve", env={"LORALAB_API_TOKEN": "short", "LORALAB_DATABASE_URL": f"sqlite:///{tmp_path}/d.db"})
    assert result.returncode == 2 and calls == []
    assert "LORALAB_API_TOKEN" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def pg_database():
    """A new, empty PostgreSQL database on the test server (dropped afterwards)."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set")
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"entry_{secrets.token_hex(5)}"
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = make_url(plain).set(database=name)
    yield url
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def pg_revision(url) -> str | None:
    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_concurrent_starts_migrate_one_postgres_database_once(run, pg_database):
    """An api and three workers starting together on an empty database: all get a schema at head."""
    url = pg_database.render_as_string(hide_password=False)
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda role: run(role, env={"LORALAB_DATABASE_URL": url}),
                                ["serve", "worker", "worker", "worker"]))
    for result, calls in results:
        assert result.returncode == 0, result.stderr
        assert len(calls) == 1
    assert pg_revision(pg_database) == head_revision()


class LateProxy:
    """A TCP port that starts forwarding to the PostgreSQL server only after `delay_seconds` (a database that is
    still starting, as in `docker compose up`)."""

    def __init__(self, target: tuple[str, int], delay_seconds: float):
        self.port = free_port()
        self.target = target
        self.delay_seconds = delay_seconds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        if self.stop.wait(self.delay_seconds):
            return
        with socket.create_server(("127.0.0.1", self.port)) as server:
            server.settimeout(0.2)
            while not self.stop.is_set():
                try:
                    client, _ = server.accept()
                except socket.timeout:
                    continue
                upstream = socket.create_connection(self.target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.postgres
def test_waits_for_a_database_that_comes_up_later(run, pg_database):
    proxy = LateProxy((pg_database.host or "127.0.0.1", pg_database.port or 5432), delay_seconds=3)
    try:
        url = pg_database.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        result, calls = run("worker", env={"LORALAB_DATABASE_URL": url, "LORALAB_DB_WAIT_SECONDS": "60"})
    finally:
        proxy.stop.set()
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in calls] == [["worker"]]
    assert pg_revision(pg_database) == head_revision()
