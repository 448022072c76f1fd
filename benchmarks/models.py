"""The three benchmark models, exported the way the export tool exports, folded and unfolded.

- ``digits_cnn``: the default trained digits CNN (its checkpoint; trained if missing).
- ``cifar_cnn``: a CIFAR-sized Conv→BN→ReLU network, input [N, 3, 32, 32], four blocks of
  32/64/128/128 channels (stride 2 on the last three), global average pool, linear 10.
- ``ln_transformer``: a pre-norm LayerNorm Transformer, input [N, 32, 128], 2 layers,
  4 heads, feed-forward 256.

The two benchmark-only models have random weights and randomized BatchNorm statistics:
speed does not depend on training, but BatchNorm's default statistics (an identity map)
would let a broken fold go unnoticed, and the parity check would prove nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.quantize import QuantizationError, QuantizeReport
from export.to_onnx import ExportReport
from models.transformer import PreNormBlock

SEED = 0


@dataclass(frozen=True)
class BenchModel:
    name: str
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    build: Callable[[Path], nn.Module]  # checkpoints directory -> eval-mode model
    description: str


@dataclass(frozen=True)
class Exported:
    """One benchmark model as the engines see it."""

    spec: BenchModel
    torch_model: nn.Module
    folded: Path  # what the export tool writes: BatchNorm folded into the conv weights
    unfolded: Path  # the same eval-mode model exported with its BatchNormalization nodes
    report: ExportReport  # the export tool's evidence: parity, nodes, BN folded
    # The export tool's int8 copy of ``folded`` and its gate, or why there is none.
    int8: Path | None = None
    int8_report: QuantizeReport | None = None
    int8_refused: str = ""
    # A repository holding ``folded`` as the service serves it, runtime options tuned.
    repository: Path | None = None
    served_runtime: str = ""  # what `python -m export tune` chose, in words
    served_same_as: str = ""  # the engine row that runs exactly the same configuration

    @property
    def parity_max_abs(self) -> float:
        return self.report.parity_max_abs_error


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CifarCNN(nn.Module):
    """[N, 3, 32, 32] -> [N, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 32, 1),
            conv_bn_relu(32, 64, 2),
            conv_bn_relu(64, 128, 2),
            conv_bn_relu(128, 128, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class TokenTransformer(nn.Module):
    """[N, 32, 128] embedded tokens -> [N, 10]: pre-norm blocks, final LayerNorm, mean pool."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, ff: int = 256) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(PreNormBlock(dim, heads, ff, 0.0) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(tokens))
        # A sum of slices, as in models.transformer: batch-invariant in onnxruntime.
        pooled = x[:, 0]
        for t in range(1, x.shape[1]):
            pooled = pooled + x[:, t]
        return self.head(pooled / x.shape[1])


def randomized(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Random weights (seeded) and BatchNorm statistics far from the identity; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                n = module.num_features
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)  # type: ignore[union-attr]
                module.running_var.uniform_(0.5, 2.0, generator=generator)  # type: ignore[union-attr]
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
                assert module.weight.numel() == n
    return model.eval()


def _digits_cnn(checkpoints: Path) -> nn.Module:
    from export.build import trained_model
    from models import REGISTRY
    from models.data import load_digits_split

    model, _ = trained_model(REGISTRY["digits_cnn"], load_digits_split(), checkpoints)
    return model.eval()


def _cifar_cnn(_: Path) -> nn.Module:
    torch.manual_seed(SEED)
    return randomized(CifarCNN())


def _ln_transformer(_: Path) -> nn.Module:
    torch.manual_seed(SEED)
    return randomized(TokenTransformer())


BENCH_MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel("digits_cnn", (1, 8, 8), _digits_cnn, "default digits CNN (trained, 4 BN)"),
        BenchModel("cifar_cnn", (3, 32, 32), _cifar_cnn, "CIFAR-sized Conv-BN-ReLU ×4, random"),
        BenchModel("ln_transformer", (32, 128), _ln_transformer, "pre-norm LN Transformer, random"),
    )
}


def export_model(spec: BenchModel, workdir: Path, checkpoints: Path) -> Exported:
    """Export with the project's own tool: folded (checked for parity) and unfolded."""
    from export.to_onnx import export_onnx

    model = spec.build(checkpoints)
    example = torch.rand((2, *spec.input_shape), generator=torch.Generator().manual_seed(SEED))
    folded = workdir / f"{spec.name}.onnx"
    unfolded = workdir / f"{spec.name}.unfolded.onnx"
    report = export_onnx(
        model,
        example,
        folded,
        input_names=["input"],
        output_names=["logits"],
        unfolded_path=unfolded,
        source=f"benchmarks: {spec.description}",
    )
    exported = Exported(spec, model, folded, unfolded, report)
    return quantize_model(exported, workdir)


def quantize_model(model: Exported, workdir: Path) -> Exported:
    """Add the export tool's int8 copy: gated on digits accuracy for the digits CNN, on top-1
    agreement with fp32 over random inputs for the random-weight models (no labels exist)."""
    from dataclasses import replace

    from export.quantize import quantize_file

    shape = model.spec.input_shape
    labels = None
    if model.spec.name == "digits_cnn":
        from models.data import load_digits_split

        digits = load_digits_split()
        calibration = digits.train.images.numpy().reshape(-1, *shape)
        evaluation = digits.test.images.numpy().reshape(-1, *shape)
        labels = digits.test.labels.numpy()
    else:
        rng = np.random.default_rng(SEED)
        # The benchmark's inputs are uniform in [0, 1): calibrate on the same distribution.
        calibration = rng.random((256, *shape), dtype=np.float32)
        evaluation = rng.random((512, *shape), dtype=np.float32)
    target = workdir / f"{model.spec.name}.int8.onnx"
    try:
        report = quantize_file(model.folded, target, calibration, evaluation, labels)
    except QuantizationError as exc:
        return replace(model, int8_refused=str(exc))
    return replace(model, int8=target, int8_report=report)
