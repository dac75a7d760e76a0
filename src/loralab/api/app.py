"""The FastAPI application: `create_app(settings)` wires services, routers, auth and error responses."""
from __future__ import annotations

import math
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from loralab import __version__
from loralab.api.security import SecurityMiddleware
from loralab.services.context import Services, open_services
from loralab.services.errors import LoralabError
from loralab.settings import Settings


def _finite(value):
    """`value` with NaN/Infinity floats written as strings, so a validation error echoing them can be sent."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def error_response(exc: LoralabError) -> JSONResponse:
    body = {"detail": exc.message, "code": exc.code, "param": exc.param}
    if exc.errors:
        body["errors"] = exc.errors
    return JSONResponse(body, status_code=exc.status, headers=getattr(exc, "headers", None))  # e.g. Retry-After


def create_app(settings: Settings | None = None, services: Services | None = None,
               mount_web_ui: bool = True) -> FastAPI:
    """Build the API app over the database named by `settings` (OpenAPI docs at /docs)."""
    from loralab.api.routes import datasets, generate, models, openai, resume, system, training, ws

    svc = services or open_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if services is None:
            svc.close()

    app = FastAPI(title="loralab", version=__version__, lifespan=lifespan,
                  description="Fine-tune open LLMs with LoRA: datasets, training jobs, live progress, registry, generation.")
    app.state.services = svc

    @app.exception_handler(LoralabError)
    async def _loralab_error(_request: Request, exc: LoralabError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        # FastAPI's own body, but JSON-safe: Python's json accepts NaN/Infinity, which the error echoes back.
        return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)

    for module in (system, datasets, training, resume, models, generate, ws, openai):
        app.include_router(module.router)
    app.include_router(training.stream_router)
    from loralab.api.routes import learning as learning_routes

    app.include_router(learning_routes.router)
    from loralab.api.routes import abtests as abtest_routes, feedback as feedback_routes

    app.include_router(feedback_routes.router)
    app.include_router(abtest_routes.router)
    from loralab.api.routes import evaluations as evaluation_routes

    app.include_router(evaluation_routes.router)
    from loralab.api.routes import exports as export_routes

    app.include_router(export_routes.router)
    if mount_web_ui:
        from loralab.ui import mount_ui

        mount_ui(app, svc)  # last: the UI is mounted at "/" and would hide routes added after it
    # outermost of our layers: wraps every route, the WebSockets and the mounted UI
    app.add_middleware(SecurityMiddleware, settings=svc.settings)
    return app
