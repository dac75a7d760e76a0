"""The one schema: training, data and generation settings shared by the CLI, YAML, API and engine."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "smollm2-135m-instruct"

DataFormat = Literal["auto", "alpaca", "chat", "sharegpt", "text", "preference"]
Method = Literal["lora", "qlora", "full", "dpo"]
# TRL DPOConfig.loss_type names usable without extra settings (exo_pair and robust need label smoothing)
DpoLossType = Literal["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                      "apo_zero", "apo_down", "discopop", "sigmoid_norm"]
DPO_DEFAULTS = {"beta": 0.1, "loss_type": "sigmoid"}
Strategy = Literal["none", "ddp", "fsdp", "deepspeed"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Upper bounds: a job request is a resource claim on a shared worker, so every number has a ceiling.
MAX_SEED = 2**32 - 1
MAX_STEPS = 10_000_000
# Tokens of one optimizer step (batch x accumulation x sequence length): 16M, four times a large pre-training batch.
MAX_TOKENS_PER_STEP = 2**24
ModuleName = Annotated[str, Field(min_length=1, max_length=200)]


class _Strict(BaseModel):
    # NaN and Infinity (which Python's json accepts) are refused: they would be stored and reach the engine.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSpec(_Strict):
    path: str = Field(max_length=4096, description="Dataset file: JSONL, JSON array, CSV or Parquet (UTF-8).")
    format: DataFormat = Field(
        "auto", description="Row layout; 'auto' detects alpaca, chat, sharegpt, text or preference."
    )
    validation_split: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Fraction of rows held out for evaluation (0 = none). Seeded by `seed`.",
    )
    max_rows: int | None = Field(None, ge=1, le=100_000_000, description="Use only the first N rows.")


class LoraSpec(_Strict):
    r: int = Field(8, ge=1, le=256, description="LoRA rank: size of the low-rank update matrices.")
    lora_alpha: float = Field(16, gt=0, le=4096, description="LoRA scaling numerator; the update is scaled by lora_alpha / r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    target_modules: Annotated[list[ModuleName], Field(max_length=100)] | Annotated[str, Field(max_length=2000)] = Field(
        "all-linear",
        description="Modules that get LoRA: 'all-linear' or names such as q_proj,v_proj.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # PEFT reads a plain string as a regex over the full module path, so "q_proj" alone would
        # match nothing; names (comma-separated or single) become a list. "all-linear" stays as is.
        if isinstance(value, str) and value != "all-linear":
            names = [part.strip() for part in value.split(",") if part.strip()]
            if not names:
                raise ValueError("target_modules is empty: give 'all-linear' or module names such as q_proj,v_proj")
            return names
        return value


class DistributedSpec(_Strict):
    """Several processes (GPUs) or hosts: the worker and `loralab train` launch the engine through torchrun."""

    strategy: Strategy = Field(
        "none", description="'none' = one process; 'ddp' replicates the model; 'fsdp' or 'deepspeed' shard it."
    )
    nproc_per_node: int = Field(1, ge=1, le=64, description="Processes per host (usually one per GPU).")
    nnodes: int = Field(1, ge=1, le=256, description="Hosts taking part; each runs torchrun with its node_rank.")
    node_rank: int = Field(0, ge=0, le=255, description="This host's index (0 .. nnodes-1); node 0 writes the run's files.")
    master_addr: str = Field(
        "127.0.0.1", pattern=r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$",
        description="Host name or IP of node 0 (several hosts only).",
    )
    master_port: int = Field(29500, ge=1024, le=65535, description="TCP port on node 0 for the rendezvous (several hosts only).")
    config: str | None = Field(
        None, max_length=4096,
        description="FSDP or DeepSpeed config: a shipped name (fsdp, fsdp_offload, zero2, zero3_offload) or a "
        "JSON/YAML file; default fsdp for 'fsdp' and zero2 for 'deepspeed'.",
    )

    @model_validator(mode="after")
    def _check_ranks(self) -> "DistributedSpec":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} must be below nnodes={self.nnodes}")
        if self.strategy == "none" and (self.nproc_per_node > 1 or self.nnodes > 1):
            raise ValueError("nproc_per_node/nnodes above 1 need a strategy: set distributed.strategy to ddp, "
                             "fsdp or deepspeed")
        if self.config and self.strategy not in ("fsdp", "deepspeed"):
            raise ValueError("distributed.config is read only with strategy 'fsdp' or 'deepspeed'")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class TrainSpec(_Strict):
    """Everything a fine-tuning run needs; stored as spec.json in its run directory."""

    base_model: str = Field(
        EMBEDDED_MODEL, min_length=1, max_length=4096,
        description="Base model: 'smollm2-135m-instruct' (embedded), a Hugging Face id, a local model directory or a .gguf file.",
    )
    data: DataSpec
    method: Method = Field(
        "lora", description="'lora' trains adapters (PEFT); 'qlora' trains them on a 4-bit base (CUDA); "
        "'full' trains every weight; 'dpo' trains LoRA adapters on preference pairs (TRL DPOTrainer).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate of AdamW.")
    num_train_epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training rows.")
    max_steps: int = Field(-1, ge=-1, le=MAX_STEPS, description="Stop after this many optimizer steps (-1 = use epochs).")
    per_device_train_batch_size: int = Field(4, ge=1, le=1024, description="Examples per step on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Steps whose gradients are summed before an update.")
    max_seq_length: int = Field(512, ge=8, le=131072, description="Longer examples are truncated to this many tokens.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Steps of linear learning-rate warm-up.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, lt=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Random seed for data order, split and initialisation.")
    packing: bool = Field(
        True,
        description="Padding-free batches: examples are concatenated with attention kept inside each one.",
    )
    micro_batch_tokens: int = Field(
        0, ge=0, le=MAX_TOKENS_PER_STEP,
        description="Run each packed batch as pieces of whole examples of at most this many tokens to bound "
        "activation memory; the gradient is unchanged. 0 = automatic (512 on CPU, no split on GPU).",
    )
    assistant_only_loss: bool = Field(True, description="Train on assistant tokens only (chat and alpaca rows).")
    precision: Precision = Field("auto", description="'auto' picks bf16/fp16 on capable GPUs, fp32 on CPUs.")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="Recompute activations to save memory; 'auto' turns it on only when memory is short."
    )
    logging_steps: int = Field(1, ge=1, le=MAX_STEPS, description="Log metrics every N steps.")
    save_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Write a resumable checkpoint every N steps (0 = only at the end and on cancel).")
    save_total_limit: int = Field(2, ge=1, le=1000, description="Checkpoints kept in the run directory.")
    resume_from: str | None = Field(
        None, max_length=4096, description="Continue training from this adapter directory (PEFT format)."
    )
    beta: float | None = Field(
        None, gt=0, le=100,
        description="DPO only: how far the policy may move from the reference (higher = closer). Default 0.1.",
    )
    loss_type: DpoLossType | None = Field(
        None, description="DPO only: TRL's preference loss ('sigmoid' = the DPO paper's). Default 'sigmoid'.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train; 'auto' uses a GPU when present.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Multi-process / multi-host training (torchrun)."
    )

    @model_validator(mode="before")
    @classmethod
    def _dpo_defaults(cls, data: Any) -> Any:
        # DPO settings exist only for method 'dpo': filled in there, left unset (None) for the other methods.
        if isinstance(data, dict) and data.get("method") == "dpo":
            data = {**data, **{k: v for k, v in DPO_DEFAULTS.items() if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _check_method(self) -> "TrainSpec":
        tokens = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.max_seq_length
        if tokens > MAX_TOKENS_PER_STEP:
            raise ValueError(f"per_device_train_batch_size x gradient_accumulation_steps x max_seq_length = {tokens:,} "
                             f"tokens per optimizer step, above the limit of {MAX_TOKENS_PER_STEP:,}; lower one of them")
        if self.method == "full" and self.resume_from:
            raise ValueError("resume_from continues a LoRA adapter; it cannot be combined with method='full'")
        if self.method != "dpo":
            for name in DPO_DEFAULTS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is a DPO setting: use it with method='dpo' (method is '{self.method}')")
        elif self.distributed.strategy != "none":
            raise ValueError("method='dpo' runs in one process: set distributed.strategy to 'none'")
        return self


class GenerateSpec(_Strict):
    """Sampling settings for one generation."""

    max_new_tokens: int = Field(128, ge=1, le=8192, description="Upper bound on generated tokens.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy decoding; higher = more random.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens with this total probability.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=5.0, description="Above 1 discourages repeating tokens.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for sampling (greedy ignores it).")
    stop: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=16, description="Stop generating at any of these strings.")


class EvalSpec(_Strict):
    """An evaluation run: the base model and each adapter answer rows with reference answers; spec.json of its run."""

    kind: Literal["evaluation"] = Field(
        "evaluation", description="Marks an evaluation run directory (a TrainSpec has no kind)."
    )
    base_model: str = Field(EMBEDDED_MODEL, description="Base model every adapter is applied to (and scored itself).")
    adapters: list[str] = Field(
        default_factory=list, max_length=64, description="PEFT adapter directories compared with the base model, in order."
    )
    data_path: str = Field(description="Rows with reference answers: any dataset format (chat, alpaca, text with "
                           "'回答:' / 'Answer:').")
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Upper bound on each generated answer (greedy).")
    limit: int | None = Field(None, ge=1, le=100_000_000, description="Evaluate only the first N rows.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed (decoding is greedy; the seed fixes everything else).")
    embeddings: bool = Field(True, description="Score embedding similarity with all-MiniLM-L6-v2.")
    judge: bool = Field(False, description="Also grade answers 1-5 with the LLM judge set by LORALAB_JUDGE_URL "
                        "and LORALAB_JUDGE_MODEL.")
    report_language: Literal["en", "ja"] = Field("en", description="Language of report.html and report.md "
                                                 "(report.en.html and report.ja.html are always written).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to run; 'auto' uses a GPU "
                                                          "when present.")


ExportFormat = Literal["merged", "gguf", "ollama"]
ExportQuantization = Literal["f16", "q8_0"]


class ExportSpec(_Strict):
    """An export run: a fine-tuned version written as merged safetensors, GGUF or GGUF + Ollama; its spec.json."""

    kind: Literal["export"] = Field("export", description="Marks an export run directory (a TrainSpec has no kind).")
    model_id: str = Field(pattern=r"^ft-[0-9a-f]{24}$", description="The fine-tuned version exported.")
    source: str = Field(min_length=1, max_length=4096, description="Its registry directory: a LoRA adapter "
                        "(merged into base_model) or a full model.")
    base_model: str | None = Field(None, min_length=1, max_length=4096, description="Base model an adapter is "
                                   "merged into (a stored base model value); unused for full fine-tunes.")
    format: ExportFormat = Field(description="merged: safetensors with the adapter folded in; gguf: one GGUF file "
                                 "for llama.cpp; ollama: the GGUF file plus an Ollama Modelfile.")
    quantization: ExportQuantization | None = Field("f16", description="GGUF tensor type: f16 or q8_0 (8-bit); "
                                                    "none for merged.")
    name: str = Field("loralab-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(:[A-Za-z0-9._-]{1,40})?$",
                      description="Model name written into the GGUF metadata and used by `ollama create`.")

    @model_validator(mode="after")
    def _quantization_for_gguf(self) -> "ExportSpec":
        if self.format == "merged":
            object.__setattr__(self, "quantization", None)  # merged keeps the base's dtype: nothing to choose
        elif self.quantization is None:
            raise ValueError(f"quantization is required for format {self.format!r}: f16 or q8_0")
        return self


def apply_overrides(raw: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides (dotted keys reach nested sections) to a raw spec dict."""
    import yaml

    out = dict(raw)
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    return out
