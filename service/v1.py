"""V1 (KServe V1 / TensorFlow-Serving) JSON routes for people with curl. Translation only."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import codec
from service.codec_v1 import decode_v1, encode_v1
from service.store import ModelStore
from service.v2 import Receive, Store, json_response, read_body, until_disconnected

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
    # Documented here for OpenAPI; the server answers in service.fastpath with the same code.
    payload = await predict_payload(
        store, model_name, request.receive, request.headers.get("content-length")
    )
    return Response(payload, media_type="application/json")


async def predict_payload(
    store: ModelStore, model_name: str, receive: Receive, content_length: str | None
) -> bytes:
    """One V1 prediction from ASGI ``receive``: the JSON response body. Errors raise
    NormserveError."""
    served = store.get(model_name)
    body = await read_body(receive, content_length, store.settings.max_request_bytes)
    payload = codec.decode_json_body(body)
    codec.check_depth(payload, store.settings.max_json_depth, body)
    outputs = await until_disconnected(
        receive, store.submit(served, decode_v1(payload, served.config), None)
    )
    return orjson.dumps(encode_v1(outputs, served.config))
