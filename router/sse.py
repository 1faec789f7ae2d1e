"""Server-sent events as the workers write them: ``data: <json>\\n\\n`` blocks, ending with ``data: [DONE]``.

The router forwards whole events only (``EventSplitter``), so when a worker's stream breaks the
client never sees half an event before the router's own final error event.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

DONE = b"data: [DONE]\n\n"
_SEP = b"\n\n"


class EventSplitter:
    """Bytes as they arrive -> runs of complete events; the partial tail waits for the next chunk."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events now available (possibly b"")."""
        buf = self._tail + chunk if self._tail else chunk
        cut = buf.rfind(_SEP)
        if cut < 0:
            self._tail = buf
            return b""
        cut += len(_SEP)
        self._tail = buf[cut:]
        return buf[:cut]

    def rest(self) -> bytes:
        """What is left at a clean end of stream (a last event without its blank line)."""
        tail, self._tail = self._tail, b""
        return tail + _SEP if tail.strip() else b""


def payloads(events: bytes) -> list[Any]:
    """The JSON payloads of complete events (``[DONE]`` and comments skipped; bad JSON -> None entries)."""
    out: list[Any] = []
    for block in events.split(_SEP):
        data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if not data:
            continue
        raw = b"\n".join(data)
        if raw == b"[DONE]":
            continue
        try:
            out.append(json.loads(raw))
        except (ValueError, RecursionError):
            out.append(None)
    return out


def error_of(payload: Any) -> tuple[int, str] | None:
    """(status, message) when ``payload`` is an error envelope, else None."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        code = err.get("code")
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        return status, str(err.get("message", "worker error"))
    return None


def encode(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + _SEP


def map_events(events: bytes, fn: Callable[[Any], Any]) -> bytes:
    """Rewrite the JSON payload of each complete event with ``fn`` (None drops the event); others stay."""
    out: list[bytes] = []
    for block in events.split(_SEP):
        if not block.strip():
            continue
        data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
        raw = b"\n".join(data)
        if not data or raw == b"[DONE]":
            out.append(block + _SEP)
            continue
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):
            out.append(block + _SEP)
            continue
        mapped = fn(payload)
        if mapped is not None:
            out.append(encode(mapped))
    return b"".join(out)


def is_done(events: bytes) -> bool:
    return events.endswith(DONE)
