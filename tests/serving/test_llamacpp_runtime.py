"""The llama.cpp serving runtime: runtime choice, request settings, and /v1 through the official `openai` client
answering the same way whichever runtime serves (a real uvicorn server; llama.cpp in its child process)."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from loralab.engine import llamacpp as engine_llamacpp
from loralab.services import llamacpp

openai = pytest.importorskip("openai")
needs_llamacpp = pytest.mark.skipif(not engine_llamacpp.available(), reason="xllamacpp is not installed")
RUNTIMES = ["transformers", pytest.param("llamacpp", marks=needs_llamacpp)]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_dir(tmp_path, model_type: str):
    path = tmp_path / model_type
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


# ---- which runtime serves ---------------------------------------------------------------------------------------

def test_auto_picks_llamacpp_on_a_cpu_host_when_installed_and_supported(tmp_path, monkeypatch):
    llama, gpt2 = model_dir(tmp_path, "llama"), model_dir(tmp_path, "gpt2")
    monkeypatch.setattr(engine_llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp, "_has_gpu", lambda: False)
    assert llamacpp.runtime_for("auto", llama) == "llamacpp"
    assert llamacpp.runtime_for("auto", model_dir(tmp_path, "qwen2")) == "llamacpp"
    assert llamacpp.runtime_for("auto", gpt2) == "transformers"  # no GGUF writer for it
    assert llamacpp.runtime_for("auto", None) == "transformers"  # unknown model (not in the local cache)
    assert llamacpp.runtime_for("auto", None, known_llama=True) == "llamacpp"  # the embedded model, unconverted
    assert llamacpp.runtime_for("transformers", llama) == "transformers"
    monkeypatch.setattr(llamacpp, "_has_gpu", lambda: True)
    assert llamacpp.runtime_for("auto", llama) == "transformers"  # GPUs: the PyTorch decoder
    assert llamacpp.runtime_for("llamacpp", llama) == "llamacpp"  # asked for: served so anyway
    monkeypatch.setattr(engine_llamacpp, "available", lambda: False)
    assert llamacpp.runtime_for("auto", llama) == "transformers"


def test_llamacpp_asked_for_but_impossible_says_what_to_change(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_llamacpp, "available", lambda: False)
    with pytest.raises(llamacpp.RuntimeUnavailable, match=r"pip install 'loralab\[llamacpp\]'"):
        llamacpp.runtime_for("llamacpp", model_dir(tmp_path, "llama"))
    monkeypatch.setattr(engine_llamacpp, "available", lambda: True)
    with pytest.raises(llamacpp.RuntimeUnavailable, match="architecture 'gpt2'.*LORALAB_SERVING_RUNTIME=auto"):
        llamacpp.runtime_for("llamacpp", model_dir(tmp_path, "gpt2"))
    with pytest.raises(llamacpp.RuntimeUnavailable, match="one of auto, transformers, llamacpp"):
        llamacpp.runtime_for("vllm", model_dir(tmp_path, "llama"))


def test_request_settings_decode_the_way_loralab_samples():
    body = engine_llamacpp.request_body([1, 2, 3], max_tokens=7, temperature=0.7, top_p=0.9, seed=5, stop=("##",),
                                        repetition_penalty=1.2, penalty_tokens=2048)
    # temperature before top-p (HF's order), and none of llama.cpp's extra truncations
    assert body["samplers"] == ["penalties", "temperature", "top_p"]
    assert (body["top_k"], body["min_p"], body["typical_p"]) == (0, 0.0, 1.0)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 7 and body["seed"] == 5 and body["stop"] == ["##"]
    assert body["repeat_penalty"] == 1.2 and body["repeat_last_n"] == 2048  # the whole sequence, as loralab does
    unseeded = engine_llamacpp.request_body([1], max_tokens=1, temperature=1.0, top_p=1.0, seed=None, stop=(),
                                            repetition_penalty=1.0)
    assert 0 <= unseeded["seed"] < 2**32


def test_gguf_cache_names_registry_versions_by_id_and_bases_by_content(tmp_path):
    home = tmp_path / "home"
    version = home / "registry" / ("ft-" + "a" * 24)
    version.mkdir(parents=True)
    base = model_dir(tmp_path, "llama")
    assert llamacpp.gguf_name(home, str(base), str(version), "q8_0") == f"ft-{'a' * 24}-q8_0.gguf"
    assert llamacpp.gguf_name(home, str(version), None, "f16") == f"ft-{'a' * 24}-f16.gguf"  # a full fine-tune
    first = llamacpp.gguf_name(home, str(base), None, "q8_0")
    assert first.startswith("base-llama-") and first.endswith("-q8_0.gguf")
    (base / "model.safetensors").write_bytes(b"new weights")  # a replaced base gets a new file
    assert llamacpp.gguf_name(home, str(base), None, "q8_0") != first


def test_sse_lines_parse():
    lines = ['data: {"content": "a"}', "", ": ping", 'data: {"content": "b", "stop": true}', "data: [DONE]"]
    assert [e["content"] for e in engine_llamacpp.iter_sse(lines)] == ["a", "b"]


# ---- /v1 with either runtime ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fresh_engines():
    """Each test starts without loaded models or llama.cpp children (both engines are process-wide)."""
    from loralab.services import inference, serving

    inference.shutdown_engine()
    llamacpp.shutdown_engine()
    serving._FELL_BACK.clear()
    yield
    inference.shutdown_engine()
    llamacpp.shutdown_engine()


def serve(settings):
    """create_app(settings) on uvicorn, 127.0.0.1, ephemeral port, in a thread: (url of /v1, app, stop)."""
    import uvicorn

    from loralab.api.app import create_app

    app = create_app(settings)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]

    def stop():
        srv.should_exit = True
        thread.join(15)
    return f"http://127.0.0.1:{port}/v1", app, stop


@pytest.fixture
def served(settings, tiny_model_dir, request):
    """A server on the tiny Llama (plus one LoRA version of it) with LORALAB_SERVING_RUNTIME = the param."""
    settings.serving_runtime = request.param
    settings.llamacpp_quantization = "f16"
    settings.llamacpp_parallel = 4
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    url, app, stop = serve(settings)
    version = register(app.state.services.repo, settings)
    yield url, app, version
    stop()


def register(repo, settings) -> str:
    """A succeeded job whose result is a random (non-identity) LoRA version of the tiny base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    job = repo.create_job({"method": "lora"}, None, "bot")
    repo.set_status(job.id, "queued")
    claim = repo.claim_job("test-worker", 30)
    model_id = "ft-" + "1" * 24
    base = str(settings.home / "models" / "tiny")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    path = settings.home / "registry" / model_id
    peft.save_pretrained(path)
    repo.finish_job(claim, "succeeded", model=dict(
        id=model_id, name="bot", base_model=base, method="lora", dataset_id=None, job_id=claim.job_id,
        lineage={}, spec={"method": "lora"}, metrics={}, path=str(path)))
    return model_id


