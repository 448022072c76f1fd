"""Dynamic batching: one bounded queue and one worker loop per model.

The loop takes the first waiting request, then whatever else has queued (up to the batch
limit in rows), optionally waits ``max_queue_delay`` for more, runs the batch off the event
loop and hands each caller exactly its own rows. With no delay configured, a batch is what
arrived while the previous one ran: no latency is added at low load and batches grow with
load by themselves (a fixed window made single-client latency 5x worse when measured).

A lone request (nothing else queued) whose inference is known to be short runs on the event
loop thread itself: handing it to a worker thread and back cost about 1 ms on a 2-core VM,
three times the inference. Anything batched, or slow, runs in a worker thread so the loop
keeps reading requests meanwhile.

A batch-dependent model (``merge=False``) never has requests merged: each runs alone, as
the batch its client sent, since another request's rows would change its answer.

The queue is bounded: a full queue raises ``Overloaded`` at once instead of queueing work
that would time out anyway. Requests whose deadline passed, or whose caller went away, are
dropped before they reach onnxruntime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, ModelNotReady, Overloaded
from service.serving.runtime import OnnxModel

log = logging.getLogger("normserve.batcher")

Tensors = dict[str, np.ndarray]

# A lone request runs inline when its inference is expected to take at most this long; the
# loop is blocked meanwhile, so keep it well below a millisecond or two.
INLINE_BELOW_S = 0.0015
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


@dataclass
class _Pending:
    inputs: Tensors
    rows: int
    future: asyncio.Future[Tensors]
    enqueued: float
    deadline: float | None
    timings: dict[str, float] = field(default_factory=dict)


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
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        # False for batch-dependent models: a request's rows are its batch, nothing is added.
        self.merge = merge
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        # Running estimate of a one-request batch's compute time; None until measured.
        self.lone_compute_s: float | None = None

    def start(self) -> None:
        # Created here, in the lifespan, so that the queue binds to the running event loop.
        self._queue = asyncio.Queue(maxsize=self.max_queue_size)
        self._task = asyncio.create_task(self._loop(), name=f"batcher:{self.model.name}")

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, inputs: Tensors, deadline: float | None = None) -> Tensors:
        """The model's outputs for ``inputs`` (validated), computed in some batch.

        ``deadline`` is a ``time.perf_counter()`` instant after which the request is not run.
        """
        return await self.enqueue(inputs, deadline)

    def enqueue(self, inputs: Tensors, deadline: float | None = None) -> asyncio.Future[Tensors]:
        """``submit`` without the coroutine: the future the batch will resolve. Cancelling it
        takes the request out of its batch (if the batch has not started)."""
        self.check_room()
        assert self._queue is not None  # check_room refuses before start()
        rows = next(iter(inputs.values())).shape[0]
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(inputs, rows, future, time.perf_counter(), deadline))
        return future

    def check_room(self) -> None:
        """Overloaded when the queue is full: callers ask before decoding a request, so that
        a refusal under overload costs next to nothing."""
        if self._queue is None or self._task is None or self._task.done():
            raise ModelNotReady(f"model '{self.model.name}' is not accepting requests")
        if self._queue.full():
            raise Overloaded(
                f"model '{self.model.name}' is overloaded: {self.max_queue_size} requests are "
                "already waiting; retry later"
            )

    async def stop(self) -> None:
        """Finish what is queued, then end the loop (graceful shutdown)."""
        if self._queue is not None and self._task is not None and not self._task.done():
            await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        assert self._queue is not None
        carry: _Pending | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            batch, carry = await self._collect(first)
            try:
                live = self._drop_stale(batch)
                if live:
                    await self._run(live)
            finally:
                for _ in batch:
                    self._queue.task_done()  # lets stop() wait for exactly this work

    async def _collect(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
        """``first`` plus what fits from the queue; the item that did not fit is carried."""
        assert self._queue is not None
        if not self.merge:
            return [first], None
        batch, rows = [first], first.rows
        until = time.perf_counter() + self.max_queue_delay_s
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + item.rows > self.max_batch_size:
                return batch, item
            batch.append(item)
            rows += item.rows
        return batch, None

    def _drop_stale(self, batch: list[_Pending]) -> list[_Pending]:
        now = time.perf_counter()
        live = []
        for item in batch:
            if item.future.done():  # the caller went away (cancelled): nothing to compute
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"request to model '{self.model.name}' timed out after "
                        f"{(now - item.enqueued) * 1000:.0f} ms in the queue; not run"
                    )
                )
                continue
            live.append(item)
        return live

    async def _run(self, batch: list[_Pending]) -> None:
        rows = sum(item.rows for item in batch)
        names = list(batch[0].inputs)
        merging = time.perf_counter()
        merged = (
            batch[0].inputs
            if len(batch) == 1
            else {n: np.concatenate([item.inputs[n] for item in batch]) for n in names}
        )
        started = time.perf_counter()
        input_seconds = started - merging
        queue_seconds = [merging - item.enqueued for item in batch]
        lone = len(batch) == 1
        try:
            if lone and self._inline_ok():
                outputs, compute = self._timed_run(merged)
            else:
                outputs, compute = await asyncio.to_thread(self._timed_run, merged)
        except Exception as exc:
            self._record(batch, rows, queue_seconds, time.perf_counter() - started, failed=True)
            if len(batch) > 1:
                # One request's rows may be what fails: run each request on its own, so only
                # that request gets the error and its batch companions still get answers.
                log.warning(
                    "inference failed for model '%s' on a batch of %d requests; retrying them "
                    "one by one",
                    self.model.name,
                    len(batch),
                )
                for item in batch:
                    if not item.future.done():
                        await self._run([item])
                return
            log.exception("inference failed for model '%s' (%d rows)", self.model.name, rows)
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        if lone:
            previous = self.lone_compute_s
            self.lone_compute_s = (
                compute if previous is None else previous + _EWMA_WEIGHT * (compute - previous)
            )
        splitting = time.perf_counter()
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(
                    {name: out[offset : offset + item.rows] for name, out in outputs.items()}
                )
            offset += item.rows
        self._record(
            batch,
            rows,
            queue_seconds,
            compute,
            input_seconds=input_seconds,
            output_seconds=time.perf_counter() - splitting,
        )

    def _timed_run(self, inputs: Tensors) -> tuple[Tensors, float]:
        """The outputs and the compute time alone, measured on the thread that ran them (a
        hand-off's wake-up latency is not the model's)."""
        started = time.perf_counter()
        outputs = self.model.run(inputs)
        return outputs, time.perf_counter() - started

    def _inline_ok(self) -> bool:
        """Nothing else waits and a lone request is known to be quick."""
        assert self._queue is not None
        return (
            self._queue.empty()
            and self.lone_compute_s is not None
            and self.lone_compute_s <= INLINE_BELOW_S
        )

    def _record(
        self,
        batch: list[_Pending],
        rows: int,
        queue_seconds: list[float],
        compute: float,
        failed: bool = False,
        input_seconds: float = 0.0,
        output_seconds: float = 0.0,
    ) -> None:
        if self._on_batch is not None:
            self._on_batch(
                BatchRecord(
                    self.model.name,
                    rows,
                    len(batch),
                    queue_seconds,
                    compute,
                    failed,
                    input_seconds,
                    output_seconds,
                )
            )
