"""Evaluation reports: results.csv, summary.json, report.md and a self-contained report.html with charts."""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import warnings
from pathlib import Path

from loralab.engine.metrics import EXAMPLE_METRICS

CSV_COLUMNS = ["id", "model", "language", "prompt", "reference", "answer", *EXAMPLE_METRICS, "reference_tokens",
               "finish_reason", "judge_reason"]
TABLE_METRICS = ["bleu", "corpus_bleu", "chrf", "corpus_chrf", "rouge1", "rouge2", "rougeL", "exact_match",
                 "normalized_match", "embedding_similarity", "judge_score", "mean_loss", "perplexity",
                 "answer_chars", "answer_tokens"]
CHART_METRICS = ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "normalized_match",
                 "embedding_similarity", "judge_score", "perplexity", "answer_chars", "answer_tokens"]
HISTOGRAM_METRICS = ["chrf", "rougeL", "embedding_similarity"]
PRIMARY_METRIC = "chrf"  # character-based, so comparable across Japanese and English rows
_RANK_BY = (PRIMARY_METRIC, "embedding_similarity", "rougeL")  # ties on chrF are broken by meaning, then words
CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans JP", "Noto Serif CJK JP", "IPAexGothic", "IPAGothic", "IPAPGothic",
             "TakaoGothic", "VL Gothic", "Source Han Sans JP", "Hiragino Sans", "Yu Gothic", "Meiryo",
             "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback", "Unifont")
HTML_FONTS = ('system-ui, -apple-system, "Segoe UI", "Hiragino Sans", "Hiragino Kaku Gothic ProN", '
              '"Noto Sans CJK JP", "Noto Sans JP", "Yu Gothic", Meiryo, sans-serif')
N_EXAMPLES = 3
# Report text in English and Japanese: key -> (en, ja); placeholders use str.format names.
TEXT = {
    "title": ("Evaluation report", "評価レポート"),
    "base_model": ("Base model", "ベースモデル"),
    "adapter": ("Adapter", "アダプター"),
    "data": ("Data", "データ"),
    "data_detail": ("{source}, format {format}, {n} examples", "{source}、形式 {format}、{n} 件"),
    "decoding": ("Decoding: greedy, max_new_tokens={max_new_tokens}, seed={seed}",
                 "デコード: 貪欲法、max_new_tokens={max_new_tokens}、seed={seed}"),
    "scores": ("Scores", "スコア"),
    "metric": ("metric", "指標"),
    "vs_base": ("{name} vs base", "{name} vs base"),
    "scale": ("BLEU and chrF are 0-100; ROUGE, matches and embedding similarity 0-1; judge 1-5; improvement is "
              "positive when better (lower loss/perplexity is better).",
              "BLEU と chrF は 0〜100、ROUGE・一致率・埋め込み類似度は 0〜1、ジャッジは 1〜5。改善率は良くなったときに正"
              "（損失・パープレキシティは低いほど良い）。"),
    "mean_scores": ("Mean scores", "平均スコア"),
    "per_example": ("Per-example scores", "例ごとのスコア"),
    "chart_labels": ("In the charts", "グラフ内の表記"),
    "improved": ("Most improved: {name} vs base", "最も改善した例: {name} vs base"),
    "worsened": ("Most worsened: {name} vs base", "最も悪化した例: {name} vs base"),
    "best": ("Best answers (base)", "良かった回答（base）"),
    "example": ("Example {id}", "例 {id}"),
    "prompt": ("Prompt", "質問"),
    "reference": ("Reference", "参照回答"),
    "empty": ("(empty)", "（空）"),
    "notes": ("Notes", "補足"),
    "tokenisation": ("Tokenisation: Japanese = {ja}; other = {other}; languages: {languages}",
                     "トークン化: 日本語 = {ja}、その他 = {other}、言語: {languages}"),
    "embedding": ("Embedding model: {note}", "埋め込みモデル: {note}"),
    "judge": ("Judge: {note}", "ジャッジ: {note}"),
    "warning": ("Warning: {message}", "警告: {message}"),
    "alt_metrics": ("mean score per model and metric", "モデル・指標ごとの平均スコア"),
    "alt_hist": ("per-example histograms", "例ごとのスコアのヒストグラム"),
}
REPORT_LANGUAGES = ("en", "ja")


