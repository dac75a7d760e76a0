"""Recommended settings per GPU memory and model size, computed from the memory estimator (engine/estimate.py).

`python -m loralab.engine.recommend` prints the Markdown tables kept in docs/scale.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

GIB = 2**30
HEADROOM = 0.9  # keep 10% of the GPU for the CUDA context, fragmentation and spikes
GPU_MEMORY_GB = (8, 16, 24, 48, 80)
SEQ_LENGTHS = (2048, 1024, 512)
BATCHES = (16, 8, 4, 2, 1)
# Public Qwen2.5 architectures (config.json of Qwen/Qwen2.5-*-Instruct): the usual sizes of open models.
MODELS: dict[str, dict[str, Any]] = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
NF4_BYTES = (4 + 0.127) / 8  # 4-bit weights + double-quantised absmax scales (~0.127 bit per weight)


@dataclass(frozen=True)
class Setting:
    """One recommended configuration (or none that fits) for a model size on a GPU."""

    model: str
    gpu_gb: int
    method: str | None
    per_device_train_batch_size: int = 0
    max_seq_length: int = 0
    gradient_checkpointing: bool = False
    peak_gib: float = 0.0

    def cell(self) -> str:
        if self.method is None:
            return "no fit: shard (`zero3_offload`)"
        ckpt = ", ckpt" if self.gradient_checkpointing else ""
        return (f"{self.method}, b{self.per_device_train_batch_size} x {self.max_seq_length}{ckpt} "
                f"({self.peak_gib:.1f} GiB)")


def _config(size: str) -> dict[str, Any]:
    return {"model_type": "qwen2", "max_position_embeddings": 32768, **MODELS[size]}


@lru_cache(maxsize=None)
def peak_bytes(size: str, method: str, batch: int, seq: int, checkpointing: bool, r: int = 16) -> int:
    """Predicted peak GPU memory of a LoRA (bf16 base) or QLoRA (NF4 base) run with packed batches."""
    from loralab.engine.estimate import estimate

    # A packed batch is one row with attention kept per example and no mask: memory grows with its tokens
    # like a single sequence of batch x seq tokens (batch_size=1 tells the estimator there is no mask).
    est = estimate(_config(size), method="lora", r=r, max_seq_length=batch * seq, batch_size=1, device="cuda",
                   dtype="bf16", gradient_checkpointing=checkpointing, measure=False)
    if method == "lora":
        return est.peak_memory_bytes
    if method != "qlora":
        raise ValueError(f"method must be lora or qlora, got {method!r}")
    cfg = MODELS[size]
    embed = cfg["vocab_size"] * cfg["hidden_size"]
    unquantised = embed * (1 if cfg["tie_word_embeddings"] else 2)  # embeddings and lm_head are not 4-bit
    base = est.assumptions["base_params"]
    # prepare_model_for_kbit_training casts what stays unquantised (embeddings, head, norms) to fp32.
    weights = (base - unquantised) * NF4_BYTES + unquantised * 4
    return int(est.peak_memory_bytes - est.breakdown["weights"] + weights)


def _largest_batch(size: str, method: str, seq: int, checkpointing: bool, budget: float) -> tuple[int, int]:
    for batch in BATCHES:
        peak = peak_bytes(size, method, batch, seq, checkpointing)
        if peak <= budget:
            return batch, peak
    return 0, 0


def recommend_setting(size: str, gpu_gb: int) -> Setting:
    """LoRA on a bf16 base when it fits, else QLoRA; the longest sequence, then the largest batch."""
    budget = gpu_gb * 1e9 * HEADROOM  # GPUs are sold in GB (10^9 bytes)
    for method in ("lora", "qlora"):
        for seq in SEQ_LENGTHS:
            plain, plain_peak = _largest_batch(size, method, seq, False, budget)
            if plain >= 4:  # enough work per step without recomputation
                return Setting(size, gpu_gb, method, plain, seq, False, plain_peak / GIB)
            ckpt, ckpt_peak = _largest_batch(size, method, seq, True, budget)
            if ckpt > plain:
                return Setting(size, gpu_gb, method, ckpt, seq, True, ckpt_peak / GIB)
            if plain:
                return Setting(size, gpu_gb, method, plain, seq, False, plain_peak / GIB)
    return Setting(size, gpu_gb, None)


def recommendation_table(sizes=tuple(MODELS), gpus=GPU_MEMORY_GB) -> list[list[Setting]]:
    return [[recommend_setting(size, gb) for gb in gpus] for size in sizes]


def markdown_tables(sizes=tuple(MODELS), gpus=GPU_MEMORY_GB) -> str:
    """The two tables of docs/scale.md: minimum memory per model size, and settings per GPU."""
    lines = ["| model | LoRA bf16, 1 x 1024, ckpt | LoRA bf16, 4 x 1024 | QLoRA, 1 x 1024, ckpt | QLoRA, 4 x 1024 |",
             "| --- | --- | --- | --- | --- |"]
    for size in sizes:
        cells = [peak_bytes(size, m, b, 1024, ck) / GIB
                 for m, b, ck in (("lora", 1, True), ("lora", 4, False), ("qlora", 1, True), ("qlora", 4, False))]
        lines.append(f"| {size} | " + " | ".join(f"{c:.1f} GiB" for c in cells) + " |")
    lines += ["", "| model | " + " | ".join(f"{gb} GB" for gb in gpus) + " |",
              "| --- | " + " | ".join("---" for _ in gpus) + " |"]
    for row in recommendation_table(sizes, gpus):
        lines.append(f"| {row[0].model} | " + " | ".join(s.cell() for s in row) + " |")
    return "\n".join(lines)


def main() -> int:
    print(markdown_tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
