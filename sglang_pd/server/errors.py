"""OpenAI-style error envelope: {"error": {"message", "type", "param", "code"}} with the HTTP status in code."""

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
    413: "PayloadTooLarge",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
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


def error_response(err: APIError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return web.json_response(error_body(err.status, err.message, err.param), status=err.status, headers=headers)


def sse_error_event(status: int, message: str) -> bytes:
    """The final event of a stream that failed after its headers were sent."""
    return f"data: {json.dumps(error_body(status, message))}\n\n".encode()


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)
