"""Processes of the benchmark: free loopback ports, process trees and their memory, from /proc.

Shared by our server's harness and MLServer's, so both are measured the same way.
"""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":  # a zombie has exited: nothing left to stop
        return None
    return int(fields[19])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def tree_rss_bytes(pid: int) -> int:
    """The summed VmRSS of ``pid`` and all its descendants, in bytes.

    A sum of RSS counts pages shared between processes (libraries, copy-on-write) once per
    process, as ``ps`` and container memory limits per process would: it is what N separate
    processes cost, measured the same way for both servers.
    """
    return sum(_rss_bytes(member) for member in [pid, *descendants(pid)])


def largest_rss_bytes(pid: int) -> int:
    """The VmRSS of the largest process among ``pid`` and its descendants: one worker's
    memory when the server runs several (the supervisor holds no models)."""
    return max(_rss_bytes(member) for member in [pid, *descendants(pid)])


def _rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0  # exited meanwhile
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB
    return 0
