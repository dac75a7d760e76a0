"""Feedback page: charts of ratings per model and per day, the feedback list, and a preference dataset from it."""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from loralab.services import feedback
from loralab.services.errors import LoralabError
from loralab.ui.dashboard import when
from loralab.ui.i18n import register_strings, t

register_strings({
    "tab.feedback": ("Feedback", "フィードバック"),
    "fb.model": ("Model", "モデル"),
    "fb.all_models": ("All models", "すべてのモデル"),
    "fb.since": ("From (YYYY-MM-DD)", "開始日（YYYY-MM-DD）"),
    "fb.until": ("Until (YYYY-MM-DD, exclusive)", "終了日（YYYY-MM-DD、この日を含まない）"),
    "fb.summary": ("**{count}** feedback · mean rating **{mean}** · thumbs up {up} / down {down} · "
                   "{corrections} better answers", "フィードバック **{count}** 件 · 平均評価 **{mean}** · 高評価 {up} / 低評価 {down} · "
                   "より良い回答 {corrections} 件"),
    "fb.empty": ("No feedback yet: rate answers in the playground or POST /api/feedback.",
                 "フィードバックはまだありません。プレイグラウンドで回答を評価するか、POST /api/feedback を使ってください。"),
    "fb.by_model": ("Mean rating per model", "モデルごとの平均評価"),
    "fb.by_day": ("Feedback per day", "日ごとのフィードバック数"),
    "fb.mean_rating": ("mean rating", "平均評価"),
    "fb.count": ("feedback", "件数"),
    "fb.day": ("day", "日付"),
    "fb.list": ("Latest feedback", "最新のフィードバック"),
    "fb.col_rating": ("Rating", "評価"),
    "fb.col_thumbs": ("Thumbs", "高評価/低評価"),
    "fb.col_answer": ("Answer", "回答"),
    "fb.col_better": ("Better answer", "より良い回答"),
    "fb.col_comment": ("Comment", "コメント"),
    "fb.col_arm": ("A/B arm", "A/B アーム"),
    "fb.pref_title": ("Preference dataset from feedback (for DPO)", "フィードバックから選好データセットを作成（DPO 用）"),
    "fb.pref_help": ("Chosen = the better answer a user wrote (rejected = the model's), or for the same prompt the "
                     "higher-rated answer (rejected = a lower-rated one, at least the minimum gap apart).",
                     "chosen = ユーザーが書いたより良い回答（rejected = モデルの回答）、または同じプロンプトへの評価の"
                     "高い回答（rejected = 最小差以上低く評価された回答）。"),
    "fb.pref_name": ("Dataset name", "データセット名"),
    "fb.pref_gap": ("Minimum rating gap", "評価の最小差"),
    "fb.pref_preview": ("Preview", "プレビュー"),
    "fb.pref_store": ("Store as dataset version", "データセットのバージョンとして保存"),
    "fb.pref_counts": ("{records} preference pairs: {corrections} from better answers, {ratings} from ratings "
                       "({feedback} feedback read, {skipped} without a usable prompt).",
                       "選好ペア {records} 件：より良い回答から {corrections} 件、評価から {ratings} 件"
                       "（フィードバック {feedback} 件を読み、使えるプロンプトのないもの {skipped} 件）。"),
    "fb.pref_stored": ("Stored dataset {name} v{version} ({id}, {rows} rows, format preference).",
                       "データセット {name} v{version}（{id}、{rows} 行、形式 preference）を保存しました。"),
    "fb.pref_no_name": ("Give the dataset a name first.", "先にデータセット名を入力してください。"),
    "fb.prompt": ("Prompt", "プロンプト"),
    "fb.chosen": ("Chosen", "chosen（選ばれた回答）"),
    "fb.rejected": ("Rejected", "rejected（却下された回答）"),
})

LIST_COLUMNS = ("col.created", "col.model", "fb.col_rating", "fb.col_thumbs", "fb.col_answer", "fb.col_better",
                "fb.col_comment", "fb.col_arm")
