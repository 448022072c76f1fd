"""The FastAPI application: lifespan, the one error-to-status map, access logs and metrics.

``create_app(settings)`` builds everything from the settings it is given; nothing happens at
import time. Models load and warm up in the lifespan (in a thread, so the event loop stays
free), and the batchers start there, bound to the running loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import ui, v1, v2
from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NormserveError,
    Overloaded,
    PayloadTooLarge,
    ResourceNotFound,
)
from service.fastpath import InferFastPath, Route, route_of
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelStore
from service.webdata import SamplesFile

log = logging.getLogger("normserve")
access_log = logging.getLogger("normserve.access")

# The one place that knows HTTP statuses. Order matters: subclasses before their bases.
STATUS: list[tuple[type[NormserveError], int]] = [
    (InvalidInput, 400),
    (ModelNotFound, 404),
    (ResourceNotFound, 404),
    (PayloadTooLarge, 413),
    (Overloaded, 503),
    (ModelNotReady, 503),
    (DeadlineExceeded, 504),
    # nginx's convention for 'client closed request': only the access log ever sees it.
    (ClientDisconnected, 499),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def status_for(exc: NormserveError) -> int:
    return next((status for kind, status in STATUS if isinstance(exc, kind)), 500)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # Every error is {"error": "..."}: what V2 clients (tritonclient) decode.
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    store = ModelStore(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.perf_counter()
        await asyncio.to_thread(store.load, metrics.on_batch)
        store.start()
        for name in store.names():
            metrics.model_ready.labels(name).set(1 if name in store.served else 0)
        log.info(
            "serving %d model(s) from %s, ready=%s, start-up %.2f s",
            len(store.served),
            settings.repository,
            store.ready,
            time.perf_counter() - started,
        )
        yield
        # uvicorn has finished the in-flight requests before this point; drain the queues.
        await store.stop()
        metrics.close()

    app = NormserveApp(
        title="normserve",
        version=v2.SERVER_VERSION,
        description="Open Inference Protocol (KServe V2 / Triton) and V1 JSON over onnxruntime.",
        lifespan=lifespan,
    )
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
    # In front of FastAPI's own stack, not inside it: the access log and metrics see every
    # request, and inference requests skip the framework's layers altogether.
    app.front = AccessMiddleware(
        app.framework,
        InferFastPath(store, errors=error_parts),
        metrics=metrics,
        store=store,
        enabled=settings.access_log,
    )
    return app


class NormserveApp(FastAPI):
    """FastAPI behind our own front layers.

    ``add_middleware`` would put them inside FastAPI's stack (server-error, body-limit and
    OpenTelemetry layers, then Starlette's exception middleware), which every inference
    request then crossed for nothing: about 7% of the event loop's time under load (py-spy).
    In front, the access log and metrics still see every request, and inference requests
    are answered by ``InferFastPath`` with the application's own error map.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None or scope["type"] == "lifespan":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # what Starlette sets: handlers read app.state through it
        await self.front(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI itself: routing, dependencies, its middleware and exception handlers."""
        await super().__call__(scope, receive, send)


def error_parts(exc: NormserveError) -> tuple[int, str, dict[str, str]]:
    """Status, message and extra headers for a domain error: the framework's handlers and
    the inference fast path answer alike."""
    headers = {}
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    return status_for(exc), str(exc), headers


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


# Request ids need to be unique, not secret: a random prefix per process and a counter cost
# a fraction of uuid4() (3% of the loop's time under load), and uvicorn's worker processes
# each import this module, so each draws its own prefix.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


class AccessMiddleware:
    """Request id, one structured access-log line and request metrics per request.

    Inference requests go to the fast path, which takes the request id and returns the
    status it sent; everything else goes to the framework with the id added to its answer.
    """

    def __init__(
        self,
        app: ASGIApp,
        fast: InferFastPath,
        metrics: Metrics,
        store: ModelStore,
        enabled: bool,
    ) -> None:
        self.app = app
        self.fast = fast
        self.metrics = metrics
        self.store = store
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value[:128]
                break
        request_id = request_id or _new_request_id().encode()
        started = time.perf_counter()
        status = 500
        route = route_of(scope)
        try:
            if route is not None:
                status = await self.fast.answer(route, scope, receive, send, request_id)
            else:

                async def send_with_id(message: Message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                        message["headers"] = [
                            *message.get("headers", ()),
                            (b"x-request-id", request_id),
                        ]
                    await send(message)

                await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            if route is not None:
                self._observe(route, status, seconds)
            if self.enabled:
                access_log.info(
                    orjson.dumps(
                        {
                            "request_id": request_id.decode("latin-1"),
                            "method": scope.get("method"),
                            "path": scope.get("path"),
                            "status": status,
                            "ms": round(seconds * 1000, 3),
                            "client": (scope.get("client") or ("", 0))[0],
                        }
                    ).decode()
                )

    def _observe(self, route: Route, status: int, seconds: float) -> None:
        # Only names the repository has become label values: a client must not be able to
        # grow the metrics without bound by inventing model names.
        model = route.model
        known = model in self.store.served or model in self.store.failed
        label = model if known else "unknown"
        self.metrics.on_request(label, route.protocol, status, seconds, known)


def app_from_environment() -> FastAPI:
    """The app from ``NORMSERVE_*`` variables: what each uvicorn worker process builds."""
    return create_app(Settings())
