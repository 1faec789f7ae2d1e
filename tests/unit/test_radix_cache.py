"""RadixCache: page-granular matching, splitting, duplicates on insert, locking, LRU eviction."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_pd.mem.page_pool import PagePool
from sglang_pd.mem.radix_cache import PrefixMatch, RadixCache


def make(page_size: int, num_pages: int = 64, enabled: bool = True) -> tuple[PagePool, RadixCache]:
    pool = PagePool(num_pages)
    return pool, RadixCache(pool, page_size, enabled)


def seq(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def cache_path(pool: PagePool, cache: RadixCache, ids: list[int]) -> list[int]:
    """A finished request without a prefix hit: alloc its full pages, insert, free duplicates."""
    pages = pool.alloc(len(ids) // cache.page_size)
    assert pages is not None
    pool.free(cache.insert(ids[: len(pages) * cache.page_size], pages))
    return pages


PAGE_SIZES = pytest.mark.parametrize("ps", [1, 4, 16])


def test_empty_tree_matches_nothing() -> None:
    _, cache = make(4)
    m = cache.match_prefix(seq(10))
    assert m == PrefixMatch((), 0, cache.root)
    cache.lock(m.node)  # locking the root is a no-op
    cache.unlock(m.node)
    cache.check_invariants()


@PAGE_SIZES
def test_match_full_longer_and_shorter_queries(ps: int) -> None:
    pool, cache = make(ps)
    ids = seq(3 * ps)
    pages = cache_path(pool, cache, ids)
    assert cache.num_cached_pages == 3 and pool.num_free == pool.num_total - 3
    assert cache.match_prefix(ids).pages == tuple(pages)
    assert cache.match_prefix(ids + [999] * (ps + 1)).num_tokens == 3 * ps
    m = cache.match_prefix(ids[: 2 * ps])  # ends inside the node: split at a page boundary
    assert m.pages == tuple(pages[:2]) and m.num_tokens == 2 * ps
    cache.check_invariants()
    # The split node ends exactly the 2-page path: locking it leaves only page 3 evictable.
    cache.lock(m.node)
    assert (cache.num_locked_pages, cache.num_evictable_pages) == (2, 1)
    assert cache.evict(10) == 1 and pool.is_free(pages[2])
    cache.unlock(m.node)
    assert cache.match_prefix(ids).pages == tuple(pages[:2])
    cache.check_invariants()


@PAGE_SIZES
def test_partial_pages_never_match(ps: int) -> None:
    pool, cache = make(ps)
    ids = seq(2 * ps)
    pages = cache_path(pool, cache, ids)
    assert cache.match_prefix(ids[: 2 * ps - 1]).pages == tuple(pages[:1])
    assert cache.match_prefix(ids[: ps - 1]).num_tokens == 0
    diverge = ids[:]
    diverge[ps + ps // 2] = 777  # differs inside the second page
    assert cache.match_prefix(diverge).pages == tuple(pages[:1])
    cache.check_invariants()


def test_partial_tail_is_not_inserted() -> None:
    _, cache = make(4)
    with pytest.raises(ValueError):
        cache.insert(seq(6), [1, 2])


@PAGE_SIZES
def test_insert_returns_exactly_the_duplicate_pages(ps: int) -> None:
    pool, cache = make(ps)
    ids = seq(3 * ps)
    first = cache_path(pool, cache, ids[: 2 * ps])
    # A second request computed the same 2 pages independently, plus one more page.
    mine = pool.alloc(3)
    assert mine is not None
    dup = cache.insert(ids, mine)
    assert dup == mine[:2]
    pool.free(dup)
    assert cache.match_prefix(ids).pages == (first[0], first[1], mine[2])
    # A request that got its head from match_prefix: equal ids are neither adopted nor returned.
    m = cache.match_prefix(ids)
    tail = pool.alloc(1)
    assert tail is not None
    assert cache.insert(ids + seq(ps, 500), list(m.pages) + tail) == []
    # Mixed: one matched page, one private duplicate, one new page under a new branch.
    other = pool.alloc(2)
    assert other is not None
    branch = ids[: 2 * ps] + seq(ps, 900)
    assert cache.insert(branch, [first[0]] + other) == [other[0]]
    pool.free([other[0]])
    assert cache.num_cached_pages + pool.num_free == pool.num_total
    cache.check_invariants()


def test_insert_ending_inside_a_node_splits_it() -> None:
    pool, cache = make(2)
    ids = seq(8)
    pages = cache_path(pool, cache, ids)
    assert cache.insert(ids[:4], pages[:2]) == []
    cache.check_invariants()
    assert cache.match_prefix(ids).pages == tuple(pages)


def test_lock_protects_from_eviction_and_unlock_underflow() -> None:
    pool, cache = make(4)
    a = cache_path(pool, cache, seq(8))
    m = cache.match_prefix(seq(8))
    cache.lock(m.node)
    cache.lock(m.node)
    assert cache.evict(100) == 0 and cache.num_locked_pages == 2
    cache.unlock(m.node)
    assert cache.evict(100) == 0
    cache.unlock(m.node)
    assert cache.num_evictable_pages == 2
    with pytest.raises(RuntimeError):
        cache.unlock(m.node)
    assert cache.evict(100) == 2 and all(pool.is_free(p) for p in a)
    with pytest.raises(RuntimeError):
        cache.lock(m.node)  # evicted: the handle is stale
    cache.check_invariants()


@PAGE_SIZES
def test_split_of_a_locked_node_keeps_it_locked(ps: int) -> None:
    pool, cache = make(ps)
    ids = seq(4 * ps)
    pages = cache_path(pool, cache, ids)
    held = cache.match_prefix(ids)
    cache.lock(held.node)
    short = cache.match_prefix(ids[: 2 * ps])  # splits the locked node
    assert short.pages == tuple(pages[:2])
    cache.check_invariants()
    assert (cache.num_locked_pages, cache.evict(100)) == (4, 0)
    cache.lock(short.node)
    cache.unlock(held.node)  # the tail becomes evictable, the head stays locked via `short`
    assert cache.num_evictable_pages == 2 and cache.evict(100) == 2
    cache.unlock(short.node)
    assert cache.evict(100) == 2 and pool.num_free == pool.num_total
    cache.check_invariants()


def test_lru_order_of_eviction() -> None:
    pool, cache = make(2)
    paths = [seq(4, base) for base in (100, 200, 300)]
    pages = [cache_path(pool, cache, p) for p in paths]
    cache.match_prefix(paths[0])  # path 0 is now the most recently used; path 1 the least
    assert cache.evict(2) == 2 and all(pool.is_free(p) for p in pages[1])
    assert cache.evict(1) == 1  # trims the tail of path 2 only
    assert cache.match_prefix(paths[2]).pages == (pages[2][0],)
    assert cache.match_prefix(paths[0]).pages == tuple(pages[0])
    cache.check_invariants()


def test_evict_cascades_up_to_parents() -> None:
    pool, cache = make(1)
    trunk = seq(3)
    cache_path(pool, cache, trunk + [10, 11])
    cache_path(pool, cache, trunk + [20])
    m = cache.match_prefix(trunk + [20])
    cache.lock(m.node)
    assert cache.evict(100) == 2  # only the [10, 11] branch: the trunk is locked via [20]
    cache.unlock(m.node)
    assert cache.evict(100) == 4  # [20], then the trunk that became an unlocked leaf
    assert cache.num_cached_pages == 0 and pool.num_free == pool.num_total
    cache.check_invariants()


def test_disabled_mode_is_a_pass_through() -> None:
    pool, cache = make(4, enabled=False)
    pages = pool.alloc(2)
    assert pages is not None
    assert cache.insert(seq(8), pages) == pages
    m = cache.match_prefix(seq(8))
    assert m == PrefixMatch((), 0, cache.root)
    cache.lock(m.node)
    cache.unlock(m.node)
    cache.unlock(m.node)  # no-op, no error
    assert (cache.num_cached_pages, cache.evict(10), cache.reset()) == (0, 0, True)
    cache.check_invariants()


def test_reset_only_when_unlocked() -> None:
    pool, cache = make(4)
    cache_path(pool, cache, seq(12))
    cache_path(pool, cache, seq(8, 50))
    m = cache.match_prefix(seq(8))
    cache.lock(m.node)
    assert cache.reset() is False and cache.num_cached_pages == 5
    cache.unlock(m.node)
    assert cache.reset() is True
    assert cache.num_cached_pages == 0 and pool.num_free == pool.num_total
    assert cache.match_prefix(seq(12)).num_tokens == 0
    with pytest.raises(RuntimeError):
        cache.lock(m.node)
    cache.check_invariants()


# --- property tests ----------------------------------------------------------------------------


@dataclass
class Running:
    ids: list[int]
    match: PrefixMatch
    new: list[int] = field(default_factory=list)


def start(pool: PagePool, cache: RadixCache, ids: list[int], kv: dict[int, tuple[int, ...]]) -> Running | None:
    ps = cache.page_size
    m = cache.match_prefix(ids[: len(ids) - 1])
    cache.lock(m.node)
    for j, p in enumerate(m.pages):  # a hit must hold exactly these tokens' KV
        assert kv[p] == tuple(ids[j * ps : (j + 1) * ps])
    need = -(-len(ids) // ps) - len(m.pages)
    new = pool.alloc(need)
    if new is None:
        cache.evict(need - pool.num_free)
        new = pool.alloc(need)
    if new is None:  # the scheduler would retract or wait
        cache.unlock(m.node)
        return None
    for j, p in enumerate(new, start=len(m.pages)):
        kv[p] = tuple(ids[j * ps : (j + 1) * ps])  # "compute" the KV
    return Running(ids, m, new)


def finish(pool: PagePool, cache: RadixCache, req: Running) -> None:
    full = len(req.ids) // cache.page_size
    table = list(req.match.pages) + req.new
    dup = cache.insert(req.ids[: full * cache.page_size], table[:full])
    assert set(dup) <= set(req.new)
    pool.free(dup + table[full:])
    cache.unlock(req.match.node)


steps = st.lists(
    st.tuples(st.integers(0, 2), st.lists(st.integers(0, 1), min_size=1, max_size=14), st.integers(0, 7)),
    max_size=30,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps=st.sampled_from([1, 2, 4]), num_pages=st.integers(4, 40), steps=steps)
def test_random_requests_keep_accounting(ps: int, num_pages: int, steps: list[tuple[int, list[int], int]]) -> None:
    pool, cache = make(ps, num_pages)
    kv: dict[int, tuple[int, ...]] = {}
    running: list[Running] = []
    for op, ids, pick in steps:
        if op > 0 or not running:  # 2/3 starts, 1/3 finishes: several requests overlap
            req = start(pool, cache, ids, kv)
            if req is not None:
                running.append(req)
        else:
            finish(pool, cache, running.pop(pick % len(running)))
        cache.check_invariants()
        private = sum(len(r.new) for r in running)
        assert pool.num_free + cache.num_cached_pages + private == pool.num_total
    for req in running:
        finish(pool, cache, req)
    cache.check_invariants()
    assert cache.num_locked_pages == 0
    assert pool.num_free + cache.num_cached_pages == pool.num_total
    assert cache.reset() and pool.num_free == pool.num_total


def common_pages(a: list[int], b: list[int], ps: int) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // ps


@settings(max_examples=80, deadline=None)
@given(
    ps=st.sampled_from([1, 2, 4]),
    inserted=st.lists(st.lists(st.integers(0, 2), max_size=12), max_size=8),
    query=st.lists(st.integers(0, 2), max_size=14),
)
def test_match_is_the_longest_cached_prefix(ps: int, inserted: list[list[int]], query: list[int]) -> None:
    pool, cache = make(ps, 256)  # large enough: no eviction
    for ids in inserted:
        cache_path(pool, cache, ids)
    expected = max((common_pages(query, ids, ps) for ids in inserted), default=0)
    m = cache.match_prefix(query)
    assert m.num_tokens == expected * ps == len(m.pages) * ps
    cache.check_invariants()
    assert cache.match_prefix(query) == PrefixMatch(m.pages, m.num_tokens, m.node)  # stable
