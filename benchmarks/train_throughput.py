"""Training throughput and memory: the loralab engine against a plain TRL SFTTrainer + PEFT, one process each.

Run from the project root:  python benchmarks/train_throughput.py [--rows 32 --steps N --json out.json]
Each contender runs in its own subprocess (so peak RSS is its own); the parent measures the machine's
matmul FLOP/s before and after, prints one table, the ratios and whether the issue's targets hold.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from loralab.engine.estimate import MATMUL_SHAPE, measure_matmul_flops  # noqa: E402
from loralab.engine.hardware import allocator_env  # noqa: E402
# The TRL baselines as the issue measured them (SFTTrainer defaults except fp32: activation checkpointing on),
# and the stricter variants with checkpointing off (faster, far more memory).
CONTENDERS = ("loralab", "trl-padded", "trl-packed", "trl-padded-nockpt", "trl-packed-nockpt")
BASELINES = {"trl-padded": "padded_ratio", "trl-packed": "packed_ratio",
             "trl-padded-nockpt": "padded_ratio", "trl-packed-nockpt": "packed_ratio"}
# Not run by default: the engine with glibc's mmap threshold fixed (freed activations go back to the OS).
# loralab-ckpt: the engine with activation checkpointing on (the memory floor, at a speed cost).
EXTRA = {
    "loralab-ckpt": {},
    "loralab-glibc": {"LD_PRELOAD": "", "MALLOC_CONF": ""},  # the engine on glibc's malloc instead of jemalloc
    "loralab-mmap": {"LD_PRELOAD": "", "MALLOC_CONF": "", "MALLOC_MMAP_THRESHOLD_": "131072"},
    "loralab-trim": {"LD_PRELOAD": "", "MALLOC_CONF": "", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"},
}
MODEL = "smollm2-135m-instruct"
TARGETS = {"padded_ratio": 3.0, "packed_ratio": 2.0, "loss_rel": 0.05, "utilisation": 0.70, "peak_rss_mb": 1536.0}


# ----------------------------------------------------------------------------- shared by the workers

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _set_threads() -> int:
    import torch

    from loralab.engine.hardware import physical_cores

    torch.set_num_threads(physical_cores())
    return torch.get_num_threads()


def _records(cfg: dict) -> list[dict]:
    from loralab.data.formats import load_records

    result = load_records(cfg["data"], max_rows=cfg["rows"])
    if result.problems:
        raise SystemExit(f"{cfg['data']}: {result.problems[:3]}")
    return list(result.records)


def eval_loss(model, tokenizer, cfg: dict) -> float:
    """Mean assistant-token loss of a trained model on the benchmark rows, encoded the same way for everyone."""
    import torch

    from loralab.data.template import encode_record, has_supervised_tokens
    from loralab.engine.batching import PackedCollator, causal_lm_loss_sum

    encoded = [encode_record(r, tokenizer, cfg["max_seq_len"]) for r in _records(cfg)]
    encoded = [e for e in encoded if has_supervised_tokens(e)]
    collate = PackedCollator()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), cfg["batch_size"]):
            loss_sum, n = causal_lm_loss_sum(model, collate(encoded[i:i + cfg["batch_size"]]))
            total, count = total + float(loss_sum), count + n
    return total / max(count, 1)


def _run_loralab(cfg: dict, out_dir: Path) -> dict:
    from loralab.engine.models import load_for_inference
    from loralab.engine.train import train
    from loralab.spec import DataSpec, LoraSpec, TrainSpec

    spec = TrainSpec(
        base_model=MODEL, data=DataSpec(path=cfg["data"], max_rows=cfg["rows"]), method="lora",
        lora=LoraSpec(r=cfg["r"], lora_alpha=2 * cfg["r"], lora_dropout=0.0, target_modules="all-linear"),
        learning_rate=cfg["lr"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch_size"],
        max_seq_length=cfg["max_seq_len"], seed=cfg["seed"], packing=True, precision="fp32", device="cpu",
        gradient_checkpointing="on" if cfg.get("checkpointing") else "off", logging_steps=1, save_steps=0,
        micro_batch_tokens=cfg.get("micro_batch_tokens", 0),
    )
    if cfg.get("profile_steps"):
        return _profile(spec.model_copy(update={"max_steps": cfg["profile_steps"]}), out_dir)
    summary = train(spec, out_dir)
    peak = _peak_rss_mb()
    curve = []
    for line in (out_dir / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "step":
            curve.append([event["step"], event["tokens"], event["loss"]])
    model, tokenizer = load_for_inference(MODEL, adapter=str(out_dir))
    return {
        "train_seconds": summary["train_seconds"], "real_tokens": summary["real_tokens"], "peak_rss_mb": peak,
        "steps": summary["total_steps"], "final_loss": summary["final_loss"], "curve": curve,
        "eval_loss": eval_loss(model, tokenizer, cfg), "trainable_params": summary["trainable_params"],
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _matmul_dims(name: str, shapes: list) -> tuple[int, int, int] | None:
    """(m, k, n) of a recorded mm / addmm / addmm_ call, from its input shapes."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
        else:  # addmm(self, a, b): a is [m, k], b is [k, n]
            (m, k), (_, n) = shapes[1], shapes[2]
    except (IndexError, TypeError, ValueError):
        return None
    return m, k, n


