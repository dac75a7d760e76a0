#!/bin/sh
# Container entrypoint: before `serve` or `worker`, wait for the database and migrate it (Alembic, through
# loralab.store.db.open_database: the same call serve and worker make, locked on PostgreSQL so concurrent starts
# are safe), then exec loralab so it gets the signals (a worker checkpoints its job on SIGTERM).
# Any other loralab sub-command (`train`, `demo`, `--help`) runs as is; so does a program (`bash`, `python`).
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve --host 0.0.0.0 --port 8000 --workers 0
fi

case "$1" in
    serve|worker)
        python - <<'PY'
"""Wait up to LORALAB_DB_WAIT_SECONDS for the database to accept connections, then migrate it to the newest schema."""
import sys
import time

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from loralab.settings import get_settings
from loralab.store.db import open_database

try:
    settings = get_settings()
except ValidationError as exc:
    for error in exc.errors():
        name = "LORALAB_" + "_".join(str(part) for part in error.get("loc", ())).upper()
        print(f"loralab-entrypoint: error: {name}: {error.get('msg', 'invalid value')}", file=sys.stderr)
    sys.exit(2)
url = settings.resolved_database_url()
shown = make_url(url).render_as_string(hide_password=True)
deadline = time.monotonic() + settings.db_wait_seconds
tries = 0
while True:
    tries += 1
    try:
        db = open_database(url, migrate_schema=False, lease_seconds=settings.lease_seconds)
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            db.dispose()
        break
    except SQLAlchemyError as exc:
        if time.monotonic() >= deadline:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            print(f"loralab-entrypoint: error: the database {shown} did not accept connections within "
                  f"{settings.db_wait_seconds:g} s ({tries} tries; last: {reason}). Check LORALAB_DATABASE_URL and "
                  "that the database server is running, or wait longer with LORALAB_DB_WAIT_SECONDS.",
                  file=sys.stderr)
            sys.exit(1)
        time.sleep(1.0)
try:
    open_database(url, lease_seconds=settings.lease_seconds).dispose()
except SQLAlchemyError as exc:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    print(f"loralab-entrypoint: error: migrating the database {shown} failed: {reason}", file=sys.stderr)
    sys.exit(1)
print(f"loralab-entrypoint: database {shown} ready (schema migrated)", file=sys.stderr)
PY
        exec loralab "$@"
        ;;
    -*)
        exec loralab "$@"
        ;;
esac

# A program on PATH runs as is; anything else is a loralab sub-command (`export` and `eval` are shell builtins,
# not programs, so only a path counts).
case "$(command -v "$1" 2>/dev/null || true)" in
    */*) exec "$@" ;;
esac
exec loralab "$@"
