"""Triton's binary tensor data extension: raw little-endian tensors after a JSON header.

A request body is a JSON header of ``Inference-Header-Content-Length`` bytes, then the raw
tensors of the inputs that carry ``parameters.binary_data_size``, in the order of the
inputs list; a response the same with outputs. BYTES elements are each a 4-byte
little-endian length followed by that many bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from service.datatypes import DATATYPE_TO_NUMPY
from service.errors import InvalidInput
from service.protocol.v2_types import InputSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH_PREFIX = struct.Struct("<I")


def split_body(body: bytes, json_length: int | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary tail (memoryview slices: the tail is never copied)."""
    view = memoryview(body)
    if json_length is None:
        return view, view[len(view) :]
    if json_length <= 0 or json_length > len(view):
        raise InvalidInput(
            f"{HEADER_LENGTH} is {json_length} but the body is {len(view)} bytes; "
            "it must be the size of the JSON header, between 1 and the body size"
        )
    return view[:json_length], view[json_length:]


def binary_chunks(
    specs: list[InputSpec], binary: memoryview, json_length: int | None
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


def decode_binary(spec: InputSpec, chunk: memoryview | bytes) -> np.ndarray:
    """The tensor ``spec`` declares, from its raw bytes."""
    if spec.datatype == "BYTES":
        return _decode_bytes(spec, chunk).reshape(spec.shape)
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


def _decode_bytes(spec: InputSpec, chunk: memoryview | bytes) -> np.ndarray:
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
    return object_array(elements)


def object_array(elements: list[bytes]) -> np.ndarray:
    """A BYTES tensor. Filled element by element: np.array(list_of_bytes) would make a
    fixed-width 'S' array that silently drops trailing NUL bytes."""
    array = np.empty(len(elements), dtype=np.object_)
    array[:] = elements
    return array


def encode_binary(name: str, array: np.ndarray, datatype: str) -> bytes:
    """An output tensor's raw bytes (row-major, little-endian; BYTES length-prefixed)."""
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
