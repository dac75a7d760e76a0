"""Scale-out: torchrun launch (DDP, FSDP, DeepSpeed), rank helpers, QLoRA loading and runtime checks.

The module imports no torch at import time: the runner builds launch commands with it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).with_name("configs")
SHIPPED_CONFIGS = {
    "fsdp": "fsdp.json", "fsdp_offload": "fsdp_offload.json",
    "zero2": "zero2.json", "zero3_offload": "zero3_offload.json",
}
DEFAULT_CONFIG = {"fsdp": "fsdp", "deepspeed": "zero2"}
ENGINE_MODULE = "loralab.engine.run"


@dataclass(frozen=True)
class RuntimeProblem:
    """A reason this machine cannot run a spec, worded so the user knows what to change."""

    code: str
    message: str
    param: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


# ---- launching -------------------------------------------------------------------------------


def _distributed(spec: Any) -> Any:
    return spec.distributed if hasattr(spec, "distributed") else _as_spec(spec).distributed


def _as_spec(spec: Any):
    from loralab.spec import TrainSpec

    return spec if isinstance(spec, TrainSpec) else TrainSpec.model_validate(spec)


def uses_torchrun(spec: Any) -> bool:
    """True when the spec (TrainSpec or its dict) asks for a torchrun launch."""
    if isinstance(spec, dict):
        return (spec.get("distributed") or {}).get("strategy", "none") not in ("none", None)
    return spec.distributed.strategy != "none"


def launch_command(spec: Any, run_dir: Path | str, python: str | None = None,
                   module: str = ENGINE_MODULE, node_rank: int | None = None) -> list[str]:
    """The argv that runs the engine for this spec: torchrun for several processes, else python -m."""
    python = python or sys.executable
    if not uses_torchrun(spec):
        return [python, "-m", module, str(run_dir)]
    d = _distributed(spec)
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(d.nproc_per_node)]
    if d.nnodes == 1:
        # A rendezvous on a free local port: two jobs on one host never fight over 29500.
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        cmd += ["--nnodes", str(d.nnodes), "--node_rank", str(d.node_rank if node_rank is None else node_rank),
                "--master_addr", d.master_addr, "--master_port", str(d.master_port)]
    return [*cmd, "-m", module, str(run_dir)]


def rendezvous_problem(spec: Any, allowed_hosts: list[str]) -> RuntimeProblem | None:
    """A multi-node spec whose master_addr is not one of the operator's hosts (torchrun would connect anywhere)."""
    d = (spec.get("distributed") or {}) if isinstance(spec, dict) else _distributed(spec).model_dump()
    if int(d.get("nnodes") or 1) <= 1:
        return None  # single node: torchrun --standalone, master_addr is not used
    addr = str(d.get("master_addr") or "").strip().lower()
    if addr in {h.strip().lower() for h in allowed_hosts if h.strip()}:
        return None
    hosts = ", ".join(allowed_hosts) if allowed_hosts else "none: only single-node jobs are allowed"
    return RuntimeProblem("host_not_allowed", f"distributed.master_addr {addr!r} is not a rendezvous host this "
                          f"server allows ({hosts}); use one of them, or ask the operator to add it to "
                          "LORALAB_DISTRIBUTED_HOSTS", "distributed.master_addr")


def exit_code_from_events(rc: int, seen: set[str]) -> int:
    """torchrun exits 1 whenever a rank exits non-zero; recover the engine's own code from its events."""
    from loralab.engine.run import EXIT_CANCELLED, EXIT_OK

    if rc != EXIT_OK and "error" not in seen and seen & {"cancelled", "interrupted"}:
        return EXIT_CANCELLED
    return rc


def launch(spec: Any, run_dir: Path | str, node_rank: int | None = None) -> int:
    """Write RUN_DIR/spec.json and run the engine through torchrun in the foreground; returns the engine's exit code.

    What `loralab train` does when `distributed.strategy` is set (on every host, each with its node_rank).
    """
    import subprocess

    from loralab.engine.events import read_events

    spec = _as_spec(spec)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    rc = subprocess.call(launch_command(spec, run_dir, node_rank=node_rank))
    return exit_code_from_events(rc, {e.get("type") for e in read_events(run_dir)})


