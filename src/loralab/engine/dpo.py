"""Direct preference optimisation (LoRA) on TRL's DPOTrainer, writing the same run directory as train.py.

The reference policy is the model the run starts from: the base model for a new adapter, the starting
adapter when continuing one (`resume_from`); TRL keeps it as a frozen copy named "ref" of that adapter.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from loralab.engine import distributed as dist_util
from loralab.engine import tracking
from loralab.engine.events import EventWriter
from loralab.engine.hardware import apply_threads, choose_placement, peak_rss_mb
from loralab.engine.train import EngineError, _build_model, latest_checkpoint, train_until_done_or_cancelled, trainer_arguments
from loralab.spec import DPO_DEFAULTS, TrainSpec

REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of the starting adapter
# TRL's logged metric -> the step/eval event field
METRIC_FIELDS = {
    "rewards/margins": "rewards_margin", "rewards/accuracies": "rewards_accuracy",
    "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
    "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
}


def load_preference_records(spec: TrainSpec) -> list[dict[str, Any]]:
    """Read and check the dataset: DPO needs preference records (prompt turns, chosen, rejected)."""
    from loralab.data.formats import load_records

    path = Path(spec.data.path)
    if not path.is_file():
        raise EngineError("data_not_found", f"data file not found: {path}", "data.path")
    result = load_records(path, format=spec.data.format, max_rows=spec.data.max_rows)
    if result.problems:
        shown = "\n".join(str(p) for p in result.problems[:20])
        more = f"\n... and {len(result.problems) - 20} more" if len(result.problems) > 20 else ""
        raise EngineError("data_invalid", f"{path.name}: {len(result.problems)} problem(s):\n{shown}{more}",
                          "data.path", details=[vars(p) for p in result.problems])
    if result.format != "preference":
        raise EngineError(
            "data_invalid", f"method 'dpo' needs preference pairs (prompt/chosen/rejected rows) but {path.name} "
            f"holds {result.format} rows; use a preference dataset, or method 'lora' for supervised fine-tuning",
            "data")
    return list(result.records)


def to_trl_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical preference records in TRL's conversational prompt/chosen/rejected layout."""
    return [{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]


def split_records(records: list, validation_split: float, seed: int) -> tuple[list, list]:
    """Seeded hold-out, as train.py does it: (train, validation)."""
    if validation_split <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * validation_split))
    if n_val >= len(records):
        raise EngineError("data_too_small", f"validation_split={validation_split} leaves no training pairs out of "
                          f"{len(records)}", "data.validation_split")
    held = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def _completion_ids(tokenizer, messages: list[dict[str, str]], completion: str) -> tuple[list[int], int]:
    """Token ids of the conversation + assistant answer, and where the answer's tokens start."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return list(full_ids), max(start, 1)


def completion_logprob(model, tokenizer, messages: list[dict[str, str]], completion: str) -> float:
    """Sum of the log-probabilities of the answer's tokens (after the chat prompt) under the model."""
    import torch

    ids, start = _completion_ids(tokenizer, messages, completion)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits[0, start - 1:-1].float()
    targets = input_ids[0, start:]
    return float(torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).sum())


def preference_margins(model, tokenizer, records: list[dict[str, Any]]) -> list[float]:
    """Per pair: log p(chosen) - log p(rejected), each summed over the answer's tokens (independent of TRL).

    A DPO run that learns the preferences makes these grow. The model is put in eval mode.
    """
    from loralab.data.template import ensure_chat_template

    ensure_chat_template(tokenizer)
    model.eval()
    return [completion_logprob(model, tokenizer, r["messages"], r["chosen"])
            - completion_logprob(model, tokenizer, r["messages"], r["rejected"]) for r in records]


