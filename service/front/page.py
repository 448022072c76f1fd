"""The web page: its static files, its data (test samples, report plots) and their headers.

The files under ``service/front/web/`` are read once, on first use, into a table of
name → bytes, content type and ETag; a requested name is looked up in that table, never
joined to a path, so no request can reach another file. Every response carries a strict
Content-Security-Policy (the page has no inline script or style, loads nothing from
elsewhere and talks only to this server) and ``Cache-Control: no-cache`` with an ETag: the
browser revalidates (a 304 on this server costs nothing) and never runs a stale module after
an upgrade.

These are ordinary routes of the route table, under the "web page" tag of the OpenAPI
document. Only inference routes are counted in the request metrics, so the page's requests
and its 404s never show up as inference traffic.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from service.errors import ResourceNotFound
from service.front.asgi import Request, Response, json_response
from service.front.context import Context
from service.front.routing import Route
from service.webdata import (
    BUILD_COMMAND,
    REPORT_COMMAND,
    available_plots,
    length_plot,
    report_plot,
)

PAGE_DIR = Path(__file__).parent / "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    # ES modules are refused by browsers unless served with a JavaScript MIME type.
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGE_FILE = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg)$")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass(frozen=True)
class PageFile:
    body: bytes
    content_type: str
    etag: str


def load_page_files(directory: Path = PAGE_DIR) -> dict[str, PageFile]:
    """Every servable file of the page, by name (only names PAGE_FILE accepts)."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and PAGE_FILE.fullmatch(path.name):
            body = path.read_bytes()
            etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
            files[path.name] = PageFile(body, CONTENT_TYPES[path.suffix], etag)
    return files


def _respond(request: Request, body: bytes, content_type: str, etag: str) -> Response:
    headers = [*SECURITY_HEADERS, (b"cache-control", b"no-cache"), (b"etag", etag.encode())]
    offered = {tag.strip() for tag in (request.header(b"if-none-match") or "").split(",")}
    if etag in offered:
        return Response(304, b"", headers)
    return Response(200, body, [(b"content-type", content_type.encode()), *headers])


class PageFiles:
    """The page's files, read from ``directory`` on first use, then served from memory."""

    def __init__(self, directory: Path = PAGE_DIR) -> None:
        self.directory = directory
        self._files: dict[str, PageFile] | None = None

    def get(self, name: str) -> PageFile:
        if self._files is None:
            self._files = load_page_files(self.directory)
        page = self._files.get(name)
        if page is None:
            raise ResourceNotFound(f"the page has no file {name[:64]!r}")
        return page


_PAGE = PageFiles()


async def index(ctx: Context, request: Request) -> Response:
    """The page for browsers; KServe V1 liveness, ``{"status": "alive"}``, for any client that
    does not ask for HTML (KServe's SDK checks liveness with ``GET /``)."""
    if "text/html" not in (request.header(b"accept") or ""):
        alive = json_response({"status": "alive"})
        alive.headers.append((b"vary", b"accept"))
        return alive
    page = _PAGE.get("index.html")
    response = _respond(request, page.body, page.content_type, page.etag)
    response.headers.append((b"vary", b"accept"))
    return response


async def page_file(ctx: Context, request: Request) -> Response:
    page = _PAGE.get(request.params["name"])
    return _respond(request, page.body, page.content_type, page.etag)


async def info(ctx: Context, request: Request) -> Response:
    """What the page can show: whether test samples and report plots exist, and how to make
    them. Lets the page ask before it fetches, instead of provoking 404s."""
    body = orjson.dumps(
        {
            "samples": ctx.samples.exists(),
            "report_plots": available_plots(ctx.settings.report_dir),
            "length_plot": length_plot(ctx.settings.report_dir),
            "build_command": BUILD_COMMAND,
            "report_command": REPORT_COMMAND,
        }
    )
    headers = [(b"content-type", b"application/json"), *SECURITY_HEADERS]
    return Response(200, body, [*headers, (b"cache-control", b"no-store")])


async def samples(ctx: Context, request: Request) -> Response:
    body, etag = ctx.samples.read()
    return _respond(request, body, "application/json", etag)


async def report(ctx: Context, request: Request) -> Response:
    name = request.params["name"]
    path, etag = report_plot(ctx.settings.report_dir, name)
    # Read here, on the loop: ~100 KB takes less than the hand-off to a thread would.
    try:
        body = path.read_bytes()
    except OSError:  # removed or rewritten since it was found
        raise ResourceNotFound(f"report plot {name} cannot be read; make it again") from None
    return _respond(request, body, "image/png", etag)


def routes() -> list[Route]:
    tag = "web page"
    return [
        Route("GET", "/", index,
              "The web page (Accept: text/html); otherwise KServe V1 liveness: "
              '{"status": "alive"}', tag, media_type="text/html", errors=(404,)),
        Route("GET", "/ui/info.json", info, "What the page can show", tag),
        Route("GET", "/ui/samples.json", samples, "The digits test samples", tag,
              errors=(404,)),
        Route("GET", "/ui/report/{name}", report, "A behaviour report plot", tag,
              media_type="image/png", errors=(404,)),
        Route("GET", "/ui/{name}", page_file, "A file of the page (script, style, icon)", tag,
              media_type="text/plain", errors=(404,)),
    ]  # fmt: skip
