"""Routing policies: pure functions over a snapshot of the available workers, plus a small holder.

Each ``pick_*`` function takes the candidate ``WorkerView``s (never empty) and whatever state it
needs as arguments, and returns an index into the candidates; none of them does I/O or mutates
anything, so they are unit-tested without sockets. ``Policy`` keeps the little state the policies
need between requests (a round-robin counter, a seeded RNG, a prefix tree for ``cache_aware``)
and is the only thing the dispatcher calls.

``cache_aware`` (after SGLang's): when the load is unbalanced (``max - min > abs`` and
``max > rel * min`` active requests) it sends the request to the least-loaded worker; otherwise to
the worker whose recent prompts share the longest prefix with this one if that prefix covers more
than ``cache_threshold`` of the prompt, else to the worker with the smallest tree (most room),
ties going to the less loaded. Every choice records the prompt under the chosen worker.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from router.config import POLICIES, CacheAwareConfig
from router.prefix_tree import PrefixTree
from router.worker import WorkerView


def pick_random(workers: Sequence[WorkerView], rng: random.Random) -> int:
    return rng.randrange(len(workers))


def pick_round_robin(workers: Sequence[WorkerView], counter: int) -> int:
    return counter % len(workers)


def pick_power_of_two(workers: Sequence[WorkerView], rng: random.Random) -> int:
    """Two distinct random candidates; the one with fewer active requests (the first on a tie)."""
    if len(workers) == 1:
        return 0
    a, b = rng.sample(range(len(workers)), 2)
    return b if workers[b].active < workers[a].active else a


def least_loaded(workers: Sequence[WorkerView]) -> int:
    return min(range(len(workers)), key=lambda i: workers[i].active)


def is_imbalanced(loads: Sequence[int], abs_threshold: int, rel_threshold: float) -> bool:
    hi, lo = max(loads), min(loads)
    return hi - lo > abs_threshold and hi > rel_threshold * lo


def pick_cache_aware(
    workers: Sequence[WorkerView],
    key_len: int,
    matched: Mapping[str, int],
    tree_sizes: Mapping[str, int],
    config: CacheAwareConfig,
) -> int:
    """``matched[url]``: characters of this prompt's prefix last sent to ``url``; ``tree_sizes[url]``: its tree size."""
    if is_imbalanced([w.active for w in workers], config.balance_abs_threshold, config.balance_rel_threshold):
        return least_loaded(workers)
    best = max(range(len(workers)), key=lambda i: matched.get(workers[i].url, 0))
    best_len = matched.get(workers[best].url, 0)
    if key_len > 0 and best_len > 0 and best_len / key_len > config.cache_threshold:
        return best
    return min(range(len(workers)), key=lambda i: (tree_sizes.get(workers[i].url, 0), workers[i].active))


class Policy:
    """One role's policy by name, with its state; ``choose`` is called once per pick."""

    def __init__(self, name: str, rng: random.Random, cache: CacheAwareConfig) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
        self.name = name
        self.rng = rng
        self.cache = cache
        self.counter = 0
        self.tree = PrefixTree(cache.max_tree_size) if name == "cache_aware" else None

    @property
    def remembers_prompts(self) -> bool:
        """Does a choice change what later choices see (cache_aware's tree), even with one candidate?"""
        return self.tree is not None

    def choose(self, workers: Sequence[WorkerView], key: str | None) -> WorkerView:
        assert workers, "choose() needs at least one candidate"
        if self.name == "random":
            index = pick_random(workers, self.rng)
        elif self.name == "round_robin":
            index = pick_round_robin(workers, self.counter)
            self.counter += 1
        elif self.name == "power_of_two":
            index = pick_power_of_two(workers, self.rng)
        else:
            index = self._cache_aware(workers, key or "")
        return workers[index]

    def _cache_aware(self, workers: Sequence[WorkerView], key: str) -> int:
        assert self.tree is not None
        matched = self.tree.match(key) if key else {}
        sizes = {w.url: self.tree.size(w.url) for w in workers}
        index = pick_cache_aware(workers, len(key), matched, sizes, self.cache)
        if key:
            self.tree.insert(key, workers[index].url)
        return index

    def forget(self, url: str) -> None:
        """A worker left: drop what the policy remembers about it."""
        if self.tree is not None:
            self.tree.remove_tenant(url)
