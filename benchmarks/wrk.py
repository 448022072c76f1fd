"""A small driver for wrk (https://github.com/wg/wrk), the HTTP load generator of the benchmarks.

wrk is a C event loop that keeps ``connections`` keep-alive connections busy from ``threads``
OS threads: unlike a Python client it is not the bottleneck when it loads a Python server on
the same machine. This module POSTs one fixed body on every request and reads wrk's numbers
from a JSON line that a Lua ``done()`` callback writes, never from wrk's human-readable text.

Loopback only: the load tests of this project may target 127.0.0.1 or localhost and nothing
else, so ``run_wrk`` refuses any other host before it starts anything.

wrk 4.1.0 facts this relies on (checked against the Debian build, ``wrk debian/4.1.0-3+b2``):

- ``-d`` and ``--timeout`` take whole numbers with an optional unit (``2s``, ``1m``): neither
  ``1500ms`` nor ``1.5s`` is accepted. Fractional durations therefore run ``-d`` rounded up and
  are cut short with SIGINT, which wrk handles by stopping the run and reporting it normally.
- ``summary.requests`` counts every complete response, whatever its status; statuses above 399
  are also counted in ``summary.errors.status``. Requests still in flight when the run stops are
  in neither count (the server may have handled them).
- Latencies are in microseconds; requests slower than ``--timeout`` are counted as timeout
  errors and are not in the latency histogram.
- A ``response()`` Lua callback makes wrk parse every response in Lua and slows it down a lot:
  the script below defines only ``init()`` and ``done()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

WRK_INSTALL_HINT = "wrk is not installed (Debian package 'wrk')"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})
# Beyond the run itself and wrk's own request timeout: start-up, thread joins, slack.
_EXTRA_WAIT_S = 30.0
# The prefix of the one line of stdout that the Lua done() callback writes.
_JSON_MARKER = "NORMSERVE_WRK_JSON "
_TAIL_CHARS = 2000
# Bytes that may appear as themselves inside a double-quoted Lua string literal; every other
# byte (quotes, backslashes, control and non-ASCII bytes) is written as a \ddd escape.
_LUA_PLAIN = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#$%&'()*+,-./:;<=>?@[]^_`{|}~"
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")  # visible ASCII: no CR/LF header injection
# wrk computes Content-Length from the body itself; a second one would make the request invalid.
_RESERVED_HEADERS = frozenset({"content-length", "content-type"})


@dataclass(frozen=True)
class WrkErrors:
    """wrk's error counters for one run (``summary.errors``)."""

    connect: int
    read: int
    write: int
    timeout: int
    status: int  # responses with a status above 399 (also counted in WrkResult.requests)

    @property
    def total(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.status


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: the load it offered and what it measured. Latencies in milliseconds."""

    connections: int
    threads: int
    duration_s: float  # measured by wrk, from the start of the load to the last thread's stop
    requests: int  # complete responses, any status
    requests_per_s: float  # requests / duration_s, as wrk computes its Requests/sec
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    errors: WrkErrors

    @property
    def errors_total(self) -> int:
        return self.errors.total

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, with ``errors_total`` next to the error counters."""
        data = dataclasses.asdict(self)
        data["errors_total"] = self.errors_total
        return data


def wrk_available() -> str | None:
    """None when wrk is installed and runs, else the reason why not (for skips and messages).

    Runs ``wrk -v`` once: a binary that is on PATH but cannot start (a missing libluajit, say)
    must be reported here rather than as a failed benchmark later.
    """
    path = shutil.which("wrk")
    if path is None:
        return WRK_INSTALL_HINT
    try:
        proc = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"wrk at {path} does not run: {exc}"
    output = proc.stdout + proc.stderr
    # `wrk -v` prints "wrk <version> [<event backend>] Copyright ..." and the usage, exit code 1.
    if not re.match(r"wrk \S+ \[", output):
        return f"wrk at {path} does not run: {_tail(output)}"
    return None


def run_wrk(
    url: str,
    body: bytes | Sequence[bytes],
    *,
    content_type: str,
    headers: Mapping[str, str] | None = None,
    connections: int,
    duration_s: float,
    threads: int | None = None,
    timeout_s: float = 10,
    workdir: Path,
    stop: threading.Event | None = None,
) -> WrkResult:
    """POST ``body`` to ``url`` from ``connections`` keep-alive connections for ``duration_s``.

    Several bodies are sent in turn (each wrk thread cycles through them): requests of
    different shapes mixed, as a variable-length model receives them. Their requests are
    formatted once, in ``init()``; a ``request()`` callback only hands the next one out.

    ``headers`` are sent on every request next to Content-Type (for instance
    Inference-Header-Content-Length for the V2 binary tensor extension); Content-Length is
    wrk's. ``threads`` defaults to min(connections, 2): wrk needs connections >= threads, and
    this project's machines have few cores that the server under test needs more. wrk's
    ``--timeout`` is ``timeout_s`` rounded up to whole seconds. The body and the Lua script are
    written to ``workdir`` under content-hashed names (concurrent runs never clobber each other,
    repeated runs reuse them) and left there, so that a run can be repeated by hand. ``stop``,
    set from another thread, ends the run early (SIGINT, as for fractional durations): for load
    that must last exactly as long as something else does, ``duration_s`` being its bound.

    Raises ValueError for a host other than loopback or impossible settings, RuntimeError when
    wrk is missing, fails, hangs or reports no result.
    """
    _check_loopback(url)
    extra = dict(headers or {})
    _check_headers({"Content-Type": content_type, **extra})
    for name in extra:
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(
                f"header {name!r} is set by run_wrk itself (Content-Type: pass content_type)"
            )
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    threads = min(connections, 2) if threads is None else threads
    if not 1 <= threads <= connections:
        raise ValueError(f"threads must be in 1..connections ({connections}), got {threads}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number, got {duration_s}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number, got {timeout_s}")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError(WRK_INSTALL_HINT)

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    contents = [body] if isinstance(body, bytes) else list(body)
    if not contents:
        raise ValueError("no body to send")
    paths = [_write_once(workdir, "wrk-body", ".bin", content) for content in contents]
    headers = {"Content-Type": content_type, **extra}
    script = _lua_script(paths[0], headers) if len(paths) == 1 else _lua_cycle(paths, headers)
    script_path = _write_once(workdir, "wrk-script", ".lua", script.encode())

    # wrk's -d takes whole seconds: a fractional duration runs the next whole second and is
    # interrupted (SIGINT) after exactly duration_s.
    whole_s = math.ceil(duration_s)
    interrupt_after = None if whole_s == duration_s else duration_s
    command = [
        wrk,
        "--connections", str(connections),
        "--threads", str(threads),
        "--duration", f"{whole_s}s",
        "--timeout", f"{math.ceil(timeout_s)}s",
        "--script", str(script_path),
        url,
    ]  # fmt: skip
    stdout, stderr, returncode = _run(command, interrupt_after, duration_s + timeout_s, stop)

    if returncode != 0:
        raise RuntimeError(
            f"wrk exited with {returncode}: {' '.join(command)}\n"
            f"stderr: {_tail(stderr)}\nstdout: {_tail(stdout)}"
        )
    payload = _find_json(stdout)
    if payload is None:
        raise RuntimeError(
            f"wrk printed no JSON result line: {' '.join(command)}\n"
            f"stderr: {_tail(stderr)}\nstdout: {_tail(stdout)}"
        )
    return _result(payload, connections=connections, threads=threads)


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``, its threads and its descendants.

    Read from /proc so that a server's CPU during a load run is the difference of two calls,
    whatever runs it: uvicorn's worker processes are children of the process we started.
    A process's /proc/<pid>/stat already sums all its threads; descendants are found through
    /proc/<pid>/task/*/children (one file per thread: a child belongs to the thread that forked
    it). The children's cutime/cstime is added as well: a descendant that exited and was reaped
    during the run moves its CPU there, so the difference between two calls does not lose it.
    Raises ProcessLookupError when ``pid`` itself is gone.
    """
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    total_ticks = 0
    pending, seen = [pid], set[int]()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            if current == pid:
                raise ProcessLookupError(f"no process {pid}") from None
            continue  # a descendant that exited between the listing and now
        # The command name (field 2) is in parentheses and may contain spaces and ')':
        # the fields after the last ')' start at field 3 (state); utime..cstime are 14..17.
        fields = stat[stat.rindex(")") + 2 :].split()
        total_ticks += sum(int(value) for value in fields[11:15])
        pending.extend(_children(current))
    return total_ticks / ticks_per_s


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return children
    for task in tasks:
        try:
            children.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that exited meanwhile
    return children


def _check_loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"wrk needs an http:// or https:// URL, got {url!r}")
    if parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(
            f"load tests may only target loopback (127.0.0.1 or localhost), not "
            f"{parts.hostname!r} in {url!r}"
        )


def _check_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"invalid HTTP header name {name!r}")
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError(f"invalid HTTP header value for {name!r}: {value!r}")


def _write_once(workdir: Path, prefix: str, suffix: str, content: bytes) -> Path:
    """``content`` at a name derived from its hash, written atomically unless already there."""
    path = workdir / f"{prefix}-{hashlib.sha256(content).hexdigest()[:16]}{suffix}"
    if not path.exists():
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(content)
        os.replace(partial, path)
    return path


def _lua_string(value: str | bytes) -> str:
    """A double-quoted Lua literal of ``value``'s bytes; every unusual byte as a \\ddd escape
    (always three digits, so that a following digit never joins the escape)."""
    raw = value.encode() if isinstance(value, str) else value
    return '"' + "".join(chr(b) if b in _LUA_PLAIN else f"\\{b:03d}" for b in raw) + '"'


def _lua_script(body_path: Path, headers: Mapping[str, str]) -> str:
    header_lines = "\n".join(
        f"  wrk.headers[{_lua_string(name)}] = {_lua_string(value)}"
        for name, value in headers.items()
    )
    # init() runs once per wrk thread, before wrk builds the request it then sends unchanged
    # (no request() callback: a dynamic request is built in Lua for every send, much slower).
    # done() runs once in the main thread after every thread stopped. Numbers are formatted
    # by hand: wrk's Lua (LuaJIT) has no JSON library. An empty run has mean 0 or NaN.
    return f"""\
-- Generated by benchmarks/wrk.py: POST one fixed body, report the run as one JSON line.
function init(args)
  local file = assert(io.open({_lua_string(str(body_path))}, "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
{header_lines}
end

function done(summary, latency, requests)
  local errors = summary.errors
  local mean = latency.mean
  if mean ~= mean then mean = 0 end
  io.write(string.format(
    "\\n{_JSON_MARKER}{{\\"duration_us\\":%d,\\"requests\\":%d,"
      .. "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"timeout\\":%d,\\"status\\":%d,"
      .. "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"p999_us\\":%d,"
      .. "\\"max_us\\":%d,\\"mean_us\\":%.3f}}\\n",
    summary.duration, summary.requests,
    errors.connect, errors.read, errors.write, errors.timeout, errors.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, mean))
  io.flush()
end
"""


def _lua_cycle(body_paths: Sequence[Path], headers: Mapping[str, str]) -> str:
    """``_lua_script``'s run with the bodies sent in turn, each request formatted once."""
    single = _lua_script(body_paths[0], headers)
    done = single[single.index("function done(") :]
    header_lines = "\n".join(
        f"  wrk.headers[{_lua_string(name)}] = {_lua_string(value)}"
        for name, value in headers.items()
    )
    files = ", ".join(_lua_string(str(p)) for p in body_paths)
    return f"""\
-- Generated by benchmarks/wrk.py: POST {len(body_paths)} bodies in turn, report as one JSON line.
local requests = {{}}
local turn = 0

function init(args)
  wrk.method = "POST"
{header_lines}
  for _, path in ipairs({{{files}}}) do
    local file = assert(io.open(path, "rb"))
    requests[#requests + 1] = wrk.format(nil, nil, nil, file:read("*a"))
    file:close()
  end
end

function request()
  turn = turn % #requests + 1
  return requests[turn]
end

{done}"""


def _sigint_caught(pid: int) -> bool:
    """Whether ``pid`` has a SIGINT handler installed (the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def _run(
    command: list[str],
    interrupt_after: float | None,
    run_s: float,
    stop: threading.Event | None = None,
) -> tuple[str, str, int]:
    """Runs wrk; SIGINT after ``interrupt_after`` seconds of load when set, or as soon as
    ``stop`` is set. (stdout, stderr, rc).

    The clock for the interrupt starts when wrk has installed its SIGINT handler: wrk does that
    right after it started its threads and just before it takes its own start time, and a
    SIGINT before that would kill wrk outright. Bounded by run_s + 30 s; killed after that.
    """
    deadline = time.monotonic() + run_s + _EXTRA_WAIT_S
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    ) as proc:
        try:
            if interrupt_after is not None or stop is not None:
                # Popen returns after exec, so the handler state seen here is wrk's own.
                while proc.poll() is None and time.monotonic() < deadline:
                    if _sigint_caught(proc.pid):
                        _interrupt_when(proc, interrupt_after, stop)
                        break
                    time.sleep(0.001)
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            return stdout, stderr, proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise RuntimeError(
                f"wrk did not finish within {run_s + _EXTRA_WAIT_S:.0f} s and was killed: "
                f"{' '.join(command)}\nstderr: {_tail(stderr)}\nstdout: {_tail(stdout)}"
            ) from None
        finally:
            # Interrupted ourselves (KeyboardInterrupt, say): never leave wrk loading the server.
            if proc.poll() is None:
                proc.kill()


def _interrupt_when(
    proc: subprocess.Popen[str], after: float | None, stop: threading.Event | None
) -> None:
    """SIGINT to wrk once ``after`` seconds passed or ``stop`` is set, unless it ended first.

    wrk writes nothing until its run ends, so its pipes cannot fill while this waits.
    """
    started = time.monotonic()
    while proc.poll() is None:
        if (after is not None and time.monotonic() - started >= after) or (
            stop is not None and stop.is_set()
        ):
            proc.send_signal(signal.SIGINT)
            return
        if stop is not None:
            stop.wait(0.005)
        else:
            time.sleep(0.005)


def _find_json(stdout: str) -> dict[str, Any] | None:
    """The payload of the last JSON line of done(), None when there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(_JSON_MARKER):
            payload: dict[str, Any] = json.loads(line[len(_JSON_MARKER) :])
            return payload
    return None


def _result(payload: Mapping[str, Any], *, connections: int, threads: int) -> WrkResult:
    duration_s = payload["duration_us"] / 1e6
    requests = int(payload["requests"])
    return WrkResult(
        connections=connections,
        threads=threads,
        duration_s=duration_s,
        requests=requests,
        requests_per_s=requests / duration_s if duration_s > 0 else 0.0,
        p50_ms=payload["p50_us"] / 1000,
        p90_ms=payload["p90_us"] / 1000,
        p99_ms=payload["p99_us"] / 1000,
        p999_ms=payload["p999_us"] / 1000,
        max_ms=payload["max_us"] / 1000,
        mean_ms=payload["mean_us"] / 1000,
        errors=WrkErrors(
            connect=int(payload["connect"]),
            read=int(payload["read"]),
            write=int(payload["write"]),
            timeout=int(payload["timeout"]),
            status=int(payload["status"]),
        ),
    )


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]
