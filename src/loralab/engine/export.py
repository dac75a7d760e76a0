"""Export an adapter (or a fully fine-tuned model) as merged safetensors, a GGUF file or an Ollama model."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loralab.spec import EMBEDDED_MODEL

ExportFormat = Literal["merged", "gguf", "ollama"]
Quantization = Literal["f16", "q8_0"]
FORMATS: tuple[str, ...] = ("merged", "gguf", "ollama")
QUANTIZATIONS: tuple[str, ...] = ("f16", "q8_0")
GGUF_NAME = "model.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_MODEL_COPY_GLOBS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


class ExportError(Exception):
    """A problem the user can fix (bad source, unsupported model, existing output); the message says how."""


@dataclass
class ExportResult:
    """What an export wrote: the output directory, its files (relative names) and how to use them."""

    format: str
    out_dir: Path
    files: list[str]
    source: Path
    base_model: str | None = None
    quantization: str | None = None
    gguf_file: Path | None = None
    architecture: str | None = None
    ollama_command: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Source:
    path: Path
    kind: Literal["adapter", "full"]
    base_model: str | None  # what resolve_base_model gets, for adapters


def export_model(
    adapter_dir: str | os.PathLike[str],
    fmt: ExportFormat,
    out_dir: str | os.PathLike[str],
    quantization: Quantization = "f16",
    base_model: str | None = None,
    *,
    overwrite: bool = False,
    name: str | None = None,
    ollama_template: str | None = None,
    progress: Callable[..., None] | None = None,
) -> ExportResult:
    """Export a LoRA adapter (merged into its base) or a full model directory; raises ExportError on user errors.

    `progress(stage, done=None, total=None)` is called as the stages go (merging, converting, quantizing, writing;
    done/total count GGUF tensors); an exception it raises stops the export and removes the partial output.
    """
    report = progress or (lambda stage, done=None, total=None: None)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    source = inspect_source(Path(adapter_dir).expanduser(), base_model)
    target = Path(out_dir).expanduser().absolute()
    _check_target(target, source.path, overwrite)
    model_name = name or _model_name(target)
    if fmt == "ollama":
        _check_ollama_name(model_name)

    result = ExportResult(format=fmt, out_dir=target, files=[], source=source.path, base_model=source.base_model,
                          quantization=None if fmt == "merged" else quantization)
    with _staging(target, overwrite) as tmp:
        if fmt == "merged":
            _export_merged(source, tmp, result, report)
        else:
            precheck = _check_ollama_template if fmt == "ollama" and ollama_template is None else None
            tokenizer, config, generation_config = _export_gguf(source, tmp, quantization, model_name, result,
                                                                precheck, report)
            result.gguf_file = target / GGUF_NAME
            if fmt == "ollama":
                modelfile = build_modelfile(tokenizer, config, generation_config, template=ollama_template,
                                            source=source, quantization=quantization)
                (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
                result.ollama_command = f"ollama create {model_name} -f {target / 'Modelfile'}"
                (tmp / "README.md").write_text(_ollama_readme(model_name, source, target), encoding="utf-8")
        result.files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return result


# --- sources -----------------------------------------------------------------------------------

def inspect_source(path: Path, base_model: str | None = None) -> _Source:
    """Classify a directory as a LoRA adapter or a full model and find the adapter's base model."""
    if not path.is_dir():
        raise ExportError(f"{path} does not exist or is not a directory; pass a training run or adapter directory")
    if (path / "adapter_config.json").is_file():
        try:
            adapter_config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ExportError(f"{path / 'adapter_config.json'} is not valid JSON: {exc}") from None
        if str(adapter_config.get("peft_type", "LORA")).upper() != "LORA":
            raise ExportError(f"{path} holds a {adapter_config.get('peft_type')} adapter; only LoRA adapters export")
        if not any(path.glob("adapter_model.*")):
            raise ExportError(f"{path} has adapter_config.json but no adapter_model.safetensors")
        base = base_model or _spec_base_model(path) or adapter_config.get("base_model_name_or_path")
        if not base:
            raise ExportError(f"cannot tell the base model of the adapter in {path}; pass base_model (--base-model)")
        return _Source(path, "adapter", base)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return _Source(path, "full", base_model or _spec_base_model(path))
    raise ExportError(
        f"{path} is neither a LoRA adapter (adapter_config.json + adapter_model.safetensors) nor a model "
        "directory (config.json + *.safetensors); is the training run finished?"
    )


def _spec_base_model(path: Path) -> str | None:
    """The base model named in a run directory's spec.json (TrainSpec's default when it names none)."""
    spec_file = path / "spec.json"
    if not spec_file.is_file():
        return None
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{spec_file} is not valid JSON: {exc}") from None
    return (spec.get("base_model") or EMBEDDED_MODEL) if isinstance(spec, dict) else None


