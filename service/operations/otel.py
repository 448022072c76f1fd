"""The OpenTelemetry side of service.operations.tracing: imported only when tracing is on."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.operations.tracing import current_trace


def otlp_provider() -> TracerProvider:
    # OTLP's two transports; the specification's default is http/protobuf.
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    # From OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; named normserve when they do not.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "normserve"}))
    provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER itself
    # Exported from a background thread in batches: the event loop never waits on it.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("normserve")
        self._propagator = TraceContextTextMapPropagator()
        # perf_counter instants (the batcher's clock) to the epoch nanoseconds spans take.
        self._epoch_offset_ns = time.time_ns() - time.perf_counter_ns()

    def begin(
        self,
        name: str,
        carrier: Mapping[str, str],
        attributes: Mapping[str, Any],
        current: bool = True,
    ) -> RequestTrace:
        """The request's span, child of the carrier's ``traceparent`` if any; current for
        the calling task from now on (``current``: the caller runs in the request's own
        task; a request answered without one, refused at headers-complete, is not)."""
        parent = self._propagator.extract(carrier)
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes)
        )
        request = RequestTrace(self, span)
        if current:
            current_trace.set(request)
        return request

    def record_batch(
        self,
        model: str,
        requests: Sequence[tuple[RequestTrace, float]],
        rows: int,
        batch_size: int,
        started: float,
        ended: float,
        error: BaseException | None,
    ) -> None:
        """The queue spans of ``requests`` (each with the perf_counter instant it was
        enqueued) up to ``started``, and the batch span from ``started`` to ``ended``
        linked to every request's span; recorded after the fact, off the compute path."""
        start_ns = self._ns(started)
        for request, enqueued in requests:
            queue = self.tracer.start_span(
                "queue",
                context=trace.set_span_in_context(request.span),
                start_time=self._ns(enqueued),
            )
            queue.end(end_time=start_ns)
        batch = self.tracer.start_span(
            f"batch {model}",
            context=trace.set_span_in_context(INVALID_SPAN),  # a root
            links=[Link(request.span.get_span_context()) for request, _ in requests],
            start_time=start_ns,
            attributes={
                "normserve.model": model,
                "normserve.batch.requests": batch_size,
                "normserve.batch.rows": rows,
            },
        )
        if error is not None:
            batch.record_exception(error)
            batch.set_status(Status(StatusCode.ERROR, type(error).__name__))
        batch.end(end_time=self._ns(ended))
        for request, _ in requests:
            request.span.add_link(batch.get_span_context(), {"normserve.link": "batch"})

    def shutdown(self) -> None:
        """Exports what is still buffered (at the server's shutdown)."""
        self.provider.shutdown()

    def _ns(self, perf_counter_s: float) -> int:
        return int(perf_counter_s * 1e9) + self._epoch_offset_ns


class RequestTrace:
    """One request's span, as the transport and the batcher see it."""

    __slots__ = ("span", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span

    def end(self, attributes: Mapping[str, Any], error: str | None = None) -> None:
        """Ends the span with the answer's attributes; ``error``: the request failed on the
        server's side (a client's bad request is not a server error)."""
        self.span.set_attributes(dict(attributes))
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()
