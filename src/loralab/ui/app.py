"""The Gradio web UI: header with a ja/en switch, one tab per page, mounted at / of the FastAPI app."""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio is imported

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from loralab.services.context import Services  # noqa: E402
from loralab.ui.i18n import Labels, pick_language, t  # noqa: E402
from loralab.ui.uploads import accept_only_uploads  # noqa: E402

THEME_FONTS = ["Noto Sans CJK JP", "Noto Sans JP", "system-ui", "sans-serif"]
CSS = """
#header { align-items: center; }
#header h1 { margin: 0; }
#lang-toggle { max-width: 16rem; }
.progress-outer { background: var(--neutral-200); border-radius: 6px; height: 18px; overflow: hidden; }
.progress-inner { background: var(--primary-500); height: 100%; transition: width 0.4s; }
"""
PAGES = ("dashboard", "datasets", "train", "monitor", "playground", "models", "evaluate", "feedback", "abtests",
         "learn")


@dataclass
class UiContext:
    """What page builders share: the services, the label registry, the language and the tabs."""

    svc: Services
    labels: Labels
    lang: Any = None
    tabs: Any = None
    pages: dict[str, Any] = field(default_factory=dict)
    tab_items: dict[str, Any] = field(default_factory=dict)
    # (fn, inputs, outputs) run after a language change so tables and charts are redrawn in it
    on_language: list[tuple[Any, list, list]] = field(default_factory=list)


def make_theme() -> gr.themes.Theme:
    """Soft theme with system fonts only (nothing fetched from the internet)."""
    return gr.themes.Soft(font=THEME_FONTS, font_mono=["Noto Sans Mono CJK JP", "monospace"])


def _title(lang: str) -> str:
    return f"# {t(lang, 'app.title')}\n{t(lang, 'app.subtitle')}"


def build_blocks(svc: Services) -> gr.Blocks:
    """All pages in one Blocks; labels start in English and follow the language switch."""
    from loralab.ui import dashboard, datasets, models, monitor, playground, train

    modules = {"dashboard": dashboard, "datasets": datasets, "train": train, "monitor": monitor,
               "playground": playground, "models": models}
    from loralab.ui import learn

    modules["learn"] = learn
    from loralab.ui import evaluate

    modules["evaluate"] = evaluate
    from loralab.ui import abtests, feedback

    modules["feedback"] = feedback
    modules["abtests"] = abtests
    labels = Labels()
    ctx = UiContext(svc, labels)
    with gr.Blocks(title="loralab", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        with gr.Row(elem_id="header"):
            labels.add(gr.Markdown(_title("en"), elem_id="app-title"), value=_title)
            ctx.lang = labels.add(gr.Radio([("English", "en"), ("日本語", "ja")], value="en",
                                           label=t("en", "app.language"), elem_id="lang-toggle", scale=0,
                                           min_width=220), label="app.language")
        stored = gr.BrowserState(None, storage_key="loralab-language")
        with gr.Tabs(elem_id="pages") as ctx.tabs:
            for name in PAGES:
                with gr.Tab(t("en", f"tab.{name}"), id=name, elem_id=f"tab-{name}") as tab:
                    labels.add(tab, label=f"tab.{name}")
                    ctx.tab_items[name] = tab
                    ctx.pages[name] = modules[name].build(ctx)
        for module in modules.values():
            module.connect(ctx)

        def detect(saved: str | None, request: gr.Request) -> str:
            if saved in ("en", "ja"):
                return saved
            query = request.query_params.get("lang") if request else None
            if query in ("en", "ja"):
                return query
            return pick_language(request.headers.get("accept-language") if request else None)

        # one queue, one at a time, in order: a slow redraw in the old language never lands after the new one
        ordered = {"api_visibility": "private", "concurrency_limit": 1, "concurrency_id": "language"}
        loaded = demo.load(detect, inputs=[stored], outputs=[ctx.lang], **ordered)
        for fn, inputs, outputs in ctx.on_language:  # fill pages once (a language change redraws them again)
            loaded.then(fn, inputs=inputs, outputs=outputs, **ordered)
        ctx.lang.input(lambda lang: lang, inputs=[ctx.lang], outputs=[stored], api_visibility="private")
        event = ctx.lang.change(labels.updates, inputs=[ctx.lang], outputs=labels.components, **ordered)
        for fn, inputs, outputs in ctx.on_language:
            event.then(fn, inputs=inputs, outputs=outputs, **ordered)
    demo.queue(default_concurrency_limit=8)
    return accept_only_uploads(demo)  # mounted, not launched: Gradio's upload check must be turned on


def warm_imports() -> None:
    """Import transformers' lazy names once, here: first imports racing in Gradio's worker threads can fail."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer  # noqa: F401


class ExpiringTokens(dict):
    """Gradio's login sessions (token -> user) that lapse `seconds` after login (Gradio keeps them forever)."""

    def __init__(self, seconds: float, clock=time.monotonic):
        super().__init__()
        self.seconds, self.clock, self.expires = seconds, clock, {}

    def _alive(self, token) -> bool:
        expires = self.expires.get(token)
        if expires is not None and expires <= self.clock():
            super().pop(token, None)
            del self.expires[token]
            return False
        return True

    def __setitem__(self, token, user) -> None:
        for old in [t for t, e in self.expires.items() if e <= self.clock()]:  # forget lapsed sessions
            self._alive(old)
        super().__setitem__(token, user)
        self.expires[token] = self.clock() + self.seconds

    def __getitem__(self, token):
        if not self._alive(token):
            raise KeyError(token)
        return super().__getitem__(token)

    def __contains__(self, token) -> bool:
        return self._alive(token) and super().__contains__(token)

    def __delitem__(self, token) -> None:
        super().__delitem__(token)
        self.expires.pop(token, None)

    def get(self, token, default=None):
        return super().get(token, default) if self._alive(token) else default


def gradio_app_of(app: FastAPI) -> Any:
    """The Gradio App mounted at / of `app`."""
    from gradio.routes import App

    for route in app.routes:
        if isinstance(getattr(route, "app", None), App):
            return route.app
    raise LookupError("no Gradio app is mounted")


def _blocked_paths(svc: Services) -> list[str]:
    """Directories Gradio's file route must never serve: loralab's home and the user's (unless its cache is there)."""
    from gradio.utils import get_upload_folder, is_in_or_equal

    cache = os.path.abspath(get_upload_folder())
    paths = {os.path.abspath(svc.settings.home), os.path.abspath(Path.home())}
    return sorted(p for p in paths if not is_in_or_equal(cache, p))


def mount_ui(app: FastAPI, services: Services | None = None) -> FastAPI:
    """Mount the web UI at / of `app` (routes added before this call keep priority: /api, /docs, /ws, /v1)."""
    svc = services or app.state.services
    warm_imports()
    token = svc.settings.api_token
    auth = None
    if token:  # the same secret protects the UI: any user name, the API token as password
        def auth(_user: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), token.encode())
    gr.mount_gradio_app(
        app, build_blocks(svc), path="/", theme=make_theme(), css=CSS, footer_links=[], run_history=False,
        ssr_mode=False, pwa=False, mcp_server=False, auth=auth,
        auth_message="loralab: user name any, password = LORALAB_API_TOKEN" if auth else None,
        max_file_size=svc.settings.max_upload_bytes, allowed_paths=[], blocked_paths=_blocked_paths(svc))
    gradio_app_of(app).tokens = ExpiringTokens(svc.settings.ui_session_seconds)
    return app
