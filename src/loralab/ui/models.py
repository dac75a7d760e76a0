"""Models page: registry table with lineage, stage and latest evaluation; stage, deploy, rollback, delete."""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from loralab.services import registry
from loralab.services.errors import LoralabError
from loralab.ui.dashboard import when
from loralab.ui.i18n import t

STAGES = ("draft", "staging", "production", "archived")
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
        with gr.Column(scale=3):
            evaluation = gr.Markdown(elem_id="mdl-evaluation")
            info = labels.add(gr.JSON(label=t("en", "mdl.details"), elem_id="mdl-details"), label="mdl.details")
    return {"table": table, "pick": pick, "stage": stage, "set_stage": set_stage, "deploy": deploy,
            "rollback": rollback, "delete": delete, "status": status, "info": info, "evaluation": evaluation}


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
