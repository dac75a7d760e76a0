"""Errors a user can cause, each with an HTTP-style status, a stable code and a fixable message."""
from __future__ import annotations

from typing import Any


class LoralabError(Exception):
    """Base of user-facing errors: `status`, `code`, `message`, optional `param` and `errors` list."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.param = param
        self.errors = errors or []


class NotFound(LoralabError):
    status, code = 404, "not_found"


class Conflict(LoralabError):
    status, code = 409, "conflict"


class Invalid(LoralabError):
    status, code = 422, "invalid"


class TooLarge(LoralabError):
    status, code = 413, "too_large"


class DatabaseBusy(LoralabError):
    """SQLite's write lock was not had within the busy timeout (many writers at once): retry shortly."""

    status, code = 503, "database_busy"
    headers = {"Retry-After": "2"}


class IllegalTransition(Conflict):
    code = "illegal_transition"


class LeaseLost(Exception):
    """A worker's claim on a job is gone (expired and requeued, or taken over): its writes are refused."""
