"""Open Inference Protocol (KServe V2 / Triton) REST routes. They only translate HTTP to
service.protocol calls and back."""

from __future__ import annotations

import time
from typing import Any

import orjson

from service.errors import InvalidInput
from service.front.asgi import Request, Response, json_response
from service.front.context import Context
from service.front.routing import Route
from service.protocol.handlers import load_config
from service.protocol.request_limits import header_int
from service.protocol.v2_binary import HEADER_LENGTH
from service.protocol.v2_request import decode_infer_request
from service.protocol.v2_response import encode_infer_response
from service.serving.store import Served

_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


async def live(ctx: Context, request: Request) -> Response:
    return json_response({"live": ctx.protocol.live()})


async def ready(ctx: Context, request: Request) -> Response:
    is_ready = ctx.protocol.ready()
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


async def server_metadata(ctx: Context, request: Request) -> Response:
    return json_response(ctx.protocol.server_metadata())


async def model_metadata(ctx: Context, request: Request) -> Response:
    p = request.params
    return json_response(ctx.protocol.model_metadata(p["model_name"], p.get("version")))


async def model_ready(ctx: Context, request: Request) -> Response:
    p = request.params
    return json_response(ctx.protocol.model_ready(p["model_name"], p.get("version")))


async def model_config(ctx: Context, request: Request) -> Response:
    p = request.params
    return json_response(ctx.protocol.model_config(p["model_name"], p.get("version")))


async def model_stats(ctx: Context, request: Request) -> Response:
    p = request.params
    return json_response(ctx.protocol.model_stats(p.get("model_name"), p.get("version")))


async def repository_index(ctx: Context, request: Request) -> Response:
    body = await _control_body(request, "read the repository index", "ready")
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput("repository index: 'ready' must be true or false")
    return json_response(ctx.protocol.repository_index(ready))


async def load_model(ctx: Context, request: Request) -> Response:
    name = request.params["model_name"]
    body = await _control_body(request, f"load '{name[:64]}'", "parameters")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput(f"failed to load '{name[:64]}', 'parameters' must be an object")
    await ctx.protocol.load_model(name, load_config(name, parameters))
    return json_response({})


async def unload_model(ctx: Context, request: Request) -> Response:
    name = request.params["model_name"]
    # Triton's unload_dependents parameter has nothing to act on (no ensembles): accepted.
    await _control_body(request, f"unload '{name[:64]}'", "parameters")
    await ctx.protocol.unload_model(name)
    return json_response({})


# Control bodies are a few hundred bytes; a config override a few KB.
_CONTROL_BODY_LIMIT = 64 * 1024


async def _control_body(request: Request, action: str, *allowed: str) -> dict[str, Any]:
    """The optional JSON object body of a repository request (empty body: {})."""
    raw = await request.body(_CONTROL_BODY_LIMIT, request.content_length())
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise InvalidInput(f"failed to {action}, the request body is not a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidInput(
            f"failed to {action}, unknown field(s) {[k[:32] for k in unknown[:3]]} "
            f"(accepted: {', '.join(allowed)})"
        )
    return body


def admit(ctx: Context, params: dict[str, str]) -> Served:
    return ctx.protocol.admit(params["model_name"], params.get("version"))


async def infer(ctx: Context, request: Request) -> Response:
    # Cheapest first: the model and room in its queue, before the body is read or decoded
    # (the front asked already, at headers-complete); the place is held meanwhile.
    params = request.params
    with ctx.protocol.hold(params["model_name"], params.get("version")) as place:
        served = place.served
        settings = ctx.settings
        json_length = header_int(HEADER_LENGTH, request.header(_HEADER_LENGTH))
        declared = request.content_length()
        ctx.decoder.admit(declared)
        body = await request.body(settings.max_request_bytes, declared)
        check = served.model.signature.check_declared
        decoding = time.perf_counter()
        decoded = await ctx.decoder(
            len(body), decode_infer_request, body, json_length, settings.limits, check
        )
        pending = ctx.protocol.submit(
            served, decoded.inputs, decoded.timeout_ms, decoded.outputs, place
        )
        decode_seconds = time.perf_counter() - decoding
    outputs = await request.until_disconnected(pending)
    encoding = time.perf_counter()
    payload, headers = encode_infer_response(
        served.config.name,
        served.version,
        # Always an id (KServe's response model requires one): the client's, else this
        # request's X-Request-ID (the client's header or the one made for the access log).
        decoded.id if decoded.id is not None else request.request_id.decode("latin-1"),
        outputs,
        decoded.outputs,
        decoded.binary_output,
    )
    ctx.metrics.on_codec(
        served.config.name, served.version, decode_seconds, time.perf_counter() - encoding
    )
    return Response(200, payload, [(k.lower().encode(), v.encode()) for k, v in headers.items()])


_MODEL = "/v2/models/{model_name}"
_VERSION = "/v2/models/{model_name}/versions/{version}"
_UNKNOWN = (400, 404, 503)


def routes() -> list[Route]:
    table = [
        Route("GET", "/v2/health/live", live, "Server liveness", "health", answer="Live"),
        Route("GET", "/v2/health/ready", ready, "Server readiness: every model loaded",
              "health", answer="Ready", errors=(503,)),
        Route("GET", "/v2", server_metadata, "Server metadata and extensions", "metadata",
              answer="ServerMetadata"),
        Route("GET", "/v2/models/stats", model_stats, "Statistics of every served model",
              "statistics", answer="Statistics"),
        Route("POST", "/v2/repository/index", repository_index,
              "Every model folder and version, with its state and the reason when unavailable",
              "repository", body="RepositoryIndexRequest", answer="RepositoryIndex",
              errors=(400,)),
        Route("POST", "/v2/repository/models/{model_name}/load", load_model,
              "Load or reload a model from its repository folder, warmed up before it serves "
              "(explicit model control mode)", "repository", body="RepositoryLoadRequest",
              answer="Empty", errors=(400, 503)),
        Route("POST", "/v2/repository/models/{model_name}/unload", unload_model,
              "Unload a model: refused to new requests at once, in-flight ones finish "
              "(explicit model control mode)", "repository", body="RepositoryUnloadRequest",
              answer="Empty", errors=(400, 503)),
    ]  # fmt: skip
    for base, which in ((_MODEL, "the served version"), (_VERSION, "one version")):
        table += [
            Route("GET", base, model_metadata, f"Model metadata ({which})", "metadata",
                  answer="ModelMetadata", errors=_UNKNOWN),
            Route("GET", f"{base}/ready", model_ready, f"Model readiness ({which})", "health",
                  answer="ModelReady", errors=_UNKNOWN),
            Route("GET", f"{base}/config", model_config,
                  f"Triton model configuration ({which})", "metadata", answer="ModelConfig",
                  errors=_UNKNOWN),
            Route("GET", f"{base}/stats", model_stats, f"Model statistics ({which})",
                  "statistics", answer="Statistics", errors=_UNKNOWN),
            Route("POST", f"{base}/infer", infer, f"Inference ({which})", "inference",
                  inference="v2", body="InferenceRequest", answer="InferenceResponse",
                  errors=(400, 404, 408, 413, 503, 504), admit=admit),
        ]  # fmt: skip
    return table
