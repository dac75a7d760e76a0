"""DPO jobs over HTTP: method and dataset must fit (422 naming the field), beta is stored, the model keeps its method."""
from __future__ import annotations

from service_fixtures import SAMPLES, wait_for


def upload(client, name: str) -> str:
    data = (SAMPLES / name).read_bytes()
    response = client.post("/api/datasets/upload", files={"file": (name, data)}, data={"name": name.split(".")[0]})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_dpo_job_needs_a_preference_dataset_and_sft_needs_the_other_kind(client):
    sft, pref = upload(client, "basic_qa.jsonl"), upload(client, "preference_sample.jsonl")

    wrong = client.post("/api/training/jobs", json={"dataset_id": sft, "method": "dpo"})
    assert wrong.status_code == 422 and wrong.json()["param"] == "dataset_id"
    assert wrong.json()["code"] == "wrong_dataset_format" and "preference" in wrong.json()["detail"]

    sft_on_pairs = client.post("/api/training/jobs", json={"dataset_id": pref, "method": "lora"})
    assert sft_on_pairs.status_code == 422 and sft_on_pairs.json()["param"] == "method"
    assert "method 'dpo'" in sft_on_pairs.json()["detail"]
    default_method = client.post("/api/training/jobs", json={"dataset_id": pref})
    assert default_method.status_code == 422 and default_method.json()["param"] == "method"

    beta_without_dpo = client.post("/api/training/jobs", json={"dataset_id": sft, "beta": 0.2})
    assert beta_without_dpo.status_code == 422 and "method='dpo'" in beta_without_dpo.text
    bad_beta = client.post("/api/training/jobs", json={"dataset_id": pref, "method": "dpo", "beta": -1})
    assert bad_beta.status_code == 422 and "beta" in bad_beta.text
    bad_loss = client.post("/api/training/jobs", json={"dataset_id": pref, "method": "dpo", "loss_type": "magic"})
    assert bad_loss.status_code == 422 and "loss_type" in bad_loss.text

    created = client.post("/api/training/jobs", json={"dataset_id": pref, "method": "dpo", "max_steps": 2})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["method"] == "dpo" and job["status"] == "queued"
    assert job["hyperparameters"]["beta"] == 0.1 and job["hyperparameters"]["loss_type"] == "sigmoid"
    custom = client.post("/api/training/jobs", json={"dataset_id": pref, "method": "dpo", "beta": 0.3,
                                                     "loss_type": "ipo"}).json()
    assert custom["hyperparameters"]["beta"] == 0.3 and custom["hyperparameters"]["loss_type"] == "ipo"
    plain = client.post("/api/training/jobs", json={"dataset_id": sft}).json()
    assert plain["hyperparameters"]["beta"] is None and plain["method"] == "lora"


def test_finished_dpo_job_registers_a_dpo_model(client, set_scenario, run_worker):
    pref = upload(client, "preference_sample.jsonl")
    set_scenario(total_steps=3, step_seconds=0.02)
    job = client.post("/api/training/jobs", json={"dataset_id": pref, "method": "dpo", "beta": 0.2}).json()
    run_worker()
    done = wait_for(lambda: (j := client.get(f"/api/training/jobs/{job['id']}").json())["status"] == "succeeded"
                    and j)
    model = client.get(f"/api/models/{done['result_model_id']}").json()
    assert model["method"] == "dpo"
