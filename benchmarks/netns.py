"""Server replicas in network namespaces of their own, as pods are: the scale-out rehearsal's
machines on one host (``python -m benchmarks.rehearse``).

Each replica gets a namespace ``nsv-<pid>-<i>`` with its loopback up and a veth pair to the
root namespace on a /30 of 10.231.0.0/16 (the host end ``.1``, the replica ``.2``), so it has
an address of its own, its own port space and its own listen socket, and a load balancer in the
root namespace reaches it like a pod IP. Needs root (CAP_NET_ADMIN) and iproute2's ``ip``.
Everything made here is removed by ``close()``: the processes by their PID, then the links
and the namespaces by name.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A private range no interface here uses (checked before use): 10.231.<octet>.<4i+1|4i+2>.
PREFIX = "10.231"
SERVER_PORT = 8000


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can (a probe creates one)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN): run as root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (Debian package 'iproute2')"
    probe = f"nsv-{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _free_octet() -> int:
    """A third octet whose 10.231.X.0/24 no interface of this host has an address in."""
    used = ip("-o", "addr").stdout
    start = os.getpid() % 250
    for offset in range(250):
        octet = (start + offset) % 250
        if f" {PREFIX}.{octet}." not in used:
            return octet
    raise RuntimeError(f"every {PREFIX}.X.0/24 is in use on this host")


@dataclass
class Replica:
    """One ``python -m service`` in namespace ``namespace``, listening on ``address:8000``."""

    index: int
    namespace: str
    address: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.address}:{SERVER_PORT}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"


@dataclass
class Cluster:
    """``count`` namespaces with a veth pair each; replicas started and stopped by index."""

    count: int
    log_dir: Path
    server_args: tuple[str, ...] = ()
    replicas: list[Replica] = field(default_factory=list)
    _links: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        octet, pid = _free_octet(), os.getpid()
        try:
            for i in range(self.count):
                namespace, host_end, ns_end = f"nsv-{pid}-{i}", f"nsv{pid}h{i}", f"nsv{pid}n{i}"
                net = ipaddress.ip_network(f"{PREFIX}.{octet}.{4 * i}/30")
                host_ip, ns_ip = (str(a) for a in net.hosts())
                ip("netns", "add", namespace)
                self.replicas.append(
                    Replica(i, namespace, ns_ip, self.log_dir / f"replica-{i}.log")
                )
                ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
                self._links.append(host_end)
                ip("link", "set", ns_end, "netns", namespace)
                ip("addr", "add", f"{host_ip}/30", "dev", host_end)
                ip("link", "set", host_end, "up")
                inside = ("netns", "exec", namespace, "ip")
                ip(*inside, "addr", "add", f"{ns_ip}/30", "dev", ns_end)
                ip(*inside, "link", "set", ns_end, "up")
                ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def start(self, index: int, repository: Path) -> Replica:
        """Starts replica ``index`` serving ``repository`` (its log appended to)."""
        replica = self.replicas[index]
        assert not replica.running(), f"replica {index} is already running"
        command = [
            "ip", "netns", "exec", replica.namespace,  # execs: the PID is the server's own
            sys.executable, "-m", "service", "--repository", str(repository),
            "--host", replica.address, "--port", str(SERVER_PORT), *self.server_args,
        ]  # fmt: skip
        with replica.log_path.open("ab") as log:
            replica.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        replica.starts += 1
        return replica

    def signal(self, index: int, sig: signal.Signals) -> None:
        proc = self.replicas[index].proc
        assert proc is not None and proc.poll() is None, f"replica {index} is not running"
        os.kill(proc.pid, sig)  # this replica's own PID, never a name

    def wait_exit(self, index: int, timeout_s: float) -> int:
        proc = self.replicas[index].proc
        assert proc is not None
        return proc.wait(timeout=timeout_s)

    def close(self) -> None:
        """Kills what still runs (by PID), then removes the links and the namespaces."""
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                os.kill(replica.proc.pid, signal.SIGKILL)
                replica.proc.wait(timeout=30)
        for link in self._links:
            ip("link", "del", link, check=False)  # also removes its peer in the namespace
        for replica in self.replicas:
            ip("netns", "del", replica.namespace, check=False)
        self._links.clear()
        self.replicas.clear()