def tr(lang: str, key: str, **values) -> str:
    """Report text `key` in `lang` ('en' or 'ja')."""
    en, ja = TEXT[key]
    text = ja if lang == "ja" else en
    return text.format(**values) if values else text


_CJK_FILE_HINTS = ("cjk", "notosansjp", "notoserifjp", "ipag", "ipam", "ipaex", "takao", "vl-gothic", "vl-pgothic",
                   "sourcehansans", "droidsansfallback", "wqy")


def cjk_font() -> str | None:
    """Name of an installed font that draws Japanese, or None; fonts installed after matplotlib's cache are added."""
    from matplotlib import font_manager

    def known() -> str | None:
        installed = {f.name for f in font_manager.fontManager.ttflist}
        return next((name for name in CJK_FONTS if name in installed), None)

    found = known()
    if found is None:  # matplotlib's font cache predates e.g. `apt-get install fonts-noto-cjk`
        for path in font_manager.findSystemFonts():
            if any(hint in Path(path).name.lower().replace("_", "") for hint in _CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        found = known()
    return found


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def write_csv(path: Path, results: list[dict]) -> None:
    """One row per example and model; UTF-8 with BOM so Excel shows Japanese correctly."""
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def _labels(models: list[str], font: str | None) -> list[str]:
    """Model names for the charts; without a CJK font, non-Latin names become 'model N'."""
    if font:
        return models
    return [m if all(ord(c) < 0x2E80 for c in m) else f"model {i}" for i, m in enumerate(models)]


def write_charts(out_dir: Path, summary: dict, results: list[dict]) -> tuple[dict[str, str], dict[str, str]]:
    """Per-metric bar chart and per-example histograms as PNG (matplotlib, Agg); returns (files, renamed labels)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    font = cjk_font()
    rc = {"font.family": [font, "DejaVu Sans"]} if font else {}
    models = summary["models"]
    labels = _labels(models, font)
    colors = [f"C{i % 10}" for i in range(len(models))]
    files = {}
    metrics = [m for m in CHART_METRICS if any(summary["metrics"][n].get(m) is not None for n in models)]
    with matplotlib.rc_context(rc), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing-glyph warnings when no CJK font exists
        cols = 4
        rows = max(1, math.ceil(len(metrics) / cols))
        fig = Figure(figsize=(3.2 * cols, 2.6 * rows + 0.6), dpi=100)
        for k, metric in enumerate(metrics):
            ax = fig.add_subplot(rows, cols, k + 1)
            values = [summary["metrics"][n].get(metric) or 0.0 for n in models]
            bars = ax.bar(range(len(models)), values, color=colors)
            ax.set_title(metric + (" (lower = better)" if metric == "perplexity" else ""), fontsize=10)
            ax.set_xticks(range(len(models)), labels, fontsize=8, rotation=20 if len(models) > 2 else 0)
            ax.bar_label(bars, labels=[_fmt(v, 2) for v in values], fontsize=7)
            ax.margins(y=0.2)
            ax.set_ylim(bottom=0 if min(values) >= 0 else None, top=None if max(values) > 0 else 1.0)
        fig.suptitle("Mean per model", fontsize=11)
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png")
        files["metrics_chart"] = "metrics.png"

        hist_metrics = [m for m in HISTOGRAM_METRICS if any(r.get(m) is not None for r in results)]
        fig = Figure(figsize=(4.2 * len(hist_metrics), 3.2), dpi=100)
        for k, metric in enumerate(hist_metrics):
            ax = fig.add_subplot(1, len(hist_metrics), k + 1)
            top = 100.0 if metric in ("chrf", "bleu") else 1.0
            low = min([0.0] + [r[metric] for r in results if r.get(metric) is not None])
            values = [[r[metric] for r in results if r["model"] == name and r.get(metric) is not None]
                      for name in models]
            ax.hist(values, bins=10, range=(low, top), label=labels, color=colors)
            ax.set_title(f"{metric} per example", fontsize=10)
            ax.set_ylabel("examples", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "histogram.png")
        files["histogram_chart"] = "histogram.png"
    return files, {label: name for label, name in zip(labels, models) if label != name}


def pick_examples(results: list[dict], base: str, tuned: str | None, k: int = N_EXAMPLES) -> tuple[list, list]:
    """(best, worst) examples as (base row, tuned row) pairs by the change in the primary metric."""
    by_model: dict[str, dict] = {}
    for row in results:
        by_model.setdefault(row["model"], {})[row["id"]] = row
    base_rows = by_model.get(base, {})
    if tuned is None:
        ranked = sorted(base_rows.values(), key=lambda r: tuple(r.get(m) or 0.0 for m in _RANK_BY), reverse=True)
        pairs = [(r, None) for r in ranked]
    else:
        tuned_rows = by_model.get(tuned, {})
        pairs = [(base_rows[i], tuned_rows[i]) for i in base_rows if i in tuned_rows]
        pairs.sort(key=lambda p: tuple((p[1].get(m) or 0.0) - (p[0].get(m) or 0.0) for m in _RANK_BY), reverse=True)
    best = pairs[:k]
    worst = [p for p in reversed(pairs[-k:]) if p not in best] if len(pairs) > k else []
    return best, worst


def _aggregate_rows(summary: dict) -> list[list[str]]:
    models = summary["models"]
    rows = []
    for metric in TABLE_METRICS:
        values = [summary["metrics"][n].get(metric) for n in models]
        if all(v is None for v in values):
            continue
        gains = []
        for n in models[1:]:
            pct = summary["improvement_pct"].get(n, {}).get(metric)
            delta = summary.get("delta", {}).get(n, {}).get(metric)
            gains.append(f"{pct:+.1f}%" if pct is not None else ("-" if delta is None else f"{delta:+.3g} (abs)"))
        rows.append([metric, *[_fmt(v) for v in values], *gains])
    return rows


def _header(summary: dict, lang: str = "en") -> list[str]:
    models = summary["models"]
    return [tr(lang, "metric"), *models, *[tr(lang, "vs_base", name=n) for n in models[1:]]]


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def _quote(text: str, lang: str = "en") -> str:
    empty = tr(lang, "empty")
    return "\n".join("> " + line for line in (str(text) or empty).splitlines() or [empty])


def shown_path(path: str, display_root: Path | str | None) -> str:
    """A path as a report shows it: relative to `display_root` (written LORALAB_HOME), never the server's own path."""
    if not display_root:
        return str(path)
    root = str(display_root).rstrip("/")
    text = str(path)
    if text == root or text.startswith(root + "/"):
        return "LORALAB_HOME" + text[len(root):]
    if Path(text).is_absolute():
        return Path(text).name  # outside the root: only the name
    return text


def _default_root() -> str | None:
    return os.environ.get("LORALAB_HOME") or None


def render_markdown(summary: dict, results: list[dict], files: dict[str, str], lang: str = "en",
                    display_root: Path | str | None = None) -> str:
    """report.md: settings, aggregate table with improvement %, charts, best/worst examples, notes."""
    models = summary["models"]
    data = summary["data"]
    header = _header(summary, lang)
    out = [f"# {tr(lang, 'title')}", "",
           f"- {tr(lang, 'base_model')}: `{shown_path(summary['base_model'], display_root)}`",
           *[f"- {tr(lang, 'adapter')} `{a['name']}`: `{shown_path(a['path'], display_root)}`"
             for a in summary["adapters"]],
           f"- {tr(lang, 'data')}: `{shown_path(data['path'], display_root)}` ("
           + tr(lang, "data_detail", source=data["source"], format=data["format"], n=data["num_examples"]) + ")",
           "- " + tr(lang, "decoding", max_new_tokens=summary["settings"]["max_new_tokens"],
                     seed=summary["settings"]["seed"]),
           "", f"## {tr(lang, 'scores')}", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in _aggregate_rows(summary)]
    out += ["", tr(lang, "scale"), ""]
    for key, title in (("metrics_chart", "mean_scores"), ("histogram_chart", "per_example")):
        if key in files:
            out += [f"![{tr(lang, title)}]({files[key]})", ""]
    if summary.get("chart_labels"):
        out += [tr(lang, "chart_labels") + ": " + "; ".join(f"{k} = {v}" for k, v in summary["chart_labels"].items()),
                ""]
    for tuned in models[1:] or [None]:
        best, worst = pick_examples(results, models[0], tuned)
        sections = ((tr(lang, "improved", name=tuned), best), (tr(lang, "worsened", name=tuned), worst)) if tuned \
            else ((tr(lang, "best"), best),)
        for title, pairs in sections:
            if not pairs:
                continue
            out += [f"## {title}", ""]
            for base_row, tuned_row in pairs:
                out += [f"### {tr(lang, 'example', id=base_row['id'])}", "", f"**{tr(lang, 'prompt')}**", "",
                        _quote(base_row["prompt"], lang), "", f"**{tr(lang, 'reference')}**", "",
                        _quote(base_row["reference"], lang), "",
                        f"**base** ({PRIMARY_METRIC} {_fmt(base_row.get(PRIMARY_METRIC), 1)})", "",
                        _quote(base_row["answer"], lang), ""]
                if tuned_row:
                    out += [f"**{tuned}** ({PRIMARY_METRIC} {_fmt(tuned_row.get(PRIMARY_METRIC), 1)})", "",
                            _quote(tuned_row["answer"], lang), ""]
    tok = summary["tokenization"]
    out += [f"## {tr(lang, 'notes')}", "",
            "- " + tr(lang, "tokenisation", ja=tok["ja"], other=tok["other"], languages=tok["languages"]),
            "- " + tr(lang, "embedding", note=summary["embedding_model"]),
            "- " + tr(lang, "judge", note=summary["judge"].get("note", ""))]
    out += ["- " + tr(lang, "warning", message=w) for w in summary["warnings"]]
    return "\n".join(out) + "\n"


_CSS = f"""
body {{ font-family: {HTML_FONTS}; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .35rem .6rem; text-align: right; vertical-align: top; }}
th:first-child, td:first-child {{ text-align: left; }}
.better {{ color: #0a7d28; }} .worse {{ color: #b3261e; }}
.warn {{ background: #fff4ce; border-left: 4px solid #e0a800; padding: .5rem 1rem; }}
.pair {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: .8rem; }}
.pair div {{ border: 1px solid #ddd; border-radius: 6px; padding: .6rem; white-space: pre-wrap; }}
.pair h4 {{ margin: 0 0 .4rem; font-size: .9rem; color: #555; }}
.example {{ margin: 1.2rem 0; padding-top: .6rem; border-top: 1px solid #eee; }}
img {{ max-width: 100%; }}
"""


def _img(out_dir: Path, name: str, alt: str) -> str:
    data = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(text: str) -> str:
    if text.endswith("%") and text[0] in "+-":
        return f'<td class="{"better" if text[0] == "+" else "worse"}">{html.escape(text)}</td>'
    return f"<td>{html.escape(text)}</td>"


def _html_pair(base_row: dict, tuned_row: dict | None, tuned: str | None, lang: str = "en") -> str:
    e = html.escape
    boxes = [(tr(lang, "prompt"), base_row["prompt"]), (tr(lang, "reference"), base_row["reference"]),
             (f"base ({PRIMARY_METRIC} {_fmt(base_row.get(PRIMARY_METRIC), 1)})", base_row["answer"])]
    if tuned_row is not None:
        boxes.append((f"{tuned} ({PRIMARY_METRIC} {_fmt(tuned_row.get(PRIMARY_METRIC), 1)})", tuned_row["answer"]))
    empty = f"<em>{e(tr(lang, 'empty'))}</em>"
    inner = "".join(f"<div><h4>{e(t)}</h4>{e(str(v)) or empty}</div>" for t, v in boxes)
    title = f"<strong>{e(tr(lang, 'example', id=base_row['id']))}</strong>"
    return f'<div class="example">{title}<div class="pair">{inner}</div></div>'


def render_html(out_dir: Path, summary: dict, results: list[dict], files: dict[str, str], lang: str = "en",
                display_root: Path | str | None = None) -> str:
    """report.html: self-contained (inline CSS, charts as base64 PNG, no external fonts or scripts)."""
    e = html.escape
    models = summary["models"]
    data = summary["data"]
    head = "".join(f"<th>{e(h)}</th>" for h in _header(summary, lang))
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in _aggregate_rows(summary))
    detail = tr(lang, "data_detail", source=data["source"], format=data["format"], n=data["num_examples"])
    parts = [
        "<!DOCTYPE html>", f'<html lang="{"ja" if lang == "ja" else "en"}"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>loralab: {e(tr(lang, 'title'))}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(tr(lang, 'title'))}</h1>", "<ul>",
        f"<li>{e(tr(lang, 'base_model'))}: <code>{e(shown_path(summary['base_model'], display_root))}</code></li>",
        *[f"<li>{e(tr(lang, 'adapter'))} <code>{e(a['name'])}</code>: "
          f"<code>{e(shown_path(a['path'], display_root))}</code></li>" for a in summary["adapters"]],
        f"<li>{e(tr(lang, 'data'))}: <code>{e(shown_path(data['path'], display_root))}</code> ({e(detail)})</li>",
        "<li>" + e(tr(lang, "decoding", max_new_tokens=summary["settings"]["max_new_tokens"],
                      seed=summary["settings"]["seed"])) + "</li></ul>",
        *[f'<p class="warn">{e(tr(lang, "warning", message=w))}</p>' for w in summary["warnings"]],
        f"<h2>{e(tr(lang, 'scores'))}</h2>", f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        f"<p>{e(tr(lang, 'scale'))}</p>",
    ]
    if "metrics_chart" in files:
        parts += [f"<h2>{e(tr(lang, 'mean_scores'))}</h2>",
                  _img(out_dir, files["metrics_chart"], tr(lang, "alt_metrics"))]
    if "histogram_chart" in files:
        parts += [f"<h2>{e(tr(lang, 'per_example'))}</h2>",
                  _img(out_dir, files["histogram_chart"], tr(lang, "alt_hist"))]
    if summary.get("chart_labels"):
        parts.append(f"<p>{e(tr(lang, 'chart_labels'))}: "
                     + "; ".join(f"{e(k)} = {e(v)}" for k, v in summary["chart_labels"].items()) + "</p>")
    for tuned in models[1:] or [None]:
        best, worst = pick_examples(results, models[0], tuned)
        sections = ((tr(lang, "improved", name=tuned), best), (tr(lang, "worsened", name=tuned), worst)) if tuned \
            else ((tr(lang, "best"), best),)
        for title, pairs in sections:
            if pairs:
                parts += [f"<h2>{e(title)}</h2>", *[_html_pair(b, t, tuned, lang) for b, t in pairs]]
    tok = summary["tokenization"]
    languages = json.dumps(tok["languages"], ensure_ascii=False)
    parts += [f"<h2>{e(tr(lang, 'notes'))}</h2><ul>",
              f"<li>{e(tr(lang, 'tokenisation', ja=tok['ja'], other=tok['other'], languages=languages))}</li>",
              f"<li>{e(tr(lang, 'embedding', note=summary['embedding_model']))}</li>",
              f"<li>{e(tr(lang, 'judge', note=summary['judge'].get('note', '')))}</li></ul>",
              "</body></html>"]
    return "\n".join(parts) + "\n"


