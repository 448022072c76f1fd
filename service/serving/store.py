"""The loaded models: one OnnxModel and one Batcher per model, readiness, and inference.

Built in the app's lifespan from the repository. A model that fails to load (bad config,
a path leaving the repository, sha256 mismatch, onnxruntime refusal, a failed warm-up) is
kept with its reason: the others are served, the server reports not ready (strict
readiness, as Triton's default), and requests to the broken model get 503 with the reason.
``strict_models`` turns any such failure into a start-up failure instead (Triton's
exit-on-error).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NormserveError,
    RepositoryError,
)
from service.repository import MODEL_NAME, ModelConfig, scan_repository, verified_file
from service.serving.batcher import Batcher, BatchRecord
from service.serving.runtime import OnnxModel, SessionOptions
from service.settings import Settings

log = logging.getLogger("normserve.store")


@dataclass
class Served:
    model: OnnxModel
    batcher: Batcher

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def version(self) -> str:
        return str(self.model.version.version)


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
        self.served: dict[str, Served] = {}
        self.failed: dict[str, str] = {}

    def load(self, on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        """Load and warm up every model (blocking: call from a thread)."""
        options = SessionOptions(
            intra_op_threads=self.settings.threads_per_session,
            graph_optimization_level=self.settings.graph_optimization_level,
        )
        configs, failed = scan_repository(self.settings.repository)
        for name, reason in failed.items():
            self._fail(name, reason, None)
        for config in configs:
            try:
                version = config.latest
                path = verified_file(self.settings.repository, config, version)
                model = OnnxModel(config, version, path, options)
                seconds = model.warmup()
            except NormserveError as exc:
                self._fail(config.name, str(exc), exc.__cause__)
                continue
            except Exception as exc:
                # e.g. the engine cannot run a warm-up of this signature: this model's
                # problem, not the server's. The cause stays in the log, not in answers.
                self._fail(config.name, "its warm-up inference failed (see the server log)", exc)
                continue
            batching = config.batching
            self.served[config.name] = Served(
                model,
                Batcher(
                    model,
                    max_batch_size=min(
                        batching.max_batch_size or self.settings.max_batch_size,
                        config.max_batch_size,
                    ),
                    max_queue_delay_s=(
                        batching.max_queue_delay_ms
                        if batching.max_queue_delay_ms is not None
                        else self.settings.max_queue_delay_ms
                    )
                    / 1000,
                    max_queue_size=batching.max_queue_size or self.settings.max_queue_size,
                    on_batch=on_batch,
                    merge=not config.batch_dependent,
                ),
            )
            log.info(
                "model '%s' version %d ready (%d threads, warm-up %.1f ms)",
                config.name,
                version.version,
                model.threads,
                seconds * 1000,
            )

    def _fail(self, name: str, reason: str, cause: BaseException | None) -> None:
        # The full cause (onnxruntime's own message) is for operators, in the log.
        log.error("model '%s' not loaded: %s (cause: %r)", name, reason, cause)
        self.failed[name] = reason
        if self.settings.strict_models:
            raise RepositoryError(f"model '{name}' not loaded: {reason} (strict_models is on)")

    def start(self) -> None:
        for served in self.served.values():
            served.batcher.start()

    async def stop(self) -> None:
        await asyncio.gather(*(s.batcher.stop() for s in self.served.values()))

    @property
    def ready(self) -> bool:
        return bool(self.served) and not self.failed

    def names(self) -> list[str]:
        return sorted([*self.served, *self.failed])

    def get(self, name: str, version: str | None = None) -> Served:
        if not MODEL_NAME.fullmatch(name):
            raise InvalidInput(
                f"invalid model name {name[:64]!r}: names are 1-128 letters, digits, '_', '.', '-'"
                " and start with a letter or digit"
            )
        served = self.served.get(name)
        if served is None:
            if name in self.failed:
                raise ModelNotReady(
                    f"model '{name}' is not available: it failed to load ({self.failed[name]})"
                )
            # Triton's wording, which its clients' examples test for; no list of the others.
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if version not in (None, "", served.version):
            raise ModelNotFound(
                f"Request for unknown model: '{name}' version '{version[:32]}' is not found; "
                f"served version: {served.version}"
            )
        return served

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
