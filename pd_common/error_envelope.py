"""The OpenAI error envelope that the router and the workers answer with, one definition for both.

``{"error": {"message", "type", "param", "code"}}`` with the HTTP status in ``code`` and a type word
per status. Handlers raise ``APIError``; each server's middleware turns it into a response (aiohttp
lives there, not here). After a stream's first byte, the envelope travels as its last SSE event.
"""

from __future__ import annotations

import json
from typing import Any

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
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


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}


def retry_after_headers(err: APIError) -> dict[str, str]:
    return {"Retry-After": str(err.retry_after)} if err.retry_after is not None else {}


def sse_error_event(status: int, message: str) -> bytes:
    """The final event of a stream that failed after its headers were sent."""
    return f"data: {json.dumps(error_body(status, message))}\n\n".encode()
