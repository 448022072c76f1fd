"""A batch-dependent model's requests are never merged: each runs alone, as its own batch.

The model is real ONNX, ``x - mean(x over the batch)``: merged with another request, a row's
answer would change, so "the answer of running alone" is something a merge cannot fake.
Each test also runs a control in which merging is allowed, and checks that the same
scenario does merge there: otherwise the scenario would prove nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from batching import submit_together
from starlette.testclient import TestClient
from tiny_onnx import FEATURES, batch_mean_repository, centered

from service.app import create_app
from service.repository import ModelConfig, list_models, read_config, verified_file
from service.serving.batcher import Batcher, BatchRecord
from service.serving.control import ModelControl
from service.serving.runtime import OnnxModel, SessionOptions
from service.serving.store import ModelStore, Served
from service.settings import Settings

ATOL = 1e-6


def _requests() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    # Different means per request, so any merge moves every row's answer.
    return [(rng.standard_normal((rows, FEATURES)) + shift).astype(np.float32)
            for rows, shift in ((3, 0.0), (2, 5.0), (4, -3.0))]  # fmt: skip


def _model(repository: Path) -> OnnxModel:
    (config,) = list_models(repository)
    path = verified_file(repository, config, config.latest)
    return OnnxModel(config, config.latest, path, SessionOptions(intra_op_threads=1))


async def _submit_together(batcher: Batcher, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return await submit_together(batcher, inputs, "centered")


@pytest.mark.parametrize("merge", [False, True])
def test_batcher_runs_each_request_alone_only_when_told(tmp_path: Path, merge: bool) -> None:
    model = _model(batch_mean_repository(tmp_path))
    records: list[BatchRecord] = []
    batcher = Batcher(
        model,
        max_batch_size=64,
        max_queue_delay_s=0,
        max_queue_size=16,
        on_batch=records.append,
        merge=merge,
    )
    inputs = _requests()
    results = asyncio.run(_submit_together(batcher, inputs))
    if merge:  # the control: these requests do meet in one batch when allowed to
        assert [r.requests for r in records] == [len(inputs)]
        assert not np.allclose(results[0], centered(inputs[0]), atol=ATOL)
        return
    assert [(r.requests, r.rows) for r in records] == [(1, len(x)) for x in inputs]
    for got, x in zip(results, inputs, strict=True):
        np.testing.assert_allclose(got, centered(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch_dependent", [True, False])
def test_store_honours_the_config_flag(tmp_path: Path, batch_dependent: bool) -> None:
    repository = batch_mean_repository(tmp_path, batch_dependent=batch_dependent)
    store = ModelStore(Settings(repository=repository))
    records: list[BatchRecord] = []
    store.on_batch = records.append
    inputs = _requests()
    loaded: list[Served] = []

    async def scenario() -> list[np.ndarray]:
        await ModelControl(store).start()
        loaded.append(served := store.get("centering"))
        try:
            answers = await asyncio.gather(*(store.submit(served, {"x": x}, None) for x in inputs))
        finally:
            await store.stop()
        return [a["centered"] for a in answers]

    results = asyncio.run(scenario())
    served = loaded[0]
    alone = [centered(x) for x in inputs]
    if batch_dependent:
        assert served.batcher.merge is False
        assert [r.requests for r in records] == [1, 1, 1]
        for got, want in zip(results, alone, strict=True):
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    else:  # the control: the same concurrent requests are merged, and the answers move
        assert [r.requests for r in records] == [3]
        assert not np.allclose(results[1], alone[1], atol=ATOL)


def test_flag_is_reported_in_metadata_and_triton_config(tmp_path: Path) -> None:
    repository = batch_mean_repository(tmp_path, derived_from="tiny")
    with TestClient(create_app(Settings(repository=repository))) as client:
        parameters = client.get("/v2/models/centering").json()["parameters"]
        assert parameters["batch_dependent"] is True
        assert parameters["derived_from"] == "tiny"
        config = client.get("/v2/models/centering/config").json()
        # Triton's own way to say "never batched across requests": no dynamic_batching.
        assert "dynamic_batching" not in config
        assert config["parameters"]["batch_dependent"] == {"string_value": "true"}


def test_flag_survives_the_repository_and_defaults_to_false(tmp_path: Path) -> None:
    repository = batch_mean_repository(tmp_path)
    stored = read_config(repository / "centering" / "config.json")
    assert stored.batch_dependent is True  # written and read back through install_model
    older = stored.model_dump()
    del older["batch_dependent"], older["derived_from"]  # a config written before the flag
    assert ModelConfig.model_validate(older).batch_dependent is False
    with pytest.raises(ValueError, match="derived_from"):  # a model name, never a path
        ModelConfig.model_validate(stored.model_dump() | {"derived_from": "../etc"})