PREF_COLUMNS = ("fb.prompt", "fb.chosen", "fb.rejected")


def _short(text: str | None, size: int = 120) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= size else text[:size - 1] + "…"


def _filter(model: str | None, since: str | None, until: str | None):
    return feedback.make_filter(model=model or None, since=(since or "").strip() or None,
                                until=(until or "").strip() or None)


def stats_view(svc, model: str | None, since: str | None, until: str | None, lang: str):
    """Summary line, the two charts, the latest feedback and the model choices, for the current filters."""
    try:
        flt = _filter(model, since, until)
        data = feedback.stats(svc, flt)
        rows = feedback.list_feedback(svc, flt, limit=200)["data"]
    except LoralabError as exc:
        empty = pd.DataFrame(columns=[t(lang, key) for key in LIST_COLUMNS])
        return (t(lang, "common.error", message=exc.message), gr.BarPlot(value=None), gr.BarPlot(value=None),
                empty, gr.update())
    total = data["total"]
    summary = t(lang, "fb.summary", count=total["count"],
                mean="–" if total["mean_rating"] is None else f"{total['mean_rating']:.2f}", up=total["thumbs_up"],
                down=total["thumbs_down"], corrections=total["corrections"]) if total["count"] else t(lang, "fb.empty")
    mean_name, count_name, day_name = t(lang, "fb.mean_rating"), t(lang, "fb.count"), t(lang, "fb.day")
    model_name = t(lang, "fb.model")
    by_model = pd.DataFrame([{model_name: m["model"], mean_name: m["mean_rating"] or 0.0, count_name: m["count"]}
                             for m in data["by_model"]], columns=[model_name, mean_name, count_name])
    by_day = pd.DataFrame([{day_name: d["day"], count_name: d["count"]} for d in data["by_day"]],
                          columns=[day_name, count_name])
    table = pd.DataFrame([[when(r["created_at"]), r["model"] or "", r["rating"] or "", r["thumbs"] or "",
                           _short(r["output"]), _short(r["corrected"]), _short(r["comment"]), r["arm"] or ""]
                          for r in rows], columns=[t(lang, key) for key in LIST_COLUMNS])
    models = sorted({m["model"] for m in feedback.stats(svc, feedback.make_filter())["by_model"]})
    choices = [(t(lang, "fb.all_models"), "")] + [(m, m) for m in models]
    return (summary,
            gr.BarPlot(value=by_model, x=model_name, y=mean_name, y_lim=[0, 5], title=t(lang, "fb.by_model")),
            gr.BarPlot(value=by_day, x=day_name, y=count_name, y_lim=[0, None], title=t(lang, "fb.by_day")),
            table, gr.Dropdown(choices=choices, value=model if model in models else ""))


def preference_view(svc, store: bool, name: str | None, gap: float, model: str | None, since: str | None,
                    until: str | None, lang: str):
    """Preview the preference pairs (or store them as a dataset version): status text and a table."""
    columns = [t(lang, key) for key in PREF_COLUMNS]
    try:
        flt = _filter(model, since, until)
        built = feedback.preference_records(svc, flt, float(gap or 1))
        status = _counts(built["counts"], lang)
        if store:
            if not (name or "").strip():
                return t(lang, "fb.pref_no_name"), pd.DataFrame(columns=columns)
            dataset = feedback.store_preferences(svc, name.strip(), flt, float(gap or 1))["dataset"]
            status += "\n\n" + t(lang, "fb.pref_stored", name=dataset["name"], version=dataset["version"],
                                 id=dataset["id"], rows=dataset["rows"])
    except LoralabError as exc:
        return t(lang, "common.error", message=exc.message), pd.DataFrame(columns=columns)
    rows = [[_short(r["messages"][-1]["content"]), _short(r["chosen"]), _short(r["rejected"])]
            for r in built["records"][:100]]
    return status, pd.DataFrame(rows, columns=columns)


