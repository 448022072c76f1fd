"""One served model version: an onnxruntime session, its signature and input validation.

Validation happens before onnxruntime sees the data, against the repository's signature, so
every client error is a message that names the input and what was expected, never an
onnxruntime exception string.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from service.datatypes import DATATYPE_TO_NUMPY
from service.errors import RepositoryError
from service.repository import ModelConfig, ModelVersion, TensorSpec
from service.serving.signature import Signature

log = logging.getLogger("normserve.runtime")

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int
    graph_optimization_level: str = "all"
    engine: str = "onnxruntime"


def ort_session_options(threads: int, level: str = "all") -> ort.SessionOptions:
    """The onnxruntime settings of every served session (the benchmark measures these too)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # Batches are already parallel inside each operator; one inter-op thread avoids
    # oversubscribing the CPU budget.
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _LEVELS[level]
    # Idle pool threads spinning would burn the CPUs other workers and requests need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Fatal only: a failing run raises, and the server logs that exception with its
    # traceback in its own log format; onnxruntime's own error line (coloured text on
    # stderr) would be a second, unparseable copy of it in a JSON log.
    so.log_severity_level = 4
    return so


class _Engine(Protocol):
    """What runs one ONNX file: names in file order, and a thread-safe ``run``."""

    platform: str
    input_names: list[str]
    output_names: list[str]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OnnxRuntimeEngine:
    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, threads: int, level: str) -> None:
        options = ort_session_options(threads, level)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray] = self.session.run(outputs, feeds)
        return results


class OpenVinoEngine:
    """OpenVINO's CPU plugin on the same ONNX file (the optional ``openvino`` extra).

    An infer request is not thread-safe, so each ``run`` borrows one from a pool (one per
    concurrent caller; the batcher runs one batch at a time, so usually exactly one).
    """

    platform = "openvino_onnx"

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import openvino
        except ImportError as exc:
            raise EngineMissing(
                "its config asks for the OpenVINO engine, which is not installed "
                "(pip install 'normserve[openvino]')"
            ) from exc
        self.compiled = openvino.Core().compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                # f32 exactly: on CPUs with bf16 units OpenVINO would otherwise compute in
                # bf16, and the numbers would no longer be the ones checked at export.
                "INFERENCE_PRECISION_HINT": "f32",
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
            },
        )
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # Outputs are copied (share_outputs=False): the request reuses its buffers.
            result = request.infer(feeds, share_inputs=True, share_outputs=False)
            return [np.asarray(result[name]) for name in outputs]
        finally:
            self._idle.put(request)


class EngineMissing(RuntimeError):
    """The engine a model's config names is not installed."""


def _engine(path: Path, threads: int, level: str, engine: str) -> _Engine:
    if engine == "openvino":
        return OpenVinoEngine(path, threads)
    return OnnxRuntimeEngine(path, threads, level)


class OnnxModel:
    """A loaded model version. ``run`` is thread-safe (both engines' runs are)."""

    def __init__(
        self, config: ModelConfig, version: ModelVersion, path: Path, options: SessionOptions
    ) -> None:
        self.config = config
        self.version = version
        self.name = config.name
        self.inputs = config.inputs
        self.outputs = config.outputs
        threads = config.runtime.intra_op_threads or options.intra_op_threads
        level = config.runtime.graph_optimization_level or options.graph_optimization_level
        engine = config.runtime.engine or options.engine
        try:
            self.engine = _engine(path, threads, level, engine)
        except EngineMissing as exc:
            raise RepositoryError(f"model '{self.name}': {exc}") from exc
        except Exception as exc:  # each engine raises its own exception types
            raise RepositoryError(
                f"model '{self.name}' version {version.version}: {engine} cannot load "
                f"{path.name}: {_load_failure(str(exc))}"
            ) from exc
        self._check_signature()
        self.signature = Signature(self.name, self.inputs, self.max_batch_size)
        self.threads = threads

    @property
    def platform(self) -> str:
        return self.engine.platform

    def _check_signature(self) -> None:
        """The file must have the inputs and outputs config.json promises."""
        for kind, specs, actual in (
            ("input", self.inputs, self.engine.input_names),
            ("output", self.outputs, self.engine.output_names),
        ):
            found = set(actual)
            missing = [s.name for s in specs if s.name not in found]
            if missing:
                raise RepositoryError(
                    f"model '{self.name}': config.json names {kind}(s) {missing} that the ONNX "
                    f"file does not have (it has {sorted(found)})"
                )

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    def validate(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs in signature order, checked (see Signature.validate)."""
        return self.signature.validate(tensors)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All outputs for already validated inputs."""
        names = [s.name for s in self.outputs]
        results = self.engine.run(names, dict(inputs))
        return dict(zip(names, results, strict=True))

    def warmup(self) -> float:
        """One inference on example rows so the first request pays no lazy initialisation;
        seconds.

        Numbers are zeros. String inputs are "0" first (text that string models which parse
        numbers, like Triton's simple_string, accept), then "": what a string model accepts
        cannot be known from its signature, so when neither runs, a model with string inputs
        is served without warm-up (logged) rather than refused; any other model's failure
        is raised.
        """
        started = time.perf_counter()
        has_text = any(s.datatype == "BYTES" for s in self.inputs)
        for text in ("0", "") if has_text else ("",):
            try:
                self.run({s.name: _example(s, text) for s in self.inputs})
                return time.perf_counter() - started
            except Exception as exc:
                failure = exc
        if not has_text:
            raise failure
        log.warning(
            'model \'%s\': no warm-up (its string inputs refused "0" and "": %s)',
            self.name,
            _first_line(str(failure)),
        )
        return time.perf_counter() - started


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:200] if message.strip() else "no message"


def _load_failure(message: str) -> str:
    """What went wrong loading a model, in words safe to show (no paths from the message)."""
    lowered = message.lower()
    if "external data" in lowered:
        if "escapes model directory" in lowered or "absolute path" in lowered:
            return "its external data points outside the model directory (refused)"
        if "does not exist" in lowered:
            return "its external data file is missing"
        return "its external data is invalid"
    if "protobuf parsing failed" in lowered or "invalid_protobuf" in lowered:
        return "the file is not a valid ONNX model (truncated or corrupt?)"
    return "the model is invalid or uses an unsupported operator (see the server log)"


def _example(spec: TensorSpec, text: str) -> np.ndarray:
    """One row of zeros (``text`` for BYTES) in the shape ``spec`` accepts."""
    shape = [1, *[max(d, 1) for d in spec.shape[1:]]]
    if spec.datatype == "BYTES":
        return np.full(shape, text, dtype=np.object_)
    return np.zeros(shape, DATATYPE_TO_NUMPY[spec.datatype])
