"""The router's HTTP/1.x response parser (sans I/O): framing, chunked decoding at every split, errors."""

from __future__ import annotations

import pytest

from router.h1_parser import ProtocolError, ResponseParser, content_length, parse_head

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"7\r\ndata: 1\r\n"
    b'9;ext="x"\r\n\n\ndata: 2\r\n'
    b"0002\r\n\n\n\r\n"
    b"0\r\nX-Trailer: yes\r\n\r\n"
)
CHUNKED_BODY = b"data: 1\n\ndata: 2\n\n"


def feed_all(parser: ResponseParser, pieces: list[bytes]) -> bytes:
    return b"".join(parser.feed(p) for p in pieces)


def test_chunked_whole_and_split_at_every_byte() -> None:
    whole = ResponseParser()
    assert whole.feed(CHUNKED) == CHUNKED_BODY and whole.done and not whole.extra
    assert whole.head is not None and whole.head.status == 200 and whole.head.keep_alive
    assert whole.head.content_type == "text/event-stream"
    for cut in range(1, len(CHUNKED)):  # two pieces, every split point
        p = ResponseParser()
        assert feed_all(p, [CHUNKED[:cut], CHUNKED[cut:]]) == CHUNKED_BODY and p.done, cut
    p = ResponseParser()
    assert feed_all(p, [CHUNKED[i : i + 1] for i in range(len(CHUNKED))]) == CHUNKED_BODY and p.done


def test_content_length_body_and_extra_bytes() -> None:
    raw = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello"
    p = ResponseParser()
    assert feed_all(p, [raw[:20], raw[20:-2], raw[-2:]]) == b"hello" and p.done and not p.extra
    assert p.head is not None and p.head.status == 201 and p.head.reason == "Created"
    p = ResponseParser()
    assert p.feed(raw + b"HTTP/1.1") == b"hello" and p.done and p.extra  # the server spoke out of turn
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.done and p.head is not None


def test_interim_and_bodiless_answers() -> None:
    p = ResponseParser()
    body = p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert body == b"ok" and p.head is not None and p.head.status == 200
    p = ResponseParser()
    p.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert p.done and p.head is not None and p.head.keep_alive
    p = ResponseParser(head_request=True)
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert p.done


def test_until_close_and_connection_close() -> None:
    p = ResponseParser()
    assert p.feed(b"HTTP/1.1 200 OK\r\n\r\nsome") == b"some" and not p.done
    assert p.head is not None and not p.head.keep_alive
    assert p.feed(b" more") == b" more"
    p.feed_eof()
    assert p.done
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert p.head is not None and not p.head.keep_alive
    p = ResponseParser()
    p.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.head is not None and not p.head.keep_alive
    p = ResponseParser()
    p.feed(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")
    assert p.head is not None and p.head.keep_alive
    p = ResponseParser()  # a transfer coding the client cannot decode: read until close, never reuse
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx")
    assert p.head is not None and not p.head.keep_alive and not p.done


def test_repeated_headers_are_joined() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nVia: a\r\nvia: b\r\nX-Empty:\r\nX-Pad: \t v \t")
    assert head.headers == {"via": "a, b", "x-empty": "", "x-pad": "v"}
    assert parse_head(b"HTTP/1.1 404").reason == ""


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
    ],
)
def test_malformed_answers_raise(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        ResponseParser().feed(raw)


def test_oversized_head_and_chunk_line_raise() -> None:
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000)
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(ProtocolError):
        p.feed(b"1" * 5000)


def test_eof_before_the_end_raises() -> None:
    for raw in (
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ):
        p = ResponseParser()
        p.feed(raw)
        with pytest.raises(ProtocolError):
            p.feed_eof()


def test_content_length_values() -> None:
    assert content_length("12") == 12 and content_length("7, 7") == 7
    for bad in ("", "1.5", "+3", "1 2"):
        with pytest.raises(ProtocolError):
            content_length(bad)
