"""Dashboard page: host resources (CPU, memory, GPU), running and recent jobs, quick links to the other pages."""
from __future__ import annotations

from datetime import datetime
from typing import Any

import gradio as gr
import pandas as pd

from loralab.services import jobs, system
from loralab.ui.i18n import format_bytes, t

JOB_COLUMNS = ("col.id", "col.status", "col.model", "col.base", "col.method", "col.progress", "col.loss",
               "col.created")


def when(value: Any) -> str:
    """A timestamp as 'YYYY-MM-DD HH:MM:SS' local time (unix seconds, datetimes or ISO strings)."""
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value)
    text = value.isoformat(sep=" ") if hasattr(value, "isoformat") else str(value)
    return text.replace("T", " ")[:19]


def job_table(rows: list[dict[str, Any]], lang: str) -> pd.DataFrame:
    """Jobs as a table with translated headers and statuses."""
    data = []
    for job in rows:
        progress = job.get("progress") or {}
        percent = progress.get("percent")
        loss = progress.get("loss")
        data.append([job["id"], t(lang, f"status.{job['status']}"), job.get("model_name") or "",
                     job.get("base_model") or "", job.get("method") or "",
                     "" if percent is None else f"{percent:.0f}%", "" if loss is None else f"{loss:.4f}",
                     when(job.get("created_at"))])
    return pd.DataFrame(data, columns=[t(lang, key) for key in JOB_COLUMNS])


def system_markdown(svc, lang: str) -> str:
    """The system facts as a Markdown list."""
    info = system.system_info(svc)
    memory, disk = info["memory"], info["disk"]
    gpus = info.get("gpus") or []
    gpu = "; ".join(f"{g['name']} ({format_bytes(g['free_memory_bytes'])} / {format_bytes(g['total_memory_bytes'])})"
                    for g in gpus) or t(lang, "dash.no_gpu")
    versions = f"loralab {info['loralab']}, Python {info['python']}, torch {info.get('torch') or '-'}"
    rows = [("dash.cpu", str(info.get("cpu_count") or "-")),
            ("dash.memory", f"{format_bytes(memory['available_bytes'])} / {format_bytes(memory['total_bytes'])}"),
            ("dash.disk", f"{format_bytes(disk['free_bytes'])} / {format_bytes(disk['total_bytes'])}"),
            ("dash.gpu", gpu), ("dash.versions", versions)]
    lines = [f"### {t(lang, 'dash.system')}", ""]
    lines += [f"- **{t(lang, key)}**: {value}" for key, value in rows]
    return "\n".join(lines)


def build(ctx) -> dict[str, Any]:
    """Lay out the dashboard; data is filled on load, on tab select and by the refresh button."""
    import loralab.ui.learn  # noqa: F401  (registers the learning strings used below)

    labels = ctx.labels
    with gr.Row():
        with gr.Column(scale=2):
            sysinfo = gr.Markdown(elem_id="dash-system")
        with gr.Column(scale=1):
            labels.add(gr.Markdown(f"### {t('en', 'dash.links')}"),
                       value=lambda lang: f"### {t(lang, 'dash.links')}")
            go_datasets = labels.add(gr.Button(t("en", "dash.go_datasets"), variant="primary"),
                                     value="dash.go_datasets")
            go_train = labels.add(gr.Button(t("en", "dash.go_train")), value="dash.go_train")
            go_playground = labels.add(gr.Button(t("en", "dash.go_playground")), value="dash.go_playground")
            go_learn = labels.add(gr.Button(t("en", "learn.dash_go"), elem_id="dash-go-learn"), value="learn.dash_go")
            learn_progress = gr.Markdown(elem_id="dash-learn")
            labels.add(gr.Markdown("[API reference (/docs)](/docs)"),
                       value=lambda lang: f"[{t(lang, 'dash.api_docs')}](/docs)")
    running = labels.add(gr.Dataframe(job_table([], "en"), label=t("en", "dash.running"), interactive=False,
                                      elem_id="dash-running"), label="dash.running")
    recent = labels.add(gr.Dataframe(job_table([], "en"), label=t("en", "dash.recent"), interactive=False,
                                     elem_id="dash-recent"), label="dash.recent")
    refresh = labels.add(gr.Button(t("en", "common.refresh"), size="sm"), value="common.refresh")
    return {"sysinfo": sysinfo, "running": running, "recent": recent, "refresh": refresh, "learn": learn_progress,
            "go": {"datasets": go_datasets, "train": go_train, "playground": go_playground, "learn": go_learn}}


def connect(ctx) -> None:
    """Wire refreshes (load, tab select, language, button) and the quick links that switch tabs."""
    page = ctx.pages["dashboard"]
    svc = ctx.svc

    def refresh(lang: str):
        active = [j for j in jobs.list_jobs(svc, limit=100) if j["status"] in ("validating_files", "queued",
                                                                              "running")]
        recent = jobs.list_jobs(svc, limit=10)
        return system_markdown(svc, lang), job_table(active, lang), job_table(recent, lang)

    outputs = [page["sysinfo"], page["running"], page["recent"]]
    page["refresh"].click(refresh, inputs=[ctx.lang], outputs=outputs, api_visibility="private")
    ctx.tab_items["dashboard"].select(refresh, inputs=[ctx.lang], outputs=outputs, api_visibility="private")
    ctx.on_language.append((refresh, [ctx.lang], outputs))
    for name, button in page["go"].items():
        button.click(lambda name=name: gr.Tabs(selected=name), outputs=[ctx.tabs], api_visibility="private")
    if "learn" in ctx.pages:  # learning progress of this browser (its learner id lives on the Learn page)
        from loralab.ui.learn import dashboard_markdown

        inputs = [ctx.pages["learn"]["user"], ctx.lang]

        def learn_refresh(user, lang):
            return dashboard_markdown(svc, user, lang)

        for trigger in (page["refresh"].click, ctx.tab_items["dashboard"].select):
            trigger(learn_refresh, inputs=inputs, outputs=[page["learn"]], api_visibility="private")
        ctx.on_language.append((learn_refresh, inputs, [page["learn"]]))
