"""Naming a client's values in error messages without echoing them at length."""

from __future__ import annotations

from typing import Any

import orjson


def json_kind(value: Any) -> str:
    """A JSON value's kind, e.g. "a list" or "the number 3"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {preview(value)}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def preview(value: Any, limit: int = 60) -> str:
    """``value`` as JSON, cut to ``limit`` characters."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # ints beyond 64 bits, and anything orjson does not know
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
