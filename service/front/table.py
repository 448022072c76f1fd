"""The route table: every HTTP route of the server, in one list.

The dispatcher (service.front.dispatch) serves these and nothing else; the OpenAPI
document (service.front.openapi) lists these and nothing else. Adding a route is one entry
in one of the lists below.
"""

from __future__ import annotations

from service.front import page, routes_ops, routes_v1, routes_v2
from service.front.routing import Route


def route_table() -> list[Route]:
    return [*routes_v2.routes(), *routes_v1.routes(), *routes_ops.routes(), *page.routes()]
