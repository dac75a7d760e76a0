"""One placement for every model use: each decision of choose_inference_placement on made-up GPU inventories, the
loaders and the batching decoder on the CPU, and evaluation (CLI and jobs) placed by training's rule."""
from __future__ import annotations

import json
import shutil

import pytest

from loralab.engine import hardware
from loralab.engine.hardware import GiB, Gpu, ModelSize, PlacementError, choose_inference_placement

SEVEN_B = ModelSize(7_000_000_000, 260_000_000)  # ~14 GB in bf16, ~4 GB in NF4


def a100(index=0, free=80 * GiB):
    return Gpu(index, bf16=True, free_bytes=free, total_bytes=80 * GiB, name="A100")


def t4(index=0, free=15 * GiB):
    return Gpu(index, bf16=False, free_bytes=free, total_bytes=16 * GiB, name="T4")


def place(size=SEVEN_B, gpus=(), **kw):
    kw.setdefault("mps", False)
    kw.setdefault("bitsandbytes", True)
    kw.setdefault("cpu_available_bytes", 512 * GiB)
    return choose_inference_placement(size, gpus=list(gpus), **kw)


# ---- which device, which dtype ----

def test_cpu_machine_runs_fp32_on_the_cpu():
    p = place(gpus=[])
    assert (p.device, p.dtype, p.device_map, p.quantization) == ("cpu", "fp32", None, None)
    assert p.weights_bytes == SEVEN_B.params * 4 and "no CUDA GPU" in p.reason


def test_bf16_gpu_gets_bf16_on_that_gpu():
    p = place(gpus=[a100()])
    assert (p.device, p.dtype, p.device_map, p.quantization) == ("cuda", "bf16", {"": 0}, None)
    assert p.weights_bytes == SEVEN_B.params * 2 and p.describe()["device_map"] == "single"


def test_gpu_without_native_bf16_gets_fp16():
    assert place(ModelSize(1_000_000_000), gpus=[t4()]).dtype == "fp16"
    assert place(gpus=[a100(0), t4(1)]).dtype == "fp16"  # the dtype must suit every GPU it may spread over


def test_the_gpu_with_most_free_memory_is_chosen():
    p = place(gpus=[a100(0, free=20 * GiB), a100(1, free=70 * GiB)])
    assert p.device_map == {"": 1} and "cuda:1" in p.reason


def test_mps_when_present_and_no_cuda():
    p = place(gpus=[], mps=True)
    assert (p.device, p.dtype, p.device_map) == ("mps", "fp32", None)


def test_device_cpu_is_honoured_on_a_gpu_machine():
    p = place(gpus=[a100()], device="cpu")
    assert (p.device, p.dtype, p.device_map) == ("cpu", "fp32", None)


# ---- device_map auto across GPUs ----

def test_model_larger_than_one_gpu_spreads_over_several():
    big = ModelSize(30_000_000_000, 1_000_000_000)  # ~56 GiB in bf16
    gpus = [a100(0, free=40 * GiB), a100(1, free=40 * GiB)]
    p = place(big, gpus)
    assert p.device_map == "auto" and p.device == "cuda" and p.dtype == "bf16"
    # accelerate is bounded per GPU below its free memory: room stays for the KV cache
    assert set(p.max_memory) == {0, 1}
    assert all(b < 40 * GiB - hardware.INFERENCE_RESERVE_BYTES for b in p.max_memory.values())
    assert sum(p.max_memory.values()) >= p.weights_bytes
    assert p.describe()["gpus"] == [0, 1] and p.describe()["device_map"] == "auto"


def test_a_model_that_just_fits_free_memory_is_not_put_on_one_gpu():
    # 14 GB of bf16 weights on a GPU with 15 GiB free: no room left for the KV cache -> spread over two
    gpus = [a100(0, free=15 * GiB), a100(1, free=15 * GiB)]
    assert place(SEVEN_B, gpus).device_map == "auto"


def test_model_larger_than_all_gpus_is_refused_with_the_fix():
    big = ModelSize(30_000_000_000, 1_000_000_000)
    with pytest.raises(PlacementError) as info:
        place(big, [a100(0, free=22 * GiB)])
    message = str(info.value)
    assert "GiB" in message and "4-bit" in message and "LORALAB_INFERENCE_DEVICE=cpu" in message
    huge = ModelSize(400_000_000_000, 2_000_000_000)  # not even 4-bit fits: 4-bit is not offered
    with pytest.raises(PlacementError) as info:
        place(huge, [a100(0, free=22 * GiB)])
    assert "4-bit" not in str(info.value) and "smaller model" in str(info.value)


