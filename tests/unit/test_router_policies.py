"""Routing policies as pure functions over WorkerView snapshots, and the prefix tree (no sockets)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.circuit_breaker import CircuitState
from router.config import CacheAwareConfig
from router.policies import (
    Policy,
    is_imbalanced,
    least_loaded,
    pick_cache_aware,
    pick_power_of_two,
    pick_random,
    pick_round_robin,
)
from router.prefix_tree import PrefixTree
from router.worker import WorkerView

CFG = CacheAwareConfig(cache_threshold=0.3, balance_abs_threshold=4, balance_rel_threshold=1.5, max_tree_size=1000)


def views(*loads: int) -> list[WorkerView]:
    return [WorkerView(f"http://w{i}:1", "regular", load, True, CircuitState.CLOSED) for i, load in enumerate(loads)]


def test_random_covers_all_workers_and_is_seeded():
    ws = views(0, 0, 0)
    rng = random.Random(7)
    picks = [pick_random(ws, rng) for _ in range(300)]
    assert set(picks) == {0, 1, 2}
    assert picks == [pick_random(ws, r) for r in [random.Random(7)] for _ in range(300)]


def test_round_robin_cycles():
    ws = views(5, 0, 9)
    assert [pick_round_robin(ws, c) for c in range(6)] == [0, 1, 2, 0, 1, 2]


def test_power_of_two_prefers_the_less_loaded_of_two():
    ws = views(10, 0, 10, 10)
    rng = random.Random(0)
    picks = Counter(pick_power_of_two(ws, rng) for _ in range(2000))
    # worker 1 wins every draw it is part of: 2 of 4 choose 2 = half of the draws
    assert 0.4 < picks[1] / 2000 < 0.6
    assert pick_power_of_two(views(3), rng) == 0
    # the most loaded worker never wins against a lighter one
    assert all(pick_power_of_two(views(0, 9), random.Random(s)) == 0 for s in range(50))


def test_imbalance_needs_both_thresholds():
    assert not is_imbalanced([0, 4], 4, 1.5)  # gap 4 is not > 4
    assert is_imbalanced([0, 5], 4, 1.5)
    assert not is_imbalanced([20, 25], 4, 1.5)  # 25 <= 1.5 * 20
    assert is_imbalanced([10, 16], 4, 1.5)
    assert least_loaded(views(3, 1, 2)) == 1


def test_cache_aware_follows_the_cached_prefix():
    ws = views(1, 1, 1)
    matched = {ws[2].url: 80}
    assert pick_cache_aware(ws, 100, matched, {}, CFG) == 2
    # below the threshold: the worker with the smallest tree (most room) wins, then the less loaded
    assert pick_cache_aware(ws, 100, {ws[2].url: 20}, {ws[0].url: 5, ws[1].url: 1, ws[2].url: 9}, CFG) == 1


def test_cache_aware_balances_when_load_is_skewed():
    ws = views(10, 0, 10)
    matched = {ws[0].url: 100}
    assert pick_cache_aware(ws, 100, matched, {}, CFG) == 1


def test_cache_aware_policy_keeps_prefix_affinity_and_spreads_new_prefixes():
    policy = Policy("cache_aware", random.Random(0), CFG)
    ws = views(0, 0)
    shared = "You are a helpful assistant. " * 8
    first = policy.choose(ws, shared + "question one").url
    assert all(policy.choose(ws, shared + f"question {i}").url == first for i in range(2, 12))
    other = "Completely different system prompt. " * 8
    assert policy.choose(ws, other + "q").url != first  # the empty tree wins a new prefix
    policy.forget(first)
    assert policy.tree is not None and policy.tree.size(first) == 0


def test_policy_by_name_and_round_robin_state():
    with pytest.raises(ValueError):
        Policy("fastest", random.Random(0), CFG)
    rr = Policy("round_robin", random.Random(0), CFG)
    ws = views(0, 0, 0)
    assert [rr.choose(ws, None).url for _ in range(4)] == [ws[0].url, ws[1].url, ws[2].url, ws[0].url]


def test_prefix_tree_match_insert_evict():
    tree = PrefixTree(max_blocks=4, block=4)
    tree.insert("aaaabbbbcccc", "A")
    tree.insert("aaaabbbbdddd", "B")
    assert tree.match("aaaabbbbccccxx") == {"A": 12, "B": 8}
    assert tree.match("aaaaxxxx") == {"A": 4, "B": 4}
    assert tree.match("zzzz") == {}
    assert tree.match("aaa") == {}  # a partial block never matches
    tree.insert("eeeeffffgggg", "A")  # A holds 6 blocks > 4: its oldest go first
    assert tree.size("A") == 4
    assert tree.match("eeeeffffgggg")["A"] == 12
    assert tree.match("aaaabbbbcccc")["A"] < 12  # the deepest nodes of the old path went first
    tree.remove_tenant("B")
    assert tree.size("B") == 0 and "B" not in tree.match("aaaabbbbdddd")
