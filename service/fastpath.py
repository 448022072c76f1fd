"""Inference requests (V2 infer, V1 predict) without the framework's per-request work.

FastAPI's routing (a regex per route, tried in turn), dependency solving, query-string
parsing and exception middlewares took about half of the event loop's time per inference
request when profiled under load; the inference itself needs none of it. This ASGI layer
sits inside the access log and metrics middleware and answers inference requests by
calling the same ``v2.infer_response`` / ``v1.predict_response`` the documented routes use,
with the same error map; every other request goes on to FastAPI unchanged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from service import v1, v2
from service.errors import NormserveError
from service.store import ModelStore

log = logging.getLogger("normserve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The path segments FastAPI's {model_name} and {version} match: anything but "/".
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
PREDICT_PATH = re.compile(r"/v1/models/([^/]+):predict")


class InferFastPath:
    def __init__(
        self,
        app: ASGIApp,
        store: ModelStore,
        on_error: Callable[[NormserveError], Any],
    ) -> None:
        self.app = app
        self.store = store
        self.on_error = on_error  # the application's own NormserveError -> Response map

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        infer = predict = None
        if scope["type"] == "http" and scope["method"] == "POST":
            infer = INFER_PATH.fullmatch(scope["path"])
            predict = None if infer else PREDICT_PATH.fullmatch(scope["path"])
        if infer is None and predict is None:
            await self.app(scope, receive, send)
            return
        # What the router would have set: the access log and metrics label by model name.
        match = infer or predict
        assert match is not None
        scope["path_params"] = {"model_name": match[1]}
        if infer is not None and infer[2] is not None:
            scope["path_params"]["version"] = infer[2]
        request = Request(scope, receive)
        try:
            if infer is not None:
                response = await v2.infer_response(request, self.store, infer[1], infer[2])
            else:
                response = await v1.predict_response(request, self.store, match[1])
        except NormserveError as exc:
            response = self.on_error(exc)
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            response = v2.json_response({"error": "internal error"}, 500)
        await response(scope, receive, send)
