"""Playground page: streaming chat with any base or fine-tuned model, sampling controls, side-by-side comparison,
and feedback (thumbs under every answer; rating, a better answer and a comment for the latest one)."""
from __future__ import annotations

from typing import Any

import gradio as gr
from pydantic import ValidationError

from loralab.services import abtests, feedback, registry, serving
from loralab.services.errors import LoralabError
from loralab.spec import EMBEDDED_MODEL, GenerateSpec
from loralab.ui.i18n import field_info, register_strings, t

register_strings({
    "pg.fb_title": ("Feedback on the latest answer", "最新の回答へのフィードバック"),
    "pg.fb_which": ("Answer", "回答"),
    "pg.fb_left": ("Left", "左"),
    "pg.fb_right": ("Right", "右"),
    "pg.fb_rating": ("Rating (1 = bad, 5 = excellent)", "評価（1 = 悪い、5 = とても良い）"),
    "pg.fb_better": ("Suggest a better answer", "より良い回答を提案"),
    "pg.fb_comment": ("Comment", "コメント"),
    "pg.fb_send": ("Send feedback", "フィードバックを送信"),
    "pg.fb_saved": ("Feedback saved for {id}.", "{id} へのフィードバックを保存しました。"),
    "pg.fb_thumbs": ("Thumbs {thumbs} saved for {id}.", "{id} に高評価/低評価（{thumbs}）を保存しました。"),
    "pg.fb_no_answer": ("There is no answer to rate yet: send a prompt first.",
                        "評価する回答がまだありません。先にプロンプトを送信してください。"),
    "pg.fb_empty": ("Choose a rating, or write a better answer or a comment.",
                    "評価を選ぶか、より良い回答かコメントを書いてください。"),
})

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
    out += [(f"A/B: {test['name']} ({test['model_a']} | {test['model_b']})", test["endpoint"])
            for test in abtests.list_tests(svc, "active")]
    return out


def runtime_label(svc, reference: str | None, lang: str = "en") -> str:
    """The small runtime label under a model picker: which runtime serves it (empty for A/B tests, unknown names)."""
    from loralab.services import serving

    if not reference or reference.startswith(serving.AB_PREFIX):
        return ""
    try:
        target = serving.route_model(svc, reference)
        runtime = serving.runtime_of(svc, target.base, target.adapter)
    except LoralabError as exc:
        return t(lang, "pg.runtime_unavailable") if exc.code == "runtime_unavailable" else ""
    return t(lang, f"pg.runtime_{runtime}")


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


def open_stream(svc, model: str, messages: list[dict[str, str]], sampling: dict[str, Any],
                session: str | None = None) -> tuple[str | None, Any]:
    """(generation id, text-piece iterator), or (None, a one-piece iterator with the error message)."""
    try:
        request = serving.GenerateRequest(model=model or EMBEDDED_MODEL, messages=messages, **sampling)
        stream = serving.stream_text(svc, request, "playground", session)
        return stream.id, stream
    except LoralabError as exc:
        return None, iter([f"⚠ {exc.message}"])
    except ValidationError as exc:
        return None, iter([f"⚠ {exc.errors()[0]['msg']}"])


def send_feedback(svc, generation_id: str | None, lang: str, session: str | None, **judgement: Any) -> str:
    """Store feedback on one answer; the returned text says what happened (in `lang`)."""
    if not generation_id:
        return t(lang, "pg.fb_no_answer")
    judgement = {k: v for k, v in judgement.items() if v not in (None, "")}
    if not judgement:
        return t(lang, "pg.fb_empty")
    try:
        row = feedback.submit(svc, feedback.FeedbackRequest(generation_id=generation_id, user=session, **judgement))
    except LoralabError as exc:
        return t(lang, "common.error", message=exc.message)
    except ValidationError as exc:
        return t(lang, "common.error", message=exc.errors()[0]["msg"])
    if set(judgement) == {"thumbs"}:
        return t(lang, "pg.fb_thumbs", thumbs=judgement["thumbs"], id=row["generation_id"])
    return t(lang, "pg.fb_saved", id=row["generation_id"])


