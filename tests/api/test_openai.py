"""The OpenAI-compatible API (/v1) driven by the official `openai` client against a real uvicorn server."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def fresh_engine():
    """Each test starts without loaded models (the engine is process-wide)."""
    from loralab.services.inference import shutdown_engine

    shutdown_engine()
    yield
    shutdown_engine()


@pytest.fixture
def tiny(settings, tiny_model_dir):
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    return "tiny"


def make_adapter(settings, base_dir, model_id: str, seed: int):
    """A random (non-identity) LoRA adapter on the tiny base, written where the registry keeps versions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    target = settings.home / "registry" / model_id
    peft.save_pretrained(target)
    return target


def register(repo, settings, name: str, seed: int) -> str:
    """A succeeded job whose result is a LoRA version of the tiny base (the way the supervisor records one)."""
    job = repo.create_job({"method": "lora"}, None, name)
    repo.set_status(job.id, "queued")
    claim = repo.claim_job("test-worker", 30)
    model_id = f"ft-{seed:024x}"
    base = str(settings.home / "models" / "tiny")
    path = make_adapter(settings, base, model_id, seed)
    repo.finish_job(claim, "succeeded", model=dict(
        id=model_id, name=name, base_model=base, method="lora", dataset_id=None, job_id=claim.job_id,
        lineage={}, spec={"method": "lora"}, metrics={}, path=str(path)))
    return model_id


@pytest.fixture
def server(settings):
    """create_app(settings) served by uvicorn on 127.0.0.1 (ephemeral port) in a thread; yields its /v1 URL."""
    import uvicorn

    from loralab.api.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1", app
    srv.should_exit = True
    thread.join(15)


@pytest.fixture
def versions(server, settings, tiny):
    repo = server[1].state.services.repo
    return [register(repo, settings, "bot", 1), register(repo, settings, "other", 2)]


def client_for(url: str, key: str = "unused"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def chat_text(client, model: str, messages=CHAT, **kwargs) -> str:
    result = client.chat.completions.create(model=model, messages=messages, temperature=0, **kwargs)
    return result.choices[0].message.content


def test_stream_from_adapter_and_whole_from_base_in_one_server(server, versions, tiny_model_dir):
    from transformers import AutoTokenizer

    url, app = server
    client = client_for(url)
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", versions[0], versions[1]} <= ids
    assert client.models.retrieve(versions[0]).id == versions[0]

    chunks = list(client.chat.completions.create(
        model=versions[0], messages=CHAT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and finish in (["stop"], ["length"])

    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if finish == ["length"]:
        assert usage.completion_tokens == 8

    whole = client.chat.completions.create(model=versions[0], messages=CHAT, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == streamed  # greedy: streamed and whole agree
    assert whole.usage.completion_tokens == usage.completion_tokens

    base = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=8, temperature=0)
    assert base.object == "chat.completion" and base.choices[0].message.role == "assistant"
    assert base.usage.prompt_tokens == prompt_tokens and base.system_fingerprint == "tiny"
    adapted = [chat_text(client, v, max_tokens=8) for v in versions]
    assert len({base.choices[0].message.content, *adapted}) == 3  # each adapter changes the output

    # one base model object served all three: the adapters were attached to it, not loaded as copies
    from loralab.services.inference import get_engine

    workers = list(get_engine(app.state.services.settings.generate_cache_size)._workers.values())
    assert len(workers) == 1 and len(workers[0].adapters) == 2


def test_names_stages_and_production_resolve_to_versions(server, versions):
    url, app = server
    svc = app.state.services
    client = client_for(url)
    expected = chat_text(client, versions[0], max_tokens=6)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="bot", messages=CHAT, max_tokens=2)  # nothing deployed yet
    svc.repo.deploy(versions[0])
    assert chat_text(client, "bot", max_tokens=6) == expected
    assert chat_text(client, "production", max_tokens=6) == expected
    assert chat_text(client, "bot:1", max_tokens=6) == expected
    assert "bot" in {m.id for m in client.models.list().data}
    svc.repo.set_stage(versions[1], "production")
    assert chat_text(client, "other:production", max_tokens=6) == chat_text(client, versions[1], max_tokens=6)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="bot:7", messages=CHAT, max_tokens=2)


def test_errors_use_openai_shape(server, tiny):
    import httpx

    url, _ = server
    client = client_for(url)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    raw = httpx.post(f"{url}/chat/completions", json={"model": "ft-" + "0" * 24, "messages": CHAT})
    assert raw.status_code == 404
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["code"] == "model_not_found"

    for bad, param in [({"temperature": 5}, "temperature"), ({"n": 99}, "n"), ({"messages": []}, "messages"),
                       ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]:
        response = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": CHAT, **bad})
        assert response.status_code == 400, (bad, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", echo=True)
    assert httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": [10**6]}).status_code == 400


def test_token_required_when_configured(make_client, settings):
    settings.api_token = "t0ken"
    client = make_client()
    response = client.get("/v1/models")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/chat/completions", json={}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer t0ken"}).status_code == 200


