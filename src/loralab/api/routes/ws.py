"""WebSocket live events: `/ws/training/{job_id}?after=SEQ` replays missed events, then follows until the end."""
from __future__ import annotations

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from loralab.api.deps import websocket_token_ok
from loralab.services import jobs
from loralab.services.errors import NotFound

router = APIRouter(tags=["training"])
CLOSE_UNAUTHORIZED, CLOSE_NOT_FOUND = 4401, 4404


@router.websocket("/ws/training/{job_id}")
async def training_events(websocket: WebSocket, job_id: str, after: int = 0):
    """Each message is one event {seq, type, time, ...}; the socket closes (1000) after done/error/cancelled."""
    if not websocket_token_ok(websocket):
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason="missing or wrong API token")
        return
    svc = websocket.app.state.services
    stream = jobs.follow_events(svc, job_id, max(0, after))
    try:
        first = await anext(stream, None)
    except NotFound as exc:
        await websocket.close(code=CLOSE_NOT_FOUND, reason=exc.message[:120])
        return
    await websocket.accept()
    try:
        event = first
        while event is not None:
            await websocket.send_json(event)
            event = await anext(stream, None)
        await websocket.close(code=1000)
    except WebSocketDisconnect:
        pass
    finally:
        await stream.aclose()
