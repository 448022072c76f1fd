"""A catalogue of bad requests against the real session server: each one is a precise 4xx.

Every case asserts the status, a ``{"error": "..."}`` JSON body whose message names the
problem (a regular expression per case, matched case-insensitively), and that the server is
still live afterwards. None may be a 500: a client mistake is never the server's error.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from servers import RunningServer

V2 = "/v2/models/digits_cnn/infer"
V1 = "/v1/models/digits_cnn:predict"
HEADER = "Inference-Header-Content-Length"
BODY_LIMIT = 16 * 1024 * 1024  # the default max_request_bytes
ELEMENT_LIMIT = 16_777_216  # the default max_tensor_elements
PIXELS = [round(i / 63, 4) for i in range(64)]  # one 8x8 image, row-major
IMAGE = np.asarray(PIXELS, np.float32).reshape(1, 1, 8, 8)


def tensor(
    name: str = "image",
    datatype: str = "FP32",
    shape: Any = (1, 1, 8, 8),
    data: Any = PIXELS,
    **extra: Any,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(shape)}
    if data is not None:
        entry["data"] = data
    return {**entry, **extra}


def v2(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs or [tensor()]), **extra})


def binary(header: dict[str, Any], tail: bytes, length: str | None = None) -> Body:
    """A binary-extension body: JSON header, raw tail, and the header-length header."""
    head = orjson.dumps(header)
    return Body(head + tail, {HEADER: str(len(head)) if length is None else length})


def nested(levels: int, leaf: Any) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def deep_object(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def chunked_oversize() -> Iterator[bytes]:
    """Over the body limit in 1 MiB chunks: a generator body has no Content-Length."""
    yield b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1,1,8,8], "data": ['
    chunk = b"0.5," * (256 * 1024)
    for _ in range(BODY_LIMIT // len(chunk) + 2):
        yield chunk
    yield b"0.5]}]}"


@dataclass(frozen=True)
class Body:
    content: bytes | Callable[[], Iterator[bytes]]
    headers: dict[str, str | bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    path: str
    body: bytes | Body
    status: int | tuple[int, ...]
    fragment: str  # a regular expression the error message must match


MODEL_NAME = r"invalid model name"
# A path the route table has no entry for is 404 "no route" before any model lookup.
TRAVERSAL = r"invalid model name|not found|no route"
ROW = [[0.5] * 8] * 8

CASES: dict[str, Case] = {
    # --- the body is not JSON, whatever the content type claims
    "malformed-truncated": Case(V2, b'{"inputs": [', 400, r"not valid JSON"),
    "malformed-trailing-comma": Case(V2, b'{"inputs": [],}', 400, r"not valid JSON"),
    "malformed-single-quotes": Case(V2, b"{'inputs': []}", 400, r"not valid JSON"),
    "malformed-as-json-content-type": Case(
        V2, Body(b'{"inputs": [', {"Content-Type": "application/json"}), 400, r"not valid JSON"
    ),
    "malformed-as-text-plain": Case(
        V2, Body(b"inputs=1", {"Content-Type": "text/plain"}), 400, r"not valid JSON"
    ),
    "malformed-as-form": Case(
        V2,
        Body(b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"}),
        400,
        r"not valid JSON",
    ),
    "json-string-not-object": Case(V2, b'"hello"', 400, r"must be a JSON object"),
    # --- compressed bodies (Content-Encoding): the inflated size is bounded like a plain body
    "gzip-bomb": Case(
        V2,
        Body(gzip.compress(b" " * (BODY_LIMIT + 1)), {"Content-Encoding": "gzip"}),
        413,
        r"exceeds the limit of 16777216 bytes once decompressed",
    ),
    "gzip-bomb-v1": Case(
        V1,
        Body(gzip.compress(b" " * (BODY_LIMIT + 1)), {"Content-Encoding": "gzip"}),
        413,
        r"once decompressed",
    ),
    "content-encoding-unsupported": Case(
        V2, Body(v2(), {"Content-Encoding": "zstd"}), 415, r"'zstd' is not supported"
    ),
    "gzip-claimed-not-gzip": Case(
        V2, Body(v2(), {"Content-Encoding": "gzip"}), 400, r"not valid gzip data"
    ),
    "gzip-truncated": Case(
        V2, Body(gzip.compress(v2())[:-9], {"Content-Encoding": "gzip"}), 400, r"truncated gzip"
    ),
    # --- inputs and outputs
    "no-inputs-key": Case(V2, b'{"id": "x"}', 400, r"no 'inputs'"),
    "inputs-empty": Case(V2, b'{"inputs": []}', 400, r"'inputs' is empty"),
    "inputs-not-a-list": Case(V2, b'{"inputs": {"image": [1]}}', 400, r"'inputs' must be a list"),
    "input-without-name": Case(
        V2, v2({k: v for k, v in tensor().items() if k != "name"}), 400, r"has no 'name'"
    ),
    "unknown-input-only": Case(V2, v2(tensor("pixels")), 400, r"no input\(s\) \['pixels'\]"),
    "unknown-input-extra": Case(V2, v2(tensor(), tensor("mask")), 400, r"no input\(s\) \['mask'\]"),
    "duplicate-input": Case(V2, v2(tensor(), tensor()), 400, r"'image' appears more than once"),
    "missing-datatype": Case(
        V2, v2({"name": "image", "shape": [1, 1, 8, 8], "data": PIXELS}), 400, r"missing 'datatype'"
    ),
    "missing-shape": Case(
        V2, v2({"name": "image", "datatype": "FP32", "data": PIXELS}), 400, r"missing 'shape'"
    ),
    "missing-data": Case(V2, v2(tensor(data=None)), 400, r"no 'data' and no binary_data_size"),
    "unknown-output": Case(
        V2, v2(outputs=[{"name": "probabilities"}]), 400, r"'probabilities' does not exist"
    ),
    "duplicate-output": Case(
        V2, v2(outputs=[{"name": "logits"}, {"name": "logits"}]), 400, r"more than once"
    ),
    "outputs-not-a-list": Case(V2, v2(outputs="logits"), 400, r"'outputs' must be a list"),
    # --- shapes
    "rank-3-for-rank-4": Case(V2, v2(tensor(shape=(1, 8, 8))), 400, r"rank 4\).*rank 3"),
    "rank-1-flat": Case(V2, v2(tensor(shape=(64,))), 400, r"rank 4\).*rank 1"),
    "wrong-dim-axis-3": Case(
        V2, v2(tensor(shape=(1, 1, 8, 9), data=[0.5] * 72)), 400, r"axis 3 must be 8"
    ),
    "wrong-dim-axis-1": Case(
        V2, v2(tensor(shape=(1, 2, 8, 8), data=[0.5] * 128)), 400, r"axis 1 must be 1"
    ),
    # numpy's limit is 64 dimensions: a rank-65 shape once reached it and was a 500.
    "rank-65": Case(
        V2, v2(tensor(shape=(1,) * 65, data=[0.5])), 400, r"65 dimensions; the limit is 64"
    ),
    "rank-65-binary": Case(
        V2,
        binary(
            {"inputs": [tensor(shape=(1,) * 65, data=None, parameters={"binary_data_size": 4})]},
            np.float32(0.5).tobytes(),
        ),
        400,
        r"65 dimensions; the limit is 64",
    ),
    "negative-dim": Case(V2, v2(tensor(shape=(1, 1, -8, 8))), 400, r"non-negative integers"),
    "float-dim": Case(V2, v2(tensor(shape=(1, 1, 8.0, 8))), 400, r"non-negative integers"),
    "boolean-dim": Case(V2, v2(tensor(shape=(True, 1, 8, 8))), 400, r"non-negative integers"),
    "dim-beyond-64-bits": Case(
        V2,
        v2().replace(b"[1,1,8,8]", b"[18446744073709551616,1,8,8]"),
        400,
        r"non-negative integers",
    ),
    "dims-product-overflows-int64": Case(
        V2, v2(tensor(shape=(2**31, 2**31, 2**31, 2**31))), 400, r"limit is 16777216|too large"
    ),
    "dims-product-over-element-limit": Case(
        # 4097 * 64 * 64 = 16,781,312 elements: refused from the shape, before any allocation.
        V2,
        v2(tensor(shape=(4097, 1, 64, 64))),
        400,
        rf"declares 16781312 .*limit is {ELEMENT_LIMIT}",
    ),
    "data-shorter-than-shape": Case(
        V2, v2(tensor(data=PIXELS[:63])), 400, r"needs 64 elements, got 63"
    ),
    "data-longer-than-shape": Case(
        V2, v2(tensor(data=[*PIXELS, 0.0])), 400, r"needs 64 elements, got 65"
    ),
    "ragged-nested-data": Case(
        V2, v2(tensor(data=[[[[0.5] * 8] * 7 + [[0.5] * 7]]])), 400, r"ragged"
    ),
    "data-an-object": Case(V2, v2(tensor(data={"a": 1})), 400, r"'data' must be a JSON array"),
    "empty-batch": Case(V2, v2(tensor(shape=(0, 1, 8, 8), data=[])), 400, r"batch is empty"),
    "batch-over-maximum": Case(
        V2,
        v2(tensor(shape=(65, 1, 8, 8), data=PIXELS * 65)),
        400,
        r"exceeds the model's maximum 64",
    ),
    # --- datatypes and element values
    "datatype-fp64": Case(
        V2, v2(tensor(datatype="FP64")), 400, r"expected datatype FP32, got FP64"
    ),
    "datatype-int32": Case(
        V2, v2(tensor(datatype="INT32", data=[1] * 64)), 400, r"expected datatype FP32, got INT32"
    ),
    "datatype-bytes": Case(
        V2, v2(tensor(datatype="BYTES", data=["a"] * 64)), 400, r"expected datatype FP32, got BYTES"
    ),
    "datatype-unsupported": Case(V2, v2(tensor(datatype="FLOAT")), 400, r"unsupported datatype"),
    "numeric-strings": Case(V2, v2(tensor(data=["1.0"] * 64)), 400, r"found a string at element 0"),
    "booleans": Case(
        V2,
        v2(tensor(data=[*PIXELS[:5], True, *PIXELS[6:]])),
        400,
        r"found the boolean true at element 5",
    ),
    "nulls": Case(
        V2, v2(tensor(data=[*PIXELS[:7], None, *PIXELS[8:]])), 400, r"found null at element 7"
    ),
    "nan-literal": Case(V2, v2().replace(b"[0.0,", b"[NaN,", 1), 400, r"NaN and Infinity"),
    "infinity-literal": Case(
        V2, v2().replace(b"[0.0,", b"[Infinity,", 1), 400, r"NaN and Infinity"
    ),
    "minus-infinity-literal": Case(
        V2, v2().replace(b"[0.0,", b"[-Infinity,", 1), 400, r"NaN and Infinity"
    ),
    "1e999-literal": Case(
        V2, v2().replace(b"[0.0,", b"[1e999,", 1), 400, r"not valid JSON.*infinity"
    ),
    "over-fp32-range": Case(
        V2, v2(tensor(data=[1e39, *PIXELS[1:]])), 400, r"out of range for FP32"
    ),
    # --- request parameters
    "timeout-negative": Case(V2, v2(parameters={"timeout": -1}), 400, r"'timeout' must be"),
    "timeout-a-string": Case(V2, v2(parameters={"timeout": "1s"}), 400, r"'timeout' must be"),
    "id-not-a-string": Case(V2, v2(id=7), 400, r"'id' must be a string"),
    "parameters-not-object": Case(V2, v2(parameters=[1]), 400, r"'parameters' must be an object"),
    "binary-data-output-not-bool": Case(
        V2,
        v2(parameters={"binary_data_output": "yes"}),
        400,
        r"'binary_data_output' must be true or false",
    ),
    # --- binary tensor extension
    "header-length-beyond-body": Case(
        V2, Body(v2(), {HEADER: "100000"}), 400, r"is 100000 but the body is \d+ bytes"
    ),
    "header-length-non-numeric": Case(
        V2, Body(v2(), {HEADER: "abc"}), 400, r'must be a non-negative integer, got "abc"'
    ),
    # str.isdigit() accepts '²' (here as the latin-1 byte a client can send): once a 500.
    "header-length-superscript-digit": Case(
        V2, Body(v2(), {HEADER: b"\xb2"}), 400, r"must be a non-negative integer"
    ),
    "header-length-arabic-indic-digit": Case(
        V2, Body(v2(), {HEADER: "\u0663".encode()}), 400, r"must be a non-negative integer"
    ),
    "header-length-negative": Case(
        V2, Body(v2(), {HEADER: "-5"}), 400, r'must be a non-negative integer, got "-5"'
    ),
    "header-length-zero": Case(V2, Body(v2(), {HEADER: "0"}), 400, r"between 1 and the body size"),
    "binary-size-exceeds-tail": Case(
        V2,
        binary(
            {"inputs": [tensor(data=None, parameters={"binary_data_size": 256})]},
            IMAGE.tobytes()[:200],
        ),
        400,
        r"after the JSON header is 200 bytes .* declare 256 bytes",
    ),
    "binary-size-short-of-tail": Case(
        V2,
        binary(
            {"inputs": [tensor(data=None, parameters={"binary_data_size": 128})]},
            IMAGE.tobytes(),
        ),
        400,
        r"after the JSON header is 256 bytes .* declare 128 bytes",
    ),
    "binary-size-wrong-for-shape": Case(
        V2,
        binary(
            {"inputs": [tensor(data=None, parameters={"binary_data_size": 252})]},
            IMAGE.tobytes()[:252],
        ),
        400,
        r"needs 256 bytes, binary_data_size is 252",
    ),
    "binary-size-without-header": Case(
        V2,
        v2(tensor(data=None, parameters={"binary_data_size": 256})),
        400,
        r"binary_data_size but the request has no Inference-Header-Content-Length",
    ),
    "binary-tail-without-header": Case(  # without the header the whole body is JSON
        V2,
        v2(tensor(data=None, parameters={"binary_data_size": 256})) + IMAGE.tobytes(),
        400,
        r"not valid JSON",
    ),
    "binary-size-negative": Case(
        V2,
        binary({"inputs": [tensor(data=None, parameters={"binary_data_size": -256})]}, b""),
        400,
        r"binary_data_size must be a non-negative integer",
    ),
    "binary-size-and-data": Case(
        V2,
        binary({"inputs": [tensor(parameters={"binary_data_size": 256})]}, IMAGE.tobytes()),
        400,
        r"both 'data' and binary_data_size",
    ),
    # --- model names and versions: never a file read, never a 500
    "traversal-encoded-slashes": Case(
        "/v2/models/..%2F..%2Fetc%2Fpasswd/infer", v2(), (400, 404), TRAVERSAL
    ),
    "traversal-encoded-dots": Case("/v2/models/%2e%2e/infer", v2(), (400, 404), TRAVERSAL),
    "traversal-encoded-dots-upper": Case(
        "/v2/models/%2E%2E%2F%2E%2E%2Fservice/infer", v2(), (400, 404), TRAVERSAL
    ),
    "traversal-backslashes": Case("/v2/models/..%5C..%5Cetc%5Cpasswd/infer", v2(), 400, MODEL_NAME),
    "name-with-space": Case("/v2/models/digits%20cnn/infer", v2(), 400, MODEL_NAME),
    "name-300-chars": Case(f"/v2/models/{'a' * 300}/infer", v2(), 400, MODEL_NAME),
    "name-leading-dot": Case("/v2/models/.digits_cnn/infer", v2(), 400, MODEL_NAME),
    "name-with-nul": Case("/v2/models/digits%00cnn/infer", v2(), 400, MODEL_NAME),
    "name-unknown": Case(
        "/v2/models/digits_mlp/infer",
        v2(),
        404,
        r"Request for unknown model: 'digits_mlp' is not found",
    ),
    "version-unknown": Case(
        "/v2/models/digits_cnn/versions/2/infer", v2(), 404, r"version '2' is not found"
    ),
    "version-not-a-number": Case(
        "/v2/models/digits_cnn/versions/latest/infer", v2(), 404, r"version 'latest' is not found"
    ),
    "version-traversal": Case(
        "/v2/models/digits_cnn/versions/%2e%2e/infer", v2(), 404, r"version '\.\.' is not found"
    ),
    # --- request limits
    "json-deeper-than-32-in-parameters": Case(
        V2, v2(parameters=deep_object(40)), 400, r"nested deeper than 32 levels"
    ),
    "json-deeper-than-32-in-data": Case(
        V2, v2(tensor(data=nested(40, 0.5))), 400, r"nested deeper than 32 levels"
    ),
    "more-than-64-inputs": Case(
        V2, v2(*(tensor(f"in{i}") for i in range(65))), 400, r"names 65 inputs .*limit is 64"
    ),
    "more-than-64-inputs-and-outputs": Case(
        V2,
        v2(tensor(), outputs=[{"name": f"out{i}"} for i in range(64)]),
        400,
        r"names 65 inputs and outputs; the limit is 64",
    ),
    "chunked-body-over-limit": Case(
        V2, Body(chunked_oversize), 413, rf"exceeds the limit of {BODY_LIMIT} bytes"
    ),
    # --- V1
    "v1-malformed": Case(V1, b'{"instances": [', 400, r"not valid JSON"),
    "v1-body-a-list": Case(V1, b"[[1, 2]]", 400, r"JSON object"),
    "v1-instances-not-a-list": Case(V1, b'{"instances": 5}', 400, r"non-empty list"),
    "v1-instances-empty": Case(V1, b'{"instances": []}', 400, r"non-empty list"),
    "v1-instances-and-inputs": Case(
        V1, orjson.dumps({"instances": [[ROW]], "inputs": [[ROW]]}), 400, r"exactly one of"
    ),
    "v1-ragged": Case(
        V1, orjson.dumps({"instances": [[ROW], [ROW[:7]]]}), 400, r"ragged|mixed values"
    ),
    "v1-strings": Case(
        V1, orjson.dumps({"instances": [[[["1.0"] * 8] * 8]]}), 400, r"expected FP32 numbers"
    ),
    "v1-booleans": Case(
        V1, orjson.dumps({"instances": [[[[True] * 8] * 8]]}), 400, r"expected FP32 numbers"
    ),
    "v1-nulls": Case(
        V1, orjson.dumps({"instances": [[[[None] * 8] * 8]]}), 400, r"expected FP32 numbers"
    ),
    "v1-nan-literal": Case(V1, b'{"instances": [[[[NaN]]]]}', 400, r"NaN and Infinity"),
    "v1-missing-rank": Case(V1, orjson.dumps({"instances": [ROW]}), 400, r"rank"),
    "v1-object-missing-input": Case(
        V1, orjson.dumps({"instances": [{"pixels": [ROW]}]}), 400, r"input 'image' is missing"
    ),
    "v1-batch-over-maximum": Case(
        V1, orjson.dumps({"instances": [[ROW]] * 65}), 400, r"exceeds the model's maximum 64"
    ),
    "v1-unknown-model": Case(
        "/v1/models/digits_mlp:predict",
        orjson.dumps({"instances": [[ROW]]}),
        404,
        r"Request for unknown model: 'digits_mlp' is not found",
    ),
    "v1-name-with-space": Case("/v1/models/digits%20cnn:predict", b"{}", 400, MODEL_NAME),
    "v1-deep-json": Case(
        V1, orjson.dumps({"instances": nested(40, 0.5)}), 400, r"nested deeper than 32 levels"
    ),
}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30.0) as http:
        yield http


def _post(client: httpx.Client, case: Case) -> httpx.Response:
    body = case.body if isinstance(case.body, Body) else Body(case.body)
    content = body.content() if callable(body.content) else body.content
    return client.post(case.path, content=content, headers=body.headers)


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert sum(case.path.startswith("/v1/") for case in CASES.values()) >= 5


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_request_is_a_precise_4xx(client: httpx.Client, case: Case) -> None:
    response = _post(client, case)
    allowed = case.status if isinstance(case.status, tuple) else (case.status,)
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    document = response.json()
    assert isinstance(document, dict) and list(document) == ["error"], document
    message = document["error"]
    assert isinstance(message, str) and message, document
    assert re.search(case.fragment, message, re.IGNORECASE | re.DOTALL), message
    # Messages describe, they do not echo: no file contents, no tracebacks, no huge bodies.
    assert "root:" not in response.text and "Traceback" not in response.text
    assert len(message) < 1000, len(message)
    assert client.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/octet-stream",
        "application/json; charset=latin-1",
    ],
)
def test_content_type_is_ignored(
    client: httpx.Client, built_repository: tuple[Path, Path, str], content_type: str | None
) -> None:
    session = ort.InferenceSession(str(built_repository[0] / "digits_cnn" / "1" / "model.onnx"))
    (reference,) = session.run(["logits"], {"image": IMAGE})
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = client.post(V2, content=v2(), headers=headers)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
