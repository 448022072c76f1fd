"""The gRPC API under hostile input, shutdown and several workers, against real servers:
hypothesis-built ModelInferRequests never get INTERNAL (or UNKNOWN, grpcio's answer to an
exception that escaped) and never kill the server; SIGTERM under load loses no accepted
request; with --workers 2 both processes serve the one port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import RunningServer, running_server

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT8", "BOOL", "BYTES"]
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def server(
    built_repository: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(
        built_repository[0], tmp_path_factory.mktemp("grpc-fuzz"), "--access-log", "false",
        grpc=True,
    ) as running:  # fmt: skip
        yield running


# ------------------------------------------------------------------------ fuzz

_text = st.text(max_size=12)
_parameter = st.one_of(
    st.builds(pb.InferParameter, bool_param=st.booleans()),
    st.builds(pb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
    st.builds(pb.InferParameter, string_param=_text),
    st.builds(pb.InferParameter, double_param=st.floats()),
    st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
)
_parameters = st.dictionaries(
    st.sampled_from(["timeout", "binary_data_output", "binary_data", "classification",
                     "shared_memory_region", "priority"]) | _text,
    _parameter, max_size=3,
)  # fmt: skip
_shape = st.lists(
    st.integers(-2, 70) | st.sampled_from([2**31, 2**62, 2**63 - 1]), max_size=5
) | st.sampled_from([[1, 1, 8, 8], [3, 8, 8], [64, 1, 8, 8], [2, 8, 8]])
_contents = st.builds(
    pb.InferTensorContents,
    fp32_contents=st.lists(st.floats(width=32), max_size=200),
    int_contents=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
    int64_contents=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    bool_contents=st.lists(st.booleans(), max_size=4),
    bytes_contents=st.lists(st.binary(max_size=8), max_size=4),
    fp64_contents=st.lists(st.floats(), max_size=4),
)


@st.composite
def infer_requests(draw: st.DrawFn) -> Any:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["digits_cnn", "digits_transformer"]) | _text),
        model_version=draw(st.sampled_from(["", "1"]) | _text),
        id=draw(_text),
    )
    for key, value in draw(_parameters).items():
        request.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["image"]) | _text),
            datatype=draw(st.sampled_from(DATATYPES) | _text),
            shape=draw(_shape),
        )
        for key, value in draw(_parameters).items():
            tensor.parameters[key].CopyFrom(value)
        if draw(st.booleans()):
            tensor.contents.CopyFrom(draw(_contents))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["logits"]) | _text))
        for key, value in draw(_parameters).items():
            output.parameters[key].CopyFrom(value)
    raw = draw(st.lists(st.binary(max_size=64) | st.sampled_from([bytes(256), bytes(768)]),
                        max_size=3))  # fmt: skip
    request.raw_input_contents.extend(raw)
    return request


def test_fuzzed_model_infer_never_internal(server: RunningServer) -> None:
    channel = grpc.insecure_channel(server.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    codes: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(infer_requests())
    def check(request: Any) -> None:
        try:
            stub.ModelInfer(request, timeout=10)
            codes["OK"] += 1
        except grpc.RpcError as error:
            codes[error.code().name] += 1
            assert error.code() not in NEVER, (error.code(), error.details(), request)

    try:
        check()
    finally:
        channel.close()
    assert server.proc.poll() is None, server.log_tail()
    assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=5).status_code == 200
    assert codes["INVALID_ARGUMENT"] > 0, codes
    assert "Traceback" not in server.log_tail(100_000), server.log_tail()


# ------------------------------------------------------------------------ shutdown


def test_sigterm_under_load_loses_no_accepted_request(
    built_repository: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """Clients keep sending while the server gets SIGTERM: each request is either answered
    OK or refused before the app took it; none that the app accepted is dropped (its access
    log holds only OK answers, as many as the clients received)."""
    with running_server(built_repository[0], tmp_path, "--log-format", "json", grpc=True) as srv:
        x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
        outcomes: Counter[str] = Counter()
        after_signal: Counter[str] = Counter()
        signalled = asyncio.Event()

        async def client_loop(c: Any) -> None:
            tensor = InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            while True:
                status = "OK"
                try:
                    result = await c.infer("digits_cnn", [tensor], client_timeout=20)
                    assert result.as_numpy("logits").shape == (4, 10)
                except InferenceServerException as exc:
                    status = str(exc.status()).removeprefix("StatusCode.")
                outcomes[status] += 1
                if signalled.is_set():
                    after_signal[status] += 1
                    if status != "OK":
                        return

        async def run() -> None:
            clients = [aioclient.InferenceServerClient(srv.grpc_url) for _ in range(4)]
            loops = [asyncio.ensure_future(client_loop(clients[i % 4])) for i in range(32)]
            await asyncio.sleep(1.5)
            os.kill(srv.proc.pid, signal.SIGTERM)
            signalled.set()
            await asyncio.wait_for(asyncio.gather(*loops), timeout=60)
            for c in clients:
                await c.close()

        asyncio.run(run())
        srv.proc.wait(timeout=30)
    # Refused: UNAVAILABLE once the port is closed, CANCELLED for the calls grpcio had read
    # off a connection but not yet handed to the app when shutdown began (they never ran).
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, outcomes
    assert outcomes - after_signal == Counter(OK=outcomes["OK"] - after_signal["OK"]), outcomes
    assert outcomes["OK"] > 32, outcomes
    # Every call the app accepted was answered OK, and the clients got each of those answers.
    lines = [json.loads(line) for line in srv.log_path.read_text().splitlines()]
    infer = "/inference.GRPCInferenceService/ModelInfer"
    answered = [line["status"] for line in lines if line.get("path") == infer]
    assert set(answered) == {"OK"} and len(answered) == outcomes["OK"], (
        Counter(answered),
        outcomes,
    )


# ------------------------------------------------------------------------ workers


def test_two_workers_share_the_grpc_port(
    built_repository: tuple[Path, Path, str], tmp_path: Path
) -> None:
    with running_server(built_repository[0], tmp_path, "--workers", "2", grpc=True) as srv:
        x = np.ones((1, 8, 8), dtype=np.float32)

        async def run() -> None:
            # One channel each: the kernel spreads new connections over both workers.
            for _ in range(12):
                async with aioclient.InferenceServerClient(srv.grpc_url) as c:
                    tensor = InferInput("image", [1, 8, 8], "FP32")
                    tensor.set_data_from_numpy(x)
                    result = await c.infer("digits_transformer", [tensor])
                    assert result.as_numpy("logits").shape == (1, 10)

        asyncio.run(run())
        deadline = time.monotonic() + 10
        line = 'normserve_requests_total{model="digits_transformer",protocol="grpc",status="OK"}'
        while True:
            text = httpx.get(f"{srv.http_url}/metrics", timeout=5).text
            counts = [float(v.split()[-1]) for v in text.splitlines() if v.startswith(line)]
            if counts == [12.0] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counts == [12.0], text[-1500:]
