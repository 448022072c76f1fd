"""Parity: is the exported file the model's function, up to float32 rounding?

A fixed bound on max|onnxruntime − PyTorch float32| cannot tell rounding from a wrong graph:
two float32 computations of a deep network differ by both of their rounding errors, which grow
with depth (ResNet-50 with realistic BatchNorm statistics: PyTorch float32 is 2.0e-5 from the
float64 truth, the folded file 2.3e-5, so they differ by 8.1e-5, 3x a 1e-5 relative bound).
So both are measured against a float64 copy of the reference model, fed the same input values,
and the file must be about as close to the truth as PyTorch's own float32 forward is:

    max|file − ref64| ≤ FACTOR · min(max|torch fp32 − ref64|, TORCH_CAP · scale) + FLOOR · scale

with scale = max(1, max|ref64|),

per output and per parity batch. A wrong graph (a BatchNorm folded into the wrong layer, a
reused conv folded twice, a wrong epsilon) is off by the size of the output, not by rounding.

Where no float64 copy can be made (the model raises in float64, or an output stays float32 in
the copy, as with an explicit ``.float()`` or a custom op), the check falls back to the old
rule against PyTorch float32, looser than before: max|file − torch| ≤ FALLBACK_RTOL ·
max(1, max|torch|). The result says which rule was used and why.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree

# Measured on 22 torchvision/timm architectures (random init, realistic BatchNorm statistics,
# 64x64; README, "The export tool"): the exported file's error from float64 was 0.74-1.92x
# PyTorch float32's own. 4x leaves room for onnxruntime kernels not met there, while wrong
# folds missed their bound 3,900x (epsilon 1e-3 for 1e-5) to 7,600,000x (a reused conv
# folded twice).
PARITY_FACTOR = 4.0
# Rounding-level slack relative to the output's magnitude, for outputs that PyTorch float32
# happens to compute (nearly) exactly: 1e-6 is ~8 float32 ulps at 1.0.
PARITY_FLOOR = 1e-6
# PyTorch's own error counts up to 1e-3 · max(1, max|ref|) (the deep models above: 1e-6 to
# 5e-5 relative). Beyond that float32 and float64 disagree for another reason than rounding
# (a forward that is not a function of its input alone, or one unstable in float32), and a
# bound grown from it would pass a wrong file.
PARITY_TORCH_CAP = 1e-3
# Integer and boolean outputs (argmax indices, masks): the share of values that may differ
# beyond PARITY_FACTOR times PyTorch's own share, for near-ties that round the other way.
DISCRETE_FLOOR = 1e-3
# Without a float64 reference: the old relative bound against PyTorch float32, 10x looser
# than the 1e-5 it was (ResNet-50 needed 2.9e-5 relative).
FALLBACK_RTOL = 1e-4
# The batch sizes parity tries, each capped so one batch holds at most PARITY_MAX_ELEMENTS
# input values (never below 3): batch 64 of 224x224 images made one PyTorch forward take 35 s
# on 2 cores, and parity runs each batch three times (float32, float64, onnxruntime). Batch 1
# and a batch above the export's 2 are always tried, so a batch axis that is not really
# dynamic fails. 2**16: 3x32x32 images get batches 1, 7, 21; 3x64x64 ones 1 and 5; 3x224x224
# ones 1 and 3; the digits models' 8x8 ones 1, 7 and 64.
PARITY_BATCHES = (1, 7, 64)
PARITY_MAX_ELEMENTS = 2**16
PARITY_MIN_OTHER_BATCH = 3
PARITY_SEED = 0
# With a dynamic axis besides the batch axis (a sequence's length): parity also runs at length
# 1 and at this many times the example's length (at most the axis's cap), at batch
# PARITY_MIN_OTHER_BATCH, so an axis the graph fixed, or a step that only works for the
# lengths seen, fails; the example's 8 rows give lengths 1, 8, 24.
PARITY_LENGTH_FACTOR = 3


@dataclass(frozen=True)
class ParityRule:
    """The bound: ``factor`` · min(torch's float32 error, ``torch_cap`` · scale) + ``floor`` ·
    scale, scale = max(1, max|ref|); or ``fallback_rtol`` · scale against float32 where no
    float64 copy exists."""

    factor: float = PARITY_FACTOR
    floor: float = PARITY_FLOOR
    fallback_rtol: float = FALLBACK_RTOL
    torch_cap: float = PARITY_TORCH_CAP


@dataclass(frozen=True)
class OutputCheck:
    """One output at one batch size: the file's and torch's errors and the bound held to
    (for integer and boolean outputs: the share of values that differ)."""

    output: str
    batch: int
    file_error: float
    torch_error: float | None  # None without a float64 reference
    bound: float

    @property
    def ratio(self) -> float:
        """How much of the bound the error uses (above 1: a miss)."""
        if self.bound > 0:
            return self.file_error / self.bound
        return math.inf if self.file_error > 0 else 0.0


@dataclass(frozen=True)
class ParityResult:
    """The checks made; ``failure`` says what missed (checking stops there), ``fallback`` why
    there was no float64 reference."""

    checks: list[OutputCheck]
    fallback: str | None = None
    failure: str | None = None

    @property
    def worst(self) -> OutputCheck:
        """The check closest to its bound."""
        return max(self.checks, key=lambda c: (c.ratio, c.file_error))

    @property
    def reference(self) -> str:
        return "float32" if self.fallback else "float64"


def default_batches(args: Sequence[torch.Tensor]) -> list[int]:
    """``PARITY_BATCHES`` capped to ``PARITY_MAX_ELEMENTS`` input values per batch, never
    below ``PARITY_MIN_OTHER_BATCH``: always batch 1 and one batch other than the export's 2."""
    per_sample = max(1, sum(int(a[0].numel()) for a in args))
    cap = max(PARITY_MIN_OTHER_BATCH, PARITY_MAX_ELEMENTS // per_sample)
    return sorted({min(b, cap) for b in PARITY_BATCHES})


def default_lengths(example: int, cap: int | None) -> list[int]:
    """The lengths parity tries on a dynamic sequence axis: 1, the example's, and a longer one
    (``PARITY_LENGTH_FACTOR`` times the example's, at most ``cap``)."""
    longer = example * PARITY_LENGTH_FACTOR
    return sorted({1, example, longer if cap is None else min(longer, cap)})


def parity_cases(
    args: Sequence[torch.Tensor],
    batches: Sequence[int],
    samples: torch.Tensor | tuple[torch.Tensor, ...] | None,
) -> list[tuple[torch.Tensor, ...]]:
    """Seeded random inputs like ``args`` at each batch size, then ``samples`` if given."""
    generator = torch.Generator().manual_seed(PARITY_SEED)
    cases = [tuple(_random_like(a, b, generator) for a in args) for b in batches]
    if samples is not None:
        cases.append(samples if isinstance(samples, tuple) else (samples,))
    return cases


def _random_like(example: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    high = int(example.max()) + 1 if example.numel() else 2
    return torch.randint(0, max(high, 2), shape, generator=generator, dtype=example.dtype)


def flatten_outputs(out: object) -> list[torch.Tensor]:
    """The model's outputs in the exporter's order (torch's pytree: dict keys in insertion
    order, namedtuple fields, nested tuples depth first)."""
    leaves, _ = _pytree.tree_flatten(out)
    return leaves


def check_parity(
    reference: nn.Module,
    session: Any,
    cases: Sequence[tuple[torch.Tensor, ...]],
    output_names: Sequence[str],
    rule: ParityRule,
    first_outputs: Sequence[torch.Tensor] | None = None,
) -> ParityResult:
    """Run each case through ``session`` (an onnxruntime InferenceSession), ``reference``
    (float32, as given, under ``no_grad``) and a float64 copy of it, until the first output
    beyond its bound. ``first_outputs``: ``reference``'s flattened outputs on ``cases[0]``
    when the caller already has them. ``reference`` itself is never changed."""
    reference64, fallback = _float64_copy(reference)
    names = [i.name for i in session.get_inputs()]
    checks: list[OutputCheck] = []
    for index, case in enumerate(cases):
        if index == 0 and first_outputs is not None:
            expected = list(first_outputs)
        else:
            with torch.no_grad():
                expected = flatten_outputs(reference(*case))
        truth: list[torch.Tensor] | None = None
        if reference64 is not None:
            truth, fallback = _run_float64(reference64, case, output_names)
            if truth is None:
                reference64 = None
        feeds = {n: a.numpy() for n, a in zip(names, case, strict=True)}
        try:
            actual = session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            ran = f"onnxruntime cannot run the file at batch {_batch(case)}: {exc}"
            return ParityResult(checks, fallback, ran)
        if len(actual) != len(expected):
            counts = f"onnxruntime returned {len(actual)} outputs, PyTorch {len(expected)}"
            return ParityResult(checks, fallback, counts)
        for i, (name, want, got) in enumerate(zip(output_names, expected, actual, strict=True)):
            check, failure = _check(
                name, case, want, got, None if truth is None else truth[i], rule
            )
            if failure is not None:
                why = f" (no float64 reference: {fallback})" if truth is None else ""
                return ParityResult(checks, fallback, failure + why)
            checks.append(check)
    return ParityResult(checks, fallback)


def _check(
    name: str,
    case: tuple[torch.Tensor, ...],
    want32: torch.Tensor,
    got: np.ndarray,
    truth: torch.Tensor | None,
    rule: ParityRule,
) -> tuple[OutputCheck, str | None]:
    """The check and, where it missed, the message that says by how much."""
    batch = _batch(case)
    if list(got.shape) != list(want32.shape):
        return OutputCheck(name, batch, math.inf, None, 0.0), (
            f"output '{name}': shape {list(got.shape)} from onnxruntime differs from PyTorch's "
            f"{list(want32.shape)} at batch {batch}"
        )
    torch32 = want32.detach().double().numpy()
    if not want32.is_floating_point():
        return _check_discrete(name, batch, got, torch32, truth, rule)
    if truth is None:
        error = _max_abs(got.astype(np.float64) - torch32)
        bound = rule.fallback_rtol * max(1.0, _max_abs(torch32))
        check = OutputCheck(name, batch, error, None, bound)
        if not (error <= bound):  # also refuses NaN
            return check, (
                f"output '{name}' at batch {batch}: onnxruntime differs from PyTorch float32 by "
                f"max|Δ|={error:.3e}, which exceeds the bound {bound:.3e} "
                f"({rule.fallback_rtol:g}·max(1, max|torch|)) by {check.ratio:.1f}x"
            )
        return check, None
    ref64 = truth.numpy()
    error = _max_abs(got.astype(np.float64) - ref64)
    torch_error = _max_abs(torch32 - ref64)
    scale = max(1.0, _max_abs(ref64))
    bound = rule.factor * min(torch_error, rule.torch_cap * scale) + rule.floor * scale
    check = OutputCheck(name, batch, error, torch_error, bound)
    if not (error <= bound):  # also refuses NaN
        return check, (
            f"output '{name}' at batch {batch}: onnxruntime is max|Δ|={error:.3e} from the "
            f"float64 reference where PyTorch float32 is {torch_error:.3e}; that exceeds the "
            f"bound {bound:.3e} ({rule.factor:g}·min(torch's error, {rule.torch_cap:g}·scale) "
            f"+ {rule.floor:g}·scale, scale = max(1, max|ref|) = {scale:.3g}) by "
            f"{check.ratio:.1f}x: the file computes something else than the model, not just "
            "float32 rounding"
        )
    return check, None


def _check_discrete(
    name: str,
    batch: int,
    got: np.ndarray,
    torch32: np.ndarray,
    truth: torch.Tensor | None,
    rule: ParityRule,
) -> tuple[OutputCheck, str | None]:
    """Indices, masks, counts: the share of values that differ from the reference. An argmax
    over a near-tie flips with rounding, in PyTorch float32 as in the file, so the file may
    miss as often as ``factor`` times PyTorch does, plus ``DISCRETE_FLOOR`` of the values."""
    reference = torch32 if truth is None else truth.double().numpy()
    file_share = _share_differing(got.astype(np.float64), reference)
    torch_share = None if truth is None else _share_differing(torch32, reference)
    bound = rule.factor * (torch_share or 0.0) + DISCRETE_FLOOR
    check = OutputCheck(name, batch, file_share, torch_share, bound)
    if file_share > bound:
        return check, (
            f"output '{name}' ({got.dtype}) at batch {batch}: {file_share:.2%} of the values "
            f"from onnxruntime differ from the {'float64 ' if truth is not None else ''}"
            f"reference (PyTorch float32: {torch_share or 0.0:.2%}), which exceeds the bound "
            f"{bound:.2%} by {check.ratio:.1f}x"
        )
    return check, None


def _share_differing(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a != b)) if a.size else 0.0


def _float64_copy(reference: nn.Module) -> tuple[nn.Module | None, str | None]:
    try:
        return copy.deepcopy(reference).double(), None
    except Exception as exc:  # any module code may run in deepcopy/.double()
        return None, f"no float64 copy of the model ({_first_line(exc)})"


def _run_float64(
    reference64: nn.Module, case: tuple[torch.Tensor, ...], output_names: Sequence[str]
) -> tuple[list[torch.Tensor] | None, str | None]:
    """The float64 copy's outputs on the same input values, or None and the reason."""
    inputs = tuple(a.double() if a.is_floating_point() else a for a in case)
    try:
        with torch.no_grad():
            outputs = flatten_outputs(reference64(*inputs))
    except Exception as exc:  # the model's own code decides what float64 does
        return None, f"the model fails in float64 ({_first_line(exc)})"
    for name, out in zip(output_names, outputs, strict=False):
        if out.is_floating_point() and out.dtype != torch.float64:
            return None, f"output '{name}' stays {out.dtype} in a float64 copy of the model"
    return outputs, None


def _batch(case: tuple[torch.Tensor, ...]) -> int:
    return int(case[0].shape[0])


def _max_abs(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
