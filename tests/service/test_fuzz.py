"""Fuzzing the app in-process: every route from the OpenAPI document, then V2 inference bodies.

The property everywhere: a client can get 200 or a 4xx, never a 5xx, and every answer that
is not a success is JSON with an "error" key (what V2 clients decode). The one exception is
504 for a request that set its own ``timeout`` parameter: the client asked for that deadline.

The infer routes read the raw body (no pydantic body in the schema), so schemathesis only
reaches their path parameters; hypothesis strategies below build the bodies themselves.
Everything is derandomized so that CI sees the same examples on every run.
"""

from __future__ import annotations

import gc
import json
import math
import random
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from starlette.testclient import TestClient
from tiny_onnx import CLASSES, FEATURES, expected, tiny_repository

from service.app import create_app
from service.settings import Settings

HEADER_LENGTH = "Inference-Header-Content-Length"
V2_DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip
JUNK_DATATYPES = ["", "fp32", "FLOAT", "TYPE_FP32", "FP32 ", "BF16", "INT128", "STRING"]

# The OpenAPI document does not depend on the repository: no lifespan runs to build it.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(repository=Path("unused"))).openapi())
# .ok() raises for an operation the schema cannot describe: a broken document fails here.
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repository = tiny_repository(tmp_path_factory.mktemp("fuzz"))
    # No access log: pytest keeps every captured log record of a test in memory, which the
    # memory test would measure instead of the server.
    # Explicit model control, so that the load/unload routes parse what they are sent (in
    # the default mode they refuse everything with 503 before reading it).
    settings = Settings(
        repository=repository, access_log=False, model_control_mode="explicit", load_model="*"
    )
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def assert_well_formed(response: Any, *, client_timeout: bool = False) -> None:
    """200 or 4xx (504 only for a client's own timeout); errors are JSON with "error"."""
    status = response.status_code
    sent = response.request
    shown = (
        f"{status} {sent.method} {sent.url} {dict(sent.headers)} {sent.content[:300]!r}"
        f" -> {response.content[:300]!r}"
    )
    allowed = status == 200 or 400 <= status < 500 or (status == 504 and client_timeout)
    assert allowed, f"server error: {shown}"
    if status in (200, 304):
        length = response.headers.get(HEADER_LENGTH)
        if length is not None:  # a JSON header before binary outputs
            json.loads(response.content[: int(length)])
        elif response.headers.get("content-type", "").startswith("application/json"):
            json.loads(response.content)
        else:  # the page, metrics, docs: what the route documents, never empty by mistake
            assert status == 304 or response.content, shown
        return
    assert response.headers.get("content-type", "").startswith("application/json"), shown
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), shown


# --------------------------------------------------------------------- every OpenAPI route


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_every_openapi_operation_answers_without_a_server_error(
    client: TestClient, operation: Any
) -> None:
    strategies = [
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    if "{model_name}" in operation.path:  # random names only ever reach the 404 branch
        fixed = {
            "model_name": "tiny",
            **({"version": "1"} if "{version}" in operation.path else {}),
        }
        strategies.append(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=fixed)
        )
    strategy = st.one_of(strategies)

    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
        # requests-style keyword arguments for httpx: a serialized body travels as `data`.
        body = kwargs.pop("data", None)
        if isinstance(body, str):
            body = body.encode()
        response = client.request(
            kwargs.pop("method"),
            kwargs.pop("url"),
            params=kwargs.pop("params", None),
            headers=kwargs.pop("headers", None),
            content=body,
            json=kwargs.pop("json", None),
        )
        assert_well_formed(response)
        if "/repository/models/" in operation.path:
            # A fuzzed load or unload may have unloaded tiny or loaded it otherwise: the
            # repository's own config serves it again for the next case and test.
            assert client.post("/v2/repository/models/tiny/load").status_code == 200

    check()


