"""The benchmark's profile breakdown: which part of a profiled step each op's time goes to."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_throughput", module)
    spec.loader.exec_module(module)
    return module


def _event(key, shapes, micros, count=1):
    return SimpleNamespace(key=key, input_shapes=shapes, self_cpu_time_total=micros, count=count)


def test_profile_breakdown_sorts_ops_into_parts_with_their_flops():
    bench = _bench()
    events = [
        _event("aten::mm", [[512, 576], [576, 1536]], 6_000, count=2),  # a frozen projection, twice
        _event("aten::addmm_", [[512, 1536], [512, 8], [8, 1536], [], []], 200),  # LoRA B: rank 8
        _event("aten::mm", [[8, 512], [512, 576]], 100),  # LoRA A gradient
        _event("aten::_scaled_dot_product_flash_attention_for_cpu", [[1, 9, 512, 64]] * 3, 2_000),
        _event("aten::mul", [[512, 576], [512, 576]], 300),
    ]
    out = bench.profile_breakdown(events)
    parts = out["parts"]
    assert abs(out["total_seconds"] - 0.0086) < 1e-12
    assert parts["projection matmuls"]["seconds"] == 0.006
    assert parts["projection matmuls"]["flops"] == 2 * 2 * 512 * 576 * 1536
    assert parts["LoRA matmuls"]["flops"] == 2 * 512 * 8 * 1536 + 2 * 8 * 512 * 576
    assert parts["LoRA matmuls"]["calls"] == 2
    assert parts["attention kernels"]["seconds"] == 0.002
    assert parts["everything else"]["seconds"] == 0.0003
    assert bench._matmul_dims("aten::mm", [[3]]) is None  # a shape it cannot read counts as 'everything else'
