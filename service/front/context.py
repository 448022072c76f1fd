"""What the HTTP handlers work with, built once per app (service.app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.front.decoding import BodyDecoder
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
    # The OpenAPI document, built on first request from the route table (service.front.openapi).
    openapi: dict[str, Any] = field(default_factory=dict)
