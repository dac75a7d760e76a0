"""The LoRA calculator must agree exactly with PEFT's own parameter count."""
from __future__ import annotations

import pytest
from transformers import AutoConfig

from loralab.learn.calculator import CalculatorError, estimate_lora, parse_target_modules

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT calls a deprecated transformers API

CASES = [("all-linear", 4), ("all-linear", 16), ("q_proj,v_proj", 4), ("q_proj,v_proj", 16)]


def _peft_counts(config, r: int, targets) -> tuple[int, int]:
    """PEFT's (trainable, all) for the same LoraConfig, on a model built on the meta device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft_targets = targets if targets == "all-linear" else targets.split(",")
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=peft_targets))
    return peft_model.get_nb_trainable_parameters()


def _check(model_dir, targets: str, r: int) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    trainable, total = _peft_counts(config, r, targets)
    for source in (config, str(model_dir)):
        result = estimate_lora(source, r=r, target_modules=targets)
        assert (result.trainable_params, result.total_params) == (trainable, total)
        assert result.base_params == total - trainable
        assert result.adapter_bytes_fp32 == 4 * trainable and result.adapter_bytes_16bit == 2 * trainable
        assert result.trainable_percent == pytest.approx(100 * trainable / total)
        assert sum(m.params for m in result.modules) == trainable


@pytest.mark.parametrize("targets,r", CASES)
def test_matches_peft_on_tiny_model(tiny_model_dir, targets, r):
    _check(tiny_model_dir, targets, r)


def test_matches_peft_on_real_tiny_weights(tiny_model_dir):
    """Also against a model loaded with real weights (not only meta), as users run it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).get_nb_trainable_parameters()
    result = estimate_lora(str(tiny_model_dir), r=8)
    assert (result.trainable_params, result.total_params) == expected


@pytest.mark.model
@pytest.mark.parametrize("targets,r", CASES)
def test_matches_peft_on_embedded_model(embedded_model_dir, targets, r):
    _check(embedded_model_dir, targets, r)


@pytest.mark.model
def test_embedded_model_by_name():
    result = estimate_lora("smollm2-135m-instruct", r=8, target_modules="all-linear")
    assert result.base_params == 134_515_008
    assert result.trainable_params == 2_442_240  # the figure quoted in the course (topic "lora")
    q = next(m for m in result.modules if m.name == "q_proj")
    assert (q.count, q.in_features, q.out_features, q.params_each) == (30, 576, 576, 9_216)


def test_per_module_breakdown(tiny_model_dir):
    result = estimate_lora(str(tiny_model_dir), r=2, target_modules=["q_proj", "k_proj"])
    by_name = {m.name: m for m in result.modules}
    assert set(by_name) == {"q_proj", "k_proj"}
    assert (by_name["q_proj"].in_features, by_name["q_proj"].out_features, by_name["q_proj"].count) == (32, 32, 2)
    assert by_name["k_proj"].out_features == 16  # 2 key/value heads of 8: read from the config, not assumed


def test_target_module_parsing_and_errors(tiny_model_dir):
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules("q_proj") == ["q_proj"]
    assert parse_target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    with pytest.raises(CalculatorError, match="not found in this model"):
        estimate_lora(str(tiny_model_dir), r=8, target_modules="q_proj,query_key_value")
    with pytest.raises(CalculatorError, match="positive integer"):
        estimate_lora(str(tiny_model_dir), r=0)
    with pytest.raises(CalculatorError, match="GGUF file not found"):
        estimate_lora("missing.gguf")
