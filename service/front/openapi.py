"""The OpenAPI document, generated from the route table: a route is documented exactly when
it is served (tests/service/test_routes.py holds both directions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.front.routing import Route
from service.front.schemas import SCHEMAS
from service.protocol.handlers import SERVER_VERSION

TITLE = "normserve"
DESCRIPTION = "Open Inference Protocol (KServe V2 / Triton) and V1 JSON over onnxruntime."
_ERRORS = {
    400: "The request is malformed or does not fit the model",
    404: "No such model, version or file",
    408: "The client took too long to send its request",
    413: "The body exceeds the server's limit",
    503: "Not ready, or the model's queue is full (Retry-After)",
    504: "The request's deadline passed before it could run",
}


def document(routes: Sequence[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": SERVER_VERSION, "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


def _operation(route: Route) -> dict[str, Any]:
    name = route.handler.__name__
    operation: dict[str, Any] = {
        "operationId": f"{name}_{route.method.lower()}_{_slug(route.path)}",
        "summary": route.summary,
        "tags": [route.tag],
        "parameters": [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in route.params
        ],
        "responses": {"200": _content(route.media_type, route.answer, "Success")},
    }
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}},
                # Triton's binary tensor extension: a JSON header of
                # Inference-Header-Content-Length bytes, then raw tensors.
                **(
                    {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
                    if route.inference == "v2"
                    else {}
                ),
            },
        }
    for status in route.errors:
        operation["responses"][str(status)] = _content("application/json", "Error", _ERRORS[status])
    return operation


def _content(media_type: str, schema: str | None, description: str) -> dict[str, Any]:
    body = {"$ref": f"#/components/schemas/{schema}"} if schema else {"type": "string"}
    return {"description": description, "content": {media_type: {"schema": body}}}


def _slug(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path).strip("_") or "root"


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>normserve API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""
