"""Behind a reverse proxy: `loralab serve --root-path /loralab` through a small proxy that strips the prefix or keeps
it (the API with its token, an upload, an SSE stream, the web UI and its assets), and the client address a trusted
proxy forwards (`--forwarded-allow-ips`) is the one the failed-login rate limit counts."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import threading
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import FAKE_ENGINE, SAMPLES, wait_for  # noqa: E402

PREFIX = "/loralab"
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
              b"proxy-authorization", b"proxy-authenticate"}


from live_server import TOKEN, start_server, stop_server  # noqa: E402  (tests/ is on sys.path)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def proxy_app(upstream: str, prefix: str, strip: bool):
    """A reverse proxy as nginx is usually set up: `location /loralab/ { proxy_pass http://upstream[/]; }` with Host
    kept, X-Forwarded-For appended (proxy_add_x_forwarded_for), X-Forwarded-Proto set, and responses streamed."""
    state: dict = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["client"] = httpx.AsyncClient(base_url=upstream, timeout=None)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await state["client"].aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["raw_path"].decode()
        if not (path == prefix or path.startswith(prefix + "/")):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not behind the proxy"})
            return
        target = (path[len(prefix):] or "/") if strip else path
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode()
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP and k != b"x-forwarded-for"]
        forwarded = [v.decode() for k, v in scope["headers"] if k == b"x-forwarded-for"]
        headers += [(b"x-forwarded-for", ", ".join(forwarded + [scope["client"][0]]).encode()),
                    (b"x-forwarded-proto", b"http")]
        request = state["client"].build_request(scope["method"], target, headers=headers, content=body)
        response = await state["client"].send(request, stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


class Proxy:
    """The proxy served by uvicorn on a free port, in a thread of the test process."""

    def __init__(self, upstream: str, strip: bool):
        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(proxy_app(upstream, PREFIX, strip), host="127.0.0.1", port=self.port,
                                log_level="warning", proxy_headers=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture
def fake_engine_env(loralab_home) -> dict[str, str]:
    """The server's environment: a token, the fake engine (4 quick steps), quick worker timings (SQLite in home)."""
    scenario = loralab_home / "scenario.json"
    scenario.write_text(json.dumps({"total_steps": 4, "step_seconds": 0.02}))
    return {"LORALAB_API_TOKEN": TOKEN, "LORALAB_AUTH_FAILURES_PER_MINUTE": "3",
            "LORALAB_WORKER_POLL_SECONDS": "0.1", "LORALAB_TAIL_SECONDS": "0.05", "LORALAB_EVENT_POLL_SECONDS": "0.1",
            "LORALAB_ENGINE_COMMAND": json.dumps([sys.executable, str(FAKE_ENGINE), "--scenario", str(scenario)])}


@pytest.fixture
def prefixed_server(fake_engine_env, loralab_home):
    """`loralab serve --root-path /loralab/` (the trailing slash is dropped) with one worker, small JSON bodies."""
    server = start_server(loralab_home, env={**fake_engine_env, "LORALAB_MAX_REQUEST_BYTES": "1024"},
                          args=["--workers", "1", "--root-path", f"{PREFIX}/"], wait_seconds=300)
    yield server
    stop_server(server)


