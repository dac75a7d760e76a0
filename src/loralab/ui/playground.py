"""Playground page: streaming chat with any base or fine-tuned model, sampling controls, side-by-side comparison."""
from __future__ import annotations

from typing import Any

import gradio as gr
from pydantic import ValidationError

from loralab.services import registry, serving
from loralab.services.errors import LoralabError
from loralab.spec import EMBEDDED_MODEL, GenerateSpec
from loralab.ui.i18n import field_info, t

SLIDERS = {  # field: (minimum, maximum, step); defaults come from GenerateSpec
    "temperature": (0.0, 2.0, 0.05),
    "top_p": (0.05, 1.0, 0.05),
    "max_new_tokens": (1, 1024, 1),
    "repetition_penalty": (0.5, 2.0, 0.05),
}


def model_choices(svc, lang: str = "en") -> list[tuple[str, str]]:
    """Fine-tuned versions first (newest first), then base models, as (label, reference)."""
    out = []
    for model in registry.list_models(svc):
        if model["kind"] == "fine_tuned":
            out.append((f"{model['name']} v{model['version']} ({model['id']})", model["id"]))
    out += [(f"{m['id']} ({t(lang, 'pg.base_suffix')})", m["id"]) for m in registry.base_models(svc)]
    return out


def base_of(svc, reference: str | None) -> str:
    """The base model of a fine-tuned version (the reference itself for a base model)."""
    if reference and reference.startswith("ft-"):
        try:
            return registry.get_model(svc, reference).get("base_model") or EMBEDDED_MODEL
        except LoralabError:
            return EMBEDDED_MODEL
    return reference or EMBEDDED_MODEL


