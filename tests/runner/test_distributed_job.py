"""A 2-process DDP job (torchrun, gloo, tiny model) run by the worker matches a 1-process run with the same global batch."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loralab.engine.run import execute
from loralab.runner.supervisor import engine_command
from loralab.runner.worker import Worker
from loralab.spec import DataSpec, TrainSpec

ROWS = [
    {"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}." * (1 + i % 3)}
    for i in range(16)
]


@pytest.fixture
def real_engine_settings(loralab_home, monkeypatch):
    """SQLite and the real engine (no fake engine command): this test trains for real."""
    env = {"LORALAB_DATABASE_URL": f"sqlite:///{loralab_home / 'loralab.db'}", "LORALAB_LEASE_SECONDS": "60",
           "LORALAB_HEARTBEAT_SECONDS": "0.5", "LORALAB_WORKER_POLL_SECONDS": "0.1", "LORALAB_TAIL_SECONDS": "0.1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LORALAB_ENGINE_COMMAND", raising=False)
    from loralab.settings import get_settings

    return get_settings()


def make_spec(tiny_model_dir, data: Path, **overrides) -> TrainSpec:
    base = dict(base_model=str(tiny_model_dir), data=DataSpec(path=str(data)), learning_rate=5e-3, max_steps=6,
                seed=3, max_seq_length=64)
    base.update(overrides)
    return TrainSpec(**base)


def test_torchrun_command_for_a_ddp_spec(tmp_path, real_engine_settings, tiny_model_dir):
    spec = make_spec(tiny_model_dir, tmp_path / "d.jsonl", distributed={"strategy": "ddp", "nproc_per_node": 2})
    cmd = engine_command(real_engine_settings, tmp_path / "run", spec.model_dump(mode="json"))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and "--standalone" in cmd
    assert cmd[-3:] == ["-m", "loralab.engine.run", str(tmp_path / "run")]
    plain = make_spec(tiny_model_dir, tmp_path / "d.jsonl").model_dump(mode="json")
    assert engine_command(real_engine_settings, tmp_path / "run", plain) == [
        sys.executable, "-m", "loralab.engine.run", str(tmp_path / "run")]


def test_two_process_ddp_job_through_the_worker_matches_one_process(tmp_path, real_engine_settings, tiny_model_dir):
    from loralab.store.db import open_database
    from loralab.store.repo import Repo

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    # reference: one process, batch 4
    single = tmp_path / "single"
    single.mkdir()
    (single / "spec.json").write_text(make_spec(tiny_model_dir, data, per_device_train_batch_size=4).model_dump_json())
    assert execute(single, install_signals=False) == 0

    # the same global batch as 2 ranks x 2 examples, queued and run by a worker through torchrun
    spec = make_spec(tiny_model_dir, data, per_device_train_batch_size=2,
                     distributed={"strategy": "ddp", "nproc_per_node": 2})
    db = open_database(real_engine_settings.resolved_database_url())
    try:
        repo = Repo(db)
        job = repo.create_job(spec.model_dump(mode="json"), None, "ddp-model")
        repo.set_status(job.id, "queued")
        status = Worker(db, real_engine_settings).run_once()
        row = repo.get_job(job.id)
        run_dir = real_engine_settings.home / "runs" / job.id
        stderr = (run_dir / "stderr.log").read_text(errors="replace")[-3000:] if (run_dir / "stderr.log").exists() else ""
        assert status == "succeeded", (row.error_code, row.error_message, stderr)
        types = [e.type for e in repo.events_after(job.id)]
        assert types == ["started"] + ["step"] * 6 + ["done"]  # rank 0 alone writes events
        model = repo.get_model(row.result_model_id)
        files = {p.name for p in Path(model.path).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "summary.json"} <= files
    finally:
        db.dispose()

    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((single / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["total_steps"] == 6
    assert summary["real_tokens"] == reference["real_tokens"]  # tokens counted across ranks
    two = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [m["step"] for m in one] == list(range(1, 7))
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), (two, one)
    assert two[-1]["loss"] < two[0]["loss"]
