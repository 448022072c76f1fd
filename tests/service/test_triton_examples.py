"""Triton's Python HTTP client examples, reproduced call for call, and BYTES tensors.

The repository holds the models the examples expect, built with onnx.helper
(tests/tiny_onnx.py): ``simple`` (INT32 sum and difference), ``simple_string`` (the same on
decimal text, BYTES) and ``simple_identity`` (BYTES in, the same out). Each test makes the
calls of one example (simple_http_infer_client, simple_http_async_infer_client,
simple_http_aio_infer_client, simple_http_string_infer_client) and checks what it checks;
the BYTES cases beyond them pin the binary form (4-byte little-endian length before each
element), JSON strings, and the refusals.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from servers import RunningServer, running_server
from tiny_onnx import EXAMPLE_WIDTH, triton_examples_repository
from tritonclient.utils import InferenceServerException

HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("examples")
    with running_server(triton_examples_repository(root), root) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(server.url, concurrency=2) as triton:
        yield triton


INPUT0 = np.arange(EXAMPLE_WIDTH, dtype=np.int32)[None]
MINUS_ONES = np.full((1, EXAMPLE_WIDTH), -1, np.int32)
ONES = np.ones((1, EXAMPLE_WIDTH), np.int32)


def simple_inputs(
    module: Any, in1: np.ndarray, binary0: bool = False, binary1: bool = True
) -> list[Any]:
    inputs = [module.InferInput(n, [1, EXAMPLE_WIDTH], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(INPUT0, binary_data=binary0)
    inputs[1].set_data_from_numpy(in1, binary_data=binary1)
    return inputs


def check_sum_and_difference(result: Any, in1: np.ndarray) -> None:
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), INPUT0 + in1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), INPUT0 - in1)


# ------------------------------------------------------------------ simple_http_infer_client


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_simple_http_infer_client(
    client: httpclient.InferenceServerClient, compression: str | None
) -> None:
    """Also as run with --request-compression-algorithm / --response-compression-algorithm."""
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]
    options: dict[str, Any] = {
        "query_params": {"test_1": 1, "test_2": 2},
        "headers": {"X-Example": "1"},
        "request_compression_algorithm": compression,
        "response_compression_algorithm": compression,
    }
    result = client.infer(
        "simple", simple_inputs(httpclient, MINUS_ONES), outputs=outputs, **options
    )
    check_sum_and_difference(result, MINUS_ONES)
    stats = client.get_inference_statistics(model_name="simple", headers={"X-Example": "1"})
    assert len(stats["model_stats"]) == 1
    result = client.infer("simple", simple_inputs(httpclient, MINUS_ONES), **options)
    check_sum_and_difference(result, MINUS_ONES)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("wrong_model_name", simple_inputs(httpclient, MINUS_ONES), outputs=outputs)
    assert caught.value.message().startswith("Request for unknown model")


# ------------------------------------------------------------ simple_http_async_infer_client


def test_simple_http_async_infer_client(client: httpclient.InferenceServerClient) -> None:
    inputs = simple_inputs(httpclient, ONES, binary0=True, binary1=True)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("OUTPUT0", "OUTPUT1")]
    pending = [client.async_infer("simple", inputs, outputs=outputs) for _ in range(2)]
    for request in pending:
        check_sum_and_difference(request.get_result(), ONES)


# -------------------------------------------------------------- simple_http_aio_infer_client


def test_simple_http_aio_infer_client(server: RunningServer) -> None:
    async def run() -> None:
        client = aioclient.InferenceServerClient(server.url)
        try:
            outputs = [
                aioclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                aioclient.InferRequestedOutput("OUTPUT1", binary_data=False),
            ]

            async def with_outputs() -> Any:
                return await client.infer(
                    "simple", simple_inputs(aioclient, MINUS_ONES), outputs=outputs,
                    query_params={"test_1": 1, "test_2": 2},
                )  # fmt: skip

            async def without_outputs() -> Any:
                return await client.infer("simple", simple_inputs(aioclient, MINUS_ONES))

            check_sum_and_difference(await with_outputs(), MINUS_ONES)
            stats = await client.get_inference_statistics(model_name="simple")
            assert len(stats["model_stats"]) == 1
            check_sum_and_difference(await without_outputs(), MINUS_ONES)
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("wrong_model_name", simple_inputs(aioclient, MINUS_ONES))
            assert caught.value.message().startswith("Request for unknown model")
            for result in await asyncio.gather(with_outputs(), without_outputs()):
                check_sum_and_difference(result, MINUS_ONES)
        finally:
            await client.close()

    asyncio.run(run())


# ----------------------------------------------------------- simple_http_string_infer_client


def text_tensor(values: np.ndarray) -> np.ndarray:
    return np.array([str(v).encode("utf-8") for v in values.ravel()], np.object_).reshape(
        values.shape
    )


def test_simple_http_string_infer_client(client: httpclient.InferenceServerClient) -> None:
    inputs = [httpclient.InferInput(n, [1, EXAMPLE_WIDTH], "BYTES") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(text_tensor(INPUT0), binary_data=True)
    inputs[1].set_data_from_numpy(text_tensor(ONES), binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]
    result = client.infer("simple_string", inputs, outputs=outputs)
    total, difference = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    for i in range(EXAMPLE_WIDTH):
        assert int(total[0][i]) == INPUT0[0][i] + 1
        assert int(difference[0][i]) == INPUT0[0][i] - 1

    def identity(array: np.ndarray, binary: bool) -> np.ndarray:
        tensor = httpclient.InferInput("INPUT0", list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
        out: np.ndarray = client.infer("simple_identity", [tensor], outputs=wanted).as_numpy(
            "OUTPUT0"
        )
        return out

    # An embedded NUL survives, in both forms.
    nul = np.array([b"he\x00llo"] * EXAMPLE_WIDTH, np.object_).reshape(1, EXAMPLE_WIDTH)
    assert np.array_equal(nul, identity(nul, True))
    as_json = identity(nul, False)
    assert np.array_equal(nul, np.array([bytes(str(x), "utf-8") for x in as_json.ravel()],
                                        np.object_).reshape(1, EXAMPLE_WIDTH))  # fmt: skip
    # 4-byte blobs as np.bytes_, compared as the example does.
    blobs = np.array([b"\x00\x01\x02\x03"] * EXAMPLE_WIDTH, np.bytes_).reshape(1, EXAMPLE_WIDTH)
    for binary in (True, False):
        assert np.array_equal(blobs, np.char.encode(identity(blobs, binary).astype(str)))


# ------------------------------------------------------------------------- BYTES tensors


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_batch_of_rows(client: httpclient.InferenceServerClient, binary: bool) -> None:
    rows = np.arange(3 * EXAMPLE_WIDTH, dtype=np.int32).reshape(3, EXAMPLE_WIDTH) - 20
    inputs = [httpclient.InferInput(n, [3, EXAMPLE_WIDTH], "BYTES") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(text_tensor(rows), binary_data=binary)
    inputs[1].set_data_from_numpy(text_tensor(rows * 2), binary_data=binary)
    result = client.infer("simple_string", inputs)
    assert result.as_numpy("OUTPUT0").shape == (3, EXAMPLE_WIDTH)
    total = result.as_numpy("OUTPUT0").astype(np.int64)  # b"-40" / "-40" both parse
    np.testing.assert_array_equal(total, rows * 3)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1").astype(np.int64), -rows)


def test_string_models_warm_up_and_report_triton_types(server: RunningServer) -> None:
    index = httpx.post(f"{server.http_url}/v2/repository/index").json()
    assert {e["name"]: e["state"] for e in index} == {
        "simple": "READY", "simple_string": "READY", "simple_identity": "READY"
    }  # fmt: skip
    meta = httpx.get(f"{server.http_url}/v2/models/simple_string").json()
    assert [i["datatype"] for i in meta["inputs"]] == ["BYTES", "BYTES"]
    config = httpx.get(f"{server.http_url}/v2/models/simple_string/config").json()
    assert {t["data_type"] for t in config["input"] + config["output"]} == {"TYPE_STRING"}


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def bytes_body(tail: bytes, shape: list[int], size: int | None = None) -> tuple[bytes, str]:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "BYTES", "shape": shape,
                 "parameters": {"binary_data_size": len(tail) if size is None else size}},
            ]
        }
    )  # fmt: skip
    return header + tail, str(len(header))


def json_body(data: Any, shape: list[int] | None = None) -> bytes:
    shape = shape or [1, EXAMPLE_WIDTH]
    tensor = {"name": "INPUT0", "datatype": "BYTES", "shape": shape, "data": data}
    return orjson.dumps({"inputs": [tensor]})


SIXTEEN = [b"ok"] * EXAMPLE_WIDTH


@pytest.mark.parametrize(
    ("body", "length", "fragment"),
    [
        pytest.param(
            *bytes_body(prefixed(b"\xff\xfe", *SIXTEEN[1:]), [1, EXAMPLE_WIDTH]),
            r"BYTES element 0 \(row-major\) is not UTF-8",
            id="non-utf8-binary",
        ),
        pytest.param(
            *bytes_body(
                prefixed(*SIXTEEN[:-1]) + struct.pack("<I", 99) + b"ok", [1, EXAMPLE_WIDTH]
            ),
            r"element 15 declares 99 bytes but only 2 remain",
            id="length-prefix-past-the-end",
        ),
        pytest.param(
            *bytes_body(prefixed(*SIXTEEN) + b"\x01\x00", [1, EXAMPLE_WIDTH]),
            r"more than the 16 elements",
            id="trailing-bytes",
        ),
        pytest.param(
            *bytes_body(prefixed(*SIXTEEN[:15]) + b"\x02\x00", [1, EXAMPLE_WIDTH]),
            r"element 15 has a truncated length prefix",
            id="truncated-prefix",
        ),
        pytest.param(
            *bytes_body(prefixed(*SIXTEEN[:8]), [1, EXAMPLE_WIDTH]),
            r"needs 16 elements, got 8",
            id="too-few-elements",
        ),
        pytest.param(
            json_body(["1"] * 15 + [1]), None, r"BYTES data must hold strings", id="json-number"
        ),
        pytest.param(json_body(["1"] * 15 + [None]), None, r"must hold strings", id="json-null"),
        pytest.param(
            json_body(["1"] * 16, [1, 8]), None, r"axis 1 must be 16", id="json-wrong-shape"
        ),
        pytest.param(
            json_body(["1"] * 16 * 9, [9, 16]),
            None,
            r"exceeds the model's maximum 8",
            id="json-batch-over-maximum",
        ),
        pytest.param(
            # A lone surrogate is not Unicode text: refused by the JSON parser.
            b'{"inputs":[{"name":"INPUT0","datatype":"BYTES","shape":[1,16],"data":["\\ud800"'
            + b',"1"' * 15
            + b"]}]}",
            None,
            r"not valid JSON|UTF-8",
            id="json-lone-surrogate",
        ),
    ],
)
def test_bad_bytes_tensors_are_precise_400s(
    server: RunningServer, body: bytes, length: str | None, fragment: str
) -> None:
    headers = {HEADER: length} if length is not None else {}
    response = httpx.post(
        f"{server.http_url}/v2/models/simple_identity/infer", content=body, headers=headers
    )
    assert response.status_code == 400, response.text
    assert re.search(fragment, response.json()["error"]), response.json()
    assert httpx.get(f"{server.http_url}/v2/health/live").status_code == 200
