"""The unmodified tritonclient (sync and aio) and httpx against a real ``python -m service``.

Every numeric answer is compared with onnxruntime run in this process on the same
``repository/<model>/1/model.onnx``; every error is checked for its message and for the client
staying usable afterwards (a broken pooled connection would fail the next call).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

MODELS = ("digits_cnn", "digits_transformer", "digits_recurrent")
INPUT_SHAPES = {
    "digits_cnn": [-1, 1, 8, 8],
    "digits_transformer": [-1, 8, 8],
    "digits_recurrent": [-1, 8, 8],
}
MIN_ACCURACY = {"digits_cnn": 0.97, "digits_transformer": 0.95, "digits_recurrent": 0.95}
MAX_BATCH = 64
CONCURRENT = 32
MAX_ROUNDS = 5  # rounds of CONCURRENT requests to see one batch of more than one row

Images = np.ndarray


# ------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def digits() -> tuple[Images, np.ndarray]:
    from models.data import load_digits_split

    test = load_digits_split().test
    images = np.ascontiguousarray(test.images.numpy(), dtype=np.float32)
    labels = test.labels.numpy().astype(np.int64)
    assert images.shape == (360, 8, 8) and labels.shape == (360,)
    return images, labels


@pytest.fixture(scope="module")
def sessions(built_repository: tuple[Path, Path, str]) -> dict[str, ort.InferenceSession]:
    repository = built_repository[0]
    return {m: ort.InferenceSession(str(repository / m / "1" / "model.onnx")) for m in MODELS}


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30.0) as c:
        yield c


def shaped(model: str, images: Images) -> Images:
    """[N, 8, 8] digits in the model's input layout."""
    return np.ascontiguousarray(images[:, None] if model == "digits_cnn" else images)


def reference(sessions: dict[str, ort.InferenceSession], model: str, x: Images) -> np.ndarray:
    out: np.ndarray = sessions[model].run(["logits"], {"image": x})[0]
    return out


def assert_matches_reference(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    atol = 1e-5 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol)


def image_input(
    x: np.ndarray, binary: bool = True, datatype: str = "FP32", name: str = "image"
) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def requested(mode: str | None) -> list[httpclient.InferRequestedOutput] | None:
    if mode is None:
        return None
    return [httpclient.InferRequestedOutput("logits", binary_data=mode == "binary")]


def infer(
    client: httpclient.InferenceServerClient, model: str, x: np.ndarray, **kwargs: Any
) -> np.ndarray:
    out = client.infer(model, [image_input(x)], **kwargs).as_numpy("logits")
    assert out is not None
    return out


def assert_client_still_works(
    client: httpclient.InferenceServerClient,
    sessions: dict[str, ort.InferenceSession],
    digits: tuple[Images, np.ndarray],
) -> None:
    x = shaped("digits_cnn", digits[0][:2])
    assert_matches_reference(infer(client, "digits_cnn", x), reference(sessions, "digits_cnn", x))


def batch_histogram(http: httpx.Client, model: str) -> tuple[float, float]:
    """(observations with le="1", all observations) of normserve_batch_size for ``model``."""
    response = http.get("/metrics")
    assert response.status_code == 200
    single, total = 0.0, 0.0
    for family in text_string_to_metric_families(response.text):
        if family.name != "normserve_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_bucket") and float(sample.labels["le"]) == 1.0:
                single = sample.value
            elif sample.name.endswith("_count"):
                total = sample.value
    return single, total


def model_stats(client: httpclient.InferenceServerClient, model: str) -> dict[str, Any]:
    stats = client.get_inference_statistics(model)["model_stats"]
    assert [s["name"] for s in stats] == [model]
    entry: dict[str, Any] = stats[0]
    return entry


# ------------------------------------------------------------------------ server and models


def test_server_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    metadata = client.get_server_metadata()
    assert metadata["name"] == "normserve"
    assert isinstance(metadata["version"], str) and metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


@pytest.mark.parametrize("model", MODELS)
def test_model_ready(client: httpclient.InferenceServerClient, model: str) -> None:
    assert client.is_model_ready(model) is True
    assert client.is_model_ready(model, model_version="1") is True
    # The client only looks at the status code: a 404 is "not ready", not an exception.
    assert client.is_model_ready(model, model_version="2") is False


