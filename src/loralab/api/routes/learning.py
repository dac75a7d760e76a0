"""Learning center over HTTP: topics, quizzes (graded with explanations), progress per user, tools, guided fine-tune."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from loralab.api.deps import get_services, require_token
from loralab.services import base_models, learning
from loralab.services.context import Services
from loralab.services.errors import Invalid

router = APIRouter(prefix="/api/learn", tags=["learn"], dependencies=[Depends(require_token)])

User = Field("local", description="Learner id (the web UI uses one per browser; the CLI uses 'local').")
Lang = Field("en", description="'ja' or 'en'.")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuizAnswers(_Body):
    user: str = User
    lang: str = Lang
    answers: dict[str, str] = Field(description="Question id -> choice id; unanswered questions count as wrong.")


class AnswerCheck(_Body):
    question_id: str
    choice_id: str
    lang: str = Lang


class ProgressUpdate(_Body):
    user: str = User
    topic_id: str = Field(description="Topic id or code (e.g. 'tokens' or '1-02').")
    action: Literal["read", "step"] = Field(description="'read' marks the topic read; 'step' marks `step_id` done.")
    step_id: str | None = Field(None, description="With action 'step': the hands-on step (checked from real state).")


class TokenizeRequest(_Body):
    text: str = Field(description="Text to split into the model's tokens (up to 5000 characters).")
    base_model: str | None = Field(None, description="Base model whose tokenizer is used (default: embedded).")


class CalculatorRequest(_Body):
    user: str = User
    base_model: str | None = Field(None, description="Base model whose config is read (default: embedded).")
    r: int = Field(8, description="LoRA rank.")
    lora_alpha: float | None = Field(None, description="Scaling numerator (default 2 * r).")
    target_modules: str = Field("all-linear", description="'all-linear' or names such as q_proj,v_proj.")


class GuidedRequest(_Body):
    user: str = User


class CompareRequest(_Body):
    user: str = User
    questions: list[str] | None = Field(None, description="Questions to ask both models (default: 3 sample ones).")
    max_new_tokens: int = Field(40, description="Tokens generated per answer (1-256).")


@router.get("/topics")
def list_topics(lang: str = Query("en", description="'ja' or 'en'."), level: int | None = Query(None),
                svc: Services = Depends(get_services)) -> list[dict]:
    """Course topics in order (one level with ?level=)."""
    return learning.list_topics(svc, lang, level)


@router.get("/topics/{topic_id}")
def get_topic(topic_id: str, lang: str = Query("en"), svc: Services = Depends(get_services)) -> dict:
    """A topic: Markdown body, hands-on steps and quiz questions (answers are not revealed)."""
    return learning.get_topic(svc, topic_id, lang)


@router.post("/topics/{topic_id}/check")
def check_answer(topic_id: str, body: AnswerCheck) -> dict:
    """Instant feedback on one answer: right or wrong with both explanations (nothing is stored)."""
    return learning.check_answer(topic_id, body.question_id, body.choice_id, body.lang)


@router.post("/topics/{topic_id}/quiz")
def submit_quiz(topic_id: str, body: QuizAnswers, svc: Services = Depends(get_services)) -> dict:
    """Grade and store a quiz attempt: score, per-question explanations, best and latest attempt."""
    return learning.submit_quiz(svc, body.user, topic_id, body.answers, body.lang)


@router.get("/progress")
def get_progress(user: str = Query("local"), lang: str = Query("en"),
                 svc: Services = Depends(get_services)) -> dict:
    """A learner's progress: topics read, quizzes, steps, the guided path, per-level totals."""
    return learning.get_progress(svc, user, lang)


@router.post("/progress")
def update_progress(body: ProgressUpdate, svc: Services = Depends(get_services)) -> dict:
    """Mark a topic read, or a hands-on step done (409 step_not_done while the platform does not see it done)."""
    if body.action == "read":
        return learning.mark_read(svc, body.user, body.topic_id)
    if not body.step_id:
        raise Invalid("action 'step' needs step_id", param="step_id")
    return learning.mark_step(svc, body.user, body.topic_id, body.step_id)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, svc: Services = Depends(get_services)) -> dict:
    """The real tokens and ids of a text with a base model's tokenizer (loaded on the bounded model-load executor
    and awaited, so waiting for it holds no server thread)."""
    learning.check_text(body.text)
    tokenizer = await base_models.tokenizer_async(svc, body.base_model, base_models.client_of(request))
    return await run_in_threadpool(learning.tokenize, svc, body.text, body.base_model, tokenizer)


@router.post("/calculator")
def calculator(body: CalculatorRequest, svc: Services = Depends(get_services)) -> dict:
    """LoRA trainable parameters and adapter size from the model's real config."""
    return learning.calculate(svc, body.user, body.base_model, body.r, body.lora_alpha, body.target_modules)


@router.get("/guided")
def guided(user: str = Query("local"), svc: Services = Depends(get_services)) -> list[dict]:
    """The guided steps (upload sample, fine-tune, compare) with their status from real state."""
    return learning.guided_status(svc, user)


@router.post("/guided/upload")
def guided_upload(body: GuidedRequest, svc: Services = Depends(get_services)) -> dict:
    """Step 1: upload the sample dataset."""
    return learning.guided_upload(svc, body.user)


@router.post("/guided/train")
def guided_train(body: GuidedRequest, svc: Services = Depends(get_services)) -> dict:
    """Step 2: queue the fine-tune of the embedded model on it (a worker runs it)."""
    return learning.guided_train(svc, body.user)


@router.post("/guided/compare")
def guided_compare(body: CompareRequest, svc: Services = Depends(get_services)) -> dict:
    """Step 3: the same questions to the base and the tuned model, side by side."""
    return learning.guided_compare(svc, body.user, body.questions, body.max_new_tokens)
