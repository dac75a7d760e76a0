"""Export: merged safetensors, GGUF (f16, q8_0) round-tripped through transformers' loader, Ollama Modelfiles."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from loralab.engine.export import ExportError, build_modelfile, export_model, inspect_source
from loralab.engine.export_ollama import derive_template

PROMPTS = [
    "What is the capital of France?",
    "Explain LoRA. LoRA adds low-rank matrices",
    "質問: 日本の首都はどこですか？\n回答:",
]
# Max abs logit difference to the merged model, for the tiny model (its logits are within about +-0.5).
TINY_TOLERANCE = {"f16": 2e-3, "q8_0": 0.08}


def _make_adapter(base_dir: Path, out: Path, seed: int = 1, target_modules="all-linear") -> Path:
    """A non-zero LoRA adapter (PEFT, init_lora_weights=False) with a spec.json naming its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    (out / "spec.json").write_text(json.dumps({"base_model": str(base_dir), "data": {"path": "x.jsonl"}}))
    return out


def _logits(model, tokenizer, prompts=PROMPTS):
    import torch

    with torch.inference_mode():
        return [model(**tokenizer(p, return_tensors="pt", add_special_tokens=False)).logits[0] for p in prompts]


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _load_gguf(out_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file="model.gguf", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(out_dir, gguf_file="model.gguf")


def _gguf_fields(path: Path) -> tuple[dict, dict]:
    """(metadata without the big arrays, {tensor name: GGML type name})."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in skip}
    return meta, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def merged_dir(tiny_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    result = export_model(tiny_adapter, "merged", out)
    assert result.out_dir == out and result.architecture == "llama"
    return out


@pytest.fixture(scope="module")
def merged_model(merged_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(merged_dir).eval(), AutoTokenizer.from_pretrained(merged_dir)


# --- merged --------------------------------------------------------------------------------------

def test_merged_export_matches_the_adapter(tiny_model_dir, tiny_adapter, merged_dir, merged_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(name.startswith("adapter") for name in files)
    model, tokenizer = merged_model
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_logits = _logits(base, tokenizer)
    with_adapter = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()
    merged_logits = _logits(model, tokenizer)
    assert _max_diff(merged_logits, _logits(with_adapter, tokenizer)) < 1e-5
    assert _max_diff(merged_logits, base_logits) > 1e-3  # the adapter really changed the model


# --- GGUF ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_gguf_round_trips_through_transformers(tiny_adapter, merged_model, tmp_path, quantization):
    import torch

    out = tmp_path / f"gguf-{quantization}"
    result = export_model(tiny_adapter, "gguf", out, quantization=quantization)
    assert result.files == ["model.gguf"] and result.gguf_file == out / "model.gguf"
    assert result.quantization == quantization and result.warnings == []

    merged, tokenizer = merged_model
    model, gguf_tokenizer = _load_gguf(out)
    diff = _max_diff(_logits(model, tokenizer), _logits(merged, tokenizer))
    print(f"tiny {quantization}: max abs logit diff {diff:.2e}")
    assert diff < TINY_TOLERANCE[quantization]

    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                         add_generation_prompt=True)
    for text in [*PROMPTS, chat, "  spaces\tand\nlines 123"]:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == "<|im_end|>"

    if quantization == "f16":
        inputs = tokenizer(chat, return_tensors="pt", add_special_tokens=False)
        settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            assert torch.equal(model.generate(**inputs, **settings), merged.generate(**inputs, **settings))

    meta, types = _gguf_fields(out / "model.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 32
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.context_length"] == 256 and meta["llama.vocab_size"] == 384
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7}[quantization]
    assert "output.weight" not in types  # tied embeddings
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    weight_type = {"f16": "F16", "q8_0": "Q8_0"}[quantization]
    assert types["blk.1.attn_q.weight"] == types["blk.0.ffn_down.weight"] == types["token_embd.weight"] == weight_type


def test_full_model_directory_exports_to_gguf(merged_dir, merged_model, tmp_path):
    result = export_model(merged_dir, "gguf", tmp_path / "from-full")
    assert result.base_model is None and result.architecture == "llama"
    merged, tokenizer = merged_model
    model, _ = _load_gguf(tmp_path / "from-full")
    assert _max_diff(_logits(model, tokenizer), _logits(merged, tokenizer)) < TINY_TOLERANCE["f16"]
    copied = export_model(merged_dir, "merged", tmp_path / "copy")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(copied.files)


def _save_tiny(model_cls, config_cls, tokenizer_dir: Path, out: Path, **extra) -> Path:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(3)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    model = model_cls(config)
    with torch.no_grad():  # make biases visible in the logits
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_family_architectures(tiny_model_dir, tmp_path, family):
    from transformers import (AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    classes = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig)}
    source = _save_tiny(*classes[family], tiny_model_dir, tmp_path / family, tie_word_embeddings=False)
    result = export_model(source, "gguf", tmp_path / "out")
    assert result.architecture == {"qwen2": "qwen2", "mistral": "llama"}[family]
    _, types = _gguf_fields(tmp_path / "out" / "model.gguf")
    assert "output.weight" in types
    if family == "qwen2":
        assert types["blk.0.attn_q.bias"] == "F32"
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model, _ = _load_gguf(tmp_path / "out")
    assert _max_diff(_logits(model, tokenizer), _logits(reference, tokenizer)) < TINY_TOLERANCE["f16"]


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tiny_models import _CORPUS

    # sentencepiece BPE layout: <unk> <s> </s>, 256 byte tokens, then the learned pieces
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    learner.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "sp")
    tokenizer.save_pretrained(tmp_path / "sp")

    export_model(tmp_path / "sp", "gguf", tmp_path / "out")
    meta, _ = _gguf_fields(tmp_path / "out" / "model.gguf")
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] is True
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    for text in ["Hello world 東京", *PROMPTS, " two  spaces\nnewline"]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text


# --- Ollama --------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
)


def test_ollama_export(tiny_adapter, tmp_path):
    out = tmp_path / "My Model"
    result = export_model(tiny_adapter, "ollama", out, quantization="q8_0")
    assert result.files == ["Modelfile", "README.md", "model.gguf"]
    assert result.ollama_command == f"ollama create my-model -f {out / 'Modelfile'}"
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in modelfile
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in modelfile
    assert 'PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n' in modelfile
    assert "SYSTEM" not in modelfile and "PARAMETER num_ctx 256" in modelfile
    assert "ollama create my-model -f Modelfile" in (out / "README.md").read_text()


def _template_tokenizer(template: str, specials: list[str], bos: str, eos: str, add_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{token: i + 1 for i, token in enumerate(specials)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="[UNK]")
    tokenizer.chat_template = template
    return tokenizer


LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V03 = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    '{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}'
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    '{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}{%- endif %}'
    "{%- endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_llama3_template():
    tokenizer = _template_tokenizer(
        LLAMA3, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "<|begin_of_text|>", "<|eot_id|>", add_bos=True)
    derived = derive_template(tokenizer)
    assert derived.template == (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
        "{{ end }}"
    )
    assert derived.stops == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert derived.system is None


def test_mistral_templates():
    v01 = derive_template(_template_tokenizer(MISTRAL_V01, ["<s>", "</s>"], "<s>", "</s>", add_bos=True))
    assert v01.template == (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'
    )
    assert v01.stops == ["[INST]", "[/INST]", "</s>"]
    v03 = derive_template(_template_tokenizer(MISTRAL_V03, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>",
                                              add_bos=True))
    assert '{{ if and $.System $last }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]' in v03.template
    assert '{{ else if eq .Role "assistant" }} {{ .Content }}</s>' in v03.template
    llama2 = derive_template(_template_tokenizer(LLAMA2, ["<s>", "</s>"], "<s>", "</s>", add_bos=True))
    assert "{{ if and $.System (eq $i $first) }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}" in llama2.template
    assert llama2.template.startswith(
        '{{ $first := 0 }}{{ if .Messages }}{{ if eq (index .Messages 0).Role "system" }}{{ $first = 1 }}')


def test_default_system_prompt_becomes_system():
    tokenizer = _template_tokenizer(SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>",
                                    "<|im_end|>", add_bos=False)
    derived = derive_template(tokenizer)
    assert derived.template == CHATML_TEMPLATE
    assert derived.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    modelfile = build_modelfile(tokenizer, config=None)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


def test_unexpressible_template_is_a_clear_error():
    numbered = "{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer = _template_tokenizer(numbered, ["<s>", "</s>"], "<s>", "</s>", add_bos=False)
    with pytest.raises(ExportError, match="cannot express this chat template.*ollama_template"):
        derive_template(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ExportError, match="no chat template"):
        derive_template(tokenizer)
    assert 'TEMPLATE """{{ .Prompt }}"""' in build_modelfile(tokenizer, config=None, template="{{ .Prompt }}")


def test_ollama_export_checks_the_template_before_merging(tiny_model_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").write_text("{% for m in messages %}Turn {{ loop.index }}: {{ m['content'] }}"
                                              "{% endfor %}")
    adapter = _make_adapter(base, tmp_path / "run")
    with pytest.raises(ExportError, match="cannot express this chat template"):
        export_model(adapter, "ollama", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = export_model(adapter, "ollama", tmp_path / "out", ollama_template="{{ .Prompt }}")
    assert 'TEMPLATE """{{ .Prompt }}"""' in (tmp_path / "out" / "Modelfile").read_text()
    assert result.files == ["Modelfile", "README.md", "model.gguf"]


# --- errors and the output directory -------------------------------------------------------------

def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    _make_adapter(tmp_path / "gpt2", tmp_path / "gpt2-adapter", target_modules=["c_attn"])
    for source in ("gpt2", "gpt2-adapter"):
        with pytest.raises(ExportError, match=r"architecture 'gpt2'.*llama, mistral, qwen2"):
            export_model(tmp_path / source, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the staging dir was removed


def test_existing_output_directory(tiny_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_model(tiny_adapter, "gguf", out)
    assert (out / "stale.txt").read_text() == "old"
    result = export_model(tiny_adapter, "gguf", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == result.files == ["model.gguf"]
    with pytest.raises(ExportError, match="would delete the source"):
        export_model(tiny_adapter, "merged", tiny_adapter, overwrite=True)
    (tmp_path / "empty").mkdir()
    assert export_model(tiny_adapter, "gguf", tmp_path / "empty").files == ["model.gguf"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old dirs left


def test_bad_arguments_and_sources(tiny_adapter, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export_model(tiny_adapter, "onnx", tmp_path / "o")
    with pytest.raises(ExportError, match="unknown quantization 'q4_0'"):
        export_model(tiny_adapter, "gguf", tmp_path / "o", quantization="q4_0")
    with pytest.raises(ExportError, match="does not exist"):
        export_model(tmp_path / "missing", "gguf", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither a LoRA adapter"):
        export_model(tmp_path / "empty", "gguf", tmp_path / "o")
    with pytest.raises(ExportError, match="not a valid Ollama model name"):
        export_model(tiny_adapter, "ollama", tmp_path / "o", name="bad name!")
    with pytest.raises(ExportError, match="base model '/nope/model' cannot be loaded"):
        export_model(tiny_adapter, "merged", tmp_path / "o", base_model="/nope/model")


def test_base_model_resolution_order(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/a"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert inspect_source(adapter).base_model == "/a"
    (adapter / "spec.json").write_text(json.dumps({"base_model": "/b", "data": {"path": "x.jsonl"}}))
    assert inspect_source(adapter).base_model == "/b"
    assert inspect_source(adapter, "/c").base_model == "/c"
    (adapter / "spec.json").write_text(json.dumps({"data": {"path": "x.jsonl"}}))
    assert inspect_source(adapter).base_model == "smollm2-135m-instruct"  # TrainSpec's default


# --- the embedded model --------------------------------------------------------------------------

@pytest.fixture
def quick_gguf_loading(monkeypatch):
    """Speed shims for transformers' GGUF loader on a 49k-token model, and one torch thread on a shared CPU."""
    import gguf
    import torch

    # the loader rebuilds this map once per submodule (~400 here) and parses the file's metadata twice
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    monkeypatch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=4)(gguf.GGUFReader))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy cores: OpenMP threads spinning against other jobs cost more than they give
    yield
    torch.set_num_threads(threads)


