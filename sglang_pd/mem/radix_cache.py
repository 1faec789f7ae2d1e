"""RadixCache: a page-granular prefix tree over token ids, with reference counts and LRU eviction.

Tree invariants (checked by ``check_invariants``):
- every non-root node has a non-empty ``key`` (token ids) with ``len(key) % page_size == 0`` and
  ``len(pages) == len(key) // page_size``; ``pages[j]`` holds the KV of ``key[j*ps:(j+1)*ps]``;
- a node's children are keyed by the first page of their key (a tuple of ``page_size`` tokens), so
  siblings never share a first page; the root has no key and no pages;
- ``ref`` counts the locks held on the node or on any descendant (``lock`` walks to the root), hence
  ``parent.ref >= child.ref`` and a node with ``ref == 0`` has an unlocked subtree;
- every page id in the tree is unique, allocated (not free) in the pool, and owned by the tree;
- ``_candidates`` is exactly the set of non-root leaves with ``ref == 0`` (the eviction frontier);
- ``_num_cached`` / ``_num_locked`` = pages in all nodes / in nodes with ``ref > 0``.

Protocol (see ``sglang_pd/mem/__init__.py``): ``match_prefix`` then ``lock`` at once (before any
``evict``); ``insert`` hands pages to the tree; ``unlock`` the matched node when done.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from sglang_pd.mem.page_pool import PagePool

TokenKey = tuple[int, ...]


class RadixNode:
    """Opaque handle to a tree node. Only ``RadixCache`` reads or writes its fields."""

    __slots__ = ("key", "pages", "children", "parent", "ref", "last_access", "uid")

    def __init__(self, key: TokenKey, pages: list[int], parent: RadixNode | None, uid: int) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[TokenKey, RadixNode] = {}
        self.parent = parent  # None for the root and for detached (evicted / reset) nodes
        self.ref = 0
        self.last_access = 0  # value of the cache's logical clock at the last match/insert through it
        self.uid = uid  # creation order; breaks LRU ties deterministically

    def __repr__(self) -> str:
        return f"RadixNode(uid={self.uid}, tokens={len(self.key)}, pages={len(self.pages)}, ref={self.ref})"


@dataclass(frozen=True)
class PrefixMatch:
    """Longest cached prefix: ``pages`` cover tokens ``[0, num_tokens)``; ``node`` ends that path."""

    pages: tuple[int, ...]
    num_tokens: int  # == len(pages) * page_size
    node: RadixNode


class RadixCache:
    def __init__(self, pool: PagePool, page_size: int, enabled: bool = True) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self._pool = pool
        self._ps = page_size
        self._enabled = enabled
        self._clock = 0
        self._next_uid = 0
        self._root = self._new_node((), [], None)
        self._candidates: set[RadixNode] = set()
        self._num_cached = 0
        self._num_locked = 0

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def page_size(self) -> int:
        return self._ps

    @property
    def root(self) -> RadixNode:
        return self._root

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached

    @property
    def num_locked_pages(self) -> int:
        return self._num_locked

    @property
    def num_evictable_pages(self) -> int:
        return self._num_cached - self._num_locked

    # --- lookup and insertion ------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of ``token_ids`` in whole pages; splits a node the match ends inside."""
        if not self._enabled:
            return PrefixMatch((), 0, self._root)
        ids = self._as_key(token_ids, len(token_ids) - len(token_ids) % self._ps)
        now = self._tick()
        node, i = self._root, 0
        pages: list[int] = []
        node.last_access = now
        while i < len(ids):
            child = node.children.get(ids[i : i + self._ps])
            if child is None:
                break
            m = self._common_len(child.key, ids, i)  # >= page_size: the first page matched
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            pages.extend(child.pages)
            node, i = child, i + m  # after a split, the next lookup misses (or ids are exhausted)
        return PrefixMatch(tuple(pages), i, node)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> list[int]:
        """Add the path ``token_ids`` -> ``pages``; return the caller's pages the tree did not adopt.

        Where the tree already holds a page for the same tokens, the caller's page (if different) is
        returned for the caller to free; equal ids (from ``match_prefix``) are kept once. All other
        given pages now belong to the tree. Disabled cache: adopts nothing, returns all pages.
        """
        if len(token_ids) != len(pages) * self._ps:
            raise ValueError(f"insert: {len(token_ids)} tokens for {len(pages)} pages of {self._ps}")
        if not self._enabled:
            return list(pages)
        ids = self._as_key(token_ids, len(token_ids))
        given = list(pages)
        now = self._tick()
        node, i = self._root, 0
        rejected: list[int] = []
        node.last_access = now
        while i < len(ids):
            child = node.children.get(ids[i : i + self._ps])
            if child is None:
                self._add_leaf(node, ids[i:], given[i // self._ps :], now)
                break
            m = self._common_len(child.key, ids, i)
            if m < len(child.key):
                child = self._split(child, m)
            ours = given[i // self._ps : (i + m) // self._ps]
            rejected.extend(p for p, q in zip(ours, child.pages) if p != q)
            child.last_access = now
            node, i = child, i + m
        return rejected

    # --- reference counts ----------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Protect ``node`` and its ancestors from eviction (one more reference on each)."""
        if not self._enabled:
            return
        self._check_attached(node)
        while node is not self._root:
            if node.ref == 0:
                self._num_locked += len(node.pages)
                self._candidates.discard(node)
            node.ref += 1
            node = node.parent  # type: ignore[assignment]  # attached: parent is set up to the root

    def unlock(self, node: RadixNode) -> None:
        """Drop one reference from ``node`` and its ancestors; RuntimeError if ``node`` is unlocked."""
        if not self._enabled or node is self._root:
            return
        self._check_attached(node)
        if node.ref <= 0:  # ancestors have ref >= node.ref, so checking the node suffices
            raise RuntimeError(f"unlock of {node} which holds no reference")
        while node is not self._root:
            node.ref -= 1
            if node.ref == 0:
                self._num_locked -= len(node.pages)
                self._refresh_candidate(node)
            node = node.parent  # type: ignore[assignment]

    # --- eviction and reset --------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free up to ``num_pages`` pages from unlocked leaves, least recently used first.

        A leaf is trimmed from its tail when only part of it is needed (its remaining key is still a
        valid prefix); an emptied leaf is detached, and its parent may become a candidate.
        """
        if not self._enabled or num_pages <= 0:
            return 0
        heap = [(n.last_access, n.uid, n) for n in self._candidates]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            take = min(len(node.pages), num_pages - freed)
            if take < len(node.pages):  # partial: keep the head of the leaf
                keep = len(node.pages) - take
                self._pool.free(node.pages[keep:])
                node.pages = node.pages[:keep]
                node.key = node.key[: keep * self._ps]
            else:
                parent = self._remove_leaf(node)
                if parent in self._candidates:
                    heapq.heappush(heap, (parent.last_access, parent.uid, parent))
            self._num_cached -= take
            freed += take
        return freed

    def reset(self) -> bool:
        """Drop every node and free its pages (/flush_cache). False (no change) if anything is locked."""
        if self._num_locked > 0:
            return False
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            self._pool.free(node.pages)
            node.parent = None
        self._root.parent = None
        self._root = self._new_node((), [], None)
        self._candidates.clear()
        self._num_cached = 0
        return True

    # --- internals -----------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _new_node(self, key: TokenKey, pages: list[int], parent: RadixNode | None) -> RadixNode:
        self._next_uid += 1
        return RadixNode(key, pages, parent, self._next_uid)

    @staticmethod
    def _as_key(token_ids: Sequence[int], n: int) -> TokenKey:
        """First ``n`` ids as a tuple of Python ints (hashable even for numpy / torch input)."""
        return tuple(map(int, token_ids[:n]))

    def _common_len(self, key: TokenKey, ids: TokenKey, start: int) -> int:
        """Length of the common prefix of ``key`` and ``ids[start:]``, rounded down to whole pages."""
        n = min(len(key), len(ids) - start)
        if key[:n] == ids[start : start + n]:
            return n - n % self._ps
        ps, m = self._ps, 0
        while m + ps <= n and key[m : m + ps] == ids[start + m : start + m + ps]:
            m += ps
        return m

    def _split(self, node: RadixNode, m: int) -> RadixNode:
        """Cut ``node`` at token ``m`` (0 < m < len(key), page-aligned); return the new head node.

        The head takes the node's place under its parent and inherits ``ref`` / ``last_access``; the
        original object keeps the tail, so handles held by lockers still end the same path.
        """
        parent = node.parent
        assert parent is not None and 0 < m < len(node.key) and m % self._ps == 0
        head = self._new_node(node.key[:m], node.pages[: m // self._ps], parent)
        head.ref, head.last_access = node.ref, node.last_access
        parent.children[node.key[: self._ps]] = head
        node.key, node.pages, node.parent = node.key[m:], node.pages[m // self._ps :], head
        head.children[node.key[: self._ps]] = node
        return head  # not a leaf; node's candidacy and the page counts are unchanged

    def _add_leaf(self, parent: RadixNode, key: TokenKey, pages: list[int], now: int) -> None:
        leaf = self._new_node(key, pages, parent)
        leaf.last_access = now
        parent.children[key[: self._ps]] = leaf
        self._num_cached += len(pages)
        self._candidates.discard(parent)
        self._refresh_candidate(leaf)

    def _remove_leaf(self, node: RadixNode) -> RadixNode:
        """Free an unlocked leaf's pages and detach it; return its former parent."""
        parent = node.parent
        assert parent is not None and not node.children and node.ref == 0
        self._pool.free(node.pages)
        del parent.children[node.key[: self._ps]]
        self._candidates.discard(node)
        node.parent, node.pages = None, []
        self._refresh_candidate(parent)
        return parent

    def _refresh_candidate(self, node: RadixNode) -> None:
        if node is not self._root and node.parent is not None and node.ref == 0 and not node.children:
            self._candidates.add(node)
        else:
            self._candidates.discard(node)

    def _check_attached(self, node: RadixNode) -> None:
        if node is not self._root and node.parent is None:
            raise RuntimeError(f"{node} is no longer in the tree (evicted or reset before lock)")

    # --- testing -------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if an invariant of the module docstring is broken. O(tree size)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"RadixCache invariant: {msg}")

        ps, cached, locked = self._ps, 0, 0
        seen: set[int] = set()
        leaves: set[RadixNode] = set()
        if self._root.key or self._root.pages or self._root.parent is not None:
            fail("root must have no key, no pages, no parent")
        stack = [self._root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                if child.parent is not node or child.key[:ps] != first:
                    fail(f"{child} is linked wrongly under {node}")
                stack.append(child)
            if node is self._root:
                continue
            if not node.key or len(node.key) % ps or len(node.pages) != len(node.key) // ps:
                fail(f"{node}: key length not a positive multiple of {ps} or pages mismatch")
            parent = node.parent
            assert parent is not None  # reached through parent.children
            if node.ref < 0 or (parent is not self._root and node.ref > parent.ref):
                fail(f"{node}: ref {node.ref} negative or above its parent's")
            for p in node.pages:
                if p in seen or self._pool.is_free(p) or not 0 < p < self._pool.num_pages:
                    fail(f"page {p} duplicated in the tree, free in the pool, or out of range")
                seen.add(p)
            cached += len(node.pages)
            locked += len(node.pages) if node.ref > 0 else 0
            if node.ref == 0 and not node.children:
                leaves.add(node)
        if (cached, locked) != (self._num_cached, self._num_locked):
            fail(f"counts cached/locked {self._num_cached}/{self._num_locked}, actual {cached}/{locked}")
        if leaves != self._candidates:
            fail("eviction candidates differ from the unlocked leaves")
        if not self._enabled and (cached or self._root.children):
            fail("a disabled cache holds nodes")
