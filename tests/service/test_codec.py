"""The V2 REST codec against hand-built bodies and, when installed, the real tritonclient.

tritonclient's static helpers build request bodies and parse response bodies exactly as its
HTTP client does, so these tests pin the wire format without a server.
"""

from __future__ import annotations

import importlib.util
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from service.datatypes import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE
from service.errors import InvalidInput
from service.front.errors import error_body
from service.protocol import v2_request
from service.protocol.request_limits import Limits, decode_json_body
from service.protocol.v2_binary import HEADER_LENGTH
from service.protocol.v2_request import decode_infer_request
from service.protocol.v2_response import check_requested, encode_infer_response
from service.protocol.v2_types import RequestedOutput

HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None
needs_tritonclient = pytest.mark.skipif(not HAS_TRITONCLIENT, reason="tritonclient not installed")

NUMERIC = [dt for dt in DATATYPE_TO_NUMPY if dt != "BYTES"]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Values that hit each datatype's edges: extremes, zero, fractions, tiny magnitudes."""
    dtype = DATATYPE_TO_NUMPY[datatype]
    count = int(np.prod(shape))
    if datatype == "BOOL":
        values: list[Any] = [True, False, True, True, False, False]
    elif datatype == "BYTES":
        values = [b"", b"a", b"\x00\xff", "é".encode(), b"two words", b"\x00"]
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [int(info.min), 0, 1, int(info.max), int(info.max) - 1, 7]
    else:
        info_f = np.finfo(dtype)
        values = [0.1, -1.5, float(info_f.max), float(-info_f.max), float(info_f.tiny), 0.0]
    array = np.empty(count, dtype=dtype)
    array[:] = (values * (count // len(values) + 1))[:count]
    return array.reshape(shape)


def json_body(document: dict[str, Any]) -> tuple[bytes, None]:
    return orjson.dumps(document), None


def binary_body(document: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    header = orjson.dumps(document)
    return header + b"".join(blobs), len(header)


def le_bytes(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def one_input(**fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", **fields}]}


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype == np.object_:
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.tobytes() == expected.tobytes()  # bit-exact, signed zeros included


# --------------------------------------------------------------------------------------------
# Datatype tables


def test_datatype_tables_are_inverse_and_complete() -> None:
    assert set(DATATYPE_TO_NUMPY) == {
        "BOOL",
        *(f"UINT{n}" for n in (8, 16, 32, 64)),
        *(f"INT{n}" for n in (8, 16, 32, 64)),
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    }
    assert {v: k for k, v in NUMPY_TO_DATATYPE.items()} == DATATYPE_TO_NUMPY
    assert DATATYPE_TO_NUMPY["BYTES"] == np.dtype(object)


# --------------------------------------------------------------------------------------------
# JSON requests


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_json_input_decodes_every_numeric_datatype(datatype: str, layout: str) -> None:
    expected = sample(datatype)
    data = expected.tolist() if layout == "nested" else expected.ravel().tolist()
    body, length = json_body(one_input(datatype=datatype, shape=[2, 3], data=data))
    request = decode_infer_request(body, length)
    assert list(request.inputs) == ["x"]
    assert_same(request.inputs["x"], expected)


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        ([[1, 2, 3], [4, 5, 6]], [3, 2]),  # any regular nesting is row-major, as in Triton
        ([[[1], [2]], [[3], [4]]], [4]),
        ([], [0, 3]),
        ([[], []], [2, 0]),
        ([5], []),
    ],
)
def test_json_nesting_only_has_to_be_regular(data: list[Any], shape: list[int]) -> None:
    body, _ = json_body(one_input(datatype="INT32", shape=shape, data=data))
    array = decode_infer_request(body, None).inputs["x"]
    assert array.shape == tuple(shape)
    assert array.ravel().tolist() == np.array(data, dtype=np.int32).ravel().tolist()


def test_json_integers_are_accepted_in_float_tensors() -> None:
    body, _ = json_body(one_input(datatype="FP32", shape=[3], data=[1, 2.5, -3]))
    assert_same(decode_infer_request(body, None).inputs["x"], np.array([1, 2.5, -3], np.float32))


def test_json_bytes_input_becomes_utf8_bytes_objects() -> None:
    body, _ = json_body(one_input(datatype="BYTES", shape=[1, 3], data=[["a", "", "é"]]))
    array = decode_infer_request(body, None).inputs["x"]
    assert array.dtype == np.object_ and array.shape == (1, 3)
    assert array.ravel().tolist() == [b"a", b"", "é".encode()]


def test_request_fields_and_defaults() -> None:
    document = {
        "id": "req-7",
        "inputs": [
            {"name": "b", "datatype": "FP32", "shape": [1], "data": [1.0]},
            {"name": "a", "datatype": "INT8", "shape": [1], "data": [1]},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        "parameters": {"timeout": 2500, "binary_data_output": True, "priority": 1},
    }
    request = decode_infer_request(*json_body(document))
    assert request.id == "req-7"
    assert list(request.inputs) == ["b", "a"]  # request order, not sorted
    assert request.outputs == [RequestedOutput("y", False), RequestedOutput("z", None)]
    assert request.binary_output is True
    assert request.timeout_ms == pytest.approx(2.5)
    assert request.parameters["priority"] == 1

    bare = decode_infer_request(*json_body(one_input(datatype="FP32", shape=[1], data=[0])))
    assert (bare.id, bare.outputs, bare.binary_output, bare.timeout_ms) == (None, None, False, None)
    assert bare.parameters == {}


@pytest.mark.parametrize(("timeout", "expected"), [(0, None), (1000, 1.0), (1.5e6, 1500.0)])
def test_timeout_microseconds_become_milliseconds(timeout: float, expected: float | None) -> None:
    document = {
        **one_input(datatype="FP32", shape=[1], data=[0]),
        "parameters": {"timeout": timeout},
    }
    assert decode_infer_request(*json_body(document)).timeout_ms == expected


def test_empty_outputs_list_means_all_outputs() -> None:
    document = {**one_input(datatype="FP32", shape=[1], data=[0]), "outputs": []}
    assert decode_infer_request(*json_body(document)).outputs is None


# --------------------------------------------------------------------------------------------
# Binary requests built by hand


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_NUMPY))
def test_binary_input_decodes_every_datatype(datatype: str) -> None:
    expected = sample(datatype)
    blob = le_bytes(expected)
    document = one_input(
        datatype=datatype, shape=[2, 3], parameters={"binary_data_size": len(blob)}
    )
    assert_same(decode_infer_request(*binary_body(document, blob)).inputs["x"], expected)


def test_binary_blobs_follow_the_order_of_the_binary_inputs() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    c = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    d = np.array([b"xy", b""], dtype=object)
    document = {
        "inputs": [
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": 24},
            },
            {"name": "b", "datatype": "INT64", "shape": [2], "data": [7, -7]},
            {
                "name": "c",
                "datatype": "UINT8",
                "shape": [2, 2],
                "parameters": {"binary_data_size": 4},
            },
            {
                "name": "d",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": 10},
            },
        ]
    }
    request = decode_infer_request(*binary_body(document, le_bytes(a), le_bytes(c), le_bytes(d)))
    assert list(request.inputs) == ["a", "b", "c", "d"]
    assert_same(request.inputs["a"], a)
    assert_same(request.inputs["b"], np.array([7, -7], dtype=np.int64))
    assert_same(request.inputs["c"], c)
    assert_same(request.inputs["d"], d)


def test_header_length_with_json_only_inputs_is_fine() -> None:
    body, length = binary_body(one_input(datatype="FP32", shape=[1], data=[3.0]))
    assert decode_infer_request(body, length).inputs["x"].tolist() == [3.0]


@pytest.mark.parametrize("padding", [0, 1, 2, 3, 5, 7])
def test_binary_input_is_a_view_when_aligned_and_an_aligned_copy_otherwise(padding: int) -> None:
    expected = np.arange(12, dtype=np.float64).reshape(3, 4)
    header = orjson.dumps(
        one_input(datatype="FP64", shape=[3, 4], parameters={"binary_data_size": 96})
    )
    header += b" " * ((-len(header)) % 8 + padding)  # trailing spaces are valid JSON
    body = header + expected.tobytes()
    array = decode_infer_request(body, len(header)).inputs["x"]
    assert_same(array, expected)
    assert array.flags.aligned
    # No copy when the layout allows one: the tensor is the request body's own memory.
    assert np.shares_memory(array, np.frombuffer(body, np.uint8)) == (padding == 0)


def test_big_fp32_binary_body_decodes_exactly() -> None:
    expected = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    document = one_input(
        datatype="FP32", shape=[64, 1, 8, 8], parameters={"binary_data_size": 16384}
    )
    assert_same(
        decode_infer_request(*binary_body(document, expected.tobytes())).inputs["x"], expected
    )


def test_empty_binary_tensor() -> None:
    document = one_input(datatype="FP32", shape=[0, 3], parameters={"binary_data_size": 0})
    body, length = binary_body(document)
    array = decode_infer_request(body, length).inputs["x"]
    assert array.shape == (0, 3) and array.dtype == np.float32


# --------------------------------------------------------------------------------------------
# Rejections


def assert_rejected(body: bytes, length: int | None, *fragments: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        decode_infer_request(body, length)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def x(datatype: str = "FP32", shape: Any = (2,), **fields: Any) -> dict[str, Any]:
    """One input named x; a tuple shape becomes a JSON list, anything else goes in as given."""
    entry: dict[str, Any] = {"name": "x", "datatype": datatype, **fields}
    entry["shape"] = list(shape) if isinstance(shape, tuple) else shape
    return entry


JSON_INPUT_REJECTIONS: list[Any] = [
    pytest.param({"name": "x", "shape": [1], "data": [1]}, "datatype", id="no-datatype"),
    pytest.param({"name": "x", "datatype": "FP32", "data": [1]}, "shape", id="no-shape"),
    pytest.param(x("BF16", data=[1, 2]), "unsupported datatype 'BF16'", id="unknown-datatype"),
    pytest.param(x(shape=(-1, 2), data=[1, 2]), "non-negative", id="negative-dim"),
    pytest.param(x(shape="2", data=[1, 2]), "shape must be a list", id="shape-not-list"),
    pytest.param(x(shape=[True, 2], data=[1, 2]), "shape must be a list", id="bool-dim"),
    pytest.param(x(shape=[2.0], data=[1, 2]), "shape must be a list", id="float-dim"),
    pytest.param(x(shape=(0, 2**62), data=[]), "is too large", id="huge-empty-shape"),
    pytest.param(
        x(shape=(2, 3), data=[1, 2, 3, 4, 5]), "shape [2, 3] needs 6 elements, got 5", id="too-few"
    ),
    pytest.param(x(shape=(2,), data=[[1, 2], [3, 4]]), "needs 2 elements, got 4", id="too-many"),
    pytest.param(x(shape=(2, 2), data=[[1, 2], [3]]), "ragged", id="ragged"),
    pytest.param(x(shape=(3,), data=[[1, 2], 3]), "ragged", id="ragged-depth"),
    pytest.param(x(shape=(2, 2), data=[[1, 2], [3, [4]]]), "ragged", id="ragged-deep"),
    pytest.param(x(data=[1, "2"]), "found a string at element 1", id="string-in-fp32"),
    pytest.param(x(data=[None, 1]), "found null at element 0", id="null-in-fp32"),
    pytest.param(x("INT32", data=[1, {"v": 2}]), "found an object", id="object-in-int32"),
    pytest.param(x(data=[1.0, True]), "found the boolean true", id="bool-in-fp32"),
    pytest.param(x("INT64", data=[False, 1]), "INT64 data must hold integers", id="bool-in-int64"),
    pytest.param(
        x("INT32", data=[1, 1.5]), "must hold integers, found the number 1.5", id="float-in-int32"
    ),
    pytest.param(x("BOOL", data=[1, 0]), "BOOL data must hold booleans", id="number-in-bool"),
    pytest.param(x("BYTES", data=["a", 1]), "BYTES data must hold strings", id="number-in-bytes"),
    pytest.param(
        x("UINT8", data=[1, 256]),
        "value 256 at element 1 is out of range for UINT8",
        id="uint8-over",
    ),
    pytest.param(
        x("UINT8", data=[-1, 0]),
        "value -1 at element 0 is out of range for UINT8",
        id="uint8-negative",
    ),
    pytest.param(x("INT8", data=[0, -129]), "out of range for INT8", id="int8-under"),
    pytest.param(x("INT64", data=[2**63, 0]), "out of range for INT64", id="int64-over"),
    pytest.param(x("UINT64", data=[-1, 0]), "out of range for UINT64", id="uint64-negative"),
    pytest.param(
        x("FP16", data=[1.0, 70000]),
        "value 70000 at element 1 is out of range for FP16",
        id="fp16-over",
    ),
    pytest.param(x("FP32", data=[1e39, 0]), "out of range for FP32", id="fp32-over"),
    pytest.param(x(data=5), "'data' must be a JSON array, got the number 5", id="data-scalar"),
    pytest.param(x(shape=(1,)), "no 'data' and no binary_data_size", id="no-data"),
    pytest.param(
        x(data=[1, 2], parameters={"binary_data_size": 8}),
        "both 'data' and binary",
        id="data-and-binary",
    ),
    pytest.param(
        x(data=[1, 2], parameters={"shared_memory_region": "r"}),
        "not supported",
        id="shared-memory",
    ),
    pytest.param(
        x(data=[1, 2], parameters=[1]), "'parameters' must be an object", id="parameters-not-object"
    ),
    pytest.param(
        x(parameters={"binary_data_size": -8}),
        "binary_data_size must be a non-negative",
        id="negative-binary-size",
    ),
    pytest.param(
        x(parameters={"binary_data_size": "8"}),
        "binary_data_size must be a non-negative",
        id="string-binary-size",
    ),
    pytest.param(
        x(parameters={"binary_data_size": 8}), f"no {HEADER_LENGTH}", id="binary-without-header"
    ),
]


@pytest.mark.parametrize(("entry", "fragment"), JSON_INPUT_REJECTIONS)
def test_input_rejections_name_the_input(entry: dict[str, Any], fragment: str) -> None:
    valid = {"name": "ok", "datatype": "FP32", "shape": [1], "data": [1]}
    assert_rejected(*json_body({"inputs": [valid, entry]}), "'x'", fragment)


def test_duplicate_input_names_are_rejected() -> None:
    document = {"inputs": [x(data=[1, 2]), x(data=[3, 4])]}
    assert_rejected(*json_body(document), "'x'", "more than once")


def test_element_count_message_is_exact() -> None:
    body, _ = json_body({"inputs": [x(shape=(2, 3), data=[1, 2, 3, 4, 5])]})
    assert assert_rejected(body, None) == "input 'x': shape [2, 3] needs 6 elements, got 5"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_rejected_if_they_arrive(
    monkeypatch: pytest.MonkeyPatch, value: float
) -> None:
    # JSON cannot spell them and orjson refuses NaN/Infinity, so only a lenient parser
    # upstream could produce them: stand one in.
    document = {"inputs": [x(data=[1.0, value])]}
    monkeypatch.setattr(v2_request, "decode_json_body", lambda _body: document)
    assert_rejected(b"{}", None, "'x'", "element 1 is not a finite number")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_literals_are_invalid_json(literal: bytes) -> None:
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[' + literal + b"]}]}"
    assert_rejected(body, None, "request body is not valid JSON")


BINARY_REJECTIONS: list[Any] = [
    pytest.param(
        x(shape=(2, 3), parameters={"binary_data_size": 20}),
        [b"\0" * 20],
        "shape [2, 3] of FP32 needs 24 bytes, binary_data_size is 20",
        id="size-vs-shape",
    ),
    pytest.param(x(parameters={"binary_data_size": 8}), [b"\0" * 12], "12 bytes", id="extra-bytes"),
    pytest.param(
        x(parameters={"binary_data_size": 8}), [b"\0" * 4], "declare 8 bytes", id="missing-bytes"
    ),
    pytest.param(
        x("BOOL", parameters={"binary_data_size": 2}),
        [b"\x01\x02"],
        "only the bytes 0 and 1",
        id="bool-byte",
    ),
    pytest.param(
        x("BYTES", parameters={"binary_data_size": 7}),
        [b"\1\0\0\0a\2\0"],
        "truncated length prefix",
        id="bytes-truncated-prefix",
    ),
    pytest.param(
        x("BYTES", parameters={"binary_data_size": 10}),
        [b"\1\0\0\0a\x09\0\0\0b"],
        "element 1 declares 9 bytes but only 1 remain",
        id="bytes-truncated-element",
    ),
    pytest.param(
        x("BYTES", parameters={"binary_data_size": 5}),
        [b"\1\0\0\0a"],
        "shape [2] needs 2 elements, got 1",
        id="bytes-too-few",
    ),
    pytest.param(
        x("BYTES", parameters={"binary_data_size": 12}),
        [b"\0\0\0\0" * 3],
        "more than the 2 elements",
        id="bytes-too-many",
    ),
]


@pytest.mark.parametrize(("entry", "blobs", "fragment"), BINARY_REJECTIONS)
def test_binary_rejections_name_the_input(
    entry: dict[str, Any], blobs: list[bytes], fragment: str
) -> None:
    assert_rejected(*binary_body({"inputs": [entry]}, *blobs), "'x'", fragment)


REQUEST_REJECTIONS: list[Any] = [
    pytest.param(b"{", None, "request body is not valid JSON", id="malformed"),
    pytest.param(b"\xff\xfe", None, "request body is not valid JSON", id="not-utf8"),
    pytest.param(b"", None, "request body is not valid JSON", id="empty"),
    pytest.param(b"[1]", None, "must be a JSON object", id="array-body"),
    pytest.param(b"{}", None, "no 'inputs'", id="no-inputs"),
    pytest.param(b'{"inputs": []}', None, "'inputs' is empty", id="empty-inputs"),
    pytest.param(b'{"inputs": {"x": 1}}', None, "'inputs' must be a list", id="inputs-object"),
    pytest.param(b'{"inputs": [5]}', None, "inputs[0] must be an object", id="input-number"),
    pytest.param(
        b'{"inputs": [{"datatype": "FP32"}]}', None, "inputs[0] has no 'name'", id="input-no-name"
    ),
    pytest.param(b'{"inputs": []}', 100, f"{HEADER_LENGTH} is 100", id="length-past-body"),
    pytest.param(b'{"inputs": []}', 0, f"{HEADER_LENGTH} is 0", id="length-zero"),
    pytest.param(b'{"inputs": []}', -3, f"{HEADER_LENGTH} is -3", id="length-negative"),
    pytest.param(b'{"inputs": []}', 5, "not valid JSON", id="length-cuts-json"),
]


@pytest.mark.parametrize(("body", "length", "fragment"), REQUEST_REJECTIONS)
def test_request_rejections(body: bytes, length: int | None, fragment: str) -> None:
    assert_rejected(body, length, fragment)


REQUEST_FIELD_REJECTIONS: list[Any] = [
    pytest.param({"id": 5}, "request 'id' must be a string", id="id-number"),
    pytest.param({"outputs": {"name": "y"}}, "'outputs' must be a list", id="outputs-object"),
    pytest.param({"outputs": ["y"]}, "outputs[0] must be an object", id="output-string"),
    pytest.param(
        {"outputs": [{"parameters": {}}]}, "outputs[0] has no 'name'", id="output-no-name"
    ),
    pytest.param(
        {"outputs": [{"name": "y"}, {"name": "y"}]},
        "output 'y' is requested more",
        id="output-duplicate",
    ),
    pytest.param(
        {"outputs": [{"name": "y", "parameters": {"binary_data": 1}}]},
        "output 'y': parameter 'binary_data' must be true or false",
        id="binary-data-int",
    ),
    pytest.param(
        {"outputs": [{"name": "y", "parameters": {"classification": 3}}]},
        "output 'y': parameter 'classification' is not supported",
        id="classification",
    ),
    pytest.param(
        {"parameters": {"binary_data_output": "yes"}},
        "'binary_data_output' must be",
        id="binary-output-string",
    ),
    pytest.param(
        {"parameters": {"timeout": -1}}, "'timeout' must be a non-negative", id="timeout-neg"
    ),
    pytest.param(
        {"parameters": {"timeout": "1"}}, "'timeout' must be a non-negative", id="timeout-str"
    ),
    pytest.param(
        {"parameters": {"timeout": True}}, "'timeout' must be a non-negative", id="timeout-bool"
    ),
    pytest.param({"parameters": [1]}, "request 'parameters' must be an object", id="params-list"),
]


@pytest.mark.parametrize(("fields", "fragment"), REQUEST_FIELD_REJECTIONS)
def test_request_field_rejections(fields: dict[str, Any], fragment: str) -> None:
    assert_rejected(
        *json_body({**one_input(datatype="FP32", shape=[1], data=[1]), **fields}), fragment
    )


def test_decode_json_body() -> None:
    assert decode_json_body(b'{"a": [1, 2.5, "s"]}') == {"a": [1, 2.5, "s"]}
    with pytest.raises(InvalidInput, match=r"^request body is not valid JSON: .*line 1"):
        decode_json_body(b'{"a": }')


def test_error_body() -> None:
    message = "input 'x': \"quoted\" é\n"
    assert orjson.loads(error_body(message)) == {"error": message}


# --------------------------------------------------------------------------------------------
# Responses


def model_outputs() -> dict[str, np.ndarray]:
    return {f"out_{dt.lower()}": sample(dt) for dt in DATATYPE_TO_NUMPY}


def split_response(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    if HEADER_LENGTH not in headers:
        return orjson.loads(body), b""
    length = int(headers[HEADER_LENGTH])
    return orjson.loads(body[:length]), body[length:]


def test_json_response_layout() -> None:
    outputs = {"y": np.array([[1.5, 2.0]], dtype=np.float32), "z": np.array([3], dtype=np.int64)}
    body, headers = encode_infer_response("m", "2", "req-1", outputs, None, binary_output=False)
    assert headers == {"Content-Type": "application/json"}
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "id": "req-1",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.0]},
            {"name": "z", "datatype": "INT64", "shape": [1], "data": [3]},
        ],
    }


