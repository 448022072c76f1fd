"""The dynamic batcher with a real onnxruntime session: rows, overload, deadlines, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_onnx import FEATURES, expected, tiny_repository

from service.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from service.repository import list_models, verified_file
from service.serving.batcher import Batcher, BatchRecord
from service.serving.runtime import OnnxModel, SessionOptions

ATOL = 1e-5


class GatedModel(OnnxModel):
    """The real tiny model, whose run() waits for a gate: lets a test hold a batch running."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[int] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        self.gate.wait(timeout=30)
        self.batches.append(next(iter(inputs.values())).shape[0])
        return super().run(inputs)


def _model(tmp_path: Path, cls: type[OnnxModel] = OnnxModel) -> OnnxModel:
    repository = tiny_repository(tmp_path)
    (config,) = list_models(repository)
    path = verified_file(repository, config, config.latest)
    return cls(config, config.latest, path, SessionOptions(intra_op_threads=1))


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, FEATURES)).astype(np.float32)


def test_each_caller_gets_its_own_rows_in_shared_batches(tmp_path: Path) -> None:
    model = _model(tmp_path, GatedModel)
    assert isinstance(model, GatedModel)
    records: list[BatchRecord] = []

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(
            model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=64, on_batch=records.append
        )
        batcher.start()
        first = asyncio.create_task(batcher.submit({"x": _rows(1, 0)}))
        await asyncio.to_thread(model.started.wait, 10)  # batch 1 is running, held by the gate
        others = [
            asyncio.create_task(batcher.submit({"x": _rows(1 + i % 3, i)})) for i in range(1, 7)
        ]
        await asyncio.sleep(0)  # let the submissions enqueue
        assert batcher.depth == 6
        model.gate.set()
        results = await asyncio.gather(first, *others)
        await batcher.stop()
        return [r["scores"] for r in results]

    results = asyncio.run(scenario())
    for i, got in enumerate(results):
        x = _rows(1 if i == 0 else 1 + i % 3, i)
        np.testing.assert_allclose(got, expected(x), atol=ATOL, rtol=0)
    # The six waiting requests (12 rows) ran as batches of at most 8 rows, not one by one.
    assert model.batches[0] == 1
    assert max(model.batches[1:]) > 1 and all(b <= 8 for b in model.batches)
    assert sum(model.batches) == 13
    assert [r.rows for r in records] == model.batches


def test_full_queue_is_refused_at_once_and_accepted_work_completes(tmp_path: Path) -> None:
    model = _model(tmp_path, GatedModel)
    assert isinstance(model, GatedModel)

    async def scenario() -> tuple[list[np.ndarray], Overloaded]:
        batcher = Batcher(model, max_batch_size=1, max_queue_delay_s=0, max_queue_size=2)
        batcher.start()
        running = asyncio.create_task(batcher.submit({"x": _rows(1, 0)}))
        await asyncio.to_thread(model.started.wait, 10)
        queued = [asyncio.create_task(batcher.submit({"x": _rows(1, i)})) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit({"x": _rows(1, 3)})
        model.gate.set()
        done = await asyncio.gather(running, *queued)
        await batcher.stop()
        return [d["scores"] for d in done], refused.value

    done, refused = asyncio.run(scenario())
    assert "overloaded" in str(refused) and "2 requests" in str(refused)
    assert refused.retry_after_s >= 1
    for i, got in enumerate(done):
        np.testing.assert_allclose(got, expected(_rows(1, i)), atol=ATOL, rtol=0)


def test_expired_requests_are_not_run(tmp_path: Path) -> None:
    model = _model(tmp_path, GatedModel)
    assert isinstance(model, GatedModel)

    async def scenario() -> DeadlineExceeded:
        batcher = Batcher(model, max_batch_size=4, max_queue_delay_s=0, max_queue_size=8)
        batcher.start()
        running = asyncio.create_task(batcher.submit({"x": _rows(1, 0)}))
        await asyncio.to_thread(model.started.wait, 10)
        stale = asyncio.create_task(
            batcher.submit({"x": _rows(3, 1)}, deadline=time.perf_counter() - 1)
        )
        await asyncio.sleep(0)
        model.gate.set()
        await running
        with pytest.raises(DeadlineExceeded) as exc:
            await stale
        await batcher.stop()
        return exc.value

    error = asyncio.run(scenario())
    assert "timed out" in str(error) and "not run" in str(error)
    assert model.batches == [1]  # the 3 stale rows never reached onnxruntime


def test_stop_drains_the_queue_then_refuses(tmp_path: Path) -> None:
    model = _model(tmp_path)

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=2, max_queue_delay_s=0, max_queue_size=16)
        batcher.start()
        pending = [asyncio.create_task(batcher.submit({"x": _rows(1, i)})) for i in range(10)]
        await asyncio.sleep(0)
        await batcher.stop()
        assert all(p.done() and p.exception() is None for p in pending)
        with pytest.raises(ModelNotReady):
            await batcher.submit({"x": _rows(1, 0)})

    asyncio.run(scenario())


