"""Database engine: SQLite (WAL, busy timeout, one writer at a time) or PostgreSQL, migrated by Alembic on start."""
from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from loralab.store.errors import DatabaseBusy

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# A blocked SQLite writer gives up well before a worker's lease (30 s by default) runs out, so the worker can retry
# or let go instead of writing after another worker took the job over.
SQLITE_BUSY_MS = 10_000
# How long a starting process waits for another one migrating the same SQLite file.
MIGRATION_LOCK_SECONDS = 300.0

try:  # POSIX; elsewhere SQLite's own write lock is the only guard
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


# Set while a read-only transaction begins: SQLite then starts it deferred (WAL readers take no lock), so reads
# never queue behind the one writer; every other transaction takes the write lock up front (BEGIN IMMEDIATE).
_READ_ONLY = contextvars.ContextVar("loralab_read_only_transaction", default=False)


def busy_timeout_ms(lease_seconds: float | None = None) -> int:
    """SQLite's busy timeout: a third of the lease, at most SQLITE_BUSY_MS."""
    if lease_seconds is None:
        return SQLITE_BUSY_MS
    return max(100, min(SQLITE_BUSY_MS, int(lease_seconds * 1000 / 3)))


def make_engine(url: str, lease_seconds: float | None = None) -> Engine:
    """An Engine for `url`; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE so writers queue instead of failing."""
    if url.startswith("sqlite"):
        busy_ms = busy_timeout_ms(lease_seconds)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_ms / 1000})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own is deferred)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # IMMEDIATE takes the write lock up front: a read-then-write transaction never hits SQLITE_BUSY midway.
            # A read-only one needs no lock at all in WAL mode.
            conn.exec_driver_sql("BEGIN" if _READ_ONLY.get() else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe when several processes start at once)."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    heads = set(ScriptDirectory.from_config(config).get_heads())
    if _current_heads(engine) == heads:  # the usual start: nothing to do, and no lock taken
        return
    # One migrator at a time: PostgreSQL takes an advisory lock inside the transaction (migrations/env.py), SQLite
    # a lock file, because its write lock is given up after the busy timeout (a third of the lease) while a first
    # process may still be creating the tables. The second one then finds the schema at head and changes nothing.
    with _sqlite_migration_lock(engine), engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def _current_heads(engine: Engine) -> set[str]:
    """The revisions the database is at (empty when it has no schema yet), read without SQLite's write lock."""
    from alembic.runtime.migration import MigrationContext

    token = _READ_ONLY.set(True)
    try:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())
    finally:
        _READ_ONLY.reset(token)


@contextmanager
def _sqlite_migration_lock(engine: Engine, wait_seconds: float = MIGRATION_LOCK_SECONDS) -> Iterator[None]:
    """Hold `<database>.migrate-lock` (flock) while migrating a SQLite file; other databases need none here."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:" or fcntl is None:
        yield
        return
    path = Path(database).with_name(Path(database).name + ".migrate-lock")
    with open(path, "a+b") as fh:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been migrating {Path(database).name} for more than "
                                       f"{wait_seconds:g} s (lock file {path.name}); stop it, or wait and start "
                                       "again") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Database:
    """An Engine plus its session factory; `open_database` creates the SQLite directory and migrates."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        return self.sessions()

    @contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Session]:
        """One transaction; `read_only` ones never wait for SQLite's write lock. A write lock not had within the
        busy timeout is `DatabaseBusy` (503, retry), not a crash."""
        token = _READ_ONLY.set(read_only)  # kept for the whole block: the session begins at its first statement
        try:
            with self.session() as session, session.begin():
                yield session
        except OperationalError as exc:
            if "database is locked" in str(exc.orig):
                raise DatabaseBusy("the database is busy with other writes; try again in a few seconds",
                                   code="database_busy") from None
            raise
        finally:
            _READ_ONLY.reset(token)

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str, *, migrate_schema: bool = True, lease_seconds: float | None = None) -> Database:
    """Open (and by default migrate) the database at `url`; `lease_seconds` bounds SQLite's busy timeout."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url, lease_seconds)
    if migrate_schema:
        migrate(engine)
    return Database(engine)
