"""The one map from domain errors to gRPC status codes (service.grpc.errors), case by case:
each domain error the service raises gets the code that says who must act."""

from __future__ import annotations

import grpc
import pytest

from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NormserveError,
    Overloaded,
    PayloadTooLarge,
    RepositoryError,
    ResourceNotFound,
)
from service.grpc.errors import code_for, trailers_for

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("x"), Code.INVALID_ARGUMENT),
        (ModelNotFound("x"), Code.NOT_FOUND),
        (ResourceNotFound("x"), Code.NOT_FOUND),
        (PayloadTooLarge("x"), Code.RESOURCE_EXHAUSTED),
        (Overloaded("x"), Code.UNAVAILABLE),
        (ModelNotReady("x"), Code.UNAVAILABLE),
        (DeadlineExceeded("x"), Code.DEADLINE_EXCEEDED),
        (ClientDisconnected("x"), Code.CANCELLED),
        # Not a request's fault and not mapped: the server's problem.
        (RepositoryError("x"), Code.INTERNAL),
        (NormserveError("x"), Code.INTERNAL),
    ],
)
def test_code_for(error: NormserveError, code: Code) -> None:
    assert code_for(error) == code


def test_a_full_queue_tells_the_client_when_to_retry() -> None:
    assert trailers_for(Overloaded("full", retry_after_s=2.5)) == (
        ("grpc-retry-pushback-ms", "2500"),
    )
    assert trailers_for(Overloaded("full", retry_after_s=0.0)) == (("grpc-retry-pushback-ms", "1"),)
    assert trailers_for(InvalidInput("bad")) == ()
