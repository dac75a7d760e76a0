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

# Shape of one MLP projection of the embedded model (tokens x hidden @ hidden x intermediate).
MATMUL_SHAPE = (1024, 576, 1536)

# Calibrated on SmolLM2-135M (fp32, 2-core AMD EPYC, torch 2.13), see benchmarks/estimate_vs_measured.py.
CPU_RUNTIME_BYTES = 330 * 2**20  # python + torch + transformers + tokenizer + allocator slack, model excluded
CUDA_RUNTIME_BYTES = 500 * 2**20  # CUDA context and cuBLAS workspaces
EFFICIENCY = {"cpu": 0.55, "cuda": 0.45, "mps": 0.35}  # achieved / peak matmul FLOP/s in a training step
ALLOCATOR_SLACK = 1.10  # freed-but-held blocks and fragmentation on top of live tensors
HARDWARE_FILE = "hardware.json"


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
    if entry and not refresh:
        return float(entry["matmul_flops"])
    flops = measure_matmul_flops(device, dtype, repeats=5, rounds=5)
    cache[key] = {"matmul_flops": flops, "measured_at": round(time.time()), "shape": list(MATMUL_SHAPE)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only home only loses the cache
        pass
    return flops
