"""Model control and version policy against real ``python -m service`` processes.

Each tiny model version adds its version number to every output (``x @ W + B + v``), so an
answer shows which version computed it, besides the ``model_version`` it reports. Load,
unload and the index go through the unmodified tritonclient where it has the call.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from servers import RunningServer, running_server
from starlette.testclient import TestClient
from tiny_onnx import (
    BIAS,
    CLASSES,
    FEATURES,
    WEIGHT,
    expected,
    save_checked,
    triton_examples_repository,
)
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.errors import ModelNotFound, ModelNotReady
from service.repository import (
    ModelConfig,
    ModelVersion,
    TensorSpec,
    install_model,
    now,
    read_config,
    write_config,
)
from service.serving.control import ModelControl
from service.serving.store import ModelStore, Served
from service.settings import Settings

X = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES) / 7
DISABLED = "explicit model load / unload is not allowed if polling is enabled"
# Load generators run for at most this long (the server answers a tiny model in ~1 ms).
LOAD_SECONDS = 4.0
CLIENT_THREADS = 6


# ------------------------------------------------------------------------------ helpers


def versioned_onnx(path: Path, version: int) -> Path:
    """The tiny classifier whose outputs are shifted by ``version``."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["scores"]),
        ],
        "tiny_versioned",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            numpy_helper.from_array(WEIGHT, "W"),
            numpy_helper.from_array((BIAS + version).astype(np.float32), "B"),
        ],
    )
    return save_checked(graph, path)


def add_version(repository: Path, name: str, version: int, **config: Any) -> ModelConfig:
    """Installs version ``version`` of model ``name`` through the real format code."""
    spec = ModelConfig.model_validate(
        {
            "name": name,
            "inputs": [TensorSpec(name="x", datatype="FP32", shape=[-1, FEATURES]).model_dump()],
            "outputs": [
                TensorSpec(name="scores", datatype="FP32", shape=[-1, CLASSES]).model_dump()
            ],
            "max_batch_size": 8,
            **config,
        }
    )
    source = versioned_onnx(repository.parent / f"{name}-{version}.onnx", version)
    record = ModelVersion(
        version=version,
        sha256="0" * 64,
        opset=18,
        exported_at=now(),
        parity_max_abs_error=0.0,
        parity_bound=1e-5,
    )
    installed = install_model(repository, spec, source, record)
    source.unlink()
    return installed


def set_policy(repository: Path, name: str, policy: dict[str, Any]) -> None:
    config = read_config(repository / name / "config.json")
    write_config(repository, config.model_copy(update={"version_policy": policy}))


def infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape),
                        "data": X.ravel().tolist()}]}  # fmt: skip


def answered_version(response: httpx.Response) -> int:
    """The version that computed the answer, from the numbers themselves; checks that they
    are that version's and that ``model_version`` says the same."""
    body = response.json()
    scores = np.array(body["outputs"][0]["data"], np.float32).reshape(len(X), CLASSES)
    shift = scores - expected(X)
    version = round(float(shift.mean()))
    np.testing.assert_allclose(shift, version, atol=1e-4)
    assert body["model_version"] == str(version), body
    return version


def error_of(response: httpx.Response) -> str:
    message: str = response.json()["error"]
    return message


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    root.mkdir()
    return root


@pytest.fixture
def http(server_under_test: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_under_test.http_url, timeout=30) as client:
        yield client