def test_version_and_id_are_omitted_when_none() -> None:
    body, _ = encode_infer_response("m", None, None, {"y": np.zeros(1)}, None, False)
    assert set(orjson.loads(body)) == {"model_name", "outputs"}


def test_binary_response_layout() -> None:
    outputs = {"y": np.array([1.5, 2.0], dtype=np.float32), "z": np.array([3], dtype=np.int64)}
    requested = [RequestedOutput("z", True), RequestedOutput("y", False)]
    body, headers = encode_infer_response("m", None, None, outputs, requested, False)
    assert headers["Content-Type"] == "application/octet-stream"
    document, tail = split_response(body, headers)
    assert [o["name"] for o in document["outputs"]] == ["z", "y"]  # requested order
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert "data" not in document["outputs"][0]
    assert document["outputs"][1]["data"] == [1.5, 2.0]
    assert tail == np.array([3], dtype="<i8").tobytes()


@pytest.mark.parametrize(
    ("own", "request_level", "binary"),
    [(None, False, False), (None, True, True), (True, False, True), (False, True, False)],
)
def test_output_binary_flag_overrides_the_request(
    own: bool | None, request_level: bool, binary: bool
) -> None:
    outputs = {"y": np.zeros(2, dtype=np.float32)}
    body, headers = encode_infer_response(
        "m", None, None, outputs, [RequestedOutput("y", own)], request_level
    )
    document, _ = split_response(body, headers)
    assert ("parameters" in document["outputs"][0]) == binary
    assert (HEADER_LENGTH in headers) == binary


