"""The web page in a real browser (Debian's chromium, driven by Playwright) against a real
``python -m service`` over the default repository, as ``make serve`` builds it.

Every answer the page shows is checked against the service's own answer to the request the
page sent, so nothing can be faked in the browser. Each test also fails on any console
error, uncaught exception, failed request or HTTP error the page caused.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servers import ROOT, RunningServer, running_server

from service.webdata import LENGTH_PLOT

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: the browser tests drive Debian's chromium "
        "(apt-get install chromium)",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import (
        Browser,
        Page,
        Request,
        Response,
        Route,
        expect,
        sync_playwright,
    )
except ImportError:
    pytest.skip(
        "playwright is not installed: pip install -e '.[dev]' (no `playwright install`: "
        "the tests use Debian's chromium)",
        allow_module_level=True,
    )

# The first test also waits for the session's repository build (training, about a minute
# on 2 cores, more on a busy machine) and a browser start.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BATCHSTATS = "digits_cnn_batchstats"
CNN = "digits_cnn"
PAGE_BUDGET_BYTES = 100_000
SCREENSHOTS = ROOT / "reports" / "web"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def web(
    built_repository: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    # The headline plot of the behaviour report takes ~2 minutes to make; the committed copy
    # in docs/ is that same figure.
    report = tmp_path_factory.mktemp("report")
    shutil.copyfile(ROOT / "docs" / "behavior.png", report / "headline.png")
    # Any PNG stands in for the length experiment's plot: the test checks it is shown.
    shutil.copyfile(ROOT / "docs" / "behavior.png", report / LENGTH_PLOT)
    logs = tmp_path_factory.mktemp("web-server")
    with running_server(built_repository[0], logs, "--report-dir", str(report)) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-background-networking"],
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Watched:
    page: Page
    problems: list[str] = field(default_factory=list)
    infer_requests: list[Request] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.problems == [], "\n".join(self.problems)

    def requests_to(self, model: str) -> list[Request]:
        return [r for r in self.infer_requests if r.url.endswith(f"/v2/models/{model}/infer")]


def _open(browser: Browser, url: str, **context: Any) -> Watched:
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(WAIT_MS)
    watched = Watched(page)
    problems = watched.problems
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status}: {r.url}"))
    page.on("request", lambda r: r.url.endswith("/infer") and watched.infer_requests.append(r))
    page.on("response", lambda r: r.url.endswith("/infer") and watched.responses.append(r))
    page.goto(url)
    # The page says when it has set itself up (models, samples, listeners).
    expect(page.locator("main")).to_have_attribute("aria-busy", "false")
    expect(page.locator(".card").first).to_be_visible()
    return watched


@pytest.fixture
def open_page(browser: Browser, web: RunningServer) -> Iterator[Callable[..., Watched]]:
    opened: list[Watched] = []

    def open_(**context: Any) -> Watched:
        opened.append(_open(browser, f"{web.http_url}/", **context))
        return opened[-1]

    yield open_
    for watched in opened:
        watched.page.context.close()


# ---------------------------------------------------------------------------- the service's view


def _grid_models(server: RunningServer) -> list[str]:
    """READY models that are not batch-dependent: the ones the page must show as cards."""
    index = httpx.post(f"{server.http_url}/v2/repository/index").json()
    names = []
    for entry in index:
        if entry["state"] != "READY":
            continue
        meta = httpx.get(f"{server.http_url}/v2/models/{entry['name']}").json()
        if not meta["parameters"]["batch_dependent"]:
            names.append(entry["name"])
    return sorted(names)


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exp = [math.exp(v - top) for v in logits]
    return [v / sum(exp) for v in exp]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _row0_probabilities(response: Response) -> list[float]:
    (out,) = response.json()["outputs"]
    return _softmax(out["data"][: out["shape"][1]])


def _samples(server: RunningServer) -> dict[str, Any]:
    samples: dict[str, Any] = httpx.get(f"{server.http_url}/ui/samples.json").json()
    return samples


def _sample_the_cnn_gets_right(server: RunningServer, samples: dict[str, Any]) -> int:
    """A test digit (not number 0, the picker's default) that the served CNN classifies right,
    asked of the service itself."""
    for start in range(0, len(samples["images"]), 60):
        images = samples["images"][start : start + 60]
        body = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [len(images), 1, 8, 8],
                    "data": [v / samples["scale"] for image in images for v in image],
                }
            ]
        }
        (out,) = httpx.post(f"{server.http_url}/v2/models/{CNN}/infer", json=body).json()["outputs"]
        for row in range(len(images)):
            index = start + row
            logits = out["data"][row * 10 : (row + 1) * 10]
            if index > 0 and str(_argmax(logits)) == samples["labels"][index]:
                return index
    pytest.fail("the served CNN classifies no test digit right")


# ---------------------------------------------------------------------------- page actions


def _stroke(page: Page, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through ``points`` given as fractions of the pad's size."""
    box = page.locator("#pad").bounding_box()
    assert box is not None

    def at(point: tuple[float, float]) -> tuple[float, float]:
        return box["x"] + point[0] * box["width"], box["y"] + point[1] * box["height"]

    page.mouse.move(*at(points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*at(point), steps=6)
    page.mouse.up()


def _shown_probabilities(page: Page, model: str) -> list[float]:
    bars = page.locator(f'.card[data-model="{model}"] .bars li')
    return [float(bars.nth(i).get_attribute("data-probability") or "nan") for i in range(10)]


def _wait_until(page: Page, condition: Callable[[], bool], what: str) -> None:
    # Playwright's sync API delivers events only while it waits, so poll through the page.
    for _ in range(WAIT_MS // 50):
        if condition():
            return
        page.wait_for_timeout(50)
    pytest.fail(f"timed out waiting until {what}")


def _shows_a_service_answer(watched: Watched, model: str, since: int) -> bool:
    """The card's bars are the softmax of an answer the service gave to a request the page
    sent for ``model`` after its ``since``-th request."""
    sent = watched.requests_to(model)[since:]
    answers = [r for r in watched.responses if r.request in sent and r.ok]
    if not answers:
        return False
    shown = _shown_probabilities(watched.page, model)
    return any(
        all(abs(a - b) < 1e-6 for a, b in zip(shown, _row0_probabilities(r), strict=True))
        for r in answers
    )


def _pick_sample(page: Page, index: int) -> None:
    page.fill("#sample-index", str(index))
    page.click("#show-sample")


# ---------------------------------------------------------------------------- tests


def test_drawing_gets_answers_from_every_served_model(
    web: RunningServer, open_page: Callable[..., Watched]
) -> None:
    watched = open_page()
    page = watched.page
    models = _grid_models(web)
    assert len(models) >= 3 and CNN in models and BATCHSTATS not in models
    cards = page.locator(".card")
    assert (
        sorted(cards.nth(i).get_attribute("data-model") or "" for i in range(cards.count()))
        == models
    )

    _stroke(page, [(0.2, 0.15), (0.8, 0.15)])  # the bar of a 7
    for model in models:
        _wait_until(
            page, lambda m=model: _shows_a_service_answer(watched, m, 0), f"{model} answers"
        )
    sent = {model: len(watched.requests_to(model)) for model in models}
    _stroke(page, [(0.8, 0.15), (0.45, 0.9)])  # its stem: every card answers again
    for model in models:
        _wait_until(
            page,
            lambda m=model: _shows_a_service_answer(watched, m, sent[m]),
            f"{model} answers the finished drawing",
        )
        card = page.locator(f'.card[data-model="{model}"]')
        expect(card.locator(".latency")).to_have_text(re.compile(r"^\d+\.\d ms round trip$"))
        expect(card.locator(".bars li")).to_have_count(10)
        assert abs(sum(_shown_probabilities(page, model)) - 1) < 1e-5
        assert card.locator(".bars li.best").count() == 1
    # What the page sent: one row of 8x8 ink intensities in [0, 1], in the model's own shape.
    request = watched.requests_to(CNN)[-1]
    (tensor,) = json.loads(request.post_data or "{}")["inputs"]
    assert tensor["shape"] == [1, 1, 8, 8] and len(tensor["data"]) == 64
    # The sequence model ([-1, -1, 8]) reads the drawing as its 8 rows.
    (rows,) = json.loads(watched.requests_to("digits_sequence")[-1].post_data or "{}")["inputs"]
    assert rows["shape"] == [1, 8, 8] and rows["data"] == tensor["data"]
    assert 0 < max(tensor["data"]) <= 1 and min(tensor["data"]) >= 0
    expect(page.locator("#summary")).to_contain_text(f"{CNN} says")
    watched.assert_clean()


def test_picked_sample_shows_its_label_and_the_cnn_gets_it(
    web: RunningServer, open_page: Callable[..., Watched]
) -> None:
    samples = _samples(web)
    index = _sample_the_cnn_gets_right(web, samples)
    label = samples["labels"][index]
    watched = open_page()
    page = watched.page
    _pick_sample(page, index)
    # The true label sits with the predictions, just above the cards.
    true_label = page.locator("#predictions #true-label")
    expect(true_label).to_have_attribute("data-label", label)
    expect(true_label).to_contain_text(f"true label {label}")
    gap = page.evaluate(
        "document.querySelector('.card').getBoundingClientRect().top"
        " - document.getElementById('true-label').getBoundingClientRect().bottom"
    )
    assert 0 <= gap < 100, gap
    expect(page.locator(f'.card[data-model="{CNN}"]')).to_have_attribute("data-label", label)
    (tensor,) = json.loads(watched.requests_to(CNN)[-1].post_data or "{}")["inputs"]
    assert tensor["data"] == [v / samples["scale"] for v in samples["images"][index]]
    watched.assert_clean()


def test_train_vs_inference_comes_from_the_service(
    web: RunningServer, open_page: Callable[..., Watched]
) -> None:
    samples = _samples(web)
    index = _sample_the_cnn_gets_right(web, samples)
    watched = open_page(viewport={"width": 1280, "height": 900})
    page = watched.page
    # Before any input the panel says what will appear, instead of an empty chart's area.
    expect(page.locator("#story-waiting")).to_be_visible()
    expect(page.locator("#story .chart")).to_be_hidden()
    _pick_sample(page, index)
    expect(page.locator("#story-waiting")).to_be_hidden()
    answers = page.locator("#answers")
    for key in ("eval", "1", "32"):
        expect(answers.locator(f'dd[data-batch="{key}"]')).to_be_visible()
    expect(page.locator("#chart circle")).to_have_count(6)

    sent = watched.requests_to(BATCHSTATS)
    shapes = [json.loads(r.post_data or "{}")["inputs"][0]["shape"] for r in sent]
    assert [s[0] for s in shapes[-6:]] == [1, 2, 4, 8, 16, 32]
    assert all(s[1:] == [1, 8, 8] for s in shapes)
    batch32 = json.loads(sent[-1].post_data or "{}")["inputs"][0]["data"]
    pixels = [[v / samples["scale"] for v in image] for image in samples["images"]]
    rows = [batch32[i * 64 : (i + 1) * 64] for i in range(32)]
    assert rows[0] == pixels[index]  # the shown digit, then 31 other test digits
    assert all(row in pixels and row != pixels[index] for row in rows[1:])

    def answer_to(request: Request) -> Response:
        response = request.response()
        assert response is not None and response.ok
        return response

    eval_label = page.locator('#answers dd[data-batch="eval"]').get_attribute("data-label")
    assert eval_label == samples["labels"][index]
    target = int(eval_label)
    for request, key in ((sent[-6], "1"), (sent[-1], "32")):
        served = _row0_probabilities(answer_to(request))
        shown = page.locator(f'#answers dd[data-batch="{key}"]')
        assert shown.get_attribute("data-label") == str(_argmax(served))
        assert f"P({target}) = {100 * served[target]:.1f} %" in (shown.text_content() or "")
    for request, circle in zip(sent[-6:], page.locator("#chart circle").all(), strict=True):
        served = _row0_probabilities(answer_to(request))[target]
        assert abs(float(circle.get_attribute("data-probability") or "nan") - served) < 1e-9
    plot = page.locator("#report-plot")
    expect(plot).to_be_visible()
    assert page.evaluate("document.getElementById('report-plot').naturalWidth") > 0
    expect(page.locator("#length-plot")).to_be_visible()
    assert page.evaluate("document.getElementById('length-plot').naturalWidth") > 0
    expect(page.locator("#length-caption")).to_contain_text("per time step")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "page-desktop.png", full_page=True)
    print(f"screenshot: {SCREENSHOTS / 'page-desktop.png'}")
    watched.assert_clean()


def test_keyboard_alone_picks_a_sample_and_clears(
    web: RunningServer, open_page: Callable[..., Watched]
) -> None:
    samples = _samples(web)
    index = _sample_the_cnn_gets_right(web, samples)
    watched = open_page()
    page = watched.page
    expect(page.locator("#show-sample")).to_be_enabled()

    def focused() -> str:
        return str(page.evaluate("document.activeElement.id"))

    visited = []
    for _ in range(20):
        page.keyboard.press("Tab")
        visited.append(focused())
        outline = page.evaluate(
            "(() => { const s = getComputedStyle(document.activeElement);"
            " return [s.outlineStyle, s.outlineWidth]; })()"
        )
        assert outline[0] != "none" and outline[1] != "0px", f"no visible focus on {visited[-1]}"
        if visited[-1] == "sample-index":
            break
    assert "clear" in visited and visited[-1] == "sample-index", visited
    page.keyboard.press("Control+A")
    page.keyboard.type(str(index))
    page.keyboard.press("Tab")
    assert focused() == "show-sample"
    page.keyboard.press("Enter")
    label = samples["labels"][index]
    expect(page.locator("#true-label")).to_have_attribute("data-label", label)
    expect(page.locator(f'.card[data-model="{CNN}"]')).to_have_attribute("data-label", label)
    expect(page.locator("#summary")).to_contain_text(f"{CNN} says {label}")

    for _ in range(10):
        if focused() == "clear":
            break
        page.keyboard.press("Shift+Tab")
    assert focused() == "clear"
    page.keyboard.press("Space")
    expect(page.locator("#true-label")).to_have_text("")
    expect(page.locator(".card[data-label]")).to_have_count(0)
    expect(page.locator("#summary")).to_have_text("Draw a digit or choose a test sample.")
    watched.assert_clean()


def test_page_files_stay_under_budget(web: RunningServer) -> None:
    """Everything the page itself loads: the HTML and what it references, recursively."""
    seen: dict[str, int] = {}
    queue = ["/"]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        # As a browser asks: GET / answers JSON liveness to clients that do not want HTML.
        response = httpx.get(f"{web.http_url}{path}", headers={"accept": "text/html"})
        assert response.status_code == 200, path
        seen[path] = len(response.content)
        text = response.text if not path.endswith(".svg") else ""
        queue += re.findall(r'(?:src|href)="(/ui/[\w.-]+)"', text)
        queue += [f"/ui/{m}" for m in re.findall(r'from "\./([\w.-]+)"', text)]
    total = sum(seen.values())
    print(f"page files: {total} bytes in {len(seen)} files: {sorted(seen)}")
    assert {"/", "/ui/app.js", "/ui/style.css", "/ui/favicon.svg"} <= set(seen)
    assert len(seen) >= 8  # the modules were followed
    assert total < PAGE_BUDGET_BYTES


def test_phone_width_has_no_horizontal_scroll(
    web: RunningServer, open_page: Callable[..., Watched]
) -> None:
    samples = _samples(web)
    index = _sample_the_cnn_gets_right(web, samples)
    watched = open_page(
        viewport={"width": 375, "height": 740},
        is_mobile=True,
        has_touch=True,
        device_scale_factor=2,
    )
    page = watched.page
    page.fill("#sample-index", str(index))
    page.tap("#show-sample")
    expect(page.locator(f'.card[data-model="{CNN}"]')).to_have_attribute(
        "data-label", samples["labels"][index]
    )
    expect(page.locator("#chart circle")).to_have_count(6)
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
    )
    assert widths[0] <= widths[2] and widths[1] <= widths[2], widths
    assert page.evaluate("getComputedStyle(document.getElementById('pad')).touchAction") == "none"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "page.png", full_page=True)
    print(f"screenshot: {SCREENSHOTS / 'page.png'}")
    watched.assert_clean()