def check_api_through(proxy: Proxy) -> None:
    with proxy.client() as client:
        assert client.get(f"{PREFIX}/api/health").status_code == 200
        assert client.get(f"{PREFIX}/api/datasets").status_code == 401
        assert client.get(f"{PREFIX}/api/datasets", headers=AUTH).status_code == 200
        # An upload is allowed past max_request_bytes (1024) only where the guard sees the upload route: the prefix
        # must not hide it (4 kB here).
        data = (SAMPLES / "tech_qa.jsonl").read_bytes()
        assert len(data) > 1024
        upload = client.post(f"{PREFIX}/api/datasets/upload", files={"file": ("tech_qa.jsonl", data)}, headers=AUTH)
        assert upload.status_code == 201, upload.text
        job = client.post(f"{PREFIX}/api/training/jobs", headers=AUTH,
                          json={"dataset_id": upload.json()["id"], "max_steps": 4})
        assert job.status_code in (200, 201), job.text
        job_id = job.json()["id"]
        events = []
        with client.stream("GET", f"{PREFIX}/api/training/jobs/{job_id}/events", headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert [e["type"] for e in events] == ["started", "step", "step", "step", "step", "done"]
        assert events[-1]["job_status"] == "succeeded"


def check_ui_through(proxy: Proxy) -> None:
    with proxy.client() as client:
        page = client.get(f"{PREFIX}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        html = page.text
        # Gradio's root is the public address under the prefix; its assets are relative, so under the prefix too.
        assert f'"root":"{proxy.url}{PREFIX}"' in html
        assets = re.findall(r'(?:src|href)="(\./assets/[^"]+\.(?:js|css))"', html)
        assert assets, html[:2000]
        for asset in assets[:2]:
            response = client.get(f"{PREFIX}/{asset[2:]}")
            assert response.status_code == 200 and len(response.content) > 100, asset
        config = client.get(f"{PREFIX}/config")
        assert config.status_code in (200, 401)  # reached Gradio (it asks for the login), not a 404 of the proxy
        login = client.post(f"{PREFIX}/login", data={"username": "any", "password": TOKEN})
        assert login.status_code == 200, login.text
        assert client.get(f"{PREFIX}/config").json()["root"] == f"{proxy.url}{PREFIX}"


@pytest.mark.slow
def test_root_path_through_proxies_that_strip_or_keep_the_prefix(prefixed_server):
    with Proxy(prefixed_server.url, strip=True) as proxy:
        check_api_through(proxy)
        check_ui_through(proxy)
    with Proxy(prefixed_server.url, strip=False) as proxy:
        check_api_through(proxy)
        check_ui_through(proxy)
    with httpx.Client(base_url=prefixed_server.url, timeout=30) as direct:  # and straight, for health checks
        assert direct.get("/api/health").status_code == 200
        assert direct.get(f"{PREFIX}/api/health").status_code == 200


@pytest.mark.slow
def test_forwarded_client_address_is_what_the_rate_limit_counts(prefixed_server):
    """The proxy on 127.0.0.1 is trusted by default: failed tokens count against the address it forwards."""
    with Proxy(prefixed_server.url, strip=True) as proxy, proxy.client() as client:
        bad = {"Authorization": "Bearer wrong-token-0123456789"}
        first = {**bad, "X-Forwarded-For": "203.0.113.7"}
        codes = [client.get(f"{PREFIX}/api/datasets", headers=first).status_code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        other = {**bad, "X-Forwarded-For": "203.0.113.8"}
        assert client.get(f"{PREFIX}/api/datasets", headers=other).status_code == 401


@pytest.mark.slow
def test_untrusted_proxy_headers_are_ignored(fake_engine_env, loralab_home):
    """With --forwarded-allow-ips naming another address, the proxy's X-Forwarded-For is ignored: every client
    behind it is 127.0.0.1 to the rate limit."""
    server = start_server(loralab_home, env=fake_engine_env, wait_seconds=300,
                          args=["--root-path", PREFIX, "--forwarded-allow-ips", "10.9.9.9"])
    try:
        with Proxy(server.url, strip=True) as proxy, proxy.client() as client:
            bad = {"Authorization": "Bearer wrong-token-0123456789"}
            for address in ("203.0.113.7", "203.0.113.8", "203.0.113.9"):
                assert client.get(f"{PREFIX}/api/datasets",
                                  headers={**bad, "X-Forwarded-For": address}).status_code == 401
            assert client.get(f"{PREFIX}/api/datasets",
                              headers={**bad, "X-Forwarded-For": "203.0.113.10"}).status_code == 429
    finally:
        stop_server(server)


def test_bad_root_path_is_refused_with_a_hint(loralab_home):
    import subprocess

    result = subprocess.run([sys.executable, "-c", "from loralab.cli import app; app()", "serve", "--workers", "0",
                             "--root-path", "/a b"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "LORALAB_ROOT_PATH (--root-path) must be a path prefix such as /loralab" in result.stderr