def test_zero_byte_binary_output_still_uses_the_binary_layout() -> None:
    outputs = {"y": np.zeros((0, 4), dtype=np.float32)}
    body, headers = encode_infer_response("m", None, None, outputs, None, True)
    document, tail = split_response(body, headers)
    assert headers[HEADER_LENGTH] == str(len(body))
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 0}
    assert tail == b""


def test_unknown_requested_output_names_it_and_the_outputs() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_requested([RequestedOutput("nope", None)], ["logits", "probs"])
    assert str(caught.value) == (
        "requested output 'nope' does not exist; the model's outputs are: 'logits', 'probs'"
    )


def test_big_endian_and_non_contiguous_outputs_encode_as_little_endian() -> None:
    base = np.arange(12, dtype=">f4").reshape(3, 4)
    outputs = {"t": base.T, "b": base}
    body, headers = encode_infer_response("m", None, None, outputs, None, True)
    document, tail = split_response(body, headers)
    assert [o["shape"] for o in document["outputs"]] == [[4, 3], [3, 4]]
    assert [o["datatype"] for o in document["outputs"]] == ["FP32", "FP32"]
    assert tail == np.ascontiguousarray(base.T, "<f4").tobytes() + base.astype("<f4").tobytes()
    json_doc = orjson.loads(encode_infer_response("m", None, None, outputs, None, False)[0])
    assert json_doc["outputs"][0]["data"] == base.T.ravel().tolist()


