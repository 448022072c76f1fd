"""The server's ASGI application: lifespan, the front layers, and FastAPI behind them.

``create_app(settings)`` builds everything from the settings it is given; nothing happens at
import time. The models load and warm up in the lifespan (in a thread, so the event loop
stays free) and the batchers start there, bound to the running loop.

Inference and health requests are answered by the fast path (service.fastpath) and never
touch FastAPI; every other route is FastAPI's (service.framework). FastAPI is imported and
built in a background thread once the models serve, so a server is ready and answers
inference ~0.3 s sooner after start (its import was a third of the cold start); a request
for one of its routes in that window waits for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from service.errors import error_parts
from service.fastpath import InferFastPath, Route, route_of
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelStore

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("normserve")
access_log = logging.getLogger("normserve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(settings: Settings) -> NormserveApp:
    return NormserveApp(settings)


class NormserveApp:
    """The access log and metrics, in front of the inference fast path and of FastAPI.

    Not FastAPI's ``add_middleware``: that would put these layers inside FastAPI's stack
    (server-error, body-limit and OpenTelemetry layers, then Starlette's exception
    middleware), which every inference request crossed for nothing: about 7% of the event
    loop's time under load (py-spy).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store = ModelStore(settings)
        self.front = AccessMiddleware(
            self._framework_call,
            InferFastPath(self.store, errors=error_parts),
            metrics=self.metrics,
            store=self.store,
            enabled=settings.access_log,
        )
        self._framework: FastAPI | None = None
        self._framework_lock = threading.Lock()
        self._framework_task: asyncio.Future[FastAPI] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.front(scope, receive, send)

    def framework(self) -> FastAPI:
        """The FastAPI application, built on first use (thread-safe)."""
        with self._framework_lock:
            if self._framework is None:
                from service.framework import build_framework  # the deferred import

                self._framework = build_framework(self.settings, self.store, self.metrics)
            return self._framework

    def openapi(self) -> dict[str, Any]:
        return self.framework().openapi()

    async def _framework_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        framework = self._framework
        if framework is None:
            if self._framework_task is None:  # no lifespan ran (a bare ASGI call)
                self._framework_task = asyncio.ensure_future(asyncio.to_thread(self.framework))
            framework = await asyncio.shield(self._framework_task)
        await framework(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self._startup()
        except Exception as exc:
            log.exception("start-up failed")
            await send({"type": "lifespan.startup.failed", "message": type(exc).__name__})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        # uvicorn has finished the in-flight requests before this point; drain the queues.
        await self.store.stop()
        self.metrics.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def _startup(self) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(self.store.load, self.metrics.on_batch)
        self.store.start()
        for name in self.store.names():
            self.metrics.model_ready.labels(name).set(1 if name in self.store.served else 0)
        log.info(
            "serving %d model(s) from %s, ready=%s, start-up %.2f s",
            len(self.store.served),
            self.settings.repository,
            self.store.ready,
            time.perf_counter() - started,
        )
        if self._framework_task is None:
            self._framework_task = asyncio.ensure_future(asyncio.to_thread(self.framework))
            self._framework_task.add_done_callback(_log_build_failure)


def _log_build_failure(task: asyncio.Future[Any]) -> None:
    # Inference still serves; the other routes answer 500 and the log says why.
    if not task.cancelled() and task.exception() is not None:
        log.error("building the FastAPI routes failed", exc_info=task.exception())


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
            if route is not None and route.inference:
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


def app_from_environment() -> NormserveApp:
    """The app from ``NORMSERVE_*`` variables: what each uvicorn worker process builds."""
    return create_app(Settings())
