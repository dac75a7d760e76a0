"""Job monitor page: progress bar, ETA, live loss and learning-rate charts (polled), log tail, cancel, overlay."""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from loralab.services import jobs
from loralab.services.errors import LoralabError
from loralab.ui.dashboard import when
from loralab.ui.i18n import format_seconds, t

POLL_SECONDS = 1.5
ACTIVE = ("validating_files", "queued", "running")


def job_choices(svc, lang: str) -> list[tuple[str, str]]:
    """(label, id) of recent jobs, newest first."""
    return [(f"{j['id']} · {j.get('model_name') or ''} · {when(j.get('created_at'))}", j["id"])
            for j in jobs.list_jobs(svc, limit=100)]


def curves(svc, job_ids: list[str]) -> pd.DataFrame:
    """Step metrics of each job (loss and learning rate per step), labelled by job id for overlays."""
    frames = []
    for job_id in job_ids:
        events = jobs.list_events(svc, job_id, types=("step",), limit=10000)
        rows = [(e.get("step"), e.get("loss"), e.get("learning_rate"), job_id) for e in events
                if e.get("step") is not None]
        frames.append(pd.DataFrame(rows, columns=["step", "loss", "learning_rate", "run"]))
    if not frames:
        return pd.DataFrame({"step": [], "loss": [], "learning_rate": [], "run": []})
    return pd.concat(frames, ignore_index=True)


def chart_titles(lang: str, y: str) -> dict[str, str]:
    """Label and axis titles of the loss or learning-rate chart in `lang`."""
    label, title = ("mon.loss", "col.loss") if y == "loss" else ("mon.lr", "col.lr")
    return {"label": t(lang, label), "x_title": t(lang, "col.step"), "y_title": t(lang, title),
            "color_title": t(lang, "col.run")}


def chart(data: pd.DataFrame, y: str, lang: str, job_id: str):
    """One update carrying data and titles, so a redraw never races a separate title update.

    Without steps yet the chart gets one row with no value (drawn as nothing): None would remove the element
    under Gradio's resize observer, and an empty frame would lose the field types.
    """
    value = data[["step", y, "run"]] if len(data) else pd.DataFrame({"step": [0], y: [float("nan")], "run": [job_id]})
    return gr.LinePlot(value=value, **chart_titles(lang, y))


def progress_html(percent: float | None) -> str:
    value = max(0.0, min(100.0, float(percent or 0)))
    return (f'<div class="progress-outer" role="progressbar" aria-valuenow="{value:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100" id="mon-bar"><div class="progress-inner" style="width:{value:.1f}%"></div></div>')


def tracking_lines(svc, job: dict[str, Any], lang: str) -> list[str]:
    """Where the finished run's experiment tracking went (TensorBoard dir, MLflow run, W&B URL)."""
    if job["status"] != "succeeded":
        return []
    done = jobs.list_events(svc, job["id"], types=("done",))
    tracking = (done[-1].get("tracking") if done else None) or {}
    lines = []
    for name, info in tracking.items():
        info = info if isinstance(info, dict) else {"link": info}
        where = info.get("url") or info.get("command") or info.get("tracking_uri") or info.get("logdir") or ""
        lines.append(t(lang, "mon.tracking", name=name, where=where))
    return lines


def summary(job: dict[str, Any], lang: str, extra: list[str] | None = None) -> str:
    """Status line, then the error or the resulting model."""
    progress = job["progress"]
    status = job["status"]
    if status in ACTIVE:
        eta = t(lang, "mon.eta", eta=format_seconds(progress.get("eta_s"), lang)) if progress.get("eta_s") \
            is not None else t(lang, "mon.waiting") if status != "running" else ""
    else:
        eta = t(lang, "mon.done_in")
    loss = progress.get("loss")
    line = t(lang, "mon.summary", status=t(lang, f"status.{status}"), step=progress.get("step") or 0,
             total=progress.get("total_steps") or "?", percent=f"{progress.get('percent') or 0:.0f}",
             loss="-" if loss is None else f"{loss:.4f}", eta=eta)
    lines = [f"`{job['id']}` {line}"]
    if job.get("error"):
        lines.append(t(lang, "mon.error", code=job["error"]["code"], message=job["error"]["message"]))
    if job.get("result_model_id"):
        lines.append(t(lang, "mon.result", model=job["result_model_id"]))
    return "\n\n".join(lines + (extra or []))


def log_tail(svc, job_id: str) -> str:
    logs = jobs.get_logs(svc, job_id, tail_bytes=6000)
    lines = [f"[{e.get('level', e['type'])}] {e.get('message', '')}" for e in logs["events"][-30:]]
    return "\n".join(lines + ([logs["stderr_tail"]] if logs["stderr_tail"] else []))[-8000:]


