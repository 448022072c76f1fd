"""V1 (KServe V1 / TensorFlow-Serving) JSON routes, for people with curl. Translation only."""

from __future__ import annotations

import time

import orjson

from service.front.asgi import JSON, Request, Response, json_response
from service.front.context import Context
from service.front.routing import Route
from service.protocol.v1 import decode_v1_body, encode_v1
from service.serving.store import Served


async def models(ctx: Context, request: Request) -> Response:
    return json_response(ctx.protocol.v1_models())


async def model_status(ctx: Context, request: Request) -> Response:
    return json_response(ctx.protocol.v1_model_status(request.params["model_name"]))


def admit(ctx: Context, params: dict[str, str]) -> Served:
    return ctx.protocol.admit(params["model_name"], None)


async def predict(ctx: Context, request: Request) -> Response:
    with ctx.protocol.hold(request.params["model_name"], None) as place:
        served = place.served
        settings = ctx.settings
        declared = request.content_length()
        ctx.decoder.admit(declared)
        body = await request.body(settings.max_request_bytes, declared)
        decoding = time.perf_counter()
        inputs = await ctx.decoder(
            len(body), decode_v1_body, body, settings.max_json_depth, served.config
        )
        pending = ctx.protocol.submit(served, inputs, None, place=place)
        decode_seconds = time.perf_counter() - decoding
    outputs = await request.until_disconnected(pending)
    encoding = time.perf_counter()
    payload = orjson.dumps(encode_v1(outputs, served.config))
    ctx.metrics.on_codec(
        served.config.name, served.version, decode_seconds, time.perf_counter() - encoding
    )
    return Response(200, payload, [(b"content-type", JSON)])


def routes() -> list[Route]:
    return [
        Route("GET", "/v1/models", models, "The models ready to serve (KServe V1 list)", "v1",
              answer="V1Models"),
        Route("GET", "/v1/models/{model_name}", model_status,
              "Model status, signature and labels", "v1", answer="V1ModelStatus",
              errors=(400, 404, 503)),
        Route("POST", "/v1/models/{model_name}:predict", predict,
              "Prediction from instances or columnar inputs", "v1", inference="v1",
              body="V1PredictRequest", answer="V1PredictResponse",
              errors=(400, 404, 408, 413, 503, 504), admit=admit),
    ]  # fmt: skip
