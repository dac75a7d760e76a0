"""Scale-out pieces without GPUs: the torchrun command, runtime checks, shipped configs, tracking; GPU paths marked `gpu`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from loralab.engine import distributed, tracking
from loralab.engine.hardware import Placement
from loralab.engine.run import EXIT_CANCELLED, EXIT_OK
from loralab.spec import DataSpec, TrainSpec

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def spec(**overrides) -> TrainSpec:
    return TrainSpec(data=DataSpec(path="data.jsonl"), **overrides)


def test_launch_command_single_host_and_several_hosts(tmp_path):
    one = spec(distributed={"strategy": "ddp", "nproc_per_node": 4})
    assert distributed.launch_command(one, tmp_path, python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone", "--nnodes", "1",
        "-m", "loralab.engine.run", str(tmp_path)]
    many = spec(distributed={"strategy": "fsdp", "nproc_per_node": 8, "nnodes": 2, "node_rank": 1,
                             "master_addr": "10.0.0.5", "master_port": 29600})
    cmd = distributed.launch_command(many.model_dump(mode="json"), "RUN", python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
                   "--master_addr", "10.0.0.5", "--master_port", "29600", "-m", "loralab.engine.run", "RUN"]
    assert distributed.launch_command(spec(), "RUN", python="py") == ["py", "-m", "loralab.engine.run", "RUN"]
    assert not distributed.uses_torchrun(spec().model_dump(mode="json"))


def test_distributed_spec_is_checked():
    with pytest.raises(ValidationError, match="node_rank"):
        spec(distributed={"strategy": "ddp", "nnodes": 2, "node_rank": 2})
    with pytest.raises(ValidationError, match="need a strategy"):
        spec(distributed={"nproc_per_node": 2})
    with pytest.raises(ValidationError, match="fsdp"):
        spec(distributed={"strategy": "ddp", "config": "zero2"})
    with pytest.raises(ValidationError):
        spec(distributed={"strategy": "ddp", "master_addr": "-oops; rm -rf /"})
    with pytest.raises(ValidationError):
        spec(distributed={"strategy": "ddp", "backend": "nccl"})  # unknown keys are rejected


def test_torchrun_exit_code_is_recovered_from_events():
    assert distributed.exit_code_from_events(1, {"started", "step", "cancelled"}) == EXIT_CANCELLED
    assert distributed.exit_code_from_events(1, {"started", "interrupted"}) == EXIT_CANCELLED
    assert distributed.exit_code_from_events(1, {"started", "error"}) == 1
    assert distributed.exit_code_from_events(EXIT_OK, {"done"}) == EXIT_OK


def test_runtime_checks_on_this_machine():
    assert distributed.check_runtime(spec()) == []
    assert distributed.check_runtime(spec(distributed={"strategy": "ddp", "nproc_per_node": 2})) == []
    if HAS_CUDA:
        pytest.skip("the refusals below are for machines without CUDA")
    (qlora,) = distributed.check_runtime(spec(method="qlora"))
    assert qlora.code == "qlora_unavailable" and qlora.param == "method" and "CUDA" in qlora.message
    codes = {p.code for p in distributed.check_runtime(spec(distributed={"strategy": "fsdp", "nproc_per_node": 2}))}
    assert "gpu_required" in codes
    codes = {p.code for p in distributed.check_runtime(spec(distributed={"strategy": "deepspeed", "config": "nope.json"}))}
    assert {"gpu_required", "config_unreadable"} <= codes
    assert distributed.check_runtime(spec(device="cuda"))[0].code == "no_gpu"


def test_shipped_configs_and_trainer_arguments(monkeypatch):
    for name in distributed.SHIPPED_CONFIGS:
        assert isinstance(distributed.load_config(name), dict)
    zero3 = distributed.load_config("zero3_offload")["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["offload_param"]["device"] == "cpu" == zero3["offload_optimizer"]["device"]
    assert distributed.load_config("fsdp_offload")["cpu_offload"] is True
    cpu = Placement("cpu", "fp32", 2)
    assert distributed.trainer_arguments(spec(), cpu) == {"average_tokens_across_devices": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = distributed.trainer_arguments(spec(distributed={"strategy": "ddp", "nproc_per_node": 2}), cpu)
    assert args["average_tokens_across_devices"] is True and args["ddp_backend"] == "gloo"
    fsdp = distributed.trainer_arguments(spec(distributed={"strategy": "fsdp", "nproc_per_node": 2}),
                                         Placement("cuda", "bf16", 8))
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2 and "ddp_backend" not in fsdp
    ds = distributed.trainer_arguments(spec(distributed={"strategy": "deepspeed", "config": "zero3_offload",
                                                         "nproc_per_node": 2}), Placement("cuda", "bf16", 8))
    assert ds["deepspeed"]["zero_optimization"]["stage"] == 3
    assert distributed.placement_for_rank(cpu).threads == 1  # two ranks share the two cores


def test_yaml_config_file(tmp_path):
    path = tmp_path / "ds.yaml"
    path.write_text("zero_optimization:\n  stage: 2\n")
    assert distributed.load_config(str(path)) == {"zero_optimization": {"stage": 2}}


def test_tracking_picks_only_installed_and_configured_integrations(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr(tracking, "_importable", lambda *names: False)
    assert tracking.configure(tmp_path) == ([], {})
    monkeypatch.setattr(tracking, "_importable", lambda *names: True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("WANDB_MODE", "offline")
    report_to, links = tracking.configure(tmp_path / "run")
    assert report_to == ["tensorboard", "mlflow", "wandb"]
    assert links["tensorboard"]["logdir"] == str(tmp_path / "run" / "tensorboard")
    assert links["mlflow"]["tracking_uri"] == "http://127.0.0.1:5000" and links["wandb"]["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.configure(tmp_path)[0] == ["tensorboard"]


@pytest.mark.skipif(not tracking.tensorboard_available(), reason="tensorboard / tensorboardX not installed")
def test_tensorboard_logs_in_the_run_directory(tmp_path, tiny_model_dir):
    from loralab.engine.run import execute

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello there"}\n' * 4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.json").write_text(TrainSpec(base_model=str(tiny_model_dir), data=DataSpec(path=str(data)),
                                             max_steps=2, max_seq_length=32).model_dump_json())
    assert execute(run, install_signals=False) == EXIT_OK
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "summary.json").read_text())["tracking"]["tensorboard"]["logdir"] == str(run / "tensorboard")


def test_recommended_settings_come_from_the_estimator():
    from loralab.engine.recommend import Setting, peak_bytes, recommend_setting

    small = recommend_setting("0.5B", 24)
    assert small.method == "lora" and small.max_seq_length == 2048 and small.peak_gib <= 24 * 1e9 * 0.9 / 2**30
    assert peak_bytes("0.5B", "lora", small.per_device_train_batch_size, 2048, small.gradient_checkpointing) \
        == int(small.peak_gib * 2**30) or abs(peak_bytes("0.5B", "lora", small.per_device_train_batch_size, 2048,
                                                          small.gradient_checkpointing) / 2**30 - small.peak_gib) < 1e-6
    assert peak_bytes("0.5B", "qlora", 1, 1024, True) < peak_bytes("0.5B", "lora", 1, 1024, True)
    assert Setting("32B", 8, None).cell().startswith("no fit")


# ---- GPU paths: run on a CUDA machine (`pytest -m gpu`) ----------------------------------------

def _gpu_run(tmp_path, tiny_model_dir, **overrides) -> Path:
    import subprocess

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello there"}\n' * 16)
    run = tmp_path / "run"
    run.mkdir()
    s = TrainSpec(base_model=str(tiny_model_dir), data=DataSpec(path=str(data)), max_steps=3, max_seq_length=32,
                  per_device_train_batch_size=2, **overrides)
    assert distributed.check_runtime(s) == []
    (run / "spec.json").write_text(s.model_dump_json())
    proc = subprocess.run(distributed.launch_command(s, run), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "adapter_model.safetensors").is_file()
    return run


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not distributed._has("bitsandbytes"), reason="bitsandbytes not installed")
def test_qlora_on_cuda(tmp_path, tiny_model_dir):
    run = _gpu_run(tmp_path, tiny_model_dir, method="qlora")
    assert json.loads((run / "summary.json").read_text())["method"] == "qlora"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_on_two_gpus(tmp_path, tiny_model_dir):
    _gpu_run(tmp_path, tiny_model_dir, distributed={"strategy": "fsdp", "nproc_per_node": 2})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not distributed._has("deepspeed"), reason="deepspeed not installed")
@pytest.mark.parametrize("config", ["zero2", "zero3_offload"])
def test_deepspeed_on_cuda(tmp_path, tiny_model_dir, config):
    n = min(2, torch.cuda.device_count())
    _gpu_run(tmp_path, tiny_model_dir, distributed={"strategy": "deepspeed", "config": config, "nproc_per_node": n})


def test_engine_import_stays_light():
    import subprocess

    code = "import sys, loralab.engine.distributed, loralab.engine.tracking; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
