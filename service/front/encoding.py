"""HTTP content codings: compressed request bodies in, compressed answers out.

Triton accepts ``Content-Encoding: gzip`` and ``deflate`` on requests and answers in the coding
that ``Accept-Encoding`` asks for; tritonclient's ``request_compression_algorithm`` and
``response_compression_algorithm`` use exactly these. With the binary tensor extension,
``Inference-Header-Content-Length`` is the *uncompressed* JSON header's length, both ways:
the body is decompressed first and split after, as if it had never been compressed.

A request body is inflated as its chunks arrive, never held compressed and whole, and the
inflated size is bounded by the same ``max_request_bytes`` as a plain body: a zip bomb (1 MB
of zeros is 1 KB of gzip) is refused with 413 as soon as its output passes the limit, having
cost at most the limit in memory. Inflating yields to the event loop after every
``_SLICE_BYTES`` of output so that one large body cannot stall other clients.

"deflate" is the zlib format (RFC 9110; what tritonclient sends); a raw deflate stream, which
some clients send under that name, is accepted too. Any other coding is refused with 415.
Answers are compressed at level 1: most of the size gain for tensors, at a fraction of the
CPU of the default level (see the README's numbers).
"""

from __future__ import annotations

import asyncio
import zlib

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedEncoding

SUPPORTED = ("gzip", "deflate")
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_SLICE_BYTES = 256 * 1024
_LEVEL = 1


def request_coding(header: str | None) -> str | None:
    """The request's content coding ("gzip" or "deflate"), None for an uncompressed body."""
    if header is None:
        return None
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in _WBITS:
        raise UnsupportedEncoding(
            f"Content-Encoding {header[:64]!r} is not supported; use one of gzip, deflate"
        )
    return "gzip" if codings[0] == "x-gzip" else codings[0]


class Inflater:
    """One compressed body, fed chunk by chunk; its output bounded by ``limit`` bytes."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] = []
        self._inflater = zlib.decompressobj(_WBITS[coding])
        self._started = False
        self._head = b""

    async def feed(self, data: bytes) -> None:
        if not self._started:
            # "deflate" is the zlib format, or raw deflate from some clients: told apart by
            # the first two bytes, which may arrive in separate chunks.
            self._head += data
            if self.coding == "deflate" and len(self._head) < 2:
                return
            data, self._head = self._head, b""
            self._started = True
            if self.coding == "deflate" and not _zlib_header(data):
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        while data:
            if self._inflater.eof:
                self._next_member()
            room = min(_SLICE_BYTES, self.limit - self.size + 1)
            try:
                out = self._inflater.decompress(data, room)
            except zlib.error:
                raise InvalidInput(f"request body is not valid {self.coding} data") from None
            self.size += len(out)
            if self.size > self.limit:
                raise PayloadTooLarge(
                    f"request body exceeds the limit of {self.limit} bytes once decompressed"
                )
            if out:
                self._chunks.append(out)
            # Input left: output was capped at `room` (more to inflate), or a member ended.
            data = (
                self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
            )
            if len(out) == room:
                await asyncio.sleep(0)  # let other requests run between slices

    def _next_member(self) -> None:
        """After one gzip member, another may follow (concatenated gzip files are valid)."""
        if self.coding != "gzip":
            raise InvalidInput(f"request body has data after the end of its {self.coding} stream")
        self._inflater = zlib.decompressobj(_WBITS["gzip"])

    def finish(self) -> bytes:
        """The whole inflated body; InvalidInput when the stream stopped before its end."""
        if self._head:  # one byte of a deflate body: no stream can be that short
            raise InvalidInput(f"request body is truncated {self.coding} data")
        if self._started and not self._inflater.eof:
            raise InvalidInput(f"request body is truncated {self.coding} data")
        tail = self._inflater.flush()
        self.size += len(tail)
        if self.size > self.limit:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {self.limit} bytes once decompressed"
            )
        if tail:
            self._chunks.append(tail)
        return b"".join(self._chunks)


def _zlib_header(data: bytes) -> bool:
    """CMF (compression method 8, deflate) and FLG, whose 16-bit value is a multiple of 31."""
    return (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0


def response_coding(accept: str | None) -> str | None:
    """The coding to answer in for ``Accept-Encoding``: gzip, else deflate, else None.

    Codings with ``q=0`` are refused ones; ``*`` stands for any coding not named.
    """
    if not accept:
        return None
    weights: dict[str, float] = {}
    for part in accept.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name:
            weights[name] = q
    for coding in SUPPORTED:
        if weights.get(coding, weights.get("*", 0.0)) > 0:
            return coding
    return None


def compress(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()
