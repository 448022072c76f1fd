"""``python -m service [--repository DIR] [--host H] [--port P] [--workers N] ...``

Flags override ``NORMSERVE_*`` environment variables, which override the defaults. Invalid
settings stop the server before it binds, with a message that says what to change.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import collector

if TYPE_CHECKING:
    from service.operations.logs import LogFormat
    from service.settings import Settings

# Everything else (pydantic and the settings, uvicorn, the app, onnxruntime behind it) is
# imported in main(), after the garbage collector is held (service.collector); and the
# process that decodes large bodies (service.front.decoding) starts by importing this module
# as its __main__, and needs none of them.


# Flags that may be repeated (their values are joined with commas).
REPEATABLE = {"load_model"}
# No route is a WebSocket, and the image installs no WebSocket library, so uvicorn serves an
# upgrade request as plain HTTP there. Said here, every install behaves as the image does and
# uvicorn does not import a WebSocket library at start (~10 ms where one is installed).
NO_WEBSOCKETS = "none"


def main(argv: Sequence[str] | None = None) -> int:
    collector.hold()  # until the app has started (service.app resumes it)
    try:
        return _serve(argv)
    finally:
        collector.release()  # when it never got that far (invalid settings, say)


def _serve(argv: Sequence[str] | None) -> int:
    from pydantic import ValidationError

    from service.errors import RepositoryError
    from service.operations.logs import configure as configure_logging
    from service.operations.logs import emit_error, log_config
    from service.repository import list_models, scan_repository
    from service.settings import Settings

    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a model repository over the Open Inference Protocol and V1 JSON.",
    )
    # One flag per Settings field, so flags, variables and defaults never drift apart;
    # pydantic parses and validates the strings exactly as it does the environment's.
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=name.upper(),
            help=f"{field.description} (env NORMSERVE_{name.upper()}, default {field.default})",
            # Triton's --load-model may be given several times; joined with commas below.
            action="append" if name in REPEATABLE else "store",
        )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        k: ",".join(v) if k in REPEATABLE else v for k, v in vars(args).items() if v is not None
    }
    try:
        settings = Settings(**overrides)
        # Fail now, not in a worker, when the repository is unusable (or, with strict_models,
        # when any model in it is).
        (list_models if settings.strict_models else scan_repository)(settings.repository)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        print(
            emit_error(_requested_format(overrides), f"invalid settings: {problems}"),
            file=sys.stderr,
        )
        return 2
    except RepositoryError as exc:
        print(emit_error(settings.log_format, str(exc)), file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    import uvicorn

    from service.front.limits import GuardedHttpProtocol, configure

    configure(settings)  # raises the open-file limit here, so worker processes inherit it
    if settings.workers == 1:
        from service.app import create_app

        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so the process dies by
        # the signal (status 143). The shutdown was clean, so exit 0, as Triton does: a no-op
        # handler absorbs the re-raised signal and main() returns normally.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=log_config(settings.log_format, settings.log_level),
            access_log=False,  # the app writes its own access log
            http=GuardedHttpProtocol,  # header size, timeouts, connection cap
            ws=NO_WEBSOCKETS,
            timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
        )
    else:
        # This process only supervises the workers, which rebuild Settings from the
        # environment and build their app, models and threads themselves.
        _export_environment(settings)
        with _shared_metrics_directory():
            _fork_workers()  # after the directory is set: prometheus-client reads it at import
            uvicorn.run(
                "service.app:app_from_environment",
                factory=True,
                host=settings.host,
                port=settings.port,
                workers=settings.workers,
                log_level=settings.log_level,
                # Applied again in each worker process: the workers' lines are formatted alike.
                log_config=log_config(settings.log_format, settings.log_level),
                access_log=False,
                http=GuardedHttpProtocol,
                ws=NO_WEBSOCKETS,
                timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
            )
    return 0


def _fork_workers() -> None:
    """Workers forked from this process once it has imported the server, instead of
    uvicorn's default: fresh interpreters (multiprocessing's spawn) that import everything
    again, ~0.5 s of CPU each, all at once.

    Forking is safe at this point: no model is loaded and no session, event loop or thread
    pool of ours exists yet (each worker makes its own after the fork; onnxruntime and numpy
    were checked to work in a child forked after their import). What the imports built is
    frozen out of the collector first, so its passes in the workers do not copy those pages,
    and each worker holds the collector until its app has started (service.collector).
    uvicorn names the context it starts workers with in ``uvicorn._subprocess.spawn``
    (pyproject.toml bounds uvicorn's version; tests/service/test_operations.py proves the
    workers are forked); where it does not, its spawned workers serve as before.
    """
    import multiprocessing

    from uvicorn import _subprocess

    import service.app  # noqa: F401  # what the workers inherit instead of importing

    collector.started()
    os.register_at_fork(after_in_child=collector.hold)
    if hasattr(_subprocess, "spawn"):
        _subprocess.spawn = multiprocessing.get_context("fork")  # type: ignore[assignment]


@contextlib.contextmanager
def _shared_metrics_directory() -> Iterator[None]:
    """Where the workers' metric files go (see service.operations.metrics), set before they
    start.

    A directory given in PROMETHEUS_MULTIPROC_DIR is used, emptied of an earlier run's files
    first (prometheus-client's rule); otherwise a private one is made and removed at exit.
    """
    from service.operations import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="normserve-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)


def _requested_format(overrides: dict[str, str]) -> LogFormat:
    """The log format asked for, when the settings as a whole were refused: a refusal is
    written in the format the operator's log shipper expects where that much is clear."""
    asked = overrides.get("log_format") or os.environ.get("NORMSERVE_LOG_FORMAT", "")
    return "json" if asked.strip().lower() == "json" else "text"


def _export_environment(settings: Settings) -> None:
    for name, value in settings.model_dump().items():
        if value is not None:
            os.environ[f"NORMSERVE_{name.upper()}"] = str(value)


if __name__ == "__main__":
    sys.exit(main())
