"""Exports over HTTP: refusals before queueing, one active export per model + format + quantization, the model
kept while exporting, and real export jobs (tiny Llama) through a worker: progress, files, streamed downloads,
tickets, cancel."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

TOKEN = "export-test-token-0123456789"


def register(client, settings, base: str, seed: int, adapter: bool = True, model_type: str = "llama") -> str:
    """A fine-tuned version as the supervisor records one: a registry row plus its files."""
    import torch
    from peft import LoraConfig, get_peft_model
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
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(target)
        (target / "spec.json").write_text(json.dumps({"base_model": base}))
    else:  # a full fine-tune: config + weights
        target.mkdir(parents=True)
        (target / "config.json").write_text(json.dumps({"model_type": model_type}))
        (target / "model.safetensors").write_bytes(b"full")
    repo.finish_job(claim, "succeeded", model=dict(
        id=model_id, name=f"My Model {seed}", base_model=base, method="lora" if adapter else "full",
        dataset_id=None, job_id=claim.job_id, lineage={}, spec={"method": "lora"}, metrics={}, path=str(target)))
    return model_id


@pytest.fixture
def tiny(settings, tiny_model_dir):
    target = settings.home / "models" / "tiny"
    shutil.copytree(tiny_model_dir, target)
    return str(target)


def wait_until_finished(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (view := client.get(f"/api/exports/{job_id}").json())["status"] not in ("succeeded", "failed",
                                                                                    "cancelled"):
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    return view


def test_refusals_idempotence_listing_and_delete_guard(client, settings, tiny):
    model_id = register(client, settings, tiny, 1)
    post = lambda mid, body: client.post(f"/api/models/{mid}/export", json=body)  # noqa: E731

    unknown = post("ft-" + "0" * 24, {"format": "gguf"})
    assert unknown.status_code == 404 and unknown.json()["code"] == "model_not_found"
    assert post("no-such-model", {"format": "gguf"}).status_code == 404
    base = post("tiny", {"format": "merged"})
    assert base.status_code == 422 and base.json()["code"] == "not_fine_tuned"
    assert post(model_id, {"format": "onnx"}).status_code == 422
    assert post(model_id, {"format": "gguf", "quantization": "q4_0"}).status_code == 422
    typo = post(model_id, {"format": "gguf", "quantisation": "f16"})
    assert typo.status_code == 422 and "quantisation" in typo.text
    gpt2 = register(client, settings, tiny, 2, adapter=False, model_type="gpt2")
    refused = post(gpt2, {"format": "gguf"})
    assert refused.status_code == 422 and refused.json()["code"] == "unsupported_architecture"
    assert refused.json()["param"] == "format" and "merged" in refused.json()["detail"]
    assert post(gpt2, {"format": "merged"}).status_code == 202  # merged has no architecture list
    broken = register(client, settings, tiny, 3)
    shutil.rmtree(settings.home / "registry" / broken)
    missing = post(broken, {"format": "merged"})
    assert missing.status_code == 422 and missing.json()["code"] == "model_files_missing"
    assert str(settings.home) not in missing.text

    first = post(model_id, {"format": "gguf", "quantization": "q8_0"})
    assert first.status_code == 202, first.text
    view = first.json()
    assert view["status"] == "queued" and view["object"] == "export" and view["model_id"] == model_id
    assert view["name"] == "my-model-1:v1" and view["files"] == []
    again = post(model_id, {"format": "gguf", "quantization": "q8_0"})
    assert again.status_code == 200 and again.json()["id"] == view["id"]  # the same job, not a twin
    other = post(model_id, {"format": "gguf", "quantization": "f16"})
    assert other.status_code == 202 and other.json()["id"] != view["id"]
    merged = post(model_id, {"format": "merged", "quantization": "f16"})
    merged_again = post(model_id, {"format": "merged", "quantization": "q8_0"})  # quantization means nothing here
    assert merged.json()["quantization"] is None and merged_again.status_code == 200
    assert merged_again.json()["id"] == merged.json()["id"]
    spec = client.app.state.services.repo.get_job(view["id"]).spec
    assert spec["kind"] == "export" and spec["source"].endswith(f"registry/{model_id}")

    listed = client.get(f"/api/models/{model_id}/exports").json()
    assert [e["id"] for e in listed] == [merged.json()["id"], other.json()["id"], view["id"]]
    assert {e["id"] for e in client.get("/api/exports", params={"model_id": gpt2}).json()} <= {
        e["id"] for e in client.get("/api/exports").json()}
    assert len(client.get("/api/exports").json()) == 4
    assert client.get("/api/models/ft-" + "9" * 24 + "/exports").status_code == 404
    assert client.get("/api/exports/job-" + "0" * 24).status_code == 404
    assert client.get(f"/api/exports/{client.app.state.services.repo.list_jobs(kind=None)[-1].id}").status_code \
        == 404  # a training job is not an export
    assert view["id"] not in {j["id"] for j in client.get("/api/training/jobs").json()}

    in_use = client.delete(f"/api/models/{model_id}")
    assert in_use.status_code == 409 and in_use.json()["code"] == "model_in_use"
    assert view["id"] in in_use.json()["detail"]
    for job in (view["id"], other.json()["id"], merged.json()["id"]):
        cancelled = client.post(f"/api/exports/{job}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert post(model_id, {"format": "gguf", "quantization": "q8_0"}).json()["id"] != view["id"]  # a new one
    for job in client.get(f"/api/models/{model_id}/exports", params={"status": "queued"}).json():
        client.post(f"/api/exports/{job['id']}/cancel")
    assert client.delete(f"/api/models/{model_id}").status_code == 200
    no_files = client.get(f"/api/exports/{view['id']}/files/model.gguf")
    assert no_files.status_code == 404 and no_files.json()["code"] == "file_not_found"


def test_queue_full_spares_the_idempotent_answer(client, settings, tiny):
    model_id = register(client, settings, tiny, 4)
    first = client.post(f"/api/models/{model_id}/export", json={"format": "ollama"})
    assert first.status_code == 202
    settings.max_queued_jobs = 1
    full = client.post(f"/api/models/{model_id}/export", json={"format": "merged"})
    assert full.status_code == 429 and full.json()["code"] == "queue_full"
    same = client.post(f"/api/models/{model_id}/export", json={"format": "ollama"})
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]


def asgi_get(app, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, list[bytes]]:
    """GET through the ASGI app, keeping each body message: a streamed file arrives in several."""
    import asyncio

    messages: list[dict] = []
    state = {"asked": False, "done": None}

    async def receive():  # the request once; then a disconnect only after the whole response was sent
        if not state["asked"]:
            state["asked"], state["done"] = True, asyncio.Event()
            return {"type": "http.request", "body": b"", "more_body": False}
        await state["done"].wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            state["done"].set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), *headers], "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    bodies = [m.get("body", b"") for m in messages if m["type"] == "http.response.body"]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, bodies


def test_export_jobs_through_the_worker(make_client, settings, tiny, run_worker):
    """The real engine child exports the tiny adapter (merged, then GGUF q8_0 + Ollama); files download."""
    if settings.resolved_database_url().startswith("postgresql"):
        pytest.skip("the engine run does not depend on the database; the PostgreSQL store path is covered above")
    from loralab.services.tickets import issue_ticket

    settings.engine_command = None  # python -m loralab.engine.run, not the fake engine
    settings.api_token = TOKEN
    client = make_client(Authorization=f"Bearer {TOKEN}")
    anonymous = make_client()
    svc = client.app.state.services
    model_id = register(client, settings, tiny, 7)
    versions_before = len(client.get("/api/models", params={"kind": "fine_tuned"}).json())
    merged = client.post(f"/api/models/{model_id}/export", json={"format": "merged"})
    ollama = client.post(f"/api/models/{model_id}/export", json={"format": "ollama", "quantization": "q8_0"})
    assert merged.status_code == 202 and ollama.status_code == 202
    assert anonymous.post(f"/api/models/{model_id}/export", json={"format": "gguf"}).status_code == 401
    run_worker()
    views = {fmt: wait_until_finished(client, r.json()["id"]) for fmt, r in (("merged", merged), ("ollama", ollama))}
    for view in views.values():
        assert view["status"] == "succeeded", view["error"]
        assert view["progress"]["percent"] == 100.0 and view["architecture"] == "llama"
    assert len(client.get("/api/models", params={"kind": "fine_tuned"}).json()) == versions_before  # no new version

    names = {f["name"] for f in views["merged"]["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    ollama_view = views["ollama"]
    assert [f["name"] for f in ollama_view["files"]] == ["Modelfile", "README.md", "model.gguf"]
    assert ollama_view["ollama_command"] == "ollama create my-model-7:v1 -f Modelfile"
    run_dir = settings.home / "runs" / ollama_view["id"] / "export"
    for item in ollama_view["files"]:
        assert item["size_bytes"] == (run_dir / item["name"]).stat().st_size
    assert ollama_view["total_bytes"] == sum(f["size_bytes"] for f in ollama_view["files"])
    for text_file in ("Modelfile", "README.md"):  # no server path in what users download
        text = client.get(f"/api/exports/{ollama_view['id']}/files/{text_file}").text
        assert str(settings.home) not in text and str(settings.home.resolve()) not in text
    assert "FROM ./model.gguf" in client.get(f"/api/exports/{ollama_view['id']}/files/Modelfile").text

    # downloads: the bytes of the file, as an attachment
    gguf = client.get(f"/api/exports/{ollama_view['id']}/files/model.gguf")
    assert gguf.status_code == 200 and gguf.content == (run_dir / "model.gguf").read_bytes()
    assert gguf.headers["content-disposition"] == 'attachment; filename="model.gguf"'
    assert gguf.headers["content-type"] == "application/octet-stream"
    ranged = client.get(f"/api/exports/{ollama_view['id']}/files/model.gguf", headers={"Range": "bytes=0-3"})
    assert ranged.status_code == 206 and ranged.content == b"GGUF"
    weights = settings.home / "runs" / views["merged"]["id"] / "export" / "model.safetensors"
    assert weights.stat().st_size > 64 * 1024  # more than one of FileResponse's 64 KiB chunks
    status, headers, bodies = asgi_get(client.app, f"/api/exports/{views['merged']['id']}/files/model.safetensors",
                                       [(b"authorization", f"Bearer {TOKEN}".encode())])
    assert status == 200 and b"".join(bodies) == weights.read_bytes()
    assert len(bodies) >= 2 and max(map(len, bodies)) <= 64 * 1024  # streamed in chunks, never read whole

    # tickets: scope export:<job>, for files only
    url = f"/api/exports/{ollama_view['id']}/files/model.gguf"
    assert anonymous.get(url).status_code == 401
    good = issue_ticket(svc, f"export:{ollama_view['id']}")["ticket"]
    assert anonymous.get(url, params={"ticket": good}).content == gguf.content
    for scope in (f"export:{views['merged']['id']}", f"report:{ollama_view['id']}", f"events:{ollama_view['id']}"):
        assert anonymous.get(url, params={"ticket": issue_ticket(svc, scope)["ticket"]}).status_code == 401
    assert anonymous.get(f"/api/exports/{ollama_view['id']}", params={"ticket": good}).status_code == 401
    expired = issue_ticket(svc, f"export:{ollama_view['id']}", seconds=-5)["ticket"]
    assert anonymous.get(url, params={"ticket": expired}).status_code == 401

    # names: only the files listed, nothing else of the run directory
    for name in ("..%2Fspec.json", "..%2F..%2F..%2Floralab.db", "spec.json", "events.jsonl", "%2Fetc%2Fpasswd",
                 "model.safetensors", "%2E%2E", "Modelfile%00.gguf"):
        response = client.get(f"/api/exports/{ollama_view['id']}/files/{name}")
        assert response.status_code == 404, name
        assert str(settings.home) not in response.text

    events = [json.loads(line[6:]) for line in client.get(f"/api/training/jobs/{ollama_view['id']}/events").text
              .splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    stages = [e["stage"] for e in events if e["type"] == "progress"]
    assert stages[:2] == ["merging", "converting"] and stages[-1] == "quantizing"
    last = [e for e in events if e["type"] == "progress"][-1]
    assert last["step"] == last["total_steps"] and last["percent"] == 100.0
    listed = client.get(f"/api/models/{model_id}/exports").json()
    assert [e["id"] for e in listed] == [ollama_view["id"], views["merged"]["id"]]
    assert listed[0]["files"] == ollama_view["files"]


def test_engine_export_cancel(tiny_model_dir, tmp_path):
    """SIGTERM (or a stop between stages) ends an export with a `cancelled` event, exit 3 and no files left."""
    from loralab.engine.events import EventWriter
    from loralab.engine.export_job import EXIT_CANCELLED, EXIT_OK, run_export
    from loralab.spec import ExportSpec

    source = tmp_path / "adapter"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny = str(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(source)
    spec = ExportSpec(model_id="ft-" + "1" * 24, source=str(source), base_model=tiny, format="gguf",
                      quantization="f16", name="tiny:v1")

    def run(run_dir, on_event, interrupt=False):
        stop = threading.Event()
        return run_export(spec, run_dir, EventWriter(run_dir, echo=lambda e: on_event(e, stop)), stop,
                          interrupt=interrupt), [json.loads(x) for x in (run_dir / "events.jsonl").read_text()
                                                 .splitlines()]

    def stop_when_converting(event, stop):
        if event.get("stage") == "converting":
            stop.set()

    code, events = run(tmp_path / "stopped", stop_when_converting)
    assert code == EXIT_CANCELLED and events[-1]["type"] == "cancelled"
    assert [e["stage"] for e in events if e["type"] == "progress"] == ["merging", "converting"]
    assert not (tmp_path / "stopped" / "export").exists()
    assert [p.name for p in (tmp_path / "stopped").iterdir()] == ["events.jsonl"]  # no staging left

    if threading.current_thread() is threading.main_thread():
        def sigterm_while_writing(event, stop):
            if event.get("stage") == "writing":
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises out of the tensor loop

        before = signal.getsignal(signal.SIGTERM)
        code, events = run(tmp_path / "signalled", sigterm_while_writing, interrupt=True)
        assert code == EXIT_CANCELLED and events[-1]["type"] == "cancelled"
        assert events[-2]["stage"] == "writing" and not (tmp_path / "signalled" / "export").exists()
        assert signal.getsignal(signal.SIGTERM) is before  # restored

    code, events = run(tmp_path / "whole", lambda e, s: None)
    assert code == EXIT_OK and events[-1]["type"] == "done"
    assert [f["name"] for f in events[-1]["files"]] == ["model.gguf"]
    assert events[-1]["quantization"] == "f16" and events[-1]["ollama_command"] is None
