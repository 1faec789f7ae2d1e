"""OpenAI-compatible routes (placeholder module filled in by the OpenAI work)."""

from __future__ import annotations

from aiohttp import web


def register_openai_routes(app: web.Application) -> None:
    return None
