"""Models page: registry table with lineage, stage and latest evaluation; stage, deploy, rollback, delete, export."""
from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

import gradio as gr
import pandas as pd

from loralab.services import exports, registry
from loralab.services.errors import LoralabError
from loralab.services.tickets import issue_ticket
from loralab.ui.dashboard import when
from loralab.ui.i18n import format_bytes, format_seconds, t

STAGES = ("draft", "staging", "production", "archived")
EXPORT_FORMATS = ("merged", "gguf", "ollama")
QUANTIZATIONS = ("f16", "q8_0")
ACTIVE = ("validating_files", "queued", "running")
POLL_SECONDS = 1.5
COLUMNS = ("col.id", "col.name", "col.version", "col.base", "col.method", "col.stage", "col.deployed",
           "col.dataset", "col.job", "col.loss", "col.created")


def fine_tuned(svc) -> list[dict[str, Any]]:
    return registry.list_models(svc, kind="fine_tuned")


def model_table(svc, lang: str) -> pd.DataFrame:
    rows = []
    for m in fine_tuned(svc):
        loss = (m.get("metrics") or {}).get("final_loss")
        rows.append([m["id"], m["name"], m["version"], m["base_model"], m["method"], t(lang, f"stage.{m['stage']}"),
                     t(lang, "yes" if m["deployed"] else "no"), m["lineage"].get("dataset_id") or "",
                     m["lineage"].get("job_id") or "", "" if loss is None else f"{loss:.4f}", when(m["created_at"])])
    return pd.DataFrame(rows, columns=[t(lang, key) for key in COLUMNS])


def details(svc, model_id: str | None) -> dict[str, Any]:
    """Lineage, metrics, training settings and deployment history of one version."""
    if not model_id:
        return {}
    try:
        model = registry.get_model(svc, model_id)
        history = registry.deployment_history(svc, model_id)
    except LoralabError as exc:
        return {"error": exc.message}
    return {"id": model["id"], "name": model["name"], "version": model["version"], "stage": model["stage"],
            "deployed": model["deployed"], "lineage": model["lineage"], "metrics": model["metrics"],
            "spec": model["spec"], "deployments": history}


# ---- export section ----------------------------------------------------------------------------------------------

def export_choices(svc, model_id: str | None) -> list[tuple[str, str]]:
    """(label, id) of a version's exports, newest first."""
    if not model_id or not model_id.startswith("ft-"):
        return []
    try:
        rows = exports.list_exports(svc, model_id, limit=100)
    except LoralabError:
        return []
    return [(f"{e['format']}{' ' + e['quantization'] if e['quantization'] else ''} · {e['status']} · "
             f"{when(e['created_at'])} · {e['id']}", e["id"]) for e in rows]


def start_export(svc, model_id: str | None, fmt: str, quantization: str, lang: str) -> tuple[str, str | None]:
    """Queue an export (or find the same one queued or running): (message, export id or None)."""
    if not model_id:
        return t(lang, "exp.pick_model"), None
    try:
        view, created = exports.create_export(svc, model_id, {"format": fmt, "quantization": quantization})
    except LoralabError as exc:
        return t(lang, "common.error", message=exc.message), None
    except ValueError as exc:  # pydantic: a value outside the choices
        return t(lang, "common.error", message=str(exc)), None
    if created:
        return t(lang, "exp.started", id=view["id"]), view["id"]
    return t(lang, "exp.existing", id=view["id"], status=t(lang, f"status.{view['status']}")), view["id"]


def export_status(view: dict[str, Any], lang: str) -> str:
    """Status, stage, percent and time left of an export; its error or warnings."""
    progress = view["progress"]
    if view["status"] in ("validating_files", "queued"):
        what = t(lang, "exp.waiting")
    elif view["status"] == "running":
        parts = [t(lang, f"exp.stage.{progress['stage']}") if progress.get("stage") in
                 ("merging", "converting", "quantizing", "writing") else ""]
        if progress.get("percent") is not None and progress.get("stage") in ("quantizing", "writing"):
            parts.append(f"{progress['percent']:.0f}%")
        if progress.get("eta_s"):
            parts.append(t(lang, "exp.eta", eta=format_seconds(progress["eta_s"], lang)))
        what = " · ".join(p for p in parts if p) or "…"
    else:
        what = view["label"]
    lines = [f"`{view['id']}` " + t(lang, "exp.status", status=t(lang, f"status.{view['status']}"), what=what)]
    if view.get("error"):
        lines.append(t(lang, "exp.error", code=view["error"]["code"], message=view["error"]["message"]))
    if view.get("warnings"):
        lines.append(f"**{t(lang, 'exp.warnings')}**: " + " / ".join(view["warnings"]))
    return "\n\n".join(lines)