def text_of(content: Any) -> str:
    """Plain text of a chat message content (Gradio passes a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content or "")


def to_messages(history: list[dict[str, Any]], system_prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    return messages + [{"role": m["role"], "content": text_of(m["content"])} for m in history
                       if m.get("role") in ("user", "assistant")]


def open_stream(svc, model: str, messages: list[dict[str, str]], sampling: dict[str, Any]):
    """A text-piece iterator, or a one-piece iterator with the error message."""
    try:
        request = serving.GenerateRequest(model=model or EMBEDDED_MODEL, messages=messages, **sampling)
        return serving.stream_text(svc, request)
    except LoralabError as exc:
        return iter([f"⚠ {exc.message}"])
    except ValidationError as exc:
        return iter([f"⚠ {exc.errors()[0]['msg']}"])


def build(ctx) -> dict[str, Any]:
    """Lay out the playground."""
    labels = ctx.labels
    sliders: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=4):
            side = labels.add(gr.Checkbox(False, label=t("en", "pg.side_by_side"), elem_id="pg-side"),
                              label="pg.side_by_side")
            with gr.Row():
                with gr.Column():
                    model = labels.add(gr.Dropdown([], label=t("en", "pg.model"), elem_id="pg-model"),
                                       label="pg.model")
                    chat_a = labels.add(gr.Chatbot(label=t("en", "pg.chat"), elem_id="pg-chat-a", height=380),
                                        label="pg.chat")
                with gr.Column(visible=False) as column_b:
                    compare = labels.add(gr.Dropdown([], label=t("en", "pg.compare_model"), elem_id="pg-compare"),
                                         label="pg.compare_model")
                    chat_b = labels.add(gr.Chatbot(label=t("en", "pg.chat_b"), elem_id="pg-chat-b", height=380),
                                        label="pg.chat_b")
            with gr.Row():
                prompt = labels.add(gr.Textbox(label=t("en", "pg.prompt"), placeholder=t("en", "pg.placeholder"),
                                               elem_id="pg-prompt", scale=5),
                                    label="pg.prompt", placeholder="pg.placeholder")
                send = labels.add(gr.Button(t("en", "pg.send"), variant="primary", elem_id="pg-send", scale=1),
                                  value="pg.send")
                clear = labels.add(gr.Button(t("en", "pg.clear"), elem_id="pg-clear", scale=1), value="pg.clear")
        with gr.Column(scale=1, min_width=240):
            labels.add(gr.Markdown(f"### {t('en', 'pg.sampling')}"),
                       value=lambda lang: f"### {t(lang, 'pg.sampling')}")
            system_prompt = labels.add(gr.Textbox(label=t("en", "pg.system"), lines=2, elem_id="pg-system"),
                                       label="pg.system")
            for name, (low, high, step) in SLIDERS.items():
                info = field_info(GenerateSpec, name)
                sliders[name] = labels.add(
                    gr.Slider(low, high, value=GenerateSpec.model_fields[name].default, step=step,
                              label=t("en", f"f.{name}"), info=info("en"), elem_id=f"pg-{name}"),
                    label=f"f.{name}", info=info)
    return {"side": side, "model": model, "compare": compare, "chat_a": chat_a, "chat_b": chat_b,
            "column_b": column_b, "prompt": prompt, "send": send, "clear": clear, "system": system_prompt,
            "sliders": sliders}


def connect(ctx) -> None:
    """Wire model lists, the side-by-side switch and the streaming chat."""
    p = ctx.pages["playground"]
    svc = ctx.svc
    private = {"api_visibility": "private"}
    names = list(SLIDERS)

    def refresh(model: str | None, compare: str | None, lang: str):
        options = model_choices(svc, lang)
        values = [value for _, value in options]
        chosen = model if model in values else (values[0] if values else EMBEDDED_MODEL)
        other = compare if compare in values else base_of(svc, chosen)
        return gr.Dropdown(choices=options, value=chosen), gr.Dropdown(choices=options, value=other)

    def respond(message: str, history_a, history_b, model, compare, side, system_prompt, *values):
        message = (message or "").strip()
        history_a, history_b = list(history_a or []), list(history_b or [])
        if not message:
            yield gr.update(), history_a, history_b
            return
        sampling = dict(zip(names, values))
        sampling["max_new_tokens"] = int(sampling["max_new_tokens"])
        targets = [(history_a, model)] + ([(history_b, compare)] if side else [])
        streams = []
        for history, reference in targets:
            messages = to_messages(history, system_prompt or "") + [{"role": "user", "content": message}]
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            streams.append((history, open_stream(svc, reference, messages, sampling)))
        yield "", history_a, history_b
        pending = list(streams)
        while pending:  # round-robin so both sides grow together
            for item in list(pending):
                history, stream = item
                try:
                    piece = next(stream)
                except StopIteration:
                    pending.remove(item)
                    continue
                except LoralabError as exc:
                    piece = f"⚠ {exc.message}"
                    pending.remove(item)
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
            yield "", history_a, history_b

    chat_inputs = [p["prompt"], p["chat_a"], p["chat_b"], p["model"], p["compare"], p["side"], p["system"],
                   *[p["sliders"][n] for n in names]]
    chat_outputs = [p["prompt"], p["chat_a"], p["chat_b"]]
    for trigger in (p["send"].click, p["prompt"].submit):
        trigger(respond, inputs=chat_inputs, outputs=chat_outputs, concurrency_limit=2, **private)
    p["clear"].click(lambda: ([], []), outputs=[p["chat_a"], p["chat_b"]], **private)
    p["side"].change(lambda on: gr.Column(visible=on), inputs=[p["side"]], outputs=[p["column_b"]], **private)
    p["model"].input(lambda m: gr.Dropdown(value=base_of(svc, m)), inputs=[p["model"]], outputs=[p["compare"]],
                     **private)
    selectors = [p["model"], p["compare"]]
    ctx.tab_items["playground"].select(refresh, inputs=[*selectors, ctx.lang], outputs=selectors, **private)
    ctx.on_language.append((refresh, [*selectors, ctx.lang], selectors))
