"""Generation over HTTP with a tiny local model: whole, streamed (SSE), and bad references."""
from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture
def tiny(settings, tiny_model_dir):
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    return "tiny"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_generate_whole_and_streamed(client, tiny):
    body = {"base_model": tiny, "prompt": "hello", "max_new_tokens": 5}
    result = client.post("/api/generate", json=body).json()
    assert result["model"] == "tiny" and result["completion_tokens"] <= 5 and isinstance(result["text"], str)
    chat = client.post("/api/generate", json={"model": tiny, "messages": [{"role": "user", "content": "hi"}],
                                              "max_new_tokens": 4})
    assert chat.status_code == 200, chat.text
    streamed = client.post("/api/generate", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    lines = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(x)["text"] for x in lines[:-1]) == result["text"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_generate_rejects_bad_requests(client):
    assert client.post("/api/generate", json={"prompt": "x", "messages": []}).status_code == 422
    assert client.post("/api/generate", json={"prompt": "x", "temprature": 1}).status_code == 422
    outside = client.post("/api/generate", json={"base_model": "/etc", "prompt": "x"})
    assert outside.status_code == 422 and outside.json()["code"] == "model_not_allowed"
    adapter = client.post("/api/generate", json={"adapter": "../../etc", "prompt": "x"})
    assert adapter.status_code == 422
    unknown = client.post("/api/generate", json={"model": "ft-" + "0" * 24, "prompt": "x"})
    assert unknown.status_code == 404