def test_fp16_json_output_prints_short_decimals() -> None:
    body, _ = encode_infer_response(
        "m", None, None, {"h": np.array([0.1], np.float16)}, None, False
    )
    assert b'"data":[0.099975586]' in body
    assert np.float16(orjson.loads(body)["outputs"][0]["data"][0]) == np.float16(0.1)


def test_str_and_bytes_outputs_encode_alike() -> None:
    as_str = {"s": np.array(["é", "b"], dtype=object)}
    as_bytes = {"s": np.array(["é".encode(), b"b"], dtype=object)}
    for binary in (False, True):
        assert encode_infer_response("m", None, None, as_str, None, binary) == (
            encode_infer_response("m", None, None, as_bytes, None, binary)
        )


def test_non_utf8_bytes_output_cannot_be_json() -> None:
    outputs = {"s": np.array([b"\xff"], dtype=object)}
    with pytest.raises(InvalidInput, match=r"output 's'.*binary_data"):
        encode_infer_response("m", None, None, outputs, None, False)
    body, headers = encode_infer_response("m", None, None, outputs, None, True)
    assert split_response(body, headers)[1] == b"\1\0\0\0\xff"


def test_unsupported_output_dtype_is_a_server_error() -> None:
    with pytest.raises(TypeError, match="output 'c'"):
        encode_infer_response("m", None, None, {"c": np.zeros(1, np.complex64)}, None, False)


