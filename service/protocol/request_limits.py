"""Bounds on what one request may declare, checked before anything is allocated from it.

JSON nesting, tensors per request, elements per tensor, rank, and the integers that arrive
as header text. Every refusal is ``InvalidInput`` with the limit in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from service.datatypes import MAX_ITEMSIZE
from service.errors import InvalidInput
from service.protocol.text import preview

# numpy's own limit on dimensions (NPY_MAXDIMS); a shape beyond it cannot become an array.
MAX_RANK = 64
_MAX_BYTES = 2**63 - 1
_COUNT_BELOW = 4096  # bytes: below it, counting brackets is cheaper than walking


@dataclass(frozen=True)
class Limits:
    """Request limits (from Settings); the defaults are Settings' defaults."""

    max_depth: int = 32  # JSON nesting levels
    max_elements: int = 16_777_216  # elements of one tensor, from its declared shape
    max_tensors: int = 64  # entries of 'inputs' plus 'outputs'


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


def header_int(name: str, value: str | None) -> int | None:
    """A non-negative integer header, or None when absent.

    ASCII digits only: ``str.isdigit()`` also accepts '²' or Arabic-Indic digits, which
    ``int()`` then refuses or reads differently.
    """
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidInput(f"{name} must be a non-negative integer, got {preview(value, 32)}")
    return int(value)


def check_shape(name: str, value: Any, *, present: bool = True) -> tuple[int, ...]:
    """A request tensor's declared shape: a list of at most MAX_RANK non-negative integers
    whose elements fit in memory at all."""
    if not present:
        raise InvalidInput(f"input {name!r}: missing 'shape'")
    # A request shape is concrete: -1 belongs in model metadata, never in the data sent.
    if not _is_dims(value):
        raise InvalidInput(
            f"input {name!r}: shape must be a list of non-negative integers, got {preview(value)}"
        )
    if len(value) > MAX_RANK:
        raise InvalidInput(
            f"input {name!r}: shape has {len(value)} dimensions; the limit is {MAX_RANK}"
        )
    # Zero-sized tensors still get reshaped, and numpy refuses shapes whose non-zero dims
    # overflow its index type: refuse them here, with a message, instead of a 500 later.
    if math.prod([dim for dim in value if dim]) * MAX_ITEMSIZE > _MAX_BYTES:
        raise InvalidInput(f"input {name!r}: shape {preview(value)} is too large")
    return tuple(value)


def _is_dims(value: Any) -> TypeGuard[list[int]]:
    """A list of non-negative ints (``type()``: ``true`` is not a dimension). A loop, not
    ``all()`` over a generator: this runs for every input of every request."""
    if type(value) is not list:
        return False
    for dim in value:  # noqa: SIM110 (the loop is the point)
        if type(dim) is not int or dim < 0:
            return False
    return True


def check_document(document: dict[str, Any], limits: Limits, text: bytes) -> None:
    """Tensor count, nesting depth and each input's declared element count."""
    inputs, outputs = document.get("inputs"), document.get("outputs")
    inputs = inputs if isinstance(inputs, list) else []
    check_tensor_count(len(inputs) + (len(outputs) if isinstance(outputs, list) else 0), limits)
    check_depth(document, limits.max_depth, text)
    for entry in inputs:
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if _is_dims(shape):
            check_elements(entry.get("name"), shape, limits)


def check_tensor_count(tensors: int, limits: Limits) -> None:
    """Inputs plus outputs named in one request (REST document or gRPC message)."""
    if tensors > limits.max_tensors:
        raise InvalidInput(
            f"the request names {tensors} inputs and outputs; the limit is {limits.max_tensors}"
        )


def check_elements(name: Any, shape: list[int] | tuple[int, ...], limits: Limits) -> None:
    """The elements one input's declared shape asks for, before anything is allocated."""
    count = math.prod(shape)
    if count > limits.max_elements:
        raise InvalidInput(
            f"input {name!r}: shape {preview(list(shape))} declares {count} "
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
