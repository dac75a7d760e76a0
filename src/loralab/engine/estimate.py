"""Memory and speed of a fine-tune predicted from the model config and this machine's measured matmul speed."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loralab.engine.batching import DEFAULT_MICRO_BATCH_TOKENS
from loralab.engine.fastpath import CE_CHUNK_BYTES, PLAIN_HEAD_MODELS
from loralab.engine.fused_layer import FUSED_MODEL_TYPES, kept_values_per_token

# Shape of one MLP projection of the embedded model (tokens x hidden @ hidden x intermediate).
MATMUL_SHAPE = (1024, 576, 1536)

# Calibrated on SmolLM2-135M (fp32, 2-core AMD EPYC, torch 2.13, glibc malloc) with
# benchmarks/estimate_vs_measured.py: 4 settings (seq 128-512, batch 1-8, r 8-16), one epoch of 32 rows each;
# with engine.fused_layer and the heap trim before record-size pieces the memory errors were +4..+9% at
# retention 0.5 (2026-11-22, session 3), so retention is 0.3 on the CPU now.
RUNTIME_BYTES = {"cpu": 600 * 2**20, "cuda": 600 * 2**20, "mps": 600 * 2**20}  # interpreter, libraries, tokenizer, data
# Freed activation memory the allocator keeps (glibc's dynamic mmap threshold; CUDA's caching allocator):
# peak RSS grows by about this fraction of one step's transient bytes (activations + logits).
ALLOCATOR_RETENTION = {"cpu": 0.3, "cuda": 0.1, "mps": 0.1}
# Achieved / measured matmul FLOP/s in a training step (cpu: 0.52-0.60 measured with this engine by
# benchmarks/estimate_vs_measured.py on 2026-11-22; cuda and mps not measured here).
EFFICIENCY = {"cpu": 0.55, "cuda": 0.40, "mps": 0.30}
HARDWARE_FILE = "hardware.json"
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj")
MLP_IN_NAMES = ("gate_proj", "up_proj")


@dataclass
class Estimate:
    """Predicted peak memory (bytes) and training speed (real tokens/s) of one configuration."""

    peak_memory_bytes: int
    tokens_per_s: float | None
    breakdown: dict[str, int] = field(default_factory=dict)
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Recommendation:
    """Whether activation checkpointing is needed to fit the available memory, with both estimates."""

    gradient_checkpointing: bool
    fits: bool
    available_bytes: int
    reason: str
    without_checkpointing: Estimate
    with_checkpointing: Estimate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_matmul(device: str, dtype, shape: tuple[int, int, int], repeats: int, rounds: int) -> float:
    import torch

    m, k, n = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: thread pool start, kernel selection
        a @ b
    sync()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2.0 * m * k * n / best


def measure_matmul_flops(device: str = "cpu", dtype: str = "fp32", shape: tuple[int, int, int] = MATMUL_SHAPE,
                         repeats: int = 10, rounds: int = 7) -> float:
    """This machine's matmul FLOP/s on layer-shaped operands: best of `rounds` timings of `repeats` products."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return _time_matmul(device, torch_dtype, shape, repeats, rounds)


