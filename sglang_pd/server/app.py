"""The aiohttp application of a worker: middlewares plus native and OpenAI routes."""

from __future__ import annotations

from aiohttp import web

from sglang_pd.server.http_common import auth_middleware, error_middleware
from sglang_pd.server.native_api import register_native_routes
from sglang_pd.server.openai_api import register_openai_routes
from sglang_pd.server.server_state import ServerState


def create_app(srv: ServerState) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(srv.args.api_key)],
        client_max_size=srv.args.max_payload_size,
    )
    app["srv"] = srv
    register_native_routes(app, srv.args.enable_metrics)
    register_openai_routes(app)
    return app
