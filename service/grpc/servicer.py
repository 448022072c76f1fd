"""``inference.GRPCInferenceService``: each RPC translates to a ``Protocol`` call and back.

Nothing here decides anything the HTTP routes decide too: the protocol handlers answer, the
REST codec's checks validate (service.grpc.tensors), service.grpc.errors maps the domain
errors to status codes. What is gRPC's own: the message types, the client's deadline
(``time_remaining``), and ModelStreamInfer, where each request gets its own answer or its own
``error_message`` and the stream stays open (Triton's behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from service.errors import (
    DeadlineExceeded,
    ModelNotFound,
    ModelNotReady,
    NormserveError,
)
from service.grpc.errors import INTERNAL_DETAIL, code_for, trailers_for
from service.grpc.generated import grpc_service_pb2 as pb
from service.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from service.grpc.tensors import decode_request, encode_response
from service.operations.access import MAX_ID_BYTES, log_access, new_request_id
from service.operations.logs import current_request_id
from service.protocol.handlers import Protocol, load_config
from service.protocol.request_limits import Limits

if TYPE_CHECKING:  # imports OpenTelemetry: only ever loaded when tracing is on
    from service.operations.otel import RequestTrace, Tracing

log = logging.getLogger("normserve")

SERVICE = "inference.GRPCInferenceService"
METRICS_PROTOCOL = "grpc"  # the `protocol` label of the request metrics, beside "v2" and "v1"
# Requests of one stream being worked on at once: they are answered in order, so a slow one
# holds back those behind it, but up to this many go to the batcher together.
STREAM_WINDOW = 64
_OK = "OK"
_INFER_PATH = f"/{SERVICE}/ModelInfer"
_STREAM_PATH = f"/{SERVICE}/ModelStreamInfer"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        protocol: Protocol,
        limits: Limits,
        access_log: bool,
        tracing: Tracing | None = None,
    ) -> None:
        self.protocol = protocol
        self.limits = limits
        self.access_log = access_log
        self.tracing = tracing

    # ----------------------------------------------------------------- health and metadata

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return await self._answer(
            context, "ServerLive", lambda: pb.ServerLiveResponse(live=self.protocol.live())
        )

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return await self._answer(
            context, "ServerReady", lambda: pb.ServerReadyResponse(ready=self.protocol.ready())
        )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            try:
                self.protocol.model_ready(request.name, request.version or None)
            except (ModelNotFound, ModelNotReady):
                # Triton answers "not ready" rather than an error: tritonclient's
                # is_model_ready() returns False for a model it cannot serve.
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._answer(context, "ModelReady", answer)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return await self._answer(
            context,
            "ServerMetadata",
            lambda: pb.ServerMetadataResponse(**self.protocol.server_metadata()),
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return await self._answer(
            context,
            "ModelMetadata",
            lambda: _message(
                pb.ModelMetadataResponse,
                self.protocol.model_metadata(request.name, request.version or None),
            ),
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return await self._answer(
            context,
            "ModelConfig",
            lambda: _message(
                pb.ModelConfigResponse,
                {"config": self.protocol.model_config(request.name, request.version or None)},
            ),
        )

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        return await self._answer(
            context,
            "ModelStatistics",
            lambda: _message(
                pb.ModelStatisticsResponse,
                self.protocol.model_stats(request.name or None, request.version or None),
            ),
        )

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            index = self.protocol.repository_index()
            if request.ready:  # Triton: only the models that are ready
                index = [entry for entry in index if entry["state"] == "READY"]
            return _message(pb.RepositoryIndexResponse, {"models": index})

        return await self._answer(context, "RepositoryIndex", answer)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def answer() -> Any:
            name = request.model_name
            parameters = {
                key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
                for key, value in request.parameters.items()
            }
            await self.protocol.load_model(name, load_config(name, parameters))
            return pb.RepositoryModelLoadResponse()

        return await self._answer_async(context, "RepositoryModelLoad", answer)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def answer() -> Any:
            # Triton's unload_dependents parameter has nothing to act on (no ensembles).
            await self.protocol.unload_model(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._answer_async(context, "RepositoryModelUnload", answer)

    # ----------------------------------------------------------------- inference

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        status = _OK
        trace = self._begin(context, "ModelInfer", request.model_name)
        try:
            return await self._infer(request, context.time_remaining())
        except NormserveError as exc:
            status = code_for(exc).name
            await context.abort(code_for(exc), str(exc), trailers_for(exc))
        except asyncio.CancelledError:
            # The client cancelled or its deadline passed (gRPC cancels the handler): the
            # batcher skips the cancelled future, so the request costs no inference.
            status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception:
            log.exception("unhandled error in ModelInfer")
            status = grpc.StatusCode.INTERNAL.name
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAIL)
        finally:
            self._observe(context, _INFER_PATH, request, status, started)
            if trace is not None:
                _end_trace(trace, status)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Requests are read and queued as they come (up to STREAM_WINDOW at once) and
        answered in the order they came; a failed one gets ``error_message`` and the stream
        goes on."""
        pending: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._stream_one(request, context)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await pending.get()) is not None:
                yield await answer
            await reader  # re-raises what ended the reading, if anything did
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()

    async def _stream_one(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        status = _OK
        trace = self._begin(context, "ModelStreamInfer", request.model_name)
        try:
            response = await self._infer(request, context.time_remaining())
            return pb.ModelStreamInferResponse(infer_response=response)
        except NormserveError as exc:
            status = code_for(exc).name
            return pb.ModelStreamInferResponse(error_message=str(exc))
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception:
            log.exception("unhandled error in ModelStreamInfer")
            status = grpc.StatusCode.INTERNAL.name
            return pb.ModelStreamInferResponse(error_message=INTERNAL_DETAIL)
        finally:
            self._observe(context, _STREAM_PATH, request, status, started)
            if trace is not None:
                _end_trace(trace, status)

    async def _infer(self, request: Any, remaining_s: float | None) -> Any:
        # Cheapest first, as on HTTP: the model and room in its queue, then the declarations,
        # then the data.
        served = self.protocol.admit(request.model_name, request.model_version or None)
        decoding = time.perf_counter()
        decoded = decode_request(request, self.limits, served.model.signature.check_declared)
        decode_seconds = time.perf_counter() - decoding
        timeout_ms = decoded.timeout_ms
        if remaining_s is not None:
            # The client's gRPC deadline bounds the wait too: past it, nobody reads the answer.
            if remaining_s <= 0:
                raise DeadlineExceeded("the call's deadline passed before its inference ran")
            remaining_ms = remaining_s * 1000
            timeout_ms = remaining_ms if timeout_ms is None else min(timeout_ms, remaining_ms)
        outputs = await self.protocol.submit(served, decoded.inputs, timeout_ms, decoded.outputs)
        encoding = time.perf_counter()
        response = encode_response(served.config.name, served.version, decoded, outputs)
        # Triton's compute_input / compute_output include the request's own decode and encode,
        # as on HTTP (service.front.routes_v2).
        self.protocol.metrics.on_codec(
            served.config.name, served.version, decode_seconds, time.perf_counter() - encoding
        )
        return response

    # ----------------------------------------------------------------- shared

    async def _answer(self, context: Any, method: str, answer: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return answer()

        return await self._answer_async(context, method, call)

    async def _answer_async(
        self, context: Any, method: str, answer: Callable[[], Awaitable[Any]]
    ) -> Any:
        """``answer()``'s message, or the call aborted with the code of its error; logged."""
        started = time.perf_counter()
        status = _OK
        try:
            return await answer()
        except NormserveError as exc:
            status = code_for(exc).name
            await context.abort(code_for(exc), str(exc), trailers_for(exc))
        except Exception:
            log.exception("unhandled error in %s", method)
            status = grpc.StatusCode.INTERNAL.name
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAIL)
        finally:
            self._log(context, f"/{SERVICE}/{method}", status, started)

    def _observe(self, context: Any, path: str, request: Any, status: str, started: float) -> None:
        seconds = time.perf_counter() - started
        store = self.protocol.store
        label, counted = store.counted_as(request.model_name, request.model_version or None)
        self.protocol.metrics.on_request(
            label, METRICS_PROTOCOL, status, seconds, counted is not None, counted or ""
        )
        if self.access_log:
            self._log(context, path, status, started, seconds)

    def _begin(self, context: Any, method: str, model: str) -> RequestTrace | None:
        """For an inference in its own task: the request id its log lines carry, and its
        trace (a child of the caller's ``traceparent`` metadata) when tracing is on."""
        metadata = {
            key: value if isinstance(value, str) else value.decode("latin-1")
            for key, value in context.invocation_metadata() or ()
        }
        given = metadata.get("x-request-id", "").encode("latin-1")[:MAX_ID_BYTES]
        current_request_id.set(given or new_request_id())
        if self.tracing is None:
            return None
        return self.tracing.begin(
            f"{SERVICE}/{method}",
            metadata,
            {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method,
             "normserve.model": model},
        )  # fmt: skip

    def _log(
        self,
        context: Any,
        path: str,
        status: str,
        started: float,
        seconds: float | None = None,
    ) -> None:
        if not self.access_log:
            return
        request_id = b""
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id":
                request_id = (value if isinstance(value, bytes) else value.encode())[:MAX_ID_BYTES]
                break
        log_access(
            request_id or new_request_id(),
            "GRPC",
            path,
            status,
            time.perf_counter() - started if seconds is None else seconds,
            context.peer() or "",
        )


def _end_trace(trace: RequestTrace, status: str) -> None:
    # As on HTTP, only the server's failures mark the span as failed.
    server_side = status in _SERVER_SIDE
    trace.end({"rpc.grpc.status_code": status}, error=status if server_side else None)


_SERVER_SIDE = {grpc.StatusCode.INTERNAL.name, grpc.StatusCode.UNAVAILABLE.name}


def _message(kind: Any, document: dict[str, Any]) -> Any:
    """A response message from the protocol's JSON-shaped answer (same field names);
    fields gRPC lacks (metadata's parameters) are left out."""
    return json_format.ParseDict(document, kind(), ignore_unknown_fields=True)
