"""Whose fault is a failed worker call: the request's (the client's) or the worker's? Pure functions.

The rules (README "Router", Reliability):
- Worker faults count against the worker's circuit breaker: the connection failed or timed out, the
  worker answered 5xx (unless its error says the request itself was bad, see ``blames_request``), or
  the worker says one of its processes died (``says_died``).
- Request faults never touch the breaker and are never retried: every 4xx, and a 5xx whose error
  envelope names a request parameter (``param``), has a 4xx ``code`` or a bad-request ``type``.
- Retried (before the first byte reached the client, on another worker): connection failures,
  502/503/504 that are not request faults, and answers aborted because a worker process died.
  A 500 is not retried: it is an internal error that the same request would likely hit again.
- A worker whose process died says so: ``/health`` answers 503 with a reason containing "died", and
  requests in flight end with ``finish_reason`` abort and a message containing "died" (native
  routes; OpenAI answers carry no message, so the router asks ``/health`` at once instead).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

RETRYABLE_STATUS = frozenset({502, 503, 504})
_REQUEST_ERROR_TYPES = frozenset({"BadRequestError", "invalid_request_error", "RequestValidationError"})
DIED_MARKER = "died"


def says_died(text: Any) -> bool:
    """Does a worker's message say one of its processes died ("child process died: scheduler")?"""
    return isinstance(text, str) and DIED_MARKER in text.lower()


def envelope(raw: bytes | Any) -> dict[str, Any] | None:
    """The inner ``error`` object of an OpenAI error envelope (bytes or parsed), else None."""
    payload = raw
    if isinstance(raw, (bytes, bytearray)):
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload["error"]
    return None


def blames_request(status: int, err: dict[str, Any] | None) -> bool:
    """Is this error answer the request's fault (never the worker's)?"""
    if status < 500:
        return True
    if not err:
        return False
    code = err.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500:
        return True
    return bool(err.get("param")) or err.get("type") in _REQUEST_ERROR_TYPES


def retryable(status: int, err: dict[str, Any] | None) -> bool:
    return status in RETRYABLE_STATUS and not blames_request(status, err)


def aborts(payload: Any) -> Iterator[str | None]:
    """The abort finishes in a worker answer (native or OpenAI, one object or a batch list): their
    messages (None when the answer carries none, as OpenAI's ``finish_reason: "abort"``)."""
    items = payload if isinstance(payload, list) else (payload,)
    for item in items:
        if not isinstance(item, dict):
            continue
        meta = item.get("meta_info")
        if isinstance(meta, dict):
            yield from _abort_of(meta.get("finish_reason"))
        choices = item.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    yield from _abort_of(choice.get("finish_reason"))


def _abort_of(reason: Any) -> Iterator[str | None]:
    if reason == "abort":
        yield None
    elif isinstance(reason, dict) and reason.get("type") == "abort":
        message = reason.get("message")
        yield message if isinstance(message, str) else None


def abort_verdict(payloads: list[Any]) -> tuple[str | None, str | None]:
    """Over the payloads of one answer -> (verdict, message): ("died", message) when an abort says a
    worker process died; ("unknown", None) when an abort carries no message (ask the worker's
    /health); (None, None) when nothing was aborted, or only for another stated reason (a client's
    abort, a failed KV transfer: passed through as is)."""
    verdict: str | None = None
    for payload in payloads:
        for message in aborts(payload):
            if message is None:
                verdict = "unknown"
            elif says_died(message):
                return "died", message
    return verdict, None


@dataclass(frozen=True)
class ProbeFailure:
    """A failed health probe: why, and whether the worker says a process of it died (eject at once)."""

    message: str
    fatal: bool = False

    def __str__(self) -> str:
        return self.message


def probe_failure(endpoint: str, status: int, raw: bytes) -> ProbeFailure:
    """A health probe answered ``status`` != 200 with ``raw``: the worker's ``reason`` when it gave one."""
    text = raw[:500].decode("utf-8", "replace")
    reason: Any = None
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        payload = None
    if isinstance(payload, dict):
        reason = payload.get("reason")
        err = payload.get("error")
        if reason is None and isinstance(err, dict):
            reason = err.get("message")
    shown = reason if isinstance(reason, str) else text
    return ProbeFailure(f"{endpoint} answered {status}: {shown[:300]}", says_died(shown))
