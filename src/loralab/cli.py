"""The `loralab` command line: train, generate, validate data, demo, export, evaluate, learn, serve."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from loralab.spec import EMBEDDED_MODEL, GenerateSpec, TrainSpec, apply_overrides

app = typer.Typer(
    help="loralab: fine-tune open LLMs with LoRA, from a dataset to an evaluated, exported, served model.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
data_app = typer.Typer(help="Inspect and validate dataset files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    """Print a user-facing error (no traceback) and exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _spec_errors(exc) -> str:
    lines = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = "unknown setting (check the spelling; see `loralab train --help`)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{where}: {msg}")
    return "invalid training settings:\n  " + "\n  ".join(lines)


def build_train_spec(config: Optional[Path], flags: dict, sets: list[str]) -> TrainSpec:
    """Merge a YAML config, command-line flags and --set overrides into one validated TrainSpec."""
    import yaml
    from pydantic import ValidationError

    raw: dict = {}
    if config is not None:
        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            fail(f"cannot read config {config}: {exc.strerror}")
        except yaml.YAMLError as exc:
            fail(f"{config} is not valid YAML: {exc}")
        if not isinstance(raw, dict):
            fail(f"{config} must hold a mapping of settings, not {type(raw).__name__}")
    for key, value in flags.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        raw = apply_overrides(raw, sets)
        return TrainSpec.model_validate(raw)
    except ValidationError as exc:
        fail(_spec_errors(exc))
    except ValueError as exc:
        fail(str(exc))


class TrainProgress:
    """Renders engine events as a rich progress bar with loss and speed."""

    def __init__(self, quiet: bool = False):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err, transient=False,
        )
        self.task = None

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "started":
            if not self.quiet:
                err.print(f"{event['num_examples']} examples, {event['trainable_params']:,} trainable parameters, "
                          f"{event['device']} {event['dtype']}, {event['threads']} threads")
            self.progress.start()
            self.task = self.progress.add_task("train", total=event["total_steps"], completed=event["resumed_from_step"],
                                               info="")
        elif kind == "step" and self.task is not None:
            info = f"loss {event['loss']:.4f}  {event['tokens_per_s'] or 0:.0f} tok/s"
            self.progress.update(self.task, completed=event["step"], total=event["total_steps"], info=info)
        elif kind == "log" and not self.quiet:
            err.print(f"[yellow]{event['level']}:[/] {event['message']}")
        elif kind in ("done", "cancelled", "error"):
            self.progress.stop()


def run_training(spec: TrainSpec, output: Path, quiet: bool = False) -> dict:
    """Train in this process with a progress bar; exits with the engine's code on failure or cancel."""
    from loralab.engine.events import read_events
    from loralab.engine.run import EXIT_CANCELLED, EXIT_OK, execute, quiet_libraries

    quiet_libraries()

    from loralab.engine.distributed import check_runtime, launch, uses_torchrun

    problems = check_runtime(spec)
    if problems:
        fail(f"{problems[0].message} ({problems[0].param})" if problems[0].param else problems[0].message)
    output.mkdir(parents=True, exist_ok=True)
    (output / "spec.json").write_text(spec.model_dump_json(indent=2))
    if uses_torchrun(spec):
        err.print(f"launching {spec.distributed.nproc_per_node} processes per node with torchrun "
                  f"({spec.distributed.strategy})")
        code = launch(spec, output)
    else:
        code = execute(output, echo=TrainProgress(quiet))
    last = read_events(output)[-1]
    if code == EXIT_CANCELLED:
        err.print(f"cancelled at step {last.get('step')}; checkpoint kept in {last.get('checkpoint')} "
                  f"(run the same command again to resume)")
        raise typer.Exit(EXIT_CANCELLED)
    if code != EXIT_OK:
        where = f" ({last['param']})" if last.get("param") else ""
        fail(f"{last.get('message', 'training failed')}{where}")
    return json.loads((output / "summary.json").read_text())


