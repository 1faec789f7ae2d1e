"""ReqKVManager: the only code that moves pages between the pool, the radix cache and requests.

Invariant: a RUNNING request owns ``req.pages`` covering ``[0, num_computed_tokens)`` (plus the
pages reserved for the step being planned); the leading ``req.cached_prefix_pages`` of them belong
to the radix cache and are pinned by locking ``req.prefix_node``. A WAITING or FINISHED request owns
nothing. Hence, with nothing running: ``pool.num_free + cache.num_cached_pages == pool.num_total``.
"""

from __future__ import annotations

from sglang_pd.mem.page_pool import PagePool
from sglang_pd.mem.radix_cache import RadixCache
from sglang_pd.scheduler.req import Req


class ReqKVManager:
    def __init__(self, num_pages: int, page_size: int, enable_radix_cache: bool) -> None:
        self.page_size = page_size
        self.pool = PagePool(num_pages + 1)  # page 0 is the null page
        self.cache = RadixCache(self.pool, page_size, enabled=enable_radix_cache)

    # --- capacity ------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_total * self.page_size

    @property
    def available_pages(self) -> int:
        """Pages obtainable now: free ones plus those the cache may evict."""
        return self.pool.num_free + self.cache.num_evictable_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # --- request lifecycle ---------------------------------------------------------------------
    def match(self, req: Req) -> int:
        """Cached prefix length (tokens) for a waiting request, without taking anything."""
        return self.cache.match_prefix(req.token_ids(0, _prefix_limit(req))).num_tokens

    def admit(self, req: Req) -> None:
        """Take the cached prefix: pin it and start computing after it (at least one token is left)."""
        m = self.cache.match_prefix(req.token_ids(0, _prefix_limit(req)))
        self.cache.lock(m.node)
        req.prefix_node = m.node
        req.pages = list(m.pages)
        req.num_computed_tokens = m.num_tokens

    def reserve(self, req: Req, num_tokens: int) -> bool:
        """Make ``req.pages`` cover positions ``[0, num_computed_tokens + num_tokens)``; all or nothing."""
        need = self.pages_for(req.num_computed_tokens + num_tokens) - len(req.pages)
        if need <= 0:
            return True
        if self.pool.num_free < need:
            self.cache.evict(need - self.pool.num_free)
        pages = self.pool.alloc(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def release(self, req: Req) -> None:
        """Give back everything ``req`` holds; its full computed pages go into the prefix cache."""
        full = req.num_computed_tokens // self.page_size
        keep = req.pages[:full]
        self.pool.free(req.pages[full:])
        if keep:
            duplicates = self.cache.insert(req.token_ids(0, full * self.page_size), keep)
            self.pool.free(duplicates)
        if req.prefix_node is not None:
            self.cache.unlock(req.prefix_node)
        req.prefix_node = None
        req.pages = []
        req.num_computed_tokens = 0

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests run."""
        return self.cache.reset()


def _prefix_limit(req: Req) -> int:
    """Longest prefix that may come from the cache: one token must stay to compute, and positions
    whose logits give requested input logprobs must be computed."""
    limit = req.seq_len - 1
    if req.wants_input_logprobs:
        limit = min(limit, max(req.logprob.start_len - 1, 0))
    return limit
