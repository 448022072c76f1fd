"""Open Inference Protocol (KServe V2) REST tensor codec: request bodies in, response bodies out.

Pure functions over bytes and numpy, no HTTP framework: the routes decide JSON vs binary only
by the `Inference-Header-Content-Length` header (the sync tritonclient sends no Content-Type)
and pass its value here. Binary bodies follow Triton's binary tensor data extension: a JSON
header of that many bytes, then the raw tensors of the inputs that carry
`parameters.binary_data_size`, in the order of the inputs list.

Every client mistake raises `InvalidInput` with a message that names the tensor and the problem;
library exception text is never passed through verbatim.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_DATATYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}

# JSON element types each kind of datatype accepts, and their name for messages. bool is a
# subclass of int in Python, so types are compared exactly: `true` in an INT32 tensor is a
# client bug, not the number 1.
_JSON_ELEMENTS: dict[str, tuple[frozenset[type], str]] = {
    "b": (frozenset({bool}), "booleans"),
    "i": (frozenset({int}), "integers"),
    "u": (frozenset({int}), "integers"),
    "f": (frozenset({int, float}), "numbers"),
    "O": (frozenset({str}), "strings"),
}

_LENGTH_PREFIX = struct.Struct("<I")
_MAX_ITEMSIZE = max(dtype.itemsize for dtype in DATATYPE_TO_NUMPY.values())
_MAX_BYTES = int(np.iinfo(np.intp).max)
_UNSUPPORTED_TENSOR_PARAMETERS = ("shared_memory_region", "classification")


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
class _InputSpec:
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


# --------------------------------------------------------------------------------------------
# Requests


def decode_json_body(body: bytes | memoryview) -> Any:
    """Parses a JSON body with orjson; malformed JSON is the client's error."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Rebuilt from the parts rather than str(exc): position and reason only.
        at = bytes(body[exc.pos : exc.pos + 9])
        hint = (
            "; NaN and Infinity are not JSON numbers, and the model accepts finite values only"
            if at.startswith((b"NaN", b"Infinity", b"-Infinity", b"inf", b"nan"))
            else ""
        )
        raise InvalidInput(
            f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            f"{hint}"
        ) from None


@dataclass(frozen=True)
class Limits:
    """Request limits, checked before anything is allocated from what a request declares."""

    max_depth: int = 32  # JSON nesting levels
    max_elements: int = 16_777_216  # elements of one tensor, from its declared shape
    max_tensors: int = 64  # entries of 'inputs' plus 'outputs'


def decode_infer_request(
    body: bytes, json_length: int | None, limits: Limits | None = None
) -> InferRequest:
    """Decodes a V2 inference request body; `json_length` is Inference-Header-Content-Length."""
    limits = limits or Limits()
    header, binary = _split_body(body, json_length)
    document = decode_json_body(header)
    if not isinstance(document, dict):
        raise InvalidInput("inference request must be a JSON object")
    _check_limits(document, limits, body if json_length is None else bytes(header))
    parameters = _parameters(document.get("parameters"), "request")
    specs = _input_specs(document.get("inputs"))
    chunks = _binary_chunks(specs, binary, json_length)
    inputs = {spec.name: _decode_input(spec, chunks.get(spec.name)) for spec in specs}
    return InferRequest(
        id=_request_id(document.get("id")),
        inputs=inputs,
        outputs=_requested_outputs(document.get("outputs")),
        binary_output=_flag(parameters, "binary_data_output", "request"),
        timeout_ms=_timeout_ms(parameters.get("timeout")),
        parameters=parameters,
    )


def _check_limits(document: dict[str, Any], limits: Limits, text: bytes) -> None:
    tensors = sum(
        len(v) for v in (document.get("inputs"), document.get("outputs")) if isinstance(v, list)
    )
    if tensors > limits.max_tensors:
        raise InvalidInput(
            f"the request names {tensors} inputs and outputs; the limit is {limits.max_tensors}"
        )
    check_depth(document, limits.max_depth, text)
    inputs = document.get("inputs")
    for entry in inputs if isinstance(inputs, list) else []:
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            count = math.prod(shape)
            if count > limits.max_elements:
                raise InvalidInput(
                    f"input {entry.get('name')!r}: shape {_preview(shape)} declares {count} "
                    f"elements; the limit is {limits.max_elements}"
                )