def test_without_samples_or_report_the_page_says_how_to_make_them(
    browser: Browser,
    built_repository: tuple[Path, Path, str],
    tmp_path: Path,
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(built_repository[0], repository, ignore=shutil.ignore_patterns("_web"))
    empty = tmp_path / "no-report"
    empty.mkdir()
    with running_server(repository, tmp_path, "--report-dir", str(empty)) as server:
        assert httpx.get(f"{server.http_url}/ui/samples.json").status_code == 404
        watched = _open(browser, f"{server.http_url}/")
        page = watched.page
        try:
            expect(page.locator("#samples-note")).to_contain_text("python -m export build")
            expect(page.locator("#show-sample")).to_be_disabled()
            expect(page.locator("#report-caption")).to_contain_text("python -m export behavior")
            expect(page.locator("#report-plot")).to_be_hidden()
            expect(page.locator("#length-report")).to_be_hidden()
            _stroke(page, [(0.5, 0.1), (0.5, 0.9)])
            # Without test digits the panel still shows the batch of 1, from the service.
            expect(page.locator('#answers dd[data-batch="1"]')).to_be_visible()
            expect(page.locator(".chart")).to_be_hidden()
            assert [
                json.loads(r.post_data or "{}")["inputs"][0]["shape"][0]
                for r in watched.requests_to(BATCHSTATS)
            ] == [1] * len(watched.requests_to(BATCHSTATS))
            watched.assert_clean()  # the page asked first: it provoked no 404
        finally:
            page.context.close()


# ------------------------------------------------ a server that also serves a non-digit model

RGB = "user_rgb"


def _install_rgb_model(root: Path) -> None:
    """A user's 3x32x32 classifier (average colour -> 10 logits) in ``root/repository``."""
    from onnx import TensorProto, helper, numpy_helper
    from tiny_onnx import install_source, save_checked

    from service.repository import TensorSpec

    weight = np.arange(30, dtype=np.float32).reshape(3, 10) / 30
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["pixels"], ["mean"]),
            helper.make_node("Flatten", ["mean"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "rgb",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weight, "W")],
    )
    source = save_checked(graph, root / "rgb-source.onnx")
    install_source(
        root,
        source,
        {
            "name": RGB,
            "inputs": [
                TensorSpec(name="pixels", datatype="FP32", shape=[-1, 3, 32, 32]).model_dump()
            ],
            "outputs": [TensorSpec(name="logits", datatype="FP32", shape=[-1, 10]).model_dump()],
            "max_batch_size": 8,
        },
    )


