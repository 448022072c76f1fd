"""The route table's entry, and matching a request's method and path against the table.

A route is defined once: method, path template, handler, metrics label and its OpenAPI
description. The dispatcher serves exactly these routes and the OpenAPI document lists
exactly these, so neither can have a route the other lacks.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.errors import NormserveError

if TYPE_CHECKING:
    from service.front.asgi import Request, Response
    from service.front.context import Context

Handler = Callable[["Context", "Request"], Awaitable["Response"]]
# The cheap checks of a request from its path parameters alone (model known, ready, room in
# its queue), raising the domain error that refuses it.
Admit = Callable[["Context", dict[str, str]], object]

_PARAM = re.compile(r"\{([a-z_]+)\}")
# Matched paths remembered, so the hot routes cost a dict lookup; bounded, because paths
# come from clients.
_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Route:
    method: str  # GET routes also answer HEAD
    path: str  # template: {name} matches one path segment (no "/")
    handler: Handler
    summary: str
    tag: str
    # The metrics' protocol label ("v2", "v1") of an inference route; None: not counted.
    inference: str | None = None
    # OpenAPI: the request body's schema name, the 200 answer's schema name and media type,
    # and the error statuses the route can answer with.
    body: str | None = None
    answer: str | None = None
    media_type: str = "application/json"
    errors: tuple[int, ...] = ()
    # Checked when the request's headers are complete, before its body is read or any task
    # is started for it: what it refuses costs next to nothing (service.front.limits).
    admit: Admit | None = None

    @property
    def params(self) -> list[str]:
        return _PARAM.findall(self.path)


class MethodNotAllowed(NormserveError):
    """The path exists but not for this method (HTTP 405, with the Allow header)."""

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(f"method not allowed; this path accepts {', '.join(allowed)}")
        self.allowed = allowed


class NoRoute(NormserveError):
    """No route has this path (HTTP 404)."""


@dataclass(frozen=True)
class _Compiled:
    pattern: re.Pattern[str]
    methods: dict[str, Route]


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        by_path: dict[str, dict[str, Route]] = {}
        for route in self.routes:
            methods = by_path.setdefault(route.path, {})
            if route.method in methods:
                raise ValueError(f"{route.method} {route.path} is defined twice")
            methods[route.method] = route
        # Literal paths before templates, so that /v2/models/stats is never a model's name.
        order = sorted(by_path, key=lambda path: "{" in path)
        self._compiled = [_Compiled(_compile(path), by_path[path]) for path in order]
        self._cache: dict[str, list[tuple[dict[str, Route], dict[str, str]]]] = {}

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route and its path parameters; NoRoute or MethodNotAllowed otherwise."""
        try:
            found = self._cache[path]
        except KeyError:
            found = self._find(path)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[path] = found
        if not found:
            raise NoRoute(f"no route {path[:128]!r}")
        # Several templates can match one path (/v1/models/{m} and /v1/models/{m}:predict
        # both match "/v1/models/x:predict"): the first that has this method serves it.
        for methods, params in found:
            route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
            if route is not None:
                return route, params
        allowed = {m for methods, _ in found for m in methods}
        raise MethodNotAllowed(sorted(allowed | ({"HEAD"} if "GET" in allowed else set())))

    def _find(self, path: str) -> list[tuple[dict[str, Route], dict[str, str]]]:
        return [
            (compiled.methods, match.groupdict())
            for compiled in self._compiled
            if (match := compiled.pattern.fullmatch(path))
        ]


def _compile(template: str) -> re.Pattern[str]:
    parts = _PARAM.split(template)  # literal, name, literal, name, ..., literal
    return re.compile(
        "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
        )
    )
