"""Shared test helpers and fixtures: BN randomization, and the default repository built once.

Helpers shared by the export tests.

BatchNorm's default statistics (mean 0, variance 1, weight 1, bias 0) make an identity map,
so a wrong fold formula or a BatchNorm that silently vanished would still give right
answers: every test that folds randomizes them first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parent.parent
# gRPC listens on 8001 by default: every app and server a test starts would want that one
# port. Off unless a test asks for it (tests/servers.py: running_server(..., grpc=True)).
os.environ["NORMSERVE_GRPC_PORT"] = "0"
# One worker process, not the default 'auto' (one per CPU): most tests observe one process's
# batches, queues, connections and counters. The default has tests of its own, which remove
# this (tests/service/test_app.py, tests/service/test_operations.py).
os.environ["NORMSERVE_WORKERS"] = "1"
# A folder of trained checkpoints for built_repository to start from (see there).
CACHED_CHECKPOINTS = "NORMSERVE_TEST_CHECKPOINTS"


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=generator)


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running_mean (-1..1), running_var (0.1..3), weight, bias and batch count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            n = module.num_features
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(_uniform(n, -1.0, 1.0, generator))
                module.running_var.copy_(_uniform(n, 0.1, 3.0, generator))
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.fill_(
                    int(torch.randint(1, 1000, (1,), generator=generator))
                )
            if module.affine:
                module.weight.copy_(_uniform(n, -2.0, 2.0, generator))
                module.bias.copy_(_uniform(n, -1.0, 1.0, generator))
    return model


def snapshot(model: nn.Module) -> Callable[[], None]:
    """Records the model's state and modes; the returned function asserts they are unchanged."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = [(name, m.training) for name, m in model.named_modules()]

    def assert_unchanged() -> None:
        now = model.state_dict()
        assert now.keys() == state.keys()
        for key, before in state.items():
            assert now[key].dtype == before.dtype, key
            assert torch.equal(now[key], before), f"{key} changed"
        assert [(name, m.training) for name, m in model.named_modules()] == modes

    return assert_unchanged


@pytest.fixture(scope="session")
def randomize_bn() -> Callable[..., nn.Module]:
    return randomize_batchnorms


@pytest.fixture(scope="session")
def caller_snapshot() -> Callable[[nn.Module], Callable[[], None]]:
    return snapshot


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(repository, checkpoints, build log) from ``python -m export build`` in a temp dir.

    Trains the three default models from scratch (about a minute on 2 cores), exactly as
    ``make serve`` does on a fresh clone.
    """
    work = tmp_path_factory.mktemp("build")
    repository, checkpoints = work / "model_repository", work / "checkpoints"
    cached = os.environ.get(CACHED_CHECKPOINTS)
    if cached:
        # Developers' shortcut (never set in CI): reuse trained checkpoints, so only the
        # export runs; the test that checks training progress skips itself then.
        shutil.copytree(cached, checkpoints)
    result = subprocess.run(
        [sys.executable, "-m", "export", "build", "--repository", str(repository),
         "--checkpoints", str(checkpoints)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return repository, checkpoints, result.stderr


@pytest.fixture
def model_copies(built_repository: tuple[Path, Path, str], tmp_path: Path) -> Callable[..., Path]:
    """``model_copies("a", "b")``: a fresh repository in tmp_path holding copies of those
    built models, for tests that change a repository (the session's one stays untouched)."""

    def copy(*names: str) -> Path:
        target = tmp_path / "repo"
        target.mkdir(exist_ok=True)
        for name in names:
            shutil.copytree(built_repository[0] / name, target / name)
        return target

    return copy