def write_reports(out_dir: Path, summary: dict, results: list[dict], lang: str = "en",
                  display_root: Path | str | None = None) -> dict[str, str]:
    """Write every report file into out_dir; returns {kind: file name} (also stored in summary['files']).

    report.html and report.md are in `lang`; report.en.html and report.ja.html hold both languages. Paths are
    shown relative to `display_root` (default: LORALAB_HOME), so a shared report does not reveal server paths.
    """
    display_root = display_root or _default_root()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lang = lang if lang in REPORT_LANGUAGES else "en"
    files = {"results": "results.csv", "summary": "summary.json", "markdown": "report.md", "html": "report.html",
             "html_en": "report.en.html", "html_ja": "report.ja.html"}
    write_csv(out_dir / files["results"], results)
    try:
        charts, renamed = write_charts(out_dir, summary, results)
        files.update(charts)
        if renamed:
            summary["chart_labels"] = renamed
    except ImportError as exc:  # matplotlib missing: reports without charts
        summary["warnings"].append(f"charts skipped: {exc} (pip install matplotlib)")
    summary["files"] = files
    summary["report_language"] = lang
    (out_dir / files["summary"]).write_text(json.dumps(summary, ensure_ascii=False, indent=2, default=str),
                                            encoding="utf-8")
    (out_dir / files["markdown"]).write_text(render_markdown(summary, results, files, lang, display_root),
                                             encoding="utf-8")
    pages = {code: render_html(out_dir, summary, results, files, code, display_root) for code in REPORT_LANGUAGES}
    for code, page in pages.items():
        (out_dir / files[f"html_{code}"]).write_text(page, encoding="utf-8")
    (out_dir / files["html"]).write_text(pages[lang], encoding="utf-8")
    return files