def _make_trainer_class():
    from trl import DPOTrainer

    class LoralabDPOTrainer(DPOTrainer):
        """DPOTrainer with atomic checkpoints in the run directory and no model card beside them."""

        def create_model_card(self, *args, **kwargs):  # README.md in checkpoints/ is noise here
            return None

        def _get_output_dir(self, trial):
            return getattr(self, "staging_dir", None) or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            dist_util.save_checkpoint_atomically(
                self, lambda: super(LoralabDPOTrainer, self)._save_checkpoint(model, trial))

    return LoralabDPOTrainer


def _make_callback(events: EventWriter, stop: threading.Event, trainer_ref: dict, clock: dict):
    from transformers import TrainerCallback

    def extras(logs: dict, prefix: str = "") -> dict:
        return {field: logs[prefix + key] for key, field in METRIC_FIELDS.items() if prefix + key in logs}

    class EventCallback(TrainerCallback):
        """Turns DPOTrainer logs into step/eval/checkpoint events (with reward metrics) and honours a stop."""

        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = clock["last"] = time.perf_counter()
            clock["start_step"] = state.global_step
            clock["last_tokens"] = trainer_ref["trainer"]._total_train_tokens

        def on_step_end(self, args, state, control, **kw):
            if stop.is_set():
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            now = time.perf_counter()
            if "loss" in logs:
                tokens = trainer_ref["trainer"]._total_train_tokens
                span = now - clock["last"]
                per_step = (now - clock["start"]) / max(state.global_step - clock["start_step"], 1)
                events.emit(
                    "step", step=state.global_step, total_steps=state.max_steps, epoch=round(state.epoch or 0, 4),
                    loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                    tokens=tokens, tokens_per_s=round((tokens - clock["last_tokens"]) / span, 2) if span > 0 else None,
                    eta_s=round(per_step * (state.max_steps - state.global_step), 1), **extras(logs),
                )
                clock["last"], clock["last_tokens"] = now, tokens
            if "eval_loss" in logs:
                events.emit("eval", step=state.global_step, eval_loss=logs["eval_loss"], **extras(logs, "eval_"))

        def on_save(self, args, state, control, **kw):
            events.emit("checkpoint", step=state.global_step,
                        path=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

    return EventCallback()


def _build_policy(spec: TrainSpec, dtype, device: str):
    """The LoRA policy (new or continued adapter), on plain SDPA: DPO batches are padded, never packed."""
    return _build_model(spec.model_copy(update={"packing": False}), dtype, device)


def train_dpo(spec: TrainSpec, run_dir: Path, events: EventWriter | None = None,
              stop: threading.Event | None = None) -> dict:
    """Run one DPO fine-tune into run_dir; returns the summary (status 'succeeded' or 'cancelled')."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    events = events or EventWriter(run_dir)
    stop = stop or threading.Event()
    if dist_util.world_size() > 1:
        raise EngineError("unsupported", "method='dpo' runs in one process: set distributed.strategy to 'none'",
                          "distributed.strategy")
    try:
        placement = choose_placement(spec.device, spec.precision)
    except ValueError as exc:
        raise EngineError("invalid_precision", str(exc), "precision") from None
    apply_threads(placement)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2))

    from loralab.data.template import ensure_chat_template
    from loralab.engine.models import ModelNotFoundError, load_tokenizer

    try:
        tokenizer = ensure_chat_template(load_tokenizer(spec.base_model))
    except ModelNotFoundError as exc:
        raise EngineError("model_not_found", str(exc), "base_model") from None
    train_records, val_records = split_records(load_preference_records(spec), spec.data.validation_split, spec.seed)
    if val_records:
        with open(run_dir / "validation.jsonl", "w", encoding="utf-8") as fh:
            for record in val_records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[placement.dtype]
    set_seed(spec.seed)  # LoRA's initial A matrices come from the global RNG: same seed, same start
    model = _build_policy(spec, dtype, placement.device)
    report_to, tracking_links = tracking.configure(run_dir, run_name=run_dir.name)
    beta = spec.beta if spec.beta is not None else DPO_DEFAULTS["beta"]
    loss_type = spec.loss_type or DPO_DEFAULTS["loss_type"]
    args = DPOConfig(
        **trainer_arguments(spec, placement, run_dir, report_to, evaluate=bool(val_records)),
        beta=beta, loss_type=[loss_type], max_length=spec.max_seq_length,
        # TRL defaults gradient checkpointing on; here it is on only when asked.
        activation_checkpointing=spec.gradient_checkpointing == "on",
    )
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True  # a self-hosted trainer sends no usage pings
    trainer_ref: dict = {}
    clock: dict = {}
    try:
        trainer = _make_trainer_class()(
            model=model, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_list(to_trl_rows(train_records)),
            eval_dataset=Dataset.from_list(to_trl_rows(val_records)) if val_records else None,
            callbacks=[_make_callback(events, stop, trainer_ref, clock)],
        )
    except ValueError as exc:
        if "lm_head" in str(exc):
            raise EngineError("invalid_target_modules", str(exc), "lora.target_modules") from None
        raise
    trainer_ref["trainer"] = trainer
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise EngineError("data_too_small", f"every prompt fills max_seq_length={spec.max_seq_length} tokens, "
                          "leaving no room for the answers: raise max_seq_length", "max_seq_length")
    if kept < len(train_records):
        events.log(f"{len(train_records) - kept} pair(s) have prompts of max_seq_length={spec.max_seq_length} "
                   "tokens or more and were skipped", level="warning")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resume = latest_checkpoint(run_dir)
    resumed_step = int(resume.name.rsplit("-", 1)[1]) if resume else 0
    steps_per_epoch = math.ceil(kept / (spec.per_device_train_batch_size * spec.gradient_accumulation_steps))
    total = spec.max_steps if spec.max_steps > 0 else math.ceil(steps_per_epoch * spec.num_train_epochs)
    events.emit(
        "started", total_steps=total, num_examples=kept, validation_examples=len(val_records),
        trainable_params=trainable, device=placement.device, dtype=placement.dtype,
        resumed_from_step=resumed_step, threads=placement.threads, method="dpo", beta=beta, loss_type=loss_type,
    )
    if stop.is_set():
        return {"status": "cancelled", "step": resumed_step}
    output, cancelled = train_until_done_or_cancelled(trainer, resume, run_dir, stop, events)
    if cancelled:
        return cancelled
    state = trainer.state

    train_seconds = clock.get("end", time.perf_counter()) - clock.get("start", time.perf_counter())
    history = [h for h in state.log_history if "loss" in h]
    # only the trained adapter is the result; the frozen reference copy stays behind
    model.save_pretrained(run_dir, safe_serialization=True, selected_adapters=["default"])
    tokenizer.save_pretrained(run_dir)
    tokens_total = trainer._total_train_tokens
    last = history[-1] if history else {}
    summary = {
        "status": "succeeded",
        "train_seconds": round(train_seconds, 3),
        "real_tokens": tokens_total,
        "tokens_per_s": round(tokens_total / train_seconds, 2) if train_seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "final_loss": last.get("loss"),
        "first_loss": history[0]["loss"] if history else None,
        "train_loss": output.training_loss,
        "eval_loss": next((h["eval_loss"] for h in reversed(state.log_history) if "eval_loss" in h), None),
        "final_rewards_margin": last.get("rewards/margins"),
        "final_rewards_accuracy": last.get("rewards/accuracies"),
        "trainable_params": trainable,
        "total_steps": state.global_step,
        "num_examples": kept,
        "method": spec.method,
        "beta": beta,
        "loss_type": loss_type,
        "reference": "adapter" if spec.resume_from else "base_model",
        "base_model": spec.base_model,
        "device": placement.device,
        "dtype": placement.dtype,
        "world_size": 1,
        "tracking": tracking.finish_links(tracking_links),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if spec.save_steps == 0:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    events.emit("done", **summary)
    return summary
