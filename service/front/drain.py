"""On SIGTERM, readiness first and the listener later, so a load balancer can look away.

uvicorn closes its listening socket the moment SIGTERM arrives. A load balancer that learns
of the stop only from its health checks keeps sending new requests for up to a check
interval and each of them meets a closed port. So the first SIGTERM (or SIGINT) only turns
``/v2/health/ready`` to 503 and keeps serving for ``drain_delay_s``; then the server's own
handler runs and the usual graceful shutdown follows (in-flight requests finish within
``graceful_shutdown_s``). A second signal during the pause stops at once, as an operator
who insists expects. With a delay of 0 only the readiness answer changes.

Behind Kubernetes the ``preStop`` pause does the same job before SIGTERM is sent, so the
manifests leave the delay at 0; behind HAProxy or nginx set it above the check interval
times the failures needed to mark a server down (``python -m benchmarks.rehearse``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("normserve")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def drain_before_exit(delay_s: float, begin_drain: Callable[[], None]) -> None:
    """Wraps the exit handlers the server installed: ``begin_drain()`` at the first signal,
    the server's own handler ``delay_s`` later. Call from the running event loop."""
    if threading.current_thread() is not threading.main_thread():
        return  # an in-process test client: no signals reach this thread, none to handle
    loop = asyncio.get_running_loop()
    draining = False

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal draining
        server_handler = handlers[sig]
        if draining or delay_s <= 0:
            if not draining:
                draining = True
                begin_drain()
            server_handler(sig, frame)
            return
        draining = True
        begin_drain()
        log.info(
            "signal %s: not ready, closing the listener in %.1f s", signal.strsignal(sig), delay_s
        )
        # From a signal handler: the thread-safe call also wakes the loop if it is asleep.
        loop.call_soon_threadsafe(loop.call_later, delay_s, server_handler, sig, None)

    handlers: dict[int, Callable[[int, FrameType | None], Any]] = {}
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if callable(current):  # the server's handler; default or ignored: nothing to defer
            handlers[sig] = current
            signal.signal(sig, on_signal)
