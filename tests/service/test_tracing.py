"""OpenTelemetry traces (issue 18, point 7): the request span continues the caller's W3C
traceparent, its queue wait is its child, and the batch span is linked to every request it
computed; exported over OTLP to a real receiver when the OTEL_* variables say so; nothing
of OpenTelemetry loaded when they do not."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from faulty_onnx import BAD_INDEX, faulty_repository
from servers import ROOT, running_server
from tiny_onnx import FEATURES, tiny_repository

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from starlette.testclient import TestClient

from service.app import create_app
from service.operations.otel import Tracing
from service.operations.tracing import tracing_requested
from service.settings import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _traceparent(n: int = 0) -> str:
    return f"00-{TRACE_ID[:-2]}{n:02x}-{CALLER_SPAN}-01"


def _infer_body(rows: int = 1) -> dict[str, Any]:
    data = np.arange(rows * FEATURES, dtype=np.float32).tolist()
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, FEATURES], "data": data}]}


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    root = tmp_path_factory.mktemp("tracing")
    tiny_repository(root)
    repository = faulty_repository(root)
    # A queue delay long enough that concurrent requests share one batch.
    settings = Settings(repository=repository, access_log=False, max_queue_delay_ms=300)
    with TestClient(create_app(settings, Tracing(provider))) as client:
        yield client, exporter


def _named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def test_the_request_continues_the_callers_trace(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    exporter.clear()
    response = client.post(
        "/v2/models/tiny/infer",
        json=_infer_body(),
        headers={"traceparent": _traceparent(), "x-request-id": "traced-1"},
    )
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    (request,) = _named(spans, "POST /v2/models/{model_name}/infer")
    assert request.kind == SpanKind.SERVER
    assert _trace_hex(request) == _traceparent()[3:35]
    assert request.parent is not None and f"{request.parent.span_id:016x}" == CALLER_SPAN
    assert request.parent.is_remote
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["normserve.request_id"] == "traced-1"
    assert request.attributes["normserve.model"] == "tiny"

    (queue,) = _named(spans, "queue")
    assert request.context is not None and queue.parent is not None
    assert queue.parent.span_id == request.context.span_id
    assert _trace_hex(queue) == _trace_hex(request)
    assert queue.start_time is not None and request.start_time is not None
    assert request.start_time <= queue.start_time <= (queue.end_time or 0)

    (batch,) = _named(spans, "batch tiny")
    assert batch.parent is None  # a root: it serves many requests, nobody's child
    assert [link.context.span_id for link in batch.links] == [request.context.span_id]
    assert batch.context is not None
    assert [link.context.span_id for link in request.links] == [batch.context.span_id]
    assert (queue.end_time or 0) <= (batch.start_time or 0)


def test_one_batch_span_links_every_request_it_served(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    exporter.clear()

    async def post_together() -> list[int]:
        # Sent from the app's own event loop in one go, so that they queue together (threads
        # through the test client would arrive one by one on a busy machine and each run alone).
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as together:
            answers = await asyncio.gather(
                *(
                    together.post(
                        "/v2/models/tiny/infer",
                        json=_infer_body(),
                        headers={"traceparent": _traceparent(n)},
                    )
                    for n in range(1, 5)
                )
            )
        return [answer.status_code for answer in answers]

    assert client.portal is not None
    assert client.portal.call(post_together) == [200] * 4
    spans = exporter.get_finished_spans()
    requests = _named(spans, "POST /v2/models/{model_name}/infer")
    assert sorted(_trace_hex(s) for s in requests) == sorted(
        _traceparent(n)[3:35] for n in range(1, 5)
    )
    batches = _named(spans, "batch tiny")
    request_ids = {s.context.span_id for s in requests if s.context is not None}
    linked = [{link.context.span_id for link in b.links} for b in batches]
    # Every request is linked from exactly one batch, and some batch served several.
    assert sorted(i for ids in linked for i in ids) == sorted(request_ids)
    assert max(len(ids) for ids in linked) > 1, linked
    for batch in batches:
        assert batch.attributes is not None
        assert batch.attributes["normserve.batch.requests"] == len(batch.links)


def test_errors_on_the_spans(traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    exporter.clear()
    # A client's error is not the server's: status unset. A missing model is a 404.
    assert client.post("/v2/models/absent/infer", json=_infer_body()).status_code == 404
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.UNSET
    assert span.parent is None  # no traceparent: a new trace
    exporter.clear()
    # An inference that fails inside onnxruntime: the batch and the request are errors.
    failing = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [BAD_INDEX]}]}
    assert client.post("/v2/models/faulty/infer", json=failing).status_code == 500
    spans = exporter.get_finished_spans()
    (request,) = _named(spans, "POST /v2/models/{model_name}/infer")
    (batch,) = _named(spans, "batch faulty")
    assert request.status.status_code == batch.status.status_code == StatusCode.ERROR
    assert [event.name for event in batch.events] == ["exception"]


def test_tracing_is_off_without_an_endpoint() -> None:
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318"})
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert not tracing_requested({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not tracing_requested({**endpoint, "OTEL_TRACES_EXPORTER": "none"})


def test_off_loads_no_opentelemetry(tmp_path: Path) -> None:
    """Serving a request with tracing off imports nothing of OpenTelemetry."""
    repository = tiny_repository(tmp_path)
    code = f"""
