"""Files that web UI events take: only what the browser uploaded into Gradio's upload folder, never another path."""
from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
from gradio import utils as gradio_utils

from loralab.ui.i18n import t


def upload_folder() -> Path:
    """Where Gradio stores browser uploads (GRADIO_TEMP_DIR, else <tmp>/gradio), symlinks resolved."""
    return Path(gradio_utils.get_upload_folder()).resolve()


def uploaded_file(path: str | os.PathLike | None) -> Path | None:
    """The real path of `path` when it is a regular file inside the upload folder, else None.

    Gradio checks this itself only after `launch()`; mounted with `mount_gradio_app` it takes any path a
    crafted queue call names (issue 16), so every event that reads a file asks here first.
    """
    if not isinstance(path, (str, os.PathLike)):
        return None
    text = os.fspath(path)
    if not text or "\x00" in text or not os.path.isabs(text):
        return None
    try:
        real = Path(text).resolve(strict=True)  # symlinks and ../ resolved before the containment check
    except (OSError, RuntimeError):
        return None
    root = upload_folder()
    if real == root or not real.is_relative_to(root) or not real.is_file():
        return None
    return real


def refusal() -> str:
    """The message of a refused file, in both languages (Gradio raises it before the event knows the language)."""
    return f"{t('en', 'ds.not_uploaded')} / {t('ja', 'ds.not_uploaded')}"


def only_uploads(component: gr.File) -> gr.File:
    """`component`, made to refuse any input that is not a file the browser uploaded.

    Gradio copies an event's file inputs into its cache before the handler runs, from any path the request
    names when the app is mounted rather than launched; this refuses such a path before anything is copied.
    (Bound on the instance: a Component subclass would make Gradio write a .pyi stub next to this module.)
    """
    copy, async_copy = component.move_resource_to_block_cache, component.async_move_resource_to_block_cache

    def check(url_or_file_path) -> None:
        if url_or_file_path is not None and uploaded_file(url_or_file_path) is None:
            raise gr.Error(refusal(), print_exception=False)

    def move_resource_to_block_cache(url_or_file_path):
        check(url_or_file_path)
        return copy(url_or_file_path)

    async def async_move_resource_to_block_cache(url_or_file_path):
        check(url_or_file_path)
        return await async_copy(url_or_file_path)

    component.move_resource_to_block_cache = move_resource_to_block_cache
    component.async_move_resource_to_block_cache = async_move_resource_to_block_cache
    return component


def accept_only_uploads(blocks: gr.Blocks) -> gr.Blocks:
    """Turn on Gradio's own check of every event's file inputs (only files in its upload folder are taken).

    Gradio runs that check only once `launch()` has set `has_launched`; mounted with `mount_gradio_app` it stays
    off, and any input of any event (a Radio, a Chatbot's history) can name a server file that Gradio then copies
    into its cache and serves back under /gradio_api/file= (issue 16).
    """
    blocks.has_launched = True
    return blocks
