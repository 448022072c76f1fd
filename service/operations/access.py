"""Request ids and the access log: one line per HTTP request or gRPC call (method "GRPC",
the RPC's path, its status code's name).

The request's fields travel as the record's ``extra``: the JSON log format
(service.operations.logs) makes them top-level fields of the line, the text one shows the
message.
"""

from __future__ import annotations

import itertools
import logging
import secrets

access_log = logging.getLogger("normserve.access")

# Request ids need to be unique, not secret: a random prefix per process and a counter cost
# a fraction of uuid4() (3% of the loop's time under load), and uvicorn's worker processes
# each import this module, so each draws its own prefix.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)
MAX_ID_BYTES = 128


def new_request_id() -> bytes:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}".encode()


def log_access(
    request_id: bytes, method: str, path: str, status: int | str, seconds: float, client: str
) -> None:
    """One line per answered request. The id is passed, not taken from the log context: a
    request refused at headers-complete (service.front.limits) has no task of its own.

    The record is made here and handed to the logger's handlers directly: ``Logger.info``
    would also walk the stack for the caller's file and line (which no format shows), and
    that walk was a quarter of the line's cost. The handler writes a loop iteration's lines
    at once (service.operations.logs.LineBatchingHandler).
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    ms = round(seconds * 1000, 3)
    record = access_log.makeRecord(
        _NAME,
        logging.INFO,
        __file__,
        0,
        "%s %s %s %.3f ms %s",
        (method, path, status, ms, client),
        None,
        extra={
            "request_id": request_id.decode("latin-1"),
            "method": method,
            "path": path,
            "status": status,
            "ms": ms,
            "client": client,
        },
    )
    access_log.handle(record)


_NAME = access_log.name
