"""Generation: one completion, or a token stream as server-sent events."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from loralab.api.deps import get_services, require_token
from loralab.services import serving
from loralab.services.context import Services
from loralab.services.errors import LoralabError
from loralab.services.serving import GenerateRequest

router = APIRouter(prefix="/api", tags=["generate"], dependencies=[Depends(require_token)])


@router.post("/generate")
def generate(body: GenerateRequest, svc: Services = Depends(get_services)):
    """Generate with a fine-tuned model, a deployed name or a base model (+ adapter); `stream: true` for SSE."""
    if not body.stream:
        return serving.generate_text(svc, body)
    pieces = serving.stream_text(svc, body)

    def events():
        try:
            for piece in pieces:
                yield f"data: {json.dumps({'text': piece}, ensure_ascii=False)}\n\n"
        except (LoralabError, ValueError, RuntimeError) as exc:
            yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
