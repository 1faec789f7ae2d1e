"""The router's error responses: the OpenAI envelope shared with the workers (``pd_common.error_envelope``),
as aiohttp answers, and the reading of a worker's error answer."""

from __future__ import annotations

import json

from aiohttp import web

from pd_common.error_envelope import APIError, bad_request, error_body, retry_after_headers, sse_error_event

__all__ = ["APIError", "bad_request", "error_body", "error_from_body", "error_response", "sse_error_event"]


def error_response(err: APIError, headers: dict[str, str] | None = None) -> web.Response:
    out = {**(headers or {}), **retry_after_headers(err)}
    return web.json_response(error_body(err.status, err.message, err.param), status=err.status, headers=out)


def error_from_body(status: int, raw: bytes) -> tuple[str, str | None]:
    """(message, param) out of a worker's error answer; the raw text when it is not an envelope."""
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message", "")), err.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw.decode("utf-8", "replace").strip()
        return (text[:500] or f"worker answered HTTP {status}"), None
