"""Conv→BatchNorm→ReLU classifier for 8x8 digits: the BatchNorm model.

Every convolution is followed directly by a BatchNorm2d, and the hidden linear layer by a
BatchNorm1d, so all four BatchNorms are foldable into the layer before them. The convolutions
carry no bias: BatchNorm's shift makes one redundant, and folding must create it.
"""

from __future__ import annotations

import torch
from torch import nn

from models.data import IMAGE_SIDE, NUM_CLASSES


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Input [N, 1, 8, 8] intensities in [0, 1]; output [N, 10] logits."""

    def __init__(self, width: int = 32, hidden: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, width),
            conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            conv_bn_relu(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        flat = 2 * width * (IMAGE_SIDE // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            # Dropout makes train-mode output random: the export must never keep it.
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))