def test_batched_rows_equal_unbatched_rows_bit_for_bit(tmp_path: Path) -> None:
    model = _model(tmp_path)
    x = _rows(8, 42)
    together = model.run({"x": x})["scores"]
    alone = np.concatenate([model.run({"x": x[i : i + 1]})["scores"] for i in range(8)])
    assert np.array_equal(together, alone)


class FailingOnNegative(OnnxModel):
    """The real tiny model, failing (as a model fault would) on rows holding -999."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] == -999).any():
            raise RuntimeError("kernel failure")
        return super().run(inputs)


def test_a_failing_request_does_not_fail_its_batch_companions(tmp_path: Path) -> None:
    model = _model(tmp_path, FailingOnNegative)
    bad = np.full((1, FEATURES), -999, np.float32)

    async def scenario() -> list[object]:
        batcher = Batcher(model, max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=16)
        batcher.start()
        tasks = [
            asyncio.create_task(batcher.submit({"x": bad if i == 2 else _rows(1, i)}))
            for i in range(5)
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[2], InferenceFailed)
    assert isinstance(results[2].__cause__, RuntimeError)  # logged, never sent
    for i, result in enumerate(results):
        if i != 2:
            assert isinstance(result, dict)
            np.testing.assert_allclose(result["scores"], expected(_rows(1, i)), atol=ATOL)


class ThreadRecordingModel(OnnxModel):
    """The real tiny model, recording which thread ran each batch (and optionally slow)."""

    def __init__(self, *args: object, delay_s: float = 0.0) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.delay_s = delay_s
        self.threads: list[int] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().run(inputs)


def test_a_lone_quick_request_runs_on_the_loop_and_batches_in_a_worker(tmp_path: Path) -> None:
    """The first lone request is measured in a worker; once known to be quick, lone requests
    skip the thread hand-off; requests that queue together still go to a worker thread."""
    model = _model(tmp_path, ThreadRecordingModel)
    assert isinstance(model, ThreadRecordingModel)

    async def scenario() -> tuple[int, list[np.ndarray]]:
        loop_thread = threading.get_ident()
        # "Quick" is up to 10 s here: a busy machine cannot make this test flip.
        batcher = Batcher(
            model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=64, inline_below_s=10
        )
        batcher.start()
        answers = [await batcher.submit({"x": _rows(1, i)}) for i in range(3)]
        assert batcher.lone_compute_s is not None
        together = await asyncio.gather(*(batcher.submit({"x": _rows(1, i)}) for i in range(6)))
        await batcher.stop()
        return loop_thread, [a["scores"] for a in [*answers, *together]]

    loop_thread, outputs = asyncio.run(scenario())
    assert model.threads[0] != loop_thread, "the first, unmeasured request must not block"
    assert model.threads[1:3] == [loop_thread, loop_thread]
    assert all(t != loop_thread for t in model.threads[3:] if len(model.threads) > 3)
    for i, got in enumerate(outputs):
        np.testing.assert_allclose(got, expected(_rows(1, i if i < 3 else i - 3)), atol=ATOL)


def test_a_slow_model_never_runs_on_the_loop(tmp_path: Path) -> None:
    repository = tiny_repository(tmp_path)
    (config,) = list_models(repository)
    path = verified_file(repository, config, config.latest)
    model = ThreadRecordingModel(
        config, config.latest, path, SessionOptions(intra_op_threads=1), delay_s=0.005
    )

    async def scenario() -> int:
        batcher = Batcher(model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=64)
        batcher.start()
        for i in range(4):
            await batcher.submit({"x": _rows(1, i)})
        await batcher.stop()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert len(model.threads) == 4 and loop_thread not in model.threads


class WorkerGatedModel(OnnxModel):
    """The real tiny model; runs on the batcher's worker thread wait for a gate, runs on any
    other thread (the event loop's) do not. Records (thread name, rows) per run."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.started = threading.Event()
        self.runs: list[tuple[str, int]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = threading.current_thread().name
        if name.startswith("batcher:"):
            self.started.set()
            self.gate.wait(timeout=30)
        self.runs.append((name, next(iter(inputs.values())).shape[0]))
        return super().run(inputs)


def test_batches_run_while_the_event_loop_is_busy(tmp_path: Path) -> None:
    """The worker takes the next batch as soon as one ends, without waiting for the event
    loop: under overload a loop iteration is as long as every connection's work."""
    model = _model(tmp_path, WorkerGatedModel)
    assert isinstance(model, WorkerGatedModel)

    async def scenario() -> list[dict[str, np.ndarray]]:
        batcher = Batcher(model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=64)
        batcher.start()
        first = batcher.enqueue({"x": _rows(1, 0)})
        await asyncio.to_thread(model.started.wait, 10)  # batch 1 holds the worker
        later = [batcher.enqueue({"x": _rows(1, i)}) for i in (1, 2, 3)]
        model.gate.set()
        # The loop is blocked from here on: no callback, no iteration.
        deadline = time.monotonic() + 10
        while len(model.runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        ran_while_blocked = list(model.runs)
        results = await asyncio.gather(first, *later)
        await batcher.stop()
        assert ran_while_blocked == [("batcher:tiny", 1), ("batcher:tiny", 3)]
        return results

    results = asyncio.run(scenario())
    for i, got in enumerate(results):
        np.testing.assert_allclose(got["scores"], expected(_rows(1, i)), atol=ATOL, rtol=0)


def test_a_full_queue_of_a_quick_model_is_run_on_the_loop_not_refused(tmp_path: Path) -> None:
    model = _model(tmp_path, WorkerGatedModel)
    assert isinstance(model, WorkerGatedModel)

    async def scenario() -> tuple[list[dict[str, np.ndarray]], str]:
        batcher = Batcher(model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=2)
        batcher.start()
        running = batcher.enqueue({"x": _rows(1, 0)})
        await asyncio.to_thread(model.started.wait, 10)  # the worker is held
        queued = [batcher.enqueue({"x": _rows(1, i)}) for i in (1, 2)]
        # Not measured yet: a full queue is refused, as for any model.
        with pytest.raises(Overloaded):
            batcher.check_room()
        batcher._row_seconds.append(0.0001)  # as measured for this tiny model
        extra = batcher.enqueue({"x": _rows(1, 3)})  # the loop runs the two queued first
        loop_thread = threading.current_thread().name
        assert model.runs == [(loop_thread, 2)] and batcher.depth == 1
        # A slow model's full batch is never run on the loop: refused instead.
        batcher.enqueue({"x": _rows(1, 4)})
        batcher._row_seconds.clear()
        batcher._row_seconds.append(0.05)
        with pytest.raises(Overloaded):
            batcher.check_room()
        model.gate.set()
        results = await asyncio.gather(running, *queued, extra)
        await batcher.stop()
        return results, loop_thread

    results, loop_thread = asyncio.run(scenario())
    for i, got in enumerate(results):
        np.testing.assert_allclose(got["scores"], expected(_rows(1, i)), atol=ATOL, rtol=0)
    assert model.runs[0] == (loop_thread, 2)


def test_a_caller_that_went_away_costs_no_inference(tmp_path: Path) -> None:
    """A queued request whose caller cancelled (the client disconnected) is dropped before
    its batch reaches onnxruntime: provably, since the batch is held until after the cancel."""
    model = _model(tmp_path, WorkerGatedModel)
    assert isinstance(model, WorkerGatedModel)

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=8)
        batcher.start()
        running = batcher.enqueue({"x": _rows(1, 0)})
        await asyncio.to_thread(model.started.wait, 10)  # the worker holds batch 1
        kept = batcher.enqueue({"x": _rows(2, 1)})
        gone = batcher.enqueue({"x": _rows(3, 2)})
        gone.cancel()
        model.gate.set()
        assert (await running)["scores"].shape == (1, 3)
        np.testing.assert_allclose((await kept)["scores"], expected(_rows(2, 1)), atol=ATOL)
        await batcher.stop()

    asyncio.run(scenario())
    assert [rows for _, rows in model.runs] == [1, 2], "the cancelled 3 rows were computed"


class GatedFailingOnNegative(WorkerGatedModel):
    """WorkerGatedModel that fails (as a model fault would) on rows holding -999."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = super().run(inputs)
        if (inputs["x"] == -999).any():
            raise RuntimeError("kernel failure")
        return outputs


def test_the_failing_request_shared_its_batch_and_only_it_fails(tmp_path: Path) -> None:
    model = _model(tmp_path, GatedFailingOnNegative)
    assert isinstance(model, GatedFailingOnNegative)
    bad = np.full((1, FEATURES), -999, np.float32)

    async def scenario() -> list[object]:
        batcher = Batcher(model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=16)
        batcher.start()
        first = batcher.enqueue({"x": _rows(1, 9)})
        await asyncio.to_thread(model.started.wait, 10)  # the next four queue together
        others = [batcher.enqueue({"x": bad if i == 2 else _rows(1, i)}) for i in range(4)]
        model.gate.set()
        results = await asyncio.gather(first, *others, return_exceptions=True)
        await batcher.stop()
        return results[1:]

    results = asyncio.run(scenario())
    # One batch of the four failed, then each ran alone: only the bad one fails.
    assert [rows for _, rows in model.runs] == [1, 4, 1, 1, 1, 1]
    assert isinstance(results[2], InferenceFailed)
    assert isinstance(results[2].__cause__, RuntimeError)  # logged, never sent
    for i, result in enumerate(results):
        if i != 2:
            assert isinstance(result, dict)
            np.testing.assert_allclose(result["scores"], expected(_rows(1, i)), atol=ATOL)


def test_reserved_places_count_against_the_queue_and_are_never_refused(tmp_path: Path) -> None:
    """A request admitted before its body is read holds its place: later arrivals are refused
    instead of it, and it is queued even though the queue is full meanwhile."""
    model = _model(tmp_path, WorkerGatedModel)
    assert isinstance(model, WorkerGatedModel)

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=1, max_queue_delay_s=0, max_queue_size=2)
        batcher.start()
        running = batcher.enqueue({"x": _rows(1, 0)})
        await asyncio.to_thread(model.started.wait, 10)
        batcher.reserve()  # admitted, body still being read
        batcher.reserve()
        with pytest.raises(Overloaded):
            batcher.reserve()
        with pytest.raises(Overloaded):
            batcher.enqueue({"x": _rows(1, 9)})
        batcher.release()  # that one's body was bad: its place is free again
        queued = batcher.enqueue({"x": _rows(1, 1)})  # takes the free place
        kept = batcher.enqueue({"x": _rows(1, 2)}, reserved=True)  # the held one
        assert batcher.depth == 2
        with pytest.raises(Overloaded):
            batcher.reserve()
        model.gate.set()
        for i, future in enumerate((running, queued, kept)):
            np.testing.assert_allclose((await future)["scores"], expected(_rows(1, i)), atol=ATOL)
        batcher.reserve()  # all places free again
        batcher.release()
        await batcher.stop()

    asyncio.run(scenario())


def test_a_queue_delay_is_honoured_for_a_lone_quick_request(tmp_path: Path) -> None:
    """With max_queue_delay set, a lone request waits for company even when its model is
    quick enough to run on the loop: the two sent apart within the delay share one batch."""
    model = _model(tmp_path, ThreadRecordingModel)
    assert isinstance(model, ThreadRecordingModel)

    async def scenario() -> None:
        batcher = Batcher(
            model, max_batch_size=8, max_queue_delay_s=0.5, max_queue_size=8, inline_below_s=10
        )
        batcher.start()
        batcher.lone_compute_s = 0.0001  # known to be quick
        first = batcher.enqueue({"x": _rows(1, 0)})
        await asyncio.sleep(0.05)
        second = batcher.enqueue({"x": _rows(1, 1)})
        await asyncio.gather(first, second)
        await batcher.stop()

    asyncio.run(scenario())
    assert len(model.threads) == 1, "the two requests ran apart"


# The worker's exception is the point of the test; pytest would report it as unhandled.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_batcher_whose_worker_ended_refuses_instead_of_queueing(tmp_path: Path) -> None:
    # Liveness is a flag the worker clears on its way out, whatever ends it: a request must
    # then be refused as not ready, never queued for a worker that will not take it.
    model = _model(tmp_path)

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=8, max_queue_delay_s=0, max_queue_size=8)

        def broken() -> None:
            raise RuntimeError("the worker ends here")

        batcher._serve = broken  # type: ignore[method-assign]
        batcher.start()
        assert batcher._thread is not None
        await asyncio.to_thread(batcher._thread.join, 10)
        with pytest.raises(ModelNotReady, match="not accepting"):
            batcher.check_room()
        with pytest.raises(ModelNotReady):
            batcher.enqueue({"x": _rows(1, 0)})

    asyncio.run(scenario())