def profile_breakdown(events) -> dict:
    """CPU self time of a profiled run in four parts, with the FLOPs and rate of the matmul parts.

    'LoRA matmuls' are products with a side of at most 64 (the rank, or stacked ranks); 'projection
    matmuls' are the rest (the frozen projections and the vocabulary head).
    """
    parts = {name: {"seconds": 0.0, "flops": 0.0, "calls": 0}
             for name in ("projection matmuls", "LoRA matmuls", "attention kernels", "everything else")}
    total = 0.0
    for e in events:
        seconds = e.self_cpu_time_total / 1e6
        total += seconds
        dims = _matmul_dims(e.key, e.input_shapes) if e.key in MATMUL_OPS else None
        if dims is not None:
            part = parts["LoRA matmuls" if min(dims) <= 64 else "projection matmuls"]
            part["flops"] += 2.0 * dims[0] * dims[1] * dims[2] * e.count
        elif e.key in ATTENTION_OPS:
            part = parts["attention kernels"]
        else:
            part = parts["everything else"]
        part["seconds"] += seconds
        part["calls"] += e.count
    return {"total_seconds": total, "parts": parts}


def _profile(spec, out_dir: Path) -> dict:
    """The engine's training loop under torch.profiler (model loading and data preparation outside it)."""
    from torch.profiler import ProfilerActivity, profile

    from loralab.engine import train as engine_train

    run_loop = engine_train.train_until_done_or_cancelled
    held: dict = {}

    def profiled(*args, **kwargs):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            out = run_loop(*args, **kwargs)
            held["wall"] = time.perf_counter() - started
        held["prof"] = prof
        return out

    engine_train.train_until_done_or_cancelled = profiled
    try:
        summary = engine_train.train(spec, out_dir)
    finally:
        engine_train.train_until_done_or_cancelled = run_loop
    prof = held["prof"]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    breakdown = profile_breakdown(prof.key_averages(group_by_input_shape=True))
    breakdown["wall_seconds"] = held["wall"]
    return {"profile_table": table, "steps": summary["total_steps"], "real_tokens": summary["real_tokens"],
            "breakdown": breakdown}


def print_breakdown(result: dict, matmul_flops: float, n_params: int) -> None:
    """Where the profiled loop's time goes, and what utilisation would be if only the matmuls took time."""
    breakdown = result["breakdown"]
    wall = breakdown["wall_seconds"]
    parts = dict(breakdown["parts"])
    parts["outside ops (Python)"] = {"seconds": max(wall - breakdown["total_seconds"], 0.0), "flops": 0.0}
    print(f"\nTime of the training loop by part ({result['steps']} steps, {result['real_tokens']} real tokens, "
          f"{wall:.1f} s with the profiler on; machine matmul {matmul_flops / 1e9:.1f} GFLOP/s):")
    print(f"{'part':22} {'share':>6} {'seconds':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'of matmul':>9}")
    for name, part in parts.items():
        rate = part["flops"] / part["seconds"] if part["flops"] and part["seconds"] else 0.0
        cells = f"{part['flops'] / 1e9:8.1f} {rate / 1e9:8.1f} {rate / matmul_flops:9.0%}" if rate else ""
        print(f"{name:22} {part['seconds'] / wall:6.1%} {part['seconds']:8.2f} {cells}")
    counted = 4 * n_params * result["real_tokens"]
    matmul_seconds = sum(parts[k]["seconds"] for k in ("projection matmuls", "LoRA matmuls"))
    print(f"utilisation over the profiled loop: {counted / wall / matmul_flops:.1%}; if nothing but the matmuls "
          f"took time, at their rates above: {counted / matmul_seconds / matmul_flops:.1%}")


def _trl_rows(cfg: dict) -> list[dict]:
    """Canonical chat records as TRL's conversational prompt/completion rows (TRL masks the prompt)."""
    rows = []
    for record in _records(cfg):
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        rows.append({"prompt": messages[:last], "completion": [messages[last]]})
    return rows


