"""The worker's error responses: the shared OpenAI envelope (``pd_common.error_envelope``) as aiohttp answers."""

from __future__ import annotations

from aiohttp import web

from pd_common.error_envelope import APIError, bad_request, error_body, retry_after_headers, sse_error_event

__all__ = ["APIError", "bad_request", "error_body", "error_response", "sse_error_event"]


def error_response(err: APIError) -> web.Response:
    return web.json_response(
        error_body(err.status, err.message, err.param), status=err.status, headers=retry_after_headers(err) or None
    )