def _resolve(base: str):
    from loralab.engine.models import ModelNotFoundError, resolve_base_model

    try:
        return resolve_base_model(base)
    except ModelNotFoundError as exc:
        raise ExportError(f"base model {base!r} cannot be loaded: {exc}") from None


def _optional_base_path(source: _Source) -> str | None:
    """A full model's base (named in its spec.json) helps only with a missing tokenizer; it may be absent."""
    if not source.base_model:
        return None
    try:
        return _resolve(source.base_model).path
    except ExportError:
        return None


def _load_tokenizer(source: _Source, base_path: str | None):
    """The run's own tokenizer when it saved one, else the base model's."""
    from transformers import AutoTokenizer

    if any((source.path / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(source.path))
    if base_path is None:
        raise ExportError(f"{source.path} has no tokenizer files and no base model to take them from")
    return AutoTokenizer.from_pretrained(base_path)


def _load_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot read the model config in {path}: {exc}") from None


def _merged_model(source: _Source, base_path: str):
    """Load the base in float32, apply the adapter and fold it into the weights."""
    from peft import PeftModel

    from loralab.engine.models import load_model

    model = load_model(base_path)
    try:
        model = PeftModel.from_pretrained(model, str(source.path))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(
            f"the adapter in {source.path} does not fit the base model {source.base_model!r}: {exc}. "
            "Pass the base it was trained on (--base-model)"
        ) from None
    model = model.merge_and_unload()
    model.eval()
    return model


def _gguf_tokenizer_pre(model_dir: str | None) -> str | None:
    """A base converted from GGUF keeps its tokenizer; reuse the original file's pre-tokenizer name."""
    marker = Path(model_dir) / "loralab_source.json" if model_dir else None
    if marker is None or not marker.is_file():
        return None
    try:
        gguf_path = str(json.loads(marker.read_text(encoding="utf-8"))["gguf"])
        try:  # reads the header only, leaving the large arrays unparsed
            from transformers.integrations.gguf import read_gguf_metadata

            pre = read_gguf_metadata(gguf_path)[0].get("tokenizer.ggml.pre")
        except ImportError:
            from gguf import GGUFReader

            field_ = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
            pre = field_.contents() if field_ is not None else None
        return pre if isinstance(pre, str) else None
    except (OSError, ValueError, KeyError):
        return None


# --- formats -----------------------------------------------------------------------------------

def _export_merged(source: _Source, tmp: Path, result: ExportResult, report: Callable[..., None]) -> None:
    """PEFT merge_and_unload, then safetensors + tokenizer + chat template + generation config."""
    if source.kind == "full":
        report("writing")
        for pattern in _MODEL_COPY_GLOBS:
            for file in source.path.glob(pattern):
                shutil.copy2(file, tmp / file.name)
        if not any((tmp / f).is_file() for f in _TOKENIZER_FILES):
            _load_tokenizer(source, _optional_base_path(source)).save_pretrained(tmp)
        result.architecture = _load_config(str(source.path)).model_type
        return
    import torch

    resolved = _resolve(source.base_model)
    config = _load_config(resolved.path)
    report("merging")
    model = _merged_model(source, resolved.path)
    report("writing")
    stored = getattr(config, "dtype", None)
    if stored in (torch.bfloat16, torch.float16, "bfloat16", "float16"):
        # keep the base's storage precision; the merge itself ran in float32
        model = model.to(getattr(torch, str(stored).replace("torch.", "")))
    model.save_pretrained(tmp)
    _load_tokenizer(source, resolved.path).save_pretrained(tmp)
    result.architecture = model.config.model_type


def _check_ollama_template(tokenizer) -> None:
    from loralab.engine.export_ollama import derive_template

    derive_template(tokenizer)


def _export_gguf(source: _Source, tmp: Path, quantization: str, name: str, result: ExportResult,
                 precheck: Callable[[Any], None] | None = None, report: Callable[..., None] | None = None):
    """Write tmp/model.gguf from the merged adapter or the full model directory."""
    from loralab.engine import export_gguf

    report = report or (lambda stage, done=None, total=None: None)
    stage = "quantizing" if quantization == "q8_0" else "writing"

    def tensors_written(done: int, total: int) -> None:
        report(stage, done, total)

    def check(config, tokenizer) -> None:  # everything that can fail cheaply, before the slow part
        export_gguf.check_architecture(config)
        export_gguf.tokenizer_kind(tokenizer)
        if precheck is not None:
            precheck(tokenizer)

    if source.kind == "adapter":
        resolved = _resolve(source.base_model)
        base_path = resolved.path
        tokenizer = _load_tokenizer(source, base_path)
        check(_load_config(base_path), tokenizer)
        report("merging")
        model = _merged_model(source, base_path)
        config, generation_config = model.config, model.generation_config
        tensors = export_gguf.tensors_from_state_dict(model.state_dict())
        report("converting")
        info = export_gguf.write_gguf(
            tmp / GGUF_NAME, config=config, tensors=tensors, tokenizer=tokenizer, quantization=quantization,
            name=name, tokenizer_pre=_gguf_tokenizer_pre(base_path), progress=tensors_written,
        )
    else:
        from transformers import GenerationConfig

        config = _load_config(str(source.path))
        base_path = _optional_base_path(source)
        tokenizer = _load_tokenizer(source, base_path)
        check(config, tokenizer)
        try:
            generation_config = GenerationConfig.from_pretrained(str(source.path))
        except OSError:
            generation_config = None
        report("converting")
        with export_gguf.tensors_from_safetensors(source.path) as tensors:
            info = export_gguf.write_gguf(
                tmp / GGUF_NAME, config=config, tensors=tensors, tokenizer=tokenizer,
                quantization=quantization, name=name,
                tokenizer_pre=_gguf_tokenizer_pre(str(source.path)) or _gguf_tokenizer_pre(base_path),
                progress=tensors_written,
            )
    result.architecture = info.architecture
    result.warnings.extend(info.warnings)
    return tokenizer, config, generation_config


# --- output directory --------------------------------------------------------------------------

def _check_target(target: Path, source: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory; choose another output directory")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ExportError(f"{target} already exists and is not empty; choose another --out or pass --overwrite")
        src, dst = source.resolve(), target.resolve()
        if src == dst or dst in src.parents:
            raise ExportError(f"overwriting {target} would delete the source {source}; choose another --out")


@contextmanager
def _staging(target: Path, overwrite: bool) -> Iterator[Path]:
    """Build the output in a sibling temp dir, then rename it into place (the old one goes only on success)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if any(target.iterdir()) and not overwrite:  # someone wrote there meanwhile
                raise ExportError(f"{target} was filled while exporting; nothing was overwritten")
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _model_name(target: Path) -> str:
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", target.name.lower()).strip("-._")
    return cleaned or "loralab-model"


def _check_ollama_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9._-]+)?", name):
        raise ExportError(f"{name!r} is not a valid Ollama model name (letters, digits, '.', '_', '-', optional :tag)")


# --- Ollama ------------------------------------------------------------------------------------

def build_modelfile(tokenizer, config, generation_config=None, *, template: str | None = None,
                    source: _Source | None = None, quantization: str = "f16") -> str:
    """An Ollama Modelfile for ./model.gguf: TEMPLATE (from the chat template), SYSTEM, stops, sampling."""
    from loralab.engine.export_ollama import derive_template

    if template is not None:
        go_template, system, stops = template, None, []
    else:
        derived = derive_template(tokenizer)
        go_template, system, stops = derived.template, derived.system, derived.stops
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    if '"""' in go_template or (system and '"""' in system):
        raise ExportError('the chat template contains """, which a Modelfile cannot quote; pass ollama_template')
    lines = ["# Generated by loralab export"]
    if source is not None:
        lines.append(f"# source: {source.path} (base: {source.base_model or 'full model'}, {quantization})")
    lines += [f"FROM ./{GGUF_NAME}", "", f'TEMPLATE """{go_template}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    for stop in stops:
        if stop and '"' not in stop and "\n" not in stop:
            lines.append(f'PARAMETER stop "{stop}"')
    lines += [f"PARAMETER {key} {value}" for key, value in _sampling(generation_config)]
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if context:
        lines.append(f"PARAMETER num_ctx {min(context, 4096)}")
    return "\n".join(lines) + "\n"


def _sampling(generation_config) -> list[tuple[str, object]]:
    """Sampling defaults the model ships with (only when its generation config asks for sampling)."""
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return []
    out: list[tuple[str, object]] = []
    for attr, key in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("repetition_penalty", "repeat_penalty")):
        value = getattr(generation_config, attr, None)
        if value is not None:
            out.append((key, value))
    return out


def _ollama_readme(name: str, source: _Source, target: Path) -> str:
    return (
        f"# {name} (Ollama)\n\n"
        f"Exported by loralab from `{source.path}` (base: `{source.base_model or 'full model'}`).\n\n"
        "Create and run the model:\n\n"
        "```sh\n"
        f"cd {target}\n"
        f"ollama create {name} -f Modelfile\n"
        f"ollama run {name}\n"
        "```\n\n"
        f"`{GGUF_NAME}` also works with llama.cpp (`llama-cli -m {GGUF_NAME}`).\n"
    )
