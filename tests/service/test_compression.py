"""Compressed requests and answers against a real server, with tritonclient's own options.

tritonclient compresses the whole request body (JSON header and binary tail together) and
keeps ``Inference-Header-Content-Length`` at the uncompressed header's length; it asks for
compressed answers with ``Accept-Encoding`` and decompresses them itself. The raw cases pin
what the client cannot show: a bomb is a 413 whatever its compressed size, an unknown coding
a 415, a body too large to decode on the event loop still decodes once inflated.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from servers import RunningServer, running_server
from tiny_onnx import FEATURES, expected, tiny_repository

BODY_LIMIT = 4 * 1024 * 1024  # this module's server: --max-request-bytes
ROWS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("compression")
    repository = tiny_repository(root, max_batch_size=100_000)
    with running_server(repository, root, "--max-request-bytes", str(BODY_LIMIT)) as running:
        yield running


def rows(n: int = ROWS) -> np.ndarray:
    return np.arange(n * FEATURES, dtype=np.float32).reshape(n, FEATURES) / 7


def tensors(x: np.ndarray, binary: bool) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return [tensor]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("request_coding", ["gzip", "deflate"])
@pytest.mark.parametrize("response_coding", ["gzip", "deflate", None])
def test_tritonclient_compression(
    server: RunningServer, binary: bool, request_coding: str, response_coding: str | None
) -> None:
    x = rows()
    with httpclient.InferenceServerClient(server.url) as client:
        result = client.infer(
            "tiny",
            tensors(x, binary),
            outputs=[httpclient.InferRequestedOutput("scores", binary_data=binary)],
            request_compression_algorithm=request_coding,
            response_compression_algorithm=response_coding,
        )
    np.testing.assert_allclose(result.as_numpy("scores"), expected(x), rtol=1e-6)


def test_aio_client_compression_and_its_default_accept_encoding(server: RunningServer) -> None:
    """The aio client sends aiohttp's default Accept-Encoding on every call and decompresses
    only inference results: metadata must stay uncompressed, inference may not."""
    x = rows()

    async def run() -> tuple[np.ndarray, dict[str, object]]:
        client = aioclient.InferenceServerClient(server.url)
        try:
            result = await client.infer(
                "tiny",
                tensors(x, True),
                request_compression_algorithm="gzip",
                response_compression_algorithm="gzip",
            )
            metadata = await client.get_model_metadata("tiny")
            return result.as_numpy("scores"), metadata
        finally:
            await client.close()

    scores, metadata = asyncio.run(run())
    np.testing.assert_allclose(scores, expected(x), rtol=1e-6)
    assert metadata["name"] == "tiny"


def v2_json(x: np.ndarray) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor]})


def test_answers_follow_accept_encoding(server: RunningServer) -> None:
    x = rows()
    path = f"{server.http_url}/v2/models/tiny/infer"
    # httpx would decompress by itself: read the raw stream to see what was sent.
    with httpx.Client() as http:
        for accept, coding in [
            ("gzip", "gzip"),
            ("deflate", "deflate"),
            ("br, deflate;q=0.5", "deflate"),
            ("gzip;q=0, deflate", "deflate"),
            ("*", "gzip"),
            ("identity", None),
            ("br", None),
        ]:
            request = http.build_request(
                "POST", path, content=v2_json(x), headers={"Accept-Encoding": accept}
            )
            response = http.send(request, stream=True)
            raw = b"".join(response.iter_raw())
            assert response.status_code == 200
            assert response.headers.get("content-encoding") == coding, accept
            body = {"gzip": gzip.decompress, "deflate": zlib.decompress}.get(
                coding or "", lambda b: b
            )(raw)
            (out,) = orjson.loads(body)["outputs"]
            np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), expected(x), 1e-6)
        # Only inference answers are compressed (Triton's behaviour, and the aio client's need).
        meta = http.send(
            http.build_request("GET", f"{server.http_url}/v2/models/tiny"),
            stream=True,
        )
        meta.read()
        assert "content-encoding" not in meta.headers


def raw_post(server: RunningServer, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One HTTP/1.1 request over a plain socket: the status and the body, nothing decoded."""
    host, port = server.url.split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Length: {len(body)}\r\n{head}Connection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_a_zip_bomb_is_refused_once_past_the_limit(server: RunningServer) -> None:
    # 64 MiB of inflated JSON whitespace in about 64 KB: 16x the body limit.
    bomb = gzip.compress(b'{"inputs": [' + b" " * (16 * BODY_LIMIT), compresslevel=9)
    assert len(bomb) < BODY_LIMIT // 8
    status, body = raw_post(server, bomb, {"Content-Encoding": "gzip"})
    assert status == 413, body
    assert b"once decompressed" in body
    # Just over the limit is refused too; just under is decoded (and then judged as JSON).
    over = gzip.compress(b" " * (BODY_LIMIT + 1))
    assert raw_post(server, over, {"Content-Encoding": "gzip"})[0] == 413
    under = gzip.compress(v2_json(rows()).ljust(BODY_LIMIT - 16))
    status, body = raw_post(server, under, {"Content-Encoding": "gzip"})
    assert status == 200, body
    assert httpx.get(f"{server.http_url}/v2/health/live").status_code == 200


