"""The FastAPI application behind the inference fast path: every route but inference and
health, the OpenAPI document, and the one error-to-response map for them.

Imported and built only by ``NormserveApp`` (service.app), in the background once the models
are serving: FastAPI's import took ~0.3 s of a ~0.9 s cold start on 2 cores.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import ui, v1, v2
from service.codec import error_body
from service.errors import NormserveError, error_parts
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelStore
from service.webdata import SamplesFile

log = logging.getLogger("normserve")

DESCRIPTION = "Open Inference Protocol (KServe V2 / Triton) and V1 JSON over onnxruntime."


def build_framework(settings: Settings, store: ModelStore, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="normserve", version=v2.SERVER_VERSION, description=DESCRIPTION)
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = metrics
    app.include_router(v2.router)
    app.include_router(v1.router)
    # The web page: its files are read now, once; the samples file whenever it changes.
    app.state.page_files = ui.load_page_files()
    app.state.samples = SamplesFile(settings.repository)
    app.include_router(ui.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        # Queue depth is read when scraped: exact at that instant, no bookkeeping per request.
        for name, served in store.served.items():
            metrics.queue_depth.labels(name).set(served.batcher.depth)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    _install_error_handlers(app)
    return app


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        error_body(message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NormserveError)
    async def domain_error(request: Request, exc: NormserveError) -> Response:
        status, message, headers = error_parts(exc)
        return error_response(status, message, headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error")
