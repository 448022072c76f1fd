"""What ``export_onnx`` exported and the evidence that it is right, as data and as one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]
    # Each axis's largest size where a variable axis has a cap (export.axes), else None.
    max_shape: list[int] | None = None


@dataclass
class ExportReport:
    """What was exported and the evidence that it is right."""

    path: Path
    opset: int
    bn_folded: int
    bn_kept: int
    kept_reasons: dict[str, str]
    batchnorm_nodes: int
    layernorm_nodes: int
    dropout_nodes: int
    # nodes/params "before": the unfolded eval model exported without the exporter's optimizer
    # (each BN its own node), only when ``unfolded_path`` asked for that file (None otherwise:
    # it costs a second export); "after": the file written. params count initializer elements.
    nodes_before: int | None
    nodes_after: int
    params_before: int | None
    params_after: int
    # The check closest to its bound (export.parity): the file's max|Δ| from the reference
    # (float64, or PyTorch float32 in the fallback), PyTorch float32's own max|Δ| from float64
    # (None in the fallback) and the bound the file was held to.
    parity_max_abs_error: float
    parity_bound: float
    parity_batches: list[int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    parity_torch_error: float | None = None
    # Why there was no float64 reference (the fallback bound was used), or None.
    parity_fallback: str | None = None
    # Wall-clock seconds per phase: fold, export, parity, write (and unfolded when asked).
    seconds: dict[str, float] = field(default_factory=dict)
    # The lengths parity ran at when an axis besides the batch axis is dynamic (export.axes),
    # the example's among them; empty when only the batch axis is.
    parity_lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        nodes = (
            f"{self.nodes_after}"
            if self.nodes_before is None
            else f"{self.nodes_before}→{self.nodes_after}"
        )
        return (
            f"{self.parity_summary()}, "
            f"BN folded {self.bn_folded}/{self.bn_folded + self.bn_kept}, "
            f"BatchNormalization {self.batchnorm_nodes}, "
            f"LayerNormalization {self.layernorm_nodes}, "
            f"nodes {nodes}, opset {self.opset}"
        )

    def parity_summary(self) -> str:
        batches = ",".join(map(str, self.parity_batches))
        if self.parity_lengths:
            batches += f"; lengths {','.join(map(str, self.parity_lengths))}"
        if self.parity_fallback is not None or self.parity_torch_error is None:
            return (
                f"parity max|Δ| vs torch fp32 {self.parity_max_abs_error:.1e} (bound "
                f"{self.parity_bound:.1e}, batches {batches}; no float64 reference: "
                f"{self.parity_fallback})"
            )
        return (
            f"parity max|Δ| vs float64: file {self.parity_max_abs_error:.1e}, torch fp32 "
            f"{self.parity_torch_error:.1e} (bound {self.parity_bound:.1e}, batches {batches})"
        )

    def timing(self) -> str:
        """One line: the total and each phase's seconds."""
        phases = ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items() if k != "total")
        return f"export took {self.seconds.get('total', 0.0):.1f} s ({phases})"
