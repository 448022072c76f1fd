"""Open Inference Protocol (KServe V2 / Triton HTTP) routes. They only translate."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.inference import HEADER_LENGTH, infer_payload
from service.metrics import Metrics, ModelStats
from service.store import ModelStore, Served

SERVER_NAME = "normserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]

router = APIRouter()


async def get_store(request: Request) -> ModelStore:
    # async on purpose: FastAPI runs a plain `def` dependency in a worker thread, and that
    # hand-off (per request, per dependency) cost more than the inference on this machine.
    store: ModelStore = request.app.state.store
    return store


Store = Annotated[ModelStore, Depends(get_store)]


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


# ------------------------------------------------------------------------ server


@router.get("/v2/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready")
async def ready(store: Store) -> Response:
    return json_response({"ready": store.ready}, 200 if store.ready else 503)


@router.get("/v2")
async def server_metadata() -> Response:
    return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


# ------------------------------------------------------------------------ models


def _metadata(served: Served) -> dict[str, Any]:
    config = served.config
    return {
        "name": config.name,
        "versions": [served.version],
        "platform": served.model.platform,
        "inputs": [s.model_dump() for s in config.inputs],
        "outputs": [s.model_dump() for s in config.outputs],
        "parameters": {
            "description": config.description,
            "max_batch_size": served.batcher.max_batch_size,
            # Clients must send such a model whole batches: the service never merges them.
            "batch_dependent": config.batch_dependent,
            **({"labels": config.labels} if config.labels is not None else {}),
            **({"derived_from": config.derived_from} if config.derived_from else {}),
        },
    }


# Declared before /v2/models/{model_name}, which would otherwise match 'stats' as a name.
@router.get("/v2/models/stats")
@router.get("/v2/models/{model_name}/stats")
@router.get("/v2/models/{model_name}/versions/{version}/stats")
async def model_stats(
    request: Request, store: Store, model_name: str | None = None, version: str | None = None
) -> Response:
    metrics: Metrics = request.app.state.metrics
    names = [store.get(model_name, version).config.name] if model_name else list(store.served)
    stats = metrics.model_stats()
    return json_response(
        {"model_stats": [_stats(store.served[n], stats.get(n, ModelStats())) for n in names]}
    )


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
            "queue": pair(s.success_count + s.fail_count, s.queue_ns),
            "compute_input": zero,
            "compute_infer": pair(s.execution_count, s.compute_ns),
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": zero,
                "compute_infer": pair(count, ns),
                "compute_output": zero,
            }
            for size, (count, ns) in sorted(s.batch_sizes.items())
        ],
    }


@router.get("/v2/models/{model_name}")
@router.get("/v2/models/{model_name}/versions/{version}")
async def model_metadata(store: Store, model_name: str, version: str | None = None) -> Response:
    return json_response(_metadata(store.get(model_name, version)))


@router.get("/v2/models/{model_name}/ready")
@router.get("/v2/models/{model_name}/versions/{version}/ready")
async def model_ready(store: Store, model_name: str, version: str | None = None) -> Response:
    served = store.get(model_name, version)
    return json_response({"name": served.config.name, "ready": True})


@router.get("/v2/models/{model_name}/config")
@router.get("/v2/models/{model_name}/versions/{version}/config")
async def model_config(store: Store, model_name: str, version: str | None = None) -> Response:
    served = store.get(model_name, version)
    config = served.config

    def triton_tensor(spec: Any) -> dict[str, Any]:
        # Triton's dims leave out the batch axis when max_batch_size > 0.
        return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": spec.shape[1:]}

    return json_response(
        {
            "name": config.name,
            "platform": served.model.platform,
            "backend": served.model.platform.removesuffix("_onnx"),
            "max_batch_size": served.batcher.max_batch_size,
            "input": [triton_tensor(s) for s in config.inputs],
            "output": [triton_tensor(s) for s in config.outputs],
            # Triton's way to say "requests are never merged": no dynamic_batching section.
            **({} if config.batch_dependent else {"dynamic_batching": _dynamic_batching(served)}),
            "version_policy": {"latest": {"num_versions": 1}},
            "instance_group": [{"kind": "KIND_CPU", "count": 1}],
            "parameters": {
                "intra_op_thread_count": {"string_value": str(served.model.threads)},
                "batch_dependent": {"string_value": str(config.batch_dependent).lower()},
            },
        }
    )


def _dynamic_batching(served: Served) -> dict[str, Any]:
    return {
        "max_queue_delay_microseconds": int(served.batcher.max_queue_delay_s * 1e6),
        "default_queue_policy": {"max_queue_size": served.batcher.max_queue_size},
    }


@router.post("/v2/repository/index")
async def repository_index(store: Store) -> Response:
    index = [
        {"name": name, "version": served.version, "state": "READY", "reason": ""}
        for name, served in store.served.items()
    ] + [
        {"name": name, "state": "UNAVAILABLE", "reason": reason}
        for name, reason in store.failed.items()
    ]
    return json_response(sorted(index, key=lambda e: e["name"]))


# ------------------------------------------------------------------------ inference


@router.post("/v2/models/{model_name}/infer")
@router.post("/v2/models/{model_name}/versions/{version}/infer")
async def infer(
    request: Request, store: Store, model_name: str, version: str | None = None
) -> Response:
    # Documented here for OpenAPI. The server answers these requests in service.fastpath,
    # in front of the router, with the same infer_payload.
    payload, headers = await infer_payload(
        store,
        model_name,
        version,
        request.receive,
        request.headers.get("content-length"),
        request.headers.get(HEADER_LENGTH),
    )
    return Response(payload, headers=headers)
