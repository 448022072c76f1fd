"""Recurrent models over digit rows of varying count: LayerNorm versus per-step BatchNorm.

Interface (both models): ``model(rows)`` or ``model(rows, lengths)``. ``rows`` is float32
[N, T, 8] (N sequences of T rows of 8 pixels in [0, 1], see models/sequence_data.py); any
T >= 1 works. Without ``lengths`` every sequence is T steps long: a batch of equal-length
sequences needs nothing else, and that single-tensor call is the one exported and served
(``digits_sequence``, dynamic batch and sequence axes). A padded batch (sequences padded
with anything after their end, e.g. by ``pad_sequences``) passes ``lengths`` as int64 [N]:
each sample's answer is then read from its hidden state at its own last valid step, the
state being frozen past it, so padding never reaches the output. Output: [N, 10] logits.
Export-friendly: plain tensor ops, and no Python control flow on data besides the loop over
the T steps.

``SequenceLSTM`` has LayerNorm inside the cell (models/recurrent.py's ``LayerNormLSTMCell``,
Ba et al. 2016): each sample is normalized on its own, so nothing depends on the step index,
the length or the rest of the batch. ``BatchNormSequenceLSTM`` is recurrent BatchNorm as
Cooijmans et al. (2016) define it: the input and hidden contributions to the gates and the
cell state normalized separately, with separate statistics per time step up to
``max_steps`` (the longest training length) and shared scale and shift. Beyond
``max_steps`` no statistics exist; ``beyond`` selects the fallback (``BEYOND_POLICIES``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.data import NUM_CLASSES
from models.recurrent import LayerNormLSTMCell
from models.scan import scan_steps
from models.sequence_data import FEATURES, MAX_TRAIN_LENGTH

HIDDEN = 64
Beyond = Literal["last", "pooled", "batch"]
# What a step past max_steps normalizes with, in eval mode:
#   last:   the last trained step's running statistics (Cooijmans et al.'s choice);
#   pooled: the statistics of all trained steps together (mean of the per-step means; mean of
#           the per-step variances plus the variance of the per-step means);
#   batch:  the batch's own statistics, as in training (batch-dependent; fails at batch 1).
BEYOND_POLICIES: tuple[Beyond, ...] = ("last", "pooled", "batch")


def _freeze(
    keep: torch.Tensor | None, new: tuple[torch.Tensor, torch.Tensor], old: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new state where ``keep`` [N] is true, the old one past a sequence's end."""
    if keep is None:
        return new
    mask = keep[:, None]
    return torch.where(mask, new[0], old[0]), torch.where(mask, new[1], old[1])


