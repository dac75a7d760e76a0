"""A stand-in for `python -m loralab.engine.run RUN_DIR` that follows the run-directory contract without torch.

Usage: python tests/fake_engine.py [--scenario FILE] RUN_DIR. The scenario (JSON) sets total_steps,
step_seconds, save_steps, crash_at_step + crash_code (exit without events), error_at_step (error event,
exit 1), ignore_sigterm, stderr. SIGTERM writes a checkpoint, a `cancelled` event and exits 3. A run whose
RUN_DIR/checkpoints holds checkpoint-N resumes at step N+1.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

DEFAULTS = {"total_steps": 5, "step_seconds": 0.05, "save_steps": 0, "crash_at_step": None, "crash_code": 7,
            "error_at_step": None, "ignore_sigterm": False, "stderr": ""}


def emit(run_dir: Path, type_: str, **fields) -> None:
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"type": type_, "time": round(time.time(), 3), **fields}) + "\n")
        fh.flush()


def save_checkpoint(run_dir: Path, step: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    tmp, final = root / f".tmp-{step}", root / f"checkpoint-{step}"
    tmp.mkdir(exist_ok=True)
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if not final.exists():
        os.replace(tmp, final)
    emit(run_dir, "checkpoint", step=step, path=str(final))
    return final


def newest_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")] \
        if (run_dir / "checkpoints").is_dir() else []
    return max(steps, default=0)


def main(argv: list[str]) -> int:
    scenario = dict(DEFAULTS)
    if argv[:1] == ["--scenario"]:
        scenario.update(json.loads(Path(argv[1]).read_text()))
        argv = argv[2:]
    run_dir = Path(argv[0])
    spec = json.loads((run_dir / "spec.json").read_text())
    total = scenario["total_steps"]
    state = {"step": newest_checkpoint(run_dir), "stop": False}
    if scenario["stderr"]:
        print(scenario["stderr"], file=sys.stderr, flush=True)

    def on_term(*_):
        state["stop"] = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if scenario["ignore_sigterm"] else on_term)
    emit(run_dir, "started", total_steps=total, num_examples=8, trainable_params=1234, device="cpu",
         dtype="float32", resumed_from_step=state["step"])
    while state["step"] < total:
        if state["stop"]:
            path = save_checkpoint(run_dir, state["step"])
            emit(run_dir, "cancelled", step=state["step"], checkpoint=str(path))
            return 3
        step = state["step"] + 1
        if scenario["crash_at_step"] == step:
            print(f"Segmentation fault at step {step}", file=sys.stderr, flush=True)
            os._exit(scenario["crash_code"])
        if scenario["error_at_step"] == step:
            emit(run_dir, "error", code="out_of_memory", message="ran out of memory at step %d" % step, param=None)
            return 1
        time.sleep(scenario["step_seconds"])
        state["step"] = step
        emit(run_dir, "step", step=step, total_steps=total, epoch=step / total, loss=round(2.0 / step, 4),
             learning_rate=1e-4, grad_norm=1.0, tokens=100, tokens_per_s=1000.0,
             eta_s=round((total - step) * scenario["step_seconds"], 3))
        if scenario["save_steps"] and step % scenario["save_steps"] == 0:
            save_checkpoint(run_dir, step)
    (run_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (run_dir / "adapter_model.safetensors").write_bytes(b"fake")
    summary = {"train_seconds": 0.1, "real_tokens": 100 * total, "tokens_per_s": 1000.0, "peak_rss_mb": 10.0,
               "final_loss": round(2.0 / total, 4), "trainable_params": 1234, "total_steps": total,
               "method": spec.get("method", "lora"), "base_model": spec.get("base_model"), "device": "cpu",
               "dtype": "float32"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    emit(run_dir, "done", **summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
