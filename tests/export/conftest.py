"""The default model repository, built once per test session for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(repository, checkpoints, build log) from ``python -m export build`` in a temp dir.

    Trains the three default models from scratch (about a minute on 2 cores), exactly as
    ``make serve`` does on a fresh clone.
    """
    work = tmp_path_factory.mktemp("build")
    repository, checkpoints = work / "model_repository", work / "checkpoints"
    result = subprocess.run(
        [sys.executable, "-m", "export", "build", "--repository", str(repository),
         "--checkpoints", str(checkpoints)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return repository, checkpoints, result.stderr
