"""The OpenAI error envelope the router answers with: {"error": {"message", "type", "param", "code"}}.

Same shape and status words as the workers (DESIGN §5), written here because the router imports
nothing from ``sglang_pd``. ``code`` carries the HTTP status.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    409: "ConflictError",
    413: "PayloadTooLarge",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class APIError(Exception):
    """Raised anywhere under a handler; the error middleware turns it into the envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"), "param": param, "code": status}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> web.Response:
    out = dict(headers or {})
    if err.retry_after is not None:
        out["Retry-After"] = str(err.retry_after)
    return web.json_response(error_body(err.status, err.message, err.param), status=err.status, headers=out)


def sse_error_event(status: int, message: str) -> bytes:
    """The final event of a stream that failed after its first byte reached the client."""
    return f"data: {json.dumps(error_body(status, message))}\n\n".encode()


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_from_body(status: int, raw: bytes) -> tuple[str, str | None]:
    """(message, param) out of a worker's error answer; the raw text when it is not an envelope."""
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message", "")), err.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw.decode("utf-8", "replace").strip()
        return (text[:500] or f"worker answered HTTP {status}"), None
