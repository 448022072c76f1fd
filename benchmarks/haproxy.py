"""HAProxy (Debian's package) in front of the rehearsal's replicas, read through its stats socket.

The configuration is what an orchestrator's load balancer does for this service: round robin
over the replicas, an HTTP health check of ``/v2/health/ready`` every ``CHECK_INTERVAL_MS``
(``FALL`` failures take a replica out, ``RISE`` successes bring it back), a replica whose
connections fail marked down at once from live traffic (``observe layer4``), and a request
whose connection was refused or whose server died before answering sent again to another
replica (``retry-on`` + ``redispatch``; ``retries=False`` shows what that hides). HAProxy
runs in the foreground as our child and is stopped by its PID.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CHECK_INTERVAL_MS = 200
FALL = 2
RISE = 2
# Live traffic counts too: one failed connection marks the replica down without waiting for
# the next check.
OBSERVE = "observe layer4 error-limit 1 on-error mark-down"
INSTALL_HINT = "haproxy is not installed (Debian package 'haproxy')"


def unavailable() -> str | None:
    return INSTALL_HINT if shutil.which("haproxy") is None else None


RETRIES = """\
    # A refused connection, or a server that died before it answered, is sent again, to
    # another replica: the client never sees it.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout"""
NO_RETRIES = """\
    # Every failure reaches the client (what the rehearsal compares against).
    retries 0"""


def config(
    port: int, servers: list[tuple[str, str]], stats_socket: Path, retries: bool = True
) -> str:
    """``servers``: (name, host:port). Listens on 127.0.0.1:``port`` only. ``retries``: send a
    request that met a closed port or a dead server again (otherwise the client gets the 5xx)."""
    lines = "\n".join(f"    server {name} {address}" for name, address in servers)
    return f"""\
global
    stats socket {stats_socket} mode 600 level admin
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
{RETRIES if retries else NO_RETRIES}

frontend rehearsal
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server check inter {CHECK_INTERVAL_MS}ms fall {FALL} rise {RISE} {OBSERVE}
{lines}
"""


@dataclass(frozen=True)
class ServerStats:
    """One backend server's line of ``show stat``."""

    status: str  # UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (coming up), MAINT
    sessions: int  # stot: requests (sessions) ever sent to it
    current: int  # scur: in flight now
    connect_errors: int  # econ
    response_errors: int  # eresp
    retries: int  # wretr
    redispatches: int  # wredis

    @property
    def up(self) -> bool:
        return self.status == "UP"


class HAProxy:
    def __init__(
        self, port: int, servers: list[tuple[str, str]], workdir: Path, retries: bool = True
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = workdir / "haproxy.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config(port, servers, self.socket_path, retries))
        self.log_path = workdir / "haproxy.log"
        self.socket_path.unlink(missing_ok=True)  # a stale one would answer nothing
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its configuration:\n{check.stderr[-2000:]}")
        with self.log_path.open("wb") as log:
            # -db: foreground, no daemon: the PID we hold is HAProxy's own.
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config_path)], stdout=log, stderr=log
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:  # up when its stats socket answers
            try:
                self.command("show info")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    log = self.log_path.read_text()[-2000:]
                    raise RuntimeError(f"haproxy did not start:\n{log}") from None
                time.sleep(0.02)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, ServerStats]:
        """The backend's servers by name."""
        text = self.command("show stat").removeprefix("# ")
        found = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] != "replicas" or row["svname"] in ("FRONTEND", "BACKEND"):
                continue
            found[row["svname"]] = ServerStats(
                status=row["status"],
                sessions=int(row["stot"] or 0),
                current=int(row["scur"] or 0),
                connect_errors=int(row["econ"] or 0),
                response_errors=int(row["eresp"] or 0),
                retries=int(row["wretr"] or 0),
                redispatches=int(row["wredis"] or 0),
            )
        return found

    def wait_status(self, server: str, up: bool, timeout_s: float) -> float:
        """Seconds until ``server`` is UP (or DOWN); polled every 10 ms."""
        started = time.monotonic()
        while True:
            status = self.stats()[server].status
            if (status == "UP") if up else status.startswith("DOWN"):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{server} still {status} after {timeout_s:.0f} s")
            time.sleep(0.01)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # HAProxy's own PID
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
