"""Supervised fine-tuning (LoRA or full) on HF Trainer, writing the run directory described in DESIGN.md."""
from __future__ import annotations

import json
import math
import random
import shutil
import threading
import time
from pathlib import Path

from loralab.engine import distributed as dist_util
from loralab.engine import tracking
from loralab.engine.batching import (DEFAULT_MICRO_BATCH_TOKENS, PackedCollator, PaddedCollator, causal_lm_loss_sum,
                                     real_tokens, split_packed)
from loralab.engine.events import EventWriter
from loralab.engine.hardware import apply_threads, choose_placement, peak_rss_mb, release_free_heap
from loralab.spec import TrainSpec


class EngineError(Exception):
    """A failure the user can act on; `code` and `param` go into the error event."""

    def __init__(self, code: str, message: str, param: str | None = None, details: list | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.details = code, message, param, details or []


def prepare_examples(spec: TrainSpec, tokenizer, events: EventWriter | None = None):
    """Load, validate and tokenise the data; returns (train, validation examples, validation records)."""
    from loralab.data.formats import load_records
    from loralab.data.template import encode_record, has_supervised_tokens

    path = Path(spec.data.path)
    if not path.is_file():
        raise EngineError("data_not_found", f"data file not found: {path}", "data.path")
    result = load_records(path, format=spec.data.format, max_rows=spec.data.max_rows)
    if result.problems:
        shown = "\n".join(str(p) for p in result.problems[:20])
        more = f"\n... and {len(result.problems) - 20} more" if len(result.problems) > 20 else ""
        raise EngineError(
            "data_invalid", f"{path.name}: {len(result.problems)} problem(s):\n{shown}{more}", "data.path",
            details=[vars(p) for p in result.problems],
        )
    if result.format == "preference":
        raise EngineError(
            "data_invalid", f"{path.name} holds preference pairs (prompt/chosen/rejected); "
            "train it with method 'dpo' (supervised fine-tuning needs instruction, chat or text rows)", "method",
        )
    records = list(result.records)
    order = list(range(len(records)))
    val_idx: set[int] = set()
    if spec.data.validation_split > 0:
        random.Random(spec.seed).shuffle(order)
        n_val = max(1, round(len(records) * spec.data.validation_split))
        if n_val >= len(records):
            raise EngineError(
                "data_too_small", f"validation_split={spec.data.validation_split} leaves no training rows "
                f"out of {len(records)}", "data.validation_split",
            )
        val_idx = set(order[:n_val])
    train, val, val_records, dropped = [], [], [], 0
    for i, record in enumerate(records):
        enc = encode_record(record, tokenizer, spec.max_seq_length, assistant_only_loss=spec.assistant_only_loss)
        if not has_supervised_tokens(enc):
            dropped += 1
            continue
        if i in val_idx:
            val.append(enc)
            val_records.append(record)
        else:
            train.append(enc)
    if dropped and events:
        events.log(f"{dropped} row(s) have no trainable tokens within max_seq_length={spec.max_seq_length} "
                   "and were skipped", level="warning")
    if not train:
        raise EngineError("data_too_small", "no row has trainable tokens: the answers are empty or cut off "
                          f"by max_seq_length={spec.max_seq_length}", "max_seq_length")
    return train, val, val_records


def _build_model(spec: TrainSpec, dtype, device: str):
    from loralab.engine.models import load_model

    # Packed rows get per-example causal attention (or FA2 on CUDA); padded batches keep SDPA with its mask.
    attn = dist_util.choose_attention(spec.packing, device)
    if spec.method == "qlora":
        model = dist_util.load_qlora_base(spec.base_model, attn, spec.gradient_checkpointing != "off")
    else:
        model = load_model(spec.base_model, dtype=dtype, device=dist_util.rank_device(device), attn_implementation=attn)
    model.config.use_cache = False
    if spec.method == "full":
        return _fused(model)
    from peft import LoraConfig, PeftModel, get_peft_model

    if spec.resume_from:
        src = Path(spec.resume_from)
        if not (src / "adapter_config.json").is_file():
            raise EngineError("adapter_not_found", f"{src} is not a LoRA adapter directory "
                              "(no adapter_config.json)", "resume_from")
        return _fused(PeftModel.from_pretrained(model, str(src), is_trainable=True))
    config = LoraConfig(
        r=spec.lora.r, lora_alpha=spec.lora.lora_alpha, lora_dropout=spec.lora.lora_dropout,
        target_modules=spec.lora.target_modules, task_type="CAUSAL_LM", bias="none",
    )
    try:
        return _fused(get_peft_model(model, config))
    except ValueError as exc:
        raise EngineError("invalid_target_modules", f"LoRA target_modules {spec.lora.target_modules!r}: {exc}",
                          "lora.target_modules") from None


def _fused(model):
    """The engine's forwards (same math, less memory traffic): Llama-style decoder layers as two autograd nodes
    (engine.fused_layer) where they apply, else LoRA as one addmm and lean norms and MLPs (engine.fastpath)."""
    from loralab.engine.fastpath import fuse_lora_forward, lean_activations
    from loralab.engine.fused_layer import fuse_decoder_layers

    fuse_lora_forward(model)
    lean_activations(model)
    fuse_decoder_layers(model)
    return model


def trainer_arguments(spec: TrainSpec, placement, run_dir: Path, report_to, evaluate: bool) -> dict:
    """The TrainingArguments (or TRL config) fields every loralab run sets the same way from its spec."""
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=spec.per_device_train_batch_size,
        per_device_eval_batch_size=spec.per_device_train_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        num_train_epochs=spec.num_train_epochs, max_steps=spec.max_steps,
        learning_rate=spec.learning_rate, lr_scheduler_type=spec.lr_scheduler_type,
        warmup_steps=spec.warmup_steps, weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm,
        seed=spec.seed, data_seed=spec.seed,
        logging_steps=spec.logging_steps, logging_strategy="steps",
        save_strategy="steps" if spec.save_steps else "no", save_steps=spec.save_steps or 500,
        save_total_limit=spec.save_total_limit,
        eval_strategy="epoch" if evaluate else "no",
        # Precision from the hardware: TRL defaults bf16 on, which a CPU only emulates (minutes per step).
        bf16=placement.dtype == "bf16", fp16=placement.dtype == "fp16",
        use_cpu=placement.device == "cpu", dataloader_pin_memory=placement.device == "cuda",
        remove_unused_columns=False, report_to=report_to or "none", disable_tqdm=True,
    )


