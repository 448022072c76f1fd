"""OneSend: an answer's head and body leave in one write, nothing is lost or reordered."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.front.writes import OneSend


@dataclass
class RecordingTransport:
    """Stands in for the socket's transport: records each system-call-sized write."""

    writes: list[bytes] = field(default_factory=list)
    closed: bool = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.writes.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@dataclass
class Cycle:
    method: str = "POST"
    response_started: bool = False

    @property
    def scope(self) -> dict[str, str]:
        return {"method": self.method}


def _one_send(method: str = "POST") -> tuple[OneSend, RecordingTransport, Cycle]:
    transport, cycle = RecordingTransport(), Cycle(method)
    return OneSend(transport, cycle), transport, cycle  # type: ignore[arg-type]


def test_head_and_body_leave_together_and_later_chunks_alone() -> None:
    send, transport, cycle = _one_send()
    cycle.response_started = True
    send.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
    assert transport.writes == []
    send.write(b"ab")
    send.write(b"cd")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", b"cd"]


def test_what_precedes_an_answer_is_not_held() -> None:
    send, transport, cycle = _one_send()
    send.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # sent while the app reads the body
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    send.write(b"HEAD")
    send.write(b"BODY")
    assert transport.writes[1:] == [b"HEADBODY"]


def test_a_held_head_is_sent_before_the_connection_closes() -> None:
    send, transport, cycle = _one_send()
    cycle.response_started = True
    send.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    send.close()
    assert transport.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"]
    assert transport.closed and send.is_closing()


def test_the_head_of_an_answer_to_head_is_not_held() -> None:
    # uvicorn writes no body at all for HEAD: a held head would never leave.
    send, transport, cycle = _one_send("HEAD")
    cycle.response_started = True
    send.write(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"]