def _run_trl(cfg: dict, out_dir: Path, packed: bool, checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from loralab.engine.models import resolve_base_model

    path = resolve_base_model(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = Dataset.from_list(_trl_rows(cfg))
    steps = cfg["steps"]
    # TRL's packing fills each of the batch's rows with up to max_length tokens, so it needs fewer steps for the
    # same rows: give it the same number of row-passes (epochs) instead of the same step count.
    epochs = steps * cfg["batch_size"] / cfg["rows"]
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=cfg["batch_size"], max_length=cfg["max_seq_len"],
        packing=packed, padding_free=False, completion_only_loss=True,
        learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=-1 if packed else steps, num_train_epochs=epochs if packed else 1.0,
        seed=cfg["seed"], data_seed=cfg["seed"], logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, bf16=False, fp16=False, use_cpu=True, dataloader_pin_memory=False,
        # TRL's default is gradient checkpointing on (the 41 tokens/s); the -nockpt contenders turn it off.
        gradient_checkpointing=checkpointing,
    )
    peft_config = LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM", bias="none")
    clock: dict = {}
    curve: list = []

    class CountingTrainer(SFTTrainer):
        """SFTTrainer that counts the non-padding tokens of every training batch."""

        tokens_seen = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                curve.append([state.global_step, holder["trainer"].tokens_seen, logs["loss"]])

    holder: dict = {}
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[Clock()])
    holder["trainer"] = trainer
    trainer.train()
    peak = _peak_rss_mb()
    seconds = clock["end"] - clock["start"]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "train_seconds": round(seconds, 3), "real_tokens": trainer.tokens_seen, "peak_rss_mb": peak,
        "steps": trainer.state.global_step, "final_loss": curve[-1][2] if curve else None, "curve": curve,
        "eval_loss": eval_loss(trainer.model, tokenizer, cfg), "trainable_params": trainable,
    }


def worker(name: str, cfg: dict, result_path: Path) -> None:
    """One contender in this (fresh) process; writes its figures to result_path."""
    import warnings

    warnings.filterwarnings("ignore")
    threads = _set_threads()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if name.startswith("loralab"):
            result = _run_loralab({**cfg, "checkpointing": name == "loralab-ckpt"}, Path(tmp))
        else:
            result = _run_trl(cfg, Path(tmp), packed=name.startswith("trl-packed"),
                              checkpointing=not name.endswith("-nockpt"))
    result["threads"] = threads
    result_path.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent: run, compare, print

def _spawn(name: str, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-result-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-config", json.dumps(cfg),
               "--worker-result", str(result_path)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
        if name.startswith("loralab"):  # the engine's process as the worker starts it (jemalloc when installed)
            env.update(allocator_env(env))
        env.update(EXTRA.get(name, {}))
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stderr or proc.stdout)[-3000:]
            return {"error": f"exit code {proc.returncode}", "stderr_tail": tail}
        result = json.loads(result_path.read_text())
        result["process_seconds"] = round(time.perf_counter() - started, 1)
        return result


def loss_at_tokens(curve: list, tokens: int) -> float | None:
    """The logged step loss at the first step whose cumulative real tokens reach `tokens`."""
    for _step, seen, loss in curve:
        if seen >= tokens:
            return loss
    return curve[-1][2] if curve else None


def _matmul_flops() -> float:

    _set_threads()
    return measure_matmul_flops(repeats=10, rounds=9)


def _n_params() -> int:
    from loralab.learn.calculator import estimate_lora

    return estimate_lora(MODEL, r=8).base_params


