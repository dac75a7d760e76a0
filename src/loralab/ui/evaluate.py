"""Evaluate page: pick the base and fine-tuned models and a dataset, queue an evaluation, watch it, read the scores."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import gradio as gr
import pandas as pd

from loralab.services import datasets, evaluations, registry
from loralab.services.errors import LoralabError
from loralab.services.tickets import issue_ticket
from loralab.ui.dashboard import when
from loralab.ui.i18n import format_seconds, register_strings, t

POLL_SECONDS = 1.5
ACTIVE = ("validating_files", "queued", "running")
HELDOUT = "__heldout__"

register_strings({
    "tab.evaluate": ("Evaluate", "評価"),
    "eval.intro": ("Compare the base model with fine-tuned versions on rows with reference answers: BLEU, chrF, "
                   "ROUGE, exact match, embedding similarity and perplexity. The evaluation runs as a job.",
                   "参照回答のあるデータで、ベースモデルとファインチューニング済みモデルを比較します（BLEU・chrF・ROUGE・"
                   "完全一致・埋め込み類似度・パープレキシティ）。評価はジョブとして実行されます。"),
    "eval.base": ("Base model", "ベースモデル"),
    "eval.models": ("Fine-tuned models to compare", "比較するファインチューニング済みモデル"),
    "eval.dataset": ("Evaluation data", "評価データ"),
    "eval.heldout": ("Held-out split of the first model's training", "最初のモデルの学習で取り分けた検証データ"),
    "eval.max_new_tokens": ("Max new tokens per answer", "回答ごとの最大生成トークン数"),
    "eval.limit": ("Rows to use (0 = all)", "使う行数（0 = すべて）"),
    "eval.embeddings": ("Embedding similarity", "埋め込み類似度"),
    "eval.start": ("Start evaluation", "評価を開始"),
    "eval.started": ("Queued evaluation `{id}`.", "評価 `{id}` をキューに入れました。"),
    "eval.pick": ("Evaluation", "評価"),
    "eval.none": ("No evaluations yet: pick models and data above and start one.",
                  "評価はまだありません。上でモデルとデータを選んで開始してください。"),
    "eval.status": ("**{status}** · {done}/{total} answers ({percent}%) {eta}",
                    "**{status}** · 回答 {done}/{total}（{percent}%）{eta}"),
    "eval.eta": ("· about {eta} left", "· 残り約 {eta}"),
    "eval.error": ("**{code}**: {message}", "**{code}**：{message}"),
    "eval.table": ("Scores (mean per model; % = change vs base, positive = better)",
                   "スコア（モデルごとの平均。% はベース比の変化、正 = 改善）"),
    "eval.metric": ("Metric", "指標"),
    "eval.vs_base": ("{name} vs base", "{name}（ベース比）"),
    "eval.best": ("Best", "最良"),
    "eval.chart": ("Mean scores", "平均スコア"),
    "eval.histogram": ("Per-example scores", "例ごとのスコア"),
    "eval.report": ("Full report: [HTML]({html}) · [Markdown]({md}) · [CSV]({csv})",
                    "詳細レポート: [HTML]({html}) · [Markdown]({md}) · [CSV]({csv})"),
    "eval.warnings": ("Warnings", "警告"),
    "eval.cancel": ("Cancel", "キャンセル"),
    "eval.cancelled": ("Cancel requested for `{id}`.", "`{id}` のキャンセルを要求しました。"),
    "eval.latest": ("Latest evaluation", "最新の評価"),
    "eval.latest_none": ("Not evaluated yet (see the Evaluate page).", "まだ評価されていません（評価ページで実行できます）。"),
})


def model_choices(svc) -> list[tuple[str, str]]:
    """(label, id) of every fine-tuned version, newest version first within a name."""
    return [(f"{m['name']} v{m['version']} ({m['id']})", m["id"]) for m in registry.list_models(svc, "fine_tuned")]


def base_choices(svc) -> list[str]:
    return [m["id"] for m in registry.base_models(svc)]


def dataset_choices(svc, lang: str) -> list[tuple[str, str]]:
    return [(t(lang, "eval.heldout"), HELDOUT)] + [
        (f"{d['name']} v{d['version']} · {d['rows']} · {d['id']}", d["id"]) for d in datasets.list_datasets(svc)]


def evaluation_choices(svc) -> list[tuple[str, str]]:
    return [(f"{e['id']} · {e['name']} · {when(e['created_at'])}", e["id"])
            for e in evaluations.list_evaluations(svc, limit=100)]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) and abs(value) < 1000 else f"{value:.1f}" \
        if isinstance(value, float) else str(value)


def score_table(view: dict[str, Any], lang: str) -> pd.DataFrame:
    """The side-by-side comparison: a row per metric, a column per model, then % vs base and the best model."""
    comparison = view.get("comparison") or {"models": [], "rows": []}
    models = comparison["models"]
    columns = [t(lang, "eval.metric"), *models, *[t(lang, "eval.vs_base", name=m) for m in models[1:]],
               t(lang, "eval.best")]
    rows = []
    for row in comparison["rows"]:
        gains = [row["improvement_pct"].get(m) for m in models[1:]]
        rows.append([row["metric"], *[fmt(row["values"].get(m)) for m in models],
                     *["-" if g is None else f"{g:+.1f}%" for g in gains], row["best"] or ""])
    return pd.DataFrame(rows, columns=columns)


def status_text(view: dict[str, Any], lang: str) -> str:
    progress = view["progress"]
    total, step = progress.get("total_steps"), progress.get("step") or 0
    eta = t(lang, "eval.eta", eta=format_seconds(progress.get("eta_s"), lang)) \
        if view["status"] == "running" and progress.get("eta_s") else ""
    lines = [f"`{view['id']}` " + t(lang, "eval.status", status=t(lang, f"status.{view['status']}"), done=step,
                                      total=total or "?", percent=f"{progress.get('percent') or 0:.0f}", eta=eta)]
    if view.get("error"):
        lines.append(t(lang, "eval.error", code=view["error"]["code"], message=view["error"]["message"]))
    warnings = (view.get("summary") or {}).get("warnings") or []
    if warnings:
        lines.append(f"**{t(lang, 'eval.warnings')}**: " + " / ".join(warnings))
    return "\n\n".join(lines)


def report_links(svc, view: dict[str, Any], lang: str) -> str:
    """Links to the report files, each with a signed ticket: a browser link cannot send the API token."""
    files = view.get("files") or {}
    html = files.get(f"report.{lang}.html") or files.get("report.html")
    if not html:
        return ""
    # the link sits on a page the user may read for a while: it lasts as long as a UI login, for this report only
    ticket = issue_ticket(svc, f"report:{view['id']}", seconds=svc.settings.ui_session_seconds)["ticket"]

    def signed(url: str) -> str:
        return f"{url}?{urlencode({'ticket': ticket})}" if url else ""

    return t(lang, "eval.report", html=signed(html), md=signed(files.get("report.md", "")),
             csv=signed(files.get("results.csv", "")))


def chart_image(svc, view: dict[str, Any], name: str):
    """A report PNG as a PIL image (Gradio serves it from its own cache; the run directory stays private)."""
    if name not in (view.get("files") or {}):
        return None
    from PIL import Image

    path, _ = evaluations.report_file(svc, view["id"], name)
    with Image.open(path) as image:
        return image.copy()


def latest_text(svc, model_id: str | None, lang: str) -> str:
    """The Models page's line on a version's newest succeeded evaluation: its scores against the base."""
    if not model_id or not model_id.startswith("ft-"):
        return ""
    view = evaluations.latest_summary(svc, model_id)
    if view is None:
        return f"**{t(lang, 'eval.latest')}**: {t(lang, 'eval.latest_none')}"
    metrics = (view["summary"] or {}).get("metrics") or {}
    gains = ((view["summary"] or {}).get("improvement_pct") or {}).get(model_id) or {}
    parts = []
    for metric in ("exact_match", "rougeL", "chrf", "embedding_similarity", "perplexity"):
        value = (metrics.get(model_id) or {}).get(metric)
        if value is None:
            continue
        gain = gains.get(metric)
        parts.append(f"{metric} {fmt(value)}" + ("" if gain is None else f" ({gain:+.1f}%)"))
    link = report_links(svc, view, lang)
    return (f"**{t(lang, 'eval.latest')}** `{view['id']}` ({when(view['finished_at'])}): " + ", ".join(parts)
            + (f"\n\n{link}" if link else ""))


def build(ctx) -> dict[str, Any]:
    """Lay out the evaluate page."""
    labels = ctx.labels
    labels.add(gr.Markdown(t("en", "eval.intro")), value="eval.intro")
    with gr.Row():
        base = labels.add(gr.Dropdown([], label=t("en", "eval.base"), elem_id="eval-base", scale=1),
                          label="eval.base")
        models = labels.add(gr.Dropdown([], multiselect=True, label=t("en", "eval.models"), elem_id="eval-models",
                                        scale=2), label="eval.models")
        data = labels.add(gr.Dropdown([], label=t("en", "eval.dataset"), elem_id="eval-dataset", scale=2),
                          label="eval.dataset")
    with gr.Row():
        max_new_tokens = labels.add(gr.Number(64, minimum=1, maximum=4096, precision=0, elem_id="eval-max-new-tokens",
                                              label=t("en", "eval.max_new_tokens")), label="eval.max_new_tokens")
        limit = labels.add(gr.Number(0, minimum=0, precision=0, label=t("en", "eval.limit"), elem_id="eval-limit"),
                           label="eval.limit")
        embeddings = labels.add(gr.Checkbox(True, label=t("en", "eval.embeddings"), elem_id="eval-embeddings"),
                                label="eval.embeddings")
        start = labels.add(gr.Button(t("en", "eval.start"), variant="primary", elem_id="eval-start"),
                           value="eval.start")
    started = gr.Markdown(elem_id="eval-started")
    with gr.Row():
        pick = labels.add(gr.Dropdown([], label=t("en", "eval.pick"), elem_id="eval-pick", scale=4),
                          label="eval.pick")
        refresh = labels.add(gr.Button(t("en", "common.refresh"), size="sm", scale=0, min_width=100,
                                       elem_id="eval-refresh"), value="common.refresh")
        cancel = labels.add(gr.Button(t("en", "eval.cancel"), variant="stop", size="sm", scale=0, min_width=100,
                                      elem_id="eval-cancel"), value="eval.cancel")
    status = gr.Markdown(elem_id="eval-status")
    table = labels.add(gr.Dataframe(pd.DataFrame(), label=t("en", "eval.table"), interactive=False,
                                    elem_id="eval-table", max_height=420), label="eval.table")
    links = gr.Markdown(elem_id="eval-links")
    with gr.Row():
        chart = labels.add(gr.Image(None, type="pil", label=t("en", "eval.chart"), interactive=False,
                                    elem_id="eval-chart"), label="eval.chart")
        histogram = labels.add(gr.Image(None, type="pil", label=t("en", "eval.histogram"), interactive=False,
                                        elem_id="eval-histogram"), label="eval.histogram")
    timer = gr.Timer(POLL_SECONDS, active=False)
    return {"base": base, "models": models, "data": data, "max_new_tokens": max_new_tokens, "limit": limit,
            "embeddings": embeddings, "start": start, "started": started, "pick": pick, "refresh": refresh,
            "cancel": cancel, "status": status, "table": table, "links": links, "chart": chart,
            "histogram": histogram, "timer": timer}


def connect(ctx) -> None:
    """Wire the form, the evaluation picker, polling while active, and refreshes on tab select / language."""
    p = ctx.pages["evaluate"]
    svc = ctx.svc
    lang = ctx.lang
    private = {"api_visibility": "private"}

    def options(base: str | None, chosen: list[str] | None, data: str | None, picked: str | None, language: str):
        bases = base_choices(svc)
        tuned = model_choices(svc)
        ids = {value for _, value in tuned}
        data_options = dataset_choices(svc, language)
        data_ids = [value for _, value in data_options]
        evals = evaluation_choices(svc)
        eval_ids = [value for _, value in evals]
        return (gr.Dropdown(choices=bases, value=base if base in bases else (bases[0] if bases else None)),
                gr.Dropdown(choices=tuned, value=[m for m in (chosen or []) if m in ids]),
                gr.Dropdown(choices=data_options, value=data if data in data_ids else (
                    data_ids[1] if len(data_ids) > 1 else HELDOUT)),
                gr.Dropdown(choices=evals, value=picked if picked in eval_ids else (eval_ids[0] if eval_ids else None)))

    def poll(evaluation_id: str | None, language: str):
        if not evaluation_id:
            return t(language, "eval.none"), pd.DataFrame(), "", None, None, gr.Timer(active=False)
        try:
            view = evaluations.get_evaluation(svc, evaluation_id)
            images = (chart_image(svc, view, "metrics.png"), chart_image(svc, view, "histogram.png"))
        except LoralabError as exc:
            return t(language, "common.error", message=exc.message), pd.DataFrame(), "", None, None, \
                gr.Timer(active=False)
        return (status_text(view, language), score_table(view, language), report_links(svc, view, language), *images,
                gr.Timer(active=view["status"] in ACTIVE))

    def begin(base: str | None, chosen: list[str] | None, data: str | None, max_new_tokens: float | None,
              limit: float | None, embeddings: bool, language: str):
        request = {"base_model": base or None, "model_ids": list(chosen or []),
                   "dataset_id": None if data in (None, "", HELDOUT) else data,
                   "max_new_tokens": int(max_new_tokens or 64), "limit": int(limit) if limit else None,
                   "embeddings": bool(embeddings), "report_language": language}
        try:
            view = evaluations.create_evaluation(svc, request)
        except LoralabError as exc:
            where = f" ({exc.param})" if exc.param else ""
            return t(language, "common.error", message=exc.message + where), gr.Dropdown()
        except ValueError as exc:  # pydantic: a field out of range
            return t(language, "common.error", message=str(exc)), gr.Dropdown()
        return t(language, "eval.started", id=view["id"]), gr.Dropdown(choices=evaluation_choices(svc),
                                                                        value=view["id"])

    def cancel(evaluation_id: str | None, language: str):
        if not evaluation_id:
            return t(language, "eval.none")
        try:
            evaluations.cancel_evaluation(svc, evaluation_id)
        except LoralabError as exc:
            return t(language, "common.error", message=exc.message)
        return t(language, "eval.cancelled", id=evaluation_id)

    view = [p["status"], p["table"], p["links"], p["chart"], p["histogram"], p["timer"]]
    form = [p["base"], p["models"], p["data"], p["pick"], lang]
    form_outputs = [p["base"], p["models"], p["data"], p["pick"]]
    p["start"].click(begin, inputs=[p["base"], p["models"], p["data"], p["max_new_tokens"], p["limit"],
                                    p["embeddings"], lang], outputs=[p["started"], p["pick"]], **private)
    p["pick"].change(poll, inputs=[p["pick"], lang], outputs=view, **private)
    p["timer"].tick(poll, inputs=[p["pick"], lang], outputs=view, show_progress="hidden", trigger_mode="always_last",
                    **private)
    p["cancel"].click(cancel, inputs=[p["pick"], lang], outputs=[p["started"]], **private).then(
        poll, inputs=[p["pick"], lang], outputs=view, **private)
    for trigger in (p["refresh"].click, ctx.tab_items["evaluate"].select):
        trigger(options, inputs=form, outputs=form_outputs, **private).then(
            poll, inputs=[p["pick"], lang], outputs=view, **private)
    ctx.on_language.append((options, form, form_outputs))
    ctx.on_language.append((poll, [p["pick"], lang], view))