def _needs_checkpointing(spec: TrainSpec, train_set, events: EventWriter) -> bool:
    """'on'/'off' as asked; 'auto' turns activation checkpointing on only when the estimate does not fit memory."""
    if spec.gradient_checkpointing != "auto":
        return spec.gradient_checkpointing == "on"
    from loralab.data.template import token_stats
    from loralab.engine.estimate import estimate_for_spec

    try:
        plan = estimate_for_spec(spec, tokens=token_stats(list(train_set), spec.max_seq_length), measure=False)
    except Exception as exc:  # an unknown architecture: train as asked (off) rather than fail
        events.emit("log", level="warning", message=f"no memory estimate ({exc}); activation checkpointing off")
        return False
    if plan["gradient_checkpointing"]:
        events.emit("log", level="info", message=f"activation checkpointing on: {plan['reason']}")
    return bool(plan["gradient_checkpointing"])


def train_until_done_or_cancelled(trainer, resume: Path | None, run_dir: Path, stop: threading.Event,
                                  events: EventWriter):
    """Run trainer.train (resuming from `resume`); a stop before the last step emits `cancelled` and returns it."""
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    if stop.is_set() and state.global_step < state.max_steps:
        ckpt = latest_checkpoint(run_dir)
        events.emit("cancelled", step=state.global_step, checkpoint=str(ckpt) if ckpt else None)
        return output, {"status": "cancelled", "step": state.global_step}
    return output, None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint (trainer_state.json is written last) under RUN_DIR/checkpoints."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    # Checkpoints are renamed into place when complete; a partial or foreign directory is skipped.
    done = [p for p in root.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def _make_trainer_class():
    from transformers import Trainer

    class LoralabTrainer(Trainer):
        """Trainer whose loss skips the vocabulary projection where nothing is predicted."""

        loss_is_scaled_for_ga = True
        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, n = causal_lm_loss_sum(model, inputs)
            if model.training:
                self.tokens_seen += real_tokens(inputs)
            denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
            loss = loss_sum / denom
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.args.world_size  # the divisor counts every rank's tokens; DDP averages gradients
            return (loss, {"loss": loss}) if return_outputs else loss

        micro_batch_tokens = 0
        trim_heap = False  # CPU runs: hand free heap pages back before a piece larger than any before it
        largest_piece = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            """Run a packed batch as runs of whole examples when it exceeds the token budget (same gradient)."""
            import contextlib

            pieces = (split_packed(inputs, self.micro_batch_tokens)
                      if self.micro_batch_tokens and "position_ids" in inputs else [inputs])
            total = None
            for i, piece in enumerate(pieces):
                size = int(piece["input_ids"].numel())
                if self.trim_heap and size > self.largest_piece:
                    self.largest_piece = size
                    release_free_heap()  # the peak is made here: start it without the last pieces' holes
                last = i == len(pieces) - 1
                # gradients are synchronised across ranks once, after the last piece
                ctx = contextlib.nullcontext() if last or self.args.world_size == 1 else self.accelerator.no_sync(model)
                with ctx:
                    loss = super().training_step(model, piece, num_items_in_batch)
                total = loss if total is None else total + loss
            return total

        def _get_output_dir(self, trial):
            return getattr(self, "staging_dir", None) or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            dist_util.save_checkpoint_atomically(self, lambda: super(LoralabTrainer, self)._save_checkpoint(model, trial))

    return LoralabTrainer


def _make_callback(events: EventWriter, stop: threading.Event, trainer_ref: dict, clock: dict):
    from transformers import TrainerCallback

    class EventCallback(TrainerCallback):
        """Turns Trainer logs into step/eval/checkpoint events and honours a stop request."""

        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = clock["last"] = time.perf_counter()
            clock["start_step"] = state.global_step
            clock["last_tokens"] = 0

        def on_step_end(self, args, state, control, **kw):
            # Ranks agree on stopping (a signal reaches them at slightly different steps).
            if dist_util.global_sum(trainer_ref["trainer"], stop.is_set()) if args.world_size > 1 else stop.is_set():
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            now = time.perf_counter()
            if "loss" in logs:
                tokens = dist_util.global_sum(trainer_ref["trainer"], trainer_ref["trainer"].tokens_seen)
                span = now - clock["last"]
                done_steps = state.global_step - clock["start_step"]
                per_step = (now - clock["start"]) / max(done_steps, 1)
                events.emit(
                    "step", step=state.global_step, total_steps=state.max_steps, epoch=round(state.epoch or 0, 4),
                    loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                    tokens=tokens, tokens_per_s=round((tokens - clock["last_tokens"]) / span, 2) if span > 0 else None,
                    eta_s=round(per_step * (state.max_steps - state.global_step), 1),
                )
                clock["last"], clock["last_tokens"] = now, tokens
            if "eval_loss" in logs:
                events.emit("eval", step=state.global_step, eval_loss=logs["eval_loss"])

        def on_save(self, args, state, control, **kw):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            events.emit("checkpoint", step=state.global_step, path=str(path))

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()
            clock["tokens"] = dist_util.global_sum(trainer_ref["trainer"], trainer_ref["trainer"].tokens_seen)

    return EventCallback()


def train(spec: TrainSpec, run_dir: Path, events: EventWriter | None = None,
          stop: threading.Event | None = None) -> dict:
    """Run one fine-tune into run_dir; returns the summary (status 'succeeded' or 'cancelled')."""
    if spec.method == "dpo":
        from loralab.engine.dpo import train_dpo

        return train_dpo(spec, run_dir, events=events, stop=stop)
    import torch
    from transformers import TrainingArguments, set_seed

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    main = dist_util.is_main_process()  # only rank 0 writes the run directory's files
    events = events or EventWriter(run_dir, enabled=main)
    stop = stop or threading.Event()
    try:
        placement = choose_placement(spec.device, spec.precision)
    except ValueError as exc:
        raise EngineError("invalid_precision", str(exc), "precision") from None
    placement = dist_util.placement_for_rank(placement)
    apply_threads(placement)
    if main:
        (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2))

    from loralab.engine.models import ModelNotFoundError, load_tokenizer

    try:
        tokenizer = load_tokenizer(spec.base_model)
    except ModelNotFoundError as exc:
        raise EngineError("model_not_found", str(exc), "base_model") from None
    train_set, val_set, val_records = prepare_examples(spec, tokenizer, events)
    if val_records and main:
        with open(run_dir / "validation.jsonl", "w", encoding="utf-8") as fh:
            for record in val_records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[placement.dtype]
    set_seed(spec.seed)  # LoRA's initial A matrices come from the global RNG: same seed, same start
    model = _build_model(spec, dtype, placement.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gradient_checkpointing = _needs_checkpointing(spec, train_set, events)  # the same decision on every rank

    steps_per_epoch = math.ceil(len(train_set) / (spec.per_device_train_batch_size * spec.gradient_accumulation_steps
                                                  * dist_util.world_size()))
    report_to, tracking_links = tracking.configure(run_dir, run_name=run_dir.name)
    args = TrainingArguments(
        **trainer_arguments(spec, placement, run_dir, report_to, evaluate=bool(val_set)),
        prediction_loss_only=True, activation_checkpointing=gradient_checkpointing,
        train_sampling_strategy="random" if spec.packing else "group_by_length",
        **dist_util.trainer_arguments(spec, placement),
    )
    collator = PackedCollator() if spec.packing else PaddedCollator(tokenizer.pad_token_id)
    trainer_ref: dict = {}
    clock: dict = {}
    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
        data_collator=collator, processing_class=tokenizer,
        callbacks=[_make_callback(events, stop, trainer_ref, clock)],
    )
    trainer_ref["trainer"] = trainer
    if spec.packing:
        trainer.micro_batch_tokens = spec.micro_batch_tokens or (
            DEFAULT_MICRO_BATCH_TOKENS if placement.device == "cpu" else 0)
    trainer.trim_heap = placement.device == "cpu"
    resume = latest_checkpoint(run_dir)
    resumed_step = int(resume.name.rsplit("-", 1)[1]) if resume else 0
    total = spec.max_steps if spec.max_steps > 0 else math.ceil(steps_per_epoch * spec.num_train_epochs)
    events.emit(
        "started", total_steps=total, num_examples=len(train_set), validation_examples=len(val_set),
        trainable_params=trainable, device=placement.device, dtype=placement.dtype,
        resumed_from_step=resumed_step, threads=placement.threads,
    )
    if stop.is_set():
        return {"status": "cancelled", "step": resumed_step}
    output, cancelled = train_until_done_or_cancelled(trainer, resume, run_dir, stop, events)
    if cancelled:
        return cancelled
    state = trainer.state

    train_seconds = clock.get("end", time.perf_counter()) - clock.get("start", time.perf_counter())
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    dist_util.save_final_model(trainer, model, tokenizer, run_dir, spec)
    tokens_total = clock.get("tokens", trainer.tokens_seen)
    summary = {
        "status": "succeeded",
        "train_seconds": round(train_seconds, 3),
        "real_tokens": tokens_total,
        "tokens_per_s": round(tokens_total / train_seconds, 2) if train_seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "train_loss": output.training_loss,
        "eval_loss": next((h["eval_loss"] for h in reversed(state.log_history) if "eval_loss" in h), None),
        "trainable_params": trainable,
        "total_steps": state.global_step,
        "num_examples": len(train_set),
        "method": spec.method,
        "base_model": spec.base_model,
        "device": placement.device,
        "dtype": placement.dtype,
        "world_size": dist_util.world_size(),
        "tracking": tracking.finish_links(tracking_links),
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if spec.save_steps == 0 and main:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    events.emit("done", **summary)
    return summary
