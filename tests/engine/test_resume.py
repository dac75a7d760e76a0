"""Exact resume: a stopped run continued from its checkpoint logs the same losses as an uninterrupted one."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from loralab.engine.events import read_events
from loralab.engine.run import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, execute
from loralab.engine.train import latest_checkpoint
from loralab.spec import DataSpec, TrainSpec

ROWS = [
    {"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}." * (1 + i % 3)}
    for i in range(12)
]


def spec_for(tiny_model_dir, data: Path, **overrides) -> TrainSpec:
    base = dict(base_model=str(tiny_model_dir), data=DataSpec(path=str(data)), learning_rate=5e-3, max_steps=8,
                per_device_train_batch_size=2, max_seq_length=64, seed=3, lr_scheduler_type="cosine",
                warmup_steps=2, save_total_limit=3)
    base.update(overrides)
    return TrainSpec(**base)


def start(run_dir: Path, spec: TrainSpec, **kw) -> int:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    return execute(run_dir, install_signals=False, **kw)


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss of the last attempt that logged that step."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data) -> dict[int, float]:
    run = tmp_path_factory.mktemp("resume-reference") / "uninterrupted"
    assert start(run, spec_for(tiny_model_dir, data)) == EXIT_OK
    return losses(run)


def test_stop_and_resume_gives_the_same_losses(tmp_path, tiny_model_dir, data, reference):
    run = tmp_path / "stopped"
    stop = threading.Event()

    def stop_after_step_3(event):
        if event["type"] == "step" and event["step"] == 3:
            stop.set()  # the next step ends with a checkpoint and the run exits 3

    assert start(run, spec_for(tiny_model_dir, data), echo=stop_after_step_3, stop=stop) == EXIT_CANCELLED
    cancelled = read_events(run)[-1]
    assert cancelled["type"] == "cancelled" and cancelled["step"] == 4  # mid-epoch: 12 rows / 2 = 6 steps an epoch
    ckpt = Path(cancelled["checkpoint"])
    assert ckpt == latest_checkpoint(run) and ckpt.name == "checkpoint-4"
    # adapter, optimizer, scheduler, RNG and data position (trainer state) are all in the checkpoint
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert not list((run / "checkpoints").glob(".*.tmp"))

    assert start(run, spec_for(tiny_model_dir, data)) == EXIT_OK
    started = [e for e in read_events(run) if e["type"] == "started"]
    assert [e["resumed_from_step"] for e in started] == [0, 4]
    resumed = losses(run)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    for step in range(5, 9):  # steps after the checkpoint: same data, same RNG, same optimizer state
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), (step, resumed, reference)
    assert json.loads((run / "summary.json").read_text())["total_steps"] == 8


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, data, reference, monkeypatch):
    from transformers import Trainer

    run = tmp_path / "killed"
    real = Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # the adapter and optimizer are already written at this point
            raise RuntimeError("killed while writing checkpoint-4")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_4)
    assert start(run, spec_for(tiny_model_dir, data, save_steps=2)) == EXIT_ERROR
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    root = run / "checkpoints"
    partial = root / ".checkpoint-4.tmp" / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "rng_state.pth").exists()
    assert not (root / "checkpoint-4").exists()
    # debris of other interrupted writers is ignored too
    (root / "checkpoint-6.tmp").mkdir()
    (root / "checkpoint-6.tmp" / "trainer_state.json").write_text("{}")
    (root / "checkpoint-7").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(run) == root / "checkpoint-2"

    assert start(run, spec_for(tiny_model_dir, data, save_steps=2)) == EXIT_OK
    started = [e for e in read_events(run) if e["type"] == "started"]
    assert started[-1]["resumed_from_step"] == 2
    resumed = losses(run)
    for step in range(3, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), (step, resumed, reference)
    assert not (root / ".checkpoint-4.tmp").exists()  # the next save cleans up staging debris


def test_resume_route_queues_a_continuation_of_a_failed_job(tmp_path, loralab_home, monkeypatch, data):
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app
    from loralab.api.routes import resume as resume_routes
    from loralab.settings import get_settings

    monkeypatch.setenv("LORALAB_DATABASE_URL", f"sqlite:///{loralab_home / 'loralab.db'}")
    app = create_app(get_settings())
    if not any(getattr(r, "path", "") == "/api/training/jobs/{job_id}/resume" for r in app.routes):
        app.include_router(resume_routes.router)  # until the lead wires it into create_app
    svc = app.state.services
    spec = TrainSpec(data=DataSpec(path=str(data)), save_steps=2).model_dump(mode="json")
    failed = svc.repo.create_job(spec, None, "m")
    svc.repo.set_status(failed.id, "failed", error={"code": "engine_crashed", "message": "boom"})
    early = svc.repo.create_job(spec, None, "m")
    svc.repo.set_status(early.id, "cancelled")
    queued = svc.repo.create_job(spec, None, "m")
    svc.repo.set_status(queued.id, "queued")
    ckpt = loralab_home / "runs" / failed.id / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 4}')
    (ckpt.parent / ".checkpoint-6.tmp").mkdir()  # killed while writing: not used

    with TestClient(app, base_url="http://127.0.0.1") as client:
        res = client.post(f"/api/training/jobs/{failed.id}/resume")
        assert res.status_code == 201, res.text
        body = res.json()
        assert body["status"] == "queued" and body["id"] != failed.id and body["model_name"] == "m"
        assert body["resumed_from"] == {"job_id": failed.id, "checkpoint": "checkpoint-4", "step": 4}
        copied = loralab_home / "runs" / body["id"] / "checkpoints" / "checkpoint-4" / "trainer_state.json"
        assert copied.read_text() == '{"global_step": 4}'
        assert client.get(f"/api/training/jobs/{failed.id}").json()["status"] == "failed"  # history unchanged
        res = client.post(f"/api/training/jobs/{early.id}/resume")
        assert res.status_code == 422 and res.json()["code"] == "no_checkpoint"
        res = client.post(f"/api/training/jobs/{queued.id}/resume")
        assert res.status_code == 409 and res.json()["code"] == "job_not_resumable"
