"""Open Inference Protocol tensor datatypes and their numpy dtypes: defined once.

The repository's signatures (service.repository), the protocol codecs (service.protocol)
and the runtime's validation and warm-up (service.serving) all read this table, so a
datatype the protocol accepts is one the runtime can hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    # Strings and raw bytes: a numpy object array of bytes objects.
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_DATATYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}
# The largest element, for bounding what a declared shape can allocate.
MAX_ITEMSIZE = max(dtype.itemsize for dtype in DATATYPE_TO_NUMPY.values())


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of ``array``, or numpy's name for a dtype the protocol lacks."""
    datatype = NUMPY_TO_DATATYPE.get(array.dtype.newbyteorder("="))
    return datatype if datatype is not None else str(array.dtype)