def test_unknown_size_goes_whole_onto_the_freest_gpu():
    p = place(None, [a100(0, free=10 * GiB), a100(1, free=30 * GiB)])
    assert p.device_map == {"": 1} and p.weights_bytes is None and "unknown" in p.reason


# ---- 4-bit ----

def test_four_bit_fits_a_model_that_16_bit_does_not():
    gpus = [t4(0, free=15 * GiB)]
    with pytest.raises(PlacementError):
        place(ModelSize(13_000_000_000, 300_000_000), gpus)
    p = place(ModelSize(13_000_000_000, 300_000_000), gpus, quantization="4bit")
    assert (p.quantization, p.dtype, p.device_map) == ("4bit", "fp16", {"": 0})
    assert p.weights_bytes < 13_000_000_000 * 0.6 and "NF4" in p.reason


def test_four_bit_computes_in_bf16_where_supported():
    assert place(gpus=[a100()], quantization="4bit").dtype == "bf16"
    assert place(gpus=[a100()], quantization="none").quantization is None


def test_four_bit_without_cuda_is_refused():
    with pytest.raises(PlacementError, match="CUDA") as info:
        place(gpus=[], quantization="4bit")
    assert "LORALAB_INFERENCE_QUANTIZATION=none" in str(info.value)
    with pytest.raises(PlacementError, match="device='cpu'"):
        place(gpus=[a100()], device="cpu", quantization="4bit")
    with pytest.raises(PlacementError, match="CUDA"):
        place(gpus=[], mps=True, quantization="4bit")


def test_four_bit_without_bitsandbytes_is_refused():
    with pytest.raises(PlacementError, match="pip install bitsandbytes"):
        place(gpus=[a100()], quantization="4bit", bitsandbytes=False)


def test_weights_bytes_by_dtype_and_quantization():
    size = ModelSize(1000, 200)
    assert size.weights_bytes("fp32") == 4000 and size.weights_bytes("bf16") == 2000
    assert size.weights_bytes("bf16", "4bit") == int(800 * hardware.NF4_BYTES_PER_PARAM + 200 * 2)


# ---- refusals ----

def test_cuda_asked_for_but_absent_is_refused():
    with pytest.raises(PlacementError, match="no CUDA GPU"):
        place(gpus=[], device="cuda")
    with pytest.raises(PlacementError, match="MPS"):
        place(gpus=[], device="mps")


def test_half_precision_on_the_cpu_is_refused_as_in_training():
    with pytest.raises(PlacementError, match="emulated"):
        place(gpus=[], precision="bf16")


def test_cpu_model_larger_than_memory_is_refused():
    with pytest.raises(PlacementError) as info:
        place(SEVEN_B, [], cpu_available_bytes=16 * GiB)
    assert "26.1 GiB" in str(info.value) and "16.0 GiB" in str(info.value)


def test_unknown_values_are_refused():
    with pytest.raises(PlacementError, match="quantization"):
        place(quantization="8bit")
    with pytest.raises(PlacementError, match="device"):
        place(device="tpu")


# ---- the same rule as training ----

@pytest.mark.parametrize("gpus", [[], [a100()], [t4()], [a100(0), a100(1)], [a100(0), t4(1)]])
def test_same_device_and_dtype_as_training(gpus):
    train = hardware.choose_placement("auto", "auto", gpus=gpus, mps=False)
    serve = place(ModelSize(1000), gpus)
    assert (serve.device, serve.dtype) == (train.device, train.dtype)


def test_both_rules_read_the_same_gpu_probe(monkeypatch):
    monkeypatch.setattr(hardware, "probe_gpus", lambda memory=True: [t4()])
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    train = hardware.choose_placement()
    serve = choose_inference_placement(ModelSize(1000))
    assert (train.device, train.dtype) == (serve.device, serve.dtype) == ("cuda", "fp16")


# ---- model size, loading and the batching decoder on the CPU ----

