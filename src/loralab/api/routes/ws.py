"""WebSocket live events: `/ws/training/{job_id}?after=SEQ` replays missed events, then follows until the end."""
from __future__ import annotations

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from loralab.api.deps import websocket_access_ok
from loralab.services import jobs
from loralab.services.errors import NotFound

router = APIRouter(tags=["training"])
CLOSE_UNAUTHORIZED, CLOSE_NOT_FOUND = 4401, 4404


@router.websocket("/ws/training/{job_id}")
async def training_events(websocket: WebSocket, job_id: str, after: int = 0):
    """Each message is one event {seq, type, time, ...}; the socket closes (1000) after done/error/cancelled.
    Needs the bearer token or `?ticket=` from POST /api/training/jobs/{job_id}/ticket (4401 otherwise)."""
    # accepted before any refusal: a browser sees the close code (4401, 4404), never a bare HTTP 403
    await websocket.accept()
    if not websocket_access_ok(websocket, job_id):
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason="missing or wrong API token or ticket")
        return
    svc = websocket.app.state.services
    stream = jobs.follow_events(svc, job_id, max(0, after))
    try:
        first = await anext(stream, None)
    except NotFound as exc:
        await websocket.close(code=CLOSE_NOT_FOUND, reason=exc.message[:120])
        return
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
