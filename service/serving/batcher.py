"""Dynamic batching: one bounded queue and one worker thread per model.

The worker takes the first waiting request, then whatever else has queued (up to the batch
limit in rows), optionally waits ``max_queue_delay`` for more, runs the batch and hands each
caller exactly its own rows. With no delay configured, a batch is what arrived while the
previous one ran: no latency is added at low load and batches grow with load by themselves
(a fixed window made single-client latency 5x worse when measured).

Batches run on a thread of their own, not as a task of the event loop: a task-driven batcher
needs three loop iterations per batch (wake, hand to a thread, take the result), and under
overload an iteration is as long as the reads and refusals of every connection; with a small
queue (``--max-queue-size 8``) at 256 connections, goodput fell to 0.12 of its value at 32.
The worker takes what is waiting as soon as a batch ends, whatever the loop is doing; the loop
only appends requests and, once per batch, sets the callers' results.

A request that finds the worker idle is handed to it one loop iteration later, so that the
requests read in the same iteration form one batch. If it is then alone and its inference is
known to be short, it runs on the event loop thread itself: waking the worker thread and back
cost about 1 ms on a 2-core VM, three times the inference.

A batch-dependent model (``merge=False``) never has requests merged: each runs alone, as
the batch its client sent, since another request's rows would change its answer.

The queue is bounded: a full queue raises ``Overloaded`` at once instead of queueing work
that would time out anyway. Requests whose deadline passed, or whose caller went away, are
dropped before they reach onnxruntime.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from service.operations.tracing import current_trace
from service.serving.runtime import OnnxModel

if TYPE_CHECKING:
    from service.operations.otel import RequestTrace

log = logging.getLogger("normserve.batcher")

Tensors = dict[str, np.ndarray]

# A lone request runs inline when its inference is expected to take at most this long; the
# loop is blocked meanwhile, so keep it well below a millisecond or two.
INLINE_BELOW_S = 0.0015
# How many recent batches the per-row compute estimate looks at.
ROW_SAMPLES = 32
# Weight of the newest measurement in the running estimate of one lone request's compute.
_EWMA_WEIGHT = 0.2


@dataclass
class BatchRecord:
    """What one executed batch cost, for metrics and statistics."""

    model: str
    rows: int
    requests: int
    queue_seconds: list[float]
    compute_seconds: float
    failed: bool = False
    # Triton's compute_input / compute_output: merging the requests' rows into the batch,
    # and handing each request its rows back.
    input_seconds: float = 0.0
    output_seconds: float = 0.0
    version: str = ""  # the model version that ran it (Triton's statistics are per version)


@dataclass
class _Pending:
    inputs: Tensors
    rows: int
    future: asyncio.Future[Tensors]
    enqueued: float
    deadline: float | None
    # The request's trace (service.operations.tracing); None when tracing is off.
    trace: RequestTrace | None = None


# What a batch gives each of its callers: its outputs, or the error it gets instead.
_Results = list[tuple[_Pending, Tensors | BaseException]]


class Batcher:
    def __init__(
        self,
        model: OnnxModel,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        on_batch: Callable[[BatchRecord], None] | None = None,
        merge: bool = True,
        inline_below_s: float = INLINE_BELOW_S,
    ) -> None:
        self.model = model
        self._version = str(model.version.version)
        # Work expected to take at most this long may run on the event loop's thread.
        self.inline_below_s = inline_below_s
        self.max_batch_size = max_batch_size
        # False for batch-dependent models: a request's rows are its batch, nothing is added.
        self.merge = merge
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._thread: threading.Thread | None = None
        # True from start() until the worker ends (it clears it on its way out, whatever the
        # cause): asked on every request, where Thread.is_alive() takes a lock.
        self._alive = False
        # Guards the four fields below, shared by the loop and the worker thread.
        self._cond = threading.Condition(threading.Lock())
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._busy = False  # the worker owns the queue's head (it has been handed the work)
        self._kicked = False  # a hand-over to the idle worker is scheduled on the loop
        self._stopping = False
        # Places held by admitted requests whose bodies are still being read and decoded
        # (loop thread only): they count against the queue's size, so that a request admitted
        # is never refused later, after the costly part, for want of room.
        self._reserved = 0
        # Running estimate of a one-request batch's compute time; None until measured.
        self.lone_compute_s: float | None = None
        # The last batches' compute time per row. A batch timed on the worker thread includes
        # its wait for the GIL after onnxruntime returns (up to the 5 ms switch interval while
        # the loop is busy), so the estimate is their minimum: waits only ever add.
        self._row_seconds: collections.deque[float] = collections.deque(maxlen=ROW_SAMPLES)

    def start(self) -> None:
        # Called in the lifespan: results are handed back to the running event loop.
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._thread = threading.Thread(
            target=self._work, name=f"batcher:{self.model.name}", daemon=True
        )
        self._alive = True
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._waiting)

    async def submit(self, inputs: Tensors, deadline: float | None = None) -> Tensors:
        """The model's outputs for ``inputs`` (validated), computed in some batch.

        ``deadline`` is a ``time.perf_counter()`` instant after which the request is not run.
        """
        return await self.enqueue(inputs, deadline)

    def reserve(self) -> None:
        """Holds a place in the queue for a request about to be read (refused if full); the
        caller either ``enqueue(..., reserved=True)``s it or ``release()``s it."""
        self.check_room()
        self._reserved += 1

    def release(self) -> None:
        """Gives back a place that ``reserve`` held and no request took."""
        self._reserved -= 1

    @property
    def held(self) -> int:
        """Places ``reserve`` holds that no request has taken or given back yet (a replaced
        model version waits for them before it stops)."""
        return self._reserved

    def enqueue(
        self, inputs: Tensors, deadline: float | None = None, *, reserved: bool = False
    ) -> asyncio.Future[Tensors]:
        """``submit`` without the coroutine: the future the batch will resolve. Cancelling it
        takes the request out of its batch (if the batch has not started). ``reserved``: the
        request takes the place ``reserve`` held for it, so it is not refused for room."""
        if reserved:
            self._reserved -= 1
            self._check_accepting()
        else:
            self.check_room()
        loop = self._loop
        assert loop is not None  # check_room refuses before start()
        rows = next(iter(inputs.values())).shape[0]
        future: asyncio.Future[Tensors] = loop.create_future()
        item = _Pending(inputs, rows, future, time.perf_counter(), deadline, current_trace.get())
        with self._cond:
            self._waiting.append(item)
            if self._busy:
                self._cond.notify()  # only a worker gathering a batch window is waiting
            elif not self._kicked:
                self._kicked = True
                loop.call_soon(self._kick)
        return future

    def check_room(self) -> None:
        """Overloaded when the queue is full: callers ask before decoding a request, so that
        a refusal under overload costs next to nothing."""
        self._check_accepting()
        if len(self._waiting) + self._reserved >= self.max_queue_size and not self._drain_inline():
            raise Overloaded(
                f"model '{self.model.name}' is overloaded: {self.max_queue_size} requests are "
                "already waiting; retry later"
            )

    def _check_accepting(self) -> None:
        if self._stopping or not self._alive:
            raise ModelNotReady(f"model '{self.model.name}' is not accepting requests")

    async def stop(self) -> None:
        """Finish what is queued, then end the worker (graceful shutdown). New requests are
        refused from now on."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            if self._waiting and not self._busy:
                self._busy = True
            self._cond.notify_all()
        # The worker hands its last results to the loop before it ends; they are handled
        # before this coroutine resumes (the loop's callbacks run in order).
        await asyncio.to_thread(thread.join)

    # ----------------------------------------------------------------- loop side

    def _kick(self) -> None:
        """One loop iteration after a request found the worker idle: run a lone quick request
        right here, hand anything else to the worker."""
        with self._cond:
            self._kicked = False
            if self._busy or not self._waiting:
                return
            # With a queue delay set, even a lone request waits for company: the worker's.
            gather = self.merge and self.max_queue_delay_s > 0
            if len(self._waiting) > 1 or gather or not self._inline_ok():
                self._busy = True
                self._cond.notify()
                return
            item = self._waiting.popleft()
        self._deliver(*self._run_batch([item]))

    def _drain_inline(self) -> bool:
        """With the queue full and a batch of this model known to be quick, the loop runs the
        head of the queue itself rather than refuse: a refusal costs the loop a good part of
        what that batch costs, and the client sends again at once. True if there is room now.
        """
        if not self._row_seconds:
            return False
        per_row = min(self._row_seconds)
        with self._cond:
            waiting = self._waiting
            if not waiting:  # full of reserved places: nothing to run yet
                return False
            rows = min(self.max_batch_size, sum(item.rows for item in waiting))
            if per_row * rows > self.inline_below_s:
                return False
            batch = self._take()
        self._deliver(*self._run_batch(batch))
        return len(self._waiting) + self._reserved < self.max_queue_size

    def _inline_ok(self) -> bool:
        """A lone request of a model known to be quick may run on the loop."""
        return self.lone_compute_s is not None and self.lone_compute_s <= self.inline_below_s

    def _deliver(self, results: _Results, record: BatchRecord | None) -> None:
        for item, result in results:
            if item.future.done():  # the caller went away meanwhile
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        if record is not None and self._on_batch is not None:
            self._on_batch(record)

    # ----------------------------------------------------------------- worker thread

    def _work(self) -> None:
        try:
            self._serve()
        finally:
            self._alive = False

    def _serve(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            with self._cond:
                while not (self._busy and self._waiting):
                    if self._stopping and not self._waiting:
                        return
                    self._busy = False
                    self._cond.wait()
                batch = self._take()
            if self.merge and self.max_queue_delay_s > 0:
                self._gather_more(batch)
            results, record = self._run_batch(batch)
            with self._cond:
                # Idle before the callers hear back: a caller's next request, sent at once,
                # then finds the worker idle (and may run inline) instead of racing it.
                if not self._waiting:
                    self._busy = False
            try:
                loop.call_soon_threadsafe(self._deliver, results, record)
            except RuntimeError:  # the loop is closed: nobody waits for these answers
                return

    def _take(self) -> list[_Pending]:
        """The head of the queue and what else fits in one batch (the lock is held): the
        waiting requests with the head's per-sample shapes, in queue order, as Triton batches
        without ragged batching. Requests of other shapes (a sequence model's other lengths)
        keep their order for the next batches."""
        waiting = self._waiting
        first = waiting.popleft()
        batch, rows = [first], first.rows
        if self.merge:
            shapes = {name: a.shape[1:] for name, a in first.inputs.items()}
            others: list[_Pending] = []
            while waiting and rows < self.max_batch_size:
                item = waiting.popleft()
                if any(a.shape[1:] != shapes[name] for name, a in item.inputs.items()):
                    others.append(item)
                elif rows + item.rows > self.max_batch_size:
                    waiting.appendleft(item)
                    break
                else:
                    batch.append(item)
                    rows += item.rows
            waiting.extendleft(reversed(others))
        return batch

    def _gather_more(self, batch: list[_Pending]) -> None:
        """Waits up to ``max_queue_delay`` for requests of the batch's per-sample shapes to
        fill it further; requests of other shapes stay where they are."""
        shapes = {name: a.shape[1:] for name, a in batch[0].inputs.items()}
        rows = sum(item.rows for item in batch)
        until = time.perf_counter() + self.max_queue_delay_s
        with self._cond:
            skipped = 0  # the queue's first requests, already found of other shapes
            while rows < self.max_batch_size:
                waiting = self._waiting
                if len(waiting) > skipped:
                    item = waiting[skipped]
                    if any(a.shape[1:] != shapes[name] for name, a in item.inputs.items()):
                        skipped += 1
                        continue
                    if rows + item.rows > self.max_batch_size:
                        return
                    del waiting[skipped]
                    batch.append(item)
                    rows += item.rows
                    continue
                remaining = until - time.perf_counter()
                if remaining <= 0 or self._stopping:
                    return
                self._cond.wait(remaining)
                # The loop may have run the queue's head meanwhile (_drain_inline): look again.
                skipped = 0

    def _run_batch(self, batch: list[_Pending]) -> tuple[_Results, BatchRecord | None]:
        try:
            return self._execute(batch)
        except Exception as exc:  # a fault here, not in the model: never leave callers waiting
            log.exception("batcher for model '%s' failed", self.model.name)
            return [(item, exc) for item in batch], None

    def _execute(self, batch: list[_Pending]) -> tuple[_Results, BatchRecord | None]:
        """Runs ``batch`` (on whichever thread calls it) and returns what each caller gets,
        without touching their futures: those belong to the event loop."""
        results: _Results = []
        now = time.perf_counter()
        live = []
        for item in batch:
            # Reading a future's state from this thread is safe (it only ever goes from
            # pending to done); a caller that went away needs no compute.
            if item.future.done():
                continue
            if item.deadline is not None and now > item.deadline:
                results.append((item, self._expired(item, now)))
                continue
            live.append(item)
        if not live:
            return results, None
        rows = sum(item.rows for item in live)
        merging = time.perf_counter()
        names = list(live[0].inputs)
        merged = (
            live[0].inputs
            if len(live) == 1
            else {n: np.concatenate([item.inputs[n] for item in live]) for n in names}
        )
        started = time.perf_counter()
        queue_seconds = [merging - item.enqueued for item in live]
        try:
            outputs = self.model.run(merged)
        except Exception as exc:
            compute = time.perf_counter() - started
            self._trace(live, rows, merging, exc)
            record = BatchRecord(
                self.model.name,
                rows,
                len(live),
                queue_seconds,
                compute,
                failed=True,
                version=self._version,
            )
            if len(live) == 1:
                log.exception("inference failed for model '%s' (%d rows)", self.model.name, rows)
                failed = InferenceFailed(
                    f"inference failed for model '{self.model.name}'; the server's log has "
                    "the details"
                )
                failed.__cause__ = exc
                return [*results, (live[0], failed)], record
            # One request's rows may be what fails: run each request on its own, so only
            # that request gets the error and its batch companions still get answers.
            log.warning(
                "inference failed for model '%s' on a batch of %d requests; retrying them "
                "one by one",
                self.model.name,
                len(live),
            )
            self._record_later(record)
            for item in live:
                alone, alone_record = self._execute([item])
                results += alone
                if alone_record is not None:
                    self._record_later(alone_record)
            return results, None
        compute = time.perf_counter() - started
        self._trace(live, rows, merging, None)
        if len(live) == 1:
            self.lone_compute_s = _ewma(self.lone_compute_s, compute)
        self._row_seconds.append(compute / rows)
        splitting = time.perf_counter()
        offset = 0
        for item in live:
            results.append(
                (item, {name: out[offset : offset + item.rows] for name, out in outputs.items()})
            )
            offset += item.rows
        record = BatchRecord(
            self.model.name,
            rows,
            len(live),
            queue_seconds,
            compute,
            input_seconds=started - merging,
            output_seconds=time.perf_counter() - splitting,
            version=self._version,
        )
        return results, record

    def _trace(
        self, batch: list[_Pending], rows: int, started: float, error: BaseException | None
    ) -> None:
        """The batch's spans, when its requests are traced (all are, or none: tracing is on
        or off for the whole process). OpenTelemetry's SDK is thread-safe: this runs on the
        worker thread as well as on the loop's."""
        trace = batch[0].trace
        if trace is not None:
            trace.tracing.record_batch(
                self.model.name,
                [(item.trace, item.enqueued) for item in batch if item.trace is not None],
                rows,
                len(batch),
                started,
                time.perf_counter(),
                error,
            )

    def _expired(self, item: _Pending, now: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"request to model '{self.model.name}' timed out after "
            f"{(now - item.enqueued) * 1000:.0f} ms in the queue; not run"
        )

    def _record_later(self, record: BatchRecord) -> None:
        # Metrics are only touched on the loop's thread; the inline path is on it already.
        on_batch = self._on_batch
        if on_batch is None:
            return
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            on_batch(record)
        else:
            loop.call_soon_threadsafe(on_batch, record)


def _ewma(previous: float | None, value: float) -> float:
    return value if previous is None else previous + _EWMA_WEIGHT * (value - previous)
