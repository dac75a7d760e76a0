"""Evaluation end to end on the tiny model with a PEFT adapter; bad inputs; the judge against a fake server."""
from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loralab.engine import report
from loralab.engine.evaluate import EvalError, evaluate, load_examples, split_text_row
from loralab.engine.metrics import EXAMPLE_METRICS, JudgeConfig, aggregate, difference, improvement

ROWS = [
    {"messages": [{"role": "user", "content": "日本の首都はどこですか？"}, {"role": "assistant", "content": "東京です。"}]},
    {"messages": [{"role": "system", "content": "簡潔に答えてください。"},
                  {"role": "user", "content": "LoRAとは何ですか？"},
                  {"role": "assistant", "content": "低ランク行列を凍結した重みに加える手法です。"}]},
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "富士山の高さは？"}, {"role": "assistant", "content": "3776メートルです。"}]},
]
TEXT_ROWS = [{"text": "質問: 富士山の高さは？\n回答: 3776メートルです。"}, {"text": "Question: 2+2?\nAnswer: 4"},
             {"text": "質問: 日本の首都は？\n回答: 東京です。"}]
AGGREGATES = ("bleu", "corpus_bleu", "chrf", "corpus_chrf", "rouge1", "rouge2", "rougeL", "exact_match",
              "normalized_match", "embedding_similarity", "mean_loss", "perplexity", "answer_chars",
              "answer_tokens", "judge_score")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_adapter(base_dir: Path, target: Path, data_path: str = "train.jsonl", base_name: str | None = None) -> Path:
    """A random (non-identity) LoRA adapter saved by PEFT, with a run-directory spec.json next to it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.spec import DataSpec, TrainSpec

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(target)
    spec = TrainSpec(base_model=base_name or str(base_dir), data=DataSpec(path=data_path))
    (target / "spec.json").write_text(spec.model_dump_json(indent=2))
    return target


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("run") / "tuned")


class FakeJudge(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /chat/completions that grades by whether the answer is non-empty."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        content = json.dumps({"score": 3, "reason": "部分的に正しい"}, ensure_ascii=False)
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_judge():
    FakeJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_end_to_end_with_adapter_and_judge(tiny_model_dir, adapter_dir, tmp_path, fake_judge, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", ROWS)
    events = []
    summary = evaluate(str(tiny_model_dir), [str(adapter_dir)], data, tmp_path / "out", max_new_tokens=8,
                       judge=JudgeConfig(url=fake_judge, model="judge-1", api_key="sk-test"), progress=events.append)
    out = tmp_path / "out"
    for name in ("results.csv", "summary.json", "report.md", "report.html", "metrics.png", "histogram.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert capsys.readouterr().out == ""

    with open(out / "results.csv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(ROWS) * 2
    assert {r["model"] for r in rows} == {"base", "tuned"}
    assert [r["id"] for r in rows[:4]] == ["1", "2", "3", "4"]
    assert rows[3]["reference"] == "3776メートルです。" and rows[3]["prompt"] == "富士山の高さは？"
    assert rows[1]["prompt"].startswith("[system] 簡潔に答えてください。")
    assert set(EXAMPLE_METRICS) <= set(rows[0])

    saved = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert saved["models"] == ["base", "tuned"] and saved["data"]["num_examples"] == 4
    for model in ("base", "tuned"):
        for metric in AGGREGATES:
            assert saved["metrics"][model][metric] is not None, (model, metric)
    assert saved["metrics"]["base"]["judge_score"] == 3.0
    assert set(saved["improvement_pct"]["tuned"]) >= {"bleu", "chrf", "rougeL", "perplexity"}
    # a random LoRA changes the model: the loss of the references differs from the base
    assert saved["metrics"]["base"]["mean_loss"] != pytest.approx(saved["metrics"]["tuned"]["mean_loss"])
    assert saved["tokenization"]["languages"] == {"ja": 3, "other": 1}
    assert "ja" in saved["tokenization"] and saved["warnings"] == []
    assert saved["judge"]["enabled"] and saved["judge"]["graded"] == 8

    assert len(FakeJudge.requests) == 8
    first = FakeJudge.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-1" and "東京です。" in first["body"]["messages"][-1]["content"]

    html = (out / "report.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in html and "data:image/png;base64," in html
    assert "<script" not in html and "http://" not in html.replace(fake_judge, "") and "https://" not in html
    assert "東京です。" in html and "Most improved" in html
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "metrics.png" in md and "| bleu |" in md and "tuned vs base" in md
    stages = {e["stage"] for e in events}
    assert {"load", "generate", "score", "judge", "report", "done"} <= stages
    gen = [e for e in events if e["stage"] == "generate"]
    assert gen[-1] == {"stage": "generate", "model": "tuned", "done": 4, "total": 4}


def test_base_only_text_rows_without_judge(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("LORALAB_JUDGE_URL", raising=False)
    monkeypatch.delenv("LORALAB_JUDGE_MODEL", raising=False)
    data = write_jsonl(tmp_path / "eval.jsonl", TEXT_ROWS)
    summary = evaluate(str(tiny_model_dir), [], data, tmp_path / "out", max_new_tokens=4, limit=2)
    assert summary["models"] == ["base"] and summary["data"]["num_examples"] == 2
    assert summary["data"]["format"] == "text" and summary["tokenization"]["languages"] == {"ja": 1, "other": 1}
    with open(tmp_path / "out" / "results.csv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["reference"] for r in rows] == ["3776メートルです。", "4"]
    assert rows[0]["prompt"] == "質問: 富士山の高さは？\n回答:" and float(rows[0]["loss"]) > 0
    assert summary["judge"]["enabled"] is False and "LORALAB_JUDGE_URL" in summary["judge"]["note"]
    assert summary["metrics"]["base"]["judge_score"] is None
    assert (tmp_path / "out" / "report.html").is_file()


def test_judge_from_settings_and_failures(tiny_model_dir, tmp_path, monkeypatch, fake_judge):
    data = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    monkeypatch.setenv("LORALAB_JUDGE_URL", fake_judge)
    monkeypatch.setenv("LORALAB_JUDGE_MODEL", "judge-2")
    summary = evaluate(str(tiny_model_dir), [], data, tmp_path / "a", max_new_tokens=2)
    assert summary["judge"]["graded"] == 2 and FakeJudge.requests[0]["body"]["model"] == "judge-2"
    assert FakeJudge.requests[0]["auth"] is None
    # nothing listens on port 9 of 127.0.0.1: errors are counted, the evaluation still finishes
    monkeypatch.setenv("LORALAB_JUDGE_URL", "http://127.0.0.1:9/v1")
    summary = evaluate(str(tiny_model_dir), [], data, tmp_path / "b", max_new_tokens=2)
    assert summary["judge"]["errors"] == 2 and "unreachable" in summary["judge"]["note"]
    assert summary["metrics"]["base"]["judge_score"] is None


def test_heldout_split_used_and_training_data_warned(tiny_model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run = make_adapter(tiny_model_dir, tmp_path / "run", data_path=str(train))
    write_jsonl(run / "validation.jsonl", ROWS[:2])
    summary = evaluate(str(tiny_model_dir), [str(run)], None, tmp_path / "held", max_new_tokens=2, judge=False)
    assert summary["data"]["path"] == str(run / "validation.jsonl") and summary["data"]["num_examples"] == 2
    assert summary["warnings"] == []

    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(train.read_bytes())  # same content elsewhere: caught by sha256
    for data in (train, copy):
        summary = evaluate(str(tiny_model_dir), [str(run)], data, tmp_path / "mem", max_new_tokens=2, limit=1,
                           judge=False)
        assert len(summary["warnings"]) == 1 and "training data" in summary["warnings"][0]
        assert "validation.jsonl" in summary["warnings"][0]
        assert "training data" in capsys.readouterr().err


def test_split_text_row():
    assert split_text_row("質問: 日本の首都は？\n回答: 東京です。", 1) == ("質問: 日本の首都は？\n回答:", " 東京です。")
    assert split_text_row("Question: 2+2?\nAnswer: 4", 1) == ("Question: 2+2?\nAnswer:", " 4")
    assert split_text_row("質問：高い山は？\n回答：富士山", 1)[1] == "富士山"


@pytest.mark.parametrize("rows,expected", [
    ([ROWS[0], {"messages": [{"role": "user", "content": "こんにちは"}]}], "no reference answer(.|\n)*line 2"),
    ([{"instruction": "Say hi"}, {"instruction": "Say bye"}], "reference answer"),
    ([{"text": "質問: A\n回答: B"}, {"text": "ただの文章です。"}], "line 2"),
    ([{"text": "質問: A\n回答:   "}], "empty answer"),
])
def test_unscorable_rows_raise(tmp_path, rows, expected):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(EvalError, match=expected):
        load_examples(data)


def test_empty_and_missing_files_raise(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EvalError, match="is empty"):
        evaluate(str(tiny_model_dir), [], empty, tmp_path / "out")
    with pytest.raises(EvalError, match="not found"):
        evaluate(str(tiny_model_dir), [], tmp_path / "nope.jsonl", tmp_path / "out")
    with pytest.raises(EvalError, match="no evaluation data"):
        evaluate(str(tiny_model_dir), [], None, tmp_path / "out")


def test_adapter_for_another_base_raises(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", ROWS)
    other = make_adapter(tiny_model_dir, tmp_path / "other", base_name="/models/other-base")
    cfg_path = other / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "/models/other-base"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EvalError) as info:
        evaluate(str(tiny_model_dir), [str(other)], data, tmp_path / "out")
    message = str(info.value)
    assert "/models/other-base" in message and str(tiny_model_dir) in message
    with pytest.raises(EvalError, match="adapter_config.json|does not exist"):
        evaluate(str(tiny_model_dir), [str(tmp_path)], data, tmp_path / "out")


def _synthetic(models: list[str]) -> tuple[dict, list[dict]]:
    results = []
    for k, model in enumerate(models):
        for i in range(1, 6):
            results.append({"id": i, "model": model, "language": "ja", "prompt": f"質問{i}", "reference": "東京です。",
                            "answer": "東京です。" if (i + k) % 2 else "大阪です。", "chrf": 20.0 * i * (k + 1) % 100,
                            "rougeL": 0.1 * i, "embedding_similarity": 0.5, "bleu": 10.0 + k, "loss": 1.0 + i / (k + 1),
                            "reference_tokens": 3, "answer_chars": 5, "answer_tokens": 3})
    metrics = {m: aggregate([r for r in results if r["model"] == m]) for m in models}
    summary = {
        "base_model": "tiny", "adapters": [{"name": m, "path": f"/runs/{m}"} for m in models[1:]], "models": models,
        "data": {"path": "eval.jsonl", "source": "given", "format": "chat", "num_examples": 5},
        "settings": {"max_new_tokens": 8, "seed": 0}, "metrics": metrics,
        "improvement_pct": {m: improvement(metrics[models[0]], metrics[m]) for m in models[1:]},
        "delta": {m: difference(metrics[models[0]], metrics[m]) for m in models[1:]},
        "tokenization": {"ja": "fugashi", "other": "13a", "languages": {"ja": 5}},
        "embedding_model": "minilm", "judge": {"enabled": False, "note": "off"}, "warnings": ["注意 <b>"],
    }
    return summary, results


@pytest.mark.parametrize("font", ["real", None])
def test_reports_render_japanese_with_or_without_a_cjk_font(tmp_path, monkeypatch, font):
    if font is None:
        monkeypatch.setattr(report, "cjk_font", lambda: None)
    summary, results = _synthetic(["base", "日本語チューニング"])
    files = report.write_reports(tmp_path, summary, results, lang="ja")
    assert set(files) == {"results", "summary", "markdown", "html", "html_en", "html_ja", "metrics_chart",
                          "histogram_chart"}
    for name in files.values():
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "日本語チューニング vs base" in html and "注意 &lt;b&gt;" in html
    # report.html is in the asked language (Japanese headings); both languages are written alongside
    assert html == (tmp_path / "report.ja.html").read_text(encoding="utf-8") and "評価レポート" in html
    english = (tmp_path / "report.en.html").read_text(encoding="utf-8")
    assert "Evaluation report" in english and "評価レポート" not in english and '<html lang="en">' in english
    assert "# 評価レポート" in (tmp_path / "report.md").read_text(encoding="utf-8")
    if font is None:  # charts could not draw the name: it is replaced and explained
        assert summary["chart_labels"] == {"model 1": "日本語チューニング"}
        assert "model 1 = 日本語チューニング" in html
    saved = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert saved["files"] == files and saved["improvement_pct"]["日本語チューニング"]["bleu"] == pytest.approx(10.0)
    best, worst = report.pick_examples(results, "base", "日本語チューニング", k=2)
    assert len(best) == 2 and len(worst) == 2 and not set(id(p) for p in best) & set(id(p) for p in worst)


@pytest.mark.model
def test_embedded_model_three_rows(tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", ROWS[:3])
    summary = evaluate("smollm2-135m-instruct", [], data, tmp_path / "out", max_new_tokens=16, judge=False)
    base = summary["metrics"]["base"]
    assert base["num_examples"] == 3 and base["answer_tokens"] > 0
    assert 1.0 < base["perplexity"] < 1e6
    assert (tmp_path / "out" / "report.html").is_file()
