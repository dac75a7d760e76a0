"""Database engine: SQLite (WAL, busy timeout, one writer at a time) or PostgreSQL, migrated by Alembic on start."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# A blocked SQLite writer gives up well before a worker's lease (30 s by default) runs out, so the worker can retry
# or let go instead of writing after another worker took the job over.
SQLITE_BUSY_MS = 10_000


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
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe when several processes start at once)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


class Database:
    """An Engine plus its session factory; `open_database` creates the SQLite directory and migrates."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        return self.sessions()

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
