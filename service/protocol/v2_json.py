"""V2 tensors as JSON: the ``data`` list of an input in, the ``data`` list of an output out.

Element types are checked exactly (bool is a subclass of int in Python: ``true`` in an
INT32 tensor is a client bug, not the number 1), values must fit their datatype, and floats
must be finite; each refusal names the tensor and the first offending element.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.datatypes import DATATYPE_TO_NUMPY
from service.errors import InvalidInput
from service.protocol.text import json_kind, preview
from service.protocol.v2_binary import object_array
from service.protocol.v2_types import InputSpec

# JSON element types each kind of datatype accepts, and their name for messages.
_JSON_ELEMENTS: dict[str, tuple[frozenset[type], str]] = {
    "b": (frozenset({bool}), "booleans"),
    "i": (frozenset({int}), "integers"),
    "u": (frozenset({int}), "integers"),
    "f": (frozenset({int, float}), "numbers"),
    "O": (frozenset({str}), "strings"),
}


def decode_json_data(spec: InputSpec) -> np.ndarray:
    """The tensor ``spec`` declares, from its ``data`` (flat or nested, row-major)."""
    if not isinstance(spec.data, list):
        raise spec.fail(f"'data' must be a JSON array, got {json_kind(spec.data)}")
    # Flat data (the usual V2 form, row-major) needs no flattening pass.
    flat = _flatten(spec.data) if spec.data and isinstance(spec.data[0], list) else spec.data
    # Types first: ragged data flattens to the wrong count, and "ragged" is the better message.
    _check_element_types(spec, flat)
    if len(flat) != spec.count:
        raise spec.fail(f"shape {list(spec.shape)} needs {spec.count} elements, got {len(flat)}")
    return convert_flat(spec, flat).reshape(spec.shape)


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of flat or nested data in C: one numpy pass, no Python recursion.

    With dtype=object numpy nests only as deep as the lists are regular and leaves whatever is
    ragged as list elements, which the type check then reports.
    """
    flat: list[Any] = np.array(data, dtype=np.object_).ravel().tolist()
    return flat


def _check_element_types(spec: InputSpec, flat: list[Any]) -> None:
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
        f"{spec.datatype} data must hold {wanted}, found {json_kind(value)} at element {index}"
    )


def convert_flat(spec: InputSpec, flat: list[Any]) -> np.ndarray:
    """Flat elements of the right Python types -> the 1-D array of ``spec``'s datatype, with
    every value checked to fit it (out-of-range integers, non-finite floats): what JSON data
    and gRPC's typed contents share."""
    if spec.datatype == "BYTES":
        return object_array([text.encode("utf-8") for text in flat])
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    if dtype.kind in "iu":
        return _convert_integers(spec, flat, dtype)
    if dtype.kind == "f":
        return _convert_floats(spec, flat, dtype)
    return np.array(flat, dtype=dtype)


def _convert_integers(spec: InputSpec, flat: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
    try:
        return np.array(flat, dtype=dtype)
    except OverflowError:
        info = np.iinfo(dtype)
        index, value = next((i, v) for i, v in enumerate(flat) if not info.min <= v <= info.max)
        raise spec.fail(
            f"value {value} at element {index} is out of range for {spec.datatype} "
            f"[{info.min}, {info.max}]"
        ) from None


def _convert_floats(spec: InputSpec, flat: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
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


def _float_problem(spec: InputSpec, value: float, index: int) -> str:
    # JSON has no NaN or Infinity; a value only gets here from a lenient encoder upstream.
    if isinstance(value, float) and not math.isfinite(value):
        return f"element {index} is not a finite number"
    return f"value {preview(value)} at element {index} is out of range for {spec.datatype}"


def encode_json_data(name: str, array: np.ndarray, datatype: str) -> Any:
    """An output's ``data``: a flat row-major array orjson serializes, or a list of text."""
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
