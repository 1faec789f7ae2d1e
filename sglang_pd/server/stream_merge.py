"""Running several requests of one HTTP call together: their chunks merged as they come, or their final states.

An error in one request ends them all (the others are cancelled, which aborts them in the scheduler).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from sglang_pd.server.messages import TokenizedGenerateReq
from sglang_pd.server.req_state import GenerateChunk, ReqState
from sglang_pd.server.server_state import ServerState


async def merge_chunks(
    srv: ServerState, reqs: Sequence[TokenizedGenerateReq]
) -> AsyncGenerator[tuple[int, GenerateChunk], None]:
    """Chunks of several requests as they come, tagged with the request's index; an error in one ends all."""
    queue: asyncio.Queue[tuple[int, GenerateChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, req: TokenizedGenerateReq) -> None:
        try:
            async for chunk in srv.tm.generate(req):
                queue.put_nowait((i, chunk, None))
        except Exception as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            queue.put_nowait((i, None, e))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                remaining -= 1
            else:
                yield i, chunk
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_all(srv: ServerState, reqs: Sequence[TokenizedGenerateReq]) -> list[ReqState]:
    finals: dict[int, ReqState] = {}
    async with contextlib.aclosing(merge_chunks(srv, reqs)) as chunks:
        async for i, chunk in chunks:
            finals[i] = chunk.state
    return [finals[i] for i in range(len(reqs))]