def check_depth(document: Any, max_depth: int, text: bytes | None = None) -> None:
    """InvalidInput when ``document`` (parsed from ``text``, if given) nests deeper than
    ``max_depth``.

    Each level opens a bracket, so a text with at most ``max_depth`` of them cannot be too
    deep (brackets inside strings only raise the count): for a short text (a binary
    request's JSON header) two C-speed counts settle it without walking the document. A
    long text is walked instead: the walk follows one element per list, so it costs a few
    µs where counting 60 KB of tensor data twice cost 65 µs.
    """
    if (
        text is not None
        and len(text) <= _COUNT_BELOW
        and text.count(b"[") + text.count(b"{") <= max_depth
    ):
        return
    if _depth(document, max_depth) > max_depth:
        raise InvalidInput(f"the request's JSON is nested deeper than {max_depth} levels")


_COUNT_BELOW = 4096  # bytes: below it, counting brackets is cheaper than walking


def _depth(value: Any, limit: int, level: int = 1) -> int:
    """Nesting depth of ``value``, stopping past ``limit``.

    Objects are searched fully; a list through its first element when that is a list or a
    scalar (tensor data: a ragged or mixed element is refused later by the tensor decoder),
    so the cost does not grow with the number of elements sent.
    """
    if level > limit:
        return level
    if isinstance(value, dict):
        return max((_depth(v, limit, level + 1) for v in value.values()), default=level)
    if isinstance(value, list) and value:
        if isinstance(value[0], list):
            return _depth(value[0], limit, level + 1)
        if not isinstance(value[0], dict):
            # Tensor data: numbers (or strings) all the way. Scanning thousands of them here
            # cost more than the inference; an object hidden among them is refused later,
            # without recursion, by the element-type check.
            return level
        return max(
            (_depth(v, limit, level + 1) for v in value if isinstance(v, dict)), default=level
        )
    return level


def _split_body(body: bytes, json_length: int | None) -> tuple[memoryview, memoryview]:
    # memoryview slices: the binary tail can be several MB and must not be copied to split it.
    view = memoryview(body)
    if json_length is None:
        return view, view[len(view) :]
    if json_length <= 0 or json_length > len(view):
        raise InvalidInput(
            f"{HEADER_LENGTH} is {json_length} but the body is {len(view)} bytes; "
            "it must be the size of the JSON header, between 1 and the body size"
        )
    return view[:json_length], view[json_length:]


def _request_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidInput(f"request 'id' must be a string, got {_json_kind(value)}")


