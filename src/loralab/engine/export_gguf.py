"""GGUF writing for Llama-family models (llama, mistral, qwen2), laid out as llama.cpp's converter does."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from loralab.engine.export import QUANTIZATIONS, ExportError

# transformers model_type -> llama.cpp architecture; mistral is written as llama, as llama.cpp does.
SUPPORTED_ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_Q = gguf.GGMLQuantizationType

# Pre-tokenizer split patterns as they appear in tokenizer.json, named the way llama.cpp names them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class GgufInfo:
    """What was written: architecture, tokenizer kind and each tensor's GGML type."""

    architecture: str
    tokenizer_model: str
    tokenizer_pre: str | None
    tensor_types: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# A tensor source: HF name -> (shape, loader returning a torch tensor or numpy array).
TensorSource = Mapping[str, tuple[tuple[int, ...], Callable[[], Any]]]


def check_architecture(config) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture for a transformers config, or an ExportError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"GGUF export does not support the architecture {model_type!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}. Export with --format merged instead "
            "and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    rope_type = str(_rope(config).get("rope_type") or "default").lower()
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise ExportError(f"rope scaling {rope_type!r} has no GGUF equivalent here (supported: linear, yarn, llama3)")
    return SUPPORTED_ARCHITECTURES[model_type]


def tensors_from_state_dict(state_dict: Mapping[str, Any]) -> TensorSource:
    """Wrap an in-memory state dict (e.g. a merged model's) as a tensor source."""
    return {name: (tuple(t.shape), (lambda t=t: t)) for name, t in state_dict.items()}


@contextmanager
def tensors_from_safetensors(model_dir: Path) -> Iterator[TensorSource]:
    """Read a model directory's safetensors lazily, one tensor at a time."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} holds no .safetensors weights")
    handles = [safe_open(str(model_dir / name), framework="pt") for name in files]
    source: dict[str, tuple[tuple[int, ...], Callable[[], Any]]] = {}
    for handle in handles:
        for name in handle.keys():
            shape = tuple(handle.get_slice(name).get_shape())
            source[name] = (shape, lambda h=handle, n=name: h.get_tensor(n))
    try:
        yield source
    finally:
        handles.clear()


def write_gguf(
    path: Path, *, config, tensors: TensorSource, tokenizer, quantization: str = "f16",
    name: str = "model", tokenizer_pre: str | None = None, progress: Callable[[int, int], None] | None = None,
) -> GgufInfo:
    """Write one GGUF file: llama.cpp metadata, tokenizer, chat template and (optionally Q8_0) tensors.

    `progress(done, total)` is called after each tensor is written.
    """
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    arch = check_architecture(config)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    info = GgufInfo(architecture=arch_name, tokenizer_model="", tokenizer_pre=None)
    plan = _plan_tensors(config, arch, tensors, quantization, info)
    writer = gguf.GGUFWriter(path, arch_name)
    try:
        _add_metadata(writer, config, name, quantization)
        _add_tokenizer(writer, config, tokenizer, tokenizer_pre, info)
        for gguf_name, shape, qtype, _ in plan:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (gguf_name, shape, qtype, load) in enumerate(plan, 1):
            data = _encode(load(), qtype)
            if qtype == _Q.F16 and not np.isfinite(data).all():
                info.warnings.append(f"{gguf_name} has values beyond the float16 range; use q8_0 or merged")
            writer.write_tensor_data(data)
            if progress is not None:
                progress(done, len(plan))
    finally:
        writer.close()
    return info


def _plan_tensors(config, arch, tensors: TensorSource, quantization: str, info: GgufInfo):
    """Map HF names to llama.cpp names, choose each tensor's type and add the needed transforms."""
    n_layers = int(config.num_hidden_layers)
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    permute = arch == gguf.MODEL_ARCH.LLAMA
    plan = []
    rope_factors = _llama3_rope_factors(config)
    if rope_factors is not None:
        plan.append(("rope_freqs.weight", rope_factors.shape, _Q.F32, lambda: rope_factors))
    seen: set[str] = set()
    for hf_name, (shape, load) in tensors.items():
        if hf_name.endswith(("rotary_emb.inv_freq", ".attention.masked_bias")):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(
                f"tensor {hf_name!r} has no llama.cpp name for {gguf.MODEL_ARCH_NAMES[arch]}; "
                "the checkpoint is not a plain Llama-family model"
            )
        if gguf_name in seen:
            raise ExportError(f"two tensors map to {gguf_name!r}")
        seen.add(gguf_name)
        shape = tuple(d for d in shape if d != 1) or (1,)  # llama.cpp squeezes
        if permute and ".attn_q." in gguf_name:
            load = _permuted(load, shape, n_head)
        elif permute and ".attn_k." in gguf_name:
            load = _permuted(load, shape, n_kv)
        plan.append((gguf_name, shape, _choose_type(hf_name, gguf_name, shape, quantization), load))
    if not tied and "output.weight" not in seen:
        raise ExportError("the model has untied output embeddings but no lm_head.weight tensor")
    if "token_embd.weight" not in seen:
        raise ExportError("the model has no token embedding tensor (model.embed_tokens.weight)")
    info.tensor_types = {n: q.name for n, _, q, _ in plan}
    return plan


