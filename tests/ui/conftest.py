"""Browser-test fixtures: the API + UI served by uvicorn on 127.0.0.1 with an embedded worker, and headless Chromium."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def _mounted(app) -> bool:
    from starlette.routing import Mount

    return any(isinstance(route, Mount) and route.path in ("", "/") for route in app.routes)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, embedded_model_dir):
    """Base URL and services of a live server (API + UI + one worker) over its own LORALAB_HOME."""
    import uvicorn

    from loralab.api.app import create_app
    from loralab.runner.worker import WorkerPool
    from loralab.services.context import open_services
    from loralab.settings import Settings
    from loralab.ui import mount_ui

    home = tmp_path_factory.mktemp("ui-home")
    (home / "models").mkdir()
    (home / "models" / "smollm2-135m-instruct").symlink_to(embedded_model_dir, target_is_directory=True)
    settings = Settings(home=home, heartbeat_seconds=1, worker_poll_seconds=0.2, database_url=None,
                        api_token=None, engine_command=None)
    services = open_services(settings)
    app = create_app(settings, services=services)
    if not _mounted(app):  # create_app may mount the UI itself
        mount_ui(app, services)
    pool = WorkerPool(services.db, settings, 1, notify=services.hub.publish)
    pool.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the UI server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", services
    finally:
        server.should_exit = True
        thread.join(30)
        pool.close(timeout=settings.cancel_grace_seconds + 5)
        services.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by Playwright (never a downloaded browser)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian chromium: apt-get install -y chromium fonts-noto-cjk")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class PageWatch:
    """A page plus every request URL and console error it produced."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc} {exc.stack}"))

    def external(self) -> list[str]:
        return [url for url in self.requests
                if not url.startswith((self.base_url + "/", "data:", "blob:")) and url != self.base_url]

    def check_clean(self) -> None:
        assert not self.external(), f"requests left the local server: {self.external()[:10]}"
        assert not self.console_errors, f"console errors: {self.console_errors[:10]}"


@pytest.fixture
def open_page(browser, ui_server):
    """Open the UI in a fresh browser context with a locale; every page is checked for leaks at teardown."""
    base_url, _ = ui_server
    contexts, watches = [], []

    def open_(locale: str) -> PageWatch:
        context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(60_000)
        contexts.append(context)
        watch = PageWatch(context.new_page(), base_url)
        watches.append(watch)
        watch.page.goto(base_url + "/", wait_until="domcontentloaded")
        return watch

    yield open_
    for context in contexts:
        context.close()
    for watch in watches:
        watch.check_clean()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS

