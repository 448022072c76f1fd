"""V1 (KServe V1 / TensorFlow-Serving) JSON routes for people with curl. Translation only."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.inference import predict_payload
from service.v2 import Store, json_response

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
