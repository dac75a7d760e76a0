"""Issue 16 (low): /v1 bodies that cannot be parsed, have wrong types or are unbounded get 400 in OpenAI's error
shape, never 500; prompts, stop strings, messages and n are capped (also on /api/generate)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from loralab.api.app import create_app
from loralab.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("openai-bounds") / "home"
    (home / "models").mkdir(parents=True)
    with TestClient(create_app(Settings(home=home)), base_url="http://127.0.0.1",
                    raise_server_exceptions=False) as test_client:
        yield test_client


def _openai_400(response) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and "code" in error and "param" in error
    return error


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b'"text"', b"", b'{"model": "x", "prompt": "\xff\xfe"}',
    b'{"model": 5, "prompt": "x"}', b'{"model": "x", "prompt": {"a": 1}}', b'{"model": "x", "prompt": "x", "n": "many"}',
    b'{"model": "x", "prompt": "x", "max_tokens": 1e400}', b'{"model": "x", "prompt": "x", "max_tokens": 10000000}',
])
def test_malformed_and_mistyped_completions_are_400(client, body):
    _openai_400(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}))


@pytest.mark.parametrize("body", [
    b"{", b'{"model": "x", "messages": "hi"}', b'{"model": "x", "messages": [{"role": "user", "content": {"a": 1}}]}',
    b'{"model": "x", "messages": [{"role": "wizard", "content": "hi"}]}', b'{"model": "x", "messages": []}',
])
def test_malformed_chat_completions_are_400(client, body):
    _openai_400(client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}))


def test_completions_are_bounded(client):
    many_prompts = client.post("/v1/completions", json={"model": "x", "prompt": ["hi"] * 33})
    assert _openai_400(many_prompts)["param"] == "prompt"
    many_stops = client.post("/v1/completions", json={"model": "x", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})
    assert _openai_400(many_stops)["param"] == "stop"
    long_stop = client.post("/v1/completions", json={"model": "x", "prompt": "hi", "stop": "s" * 257})
    assert _openai_400(long_stop)["param"] == "stop"
    too_many_n = client.post("/v1/completions", json={"model": "x", "prompt": "hi", "n": 9})
    assert _openai_400(too_many_n)["param"] == "n"
    rows = client.post("/v1/completions", json={"model": "x", "prompt": ["hi"] * 32, "n": 8})
    assert _openai_400(rows)["param"] == "n"  # 256 rows from one request
    huge_prompt = client.post("/v1/completions", json={"model": "x", "prompt": "x" * 200_001})
    assert _openai_400(huge_prompt)["param"] == "prompt"


def test_chat_messages_are_bounded(client):
    many = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "a"}] * 257})
    assert _openai_400(many)["param"] == "messages"
    big = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "a" * 200_001}]})
    assert _openai_400(big)["param"].startswith("messages.0.content")


def test_api_generate_is_bounded(client):
    for body, param in (({"prompt": "x", "stop": ["a"] * 5}, "stop"), ({"prompt": "x", "stop": ["s" * 257]}, "stop"),
                        ({"messages": [{"role": "user", "content": "a"}] * 257}, "messages"),
                        ({"prompt": "x" * 200_001}, "prompt")):
        response = client.post("/api/generate", json=body)
        assert response.status_code == 422, response.text
        assert f'"{param}' in response.text, response.text  # the field is named (param or the error's loc)