@pytest.mark.model
def test_embedded_model_round_trip(tmp_path, quick_gguf_loading):
    import torch
    from peft import LoraConfig, get_peft_model

    from loralab.engine.models import load_model, load_tokenizer

    torch.manual_seed(0)
    base = load_model("smollm2-135m-instruct")
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    run = tmp_path / "run"
    with_adapter = get_peft_model(base, config)
    with_adapter.save_pretrained(run)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.save_pretrained(run)
    (run / "spec.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct", "data": {"path": "x.jsonl"}}))
    reference = with_adapter.merge_and_unload().eval()

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
               for q in ("What is the capital of France?", "Write a haiku about the sea.")] + ["The quick brown fox"]
    expected = [x[-1] for x in _logits(reference, tokenizer, prompts)]
    for quantization, fmt, tolerance in (("f16", "ollama", 0.1), ("q8_0", "gguf", 2.0)):
        out = tmp_path / quantization
        result = export_model(run, fmt, out, quantization=quantization)
        assert result.base_model == "smollm2-135m-instruct" and result.warnings == []
        model, gguf_tokenizer = _load_gguf(out)
        got = [x[-1] for x in _logits(model, tokenizer, prompts)]
        diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
        print(f"embedded {quantization}: max abs last-token logit diff {diff:.3f}")
        assert diff < tolerance
        assert [int(a.argmax()) for a in got] == [int(b.argmax()) for b in expected]
        meta, _ = _gguf_fields(out / "model.gguf")
        assert meta["tokenizer.ggml.pre"] == "smollm"  # kept from the GGUF the base came from
        if quantization == "f16":
            for text in [*prompts, "numbers 12345 and 東京"]:
                assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
            inputs = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)
            settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            with torch.inference_mode():
                assert torch.equal(model.generate(**inputs, **settings), reference.generate(**inputs, **settings))
            modelfile = (out / "Modelfile").read_text()
            assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in modelfile
            assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


