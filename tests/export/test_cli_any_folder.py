"""The export tool run from a user's own project, and the installed ``normserve`` command.

The project folder has its own ``models`` and ``service`` packages (a PyTorch project very
often has ``models/``), which ``python -m`` puts first on ``sys.path``: our CLI must still
import ours, and the user's module must still import theirs. The two-input INT32 model is
exported with ``normserve export`` and served with ``normserve serve``, no Python written.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from servers import RunningServer, free_port, wait_until_ready

from export.cli_imports import user_code
from service.repository import CONFIG_FILE, list_models, read_config, verified_file

TIMEOUT_S = 300
NORMSERVE = Path(sys.executable).parent / "normserve"  # installed beside this interpreter

THEIR_MODELS_INIT = '"""The user\'s own models package: nothing the export tool needs."""\n'
THEIR_BLOCKS = """\
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))
"""
MYNET = """\
import torch
from torch import nn

from models.blocks import Block


def net():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bn.running_mean.uniform_(-1.0, 1.0)
        model[0].bn.running_var.uniform_(0.5, 2.0)
    return model
"""
# Token ids and a mask, both INT32: an embedding, a BatchNorm and a linear head.
PAIR = """\
import torch
from torch import nn


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, ids, mask):
        x = (self.embed(ids) * mask.unsqueeze(-1).to(torch.float32)).sum(1)
        return self.bn(self.head(x))


def pair():
    torch.manual_seed(0)
    model = Pair()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1.0, 1.0)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model
"""
SEQUENCE = 16
OUR_NAMES = ("export", "models", "service")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's project: its own models/ and service/ packages, mynet.py, and nets/pair.py
    beside its own export/, models/ and service/."""
    root = tmp_path_factory.mktemp("user-project")
    files = {
        "models/__init__.py": THEIR_MODELS_INIT,
        "models/blocks.py": THEIR_BLOCKS,
        "service/__init__.py": '"""The user\'s own web service package."""\n',
        "mynet.py": MYNET,
        "nets/pair.py": PAIR,
        # Beside pair.py, whose folder goes first on the path: while the user's code runs
        # (factory, forward traced by the exporter), these are the names' packages, so our
        # export code in between must import nothing of ours lazily.
        **{f"nets/{name}/__init__.py": '"""The user\'s own."""\n' for name in OUR_NAMES},
    }
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def run(cwd: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` run in ``cwd``, the user's project: nothing puts ours on the path."""
    return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def load_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- python -m export in a folder with its own models/ and service/ ---------------------------


def test_help_works_beside_their_models_package(project: Path) -> None:
    result = run(project, sys.executable, "-m", "export", "--help")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "onnx" in result.stdout and "build" in result.stdout


def test_their_module_exports_with_their_models_package(project: Path) -> None:
    result = run(
        project, sys.executable, "-m", "export", "onnx", "--model", "mynet:net",
        "--input-shape", "3,8,8", "--name", "mynet", "--repository", "repo", "--labels", "a,b,c",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "BN folded 1/1" in result.stdout  # their Block's BatchNorm, folded
    config = read_config(project / "repo" / "mynet" / CONFIG_FILE)
    assert config.labels == ["a", "b", "c"]
    assert config.versions[0].source == "mynet:net"
    path = verified_file(project / "repo", config, config.latest)

    import onnxruntime as ort

    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with user_code(str(project)):
        reference = importlib.import_module("mynet").net().eval()
        with torch.no_grad():
            expected = reference(x).numpy()
    sys.modules.pop("mynet", None)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()}
    )
    assert float(np.abs(got - expected).max()) <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_user_code_swaps_their_packages_in_and_ours_back(project: Path) -> None:
    import models

    ours = sys.modules["models"]
    assert hasattr(models, "REGISTRY")
    with user_code(str(project)):
        theirs = importlib.import_module("models.blocks")
        assert Path(theirs.__file__ or "").is_relative_to(project)
        assert not hasattr(sys.modules["models"], "REGISTRY")
    assert sys.modules["models"] is ours
    assert "models.blocks" not in sys.modules  # theirs set aside, not left behind
    assert str(project) not in sys.path


# --- the installed normserve command ---------------------------------------------------------


def test_normserve_is_installed_and_dispatches(project: Path) -> None:
    assert NORMSERVE.is_file(), f"{NORMSERVE} missing: pip install -e . installs it"
    usage = run(project, str(NORMSERVE), "--help")
    assert usage.returncode == 0
    assert "serve" in usage.stdout and "export" in usage.stdout
    unknown = run(project, str(NORMSERVE), "train")
    assert unknown.returncode == 2
    errors = [line for line in unknown.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown command 'train'; choose from serve, export"]


def test_normserve_serve_never_imports_torch(project: Path) -> None:
    code = (
        "import sys\n"
        "from export_cli import main\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in ('torch', 'export', 'models') if m in sys.modules))\n"
    )
    result = run(project, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert "--repository" in result.stdout  # the service's own flags
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_two_int32_inputs_exported_and_served_by_normserve(project: Path, tmp_path: Path) -> None:
    export = run(
        project, str(NORMSERVE), "export", "onnx", "--model", "nets/pair.py:pair",
        "--input", f"ids:INT32:{SEQUENCE}:0..9", "--input", f"mask:INT32:{SEQUENCE}",
        "--name", "pair", "--repository", str(tmp_path / "repo"),
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    (config,) = list_models(tmp_path / "repo")
    assert [(s.name, s.datatype, s.shape) for s in config.inputs] == [
        ("ids", "INT32", [-1, SEQUENCE]),
        ("mask", "INT32", [-1, SEQUENCE]),
    ]
    assert config.versions[0].bn_folded == 1  # the head's BatchNorm, folded into it

    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 10, (2, SEQUENCE), generator=generator, dtype=torch.int32)
    mask = torch.randint(0, 2, (2, SEQUENCE), generator=generator, dtype=torch.int32)
    model = load_file(project / "nets" / "pair.py", "_cli_any_folder_pair").pair().eval()
    with torch.no_grad():
        expected = model(ids, mask).numpy()
    request = {
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": list(t.shape), "data": t.flatten().tolist()}
            for n, t in (("ids", ids), ("mask", mask))
        ]
    }
    answer = serve_once(tmp_path / "repo", tmp_path, "/v2/models/pair/infer", request)
    (output,) = answer["outputs"]
    assert output["shape"] == [2, 3]
    got = np.asarray(output["data"], dtype=np.float32).reshape(2, 3)
    assert float(np.abs(got - expected).max()) <= 1e-4


def serve_once(repository: Path, log_dir: Path, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Start ``normserve serve``, POST ``body`` to ``path`` once, stop it with SIGTERM."""
    port = free_port()
    log_path = log_dir / "normserve-serve.log"
    command = [str(NORMSERVE), "serve", "--repository", str(repository), "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=log_dir, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", log_path, proc)
    try:
        wait_until_ready(server)
        response = httpx.post(f"{server.http_url}{path}", json=body, timeout=30.0)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # only the process started above
        code = proc.wait(timeout=30)
    assert response.status_code == 200, response.text
    assert code == 0, server.log_tail()
    answer: dict[str, Any] = json.loads(response.text)
    return answer
