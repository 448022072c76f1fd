"""The one map from errors to HTTP answers: status, JSON body, headers.

Every non-2xx answer of this server is ``{"error": "<message>"}`` (what V2 clients decode),
built here: domain errors with their own message, routing misses (404, 405), and anything
unexpected as a 500 whose body says only "internal error" (the traceback goes to the log).
"""

from __future__ import annotations

import orjson

from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NormserveError,
    Overloaded,
    PayloadTooLarge,
    ResourceNotFound,
    UnsupportedEncoding,
)
from service.front.asgi import JSON, Response

# Order matters: subclasses before their bases.
STATUS: list[tuple[type[NormserveError], int]] = [
    (InvalidInput, 400),
    (ModelNotFound, 404),
    (ResourceNotFound, 404),
    (PayloadTooLarge, 413),
    (UnsupportedEncoding, 415),
    (Overloaded, 503),
    (ModelNotReady, 503),
    (DeadlineExceeded, 504),
    (InferenceFailed, 500),
    # nginx's convention for 'client closed request': only the access log ever sees it.
    (ClientDisconnected, 499),
]


def error_body(message: str) -> bytes:
    """The body of every non-200 answer: the client looks for an "error" key."""
    return orjson.dumps({"error": message})


def error_response(
    status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return Response(status, error_body(message), [(b"content-type", JSON), *(headers or [])])


def status_for(exc: NormserveError) -> int:
    return next((status for kind, status in STATUS if isinstance(exc, kind)), 500)


def domain_error_response(exc: NormserveError) -> Response:
    headers = []
    if isinstance(exc, Overloaded):
        headers.append((b"retry-after", str(max(1, round(exc.retry_after_s))).encode()))
    if isinstance(exc, PayloadTooLarge):
        # The rest of the body is not read: the connection cannot carry another request.
        headers.append((b"connection", b"close"))
    return error_response(status_for(exc), str(exc), headers)


def internal_error_response() -> Response:
    return error_response(500, "internal error")
