"""The Models page's export section without a browser: start (and the idempotent answer), progress while running,
download links with a ticket that opens the file (and only that export's files), errors, in English and Japanese."""
from __future__ import annotations

import shutil
from urllib.parse import parse_qs, urlparse

import pytest

pytest.importorskip("gradio")

TOKEN = "ui-export-test-token-0123456"


@pytest.fixture
def svc(loralab_home):
    from loralab.services.context import open_services
    from loralab.settings import Settings

    services = open_services(Settings(home=loralab_home, database_url=None, api_token=TOKEN, engine_command=None))
    yield services
    services.close()


@pytest.fixture
def model_id(svc, tiny_model_dir):
    """A registered LoRA version of the tiny Llama (files as the supervisor leaves them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = svc.settings.home / "models" / "tiny"
    shutil.copytree(tiny_model_dir, base)
    repo = svc.repo
    job = repo.create_job({"method": "lora"}, None, "ui-export")
    repo.set_status(job.id, "queued")
    claim = repo.claim_job("test-worker", 30)
    model_id = "ft-" + "a" * 24
    target = svc.settings.home / "registry" / model_id
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(target)
    repo.finish_job(claim, "succeeded", model=dict(
        id=model_id, name="ui-export", base_model=str(base), method="lora", dataset_id=None, job_id=claim.job_id,
        lineage={}, spec={"method": "lora"}, metrics={}, path=str(target)))
    return model_id


def run(svc, export_id: str):
    """Play the worker: claim the export and store a progress event (the export is running, half done)."""
    claim = svc.repo.claim_job("test-worker", 30)
    assert claim is not None and claim.job_id == export_id
    svc.repo.append_events(claim, [(1, {"type": "started", "kind": "export"}),
                                   (2, {"type": "progress", "stage": "quantizing", "step": 5, "total_steps": 10,
                                        "eta_s": 12})],
                           {"stage": "quantizing", "step": 5, "total_steps": 10, "percent": 50.0, "eta_s": 12})
    return claim


def complete(svc, claim, files: dict[str, bytes], fail: dict | None = None) -> None:
    """Play the worker's end: the files in RUN_DIR/export and the `done` event (or an error)."""
    if fail:
        svc.repo.finish_job(claim, "failed", error=fail, events=[(3, {"type": "error", **fail})])
        return
    out = svc.settings.home / "runs" / claim.job_id / "export"
    out.mkdir(parents=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    done = {"type": "done", "kind": "export", "files": [{"name": n, "size_bytes": len(d)} for n, d in files.items()],
            "ollama_command": "ollama create ui-export:v1 -f Modelfile", "warnings": [], "architecture": "llama",
            "total_steps": 10}
    svc.repo.finish_job(claim, "succeeded", events=[(3, done)])


def test_export_section_flow(svc, model_id):
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app
    from loralab.ui import models as page

    assert page.start_export(svc, None, "gguf", "f16", "ja")[0] == "先にモデルのバージョンを選んでください。"
    message, none = page.start_export(svc, "tiny", "gguf", "f16", "en")
    assert none is None and message.startswith("Error:") and "fine-tuned" in message
    assert page.export_view(svc, None, "en") == (page.t("en", "exp.none"), "", False)

    message, export_id = page.start_export(svc, model_id, "ollama", "q8_0", "en")
    assert message == f"Queued export `{export_id}`."
    again, same = page.start_export(svc, model_id, "ollama", "q8_0", "ja")
    assert same == export_id and "すでに待機中" in again
    assert [value for _, value in page.export_choices(svc, model_id)] == [export_id]
    assert page.export_choices(svc, "tiny") == []
    status, links, active = page.export_view(svc, export_id, "en")
    assert "queued" in status and "waiting for a worker" in status and links == "" and active

    files = {"model.gguf": b"GGUF" + bytes(range(256)) * 4, "Modelfile": b"FROM ./model.gguf\n"}
    claim = run(svc, export_id)
    status, links, active = page.export_view(svc, export_id, "ja")
    assert "実行中" in status and "テンソルを量子化して書き込み中" in status and "50%" in status and "残り約 12秒" in status
    assert active and links == ""
    complete(svc, claim, files)

    status, links, active = page.export_view(svc, export_id, "en")
    assert "succeeded" in status and not active
    assert "ollama create ui-export:v1 -f Modelfile" in links and "1.0 KiB" in links
    urls = [part.split("](")[1].split(")")[0] for part in links.splitlines() if "](" in part]
    assert [urlparse(u).path for u in urls] == [f"/api/exports/{export_id}/files/{n}" for n in files]
    client = TestClient(create_app(svc.settings, services=svc, mount_web_ui=False), base_url="http://127.0.0.1")
    with client:
        for url, (name, data) in zip(urls, files.items()):
            response = client.get(url)  # no Authorization header: the ticket in the link opens it
            assert response.status_code == 200 and response.content == data, name
        ticket = parse_qs(urlparse(urls[0]).query)["ticket"][0]
        assert client.get(f"/api/exports/{export_id}", params={"ticket": ticket}).status_code == 401
        assert client.get(urlparse(urls[0]).path).status_code == 401

        # a failed export shows its error; the idempotent answer is gone once nothing is active
        message, failing = page.start_export(svc, model_id, "ollama", "q8_0", "en")
        assert failing != export_id and message.startswith("Queued")
        complete(svc, run(svc, failing), {}, fail={"code": "export_error", "message": "no chat template",
                                                    "param": None})
        status, links, active = page.export_view(svc, failing, "ja")
        assert "失敗" in status and "**export_error**：no chat template" in status and links == "" and not active
        assert [value for _, value in page.export_choices(svc, model_id)] == [failing, export_id]


def test_models_page_builds_with_the_export_section(svc):
    from loralab.ui.app import build_blocks

    blocks = build_blocks(svc)
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"exp-format", "exp-quantization", "exp-start", "exp-cancel", "exp-pick", "exp-status", "exp-links"} <= ids