def _parameters(value: Any, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{owner} 'parameters' must be an object, got {_json_kind(value)}")
    return value


def _flag(parameters: dict[str, Any], key: str, owner: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{owner} parameter {key!r} must be true or false")
    return value


def _timeout_ms(value: Any) -> float | None:
    """Triton's `timeout` request parameter is in microseconds; 0 means no timeout there too."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidInput("request parameter 'timeout' must be a non-negative number (µs)")
    if not math.isfinite(value):
        raise InvalidInput("request parameter 'timeout' must be finite")
    return None if value == 0 else value / 1000.0


def _input_specs(value: Any) -> list[_InputSpec]:
    if value is None:
        raise InvalidInput("inference request has no 'inputs'")
    if not isinstance(value, list):
        raise InvalidInput(f"'inputs' must be a list, got {_json_kind(value)}")
    if not value:
        raise InvalidInput("'inputs' is empty: the request needs at least one input")
    specs = [_input_spec(entry, index) for index, entry in enumerate(value)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidInput(f"input {spec.name!r} appears more than once in 'inputs'")
        seen.add(spec.name)
    return specs


def _input_spec(entry: Any, index: int) -> _InputSpec:
    if not isinstance(entry, dict):
        raise InvalidInput(f"inputs[{index}] must be an object, got {_json_kind(entry)}")
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
    shape = _shape(name, entry.get("shape"), present="shape" in entry)
    parameters = _parameters(entry.get("parameters"), f"input {name!r}")
    for key in _UNSUPPORTED_TENSOR_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"input {name!r}: parameter {key!r} is not supported")
    binary_size = _binary_size(name, parameters.get("binary_data_size"))
    has_data = "data" in entry
    if binary_size is not None and has_data:
        raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
    if binary_size is None and not has_data:
        raise InvalidInput(f"input {name!r} has no 'data' and no binary_data_size")
    return _InputSpec(name, datatype, shape, binary_size, entry.get("data"))


def _shape(name: str, value: Any, *, present: bool) -> tuple[int, ...]:
    if not present:
        raise InvalidInput(f"input {name!r}: missing 'shape'")
    # A request shape is concrete: -1 belongs in model metadata, never in the data sent.
    valid = isinstance(value, list) and all(
        type(dim) is int and dim >= 0
        for dim in value  # type(): `true` is not a dimension
    )
    if not valid:
        raise InvalidInput(
            f"input {name!r}: shape must be a list of non-negative integers, got {_preview(value)}"
        )
    # Zero-sized tensors still get reshaped, and numpy refuses shapes whose non-zero dims
    # overflow its index type: refuse them here, with a message, instead of a 500 later.
    if math.prod(dim for dim in value if dim) * _MAX_ITEMSIZE > _MAX_BYTES:
        raise InvalidInput(f"input {name!r}: shape {_preview(value)} is too large")
    return tuple(value)


def _binary_size(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
    return value


def _binary_chunks(
    specs: list[_InputSpec], binary: memoryview, json_length: int | None
) -> dict[str, memoryview]:
    """Cuts the binary tail into one slice per binary input, in the order of the inputs list."""
    binary_specs = [spec for spec in specs if spec.binary_size is not None]
    if binary_specs and json_length is None:
        raise InvalidInput(
            f"input {binary_specs[0].name!r} has binary_data_size but the request has no "
            f"{HEADER_LENGTH} header, so the body is all JSON"
        )
    declared = sum(spec.binary_size or 0 for spec in binary_specs)
    if declared != len(binary):
        names = ", ".join(repr(spec.name) for spec in binary_specs) or "none"
        raise InvalidInput(
            f"binary data after the JSON header is {len(binary)} bytes but the binary inputs "
            f"({names}) declare {declared} bytes in binary_data_size"
        )
    chunks: dict[str, memoryview] = {}
    offset = 0
    for spec in binary_specs:
        size = spec.binary_size or 0
        chunks[spec.name] = binary[offset : offset + size]
        offset += size
    return chunks


def _decode_input(spec: _InputSpec, chunk: memoryview | None) -> np.ndarray:
    if chunk is not None:
        return _decode_binary(spec, chunk)
    return _decode_json_data(spec)


# --- binary tensors


def _decode_binary(spec: _InputSpec, chunk: memoryview) -> np.ndarray:
    if spec.datatype == "BYTES":
        return _decode_binary_bytes(spec, chunk).reshape(spec.shape)
    # The wire format is little-endian whatever the host; on x86/ARM this is the native dtype.
    dtype = DATATYPE_TO_NUMPY[spec.datatype].newbyteorder("<")
    expected = spec.count * dtype.itemsize
    if len(chunk) != expected:
        raise spec.fail(
            f"shape {list(spec.shape)} of {spec.datatype} needs {expected} bytes, "
            f"binary_data_size is {len(chunk)}"
        )
    array = np.frombuffer(chunk, dtype=dtype)
    if spec.datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise spec.fail("BOOL binary data must hold only the bytes 0 and 1")
    if not array.flags.aligned:
        # The JSON header has any length, so the tail often starts at an odd offset; numpy copes
        # with unaligned views slowly and native code (onnxruntime) may not cope at all.
        array = array.copy()
    return array.reshape(spec.shape)


def _decode_binary_bytes(spec: _InputSpec, chunk: memoryview) -> np.ndarray:
    """BYTES elements are each a 4-byte little-endian length followed by that many bytes."""
    elements: list[bytes] = []
    offset, end = 0, len(chunk)
    while offset < end:
        if len(elements) == spec.count:
            raise spec.fail(
                f"BYTES binary data holds more than the {spec.count} elements "
                f"of shape {list(spec.shape)}"
            )
        if offset + _LENGTH_PREFIX.size > end:
            raise spec.fail(f"BYTES element {len(elements)} has a truncated length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(chunk, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > end:
            raise spec.fail(
                f"BYTES element {len(elements)} declares {length} bytes but only "
                f"{end - offset} remain"
            )
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    if len(elements) != spec.count:
        raise spec.fail(
            f"shape {list(spec.shape)} needs {spec.count} elements, got {len(elements)}"
        )
    return _object_array(elements)


def _object_array(elements: list[bytes]) -> np.ndarray:
    # Filled element by element: np.array(list_of_bytes) would make a fixed-width 'S' array
    # that silently drops trailing NUL bytes.
    array = np.empty(len(elements), dtype=np.object_)
    array[:] = elements
    return array


# --- JSON tensors


def _decode_json_data(spec: _InputSpec) -> np.ndarray:
    if not isinstance(spec.data, list):
        raise spec.fail(f"'data' must be a JSON array, got {_json_kind(spec.data)}")
    # Flat data (the usual V2 form, row-major) needs no flattening pass.
    flat = _flatten(spec.data) if spec.data and isinstance(spec.data[0], list) else spec.data
    # Types first: ragged data flattens to the wrong count, and "ragged" is the better message.
    _check_element_types(spec, flat)
    if len(flat) != spec.count:
        raise spec.fail(f"shape {list(spec.shape)} needs {spec.count} elements, got {len(flat)}")
    return _convert(spec, flat).reshape(spec.shape)


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of flat or nested data in C: one numpy pass, no Python recursion.

    With dtype=object numpy nests only as deep as the lists are regular and leaves whatever is
    ragged as list elements, which the type check then reports.
    """
    flat: list[Any] = np.array(data, dtype=np.object_).ravel().tolist()
    return flat


def _check_element_types(spec: _InputSpec, flat: list[Any]) -> None:
    allowed, wanted = _JSON_ELEMENTS[DATATYPE_TO_NUMPY[spec.datatype].kind]
    if set(map(type, flat)) <= allowed:
        return
    # Slow path, errors only: find the first offending element to name it.
    index, value = next((i, v) for i, v in enumerate(flat) if type(v) not in allowed)
    if isinstance(value, list):
        raise spec.fail(
            f"data is ragged: nested lists must be regular and hold only {wanted} (element {index})"
        )
    raise spec.fail(
        f"{spec.datatype} data must hold {wanted}, found {_json_kind(value)} at element {index}"
    )


def _convert(spec: _InputSpec, flat: list[Any]) -> np.ndarray:
    if spec.datatype == "BYTES":
        return _object_array([text.encode("utf-8") for text in flat])
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    if dtype.kind in "iu":
        return _convert_integers(spec, flat, dtype)
    if dtype.kind == "f":
        return _convert_floats(spec, flat, dtype)
    return np.array(flat, dtype=dtype)


def _convert_integers(spec: _InputSpec, flat: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
    try:
        return np.array(flat, dtype=dtype)
    except OverflowError:
        info = np.iinfo(dtype)
        index, value = next((i, v) for i, v in enumerate(flat) if not info.min <= v <= info.max)
        raise spec.fail(
            f"value {value} at element {index} is out of range for {spec.datatype} "
            f"[{info.min}, {info.max}]"
        ) from None


def _convert_floats(spec: _InputSpec, flat: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
    try:
        # Overflow to inf is reported below with the element named, not as a numpy warning.
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.array(flat, dtype=dtype)
    except OverflowError:  # a Python int too large even for float64
        index = next(i for i, v in enumerate(flat) if not _fits_float64(v))
        raise spec.fail(_float_problem(spec, flat[index], index)) from None
    finite = np.isfinite(array)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise spec.fail(_float_problem(spec, flat[index], index))
    return array


def _fits_float64(value: float) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _float_problem(spec: _InputSpec, value: float, index: int) -> str:
    # JSON has no NaN or Infinity; a value only gets here from a lenient encoder upstream.
    if isinstance(value, float) and not math.isfinite(value):
        return f"element {index} is not a finite number"
    return f"value {_preview(value)} at element {index} is out of range for {spec.datatype}"


# --- requested outputs


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    # An empty list asks for nothing in particular, which Triton treats as "all outputs".
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"'outputs' must be a list, got {_json_kind(value)}")
    requested = [_requested_output(entry, index) for index, entry in enumerate(value)]
    seen: set[str] = set()
    for output in requested:
        if output.name in seen:
            raise InvalidInput(f"output {output.name!r} is requested more than once")
        seen.add(output.name)
    return requested


def _requested_output(entry: Any, index: int) -> RequestedOutput:
    if not isinstance(entry, dict):
        raise InvalidInput(f"outputs[{index}] must be an object, got {_json_kind(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"outputs[{index}] has no 'name' (a non-empty string)")
    parameters = _parameters(entry.get("parameters"), f"output {name!r}")
    for key in _UNSUPPORTED_TENSOR_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"output {name!r}: parameter {key!r} is not supported")
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise InvalidInput(f"output {name!r}: parameter 'binary_data' must be true or false")
    return RequestedOutput(name=name, binary=binary)


# --------------------------------------------------------------------------------------------
# Responses


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    requested: list[RequestedOutput] | None,
    binary_output: bool,
) -> tuple[bytes, dict[str, str]]:
    """Builds a V2 inference response body and the headers it needs beyond the status."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    any_binary = False
    for name, array, binary in _select_outputs(outputs, requested, binary_output):
        datatype = _datatype_of(name, array)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype,
            "shape": [int(dim) for dim in array.shape],
        }
        if binary:
            blob = _encode_binary(name, array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
            any_binary = True
        else:
            entry["data"] = _json_data(name, array, datatype)
        entries.append(entry)
    header = orjson.dumps(
        _response_document(model_name, model_version, request_id, entries),
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not any_binary:
        return header, {"Content-Type": "application/json"}
    # The client splits the body by this header, then takes the blobs in the JSON's output order.
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return b"".join([header, *blobs]), headers


def _response_document(
    model_name: str, model_version: str | None, request_id: str | None, entries: list[Any]
) -> dict[str, Any]:
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = model_version
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = entries
    return document


def _select_outputs(
    outputs: dict[str, np.ndarray], requested: list[RequestedOutput] | None, binary_output: bool
) -> list[tuple[str, np.ndarray, bool]]:
    if requested is None:
        return [(name, array, binary_output) for name, array in outputs.items()]
    selected = []
    for output in requested:
        if output.name not in outputs:
            available = ", ".join(repr(name) for name in outputs)
            raise InvalidInput(
                f"requested output {output.name!r} does not exist; "
                f"the model's outputs are: {available}"
            )
        binary = binary_output if output.binary is None else output.binary
        selected.append((output.name, outputs[output.name], binary))
    return selected


def _datatype_of(name: str, array: np.ndarray) -> str:
    datatype = NUMPY_TO_DATATYPE.get(array.dtype.newbyteorder("="))
    if datatype is None:
        # The model produced it, not the client: a server bug, hence not InvalidInput.
        raise TypeError(f"output {name!r} has dtype {array.dtype} with no V2 datatype")
    return datatype


def _encode_binary(name: str, array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(
            _LENGTH_PREFIX.pack(len(item)) + item
            for item in (_element_bytes(name, value) for value in array.ravel(order="C"))
        )
    little = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    return little.tobytes(order="C")


def _element_bytes(name: str, value: Any) -> bytes:
    # onnxruntime returns string tensors as str objects; clients send and expect raw bytes.
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"output {name!r} holds a {type(value).__name__}, not bytes or str")


def _json_data(name: str, array: np.ndarray, datatype: str) -> Any:
    if datatype == "BYTES":
        return [_element_text(name, value) for value in array.ravel(order="C")]
    if datatype == "FP16":
        # Printed as float32's shortest text (0.099975586 for 0.1), which reads back as the same
        # float16; recent orjson does this itself, the cast keeps it independent of the version.
        array = array.astype(np.float32)
    # orjson serializes only native-order, C-contiguous arrays; both are no-ops when already so.
    native = array.astype(array.dtype.newbyteorder("="), copy=False)
    return np.ascontiguousarray(native).reshape(-1)


def _element_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(
            f"output {name!r} holds bytes that are not UTF-8 and cannot be sent as JSON; "
            "request it with binary_data"
        ) from None


def error_body(message: str) -> bytes:
    """The body of every non-200 answer: the client looks for an "error" key."""
    return orjson.dumps({"error": message})


# --------------------------------------------------------------------------------------------
# Messages


def _json_kind(value: Any) -> str:
    """Names a JSON value's kind for messages without echoing client data at length."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {_preview(value)}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _preview(value: Any, limit: int = 60) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # ints beyond 64 bits, and anything orjson does not know
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
