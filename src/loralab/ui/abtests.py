"""A/B tests page: create a test between two models, watch its results, stop it, promote the winner."""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd
from pydantic import ValidationError

from loralab.services import abtests
from loralab.services.errors import LoralabError
from loralab.ui.i18n import register_strings, t
from loralab.ui.playground import model_choices

register_strings({
    "tab.abtests": ("A/B tests", "A/B テスト"),
    "ab.create": ("New A/B test", "新しい A/B テスト"),
    "ab.name": ("Endpoint name (clients ask for ab:<name>)", "エンドポイント名（クライアントは ab:<name> を指定）"),
    "ab.model_a": ("Model A (incumbent)", "モデル A（現行）"),
    "ab.model_b": ("Model B (challenger)", "モデル B（挑戦者）"),
    "ab.split": ("Share of users sent to model A", "モデル A に送るユーザーの割合"),
    "ab.metric": ("Success metric", "成功指標"),
    "ab.metric_rating": ("Mean rating (Mann-Whitney U)", "平均評価（Mann-Whitney U 検定）"),
    "ab.metric_thumbs": ("Thumbs-up rate (two-proportion z-test)", "高評価率（2 標本比率の z 検定）"),
    "ab.start": ("Start test", "テストを開始"),
    "ab.created": ("Started {name}: send requests with model \"ab:{name}\" (sticky per `user` or X-Session-Id).",
                   "{name} を開始しました。model に \"ab:{name}\" を指定して送信してください（`user` または "
                   "X-Session-Id ごとに固定）。"),
    "ab.pick": ("A/B test", "A/B テスト"),
    "ab.none": ("No A/B tests yet.", "A/B テストはまだありません。"),
    "ab.stop": ("Stop test", "テストを停止"),
    "ab.promote": ("Promote winner to production", "勝者を本番へ昇格"),
    "ab.promoted": ("Promoted {model} (arm {arm}) to production; the test is stopped.",
                    "{model}（アーム {arm}）を本番に昇格し、テストを停止しました。"),
    "ab.results": ("**{name}** ({status}) · {statistic}: p = {p} · needed per arm: {needed} · winner: **{winner}**"
                   "\n\n{reason}", "**{name}**（{status}）· {statistic}: p = {p} · 各アームに必要な数: {needed} · "
                   "勝者: **{winner}**\n\n{reason}"),
    "ab.no_winner": ("none yet", "まだなし"),
    "ab.col_arm": ("Arm", "アーム"),
    "ab.col_requests": ("Requests", "リクエスト数"),
    "ab.col_feedback": ("Feedback", "フィードバック数"),
    "ab.col_value": ("Metric", "指標"),
    "ab.col_ci": ("95% interval", "95% 区間"),
    "ab.status_active": ("active", "実行中"),
    "ab.status_stopped": ("stopped", "停止"),
})

ARM_COLUMNS = ("ab.col_arm", "col.model", "ab.col_requests", "ab.col_feedback", "ab.col_value", "ab.col_ci")
METRICS = [("ab.metric_rating", "mean_rating"), ("ab.metric_thumbs", "thumbs_up_rate")]


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def results_view(svc, test_id: str | None, lang: str) -> tuple[str, pd.DataFrame]:
    """The results line (test, p-value, needed sample, winner, why) and the per-arm table."""
    columns = [t(lang, key) for key in ARM_COLUMNS]
    if not test_id:
        return t(lang, "ab.none"), pd.DataFrame(columns=columns)
    try:
        out = abtests.results(svc, test_id)
    except LoralabError as exc:
        return t(lang, "common.error", message=exc.message), pd.DataFrame(columns=columns)
    test = out["test"]
    winner = t(lang, "ab.no_winner") if out["winner"] is None else f"{out['winner']} ({out['winner_model']})"
    text = t(lang, "ab.results", name=test["endpoint"], status=t(lang, f"ab.status_{test['status']}"),
             statistic=out["statistic"], p=_number(out["p_value"]),
             needed=out["min_sample_per_arm"] or "–", winner=winner, reason=out["reason"])
    rows = [[a["arm"], a["model"], a["requests"], a["feedback"], _number(a["value"]),
             "–" if not a["ci95"] else f"{a['ci95'][0]:.3g} – {a['ci95'][1]:.3g}"] for a in out["arms"]]
    return text, pd.DataFrame(rows, columns=columns)