def latest(generations: dict[int, str] | None) -> str | None:
    """The generation id of the newest answer in a chat."""
    return generations[max(generations)] if generations else None


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
                    runtime_a = gr.Markdown(elem_id="pg-runtime")
                    chat_a = labels.add(gr.Chatbot(label=t("en", "pg.chat"), elem_id="pg-chat-a", height=380,
                                                   feedback_options=("Like", "Dislike")), label="pg.chat")
                with gr.Column(visible=False) as column_b:
                    compare = labels.add(gr.Dropdown([], label=t("en", "pg.compare_model"), elem_id="pg-compare"),
                                         label="pg.compare_model")
                    runtime_b = gr.Markdown(elem_id="pg-runtime-b")
                    chat_b = labels.add(gr.Chatbot(label=t("en", "pg.chat_b"), elem_id="pg-chat-b", height=380,
                                                   feedback_options=("Like", "Dislike")), label="pg.chat_b")
            with gr.Row():
                prompt = labels.add(gr.Textbox(label=t("en", "pg.prompt"), placeholder=t("en", "pg.placeholder"),
                                               elem_id="pg-prompt", scale=5),
                                    label="pg.prompt", placeholder="pg.placeholder")
                send = labels.add(gr.Button(t("en", "pg.send"), variant="primary", elem_id="pg-send", scale=1),
                                  value="pg.send")
                clear = labels.add(gr.Button(t("en", "pg.clear"), elem_id="pg-clear", scale=1), value="pg.clear")
            fb = build_feedback(labels)
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
            "sliders": sliders, "gens_a": gr.State({}), "gens_b": gr.State({}), "runtime_a": runtime_a,
            "runtime_b": runtime_b, **fb}


