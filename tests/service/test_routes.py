"""One route table: what is documented is served, what is served is documented, and no
route is defined anywhere else in service/."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from tiny_onnx import tiny_repository

from service.app import create_app
from service.front.routing import Route, Router
from service.front.table import route_table
from service.settings import Settings

SERVICE = Path(__file__).resolve().parents[2] / "service"
# Where route paths may be written: the route table's modules.
TABLE_MODULES = {"routes_v2.py", "routes_v1.py", "routes_ops.py", "page.py"}
# Clients of a route, not definitions: the container's probe stays stdlib-only to start fast.
CLIENT_MODULES = {"healthcheck.py"}
ROUTE_LITERAL = re.compile(r"^/(v1|v2|ui|metrics|docs|openapi)\b")
FILLED = {"model_name": "tiny", "version": "1", "name": "index.html"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repository = tiny_repository(tmp_path_factory.mktemp("routes"))
    with TestClient(create_app(Settings(repository=repository, access_log=False))) as client:
        yield client


def test_every_documented_operation_is_served(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    operations = [(m.upper(), p) for p, ops in paths.items() for m in ops]
    assert len(operations) == len(route_table())
    for method, template in operations:
        path = re.sub(r"\{(\w+)\}", lambda m: FILLED[m[1]], template)
        response = client.request(method, path, content=b"{}" if method == "POST" else None)
        assert response.status_code != 405, (method, path)
        if response.status_code == 404:
            assert not response.json()["error"].startswith("no route"), (method, path)


def test_every_served_route_is_documented_with_its_parameters(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for route in route_table():
        operation = document["paths"][route.path][route.method.lower()]
        assert [p["name"] for p in operation["parameters"]] == route.params
        assert operation["summary"] and operation["tags"] == [route.tag]
        if route.inference:
            assert "requestBody" in operation and "400" in operation["responses"]


def test_paths_outside_the_table_are_404_and_wrong_methods_405(client: TestClient) -> None:
    for path in ("/nope", "/v2/models/tiny/infer/extra", "/v2/models/a/b/c/d/e", "/v3"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"].startswith("no route")
    response = client.delete("/v2/models/tiny/infer")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST" and "error" in response.json()
    response = client.post("/v2/health/ready")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"


def test_head_answers_a_get_route_without_a_body(client: TestClient) -> None:
    get = client.get("/v2")
    head = client.head("/v2")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(get.content))


def test_literal_paths_win_over_templates() -> None:
    """/v2/models/stats is the statistics of every model, never a model named 'stats'."""
    router = Router(route_table())
    route, params = router.match("GET", "/v2/models/stats")
    assert route.handler.__name__ == "model_stats" and params == {}
    route, params = router.match("GET", "/v2/models/stats/ready")
    assert route.handler.__name__ == "model_ready" and params == {"model_name": "stats"}


def test_a_route_defined_twice_is_refused() -> None:
    first = route_table()[0]
    copy = Route(first.method, first.path, first.handler, "again", "health")
    with pytest.raises(ValueError, match="defined twice"):
        Router([first, copy])


def test_route_paths_appear_only_in_the_route_table() -> None:
    """A path literal such as "/v2/..." outside the table's modules would be a second owner
    (the fast path's own regexes were one)."""
    offenders = []
    for module in SERVICE.rglob("*.py"):
        if module.name in TABLE_MODULES | CLIENT_MODULES:
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and ROUTE_LITERAL.match(node.value)
            ):
                offenders.append(f"{module.relative_to(SERVICE)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_the_service_imports_no_web_framework() -> None:
    """The dispatcher is plain ASGI (docs/design/protocol-core.md): neither FastAPI nor
    Starlette is imported by the server, so neither ships in the image."""
    code = (
        "import sys, service.__main__, service.app; "
        "service.app.create_app(service.settings.Settings()); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
