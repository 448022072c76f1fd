"""The web page: its static files, its data (test samples, report plots) and their headers.

The files under ``service/web/`` are read once, when the app is built, into a table of
name → bytes, content type and ETag; a requested name is looked up in that table, never
joined to a path, so no request can reach another file. Every response carries a strict
Content-Security-Policy (the page has no inline script or style, loads nothing from
elsewhere and talks only to this server) and ``Cache-Control: no-cache`` with an ETag: the
browser revalidates (a 304 on this server costs nothing) and never runs a stale module after
an upgrade.

These are ordinary routes, hidden from the OpenAPI document like ``/metrics``. Inference
requests are answered by the fast path before routing and only they are counted in the
metrics, so the page adds no work to inference and its 404s are not inference errors.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import ResourceNotFound
from service.v2 import json_response
from service.webdata import (
    BUILD_COMMAND,
    REPORT_COMMAND,
    SamplesFile,
    available_plots,
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
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


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
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    offered = {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}
    if etag in offered:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=content_type, headers=headers)


def _page_file(request: Request, name: str) -> Response:
    files: dict[str, PageFile] = request.app.state.page_files
    page = files.get(name)
    if page is None:
        raise ResourceNotFound(f"the page has no file {name[:64]!r}")
    return _respond(request, page.body, page.content_type, page.etag)


@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    return _page_file(request, "index.html")


# The fixed /ui/ routes are declared before /ui/{name}, which would otherwise match them.
@router.api_route("/ui/info.json", methods=["GET", "HEAD"])
async def info(request: Request) -> Response:
    """What the page can show: whether test samples and report plots exist, and how to make
    them. Lets the page ask before it fetches, instead of provoking 404s."""
    samples: SamplesFile = request.app.state.samples
    response = json_response(
        {
            "samples": samples.exists(),
            "report_plots": available_plots(request.app.state.settings.report_dir),
            "build_command": BUILD_COMMAND,
            "report_command": REPORT_COMMAND,
        }
    )
    response.headers.update({**SECURITY_HEADERS, "Cache-Control": "no-store"})
    return response


@router.api_route("/ui/samples.json", methods=["GET", "HEAD"])
async def samples(request: Request) -> Response:
    samples_file: SamplesFile = request.app.state.samples
    body, etag = samples_file.read()
    return _respond(request, body, "application/json", etag)


@router.api_route("/ui/report/{name}", methods=["GET", "HEAD"])
async def report(request: Request, name: str) -> Response:
    path, etag = report_plot(request.app.state.settings.report_dir, name)
    # Read here, on the loop: ~100 KB takes less than the hand-off to a thread would.
    try:
        body = path.read_bytes()
    except OSError:  # removed or rewritten since it was found
        raise ResourceNotFound(f"report plot {name} cannot be read; make it again") from None
    return _respond(request, body, "image/png", etag)


@router.api_route("/ui/{name}", methods=["GET", "HEAD"])
async def page_file(request: Request, name: str) -> Response:
    return _page_file(request, name)
