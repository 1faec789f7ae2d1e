"""``python -m router.launch_router`` (console script ``sglang-pd-router``): serve the router until SIGTERM.

SIGTERM/SIGINT: readiness turns 503 and new requests get 503 at once; requests in flight get up to
``--shutdown-grace-period-secs`` to finish; then connections close, the health loop and the
client session stop, exit code 0. A port that cannot be bound exits 1; bad flags exit 2.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import web

from router.app import create_app
from router.app_keys import STATE_KEY
from router.cli import parse_router_args
from router.config import RouterConfig

logger = logging.getLogger("router.launch_router")
DRAIN_POLL_S = 0.05
GC_GEN0_THRESHOLD = 10_000


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_router_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    return run_event_loop(serve(config))


def run_event_loop(main_coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (libuv: fewer microseconds per proxied request), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coro)
    return uvloop.run(main_coro)


async def serve(config: RouterConfig) -> int:
    app = create_app(config)
    state = app[STATE_KEY]
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    try:
        await site.start()
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, e)
        await runner.cleanup()
        return 1
    # Cyclic GC on the request path: what startup built (modules, app, metrics) lives on, so later
    # collections skip it; and a young generation of GC_GEN0_THRESHOLD objects (default 700) runs a
    # collection every few dozen requests instead of every request (each traverses the live young
    # objects of every request in flight). Cycles still get collected, only in larger batches.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    port = runner.addresses[0][1] if runner.addresses else config.port
    mode = "pd" if config.pd_disaggregation else "regular"
    logger.info(
        "router listening on http://%s:%d (%s mode, %d worker(s), policy %s)",
        config.host,
        port,
        mode,
        len(state.registry),
        config.policy,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    state.shutting_down = True
    deadline = loop.time() + config.shutdown_grace_period_secs
    logger.info("shutting down: %d request(s) in flight", state.admission.running)
    while state.admission.running and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