@pytest.mark.parametrize("served", RUNTIMES, indirect=True)
def test_openai_client_works_the_same_with_either_runtime(served, tiny_model_dir):
    import httpx
    from transformers import AutoTokenizer

    url, app, version = served
    svc = app.state.services
    runtime = svc.settings.serving_runtime
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    listed = {m.id: m for m in client.models.list().data}
    assert listed["tiny"].model_extra["runtime"] == runtime and listed[version].model_extra["runtime"] == runtime

    # streaming and whole answers agree (greedy), usage counts loralab's own prompt tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].id.startswith("gen-") and all(c.id == chunks[0].id for c in chunks)
    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens

    # stop strings cut the text, streamed or not
    full = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16 and len(text) >= 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0,
                                    stop=[stop, "never-seen"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    pieces = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == text[: text.find(stop)]

    # n choices, per-request seeds: repeatable
    sampled = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=2, seed=7, temperature=1)
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=2, seed=7, temperature=1)
    assert [c.index for c in sampled.choices] == [0, 1]
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]

    # the adapter version changes the answer
    adapted = client.chat.completions.create(model=version, messages=CHAT, max_tokens=8, temperature=0)
    assert adapted.choices[0].message.content != streamed

    # errors keep OpenAI's shape
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert info.value.code == "model_not_found"
    response = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": CHAT, "temperature": 5})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
    assert httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": [10**6]}).status_code == 400

    # every answer is recorded with its gen- id, and feedback attaches to it
    from loralab.store.feedback import FeedbackStore

    row = FeedbackStore(svc.db).get_generation(whole.id)
    assert row is not None and row.outputs == [streamed] and row.finish_reason in ("stop", "length")
    feedback = httpx.post(url.replace("/v1", "/api/feedback"), json={"generation_id": whole.id, "thumbs": "up"})
    assert feedback.status_code in (200, 201), feedback.text

    servers = {}
    for worker in llamacpp.get_engine(svc.settings)._workers.values():
        servers.update(worker.servers())
    if runtime == "llamacpp":  # llama.cpp children served the base and the merged version
        assert set(servers) == {None, str(svc.settings.home / "registry" / version)}
        cache = sorted(p.name for p in (svc.settings.home / "gguf-cache").glob("*.gguf"))
        assert f"{version}-f16.gguf" in cache and len(cache) == 2
    else:
        assert servers == {}


@needs_llamacpp
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_auto_serves_with_transformers_when_llamacpp_fails(settings, tiny_model_dir, monkeypatch):
    settings.serving_runtime = "auto"
    monkeypatch.setattr(llamacpp, "_has_gpu", lambda: False)
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")

    def broken(*args, **kwargs):
        raise engine_llamacpp.LlamaCppError("llama.cpp could not load it: the server exited with code 1")

    monkeypatch.setattr(engine_llamacpp, "build_gguf", broken)
    url, app, stop = serve(settings)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        from loralab.ui.i18n import t
        from loralab.ui.playground import runtime_label

        svc = app.state.services
        assert {m.id: m for m in client.models.list().data}["tiny"].model_extra["runtime"] == "llamacpp"
        assert runtime_label(svc, "tiny", "ja") == t("ja", "pg.runtime_llamacpp")
        answer = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1
        assert {m.id: m for m in client.models.list().data}["tiny"].model_extra["runtime"] == "transformers"
        assert runtime_label(svc, "tiny", "en") == "Runtime: transformers (PyTorch)"
        settings.serving_runtime = "llamacpp"  # asked for by name: the failure is the answer
        import httpx

        failed = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 2})
        assert failed.status_code == 503 and "LORALAB_SERVING_RUNTIME=transformers" in failed.text
        assert str(settings.home) not in failed.text
    finally:
        stop()
