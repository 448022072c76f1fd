"""ASGI in the few words this server needs: the types, one request, one response.

No web framework: profiled under load, FastAPI's routing, dependency solving and
middleware took about half of the event loop's time per inference request, and
Starlette's Request/Response objects another ~15% of what was left (docs/design/
protocol-core.md has the numbers). A request here reads its headers from the scope and its
body from ``receive``; a response is two ``send`` messages.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson

from service.errors import ClientDisconnected, PayloadTooLarge
from service.front.encoding import Inflater, request_coding
from service.front.writes import answer
from service.protocol.request_limits import header_int

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

JSON = b"application/json"
T = TypeVar("T")

# Where the connection (service.front.limits) offers to watch for its client going away: a
# ``DisconnectWatch`` in the scope. Under another server the request watches for itself.
DISCONNECT_WATCH = "normserve.disconnect_watch"
# Where it offers the request's response cycle, to answer in one write (writes.answer);
# under another server answers go through the ASGI ``send``.
RESPONSE_CYCLE = "normserve.response_cycle"
_GONE = "the client disconnected before its answer was ready"


class DisconnectWatch(Protocol):
    """The connection a request came on: it cancels ``watched`` if its client goes away
    before that future is done, and says whether that happened (``lost``)."""

    watched: asyncio.Future[Any] | None
    lost: bool


@dataclass(slots=True)
class Request:
    scope: Scope
    receive: Receive
    params: dict[str, str]
    request_id: bytes

    @property
    def method(self) -> str:
        method: str = self.scope["method"]
        return method

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), as latin-1 text."""
        for key, value in self.scope["headers"]:
            if key == name:
                text: str = value.decode("latin-1")
                return text
        return None

    def content_length(self) -> int | None:
        return header_int("Content-Length", self.header(b"content-length"))

    async def body(self, limit: int, declared: int | None) -> bytes:
        """The body, refused with 413 past ``limit`` bytes (``declared``, the request's
        Content-Length, first, then counted while streaming); a compressed body
        (Content-Encoding) is inflated as it arrives and its inflated size bounded too."""
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
        coding = request_coding(self.header(b"content-encoding"))
        inflater = Inflater(coding, limit) if coding is not None else None
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            # A plain loop, not an async generator: one of those per request cost ~5% of the
            # loop's time under load (its creation, finalizer hooks and an extra frame).
            chunk, more = _chunk(await self.receive())
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                if inflater is not None:
                    await inflater.feed(chunk)
                else:
                    chunks.append(chunk)
        if inflater is not None:
            return inflater.finish()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def until_disconnected(self, result: asyncio.Future[T]) -> T:
        """``result``, or cancel it when the client goes away first.

        Cancelling the batcher's future makes the batcher skip the request: a client that
        gave up costs no inference and frees its place in the queue. The connection itself
        cancels it when the server offers that (``DISCONNECT_WATCH``, set by the front's
        connection): no task per request. Otherwise one watcher task and a callback; no task
        for the work itself and no ``asyncio.wait``, which together cost about 8% of the event
        loop's time per request under load.
        """
        watch: DisconnectWatch | None = self.scope.get(DISCONNECT_WATCH)
        if watch is None:
            return await self._watching(result)
        if watch.lost:
            result.cancel()
            raise ClientDisconnected(_GONE)
        watch.watched = result
        try:
            return await result
        except asyncio.CancelledError:
            if watch.lost:
                raise ClientDisconnected(_GONE) from None
            raise  # the server cancelled this request (shutdown): not the client's doing
        finally:
            watch.watched = None

    async def _watching(self, result: asyncio.Future[T]) -> T:
        watcher = asyncio.ensure_future(_disconnect(self.receive))
        watcher.add_done_callback(functools.partial(_cancel_on_disconnect, result))
        try:
            return await result
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
                raise ClientDisconnected(_GONE) from None
            raise  # the server cancelled this request (shutdown): not the client's doing
        finally:
            watcher.cancel()


def _chunk(message: Message) -> tuple[bytes, bool]:
    """One ``http.request`` message's body bytes and whether more follow."""
    if message["type"] == "http.disconnect":
        raise ClientDisconnected("the client disconnected while sending its body")
    return message.get("body", b""), message.get("more_body", False)


def _cancel_on_disconnect(result: asyncio.Future[Any], watcher: asyncio.Future[None]) -> None:
    if not watcher.cancelled() and watcher.exception() is None and not result.done():
        result.cancel()


async def _disconnect(receive: Receive) -> None:
    # The body has been read: the next message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: RawHeaders = field(default_factory=list)


def json_response(content: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(content), [(b"content-type", JSON)])


async def send_response(
    scope: Scope, send: Send, response: Response, request_id: bytes, *, head: bool = False
) -> None:
    headers = response.headers
    headers.append((b"x-request-id", request_id))
    cycle = scope.get(RESPONSE_CYCLE)
    if cycle is not None:
        await answer(cycle, response.status, headers, response.body, head_only=head)
        return
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})