def build_feedback(labels) -> dict[str, Any]:
    """Rating, better answer and comment for the latest answer (thumbs sit under every answer in the chat)."""
    with labels.add(gr.Accordion(t("en", "pg.fb_title"), open=True, elem_id="pg-fb"), label="pg.fb_title"):
        with gr.Row():
            sides = [("pg.fb_left", "a"), ("pg.fb_right", "b")]
            which = labels.add(gr.Radio([(t("en", k), v) for k, v in sides], value="a", label=t("en", "pg.fb_which"),
                                        elem_id="pg-fb-which", visible=False, scale=1),
                               label="pg.fb_which", choices=sides)
            rating = labels.add(gr.Radio([str(i) for i in range(1, 6)], value=None, label=t("en", "pg.fb_rating"),
                                         elem_id="pg-fb-rating", scale=2), label="pg.fb_rating")
        with gr.Row():
            better = labels.add(gr.Textbox(label=t("en", "pg.fb_better"), lines=2, elem_id="pg-fb-better", scale=3),
                                label="pg.fb_better")
            comment = labels.add(gr.Textbox(label=t("en", "pg.fb_comment"), lines=2, elem_id="pg-fb-comment",
                                            scale=2), label="pg.fb_comment")
        with gr.Row():
            fb_send = labels.add(gr.Button(t("en", "pg.fb_send"), elem_id="pg-fb-send", scale=0),
                                 value="pg.fb_send")
            fb_status = gr.Markdown(elem_id="pg-fb-status")
    return {"fb_which": which, "fb_rating": rating, "fb_better": better, "fb_comment": comment,
            "fb_send": fb_send, "fb_status": fb_status}


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

    def respond(message: str, history_a, history_b, gens_a, gens_b, model, compare, side, system_prompt,
                request: gr.Request, *values):
        message = (message or "").strip()
        history_a, history_b = list(history_a or []), list(history_b or [])
        gens_a, gens_b = dict(gens_a or {}), dict(gens_b or {})
        session = getattr(request, "session_hash", None)
        if not message:
            yield gr.update(), history_a, history_b, gens_a, gens_b
            return
        sampling = dict(zip(names, values))
        sampling["max_new_tokens"] = int(sampling["max_new_tokens"])
        targets = [(history_a, gens_a, model)] + ([(history_b, gens_b, compare)] if side else [])
        streams = []
        for history, gens, reference in targets:
            messages = to_messages(history, system_prompt or "") + [{"role": "user", "content": message}]
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            generation_id, stream = open_stream(svc, reference, messages, sampling, session)
            if generation_id:
                gens[len(history) - 1] = generation_id  # message index -> generation (for thumbs and ratings)
            streams.append((history, stream))
        yield "", history_a, history_b, gens_a, gens_b
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
            yield "", history_a, history_b, gens_a, gens_b

    chat_inputs = [p["prompt"], p["chat_a"], p["chat_b"], p["gens_a"], p["gens_b"], p["model"], p["compare"],
                   p["side"], p["system"], *[p["sliders"][n] for n in names]]
    chat_outputs = [p["prompt"], p["chat_a"], p["chat_b"], p["gens_a"], p["gens_b"]]
    for trigger in (p["send"].click, p["prompt"].submit):
        trigger(respond, inputs=chat_inputs, outputs=chat_outputs, concurrency_limit=2, **private)
    p["clear"].click(lambda: ([], [], {}, {}), outputs=[p["chat_a"], p["chat_b"], p["gens_a"], p["gens_b"]],
                     **private)
    p["side"].change(lambda on: (gr.Column(visible=on), gr.Radio(visible=on, value="a")), inputs=[p["side"]],
                     outputs=[p["column_b"], p["fb_which"]], **private)

    def thumbs(gens, lang, data: gr.LikeData, request: gr.Request = None):
        index = data.index if isinstance(data.index, int) else data.index[0]
        if data.liked not in (True, False):  # un-liked, or another option: nothing to store
            return gr.update()
        return send_feedback(svc, (gens or {}).get(index), lang, getattr(request, "session_hash", None),
                             thumbs="up" if data.liked is True else "down")

    for chat, gens in ((p["chat_a"], p["gens_a"]), (p["chat_b"], p["gens_b"])):
        chat.like(thumbs, inputs=[gens, ctx.lang], outputs=[p["fb_status"]], **private)

    def rate(gens_a, gens_b, which, rating, better, comment, lang, request: gr.Request = None):
        generation_id = latest(gens_b if which == "b" else gens_a)
        text = send_feedback(svc, generation_id, lang, getattr(request, "session_hash", None),
                             rating=int(rating) if rating else None, corrected=(better or "").strip(),
                             comment=(comment or "").strip())
        saved = generation_id is not None and text == t(lang, "pg.fb_saved", id=generation_id)
        return (text, *((None, "", "") if saved else (gr.update(), gr.update(), gr.update())))

    p["fb_send"].click(rate, inputs=[p["gens_a"], p["gens_b"], p["fb_which"], p["fb_rating"], p["fb_better"],
                                     p["fb_comment"], ctx.lang],
                       outputs=[p["fb_status"], p["fb_rating"], p["fb_better"], p["fb_comment"]], **private)
    p["model"].input(lambda m: gr.Dropdown(value=base_of(svc, m)), inputs=[p["model"]], outputs=[p["compare"]],
                     **private)
    for picker, label in ((p["model"], p["runtime_a"]), (p["compare"], p["runtime_b"])):
        picker.change(lambda m, lang: runtime_label(svc, m, lang), inputs=[picker, ctx.lang], outputs=[label],
                      **private)
        ctx.on_language.append((lambda m, lang: runtime_label(svc, m, lang), [picker, ctx.lang], [label]))
    selectors = [p["model"], p["compare"]]
    ctx.tab_items["playground"].select(refresh, inputs=[*selectors, ctx.lang], outputs=selectors, **private)
    ctx.on_language.append((refresh, [*selectors, ctx.lang], selectors))
