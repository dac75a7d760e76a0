"""Train page: base model, dataset, method, hyperparameters with tooltips, recommended settings, estimate, start."""
from __future__ import annotations

from typing import Any

import gradio as gr
from pydantic import ValidationError

from loralab.services import jobs, registry, system
from loralab.services.errors import LoralabError
from loralab.spec import EMBEDDED_MODEL, LoraSpec, TrainSpec
from loralab.ui.datasets import dataset_choices
from loralab.ui.i18n import field_info, format_bytes, format_count, register_strings, t

register_strings({
    "dpo.method": ("DPO (preference pairs)", "DPO（選好ペア）"),
    "dpo.method_info": ("LoRA trains small adapter matrices; full fine-tuning trains every weight; DPO trains a LoRA "
                        "adapter to prefer the chosen answers of a preference dataset over the rejected ones.",
                        "LoRA は小さなアダプター行列だけを学習し、フル ファインチューニングは全ての重みを学習します。"
                        "DPO は選好データセットの「選ばれた回答」を「却下された回答」より好むよう LoRA アダプターを学習します。"),
    "dpo.beta": ("beta (DPO)", "beta（DPO）"),
    "dpo.beta_info": ("How far the model may move from where it started: higher stays closer. 0.1 is the usual value.",
                      "学習開始時のモデルからどこまで離れてよいか。大きいほど元に近いまま。通常は 0.1。"),
})
DPO_DEFAULT_BETA = TrainSpec(data={"path": "-"}, method="dpo").beta

# spec fields shown on the form, in layout order
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules")
MAIN_FIELDS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
               "gradient_accumulation_steps", "max_seq_length")
MORE_FIELDS = ("warmup_steps", "lr_scheduler_type", "weight_decay", "seed", "packing", "assistant_only_loss")
INTEGER_FIELDS = {"r", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length",
                  "warmup_steps", "seed"}
ALL_FIELDS = LORA_FIELDS + MAIN_FIELDS + MORE_FIELDS


def _spec_model(name: str):
    return LoraSpec if name in LORA_FIELDS else TrainSpec


def _default(name: str) -> Any:
    value = _spec_model(name).model_fields[name].default
    return ",".join(value) if isinstance(value, list) else value


def field_component(labels, name: str):
    """A component for one spec field: label translated, tooltip from the spec description."""
    model = _spec_model(name)
    info = field_info(model, name)
    common = {"label": t("en", f"f.{name}"), "info": info("en"), "elem_id": f"train-{name}"}
    if name in ("packing", "assistant_only_loss"):
        component = gr.Checkbox(_default(name), **common)
    elif name == "lr_scheduler_type":
        component = gr.Dropdown(["linear", "cosine", "constant", "constant_with_warmup"], value=_default(name),
                                **common)
    elif name == "target_modules":
        component = gr.Textbox(_default(name), **common)
    else:
        component = gr.Number(_default(name), precision=0 if name in INTEGER_FIELDS else None, **common)
    return labels.add(component, label=f"f.{name}", info=info)


def base_model_choices(svc) -> list[str]:
    return [m["id"] for m in registry.base_models(svc) if m.get("available", True)]


def model_path(svc, name: str | None) -> str:
    """The local directory of an allowed base model (the server's model policy: the page reads no other path)."""
    from loralab.services import base_models

    value = base_models.check_base_model(svc, name)
    return base_models.wait_load(svc, ("resolve", value), lambda: base_models.resolve(svc, value).path)


def has_gpu(svc) -> bool:
    return bool(system.system_info(svc).get("gpus"))