def download_links(svc, view: dict[str, Any], lang: str) -> str:
    """Links to the exported files, each with a signed ticket for this export (a link cannot send the API token)."""
    if not view.get("files"):
        return ""
    ticket = issue_ticket(svc, f"export:{view['id']}", seconds=svc.settings.ui_session_seconds)["ticket"]
    lines = [t(lang, "exp.files", size=format_bytes(view["total_bytes"]))]
    for item in view["files"]:
        url = f"/api/exports/{quote(view['id'])}/files/{quote(item['name'])}?{urlencode({'ticket': ticket})}"
        lines.append(f"- [{item['name']}]({url}) ({format_bytes(item['size_bytes'])})")
    if view.get("ollama_command"):
        lines.append("\n" + t(lang, "exp.ollama", command=view["ollama_command"]))
    return "\n".join(lines)


def export_view(svc, export_id: str | None, lang: str) -> tuple[str, str, bool]:
    """(status markdown, download links markdown, still active) of one export; the Models page polls it."""
    if not export_id:
        return t(lang, "exp.none"), "", False
    try:
        view = exports.get_export(svc, export_id)
    except LoralabError as exc:
        return t(lang, "common.error", message=exc.message), "", False
    return export_status(view, lang), download_links(svc, view, lang), view["status"] in ACTIVE


def build(ctx) -> dict[str, Any]:
    """Lay out the models page."""
    labels = ctx.labels
    table = labels.add(gr.Dataframe(model_table(ctx.svc, "en"), label=t("en", "mdl.table"), interactive=False,
                                    elem_id="mdl-table", max_height=320), label="mdl.table")
    with gr.Row():
        with gr.Column(scale=2):
            pick = labels.add(gr.Dropdown([], label=t("en", "mdl.pick"), elem_id="mdl-pick"), label="mdl.pick")
            stage_choices = [(f"stage.{s}", s) for s in STAGES]
            with gr.Row():
                stage = labels.add(gr.Radio([(t("en", k), v) for k, v in stage_choices], value="draft",
                                            label=t("en", "mdl.stage"), elem_id="mdl-stage"),
                                   label="mdl.stage", choices=stage_choices)
                set_stage = labels.add(gr.Button(t("en", "mdl.set_stage"), elem_id="mdl-set-stage", scale=0),
                                       value="mdl.set_stage")
            with gr.Row():
                deploy = labels.add(gr.Button(t("en", "mdl.deploy"), variant="primary", elem_id="mdl-deploy"),
                                    value="mdl.deploy")
                rollback = labels.add(gr.Button(t("en", "mdl.rollback"), elem_id="mdl-rollback"),
                                      value="mdl.rollback")
                delete = labels.add(gr.Button(t("en", "mdl.delete"), variant="stop", elem_id="mdl-delete"),
                                    value="mdl.delete")
            status = gr.Markdown(elem_id="mdl-status")
            labels.add(gr.Markdown(t("en", "exp.title")), value="exp.title")
            format_choices = [(f"exp.format.{f}", f) for f in EXPORT_FORMATS]
            quant_choices = [(f"exp.q.{q}", q) for q in QUANTIZATIONS]
            exp_format = labels.add(gr.Radio([(t("en", k), v) for k, v in format_choices], value="gguf",
                                             label=t("en", "exp.format"), elem_id="exp-format"),
                                    label="exp.format", choices=format_choices)
            exp_quant = labels.add(gr.Radio([(t("en", k), v) for k, v in quant_choices], value="f16",
                                            label=t("en", "exp.quantization"), elem_id="exp-quantization"),
                                   label="exp.quantization", choices=quant_choices)
            with gr.Row():
                exp_start = labels.add(gr.Button(t("en", "exp.start"), variant="primary", elem_id="exp-start"),
                                       value="exp.start")
                exp_cancel = labels.add(gr.Button(t("en", "exp.cancel"), variant="stop", elem_id="exp-cancel"),
                                        value="exp.cancel")
            exp_message = gr.Markdown(elem_id="exp-message")
            exp_pick = labels.add(gr.Dropdown([], label=t("en", "exp.pick"), elem_id="exp-pick"), label="exp.pick")
            exp_status = gr.Markdown(elem_id="exp-status")
            exp_links = gr.Markdown(elem_id="exp-links")
            exp_timer = gr.Timer(POLL_SECONDS, active=False)
        with gr.Column(scale=3):
            evaluation = gr.Markdown(elem_id="mdl-evaluation")
            info = labels.add(gr.JSON(label=t("en", "mdl.details"), elem_id="mdl-details"), label="mdl.details")
    return {"table": table, "pick": pick, "stage": stage, "set_stage": set_stage, "deploy": deploy,
            "rollback": rollback, "delete": delete, "status": status, "info": info, "evaluation": evaluation,
            "exp_format": exp_format, "exp_quant": exp_quant, "exp_start": exp_start, "exp_cancel": exp_cancel,
            "exp_message": exp_message, "exp_pick": exp_pick, "exp_status": exp_status, "exp_links": exp_links,
            "exp_timer": exp_timer}


