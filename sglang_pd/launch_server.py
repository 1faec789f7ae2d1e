"""``python -m sglang_pd.launch_server --model-path DIR`` (console script ``sglang-pd-server``).

Starts the scheduler and detokenizer processes, waits for the model, then serves HTTP. SIGTERM or
SIGINT drains: /health turns 503 and new requests get 503, in-flight requests get up to
``--shutdown-timeout`` seconds, the rest are aborted (finish_reason abort), children are reaped,
exit code 0.

A child that dies while serving can never answer again: main fails every in-flight request (abort),
refuses new ones with 503, answers /health 503 "child process died: ..." for ``DEAD_CHILD_GRACE_S``
(so a router sees why), logs the cause once, stops the other child and exits with
``EXIT_CHILD_DIED``, so a supervisor (systemd, Kubernetes) restarts the worker.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from sglang_pd.cli_args import parse_server_args
from sglang_pd.server.app import create_app
from sglang_pd.server.child_process import configure_logging
from sglang_pd.server.detokenizer import run_detokenizer_process
from sglang_pd.server.ipc import IpcPaths
from sglang_pd.server.metrics import ServerMetrics
from sglang_pd.server.registration import deregister, register
from sglang_pd.server.scheduler_process import run_scheduler_process
from sglang_pd.server.server_state import ServerState
from sglang_pd.server.tokenizer_manager import TokenizerManager
from sglang_pd.server_args import ServerArgs

logger = logging.getLogger("sglang_pd.launch_server")
CHILD_CHECK_S = 0.5
DEAD_CHILD_GRACE_S = 2.0  # after a child died: time to answer the failed requests and /health 503
EXIT_CHILD_DIED = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_server_args(argv)
    configure_logging(args.log_level, "main")
    paths, tmp = IpcPaths.create()
    ctx = mp.get_context("spawn")
    children: dict[str, mp.process.BaseProcess] = {
        "scheduler": ctx.Process(target=run_scheduler_process, args=(args, paths), name="scheduler", daemon=True),
        "detokenizer": ctx.Process(target=run_detokenizer_process, args=(args, paths), name="detokenizer", daemon=True),
    }
    for p in children.values():
        p.start()
    code = 1  # until serve returns: an exception is a failure too
    try:
        code = asyncio.run(serve(args, paths, children))
        return code
    finally:
        _reap(children, wait_s=5.0 if code == 0 else 0.0)
        tmp.cleanup()


def _reap(children: dict[str, mp.process.BaseProcess], wait_s: float) -> None:
    """Let the children finish (they stop on ShutdownReq) for up to ``wait_s``, then end them (SIGTERM, then
    SIGKILL). After a failure (a child died: the other never gets ShutdownReq) ``wait_s`` is 0."""
    for p in children.values():
        p.join(timeout=wait_s)
        if p.is_alive():
            p.terminate()
    for p in children.values():
        p.join(timeout=2)
        if p.is_alive():
            p.kill()


async def serve(args: ServerArgs, paths: IpcPaths, children: dict[str, mp.process.BaseProcess]) -> int:
    metrics = ServerMetrics(args.model_name)
    try:
        tm = TokenizerManager(args, paths, metrics)
    except ValueError as e:
        logger.error("%s", e)
        return 1
    srv = ServerState(args, tm, metrics, children)
    startup_problem = await _wait_ready(srv)
    if startup_problem:
        logger.error("startup failed: %s", startup_problem)
        await tm.close()
        return 1
    # Requests are drained before cleanup, so the runner only closes idle keep-alive connections.
    runner = web.AppRunner(create_app(srv), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        await tm.close()
        await runner.cleanup()
        return 1
    logger.info("serving %s on http://%s:%d", args.model_name, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_children(srv, stop))
    registration = asyncio.create_task(register(args)) if args.register_with else None
    await stop.wait()
    watcher.cancel()
    if srv.child_died is not None:
        await _exit_after_child_death(srv, runner, registration)
        return EXIT_CHILD_DIED
    if registration is not None:
        registration.cancel()
        await deregister(args)  # the router stops sending before we drain
    await drain(srv, runner)
    return 0


async def _wait_ready(srv: ServerState) -> str | None:
    """None once the scheduler reports ready; otherwise why startup failed."""
    ready = asyncio.create_task(srv.tm.wait_ready())
    while not ready.done():
        dead = srv.dead_children()
        if dead:
            ready.cancel()
            return f"child process died during startup: {', '.join(dead)}"
        await asyncio.wait({ready}, timeout=CHILD_CHECK_S)
    try:
        ready.result()
    except RuntimeError as e:
        return str(e)
    return None


async def _watch_children(srv: ServerState, stop: asyncio.Event) -> None:
    """A dead child never answers: fail what is in flight so no client hangs, then stop serving."""
    while not srv.dead_children():
        await asyncio.sleep(CHILD_CHECK_S)
    dead = srv.dead_children()
    cause = ", ".join(f"{name} (exit code {srv.children[name].exitcode})" for name in dead)
    srv.child_died = cause
    logger.error(
        "child process died: %s; failing %d in-flight request(s) and exiting with code %d",
        cause,
        len(srv.tm.states),
        EXIT_CHILD_DIED,
    )
    srv.tm.mark_dead(f"worker process died: {', '.join(dead)}")
    stop.set()


async def _exit_after_child_death(srv: ServerState, runner: web.AppRunner, registration: asyncio.Task | None) -> None:
    """Keep answering (503s, the failed requests' last bytes) for a moment, then close everything."""
    withdraw = None
    if registration is not None:
        registration.cancel()
        withdraw = asyncio.create_task(deregister(srv.args))
    await asyncio.sleep(DEAD_CHILD_GRACE_S)
    if withdraw is not None:
        await asyncio.wait({withdraw}, timeout=1.0)
    await runner.cleanup()
    await srv.tm.close()


async def drain(srv: ServerState, runner: web.AppRunner) -> None:
    tm = srv.tm
    tm.draining = True
    logger.info("draining: %d request(s) in flight, up to %.1fs", len(tm.states), srv.args.shutdown_timeout)
    deadline = asyncio.get_running_loop().time() + srv.args.shutdown_timeout
    while tm.states and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if tm.states:
        logger.info("aborting %d request(s) still in flight", len(tm.states))
        await tm.abort_all("server is shutting down")
        end = asyncio.get_running_loop().time() + 5.0
        while tm.states and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.05)
        tm.fail_all("server is shutting down")
    await asyncio.sleep(0.05)  # let handlers write their last bytes
    await runner.cleanup()
    await tm.close()


if __name__ == "__main__":
    sys.exit(main())
