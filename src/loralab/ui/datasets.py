"""Datasets page: drag-and-drop upload, per-line validation errors, versions, paged preview, token histogram, delete."""
from __future__ import annotations

import math
from typing import Any

import gradio as gr
import pandas as pd

from loralab.services import datasets
from loralab.services.errors import LoralabError
from loralab.ui.dashboard import when
from loralab.ui.i18n import format_bytes, t
from loralab.ui.uploads import only_uploads, uploaded_file

PAGE_SIZE = 10
FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text", "preference")
LIST_COLUMNS = ("col.id", "col.name", "col.version", "col.format", "col.rows", "col.file", "col.size",
                "col.created")
ERROR_COLUMNS = ("col.line", "col.field", "col.code", "col.message")
PREVIEW_COLUMNS = ("col.row", "col.system", "col.user", "col.assistant")


def dataset_choices(svc) -> list[tuple[str, str]]:
    """(label, id) of every dataset version, newest first, for dropdowns."""
    return [(f"{d['name']} v{d['version']} ({d['format']}, {d['rows']})", d["id"])
            for d in datasets.list_datasets(svc)]


def list_table(svc, lang: str) -> pd.DataFrame:
    rows = [[d["id"], d["name"], d["version"], d["format"], d["rows"], d["filename"],
             format_bytes(d["size_bytes"]), when(d["created_at"])] for d in datasets.list_datasets(svc)]
    return pd.DataFrame(rows, columns=[t(lang, key) for key in LIST_COLUMNS])


def error_table(problems: list[dict[str, Any]], lang: str) -> pd.DataFrame:
    rows = [[p.get("line"), p.get("field"), p.get("code"), p.get("message")] for p in problems]
    return pd.DataFrame(rows, columns=[t(lang, key) for key in ERROR_COLUMNS])


def record_row(index: int, record: dict[str, Any]) -> list[Any]:
    """One canonical record as (#, system, user, assistant) cells."""
    if "text" in record:
        return [index, "", record["text"], ""]
    messages = record.get("messages", [])
    by_role = {role: "\n---\n".join(m["content"] for m in messages if m["role"] == role)
               for role in ("system", "user", "assistant")}
    answer = by_role["assistant"]
    if "chosen" in record:
        answer = f"✓ {record['chosen']}\n✗ {record.get('rejected', '')}"
    return [index, by_role["system"], by_role["user"], answer]


def empty_preview(lang: str) -> pd.DataFrame:
    return pd.DataFrame([], columns=[t(lang, key) for key in PREVIEW_COLUMNS])


def preview(svc, dataset_id: str | None, page: float | None, lang: str):
    """The page-th block of PAGE_SIZE records with a 'rows a-b of n' line; page is clamped to the range."""
    if not dataset_id:
        return empty_preview(lang), 1, t(lang, "ds.none")
    info = datasets.get_dataset(svc, dataset_id)
    pages = max(1, math.ceil(info["rows"] / PAGE_SIZE))
    page = min(max(1, int(page or 1)), pages)
    offset = (page - 1) * PAGE_SIZE
    result = datasets.preview_dataset(svc, dataset_id, offset=offset, limit=PAGE_SIZE)
    rows = [record_row(offset + i + 1, r) for i, r in enumerate(result["records"])]
    frame = pd.DataFrame(rows, columns=[t(lang, key) for key in PREVIEW_COLUMNS])
    if not any(row[1] for row in rows):  # no system prompts on this page: give the space to the text
        frame = frame.drop(columns=[t(lang, "col.system")])
    text = t(lang, "ds.page_info", start=offset + 1 if rows else 0, end=offset + len(rows), total=info["rows"])
    return frame, page, f"{text} · {page} / {pages}"


def hist_titles(lang: str) -> dict[str, str]:
    return {"label": t(lang, "ds.hist"), "x_title": t(lang, "col.tokens"), "y_title": t(lang, "col.count")}


