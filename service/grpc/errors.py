"""The one map from domain errors (service.errors) to gRPC status codes.

The code says who must act: INVALID_ARGUMENT and NOT_FOUND the client, UNAVAILABLE "retry
later" (a full queue carries ``grpc-retry-pushback-ms``, which gRPC's retry policy honours,
as HTTP's 503 carries Retry-After), DEADLINE_EXCEEDED the deadline, INTERNAL the server,
with "internal error" as its only detail (the traceback goes to the log).
"""

from __future__ import annotations

import grpc

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
)

# Order matters: subclasses before their bases.
CODES: list[tuple[type[NormserveError], grpc.StatusCode]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceNotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # Triton's code for a full queue; gRPC clients retry UNAVAILABLE by policy.
    (Overloaded, grpc.StatusCode.UNAVAILABLE),
    (ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InferenceFailed, grpc.StatusCode.INTERNAL),
    (ClientDisconnected, grpc.StatusCode.CANCELLED),
]
INTERNAL_DETAIL = "internal error"


def code_for(exc: NormserveError) -> grpc.StatusCode:
    return next((code for kind, code in CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


def trailers_for(exc: NormserveError) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, Overloaded):
        return (("grpc-retry-pushback-ms", str(max(1, round(exc.retry_after_s * 1000)))),)
    return ()
