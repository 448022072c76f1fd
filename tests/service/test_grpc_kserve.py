"""KServe's own gRPC client (``kserve.InferenceGRPCClient``) against a real server.

The client runs in a child process: kserve and tritonclient both register their generated
``inference.*`` messages in protobuf's default descriptor pool, and two different
definitions of one name in one process is an import error (our server keeps its own pool,
see service.grpc.codegen; the two clients cannot).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from servers import ROOT, RunningServer, running_server

# Looked up, not imported: importing it here would clash with tritonclient.grpc (see above).
if importlib.util.find_spec("kserve") is None:
    pytest.skip(
        "the kserve package is not installed (not a project dependency: it pulls in the "
        "Kubernetes client and pandas); pip install kserve to run KServe's gRPC client",
        allow_module_level=True,
    )

CLIENT = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput

async def main(url):
    client = InferenceGRPCClient(url, retries=0, timeout=30)
    out = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
           "model_ready": await client.is_model_ready("digits_transformer")}
    x = np.random.default_rng(1).random((3, 8, 8), dtype=np.float32)
    for mode in ("raw", "typed"):
        tensor = InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=mode == "raw")
        outputs = [RequestedOutput("logits", parameters={"binary_data": mode == "raw"})]
        request = InferRequest("digits_transformer", [tensor], request_id=mode,
                               request_outputs=outputs)
        response = await client.infer(request)
        out[mode] = {"id": response.id, "logits": response.outputs[0].as_numpy().tolist()}
    try:
        await client.infer(InferRequest("no_such_model", [tensor]))
        out["error"] = None
    except Exception as exc:
        out["error"] = str(exc)
    await client.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def server(
    built_repository: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(
        built_repository[0], tmp_path_factory.mktemp("grpc-kserve"), grpc=True
    ) as running:
        yield running


def test_kserve_grpc_client(
    server: RunningServer, built_repository: tuple[Path, Path, str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, server.grpc_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["live"] is True and answers["ready"] is True
    assert answers["model_ready"] is True
    x = np.random.default_rng(1).random((3, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(
        str(built_repository[0] / "digits_transformer" / "1" / "model.onnx")
    )
    expected = session.run(["logits"], {"image": x})[0]
    for mode in ("raw", "typed"):
        assert answers[mode]["id"] == mode
        np.testing.assert_allclose(
            np.array(answers[mode]["logits"], dtype=np.float32), expected, rtol=1e-5, atol=1e-4
        )
    assert answers["error"] is not None and "unknown model" in answers["error"]
