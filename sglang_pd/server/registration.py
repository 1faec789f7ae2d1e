"""--register-with ROUTER_URL: announce this worker to a router once healthy; withdraw it on shutdown.

With a cluster secret both calls carry ``X-SGLang-PD-Signature`` = key.sign("register",
body_digest(METHOD, "/workers", body bytes)) over the exact bytes sent (the router verifies it when it has
no admin key for workers to present); ``--api-key`` still goes as the Bearer token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

import aiohttp

from pd_common.cluster_auth import SIGNATURE_HEADER, body_digest
from sglang_pd.server_args import ServerArgs
from transfer.hosts import advertised_host

logger = logging.getLogger(__name__)
ATTEMPTS = 10
TIMEOUT = aiohttp.ClientTimeout(total=5)


def worker_url(args: ServerArgs) -> str:
    host = advertised_host(args.host)  # a wildcard: this host's outward address, never 0.0.0.0 or 127.0.0.1
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{args.port}"


def role(args: ServerArgs) -> str:
    return "regular" if args.disaggregation_mode == "null" else args.disaggregation_mode


def _headers(args: ServerArgs, method: str, url: str, body: bytes, query: str = "") -> dict[str, str]:
    """Auth headers; the signature covers the path plus the decoded ``query`` (a withdrawal names its worker)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if body:
        headers["Content-Type"] = "application/json"
    key = args.cluster_key()
    if key is not None:
        headers[SIGNATURE_HEADER] = key.sign("register", body_digest(method, urlsplit(url).path + query, body))
    return headers


async def register(args: ServerArgs) -> bool:
    """POST {url, role, bootstrap_port} to the router's /workers, retrying with backoff."""
    assert args.register_with
    body: dict[str, object] = {"url": worker_url(args), "role": role(args)}
    if args.disaggregation_mode == "prefill":
        body["bootstrap_port"] = args.disaggregation_bootstrap_port
    delay = 0.2
    url = args.register_with.rstrip("/") + "/workers"
    data = json.dumps(body).encode()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for attempt in range(ATTEMPTS):
            try:  # signed per attempt: a token expires
                async with s.post(url, data=data, headers=_headers(args, "POST", url, data)) as r:
                    if r.status < 300:
                        logger.info("registered with %s as %s", args.register_with, body["role"])
                        return True
                    logger.warning("router refused registration (%d): %s", r.status, (await r.text())[:300])
            except (TimeoutError, aiohttp.ClientError) as e:
                logger.warning("registration attempt %d with %s failed: %s", attempt + 1, args.register_with, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    logger.error("could not register with %s; serving unregistered", args.register_with)
    return False


async def deregister(args: ServerArgs) -> None:
    """DELETE /workers?url=... so the router stops sending new requests before we drain."""
    assert args.register_with
    try:
        url = args.register_with.rstrip("/") + "/workers"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            me = worker_url(args)
            headers = _headers(args, "DELETE", url, b"", query=f"?url={me}")
            async with s.delete(url, params={"url": me}, headers=headers) as r:
                logger.info("deregistered from %s (%d)", args.register_with, r.status)
    except (TimeoutError, aiohttp.ClientError) as e:
        logger.warning("deregistration from %s failed: %s", args.register_with, e)
