"""An approximate prefix tree of recent prompts, one per role, whose tenants are worker URLs.

Representation (a hash-consed trie): a prompt key is cut into ``block``-character blocks; the node
for its first k blocks is named by a chain hash ``h_k = hash((h_{k-1}, block_k))``, so the parent
of node ``h_k`` is ``h_{k-1}`` and walking a prompt is one dict lookup per block. Each node holds
the tenants that were sent a prompt through it. A trailing partial block is ignored.

Invariants and approximations:
- ``match`` reports, per tenant, the characters of the longest prefix of whole blocks it was sent.
- Each tenant keeps at most ``max_blocks`` nodes, evicted least-recently-used first; an access
  refreshes every node on the prompt's path leaf first, so a path loses its deepest nodes first.
- A tenant's match stops at the first node on the path that no longer holds it.
- Hash collisions can only mis-route a request, never break one: the tree is advice.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_BLOCK = 16
MAX_KEY_CHARS = 1 << 16  # longer prompts are keyed by their head only


class PrefixTree:
    def __init__(self, max_blocks: int, block: int = DEFAULT_BLOCK) -> None:
        assert max_blocks >= 1 and block >= 1
        self.max_blocks = max_blocks
        self.block = block
        self._nodes: dict[int, set[str]] = {}  # node hash -> tenants
        self._lru: dict[str, OrderedDict[int, None]] = {}  # tenant -> its nodes, oldest first

    def _path(self, key: str) -> list[int]:
        b = self.block
        key = key[:MAX_KEY_CHARS]
        h, out = 0, []
        for start in range(0, len(key) - b + 1, b):
            h = hash((h, key[start : start + b]))
            out.append(h)
        return out

    def match(self, key: str) -> dict[str, int]:
        """tenant -> matched characters (whole blocks) of ``key``; tenants with no match are absent."""
        matched: dict[str, int] = {}
        for depth, node in enumerate(self._path(key), start=1):
            tenants = self._nodes.get(node)
            if not tenants:
                break
            prev = (depth - 1) * self.block
            for t in tenants:
                if matched.get(t, 0) == prev:  # only contiguous paths count
                    matched[t] = depth * self.block
        return matched

    def insert(self, key: str, tenant: str) -> None:
        lru = self._lru.setdefault(tenant, OrderedDict())
        for node in reversed(self._path(key)):  # leaf first, so the root ends up most recent
            self._nodes.setdefault(node, set()).add(tenant)
            lru[node] = None
            lru.move_to_end(node)
        while len(lru) > self.max_blocks:
            node, _ = lru.popitem(last=False)
            self._drop(node, tenant)

    def size(self, tenant: str) -> int:
        """Blocks held for ``tenant``."""
        return len(self._lru.get(tenant, ()))

    def remove_tenant(self, tenant: str) -> None:
        for node in self._lru.pop(tenant, OrderedDict()):
            self._drop(node, tenant)

    def _drop(self, node: int, tenant: str) -> None:
        tenants = self._nodes.get(node)
        if tenants is not None:
            tenants.discard(tenant)
            if not tenants:
                del self._nodes[node]
