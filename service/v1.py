"""V1 (KServe V1 / TensorFlow-Serving) JSON routes for people with curl. Translation only."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import codec
from service.codec_v1 import decode_v1, encode_v1
from service.store import ModelStore
from service.v2 import Store, json_response, read_body, until_disconnected

router = APIRouter()


@router.get("/v1/models/{model_name}")
async def model_status(store: Store, model_name: str) -> Response:
    served = store.get(model_name)
    config = served.config
    return json_response(
        {
            "name": config.name,
            "ready": True,
            "version": served.version,
            "description": config.description,
            "inputs": [s.model_dump() for s in config.inputs],
            "outputs": [s.model_dump() for s in config.outputs],
            "labels": config.labels,
        }
    )


@router.post("/v1/models/{model_name}:predict")
async def predict(request: Request, store: Store, model_name: str) -> Response:
    # Documented here for OpenAPI; requests are answered by service.fastpath.
    return await predict_response(request, store, model_name)


async def predict_response(request: Request, store: ModelStore, model_name: str) -> Response:
    """One V1 prediction; errors raise NormserveError."""
    served = store.get(model_name)
    body = await read_body(request)
    payload = codec.decode_json_body(body)
    codec.check_depth(payload, store.settings.max_json_depth, body)
    outputs = await until_disconnected(
        request, store.infer(served, decode_v1(payload, served.config), None)
    )
    return json_response(encode_v1(outputs, served.config))
