"""The server's log format: JSON lines for log shippers, or text for people.

One ``logging.config.dictConfig`` dictionary (``log_config``) configures every logger of the
process, the app's and uvicorn's alike: it is applied in ``python -m service`` and handed to
uvicorn as its ``log_config``, which uvicorn applies again in each worker process. So every
line, whoever writes it, goes through one of the two formatters below.

The formatters are the stdlib's ``logging.Formatter`` pattern with orjson (already a serving
dependency) doing the encoding: about forty lines, where a JSON-logging library would add a
dependency for the same ``format(record)``.

``json``: one object per line with ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``message``, ``request_id`` when the line was written while serving a request, the fields a
caller passed with ``extra=`` (the access log's method, path, status, ms, client) as top-level
fields, and ``traceback`` for an exception.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

LogFormat = Literal["json", "text"]

# The request being served by the current task: the HTTP dispatcher (and any other
# transport) sets it, so that a line written anywhere below carries the request id without
# every call passing it on. Each request runs in its own task, hence its own context.
current_request_id: ContextVar[bytes | None] = ContextVar("normserve_request_id", default=None)

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# uvicorn passes a coloured copy of its message for its own formatter: not a field.
_DROPPED = frozenset({"color_message"})


def _current_id() -> str | None:
    request_id = current_request_id.get()
    return None if request_id is None else request_id.decode("latin-1")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _current_id()
        if request_id is not None:  # an explicit extra request_id (below) wins
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _DROPPED:
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field orjson cannot encode (a Path, an exception) is still
        # logged, as its text, instead of losing the line.
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """Time, level, logger and message; the request id in brackets when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None) or _current_id()
        return line if request_id is None else f"{line} [{request_id}]"


FORMATTERS: dict[str, type[logging.Formatter]] = {"json": JsonFormatter, "text": TextFormatter}


class LineBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, written once per event-loop iteration instead of once per line.

    Under load the access log is a line per request, and a write (and flush) per line was
    most of its cost; lines emitted on a thread running an event loop are kept until the
    loop's next iteration and written together, in order. Elsewhere (start-up, the batcher's
    threads, shutdown) a line is written at once, after any still kept, so nothing is
    reordered; ``logging.shutdown`` flushes what is left at exit.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._kept: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle), as flush() takes it too.
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        kept = self._kept
        kept.append(line)
        if loop is None:
            self._write()
        elif len(kept) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            if self._kept:
                self._write()
        finally:
            self.release()

    def _write(self) -> None:
        lines, self._kept = self._kept, []
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except Exception:  # a closed or broken stderr must not fail the request
            self.handleError(logging.makeLogRecord({"msg": "log write failed"}))


def log_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """The dictConfig for the whole process: one stderr handler on the root logger, and
    uvicorn's loggers emptied of their own handlers so that they propagate to it."""
    level = level.upper()
    uvicorn_logger = {"handlers": [], "propagate": True, "level": level}
    return {
        "version": 1,
        # Loggers created at import time (the app's modules) must keep working.
        "disable_existing_loggers": False,
        "formatters": {"normserve": {"()": FORMATTERS[log_format]}},
        "handlers": {
            "stderr": {
                "()": LineBatchingHandler,
                "formatter": "normserve",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": uvicorn_logger,
            "uvicorn.error": uvicorn_logger,
            "uvicorn.access": uvicorn_logger,
        },
    }


def configure(log_format: LogFormat, level: str) -> None:
    """Applies ``log_config`` to this process, warnings included (uvicorn gets a fresh copy of
    the dictionary: dictConfig consumes parts of the one it applies)."""
    import logging.config

    logging.config.dictConfig(log_config(log_format, level))
    logging.captureWarnings(True)  # warnings.warn lines become log records like the others


def emit_error(log_format: LogFormat, message: str) -> str:
    """A start-up error line before logging is configured: ``error: ...`` as text, or one JSON
    object like every other line."""
    if log_format == "text":
        return f"error: {message}"
    record = logging.makeLogRecord(
        {"name": "normserve", "levelno": logging.ERROR, "levelname": "ERROR", "msg": message}
    )
    return JsonFormatter().format(record)
