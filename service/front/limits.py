"""Limits at the front: what one connection may cost before the app sees a request.

uvicorn's httptools protocol (the C parser: about twice the requests/s of h11 here) buffers a
request's whole header section with no bound, has no header or body read timeout, and starts
its keep-alive timeout only after a first response. Measured on loopback without this guard:
8 connections sending 1,024 headers of 64 KB each took RSS from 108 MB to 623 MB; 500
connections sending headers at 1 byte/s, 20 slow 1 MB bodies and 2,000 silent connections all
stayed open; 1,100 silent connections against a 1,024 file-descriptor limit locked out every
client. ``GuardedHttpProtocol`` is that protocol with limits, each a Settings field:

- ``max_header_bytes``: request line plus headers; beyond, 431. Counted as the bytes arrive,
  before the parser sees them, so memory stays bounded whatever the number or size of headers:
  8 connections sending 64 MB of headers each raise the peak RSS by under 8 MB (+533 MB
  without the guard).
- ``header_timeout_s``, from a request's first byte until its headers are complete: 408.
- ``body_timeout_s``, from the end of the headers until the body is complete: 408, and the
  app's pending ``receive()`` returns ``http.disconnect``, so nothing runs for the request. A
  total deadline, not a minimum rate: it bounds how long any one connection can be held (a
  client keeping to a minimum rate holds one for as long as the largest body takes at that
  rate); the 30 s default carries the largest body accepted (16 MB) at 4.5 Mbit/s. It runs
  for a pipelined request too while it waits its turn (clients rarely pipeline).
- ``idle_timeout_s`` without a request, on a fresh connection that has sent nothing as on a
  kept-alive one between requests: closed without an answer.
- ``max_connections`` per process, never more than the open-file limit (raised to its hard
  limit at start-up) minus OPEN_FILES_RESERVE. At the cap, the longest-standing connection
  without a request in progress (idle, still sending its headers, or lingering after an answer
  from here) is closed to admit the new one, so silent and slow connections cannot lock out
  real clients; a connection found busy goes to the back of the line. Only when none of the
  first EVICTION_SCAN looked at is at rest is the new one closed at once, before anything is
  read from it.
- On SIGTERM, a request still sending its headers or body gets SHUTDOWN_GRACE_S to finish:
  then it is served like the others in flight (which drain as before), or answered 503, where
  uvicorn alone waited out the graceful period and ended it with a 500 and a traceback.

Every answer given here is JSON ``{"error": ...}`` with ``Connection: close``. The connection is
then half-closed and what the client still sends is read and thrown away for up to LINGER_S:
closing a socket with unread data makes the kernel send a reset, which can destroy the answer
before the client has read it.

Deadlines are checked by one sweep per process every ``tick_s`` (a quarter of the shortest
timeout, at most 1 s), not by a timer per request, against a clock read once per tick. On the
hot path a request crosses two overridden callbacks that store a phase and a deadline:
in process, with a trivial app, 27.2 µs of CPU per keep-alive request against uvicorn's own
23.6 µs; on the server's health route (wrk, 64 connections, 6 interleaved rounds) a median
64 µs of server CPU per request against 61, requests/s the same within noise. A first version
that also kept an eviction queue and its own keep-alive deadline up to date on every request
cost twice as much; now eviction and keep-alive read uvicorn's state only when they are due.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.front.asgi import DISCONNECT_WATCH, RESPONSE_CYCLE
from service.front.errors import error_body
from service.front.writes import OneSend, raw_answer
from service.settings import OPEN_FILES_RESERVE, Settings

log = logging.getLogger("normserve.front")

# Long enough for a client to read the answer it is still sending over; short enough that a
# client that never stops sending holds its socket no longer than this.
LINGER_S = 1.0
# The guard's refusals are counted and logged at most this often, so a flood is one log line
# per interval rather than one per connection.
REPORT_EVERY_S = 10.0
# On SIGTERM, how long a request still being sent may take to arrive: one in transit arrives
# in milliseconds and is then served; one that stalls is answered 503, so it cannot hold the
# shutdown for the whole graceful period.
SHUTDOWN_GRACE_S = 1.0
# At the cap, how many connections a new one may look through for one to evict: bounds the
# cost of each connection attempt when every connection is busy.
EVICTION_SCAN = 64

# The longest a connection refused for overload goes unread (see _hold_off).
MAX_HOLD_OFF_S = 1.0
# The lifespan-state key under which the app leaves its early refusal for the connections.
EARLY_REFUSAL = "normserve.refuse_early"

# Where the parser is in a connection's current request.
IDLE, HEADERS, BODY = 0, 1, 2


@dataclass(frozen=True)
class FrontLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    max_connections: int

    @property
    def tick_s(self) -> float:
        """How often deadlines are checked: each is kept to within this."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.idle_timeout_s)
        return min(1.0, max(0.05, shortest / 4))


