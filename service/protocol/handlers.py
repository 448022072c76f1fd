"""The protocol's operations, answered from the models layer, for every transport.

Each method takes what the protocol names (model, version, decoded tensors) and returns
plain data (dicts in the V2 JSON shapes, tensors), or raises a ``service.errors`` domain
error. The HTTP routes (service.front) translate HTTP to these calls and back; a second
transport (gRPC) calls the same methods and maps the same errors to its own codes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.errors import InvalidInput
from service.operations.metrics import Metrics, ModelStats
from service.protocol.v2_response import check_requested
from service.protocol.v2_types import RequestedOutput
from service.repository import ModelConfig, TensorSpec
from service.serving.control import ModelControl
from service.serving.store import ModelStore, Place, Served

SERVER_NAME = "normserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]

Tensors = dict[str, np.ndarray]


class Protocol:
    """The Open Inference Protocol (plus Triton's configuration, statistics and repository
    extensions) over one ModelStore."""

    def __init__(self, store: ModelStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.draining = False
        store.on_batch = metrics.on_batch
        self.control = ModelControl(store, metrics.set_model_ready)

    # ----------------------------------------------------------------- health and server

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.store.ready and not self.draining

    def drain(self) -> None:
        """Not ready from now on (shutdown has begun), while requests are still answered."""
        self.draining = True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    # ----------------------------------------------------------------- models

    def model_ready(self, name: str, version: str | None) -> dict[str, Any]:
        served = self.store.get(name, version)
        return {"name": served.config.name, "ready": True}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        served = self.store.get(name, version)
        config = served.config
        return {
            "name": config.name,
            # Every served version of the model, lowest first.
            "versions": sorted(self.store.versions.get(config.name, {}), key=int),
            "platform": served.model.platform,
            "inputs": [s.metadata() for s in config.inputs],
            "outputs": [s.metadata() for s in config.outputs],
            "parameters": {
                "description": config.description,
                "max_batch_size": served.batcher.max_batch_size,
                # Clients must send such a model whole batches: the service never merges them.
                "batch_dependent": config.batch_dependent,
                **({"labels": config.labels} if config.labels is not None else {}),
                **({"derived_from": config.derived_from} if config.derived_from else {}),
                **({"max_shape": caps} if (caps := _max_shapes(config)) else {}),
            },
        }

    def v1_models(self) -> dict[str, Any]:
        """KServe V1's ``GET /v1/models``: the names of the models ready to serve."""
        return {"models": sorted(self.store.served)}

    def v1_model_status(self, name: str) -> dict[str, Any]:
        """V1's ``GET /v1/models/{m}``: readiness, signature and labels of the served version."""
        served = self.store.get(name)
        config = served.config
        return {
            "name": config.name,
            "ready": True,
            "version": served.version,
            "description": config.description,
            "inputs": [s.metadata() for s in config.inputs],
            "outputs": [s.metadata() for s in config.outputs],
            "labels": config.labels,
        }

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration (``GET /v2/models/{m}/config``)."""
        served = self.store.get(name, version)
        config = served.config
        batcher = served.batcher
        dynamic_batching = {
            "max_queue_delay_microseconds": int(batcher.max_queue_delay_s * 1e6),
            "default_queue_policy": {"max_queue_size": batcher.max_queue_size},
        }
        return {
            "name": config.name,
            "platform": served.model.platform,
            "backend": served.model.platform.removesuffix("_onnx"),
            "max_batch_size": batcher.max_batch_size,
            "input": [_triton_tensor(s) for s in config.inputs],
            "output": [_triton_tensor(s) for s in config.outputs],
            # Triton's way to say "requests are never merged": no dynamic_batching section.
            **({} if config.batch_dependent else {"dynamic_batching": dynamic_batching}),
            "version_policy": config.policy.triton(),
            "instance_group": [{"kind": "KIND_CPU", "count": 1}],
            "parameters": {
                "intra_op_thread_count": {"string_value": str(served.model.threads)},
                "batch_dependent": {"string_value": str(config.batch_dependent).lower()},
                # Triton's configuration has no cap for a -1 dim: a parameter per capped input.
                **{
                    f"max_shape.{name}": {"string_value": json.dumps(cap)}
                    for name, cap in _max_shapes(config).items()
                },
            },
        }

    def model_stats(self, name: str | None, version: str | None) -> dict[str, Any]:
        """Triton's statistics extension, for one model or (``name`` None) every served one."""
        if name:
            served = [self.store.get(name, version)]
        else:  # every version served, as Triton lists them
            served = [s for versions in self.store.versions.values() for s in versions.values()]
        stats = self.metrics.model_stats()
        return {
            "model_stats": [
                _stats(s, stats.get((s.config.name, s.version), ModelStats())) for s in served
            ]
        }

    # ----------------------------------------------------------------- model repository

    def repository_index(self, ready: bool = False) -> list[dict[str, Any]]:
        """Every model folder and version, with state and reason (``ready``: READY only)."""
        return self.control.index(ready)

    async def load_model(self, name: str, config: str | None = None) -> None:
        """Load or reload ``name`` from the repository (explicit mode); ``config`` is
        Triton's JSON override of the supported fields. Returns once it is ready."""
        await self.control.load(name, config)

    async def unload_model(self, name: str) -> None:
        """Unload ``name`` (explicit mode): refused to new requests at once, drained after."""
        await self.control.unload(name)

    # ----------------------------------------------------------------- inference

    def admit(self, name: str, version: str | None) -> Served:
        """The model for one more inference, or the refusal, before any body is read."""
        return self.store.admit(name, version)

    def hold(self, name: str, version: str | None) -> Place:
        """``admit``, holding the request's place in the model's queue while its body is read
        and decoded (``with protocol.hold(...) as place:``; ``submit(..., place=place)``), so
        that an admitted request is never refused for room after that work."""
        return self.store.hold(name, version)

    def submit(
        self,
        served: Served,
        inputs: Tensors,
        timeout_ms: float | None,
        requested: list[RequestedOutput] | None = None,
        place: Place | None = None,
    ) -> asyncio.Future[Tensors]:
        """Validates ``inputs`` and the requested outputs against the model, then queues the
        request; the future resolves with all of the model's outputs."""
        if requested is not None:
            check_requested(requested, [s.name for s in served.config.outputs])
        return self.store.submit(served, inputs, timeout_ms, place)


