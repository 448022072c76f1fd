"""The unmodified tritonclient.grpc (sync, aio, streams) against a real ``python -m service``
with its gRPC API on: every RPC, raw and typed contents, batch sizes 1..max, answers
compared with onnxruntime run here, and a catalogue of bad requests with their status codes.
"""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import RunningServer, running_server

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
import tritonclient.grpc.aio as aioclient  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = ("digits_cnn", "digits_transformer", "digits_recurrent")
MAX_BATCH = 64
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server(
    built_repository: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(
        built_repository[0], tmp_path_factory.mktemp("grpc"), "--max-request-bytes", "1048576",
        "--log-format", "json",
        grpc=True,
    ) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[Any]:
    """Triton's own generated stub, for messages tritonclient's helpers never build (typed
    contents, malformed requests)."""
    channel = grpc.insecure_channel(server.grpc_url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def sessions(built_repository: tuple[Path, Path, str]) -> dict[str, ort.InferenceSession]:
    repository = built_repository[0]
    return {m: ort.InferenceSession(str(repository / m / "1" / "model.onnx")) for m in MODELS}


def images(model: str, batch: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).random((batch, 8, 8), dtype=np.float32) * 16
    return np.ascontiguousarray(x[:, None] if model == "digits_cnn" else x)


def reference(sessions: dict[str, ort.InferenceSession], model: str, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = sessions[model].run(["logits"], {"image": x})[0]
    return out


def assert_matches(actual: np.ndarray | None, expected: np.ndarray) -> None:
    assert actual is not None and actual.dtype == np.float32 and actual.shape == expected.shape
    atol = 1e-5 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol)


def raw_input(x: np.ndarray, name: str = "image", datatype: str = "FP32") -> Any:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def typed_request(model: str, x: np.ndarray, **fields: Any) -> Any:
    request = pb.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


# ------------------------------------------------------------------------ health and metadata


def test_health_metadata_config_index(client: Any, server: RunningServer) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits_cnn")
    assert client.is_model_ready("digits_cnn", "1")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("digits_cnn", "7")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "normserve" and "model_repository" in meta["extensions"]
    for model in MODELS:
        info = client.get_model_metadata(model, as_json=True)
        assert info["name"] == model and info["versions"] == ["1"]
        assert info["inputs"][0]["datatype"] == "FP32"
        assert info["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
        config = client.get_model_config(model, as_json=True)["config"]
        assert config["max_batch_size"] == MAX_BATCH
        assert config["input"][0]["data_type"] == "TYPE_FP32"
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"]: m["state"] for m in index}.items() >= dict.fromkeys(MODELS, "READY").items()
    with pytest.raises(InferenceServerException) as error:
        client.get_model_metadata("no_such_model")
    assert error.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as error:
        client.load_model("digits_cnn")  # model control mode none (Triton's default)
    assert error.value.status() == "StatusCode.UNAVAILABLE"


def test_model_control_over_grpc(model_copies: Callable[..., Path], tmp_path: Path) -> None:
    """Explicit mode: load (with a config override), serve, unload and refuse over gRPC,
    the same operations as the HTTP routes (Protocol.load_model / unload_model)."""
    repository = model_copies("digits_cnn", "digits_recurrent")
    with running_server(
        repository, tmp_path, "--model-control-mode", "explicit", "--load-model", "digits_cnn",
        grpc=True,
    ) as srv:  # fmt: skip
        c = grpcclient.InferenceServerClient(url=srv.grpc_url)
        try:
            assert not c.is_model_ready("digits_recurrent")
            c.load_model("digits_recurrent", config=json.dumps({"max_batch_size": 4}))
            assert c.is_model_ready("digits_recurrent")
            config = c.get_model_config("digits_recurrent", as_json=True)["config"]
            assert config["max_batch_size"] == 4
            x = grpcclient.InferInput("image", [1, 8, 8], "FP32")
            x.set_data_from_numpy(images("digits_recurrent", 1))
            assert c.infer("digits_recurrent", [x]).as_numpy("logits").shape == (1, 10)
            c.unload_model("digits_recurrent")
            assert not c.is_model_ready("digits_recurrent")
            states = {m["name"]: m.get("state") for m in c.get_model_repository_index(
                as_json=True)["models"]}  # fmt: skip
            assert states["digits_cnn"] == "READY" and states["digits_recurrent"] != "READY"
            with pytest.raises(InferenceServerException) as error:
                c.load_model("../etc")
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "failed to load" in error.value.message()
            with pytest.raises(InferenceServerException) as error:
                c.load_model("digits_cnn", files={"file:1/model.onnx": b"\0"})
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "only 'config' is accepted" in error.value.message()
        finally:
            c.close()


def test_standard_health_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------ inference


@pytest.mark.parametrize("model", MODELS)
def test_raw_contents_every_batch_size(
    client: Any, sessions: dict[str, ort.InferenceSession], model: str
) -> None:
    for batch in range(1, MAX_BATCH + 1):
        x = images(model, batch, seed=batch)
        result = client.infer(model, [raw_input(x)], request_id=f"r{batch}")
        assert result.get_response().id == f"r{batch}"
        assert result.get_response().model_version == "1"
        assert_matches(result.as_numpy("logits"), reference(sessions, model, x))


def test_typed_contents_in_and_out(stub: Any, sessions: dict[str, ort.InferenceSession]) -> None:
    x = images("digits_transformer", 3)
    expected = reference(sessions, "digits_transformer", x)
    # Raw out (Triton's default) for typed in.
    answer = stub.ModelInfer(typed_request("digits_transformer", x, id="typed"), timeout=10)
    assert answer.id == "typed" and len(answer.raw_output_contents) == 1
    raw = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(answer.outputs[0].shape)
    assert_matches(raw, expected)
    # Typed out, asked per output with binary_data false.
    request = typed_request("digits_transformer", x)
    request.outputs.add(name="logits").parameters["binary_data"].bool_param = False
    answer = stub.ModelInfer(request, timeout=10)
    assert not answer.raw_output_contents
    output = answer.outputs[0]
    typed = np.array(output.contents.fp32_contents, dtype=np.float32).reshape(output.shape)
    assert_matches(typed, expected)
    # ... or for the whole request.
    request = typed_request("digits_transformer", x)
    request.parameters["binary_data_output"].bool_param = False
    assert len(stub.ModelInfer(request, timeout=10).outputs[0].contents.fp32_contents) == 30


def test_requested_outputs_and_timeout_parameter(
    client: Any, sessions: dict[str, ort.InferenceSession]
) -> None:
    x = images("digits_cnn", 2)
    outputs = [grpcclient.InferRequestedOutput("logits")]
    result = client.infer("digits_cnn", [raw_input(x)], outputs=outputs, timeout=10_000_000)
    assert_matches(result.as_numpy("logits"), reference(sessions, "digits_cnn", x))
    # One microsecond: the request's time is up before its batch can run.
    with pytest.raises(InferenceServerException) as error:
        client.infer("digits_cnn", [raw_input(x)], timeout=1)
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"


def test_client_deadline_is_honoured(client: Any) -> None:
    # gRPC's deadlines have millisecond resolution: 64 rows of the transformer take several
    # milliseconds of compute alone, so this call cannot finish in time.
    x = images("digits_transformer", MAX_BATCH)
    with pytest.raises(InferenceServerException) as error:
        client.infer("digits_transformer", [raw_input(x)], client_timeout=1e-6)
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert client.infer("digits_transformer", [raw_input(x)]).as_numpy("logits").shape == (64, 10)


def test_aio_client(server: RunningServer, sessions: dict[str, ort.InferenceSession]) -> None:
    async def run() -> None:
        async with aioclient.InferenceServerClient(url=server.grpc_url) as c:
            assert await c.is_server_ready()
            meta = await c.get_model_metadata("digits_recurrent", as_json=True)
            assert meta["name"] == "digits_recurrent"
            xs = [images("digits_recurrent", b, seed=b) for b in (1, 5, 64)]
            results = await asyncio.gather(
                *(c.infer("digits_recurrent", [raw_input(x)]) for x in xs)
            )
            for x, result in zip(xs, results, strict=True):
                assert_matches(
                    result.as_numpy("logits"), reference(sessions, "digits_recurrent", x)
                )
            stats = await c.get_inference_statistics("digits_recurrent", as_json=True)
            assert int(stats["model_stats"][0]["inference_stats"]["success"]["count"]) >= 3

            # A stream from an async iterator of requests; the bad one answers in its place.
            async def requests() -> Any:
                for i, x in enumerate(xs):
                    yield {"model_name": "digits_recurrent", "inputs": [raw_input(x)],
                           "request_id": str(i)}  # fmt: skip
                yield {"model_name": "no_such_model", "inputs": [raw_input(xs[0])]}
                yield {"model_name": "digits_recurrent", "inputs": [raw_input(xs[0])],
                       "request_id": "last"}  # fmt: skip

            answers = [answer async for answer in c.stream_infer(requests())]
            assert len(answers) == 5
            for i, (result, error) in enumerate(answers[:3]):
                assert error is None and result.get_response().id == str(i)
                assert_matches(
                    result.as_numpy("logits"), reference(sessions, "digits_recurrent", xs[i])
                )
            assert answers[3][0] is None and "unknown model" in str(answers[3][1])
            assert answers[4][1] is None and answers[4][0].get_response().id == "last"

    asyncio.run(run())


def test_sync_stream_answers_in_order_and_survives_errors(
    client: Any, sessions: dict[str, ort.InferenceSession]
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        xs = [images("digits_cnn", 1 + i % 7, seed=i) for i in range(40)]
        bad = {10: "digits_nope", 25: "digits_cnn"}
        for i, x in enumerate(xs):
            model = bad.get(i, "digits_cnn")
            inputs = [raw_input(x[:, 0] if i == 25 else x)]  # 25: wrong rank
            client.async_stream_infer(model, inputs, request_id=str(i))
        for i, x in enumerate(xs):
            result, error = answers.get(timeout=30)
            if i in bad:
                assert result is None and error is not None
                assert ("unknown model" if i == 10 else "expected shape") in str(error)
                continue
            assert error is None and result.get_response().id == str(i)
            assert_matches(result.as_numpy("logits"), reference(sessions, "digits_cnn", x))
    finally:
        client.stop_stream()


def test_metrics_statistics_and_access_log(server: RunningServer, client: Any) -> None:
    before = client.get_inference_statistics("digits_cnn", as_json=True)["model_stats"][0]
    x = images("digits_cnn", 4)
    client.infer("digits_cnn", [raw_input(x)], headers={"x-request-id": "grpc-log-check"})
    after = client.get_inference_statistics("digits_cnn", as_json=True)["model_stats"][0]
    # proto3 JSON leaves out zero counts: none before the first inference.
    assert int(after["inference_count"]) >= int(before.get("inference_count", 0)) + 4
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    grpc_ok = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "normserve_requests_total"
        and sample.labels == {"model": "digits_cnn", "protocol": "grpc", "status": "OK"}
    ]
    assert grpc_ok and grpc_ok[0] >= 1
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    (entry,) = [line for line in lines if line.get("request_id") == "grpc-log-check"]
    assert entry["method"] == "GRPC" and entry["status"] == "OK" and entry["ms"] > 0
    assert entry["path"] == "/inference.GRPCInferenceService/ModelInfer"


# ------------------------------------------------------------------------ bad requests

GOOD = images("digits_cnn", 2)


def _raw(request: Any, *arrays: np.ndarray) -> Any:
    request.raw_input_contents.extend(a.tobytes() for a in arrays)
    return request


def _with_input(
    datatype: str = "FP32", shape: tuple[int, ...] = (2, 1, 8, 8), name: str = "image"
) -> Any:
    request = pb.ModelInferRequest(model_name="digits_cnn")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


def _both() -> Any:
    request = typed_request("digits_cnn", GOOD)
    return _raw(request, GOOD)


def _twice() -> Any:
    request = _with_input()
    request.inputs.add(name="image", datatype="FP32", shape=(2, 1, 8, 8))
    return _raw(request, GOOD, GOOD)


def _output(name: str, times: int = 1, **parameters: Any) -> Any:
    request = _raw(_with_input(), GOOD)
    for _ in range(times):
        output = request.outputs.add(name=name)
        for key, value in parameters.items():
            output.parameters[key].string_param = value
    return request


def _parameter(key: str, **value: Any) -> Any:
    request = _raw(_with_input(), GOOD)
    request.parameters[key].MergeFrom(pb.InferParameter(**value))
    return request


def _input_parameter(key: str) -> Any:
    request = _raw(_with_input(), GOOD)
    request.inputs[0].parameters[key].string_param = "region"
    return request


def _typed_nan() -> Any:
    x = GOOD.copy()
    x[1, 0, 3, 3] = np.nan
    return typed_request("digits_cnn", x)


def _typed_field(field: str) -> Any:
    request = _with_input()
    getattr(request.inputs[0].contents, field).extend([1] * GOOD.size)
    return request


CATALOGUE: list[tuple[str, Callable[[], Any], Code, str]] = [
    ("unknown model", lambda: pb.ModelInferRequest(model_name="nope"), Code.NOT_FOUND,
     "unknown model"),
    ("unknown version", lambda: _raw(pb.ModelInferRequest(model_name="digits_cnn",
     model_version="9", inputs=_with_input().inputs), GOOD), Code.NOT_FOUND, "version '9'"),
    ("invalid model name", lambda: pb.ModelInferRequest(model_name="../etc"),
     Code.INVALID_ARGUMENT, "invalid model name"),
    ("no inputs", lambda: pb.ModelInferRequest(model_name="digits_cnn"), Code.INVALID_ARGUMENT,
     "'inputs' is empty"),
    ("unsupported datatype", lambda: _raw(_with_input("FP8"), GOOD), Code.INVALID_ARGUMENT,
     "unsupported datatype"),
    ("wrong datatype", lambda: _raw(_with_input("FP64"), GOOD.astype(np.float64)),
     Code.INVALID_ARGUMENT, "expected datatype FP32"),
    ("wrong rank", lambda: _raw(_with_input(shape=(2, 8, 8)), GOOD), Code.INVALID_ARGUMENT,
     "rank 4"),
    ("empty batch", lambda: _raw(_with_input(shape=(0, 1, 8, 8)), GOOD[:0]),
     Code.INVALID_ARGUMENT, "batch is empty"),
    ("batch over the maximum", lambda: _raw(_with_input(shape=(65, 1, 8, 8)),
     images("digits_cnn", 65)), Code.INVALID_ARGUMENT, "exceeds the model's maximum"),
    ("too many elements", lambda: _with_input(shape=(2, 1, 8, 2**40)), Code.INVALID_ARGUMENT,
     "the limit is"),
    ("unknown input", lambda: _raw(_with_input(name="pixels"), GOOD), Code.INVALID_ARGUMENT,
     "no input(s)"),
    ("input twice", _twice, Code.INVALID_ARGUMENT, "more than once"),
    ("raw size wrong", lambda: _raw(_with_input(), GOOD[:1]), Code.INVALID_ARGUMENT,
     "needs 512 bytes"),
    ("raw count wrong", lambda: _raw(_with_input(), GOOD, GOOD), Code.INVALID_ARGUMENT,
     "raw_input_contents has 2 entries"),
    ("raw and typed", _both, Code.INVALID_ARGUMENT, "both typed"),
    ("typed count wrong", lambda: typed_request("digits_cnn", GOOD[:, :, :4]),
     Code.INVALID_ARGUMENT, "expected shape"),
    ("typed in the wrong field", lambda: _typed_field("int_contents"), Code.INVALID_ARGUMENT,
     "contents.fp32_contents"),
    ("typed FP16", lambda: _with_input("FP16"), Code.INVALID_ARGUMENT, "expected datatype"),
    ("NaN in typed data", _typed_nan, Code.INVALID_ARGUMENT, "finite"),
    ("unknown requested output", lambda: _output("probabilities"), Code.INVALID_ARGUMENT,
     "does not exist"),
    ("output twice", lambda: _output("logits", times=2), Code.INVALID_ARGUMENT,
     "more than once"),
    ("binary_data not a bool", lambda: _output("logits", binary_data="yes"),
     Code.INVALID_ARGUMENT, "binary_data"),
    ("classification", lambda: _output("logits", classification="3"), Code.INVALID_ARGUMENT,
     "not supported"),
    ("shared memory input", lambda: _input_parameter("shared_memory_region"),
     Code.INVALID_ARGUMENT, "not supported"),
    ("negative timeout", lambda: _parameter("timeout", int64_param=-5), Code.INVALID_ARGUMENT,
     "timeout"),
    ("timeout as text", lambda: _parameter("timeout", string_param="5"),
     Code.INVALID_ARGUMENT, "timeout"),
    ("too many tensors", lambda: _output("logits", times=64), Code.INVALID_ARGUMENT,
     "the limit is 64"),
    ("message over max_request_bytes", lambda: _raw(_with_input(), np.zeros(2**19, np.float32)),
     Code.RESOURCE_EXHAUSTED, "larger than max"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "code", "fragment"),
    [case[1:] for case in CATALOGUE],
    ids=[case[0] for case in CATALOGUE],
)
def test_bad_request_catalogue(
    stub: Any, client: Any, build: Callable[[], Any], code: Code, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(build(), timeout=10)
    assert error.value.code() == code, error.value.details()
    assert fragment in error.value.details()
    assert "Traceback" not in error.value.details()
    # The server and the client's channel both still work.
    assert client.infer("digits_cnn", [raw_input(GOOD)]).as_numpy("logits").shape == (2, 10)
