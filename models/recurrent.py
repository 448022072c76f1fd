"""LSTM with LayerNorm on its gates, reading a digit row by row: the recurrent LayerNorm model.

This is the use Ba, Kiros & Hinton (2016) wrote LayerNorm for: BatchNorm needs separate
statistics per time step and breaks on variable lengths or batch 1, while LayerNorm
normalizes each sample's pre-activations on their own. Following the paper, the input and
recurrent contributions to the gates are normalized separately, and the cell state is
normalized before the output ``tanh``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.data import IMAGE_SIDE, NUM_CLASSES
from models.scan import scan_steps


class LayerNormLSTMCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        # The LayerNorm shifts make linear biases redundant; one gate bias stays.
        self.input_to_gates = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.hidden_to_gates = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.norm_input = nn.LayerNorm(4 * hidden_size)
        self.norm_hidden = nn.LayerNorm(4 * hidden_size, bias=False)
        self.norm_cell = nn.LayerNorm(hidden_size)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = self.norm_input(self.input_to_gates(x)) + self.norm_hidden(self.hidden_to_gates(h))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.norm_cell(c))
        return h, c


class RowLSTM(nn.Module):
    """Input [N, 8, 8] (rows x pixels) in [0, 1]; output [N, 10] logits."""

    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        self.cell = LayerNormLSTMCell(IMAGE_SIDE, hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # zeros from the input's own batch size keep the batch axis dynamic in the export.
        h = image.new_zeros(image.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        # A loop over the rows that stays a dynamic axis when exported with one (models.scan).
        h, c = scan_steps(self.cell, (h, c), image)
        return self.head(h)
