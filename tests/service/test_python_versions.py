"""The serving side on every supported Python (issue 18, point 4): 3.11, 3.12 and 3.13.

For each interpreter (pyenv's, or python3.X on PATH; SKIPPED with the reason where there is
none) a virtual environment gets exactly what the runtime image installs - the pins of
requirements/serve.txt with --no-deps - and the project's wheel with --no-deps, then
``python -m service`` runs from outside the source tree on a tiny repository and answers an
inference. The environments are cached under ~/.cache/normserve/python-versions, keyed by
the interpreter and the pins, so a run after the first only reinstalls the project (seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from servers import ROOT, RunningServer, free_port, wait_until_ready
from tiny_onnx import FEATURES, expected, tiny_repository

VERSIONS = ["3.11", "3.12", "3.13"]
PINS = ROOT / "requirements" / "serve.txt"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "normserve"
INSTALL_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def find_interpreter(version: str) -> Path | None:
    """pyenv's newest ``version.*``, else ``python<version>`` on PATH."""
    try:
        root = subprocess.run(
            ["pyenv", "root"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        root = str(Path.home() / ".pyenv")
    candidates = sorted(
        Path(root, "versions").glob(f"{version}.*/bin/python"),
        key=lambda p: [int(part) for part in p.parts[-3].split(".") if part.isdigit()],
    )
    if candidates:
        return candidates[-1]
    found = shutil.which(f"python{version}")
    return Path(found) if found else None


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as the image installs it (a pure-Python wheel: one for every version)."""
    out = tmp_path_factory.mktemp("wheel")
    # This environment's setuptools where it has one (no download); pip's isolated build else.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet",
         "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("normserve-*-py3-none-any.whl")
    return wheel


def _environment(interpreter: Path, version: str) -> Path:
    """The cached virtual environment with the serving pins for ``interpreter``."""
    key = hashlib.sha256(PINS.read_bytes() + str(interpreter.resolve()).encode()).hexdigest()
    venv = CACHE / "python-versions" / f"{version}-{key[:12]}"
    stamp = venv / ".pins-installed"
    if stamp.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([str(interpreter), "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--only-binary",
         ":all:", "--quiet", "-r", str(PINS)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    if result.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        pytest.fail(f"the pins of {PINS.name} do not install on Python {version}:\n"
                    f"{result.stderr[-3000:]}")  # fmt: skip
    stamp.touch()
    return venv


@pytest.fixture(params=VERSIONS)
def serving_python(
    request: pytest.FixtureRequest, project_wheel: Path
) -> Iterator[tuple[str, Path]]:
    version: str = request.param
    interpreter = find_interpreter(version)
    if interpreter is None:
        pytest.skip(f"no Python {version} here (neither pyenv's nor python{version} on PATH)")
    venv = _environment(interpreter, version)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--quiet",
         str(project_wheel)],
        check=True, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    yield version, python


def test_the_service_answers_on_each_python(
    serving_python: tuple[str, Path], tmp_path: Path
) -> None:
    wanted, python = serving_python
    outside = tmp_path / "elsewhere"  # not the source tree: the installed package must serve
    outside.mkdir()
    version = subprocess.run(
        [str(python), "-c",
         "import sys, service; print(sys.version.split()[0], service.__file__)"],
        cwd=outside, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    assert version[0].startswith(f"{wanted}."), version
    assert str(python.parents[1]) in version[1], version  # from the venv, not the source tree

    port = free_port()
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("OTEL_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(python), "-m", "service", "--repository", str(tiny_repository(tmp_path)),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=outside, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    server = RunningServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", log_path, proc)
    try:
        wait_until_ready(server)
        x = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, FEATURES],
                            "data": x.ravel().tolist()}]}  # fmt: skip
        response = httpx.post(f"{server.http_url}/v2/models/tiny/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        (output,) = response.json()["outputs"]
        got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(got, expected(x), rtol=1e-5, atol=1e-6)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, server.log_tail()
