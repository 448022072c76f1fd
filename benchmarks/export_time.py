"""Export time: the export tool against a plain ``torch.onnx.export`` of the same model.

The goal (issue 14): exporting a ResNet-50 at 224x224 with the tool (fold, export, checker,
parity against float64, write) takes under 2x a plain ``torch.onnx.export(model, args,
dynamo=True)``. Both run in this process, interleaved, after a warm-up export that pays the
exporter's one-time imports. Each round's ratio is taken from its own pair, and the median
prefers rounds where other processes used under a quarter of a core (parity's float64 forward
slows the most when the machine is shared: 1.5x to 2.8x across rounds of one run here).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.engines import Sample, other_load, quiet_median
from benchmarks.torchvision_cpu import import_torchvision

GOAL_RATIO = 2.0
SEED = 0


def time_export(
    model_name: str, side: int, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Seconds for the plain export and for the tool's, per round, and their median ratio."""
    from export.to_onnx import export_onnx

    torchvision = import_torchvision()
    torch.manual_seed(SEED)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.rand((2, 3, side, side), generator=torch.Generator().manual_seed(SEED))
    plain: list[float] = []
    tool: list[float] = []
    ratios: list[Sample] = []
    phases: dict[str, float] = {}
    parity = ""
    with tempfile.TemporaryDirectory() as tmp:
        _plain_export(torch.nn.Linear(4, 2).eval(), torch.rand(2, 4), Path(tmp) / "warm.onnx")
        for round_index in range(rounds):
            with other_load() as load:
                started = time.perf_counter()
                _plain_export(model, x, Path(tmp) / "plain.onnx")
                plain.append(time.perf_counter() - started)
                started = time.perf_counter()
                report = export_onnx(model, x, Path(tmp) / "tool.onnx")
                tool.append(time.perf_counter() - started)
            ratios.append(Sample(tool[-1] / plain[-1], load[0]))
            phases, parity = report.seconds, report.parity_summary()
            log(
                f"  export {model_name} {side}x{side}, round {round_index + 1}/{rounds}: "
                f"plain {plain[-1]:.1f} s, tool {tool[-1]:.1f} s ({report.timing()})"
                f"{'  (noisy)' if ratios[-1].noisy else ''}"
            )
    return {
        "model": model_name,
        "input": [2, 3, side, side],
        "plain_s": plain,
        "tool_s": tool,
        "ratio": quiet_median(ratios),
        "noisy_rounds": sum(r.noisy for r in ratios),
        "tool_phases_s": {k: round(v, 2) for k, v in phases.items()},
        "parity": parity,
    }


def _plain_export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    with _quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporter prints its progress on every call; the benchmark logs its own lines.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