@pytest.mark.parametrize(
    ("body", "headers", "status", "fragment"),
    [
        (b"x", {"Content-Encoding": "br"}, 415, b"not supported; use one of gzip, deflate"),
        (b"x", {"Content-Encoding": "gzip, gzip"}, 415, b"not supported"),
        (b"plain text, not gzip", {"Content-Encoding": "gzip"}, 400, b"not valid gzip"),
        (gzip.compress(b'{"inputs": []}')[:-6], {"Content-Encoding": "gzip"}, 400, b"truncated"),
        (gzip.compress(b'{"inputs": ['), {"Content-Encoding": "gzip"}, 400, b"not valid JSON"),
        (zlib.compress(b"{}") + b"tail", {"Content-Encoding": "deflate"}, 400, b"after the end"),
    ],
    ids=["br", "gzip-twice", "corrupt", "truncated", "bad-json-inside", "deflate-trailing"],
)
def test_bad_compressed_bodies_are_precise_4xx(
    server: RunningServer, body: bytes, headers: dict[str, str], status: int, fragment: bytes
) -> None:
    got, answer = raw_post(server, body, headers)
    assert got == status, answer
    assert fragment in orjson.loads(answer)["error"].encode()


def test_raw_deflate_and_a_body_decoded_off_the_loop(server: RunningServer) -> None:
    # ~2.5 MB of JSON once inflated: past the 1 MiB above which bodies are decoded in the
    # child process (service.front.decoding), so the inflated body is what goes there.
    x = rows(40_000)
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = raw.compress(v2_json(x)) + raw.flush()
    status, answer = raw_post(server, body, {"Content-Encoding": "deflate"})
    assert status == 200, answer[:300]
    (out,) = orjson.loads(answer)["outputs"]
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), expected(x), rtol=1e-5)


def test_binary_header_length_is_the_uncompressed_one(server: RunningServer) -> None:
    x = rows()
    head = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                     "parameters": {"binary_data_size": x.nbytes}}]}
    )  # fmt: skip
    body = gzip.compress(head + x.tobytes())
    length = {"Inference-Header-Content-Length": str(len(head)), "Content-Encoding": "gzip"}
    status, answer = raw_post(server, body, length)
    assert status == 200, answer
    (out,) = orjson.loads(answer)["outputs"]
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), expected(x), rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20], ids=["1-byte", "7-byte", "whole"])
def test_inflating_does_not_depend_on_how_the_body_is_chunked(chunk: int) -> None:
    """Any chunking of the body (the two bytes that tell zlib from raw deflate may arrive
    apart), concatenated gzip members, and an output exactly at the limit."""
    from service.front.encoding import Inflater

    body = bytes(range(256)) * 2000
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    cases = {
        "gzip": gzip.compress(body),
        "gzip-members": gzip.compress(body[:1000]) + gzip.compress(body[1000:]),
        "zlib": zlib.compress(body),
        "raw-deflate": raw.compress(body) + raw.flush(),
    }

    async def inflate(coding: str, data: bytes) -> bytes:
        inflater = Inflater(coding, len(body))
        for start in range(0, len(data), chunk):
            await inflater.feed(data[start : start + chunk])
        return inflater.finish()

    for name, data in cases.items():
        coding = "gzip" if name.startswith("gzip") else "deflate"
        assert asyncio.run(inflate(coding, data)) == body, name
