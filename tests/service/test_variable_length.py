"""A model with two dynamic axes, [batch, length, features], served as Triton serves one.

The model is real ONNX (tests/tiny_onnx.py: the mean over the length axis, then a linear
layer): metadata shows ``[-1, -1, F]``, a request's length is checked against the -1 axis
(at least 1, at most the cap in config.json's ``max_shape``), and requests of different
lengths are batched only with requests of their own shape (Triton without ragged batching).
Zero padding would move the mean, so every answer compared with the request run alone
through onnxruntime also proves nothing was padded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http.aio as aioclient
from batching import submit_together
from pydantic import ValidationError
from servers import RunningServer, running_server
from tiny_onnx import FEATURES, SEQUENCE_MAX_LENGTH, sequence_expected, sequence_repository

from service.errors import InvalidInput
from service.repository import TensorSpec, list_models, verified_file
from service.serving.batcher import Batcher, BatchRecord
from service.serving.runtime import OnnxModel, SessionOptions
from service.serving.signature import Signature

ATOL = 1e-5
CONCURRENT = 48  # requests in flight at once in the end-to-end test
LENGTHS = (1, 3, 7, SEQUENCE_MAX_LENGTH)


def _request(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    return rng.standard_normal((rows, length, FEATURES)).astype(np.float32)


# ------------------------------------------------------------------------ the format


def test_max_shape_is_checked_against_the_shape() -> None:
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1, -1, 4], max_shape=[-1, 64, 4])
    assert spec.variable_axes() == [1]
    assert spec.metadata() == {"name": "x", "datatype": "FP32", "shape": [-1, -1, 4]}
    for bad, why in (
        ([-1, 64], "must have the rank"),
        ([8, 64, 4], "-1 at the batch axis"),
        ([-1, 0, 4], "at least 1"),
        ([-1, 64, 5], "fixes it at 4"),
    ):
        with pytest.raises(ValidationError, match=why):
            TensorSpec(name="x", datatype="FP32", shape=[-1, -1, 4], max_shape=bad)


def test_a_spec_without_a_cap_writes_no_max_shape() -> None:
    # config.json files written before max_shape existed read and write back unchanged.
    assert "max_shape" not in TensorSpec(name="x", datatype="FP32", shape=[-1, 4]).model_dump()


def test_signature_checks_the_length_against_the_variable_axis() -> None:
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1, -1, 4], max_shape=[-1, 16, 4])
    signature = Signature("seq", [spec], max_batch_size=8)
    for length in (1, 2, 16):
        signature.check_declared("x", "FP32", (3, length, 4))
    with pytest.raises(InvalidInput, match=r"axis 1 has size 17, above the model's maximum 16"):
        signature.check_declared("x", "FP32", (1, 17, 4))
    with pytest.raises(InvalidInput, match=r"axis 1 is empty"):
        signature.check_declared("x", "FP32", (1, 0, 4))
    with pytest.raises(InvalidInput, match=r"axis 2 must be 4"):
        signature.check_declared("x", "FP32", (1, 5, 3))
    uncapped = Signature("seq", [spec.model_copy(update={"max_shape": None})], 8)
    uncapped.check_declared("x", "FP32", (1, 10_000, 4))


# ------------------------------------------------------------------------ the batcher


def _batcher(repository: Path, records: list[BatchRecord], delay_s: float) -> Batcher:
    (config,) = list_models(repository)
    path = verified_file(repository, config, config.latest)
    model = OnnxModel(config, config.latest, path, SessionOptions(intra_op_threads=1))
    return Batcher(
        model,
        max_batch_size=8,
        max_queue_delay_s=delay_s,
        max_queue_size=64,
        on_batch=records.append,
    )


async def _submit_together(batcher: Batcher, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return await submit_together(batcher, inputs, "scores")


@pytest.mark.parametrize("delay_s", [0.0, 0.05])
def test_batcher_groups_requests_by_shape_in_queue_order(tmp_path: Path, delay_s: float) -> None:
    """Lengths 3, 5, 3, 5, 3 wait together: the first batch is the three of length 3 (the
    head's shape), the next the two of length 5; each caller gets its own rows' answer. With a
    queue delay the gathering step (``_gather_more``) must skip the other length too."""
    records: list[BatchRecord] = []
    batcher = _batcher(sequence_repository(tmp_path), records, delay_s)
    rng = np.random.default_rng(3)
    inputs = [
        _request(rng, rows, length) for rows, length in ((1, 3), (2, 5), (2, 3), (1, 5), (1, 3))
    ]
    results = asyncio.run(_submit_together(batcher, inputs))
    assert [(r.requests, r.rows) for r in records] == [(3, 4), (2, 3)]
    for got, x in zip(results, inputs, strict=True):
        np.testing.assert_allclose(got, sequence_expected(x), atol=ATOL, rtol=0)


def test_batcher_keeps_the_row_limit_per_shape(tmp_path: Path) -> None:
    """A same-shape request that would overflow the batch ends it (it is not skipped for a
    later, smaller one), while other shapes are passed over."""
    records: list[BatchRecord] = []
    batcher = _batcher(sequence_repository(tmp_path), records, 0.0)
    rng = np.random.default_rng(4)
    shapes = ((6, 2), (1, 9), (4, 2), (1, 2))  # (rows, length); max_batch_size 8
    inputs = [_request(rng, rows, length) for rows, length in shapes]
    results = asyncio.run(_submit_together(batcher, inputs))
    assert [(r.requests, r.rows) for r in records] == [(1, 6), (1, 1), (2, 5)]
    for got, x in zip(results, inputs, strict=True):
        np.testing.assert_allclose(got, sequence_expected(x), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("sequence")
    repository = sequence_repository(root)
    with running_server(repository, root, grpc=True) as server:
        yield server, repository / "sequence" / "1" / "model.onnx"


def test_metadata_and_config_show_both_dynamic_axes(served: tuple[RunningServer, Path]) -> None:
    server, _ = served
    metadata = httpx.get(f"{server.http_url}/v2/models/sequence").json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, FEATURES]}]
    assert metadata["parameters"]["max_shape"] == {"x": [-1, SEQUENCE_MAX_LENGTH, FEATURES]}
    config = httpx.get(f"{server.http_url}/v2/models/sequence/config").json()
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, FEATURES]}]
    assert config["parameters"]["max_shape.x"] == {
        "string_value": f"[-1, {SEQUENCE_MAX_LENGTH}, {FEATURES}]"
    }
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        (tensor,) = grpc.get_model_metadata("sequence").inputs
    finally:
        grpc.close()
    assert list(tensor.shape) == [-1, -1, FEATURES]


def test_a_length_above_the_cap_is_a_400_naming_it(served: tuple[RunningServer, Path]) -> None:
    server, _ = served
    length = SEQUENCE_MAX_LENGTH + 1
    body = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, length, FEATURES],
                "data": [0.5] * (length * FEATURES),
            }
        ]
    }
    response = httpx.post(f"{server.http_url}/v2/models/sequence/infer", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert f"axis 1 has size {length}, above the model's maximum {SEQUENCE_MAX_LENGTH}" in error
    empty = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 0, FEATURES], "data": []}]}
    response = httpx.post(f"{server.http_url}/v2/models/sequence/infer", json=empty)
    assert response.status_code == 400
    assert "axis 1 is empty" in response.json()["error"]


def test_concurrent_mixed_lengths_each_get_their_own_answer(
    served: tuple[RunningServer, Path],
) -> None:
    """CONCURRENT requests of four lengths and 1-3 rows at once, through tritonclient's aio
    client; each answer equals onnxruntime on that request alone, and the server did merge
    requests (fewer batches than requests), so the grouping was exercised."""
    server, model_file = served
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    inputs = [
        _request(rng, int(rng.integers(1, 4)), LENGTHS[i % len(LENGTHS)]) for i in range(CONCURRENT)
    ]

    async def run_all() -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(server.url)
        try:

            async def one(x: np.ndarray) -> np.ndarray:
                tensor = aioclient.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer("sequence", [tensor])
                scores: np.ndarray = result.as_numpy("scores")
                return scores

            return list(await asyncio.gather(*(one(x) for x in inputs)))
        finally:
            await client.close()

    before = _counts(server)
    answers = asyncio.run(run_all())
    for x, got in zip(inputs, answers, strict=True):
        (alone,) = session.run(None, {"x": x})
        np.testing.assert_allclose(got, alone, atol=ATOL, rtol=0)
    requests, executions = (a - b for a, b in zip(_counts(server), before, strict=True))
    assert requests == CONCURRENT
    assert executions < CONCURRENT, "no two requests were batched: the grouping went untested"


def _counts(server: RunningServer) -> tuple[int, int]:
    stats = httpx.get(f"{server.http_url}/v2/models/sequence/stats").json()
    (entry,) = stats["model_stats"]
    # Triton's success count is requests; its inference_count counts rows.
    return entry["inference_stats"]["success"]["count"], entry["execution_count"]
