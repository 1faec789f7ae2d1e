"""Typed keys for what the router keeps on its aiohttp app and requests."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from router.dispatch import Dispatcher
from router.state import RouterState

STATE_KEY: web.AppKey[RouterState] = web.AppKey("router_state", RouterState)
DISPATCHER_KEY: web.AppKey[Dispatcher] = web.AppKey("router_dispatcher", Dispatcher)
# web.RequestKey arrived in aiohttp 3.12; before that a plain string key works (with a warning)
REQUEST_ID: Any = getattr(web, "RequestKey", lambda name, _t: name)("request_id", str)