def test_stop_sequences_cut_the_text(server, tiny):
    url, _ = server
    client = client_for(url)
    full = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16 and len(text) >= 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0,
                                    stop=[stop, "never-seen"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 16

    pieces = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == text[: text.find(stop)]

    chat = chat_text(client, "tiny", max_tokens=12)
    if len(chat) >= 2:
        assert chat_text(client, "tiny", max_tokens=12, stop=chat[1:2]) == chat[: chat.find(chat[1:2])]


def test_raw_sse_lines_and_several_prompts(server, tiny):
    import httpx

    url, _ = server
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"

    client = client_for(url)
    several = client.completions.create(model="tiny", prompt=["hello", "world"], max_tokens=5, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    alone = client.completions.create(model="tiny", prompt="world", max_tokens=5, temperature=0)
    assert several.choices[1].text == alone.choices[0].text
    sampled = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=2, seed=7, temperature=1)
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=2, seed=7, temperature=1)
    assert len(sampled.choices) == 2
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]


def test_concurrent_requests_batch_across_adapters_like_sequential(server, versions):
    from loralab.services.inference import get_engine

    url, app = server
    client = client_for(url)
    jobs = [(versions[0], "hello"), (versions[1], "hello"), ("tiny", "hello"), (versions[0], "capital of France")]

    def ask(model, text):
        return chat_text(client, model, messages=[{"role": "user", "content": text}], max_tokens=12)

    sequential = [ask(*job) for job in jobs]
    worker = next(iter(get_engine(app.state.services.settings.generate_cache_size)._workers.values()))
    # wait (up to 10 s) until all four have arrived, then run them as one batch
    worker.window_s, worker.max_batch, worker.max_rows_seen = 10.0, len(jobs), 0
    results: list[str | None] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = ask(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == sequential
    assert worker.max_rows_seen == len(jobs)  # one mixed-adapter batch held all four requests


def test_adapters_beyond_the_limit_are_detached_and_reloaded(server, versions):
    from loralab.services.inference import get_engine

    url, app = server
    client = client_for(url)
    first = [chat_text(client, v, max_tokens=6) for v in versions]
    worker = next(iter(get_engine(app.state.services.settings.generate_cache_size)._workers.values()))
    worker.max_adapters = 1
    assert [chat_text(client, v, max_tokens=6) for v in versions + versions] == first + first
    assert len(worker.adapters) == 1 and list(worker.adapters) == [str(worker_path(app, versions[1]))]


def test_requests_join_a_running_batch(settings, tiny):
    """Continuous batching: rows joining mid-decode (shorter KV cache, own sampling) match running alone."""
    from loralab.services.inference import InferenceEngine, Sampling

    engine = InferenceEngine(1)
    try:
        worker = engine.worker(str(settings.home / "models" / "tiny"))
        prompts = [worker.encode(prompt=p) for p in ("hello world", "capital", "What is the capital of France?")]
        settings_ = [Sampling(max_tokens=60), Sampling(max_tokens=5),
                     Sampling(max_tokens=20, temperature=0.9, seed=3, stop=("zz",))]
        alone = [worker.submit([p], None, [s]).result()[0] for p, s in zip(prompts, settings_, strict=True)]
        worker.max_rows_seen = 0
        first = worker.submit([prompts[0]], None, [settings_[0]])
        start = worker.steps
        while worker.steps < start + 3:
            time.sleep(0.001)
        later = [worker.submit([p], None, [s]) for p, s in zip(prompts[1:], settings_[1:], strict=True)]
        together = [first.result()[0]] + [stream.result()[0] for stream in later]
        assert [(c.text, c.completion_tokens, c.finish_reason) for c in together] == \
            [(c.text, c.completion_tokens, c.finish_reason) for c in alone]
        assert worker.max_rows_seen >= 2
    finally:
        engine.close()


def worker_path(app, model_id):
    return app.state.services.settings.home.resolve() / "registry" / model_id


@pytest.mark.model
def test_chat_completion_with_the_embedded_model(server):
    url, _ = server
    client = client_for(url)
    result = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=24, temperature=0,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    answer = result.choices[0].message.content
    assert answer.strip() and result.usage.completion_tokens <= 24
    assert "paris" in answer.lower()