def test_model_size_from_safetensors_and_from_config(tiny_model_dir, tmp_path):
    from loralab.engine.models import load_model, model_size

    size = model_size(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    assert size.params == sum(p.numel() for p in model.parameters())
    assert 0 < size.unquantized_params < size.params  # embeddings (tied head) and norms
    config_only = tmp_path / "config-only"
    shutil.copytree(tiny_model_dir, config_only)
    for weights in config_only.glob("*.safetensors"):
        weights.unlink()
    assert model_size(str(config_only)) == size


def test_load_model_follows_a_cpu_placement(tiny_model_dir):
    import torch

    from loralab.engine.models import inference_placement, load_for_inference

    placement = inference_placement(str(tiny_model_dir), device="cpu")
    assert (placement.device, placement.dtype) == ("cpu", "fp32") and placement.weights_bytes > 0
    model, _tokenizer = load_for_inference(str(tiny_model_dir), placement=placement)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_batching_decoder_keeps_its_tensors_on_the_model_device(tiny_model_dir, monkeypatch):
    from loralab.services import inference

    monkeypatch.setenv("LORALAB_INFERENCE_DEVICE", "cpu")
    engine = inference.InferenceEngine(max_bases=1)
    try:
        worker = engine.worker(str(tiny_model_dir), resolved=True)
        assert worker.placement.device == "cpu" and worker.device.type == "cpu"
        assert inference.loaded_workers() == [] and engine.workers() == [worker]
        prompts = [worker.encode(prompt="hello world"), worker.encode(prompt="the capital of France")]
        samplings = [inference.Sampling(max_tokens=6, temperature=0.8, seed=1, repetition_penalty=1.3,
                                        frequency_penalty=0.5),
                     inference.Sampling(max_tokens=3)]
        first = worker.submit(prompts, None, samplings).result()
        again = worker.submit(prompts, None, samplings).result()
        assert [c.text for c in first] == [c.text for c in again]  # seeded row generators on the model's device
        assert first[1].completion_tokens <= 3 and worker.steps > 0
    finally:
        engine.close()


def test_serving_refuses_four_bit_on_this_machine_with_the_reason(tiny_model_dir, monkeypatch):
    from loralab.services import inference

    monkeypatch.setenv("LORALAB_INFERENCE_QUANTIZATION", "4bit")
    monkeypatch.setattr(hardware, "probe_gpus", lambda memory=True: [])
    engine = inference.InferenceEngine(max_bases=1)
    with pytest.raises(PlacementError, match="CUDA"):
        engine.worker(str(tiny_model_dir), resolved=True)
    assert engine.workers() == []


def test_system_info_shows_the_serving_placement(loralab_home, tiny_model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app
    from loralab.settings import get_settings

    shutil.copytree(tiny_model_dir, loralab_home / "models" / "tiny")
    monkeypatch.setattr(hardware, "probe_gpus", lambda memory=True: [])
    with TestClient(create_app(get_settings(), mount_web_ui=False), base_url="http://127.0.0.1") as client:
        serving = client.get("/api/system-info").json()["serving"]
        assert serving["device"] == "cpu" and serving["dtype"] == "fp32" and serving["error"] is None
        assert serving["device_setting"] == "auto" and serving["quantization_setting"] == "none"
        generated = client.post("/api/generate", json={"base_model": "tiny", "prompt": "hello", "max_new_tokens": 2})
        assert generated.status_code == 200, generated.text
        response = client.get("/api/system-info")
        loaded = response.json()["serving"]["loaded"]
        assert [m["model"] for m in loaded] == ["LORALAB_HOME/models/tiny"] and loaded[0]["device"] == "cpu"
        assert str(loralab_home) not in response.text
    from loralab.services.inference import shutdown_engine

    shutdown_engine()
    monkeypatch.setenv("LORALAB_INFERENCE_QUANTIZATION", "4bit")
    with TestClient(create_app(get_settings(), mount_web_ui=False), base_url="http://127.0.0.1") as client:
        serving = client.get("/api/system-info").json()["serving"]
        assert serving["device"] is None and "CUDA" in serving["error"]
        refused = client.post("/api/generate", json={"base_model": "tiny", "prompt": "hello", "max_new_tokens": 2})
        assert refused.status_code == 422 and refused.json()["code"] == "placement_refused"
        assert "LORALAB_INFERENCE_QUANTIZATION" in refused.json()["detail"]
    shutdown_engine()


# ---- evaluation (CLI and jobs) placed by training's rule ----

@pytest.fixture
def pretend_cuda(monkeypatch):
    """A machine with one bf16 GPU as far as every placement decision is concerned; models still load on the CPU,
    so nothing is moved to CUDA here. Returns the placements the loader was asked for."""
    from loralab.engine import models

    monkeypatch.setattr(hardware, "probe_gpus", lambda memory=True: [a100()])
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    asked = []
    real = models.load_model

    def load_model(name, dtype=None, device="cpu", attn_implementation="sdpa", placement=None):
        asked.append(placement)
        return real(name, attn_implementation=attn_implementation)

    monkeypatch.setattr(models, "load_model", load_model)
    return asked


def _eval_data(tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                         "content": a}]})
                              for q, a in [("hello", "world"), ("capital of France?", "Paris")]) + "\n")
    return data