def build(ctx) -> dict[str, Any]:
    """Lay out the job monitor."""
    labels = ctx.labels
    with gr.Row():
        job = labels.add(gr.Dropdown([], label=t("en", "mon.job"), elem_id="mon-job", scale=3), label="mon.job")
        compare = labels.add(gr.Dropdown([], label=t("en", "mon.compare"), elem_id="mon-compare", scale=2),
                             label="mon.compare")
        refresh = labels.add(gr.Button(t("en", "common.refresh"), size="sm", scale=0, min_width=100),
                             value="common.refresh")
    bar = gr.HTML(progress_html(0), elem_id="mon-progress")
    status = gr.Markdown(elem_id="mon-summary")
    with gr.Row():
        # charts are relabelled together with their data (see chart()), never on their own
        loss = gr.LinePlot(None, x="step", y="loss", color="run", elem_id="mon-loss", **chart_titles("en", "loss"))
        lr = gr.LinePlot(None, x="step", y="learning_rate", color="run", elem_id="mon-lr",
                         **chart_titles("en", "learning_rate"))
    logs = labels.add(gr.Textbox(label=t("en", "mon.logs"), lines=8, max_lines=8, interactive=False,
                                 autoscroll=True, elem_id="mon-logs"), label="mon.logs")
    with gr.Row():
        cancel = labels.add(gr.Button(t("en", "mon.cancel"), variant="stop", elem_id="mon-cancel"),
                            value="mon.cancel")
        try_it = labels.add(gr.Button(t("en", "mon.try"), variant="primary", visible=False, elem_id="mon-try"),
                            value="mon.try")
    timer = gr.Timer(POLL_SECONDS, active=False)
    return {"job": job, "compare": compare, "refresh": refresh, "bar": bar, "status": status, "loss": loss,
            "lr": lr, "logs": logs, "cancel": cancel, "try": try_it, "timer": timer}


def connect(ctx) -> None:
    """Wire selection, the polling timer (on while the job is active), cancel and refreshes."""
    p = ctx.pages["monitor"]
    svc = ctx.svc
    lang = ctx.lang
    private = {"api_visibility": "private"}

    def choices(job_id: str | None, other: str | None, language: str):
        options = job_choices(svc, language)
        ids = [value for _, value in options]
        value = job_id if job_id in ids else (ids[0] if ids else None)
        others = [(t(language, "common.none"), "")] + [o for o in options if o[1] != value]
        return gr.Dropdown(choices=options, value=value), gr.Dropdown(choices=others, value=other or "")

    def poll(job_id: str | None, other: str | None, language: str):
        if not job_id:
            return (progress_html(0), t(language, "mon.pick"), gr.update(), gr.update(), "",
                    gr.Button(visible=False), gr.Timer(active=False))
        try:
            job = jobs.get_job(svc, job_id)
            data = curves(svc, [job_id] + ([other] if other and other != job_id else []))
            tail = log_tail(svc, job_id)
        except LoralabError as exc:
            return (progress_html(0), t(language, "common.error", message=exc.message), gr.update(), gr.update(),
                    "", gr.Button(visible=False), gr.Timer(active=False))
        active = job["status"] in ACTIVE
        return (progress_html(job["progress"].get("percent")), summary(job, language, tracking_lines(svc, job, language)),
                chart(data, "loss", language, job_id),
                chart(data, "learning_rate", language, job_id), tail,
                gr.Button(visible=bool(job.get("result_model_id"))), gr.Timer(active=active))

    def open_playground(job_id: str | None, language: str):
        from loralab.ui.playground import base_of, model_choices

        model_id = jobs.get_job(svc, job_id)["result_model_id"] if job_id else None
        if not model_id:
            return gr.update(), gr.update(), gr.update()
        options = model_choices(svc, language)
        return (gr.Tabs(selected="playground"), gr.Dropdown(choices=options, value=model_id),
                gr.Dropdown(choices=options, value=base_of(svc, model_id)))

    def cancel(job_id: str | None, language: str):
        if not job_id:
            return t(language, "mon.pick"), gr.Timer()
        try:
            jobs.cancel_job(svc, job_id)
        except LoralabError as exc:
            return t(language, "common.error", message=exc.message), gr.Timer()
        return t(language, "mon.cancelled", id=job_id), gr.Timer(active=True)

    view = [p["bar"], p["status"], p["loss"], p["lr"], p["logs"], p["try"], p["timer"]]
    inputs = [p["job"], p["compare"], lang]
    p["job"].change(poll, inputs=inputs, outputs=view, **private)
    p["compare"].change(poll, inputs=inputs, outputs=view, **private)
    p["timer"].tick(poll, inputs=inputs, outputs=view, show_progress="hidden", trigger_mode="always_last",
                    **private)
    playground = ctx.pages["playground"]
    p["try"].click(open_playground, inputs=[p["job"], lang], outputs=[ctx.tabs, playground["model"],
                                                                     playground["compare"]], **private)
    p["cancel"].click(cancel, inputs=[p["job"], lang], outputs=[p["status"], p["timer"]], **private)
    for trigger in (p["refresh"].click, ctx.tab_items["monitor"].select):
        trigger(choices, inputs=inputs, outputs=[p["job"], p["compare"]], **private).then(
            poll, inputs=inputs, outputs=view, **private)
    ctx.on_language.append((choices, inputs, [p["job"], p["compare"]]))
    ctx.on_language.append((poll, inputs, view))