# --------------------------------------------------------------------------------------------
# The real tritonclient


@pytest.fixture
def http() -> Any:
    import tritonclient.http as http

    return http


def client_request(http: Any, arrays: dict[str, np.ndarray], binary: bool, **kwargs: Any) -> Any:
    inputs = []
    for name, array in arrays.items():
        infer_input = http.InferInput(name, list(array.shape), NUMPY_TO_DATATYPE[array.dtype])
        infer_input.set_data_from_numpy(array, binary_data=binary)
        inputs.append(infer_input)
    return http.InferenceServerClient.generate_request_body(inputs, **kwargs)


@needs_tritonclient
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(DATATYPE_TO_NUMPY))
def test_tritonclient_request_decodes_to_the_same_arrays(
    http: Any, datatype: str, binary: bool
) -> None:
    expected = sample(datatype)
    if datatype == "BYTES" and not binary:
        # The client can send BYTES as JSON only when every element is UTF-8.
        expected = np.array([[b"a", b"", "é".encode()], [b"x y", b"0", b"z"]], dtype=object)
    other = np.arange(4, dtype=np.int32)
    body, length = client_request(http, {"x": expected, "other": other}, binary)
    assert (length is None) == (not binary)
    request = decode_infer_request(body, length)
    assert list(request.inputs) == ["x", "other"]
    assert_same(request.inputs["x"], expected)
    assert_same(request.inputs["other"], other)


