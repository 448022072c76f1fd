"""Limits at the front (service.front.limits), against real servers over raw sockets.

One server with small limits (timeouts of 1-2 s, a cap of 40 connections) for the attacks,
and one per shutdown test. Loops are bounded by a count and by time; waits on the server are
reads with a timeout, never sleeps. The in-process tests at the end drive the protocol with a
fake transport: the header byte accounting, chunking by chunking, and the uvicorn internals
the guard relies on.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import pickle
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from pydantic import ValidationError
from servers import RunningServer, running_server
from tiny_onnx import tiny_repository
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

from service.front import limits
from service.front.asgi import Response
from service.front.limits import FrontLimits, GuardedHttpProtocol
from service.settings import Settings, cpu_budget

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
IDLE_TIMEOUT_S = 2.0
CAP = 40
SLACK_S = 1.5  # the sweep's tick (0.25 s here) plus scheduling on a busy 2-core machine
INFER = "/v2/models/tiny/infer"
BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                  "data": [1, 2, 3, 4]}]})  # fmt: skip


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repository(tmp_path_factory.mktemp("front"))


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    args = (
        "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S),
        "--idle-timeout-s", str(IDLE_TIMEOUT_S), "--max-connections", str(CAP),
        "--log-format", "json",  # the access-log checks below read its JSON fields
    )  # fmt: skip
    with running_server(repository, tmp_path_factory.mktemp("front-log"), *args) as srv:
        yield srv


# ------------------------------------------------------------------------------ helpers


def connect(srv: RunningServer, timeout: float = 10.0) -> socket.socket:
    host, port = srv.url.split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection, without a byte, within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.1 (\d{3}) ", lines[0])
    assert match, f"not an HTTP answer: {answer[:200]!r}"
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(match[1]), headers, body


def assert_refusal(answer: bytes, status: int, words: str) -> None:
    """``status`` with a JSON error body that says ``words``, and the connection closed."""
    code, headers, body = parse(answer)
    assert code == status, answer[:300]
    assert headers.get("connection") == "close", headers
    assert headers.get("content-type") == "application/json", headers
    assert words in orjson.loads(body)["error"], body


def read_response(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-answer: {data!r}"
        data += chunk
    length = int(parse(data)[1]["content-length"])
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-answer: {data!r}"
        data += chunk
    return data


def get_metrics(srv: RunningServer) -> str:
    with connect(srv) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        return parse(read_all(sock))[2].decode()


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def get_ready(srv: RunningServer) -> int:
    with connect(srv) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        return parse(read_all(sock))[0]


def stalled_upload(srv: RunningServer) -> socket.socket:
    """A connection whose request's headers are in and whose app waits for the body.

    ``Expect: 100-continue`` makes the server say when the app first asks for the body, so
    the caller knows the request is in progress without sleeping.
    """
    sock = connect(srv)
    sock.sendall(
        f"POST {INFER} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\nexpect: 100-continue\r\n\r\n".encode()
    )
    assert sock.recv(100).startswith(b"HTTP/1.1 100 "), "the app never asked for the body"
    sock.sendall(BODY[:10])
    return sock


# ------------------------------------------------------------------------------ header size

FLOOD_CONNECTIONS = 8
FLOOD_BYTES = 64 * 1024 * 1024
FLOOD_LINE = b"x-flood: " + b"a" * (64 * 1024 - 11) + b"\r\n"  # 64 KiB per header line


def header_flood(srv: RunningServer, connections: int, total: int) -> list[bytes]:
    """``connections`` clients each sending ``total`` bytes of headers as fast as they can;
    what each read back. Each stops at the first send error (the server closed)."""
    answers: list[bytes] = [b""] * connections

    def client(i: int) -> None:
        with connect(srv, timeout=20.0) as sock:
            reader = threading.Thread(target=lambda: answers.__setitem__(i, read_all(sock)))
            reader.start()
            try:
                sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n")
                for _ in range(total // len(FLOOD_LINE)):
                    sock.sendall(FLOOD_LINE)
            except OSError:
                pass  # closed by the server: the point
            reader.join(timeout=20.0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60.0)
    return answers


def test_a_header_flood_is_refused_with_431_and_memory_stays_bounded(
    server: RunningServer,
) -> None:
    """8 connections each sending 64 MB of headers: every one is answered 431 and closed,
    and the server's peak RSS rises by less than 20 MB (unguarded: +515 MB)."""
    pid = server.proc.pid
    if not Path(f"/proc/{pid}/status").exists():
        pytest.skip("no /proc/PID/status here: the server's RSS cannot be read")
    before = rss_kib(pid)
    try:  # reset the peak-RSS mark (VmHWM), so it measures only the flood
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        peak_field = "VmHWM"
    except OSError:
        peak_field = "VmRSS"  # then only the RSS after the flood
    started = time.monotonic()
    answers = header_flood(server, FLOOD_CONNECTIONS, FLOOD_BYTES)
    seconds = time.monotonic() - started
    peak = rss_kib(pid, peak_field)
    print(f"header flood: RSS {before} KiB before, {peak_field} {peak} KiB, {seconds:.1f} s")
    for answer in answers:
        assert_refusal(answer, 431, "request headers exceed 65536 bytes")
    assert peak - before < 20 * 1024, f"RSS rose {peak - before} KiB under the flood"
    assert get_ready(server) == 200


