"""What a decoded V2 inference request is, whatever carried it (REST JSON, REST binary, gRPC)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import InvalidInput

# Checks one declared input (name, datatype, shape) against the model before its data is
# converted: the model's signature, so that a wrong request costs no data decoding.
DeclaredCheck = Callable[[str, str, tuple[int, ...]], None]


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None  # from parameters.binary_data; None = request/default decides


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]  # in request order, shaped and typed by the request
    outputs: list[RequestedOutput] | None  # None = all outputs
    binary_output: bool  # request-level parameters.binary_data_output
    timeout_ms: float | None  # request-level parameters.timeout, sent in microseconds
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputSpec:
    """One entry of the request's inputs list, validated but not yet converted."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    binary_size: int | None  # None: the tensor is in `data`
    data: Any

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def fail(self, problem: str) -> InvalidInput:
        return InvalidInput(f"input {self.name!r}: {problem}")
