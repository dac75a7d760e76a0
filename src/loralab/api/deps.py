"""Request dependencies: the services of the app, and the bearer-token check."""
from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, WebSocket, status

from loralab.services.context import Services

STREAM_TOKEN_PARAM = "token"


def get_services(request: Request) -> Services:
    return request.app.state.services


def token_ok(expected: str | None, authorization: str | None, query_token: str | None = None) -> bool:
    """Constant-time check of `Authorization: Bearer <token>` (or a `?token=` for browser streams)."""
    if not expected:
        return True
    given = None
    if authorization and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    elif query_token:
        given = query_token
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_token(request: Request) -> None:
    """401 unless the configured LORALAB_API_TOKEN is presented (no-op when no token is configured)."""
    settings = request.app.state.services.settings
    query = request.query_params.get(STREAM_TOKEN_PARAM) if request.url.path.endswith("/events") else None
    if not token_ok(settings.api_token, request.headers.get("authorization"), query):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            detail="missing or wrong API token: send 'Authorization: Bearer <LORALAB_API_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})


def websocket_token_ok(websocket: WebSocket) -> bool:
    settings = websocket.app.state.services.settings
    return token_ok(settings.api_token, websocket.headers.get("authorization"),
                    websocket.query_params.get(STREAM_TOKEN_PARAM))
