"""Issue 16 items 4 and 6: base models come only from the embedded model, LORALAB_HOME/models and the operator's
allow-list; the hub is never called while hub access is off; model loads never occupy the request threads."""
from __future__ import annotations

import json
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loralab.api.app import create_app
from loralab.settings import Settings

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "loralab" / "data" / "samples"

@pytest.fixture
def hub_calls(monkeypatch):
    """Every call into huggingface_hub's download functions, recorded (and refused)."""
    import huggingface_hub

    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return call

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse(name))
    return calls


@pytest.fixture
def make(tmp_path):
    clients = []

    def build(**fields) -> TestClient:
        home = tmp_path / f"home{len(clients)}"
        (home / "models").mkdir(parents=True, exist_ok=True)
        client = TestClient(create_app(Settings(home=home, **fields)), base_url="http://127.0.0.1")
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def _home(client) -> str:
    return str(client.app.state.services.settings.home)


def _refused(response, code: str, *hidden: str) -> dict:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == code and body["param"] == "base_model", body
    for text in hidden:
        assert text not in response.text
    return body


def test_relative_path_from_the_server_cwd_is_not_loaded(make, tmp_path, tiny_model_dir, monkeypatch, hub_calls):
    """`victim/model` next to the server's working directory: 422, the same answer as for a name that does not
    exist, and no tokenizer or model is loaded from it."""
    cwd = tmp_path / "cwd"
    shutil.copytree(tiny_model_dir, cwd / "victim" / "model")
    monkeypatch.chdir(cwd)
    client = make()
    exists = client.post("/api/learn/tokenize", json={"text": "hello", "base_model": "victim/model"})
    missing = client.post("/api/learn/tokenize", json={"text": "hello", "base_model": "victim/nothing"})
    body = _refused(exists, "model_not_allowed", str(cwd), _home(client))
    assert _refused(missing, "model_not_allowed")["detail"] == body["detail"].replace("victim/model", "victim/nothing")
    generated = client.post("/api/generate", json={"base_model": "victim/model", "prompt": "x", "max_new_tokens": 2})
    _refused(generated, "model_not_allowed", str(cwd))
    for name in ("./victim/model", "../cwd/victim/model", "victim/../victim/model"):
        _refused(client.post("/api/learn/tokenize", json={"text": "x", "base_model": name}), "model_not_allowed",
                 str(cwd))
    from loralab.services.inference import get_engine

    assert not get_engine(client.app.state.services.settings.generate_cache_size)._workers
    assert hub_calls == []


def test_absolute_paths_are_refused_without_revealing_them(make, tmp_path, tiny_model_dir, hub_calls):
    outside = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model_dir, outside)
    client = make()
    answers = []
    for name in (str(outside), str(tmp_path / "elsewhere" / "none"), "/etc", str(outside / "config.json"),
                 "~/model", "C:\\models\\x"):
        response = client.post("/api/learn/tokenize", json={"text": "x", "base_model": name})
        answers.append(_refused(response, "model_not_allowed", str(tmp_path), "/etc")["detail"])
    assert len(set(answers)) == 1  # the same words whether the path exists or not
    job = client.post("/api/generate", json={"base_model": str(outside), "prompt": "x"})
    _refused(job, "model_not_allowed", str(tmp_path))
    assert hub_calls == []


def test_hub_ids_are_refused_without_a_hub_call_when_hub_access_is_off(make, hub_calls):
    client = make()
    for path, body in (("/api/learn/tokenize", {"text": "x", "base_model": "some-org/some-model"}),
                       ("/api/generate", {"base_model": "some-org/some-model", "prompt": "x"}),
                       ("/api/learn/calculator", {"base_model": "some-org/some-model"})):
        body = _refused(client.post(path, json=body), "model_not_allowed")
        assert "LORALAB_HUB_ACCESS" in body["detail"]
    assert client.post("/api/learn/tokenize", json={"text": "x", "base_model": "nothing-here"}).json()["code"] \
        == "model_not_found"
    assert hub_calls == []


def test_models_folder_and_allow_list_are_served(make, tmp_path, tiny_model_dir, hub_calls):
    outside = tmp_path / "operator" / "tiny-allowed"
    shutil.copytree(tiny_model_dir, outside)
    client = make(allowed_base_models=[str(outside)])
    shutil.copytree(tiny_model_dir, client.app.state.services.settings.models_dir / "tiny")
    home_model = client.post("/api/learn/tokenize", json={"text": "hello", "base_model": "tiny"})
    assert home_model.status_code == 200, home_model.text
    allowed = client.post("/api/learn/tokenize", json={"text": "hello", "base_model": str(outside)})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["tokens"] == home_model.json()["tokens"]
    generated = client.post("/api/generate", json={"base_model": "tiny", "prompt": "hello", "max_new_tokens": 2})
    assert generated.status_code == 200, generated.text
    assert hub_calls == []


