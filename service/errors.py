"""Domain errors, and the one map from each to an HTTP status (``error_parts``): the
inference fast path and the FastAPI handlers both answer through it."""

from __future__ import annotations


class NormserveError(Exception):
    """Base of every error the service raises on purpose; the message is safe to show."""


class RepositoryError(NormserveError, ValueError):
    """The model repository is malformed: a config that does not validate, a missing file."""


class IntegrityError(RepositoryError):
    """A model file's sha256 differs from the one recorded at export."""


class InvalidInput(NormserveError):
    """The request is malformed or does not fit the model's signature (HTTP 400)."""


class ModelNotFound(NormserveError):
    """No such model or version in the repository (HTTP 404)."""


class ResourceNotFound(NormserveError):
    """No such page file, data file or report plot (HTTP 404); the message says how to make it."""


class ModelNotReady(NormserveError):
    """The model exists but is not loaded or failed to load (HTTP 503)."""


class Overloaded(NormserveError):
    """The model's queue is full; the client should retry later (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(NormserveError):
    """The request's timeout passed before its inference could run (HTTP 504)."""


class PayloadTooLarge(NormserveError):
    """The request body exceeds the configured limit (HTTP 413)."""


class ClientDisconnected(NormserveError):
    """The client went away before its answer; nobody reads the response (logged as 499)."""


# Order matters: subclasses before their bases.
STATUS: list[tuple[type[NormserveError], int]] = [
    (InvalidInput, 400),
    (ModelNotFound, 404),
    (ResourceNotFound, 404),
    (PayloadTooLarge, 413),
    (Overloaded, 503),
    (ModelNotReady, 503),
    (DeadlineExceeded, 504),
    # nginx's convention for 'client closed request': only the access log ever sees it.
    (ClientDisconnected, 499),
]


def status_for(exc: NormserveError) -> int:
    return next((status for kind, status in STATUS if isinstance(exc, kind)), 500)


def error_parts(exc: NormserveError) -> tuple[int, str, dict[str, str]]:
    """Status, message and extra headers for a domain error."""
    headers = {}
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    return status_for(exc), str(exc), headers