class SequenceLSTM(nn.Module):
    """LayerNorm LSTM over rows [N, T, 8] (optional lengths [N]); output [N, 10] logits."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.cell = LayerNormLSTMCell(FEATURES, hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, rows: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # zeros from the input's own batch size keep the batch axis dynamic in the export.
        h = rows.new_zeros(rows.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        if lengths is None:
            # The served call: a loop that stays a dynamic length axis when exported with
            # one (models.scan: one ONNX Scan step), the plain loop otherwise.
            h, c = scan_steps(self.cell, (h, c), rows)
            return self.head(h)
        for t in range(rows.shape[1]):
            keep = None if lengths is None else lengths > t
            h, c = _freeze(keep, self.cell(rows[:, t], (h, c)), (h, c))
        return self.head(h)


class StepBatchNorm(nn.Module):
    """BatchNorm over [N, F] with running statistics per time step (``steps`` of them) and one
    shared affine transform (Cooijmans et al. 2016: γ starts at 0.1).

    ``forward(x, t, mask)``: in training, the batch statistics of the rows where ``mask`` [N]
    is true (all rows without a mask) normalize, and move step ``t``'s running statistics
    (PyTorch's convention: momentum weights the new batch, running variance unbiased). In
    eval mode step ``t``'s running statistics normalize; past the last step, ``beyond``.
    """

    def __init__(
        self,
        features: int,
        steps: int,
        *,
        shift: bool = True,
        gamma: float = 0.1,
        momentum: float = 0.1,
        eps: float = 1e-5,
        beyond: Beyond = "last",
    ) -> None:
        super().__init__()
        self.steps, self.momentum, self.eps, self.beyond = steps, momentum, eps, beyond
        self.weight = nn.Parameter(torch.full((features,), gamma))
        # The gates' input and hidden norms have no shift: the cell adds one gate bias.
        self.bias = nn.Parameter(torch.zeros(features)) if shift else None
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.steps_tracked: torch.Tensor
        self.register_buffer("running_mean", torch.zeros(steps, features))
        self.register_buffer("running_var", torch.ones(steps, features))
        self.register_buffer("steps_tracked", torch.zeros(steps, dtype=torch.long))

    def _batch_stats(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, biased variance, row count) over the rows the mask keeps."""
        if mask is None:
            count = x.new_tensor(float(x.shape[0]))
            return x.mean(0), x.var(0, correction=0), count
        weight = mask.to(x.dtype)[:, None]
        count = weight.sum()
        mean = (x * weight).sum(0) / count
        var = ((x - mean) ** 2 * weight).sum(0) / count
        return mean, var, count

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics of all trained steps together, every step weighing the same."""
        mean = self.running_mean.mean(0)
        var = self.running_var.mean(0) + self.running_mean.var(0, correction=0)
        return mean, var

    def forward(self, x: torch.Tensor, t: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        use_batch = self.training or (t >= self.steps and self.beyond == "batch")
        if use_batch:
            mean, var, count = self._batch_stats(x, mask)
            if self.training and t < self.steps:
                with torch.no_grad():
                    unbiased = var * count / (count - 1).clamp(min=1)
                    self.running_mean[t].lerp_(mean.detach(), self.momentum)
                    self.running_var[t].lerp_(unbiased.detach(), self.momentum)
                    self.steps_tracked[t] += 1
        elif t < self.steps:
            mean, var = self.running_mean[t], self.running_var[t]
        elif self.beyond == "last":
            mean, var = self.running_mean[-1], self.running_var[-1]
        else:
            mean, var = self.pooled()
        out = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return out if self.bias is None else out + self.bias


class BatchNormLSTMCell(nn.Module):
    """LSTM cell with per-step BatchNorm on the input and hidden contributions to the gates and
    on the cell state (Cooijmans et al. 2016, equations 6-8)."""

    def __init__(self, input_size: int, hidden_size: int, steps: int, beyond: Beyond) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_to_gates = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.hidden_to_gates = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.norm_input = StepBatchNorm(4 * hidden_size, steps, shift=False, beyond=beyond)
        self.norm_hidden = StepBatchNorm(4 * hidden_size, steps, shift=False, beyond=beyond)
        self.norm_cell = StepBatchNorm(hidden_size, steps, beyond=beyond)

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        t: int,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = (
            self.norm_input(self.input_to_gates(x), t, mask)
            + self.norm_hidden(self.hidden_to_gates(h), t, mask)
            + self.gate_bias
        )
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.norm_cell(c, t, mask))
        return h, c


class BatchNormSequenceLSTM(nn.Module):
    """Per-step BatchNorm LSTM over rows [N, T, 8] (optional lengths [N]); output [N, 10].

    ``masked_statistics`` (default on): with ``lengths`` in training, each step's batch
    statistics leave out the padded rows; off, they include them (what a per-step BatchNorm
    unaware of padding computes).
    """

    def __init__(
        self,
        hidden: int = HIDDEN,
        max_steps: int = MAX_TRAIN_LENGTH,
        beyond: Beyond = "last",
        masked_statistics: bool = True,
    ) -> None:
        super().__init__()
        self.cell = BatchNormLSTMCell(FEATURES, hidden, max_steps, beyond)
        self.head = nn.Linear(hidden, NUM_CLASSES)
        self.masked_statistics = masked_statistics

    @property
    def max_steps(self) -> int:
        return self.cell.norm_cell.steps

    def set_beyond(self, policy: Beyond) -> BatchNormSequenceLSTM:
        """Select the fallback past ``max_steps`` (one of ``BEYOND_POLICIES``); returns self."""
        if policy not in BEYOND_POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {BEYOND_POLICIES}")
        for module in self.modules():
            if isinstance(module, StepBatchNorm):
                module.beyond = policy
        return self

    def forward(self, rows: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = rows.new_zeros(rows.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        for t in range(rows.shape[1]):
            keep = None if lengths is None else lengths > t
            mask = keep if self.masked_statistics else None
            h, c = _freeze(keep, self.cell(rows[:, t], (h, c), t, mask), (h, c))
        return self.head(h)