def histogram(svc, dataset_id: str | None, lang: str):
    """Token-length histogram (rows per length bin) and a one-line summary."""
    # Titles travel with the data (separate prop updates racing a redraw break Gradio's plot). A drawn chart is
    # never set back to None (its resize observer would then read a removed element), nor to an empty frame
    # (which fixes the field types): without data it is left as it is.
    if not dataset_id:
        return gr.update(), ""
    try:
        stats = datasets.dataset_stats(svc, dataset_id)
    except LoralabError as exc:
        return gr.update(), t(lang, "common.error", message=exc.message)
    tokens = stats["tokens"]
    edges, counts = tokens["histogram"]["bins"], tokens["histogram"]["counts"]
    names = [f"{edges[i]}–{edges[i + 1]}" for i in range(len(counts))]
    frame = pd.DataFrame({"tokens": names, "rows": counts})
    summary = t(lang, "ds.token_summary", rows=tokens["rows"], total=tokens["total_tokens"], min=tokens["min"],
                mean=tokens["mean"], max=tokens["max"])
    return gr.BarPlot(value=frame, sort=names, **hist_titles(lang)), summary  # sort: numeric bin order


def build(ctx) -> dict[str, Any]:
    """Lay out the datasets page."""
    labels = ctx.labels
    with gr.Row():
        drop = gr.File(label=t("en", "ds.upload"), file_types=[".jsonl", ".json", ".csv", ".parquet"],
                       type="filepath", elem_id="ds-upload", scale=2)
        upload = labels.add(only_uploads(drop), label="ds.upload")
        with gr.Column(scale=1):
            name = labels.add(gr.Textbox(label=t("en", "ds.name"), info=t("en", "ds.name_info"), max_length=100,
                                         elem_id="ds-name"), label="ds.name", info="ds.name_info")
            fmt = labels.add(gr.Dropdown(list(FORMATS), value="auto", label=t("en", "ds.format"),
                                         info=t("en", "ds.format_info"), elem_id="ds-format"),
                             label="ds.format", info="ds.format_info")
    status = gr.Markdown(elem_id="ds-status")
    errors = labels.add(gr.Dataframe(error_table([], "en"), label=t("en", "ds.errors"), interactive=False,
                                     visible=False, wrap=True, elem_id="ds-errors"), label="ds.errors")
    table = labels.add(gr.Dataframe(list_table(ctx.svc, "en"), label=t("en", "ds.list"), interactive=False,
                                    elem_id="ds-list", max_height=260), label="ds.list")
    with gr.Row():
        pick = labels.add(gr.Dropdown([], label=t("en", "ds.pick"), elem_id="ds-pick", scale=3),
                          label="ds.pick")
        delete = labels.add(gr.Button(t("en", "ds.delete"), variant="stop", elem_id="ds-delete", scale=1),
                            value="ds.delete")
    with gr.Row():
        with gr.Column(scale=3):
            rows = labels.add(gr.Dataframe(empty_preview("en"), label=t("en", "ds.preview"), interactive=False,
                                           wrap=True, elem_id="ds-preview", max_height=420), label="ds.preview")
            with gr.Row():
                prev_page = labels.add(gr.Button(t("en", "ds.prev"), size="sm"), value="ds.prev")
                page = labels.add(gr.Number(1, label=t("en", "ds.page"), precision=0, minimum=1,
                                            elem_id="ds-page", min_width=80), label="ds.page")
                next_page = labels.add(gr.Button(t("en", "ds.next"), size="sm", elem_id="ds-next"),
                                       value="ds.next")
            page_info = gr.Markdown(elem_id="ds-page-info")
        with gr.Column(scale=2):
            hist = gr.BarPlot(None, x="tokens", y="rows", y_lim=[0, None], elem_id="ds-hist", **hist_titles("en"))
            hist_summary = gr.Markdown(elem_id="ds-hist-summary")
    return {"upload": upload, "name": name, "format": fmt, "status": status, "errors": errors, "table": table,
            "pick": pick, "delete": delete, "rows": rows, "page": page, "prev": prev_page, "next": next_page,
            "page_info": page_info, "hist": hist, "hist_summary": hist_summary}