def test_headers_just_under_the_limit_are_served(server: RunningServer) -> None:
    request = b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\nconnection: close\r\n"
    filler = 65536 - len(request) - len(b"x-pad: \r\n\r\n")
    with connect(server) as sock:
        sock.sendall(request + b"x-pad: " + b"p" * filler + b"\r\n\r\n")
        assert parse(read_all(sock))[0] == 200
    with connect(server) as sock:  # one byte more
        sock.sendall(request + b"x-pad: " + b"p" * (filler + 1) + b"\r\n\r\n")
        assert_refusal(read_all(sock), 431, "request headers exceed")


def test_a_request_the_parser_rejects_is_answered_400_in_json(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nbad header\r\n\r\n")
        assert_refusal(read_all(sock), 400, "Invalid HTTP request")


def test_head_get_and_100_continue_answers_are_whole_on_one_kept_alive_connection(
    server: RunningServer,
) -> None:
    """Each answer's head and body leave in one write (service.front.writes): HEAD, which
    has no body to wait for, a GET, and an upload that asked for 100 Continue."""
    with connect(server) as sock:
        sock.sendall(b"HEAD /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, head
            head += chunk
        status, headers, rest = parse(head)
        assert status == 200 and int(headers["content-length"]) > 0 and rest == b""
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n")
        status, _, body = parse(read_response(sock))
        assert status == 200 and orjson.loads(body) == {"ready": True}
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n"
            f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n".encode()
        )
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        status, _, body = parse(read_response(sock))
        assert status == 200 and orjson.loads(body)["outputs"][0]["shape"] == [1, 3], body


def test_a_refusal_at_headers_complete_is_answered_logged_and_counted_and_keeps_alive(
    server: RunningServer,
) -> None:
    """A request its route's admission refuses (here: an unknown model) is answered as soon
    as its headers are in, before its body is sent; its body is then read and dropped, and
    the connection serves the next request. The refusal is logged and counted like any."""
    body = b'{"inputs": []}'
    with connect(server) as sock:
        sock.sendall(
            f"POST /v2/models/nope/infer HTTP/1.1\r\nhost: t\r\nx-request-id: early-77\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        )
        status, headers, answer = parse(read_response(sock))  # no body sent yet
        assert status == 404 and headers["x-request-id"] == "early-77"
        assert headers.get("connection") != "close"
        assert orjson.loads(answer)["error"].startswith("Request for unknown model")
        sock.sendall(body + b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n")
        status, _, answer = parse(read_response(sock))
        assert status == 200 and orjson.loads(answer) == {"ready": True}
    metrics = get_metrics(server)
    assert re.search(r'normserve_requests_total\{[^}]*status="404"[^}]*\} [1-9]', metrics), metrics
    deadline = time.monotonic() + 10
    while '"early-77"' not in server.log_tail(100_000) and time.monotonic() < deadline:
        time.sleep(0.05)  # the log line is written after the answer
    assert re.search(r'"request_id":"early-77".*"status":404', server.log_tail(100_000))


# ------------------------------------------------------------------------------ timeouts


def test_headers_sent_slowly_are_refused_with_408(server: RunningServer) -> None:
    """A byte every 0.2 s (slowloris): 408 once header_timeout_s has passed since the first
    byte, however the bytes keep coming."""
    with connect(server) as sock:
        sock.settimeout(0.2)
        started = time.monotonic()
        sock.sendall(b"G")
        answer = b""
        for byte in b"ET /v2/health/ready HTTP/1.1\r\nx-slow: " + b"s" * 100:
            try:
                answer = sock.recv(4096)
                break
            except TimeoutError:
                sock.sendall(bytes([byte]))
        sock.settimeout(5.0)
        answer += read_all(sock)
        seconds = time.monotonic() - started
    assert_refusal(answer, 408, "request headers not complete within 1 s")
    assert HEADER_TIMEOUT_S - 0.1 <= seconds <= HEADER_TIMEOUT_S + SLACK_S, seconds


def test_a_body_sent_slowly_is_refused_with_408_and_the_app_runs_nothing(
    server: RunningServer,
) -> None:
    with stalled_upload(server) as sock:
        started = time.monotonic()
        answer = read_all(sock)
        seconds = time.monotonic() - started
    assert_refusal(answer, 408, "request body not complete within 1.5 s")
    assert BODY_TIMEOUT_S - 0.1 <= seconds <= BODY_TIMEOUT_S + SLACK_S, seconds
    # The app's receive() saw the disconnect: the request ends as 499 in its access log, and
    # no inference ran.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and '"status":499' not in server.log_tail(20000):
        time.sleep(0.05)
    log = server.log_tail(20000)
    cut_off = [line for line in log.splitlines() if INFER in line and '"status":499' in line]
    assert cut_off, log[-2000:]
    assert "Traceback" not in log and '"status":500' not in log, log[-4000:]


def test_a_silent_connection_is_closed_after_the_idle_timeout(server: RunningServer) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
        seconds = time.monotonic() - started
    assert IDLE_TIMEOUT_S - 0.1 <= seconds <= IDLE_TIMEOUT_S + SLACK_S, seconds


def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: t\r\n\r\n")
        first = read_response(sock)
        started = time.monotonic()
        rest = read_all(sock)
        seconds = time.monotonic() - started
    assert parse(first)[0] == 200 and rest == b""
    assert IDLE_TIMEOUT_S - 0.1 <= seconds <= IDLE_TIMEOUT_S + SLACK_S, seconds


# ------------------------------------------------------------------------------ connection cap


def test_silent_connections_beyond_the_cap_cannot_lock_out_a_client(
    server: RunningServer,
) -> None:
    """CAP + 20 silent connections: each new one evicts the oldest, and a real client is
    still served, well before any idle timeout could have made room."""
    started = time.monotonic()
    silent = [connect(server) for _ in range(CAP + 20)]
    try:
        assert get_ready(server) == 200
        served_after = time.monotonic() - started
        for sock in silent[:21]:  # the 20 extra and the client each evicted the oldest
            assert closed_within(sock, IDLE_TIMEOUT_S / 2)
        evicted_by = time.monotonic() - started
    finally:
        for sock in silent:
            sock.close()
    assert evicted_by < IDLE_TIMEOUT_S - 0.1, (
        f"{evicted_by:.2f} s: too slow to tell eviction from the idle timeout"
    )
    print(f"cap {CAP}: client served {served_after * 1000:.0f} ms after {CAP + 20} silent ones")


def test_at_the_cap_requests_in_progress_are_never_evicted(server: RunningServer) -> None:
    """CAP - 1 stalled uploads and one silent connection: a client evicts the silent one and
    is served. With the cap then full of uploads, a new connection is closed at once, unread,
    and every upload still ends in its own 408."""
    uploads: list[socket.socket] = []
    try:
        while len(uploads) < CAP - 1:
            uploads.append(stalled_upload(server))
        with connect(server) as silent:
            assert get_ready(server) == 200
            assert closed_within(silent, BODY_TIMEOUT_S / 2)
        uploads.append(stalled_upload(server))
        started = time.monotonic()
        with connect(server) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n")
            assert read_all(sock) == b"", "served beyond the cap"
        assert time.monotonic() - started < BODY_TIMEOUT_S / 2, "not refused at once"
        for upload in uploads:
            assert parse(read_all(upload))[0] == 408
    finally:
        for upload in uploads:
            upload.close()
    assert get_ready(server) == 200


# ------------------------------------------------------------------------------ shutdown


@pytest.mark.parametrize("stage", ["body", "headers"])
def test_sigterm_during_a_stalled_upload_answers_503_and_exits_cleanly(
    repository: Path, tmp_path: Path, stage: str
) -> None:
    """Graceful period 10 s: without the guard the stalled request ends in a 500 and an ASGI
    traceback once it runs out. Here: 503 after the 1 s grace, exit code 0, nothing in the
    log; a kept-alive connection between requests is closed at once."""
    with running_server(repository, tmp_path, "--graceful-shutdown-s", "10") as srv:
        with connect(srv) as live:
            live.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: t\r\n\r\n")
            assert parse(read_response(live))[0] == 200
            if stage == "body":
                sock = stalled_upload(srv)
            else:
                sock = connect(srv)
                sock.sendall(f"POST {INFER} HTTP/1.1\r\nhost: t\r\n".encode())
            with sock:
                started = time.monotonic()
                os.kill(srv.proc.pid, signal.SIGTERM)
                answer = read_all(sock)
                assert read_all(live) == b""
            code = srv.proc.wait(timeout=15)
            seconds = time.monotonic() - started
        assert_refusal(answer, 503, "shutting down")
        assert code == 0 and 0.9 <= seconds < 5.0, (code, seconds)
        log = srv.log_tail(20000)
        assert "Traceback" not in log and '"status":500' not in log, log[-4000:]


def test_sigterm_while_a_body_is_arriving_still_serves_it(repository: Path, tmp_path: Path) -> None:
    """The rest of the body arrives after the shutdown began, within the grace: the request
    is served like any other in flight, and its answer closes the connection."""
    with running_server(repository, tmp_path, "--graceful-shutdown-s", "10") as srv:
        with stalled_upload(srv) as sock:
            os.kill(srv.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10.0  # the shutdown has begun once uvicorn says so
            while "Shutting down" not in srv.log_tail() and time.monotonic() < deadline:
                time.sleep(0.02)
            sock.sendall(BODY[10:])
            answer = read_all(sock)
        code = srv.proc.wait(timeout=15)
    status, headers, body = parse(answer)
    assert status == 200 and headers.get("connection") == "close", answer[:300]
    assert orjson.loads(body)["outputs"][0]["shape"] == [1, 3]
    assert code == 0


# ------------------------------------------------------------------------------ workers


def test_each_worker_process_keeps_the_limits(repository: Path, tmp_path: Path) -> None:
    """--workers 2 spawns processes that unpickle uvicorn's config and build their limits from
    the NORMSERVE_* environment: both limits still hold on every connection."""
    if cpu_budget() < 2:
        pytest.skip("one CPU available: --workers 2 is refused at start-up")
    args = ("--workers", "2", "--idle-timeout-s", "1", "--max-header-bytes", "2048")
    with running_server(repository, tmp_path, *args) as srv:
        started = time.monotonic()
        silent = [connect(srv) for _ in range(4)]  # connections land on either worker
        try:
            for _ in range(4):
                with connect(srv) as sock:
                    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nx-pad: " + b"p" * 2048)
                    assert_refusal(read_all(sock), 431, "request headers exceed 2048 bytes")
            for sock in silent:
                assert closed_within(sock, 1.0 + SLACK_S)
            assert time.monotonic() - started >= 0.9
        finally:
            for sock in silent:
                sock.close()


# ------------------------------------------------------------------------------ settings


def test_a_connection_cap_beyond_the_open_file_limit_is_refused_at_start_up() -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit to exceed")
    with pytest.raises(ValidationError, match="exceeds the open-file hard limit"):
        Settings(max_connections=hard)
    assert Settings(max_connections=hard - 64).max_connections == hard - 64


def test_configure_raises_the_soft_open_file_limit_and_keeps_the_cap_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resource

    monkeypatch.setattr(limits, "_limits", None)  # configure() sets it; put back after
    configured = limits.configure(Settings(max_header_bytes=4096, max_connections=500))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert configured.max_connections == min(500, soft - 64)
    assert configured.max_header_bytes == 4096


def test_under_a_hard_limit_of_1024_the_default_cap_is_lowered_not_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    monkeypatch.setattr(limits, "_limits", None)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    with pytest.raises(ValidationError, match="exceeds the open-file hard limit"):
        Settings(max_connections=2000)
    settings = Settings()  # the default, 1,000: lowered at start-up instead
    monkeypatch.setattr(limits, "raise_open_files_limit", lambda: 1024)
    with caplog.at_level("WARNING", logger="normserve.front"):
        assert limits.configure(settings).max_connections == 1024 - 64
    assert "max_connections lowered from 1000 to 960" in caplog.text


# ------------------------------------------------------------------------------ in process


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = self.eof = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def echo_length(scope: Any, receive: Any, send: Any) -> None:
    """Answers 200 with the body's length."""
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def drive(chunks: list[bytes], max_header_bytes: int = 1024) -> FakeTransport:
    """Feeds ``chunks`` to a guarded protocol, running the app in between; the transport."""

    async def run() -> FakeTransport:
        limits._limits = FrontLimits(max_header_bytes, 10.0, 10.0, 10.0, 100)
        config = uvicorn.Config(echo_length, log_level="warning")
        protocol = GuardedHttpProtocol(config, ServerState(), {})
        transport = FakeTransport()
        protocol.connection_made(transport)
        for chunk in chunks:
            protocol.data_received(chunk)
            for _ in range(5):
                await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    saved = limits._limits
    try:
        return asyncio.run(run())
    finally:
        limits._limits = saved


def request_of(header_bytes: int, body: bytes = b"") -> bytes:
    """A POST whose header section (request line to the blank line) is exactly that long."""
    head = f"POST /echo HTTP/1.1\r\ncontent-length: {len(body)}\r\n".encode()
    pad = header_bytes - len(head) - len(b"x-pad: \r\n\r\n")
    return head + b"x-pad: " + b"p" * pad + b"\r\n\r\n" + body


@pytest.mark.parametrize("chunk", [1, 7, 100, 1024, 1 << 20])
def test_header_bytes_are_counted_exactly_however_they_arrive(chunk: int) -> None:
    body = b"b" * 5000  # in the same reads as the headers: never counted as header bytes
    for size, status in ((1024, b"200"), (1025, b"431")):
        data = request_of(size, body) + request_of(size)  # pipelined: each counted alone
        written = drive([data[i : i + chunk] for i in range(0, len(data), chunk)]).written
        assert written.startswith(b"HTTP/1.1 " + status), (size, chunk, bytes(written[:100]))
        if status == b"200":
            assert written.count(b"HTTP/1.1 200") == 2 and b"\r\n\r\n5000" in written


def test_uvicorn_internals_the_guard_relies_on_are_there() -> None:
    """Fails loudly when a uvicorn release changes what service.front.limits overrides or
    reads; the pyproject pin says which versions were checked."""
    version = tuple(int(p) for p in importlib.metadata.version("uvicorn").split(".")[:2])
    assert (0, 34) <= version < (0, 56), f"uvicorn {version}: check service.front.limits"
    base = httptools_impl.HttpToolsProtocol
    for name in ("connection_made", "connection_lost", "data_received", "on_message_begin",
                 "on_headers_complete", "on_message_complete", "on_response_complete",
                 "send_400_response", "shutdown"):  # fmt: skip
        assert callable(getattr(base, name, None)), f"HttpToolsProtocol.{name} is gone"
    assert 431 in httptools_impl.STATUS_LINE
    cycle = httptools_impl.RequestResponseCycle.__init__.__code__.co_names
    for name in ("disconnected", "keep_alive", "message_event", "response_started",
                 "response_complete"):  # fmt: skip
        assert name in cycle, f"RequestResponseCycle.{name} is gone"
    transport = drive([request_of(200)])  # the attributes the guard reads, on a live instance
    assert transport.written.startswith(b"HTTP/1.1 200")
    # Worker processes get the config pickled: the class travels by its import path.
    config = uvicorn.Config("service.app:app_from_environment", http=GuardedHttpProtocol)
    assert pickle.loads(pickle.dumps(config)).http is GuardedHttpProtocol


def test_a_client_refused_for_overload_is_not_read_from_until_its_retry_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection answers an early refusal (here the app's admission says 503 with
    Retry-After) before the body comes, then reads nothing more from that client for the
    hold-off, then drops the refused body and serves the next request as usual."""
    monkeypatch.setattr(limits, "MAX_HOLD_OFF_S", 0.2)
    refused_paths: list[str] = []

    def refuse(scope: dict[str, Any]) -> tuple[Any, bytes] | None:
        if scope["path"] != "/full":
            return None
        refused_paths.append(scope["path"])
        return Response(503, b'{"error": "overloaded"}', [(b"retry-after", b"1")]), b"id-1"

    async def run() -> tuple[FakeTransport, list[bool]]:
        limits._limits = FrontLimits(1024, 10.0, 10.0, 10.0, 100)
        config = uvicorn.Config(echo_length, log_level="warning")
        protocol = GuardedHttpProtocol(config, ServerState(), {limits.EARLY_REFUSAL: refuse})
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"POST /full HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\n")
        reading = [transport.reading]
        await asyncio.sleep(0.05)
        reading.append(transport.reading)
        await asyncio.sleep(0.5)
        reading.append(transport.reading)
        protocol.data_received(b"12345" + request_of(60, b"abc"))
        for _ in range(10):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport, reading

    saved = limits._limits
    try:
        transport, reading = asyncio.run(run())
    finally:
        limits._limits = saved
    assert refused_paths == ["/full"]
    assert reading == [False, False, True]
    first, second = bytes(transport.written).split(b"HTTP/1.1 ")[1:]
    assert (
        first.startswith(b"503 ") and b"retry-after: 1" in first and b"x-request-id: id-1" in first
    )
    assert b"connection: close" not in first
    assert second.startswith(b"200 ") and second.endswith(b"\r\n\r\n3"), second