def _choose_type(hf_name: str, gguf_name: str, shape: tuple[int, ...], quantization: str):
    """llama.cpp's rule: 1-D tensors, norms and biases stay F32; Q8_0 needs rows that are a multiple of 32."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not hf_name.endswith(".weight"):
        return _Q.F32
    block = gguf.GGML_QUANT_SIZES[_Q.Q8_0][0]
    if quantization == "q8_0" and shape[-1] % block == 0:
        return _Q.Q8_0
    return _Q.F16


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def _to_numpy(tensor) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32, copy=False)
    import torch

    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _encode(tensor, qtype) -> np.ndarray:
    data = np.ascontiguousarray(_to_numpy(tensor).squeeze())
    if data.ndim == 0:
        data = data.reshape(1)
    if qtype == _Q.F32:
        return data
    if qtype == _Q.F16:
        with np.errstate(over="ignore"):
            return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _permuted(load, shape, heads: int):
    """llama.cpp's LlamaModel.permute: interleave the rotary halves of each head (the GGUF loader undoes it)."""
    if shape[0] % (heads * 2):
        raise ExportError(f"attention weight of shape {shape} does not split into {heads} heads")

    def load_permuted():
        w = _to_numpy(load()).reshape(shape)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return load_permuted


def _rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _llama3_rope_factors(config) -> np.ndarray | None:
    """The rope_freqs tensor llama.cpp expects for Llama 3.1-style ('llama3') rope scaling."""
    rope = _rope(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _add_metadata(writer, config, name: str, quantization: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    n_head = int(config.num_attention_heads)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = str(rope.get("rope_type") or "default").lower()
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


# --- tokenizer -------------------------------------------------------------------------------

def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) tokenizer; none could be built")
    return json.loads(backend.to_str())


def tokenizer_kind(tokenizer) -> str:
    """'gpt2' for byte-level BPE, 'llama' for sentencepiece-style BPE with byte fallback."""
    model = _backend_json(tokenizer)["model"]
    if model.get("type") != "BPE":
        raise ExportError(
            f"GGUF export supports BPE tokenizers (byte-level or sentencepiece-style); this one is {model.get('type')!r}"
        )
    return "llama" if model.get("byte_fallback") else "gpt2"


def detect_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's tokenizer.ggml.pre name for a byte-level tokenizer's pre-tokenizer, None if unknown."""
    pre = _backend_json(tokenizer).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_PRE_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _vocab(tokenizer, n_vocab: int, kind: str) -> tuple[list[str], list[int], list[float]]:
    """Token texts, llama.cpp token types and scores for ids 0..n_vocab-1 (gaps become [PAD<id>])."""
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {n_vocab}; "
            "resize the embeddings before exporting"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk_id = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            text, kind_of = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif kind == "llama" and i == unk_id:
            kind_of = gguf.TokenType.UNKNOWN
        elif kind == "llama" and i not in added and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind_of = gguf.TokenType.BYTE
        elif i in special_ids or (i in added and (added[i].special or _looks_special(text))):
            kind_of = gguf.TokenType.CONTROL
        elif i in added:
            kind_of = gguf.TokenType.USER_DEFINED
            if kind == "llama":
                text = text.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalised
        else:
            kind_of = gguf.TokenType.NORMAL
        tokens.append(text)
        types.append(int(kind_of))
    return tokens, types, [-float(i) for i in range(n_vocab)]  # BPE: earlier tokens merge first


def _merges(tokenizer) -> list[str]:
    merges = _backend_json(tokenizer)["model"].get("merges") or []
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        else:  # [left, right]; a space inside a part is written as U+0120, as gguf's SpecialVocab does
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge))
    return out


def adds_special_token(tokenizer, token_id: int | None, at_start: bool) -> bool:
    """Whether encoding text adds this token (BOS at the start, EOS at the end), as llama.cpp will."""
    if token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) <= len(without) or not with_special:
        return False
    return (with_special[0] if at_start else with_special[-1]) == token_id


def _add_tokenizer(writer, config, tokenizer, tokenizer_pre: str | None, info: GgufInfo) -> None:
    kind = tokenizer_kind(tokenizer)
    tokens, types, scores = _vocab(tokenizer, int(config.vocab_size), kind)
    writer.add_tokenizer_model(kind)
    info.tokenizer_model = kind
    if kind == "gpt2":
        pre = tokenizer_pre or detect_pre_tokenizer(tokenizer)
        if pre is None:
            pre = "default"
            info.warnings.append(
                "unrecognised pre-tokenizer: wrote tokenizer.ggml.pre='default'; llama.cpp may split "
                "text slightly differently from transformers"
            )
        writer.add_tokenizer_pre(pre)
        info.tokenizer_pre = pre
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    merges = _merges(tokenizer)
    if merges:
        writer.add_token_merges(merges)
    for key, adder in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is None and key in ("bos", "eos"):
            token_id = getattr(config, f"{key}_token_id", None)
            token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            adder(token_id)
    writer.add_add_bos_token(adds_special_token(tokenizer, tokenizer.bos_token_id, at_start=True))
    writer.add_add_eos_token(adds_special_token(tokenizer, tokenizer.eos_token_id, at_start=False))
    if kind == "llama":
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        writer.add_chat_template(template)


def _adds_space_prefix(tokenizer) -> bool:
    backend = _backend_json(tokenizer)
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    normalizer = json.dumps(backend.get("normalizer") or {})
    return '"Prepend"' in normalizer