def recommend(svc, base_model: str, dataset_id: str | None) -> tuple[dict[str, Any], str, int | None]:
    """Settings that suit this machine and the model size: (field values, device label, base parameter count)."""
    from loralab.learn.calculator import estimate_lora

    info = system.system_info(svc)
    gpus = info.get("gpus") or []
    try:
        params = estimate_lora(model_path(svc, base_model)).base_params
    except (ValueError, OSError, LoralabError):  # not allowed, unknown architecture, unreadable: size-agnostic values
        params = None
    size = params or 500_000_000
    rows = None
    if dataset_id:
        try:
            from loralab.services import datasets

            rows = datasets.get_dataset(svc, dataset_id)["rows"]
        except LoralabError:
            rows = None
    if gpus:
        memory = max(g["total_memory_bytes"] for g in gpus)
        batch = 16 if memory >= 40 * 2**30 and size < 2e9 else 8 if memory >= 20 * 2**30 else 4
        values = {"r": 16, "lora_alpha": 32, "per_device_train_batch_size": batch, "max_seq_length": 2048
                  if size < 3e9 else 1024, "gradient_accumulation_steps": max(1, 16 // batch)}
        device = gpus[0]["name"]
    else:
        small = size < 400_000_000
        batch = 4 if small else 1
        values = {"r": 8, "lora_alpha": 16, "per_device_train_batch_size": batch, "max_seq_length": 512 if small
                  else 256, "gradient_accumulation_steps": max(1, 4 // batch)}
        device = f"CPU × {info.get('cpu_count') or 1}"
    values.update({"learning_rate": 2e-4, "lora_dropout": 0.05 if rows and rows > 1000 else 0.0,
                   "num_train_epochs": 3.0 if rows is not None and rows < 500 else 1.0, "max_steps": -1,
                   "warmup_steps": 0 if rows is not None and rows < 100 else 10})
    return values, device, params


def estimate_text(svc, spec: dict[str, Any], lang: str) -> str:
    """Peak memory, speed and trainable parameters before starting (engine.estimate, else the LoRA calculator)."""
    lora = spec.get("lora", {})
    method, r = spec.get("method") or "lora", int(lora.get("r") or 8)
    targets = lora.get("target_modules") or "all-linear"
    # DPO is LoRA with chosen and rejected answers in one batch (twice the rows) plus a no-grad reference pass
    plan_method, rows_per_example = ("lora", 2) if method == "dpo" else (method, 1)
    lines = []
    try:
        path = model_path(svc, spec.get("base_model"))
    except LoralabError as exc:
        return t(lang, "common.error", message=exc.message)
    try:
        from loralab.engine.estimate import recommend as plan

        gpu = has_gpu(svc)
        rec = plan(path, method=plan_method, r=r, target_modules=targets,
                   max_seq_length=int(spec.get("max_seq_length") or 512),
                   batch_size=int(spec.get("per_device_train_batch_size") or 1) * rows_per_example,
                   device="cuda" if gpu else "cpu",
                   dtype="bf16" if gpu else "fp32", packing=bool(spec.get("packing", True)))
        chosen = rec.with_checkpointing if rec.gradient_checkpointing else rec.without_checkpointing
        data = chosen.to_dict()
        lines.append(t(lang, "tr.est_memory", memory=format_bytes(data["peak_memory_bytes"]),
                       available=format_bytes(rec.available_bytes)))
        if data.get("tokens_per_s"):
            lines.append(t(lang, "tr.est_speed", tps=f"{data['tokens_per_s']:.0f}"))
        if not rec.fits:
            lines.append(t(lang, "tr.est_no_fit"))
        elif rec.gradient_checkpointing:
            lines.append(t(lang, "tr.est_checkpointing"))
        base, trainable = data["assumptions"]["base_params"], data["assumptions"]["trainable_params"]
        if method == "full":
            lines.append(t(lang, "tr.est_full", total=format_count(base)))
        else:
            lines.append(t(lang, "tr.est_trainable", trainable=format_count(trainable),
                           total=format_count(base + trainable), percent=100 * trainable / (base + trainable),
                           size=format_bytes(4 * trainable)))
        return "\n\n".join(lines)
    except (ValueError, OSError, KeyError, ImportError):  # estimator cannot read it: count parameters only
        pass
    from loralab.learn.calculator import estimate_lora

    try:
        est = estimate_lora(path, r, targets)
    except (ValueError, OSError) as exc:
        return t(lang, "common.error", message=str(exc))
    if method == "full":
        return t(lang, "tr.est_full", total=format_count(est.base_params))
    return t(lang, "tr.est_trainable", trainable=format_count(est.trainable_params),
             total=format_count(est.total_params), percent=est.trainable_percent,
             size=format_bytes(est.adapter_bytes_fp32))


def collect(base_model: str, dataset_id: str | None, method: str, model_name: str,
            values: dict[str, Any], beta: float | None = None) -> dict[str, Any]:
    """The job request built from the form values (empty numbers fall back to the spec defaults)."""
    def value(name: str) -> Any:
        raw = values.get(name)
        if raw is None or raw == "":
            return _default(name)
        return int(raw) if name in INTEGER_FIELDS else raw

    request: dict[str, Any] = {"dataset_id": dataset_id or "", "base_model": base_model or EMBEDDED_MODEL,
                               "method": method or "lora", "lora": {name: value(name) for name in LORA_FIELDS}}
    request.update({name: value(name) for name in MAIN_FIELDS + MORE_FIELDS})
    if model_name and model_name.strip():
        request["model_name"] = model_name.strip()
    if request["method"] == "dpo":
        request["beta"] = DPO_DEFAULT_BETA if beta is None or beta == "" else beta
    return request


def build(ctx) -> dict[str, Any]:
    """Lay out the train page."""
    labels = ctx.labels
    gpu = has_gpu(ctx.svc)
    fields: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=3):
            labels.add(gr.Markdown(f"### {t('en', 'tr.setup')}"),
                       value=lambda lang: f"### {t(lang, 'tr.setup')}")
            with gr.Row():
                base_info = field_info(TrainSpec, "base_model")
                base = labels.add(gr.Dropdown(base_model_choices(ctx.svc), value=EMBEDDED_MODEL,
                                              label=t("en", "tr.base"), info=base_info("en"),
                                              allow_custom_value=True, elem_id="train-base"),
                                  label="tr.base", info=base_info)
                dataset = labels.add(gr.Dropdown([], label=t("en", "tr.dataset"), elem_id="train-dataset"),
                                     label="tr.dataset")
            with gr.Row():
                method_choices = [("tr.lora", "lora"), ("tr.full", "full"), ("dpo.method", "dpo")]
                method = labels.add(gr.Radio([(t("en", k), v) for k, v in method_choices], value="lora",
                                             label=t("en", "tr.method"), info=t("en", "dpo.method_info"),
                                             elem_id="train-method"),
                                    label="tr.method", info="dpo.method_info", choices=method_choices)
                beta = labels.add(gr.Number(DPO_DEFAULT_BETA, label=t("en", "dpo.beta"), info=t("en", "dpo.beta_info"),
                                            minimum=0, visible=False, elem_id="train-beta"),
                                  label="dpo.beta", info="dpo.beta_info")
                reason = "tr.qlora_gpu" if gpu else "tr.qlora_no_gpu"
                labels.add(gr.Checkbox(False, label=t("en", "tr.qlora"), info=t("en", reason), interactive=False,
                                       elem_id="train-qlora"), label="tr.qlora", info=reason)
            model_name = labels.add(gr.Textbox(label=t("en", "tr.model_name"), info=t("en", "tr.model_name_info"),
                                               max_length=100, elem_id="train-model-name"),
                                    label="tr.model_name", info="tr.model_name_info")
            labels.add(gr.Markdown(f"### {t('en', 'tr.hyper')}"),
                       value=lambda lang: f"### {t(lang, 'tr.hyper')}")
            with gr.Row():
                for name in LORA_FIELDS:
                    fields[name] = field_component(labels, name)
            with gr.Row():
                for name in MAIN_FIELDS:
                    fields[name] = field_component(labels, name)
            with labels.add(gr.Accordion(t("en", "tr.advanced"), open=False), label="tr.advanced"):
                with gr.Row():
                    for name in MORE_FIELDS:
                        fields[name] = field_component(labels, name)
        with gr.Column(scale=2):
            recommend_button = labels.add(gr.Button(t("en", "tr.recommend"), elem_id="train-recommend"),
                                          value="tr.recommend")
            advice = gr.Markdown(elem_id="train-advice")
            labels.add(gr.Markdown(f"### {t('en', 'tr.estimate')}"),
                       value=lambda lang: f"### {t(lang, 'tr.estimate')}")
            estimate = gr.Markdown(elem_id="train-estimate")
            estimate_button = labels.add(gr.Button(t("en", "tr.estimate_button"), size="sm"),
                                         value="tr.estimate_button")
            start = labels.add(gr.Button(t("en", "tr.start"), variant="primary", size="lg", elem_id="train-start"),
                               value="tr.start")
            status = gr.Markdown(elem_id="train-status")
    return {"base": base, "dataset": dataset, "method": method, "beta": beta, "model_name": model_name, "fields": fields,
            "recommend": recommend_button, "advice": advice, "estimate": estimate,
            "estimate_button": estimate_button, "start": start, "status": status}


def connect(ctx) -> None:
    """Wire refreshes, recommendation, estimate and start (which opens the job monitor on the new job)."""
    from loralab.ui.monitor import job_choices

    p = ctx.pages["train"]
    svc = ctx.svc
    lang = ctx.lang
    private = {"api_visibility": "private"}
    names = list(ALL_FIELDS)
    field_components = [p["fields"][name] for name in names]
    form = [p["base"], p["dataset"], p["method"], p["model_name"], *field_components, p["beta"]]

    def refresh(base: str | None, dataset_id: str | None):
        choices = dataset_choices(svc)
        ids = [value for _, value in choices]
        bases = base_model_choices(svc)
        return (gr.Dropdown(choices=bases, value=base or EMBEDDED_MODEL),
                gr.Dropdown(choices=choices, value=dataset_id if dataset_id in ids else (ids[0] if ids else None)))

    def suggest(base: str, dataset_id: str | None, language: str):
        values, device, params = recommend(svc, base or EMBEDDED_MODEL, dataset_id)
        summary = ", ".join(f"{name}={values[name]}" for name in names if name in values)
        text = t(language, "tr.recommended", device=device, params=format_count(params), summary=summary)
        return [text, *[values.get(name, gr.update()) for name in names]]

    def estimate(base, dataset_id, method, model_name, *rest):
        *values, beta, language = rest
        request = collect(base, dataset_id, method, model_name, dict(zip(names, values)), beta)
        request.pop("dataset_id")
        request.pop("model_name", None)
        return estimate_text(svc, request, language)

    def start(base, dataset_id, method, model_name, *rest):
        *values, beta, language = rest
        if not dataset_id:
            return t(language, "tr.pick_dataset"), gr.update(), gr.update()
        request = collect(base, dataset_id, method, model_name, dict(zip(names, values)), beta)
        try:
            job = jobs.create_job(svc, request)
        except LoralabError as exc:
            return t(language, "common.error", message=exc.message), gr.update(), gr.update()
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return t(language, "common.error", message=problems), gr.update(), gr.update()
        text = t(language, "tr.started", id=job["id"], status=t(language, f"status.{job['status']}"))
        return (text, gr.Tabs(selected="monitor"),
                gr.Dropdown(choices=job_choices(svc, language), value=job["id"]))

    outputs = [p["base"], p["dataset"]]
    ctx.tab_items["train"].select(refresh, inputs=[p["base"], p["dataset"]], outputs=outputs, **private)
    ctx.on_language.append((refresh, [p["base"], p["dataset"]], outputs))
    p["recommend"].click(suggest, inputs=[p["base"], p["dataset"], lang], outputs=[p["advice"], *field_components],
                         **private)
    p["method"].change(lambda m: gr.update(visible=m == "dpo"), inputs=[p["method"]], outputs=[p["beta"]], **private)
    for trigger in (p["estimate_button"].click, p["method"].change, p["base"].change):
        trigger(estimate, inputs=[*form, lang], outputs=[p["estimate"]], **private)
    ctx.on_language.append((estimate, [*form, lang], [p["estimate"]]))
    p["start"].click(start, inputs=[*form, lang],
                     outputs=[p["status"], ctx.tabs, ctx.pages["monitor"]["job"]], **private)