# --------------------------------------------------------------------- V2 inference bodies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and ±inf: the stdlib encoder writes NaN/Infinity, which is not JSON
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
tensor_elements = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.floats(),
)
tensor_data = st.recursive(
    st.lists(tensor_elements, max_size=12),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=40,
)
names = st.sampled_from(["x", "x", "y", "", "scores"]) | st.text(max_size=10)
datatypes = st.sampled_from(V2_DATATYPES + JUNK_DATATYPES) | json_scalars
huge_dims = [0, 1, 4, 8, 9, 2**24, 2**31, 2**32, 2**62, 2**63 - 1, 2**64, 10**30, -1, -(2**63)]
shapes = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=12), max_size=4),
    st.lists(st.sampled_from(huge_dims), max_size=5),
    st.lists(st.sampled_from([1, 4]) | st.booleans() | st.floats(0, 4), max_size=3),
    json_values,
)
parameter_keys = st.sampled_from(
    [
        "binary_data_output",
        "timeout",
        "binary_data_size",
        "binary_data",
        "shared_memory_region",
        "classification",
        "priority",
    ]
)
parameters = st.dictionaries(parameter_keys | st.text(max_size=6), json_values, max_size=3)


@st.composite
def valid_ish_input(draw: st.DrawFn) -> dict[str, Any]:
    """What the tiny model accepts (x FP32 [batch, 4]), about half the time with one thing off."""
    off = draw(st.sampled_from([None, None, None, "batch", "width", "datatype", "shape"]))
    batch = draw(st.sampled_from([0, 9, 10]) if off == "batch" else st.integers(1, 8))
    width = draw(st.sampled_from([3, 5])) if off == "width" else FEATURES
    values = draw(
        st.lists(
            st.floats(width=32, min_value=-1e6, max_value=1e6),
            min_size=batch * width,
            max_size=batch * width,
        )
    )
    nested = draw(st.booleans())
    data: Any = [values[i : i + width] for i in range(0, len(values), width)] if nested else values
    return {
        "name": "x",
        "datatype": draw(st.sampled_from(["FP64", "INT32", "BOOL"]))
        if off == "datatype"
        else "FP32",
        "shape": [batch * width] if off == "shape" else [batch, width],
        "data": data,
    }


@st.composite
def random_input(draw: st.DrawFn) -> dict[str, Any]:
    """Each field present most of the time, with any value."""
    entry: dict[str, Any] = {}
    for key, strategy in (
        ("name", names),
        ("datatype", datatypes),
        ("shape", shapes),
        ("data", tensor_data | json_values),
        ("parameters", parameters | json_values),
    ):
        if draw(st.integers(min_value=0, max_value=9)) < 8:
            entry[key] = draw(strategy)
    return entry


outputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["scores", "nope", ""]) | st.text(max_size=5)},
        optional={"parameters": parameters | json_values},
    )
    | json_values,
    max_size=3,
)


good_outputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.just("scores")},
        optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})},
    ),
    max_size=1,
)
good_parameters = st.fixed_dictionaries(
    {},
    optional={"binary_data_output": st.booleans(), "timeout": st.integers(0, 10**9) | st.floats()},
)


@st.composite
def request_document(draw: st.DrawFn) -> Any:
    roll = draw(st.integers(min_value=0, max_value=19))
    if roll == 0:
        return draw(json_values)  # not an object at all
    document: dict[str, Any] = {}
    if roll < 8:  # a request the model may well answer
        document["inputs"] = [draw(valid_ish_input())]
        optional: dict[str, st.SearchStrategy[Any]] = {
            "id": st.text(max_size=8),
            "outputs": good_outputs,
            "parameters": good_parameters,
        }
        for key, strategy in optional.items():
            if draw(st.booleans()):
                document[key] = draw(strategy)
        return document
    inputs = st.lists(valid_ish_input() | random_input() | json_values, max_size=3)
    fields: tuple[tuple[str, st.SearchStrategy[Any]], ...] = (
        ("id", st.text(max_size=8) | json_values),
        ("inputs", inputs | json_scalars | json_values),
        ("outputs", outputs | json_scalars | json_values),
        ("parameters", parameters | json_scalars | json_values),
    )
    for key, strategy in fields:
        # inputs nearly always, the rest about half of the time
        if draw(st.integers(min_value=0, max_value=9)) < (9 if key == "inputs" else 5):
            document[key] = draw(strategy)
    return document


