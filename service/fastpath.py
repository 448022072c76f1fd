"""Inference and health requests answered in plain ASGI, without the framework.

Profiled under load (py-spy, CIFAR CNN, 64 connections), FastAPI's routing, dependency
solving and middleware took about half of the event loop's time per inference request, and
Starlette's Request/Response objects (header parsing into ``Headers``, the response's
header list) another ~15% of what was left. Inference needs none of it: this layer reads
the two headers it uses from the ASGI scope, reads the body from ``receive``, calls the same
``infer_payload`` / ``predict_payload`` (service.inference) the documented routes call, and
sends the answer as two ASGI messages. The two health checks are answered here too, so a
server is live and ready as soon as its models are, before FastAPI is loaded (service.app).
Every other request goes on to FastAPI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from service.codec import error_body
from service.errors import NormserveError
from service.inference import HEADER_LENGTH, infer_payload, predict_payload
from service.store import ModelStore

log = logging.getLogger("normserve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]
# An error as (status, message, extra headers): the application's one map of errors.
ErrorMap = Callable[[NormserveError], tuple[int, str, dict[str, str]]]

# The path segments FastAPI's {model_name} and {version} match: anything but "/".
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
PREDICT_PATH = re.compile(r"/v1/models/([^/]+):predict")

JSON = b"application/json"
_HEADER_LENGTH = HEADER_LENGTH.encode()
LIVE, READY = "/v2/health/live", "/v2/health/ready"


@dataclass(frozen=True, slots=True)
class Route:
    protocol: str  # "v2" | "v1": the metrics label; "health" for the two health checks
    model: str
    version: str | None = None

    @property
    def inference(self) -> bool:
        return self.protocol != "health"


_HEALTH = {LIVE: Route("health", "live"), READY: Route("health", "ready")}


def route_of(scope: Scope) -> Route | None:
    """The request ``scope`` is, if answered here; None for anything the framework answers."""
    if scope["type"] != "http":
        return None
    path: str = scope["path"]
    method: str = scope["method"]
    if method == "GET":
        return _HEALTH.get(path)
    if method != "POST":
        return None
    if path.endswith("/infer"):
        match = INFER_PATH.fullmatch(path)
        return Route("v2", match[1], match[2]) if match else None
    if path.endswith(":predict"):
        match = PREDICT_PATH.fullmatch(path)
        return Route("v1", match[1]) if match else None
    return None


class InferFastPath:
    def __init__(self, store: ModelStore, errors: ErrorMap) -> None:
        self.store = store
        self.errors = errors

    async def answer(
        self, route: Route, scope: Scope, receive: Receive, send: Send, request_id: bytes
    ) -> int:
        """Answers the request; returns the status sent."""
        if not route.inference:
            return await self._health(route, send, request_id)
        content_length = header_length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = value.decode("latin-1")
            elif name == _HEADER_LENGTH:
                header_length = value.decode("latin-1")
        headers: RawHeaders
        try:
            if route.protocol == "v2":
                payload, extra = await infer_payload(
                    self.store, route.model, route.version, receive, content_length, header_length
                )
                headers = [(k.lower().encode(), v.encode()) for k, v in extra.items()]
            else:
                payload = await predict_payload(self.store, route.model, receive, content_length)
                headers = [(b"content-type", JSON)]
            status = 200
        except NormserveError as exc:
            status, message, extra = self.errors(exc)
            payload = error_body(message)
            headers = [(b"content-type", JSON)]
            headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            status, payload, headers = 500, error_body("internal error"), [(b"content-type", JSON)]
        await _respond(send, status, payload, headers, request_id)
        return status

    async def _health(self, route: Route, send: Send, request_id: bytes) -> int:
        # What the documented routes in service.v2 answer (they are there for OpenAPI).
        if route.model == "live":
            status, payload = 200, b'{"live":true}'
        else:
            ready = self.store.ready
            status, payload = (200 if ready else 503), orjson.dumps({"ready": ready})
        await _respond(send, status, payload, [(b"content-type", JSON)], request_id)
        return status


async def _respond(
    send: Send, status: int, payload: bytes, headers: RawHeaders, request_id: bytes
) -> None:
    headers.append((b"content-length", str(len(payload)).encode()))
    headers.append((b"x-request-id", request_id))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
