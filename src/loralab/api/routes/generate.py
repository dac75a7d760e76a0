"""Generation: one completion, or a token stream as server-sent events; every answer carries its generation id."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from loralab.api.deps import get_services, require_token
from loralab.services import base_models, serving
from loralab.services.context import Services
from loralab.services.errors import LoralabError
from loralab.services.serving import GenerateRequest

router = APIRouter(prefix="/api", tags=["generate"], dependencies=[Depends(require_token)])
SESSION_HEADER = "x-session-id"


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, svc: Services = Depends(get_services)):
    """Generate with a fine-tuned model, a deployed name, `ab:<test>` or a base model (+ adapter); `stream: true`
    for SSE. The response `id` (gen-…) is what POST /api/feedback takes. Async: waiting for a model to load or
    for tokens holds no server thread."""
    subject = request.headers.get(SESSION_HEADER) or None
    client = base_models.client_of(request)
    if not body.stream:
        return await serving.generate_text_async(svc, body, subject, client)
    pieces = await serving.stream_text_async(svc, body, "api", subject, client)
    extra = {"id": pieces.id, **pieces.recorder.ab_fields()}

    async def events():
        yield f"data: {json.dumps({**extra, 'text': ''})}\n\n"  # the id comes first, even for an empty answer
        try:
            async for piece in pieces.aiter():
                yield f"data: {json.dumps({**extra, 'text': piece}, ensure_ascii=False)}\n\n"
        except (LoralabError, ValueError, RuntimeError) as exc:
            yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n"
        finally:
            pieces.cancel()  # a no-op after a complete answer; stops the rows when the client left early
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
