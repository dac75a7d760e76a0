"""Train page with DPO: the request carries beta only for DPO, and the estimate counts chosen + rejected rows."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("gradio")


def test_collect_adds_beta_for_dpo_only():
    from loralab.services.jobs import CreateJobRequest
    from loralab.ui.train import ALL_FIELDS, collect

    empty = dict.fromkeys(ALL_FIELDS)
    dpo = collect("smollm2-135m-instruct", "ds-1", "dpo", "", empty, beta=0.25)
    assert dpo["method"] == "dpo" and dpo["beta"] == 0.25
    assert CreateJobRequest.model_validate(dpo).beta == 0.25
    assert collect("smollm2-135m-instruct", "ds-1", "dpo", "", empty, beta=None)["beta"] == 0.1
    lora = collect("smollm2-135m-instruct", "ds-1", "lora", "", empty, beta=0.25)
    assert "beta" not in lora and CreateJobRequest.model_validate(lora).beta is None


def test_strings_and_method_choice():
    from loralab.ui.i18n import STRINGS, t

    for key in ("dpo.method", "dpo.method_info", "dpo.beta", "dpo.beta_info"):
        en, ja = STRINGS[key]
        assert en and ja and en != ja
    assert "DPO" in t("ja", "dpo.method")


def test_estimate_for_dpo_counts_both_answers(tiny_model_dir, monkeypatch):
    import loralab.ui.train as page

    monkeypatch.setattr(page, "has_gpu", lambda svc: False)
    monkeypatch.setattr(page, "model_path", lambda svc, name: name)  # the model policy is tested in tests/security
    spec = {"base_model": str(tiny_model_dir), "lora": {"r": 8}, "max_seq_length": 64,
            "per_device_train_batch_size": 4, "packing": True}
    texts = {m: page.estimate_text(None, {**spec, "method": m}, "en") for m in ("lora", "dpo")}

    def memory(text: str) -> str:
        return re.search(r"Peak memory: about \*\*([^*]+)\*\*", text).group(1)

    for text in texts.values():
        assert "Trainable parameters" in text and "Error" not in text
    trainable = [re.search(r"Trainable parameters: \*\*([^*]+)\*\*", x).group(1) for x in texts.values()]
    assert trainable[0] == trainable[1]  # the same LoRA adapter
    assert memory(texts["lora"]) != memory(texts["dpo"])  # twice the rows per step