@needs_tritonclient
def test_tritonclient_request_fields(http: Any) -> None:
    body, length = client_request(
        http,
        {"x": np.zeros(2, np.float32)},
        True,
        outputs=[http.InferRequestedOutput("y", binary_data=False), http.InferRequestedOutput("z")],
        request_id="abc",
        timeout=2500,
    )
    request = decode_infer_request(body, length)
    assert request.id == "abc"
    assert request.outputs == [RequestedOutput("y", False), RequestedOutput("z", True)]
    assert request.binary_output is False
    assert request.timeout_ms == pytest.approx(2.5)


@needs_tritonclient
def test_tritonclient_asks_for_binary_outputs_when_it_names_none(http: Any) -> None:
    body, length = client_request(http, {"x": np.zeros(2, np.float32)}, False)
    request = decode_infer_request(body, length)
    assert request.outputs is None
    assert request.binary_output is True


@needs_tritonclient
def test_tritonclient_big_fp32_body(http: Any) -> None:
    expected = np.random.default_rng(1).standard_normal((64, 1, 8, 8)).astype(np.float32)
    body, length = client_request(http, {"x": expected}, True)
    assert_same(decode_infer_request(body, length).inputs["x"], expected)


def parse_with_client(http: Any, body: bytes, headers: dict[str, str]) -> Any:
    return http.InferenceServerClient.parse_response_body(
        body, verbose=False, header_length=headers.get(HEADER_LENGTH), content_encoding=None
    )