def _counts(counts: dict[str, int], lang: str) -> str:
    return t(lang, "fb.pref_counts", records=counts["records"], corrections=counts["from_corrections"],
             ratings=counts["from_ratings"], feedback=counts["feedback"], skipped=counts["skipped_no_prompt"])


def build(ctx) -> dict[str, Any]:
    """Lay out the feedback page."""
    labels = ctx.labels
    with gr.Row():
        model = labels.add(gr.Dropdown([(t("en", "fb.all_models"), "")], value="", label=t("en", "fb.model"),
                                       elem_id="fb-model", scale=2), label="fb.model")
        since = labels.add(gr.Textbox(label=t("en", "fb.since"), elem_id="fb-since", scale=1), label="fb.since")
        until = labels.add(gr.Textbox(label=t("en", "fb.until"), elem_id="fb-until", scale=1), label="fb.until")
        refresh = labels.add(gr.Button(t("en", "common.refresh"), elem_id="fb-refresh", scale=0),
                             value="common.refresh")
    summary = gr.Markdown(elem_id="fb-summary")
    with gr.Row():
        by_model = gr.BarPlot(None, x="model", y="mean", elem_id="fb-by-model")
        by_day = gr.BarPlot(None, x="day", y="count", elem_id="fb-by-day")
    table = labels.add(gr.Dataframe(label=t("en", "fb.list"), interactive=False, elem_id="fb-table",
                                    max_height=320, wrap=True), label="fb.list")
    with labels.add(gr.Accordion(t("en", "fb.pref_title"), open=True, elem_id="fb-pref"), label="fb.pref_title"):
        labels.add(gr.Markdown(t("en", "fb.pref_help")), value="fb.pref_help")
        with gr.Row():
            name = labels.add(gr.Textbox(value="feedback-preferences", label=t("en", "fb.pref_name"),
                                         elem_id="fb-pref-name", scale=2), label="fb.pref_name")
            gap = labels.add(gr.Number(1, minimum=0.5, maximum=4, step=0.5, label=t("en", "fb.pref_gap"),
                                       elem_id="fb-pref-gap", scale=1), label="fb.pref_gap")
            preview = labels.add(gr.Button(t("en", "fb.pref_preview"), elem_id="fb-pref-preview", scale=0),
                                 value="fb.pref_preview")
            store = labels.add(gr.Button(t("en", "fb.pref_store"), variant="primary", elem_id="fb-pref-store",
                                         scale=0), value="fb.pref_store")
        pref_status = gr.Markdown(elem_id="fb-pref-status")
        pref_table = gr.Dataframe(interactive=False, elem_id="fb-pref-table", max_height=320, wrap=True)
    return {"model": model, "since": since, "until": until, "refresh": refresh, "summary": summary,
            "by_model": by_model, "by_day": by_day, "table": table, "name": name, "gap": gap, "preview": preview,
            "store": store, "pref_status": pref_status, "pref_table": pref_table}


def connect(ctx) -> None:
    """Wire the filters, the refresh and the preference builder."""
    p = ctx.pages["feedback"]
    svc = ctx.svc
    private = {"api_visibility": "private"}
    filters = [p["model"], p["since"], p["until"]]
    outputs = [p["summary"], p["by_model"], p["by_day"], p["table"], p["model"]]

    def show(model, since, until, lang):
        return stats_view(svc, model, since, until, lang)

    p["refresh"].click(show, inputs=[*filters, ctx.lang], outputs=outputs, **private)
    p["model"].input(show, inputs=[*filters, ctx.lang], outputs=outputs, **private)
    ctx.tab_items["feedback"].select(show, inputs=[*filters, ctx.lang], outputs=outputs, **private)
    ctx.on_language.append((show, [*filters, ctx.lang], outputs))
    for button, store in ((p["preview"], False), (p["store"], True)):
        button.click(lambda n, g, m, s, u, lg, store=store: preference_view(svc, store, n, g, m, s, u, lg),
                     inputs=[p["name"], p["gap"], *filters, ctx.lang], outputs=[p["pref_status"], p["pref_table"]],
                     **private)