def _raw_tensors(path: Path, names: set[str]) -> dict:
    """Dequantized tensors read straight from the file (no transformers un-permuting)."""
    import gguf
    import numpy as np
    from transformers.integrations.gguf import GgufHeader

    header, blob = GgufHeader.from_file(str(path)), np.memmap(path, mode="r", dtype=np.uint8)
    out = {}
    for info in header.tensors:
        if info.name in names:
            qtype = gguf.GGMLQuantizationType(info.ggml_type)
            raw = np.asarray(blob[header.data_start + info.offset:][: info.nbytes])
            raw = raw.reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, qtype))
            out[info.name] = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    return out


@pytest.mark.model
def test_embedded_base_export_matches_llama_cpp_layout(embedded_model_dir, tmp_path):
    """Exporting the unmodified base reproduces the llama.cpp-made GGUF it came from: tokenizer, names, layout."""
    import numpy as np
    from transformers.integrations.gguf import read_gguf_metadata

    from loralab.engine.models import embedded_gguf_path

    export_model(embedded_model_dir, "gguf", tmp_path / "base")
    original, ours = str(embedded_gguf_path()), tmp_path / "base" / "model.gguf"
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    (meta_a, names_a), (meta_b, names_b) = read_gguf_metadata(original, arrays), read_gguf_metadata(str(ours), arrays)
    assert sorted(names_a) == sorted(names_b)
    same = ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "llama.rope.dimension_count",
            "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.context_length", "llama.vocab_size"]
    assert {k: meta_b[k] for k in same} == {k: meta_a[k] for k in same}
    names = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_q.weight", "blk.3.ffn_down.weight",
             "output_norm.weight"}
    a, b = _raw_tensors(Path(original), names), _raw_tensors(ours, names)
    for name in names:  # the base is the original Q4_1 dequantized: only float16 rounding separates them
        assert a[name].shape == b[name].shape
        assert float(np.abs(a[name] - b[name]).max()) < 5e-3, name
