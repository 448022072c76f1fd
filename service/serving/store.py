"""The served model versions: one OnnxModel and one Batcher per version, and inference.

What is served changes only through ``install`` and ``retire`` (service.serving.control
decides when: at start-up, on the load/unload API, on a repository poll). Both replace the
lookup dicts whole, so a request sees either the old set of versions or the new one, and
the hot path (``admit``/``submit``) stays a few dict lookups with no lock.

A retired version is no longer found by new requests but keeps running until it drains:
requests that hold a place in its queue from before the swap (``hold``: still reading or
decoding their body) and requests already queued finish on it; then its batcher stops and
the session is released.

A model that fails to load (bad config, a path leaving the repository, sha256 mismatch,
onnxruntime refusal, a failed warm-up) is kept with its reason: the others are served, the
server reports not ready (strict readiness, as Triton's default), and requests to the
broken model get 503 with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NormserveError,
    RepositoryError,
)
from service.repository import MODEL_NAME, ModelConfig, ModelVersion, verified_file
from service.serving.batcher import Batcher, BatchRecord
from service.serving.runtime import OnnxModel, SessionOptions
from service.settings import Settings

log = logging.getLogger("normserve.store")

# How often a draining version checks whether its held places have been taken.
_DRAIN_POLL_S = 0.01


@dataclass(eq=False)
class Served:
    model: OnnxModel
    batcher: Batcher

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def version(self) -> str:
        return str(self.model.version.version)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until every place held in this instance's queue (a
        request admitted, its body still being read or decoded) is taken or given back,
        then finish the queue and stop the batcher."""
        deadline = time.perf_counter() + timeout_s
        while self.batcher.held > 0 and time.perf_counter() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self.batcher.held > 0:
            log.warning(
                "model '%s' version %s: %d admitted request(s) not queued within %.0f s; "
                "stopping it anyway",
                self.config.name,
                self.version,
                self.batcher.held,
                timeout_s,
            )
        await self.batcher.stop()


@dataclass
class Place:
    """A request's place in its model's queue, held from admission (before its body is read)
    until the request is queued or given up: used as a context manager, it is given back on
    exit unless ``ModelStore.submit`` took it."""

    served: Served
    held: bool = True

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.held = False
            self.served.batcher.release()


class ModelStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # name -> the highest served version (what unversioned requests get).
        self.served: dict[str, Served] = {}
        # name -> version -> instance, every served version.
        self.versions: dict[str, dict[str, Served]] = {}
        # name -> why it is not served (it was asked to be and could not).
        self.failed: dict[str, str] = {}
        # Every name ever served or failed here (repository folder names only: bounded).
        self.known: set[str] = set()
        self.on_batch: Callable[[BatchRecord], None] | None = None
        self._options = SessionOptions(
            intra_op_threads=settings.threads_per_session,
            graph_optimization_level=settings.graph_optimization_level,
        )
        # Retired versions still draining, so that shutdown can wait for them too.
        self._draining: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- building

    def build(self, config: ModelConfig, version: ModelVersion) -> Served:
        """A loaded and warmed-up instance of ``version`` (blocking: call from a thread);
        RepositoryError with a reason safe to show when it cannot be."""
        root: Path = self.settings.repository
        path = verified_file(root, config, version)
        model = OnnxModel(config, version, path, self._options)
        try:
            seconds = model.warmup()
        except NormserveError:
            raise
        except Exception as exc:
            # e.g. the engine cannot run a warm-up of this signature: this model's problem,
            # not the server's. The cause stays in the log, not in answers.
            log.error("model '%s' warm-up failed: %r", config.name, exc)
            raise RepositoryError(
                f"model '{config.name}' version {version.version}: its warm-up inference "
                "failed (see the server log)"
            ) from exc
        batching = config.batching
        settings = self.settings
        batcher = Batcher(
            model,
            max_batch_size=min(
                batching.max_batch_size or settings.max_batch_size, config.max_batch_size
            ),
            max_queue_delay_s=(
                batching.max_queue_delay_ms
                if batching.max_queue_delay_ms is not None
                else settings.max_queue_delay_ms
            )
            / 1000,
            max_queue_size=batching.max_queue_size or settings.max_queue_size,
            on_batch=self.on_batch,
            merge=not config.batch_dependent,
        )
        log.info(
            "model '%s' version %d loaded (%d threads, warm-up %.1f ms)",
            config.name,
            version.version,
            model.threads,
            seconds * 1000,
        )
        return Served(model, batcher)

    # ----------------------------------------------------------------- changing what is served

    def install(self, name: str, instances: list[Served]) -> None:
        """Serve exactly ``instances`` (started here) for ``name``; the versions they replace
        drain in the background. Call on the event loop thread."""
        for served in instances:
            served.batcher.start()
        versions = {s.version: s for s in instances}
        self.known.add(name)
        old = self.versions.get(name, {})
        self._swap(name, versions)
        self.failed.pop(name, None)
        self._retire([s for s in old.values() if versions.get(s.version) is not s])

    def retire(self, name: str) -> list[Served]:
        """Stop serving ``name`` (every version); they drain in the background."""
        old = self.versions.get(name, {})
        self._swap(name, {})
        self.failed.pop(name, None)
        self._retire(list(old.values()))
        return list(old.values())

    def fail(self, name: str, reason: str) -> None:
        log.error("model '%s' not loaded: %s", name, reason)
        self.known.add(name)
        self.failed[name] = reason

    def _swap(self, name: str, versions: dict[str, Served]) -> None:
        # New dicts, assigned whole: a reader never sees one half-updated.
        all_versions = {k: v for k, v in self.versions.items() if k != name}
        served = {k: v for k, v in self.served.items() if k != name}
        if versions:
            all_versions[name] = versions
            served[name] = versions[max(versions, key=int)]
        self.versions, self.served = all_versions, served

    def _retire(self, old: list[Served]) -> None:
        for served in old:
            task = asyncio.create_task(
                served.drain(self.settings.graceful_shutdown_s),
                name=f"drain:{served.config.name}:{served.version}",
            )
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    def draining(self) -> list[tuple[str, str]]:
        """(name, version) of the retired versions still finishing their requests."""
        names = (task.get_name().split(":") for task in self._draining if not task.done())
        return [(parts[1], parts[2]) for parts in names]

    async def stop(self) -> None:
        """Finish every queue and stop every batcher (graceful shutdown)."""
        live = [s for versions in self.versions.values() for s in versions.values()]
        await asyncio.gather(
            *(s.batcher.stop() for s in live), *list(self._draining), return_exceptions=True
        )

    # ----------------------------------------------------------------- lookups (hot path)

    @property
    def ready(self) -> bool:
        return not self.failed and (
            bool(self.served) or self.settings.model_control_mode == "explicit"
        )

    def names(self) -> list[str]:
        return sorted({*self.served, *self.failed})

    def get(self, name: str, version: str | None = None) -> Served:
        # The unversioned route gets the highest served version.
        served = self.versions.get(name, {}).get(version) if version else self.served.get(name)
        if served is None:
            self._missing(name, version)
        assert served is not None  # _missing always raises
        return served

    def _missing(self, name: str, version: str | None) -> None:
        # Only a name that is not served is checked: a served one is valid by construction,
        # and the check is a regular expression on every request's path otherwise.
        if not MODEL_NAME.fullmatch(name):
            raise InvalidInput(
                f"invalid model name {name[:64]!r}: names are 1-128 letters, digits, '_', '.', '-'"
                " and start with a letter or digit"
            )
        if name in self.failed:
            raise ModelNotReady(
                f"model '{name}' is not available: it failed to load ({self.failed[name]})"
            )
        versions = self.versions.get(name)
        if versions is None:
            # Triton's wording, which its clients' examples test for; no list of the others.
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        raise ModelNotFound(
            f"Request for unknown model: '{name}' version '{(version or '')[:32]}' is not "
            f"found; served versions: {', '.join(sorted(versions, key=int))}"
        )

    def counted_as(self, name: str, version: str | None) -> tuple[str, str | None]:
        """For a finished request to (``name``, ``version``): its metrics' model label, and
        the served version whose statistics count it (None: it reached no model).

        Only names and versions the repository has become label values, so that a client
        cannot grow the metrics by inventing them; a model once served keeps its label, so
        requests that drain after its unload still count under its name.
        """
        known = name in self.served or name in self.failed or name in self.known
        label = name if known else "unknown"
        versions = self.versions.get(name)
        if not versions:
            return label, None
        if version:
            return label, version if version in versions else None
        default = self.served.get(name)
        return label, default.version if default is not None else None

    def admit(self, name: str, version: str | None = None) -> Served:
        """The model, if it can take one more request now: the cheap checks a transport makes
        before it reads and decodes a body (unknown model, not ready, queue full)."""
        served = self.get(name, version)
        served.batcher.check_room()
        return served

    def hold(self, name: str, version: str | None = None) -> Place:
        """``admit`` that also holds the request's place in the queue until it is submitted:
        for a transport about to read and decode the body."""
        served = self.get(name, version)
        served.batcher.reserve()
        return Place(served)

    def submit(
        self,
        served: Served,
        tensors: dict[str, np.ndarray],
        timeout_ms: float | None,
        place: Place | None = None,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """``infer`` as a future (no coroutine or task per request): the batch resolves it.
        With a ``place`` from ``hold``, the request takes it (never refused for room)."""
        inputs = served.model.validate(tensors)
        timeout = timeout_ms if timeout_ms is not None else self.settings.request_timeout_ms
        deadline = time.perf_counter() + timeout / 1000
        if place is None or not place.held:
            return served.batcher.enqueue(inputs, deadline)
        place.held = False
        return served.batcher.enqueue(inputs, deadline, reserved=True)
