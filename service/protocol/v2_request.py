"""A V2 REST inference request body → ``InferRequest``.

JSON vs binary is decided only by ``Inference-Header-Content-Length`` (the sync
tritonclient sends no Content-Type), whose value arrives here as ``json_length``. Cheap
checks come first: limits on what the document declares, then each input's declared
datatype and shape against the model (``check``), and only then is tensor data converted,
so a request that cannot fit the model costs no data decoding.

Every client mistake raises ``InvalidInput`` naming the tensor and the problem; library
exception text is never passed through.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.datatypes import DATATYPE_TO_NUMPY
from service.errors import InvalidInput
from service.protocol.request_limits import Limits, check_document, check_shape, decode_json_body
from service.protocol.text import json_kind
from service.protocol.v2_binary import binary_chunks, decode_binary, split_body
from service.protocol.v2_json import decode_json_data
from service.protocol.v2_types import DeclaredCheck, InferRequest, InputSpec, RequestedOutput

# Triton's tensor parameters this server does not implement: refused, never ignored.
UNSUPPORTED_TENSOR_PARAMETERS = ("shared_memory_region", "classification")


def decode_infer_request(
    body: bytes,
    json_length: int | None,
    limits: Limits | None = None,
    check: DeclaredCheck | None = None,
) -> InferRequest:
    """Decodes a V2 inference request body; ``json_length`` is Inference-Header-Content-Length."""
    limits = limits or Limits()
    header, binary = split_body(body, json_length)
    document = decode_json_body(header)
    if not isinstance(document, dict):
        raise InvalidInput("inference request must be a JSON object")
    check_document(document, limits, body if json_length is None else bytes(header))
    parameters = parameters_of(document.get("parameters"), "request")
    specs = _input_specs(document.get("inputs"))
    if check is not None:
        for spec in specs:
            check(spec.name, spec.datatype, spec.shape)
    chunks = binary_chunks(specs, binary, json_length)
    inputs = {spec.name: _decode_input(spec, chunks.get(spec.name)) for spec in specs}
    return InferRequest(
        id=_request_id(document.get("id")),
        inputs=inputs,
        outputs=requested_outputs(document.get("outputs")),
        binary_output=_flag(parameters, "binary_data_output", "request"),
        timeout_ms=timeout_ms(parameters.get("timeout")),
        parameters=parameters,
    )


def _decode_input(spec: InputSpec, chunk: memoryview | None) -> np.ndarray:
    return decode_binary(spec, chunk) if chunk is not None else decode_json_data(spec)


def _request_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidInput(f"request 'id' must be a string, got {json_kind(value)}")


def parameters_of(value: Any, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{owner} 'parameters' must be an object, got {json_kind(value)}")
    return value


def _flag(parameters: dict[str, Any], key: str, owner: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{owner} parameter {key!r} must be true or false")
    return value


def timeout_ms(value: Any) -> float | None:
    """Triton's `timeout` request parameter is in microseconds; 0 means no timeout there too."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidInput("request parameter 'timeout' must be a non-negative number (µs)")
    if not math.isfinite(value):
        raise InvalidInput("request parameter 'timeout' must be finite")
    return None if value == 0 else value / 1000.0


def _input_specs(value: Any) -> list[InputSpec]:
    if value is None:
        raise InvalidInput("inference request has no 'inputs'")
    if not isinstance(value, list):
        raise InvalidInput(f"'inputs' must be a list, got {json_kind(value)}")
    if not value:
        raise InvalidInput("'inputs' is empty: the request needs at least one input")
    specs = [_input_spec(entry, index) for index, entry in enumerate(value)]
    once_each([spec.name for spec in specs], "input {!r} appears more than once in 'inputs'")
    return specs


def _input_spec(entry: Any, index: int) -> InputSpec:
    if not isinstance(entry, dict):
        raise InvalidInput(f"inputs[{index}] must be an object, got {json_kind(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] has no 'name' (a non-empty string)")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r}: missing 'datatype'")
    if datatype not in DATATYPE_TO_NUMPY:
        supported = ", ".join(DATATYPE_TO_NUMPY)
        raise InvalidInput(
            f"input {name!r}: unsupported datatype {datatype[:32]!r}; supported: {supported}"
        )
    shape = check_shape(name, entry.get("shape"), present="shape" in entry)
    parameters = parameters_of(entry.get("parameters"), f"input {name!r}")
    for key in UNSUPPORTED_TENSOR_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"input {name!r}: parameter {key!r} is not supported")
    binary_size = _binary_size(name, parameters.get("binary_data_size"))
    has_data = "data" in entry
    if binary_size is not None and has_data:
        raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
    if binary_size is None and not has_data:
        raise InvalidInput(f"input {name!r} has no 'data' and no binary_data_size")
    return InputSpec(name, datatype, shape, binary_size, entry.get("data"))


def _binary_size(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
    return value


def requested_outputs(value: Any) -> list[RequestedOutput] | None:
    """The request's ``outputs`` list; None asks for every output."""
    # An empty list asks for nothing in particular, which Triton treats as "all outputs".
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"'outputs' must be a list, got {json_kind(value)}")
    requested = [_requested_output(entry, index) for index, entry in enumerate(value)]
    once_each([output.name for output in requested], "output {!r} is requested more than once")
    return requested


def once_each(names: list[str], problem: str) -> None:
    """InvalidInput naming the first name given twice (``problem`` formats it)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidInput(problem.format(name))
        seen.add(name)


def _requested_output(entry: Any, index: int) -> RequestedOutput:
    if not isinstance(entry, dict):
        raise InvalidInput(f"outputs[{index}] must be an object, got {json_kind(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"outputs[{index}] has no 'name' (a non-empty string)")
    parameters = parameters_of(entry.get("parameters"), f"output {name!r}")
    for key in UNSUPPORTED_TENSOR_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"output {name!r}: parameter {key!r} is not supported")
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise InvalidInput(f"output {name!r}: parameter 'binary_data' must be true or false")
    return RequestedOutput(name=name, binary=binary)