@app.command()
def train(
    data: Optional[str] = typer.Option(None, "--data", help="Dataset file: JSONL, JSON, CSV or Parquet."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory: adapter, metrics and summary go here."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume the run in this directory from its newest "
                                          "checkpoint (uses its spec.json; no other settings)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help=f"Base model (default {EMBEDDED_MODEL}): "
                                             "embedded name, hub id, local directory or .gguf file."),
    method: Optional[str] = typer.Option(None, help="lora (default), full, qlora (CUDA) or dpo (preference pairs)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="DPO: how far the model may move from the reference "
                                         "(default 0.1; higher = closer). Needs --method dpo."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (num_train_epochs)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Peak learning rate."),
    r: Optional[int] = typer.Option(None, "--r", help="LoRA rank."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (scale = alpha / r)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per step."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Truncate examples to this many tokens."),
    validation_split: Optional[float] = typer.Option(None, "--validation-split", help="Fraction held out."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue training this adapter."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with TrainSpec settings."),
    set_: list[str] = typer.Option([], "--set", help="Override any setting: key=value (dotted for nested, "
                                   "e.g. lora.target_modules=q_proj,v_proj). Repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the settings and the data, print the expected "
                                 "peak memory and speed, and stop without training."),
):
    """Fine-tune a base model on a dataset (LoRA by default) and write the adapter to --output."""
    flags = {
        "data.path": data, "base_model": base_model, "method": method, "num_train_epochs": epochs,
        "max_steps": max_steps, "learning_rate": learning_rate, "lora.r": r, "lora.lora_alpha": lora_alpha,
        "per_device_train_batch_size": batch_size, "max_seq_length": max_seq_len,
        "data.validation_split": validation_split, "resume_from": str(resume_from) if resume_from else None,
        "beta": beta,
    }
    if resume is not None:
        given = [k for k, v in flags.items() if v is not None] + (["--config"] if config else []) + set_
        if given or (output and output.resolve() != resume.resolve()):
            fail("--resume takes the settings from RUN_DIR/spec.json; drop the other options "
                 f"({', '.join(map(str, given)) or '--output'})")
        spec = _load_run_spec(resume)
        output = resume
    elif output is None and not dry_run:
        fail("--output is required: the run directory for the adapter, metrics and summary")
    else:
        spec = build_train_spec(config, flags, set_)
    print_estimate(spec)
    if dry_run:
        return
    summary = run_training(spec, output)
    console.print(
        f"[green]done[/] in {summary['train_seconds']:.1f} s of training: {summary['real_tokens']:,} tokens, "
        f"{summary['tokens_per_s']:.1f} tokens/s, final loss {summary['final_loss']:.4f}, "
        f"peak memory {summary['peak_rss_mb']:.0f} MB\nadapter: {output.resolve()}"
    )


def print_estimate(spec: TrainSpec) -> None:
    """The expected peak memory and speed (engine.estimate) from the spec and the data's token lengths."""
    from loralab.data.formats import load_records
    from loralab.data.template import encode_dataset, ensure_chat_template, token_stats
    from loralab.engine.estimate import estimate_for_spec
    from loralab.engine.models import ModelNotFoundError, load_tokenizer
    from loralab.engine.run import quiet_libraries

    quiet_libraries()
    try:
        loaded = load_records(spec.data.path, max_rows=spec.data.max_rows)
    except OSError as exc:
        fail(f"cannot read the data file {spec.data.path}: {exc}")
    if loaded.problems:
        first = loaded.problems[0]
        fail(f"{spec.data.path}: line {first.line}, field {first.field}: {first.message} "
             f"({len(loaded.problems)} problem(s); run `loralab data validate {spec.data.path}` for all)")
    try:
        tokenizer = ensure_chat_template(load_tokenizer(spec.base_model))
    except ModelNotFoundError as exc:
        fail(str(exc))
    tokens = None
    if loaded.format != "preference":
        tokens = token_stats(encode_dataset(loaded.records, tokenizer, spec.max_seq_length), spec.max_seq_length)
    try:
        plan = estimate_for_spec(spec, tokens=tokens)
    except ValueError as exc:
        fail(str(exc))
    speed = f", about {plan['tokens_per_s']:.0f} tokens/s" if plan.get("tokens_per_s") else ""
    ckpt = ", with activation checkpointing" if plan["gradient_checkpointing"] else ""
    err.print(f"estimate: peak memory about {plan['peak_memory_bytes'] / 2**30:.2f} GiB{speed}{ckpt} "
              f"({len(loaded.records)} rows, {spec.method}, r={spec.lora.r})")
    if plan.get("fits") is False:
        err.print(f"[yellow]warning[/]: {plan['reason']}")


def _load_run_spec(run_dir: Path) -> TrainSpec:
    from pydantic import ValidationError

    path = run_dir / "spec.json"
    if not path.is_file():
        fail(f"{run_dir} is not a run directory: {path} not found")
    try:
        return TrainSpec.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        fail(f"{path}: " + _spec_errors(exc))


DEVICE_HELP = ("Where to load the model: auto (CUDA in bf16/fp16, spread over GPUs when one is too small; else "
               "the CPU in fp32), cpu, cuda or mps. Default: LORALAB_INFERENCE_DEVICE.")
FOUR_BIT_HELP = ("Load the model in 4-bit NF4 (bitsandbytes; CUDA only) so a big model fits a small GPU. "
                 "Default: LORALAB_INFERENCE_QUANTIZATION.")


def _inference_options(device: Optional[str], load_in_4bit: Optional[bool]) -> tuple[str, Optional[str]]:
    """--device / --load-in-4bit, defaulting to the LORALAB_INFERENCE_* settings."""
    from loralab.settings import get_settings

    settings = get_settings()
    device = device or settings.inference_device
    if device not in ("auto", "cpu", "cuda", "mps"):
        fail(f"--device must be auto, cpu, cuda or mps, got {device!r}", code=2)
    if load_in_4bit is None:
        load_in_4bit = settings.inference_quantization == "4bit"
    return device, "4bit" if load_in_4bit else None


def _load_or_fail(base_model: str, adapter: Optional[str], device: str = "auto", quantization: Optional[str] = None):
    from loralab.engine.hardware import PlacementError
    from loralab.engine.models import ModelNotFoundError, inference_placement, load_for_inference, resolve_base_model

    try:
        resolved = resolve_base_model(base_model)
        placement = inference_placement(resolved, device=device, quantization=quantization)
        err.print(f"loading {base_model}: {placement.reason}", highlight=False)
        return load_for_inference(resolved, adapter, placement=placement)
    except (ModelNotFoundError, PlacementError) as exc:
        fail(str(exc))


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message (or raw text with --raw)."),
    base_model: str = typer.Option(EMBEDDED_MODEL, "--base-model", help="Base model name or path."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter directory to apply."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="Plain completion of the prompt, no chat template."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    load_in_4bit: Optional[bool] = typer.Option(None, "--load-in-4bit/--no-load-in-4bit", help=FOUR_BIT_HELP),
):
    """Generate an answer with a base model, optionally with a LoRA adapter (streams to the terminal)."""
    from pydantic import ValidationError

    from loralab.engine.generate import stream

    try:
        settings = GenerateSpec(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed)
    except ValidationError as exc:
        fail(_spec_errors(exc))
    model, tokenizer = _load_or_fail(base_model, adapter, *_inference_options(device, load_in_4bit))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    kwargs = {"prompt": prompt} if raw else {"messages": messages}
    for piece in stream(model, tokenizer, settings=settings, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@data_app.command("validate")
def data_validate(
    file: Path = typer.Argument(..., help="Dataset file to check."),
    format: str = typer.Option("auto", "--format", help="auto, alpaca, chat, sharegpt, text or preference."),
    base_model: str = typer.Option(EMBEDDED_MODEL, "--base-model", help="Tokenizer used for token statistics."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="Rows longer than this are counted as truncated."),
    no_tokens: bool = typer.Option(False, "--no-tokens", help="Skip token statistics (no model needed)."),
):
    """Check a dataset: exit 0 with a summary, or exit 1 listing `line N: field: message` for each problem."""
    from loralab.data.formats import load_records

    if not file.is_file():
        fail(f"{file}: file not found")
    try:
        result = load_records(file, format=format)
    except ValueError as exc:
        fail(str(exc))
    if result.problems:
        for problem in result.problems:
            print(f"{file.name}: {problem}")
        fail(f"{len(result.problems)} problem(s) in {file.name}; fix them and validate again")
    console.print(f"[green]ok[/] {file.name}: {len(result.records)} rows, format [bold]{result.format}[/]")
    if no_tokens:
        return
    from loralab.data.template import encode_record, token_stats
    from loralab.engine.models import ModelNotFoundError, load_tokenizer

    try:
        tokenizer = load_tokenizer(base_model)
    except ModelNotFoundError as exc:
        err.print(f"token statistics skipped: {exc}")
        return
    encoded = [encode_record(r, tokenizer, None) for r in result.records]
    stats = token_stats(encoded, max_seq_length=max_seq_len)
    table = Table(title=f"tokens ({base_model})")
    for key in ("rows", "total_tokens", "supervised_tokens", "min", "mean", "p50", "p95", "max", "truncated"):
        value = stats[key]
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def demo(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the demo adapter goes "
                                          "(default: LORALAB_HOME/demo/<time>)."),
    epochs: float = typer.Option(8, "--epochs", help="Passes over the 5 examples."),
):
    """Fine-tune the embedded model on the 5-example sample and show its answers before and after."""
    from loralab.demo import run_demo

    run_demo(console, err, output, epochs, fail, run_training)


@app.command("export")
def export_cmd(
    adapter_dir: Path = typer.Argument(..., help="Run directory or adapter directory to export."),
    format: str = typer.Option(..., "--format", "-f", help="merged, gguf or ollama."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist or be empty)."),
    quantization: str = typer.Option("f16", "--quantization", "-q", help="GGUF tensor type: f16 or q8_0."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Override the adapter's base model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
):
    """Export an adapter: merged safetensors model, GGUF file, or GGUF + Ollama Modelfile."""
    from loralab.engine.export import ExportError, export_model
    from loralab.engine.models import ModelNotFoundError

    try:
        result = export_model(adapter_dir, format, out, quantization=quantization, base_model=base_model,
                              overwrite=overwrite)
    except (ExportError, ModelNotFoundError) as exc:
        fail(str(exc))
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    console.print(f"[green]exported[/] {format} ({result.architecture or 'model'}) to {result.out_dir}")
    for path in result.files:
        console.print(f"  {path}")
    if result.ollama_command:
        console.print(f"next: {result.ollama_command}")


@app.command("eval")
def eval_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="Rows with reference answers (default: the "
                                        "adapter's held-out validation.jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory."),
    base_model: str = typer.Option(EMBEDDED_MODEL, "--base-model"),
    adapter: list[str] = typer.Option([], "--adapter", help="Adapter directory to compare (repeatable)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N rows."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    load_in_4bit: Optional[bool] = typer.Option(None, "--load-in-4bit/--no-load-in-4bit", help=FOUR_BIT_HELP),
):
    """Compare the base model and adapters on rows with reference answers; writes CSV/JSON/MD/HTML reports."""
    from loralab.engine.evaluate import EvalError, evaluate
    from loralab.engine.models import ModelNotFoundError

    device, quantization = _inference_options(device, load_in_4bit)

    def progress(event: dict):
        if event.get("stage") == "load" and event.get("placement"):
            err.print(f"loading {base_model}: {event['placement']['reason']}", highlight=False)
        elif event.get("stage") == "generate" and event.get("total"):
            err.print(f"\r{event.get('model', '')}: {event.get('done', 0)}/{event['total']} answers", end="")
        elif event.get("stage") == "warning":
            err.print(f"\n[yellow]warning:[/] {event.get('message', '')}")

    try:
        summary = evaluate(base_model, adapter, str(data) if data else None, out, max_new_tokens=max_new_tokens,
                           limit=limit, progress=progress, device=device, quantization=quantization)
    except (EvalError, ModelNotFoundError) as exc:
        fail(str(exc))
    err.print()
    for warning in summary.get("warnings", []):
        err.print(f"[yellow]warning:[/] {warning}")
    console.print(f"[green]report[/]: {out / 'report.html'}")


config_app = typer.Typer(help="The LORALAB_ settings (environment variables).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("env-example")
def config_env_example():
    """Print .env.example: every LORALAB_ setting and compose.yaml variable with its default and meaning."""
    from loralab.settings import env_example

    sys.stdout.write(env_example())


def _register_subapps() -> None:
    from loralab.learn.cli import learn_app
    from loralab.service_cli import register

    app.add_typer(learn_app, name="learn")
    register(app)


_register_subapps()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
