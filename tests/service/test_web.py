"""The web page's routes: files, headers, data files, 404s, and what they must not touch.

Through Starlette's TestClient over a tiny repository, plus raw ASGI requests for paths an
HTTP client would normalise before sending (``..`` segments).
"""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient
from tiny_onnx import tiny_repository

from service.app import NormserveApp, create_app
from service.front.page import CONTENT_TYPES, PAGE_DIR
from service.repository import list_models
from service.settings import Settings
from service.webdata import (
    LENGTH_PLOT,
    REPORT_HEADLINE,
    SAMPLES_PATH,
    DigitSamples,
    write_samples,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
SAMPLES = DigitSamples(
    source="test",
    labels=["3", "7"],
    images=[[(i * 5) % 17 for i in range(64)], [16 - (i % 17) for i in range(64)]],
)
PAGE_FILES = sorted(p.name for p in PAGE_DIR.iterdir() if p.suffix in CONTENT_TYPES)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repository = tiny_repository(tmp_path)
    write_samples(repository, SAMPLES)
    return repository


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    report = tmp_path / "report"
    report.mkdir()
    (report / REPORT_HEADLINE).write_bytes(PNG)
    (report / "report.json").write_text("{}")  # exists, but is not a plot: never served
    return report


def _client(repository: Path, report_dir: Path) -> TestClient:
    return TestClient(create_app(Settings(repository=repository, report_dir=report_dir)))


def _raw_get(app: NormserveApp, path: str) -> tuple[int, bytes]:
    """GET with ``path`` exactly as uvicorn would pass it on (already percent-decoded)."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:])


# What browsers send for a page; without text/html, "/" is KServe's V1 liveness instead.
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def test_index_has_a_strict_policy_and_revalidates(repository: Path, report_dir: Path) -> None:
    with _client(repository, report_dir) as client:
        response = client.get("/", headers=BROWSER)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.content == (PAGE_DIR / "index.html").read_bytes()
        csp = response.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert "unsafe" not in csp and "*" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"
        etag = response.headers["etag"]
        again = client.get("/", headers={**BROWSER, "If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        changed = client.get("/", headers={**BROWSER, "If-None-Match": '"other"'})
        assert changed.status_code == 200


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
def test_root_is_kserve_v1_liveness_for_clients_that_do_not_ask_for_html(
    repository: Path, report_dir: Path, accept: str | None
) -> None:
    with _client(repository, report_dir) as client:
        headers = {"Accept": accept} if accept is not None else {}
        if accept is None:
            client.headers.pop("accept", None)
        response = client.get("/", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}
    assert response.headers["vary"] == "accept"


@pytest.mark.parametrize("name", PAGE_FILES)
def test_every_page_file_has_its_content_type(
    repository: Path, report_dir: Path, name: str
) -> None:
    with _client(repository, report_dir) as client:
        response = client.get(f"/ui/{name}")
        assert response.status_code == 200
        # ES modules are refused by browsers without a JavaScript MIME type.
        assert response.headers["content-type"] == CONTENT_TYPES[Path(name).suffix]
        assert response.content == (PAGE_DIR / name).read_bytes()
        assert "default-src 'self'" in response.headers["content-security-policy"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)
            if name == "style" or name.startswith("on"):  # blocked by the policy
                self.inline.append(f"<{tag} {name}=...>")
        self._in_script = tag == "script"
        if tag == "style":
            self.inline.append("<style>")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline <script>")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


def test_page_obeys_its_own_policy_and_loads_only_this_server() -> None:
    page = _Page()
    page.feed((PAGE_DIR / "index.html").read_text())
    assert page.inline == []
    assert page.urls, "the page references its files"
    for url in page.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        if url.startswith("/ui/"):
            assert (PAGE_DIR / url.removeprefix("/ui/")).is_file(), url
    for module in PAGE_DIR.glob("*.js"):
        text = module.read_text()
        for imported in re.findall(r"from\s+\"([^\"]+)\"", text):
            assert imported.startswith("./") and (PAGE_DIR / imported[2:]).is_file(), imported
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "eval(" not in text, module.name


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/ui/nope.js", "the page has no file 'nope.js'"),
        ("/ui/settings.py", "the page has no file 'settings.py'"),  # beside web/, not in it
        ("/ui/report/report.json", "unknown report plot 'report.json'"),
        ("/ui/report/passwd", "unknown report plot"),
        ("/ui/..%2Fsettings.py", ""),
        ("/ui/%2e%2e%2fapp.py", ""),
        ("/ui/report/..%2F..%2Fetc%2Fpasswd", ""),
        ("/ui/", ""),
    ],
)
def test_unknown_names_and_traversal_get_a_json_404(
    repository: Path, report_dir: Path, path: str, fragment: str
) -> None:
    with _client(repository, report_dir) as client:
        response = client.get(path)
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/json"
        assert fragment in response.json()["error"]
        assert b"import" not in response.content and b"root:" not in response.content


@pytest.mark.parametrize(
    "path",
    ["/ui/report/../../etc/passwd", "/ui/../service/settings.py", "/ui/report/../app.js"],
)
def test_dot_segments_sent_raw_reach_nothing(repository: Path, report_dir: Path, path: str) -> None:
    status, body = _raw_get(
        create_app(Settings(repository=repository, report_dir=report_dir)), path
    )
    assert status == 404
    assert "error" in orjson.loads(body)


def test_report_plot_is_served_when_it_exists(repository: Path, report_dir: Path) -> None:
    with _client(repository, report_dir) as client:
        assert client.get("/ui/info.json").json()["report_plots"] == [REPORT_HEADLINE]
        response = client.get(f"/ui/report/{REPORT_HEADLINE}")
        assert response.status_code == 200 and response.content == PNG
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-content-type-options"] == "nosniff"
        (report_dir / REPORT_HEADLINE).unlink()
        missing = client.get(f"/ui/report/{REPORT_HEADLINE}")
        assert missing.status_code == 404
        assert "python -m export behavior" in missing.json()["error"]
        assert client.get("/ui/info.json").json()["report_plots"] == []


def test_length_plot_is_offered_and_served_only_when_it_exists(
    repository: Path, report_dir: Path
) -> None:
    with _client(repository, report_dir) as client:
        assert client.get("/ui/info.json").json()["length_plot"] is None
        assert client.get(f"/ui/report/{LENGTH_PLOT}").status_code == 404
        (report_dir / LENGTH_PLOT).write_bytes(PNG)
        info = client.get("/ui/info.json").json()
        # Beside the headline, never instead of it.
        assert info["length_plot"] == LENGTH_PLOT and info["report_plots"] == [REPORT_HEADLINE]
        response = client.get(f"/ui/report/{LENGTH_PLOT}")
        assert response.status_code == 200 and response.content == PNG
        assert response.headers["content-type"] == "image/png"


def test_samples_have_the_documented_shape(repository: Path, report_dir: Path) -> None:
    with _client(repository, report_dir) as client:
        assert client.get("/ui/info.json").json()["samples"] is True
        response = client.get("/ui/samples.json")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {"source", "scale", "labels", "images"}
        assert body["scale"] == 16 and body["labels"] == SAMPLES.labels
        assert [len(image) for image in body["images"]] == [64, 64]
        assert body["images"] == SAMPLES.images
        assert (
            client.get(
                "/ui/samples.json", headers={"If-None-Match": response.headers["etag"]}
            ).status_code
            == 304
        )


def test_a_rebuilt_samples_file_is_served_without_a_restart(
    repository: Path, report_dir: Path
) -> None:
    with _client(repository, report_dir) as client:
        first = client.get("/ui/samples.json")
        write_samples(repository, SAMPLES.model_copy(update={"labels": ["9", "1"]}))
        second = client.get("/ui/samples.json", headers={"If-None-Match": first.headers["etag"]})
        assert second.status_code == 200 and second.json()["labels"] == ["9", "1"]
        assert second.headers["etag"] != first.headers["etag"]


def test_missing_or_broken_samples_say_how_to_build_them(
    repository: Path, report_dir: Path
) -> None:
    with _client(repository, report_dir) as client:
        (repository / SAMPLES_PATH).write_text('{"source": "x", "labels": ["1"], "images": []}')
        broken = client.get("/ui/samples.json")
        assert broken.status_code == 500
        assert "python -m export build" in broken.json()["error"]
        assert str(repository) not in broken.text  # no server paths in messages
        (repository / SAMPLES_PATH).unlink()
        missing = client.get("/ui/samples.json")
        assert missing.status_code == 404
        assert "python -m export build" in missing.json()["error"]
        assert str(repository) not in missing.text
        assert client.get("/ui/info.json").json()["samples"] is False


def test_page_routes_are_documented_apart_and_never_counted_as_inference(
    repository: Path, report_dir: Path
) -> None:
    with _client(repository, report_dir) as client:
        paths = client.get("/openapi.json").json()["paths"]
        page = {p: ops for p, ops in paths.items() if p == "/" or p.startswith("/ui")}
        assert page and all(
            op["tags"] == ["web page"] for ops in page.values() for op in ops.values()
        )
        for path in ("/", "/ui/app.js", "/ui/nope.js", "/ui/report/nope.png", "/ui/samples.json"):
            client.get(path)
        metrics = client.get("/metrics").text
        assert "normserve_requests_total{" not in metrics  # nothing counted as inference


def test_the_data_directory_is_not_a_model(repository: Path) -> None:
    assert (repository / SAMPLES_PATH).is_file()
    assert [c.name for c in list_models(repository)] == ["tiny"]
    with TestClient(create_app(Settings(repository=repository))) as client:
        assert client.get("/v2/health/ready").json() == {"ready": True}
        index = client.post("/v2/repository/index").json()
        assert [entry["name"] for entry in index] == ["tiny"]


def test_report_dir_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Settings().report_dir == Path("reports/behavior")
    monkeypatch.setenv("NORMSERVE_REPORT_DIR", str(tmp_path))
    assert Settings().report_dir == tmp_path
