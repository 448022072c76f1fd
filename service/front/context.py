"""What the HTTP handlers work with, built once per app (service.app)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.front.decoding import BodyDecoder
from service.front.openapi import document
from service.front.routing import Route
from service.operations.metrics import Metrics
from service.protocol.handlers import Protocol
from service.settings import Settings
from service.webdata import SamplesFile


@dataclass
class Context:
    settings: Settings
    protocol: Protocol
    metrics: Metrics
    samples: SamplesFile
    decoder: BodyDecoder
    # The route table, which the OpenAPI document describes.
    routes: Sequence[Route] = ()
    _openapi: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @property
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document (service.front.openapi), built at its first request: a
        server that is never asked for it never builds it, and start-up does not wait."""
        if self._openapi is None:
            self._openapi = document(self.routes)
        return self._openapi