def encode(document: Any) -> bytes:
    # The stdlib encoder: ints beyond 64 bits and NaN/Infinity reach the server as sent.
    return json.dumps(document, allow_nan=True).encode()


def has_client_timeout(document: Any) -> bool:
    parameters = document.get("parameters") if isinstance(document, dict) else None
    timeout = parameters.get("timeout") if isinstance(parameters, dict) else None
    return isinstance(timeout, int | float) and not isinstance(timeout, bool)


# Mostly the served model, so that bodies reach the decoder; sometimes other names.
paths = st.integers(min_value=0, max_value=19).flatmap(
    lambda n: (
        st.just("/v2/models/tiny/infer")
        if n < 14
        else st.sampled_from(
            [
                "/v2/models/tiny/versions/1/infer",
                "/v2/models/tiny/versions/2/infer",
                "/v2/models/nope/infer",
                "/v1/models/tiny:predict",
            ]
        )
        if n < 18
        else st.text(min_size=1, max_size=12).map(
            lambda name: f"/v2/models/{quote(name, safe='')}/infer"
        )
    )
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)


@st.composite
def binary_request(draw: st.DrawFn) -> tuple[dict[str, str], bytes, Any]:
    """A JSON header, then bytes; the header length sometimes right, sometimes a lie."""
    document = draw(request_document())
    tail = draw(
        st.one_of(
            st.binary(max_size=256),
            st.lists(st.floats(width=32), min_size=4, max_size=40).map(
                lambda v: np.array(v, dtype="<f4").tobytes()
            ),
        )
    )
    if isinstance(document, dict) and isinstance(document.get("inputs"), list):
        for entry in document["inputs"]:
            if isinstance(entry, dict) and draw(st.booleans()):
                entry.pop("data", None)
                size = draw(st.sampled_from([len(tail), len(tail), 0, len(tail) + 1, 2**62, -1]))
                entry["parameters"] = {"binary_data_size": size}
    header = encode(document)
    body = header + tail
    length = draw(
        st.one_of(
            st.just(str(len(header))),
            st.just(str(len(header))),
            st.integers(min_value=0, max_value=len(body) + 8).map(str),
            st.sampled_from(["-1", "0", str(2**64), "1e3", " 12", "0x10", ""]),
            header_text,
        )
    )
    return {HEADER_LENGTH: length}, body, document


v1_document = st.one_of(
    st.fixed_dictionaries({"instances": tensor_data | json_values}),
    st.fixed_dictionaries(
        {"inputs": tensor_data | st.fixed_dictionaries({"x": tensor_data}) | json_values}
    ),
    st.dictionaries(st.sampled_from(["instances", "inputs", "signature_name"]), json_values),
    json_values,
)


@st.composite
def any_request(draw: st.DrawFn) -> tuple[str, dict[str, str], bytes, Any]:
    path = draw(paths)
    if path.startswith("/v1/"):
        document = draw(v1_document | request_document())
        return path, {}, encode(document), document
    kind = draw(st.sampled_from(["json", "json", "binary", "garbage"]))
    if kind == "json":
        document = draw(request_document())
        return path, {}, encode(document), document
    if kind == "binary":
        headers, body, document = draw(binary_request())
        return path, headers, body, document
    return path, {}, draw(st.binary(max_size=128)), None


def send(client: TestClient, request: tuple[str, dict[str, str], bytes, Any]) -> Any:
    path, headers, body, _ = request
    return client.post(path, content=body, headers=headers)


@FUZZ
@given(fuzzed=any_request())
def test_v2_fuzzed_bodies_get_200_or_a_4xx_json_error(
    client: TestClient, fuzzed: tuple[str, dict[str, str], bytes, Any]
) -> None:
    response = send(client, fuzzed)
    assert_well_formed(response, client_timeout=has_client_timeout(fuzzed[3]))


@FUZZ
@given(data=tensor_data | json_values, shape=shapes, datatype=datatypes)
def test_v1_and_v2_tensor_data_alone(
    client: TestClient, data: Any, shape: Any, datatype: Any
) -> None:
    """The data decoders on their own: one input with everything else right."""
    v2 = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}
    assert_well_formed(client.post("/v2/models/tiny/infer", content=encode(v2)))
    v1 = client.post("/v1/models/tiny:predict", content=encode({"instances": data}))
    assert_well_formed(v1)


