"""Issue 16 items 8 and 11: a job request cannot aim torchrun at any host, claim unbounded resources, carry NaN,
overfill the queue or run forever."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import *  # noqa: E402,F401,F403  (db_url, fast_env, settings, repo, set_scenario...)
from service_fixtures import SAMPLES, wait_for, worker_threads  # noqa: E402


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app

    with TestClient(create_app(settings, mount_web_ui=False), base_url="http://127.0.0.1",
                    raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def dataset_id(client):
    data = (SAMPLES / "basic_qa.jsonl").read_bytes()
    response = client.post("/api/datasets/upload", files={"file": ("basic_qa.jsonl", data)}, data={"name": "basic"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def jobs_in_db(client) -> int:
    return len(client.app.state.services.repo.list_jobs(kind=None))


def post_job(client, body: dict):
    return client.post("/api/training/jobs", json=body)


@pytest.mark.parametrize("field, value", [
    ("max_steps", 10**18), ("per_device_train_batch_size", 4096), ("gradient_accumulation_steps", 4096),
    ("seed", 10**30), ("seed", -1), ("save_total_limit", 10**9), ("warmup_steps", 10**12),
    ("logging_steps", 10**12), ("save_steps", 10**12), ("max_grad_norm", 1e300), ("learning_rate", 5.0),
    ("micro_batch_tokens", 10**12), ("num_train_epochs", 1e9),
])
def test_unbounded_numbers_are_refused(client, dataset_id, field, value):
    response = post_job(client, {"dataset_id": dataset_id, field: value})
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])
    assert jobs_in_db(client) == 0


@pytest.mark.parametrize("section, field, value", [
    ("lora", "r", 1024), ("lora", "lora_alpha", 1e9), ("data", "max_rows", 10**12),
    ("distributed", "nnodes", 1024),
])
def test_unbounded_nested_numbers_are_refused(client, dataset_id, section, field, value):
    response = post_job(client, {"dataset_id": dataset_id, section: {field: value}})
    assert response.status_code == 422, response.text
    assert jobs_in_db(client) == 0


def test_tokens_per_step_product_is_bounded(client, dataset_id):
    body = {"dataset_id": dataset_id, "per_device_train_batch_size": 1024, "gradient_accumulation_steps": 1024,
            "max_seq_length": 131072}
    response = post_job(client, body)
    assert response.status_code == 422, response.text
    assert "tokens per optimizer step" in response.text
    assert jobs_in_db(client) == 0


@pytest.mark.parametrize("raw", [
    b'"learning_rate": NaN', b'"learning_rate": Infinity', b'"weight_decay": -Infinity',
    b'"lora": {"lora_alpha": NaN}', b'"num_train_epochs": Infinity', b'"data": {"validation_split": NaN}',
])
def test_nan_and_infinity_are_422_not_500(client, dataset_id, raw):
    body = b'{"dataset_id": "%s", %s}' % (dataset_id.encode(), raw)
    response = client.post("/api/training/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    field = raw.split(b'"')[-2].decode()
    assert field in response.text and "finite" in response.text
    assert jobs_in_db(client) == 0


def test_multi_node_rendezvous_only_to_allowed_hosts(client, dataset_id, settings):
    body = {"dataset_id": dataset_id, "distributed": {"strategy": "ddp", "nnodes": 2,
                                                      "master_addr": "attacker.example.com"}}
    response = post_job(client, body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["param"] == "distributed.master_addr" and "LORALAB_DISTRIBUTED_HOSTS" in error["detail"]
    assert jobs_in_db(client) == 0
    settings.distributed_hosts = ["trainer-0.internal"]
    response = post_job(client, {**body, "distributed": {**body["distributed"], "master_addr": "attacker.example.com"}})
    assert response.status_code == 422 and jobs_in_db(client) == 0


def test_single_node_ignores_master_addr(client, dataset_id):
    from loralab.engine.distributed import rendezvous_problem
    from loralab.spec import TrainSpec

    spec = TrainSpec(data={"path": "x"}, distributed={"strategy": "ddp", "nproc_per_node": 2})
    assert rendezvous_problem(spec, []) is None
    multi = spec.model_copy(update={"distributed": spec.distributed.model_copy(
        update={"nnodes": 2, "master_addr": "Trainer-0.internal"})})
    assert rendezvous_problem(multi, ["trainer-0.internal"]) is None
    assert rendezvous_problem(multi, []).param == "distributed.master_addr"


def test_worker_rechecks_the_rendezvous_host(repo, settings, set_scenario, db):
    """A row written by an older version (no check at creation) is failed by the worker, never spawned."""
    data = settings.home / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    spec = {"base_model": "smollm2-135m-instruct", "data": {"path": str(data)},
            "distributed": {"strategy": "ddp", "nnodes": 2, "node_rank": 0, "master_addr": "attacker.example.com"}}
    job = repo.create_job(spec, None, "m")
    repo.set_status(job.id, "queued")
    from loralab.runner.worker import Worker

    assert Worker(db, settings).run_once() == "failed"
    row = repo.get_job(job.id)
    assert row.error_code == "host_not_allowed" and row.error_param == "distributed.master_addr"
    assert not (settings.home / "runs" / job.id / "stdout.log").exists()  # the engine never started


def test_queue_cap_is_429(client, dataset_id, settings):
    settings.max_queued_jobs = 2
    for _ in range(2):
        assert post_job(client, {"dataset_id": dataset_id}).status_code == 201
    response = post_job(client, {"dataset_id": dataset_id})
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "queue_full" and "LORALAB_MAX_QUEUED_JOBS" in response.json()["detail"]
    assert jobs_in_db(client) == 2


def test_job_the_estimator_says_cannot_fit_is_refused(client, dataset_id, settings, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, settings.models_dir / "tiny")
    body = {"dataset_id": dataset_id, "base_model": "tiny", "max_seq_length": 4096, "per_device_train_batch_size": 8}
    settings.max_job_memory_bytes = 1024 * 1024  # 1 MiB: nothing fits
    response = post_job(client, body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "job_too_large" and jobs_in_db(client) == 0
    settings.max_job_memory_bytes = None  # default: 4 x this host's memory, a tiny model fits
    assert post_job(client, body).status_code == 201


def test_time_limit_stops_with_checkpoint_and_fails(repo, settings, set_scenario, db):
    settings.max_job_seconds = 0.5
    set_scenario(total_steps=100000, step_seconds=0.05)
    data = settings.home / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    job = repo.create_job({"base_model": "smollm2-135m-instruct", "data": {"path": str(data)}}, None, "m")
    repo.set_status(job.id, "queued")
    starter = worker_threads(db, settings)
    start = next(starter)
    start()
    try:
        wait_for(lambda: repo.get_job(job.id).status == "failed", timeout=60)
    finally:
        next(starter, None)
    row = repo.get_job(job.id)
    assert row.error_code == "time_limit_exceeded" and "LORALAB_MAX_JOB_SECONDS" in row.error_message
    assert str(settings.home) not in row.error_message
    assert list((settings.home / "runs" / job.id / "checkpoints").glob("checkpoint-*"))
    types = [e.type for e in repo.events_after(job.id)]
    assert types[-1] == "error" and "cancelled" not in types and "interrupted" in types
