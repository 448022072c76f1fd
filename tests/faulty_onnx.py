"""A tiny real ONNX model whose inference fails at run time for some inputs (onnx.helper only).

``x`` (FP32, one value per row) is cast to INT64 and used as the index of a Gather into a
constant ``[ROWS, COLUMNS]`` table. Indices in ``[-ROWS, ROWS)`` give that table row; any other
value makes onnxruntime raise while running (``indices element out of data bounds``): the
model loads and warms up fine, and only requests carrying such a value fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from tiny_onnx import install_source, save_checked

from service.repository import TensorSpec

ROWS = 10
COLUMNS = 3
TABLE = (np.arange(ROWS * COLUMNS, dtype=np.float32).reshape(ROWS, COLUMNS) + 1) / 4
BAD_INDEX = 1000.0  # finite, so it passes input validation, and far outside [-ROWS, ROWS)


def expected(x: np.ndarray) -> np.ndarray:
    """What the model computes for good inputs: the table rows the indices name."""
    return TABLE[x.astype(np.int64)]


def write_faulty_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["y"], axis=0),
        ],
        "faulty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", COLUMNS])],
        [numpy_helper.from_array(TABLE, "table")],
    )
    return save_checked(graph, path)


def faulty_repository(root: Path, name: str = "faulty", **config: object) -> Path:
    """A repository with the faulty model."""
    source = write_faulty_onnx(root / f"{name}-source.onnx")
    return install_source(
        root,
        source,
        {
            "name": name,
            "inputs": [TensorSpec(name="x", datatype="FP32", shape=[-1]).model_dump()],
            "outputs": [TensorSpec(name="y", datatype="FP32", shape=[-1, COLUMNS]).model_dump()],
            "max_batch_size": 64,
            **config,
        },
    )
