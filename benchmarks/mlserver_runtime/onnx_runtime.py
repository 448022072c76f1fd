"""An MLServer runtime serving one ONNX file with normserve's onnxruntime settings.

This module runs inside MLServer's own virtual environment (MLServer 1.7.1 pins dependencies
that clash with the project's), so it imports only mlserver, numpy, onnxruntime and the
standard library: never a normserve package. The session options copy
``service.serving.runtime.OnnxModel`` line for line, so that a benchmark against normserve
compares the two servers and not two onnxruntime configurations.

Model settings it reads:

- ``parameters.uri``: the ONNX file (absolute, or relative to model-settings.json).
- ``parameters.extra.intra_op_threads``: onnxruntime's intra-op pool size; when absent,
  ``NORMSERVE_BENCH_INTRA_OP_THREADS`` from the environment, else ``os.cpu_count()``.

``NORMSERVE_BENCH_LOG_BATCHES=1`` logs the rows of every batch that reaches ``predict``: the
tests' evidence that MLServer's adaptive batcher merged requests (its own metrics count
requests, not batches). Off in benchmarks.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.logging import logger
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri

THREADS_ENV = "NORMSERVE_BENCH_INTRA_OP_THREADS"
LOG_BATCHES_ENV = "NORMSERVE_BENCH_LOG_BATCHES"
BATCH_LOG_PREFIX = "onnx_runtime batch rows="


def intra_op_threads(extra: dict[str, object] | None) -> int:
    """The thread count: the model's extra parameter, then the environment, then all CPUs."""
    value = (extra or {}).get("intra_op_threads") or os.environ.get(THREADS_ENV)
    if value is None:
        return os.cpu_count() or 1
    threads = int(str(value))
    if threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {threads}")
    return threads


def session_options(threads: int) -> ort.SessionOptions:
    """normserve's session options (service/runtime.py, OnnxModel), for an equal comparison."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads spinning would burn the CPUs that the HTTP side needs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OnnxRuntime(MLModel):
    """Decodes V2 tensors with MLServer's NumpyCodec, runs the session, encodes every output.

    With adaptive batching MLServer concatenates the queued requests along axis 0 before
    ``predict`` and splits the flat output data back by each request's batch size, so all this
    class has to do is keep axis 0 as the batch axis and return outputs in row-major order.
    """

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        extra = self.settings.parameters.extra if self.settings.parameters else None
        self.threads = intra_op_threads(extra)
        self.session = ort.InferenceSession(
            path, session_options(self.threads), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.log_batches = os.environ.get(LOG_BATCHES_ENV) == "1"
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Runs inline on the calling event loop (the HTTP process's with parallel_workers=0),
        as MLServer's own runtimes (sklearn, xgboost) do: that is MLServer as its users run it,
        and onnxruntime's own threads do the parallel work."""
        feeds: dict[str, np.ndarray] = {}
        for request_input in payload.inputs:
            if request_input.name not in self.input_names:
                raise InferenceError(
                    f"model '{self.name}' has no input '{request_input.name}'; its inputs are "
                    f"{self.input_names}"
                )
            feeds[request_input.name] = NumpyCodec.decode_input(request_input)
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise InferenceError(f"model '{self.name}': missing input(s) {missing}")
        if self.log_batches:
            rows = next(iter(feeds.values())).shape[0] if feeds else 0
            logger.info("%s%d", BATCH_LOG_PREFIX, rows)
        try:
            results = self.session.run(self.output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"model '{self.name}': onnxruntime failed: {exc}") from exc
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                _encode(name, np.asarray(result))
                for name, result in zip(self.output_names, results, strict=True)
            ],
        )


def _encode(name: str, array: np.ndarray) -> ResponseOutput:
    """NumpyCodec's encoding with the array's true shape: the codec widens a 1-D output to
    ``[N, 1]``, which would change what a client sees compared with normserve."""
    output = NumpyCodec.encode_output(name, array)
    output.shape = list(array.shape)
    return output