def test_server_still_answers_correctly_after_fuzzing(client: TestClient) -> None:
    x = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.tolist()}]}
    response = client.post("/v2/models/tiny/infer", content=encode(body))
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(2, CLASSES), expected(x), rtol=1e-5, atol=1e-5
    )
    assert client.get("/v2/health/ready").json() == {"ready": True}


# --------------------------------------------------------------------- bounded memory

MEMORY_REQUESTS = 500
PAD_BYTES = 128 * 1024
# Every request carries a 128 KiB "id", so the 500 measured requests send 62.5 MiB. A server
# that kept a third of each body (a body, a decoded tensor, a queued item, a log record) grows
# by about 21 MiB (tried with a deliberately leaking read_body); without a leak the growth
# here is 0-1 MiB: allocator arenas, numpy/onnxruntime caches and the metric samples for
# labels already seen, all reached by the identical warm-up round before the first reading.
RSS_GROWTH_BOUND = 16 * 1024 * 1024


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # No /proc (macOS): the peak is the best stand-in, and it still bounds the growth.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_requests(seed: int) -> list[tuple[str, dict[str, str], bytes, Any]]:
    """The fuzz mix, drawn with a seeded generator (not hypothesis, whose own bookkeeping
    grows with every example), each padded to PAD_BYTES with a large request id."""
    rng = random.Random(seed)
    requests: list[tuple[str, dict[str, str], bytes, Any]] = []
    for i in range(MEMORY_REQUESTS):
        kind = i % 4  # 0: valid JSON, 1: binary, 2: junk data, 3: fields and outputs off
        batch = rng.randint(1, 8) if kind < 2 else rng.randint(0, 10)
        entry: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [batch, 4]}
        if kind == 3:
            entry["name"] = rng.choice(["x", "x", "y"])
            entry["datatype"] = rng.choice(["FP32", "FP64", "INT8", "BOOL", "BYTES", "X"])
            entry["shape"] = rng.choice([[batch, 4], [batch, 3], [2**31, 4], [-1, 4], [8]])
        values = [rng.uniform(-1e3, 1e3) for _ in range(batch * 4)]
        header_length: dict[str, str] = {}
        document: dict[str, Any] = {"id": "p" * PAD_BYTES, "inputs": [entry]}
        if kind == 1:  # binary, its header length right or off by a little
            tail = np.array(values, dtype="<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(tail) + rng.choice([0, 0, 0, 4])}
            header = encode(document)
            header_length = {HEADER_LENGTH: str(len(header) + rng.choice([0, 0, 0, 1, -1]))}
            requests.append(("/v2/models/tiny/infer", header_length, header + tail, document))
            continue
        entry["data"] = (
            values if kind != 2 else [rng.choice([None, "s", True, [1.0], math.pi]) for _ in values]
        )
        if kind == 3:
            document["outputs"] = [{"name": rng.choice(["scores", "nope"])}]
            document["parameters"] = {"binary_data_output": rng.choice([True, False])}
        requests.append(("/v2/models/tiny/infer", header_length, encode(document), document))
    return requests


def test_memory_stays_bounded_over_500_fuzz_requests(client: TestClient) -> None:
    warm_up, measured = memory_requests(seed=1), memory_requests(seed=2)
    for request in warm_up:
        assert_well_formed(send(client, request))
    gc.collect()
    before = rss_bytes()
    statuses: dict[int, int] = {}
    for request in measured:
        response = send(client, request)
        assert_well_formed(response)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    del response
    gc.collect()
    growth = rss_bytes() - before
    sent = sum(len(body) for _, _, body, _ in measured)
    assert statuses.get(200, 0) > 50 and len(statuses) > 1, statuses  # both paths exercised
    assert growth < RSS_GROWTH_BOUND, (
        f"RSS grew by {growth / 2**20:.1f} MiB over {MEMORY_REQUESTS} requests "
        f"({sent / 2**20:.1f} MiB sent; statuses {statuses})"
    )