@pytest.fixture(scope="module")
def more_web(
    built_repository: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The default models plus a 3x32x32 one (the page must list it, not draw for it)."""
    root = tmp_path_factory.mktemp("more-web")
    shutil.copytree(built_repository[0], root / "repository")
    _install_rgb_model(root)
    with running_server(root / "repository", root) as server:
        yield server


def test_a_model_that_takes_no_digit_is_listed_not_drawn(
    browser: Browser, more_web: RunningServer
) -> None:
    watched = _open(browser, f"{more_web.http_url}/")
    page = watched.page
    try:
        other = page.locator(f'.card.other[data-model="{RGB}"]')
        expect(other).to_be_visible()
        expect(other).to_contain_text("served, not drawable here")
        expect(other).to_contain_text("pixels FP32 [-1, 3, 32, 32]")
        expect(other).to_contain_text(f"POST /v2/models/{RGB}/infer")
        assert page.locator(".card.other").count() == 1  # the digit models are drawable
        _stroke(page, [(0.5, 0.1), (0.5, 0.9)])
        expect(page.locator(f'.card[data-model="{CNN}"][data-label]')).to_have_count(1)
        assert watched.requests_to(RGB) == []
        watched.assert_clean()
    finally:
        page.context.close()


def test_drawing_keeps_one_request_per_model_in_flight_and_the_latest_wins(
    browser: Browser, more_web: RunningServer
) -> None:
    """While the first answers are held back, a long scribble sends nothing more; once they
    arrive, each model gets exactly one more request: the final drawing's."""
    watched = _open(browser, f"{more_web.http_url}/")
    page = watched.page
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}
    held: list[Route] = []

    def model_of(request: Request) -> str | None:
        match = re.search(r"/v2/models/([^/]+)/infer$", request.url)
        return match[1] if match else None

    def started(request: Request) -> None:
        if (model := model_of(request)) is not None:
            in_flight[model] = in_flight.get(model, 0) + 1
            most[model] = max(most.get(model, 0), in_flight[model])

    def ended(request: Request) -> None:
        if (model := model_of(request)) is not None:
            in_flight[model] -= 1

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    models = [CNN, "digits_transformer", "digits_recurrent", "digits_sequence"]

    # Answers held in the browser until released: a server that is slow, deterministically.
    released: list[bool] = []

    def hold(route: Route) -> None:
        if released:
            route.continue_()
        else:
            held.append(route)

    page.route("**/v2/models/*/infer", hold)
    try:
        box = page.locator("#pad").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.2 * box["height"])
        page.mouse.down()
        # A long scribble: most of its steps are a new 8x8 input.
        for i in range(60):
            x = 0.2 + 0.6 * ((i * 7) % 11) / 10
            y = 0.2 + 0.6 * i / 59
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=2)
            page.wait_for_timeout(16)  # about one frame
        page.mouse.up()
        _wait_until(page, lambda: len(held) == len(models), "each card's first request")
        page.wait_for_timeout(300)  # nothing else is sent meanwhile
        assert sorted(model_of(r.request) or "" for r in held) == sorted(models)
        released.append(True)
        for route in held:
            route.continue_()
        _wait_until(
            page,
            lambda: (
                all(n == 0 for n in in_flight.values())
                and len(watched.requests_to(BATCHSTATS)) == 6
                and page.locator(".card[data-label]").count() == len(models)
            ),
            "the page settles",
        )
        page.wait_for_timeout(500)  # and stays settled: no request is still to come
        assert all(n == 0 for n in in_flight.values()), in_flight
        assert most and max(most.values()) == 1, most
        # The held first drawing, then only the latest; digits_cnn also answers the
        # batch-statistics panel once (its eval-mode row), for the finished stroke.
        sent = {model: len(watched.requests_to(model)) for model in models}
        assert sent == {
            CNN: 3,
            "digits_transformer": 2,
            "digits_recurrent": 2,
            "digits_sequence": 2,
        }, sent
        shapes = [
            json.loads(r.post_data or "{}")["inputs"][0]["shape"][0]
            for r in watched.requests_to(BATCHSTATS)
        ]
        assert shapes == [1, 2, 4, 8, 16, 32], shapes
        # The latest drawing won: the last requests carry the pad's final input (read back
        # from the 8x8 preview), and each card shows the answer to its last request.
        final = page.evaluate(
            """(() => {
              const c = document.getElementById('preview');
              const d = c.getContext('2d').getImageData(0, 0, 8, 8).data;
              return Array.from({length: 64}, (_, i) => (255 - d[i * 4]) / 238);
            })()"""
        )
        first = json.loads(held[0].request.post_data or "{}")["inputs"][0]["data"]
        assert any(abs(a - b) >= 0.01 for a, b in zip(first, final, strict=True))
        for model in [*models, BATCHSTATS]:
            for request in watched.requests_to(model)[-1:] + watched.requests_to(model)[1:2]:
                (tensor,) = json.loads(request.post_data or "{}")["inputs"]
                row = tensor["data"][:64]
                assert all(abs(a - b) < 0.01 for a, b in zip(row, final, strict=True)), model
        for model in models:
            assert _shows_a_service_answer(watched, model, len(watched.requests_to(model)) - 1)
        watched.assert_clean()
    finally:
        page.context.close()