def _hardware_key(device: str, dtype: str, threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    if device == "cuda":
        cpu = torch.cuda.get_device_name(0)
    return f"{device}|{dtype}|{threads}|{cpu}|torch {torch.__version__}"


def hardware_flops(device: str = "cpu", dtype: str = "fp32", refresh: bool = False) -> float:
    """Matmul FLOP/s of this machine, measured once and cached in LORALAB_HOME/hardware.json."""
    import torch

    from loralab.settings import get_settings

    threads = torch.get_num_threads()
    key = _hardware_key(device, dtype, threads)
    path = Path(get_settings().home) / HARDWARE_FILE
    cache: dict[str, Any] = {}
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    # A measurement taken while the machine was busy is too low (seen: 40 instead of 180 GFLOP/s at
    # load 10 on 2 cores): it is measured again next time and the best figure is kept.
    if entry and not refresh and not entry.get("busy"):
        return float(entry["matmul_flops"])
    flops = measure_matmul_flops(device, dtype, repeats=5, rounds=5)
    if entry and not refresh:
        flops = max(flops, float(entry["matmul_flops"]))
    cache[key] = {"matmul_flops": flops, "measured_at": round(time.time()), "shape": list(MATMUL_SHAPE),
                  "load_average": round(busy, 2), "busy": device == "cpu" and busy > 0.5 * threads}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only home only loses the cache
        pass
    return flops


def _dims(config) -> dict[str, int]:
    """The sizes the activation count needs, read from a (text) model config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return {
        "hidden": hidden, "intermediate": int(getattr(text, "intermediate_size", None) or 4 * hidden),
        "layers": int(text.num_hidden_layers), "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "vocab": int(text.vocab_size),
    }


def layer_activation_values(dims: dict[str, int], adapted: set[str] | None, r: int, masked_width: int) -> int:
    """Values autograd keeps per token in one decoder layer (Llama-style block, SDPA attention).

    `adapted` = names of LoRA-wrapped linears (None = full fine-tuning: every linear keeps its input);
    `masked_width` = width of the attention mask SDPA materialises per layer (0 = causal, no mask).
    """
    h, i, nh = dims["hidden"], dims["intermediate"], dims["heads"]
    q, kv = nh * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    full = adapted is None
    names = set() if full else adapted

    def keeps(*wanted: str) -> bool:
        return full or any(n in names for n in wanted)

    values = 2 * h + 2  # both RMSNorms keep their input and 1/rms
    values += h if keeps(*ATTENTION_NAMES) else 0  # normalised input of q/k/v
    values += h if keeps(*MLP_IN_NAMES) else 0  # normalised input of gate/up
    values += 2 * h if full else 0  # norm weights' gradients need the normalised values too
    # SDPA keeps q, k, v, its output (= o_proj input) and the log-sum-exp; with a mask transformers
    # repeats the grouped k/v heads to the query head count first.
    values += 2 * q + 2 * (q if masked_width else kv) + nh
    values += 2 * i  # gate and up (engine.fastpath's SwiGLU recomputes SiLU(gate) in backward)
    values += i if keeps("down_proj") else 0  # down_proj input
    values += 0 if full else r * len(names)  # LoRA A outputs (inputs of B)
    values += masked_width  # the float mask SDPA builds from the boolean one, kept by every layer
    return values


def _adapted_names(config, r: int, target_modules) -> tuple[set[str], int, int]:
    from loralab.learn.calculator import estimate_lora

    lora = estimate_lora(config, r=r, target_modules=target_modules)
    per_layer = {m.name for m in lora.modules}
    return per_layer, lora.trainable_params, lora.base_params


def _flops_per_token(dims: dict[str, int], base_params: int, trainable: int, method: str,
                     context: float, supervised_fraction: float) -> tuple[float, dict[str, float]]:
    """Training FLOPs per real token: dense matmuls + the vocabulary projection where supervised + attention."""
    head = dims["vocab"] * dims["hidden"]
    body = max(base_params - head, 0)  # the embedding lookup costs no FLOPs; the tied head is counted below
    passes = 6 if method == "full" else 4  # forward 2N + activation gradients 2N (+ weight gradients 2N)
    dense = passes * body + passes * head * supervised_fraction + (6 * trainable if method == "lora" else 0)
    # QK^T and AV over `context` keys per query, forward once and twice in backward.
    attention = 3 * 4 * context * dims["heads"] * dims["head_dim"] * dims["layers"]
    return dense + attention, {"dense": dense, "attention": attention, "design_4n": 4.0 * base_params}


def live_tokens(batch_tokens: int, seq: int, packing: bool, micro_batch_tokens: int) -> int:
    """Tokens whose activations are alive at once: a packed batch runs as pieces of whole examples."""
    if not packing or micro_batch_tokens <= 0 or batch_tokens <= micro_batch_tokens:
        return batch_tokens
    per_piece = max(1, micro_batch_tokens // seq) * seq if seq <= micro_batch_tokens else seq
    return min(batch_tokens, per_piece)


def estimate(model: Any, method: str = "lora", r: int = 8, target_modules: Any = "all-linear",
             max_seq_length: int = 512, batch_size: int = 4, device: str = "cpu", dtype: str = "fp32",
             gradient_checkpointing: bool = False, packing: bool = True, seq_length: int | None = None,
             supervised_fraction: float = 1.0, matmul_flops: float | None = None,
             measure: bool = True, micro_batch_tokens: int | None = None) -> Estimate:
    """Peak memory and tokens/s of one training configuration, from the config alone (no weights are read).

    `seq_length` is the typical example length (default: max_seq_length, the worst case); batches hold
    `batch_size` such examples. `supervised_fraction` is the share of tokens that carry loss.
    `matmul_flops` overrides the measured (and cached) machine speed; `measure=False` skips measuring.
    `micro_batch_tokens` is the engine's piece size (None = its default: 512 on a CPU, no split on a GPU).
    """
    from loralab.learn.calculator import load_config

    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
    if max_seq_length < 1 or batch_size < 1:
        raise ValueError("max_seq_length and batch_size must be positive")
    config = load_config(model)
    dims = _dims(config)
    adapted, trainable, base_params = _adapted_names(config, r, target_modules)
    if method == "full":
        adapted, trainable = None, base_params
    seq = min(seq_length or max_seq_length, max_seq_length)
    kind = "cuda" if device.startswith("cuda") else device if device in RUNTIME_BYTES else "cpu"
    if micro_batch_tokens is None:
        micro_batch_tokens = DEFAULT_MICRO_BATCH_TOKENS if kind == "cpu" else 0
    tokens = live_tokens(batch_size * seq, seq, packing, micro_batch_tokens)
    supervised = max(0.0, min(1.0, supervised_fraction))
    weight_bytes = 4 if dtype == "fp32" else 2
    act_bytes = 4 if dtype == "fp32" else 2
    # Packed rows run attention per example with no mask (engine/attention.py); padded batches of
    # several rows make transformers build a [rows, 1, seq, seq] mask that every layer keeps.
    masked_width = 0 if packing or batch_size == 1 else seq
    fused_loss = getattr(config, "model_type", None) in PLAIN_HEAD_MODELS

    per_layer = layer_activation_values(dims, adapted, r, masked_width)
    # engine.fused_layer: a LoRA run of a Llama-style model on the CPU, packed and without checkpointing,
    # runs each half layer as one autograd node that keeps only what its backward needs.
    fused_layers = (method == "lora" and kind == "cpu" and masked_width == 0 and not gradient_checkpointing
                    and getattr(config, "model_type", None) in FUSED_MODEL_TYPES)
    if fused_layers:
        per_layer = kept_values_per_token(dims, r * len(adapted))
    outside = 2 * dims["hidden"] + 1  # final norm input and 1/rms
    if gradient_checkpointing:
        # Only each layer's input survives the forward; one layer is recomputed at a time in backward.
        activations = tokens * (dims["layers"] * dims["hidden"] + per_layer + outside) * act_bytes
    else:
        activations = tokens * (dims["layers"] * per_layer + outside) * act_bytes
    if fused_loss:
        # engine.fastpath.linear_cross_entropy: one chunk of logits (softmax and its gradient computed in it in
        # place) plus the hidden-state gradient.
        logits = CE_CHUNK_BYTES + int(tokens * supervised) * dims["hidden"] * 4
    else:
        # Log-softmax output kept for backward + its incoming and outgoing gradients (fp32: the loss upcasts).
        logits = 3 * int(tokens * supervised) * dims["vocab"] * 4
    if method == "full":
        trainable_state = base_params * (weight_bytes + 8)  # gradients in the weight dtype + AdamW m, v in fp32
    else:
        trainable_state = trainable * 16  # fp32 LoRA weights, gradients and AdamW m, v
    retention = int(ALLOCATOR_RETENTION[kind] * (activations + logits))
    breakdown = {
        "weights": base_params * weight_bytes,
        "trainable_state": trainable_state,
        "activations": int(activations),
        "logits": int(logits),
        "allocator_retention": retention,
        "runtime": RUNTIME_BYTES[kind],
    }
    # A causal kernel visits half the example on average; with an explicit mask SDPA's CPU kernel
    # computes every score of the (packed) row, masked or not.
    context = masked_width if masked_width else (seq + 1) / 2
    flops_token, flops_parts = _flops_per_token(dims, base_params, trainable if method == "lora" else 0,
                                                method, context, supervised)
    flops = matmul_flops
    if flops is None and measure:
        flops = hardware_flops(kind, "fp32" if kind == "cpu" else dtype)
    tokens_per_s = flops * EFFICIENCY[kind] / flops_token if flops else None
    assumptions = {
        "method": method, "r": r, "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "max_seq_length": max_seq_length, "batch_size": batch_size, "seq_length": seq, "tokens_per_batch": tokens,
        "supervised_fraction": supervised, "packing": packing, "gradient_checkpointing": gradient_checkpointing,
        "micro_batch_tokens": micro_batch_tokens, "live_tokens": tokens, "fused_loss": fused_loss,
        "fused_layers": fused_layers,
        "device": kind, "dtype": dtype, "base_params": base_params, "trainable_params": trainable,
        "activation_values_per_token_per_layer": per_layer, "model_dims": dims,
        "matmul_flops": flops, "efficiency": EFFICIENCY[kind], "flops_per_token": flops_token,
        "flops_per_token_parts": flops_parts,
        "formula": "memory = weights + trainable state + activations + logits + allocator retention + runtime; "
                   "tokens/s = matmul FLOP/s x efficiency / FLOPs per token",
    }
    return Estimate(peak_memory_bytes=int(sum(breakdown.values())),
                    tokens_per_s=round(tokens_per_s, 2) if tokens_per_s else None,
                    breakdown=breakdown, assumptions=assumptions)


def recommend(model: Any, available_bytes: int | None = None, headroom: float = 0.9, **kwargs: Any) -> Recommendation:
    """Decide activation checkpointing: on only when the run without it would not fit `available_bytes`."""
    from loralab.engine.hardware import available_memory_bytes

    kwargs.pop("gradient_checkpointing", None)
    device = kwargs.get("device", "cpu")
    if available_bytes is None:
        available_bytes = available_memory_bytes("cuda" if str(device).startswith("cuda") else "cpu")
    budget = int(available_bytes * headroom)
    without = estimate(model, gradient_checkpointing=False, **kwargs)
    with_ckpt = estimate(model, gradient_checkpointing=True, measure=False,
                         matmul_flops=without.assumptions["matmul_flops"], **_without(kwargs, "matmul_flops", "measure"))
    gib = 2**30
    if without.peak_memory_bytes <= budget:
        return Recommendation(False, True, available_bytes,
                              f"fits without activation checkpointing ({without.peak_memory_bytes / gib:.2f} GiB "
                              f"of {available_bytes / gib:.2f} GiB available)", without, with_ckpt)
    fits = with_ckpt.peak_memory_bytes <= budget
    reason = (f"needs {without.peak_memory_bytes / gib:.2f} GiB without activation checkpointing, "
              f"{with_ckpt.peak_memory_bytes / gib:.2f} GiB with it; {available_bytes / gib:.2f} GiB available")
    if not fits:
        reason += ": lower per_device_train_batch_size or max_seq_length (or use a smaller model)"
    return Recommendation(True, fits, available_bytes, reason, without, with_ckpt)


def _without(kwargs: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in names}


def estimate_for_spec(spec: Any, tokens: dict[str, Any] | None = None, available_bytes: int | None = None,
                      measure: bool = True) -> dict[str, Any]:
    """The plan of one TrainSpec before it starts: recommendation, the estimate it picks, and the inputs used.

    `tokens` are the dataset's token statistics (`data.template.token_stats`): the longest example
    sizes the memory estimate and the supervised share the vocabulary projection; without them the
    worst case (every example max_seq_length long, all tokens supervised) is assumed.
    """
    from loralab.engine.hardware import choose_placement

    placement = choose_placement(spec.device, spec.precision)  # ValueError: a device or precision it cannot use
    gpu = placement.device == "cuda"
    dtype = placement.dtype
    seq_length, supervised = None, 1.0
    if tokens and tokens.get("rows"):
        seq_length = int(tokens.get("max") or 0) or None
        if tokens.get("supervised_tokens") is not None and tokens.get("total_tokens"):
            supervised = tokens["supervised_tokens"] / tokens["total_tokens"]
    # DPO is LoRA over chosen and rejected answers together (twice the rows) plus a no-grad reference pass.
    method, rows = ("lora", 2) if spec.method == "dpo" else ("lora" if spec.method == "qlora" else spec.method, 1)
    kwargs = dict(method=method, r=spec.lora.r, target_modules=spec.lora.target_modules,
                  max_seq_length=spec.max_seq_length, batch_size=spec.per_device_train_batch_size * rows,
                  device="cuda" if gpu else "cpu", dtype=dtype, packing=spec.packing and spec.method != "dpo",
                  seq_length=seq_length, supervised_fraction=supervised,
                  micro_batch_tokens=spec.micro_batch_tokens or None)
    if spec.gradient_checkpointing == "auto":
        rec = recommend(spec.base_model, available_bytes=available_bytes, measure=measure, **kwargs)
        chosen = rec.with_checkpointing if rec.gradient_checkpointing else rec.without_checkpointing
        plan = {"gradient_checkpointing": rec.gradient_checkpointing, "fits": rec.fits, "reason": rec.reason,
                "available_bytes": rec.available_bytes}
    else:
        on = spec.gradient_checkpointing == "on"
        chosen = estimate(spec.base_model, gradient_checkpointing=on, measure=measure, **kwargs)
        plan = {"gradient_checkpointing": on, "fits": None, "reason": "gradient_checkpointing set explicitly",
                "available_bytes": available_bytes}
    return {**plan, "peak_memory_bytes": chosen.peak_memory_bytes, "tokens_per_s": chosen.tokens_per_s,
            "breakdown": chosen.breakdown, "assumptions": chosen.assumptions}