def _max_shapes(config: ModelConfig) -> dict[str, list[int]]:
    """Each input's cap on its variable axes (``max_shape`` in config.json), where it has one."""
    return {s.name: s.max_shape for s in config.inputs if s.max_shape is not None}


def _triton_tensor(spec: TensorSpec) -> dict[str, Any]:
    # Triton's dims leave out the batch axis when max_batch_size > 0; its configuration
    # calls BYTES TYPE_STRING (clients and perf_analyzer map it back).
    data_type = "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}"
    return {"name": spec.name, "data_type": data_type, "dims": spec.shape[1:]}


def _stats(served: Served, s: ModelStats) -> dict[str, Any]:
    def pair(count: int, ns: int) -> dict[str, int]:
        return {"count": count, "ns": ns}

    zero = pair(0, 0)
    return {
        "name": served.config.name,
        "version": served.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": pair(s.success_count, s.success_ns),
            "fail": pair(s.fail_count, s.fail_ns),
            "queue": pair(s.queue_count, s.queue_ns),
            # Per request, as Triton counts (see ModelStats): equal counts, which
            # perf_analyzer checks.
            "compute_input": pair(s.compute_count, s.compute_input_ns),
            "compute_infer": pair(s.compute_count, s.compute_infer_ns),
            "compute_output": pair(s.compute_count, s.compute_output_ns),
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": pair(count, merge_ns),
                "compute_infer": pair(count, infer_ns),
                "compute_output": pair(count, split_ns),
            }
            for size, (count, infer_ns, merge_ns, split_ns) in sorted(s.batch_sizes.items())
        ],
    }


def load_config(name: str, parameters: Mapping[str, object]) -> str | None:
    """The ``config`` override among a load request's parameters (either transport's),
    refusing any other: Triton's ``file:<path>`` parameters upload model files, and models
    come only from the repository folder here."""
    unknown = sorted(set(parameters) - {"config"})
    if unknown:
        raise InvalidInput(
            f"failed to load '{name[:64]}', unsupported parameter(s) "
            f"{[k[:32] for k in unknown[:3]]}: only 'config' is accepted (model files come "
            "only from the repository)"
        )
    config = parameters.get("config")
    if config is not None and not isinstance(config, str):
        raise InvalidInput(f"failed to load '{name[:64]}', 'config' must be a JSON string")
    return config
