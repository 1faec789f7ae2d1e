"""PagePool: the allocator of KV page ids.

Page ids index the ``num_pages`` axis of the KV tensor (see ``kv_cache.py``). Page 0 is the null
page: it pads page tables and is never handed out, so allocatable ids are ``1 .. num_pages - 1``.

Invariants:
- every id in ``1 .. num_pages - 1`` is either in ``_free`` (exactly once, with ``_is_free[id] == 1``)
  or held by exactly one owner (a request or the radix cache), with ``_is_free[id] == 0``;
- ``_is_free[0] == 0`` forever, so freeing page 0 is caught as a double free / foreign page.
Misuse (double free, foreign id) is an engine bug, reported as RuntimeError before any state changes.
"""

from __future__ import annotations

from collections.abc import Iterable


class PagePool:
    """A stack of free page ids plus a byte map for O(1) ownership checks; O(n) per op."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1 (page 0 is the null page), got {num_pages}")
        self._num_pages = num_pages
        self._free: list[int] = []
        self._is_free = bytearray(num_pages)
        self.reset()

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        """Size of the page axis, including the null page 0."""
        return self._num_pages

    @property
    def num_total(self) -> int:
        """Allocatable pages: ``num_pages - 1``."""
        return self._num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, page: int) -> bool:
        """True when ``page`` is an allocatable id currently in the pool (False for page 0)."""
        return 0 <= page < self._num_pages and self._is_free[page] == 1

    # --- operations ----------------------------------------------------------------------------

    def alloc(self, n: int) -> list[int] | None:
        """Take ``n`` free pages, all or nothing: None (and no change) if fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()  # the stack top is its end; hand ids out lowest-first after a reset
        for p in pages:
            self._is_free[p] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return ``pages`` to the pool. Validates all of them first: on error nothing is freed."""
        pages = list(pages)
        marked = 0
        try:
            for p in pages:
                if not (0 < p < self._num_pages):
                    raise RuntimeError(f"free of page {p}: not an allocatable id in [1, {self._num_pages})")
                if self._is_free[p]:
                    raise RuntimeError(f"double free of page {p}")
                self._is_free[p] = 1  # marking as we go also catches duplicates within `pages`
                marked += 1
        except RuntimeError:
            for p in pages[:marked]:
                self._is_free[p] = 0
            raise
        # Push in reverse so that a later alloc(len(pages)) returns them in the same order.
        self._free.extend(reversed(pages))

    def reset(self) -> None:
        """Every allocatable page becomes free (callers must have dropped all page ids)."""
        self._free = list(range(self._num_pages - 1, 0, -1))  # top of the stack (end) = page 1
        self._is_free = bytearray(b"\x01") * self._num_pages
        self._is_free[0] = 0

    def __repr__(self) -> str:
        return f"PagePool(num_free={self.num_free}, num_total={self.num_total})"
