"""The web UI (Gradio, Japanese and English) over the service layer; `mount_ui(app, services)` serves it at /."""
from __future__ import annotations

from typing import Any


def mount_ui(app: Any, services: Any = None) -> Any:
    """Mount the UI at / of the FastAPI `app` (imports gradio only when called)."""
    from loralab.ui.app import mount_ui as mount

    return mount(app, services)


__all__ = ["mount_ui"]
