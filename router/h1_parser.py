"""HTTP/1.x response parsing without I/O: bytes in -> one response head, its body bytes, its end.

The router's upstream client (``h1_conn``) feeds whatever the socket gave it; ``feed`` returns
the body bytes decoded from it (chunked transfer coding removed) and sets ``head`` once the head
is complete and ``done`` once the body ended. Framing, after RFC 9112 §6.3:
- no body: an answer to HEAD, 204, 304;
- ``Transfer-Encoding`` ending in ``chunked``: chunked (trailers read and dropped); another
  transfer coding: until the server closes;
- ``Content-Length``: exactly that many bytes;
- neither: until the server closes (``feed_eof`` ends it).
Interim 1xx heads (100 Continue, 103) are skipped. Anything malformed raises ``ProtocolError``.
Invariants: ``done`` implies ``head is not None``; after ``done`` no byte is returned, and bytes
that still arrive set ``extra`` (the connection cannot be reused).
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_HEAD_BYTES = 64 * 1024  # status line + headers
MAX_LINE_BYTES = 4 * 1024  # one chunk-size or trailer line
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,19}")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_FIELD = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*"
_FIELD_LINES = re.compile(_FIELD + rb"(?:\r\n" + _FIELD + rb")*")

# body framing
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)
# chunked decoder states
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ProtocolError(ConnectionError):
    """The server's bytes are not a well-formed HTTP/1.x response."""


class ResponseHead(NamedTuple):
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    keep_alive: bool  # the server lets the connection carry another request after this one

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when absent)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()


