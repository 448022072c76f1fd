"""The gRPC server: grpcio's asyncio server on the app's event loop, started and stopped by
the app's lifespan (service.app), in every worker process.

Beside the inference service it serves the standard ``grpc.health.v1.Health`` (what
Kubernetes' gRPC probe calls): SERVING once every model is loaded, NOT_SERVING from the
start of shutdown. Limits are the HTTP front's where they mean the same (the largest
request is ``max_request_bytes``) and gRPC's own otherwise: RPCs per process, HTTP/2
streams per connection, keepalive pings.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from service.grpc.servicer import SERVICE, InferenceServicer
from service.protocol.handlers import Protocol
from service.settings import Settings

if TYPE_CHECKING:  # imports OpenTelemetry: only ever loaded when tracing is on
    from service.operations.otel import Tracing

log = logging.getLogger("normserve")

KEEPALIVE_TIMEOUT_S = 20.0
# Clients may ping this often (tritonclient's keepalive default is every 2^31 ms, i.e. never;
# grpc-go's minimum is 10 s): more frequent pings are answered with GOAWAY.
MIN_CLIENT_PING_INTERVAL_S = 10.0


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        # Answers are the server's own (bounded by the model's outputs): no limit to set.
        ("grpc.max_send_message_length", -1),
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
        ("grpc.keepalive_time_ms", round(settings.grpc_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", round(MIN_CLIENT_PING_INTERVAL_S * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        # Several worker processes bind the same port; the kernel spreads connections.
        ("grpc.so_reuseport", 1),
    ]


class GrpcServer:
    def __init__(
        self, protocol: Protocol, settings: Settings, tracing: Tracing | None = None
    ) -> None:
        self.settings = settings
        self.protocol = protocol
        self.tracing = tracing
        self.server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        self._stopping: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Binds and starts serving; raises (start-up fails) when the port cannot be bound."""
        settings = self.settings
        server = grpc.aio.server(
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        )
        servicer = InferenceServicer(
            self.protocol, settings.limits, settings.access_log, self.tracing
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{_host(settings.host)}:{settings.grpc_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(
                f"cannot listen for gRPC on {address} ({exc}); choose another --grpc-port "
                "(NORMSERVE_GRPC_PORT), or 0 to turn gRPC off"
            ) from None
        await server.start()
        self.server = server
        self._loop = asyncio.get_running_loop()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.protocol.ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            await self.health.set(name, status)
        log.info("gRPC listening on %s", address)

    async def stop(self, grace_s: float) -> None:
        """Refuses new RPCs, lets those in progress finish for up to ``grace_s``, then
        cancels what is left (streams included). Already under way since the signal, if
        one came (``drain_on_signals``): then this waits for that drain."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        await self._stopping

    async def _stop(self, grace_s: float) -> None:
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.server = None

    def not_serving(self) -> None:
        """grpc.health.v1 answers NOT_SERVING from now on (safe from a signal handler)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self.health.enter_graceful_shutdown())
            )

    def drain_on_signals(self, grace_s: float) -> None:
        """Starts the drain when uvicorn's exit handler runs (at SIGTERM or SIGINT, or
        ``drain_delay_s`` later: service.front.drain wraps this), beside its drain of HTTP.

        uvicorn tells the app about shutdown only after its HTTP connections are done (up
        to ``graceful_shutdown_s``); starting gRPC's drain only then would make the worst
        case twice that, past a pod's termination grace period. uvicorn's handlers are
        chained, not replaced, and it restores the original ones when it exits. Signal
        handlers belong to the main thread: an app run elsewhere (a test client) drains at
        lifespan shutdown instead.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self._begin_stop, grace_s)
                previous(signum, frame)

            signal.signal(sig, handler)

    def _begin_stop(self, grace_s: float) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))


def _host(host: str) -> str:
    # gRPC wants IPv6 literals in brackets, as in a URL.
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
