"""KV memory of one worker: storage, page allocation, and the prefix cache.

Modules:
- ``kv_cache``: ``KVCache``, the one tensor ``[num_layers, 2 (K, V), num_pages, page_size,
  num_kv_heads, head_dim]``. Token ``t`` of a request lives at slot ``pages[t // ps] * ps + t % ps``.
- ``page_pool``: ``PagePool``, hands out page ids ``1 .. num_pages - 1`` (page 0 is the null page
  that pads page tables); all-or-nothing ``alloc``, checked ``free``.
- ``radix_cache``: ``RadixCache``, a prefix tree over token ids at page granularity that owns the
  full pages of finished (or checkpointed) requests, with ref counts (``lock``/``unlock``) and LRU
  ``evict`` back to the pool. ``enabled=False`` (``--disable-radix-cache``) keeps the same calls.

Ownership: every allocatable page is, at any time, exactly one of: free in the pool, held by one
request (its private tail), or held by the tree (possibly shared by several requests that lock it).
With no request holding pages: ``pool.num_free + cache.num_cached_pages == pool.num_total``.

Data flow for one request (``ps`` = page size, ``ids`` = all token ids):
1. admit: ``m = cache.match_prefix(ids[: len(ids) - 1])`` (keep >= 1 token to compute), then
   ``cache.lock(m.node)`` at once, before anything can ``evict``.
2. ``new = pool.alloc(need)``; if None, ``cache.evict(need - pool.num_free)`` and retry; if still
   None, don't admit (or retract a running request). Page table = ``m.pages + new``; computing
   starts at ``m.num_tokens``.
3. finish: with ``n`` = tokens whose KV is written, ``full = n // ps``;
   ``dup = cache.insert(ids[: full * ps], table[:full])``; ``pool.free(dup + table[full:])``;
   ``cache.unlock(m.node)``. The tree now owns ``table[:full]`` minus ``dup``.
   A request that keeps running after ``insert`` must instead re-match, lock the new node, swap its
   table head for the tree's pages (its ``dup`` pages are freed), then unlock the old node.
"""
