"""Every datatype through gRPC, raw and typed, against a real server: tiny Identity models
(built with onnx.helper) echo each input, so what comes back must be exactly what was sent.
The default models use only FP32 (tests/service/test_grpc.py); these cover the rest of the
typed-contents table (service.grpc.tensors.CONTENTS_FIELD) and the raw byte layouts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper
from servers import RunningServer, running_server
from tiny_onnx import install_source, save_checked

from service.datatypes import DATATYPE_TO_NUMPY

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402

# datatype -> (ONNX element type, the typed contents field, a sample row of 3)
TYPES: dict[str, tuple[int, str, list[Any]]] = {
    "BOOL": (TensorProto.BOOL, "bool_contents", [True, False, True]),
    "UINT8": (TensorProto.UINT8, "uint_contents", [0, 7, 255]),
    "INT8": (TensorProto.INT8, "int_contents", [-128, 0, 127]),
    "INT16": (TensorProto.INT16, "int_contents", [-32768, 5, 32767]),
    "INT32": (TensorProto.INT32, "int_contents", [-(2**31), 0, 2**31 - 1]),
    "INT64": (TensorProto.INT64, "int64_contents", [-(2**63), 1, 2**63 - 1]),
    "UINT64": (TensorProto.UINT64, "uint64_contents", [0, 1, 2**64 - 1]),
    "FP64": (TensorProto.DOUBLE, "fp64_contents", [-1.5, 0.0, 1e300]),
    "BYTES": (TensorProto.STRING, "bytes_contents", [b"", b"a\x00b", "é".encode()]),
}


def array(datatype: str, rows: int) -> np.ndarray:
    row = TYPES[datatype][2]
    out = np.empty((rows, 3), dtype=DATATYPE_TO_NUMPY[datatype])
    out[:] = [row] * rows
    return out


def write_echo(path: Path, datatypes: dict[str, int]) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{d}"], [f"out_{d}"]) for d in datatypes],
        "echo",
        [helper.make_tensor_value_info(f"in_{d}", t, ["batch", 3]) for d, t in datatypes.items()],
        [helper.make_tensor_value_info(f"out_{d}", t, ["batch", 3]) for d, t in datatypes.items()],
    )
    return save_checked(graph, path)


def install_echo(root: Path, name: str, datatypes: dict[str, int]) -> Path:
    def specs(prefix: str) -> list[dict[str, Any]]:
        return [{"name": f"{prefix}_{d}", "datatype": d, "shape": [-1, 3]} for d in datatypes]

    source = write_echo(root / f"{name}.onnx", datatypes)
    config = {"name": name, "inputs": specs("in"), "outputs": specs("out"), "max_batch_size": 8}
    return install_source(root, source, config)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("echo")
    install_echo(root, "echo", {d: t for d, (t, _, _) in TYPES.items()})
    repository = install_echo(root, "echo_fp16", {"FP16": TensorProto.FLOAT16})
    with running_server(repository, root, grpc=True) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[Any]:
    channel = grpc.insecure_channel(server.grpc_url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("rows", [1, 8])
def test_raw_contents_every_datatype(server: RunningServer, rows: int) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for datatype in TYPES:
        tensor = grpcclient.InferInput(f"in_{datatype}", [rows, 3], datatype)
        tensor.set_data_from_numpy(array(datatype, rows))
        inputs.append(tensor)
    result = client.infer("echo", inputs)
    for datatype in TYPES:
        got = result.as_numpy(f"out_{datatype}")
        assert got is not None and got.shape == (rows, 3), datatype
        assert got.tolist() == array(datatype, rows).tolist(), datatype
    half = np.array([[0.5, -2.0, 65504.0]] * rows, dtype=np.float16)
    tensor = grpcclient.InferInput("in_FP16", [rows, 3], "FP16")
    tensor.set_data_from_numpy(half)
    out = client.infer("echo_fp16", [tensor]).as_numpy("out_FP16")
    assert out is not None and out.dtype == np.float16 and np.array_equal(out, half)
    client.close()


def test_typed_contents_every_datatype(stub: Any) -> None:
    request = pb.ModelInferRequest(model_name="echo")
    for datatype, (_, field, _) in TYPES.items():
        tensor = request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[2, 3])
        getattr(tensor.contents, field).extend(array(datatype, 2).ravel().tolist())
    request.parameters["binary_data_output"].bool_param = False
    answer = stub.ModelInfer(request, timeout=10)
    assert not answer.raw_output_contents
    outputs = {o.name: o for o in answer.outputs}
    for datatype, (_, field, row) in TYPES.items():
        output = outputs[f"out_{datatype}"]
        assert output.datatype == datatype and list(output.shape) == [2, 3]
        assert list(getattr(output.contents, field)) == row * 2, datatype


@pytest.mark.parametrize(
    ("datatype", "values", "fragment"),
    [
        ("INT8", [128, 0, 0], "out of range for INT8"),
        ("UINT8", [256, 0, 0], "out of range for UINT8"),
        ("INT16", [-32769, 0, 0], "out of range for INT16"),
    ],
)
def test_typed_values_must_fit_their_datatype(
    stub: Any, datatype: str, values: list[int], fragment: str
) -> None:
    request = pb.ModelInferRequest(model_name="echo")
    for name, (_, field, _) in TYPES.items():
        tensor = request.inputs.add(name=f"in_{name}", datatype=name, shape=[1, 3])
        row = values if name == datatype else array(name, 1).ravel().tolist()
        getattr(tensor.contents, field).extend(row)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.value.details()


def test_fp16_travels_raw_only(stub: Any) -> None:
    request = pb.ModelInferRequest(model_name="echo_fp16")
    request.inputs.add(name="in_FP16", datatype="FP16", shape=[1, 3])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in error.value.details()
    # Raw in, typed out asked for: FP16 has no typed field either way.
    request.raw_input_contents.append(np.zeros(3, dtype="<f2").tobytes())
    request.parameters["binary_data_output"].bool_param = False
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only travels raw" in error.value.details()


def test_bytes_must_be_utf8_for_string_tensors(stub: Any) -> None:
    request = pb.ModelInferRequest(model_name="echo")
    for name, (_, field, _) in TYPES.items():
        tensor = request.inputs.add(name=f"in_{name}", datatype=name, shape=[1, 3])
        row = [b"ok", b"\xff\xfe", b""] if name == "BYTES" else array(name, 1).ravel().tolist()
        getattr(tensor.contents, field).extend(row)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BYTES element 1" in error.value.details()
    assert "not UTF-8" in error.value.details()


def test_model_config_names_every_datatype_as_triton_does(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    config = client.get_model_config("echo", as_json=True)["config"]
    types = {tensor["name"]: tensor["data_type"] for tensor in config["input"]}
    assert types["in_BYTES"] == "TYPE_STRING"  # Triton's name for BYTES
    assert types["in_FP64"] == "TYPE_FP64" and types["in_BOOL"] == "TYPE_BOOL"
    metadata = client.get_model_metadata("echo", as_json=True)
    assert {t["name"]: t["datatype"] for t in metadata["inputs"]}["in_BYTES"] == "BYTES"
    client.close()
