"""MLServer 1.7.1 as the benchmark's peer: the real server in its own venv, a real client.

The server tests need MLServer's venv (about a minute to build): they are skipped unless it
exists at the default path or NORMSERVE_BENCH_MLSERVER=1 asks for it to be built. Every answer
is compared with onnxruntime run here on the same file, so a wrong batch split or a wrong
codec shows up as a wrong number, not just as a status code.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tiny_onnx import CLASSES, FEATURES, write_tiny_onnx
from tritonclient.utils import InferenceServerException

from benchmarks import mlserver_peer as mp
from benchmarks import procs

TOLERANCE = 1e-5
CONCURRENT = 32


def _runtime_constant(name: str) -> str:
    """A string constant of the runtime module, which imports mlserver and so cannot be
    imported in the project's venv."""
    for node in ast.parse(mp.RUNTIME_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, str)
            return value
    raise AssertionError(f"{mp.RUNTIME_FILE.name} defines no {name}")


LOG_BATCHES_ENV = _runtime_constant("LOG_BATCHES_ENV")
BATCH_LOG_PREFIX = _runtime_constant("BATCH_LOG_PREFIX")
THREADS_ENV = _runtime_constant("THREADS_ENV")


@pytest.fixture(scope="module")
def mlserver_python() -> Path:
    built = (mp.DEFAULT_VENV / "bin" / "python").exists()
    if not built and os.environ.get("NORMSERVE_BENCH_MLSERVER") != "1":
        pytest.skip(
            "MLServer's venv is not built: `make bench` builds it, or set "
            "NORMSERVE_BENCH_MLSERVER=1"
        )
    return mp.ensure_mlserver_venv(mp.DEFAULT_VENV)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def reference(tiny: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def peer(
    mlserver_python: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[mp.Peer]:
    """The benchmark's configuration (parallel_workers default), with a batch window long
    enough that concurrent requests are certainly merged, and the batch sizes logged."""
    port = procs.free_port()
    model_dir = mp.write_model_dir(
        tmp_path_factory.mktemp("mlserver"),
        "tiny",
        tiny,
        threads=2,
        max_batch_size=16,
        max_batch_time_s=0.02,
        port=port,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(LOG_BATCHES_ENV, "1")
        with mp.running_mlserver(mlserver_python, model_dir, port) as running:
            yield running


def _rows(seed: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, FEATURES)).astype(np.float32)


def _infer(
    address: str, x: np.ndarray, *, binary_in: bool = False, binary_out: bool = False
) -> np.ndarray:
    client = triton.InferenceServerClient(address, network_timeout=30.0)
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary_in)
        output = triton.InferRequestedOutput("scores", binary_data=binary_out)
        result = client.infer("tiny", [tensor], outputs=[output])
        scores = result.as_numpy("scores")
        assert scores is not None, result.get_response()
        return scores
    finally:
        client.close()


def _expected(reference: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    want: np.ndarray = reference.run(["scores"], {"x": x})[0]
    return want


# --- without a server ---------------------------------------------------------------------------


def test_runtime_imports_nothing_from_the_project() -> None:
    """It runs in MLServer's venv, where normserve is not installed."""
    tree = ast.parse(mp.RUNTIME_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add((node.module or "").split(".")[0])
    allowed = {"mlserver", "numpy", "onnxruntime"} | set(sys.stdlib_module_names)
    assert roots <= allowed, roots - allowed


def test_model_dir_turns_adaptive_batching_on(tmp_path: Path) -> None:
    onnx = write_tiny_onnx(tmp_path / "tiny.onnx")
    root = mp.write_model_dir(
        tmp_path / "repo",
        "tiny",
        onnx,
        threads=2,
        max_batch_size=32,
        max_batch_time_s=0.001,
        port=18080,
    )
    settings = json.loads((root / "settings.json").read_text())
    model = json.loads((root / "tiny" / "model-settings.json").read_text())
    assert settings["host"] == "127.0.0.1"
    assert settings["http_port"] == 18080
    assert settings["parallel_workers"] == mp.DEFAULT_PARALLEL_WORKERS
    assert len({settings["http_port"], settings["grpc_port"], settings["metrics_port"]}) == 3
    assert settings["debug"] is False  # no access log line per request
    assert model["implementation"] == mp.RUNTIME_CLASS
    assert (model["max_batch_size"], model["max_batch_time"]) == (32, 0.001)
    assert model["parameters"]["uri"] == str(onnx.resolve())
    assert model["parameters"]["extra"] == {"intra_op_threads": 2}
    copied = root / "tiny" / "onnx_runtime.py"
    assert copied.read_text() == mp.RUNTIME_FILE.read_text()

    with pytest.raises(ValueError, match="adaptive batching"):
        mp.write_model_dir(
            tmp_path / "off",
            "tiny",
            onnx,
            threads=2,
            max_batch_size=1,
            max_batch_time_s=0.001,
            port=18080,
        )


def test_sample_request_has_the_model_input_shape(tiny: Path) -> None:
    body = json.loads(mp.sample_request(tiny, batch=2))
    assert body["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [2, FEATURES], "data": [0.0] * 2 * FEATURES}
    ]


# --- the real server ----------------------------------------------------------------------------


def test_venv_is_pinned_to_the_project_onnxruntime(mlserver_python: Path) -> None:
    started = time.monotonic()
    assert mp.ensure_mlserver_venv(mp.DEFAULT_VENV) == mlserver_python  # stamp matches
    assert time.monotonic() - started < 1.0
    installed = mp.installed_versions(mp.DEFAULT_VENV)
    assert installed["mlserver"] == mp.MLSERVER_VERSION
    assert installed["onnxruntime"] == ort.__version__
    assert installed["numpy"] == np.__version__
    assert tuple(int(p) for p in installed["uvloop"].split(".")[:2]) < (0, 22)


def test_runtime_session_options_match_normserve(mlserver_python: Path) -> None:
    """The same settings as service.serving.runtime.OnnxModel, read back from the runtime's
    options in MLServer's venv; the thread count from the model's settings first, then the
    environment."""
    script = f"""
import json, os, sys
sys.path.insert(0, {str(mp.RUNTIME_FILE.parent)!r})
import onnx_runtime as r
so = r.session_options(2)
os.environ[r.THREADS_ENV] = "3"
print(json.dumps({{
    "intra": so.intra_op_num_threads,
    "inter": so.inter_op_num_threads,
    "mode": str(so.execution_mode),
    "level": str(so.graph_optimization_level),
    "spin": [so.get_session_config_entry(f"session.{{k}}.allow_spinning")
             for k in ("intra_op", "inter_op")],
    "threads": [r.intra_op_threads({{"intra_op_threads": 2}}), r.intra_op_threads({{}})],
}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", THREADS_ENV)}
    result = subprocess.run(
        [str(mlserver_python), "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "intra": 2,
        "inter": 1,
        "mode": str(ort.ExecutionMode.ORT_SEQUENTIAL),
        "level": str(ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        "spin": ["0", "0"],
        "threads": [2, 3],
    }


@pytest.mark.parametrize("batch", [1, 3])
def test_json_answers_equal_onnxruntime(
    peer: mp.Peer, reference: ort.InferenceSession, batch: int
) -> None:
    x = _rows(batch, batch)
    got = _infer(peer.address, x)
    assert got.shape == (batch, CLASSES)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _expected(reference, x), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("batch", [1, 3])
def test_binary_outputs_are_answered_as_json(
    peer: mp.Peer, reference: ort.InferenceSession, batch: int
) -> None:
    """MLServer 1.7.1 ignores ``binary_data`` on outputs and answers JSON; the client copes."""
    x = _rows(10 + batch, batch)
    got = _infer(peer.address, x, binary_out=True)
    np.testing.assert_allclose(got, _expected(reference, x), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("batch", [1, 3])
def test_binary_inputs_are_refused(peer: mp.Peer, batch: int) -> None:
    """The V2 binary tensor extension is not implemented by MLServer 1.7.1's REST server: the
    benchmark must send it JSON. If an upgrade makes this fail, flip SUPPORTS_BINARY_TENSORS
    and send MLServer the binary bodies too."""
    assert not mp.SUPPORTS_BINARY_TENSORS
    with pytest.raises(InferenceServerException) as refused:
        _infer(peer.address, _rows(20 + batch, batch), binary_in=True, binary_out=True)
    assert refused.value.status() == "422"


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(
    peer: mp.Peer, reference: ort.InferenceSession
) -> None:
    """Requests of 1-3 rows at once: the adaptive batcher merges them into one session run and
    splits the output back; each client must get exactly its own rows."""
    inputs = [_rows(100 + i, 1 + i % 3) for i in range(CONCURRENT)]
    logged_before = _batch_rows(peer)
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda x: _infer(peer.address, x), inputs))
    for x, got in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(got, _expected(reference, x), rtol=TOLERANCE, atol=TOLERANCE)
    batches = _batch_rows(peer)[len(logged_before) :]
    assert sum(batches) == sum(len(x) for x in inputs)
    assert len(batches) < CONCURRENT, f"no request was merged: {batches}"
    assert max(batches) > 3, batches  # more rows than any one request sent


def _batch_rows(peer: mp.Peer) -> list[int]:
    """The rows of each batch the runtime ran, from the log (NORMSERVE_BENCH_LOG_BATCHES)."""
    prefix = BATCH_LOG_PREFIX
    deadline = time.monotonic() + 5.0
    text = peer.log_path.read_text(errors="replace")
    while not text.endswith("\n") and time.monotonic() < deadline:  # a line half written
        time.sleep(0.05)
        text = peer.log_path.read_text(errors="replace")
    return [
        int(line.split(prefix, 1)[1].split()[0]) for line in text.splitlines() if prefix in line
    ]


def test_lifecycle_with_workers_measures_and_stops_the_whole_tree(
    mlserver_python: Path, tiny: Path, reference: ort.InferenceSession, tmp_path: Path
) -> None:
    """parallel_workers=1: inference in a spawned worker (the runtime must load there too),
    and child processes that must all be gone once the context exits."""
    port = procs.free_port()
    model_dir = mp.write_model_dir(
        tmp_path,
        "tiny",
        tiny,
        threads=1,
        max_batch_size=8,
        max_batch_time_s=0.001,
        port=port,
        parallel_workers=1,
    )
    with mp.running_mlserver(mlserver_python, model_dir, port) as peer:
        assert 0 < peer.ready_s <= peer.cold_start_s < 60
        x = _rows(7, 3)
        np.testing.assert_allclose(
            _infer(peer.address, x), _expected(reference, x), rtol=TOLERANCE, atol=TOLERANCE
        )
        family = procs.descendants(peer.pid)
        assert family, "parallel_workers=1 spawns a worker process"
        assert procs.tree_rss_bytes(peer.pid) > procs.tree_rss_bytes(family[0]) > 0
        pid = peer.pid
    for gone in [pid, *family]:
        assert not Path(f"/proc/{gone}").exists() or _zombie(gone), f"{gone} still runs"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