def test_unknown_model_is_not_ready(client: httpclient.InferenceServerClient) -> None:
    assert client.is_model_ready("no_such_model") is False
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert "not found" in info.value.message()
    assert info.value.status() == "404"


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata(client: httpclient.InferenceServerClient, model: str) -> None:
    metadata = client.get_model_metadata(model)
    assert metadata["name"] == model
    assert metadata["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("image", "FP32", INPUT_SHAPES[model])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("logits", "FP32", [-1, 10])
    ]
    assert metadata["parameters"]["labels"] == [str(d) for d in range(10)]
    assert client.get_model_metadata(model, model_version="1") == metadata


@pytest.mark.parametrize("model", MODELS)
def test_model_config(client: httpclient.InferenceServerClient, model: str) -> None:
    config = client.get_model_config(model)
    assert config["name"] == model
    assert config["max_batch_size"] == MAX_BATCH
    # Triton's dims leave out the batch axis.
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("image", "TYPE_FP32", INPUT_SHAPES[model][1:])
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
        ("logits", "TYPE_FP32", [10])
    ]


def test_repository_index(client: httpclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    # The defaults (the sequence model too) and the batch-statistics demonstration model.
    built = (*MODELS, "digits_sequence", "digits_cnn_batchstats")
    assert sorted((e["name"], e.get("version"), e["state"]) for e in index) == sorted(
        (m, "1", "READY") for m in built
    )


def test_statistics_count_the_rows_inferred(
    client: httpclient.InferenceServerClient, digits: tuple[Images, np.ndarray]
) -> None:
    model, rows = "digits_transformer", 7
    before = model_stats(client, model)
    infer(client, model, shaped(model, digits[0][:rows]))
    after = model_stats(client, model)
    assert after["inference_count"] == before["inference_count"] + rows
    assert after["execution_count"] == before["execution_count"] + 1
    assert after["version"] == "1"
    batches = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert batches.get(rows, 0) >= 1
    assert after["last_inference"] >= before["last_inference"]


# ------------------------------------------------------------------------ inference


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("output", ["binary", "json", None])
@pytest.mark.parametrize("binary_input", [True, False], ids=["bin-in", "json-in"])
@pytest.mark.parametrize("model", MODELS)
def test_infer_matches_onnxruntime(
    client: httpclient.InferenceServerClient,
    sessions: dict[str, ort.InferenceSession],
    digits: tuple[Images, np.ndarray],
    model: str,
    binary_input: bool,
    output: str | None,
    rows: int,
) -> None:
    x = shaped(model, digits[0][rows : 2 * rows])
    result = client.infer(model, [image_input(x, binary_input)], outputs=requested(output))
    response = result.get_response()
    assert response["model_name"] == model
    assert response["model_version"] == "1"
    described = result.get_output("logits")
    assert described["datatype"] == "FP32" and described["shape"] == [rows, 10]
    if output == "json":
        assert "data" in described and "parameters" not in described
    else:  # no requested outputs: the client asks for binary_data_output
        assert described["parameters"]["binary_data_size"] == rows * 10 * 4
    logits = result.as_numpy("logits")
    assert logits is not None
    assert_matches_reference(logits, reference(sessions, model, x))


@pytest.mark.parametrize("model", MODELS)
def test_json_and_binary_outputs_are_the_same_floats(
    client: httpclient.InferenceServerClient, digits: tuple[Images, np.ndarray], model: str
) -> None:
    x = shaped(model, digits[0][:16])
    binary = infer(client, model, x, outputs=requested("binary"))
    as_json = infer(client, model, x, outputs=requested("json"))
    assert np.array_equal(binary, as_json), float(np.abs(binary - as_json).max())


@pytest.mark.parametrize("model", MODELS)
def test_accuracy_over_the_test_split(
    client: httpclient.InferenceServerClient, digits: tuple[Images, np.ndarray], model: str
) -> None:
    images, labels = digits
    predictions = [
        infer(client, model, shaped(model, images[start : start + MAX_BATCH])).argmax(axis=1)
        for start in range(0, len(images), MAX_BATCH)
    ]
    predicted = np.concatenate(predictions)
    assert predicted.shape == labels.shape
    accuracy = float((predicted == labels).mean())
    assert accuracy >= MIN_ACCURACY[model], f"{model}: accuracy {accuracy:.4f}"


def test_request_id_is_echoed(
    client: httpclient.InferenceServerClient, digits: tuple[Images, np.ndarray]
) -> None:
    x = shaped("digits_cnn", digits[0][:1])
    result = client.infer("digits_cnn", [image_input(x)], request_id="req-42/ü")
    assert result.get_response()["id"] == "req-42/ü"
    # Without one, the request's own X-Request-ID (KServe's response models require an id).
    made = client.infer("digits_cnn", [image_input(x)], headers={"X-Request-ID": "trace-7"})
    assert made.get_response()["id"] == "trace-7"


def test_model_version_path(
    client: httpclient.InferenceServerClient,
    sessions: dict[str, ort.InferenceSession],
    digits: tuple[Images, np.ndarray],
) -> None:
    x = shaped("digits_recurrent", digits[0][:3])
    versioned = client.infer("digits_recurrent", [image_input(x)], model_version="1")
    assert versioned.get_response()["model_version"] == "1"
    logits = versioned.as_numpy("logits")
    assert logits is not None
    assert_matches_reference(logits, reference(sessions, "digits_recurrent", x))
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits_recurrent", [image_input(x)], model_version="2")
    message = info.value.message()
    assert "version '2'" in message and "not found" in message, message
    assert info.value.status() == "404"
    assert_client_still_works(client, sessions, digits)


# ------------------------------------------------------------------------ errors


def wrong_shape(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    return "digits_cnn", [image_input(images[:1])]  # [1, 8, 8]: no batch axis for the CNN


def wrong_inner_dim(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    return "digits_transformer", [image_input(np.zeros((1, 8, 9), np.float32))]


def wrong_datatype(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    return "digits_cnn", [image_input(images[:2, None].astype(np.float64), datatype="FP64")]


def nan_binary(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    x = images[:2, None].copy()
    x[1, 0, 3, 4] = np.nan
    return "digits_cnn", [image_input(x)]


def nan_json(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    # The client writes the bare literal NaN into the JSON, which is not JSON.
    x = images[:2, None].copy()
    x[1, 0, 3, 4] = np.nan
    return "digits_cnn", [image_input(x, binary=False)]


def unknown_model(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    return "no_such_model", [image_input(images[:1, None])]


def too_big_batch(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    return "digits_cnn", [image_input(np.ascontiguousarray(images[: MAX_BATCH + 1, None]))]


def wrong_input_name(images: Images) -> tuple[str, list[httpclient.InferInput]]:
    return "digits_cnn", [image_input(images[:1, None], name="pixels")]


ERRORS = {
    "wrong-shape": (wrong_shape, "400", ["'image'", "[-1, 1, 8, 8]", "[1, 8, 8]", "batch dim"]),
    "wrong-inner-dim": (wrong_inner_dim, "400", ["'image'", "[-1, 8, 8]", "[1, 8, 9]", "axis 2"]),
    "wrong-datatype": (wrong_datatype, "400", ["'image'", "FP32", "FP64"]),
    "nan-binary": (nan_binary, "400", ["'image'", "finite"]),
    "nan-json": (nan_json, "400", ["not valid JSON"]),
    "unknown-model": (unknown_model, "404", ["'no_such_model'", "not found"]),
    "batch-65": (too_big_batch, "400", ["'image'", "65", "maximum 64"]),
    "wrong-input-name": (wrong_input_name, "400", ["'pixels'", "'image'"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_reach_the_client_and_leave_it_usable(
    client: httpclient.InferenceServerClient,
    sessions: dict[str, ort.InferenceSession],
    digits: tuple[Images, np.ndarray],
    case: str,
) -> None:
    build, status, fragments = ERRORS[case]
    model, inputs = build(digits[0])
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs)
    message = info.value.message()
    assert "decoding the response" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert info.value.status() == status
    assert_client_still_works(client, sessions, digits)


# ------------------------------------------------------------------------ aio client


def test_aio_client(
    server: Any, sessions: dict[str, ort.InferenceSession], digits: tuple[Images, np.ndarray]
) -> None:
    model = "digits_transformer"
    x = shaped(model, digits[0][:5])
    expected = reference(sessions, model, x)

    async def main() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(server.url) as c:
            assert await c.is_server_ready() is True
            metadata = await c.get_model_metadata(model)
            assert metadata["inputs"][0]["shape"] == INPUT_SHAPES[model]
            results = []
            for binary in (True, False):
                tensor = aioclient.InferInput("image", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary)
                wanted = [aioclient.InferRequestedOutput("logits", binary_data=binary)]
                result = await c.infer(model, [tensor], outputs=wanted, request_id=f"aio-{binary}")
                assert result.get_response()["id"] == f"aio-{binary}"
                results.append(result.as_numpy("logits"))
            bad = aioclient.InferInput("image", [5, 8, 8], "FP64")
            bad.set_data_from_numpy(x.astype(np.float64))
            with pytest.raises(InferenceServerException) as info:
                await c.infer(model, [bad])
            assert "FP32" in info.value.message() and info.value.status() == "400"
            # The same client works after the error.
            again = aioclient.InferInput("image", list(x.shape), "FP32")
            again.set_data_from_numpy(x)
            results.append((await c.infer(model, [again])).as_numpy("logits"))
            return results

    for logits in asyncio.run(main()):
        assert_matches_reference(logits, expected)


def test_aio_concurrent_single_images_are_batched_and_routed_back(
    server: Any,
    http: httpx.Client,
    client: httpclient.InferenceServerClient,
    sessions: dict[str, ort.InferenceSession],
    digits: tuple[Images, np.ndarray],
) -> None:
    model = "digits_cnn"
    x = shaped(model, digits[0][:CONCURRENT])
    expected = np.concatenate([reference(sessions, model, x[i : i + 1]) for i in range(len(x))])
    # Rows must be told apart for "its own row" to mean something.
    gaps = np.abs(expected[:, None, :] - expected[None, :, :]).max(axis=2)
    assert gaps[~np.eye(len(x), dtype=bool)].min() > 1e-3

    async def one_round() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(server.url) as c:

            async def one(i: int) -> np.ndarray:
                tensor = aioclient.InferInput("image", [1, 1, 8, 8], "FP32")
                tensor.set_data_from_numpy(x[i : i + 1])
                result = await c.infer(model, [tensor], request_id=str(i))
                assert result.get_response()["id"] == str(i)
                logits = result.as_numpy("logits")
                assert logits is not None
                return logits

            return await asyncio.gather(*(one(i) for i in range(len(x))))

    single_before, total_before = batch_histogram(http, model)
    stats_before = model_stats(client, model)
    rounds = 0
    for _ in range(MAX_ROUNDS):
        rounds += 1
        rows = np.concatenate(asyncio.run(one_round()))
        assert rows.shape == expected.shape
        atol = 1e-6 * max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=atol)
        nearest = np.abs(rows[:, None, :] - expected[None, :, :]).max(axis=2).argmin(axis=1)
        assert nearest.tolist() == list(range(len(x)))
        single, total = batch_histogram(http, model)
        if (total - total_before) - (single - single_before) > 0:
            break
    single, total = batch_histogram(http, model)
    stats = model_stats(client, model)
    sent = rounds * CONCURRENT
    assert stats["inference_count"] - stats_before["inference_count"] == sent
    batches = total - total_before
    multi_row = batches - (single - single_before)
    assert multi_row > 0, f"no batch of more than one row in {rounds} rounds of {CONCURRENT}"
    assert batches < sent
    assert stats["execution_count"] - stats_before["execution_count"] == batches


# ------------------------------------------------------------------------ V1 and metrics


def test_v1_predict_and_status(
    http: httpx.Client,
    sessions: dict[str, ort.InferenceSession],
    digits: tuple[Images, np.ndarray],
) -> None:
    images, labels = digits
    logits = reference(sessions, "digits_cnn", shaped("digits_cnn", images))
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    clear = np.flatnonzero((p.argmax(axis=1) == labels) & (p.max(axis=1) > 0.999))
    assert clear.size > 0
    i = int(clear[0])

    response = http.post(
        "/v1/models/digits_cnn:predict", json={"instances": [images[i][None].tolist()]}
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 1
    prediction = predictions[0]
    assert prediction["label"] == str(int(labels[i]))
    probabilities = prediction["probabilities"]
    assert sorted(probabilities) == [str(d) for d in range(10)]
    assert abs(sum(probabilities.values()) - 1.0) <= 1e-5
    assert prediction["probability"] == max(probabilities.values())
    assert_matches_reference(np.array([prediction["logits"]], np.float32), logits[i : i + 1])

    status = http.get("/v1/models/digits_cnn")
    assert status.status_code == 200
    assert status.json()["ready"] is True
    assert status.json()["labels"] == [str(d) for d in range(10)]


@pytest.mark.parametrize(
    "path", ["/v1/models/digits_cnn:predict", "/v2/models/digits_cnn/infer"], ids=["v1", "v2"]
)
def test_malformed_json_is_400_with_an_error(http: httpx.Client, path: str) -> None:
    response = http.post(
        path, content=b'{"instances": [[[', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    assert "not valid JSON" in body["error"]


def test_metrics_are_prometheus_text(
    http: httpx.Client,
    client: httpclient.InferenceServerClient,
    digits: tuple[Images, np.ndarray],
) -> None:
    infer(client, "digits_cnn", shaped("digits_cnn", digits[0][:1]))
    with pytest.raises(InferenceServerException):
        infer(client, "made_up_model_xyz", shaped("digits_cnn", digits[0][:1]))
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "normserve_requests_total" in response.text
    counts = {
        (s.labels["model"], s.labels["protocol"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(response.text)
        if family.name == "normserve_requests"
        for s in family.samples
        if s.name == "normserve_requests_total"
    }
    assert counts.get(("digits_cnn", "v2", "200"), 0) >= 1
    assert counts.get(("unknown", "v2", "404"), 0) >= 1
    # Invented model names never become label values.
    assert "made_up_model_xyz" not in response.text


# ------------------------------------------------------------------------ bit identity


@pytest.mark.parametrize("model", MODELS)
def test_one_request_per_image_equals_one_batch_bit_for_bit(
    client: httpclient.InferenceServerClient,
    sessions: dict[str, ort.InferenceSession],
    digits: tuple[Images, np.ndarray],
    model: str,
) -> None:
    """Strict on purpose. The message also gives the difference in-process onnxruntime shows
    for the same split, which tells a batching bug from a property of the kernels."""
    x = shaped(model, digits[0][100:108])
    one_by_one = np.concatenate([infer(client, model, x[i : i + 1]) for i in range(len(x))])
    batched = infer(client, model, x)
    local = np.abs(
        np.concatenate([reference(sessions, model, x[i : i + 1]) for i in range(len(x))])
        - reference(sessions, model, x)
    ).max()
    assert np.array_equal(one_by_one, batched), (
        f"{model}: max |single - batch of 8| = {np.abs(one_by_one - batched).max():.3g} "
        f"(in-process onnxruntime: {local:.3g})"
    )


def test_sequence_model_takes_any_length_up_to_its_cap(
    client: httpclient.InferenceServerClient,
    built_repository: tuple[Path, Path, str],
    digits: tuple[Images, np.ndarray],
) -> None:
    """digits_sequence as built: [-1, -1, 8] in metadata, the digits read at 3 and at 48 rows
    (its cap) answered as onnxruntime answers them, 49 rows refused naming the cap."""
    model = "digits_sequence"
    (tensor,) = client.get_model_metadata(model)["inputs"]
    assert tensor["shape"] == [-1, -1, 8]
    cap = client.get_model_metadata(model)["parameters"]["max_shape"]["image"][1]
    session = ort.InferenceSession(str(built_repository[0] / model / "1" / "model.onnx"))
    images = digits[0][:4]
    for length in (3, cap):
        # Rows repeated and cut: any values of the right shape are a valid sequence.
        x = np.ascontiguousarray(np.resize(images, (4, length, 8)), dtype=np.float32)
        (want,) = session.run(None, {"image": x})
        np.testing.assert_allclose(infer(client, model, x), want, atol=1e-5, rtol=0)
    too_long = np.zeros((1, cap + 1, 8), np.float32)
    with pytest.raises(InferenceServerException, match=f"above the model's maximum {cap}"):
        infer(client, model, too_long)
