"""Operations routes: Prometheus metrics and the API's own description."""

from __future__ import annotations

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from service.front.asgi import Request, Response
from service.front.context import Context
from service.front.openapi import DOCS_HTML
from service.front.routing import Route


async def metrics(ctx: Context, request: Request) -> Response:
    # Queue depth is read when scraped: exact at that instant, no bookkeeping per request.
    for name, served in ctx.protocol.store.served.items():
        ctx.metrics.queue_depth.labels(name).set(served.batcher.depth)
    return Response(
        200, ctx.metrics.exposition(), [(b"content-type", CONTENT_TYPE_LATEST.encode())]
    )


async def openapi(ctx: Context, request: Request) -> Response:
    return Response(200, orjson.dumps(ctx.openapi), [(b"content-type", b"application/json")])


async def docs(ctx: Context, request: Request) -> Response:
    return Response(200, DOCS_HTML.encode(), [(b"content-type", b"text/html; charset=utf-8")])


def routes() -> list[Route]:
    return [
        Route("GET", "/metrics", metrics, "Prometheus metrics (text exposition format)",
              "operations", media_type="text/plain"),
        Route("GET", "/openapi.json", openapi, "This document", "operations"),
        Route("GET", "/docs", docs, "Interactive API documentation (Swagger UI)", "operations",
              media_type="text/html"),
    ]  # fmt: skip