def main(argv: list[str] | None = None) -> int:
    """`python -m loralab.engine.distributed [--print] [--node-rank K] RUN_DIR`: torchrun the spec in RUN_DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loralab.engine.distributed", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--node-rank", type=int, default=None, help="this host's rank (several hosts)")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(argv)
    spec = _as_spec(json.loads((args.run_dir / "spec.json").read_text(encoding="utf-8")))
    problems = check_runtime(spec)
    if problems and not args.print:
        for problem in problems:
            print(f"error: {problem.message} ({problem.param})", file=sys.stderr)
        return 1
    if args.print:
        import shlex

        print(shlex.join(launch_command(spec, args.run_dir, node_rank=args.node_rank)))
        return 0
    return launch(spec, args.run_dir, node_rank=args.node_rank)


# ---- inside a rank ---------------------------------------------------------------------------


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Global rank 0 writes events, metrics, checkpoint state and the final adapter."""
    return rank() == 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def die_with_parent(sig: int | None = None) -> None:
    """Have Linux send `sig` (default SIGKILL) to this process when its parent dies.

    torchrun ranks run in their own sessions, out of the supervisor's reach: SIGKILL. The engine under a worker gets
    SIGTERM: a worker that died (OOM-killed, SIGKILL, a lost host process) leaves no orphan training on, writing into
    a run directory another attempt will use; the engine checkpoints and exits 3, and the requeued job resumes.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL if sig is None else sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent already died before prctl took effect
        if sig is None or sig == signal.SIGKILL:
            os._exit(137)
        os.kill(os.getpid(), sig)


def placement_for_rank(placement):
    """Split the CPU cores between the ranks of this host (torchrun otherwise leaves each one thread)."""
    if placement.device != "cpu" or local_world_size() <= 1:
        return placement
    return replace(placement, threads=max(1, placement.threads // local_world_size()))


def rank_device(device: str) -> str:
    """This rank's own GPU under torchrun (cuda:LOCAL_RANK), so ranks never all load onto GPU 0."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def save_checkpoint_atomically(trainer, save) -> None:
    """Run the Trainer's checkpoint save into a hidden staging directory, then rename it into place.

    A kill while writing leaves `.checkpoint-N.tmp` (ignored) and the previous checkpoint intact.
    Every rank writes its RNG state into the staging directory before rank 0 renames it.
    """
    import shutil

    from transformers.trainer_utils import rotate_checkpoints

    root = Path(trainer.args.output_dir)
    name = f"checkpoint-{trainer.state.global_step}"
    staging = root / f".{name}.tmp"
    main = trainer.args.should_save
    if main:
        for stale in root.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    trainer.staging_dir = str(staging)
    try:
        save()
    finally:
        trainer.staging_dir = None
    trainer.accelerator.wait_for_everyone()
    if main:
        final = root / name
        if final.exists():  # the same step saved twice (a cancel right after a scheduled save): same state
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(root)
        rotate_checkpoints(str(root), trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
    trainer.accelerator.wait_for_everyone()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_final_model(trainer, model, tokenizer, run_dir: Path, spec: Any) -> None:
    """Write the final adapter (or full model) and tokenizer from rank 0; sharded models gather first."""
    if spec.distributed.strategy in ("fsdp", "deepspeed"):
        trainer.save_model(str(run_dir))  # a collective: every rank takes part, rank 0 writes
        if is_main_process():
            (Path(run_dir) / "training_args.bin").unlink(missing_ok=True)  # a pickle; the spec says it all
    elif is_main_process():
        model.save_pretrained(run_dir, safe_serialization=True)
    if is_main_process():
        tokenizer.save_pretrained(run_dir)


def global_sum(trainer, value: int) -> int:
    """Sum an integer over all ranks (every rank must call it at the same point)."""
    if trainer.args.world_size <= 1:
        return int(value)
    import torch

    total = trainer.accelerator.reduce(torch.tensor([int(value)], device=trainer.args.device), reduction="sum")
    return int(total.item())


def load_config(name_or_path: str) -> dict[str, Any]:
    """A shipped FSDP/DeepSpeed config by name, or a JSON/YAML file."""
    path = CONFIG_DIR / SHIPPED_CONFIGS[name_or_path] if name_or_path in SHIPPED_CONFIGS else Path(name_or_path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping")
    return data


def trainer_arguments(spec: Any, placement) -> dict[str, Any]:
    """TrainingArguments fields for the process group: backend, token averaging, FSDP or DeepSpeed."""
    d = spec.distributed
    # Loss = summed token losses / tokens of the whole global batch, as in one process with the same batch.
    out: dict[str, Any] = {"average_tokens_across_devices": world_size() > 1}
    if world_size() > 1:
        out["ddp_find_unused_parameters"] = False
        if placement.device == "cpu":
            out["ddp_backend"] = "gloo"
    config_name = d.config or DEFAULT_CONFIG.get(d.strategy)
    if d.strategy == "fsdp":
        out["fsdp"] = True
        out["fsdp_config"] = load_config(config_name)
    elif d.strategy == "deepspeed":
        out["deepspeed"] = load_config(config_name)
    return out


# ---- model loading ---------------------------------------------------------------------------


def choose_attention(packing: bool, device: str) -> str:
    """Flash Attention 2 on CUDA when installed (it packs through position ids), else packed SDPA or SDPA."""
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if packing:
        from loralab.engine.attention import register_packed_attention

        return register_packed_attention()
    return "sdpa"


def load_qlora_base(name: str, attn_implementation: str, gradient_checkpointing: bool = True):
    """A 4-bit NF4 base (double quantisation, bf16 compute) ready for LoRA training on CUDA."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loralab.engine.models import resolve_base_model

    resolved = resolve_base_model(name)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, quantization_config=quant, dtype=compute, attn_implementation=attn_implementation,
        device_map={"": local_rank}, use_kernels=False,  # see models.load_model
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


# ---- runtime checks --------------------------------------------------------------------------


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_runtime(spec: Any) -> list[RuntimeProblem]:
    """What stops this machine from running the spec (QLoRA without CUDA, FSDP without GPUs...); [] = fine."""
    spec = _as_spec(spec)
    d = spec.distributed
    problems: list[RuntimeProblem] = []
    needs_gpu = spec.method == "qlora" or d.strategy in ("fsdp", "deepspeed")
    wants_many = d.nproc_per_node > 1
    if not (needs_gpu or wants_many or spec.device == "cuda"):
        return problems
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = spec.device if spec.device != "auto" else ("cuda" if gpus else "cpu")
    if spec.device == "cuda" and not gpus:
        problems.append(RuntimeProblem("no_gpu", "device='cuda' was asked for but this machine has no CUDA GPU; "
                                       "use device='auto' or 'cpu'", "device"))
    if spec.method == "qlora":
        if not gpus or device != "cuda":
            problems.append(RuntimeProblem(
                "qlora_unavailable", "method='qlora' needs a CUDA GPU: bitsandbytes' 4-bit NF4 kernels have no "
                "usable backend on this machine. Use method='lora' (or train on a GPU server)", "method"))
        elif not _has("bitsandbytes"):
            problems.append(RuntimeProblem("qlora_unavailable", "method='qlora' needs the bitsandbytes package: "
                                           "pip install bitsandbytes", "method"))
    if d.strategy in ("fsdp", "deepspeed") and device != "cuda":
        problems.append(RuntimeProblem(
            "gpu_required", f"distributed.strategy='{d.strategy}' shards the model over GPUs and this machine "
            "has none; use strategy 'ddp' (gloo on CPUs) or 'none'", "distributed.strategy"))
    if d.strategy == "deepspeed" and not _has("deepspeed"):
        problems.append(RuntimeProblem("deepspeed_missing", "distributed.strategy='deepspeed' needs the deepspeed "
                                       "package: pip install deepspeed", "distributed.strategy"))
    if d.strategy == "fsdp" and spec.method == "qlora":
        problems.append(RuntimeProblem("unsupported", "QLoRA with FSDP is not supported here; use strategy 'ddp' "
                                       "(the 4-bit base fits each GPU) or method 'lora'", "distributed.strategy"))
    if device == "cuda" and gpus and d.nproc_per_node > gpus:
        problems.append(RuntimeProblem(
            "not_enough_gpus", f"distributed.nproc_per_node={d.nproc_per_node} but this host has {gpus} GPU(s)",
            "distributed.nproc_per_node"))
    if device == "cpu" and wants_many:
        cores = os.cpu_count() or 1
        if d.nproc_per_node > cores:
            problems.append(RuntimeProblem(
                "not_enough_cores", f"distributed.nproc_per_node={d.nproc_per_node} exceeds the {cores} CPU cores",
                "distributed.nproc_per_node"))
    if d.config:
        try:
            load_config(d.config)
        except (OSError, ValueError) as exc:
            problems.append(RuntimeProblem("config_unreadable", f"distributed.config {d.config!r}: {exc}; use "
                                           f"one of {', '.join(SHIPPED_CONFIGS)} or a JSON/YAML file",
                                           "distributed.config"))
    return problems


if __name__ == "__main__":
    sys.exit(main())
