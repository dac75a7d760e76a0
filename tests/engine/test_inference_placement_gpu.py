"""The inference placement on real CUDA GPUs: the tiny model loaded in bf16/fp16 (and 4-bit, and spread over two
GPUs) and served through the batching decoder. Skipped without CUDA."""
from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, needs_cuda]


def _expected_dtype():
    """Training's rule: bf16 when every GPU supports it natively, else fp16."""
    majors = [torch.cuda.get_device_properties(i).major for i in range(torch.cuda.device_count())]
    return torch.bfloat16 if torch.version.hip or all(m >= 8 for m in majors) else torch.float16


def _worker(tiny_model_dir, placement):
    from loralab.data.template import ensure_chat_template
    from loralab.engine.models import load_model, load_tokenizer
    from loralab.services.inference import BaseWorker

    model = load_model(str(tiny_model_dir), placement=placement).eval()
    tokenizer = ensure_chat_template(load_tokenizer(str(tiny_model_dir)))
    return BaseWorker(str(tiny_model_dir), model, tokenizer, placement=placement)


def _greedy_reference(model, tokenizer, prompt_ids, max_new_tokens):
    """One row decoded by transformers' own generate on the same model: the batching decoder must agree."""
    ids = torch.tensor([prompt_ids], device=model.get_input_embeddings().weight.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_tiny_model_served_on_cuda_in_16_bit(tiny_model_dir):
    from loralab.engine.models import inference_placement
    from loralab.services.inference import Sampling

    placement = inference_placement(str(tiny_model_dir))  # auto: CUDA is here
    assert placement.device == "cuda" and set(placement.device_map) == {""}  # whole, on the freest GPU
    assert placement.torch_dtype() == _expected_dtype()
    worker = _worker(tiny_model_dir, placement)
    try:
        assert worker.device.type == "cuda"
        assert {p.dtype for p in worker.model.parameters()} == {_expected_dtype()}
        assert {p.device.type for p in worker.model.parameters()} == {"cuda"}
        prompts = [worker.encode(prompt="hello world"), worker.encode(prompt="the capital of France is"),
                   worker.encode(messages=[{"role": "user", "content": "Explain LoRA."}])]
        samplings = [Sampling(max_tokens=8),  # greedy
                     Sampling(max_tokens=5, temperature=0.9, top_p=0.9, seed=3),  # sampled on the GPU generator
                     Sampling(max_tokens=6, temperature=0.7, seed=4, repetition_penalty=1.2, frequency_penalty=0.3,
                              presence_penalty=0.2)]
        first = worker.submit(prompts, None, samplings).result()
        again = worker.submit(prompts, None, samplings).result()
        assert [c.text for c in first] == [c.text for c in again]
        assert [c.completion_tokens <= s.max_tokens for c, s in zip(first, samplings)] == [True] * 3
        greedy = worker.submit([prompts[0]], None, [Sampling(max_tokens=8)]).result()[0]
        reference = _greedy_reference(worker.model, worker.tokenizer, prompts[0], 8)
        stop = next((i for i, t in enumerate(reference) if t in worker.eos_ids), len(reference))
        assert greedy.text == worker.tokenizer.decode(reference[:stop + 1], skip_special_tokens=True)
    finally:
        worker.close()


def test_adapter_rows_and_base_rows_share_a_batch_on_cuda(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from loralab.engine.models import inference_placement, load_model
    from loralab.services.inference import Sampling

    adapter = tmp_path / "adapter"
    lora = get_peft_model(load_model(str(tiny_model_dir)),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(adapter)
    worker = _worker(tiny_model_dir, inference_placement(str(tiny_model_dir), device="cuda"))
    try:
        ids = worker.encode(prompt="hello world")
        tuned = worker.submit([ids], str(adapter), [Sampling(max_tokens=6)])
        base = worker.submit([ids], None, [Sampling(max_tokens=6)])
        assert tuned.result()[0].completion_tokens > 0 and base.result()[0].completion_tokens > 0
        assert {p.device.type for p in worker.peft.parameters()} == {"cuda"}
    finally:
        worker.close()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_tiny_model_served_in_four_bit(tiny_model_dir):
    from loralab.engine.models import inference_placement
    from loralab.services.inference import Sampling

    placement = inference_placement(str(tiny_model_dir), quantization="4bit")
    assert placement.quantization == "4bit" and placement.torch_dtype() == _expected_dtype()
    worker = _worker(tiny_model_dir, placement)
    try:
        assert getattr(worker.model, "is_loaded_in_4bit", False)
        result = worker.submit([worker.encode(prompt="hello")], None, [Sampling(max_tokens=4)]).result()[0]
        assert result.completion_tokens > 0
    finally:
        worker.close()


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_model_spread_over_two_gpus_decodes_like_one(tiny_model_dir):
    from dataclasses import replace

    from loralab.engine.models import inference_placement
    from loralab.services.inference import Sampling

    single = inference_placement(str(tiny_model_dir), device="cuda")
    # The split accelerate's "auto" map makes for a large model, written out for the tiny one: embeddings, the tied
    # head and layer 0 on GPU 0, layer 1 on GPU 1, so the KV cache lives on two devices.
    split = {"model.embed_tokens": 0, "lm_head": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
             "model.rotary_emb": 1}
    spread = replace(single, device_map=split)
    one, two = _worker(tiny_model_dir, single), _worker(tiny_model_dir, spread)
    try:
        assert {p.device.index for p in two.model.parameters()} == {0, 1}
        prompts = [one.encode(prompt="hello world"), one.encode(prompt="the capital of France is")]
        settings = [Sampling(max_tokens=3), Sampling(max_tokens=7)]  # rows finish at different steps
        assert [c.text for c in two.submit(prompts, None, settings).result()] == \
            [c.text for c in one.submit(prompts, None, settings).result()]
    finally:
        one.close()
        two.close()
