"""--register-with ROUTER_URL: announce this worker to a router once healthy; withdraw it on shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp

from sglang_pd.server_args import ServerArgs

logger = logging.getLogger(__name__)
ATTEMPTS = 10
TIMEOUT = aiohttp.ClientTimeout(total=5)


def worker_url(args: ServerArgs) -> str:
    host = args.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"http://{host}:{args.port}"


def role(args: ServerArgs) -> str:
    return "regular" if args.disaggregation_mode == "null" else args.disaggregation_mode


def _headers(args: ServerArgs) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


async def register(args: ServerArgs) -> bool:
    """POST {url, role, bootstrap_port} to the router's /workers, retrying with backoff."""
    assert args.register_with
    body: dict[str, object] = {"url": worker_url(args), "role": role(args)}
    if args.disaggregation_mode == "prefill":
        body["bootstrap_port"] = args.disaggregation_bootstrap_port
    delay = 0.2
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for attempt in range(ATTEMPTS):
            try:
                async with s.post(args.register_with.rstrip("/") + "/workers", json=body, headers=_headers(args)) as r:
                    if r.status < 300:
                        logger.info("registered with %s as %s", args.register_with, body["role"])
                        return True
                    logger.warning("router refused registration (%d): %s", r.status, (await r.text())[:300])
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                logger.warning("registration attempt %d with %s failed: %s", attempt + 1, args.register_with, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    logger.error("could not register with %s; serving unregistered", args.register_with)
    return False


async def deregister(args: ServerArgs) -> None:
    """DELETE /workers?url=... so the router stops sending new requests before we drain."""
    assert args.register_with
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.delete(args.register_with.rstrip("/") + "/workers", params={"url": worker_url(args)},
                                headers=_headers(args)) as r:
                logger.info("deregistered from %s (%d)", args.register_with, r.status)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        logger.warning("deregistration from %s failed: %s", args.register_with, e)
