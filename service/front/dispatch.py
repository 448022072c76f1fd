"""The HTTP front's one dispatcher: route, call the handler, answer, log, count.

Every HTTP request passes here once: its request id (the client's ``X-Request-ID``, or a
new one), the route table match (404 / 405 otherwise), the handler, the one error map
(service.front.errors), one access-log line and, for inference routes, the request
metrics. No framework stack in between: see service.front.asgi for why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from service.errors import NormserveError
from service.front.asgi import Receive, Request, Response, Scope, Send, send_response
from service.front.context import Context
from service.front.encoding import compress, response_coding
from service.front.errors import domain_error_response, error_response, internal_error_response
from service.front.routing import MethodNotAllowed, NoRoute, Route, Router
from service.operations.access import MAX_ID_BYTES, log_access, new_request_id
from service.operations.logs import current_request_id

if TYPE_CHECKING:  # imports OpenTelemetry: only ever loaded when tracing is on
    from service.operations.otel import RequestTrace, Tracing

log = logging.getLogger("normserve")

# Where the early refusal leaves the route it matched, so that the request is routed once.
_MATCHED = "normserve.route"


class HttpFront:
    def __init__(
        self, ctx: Context, router: Router, access_log: bool, tracing: Tracing | None = None
    ) -> None:
        self.ctx = ctx
        self.router = router
        self.access_log = access_log
        self.tracing = tracing

    def refuse_early(self, scope: Scope) -> tuple[Response, bytes] | None:
        """The answer and request id for a request its route's admission check refuses
        (unknown model, not ready, queue full), or None to serve it as usual.

        Called by the connection (service.front.limits) as soon as the headers are complete:
        no body is read and no task started for what is refused here, so that under overload
        a refusal costs about what uvicorn itself spends on a request.
        """
        if scope["method"] != "POST":
            return None
        started = time.perf_counter()
        path: str = scope["path"]
        try:
            route, params = self.router.match("POST", path)
            scope[_MATCHED] = route, params  # the dispatcher's, if the request goes on
            if route.admit is None:
                return None
            route.admit(self.ctx, params)
            return None
        except NormserveError as exc:
            if isinstance(exc, (NoRoute, MethodNotAllowed)):
                return None  # answered by the dispatcher, with its headers
            response = domain_error_response(exc)
        except Exception:  # let the dispatcher meet it again, and log it, as for any request
            return None
        request_id = _request_id(scope)
        self._done(scope, route, params, response.status, started, request_id)
        if self.tracing is not None:  # no task here: the span is not made current
            trace = self._begin_trace(scope, current=False)
            trace.span.update_name(f"POST {route.path}")
            _end_trace(trace, response.status, request_id, params)
        return response, request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _request_id(scope)
        # Every log line written while this request is served carries its id. The task is
        # this request's alone (the server starts one per request), so nothing to reset.
        current_request_id.set(request_id)
        started = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        route: Route | None = None
        params: dict[str, str] = {}
        trace = None if self.tracing is None else self._begin_trace(scope, current=True)
        try:
            matched = scope.get(_MATCHED)
            route, params = matched if matched is not None else self.router.match(method, path)
            if trace is not None:  # the template names the span (low cardinality)
                trace.span.update_name(f"{method} {route.path}")
            response = await route.handler(self.ctx, Request(scope, receive, params, request_id))
        except MethodNotAllowed as exc:
            allow = ", ".join(exc.allowed).encode()
            response = error_response(405, str(exc), [(b"allow", allow)])
        except NoRoute as exc:
            response = error_response(404, str(exc))
        except NormserveError as exc:
            response = domain_error_response(exc)
        except asyncio.CancelledError:
            # The server cancelled this request (shutdown past its grace period): answer
            # cleanly if the connection still listens, and let the cancellation go on.
            response = error_response(503, "the server is shutting down; retry")
            await self._send(scope, send, response, request_id, method)
            if trace is not None:
                trace.end({"http.response.status_code": 503}, error="cancelled")
            raise
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            response = internal_error_response()
        if response.status == 200 and route is not None and route.inference is not None:
            _compress(response, scope)
        # Sent even for a client that went away (499): the server drops it then.
        await self._send(scope, send, response, request_id, method)
        self._done(scope, route, params, response.status, started, request_id)
        if trace is not None:
            _end_trace(trace, response.status, request_id, params)

    def _begin_trace(self, scope: Scope, current: bool) -> RequestTrace:
        assert self.tracing is not None
        method: str = scope["method"]
        path: str = scope["path"]
        return self.tracing.begin(
            f"{method} {path}",
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            {"http.request.method": method, "url.path": path},
            current=current,
        )

    def _done(
        self,
        scope: Scope,
        route: Route | None,
        params: dict[str, str],
        status: int,
        started: float,
        request_id: bytes,
    ) -> None:
        """What every answered request leaves behind: its metrics and its access-log line."""
        seconds = time.perf_counter() - started
        if route is not None and route.inference is not None:
            model, version = params["model_name"], params.get("version")
            label, counted = self.ctx.protocol.store.counted_as(model, version)
            self.ctx.metrics.on_request(
                label, route.inference, status, seconds, counted is not None, counted or ""
            )
        if self.access_log:
            client = (scope.get("client") or ("", 0))[0]
            log_access(request_id, scope["method"], scope["path"], status, seconds, client)

    async def _send(
        self, scope: Scope, send: Send, response: Response, request_id: bytes, method: str
    ) -> None:
        try:
            await send_response(scope, send, response, request_id, head=method == "HEAD")
        except OSError:  # the connection is gone: nothing more to do for it
            return


def _end_trace(trace: RequestTrace, status: int, request_id: bytes, params: dict[str, str]) -> None:
    model = {"normserve.model": params["model_name"]} if "model_name" in params else {}
    attributes = {
        "http.response.status_code": status,
        "normserve.request_id": request_id.decode("latin-1"),
        **model,
    }
    # A client's error (4xx) is not the server's: only 5xx mark the span as failed.
    trace.end(attributes, error=str(status) if status >= 500 else None)


def _request_id(scope: Scope) -> bytes:
    """The client's ``X-Request-ID`` (bounded), or a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value[:MAX_ID_BYTES] or new_request_id()
    return new_request_id()


def _compress(response: Response, scope: Scope) -> None:
    """An inference answer in the coding the client's Accept-Encoding asks for.

    Only inference answers, as Triton does: tritonclient's aio client leaves aiohttp's default
    ``Accept-Encoding: gzip, deflate`` on every call but decompresses only inference results
    (its metadata calls would fail on a gzipped body), and error bodies are read uncompressed.
    """
    for name, value in scope["headers"]:
        if name == b"accept-encoding":
            coding = response_coding(value.decode("latin-1"))
            break
    else:
        return
    if coding is not None and response.body:
        response.body = compress(response.body, coding)
        response.headers += [(b"content-encoding", coding.encode()), (b"vary", b"accept-encoding")]
