"""Network attacks on a real `loralab serve` on 127.0.0.1: DNS rebinding, cross-site writes, CORS, token
brute force, huge or endless bodies, deeply nested JSON, tokens in URLs, stream tickets, the WebSocket."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

TOKEN = "test-token-0123456789abcdef"  # = tests/security/conftest.py TOKEN (live_token_server)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLE = (Path(__file__).resolve().parents[2] / "src" / "loralab" / "data" / "samples" / "basic_qa.jsonl").read_bytes()
EVIL = "https://evil.example"
MB = 1024 * 1024

pytestmark = pytest.mark.timeout(300)


def upload(client: httpx.Client, **kwargs) -> httpx.Response:
    return client.post("/api/datasets/upload", files={"file": ("basic_qa.jsonl", SAMPLE)}, **kwargs)


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send one hand-made HTTP/1.1 request; return the status and the raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1]), data


def test_rebinding_host_is_refused_with_no_data(live_server):
    with live_server.client() as client:
        assert upload(client).status_code == 201
        for host in ("rebind.evil.example", "rebind.evil.example:%d" % live_server.port, "127.0.0.1.evil.example"):
            response = client.get("/api/datasets", headers={"Host": host})
            assert response.status_code == 400, host
            body = response.json()
            assert body["code"] == "bad_host" and "LORALAB_ALLOWED_HOSTS" in body["detail"]
            assert "basic_qa" not in response.text and "ds-" not in response.text
        assert client.get("/", headers={"Host": "rebind.evil.example"}).status_code == 400  # the UI too
        ja = client.get("/api/datasets", headers={"Host": "x.example", "Accept-Language": "ja"}).json()
        assert "LORALAB_ALLOWED_HOSTS" in ja["detail"] and "リバインディング" in ja["detail"]
        for host in ("localhost:%d" % live_server.port, "[::1]:%d" % live_server.port):
            assert client.get("/api/datasets", headers={"Host": host}).status_code == 200


def test_cross_site_writes_are_refused_and_nothing_is_stored(live_server):
    with live_server.client() as client:
        before = client.get("/api/datasets").json()
        evil = upload(client, headers={"Origin": EVIL})
        assert evil.status_code == 403 and evil.json()["code"] == "cross_site"
        fetch = upload(client, headers={"Sec-Fetch-Site": "cross-site"})
        assert fetch.status_code == 403 and fetch.json()["code"] == "cross_site"
        null = client.post("/api/learn/tokenize", json={"text": "x"}, headers={"Origin": "null"})
        assert null.status_code == 403
        gradio = client.post("/gradio_api/queue/join", json={}, headers={"Origin": EVIL})
        assert gradio.status_code == 403  # the UI's own POST routes too
        assert client.get("/api/datasets").json() == before  # nothing stored
        # the same origin (what the browser sends from the UI itself) still works
        same = upload(client, headers={"Origin": live_server.url, "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 201, same.text
        assert len(client.get("/api/datasets").json()) == len(before) + 1
        # a cross-site GET is answered (the browser withholds it from the page) without CORS headers
        read = client.get("/api/datasets", headers={"Origin": EVIL})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


def test_bodies_are_bounded_while_they_stream(live_server):
    with live_server.client() as client:
        def chunks(total: int, size: int = MB):
            sent = 0
            while sent < total:
                yield b" " * size
                sent += size

        too_big = client.post("/api/learn/tokenize", content=chunks(64 * MB),
                              headers={"Content-Type": "application/json"})
        assert too_big.status_code == 413 and too_big.json()["code"] == "request_too_large"
        assert "LORALAB_MAX_REQUEST_BYTES" in too_big.json()["detail"]
        # declared sizes are refused before a byte of the body is read (API upload and the UI's upload)
        for path in ("/api/datasets/upload", "/gradio_api/upload"):
            status, raw = raw_request(live_server.port, f"POST {path} HTTP/1.1\nHost: 127.0.0.1\n"
                                      "Content-Type: multipart/form-data; boundary=x\n"
                                      f"Content-Length: {10 ** 12}\n\n")
            assert status == 413, raw
        assert client.get("/api/health").status_code == 200


def test_deeply_nested_json_is_a_clean_400(live_server):
    with live_server.client() as client:
        for depth in (200, 5000, 200_000):
            for path in ("/api/training/jobs", "/api/learn/tokenize", "/v1/chat/completions"):
                body = "[" * depth + "]" * depth
                response = client.post(path, content=body, headers={"Content-Type": "application/json"})
                assert response.status_code == 400, (path, depth, response.text[:200])
                assert response.json()["code"] == "bad_json"
        deep_obj = '{"text": ' + '{"a": ' * 100 + '1' + '}' * 100 + '}'
        assert client.post("/api/learn/tokenize", content=deep_obj,
                           headers={"Content-Type": "application/json"}).json()["code"] == "bad_json"
        # brackets inside strings are text, not nesting
        text = {"text": "[[[{{{" * 1000 + '\\"[' * 100}
        response = client.post("/api/learn/tokenize", json=text)
        assert response.status_code != 400 or response.json().get("code") != "bad_json"


def test_huge_body_without_token_is_refused_before_it_is_read(live_token_server):
    process = psutil.Process(live_token_server.process.pid)
    with live_token_server.client() as client:
        assert client.get("/api/health").status_code == 200
        before = process.memory_info().rss

        def body():
            block = b"a" * MB
            for _ in range(200):
                yield block

        response = client.post("/api/datasets/upload", content=body(),
                               headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        grown = process.memory_info().rss - before
        assert grown < 50 * MB, f"server grew {grown / MB:.0f} MB"
        assert client.get("/api/datasets", headers=AUTH).json() == []


def test_token_is_not_accepted_in_urls_and_tickets_are_scoped(live_token_server):
    with live_token_server.client() as client:
        dataset = upload(client, headers=AUTH).json()
        spec = {"dataset_id": dataset["id"], "max_steps": 1}
        first = client.post("/api/training/jobs", json=spec, headers=AUTH)
        second = client.post("/api/training/jobs", json=spec, headers=AUTH)
        assert first.status_code == 201 and second.status_code == 201, first.text
        job, other = first.json()["id"], second.json()["id"]
        cancel = client.post(f"/api/training/jobs/{job}/cancel", headers=AUTH)  # ends its stream
        assert cancel.status_code == 200, cancel.text
        # ?token= in a URL is no longer a credential
        assert client.get(f"/api/training/jobs/{job}/events?token={TOKEN}").status_code == 401
        assert client.get(f"/api/datasets?token={TOKEN}").status_code == 401
        # a ticket opens exactly one job's stream
        assert client.post(f"/api/training/jobs/{job}/ticket").status_code == 401
        ticket = client.post(f"/api/training/jobs/{job}/ticket", headers=AUTH).json()
        assert ticket["scope"] == f"events:{job}" and ticket["expires_at"] > time.time()
        stream = client.get(f"/api/training/jobs/{job}/events", params={"ticket": ticket["ticket"]})
        assert stream.status_code == 200 and "event: " in stream.text
        assert client.get(f"/api/training/jobs/{other}/events", params={"ticket": ticket["ticket"]}).status_code == 401
        assert client.get(f"/api/training/jobs/{job}", params={"ticket": ticket["ticket"]}).status_code == 401
        assert client.post(f"/api/training/jobs/{job}/cancel", params={"ticket": ticket["ticket"]}).status_code == 401
        forged = ticket["ticket"][:-4] + ("AAAA" if not ticket["ticket"].endswith("AAAA") else "BBBB")
        assert client.get(f"/api/training/jobs/{job}/events", params={"ticket": forged}).status_code == 401

        ws_url = f"ws://127.0.0.1:{live_token_server.port}/ws/training"
        with connect(f"{ws_url}/{job}?ticket={ticket['ticket']}", open_timeout=30) as ws:
            events = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    events.append(json.loads(ws.recv(timeout=30)))
            assert events and closed.value.rcvd.code == 1000
        with connect(f"{ws_url}/{other}?ticket={ticket['ticket']}", open_timeout=30) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 4401
        with connect(f"{ws_url}/job-{'a' * 24}", additional_headers=AUTH, open_timeout=30) as ws:
            with pytest.raises(ConnectionClosed) as closed:  # unknown job: a close code, not an HTTP 404
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 4404
    log = live_token_server.output()
    assert TOKEN not in log and ticket["ticket"] not in log and "ticket=[redacted]" in log


def test_cors_rate_limit_and_gradio_under_an_allowed_host(make_live_server):
    app_origin = "https://app.example.test"
    server = make_live_server(env={"LORALAB_API_TOKEN": TOKEN, "LORALAB_ALLOWED_HOSTS": "ui.example.test",
                                   "LORALAB_CORS_ORIGINS": app_origin, "LORALAB_AUTH_FAILURES_PER_MINUTE": "5"})
    with server.client() as client:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        evil = client.options("/api/datasets/upload", headers={"Origin": EVIL, **preflight})
        assert "access-control-allow-origin" not in evil.headers and evil.status_code == 403
        allowed = client.options("/api/datasets/upload", headers={"Origin": app_origin, **preflight})
        assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == app_origin
        assert allowed.headers["access-control-allow-credentials"] == "true"
        listed = client.get("/api/datasets", headers={"Origin": app_origin, **AUTH})
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == app_origin
        posted = upload(client, headers={"Origin": app_origin, **AUTH})
        assert posted.status_code == 201 and posted.headers["access-control-allow-origin"] == app_origin
        # Gradio would reflect any Origin under a non-localhost Host: loralab strips that
        ui = {"Host": "ui.example.test", "Origin": EVIL}
        for path in ("/", "/config", "/gradio_api/info", "/theme.css"):
            response = client.get(path, headers=ui)
            assert response.status_code < 500, path
            assert not any(h.startswith("access-control-") for h in response.headers), (path, response.headers)
        preflight_ui = client.options("/gradio_api/queue/join", headers={**ui, **preflight})
        assert "access-control-allow-origin" not in preflight_ui.headers
        # brute force: the configured number of failures, then 429 for the token and the UI login alike
        for guess in range(5):
            assert client.get("/api/datasets", headers={"Authorization": f"Bearer guess-{guess}"}).status_code == 401
        blocked = client.get("/api/datasets", headers=AUTH)
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
        assert blocked.json()["code"] == "too_many_auth_failures"
        login = client.post("/login/", data={"username": "x", "password": TOKEN})
        assert login.status_code == 429
        assert client.get("/api/health").status_code == 200  # public routes still answer


def test_ui_login_failures_count_towards_the_limit(make_live_server):
    server = make_live_server(env={"LORALAB_API_TOKEN": TOKEN, "LORALAB_AUTH_FAILURES_PER_MINUTE": "3"})
    with server.client() as client:
        for guess in range(3):
            assert client.post("/login/", data={"username": "x", "password": f"guess-{guess}"}).status_code == 400
        assert client.post("/login/", data={"username": "x", "password": "guess"}).status_code == 429
        assert client.get("/api/datasets", headers=AUTH).status_code == 429


def _serve(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    full_env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("LORALAB_")}
    full_env.update({"LORALAB_HOME": str(home), **env})
    return subprocess.run([sys.executable, "-c", "from loralab.cli import app; app()", "serve", "--workers", "0",
                           "--port", str(port), *args], env=full_env, capture_output=True, text=True, timeout=120)


def test_serve_refuses_the_network_without_a_token_and_bad_settings(tmp_path):
    exposed = _serve(tmp_path / "a", {}, "--host", "0.0.0.0")
    assert exposed.returncode == 2
    assert "LORALAB_API_TOKEN" in exposed.stderr and "Traceback" not in exposed.stderr + exposed.stdout
    assert "Uvicorn running" not in exposed.stderr + exposed.stdout and not (tmp_path / "a" / "loralab.db").exists()
    short = _serve(tmp_path / "b", {"LORALAB_API_TOKEN": "short"})
    assert short.returncode == 2 and "Traceback" not in short.stderr + short.stdout
    lines = [line for line in short.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "LORALAB_API_TOKEN" in lines[0] and "16" in lines[0]
    empty = _serve(tmp_path / "c", {"LORALAB_API_TOKEN": ""}, "--host", "0.0.0.0")
    assert empty.returncode == 2 and "Traceback" not in empty.stderr


@pytest.mark.browser
def test_ui_login_works_in_a_real_browser(make_live_server):
    """Chromium logs in with the token (Lax cookies), the UI's own calls pass the cross-site guard."""
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("needs Debian chromium")
    playwright_api = pytest.importorskip("playwright.sync_api")
    server = make_live_server(env={"LORALAB_API_TOKEN": TOKEN})
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            page = browser.new_page(locale="en-US")
            refused = []
            page.on("response", lambda r: refused.append(r.url) if r.status in (400, 403, 429) else None)
            page.goto(server.url, wait_until="domcontentloaded")
            page.locator("input[type=password]").fill(TOKEN, timeout=60_000)
            page.locator("input:not([type=password])").first.fill("me")
            page.locator("button[type=submit], button:has-text('Login')").first.click()
            page.locator("#tab-datasets-button, button:has-text('Datasets')").first.wait_for(timeout=90_000)
            page.get_by_text("日本語").first.click()  # a queued UI event: a same-origin POST
            page.get_by_text("データセット").first.wait_for(timeout=60_000)
            cookies = page.context.cookies()
            assert cookies and all(c["sameSite"] in ("Lax", "Strict") and c["httpOnly"] for c in cookies)
            assert not refused, refused
        finally:
            browser.close()


