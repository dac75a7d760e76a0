"""Calibrate loralab.engine.estimate: run the real engine for a few settings and compare peak RSS and tokens/s.

Run from the project root:  python benchmarks/estimate_vs_measured.py [--rows 32] [--steps N] [--json out.json]
Each setting trains in its own subprocess (peak RSS is per run). The estimate is given the run's real
shape: its largest batch (tokens of the biggest step) and the share of supervised tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
SETTINGS = [  # (name, r, max_seq_length, batch_size); the first is nearly only the fixed part (runtime + weights)
    ("seq128-b1-r8", 8, 128, 1),
    ("seq256-b2-r8", 8, 256, 2),
    ("seq512-b4-r8", 8, 512, 4),
    ("seq512-b8-r16", 16, 512, 8),
]


def _spec(cfg: dict):
    from loralab.spec import DataSpec, LoraSpec, TrainSpec

    return TrainSpec(
        base_model=MODEL, data=DataSpec(path=cfg["data"], max_rows=cfg["rows"]),
        lora=LoraSpec(r=cfg["r"], lora_alpha=2 * cfg["r"]), max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"], max_seq_length=cfg["max_seq_len"], packing=True,
        precision="fp32", device="cpu", gradient_checkpointing="off", seed=42,
    )


def _worker(cfg: dict, out: Path) -> None:
    from loralab.engine.train import train

    spec = _spec(cfg)
    with tempfile.TemporaryDirectory(prefix="estimate-cal-") as tmp:
        summary = train(spec, Path(tmp))
        steps = [json.loads(line) for line in (Path(tmp) / "events.jsonl").read_text().splitlines()]
    seen = [0] + [e["tokens"] for e in steps if e["type"] == "step"]
    summary["max_step_tokens"] = max(b - a for a, b in zip(seen, seen[1:]))
    out.write_text(json.dumps(summary))


def token_lengths(cfg: dict) -> dict:
    """The rows' token statistics as the engine encodes them (what the CLI and API give the estimator)."""
    from loralab.data.formats import load_records
    from loralab.data.template import encode_dataset, ensure_chat_template, token_stats
    from loralab.engine.models import load_tokenizer

    tokenizer = ensure_chat_template(load_tokenizer(MODEL))
    records = load_records(cfg["data"], max_rows=cfg["rows"]).records
    return token_stats(encode_dataset(records, tokenizer, cfg["max_seq_len"]), cfg["max_seq_len"])


def _measure(cfg: dict) -> dict:
    from loralab.engine.hardware import allocator_env

    with tempfile.TemporaryDirectory(prefix="estimate-result-") as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg), "--worker-result", str(out)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
        env.update(allocator_env(env))  # the engine's process as the worker starts it (jemalloc when installed)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"engine run failed ({proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=-1, help="optimizer steps per run (default: one epoch)")
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker), Path(args.worker_result))
        return 0

    from loralab.engine.estimate import estimate_for_spec, measure_matmul_flops
    from loralab.engine.hardware import allocator_env, physical_cores

    import torch

    torch.set_num_threads(physical_cores())
    flops = measure_matmul_flops()
    preload = allocator_env().get("LD_PRELOAD")
    print(f"load average {os.getloadavg()[0]:.2f}; matmul {flops / 1e9:.1f} GFLOP/s fp32; steps {args.steps}; "
          f"engine allocator: {'jemalloc' if preload else 'glibc malloc'}")
    rows = []
    head = f"{'setting':<15} {'est MB':>8} {'meas MB':>8} {'err':>7} {'est tok/s':>10} {'meas tok/s':>10} {'err':>7}"
    print(head + "\n" + "-" * len(head))
    for name, r, seq, batch in SETTINGS:
        cfg = {"data": str(Path(args.data).resolve()), "rows": args.rows, "steps": args.steps, "r": r,
               "max_seq_len": seq, "batch_size": batch}
        got = _measure(cfg)
        # The same call `loralab train --dry-run` and POST /api/training/jobs/estimate make: spec + token lengths.
        est = estimate_for_spec(_spec(cfg), tokens=token_lengths(cfg))
        est_mb = est["peak_memory_bytes"] / 2**20
        mem_err = (est_mb - got["peak_rss_mb"]) / got["peak_rss_mb"]
        tps_err = (est["tokens_per_s"] - got["tokens_per_s"]) / got["tokens_per_s"]
        print(f"{name:<15} {est_mb:>8.0f} {got['peak_rss_mb']:>8.0f} {mem_err:>7.1%} "
              f"{est['tokens_per_s']:>10.1f} {got['tokens_per_s']:>10.1f} {tps_err:>7.1%}", flush=True)
        rows.append({"setting": name, "estimate": est, "measured": got,
                     "memory_error": mem_err, "tokens_per_s_error": tps_err})
    print(f"load average after {os.getloadavg()[0]:.2f} (tokens/s errors mean little on a busy machine)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"matmul_flops": flops, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
