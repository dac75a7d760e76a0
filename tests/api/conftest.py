import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import *  # noqa: E402,F401,F403  (shared service fixtures)

import pytest  # noqa: E402


def local_client(app, **kwargs):
    """A TestClient that talks to `app` as http(s)://127.0.0.1 (the server refuses other Host names)."""
    from fastapi.testclient import TestClient

    class LocalClient(TestClient):
        def websocket_connect(self, url: str, *args, **kw):
            return super().websocket_connect("ws://127.0.0.1" + url if url.startswith("/") else url, *args, **kw)

    return LocalClient(app, base_url="http://127.0.0.1", **kwargs)


@pytest.fixture
def make_client(settings):
    """Build a TestClient over create_app(settings); tweak `settings` before calling it."""
    from loralab.api.app import create_app

    clients = []

    def make(**headers):
        client = local_client(create_app(settings), headers=headers)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def dataset_id(client):
    """The basic sample uploaded through the API."""
    data = (SAMPLES / "basic_qa.jsonl").read_bytes()
    response = client.post("/api/datasets/upload", files={"file": ("basic_qa.jsonl", data)}, data={"name": "basic"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def run_worker(client, settings):
    """Start an in-process worker thread that shares the app's database and event hub."""
    from service_fixtures import worker_threads

    svc = client.app.state.services
    yield from worker_threads(svc.db, settings, notify=svc.hub.publish)
