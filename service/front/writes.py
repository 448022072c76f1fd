"""One send() per answer.

uvicorn's response cycle writes the status line and headers as soon as the app starts its
answer, and the body in a second write: two system calls, two wake-ups of the client, where
one would do. Under overload, with 256 connections refused at once, those two writes were a
third of the event loop's time (py-spy). ``OneSend`` is the transport as one cycle sees it:
the head is held until the body's first bytes and both leave in one ``writelines`` (one
``writev``, no copy).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE


class _Cycle(Protocol):
    response_started: bool
    scope: Any


class OneSend:
    """Stands in for the connection's transport in one request's response cycle (which only
    writes, closes and asks whether the transport is closing)."""

    __slots__ = ("cycle", "head", "sent_head", "transport")

    def __init__(self, transport: asyncio.Transport, cycle: _Cycle) -> None:
        self.transport = transport
        self.cycle = cycle
        self.head: bytes | None = None
        # An answer to HEAD has no body write to wait for: its head goes as it comes.
        self.sent_head = cycle.scope["method"] == "HEAD"

    def write(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            self.head = None
            self.transport.writelines((head, data))
        elif self.sent_head or not self.cycle.response_started:
            # The body's later writes, or what precedes an answer ("100 Continue").
            self.transport.write(data)
        else:
            self.head = data
            self.sent_head = True

    def close(self) -> None:
        if self.head is not None:  # an answer begun and never finished: its head at least
            self.transport.write(self.head)
            self.head = None
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def raw_answer(
    status_line: bytes,
    default_headers: list[tuple[bytes, bytes]],
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    close: bool,
    head_only: bool = False,
) -> bytes:
    """A whole answer written by the connection itself, not through an app's response cycle
    (the front's own refusals, ``answer``): ``headers`` must not hold Content-Length or
    Connection. ``head_only``: the answer to HEAD, its body's length but not the body."""
    head = [status_line]
    for name, value in (*default_headers, *headers):
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return b"".join(head)


async def answer(
    cycle: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, head_only: bool
) -> None:
    """The whole answer of an app's request in one write, with the bookkeeping of uvicorn's
    own ``send`` (httptools_impl.RequestResponseCycle; uvicorn is pinned): its back-pressure
    wait, a gone client, keep-alive or close, and the next request of the connection.

    Through ``send`` an answer costs two ASGI messages, each checked, its headers copied and
    searched by regular expressions, a second write held back by ``OneSend``; the headers here
    are the front's own (X-Request-ID is bounded and comes from a parsed request line, which
    cannot hold CR or LF).
    """
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected or cycle.response_started:
        return
    data = raw_answer(
        STATUS_LINE[status],
        cycle.default_headers,
        headers,
        body,
        close=not cycle.keep_alive,
        head_only=head_only,
    )
    cycle.transport.write(data)  # before response_started: OneSend passes it straight on
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