def test_guard_helpers():
    """The pieces the guard is built from: JSON depth across pieces, cookie hardening, the failure table."""
    from loralab.api.security import MAX_TRACKED_CLIENTS, FailureLimiter, JsonDepth, harden_cookie, host_allowed

    text = json.dumps({"a": [{"b": "[[[\\\"{{{"}], "c": "\\\\"}).encode()
    for size in (1, 2, 3, 7, len(text)):
        gauge = JsonDepth()
        for i in range(0, len(text), size):
            gauge.feed(text[i:i + size])
        assert gauge.deepest == 3 and gauge.depth == 0, size
    assert harden_cookie("a=1; Path=/; SameSite=none; Secure") == "a=1; Path=/; SameSite=Lax; Secure; HttpOnly"
    assert harden_cookie("b=2; HttpOnly") == "b=2; HttpOnly; SameSite=Lax"
    assert host_allowed("[::1]:8000", []) and host_allowed("LOCALHOST.", []) and not host_allowed("", [])
    assert host_allowed("a.example:1", ["*.example"]) and not host_allowed("example.org", ["example.com"])
    now = [0.0]
    limiter = FailureLimiter(clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("x", 3) is None
        limiter.record("x", 3)
    assert limiter.retry_after("x", 3) == 60
    now[0] = 61.0
    assert limiter.retry_after("x", 3) is None and "x" not in limiter.failures
    for client in range(MAX_TRACKED_CLIENTS + 10):
        limiter.record(str(client), 3)
    assert len(limiter.failures) == MAX_TRACKED_CLIENTS
