"""Security tests: attacks tried against a real `loralab serve` (uvicorn in a subprocess), not only TestClient."""
from __future__ import annotations

import pytest

from live_server import SAMPLES, TOKEN, LiveServer, free_port, start_server, stop_server  # noqa: F401  (tests/ on sys.path)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """One no-token server per test module (the default, most exposed configuration)."""
    server = start_server(tmp_path_factory.mktemp("live") / "home")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def live_token_server(tmp_path_factory):
    """One server with LORALAB_API_TOKEN = TOKEN per test module."""
    server = start_server(tmp_path_factory.mktemp("live-token") / "home", env={"LORALAB_API_TOKEN": TOKEN})
    yield server
    stop_server(server)


@pytest.fixture
def make_live_server(tmp_path):
    """Start servers with custom environment/arguments inside one test; all are stopped afterwards."""
    servers: list[LiveServer] = []

    def make(env: dict[str, str] | None = None, args: list[str] | None = None) -> LiveServer:
        server = start_server(tmp_path / f"home{len(servers)}", env, args)
        servers.append(server)
        return server

    yield make
    for server in servers:
        stop_server(server)
