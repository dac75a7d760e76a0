"""Request dependencies: the services of the app, the bearer-token check, and stream tickets."""
from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, WebSocket, status
from starlette.requests import HTTPConnection

from loralab.services.context import Services
from loralab.services.tickets import check_ticket

# Browsers cannot set headers on EventSource/WebSocket: they pass a short-lived signed ticket (never the token)
TICKET_PARAM = "ticket"
UNAUTHORIZED = "missing or wrong API token: send 'Authorization: Bearer <LORALAB_API_TOKEN>'"


def get_services(request: Request) -> Services:
    return request.app.state.services


def token_ok(expected: str | None, authorization: str | None) -> bool:
    """Constant-time check of `Authorization: Bearer <token>` (always true when no token is configured)."""
    if not expected:
        return True
    if not authorization or authorization[:7].lower() != "bearer ":
        return False
    return hmac.compare_digest(authorization[7:].strip().encode(), expected.encode())


def require_token(request: Request) -> None:
    """401 unless the configured LORALAB_API_TOKEN is presented (no-op when no token is configured)."""
    settings = request.app.state.services.settings
    if not token_ok(settings.api_token, request.headers.get("authorization")):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def token_or_ticket_ok(conn: HTTPConnection, scope: str) -> bool:
    """The bearer token, or `?ticket=` issued for exactly `scope` (e.g. 'events:<job id>') and not expired."""
    svc = conn.app.state.services
    if token_ok(svc.settings.api_token, conn.headers.get("authorization")):
        return True
    ticket = conn.query_params.get(TICKET_PARAM)
    return ticket is not None and check_ticket(svc, ticket, scope)


def require_token_or_ticket(request: Request, scope: str) -> None:
    """401 unless the request carries the token or a valid ticket for `scope`."""
    if not token_or_ticket_ok(request, scope):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            detail=f"{UNAUTHORIZED}, or a fresh '?{TICKET_PARAM}=' from the matching ticket route",
                            headers={"WWW-Authenticate": "Bearer"})


def events_scope(job_id: str) -> str:
    """The ticket scope that opens one job's event stream (SSE and WebSocket)."""
    return f"events:{job_id}"


def websocket_access_ok(websocket: WebSocket, job_id: str) -> bool:
    return token_or_ticket_ok(websocket, events_scope(job_id))
