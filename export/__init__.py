"""The ONNX export tool's public API.

``fold_batchnorm`` folds every foldable BatchNorm of a model into the layer before it;
``export_onnx`` folds, exports, checks and reports. Both leave the caller's model unchanged.
"""

from export.fold import FoldError, FoldReport, fold_batchnorm, fold_batchnorm_with_report
from export.to_onnx import (
    BatchDependentError,
    ExportError,
    ExportReport,
    OpsetError,
    ParityError,
    export_onnx,
)

__all__ = [
    "BatchDependentError",
    "ExportError",
    "ExportReport",
    "FoldError",
    "FoldReport",
    "OpsetError",
    "ParityError",
    "export_onnx",
    "fold_batchnorm",
    "fold_batchnorm_with_report",
]
