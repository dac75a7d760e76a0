"""Dataset upload (every bad file rejected before anything is stored), list, preview, stats, delete."""
from __future__ import annotations

import shutil

import pytest
import sqlalchemy as sa

from service_fixtures import SAMPLES

GOOD = b'{"instruction": "a", "output": "b"}\n'
BAD_UPLOADS = {
    "broken_json": (GOOD + b'{"instruction": "x", \n', "x.jsonl", 2, "row", "bad_json"),
    "missing_field": (GOOD + b'{"instruction": "x"}\n', "x.jsonl", 2, "output", "missing_field"),
    "unknown_role": (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                     b'{"messages": [{"role": "bot", "content": "x"}]}\n', "x.jsonl", 2, "messages[0].role",
                     "unknown_role"),
    "not_utf8": ('{"text": "caf\u00e9"}\n'.encode("latin-1"), "x.jsonl", 1, "file", "not_utf8"),
    "empty": (b"", "x.jsonl", 1, "file", "empty_file"),
}


def stored_state(settings, db):
    with db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM datasets")).scalar()
    root = settings.home / "datasets"
    return rows, sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_upload_list_preview_and_versions(client):
    data = (SAMPLES / "basic_qa.jsonl").read_bytes()
    first = client.post("/api/datasets/upload", files={"file": ("basic_qa.jsonl", data)}).json()
    assert first["name"] == "basic_qa" and first["version"] == 1 and first["rows"] == 5
    assert first["format"] == "alpaca" and len(first["sha256"]) == 64
    again = client.post("/api/datasets/upload", files={"file": ("basic_qa.jsonl", data)}).json()
    assert again["version"] == 2 and again["id"] != first["id"]
    listed = client.get("/api/datasets", params={"name": "basic_qa"}).json()
    assert [d["version"] for d in listed] == [2, 1]
    preview = client.get(f"/api/datasets/{first['id']}/preview", params={"offset": 1, "limit": 2}).json()
    assert preview["total"] == 5 and len(preview["records"]) == 2
    assert preview["records"][0]["messages"][0]["role"] == "user"
    assert client.get(f"/api/datasets/{first['id']}").json()["id"] == first["id"]
    assert client.get("/api/datasets/ds-000000000000000000000000").status_code == 404
    assert client.get("/api/datasets/..%2f..%2fetc").status_code == 404


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_upload_is_rejected_and_nothing_is_stored(client, settings, db, case):
    data, filename, line, field, code = BAD_UPLOADS[case]
    client.post("/api/datasets/upload", files={"file": ("ok.jsonl", GOOD)})
    before = stored_state(settings, db)
    response = client.post("/api/datasets/upload", files={"file": (filename, data)}, data={"name": "bad"})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"] and f"line {line}" in body["detail"]
    assert {"line": line, "field": field, "code": code} == {k: body["errors"][0][k] for k in ("line", "field", "code")}
    assert body["errors"][0]["message"]
    assert stored_state(settings, db) == before


def test_too_large_and_too_many_rows(make_client, settings, db):
    settings.max_upload_bytes = 200
    settings.max_rows = 3
    client = make_client()
    before = stored_state(settings, db)
    big = client.post("/api/datasets/upload", files={"file": ("big.jsonl", GOOD * 20)})
    assert big.status_code == 413 and "200" in big.json()["detail"]
    rows = client.post("/api/datasets/upload", files={"file": ("rows.jsonl", GOOD * 4)})
    assert rows.status_code == 422
    assert rows.json()["errors"][0]["code"] == "too_many_rows" and rows.json()["errors"][0]["line"] == 4
    assert stored_state(settings, db) == before


def test_upload_without_file_and_bad_format(client):
    assert client.post("/api/datasets/upload", data={"name": "x"}).status_code == 422
    response = client.post("/api/datasets/upload", files={"file": ("x.jsonl", GOOD)}, data={"format": "yaml"})
    assert response.status_code == 422 and response.json()["param"] == "format"


def test_token_stats_are_computed_once_and_cached(client, settings, tiny_model_dir, dataset_id, repo):
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    stats = client.get(f"/api/datasets/{dataset_id}/stats", params={"base_model": "tiny"}).json()
    assert stats["rows"] == 5 and stats["tokens"]["rows"] == 5 and stats["tokens"]["max"] > 0
    assert sum(stats["tokens"]["histogram"]["counts"]) == 5
    assert "tiny|" in repo.get_dataset(dataset_id).stats["token_lengths"]
    shutil.rmtree(settings.home / "models" / "tiny")  # a second call must not need the tokenizer
    assert client.get(f"/api/datasets/{dataset_id}/stats", params={"base_model": "tiny"}).json() == stats
    assert client.get(f"/api/datasets/{dataset_id}/stats", params={"base_model": "../etc"}).status_code == 404


def test_delete_refused_while_a_job_uses_it(client, settings, dataset_id):
    job = client.post("/api/training/jobs", json={"dataset_id": dataset_id, "max_steps": 2}).json()
    response = client.delete(f"/api/datasets/{dataset_id}")
    assert response.status_code == 409 and job["id"] in response.json()["detail"]
    client.post(f"/api/training/jobs/{job['id']}/cancel")
    assert client.delete(f"/api/datasets/{dataset_id}").status_code == 200
    assert not (settings.home / "datasets" / dataset_id).exists()
    assert client.get(f"/api/datasets/{dataset_id}").status_code == 404
