"""Evaluations over HTTP: every bad input named, and a real evaluation job (tiny model) through the queue."""
from __future__ import annotations

import json
import shutil

import pytest

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "日本の首都はどこですか？"}, {"role": "assistant", "content": "東京です。"}]},
    {"messages": [{"role": "user", "content": "Explain LoRA."},
                  {"role": "assistant", "content": "LoRA adds low-rank matrices to frozen weights."}]},
]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def upload(client, rows, name="qa") -> str:
    response = client.post("/api/datasets/upload", files={"file": (f"{name}.jsonl", jsonl(rows))}, data={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def register(client, settings, base: str, seed: int, base_model: str | None = None, heldout=None,
             adapter: bool = True) -> str:
    """A fine-tuned version as the supervisor records one: a registry row plus its files (a random LoRA)."""
    from peft import LoraConfig, get_peft_model
    import torch
    from transformers import AutoModelForCausalLM

    repo = client.app.state.services.repo
    job = repo.create_job({"method": "lora"}, None, f"m{seed}")
    repo.set_status(job.id, "queued")
    claim = repo.claim_job("test-worker", 30)
    model_id = f"ft-{seed:024x}"
    target = settings.home / "registry" / model_id
    if adapter:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(target)
        (target / "spec.json").write_text(json.dumps({"base_model": base_model or base}))
    else:
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"full")
    if heldout:
        (target / "validation.jsonl").write_bytes(jsonl(heldout))
    repo.finish_job(claim, "succeeded", model=dict(
        id=model_id, name=f"m{seed}", base_model=base_model or base, method="lora" if adapter else "full",
        dataset_id=None, job_id=claim.job_id, lineage={}, spec={"method": "lora"}, metrics={}, path=str(target)))
    return model_id


@pytest.fixture
def tiny(settings, tiny_model_dir):
    target = settings.home / "models" / "tiny"
    shutil.copytree(tiny_model_dir, target)
    return str(target)


def test_bad_requests_name_the_field(client, settings, tiny):
    good = upload(client, CHAT_ROWS)
    model_id = register(client, settings, tiny, 1)
    post = lambda body: client.post("/api/evaluations", json=body)  # noqa: E731

    unknown_model = post({"model_ids": ["ft-" + "0" * 24], "dataset_id": good})
    assert unknown_model.status_code == 404 and unknown_model.json()["param"] == "model_ids[0]"
    bad_id = post({"model_ids": [model_id, "../etc"], "dataset_id": good})
    assert bad_id.status_code == 422 and bad_id.json()["param"] == "model_ids[1]"
    unknown_dataset = post({"model_ids": [model_id], "dataset_id": "ds-" + "0" * 24})
    assert unknown_dataset.status_code == 404 and unknown_dataset.json()["param"] == "dataset_id"
    no_heldout = post({"model_ids": [model_id]})
    assert no_heldout.status_code == 422 and no_heldout.json()["code"] == "dataset_required"
    no_reference = post({"model_ids": [model_id], "dataset_id": upload(client, [{"text": "just prose"}], "prose")})
    assert no_reference.status_code == 422 and no_reference.json()["code"] == "no_reference"
    assert no_reference.json()["param"] == "dataset_id" and "line 1" in no_reference.json()["detail"]
    other_base = post({"model_ids": [model_id], "dataset_id": good, "base_model": "smollm2-135m-instruct"})
    assert other_base.status_code == 422 and other_base.json()["code"] == "base_model_mismatch"
    mixed = register(client, settings, tiny, 2, base_model="smollm2-135m-instruct")
    both = post({"model_ids": [model_id, mixed], "dataset_id": good})
    assert both.status_code == 422 and both.json()["code"] == "base_model_mismatch"
    full = post({"model_ids": [register(client, settings, tiny, 3, adapter=False)], "dataset_id": good})
    assert full.status_code == 422 and full.json()["code"] == "not_an_adapter"
    typo = post({"model_ids": [model_id], "dataset_id": good, "max_new_token": 4})
    assert typo.status_code == 422 and "max_new_token" in typo.text
    assert post({"model_ids": [model_id], "dataset_id": good, "limit": 0}).status_code == 422
    one = client.post("/api/evaluate/compare", json={"models": [model_id], "dataset_id": good})
    assert one.status_code == 422 and "models" in one.text
    two_bases = client.post("/api/evaluate/compare", json={"models": ["tiny", "smollm2-135m-instruct"],
                                                           "dataset_id": good})
    assert two_bases.status_code == 422 and two_bases.json()["param"] == "models"
    unknown_in_compare = client.post("/api/evaluate/compare", json={"models": ["tiny", "ft-" + "1" * 24],
                                                                    "dataset_id": good})
    assert unknown_in_compare.status_code == 404 and unknown_in_compare.json()["param"] == "models[1]"
    # An emptied dataset file (the upload itself refuses empty files) is caught before queueing.
    svc = client.app.state.services
    path = settings.home / "datasets" / good / "records.jsonl"
    path.write_text("")
    empty = post({"model_ids": [model_id], "dataset_id": good})
    assert empty.status_code == 422 and empty.json()["code"] == "empty_dataset"
    assert client.get("/api/evaluations").json() == [] and svc.repo.list_jobs(kind="evaluation") == []
    assert client.get("/api/evaluations", params={"model_id": model_id}).json() == []
    assert client.get("/api/evaluations/job-" + "0" * 24).status_code == 404
    assert client.get("/api/evaluations", params={"model_id": "nope"}).status_code == 422


def test_evaluation_job_through_the_queue(client, settings, tiny, run_worker):
    """The real engine child (tiny model) runs a comparison job; no model version is made; files are served."""
    if settings.resolved_database_url().startswith("postgresql"):
        pytest.skip("the engine run does not depend on the database; the PostgreSQL store path is covered above")
    settings.engine_command = None  # python -m loralab.engine.run, not the fake engine
    heldout = CHAT_ROWS[:2]
    model_id = register(client, settings, tiny, 7, heldout=heldout)
    dataset_id = upload(client, CHAT_ROWS)
    versions_before = len(client.get("/api/models", params={"kind": "fine_tuned"}).json())
    queued = client.post("/api/evaluations", json={"model_ids": [model_id], "max_new_tokens": 3,
                                                   "embeddings": False})
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    assert queued.json()["data_source"] == "held-out split" and queued.json()["dataset_id"] is None
    spec = client.app.state.services.repo.get_job(queued.json()["id"]).spec
    assert spec["kind"] == "evaluation" and spec["data_path"].endswith(f"{model_id}/validation.jsonl")
    cancelled = client.post(f"/api/evaluations/{queued.json()['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    run_worker()
    response = client.post("/api/evaluate/compare", json={
        "models": ["tiny", model_id], "dataset_id": dataset_id, "max_new_tokens": 4, "embeddings": False,
        "report_language": "ja", "wait": True, "timeout_seconds": 300})
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["status"] == "succeeded", view["error"]
    assert view["summary"]["models"] == ["base", model_id] and view["summary"]["data"]["num_examples"] == 3
    assert "path" not in view["summary"]["data"] and view["progress"]["percent"] == 100.0
    rows = {r["metric"]: r for r in view["comparison"]["rows"]}
    assert {"chrf", "rougeL", "exact_match", "perplexity"} <= set(rows)
    assert rows["perplexity"]["lower_is_better"] and set(rows["chrf"]["values"]) == {"base", model_id}
    assert "embedding_similarity" not in rows  # turned off
    assert set(view["files"]) >= {"report.html", "report.en.html", "report.ja.html", "results.csv", "metrics.png"}
    page = client.get(view["files"]["report.html"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "評価レポート" in page.text and "default-src 'none'" in page.headers["content-security-policy"]
    csv_text = client.get(view["files"]["results.csv"]).content.decode("utf-8-sig")
    assert csv_text.count("\n") == 1 + 3 * 2  # header + 3 rows x 2 models
    png = client.get(f"/api/evaluations/{view['id']}/files/metrics.png")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    for name in ("..%2Fspec.json", "spec.json", "events.jsonl"):
        assert client.get(f"/api/evaluations/{view['id']}/files/{name}").status_code == 404
    # Both evaluations are listed by model (newest first), neither among the training jobs.
    listed = client.get("/api/evaluations", params={"model_id": model_id}).json()
    assert [e["id"] for e in listed] == [view["id"], queued.json()["id"]]
    training = {j["id"] for j in client.get("/api/training/jobs").json()}
    assert view["id"] not in training and queued.json()["id"] not in training
    assert len(client.get("/api/models", params={"kind": "fine_tuned"}).json()) == versions_before
    events = [json.loads(line[6:]) for line in client.get(f"/api/training/jobs/{view['id']}/events").text.splitlines()
              if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and kinds.count("progress") >= 6