@pytest.mark.slow
def test_evaluation_job_records_the_placement_training_would_pick(tmp_path, tiny_model_dir, pretend_cuda):
    from loralab.engine.run import execute
    from loralab.spec import EvalSpec

    train = hardware.choose_placement()
    run = tmp_path / "run"
    run.mkdir()
    spec = EvalSpec(base_model=str(tiny_model_dir), data_path=str(_eval_data(tmp_path)), max_new_tokens=3,
                    embeddings=False)
    (run / "spec.json").write_text(spec.model_dump_json())
    assert execute(run, install_signals=False) == 0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["type"] == "started")
    assert (started["device"], started["dtype"]) == (train.device, train.dtype) == ("cuda", "bf16")
    assert started["quantization"] is None and "cuda:0" in started["placement"]
    assert pretend_cuda[0].device_map == {"": 0} and pretend_cuda[0].dtype == "bf16"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["settings"]["device"] == "cuda" and summary["settings"]["dtype"] == "bf16"


def test_evaluation_job_refuses_four_bit_without_cuda(tmp_path, tiny_model_dir, monkeypatch):
    from loralab.engine.run import execute
    from loralab.spec import EvalSpec

    monkeypatch.setenv("LORALAB_INFERENCE_QUANTIZATION", "4bit")
    monkeypatch.setattr(hardware, "probe_gpus", lambda memory=True: [])
    run = tmp_path / "run"
    run.mkdir()
    spec = EvalSpec(base_model=str(tiny_model_dir), data_path=str(_eval_data(tmp_path)), embeddings=False)
    (run / "spec.json").write_text(spec.model_dump_json())
    assert execute(run, install_signals=False) == 1
    error = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()][-1]
    assert error["type"] == "error" and error["code"] == "placement_refused" and error["param"] == "device"
    assert "CUDA" in error["message"]


@pytest.mark.slow
def test_eval_cli_places_by_the_rule_and_takes_the_device_flag(tmp_path, tiny_model_dir, pretend_cuda, monkeypatch):
    from typer.testing import CliRunner

    from loralab.cli import app

    from loralab.engine import metrics

    embedder_devices = []

    class Embedder:  # the embedding model follows the placement too (not loaded here: there is no CUDA)
        def __init__(self, device):
            embedder_devices.append(device)
            raise FileNotFoundError("embedding model not loaded in this test")

    monkeypatch.setattr(metrics, "Embedder", Embedder)
    data = _eval_data(tmp_path)
    base = ["eval", "--data", str(data), "--base-model", str(tiny_model_dir), "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    assert (pretend_cuda[-1].device, pretend_cuda[-1].dtype) == ("cuda", "bf16") and embedder_devices == ["cuda"]
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["settings"]["device"] == "cuda"
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "cpu"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (pretend_cuda[-1].device, pretend_cuda[-1].dtype) == ("cpu", "fp32") and embedder_devices[-1] == "cpu"


def test_generate_and_eval_cli_refuse_four_bit_and_absent_cuda_here(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from loralab.cli import app

    monkeypatch.setattr(hardware, "probe_gpus", lambda memory=True: [])
    runner = CliRunner()
    four = runner.invoke(app, ["generate", "-p", "hi", "--base-model", str(tiny_model_dir), "--load-in-4bit"])
    assert four.exit_code == 1 and "CUDA" in four.output
    cuda = runner.invoke(app, ["generate", "-p", "hi", "--base-model", str(tiny_model_dir), "--device", "cuda"])
    assert cuda.exit_code == 1 and "no CUDA GPU" in cuda.output
    monkeypatch.setenv("LORALAB_INFERENCE_QUANTIZATION", "4bit")  # the setting is the flag's default
    evaluated = runner.invoke(app, ["eval", "--data", str(_eval_data(tmp_path)), "--out", str(tmp_path / "e"),
                                    "--base-model", str(tiny_model_dir)])
    assert evaluated.exit_code == 1 and "CUDA" in evaluated.output
    plain = runner.invoke(app, ["generate", "-p", "hi", "--base-model", str(tiny_model_dir), "--no-load-in-4bit",
                                "--max-new-tokens", "2"])
    assert plain.exit_code == 0, plain.output
    assert "cpu fp32" in plain.output
