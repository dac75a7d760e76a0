"""The Alembic migrations build exactly the schema that store/models.py declares, on SQLite and PostgreSQL."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from loralab.store.db import open_database
from loralab.store.models import Base


def test_migrations_match_models(db_url):
    db = open_database(db_url)
    try:
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        db.dispose()
    assert diff == [], f"models.py and the migrations differ: {diff}"
