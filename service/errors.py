"""Domain errors: what went wrong, in words safe to show a client, and nothing about HTTP.

Each transport maps them once: HTTP in service.front.errors, gRPC in its own module."""

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


class UnsupportedEncoding(NormserveError):
    """The request body's content coding is not one the service decodes (HTTP 415)."""


class PayloadTooLarge(NormserveError):
    """The request body exceeds the configured limit (HTTP 413)."""


class ClientDisconnected(NormserveError):
    """The client went away before its answer; nobody reads the response (logged as 499)."""


class ControlDisabled(ModelNotReady):
    """Load/unload asked of a server whose model control mode is not explicit; answered as
    Triton does (HTTP 503, gRPC UNAVAILABLE), so it maps as ModelNotReady."""


class InferenceFailed(NormserveError):
    """The model's runtime failed on this request (HTTP 500, gRPC INTERNAL). The runtime's
    own error, which can name files and internals, goes to the server's log, logged once."""