def as_client_sees(array: np.ndarray, binary: bool) -> np.ndarray:
    """The client gives BYTES back as bytes from binary data but as str from JSON."""
    if array.dtype != np.object_ or binary:
        return array
    return np.array([item.decode() for item in array.ravel()], dtype=object).reshape(array.shape)


@needs_tritonclient
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_parses_every_datatype(http: Any, binary: bool) -> None:
    outputs = model_outputs()
    outputs["out_bytes"] = np.array([[b"a", b"", "é".encode()], [b"x", b"y", b"z"]], dtype=object)
    body, headers = encode_infer_response("m", "1", "r", outputs, None, binary)
    result = parse_with_client(http, body, headers)
    assert result.get_response()["id"] == "r"
    for name, expected in outputs.items():
        assert_same(result.as_numpy(name), as_client_sees(expected, binary))


@needs_tritonclient
def test_tritonclient_parses_a_mix_of_json_and_binary_outputs(http: Any) -> None:
    outputs = model_outputs()
    names = list(outputs)
    # Alternate binary and JSON, in an order unlike the model's, to pin the blob order.
    requested = [
        RequestedOutput(name, [True, False, None][i % 3]) for i, name in enumerate(reversed(names))
    ]
    body, headers = encode_infer_response("m", None, None, outputs, requested, True)
    assert HEADER_LENGTH in headers
    result = parse_with_client(http, body, headers)
    for output in requested:
        binary = output.binary is not False
        assert_same(result.as_numpy(output.name), as_client_sees(outputs[output.name], binary))


