"""Issue 16 item 7: a model version is not deleted while an evaluation, a resumed job or an A/B test uses it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import db_url, fast_env, settings  # noqa: E402,F401  (pytest fixtures)

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "loralab" / "data" / "samples"


@pytest.fixture
def client(settings):  # noqa: F811
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app

    with TestClient(create_app(settings), base_url="http://127.0.0.1") as test_client:
        yield test_client


@pytest.fixture
def versions(client, settings):  # noqa: F811
    """Two LoRA versions of 'bot' (v1, v2) with adapter files in the registry, made as a worker would."""
    repo = client.app.state.services.repo
    ids = []
    for i in range(2):
        job = repo.set_status(repo.create_job({"base_model": "smollm2-135m-instruct"}, None, "bot").id, "queued")
        claim = repo.claim_job("w", 30)
        assert claim.job_id == job.id
        files = settings.home / "registry" / f"ft-{i:024x}"
        files.mkdir(parents=True)
        (files / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        (files / "adapter_model.safetensors").write_bytes(b"\0" * 16)
        row = repo.finish_job(claim, "succeeded", model=dict(
            id=f"ft-{i:024x}", name="bot", base_model="smollm2-135m-instruct", method="lora", dataset_id=None,
            job_id=claim.job_id, lineage={}, spec={}, metrics={}, path=str(files)))
        ids.append(row.result_model_id)
    return ids


def assert_refused(client, settings, model_id: str, user: str) -> None:  # noqa: F811
    response = client.delete(f"/api/models/{model_id}")
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["code"] == "model_in_use" and user in body["detail"]
    assert str(settings.home) not in body["detail"]
    assert client.get(f"/api/models/{model_id}").status_code == 200
    assert (settings.home / "registry" / model_id / "adapter_model.safetensors").is_file()


def assert_deleted(client, settings, model_id: str) -> None:  # noqa: F811
    response = client.delete(f"/api/models/{model_id}")
    assert response.status_code == 200, response.text
    assert client.get(f"/api/models/{model_id}").status_code == 404
    assert not (settings.home / "registry" / model_id).exists()


def test_an_evaluation_in_the_queue_keeps_its_models(client, settings, versions):  # noqa: F811
    from loralab.store import evaluations as store

    repo = client.app.state.services.repo
    adapters = [str(settings.home / "registry" / versions[0])]
    job = store.create_evaluation_job(repo, {"kind": "evaluation", "adapters": adapters}, None, "eval", [versions[0]])
    assert_refused(client, settings, versions[0], job.id)
    assert client.delete(f"/api/models/{versions[1]}").status_code == 200  # an unrelated version goes
    assert client.post(f"/api/evaluations/{job.id}/cancel").status_code == 200
    assert_deleted(client, settings, versions[0])


def test_a_training_job_resuming_from_a_model_keeps_it(client, settings, versions):  # noqa: F811
    data = (SAMPLES / "basic_qa.jsonl").read_bytes()
    dataset = client.post("/api/datasets/upload", files={"file": ("basic_qa.jsonl", data)}, data={"name": "qa"})
    assert dataset.status_code == 201, dataset.text
    job = client.post("/api/training/jobs", json={"dataset_id": dataset.json()["id"], "model_name": "bot2",
                                                  "resume_from": versions[1]})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert_refused(client, settings, versions[1], job_id)
    assert client.post(f"/api/training/jobs/{job_id}/cancel").status_code == 200
    assert_deleted(client, settings, versions[1])


@pytest.mark.parametrize("arm", ["id", "name:version"])
def test_an_active_ab_test_keeps_both_arms(client, settings, versions, arm):  # noqa: F811
    model_a = versions[0] if arm == "id" else "bot:1"
    test = client.post("/api/ab-tests", json={"name": "t1", "model_a": model_a, "model_b": versions[1]})
    assert test.status_code == 201, test.text
    test_id = test.json()["id"]
    assert_refused(client, settings, versions[0], test_id)
    assert_refused(client, settings, versions[1], test_id)
    assert client.post(f"/api/ab-tests/{test_id}/stop").status_code == 200
    assert_deleted(client, settings, versions[0])


def test_the_version_a_name_serves_is_kept(client, settings, versions):  # noqa: F811
    """Deployed: refused (as before); production with nothing deployed is what `bot` serves: refused too."""
    assert client.post(f"/api/models/{versions[1]}/stage", json={"stage": "production"}).status_code == 200
    response = client.delete(f"/api/models/{versions[1]}")
    assert response.status_code == 409 and response.json()["code"] == "model_deployed"
    assert client.post(f"/api/models/{versions[0]}/deploy").status_code == 200
    assert client.delete(f"/api/models/{versions[0]}").status_code == 409
    assert_deleted(client, settings, versions[1])  # no longer what the name serves
