"""The one schema: unknown keys rejected, overrides, target module parsing."""
import pytest
from pydantic import ValidationError

from loralab.spec import LoraSpec, TrainSpec, apply_overrides


def test_unknown_keys_are_rejected_with_their_name():
    with pytest.raises(ValidationError) as info:
        TrainSpec.model_validate({"data": {"path": "x.jsonl"}, "learning_rat": 1e-4})
    assert info.value.errors()[0]["loc"] == ("learning_rat",)


@pytest.mark.parametrize("value,expected", [
    ("q_proj", ["q_proj"]), ("q_proj, v_proj", ["q_proj", "v_proj"]), ("all-linear", "all-linear"),
    (["k_proj"], ["k_proj"]),
])
def test_target_modules(value, expected):
    assert LoraSpec(target_modules=value).target_modules == expected


def test_overrides_reach_nested_sections():
    raw = apply_overrides({"data": {"path": "a"}}, ["lora.r=32", "learning_rate=1e-3", "data.format=alpaca"])
    spec = TrainSpec.model_validate(raw)
    assert spec.lora.r == 32 and spec.learning_rate == 1e-3 and spec.data.format == "alpaca"
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["nonsense"])
