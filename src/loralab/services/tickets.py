"""Signed, short-lived tickets: open one event stream or report file without putting the API token in a URL."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from loralab.services.context import Services

KEY_FILE = Path("secrets") / "ticket-key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(svc: Services) -> bytes:
    """The signing key: random, kept in LORALAB_HOME/secrets (0600) so every API process on that home agrees."""
    path = svc.settings.home / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)  # first writer wins; a racing process reads the winner's key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def issue_ticket(svc: Services, scope: str, seconds: float | None = None) -> dict:
    """A ticket valid for `scope` (e.g. 'events:job-…') for `seconds` (default LORALAB_STREAM_TICKET_SECONDS)."""
    lifetime = float(seconds if seconds is not None else svc.settings.stream_ticket_seconds)
    expires = int(time.time() + lifetime)
    payload = _b64(json.dumps({"s": scope, "e": expires}, separators=(",", ":")).encode())
    signature = _b64(hmac.new(_key(svc), payload.encode(), hashlib.sha256).digest())
    return {"ticket": f"{payload}.{signature}", "scope": scope, "expires_at": expires}


def check_ticket(svc: Services, ticket: str | None, scope: str) -> bool:
    """True when `ticket` was issued here for exactly `scope` and has not expired."""
    if not ticket or len(ticket) > 1024 or ticket.count(".") != 1:
        return False
    payload, signature = ticket.split(".")
    expected = _b64(hmac.new(_key(svc), payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return False
    try:
        claims = json.loads(_unb64(payload))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(claims, dict) and claims.get("s") == scope and isinstance(claims.get("e"), int) \
        and claims["e"] >= time.time()