def test_allow_listed_hub_id_is_read_from_the_cache_only(make, hub_calls, monkeypatch):
    """With hub access off, an allow-listed hub id resolves from the local cache (local_files_only)."""
    import huggingface_hub

    seen = []

    def snapshot(repo_id, **kwargs):
        seen.append((repo_id, kwargs.get("local_files_only")))
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    client = make(allowed_base_models=["operator-org/cached-model"])
    response = client.post("/api/learn/tokenize", json={"text": "x", "base_model": "operator-org/cached-model"})
    assert response.status_code == 422 and response.json()["code"] == "model_not_found", response.text
    assert seen == [("operator-org/cached-model", True)]


def test_job_and_stats_go_through_the_policy(make, tmp_path, tiny_model_dir, hub_calls):
    client = make()
    data = (SAMPLES / "basic_qa.jsonl").read_bytes()
    uploaded = client.post("/api/datasets/upload", files={"file": ("qa.jsonl", data)}, data={"name": "qa"})
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]
    shutil.copytree(tiny_model_dir, tmp_path / "victim" / "model")
    for name in (str(tmp_path / "victim" / "model"), "some-org/some-model"):
        created = client.post("/api/training/jobs", json={"dataset_id": dataset_id, "base_model": name})
        assert created.status_code == 422 and created.json()["code"] == "model_not_allowed", created.text
        assert str(tmp_path) not in created.text
    stats = client.get(f"/api/datasets/{dataset_id}/stats", params={"base_model": "no-such-model"})
    assert stats.status_code == 422 and stats.json()["code"] == "model_not_found", stats.text
    assert hub_calls == []


def test_ui_train_estimate_reads_no_outside_config(make, tmp_path):
    from loralab.ui import train as page

    client = make()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    text = page.estimate_text(client.app.state.services, {"base_model": str(tmp_path / "secret"), "lora": {}}, "ja")
    assert "エラー" in text or "Error" in text
    assert str(tmp_path) not in text


# ---- item 6: model loads do not stall other routes --------------------------------------------------------------

class _Listener:
    """A local TCP port standing in for the Hugging Face hub: counts connections (there must be none)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_many_tokenize_calls_with_unknown_names_do_not_stall_the_server(make_live_server):
    hub = _Listener()
    try:
        server = make_live_server(env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.port}",
                                       "LORALAB_MODEL_LOAD_TIMEOUT_SECONDS": "20"})
        names = [f"org{i}/model{i}" for i in range(12)] + [f"unknown-{i}" for i in range(8)]

        def tokenize(name):
            with server.client(timeout=60) as client:
                return client.post("/api/learn/tokenize", json={"text": "hello", "base_model": name})

        with ThreadPoolExecutor(len(names)) as pool:
            pending = [pool.submit(tokenize, name) for name in names]
            with server.client(timeout=15) as client:  # generous: it must answer while the others are in flight
                listed = client.get("/api/datasets")
            results = [future.result() for future in pending]
        assert listed.status_code == 200, listed.text
        for name, response in zip(names, results):
            assert response.status_code in (422, 429), (name, response.text)
            if response.status_code == 422:
                assert response.json()["code"] in ("model_not_allowed", "model_not_found")
        assert hub.connections == 0  # no network lookup for any of them
    finally:
        hub.close()


def test_loading_is_bounded_and_times_out_with_503(make, monkeypatch, tiny_model_dir):
    """A load that takes too long answers 503 model_loading_timeout with Retry-After; the load is shared."""
    from loralab.services import base_models

    client = make(model_load_timeout_seconds=0.5)
    shutil.copytree(tiny_model_dir, client.app.state.services.settings.models_dir / "slow")
    release = threading.Event()
    loads = []
    real = base_models.resolve

    def slow_resolve(svc, value, param="base_model"):
        loads.append(value)
        release.wait(10)
        return real(svc, value, param)

    monkeypatch.setattr(base_models, "resolve", slow_resolve)
    try:
        first = client.post("/api/learn/tokenize", json={"text": "x", "base_model": "slow"})
        second = client.post("/api/learn/tokenize", json={"text": "x", "base_model": "slow"})
        for response in (first, second):
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "model_loading_timeout" and response.headers["retry-after"]
        assert len(loads) == 1  # the second request waited for the same load
    finally:
        release.set()
    done = client.post("/api/learn/tokenize", json={"text": "x", "base_model": "slow"})
    assert done.status_code == 200, done.text


def test_per_client_limit_on_waiting_loads(make, monkeypatch):
    from loralab.services import base_models

    slots = [base_models.client_slot("10.0.0.1") for _ in range(base_models.MAX_LOADS_PER_CLIENT)]
    for slot in slots:
        slot.__enter__()
    try:
        with pytest.raises(base_models.ModelBusy) as info:
            with base_models.client_slot("10.0.0.1"):
                pass
        assert info.value.status == 429 and info.value.code == "too_many_model_loads"
        with base_models.client_slot("10.0.0.2"):  # another client is not affected
            pass
    finally:
        for slot in slots:
            slot.__exit__(None, None, None)
    with base_models.client_slot("10.0.0.1"):
        pass


def test_compare_wait_is_capped_and_async():
    import inspect

    from loralab.api.routes import evaluations as routes
    from loralab.services import evaluations

    assert inspect.iscoroutinefunction(routes.compare)
    assert evaluations.MAX_WAIT_SECONDS <= 600