@dataclass
class LoadGenerator:
    """Client threads sending inferences until stopped (or LOAD_SECONDS passed), each
    recording (start time, status, version that answered or error)."""

    url: str
    path: str
    results: list[tuple[float, int, int | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> LoadGenerator:
        self._threads = [threading.Thread(target=self._run) for _ in range(CLIENT_THREADS)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=LOAD_SECONDS + 30)

    def _run(self) -> None:
        ends = time.monotonic() + LOAD_SECONDS
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < ends:
                started = time.monotonic()
                try:
                    response = client.post(self.path, json=infer_body())
                except httpx.HTTPError as exc:
                    self.results.append((started, -1, repr(exc)))
                    continue
                if response.status_code == 200:
                    outcome: int | str = answered_version(response)
                else:
                    outcome = response.text[:200]
                self.results.append((started, response.status_code, outcome))

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        while len(self.results) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.results) >= count, f"only {len(self.results)} answers so far"


# ------------------------------------------------------------------------------ mode none


def test_mode_none_serves_everything_and_refuses_load_and_unload(
    repository: Path, tmp_path: Path
) -> None:
    add_version(repository, "a", 1)
    add_version(repository, "a", 2)
    with running_server(repository, tmp_path, "--access-log", "false") as srv:
        client = httpclient.InferenceServerClient(url=srv.url)
        try:
            for call in (client.load_model, client.unload_model):
                with pytest.raises(InferenceServerException) as refused:
                    call("a")
                assert DISABLED in str(refused.value)
                assert refused.value.status() == "503"
            index = client.get_model_repository_index()
            # The default policy serves the latest version only.
            assert index == [{"name": "a", "version": "2", "state": "READY", "reason": ""}]
            assert client.is_model_ready("a") and not client.is_model_ready("a", "1")
        finally:
            client.close()


# ------------------------------------------------------------------------------ mode explicit


@pytest.fixture
def server_under_test(repository: Path, tmp_path: Path) -> Iterator[RunningServer]:
    add_version(repository, "a", 1)
    add_version(repository, "a", 2)
    add_version(repository, "b", 1)
    args = ("--access-log", "false", "--model-control-mode", "explicit", "--load-model", "a")
    with running_server(repository, tmp_path, *args) as srv:
        yield srv


def test_load_model_flag_repeats_and_takes_lists(repository: Path, tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        add_version(repository, name, 1)
    args = ("--access-log", "false", "--model-control-mode", "explicit",
            "--load-model", "a", "--load-model", "b,c")  # fmt: skip
    with running_server(repository, tmp_path, *args) as srv:
        index = httpx.post(f"{srv.http_url}/v2/repository/index").json()
        assert {e["name"]: e["state"] for e in index} == {
            "a": "READY",
            "b": "READY",
            "c": "READY",
            "d": "UNAVAILABLE",
        }


def test_the_steps_of_tritons_model_control_example(tmp_path: Path) -> None:
    """What Triton's simple_http_model_control.py does, in its order and with its values
    (a config override with max_batch_size as a string, as protobuf's JSON allows), over a
    repository of seven model folders with Triton's ``simple`` among them, none loaded."""
    repository = triton_examples_repository(tmp_path)
    for name in (f"other{i}" for i in range(4)):
        add_version(repository, name, 1)
    args = ("--access-log", "false", "--model-control-mode", "explicit")
    with running_server(repository, tmp_path, *args) as srv:
        client = httpclient.InferenceServerClient(url=srv.url)
        try:
            assert len(client.get_model_repository_index()) == 7
            client.load_model("simple")
            assert client.is_model_ready("simple")
            with pytest.raises(InferenceServerException) as malformed:
                client.load_model("simple", config='"parameters": {"config": {{"x": "16"}}}')
            assert "failed to load" in malformed.value.message()
            client.load_model("simple", config='{"max_batch_size":"16"}')
            assert client.get_model_config("simple")["max_batch_size"] == 16
            client.unload_model("simple")
            assert not client.is_model_ready("simple")
            with pytest.raises(InferenceServerException) as wrong:
                client.load_model("wrong_model_name")
            assert "failed to load" in wrong.value.message()
        finally:
            client.close()


def test_explicit_mode_loads_only_what_it_is_asked(
    server_under_test: RunningServer, repository: Path, http: httpx.Client
) -> None:
    client = httpclient.InferenceServerClient(url=server_under_test.url)
    try:
        assert client.is_server_ready()
        index = client.get_model_repository_index()
        assert {"name": "a", "version": "2", "state": "READY", "reason": ""} in index
        assert {"name": "b", "state": "UNAVAILABLE", "reason": "not loaded"} in index
        assert not client.is_model_ready("b")

        client.load_model("b")  # returns once b is warmed up and ready
        assert client.is_model_ready("b")
        assert answered_version(http.post("/v2/models/b/infer", json=infer_body())) == 1

        # A folder copied in after start-up is loaded on request.
        shutil.copytree(repository / "b", repository / "c")
        config = read_config(repository / "c" / "config.json")
        write_config(repository, config.model_copy(update={"name": "c"}))
        client.load_model("c")
        assert answered_version(http.post("/v2/models/c/infer", json=infer_body())) == 1

        client.unload_model("b")
        assert not client.is_model_ready("b")
        response = http.post("/v2/models/b/infer", json=infer_body())
        assert response.status_code == 404
        assert error_of(response).startswith("Request for unknown model")
        # The unload answers at once; the index says UNLOADING until b has drained.
        unloaded = {"name": "b", "state": "UNAVAILABLE", "reason": "unloaded"}
        assert wait_until(lambda: unloaded in client.get_model_repository_index())
        assert [e["name"] for e in http.post("/v2/repository/index", json={"ready": True}).json()]
        assert all(
            e["state"] == "READY"
            for e in http.post("/v2/repository/index", json={"ready": True}).json()
        )
    finally:
        client.close()


def test_reload_with_a_config_override(
    server_under_test: RunningServer, http: httpx.Client
) -> None:
    client = httpclient.InferenceServerClient(url=server_under_test.url)
    try:
        override = {
            "max_batch_size": 4,
            "dynamic_batching": {
                "max_queue_delay_microseconds": 500,
                "default_queue_policy": {"max_queue_size": 7},
            },
            "version_policy": {"all": {}},
        }
        client.load_model("a", config=json.dumps(override))
        config = client.get_model_config("a")
        assert config["max_batch_size"] == 4
        assert config["dynamic_batching"] == {
            "max_queue_delay_microseconds": 500,
            "default_queue_policy": {"max_queue_size": 7},
        }
        assert config["version_policy"] == {"all": {}}
        # Both versions are served at once; the unversioned route goes to the highest.
        assert client.get_model_metadata("a")["versions"] == ["1", "2"]
        for version in (1, 2):
            assert client.is_model_ready("a", str(version))
            path = f"/v2/models/a/versions/{version}/infer"
            assert answered_version(http.post(path, json=infer_body())) == version
        assert answered_version(http.post("/v2/models/a/infer", json=infer_body())) == 2
        # Statistics per version, as Triton keeps them: version 1 ran one request, version 2
        # two (the versioned one and the unversioned one); all models: both versions listed.
        for version, requests in (("1", 1), ("2", 2)):
            stats = client.get_inference_statistics("a", version)["model_stats"]
            assert [(s["name"], s["version"]) for s in stats] == [("a", version)]
            assert stats[0]["inference_count"] == requests * len(X), stats
            assert int(stats[0]["inference_stats"]["success"]["count"]) == requests, stats
        every = client.get_inference_statistics()["model_stats"]
        assert {(s["name"], s["version"]) for s in every} >= {("a", "1"), ("a", "2")}

        # A load without an override goes back to what config.json says.
        client.load_model("a")
        assert client.get_model_config("a")["version_policy"] == {"latest": {"num_versions": 1}}
        assert not client.is_model_ready("a", "1")
        assert client.get_model_metadata("a")["versions"] == ["2"]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("name", "body", "status", "words"),
    [
        ("a", {"parameters": {"config": "{not json"}}, 400,
         "failed to load 'a', the config override is not valid"),
        ("a", {"parameters": {"config": '{"max_batch_size": 0}'}}, 400,
         "max_batch_size: Input should be greater than or equal to 1"),
        ("a", {"parameters": {"config": '{"input": []}'}}, 400,
         "input: not a field that can be overridden"),
        ("a", {"parameters": {"config": '{"version_policy": {"specific": {"versions": [9]}}}'}},
         400, "version_policy names versions [9] that are not recorded"),
        ("a", {"parameters": {"config": '{"name": "b"}'}}, 400, "names model 'b'"),
        ("a", {"parameters": {"config": 7}}, 400, "'config' must be a JSON string"),
        ("a", {"parameters": {"file:1/model.onnx": "AAAA"}}, 400,
         "model files come only from the repository"),
        ("a", {"unexpected": 1}, 400, "unknown field"),
        ("nope", {}, 400, "failed to load 'nope', failed to poll from model repository"),
        ("%2E%2E", {}, 400, "failed to load '..', not a model name"),
        (".hidden", {}, 400, "failed to load '.hidden', not a model name"),
        ("..%2Fetc", {}, 404, "no route"),
    ],
)  # fmt: skip
def test_bad_loads_are_refused_and_change_nothing(
    http: httpx.Client, name: str, body: dict[str, Any], status: int, words: str
) -> None:
    response = http.post(f"/v2/repository/models/{name}/load", json=body)
    assert response.status_code == status, response.text
    assert words in error_of(response)
    # What was served is still served, unchanged.
    assert answered_version(http.post("/v2/models/a/infer", json=infer_body())) == 2
    assert http.get("/v2/models/a/config").json()["max_batch_size"] == 8


def test_unload_of_an_unknown_model_and_a_bad_index_body(http: httpx.Client) -> None:
    response = http.post("/v2/repository/models/nope/unload")
    assert response.status_code == 400
    assert error_of(response).startswith("failed to unload 'nope'")
    response = http.post("/v2/repository/index", json={"ready": "yes"})
    assert response.status_code == 400 and "'ready'" in error_of(response)


def test_version_policy_errors_make_the_model_unavailable_with_the_reason(
    server_under_test: RunningServer, repository: Path, http: httpx.Client
) -> None:
    config = json.loads((repository / "b" / "config.json").read_text())
    config["version_policy"] = {"latest": {"num_versions": 1}, "all": {}}
    (repository / "b" / "config.json").write_text(json.dumps(config))
    response = http.post("/v2/repository/models/b/load")
    assert response.status_code == 400
    assert "failed to load 'b'" in error_of(response)
    assert "exactly one of 'latest', 'all', 'specific'" in error_of(response)
    index = {e["name"]: e for e in http.post("/v2/repository/index").json()}
    assert index["b"]["state"] == "UNAVAILABLE"
    assert "exactly one of" in index["b"]["reason"]
    assert http.get("/v2/health/ready").status_code == 503  # strict readiness, as Triton
    http.post("/v2/repository/models/b/unload").raise_for_status()
    assert http.get("/v2/health/ready").status_code == 200


# ------------------------------------------------------------------------------ under load


def test_version_swap_under_load_loses_nothing(
    server_under_test: RunningServer, repository: Path, http: httpx.Client
) -> None:
    with LoadGenerator(server_under_test.http_url, "/v2/models/a/infer") as load:
        load.wait_for(50)
        add_version(repository, "a", 3)
        http.post("/v2/repository/models/a/load").raise_for_status()  # 2 -> 3
        swapped = time.monotonic()
        load.wait_for(len(load.results) + 50)
        # The same version again, with other batching: a replacement of version 3 itself.
        override = {"dynamic_batching": {"max_queue_delay_microseconds": 200}}
        answer = http.post(
            "/v2/repository/models/a/load",
            json={"parameters": {"config": json.dumps(override)}},
        )
        answer.raise_for_status()
        load.wait_for(len(load.results) + 50)
    failed = [r for r in load.results if r[1] != 200]
    assert not failed, f"{len(failed)} of {len(load.results)} failed: {failed[:3]}"
    versions = [r[2] for r in load.results]
    assert {2, 3} <= set(versions)
    # Once the load answered, no new request reached the old version.
    assert all(v == 3 for started, _, v in load.results if started > swapped)
    # The replaced instances drain and go promptly: only version 3 is left.
    only_3 = [{"name": "a", "version": "3", "state": "READY", "reason": ""}]
    assert wait_until(
        lambda: [e for e in http.post("/v2/repository/index").json() if e["name"] == "a"] == only_3
    )


def test_unload_under_load_finishes_what_was_admitted(
    server_under_test: RunningServer, http: httpx.Client
) -> None:
    with LoadGenerator(server_under_test.http_url, "/v2/models/a/infer") as load:
        load.wait_for(50)
        unloading = time.monotonic()
        http.post("/v2/repository/models/a/unload").raise_for_status()
        unloaded = time.monotonic()
        load.wait_for(len(load.results) + 20)
    assert len(load.results) > 70
    for started, status, outcome in load.results:
        if status == 200:
            assert outcome == 2
            continue
        # Refused only because it came after the unload, with Triton's wording; never a
        # dropped connection, a 5xx or a request lost on its way in.
        assert status == 404 and "Request for unknown model" in str(outcome), outcome
        assert started >= unloading - 0.05, (started, unloading)
    assert any(status == 200 for _, status, _ in load.results)
    assert all(s == 404 for started, s, _ in load.results if started > unloaded + 0.05)
    # Drained and released promptly: nothing it admitted is left outstanding.
    gone = {"name": "a", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert wait_until(lambda: http.post("/v2/repository/index").json()[0] == gone)


def test_replaced_and_unloaded_versions_finish_what_they_admitted(repository: Path) -> None:
    """In process, step by step: a request admitted before a swap (its body still being
    read) and requests already queued complete on the old instance; the index says
    LOADING and UNLOADING meanwhile."""
    add_version(repository, "a", 1)
    add_version(repository, "b", 1)
    settings = Settings(repository=repository, model_control_mode="explicit", load_model="a")
    store = ModelStore(settings)
    control = ModelControl(store)

    def states(name: str) -> list[tuple[str | None, str]]:
        return [(e.get("version"), e["state"]) for e in control.index() if e["name"] == name]

    async def drained() -> None:
        for _ in range(1000):  # 10 s at most: a drain here takes milliseconds
            if not store.draining():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"still draining: {store.draining()}")

    async def scenario() -> None:
        await control.start()
        old_place = store.hold("a")  # admitted; its body is "still being read"
        old = old_place.served
        queued = []
        for _ in range(3):
            place = store.hold("a")
            queued.append(store.submit(place.served, {"x": X}, None, place))

        # b's build waits at a gate (in its thread), so that LOADING is seen for certain.
        gate, build = threading.Event(), store.build

        def gated(config: ModelConfig, version: ModelVersion) -> Served:
            gate.wait(timeout=30)
            return build(config, version)

        store.build = gated  # type: ignore[method-assign]
        loading = asyncio.create_task(control.load("b"))
        for _ in range(1000):
            if states("b") == [("1", "LOADING")]:
                break
            await asyncio.sleep(0.005)
        assert states("b") == [("1", "LOADING")]
        gate.set()
        await loading
        store.build = build  # type: ignore[method-assign]
        assert states("b") == [("1", "READY")]

        override = json.dumps({"dynamic_batching": {"max_queue_delay_microseconds": 100}})
        await control.load("a", override)  # version 1 replaced by a new instance of itself
        assert store.get("a") is not old
        assert states("a") == [("1", "READY")]  # the new one; the old is still draining
        await asyncio.sleep(0.1)  # the admitted request's body takes its time
        assert [*store.draining()] == [("a", "1")]
        late = store.submit(old, {"x": X}, None, old_place)  # and it arrives now
        for answer in await asyncio.gather(*queued, late):
            np.testing.assert_allclose(answer["scores"], expected(X) + 1, atol=1e-5)
        await drained()
        with pytest.raises(ModelNotReady, match="not accepting requests"):
            old.batcher.check_room()  # released once drained

        held = store.hold("b")
        await control.unload("b")
        await asyncio.sleep(0.1)
        assert states("b") == [("1", "UNLOADING")]
        with pytest.raises(ModelNotFound, match="Request for unknown model"):
            store.admit("b")
        answer = await store.submit(held.served, {"x": X}, None, held)
        np.testing.assert_allclose(answer["scores"], expected(X) + 1, atol=1e-5)
        await drained()
        assert states("b") == [(None, "UNAVAILABLE")]
        await store.stop()

    asyncio.run(scenario())


def test_every_admitted_request_is_accounted_for(repository: Path) -> None:
    """Whatever becomes of a request (answered, bad body, bad outputs, V1 or V2), the
    instance it was admitted to ends with nothing outstanding: a drain never waits for it."""
    add_version(repository, "a", 1)
    app = create_app(Settings(repository=repository, access_log=False))
    bad_output = {**infer_body(), "outputs": [{"name": "nope"}]}
    with TestClient(app) as client:
        answers = [
            client.post("/v2/models/a/infer", json=infer_body()).status_code,
            client.post("/v2/models/a/infer", content=b"{not json").status_code,
            client.post("/v2/models/a/infer", json=bad_output).status_code,
            client.post("/v1/models/a:predict", json={"instances": X.tolist()}).status_code,
            client.post("/v1/models/a:predict", content=b"[]").status_code,
        ]
        assert answers == [200, 400, 400, 200, 400]
        assert app.store.served["a"].batcher.held == 0


# ------------------------------------------------------------------------------ mode poll


def test_poll_mode_follows_the_repository(repository: Path, tmp_path: Path) -> None:
    add_version(repository, "a", 1)
    args = ("--access-log", "false", "--model-control-mode", "poll",
            "--repository-poll-secs", "0.3")  # fmt: skip
    with (
        running_server(repository, tmp_path, *args) as srv,
        httpx.Client(base_url=srv.http_url, timeout=30) as http,
    ):
        response = http.post("/v2/repository/models/a/unload")
        assert response.status_code == 503 and error_of(response) == DISABLED

        add_version(repository, "b", 1)  # a new folder
        assert wait_until(lambda: http.get("/v2/models/b/ready").status_code == 200)
        add_version(repository, "a", 2)  # a new version of a served model
        assert wait_until(lambda: http.get("/v2/models/a").json()["versions"] == ["2"])
        assert answered_version(http.post("/v2/models/a/infer", json=infer_body())) == 2

        shutil.rmtree(repository / "b")  # a removed folder
        assert wait_until(lambda: http.get("/v2/models/b/ready").status_code == 404)
        names = {e["name"] for e in http.post("/v2/repository/index").json()}
        assert names == {"a"}


def wait_until(condition: Any, periods: float = 10, period_s: float = 0.3) -> bool:
    """``condition()`` within a few poll periods."""
    deadline = time.monotonic() + periods * period_s + 5  # + a load with warm-up
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------ settings and format


def test_control_settings() -> None:
    assert Settings(load_model=" a, b ,*").load_models == ["a", "b", "*"]
    with pytest.raises(ValueError, match="not model names"):
        Settings(load_model="a,../b")
    with pytest.raises(ValueError, match="explicit needs workers=1"):
        Settings(model_control_mode="explicit", workers=2, intra_op_threads=1)


def test_version_policies_select_versions(repository: Path) -> None:
    for version in (1, 2, 3):
        config = add_version(repository, "a", version)
    served = lambda policy: [  # noqa: E731
        v.version
        for v in ModelConfig.model_validate(
            {**config.model_dump(), "version_policy": policy}
        ).served_versions()
    ]
    assert served({"latest": {"num_versions": 2}}) == [2, 3]
    assert served({"all": {}}) == [1, 2, 3]
    assert served({"specific": {"versions": [3, 1]}}) == [1, 3]
    assert [v.version for v in config.served_versions()] == [3]  # default: latest 1
    for bad in ({}, {"latest": {"num_versions": 0}}, {"specific": {"versions": []}},
                {"newest": {}}):  # fmt: skip
        with pytest.raises(ValueError, match="version_policy"):
            ModelConfig.model_validate({**config.model_dump(), "version_policy": bad})


def test_onnx_fixture_is_the_versioned_model(tmp_path: Path) -> None:
    model = onnx.load(str(versioned_onnx(tmp_path / "v.onnx", 5)))
    bias = next(t for t in model.graph.initializer if t.name == "B")
    np.testing.assert_array_equal(numpy_helper.to_array(bias), BIAS + 5)
