"""One inference request, from ASGI ``receive`` to the response body: no web framework.

The inference fast path (service.fastpath) and the documented FastAPI routes (service.v2,
service.v1) both call these, so the two can never answer differently; and the server can
answer inference before FastAPI is even imported (see service.app).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import orjson

from service import codec
from service.codec_v1 import decode_v1, encode_v1
from service.errors import ClientDisconnected, InvalidInput, PayloadTooLarge
from service.store import ModelStore

HEADER_LENGTH = "inference-header-content-length"

T = TypeVar("T")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The body from ASGI ``receive``, refused with 413 past ``limit`` bytes (the declared
    Content-Length first, then counted while streaming)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending its body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def until_disconnected(receive: Receive, result: asyncio.Future[T]) -> T:
    """``result``, or cancel it when the client goes away first.

    Cancelling the batcher's future makes the batcher skip the request: a client that gave
    up costs no inference and frees its place in the queue. One watcher task per request
    and a callback; no task for the work itself and no ``asyncio.wait``, which together
    cost about 8% of the event loop's time per request under load.
    """
    watcher = asyncio.ensure_future(_disconnect(receive))
    watcher.add_done_callback(functools.partial(_cancel_on_disconnect, result))
    try:
        return await result
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
            raise ClientDisconnected(
                "the client disconnected before its answer was ready"
            ) from None
        raise  # the server cancelled this request (shutdown): not the client's doing
    finally:
        watcher.cancel()


def _cancel_on_disconnect(result: asyncio.Future[Any], watcher: asyncio.Future[None]) -> None:
    if not watcher.cancelled() and watcher.exception() is None and not result.done():
        result.cancel()


async def _disconnect(receive: Receive) -> None:
    # The body has been read: the next message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def infer_payload(
    store: ModelStore,
    model_name: str,
    version: str | None,
    receive: Receive,
    content_length: str | None,
    header_length: str | None,
) -> tuple[bytes, dict[str, str]]:
    """One V2 inference from ASGI ``receive``: the response body and its headers.

    Errors raise NormserveError. The model is looked up before the body is read, so an
    unknown model is refused without reading a large body.
    """
    served = store.get(model_name, version)
    body = await read_body(receive, content_length, store.settings.max_request_bytes)
    parsed = codec.decode_infer_request(body, _header_length(header_length), store.settings.limits)
    outputs = await until_disconnected(
        receive, store.submit(served, parsed.inputs, parsed.timeout_ms)
    )
    return codec.encode_infer_response(
        served.config.name,
        served.version,
        parsed.id,
        outputs,
        parsed.outputs,
        parsed.binary_output,
    )


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got '{value}'")
    return int(value)


async def predict_payload(
    store: ModelStore, model_name: str, receive: Receive, content_length: str | None
) -> bytes:
    """One V1 prediction from ASGI ``receive``: the JSON response body. Errors raise
    NormserveError."""
    served = store.get(model_name)
    body = await read_body(receive, content_length, store.settings.max_request_bytes)
    payload = codec.decode_json_body(body)
    codec.check_depth(payload, store.settings.max_json_depth, body)
    outputs = await until_disconnected(
        receive, store.submit(served, decode_v1(payload, served.config), None)
    )
    return orjson.dumps(encode_v1(outputs, served.config))
