"""LoRA calculator: trainable parameters and adapter size, counted exactly from a model config's real shapes."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

ALL_LINEAR = "all-linear"
_PLAIN_NAMES = re.compile(r"^[\w.\-]+(\s*,\s*[\w.\-]+)*$")


class ModuleStat(BaseModel):
    """One group of adapted modules that share a name and a shape (e.g. every layer's q_proj)."""

    name: str = Field(description="Last component of the module path, e.g. 'q_proj'.")
    kind: str = Field(description="Layer type: Linear, Conv1D or Embedding.")
    count: int = Field(description="How many modules of this name and shape get LoRA.")
    in_features: int
    out_features: int
    params_each: int = Field(description="LoRA parameters per module: r * (in_features + out_features).")
    params: int = Field(description="params_each * count.")


class LoraEstimate(BaseModel):
    """What a LoRA configuration adds to a base model, with the same counts PEFT reports."""

    model: str = Field(description="Model type (from the config) or the name that was asked for.")
    r: int
    target_modules: str | list[str]
    modules: list[ModuleStat]
    trainable_params: int = Field(description="LoRA parameters (PEFT's trainable count).")
    base_params: int = Field(description="Parameters of the frozen base model (tied weights counted once).")
    total_params: int = Field(description="base_params + trainable_params (PEFT's 'all params').")
    trainable_percent: float = Field(description="100 * trainable_params / total_params, as PEFT prints it.")
    adapter_bytes_fp32: int = Field(description="Adapter weights stored in float32.")
    adapter_bytes_16bit: int = Field(description="Adapter weights stored in float16 or bfloat16.")


class CalculatorError(ValueError):
    """A calculator input that cannot be used (unknown model, no matching module, unsupported layer)."""


def parse_target_modules(value: str | Sequence[str]) -> str | list[str]:
    """Normalise --target-modules: 'all-linear', a comma-separated list of names, or a regex string."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise CalculatorError("target_modules is empty: use 'all-linear' or names such as q_proj,v_proj")
        if text.lower() == ALL_LINEAR:
            return ALL_LINEAR
        if _PLAIN_NAMES.match(text):  # plain names are a list, as users mean them (not a PEFT regex)
            return [part.strip() for part in text.split(",") if part.strip()]
        try:
            re.compile(text)
        except re.error as exc:
            raise CalculatorError(f"target_modules {text!r} is neither names nor a valid regex: {exc}") from None
        return text
    names = [str(part).strip() for part in value if str(part).strip()]
    if not names:
        raise CalculatorError("target_modules is empty: use 'all-linear' or names such as q_proj,v_proj")
    if len(names) == 1 and names[0].lower() == ALL_LINEAR:
        return ALL_LINEAR
    return names


def load_config(model: Any):
    """A PretrainedConfig from a config object, a config dict, or a base-model name/dir (see resolve_base_model)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        data = dict(model)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise CalculatorError("a config dict needs 'model_type' (e.g. 'llama')")
        return AutoConfig.for_model(model_type, **data)
    from loralab.engine.models import ModelNotFoundError, resolve_base_model

    try:
        resolved = resolve_base_model(str(model))
        return AutoConfig.from_pretrained(resolved.path)
    except ModelNotFoundError as exc:
        raise CalculatorError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise CalculatorError(f"cannot read the config of {model!r}: {exc}") from None


def build_meta_model(config):
    """Instantiate the architecture on the meta device: real shapes, no memory, no weights read."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    errors = []
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except (ValueError, KeyError) as exc:
            errors.append(f"{auto.__name__}: {exc}")
    raise CalculatorError(f"cannot build model type {config.model_type!r}: " + "; ".join(errors))


def _layer_shape(module) -> tuple[str, int, int] | None:
    """(kind, in, out) for layers LoRA can adapt and this calculator counts; None otherwise."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return "Linear", module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return "Conv1D", module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, torch.nn.Embedding):  # lora_embedding_A (r, num), lora_embedding_B (dim, r)
        return "Embedding", module.num_embeddings, module.embedding_dim
    return None


def _select_modules(model, targets: str | list[str]) -> list[tuple[str, Any]]:
    """The (name, module) pairs PEFT would wrap for these target_modules."""
    import torch
    from transformers import PreTrainedModel
    from transformers.pytorch_utils import Conv1D

    named = [(name, module) for name, module in model.named_modules() if name]
    if targets == ALL_LINEAR:
        # PEFT: every Linear/Conv1D except the output (LM) head of a PreTrainedModel.
        head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        return [(n, m) for n, m in named if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    if isinstance(targets, str):
        return [(n, m) for n, m in named if re.fullmatch(targets, n)]
    wanted = set(targets)
    chosen = [(n, m) for n, m in named if n in wanted or any(n.endswith("." + t) for t in wanted)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in chosen)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in named if _layer_shape(m) is not None})
        raise CalculatorError(
            f"target module(s) {', '.join(missing)} not found in this model; "
            f"its adaptable layers are: {', '.join(names)} (or use 'all-linear')"
        )
    return chosen


def estimate_lora(
    model: Any, r: int = 8, target_modules: str | Sequence[str] = ALL_LINEAR
) -> LoraEstimate:
    """Count the LoRA parameters of rank `r` on `target_modules` for a config, config dict or base-model name."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CalculatorError(f"r must be a positive integer, got {r!r}")
    targets = parse_target_modules(target_modules)
    config = load_config(model)
    meta_model = build_meta_model(config)
    selected = _select_modules(meta_model, targets)
    if not selected:
        raise CalculatorError(f"target_modules {targets!r} matches no module of this model")

    groups: dict[tuple[str, str, int, int], int] = {}
    seen: set[int] = set()
    for name, module in selected:
        if id(module) in seen:  # a module reachable under two names is wrapped once
            continue
        seen.add(id(module))
        shape = _layer_shape(module)
        if shape is None:
            raise CalculatorError(
                f"module {name} is a {type(module).__name__}; the calculator counts Linear, Conv1D "
                "and Embedding layers: choose those in target_modules"
            )
        key = (name.rsplit(".", 1)[-1], *shape)
        groups[key] = groups.get(key, 0) + 1

    modules = [
        ModuleStat(name=n, kind=k, count=c, in_features=i, out_features=o,
                   params_each=r * (i + o), params=r * (i + o) * c)
        for (n, k, i, o), c in groups.items()
    ]
    trainable = sum(m.params for m in modules)
    base = sum(p.numel() for p in meta_model.parameters())
    total = base + trainable
    label = model if isinstance(model, str) else getattr(config, "model_type", "model")
    return LoraEstimate(
        model=str(label), r=r, target_modules=targets, modules=modules,
        trainable_params=trainable, base_params=base, total_params=total,
        trainable_percent=100.0 * trainable / total if total else 0.0,
        adapter_bytes_fp32=4 * trainable, adapter_bytes_16bit=2 * trainable,
    )


def format_bytes(size: int) -> str:
    """Human-readable size in binary units (KiB, MiB, GiB)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
