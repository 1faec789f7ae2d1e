"""PagePool: ids 1..num_pages-1, all-or-nothing alloc, checked free."""

from __future__ import annotations

import pytest

from sglang_pd.mem.page_pool import PagePool


def test_sizes_and_null_page_never_handed_out() -> None:
    pool = PagePool(8)
    assert (pool.num_pages, pool.num_total, pool.num_free) == (8, 7, 7)
    pages = pool.alloc(7)
    assert pages is not None and sorted(pages) == list(range(1, 8))
    assert pool.num_free == 0 and not pool.is_free(0)


def test_alloc_all_or_nothing() -> None:
    pool = PagePool(5)
    assert pool.alloc(5) is None and pool.num_free == 4
    a = pool.alloc(3)
    assert a is not None and len(set(a)) == 3 and pool.num_free == 1
    assert pool.alloc(2) is None and pool.num_free == 1
    assert pool.alloc(0) == []
    with pytest.raises(ValueError):
        pool.alloc(-1)


def test_free_returns_pages_and_they_are_reused() -> None:
    pool = PagePool(5)
    a = pool.alloc(4)
    assert a is not None
    pool.free(iter(a[:2]))  # any iterable
    assert pool.num_free == 2 and all(pool.is_free(p) for p in a[:2])
    b = pool.alloc(2)
    assert b is not None and sorted(b) == sorted(a[:2])


@pytest.mark.parametrize("bad", [[0], [5], [-1], [100]])
def test_free_foreign_page_raises(bad: list[int]) -> None:
    pool = PagePool(5)
    pool.alloc(4)
    with pytest.raises(RuntimeError):
        pool.free(bad)
    assert pool.num_free == 0


def test_double_free_raises_and_changes_nothing() -> None:
    pool = PagePool(6)
    a = pool.alloc(3)
    assert a is not None
    pool.free([a[0]])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a[1], a[0]])  # a[1] is valid, but the call must not free it
    assert pool.num_free == 3 and not pool.is_free(a[1])
    with pytest.raises(RuntimeError):
        pool.free([a[1], a[1]])  # duplicate within one call
    assert pool.num_free == 3 and not pool.is_free(a[1])
    pool.free([a[1], a[2]])
    assert pool.num_free == 5


def test_never_allocated_page_cannot_be_freed() -> None:
    pool = PagePool(4)
    with pytest.raises(RuntimeError):
        pool.free([1])


def test_reset() -> None:
    pool = PagePool(4)
    pool.alloc(3)
    pool.reset()
    assert pool.num_free == 3 and all(pool.is_free(p) for p in (1, 2, 3))
    assert pool.alloc(3) == [1, 2, 3]


def test_minimal_pool_has_nothing() -> None:
    pool = PagePool(1)
    assert pool.num_total == 0 and pool.alloc(1) is None and pool.alloc(0) == []
    with pytest.raises(ValueError):
        PagePool(0)
