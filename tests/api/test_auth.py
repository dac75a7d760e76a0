"""With LORALAB_API_TOKEN set, every mutating route and every data-revealing GET needs the bearer token."""
from __future__ import annotations

import re

import pytest
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

PUBLIC_GETS = {"/api/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
TOKEN = "s3cret-token-0123456789"
SAMPLE_PARAMS = {"job_id": "job-" + "a" * 24, "dataset_id": "ds-" + "a" * 24, "model_id": "ft-" + "a" * 24,
                 "topic_id": "tokens",
                 "test_id": "ab-" + "a" * 24, "generation_id": "gen-" + "a" * 24,
                 "evaluation_id": "job-" + "a" * 24, "name": "report.html"}


def all_routes(routes):
    """app.routes, descending into included routers (FastAPI keeps them nested)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from all_routes(inner.routes)
        else:
            yield route


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE_PARAMS[m.group(1)], path)


@pytest.fixture(params=["guarded", "routes_only"])
def secured(request, make_client, settings):
    """The app as served, and (defence in depth) its routes alone without the network guard's early check."""
    settings.api_token = TOKEN
    settings.auth_failures_per_minute = 100_000  # this test guesses wrong on purpose, many times
    client = make_client()
    if request.param == "routes_only":
        from loralab.api.app import create_app
        from loralab.api.security import SecurityMiddleware

        app = create_app(settings, services=client.app.state.services)
        app.user_middleware = [m for m in app.user_middleware if m.cls is not SecurityMiddleware]
        return type(client)(app, base_url="http://127.0.0.1")
    return client


def test_every_mutating_and_data_route_needs_the_token(secured):
    routes = [r for r in all_routes(secured.app.routes) if isinstance(r, Route)]
    checked = 0
    for route in routes:
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            if method == "GET" and route.path in PUBLIC_GETS:
                continue
            url = concrete(route.path)
            response = secured.request(method, url)
            assert response.status_code == 401, f"{method} {route.path} answered {response.status_code} without token"
            assert response.headers.get("www-authenticate") == "Bearer"
            wrong = secured.request(method, url, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, f"{method} {route.path} accepted a wrong token"
            checked += 1
    mutating = {(m, r.path) for r in routes for m in r.methods if m in {"POST", "PUT", "PATCH", "DELETE"}}
    assert len(mutating) >= 9 and checked >= 20
    openapi_paths = set(secured.get("/openapi.json").json()["paths"])
    assert openapi_paths <= {r.path for r in routes}  # nothing escaped the enumeration


def test_public_routes_and_token_accepted(secured):
    assert secured.get("/api/health").status_code == 200
    assert secured.get("/docs").status_code == 200
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert secured.get("/api/datasets", headers=headers).status_code == 200
    assert secured.get("/api/training/jobs", headers=headers).status_code == 200
    info = secured.get("/api/system-info", headers=headers).json()
    assert info["cpu_count"] >= 1 and info["memory"]["total_bytes"] > 0 and "gpus" in info


def test_websocket_needs_the_token(secured):
    routes = [r for r in all_routes(secured.app.routes) if isinstance(r, WebSocketRoute)]
    assert routes
    for route in routes:
        with pytest.raises(WebSocketDisconnect) as info:
            with secured.websocket_connect(concrete(route.path)) as ws:
                ws.receive_json()
        assert info.value.code == 4401
        with pytest.raises(WebSocketDisconnect) as info:  # with the token it gets past auth (job unknown: 4404)
            with secured.websocket_connect(concrete(route.path), headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
                ws.receive_json()
        assert info.value.code == 4404


def test_no_token_configured_means_open(client):
    assert client.get("/api/datasets").status_code == 200
