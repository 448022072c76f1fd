"""A recurrence over a sequence axis that exports with that axis dynamic.

A Python ``for t in range(x.shape[1])`` is unrolled by ``torch.export`` to the example's
length: the ONNX file then takes only that length (the exporter silently fixes the axis).
``scan_steps`` runs the same steps as such a loop, but where the length is symbolic (an
export with a dynamic sequence axis) it hands them to torch's ``scan`` higher-order op, which
the ONNX exporter lowers to one ``Scan`` node whose body is one step: the file then takes any
length, and each LayerNorm of the step stays one LayerNormalization node in the body.

Eagerly and with a fixed length it is the plain loop, so training, the behaviour report and
fixed-length exports are exactly what they were; ``export_onnx``'s parity check holds the
Scan graph against this loop at several lengths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._higher_order_ops.scan import scan

State = tuple[torch.Tensor, ...]


def scan_steps(
    step: Callable[[torch.Tensor, State], State], state: State, xs: torch.Tensor, dim: int = 1
) -> State:
    """``state = step(x_t, state)`` for each ``x_t`` along ``xs``'s axis ``dim``; the last
    state (a tuple of tensors)."""
    length = xs.shape[dim]
    if isinstance(length, int):
        for t in range(length):
            state = step(xs.select(dim, t), state)
        return state

    def combine(carry: State, x: torch.Tensor) -> tuple[State, tuple[()]]:
        return tuple(step(x, carry)), ()

    final, _ = scan(combine, tuple(state), xs, dim=dim)
    return tuple(final)
