"""OpenTelemetry traces: the request, its wait in the queue, and the batch that computed it.

Off unless an OTLP endpoint is configured with the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; the other
``OTEL_*`` variables - protocol, headers, service name, sampler - are read by the SDK itself).
Off, nothing of OpenTelemetry is imported and a request costs one ``None`` check in its
transport and one context-variable read in the batcher. The packages are the optional extra
``otel``.

Spans, for each request a transport serves:

- the request (kind SERVER), a child of the caller's span when the request carries a W3C
  ``traceparent`` (HTTP header, or gRPC metadata: the same key);
- ``queue``: its child, from enqueueing to the start of the batch that took it;
- ``batch``: one per executed batch, the root of its own trace, linked to the span of every
  request it computed (one batch serves many requests, so it can be nobody's child), and
  each request's span links back to it.

A transport calls ``Tracing.begin(name, carrier, attributes)`` when a request arrives (the
carrier holds the request's headers or metadata, keys in lower case) and ``RequestTrace.end``
after answering; ``begin`` makes the trace current for the task, which is how the batcher
finds it without a parameter through every layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # service.operations.otel imports OpenTelemetry: only when tracing is on
    from service.operations.otel import RequestTrace, Tracing

log = logging.getLogger("normserve.tracing")

# The trace of the request the current task serves (None: tracing off, or no request).
current_trace: ContextVar[RequestTrace | None] = ContextVar("normserve_trace", default=None)

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """An OTLP endpoint is set and neither OTEL_SDK_DISABLED nor OTEL_TRACES_EXPORTER=none
    turns traces off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def from_environment() -> Tracing | None:
    """Tracing with an OTLP exporter when the environment asks for it, else None."""
    if not tracing_requested():
        return None
    try:
        from service.operations.otel import Tracing, otlp_provider

        return Tracing(otlp_provider())
    except ImportError as exc:
        log.warning(
            "an OTLP endpoint is set but OpenTelemetry is not installed (pip install "
            "'normserve[otel]'); traces are off: %s",
            exc,
        )
        return None