import sys
from starlette.testclient import TestClient
from service.app import create_app
from service.settings import Settings
with TestClient(create_app(Settings(repository={str(repository)!r}))) as client:
    body = {_infer_body()!r}
    assert client.post("/v2/models/tiny/infer", json=body).status_code == 200
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**env, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP traces receiver: keeps each decoded export request."""

    received: list[Any]

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        type(self).received.append((self.path, message))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_are_exported_over_otlp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="no OTLP exporter")
    _Receiver.received = []
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.server_address[1]}"
        )
        monkeypatch.setenv("OTEL_SERVICE_NAME", "normserve-under-test")
        with running_server(tiny_repository(tmp_path), tmp_path, grpc=True) as server:
            response = httpx.post(
                f"{server.http_url}/v2/models/tiny/infer",
                json=_infer_body(),
                headers={"traceparent": _traceparent(9)},
            )
            assert response.status_code == 200
            _grpc_infer(server.grpc_url, _traceparent(10))
        # The server flushes its spans at shutdown (SIGTERM), before it exits.
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert {path for path, _ in _Receiver.received} == {"/v1/traces"}
    received = []
    for _, message in _Receiver.received:
        for resource_spans in message.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert attributes["service.name"] == "normserve-under-test"
            for scope in resource_spans.scope_spans:
                received += scope.spans
    # Over HTTP and over gRPC (traceparent as metadata), the same three spans.
    for name, n in (("POST /v2/models/{model_name}/infer", 9),
                    ("inference.GRPCInferenceService/ModelInfer", 10)):  # fmt: skip
        (request,) = [span for span in received if span.name == name]
        assert request.trace_id.hex() == _traceparent(n)[3:35]
        assert request.parent_span_id.hex() == CALLER_SPAN
        (queue,) = [span for span in received if span.parent_span_id == request.span_id]
        assert queue.name == "queue"
        batches = [span for span in received if span.name == "batch tiny"]
        assert [[link.span_id for link in b.links] for b in batches].count([request.span_id]) == 1


def _grpc_infer(url: str, traceparent: str) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] missing")
    client = grpcclient.InferenceServerClient(url=url)
    try:
        x = grpcclient.InferInput("x", [1, FEATURES], "FP32")
        x.set_data_from_numpy(np.arange(FEATURES, dtype=np.float32)[None])
        result = client.infer("tiny", [x], headers={"traceparent": traceparent})
        assert result.as_numpy("scores").shape == (1, 3)
    finally:
        client.close()
