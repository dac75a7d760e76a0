"""Generation: one completion, or a token stream as server-sent events; every answer carries its generation id."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from loralab.api.deps import get_services, require_token
from loralab.services import serving
from loralab.services.context import Services
from loralab.services.errors import LoralabError
from loralab.services.serving import GenerateRequest

router = APIRouter(prefix="/api", tags=["generate"], dependencies=[Depends(require_token)])
SESSION_HEADER = "x-session-id"


@router.post("/generate")
def generate(body: GenerateRequest, request: Request, svc: Services = Depends(get_services)):
    """Generate with a fine-tuned model, a deployed name, `ab:<test>` or a base model (+ adapter); `stream: true`
    for SSE. The response `id` (gen-…) is what POST /api/feedback takes."""
    subject = request.headers.get(SESSION_HEADER) or None
    if not body.stream:
        return serving.generate_text(svc, body, subject)
    pieces = serving.stream_text(svc, body, "api", subject)
    extra = {"id": pieces.id, **pieces.recorder.ab_fields()}

    def events():
        yield f"data: {json.dumps({**extra, 'text': ''})}\n\n"  # the id comes first, even for an empty answer
        try:
            for piece in pieces:
                yield f"data: {json.dumps({**extra, 'text': piece}, ensure_ascii=False)}\n\n"
        except (LoralabError, ValueError, RuntimeError) as exc:
            yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n"
        finally:
            pieces.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