def build(ctx) -> dict[str, Any]:
    """Lay out the A/B tests page."""
    labels = ctx.labels
    with gr.Row():
        with gr.Column(scale=2):
            labels.add(gr.Markdown(f"### {t('en', 'ab.create')}"), value=lambda lang: f"### {t(lang, 'ab.create')}")
            name = labels.add(gr.Textbox(label=t("en", "ab.name"), elem_id="ab-name"), label="ab.name")
            model_a = labels.add(gr.Dropdown([], label=t("en", "ab.model_a"), elem_id="ab-model-a"),
                                 label="ab.model_a")
            model_b = labels.add(gr.Dropdown([], label=t("en", "ab.model_b"), elem_id="ab-model-b"),
                                 label="ab.model_b")
            split = labels.add(gr.Slider(0.05, 0.95, value=0.5, step=0.05, label=t("en", "ab.split"),
                                         elem_id="ab-split"), label="ab.split")
            metric = labels.add(gr.Radio([(t("en", k), v) for k, v in METRICS], value="mean_rating",
                                         label=t("en", "ab.metric"), elem_id="ab-metric"),
                                label="ab.metric", choices=METRICS)
            start = labels.add(gr.Button(t("en", "ab.start"), variant="primary", elem_id="ab-start"),
                               value="ab.start")
            create_status = gr.Markdown(elem_id="ab-create-status")
        with gr.Column(scale=3):
            with gr.Row():
                pick = labels.add(gr.Dropdown([], label=t("en", "ab.pick"), elem_id="ab-pick", scale=3),
                                  label="ab.pick")
                refresh = labels.add(gr.Button(t("en", "common.refresh"), elem_id="ab-refresh", scale=0),
                                     value="common.refresh")
            results = gr.Markdown(elem_id="ab-results")
            arms = gr.Dataframe(interactive=False, elem_id="ab-arms")
            with gr.Row():
                stop = labels.add(gr.Button(t("en", "ab.stop"), variant="stop", elem_id="ab-stop"), value="ab.stop")
                promote = labels.add(gr.Button(t("en", "ab.promote"), elem_id="ab-promote"), value="ab.promote")
            action_status = gr.Markdown(elem_id="ab-action-status")
    return {"name": name, "model_a": model_a, "model_b": model_b, "split": split, "metric": metric, "start": start,
            "create_status": create_status, "pick": pick, "refresh": refresh, "results": results, "arms": arms,
            "stop": stop, "promote": promote, "action_status": action_status}


def connect(ctx) -> None:
    """Wire creation, the test picker, results, stop and promote."""
    p = ctx.pages["abtests"]
    svc = ctx.svc
    private = {"api_visibility": "private"}

    def tests_dropdown(selected: str | None):
        tests = abtests.list_tests(svc)
        ids = [x["id"] for x in tests]
        value = selected if selected in ids else (ids[0] if ids else None)
        return gr.Dropdown(choices=[(f"{x['endpoint']} · {x['status']} ({x['id']})", x["id"]) for x in tests],
                           value=value), value

    def refresh(selected, model_a, model_b, lang):
        options = [(label, value) for label, value in model_choices(svc, lang) if not value.startswith("ab:")]
        values = [value for _, value in options]
        dropdown, value = tests_dropdown(selected)
        text, table = results_view(svc, value, lang)
        return (dropdown, text, table,
                gr.Dropdown(choices=options, value=model_a if model_a in values else None),
                gr.Dropdown(choices=options, value=model_b if model_b in values else None))

    def create(name, model_a, model_b, split, metric, lang):
        try:
            body = abtests.AbTestRequest(name=(name or "").strip(), model_a=model_a or "", model_b=model_b or "",
                                         split=float(split), metric=metric)
            test = abtests.create_test(svc, body)
        except LoralabError as exc:
            return t(lang, "common.error", message=exc.message), gr.update(), gr.update(), gr.update()
        except ValidationError as exc:
            error = exc.errors()[0]
            return (t(lang, "common.error", message=f"{'.'.join(map(str, error['loc']))}: {error['msg']}"),
                    gr.update(), gr.update(), gr.update())
        dropdown, value = tests_dropdown(test["id"])
        return (t(lang, "ab.created", name=test["name"]), dropdown, *results_view(svc, value, lang))

    def act(action, test_id, lang):
        if not test_id:
            return t(lang, "ab.none"), gr.update(), *results_view(svc, None, lang)
        try:
            if action == "stop":
                abtests.stop_test(svc, test_id)
                message = ""
            else:
                out = abtests.promote_winner(svc, test_id)
                message = t(lang, "ab.promoted", model=out["model"]["id"], arm=out["winner"])
        except LoralabError as exc:
            message = t(lang, "common.error", message=exc.message)
        dropdown, value = tests_dropdown(test_id)
        return message, dropdown, *results_view(svc, value, lang)

    view = [p["results"], p["arms"]]
    refresh_inputs = [p["pick"], p["model_a"], p["model_b"], ctx.lang]
    refresh_outputs = [p["pick"], *view, p["model_a"], p["model_b"]]
    p["start"].click(create, inputs=[p["name"], p["model_a"], p["model_b"], p["split"], p["metric"], ctx.lang],
                     outputs=[p["create_status"], p["pick"], *view], **private)
    p["pick"].input(lambda test_id, lang: results_view(svc, test_id, lang), inputs=[p["pick"], ctx.lang],
                    outputs=view, **private)
    p["refresh"].click(refresh, inputs=refresh_inputs, outputs=refresh_outputs, **private)
    for action in ("stop", "promote"):
        p[action].click(lambda test_id, lang, action=action: act(action, test_id, lang), inputs=[p["pick"], ctx.lang],
                        outputs=[p["action_status"], p["pick"], *view], **private)
    ctx.tab_items["abtests"].select(refresh, inputs=refresh_inputs, outputs=refresh_outputs, **private)
    ctx.on_language.append((refresh, refresh_inputs, refresh_outputs))