_limits: FrontLimits | None = None


def configure(settings: Settings) -> FrontLimits:
    """This process's limits, from ``settings``; call before the server starts.

    Raises the open-file soft limit to the hard limit, as servers commonly do, and lowers the
    connection cap to fit under it (an explicit value too high was refused by Settings).
    """
    global _limits
    room = raise_open_files_limit() - OPEN_FILES_RESERVE
    cap = settings.max_connections
    if cap > room:
        log.warning(
            "max_connections lowered from %d to %d: the open-file limit leaves no more "
            "after %d reserved for model, log and metric files",
            cap,
            max(1, room),
            OPEN_FILES_RESERVE,
        )
        cap = max(1, room)
    _limits = FrontLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_connections=cap,
    )
    return _limits


def process_limits() -> FrontLimits:
    """The configured limits; in a worker process, from the ``NORMSERVE_*`` environment."""
    return _limits if _limits is not None else configure(Settings())


def raise_open_files_limit() -> int:
    """Raises RLIMIT_NOFILE's soft limit to its hard limit where allowed; the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


class Guard:
    """One server's connections: the cap, the eviction order and the deadline sweep."""

    def __init__(self, limits: FrontLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.loop = loop
        # Admission order, refreshed for a connection found busy: the eviction order.
        self.connections: OrderedDict[GuardedHttpProtocol, None] = OrderedDict()
        self.sweeping: asyncio.TimerHandle | None = None
        self.counts: Counter[str] = Counter()
        self.reported_at = loop.time()
        # A clock read once per tick, not per request; a tick is added to each timeout so
        # that none ends early: each ends within two ticks after it is due.
        self.now = loop.time()
        tick = limits.tick_s
        self.header_s = limits.header_timeout_s + tick
        self.body_s = limits.body_timeout_s + tick
        self.idle_s = limits.idle_timeout_s + tick
        self.shutdown_grace_s = SHUTDOWN_GRACE_S + tick

    def admit(self, connection: GuardedHttpProtocol) -> bool:
        if len(self.connections) >= self.limits.max_connections:
            victim = self._at_rest()
            if victim is None:
                self.counts["refused at the cap"] += 1
                return False
            self.forget(victim)
            victim.transport.close()
            self.counts["evicted at the cap"] += 1
        self.connections[connection] = None
        if self.sweeping is None:
            self.now = self.loop.time()
            self.sweeping = self.loop.call_later(self.limits.tick_s, self.sweep)
        return True

    def _at_rest(self) -> GuardedHttpProtocol | None:
        """The longest-standing connection without a request in progress, among the first
        EVICTION_SCAN; those found busy go to the back of the line."""
        for _ in range(min(EVICTION_SCAN, len(self.connections))):
            candidate = next(iter(self.connections))
            if candidate.at_rest():
                return candidate
            self.connections.move_to_end(candidate)
        return None

    def forget(self, connection: GuardedHttpProtocol) -> None:
        self.connections.pop(connection, None)

    def sweep(self) -> None:
        self.now = now = self.loop.time()
        for connection in [c for c in self.connections if c.deadline <= now]:
            connection.expire()
        if self.counts and now - self.reported_at >= REPORT_EVERY_S:
            counts = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
            log.warning("front limits in the last %.0f s: %s", now - self.reported_at, counts)
            self.counts.clear()
            self.reported_at = now
        # Idle without connections, until what was counted has been reported.
        active = self.connections or self.counts
        self.sweeping = self.loop.call_later(self.limits.tick_s, self.sweep) if active else None


# One guard per server (uvicorn's ServerState), created by its first connection.
_guards: weakref.WeakKeyDictionary[ServerState, Guard] = weakref.WeakKeyDictionary()


def _guard_of(state: ServerState, loop: asyncio.AbstractEventLoop) -> Guard:
    guard = _guards.get(state)
    if guard is None:
        guard = _guards[state] = Guard(process_limits(), loop)
    return guard


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; pass it as ``uvicorn.run(http=)``.

    Per request it adds two overridden callbacks (``data_received``, ``on_message_complete``)
    and a few attribute writes; deadlines, eviction and the keep-alive timeout read uvicorn's
    own state when they are due instead of being kept up to date on every request.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = _guard_of(server_state, self.loop)
        self.limits = self.guard.limits
        # Between requests uvicorn's own keep-alive timer closes an idle connection.
        self.timeout_keep_alive = self.limits.idle_timeout_s  # type: ignore[assignment]
        self.phase = IDLE
        self.deadline = math.inf
        self.header_room = self.limits.max_header_bytes  # left for this request's header bytes
        self.completed = 0  # requests fully received on this connection
        self.answered = False  # answered here: what arrives now is thrown away
        self.stopping = False  # the server is shutting down: the grace deadline runs
        self.lingering: asyncio.TimerHandle | None = None
        # service.front.asgi.DisconnectWatch: the future of the request being answered, which
        # a lost connection cancels, and whether the connection was lost.
        self.watched: asyncio.Future[Any] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.answered = True
            transport.close()
            return
        self.deadline = self.guard.now + self.guard.idle_s  # a fresh connection's first request

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        watched = self.watched
        if watched is not None and not watched.done():
            watched.cancel()
        self.guard.forget(self)
        if self.lingering is not None:
            self.lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        if self.phase == BODY:
            super().data_received(data)
            return
        if self.phase == IDLE:  # the first bytes of a request
            self.phase = HEADERS
            self.deadline = self.guard.now + self.guard.header_s
        cycle = self.cycle
        room = self.header_room
        if len(data) <= room:
            self.header_room = room - len(data)
            super().data_received(data)
            self._after_headers(cycle)
            return
        # More than this request's header section may still take: parse only that much. The
        # bytes after a request that ends within one read are not counted against the next
        # one, so a pipelined request may exceed the limit by at most one read (256 KiB).
        completed = self.completed
        super().data_received(data[:room])
        if self.answered or self.transport.is_closing():
            return
        self._after_headers(cycle)
        if self.phase == BODY or self.completed != completed:
            self.data_received(data[room:])
        else:
            self.guard.counts["answered 431"] += 1
            self.answer(431, f"request headers exceed {self.limits.max_header_bytes} bytes")

    def _after_headers(self, before: httptools_impl.RequestResponseCycle | None) -> None:
        # uvicorn makes a new cycle when a request's headers are complete; if its body is
        # still to come, the body deadline starts now (when stopping, the grace still runs).
        cycle = self.cycle
        if cycle is before or self.answered:
            return
        cycle.transport = OneSend(self.transport, cycle)  # type: ignore[assignment]
        if self.stopping:
            cycle.keep_alive = False
        if cycle.more_body:
            self.phase = BODY
            if not self.stopping:
                self.deadline = self.guard.now + self.guard.body_s

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.phase = IDLE
        self.header_room = self.limits.max_header_bytes
        self.completed += 1
        self.deadline = math.inf  # the request is in; then uvicorn's keep-alive timer applies

    def at_rest(self) -> bool:
        """No request in progress: idle, sending headers, or lingering after an answer."""
        cycle = self.cycle
        return self.answered or (
            self.phase != BODY and not self.pipeline and (cycle is None or cycle.response_complete)
        )

    def expire(self) -> None:
        """Called by the sweep once the deadline has passed."""
        if self.phase == IDLE:  # not worth a log line: browsers open connections they never use
            self.guard.forget(self)
            self.deadline = math.inf
            self.transport.close()
            return
        if self.stopping:
            self.answer(503, "the server is shutting down; send the request again")
            return
        self.guard.counts["answered 408"] += 1
        if self.phase == HEADERS:
            self.answer(
                408, f"request headers not complete within {self.limits.header_timeout_s:g} s"
            )
        else:
            self.answer(408, f"request body not complete within {self.limits.body_timeout_s:g} s")

    def answer(self, status: int, error: str) -> None:
        """Answers the request being received with ``status``, then closes the connection.

        A request the app is handling is cut off: its ``receive()`` returns ``http.disconnect``
        and what it sends is dropped. When an earlier request's answer is still pending, or
        this one's has begun, the connection is closed without an answer.
        """
        self.answered = True
        self.deadline = math.inf
        if self.transport.is_closing():
            self.guard.forget(self)
            return
        cycle = self.cycle
        pending = cycle is not None and not cycle.response_complete
        if self.phase == BODY:  # this request's own answer must not have begun
            can_answer = cycle is not None and pending and not cycle.response_started
        else:  # nor may an earlier request's still be on its way
            can_answer = not pending
        if cycle is not None and pending:
            cycle.keep_alive = False
            cycle.disconnected = True
            cycle.message_event.set()
        if not can_answer or self.pipeline:
            self.guard.forget(self)
            self.transport.close()
            return
        self.transport.write(
            raw_answer(
                STATUS_LINE[status],
                self.server_state.default_headers,
                [(b"content-type", b"application/json")],
                error_body(error),
                close=True,
            )
        )
        self._linger()

    def _start_asgi_task(self, cycle: httptools_impl.RequestResponseCycle, app: Any) -> None:
        # The app's early refusal (service.front.dispatch.HttpFront.refuse_early), put in the
        # lifespan state: a request it refuses gets its answer now, with no task, and its
        # body, if any, is read and dropped by uvicorn (its cycle is complete).
        refuse = self.app_state.get(EARLY_REFUSAL)
        refused = refuse(cycle.scope) if refuse is not None else None
        if refused is None:
            scope = cast(dict[str, Any], cycle.scope)
            scope[DISCONNECT_WATCH] = self
            scope[RESPONSE_CYCLE] = cycle
            super()._start_asgi_task(cycle, app)
            return
        response, request_id = refused
        headers = [*response.headers, (b"x-request-id", request_id)]
        cycle.response_started = cycle.response_complete = True
        self.transport.write(
            raw_answer(
                STATUS_LINE[response.status],
                self.server_state.default_headers,
                headers,
                response.body,
                close=not cycle.keep_alive,
            )
        )
        if not cycle.keep_alive:
            self.answered = True
            self._linger()
            return
        cycle.on_response()  # the next request may come (or a pipelined one start)
        retry_after = dict(response.headers).get(b"retry-after")
        if retry_after is not None and not self.pipeline:
            self._hold_off(min(MAX_HOLD_OFF_S, float(retry_after)))

    def _hold_off(self, seconds: float) -> None:
        """Reads nothing more from a client refused for overload until the Retry-After it was
        given has passed (at most MAX_HOLD_OFF_S). It costs nothing, and a client that sends
        again at once (wrk does) no longer makes refusals eat the capacity to answer: at 256
        such connections, refusing a 62 KB body 4,400 times a second took most of the loop's
        time. A client that waits as told never notices. The refused request's body, still
        to come, is read and dropped afterwards, within the body timeout."""
        self.flow.pause_reading()
        self.loop.call_later(seconds, self._end_hold_off)

    def _end_hold_off(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def _linger(self) -> None:
        # First in line for eviction: nothing is expected from this connection any more.
        if self in self.guard.connections:
            self.guard.connections.move_to_end(self, last=False)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self.lingering = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request the parser rejects, in the same JSON as every other.
        self.answer(400, msg)

    def shutdown(self) -> None:
        """Graceful shutdown. A request still being sent has SHUTDOWN_GRACE_S more to arrive:
        then it is served like any in flight, or answered 503. The rest as uvicorn does."""
        cycle = self.cycle
        if self.phase == BODY:  # the cycle is this request's: has its answer begun?
            answering = cycle is not None and cycle.response_started
        else:  # the cycle is an earlier request's: is its answer still on its way?
            answering = cycle is not None and not cycle.response_complete
        if self.answered:
            self.transport.close()
        elif self.phase == IDLE or self.pipeline or answering:
            super().shutdown()
        else:
            self.stopping = True
            if cycle is not None:
                cycle.keep_alive = False
            self.deadline = min(self.deadline, self.guard.now + self.guard.shutdown_grace_s)