class ResponseParser:
    def __init__(self, head_request: bool = False) -> None:
        self.head: ResponseHead | None = None
        self.done = False
        self.extra = False
        self._head_request = head_request
        self._buf = b""
        self._framing = _NONE
        self._left = 0  # _LENGTH: body bytes still due; _CHUNKED: bytes left in the current chunk
        self._chunk_state = _SIZE

    def feed(self, data: bytes) -> bytes:
        """The body bytes contained in ``data`` (b"" when none)."""
        if self.done:
            self.extra = self.extra or bool(data)
            return b""
        if self.head is None:
            data = self._feed_head(data)
            if self.head is None or not data:
                return b""
            if self.done:  # a body-less answer followed by more bytes
                self.extra = True
                return b""
        if self._framing == _LENGTH:
            if len(data) >= self._left:
                body, rest = data[: self._left], data[self._left :]
                self._left = 0
                self.done = True
                self.extra = bool(rest)
                return body
            self._left -= len(data)
            return data
        if self._framing == _CHUNKED:
            return self._feed_chunked(data)
        return data  # _UNTIL_CLOSE

    def feed_eof(self) -> None:
        """The server closed the connection: ends an until-close body; anything else was cut short."""
        if self.done:
            return
        if self.head is not None and self._framing == _UNTIL_CLOSE:
            self.done = True
            return
        where = "before the response head" if self.head is None else "before the end of the response body"
        raise ProtocolError(f"the server closed the connection {where}")

    # --- head ----------------------------------------------------------------------------------------
    def _feed_head(self, data: bytes) -> bytes:
        """Consume head bytes; -> what follows the head (body bytes) once it is complete."""
        while True:
            buf = self._buf + data if self._buf else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise ProtocolError(f"response head longer than {MAX_HEAD_BYTES} bytes")
                self._buf = buf
                return b""
            self._buf = b""
            head = parse_head(buf[:end])
            data = buf[end + 4 :]
            if 100 <= head.status < 200:
                if head.status == 101:
                    raise ProtocolError("unexpected 101 Switching Protocols")
                continue  # an interim answer: the real head follows
            self._start_body(head)
            return data

    def _start_body(self, head: ResponseHead) -> None:
        h = head.headers
        keep_alive = head.keep_alive
        if self._head_request or head.status in (204, 304):
            self._framing = _NONE
        elif "transfer-encoding" in h:
            chunked = h["transfer-encoding"].rsplit(",", 1)[-1].strip().lower() == "chunked"
            self._framing = _CHUNKED if chunked else _UNTIL_CLOSE
            keep_alive = keep_alive and chunked and "content-length" not in h
        elif "content-length" in h:
            self._framing = _LENGTH
            self._left = content_length(h["content-length"])
        else:
            self._framing = _UNTIL_CLOSE
        if self._framing == _UNTIL_CLOSE:
            keep_alive = False
        self.head = head if keep_alive == head.keep_alive else ResponseHead(head.status, head.reason, h, keep_alive)
        self.done = self._framing == _NONE or (self._framing == _LENGTH and self._left == 0)

    # --- chunked body ---------------------------------------------------------------------------------
    def _feed_chunked(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        state, left = self._chunk_state, self._left
        while pos < end:
            if state == _SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = chunk_size(buf[pos:eol])
                pos = eol + 2
                if size == 0:
                    state = _TRAILER
                    continue
                stop = pos + size
                if stop + 2 <= end:  # the common case: the whole chunk and its CRLF are here
                    if buf[stop : stop + 2] != b"\r\n":
                        raise ProtocolError("chunk data not followed by CRLF")
                    out.append(buf[pos:stop])
                    pos = stop + 2
                    continue
                state, left = _DATA, size
            elif state == _DATA:
                take = min(left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                if left == 0:
                    state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            else:  # _TRAILER: trailer fields (dropped) up to a blank line, which ends the message
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:
                    self.done = True
                    self.extra = eol + 2 < end
                    pos = end
                    break
                pos = eol + 2
        if pos < end and end - pos > MAX_LINE_BYTES and state in (_SIZE, _TRAILER):
            raise ProtocolError("chunk-size or trailer line too long")
        self._chunk_state, self._left = state, left
        self._buf = buf[pos:] if pos < end else b""
        return out[0] if len(out) == 1 else b"".join(out)


def parse_head(raw: bytes) -> ResponseHead:
    """Status line and header fields (no final blank line) -> ResponseHead."""
    status_line, _, fields = raw.partition(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise ProtocolError(f"bad status line {status_line[:100]!r}")
    headers: dict[str, str] = {}
    if fields:
        if not _FIELD_LINES.fullmatch(fields):  # one C-level check of every line (rejects obs-fold too)
            bad = next((x for x in fields.split(b"\r\n") if not _FIELD_LINES.fullmatch(x)), fields)
            raise ProtocolError(f"bad header line {bad[:100]!r}")
        for line in fields.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            key = name.lower()
            value = value.strip(" \t")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
    version, code, reason = match.groups()
    connection = headers.get("connection")
    tokens = {t.strip().lower() for t in connection.split(",")} if connection else set()
    keep_alive = "keep-alive" in tokens if version == b"0" else "close" not in tokens  # HTTP/1.0 or 1.1
    return ResponseHead(int(code), (reason or b"").decode("latin-1"), headers, keep_alive)


def content_length(value: str) -> int:
    """A Content-Length value (repeated identical values allowed, as RFC 9110 §8.6 permits)."""
    if value.isdigit() and value.isascii() and len(value) < 20:
        return int(value)
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise ProtocolError(f"conflicting Content-Length values {value!r}")
    raw = values.pop().encode("ascii", "replace")
    if not _DIGITS.fullmatch(raw):
        raise ProtocolError(f"bad Content-Length {value!r}")
    return int(raw)


def chunk_size(line: bytes) -> int:
    """A chunk-size line (chunk extensions ignored) -> the size."""
    if _HEX.fullmatch(line):
        return int(line, 16)
    size = line.partition(b";")[0].strip(b" \t")
    if not _HEX.fullmatch(size):
        raise ProtocolError(f"bad chunk size line {line[:100]!r}")
    return int(size, 16)
