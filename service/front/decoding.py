"""Large request bodies are decoded in a child process, so the event loop never stalls.

orjson holds the GIL while it parses: 8 MB of JSON tensors took 75-110 ms here, and a worker
*thread* doing it delayed every other client's health check by as much (measured: 78-210 ms
worst with four such bodies). A child process shares no GIL. Bodies up to OFF_LOOP_BYTES
(~10 ms of decoding) are decoded in place: sending one to the child would cost more.

The child starts at the first large body (numpy, orjson and the codecs, no onnxruntime:
~40 MB), decodes one body at a time, and gets the body and the model's Signature; it sends
back the decoded tensors or the InvalidInput that refused them. At most MAX_WAITING large
bodies wait for it; beyond that a large request is refused as overload (503), before its
body is read, so that a flood of large bodies cannot pile up in memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from service.errors import Overloaded

log = logging.getLogger("normserve")

OFF_LOOP_BYTES = 1 << 20
MAX_WAITING = 4
T = TypeVar("T")


class BodyDecoder:
    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._waiting = 0

    def admit(self, declared: int | None) -> None:
        """Overloaded when a body this large would have to queue behind too many others."""
        if declared is not None and declared > OFF_LOOP_BYTES and self._waiting >= MAX_WAITING:
            raise Overloaded(f"{MAX_WAITING} large requests are already being decoded; retry later")

    async def __call__(self, size: int, decoder: Callable[..., T], *args: Any) -> T:
        """``decoder(*args)``: here for a small body, in the child for a large one."""
        if size <= OFF_LOOP_BYTES:
            return decoder(*args)
        self.admit(size)
        self._waiting += 1
        try:
            return await self._in_child(functools.partial(decoder, *args))
        finally:
            self._waiting -= 1

    async def _in_child(self, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            if self._pool is None:
                # spawn: a fork of a process with onnxruntime's threads is not safe.
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(
                    1, mp_context=context, initializer=_die_with, initargs=(os.getpid(),)
                )
            try:
                return await loop.run_in_executor(self._pool, call)
            except BrokenProcessPool:
                # The child died (killed for memory?): start a new one once for this body.
                log.error("the body decoding process died; starting another")
                self._pool = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _die_with(server_pid: int) -> None:
    """In the child: end with the server even when it is killed (SIGKILL, OOM) and cannot
    shut the pool down; otherwise the child and its resource tracker would outlive it."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server_pid:  # the server died before prctl took effect
            os._exit(0)


_PR_SET_PDEATHSIG = 1
