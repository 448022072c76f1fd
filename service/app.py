"""The server's ASGI application: where the layers are put together.

``create_app(settings)`` builds everything from the settings it is given; nothing happens
at import time. The models load and warm up in the lifespan (in a thread, so the event
loop stays free) and the batchers start there, bound to the running loop. Every HTTP
request goes to the front's one dispatcher (service.front.dispatch), which serves the one
route table (service.front.table). The gRPC server (service.grpc), when ``grpc_port`` is
not 0, runs on the same loop over the same ``Protocol``, started after the models load and
stopped (drained) before the batchers stop.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from service import collector
from service.front.asgi import Receive, Scope, Send
from service.front.context import Context
from service.front.decoding import BodyDecoder
from service.front.dispatch import HttpFront
from service.front.drain import drain_before_exit
from service.front.limits import EARLY_REFUSAL
from service.front.routing import Router
from service.front.table import route_table
from service.operations import tracing
from service.operations.metrics import Metrics
from service.protocol.handlers import Protocol
from service.serving.store import ModelStore
from service.settings import Settings
from service.webdata import SamplesFile

if TYPE_CHECKING:
    from service.grpc.server import GrpcServer
    from service.operations.otel import Tracing

log = logging.getLogger("normserve")


def create_app(settings: Settings, traces: Tracing | None = None) -> NormserveApp:
    """The app; ``traces``: where spans go (tests pass an in-memory exporter's), by default
    an OTLP exporter when the OTEL_* variables name an endpoint, or none."""
    return NormserveApp(settings, traces if traces is not None else tracing.from_environment())


class NormserveApp:
    def __init__(self, settings: Settings, traces: Tracing | None = None) -> None:
        self.settings = settings
        # Also what a second transport (gRPC) begins its requests' traces with.
        self.tracing = traces
        self.metrics = Metrics()
        self.store = ModelStore(settings)
        self.protocol = Protocol(self.store, self.metrics)
        self.router = Router(route_table())
        self.context = Context(
            settings=settings,
            protocol=self.protocol,
            metrics=self.metrics,
            samples=SamplesFile(settings.repository),
            decoder=BodyDecoder(),
            routes=self.router.routes,
        )
        self.http = HttpFront(self.context, self.router, settings.access_log, traces)
        self.grpc: GrpcServer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        # websocket: no route is one (service.__main__ runs uvicorn without them; a server
        # that sends one closes it when this returns)

    def openapi(self) -> dict[str, Any]:
        return self.context.openapi

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self._startup()
        except Exception as exc:
            log.error("start-up failed: %s", exc, exc_info=not isinstance(exc, ValueError))
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        finally:
            # What start-up made is frozen out of the collector's passes; if python -m service
            # held the collector while the server started, it runs again from here.
            collector.started()
        # For the connections of service.front.limits: refusals at headers-complete.
        if "state" in scope:
            scope["state"][EARLY_REFUSAL] = self.http.refuse_early
        # After the server installed its signal handlers: SIGTERM makes readiness 503 first.
        drain_before_exit(self.settings.drain_delay_s, self._begin_drain)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        # uvicorn has finished the in-flight HTTP requests before this point; gRPC's drain
        # began at the signal, beside HTTP's, and ends here (past the grace period, what is
        # left is cancelled); then model control stops and the queues drain.
        if self.grpc is not None:
            await self.grpc.stop(self.settings.graceful_shutdown_s)
        await self.protocol.control.stop()
        await self.store.stop()
        self.context.decoder.close()
        self.metrics.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports the spans still buffered
        await send({"type": "lifespan.shutdown.complete"})

    def _begin_drain(self) -> None:
        """At the first SIGTERM/SIGINT (from the signal handler): not ready on either
        transport, while both still serve until their listeners close."""
        self.protocol.drain()
        if self.grpc is not None:
            self.grpc.not_serving()

    async def _startup(self) -> None:
        started = time.perf_counter()
        await self.protocol.control.start()
        if self.settings.grpc_port:
            # Imported only when used: grpcio is not needed to serve HTTP alone.
            from service.grpc.server import GrpcServer

            self.grpc = GrpcServer(self.protocol, self.settings, self.tracing)
            await self.grpc.start()
            self.grpc.drain_on_signals(self.settings.graceful_shutdown_s)
        log.info(
            "serving %d model(s) from %s (model control: %s), ready=%s, start-up %.2f s",
            len(self.store.served),
            self.settings.repository,
            self.settings.model_control_mode,
            self.store.ready,
            time.perf_counter() - started,
        )


def app_from_environment() -> NormserveApp:
    """The app from ``NORMSERVE_*`` variables: what each uvicorn worker process builds."""
    return create_app(Settings())