@needs_tritonclient
def test_tritonclient_bytes_round_trip(http: Any) -> None:
    original = np.array([[b"\x00", b""], [b"\xff\xfe", "ünï".encode()]], dtype=object)
    body, length = client_request(http, {"s": original}, True)
    decoded = decode_infer_request(body, length).inputs["s"]
    assert_same(decoded, original)
    response, headers = encode_infer_response("m", None, None, {"s": decoded}, None, True)
    assert_same(parse_with_client(http, response, headers).as_numpy("s"), original)


@needs_tritonclient
def test_tritonclient_big_fp32_response(http: Any) -> None:
    expected = np.random.default_rng(2).standard_normal((64, 1, 8, 8)).astype(np.float32)
    for binary in (True, False):
        body, headers = encode_infer_response("m", None, None, {"y": expected}, None, binary)
        assert_same(parse_with_client(http, body, headers).as_numpy("y"), expected)


def test_an_object_hidden_after_numbers_in_tensor_data_is_refused() -> None:
    """The depth check reads number lists by their first element only (scanning every number
    cost more than the inference); a deep object placed later is still a 400, not a crash."""
    deep: Any = 1.0
    for _ in range(200):
        deep = {"a": deep}
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, deep]}]}
    )
    with pytest.raises(InvalidInput):
        decode_infer_request(body, None)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary-header"])
def test_depth_limit_holds_whether_or_not_the_bracket_count_settles_it(binary: bool) -> None:
    """Counting brackets settles shallow requests without a walk; a request one level too
    deep still has more brackets than the limit, so the walk runs and refuses it."""
    limits = Limits(max_depth=5)

    def request(depth: int) -> tuple[bytes, int | None]:
        value: Any = 1
        for _ in range(depth - 3):  # the object, "inputs" and the entry are three levels
            value = {"k": value}
        tensor = {"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"p": value}}
        document = orjson.dumps({"inputs": [tensor]})
        if not binary:
            return document, None
        return document + np.float32(1).tobytes(), len(document)

    # Brackets inside strings only add to the count: a shallow request full of them is fine.
    shallow = {"inputs": [{"name": "[[[{{{", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    decode_infer_request(orjson.dumps(shallow), None, limits)
    with pytest.raises(InvalidInput, match="nested deeper than 5"):
        decode_infer_request(*request(7), limits)