def summarise(results: dict, flops: float, n_params: int) -> dict:
    """Derived figures (tokens/s, utilisation, ratios, targets) from the raw per-contender results."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    for r in ok.values():
        r["tokens_per_s"] = r["real_tokens"] / r["train_seconds"] if r["train_seconds"] > 0 else 0.0
        r["achieved_flops"] = r["tokens_per_s"] * 4 * n_params
        r["utilisation"] = r["achieved_flops"] / flops
    common = min((r["real_tokens"] for r in ok.values()), default=0)
    for r in ok.values():
        r["loss_at_common_tokens"] = loss_at_tokens(r["curve"], common)
    out: dict = {"common_tokens": common, "ratios": {}, "targets": {}}
    for name in [n for n in ok if n.startswith("loralab")]:
        lab, tag = ok[name], "" if name == "loralab" else f"{name}: "
        for base, key in BASELINES.items():
            if base not in ok:
                continue
            ratio = lab["tokens_per_s"] / ok[base]["tokens_per_s"]
            out["ratios"][f"{name}/{base}"] = ratio
            out["targets"][f"{tag}tokens/s >= {TARGETS[key]:g}x {base}"] = ratio >= TARGETS[key]
            rel = abs(lab["eval_loss"] - ok[base]["eval_loss"]) / ok[base]["eval_loss"]
            out["targets"][f"{tag}final loss within 5% of {base} ({rel:.1%})"] = rel <= TARGETS["loss_rel"]
        out["targets"][f"{tag}utilisation >= 70% ({lab['utilisation']:.0%})"] = lab["utilisation"] >= TARGETS["utilisation"]
        out["targets"][f"{tag}peak RSS <= 1.5 GB ({lab['peak_rss_mb']:.0f} MB)"] = lab["peak_rss_mb"] <= TARGETS["peak_rss_mb"]
    return out


def print_report(cfg: dict, results: dict, derived: dict, flops: dict, n_params: int) -> None:
    print(f"\nmodel {MODEL} ({n_params / 1e6:.1f} M params), {cfg['rows']} rows of {Path(cfg['data']).name}, "
          f"max_seq_len {cfg['max_seq_len']}, batch {cfg['batch_size']}, LoRA r={cfg['r']} all-linear, "
          f"fp32, lr {cfg['lr']}, seed {cfg['seed']}, steps {cfg['steps']}")
    print(f"load average before: {flops['load_before']}, after: {flops['load_after']}")
    preload = allocator_env().get("LD_PRELOAD")
    print(f"engine allocator: {'jemalloc (' + preload + ')' if preload else 'glibc malloc'} "
          "(loralab-glibc: the engine on glibc's malloc)")
    print(f"machine matmul: {flops['best'] / 1e9:.1f} GFLOP/s fp32 ({'x'.join(map(str, flops['shape']))}, "
          f"before {flops['before'] / 1e9:.1f}, after {flops['after'] / 1e9:.1f}; best used)")
    print("utilisation = tokens/s x 4 x N_params / matmul FLOP/s   (N_params incl. embeddings, tied once)\n")
    head = (f"{'contender':<18} {'steps':>5} {'tokens':>7} {'train s':>8} {'tokens/s':>9} {'peak RSS MB':>11} "
            f"{'util':>6} {'last loss':>9} {'loss@' + str(derived['common_tokens']) + 'tok':>13} {'eval loss':>9}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} FAILED: {r['error']}\n{r['stderr_tail']}")
            continue
        print(f"{name:<18} {r['steps']:>5} {r['real_tokens']:>7} {r['train_seconds']:>8.1f} {r['tokens_per_s']:>9.1f} "
              f"{r['peak_rss_mb']:>11.0f} {r['utilisation']:>6.1%} {r['final_loss']:>9.4f} "
              f"{r['loss_at_common_tokens']:>13.4f} {r['eval_loss']:>9.4f}")
    print("\n'eval loss' = each trained model's mean assistant-token loss on the same rows, computed the same way.")
    for name, ratio in derived["ratios"].items():
        print(f"{name}: {ratio:.2f}x tokens/s")
    for name, held in derived["targets"].items():
        print(f"  [{'PASS' if held else 'FAIL'}] {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch over the rows)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="loralab's token budget per forward/backward piece (0 = the engine's automatic choice)")
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help="comma-separated: " + ",".join((*CONTENDERS, *EXTRA)))
    parser.add_argument("--json", dest="json_out", help="write every figure to this file")
    parser.add_argument("--profile", action="store_true", help="profile the loralab engine for a few steps instead")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, json.loads(args.worker_config), Path(args.worker_result))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS and n not in EXTRA]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {', '.join((*CONTENDERS, *EXTRA))}")
    if not Path(args.data).is_file():
        parser.error(f"data file not found: {args.data}")
    steps = args.steps or math.ceil(args.rows / args.batch_size)
    cfg = {"data": str(Path(args.data).resolve()), "rows": args.rows, "max_seq_len": args.max_seq_len,
           "batch_size": args.batch_size, "r": args.r, "steps": steps, "lr": args.lr, "seed": args.seed,
           "micro_batch_tokens": args.micro_batch_tokens}

    from loralab.engine.models import resolve_base_model

    resolve_base_model(MODEL)  # convert the embedded model once, outside every measurement
    if args.profile:
        result = _spawn("loralab", {**cfg, "profile_steps": args.profile_steps})
        if "error" in result:
            print(result)
            return 1
        print(result["profile_table"])
        print_breakdown(result, _matmul_flops(), _n_params())
        return 0

    load_before = os.getloadavg()
    before = _matmul_flops()
    results = {name: _spawn(name, cfg) for name in names}
    after = _matmul_flops()
    flops = {"before": before, "after": after, "best": max(before, after), "shape": list(MATMUL_SHAPE),
             "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
    n_params = _n_params()
    derived = summarise(results, flops["best"], n_params)
    print_report(cfg, results, derived, flops, n_params)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"config": cfg, "matmul": flops, "n_params": n_params,
                                                   "results": results, **derived}, indent=2))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