def connect(ctx) -> None:
    """Wire the table refresh, selection and the registry actions."""
    p = ctx.pages["models"]
    svc = ctx.svc
    lang = ctx.lang
    private = {"api_visibility": "private"}

    def refresh(model_id: str | None, language: str):
        models = fine_tuned(svc)
        ids = [m["id"] for m in models]
        value = model_id if model_id in ids else (ids[0] if ids else None)
        choices = [(f"{m['name']} v{m['version']} ({m['id']})", m["id"]) for m in models]
        status = "" if models else t(language, "mdl.none")
        return model_table(svc, language), gr.Dropdown(choices=choices, value=value), status

    def select(model_id: str | None, language: str):
        from loralab.ui.evaluate import latest_text

        data = details(svc, model_id)
        try:
            evaluation = latest_text(svc, model_id, language)
        except LoralabError as exc:
            evaluation = t(language, "common.error", message=exc.message)
        return data, gr.Radio(value=data.get("stage", "draft")), evaluation

    def act(action: str, model_id: str | None, stage: str, language: str):
        if not model_id:
            return t(language, "mdl.none"), *refresh(None, language)[:2]
        try:
            if action == "delete":
                registry.delete_model(svc, model_id)
                return t(language, "mdl.deleted", id=model_id), *refresh(None, language)[:2]
            fn = {"stage": lambda: registry.set_stage(svc, model_id, stage),
                  "deploy": lambda: registry.deploy_model(svc, model_id),
                  "rollback": lambda: registry.rollback_model(svc, model_id)}[action]
            model = fn()
        except LoralabError as exc:
            return t(language, "common.error", message=exc.message), *refresh(model_id, language)[:2]
        label = {"stage": "mdl.set_stage", "deploy": "mdl.deploy", "rollback": "mdl.rollback"}[action]
        text = t(language, "mdl.done", action=t(language, label), id=model["id"],
                 stage=t(language, f"stage.{model['stage']}"), deployed=t(language, "yes" if model["deployed"]
                                                                           else "no"))
        return text, *refresh(model["id"], language)[:2]

    outputs = [p["status"], p["table"], p["pick"]]
    selected = [p["info"], p["stage"], p["evaluation"]]
    for name, button in (("stage", p["set_stage"]), ("deploy", p["deploy"]), ("rollback", p["rollback"]),
                         ("delete", p["delete"])):
        button.click(lambda m, s, lg, name=name: act(name, m, s, lg), inputs=[p["pick"], p["stage"], lang],
                     outputs=outputs, **private).then(select, inputs=[p["pick"], lang], outputs=selected, **private)
    p["pick"].change(select, inputs=[p["pick"], lang], outputs=selected, **private)
    refresh_outputs = [p["table"], p["pick"], p["status"]]
    # the picked version may be unchanged (no .change event): its details and latest evaluation are redrawn anyway
    ctx.tab_items["models"].select(refresh, inputs=[p["pick"], lang], outputs=refresh_outputs, **private).then(
        select, inputs=[p["pick"], lang], outputs=selected, **private)
    ctx.on_language.append((refresh, [p["pick"], lang], refresh_outputs))
    ctx.on_language.append((select, [p["pick"], lang], selected))
    connect_export(ctx)


def connect_export(ctx) -> None:
    """Wire the export section: the picked version's exports, start, cancel, and polling while one is active."""
    p = ctx.pages["models"]
    svc = ctx.svc
    lang = ctx.lang
    private = {"api_visibility": "private"}

    def options(model_id: str | None, picked: str | None):
        choices = export_choices(svc, model_id)
        ids = [value for _, value in choices]
        return gr.Dropdown(choices=choices, value=picked if picked in ids else (ids[0] if ids else None))

    def poll(export_id: str | None, language: str):
        status, links, active = export_view(svc, export_id, language)
        return status, links, gr.Timer(active=active)

    def begin(model_id: str | None, fmt: str, quantization: str, language: str):
        message, export_id = start_export(svc, model_id, fmt, quantization, language)
        choices = export_choices(svc, model_id)
        return message, gr.Dropdown(choices=choices, value=export_id or (choices[0][1] if choices else None))

    def cancel(export_id: str | None, language: str):
        if not export_id:
            return t(language, "exp.none")
        try:
            exports.cancel_export(svc, export_id)
        except LoralabError as exc:
            return t(language, "common.error", message=exc.message)
        return t(language, "exp.cancelled", id=export_id)

    view = [p["exp_status"], p["exp_links"], p["exp_timer"]]
    p["exp_start"].click(begin, inputs=[p["pick"], p["exp_format"], p["exp_quant"], lang],
                         outputs=[p["exp_message"], p["exp_pick"]], **private).then(
        poll, inputs=[p["exp_pick"], lang], outputs=view, **private)
    p["exp_cancel"].click(cancel, inputs=[p["exp_pick"], lang], outputs=[p["exp_message"]], **private).then(
        poll, inputs=[p["exp_pick"], lang], outputs=view, **private)
    for trigger in (p["pick"].change, ctx.tab_items["models"].select):
        trigger(options, inputs=[p["pick"], p["exp_pick"]], outputs=[p["exp_pick"]], **private).then(
            poll, inputs=[p["exp_pick"], lang], outputs=view, **private)
    p["exp_pick"].change(poll, inputs=[p["exp_pick"], lang], outputs=view, **private)
    p["exp_timer"].tick(poll, inputs=[p["exp_pick"], lang], outputs=view, show_progress="hidden",
                        trigger_mode="always_last", **private)
    ctx.on_language.append((poll, [p["exp_pick"], lang], view))