def connect(ctx) -> None:
    """Wire upload, selection, paging, delete and the refreshes."""
    p = ctx.pages["datasets"]
    svc = ctx.svc
    private = {"api_visibility": "private"}

    def refresh(selected: str | None, lang: str):
        choices = dataset_choices(svc)
        ids = [value for _, value in choices]
        value = selected if selected in ids else (ids[0] if ids else None)
        return list_table(svc, lang), gr.Dropdown(choices=choices, value=value)

    def save(path: str | None, name: str, fmt: str, lang: str):
        """Store the dropped file; the drop zone is emptied again so the next file can be dropped."""
        if not path:
            return gr.update(), gr.update(visible=False), gr.update(), gr.update(), None
        source = uploaded_file(path)  # a crafted queue call may name any server file: only uploads are read
        if source is None:
            return t(lang, "ds.not_uploaded"), gr.update(visible=False), gr.update(), gr.update(), None
        try:
            info = datasets.upload_dataset(svc, source.read_bytes(), source.name, name=(name or "").strip() or None,
                                           format=fmt or "auto")
        except LoralabError as exc:
            if exc.errors:
                return (t(lang, "ds.invalid", count=len(exc.errors)),
                        gr.Dataframe(error_table(exc.errors, lang), visible=True), gr.update(), gr.update(), None)
            message = t(lang, "common.error", message=exc.message)
            return message, gr.update(visible=False), gr.update(), gr.update(), None
        table, pick = refresh(info["id"], lang)
        return (t(lang, "ds.uploaded", name=info["name"], version=info["version"], format=info["format"],
                  rows=info["rows"]), gr.update(visible=False), table, pick, None)

    def show(dataset_id: str | None, page: float | None, lang: str):
        return preview(svc, dataset_id, page, lang)

    def remove(dataset_id: str | None, lang: str):
        if not dataset_id:
            return t(lang, "ds.none"), *refresh(None, lang)
        try:
            datasets.delete_dataset(svc, dataset_id)
        except LoralabError as exc:
            return t(lang, "common.error", message=exc.message), *refresh(dataset_id, lang)
        return t(lang, "ds.deleted", id=dataset_id), *refresh(None, lang)

    lang = ctx.lang
    view = [p["rows"], p["page"], p["page_info"]]
    p["upload"].upload(save, inputs=[p["upload"], p["name"], p["format"], lang],
                       outputs=[p["status"], p["errors"], p["table"], p["pick"], p["upload"]], **private)
    picked = p["pick"].change(lambda d, lg: show(d, 1, lg), inputs=[p["pick"], lang], outputs=view, **private)
    picked.then(lambda d, lg: histogram(svc, d, lg), inputs=[p["pick"], lang],
                outputs=[p["hist"], p["hist_summary"]], **private)
    p["prev"].click(lambda d, n, lg: show(d, (n or 1) - 1, lg), inputs=[p["pick"], p["page"], lang], outputs=view,
                    **private)
    p["next"].click(lambda d, n, lg: show(d, (n or 1) + 1, lg), inputs=[p["pick"], p["page"], lang], outputs=view,
                    **private)
    p["page"].submit(show, inputs=[p["pick"], p["page"], lang], outputs=view, **private)
    p["delete"].click(remove, inputs=[p["pick"], lang], outputs=[p["status"], p["table"], p["pick"]], **private)
    ctx.tab_items["datasets"].select(refresh, inputs=[p["pick"], lang], outputs=[p["table"], p["pick"]], **private)
    ctx.on_language.append((refresh, [p["pick"], lang], [p["table"], p["pick"]]))
    ctx.on_language.append((show, [p["pick"], p["page"], lang], view))
    ctx.on_language.append((lambda d, lg: histogram(svc, d, lg), [p["pick"], lang], [p["hist"], p["hist_summary"]]))
