"""`loralab demo`: the embedded model's answers before and after a LoRA fine-tune on the 5-example sample."""
from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from loralab.spec import EMBEDDED_MODEL, DataSpec, GenerateSpec, LoraSpec, TrainSpec

DEMO_SAMPLE = "basic_qa"


def demo_spec(data_path: Path, epochs: float) -> TrainSpec:
    """Settings that teach 5 short facts to a 135M model in well under 30 s on 2 CPU cores."""
    return TrainSpec(
        base_model=EMBEDDED_MODEL, data=DataSpec(path=str(data_path)), method="lora",
        lora=LoraSpec(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        learning_rate=2e-3, num_train_epochs=epochs, per_device_train_batch_size=5,
        lr_scheduler_type="constant", max_seq_length=256, seed=42,
    )


def answer_all(model, tokenizer, questions: list[str]) -> list[str]:
    from loralab.engine.generate import generate

    settings = GenerateSpec(max_new_tokens=40, temperature=0.0)
    return [generate(model, tokenizer, messages=[{"role": "user", "content": q}], settings=settings).text.strip()
            for q in questions]


def run_demo(console, err, output: Path | None, epochs: float, fail, run_training) -> dict:
    from loralab.data import sample_path
    from loralab.data.formats import load_records
    from loralab.engine.models import ModelNotFoundError, load_for_inference, resolve_base_model
    from loralab.settings import get_settings

    data = sample_path(DEMO_SAMPLE)
    records = load_records(data).records
    questions = [r["messages"][-2]["content"] for r in records]
    expected = [r["messages"][-1]["content"] for r in records]
    err.print("preparing the embedded model (converted once from GGUF, then cached)...")
    try:
        resolve_base_model(EMBEDDED_MODEL)
        model, tokenizer = load_for_inference(EMBEDDED_MODEL)
    except ModelNotFoundError as exc:
        fail(str(exc))
    err.print("asking the base model...")
    before = answer_all(model, tokenizer, questions)
    del model
    output = output or get_settings().home / "demo" / time.strftime("%Y%m%d-%H%M%S")
    err.print(f"fine-tuning on {data.name} ({len(records)} examples)...")
    summary = run_training(demo_spec(data, epochs), output, quiet=True)
    tuned, tokenizer = load_for_inference(EMBEDDED_MODEL, adapter=str(output))
    after = answer_all(tuned, tokenizer, questions)

    table = Table(title="SmolLM2-135M-Instruct before and after LoRA", show_lines=True)
    table.add_column("question", style="bold")
    table.add_column("base model")
    table.add_column("fine-tuned", style="green")
    table.add_column("training answer", style="dim")
    for row in zip(questions, before, after, expected):
        table.add_row(*row)
    console.print(table)
    matched = sum(a.strip().lower() == e.strip().lower() for a, e in zip(after, expected))
    console.print(
        f"training: {summary['train_seconds']:.1f} s, {summary['real_tokens']:,} tokens, "
        f"{summary['tokens_per_s']:.1f} tokens/s, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
        f"peak memory {summary['peak_rss_mb']:.0f} MB\n"
        f"tuned answers equal to the training answer: {matched}/{len(expected)}\n"
        f"adapter: {Path(output).resolve()}\n"
        f"try it: loralab generate --adapter {Path(output).resolve()} --prompt \"{questions[0]}\""
    )
    return {"before": before, "after": after, "expected": expected, "summary": summary, "output": str(output)}
