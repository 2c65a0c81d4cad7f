"""The expert cache: eviction order by hand, scope and pinning, and Belady's MIN against brute force.

A key is ``moe_layer * num_experts + expert``. A cache starts full (model loading fills its slots,
the same number per layer, lowest expert ids first)."""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.errors import PolicyError
from sim.policies.cache import ExpertCache, LfuPolicy, LruPolicy, belady_misses, make_cache


def lru(num_layers: int, num_experts: int, capacity: int, per_layer: bool = False) -> ExpertCache:
    return make_cache("lru", num_layers=num_layers, num_experts=num_experts, capacity_experts=capacity, per_layer=per_layer)


def lfu(num_layers: int, num_experts: int, capacity: int, per_layer: bool = False) -> ExpertCache:
    return make_cache("lfu", num_layers=num_layers, num_experts=num_experts, capacity_experts=capacity, per_layer=per_layer)


def resident(cache: ExpertCache) -> set[int]:
    return set(np.flatnonzero(cache.resident).tolist())


def touch(cache: ExpertCache, *keys: int, tick: int) -> None:
    cache.touch(np.asarray(keys, dtype=np.int64), tick)


def insert(cache: ExpertCache, *keys: int, pinned: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Insert ``keys`` the way the planner does (the new keys pinned too); returns (placed, evicted)."""
    mask = np.zeros(len(cache.resident), dtype=bool)
    mask[list(pinned | set(keys))] = True
    before = resident(cache)
    placed = cache.insert_many(np.asarray(keys, dtype=np.int64), mask)
    return placed, before - resident(cache)


# ---------------------------------------------------------------- eviction order by hand


def test_starts_full_with_the_same_number_of_experts_per_layer():
    cache = lru(num_layers=3, num_experts=4, capacity=7)
    # 7 slots over 3 layers: 3, 2, 2 (the first layers take the remainder).
    assert resident(cache) == {0, 1, 2, 4, 5, 8, 9}
    assert cache.num_resident == 7 and not cache.holds_everything


def test_lru_evicts_the_least_recently_used():
    cache = lru(num_layers=1, num_experts=6, capacity=3)
    assert resident(cache) == {0, 1, 2}
    touch(cache, 0, tick=1)
    touch(cache, 1, tick=2)
    touch(cache, 2, tick=3)
    touch(cache, 0, tick=4)  # order of last use now: 1, 2, 0
    assert insert(cache, 3) == (1, {1})
    touch(cache, 3, tick=5)  # 2, 0, 3
    assert insert(cache, 4) == (1, {2})
    touch(cache, 4, tick=6)
    touch(cache, 0, tick=7)  # 3, 4, 0
    assert insert(cache, 5) == (1, {3})
    assert resident(cache) == {0, 4, 5}
    assert cache.evictions == 3 and cache.num_resident == 3


def test_lru_inserting_several_evicts_the_oldest_ones():
    cache = lru(num_layers=1, num_experts=8, capacity=4)
    for tick, key in enumerate([2, 0, 3, 1], start=1):
        touch(cache, key, tick=tick)
    assert insert(cache, 5, 6) == (2, {2, 0})
    assert resident(cache) == {1, 3, 5, 6}


def test_lfu_evicts_the_least_frequently_used():
    cache = lfu(num_layers=1, num_experts=5, capacity=3)
    tick = 0
    for key, uses in [(0, 3), (1, 1), (2, 2)]:
        for _ in range(uses):
            tick += 1
            touch(cache, key, tick=tick)
    assert insert(cache, 3) == (1, {1})
    touch(cache, 3, tick=tick + 1)  # used once, and the most recent: still the least frequent
    assert insert(cache, 4) == (1, {3})
    assert resident(cache) == {0, 2, 4}


def test_lfu_breaks_ties_by_recency():
    cache = lfu(num_layers=1, num_experts=4, capacity=3)
    touch(cache, 1, tick=1)
    touch(cache, 0, tick=2)
    touch(cache, 2, tick=3)
    assert insert(cache, 3) == (1, {1})


def test_lfu_frequency_outweighs_any_recency():
    cache = lfu(num_layers=1, num_experts=3, capacity=2)
    touch(cache, 0, tick=1)
    touch(cache, 0, tick=2)
    touch(cache, 1, tick=10**6)
    assert insert(cache, 2) == (1, {1})


# ---------------------------------------------------------------- scope


def test_per_layer_scope_evicts_only_within_the_layer():
    """2 layers x 4 experts, 4 slots: 2 per layer. Layer 1's experts are the oldest, but a layer-0
    insertion must evict from layer 0; a global pool evicts the oldest anywhere."""
    for per_layer, victim in ((True, 0), (False, 4)):
        cache = lru(num_layers=2, num_experts=4, capacity=4, per_layer=per_layer)
        assert resident(cache) == {0, 1, 4, 5}
        for tick, key in enumerate([4, 5, 0, 1], start=1):
            touch(cache, key, tick=tick)
        assert insert(cache, 2) == (1, {victim}), per_layer
        assert cache.num_resident == 4


def test_per_layer_scope_keeps_each_layer_within_its_share():
    cache = lru(num_layers=2, num_experts=4, capacity=5, per_layer=True)  # 2 per layer; one slot unused
    assert cache.layer_capacity == 2 and cache.capacity_experts == 4
    assert insert(cache, 2, 3) == (2, {0, 1})
    assert resident(cache) == {2, 3, 4, 5}


def test_per_layer_scope_needs_a_slot_per_layer():
    with pytest.raises(PolicyError, match="per_layer"):
        lru(num_layers=4, num_experts=2, capacity=3, per_layer=True)


def test_unknown_policy_is_a_policy_error():
    with pytest.raises(PolicyError, match="all_resident, lru or lfu"):
        make_cache("fifo", num_layers=1, num_experts=2, capacity_experts=1, per_layer=False)


def test_all_resident_holds_everything():
    cache = make_cache("all_resident", num_layers=3, num_experts=4, capacity_experts=1, per_layer=False)
    assert cache.holds_everything and cache.num_resident == 12


# ---------------------------------------------------------------- pinning


def test_pinned_experts_are_never_evicted():
    cache = lru(num_layers=1, num_experts=6, capacity=3)
    touch(cache, 0, tick=1)
    touch(cache, 1, tick=2)
    touch(cache, 2, tick=3)
    # 0 is the oldest but pinned (the current layer still needs it): 1 goes.
    assert insert(cache, 3, pinned={0}) == (1, {1})
    assert 0 in resident(cache)


def test_insert_with_no_evictable_slot_places_nothing_and_changes_nothing():
    cache = lru(num_layers=1, num_experts=6, capacity=3)
    before = cache.resident.copy()
    placed, evicted = insert(cache, 3, 4, pinned={0, 1, 2})
    assert (placed, evicted) == (0, set())
    assert np.array_equal(cache.resident, before)
    assert cache.num_resident == 3 and cache.evictions == 0


def test_insert_with_fewer_evictable_slots_than_keys_places_the_first_ones():
    cache = lru(num_layers=1, num_experts=6, capacity=3)
    placed, evicted = insert(cache, 3, 4, 5, pinned={0, 2})
    assert (placed, evicted) == (1, {1})
    assert resident(cache) == {0, 2, 3}
    assert cache.num_resident == 3


@st.composite
def cache_workouts(draw):
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(2, 5))
    per_layer = draw(st.booleans())
    capacity = draw(st.integers(num_layers if per_layer else 1, num_layers * num_experts))
    policy = draw(st.sampled_from(["lru", "lfu"]))
    steps = []
    for tick in range(1, draw(st.integers(1, 25)) + 1):
        layer = draw(st.integers(0, num_layers - 1))
        experts = draw(st.lists(st.integers(0, num_experts - 1), min_size=1, max_size=num_experts, unique=True))
        pinned = draw(st.lists(st.integers(0, num_layers * num_experts - 1), max_size=4, unique=True))
        steps.append((tick, [layer * num_experts + e for e in experts], pinned))
    return make_cache(policy, num_layers=num_layers, num_experts=num_experts, capacity_experts=capacity,
                      per_layer=per_layer), steps


@settings(max_examples=200, deadline=None)
@given(workout=cache_workouts())
def test_random_workouts_keep_pins_and_capacity(workout):
    cache, steps = workout
    for tick, keys, pinned in steps:
        keep = {k for k in pinned if cache.resident[k]}
        missing = [k for k in keys if not cache.resident[k]]
        # As the planner does: every expert the layer needs is pinned, resident or not.
        placed, evicted = insert(cache, *missing, pinned=set(pinned) | set(keys)) if missing else (0, set())
        assert not (keep & evicted), "a pinned expert was evicted"
        assert not (set(keys) & evicted), "an expert being inserted for was evicted"
        assert 0 <= placed <= len(missing)
        assert all(cache.resident[k] for k in missing[:placed])
        assert not any(cache.resident[k] for k in missing[placed:])
        assert cache.num_resident == int(cache.resident.sum()) <= cache.capacity_experts
        if cache.per_layer:
            per_layer = cache.resident.reshape(cache.num_layers, cache.num_experts).sum(axis=1)
            assert (per_layer <= cache.layer_capacity).all()
            assert evicted <= set(range(keys[0] // cache.num_experts * cache.num_experts,
                                        (keys[0] // cache.num_experts + 1) * cache.num_experts))
        touch(cache, *keys, tick=tick)


# ---------------------------------------------------------------- Belady's MIN


def test_belady_textbook_sequence():
    """The classic page-reference string with 3 frames: 7 faults for OPT when starting empty."""
    stream = np.array([7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2])
    assert belady_misses(stream, capacity=3) == 7
    # The full textbook string (20 references) gives OPT's well-known 9 faults.
    full = np.array([7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1])
    assert belady_misses(full, capacity=3) == 9


def test_belady_counts_a_warm_start():
    initial = np.zeros(8, dtype=bool)
    initial[[0, 1]] = True
    assert belady_misses(np.array([0, 1, 0, 1]), capacity=2, initial=initial) == 0
    assert belady_misses(np.array([0, 1, 0, 1]), capacity=2) == 2
    assert belady_misses(np.array([], dtype=np.int64), capacity=2) == 0


def brute_force_min_misses(stream: tuple[int, ...], capacity: int, initial: frozenset[int]) -> int:
    """The fewest misses of any demand-paging cache: try every victim on every miss."""

    @functools.cache
    def best(i: int, held: frozenset[int]) -> int:
        if i == len(stream):
            return 0
        key = stream[i]
        if key in held:
            return best(i + 1, held)
        if len(held) < capacity:
            return 1 + best(i + 1, held | {key})
        return 1 + min(best(i + 1, (held - {victim}) | {key}) for victim in held)

    return best(0, initial)


streams = st.lists(st.integers(0, 5), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(stream=streams, capacity=st.integers(1, 4), warm=st.lists(st.integers(0, 5), max_size=4, unique=True))
def test_belady_matches_brute_force(stream, capacity, warm):
    warm = warm[:capacity]
    initial = np.zeros(6, dtype=bool)
    initial[warm] = True
    expected = brute_force_min_misses(tuple(stream), capacity, frozenset(warm))
    assert belady_misses(np.array(stream, dtype=np.int64), capacity, initial if warm else None) == expected


def lru_misses_with_cache(stream: list[int], num_keys: int, capacity: int) -> int:
    """Misses of the simulator's LRU cache, warmed with keys 0..capacity-1 used in that order."""
    cache = lru(num_layers=1, num_experts=num_keys, capacity=capacity)
    for tick in range(capacity):
        touch(cache, tick, tick=tick + 1)
    misses = 0
    for tick, key in enumerate(stream, start=capacity + 1):
        if not cache.resident[key]:
            misses += 1
            assert insert(cache, key)[0] == 1
        touch(cache, key, tick=tick)
    return misses


def lru_misses_reference(stream: list[int], capacity: int) -> int:
    held: OrderedDict[int, None] = OrderedDict((k, None) for k in range(capacity))
    misses = 0
    for key in stream:
        if key in held:
            held.move_to_end(key)
            continue
        misses += 1
        if len(held) >= capacity:
            held.popitem(last=False)
        held[key] = None
    return misses


@settings(max_examples=200, deadline=None)
@given(stream=st.lists(st.integers(0, 7), max_size=60), capacity=st.integers(1, 7))
def test_lru_cache_matches_a_textbook_lru_and_belady_never_does_worse(stream, capacity):
    num_keys = 8
    simulated = lru_misses_with_cache(stream, num_keys, capacity)
    assert simulated == lru_misses_reference(stream, capacity)
    initial = np.zeros(num_keys, dtype=bool)
    initial[:capacity] = True
    assert belady_misses(np.array(stream, dtype=np.int64), capacity, initial) <= simulated


@settings(max_examples=100, deadline=None)
@given(stream=st.lists(st.integers(0, 7), max_size=60), capacity=st.integers(1, 7))
def test_lfu_cache_matches_a_reference_lfu(stream, capacity):
    """LFU counts every use since the start (also uses before an eviction); ties go to the least recent."""
    num_keys = 8
    cache = ExpertCache(num_layers=1, num_experts=num_keys, capacity_experts=capacity, per_layer=False,
                        policy=LfuPolicy(num_keys))
    count = [0] * num_keys
    last = [0] * num_keys
    held = set(range(capacity))
    for tick in range(1, capacity + 1):  # warm: key tick-1 used once, in order
        touch(cache, tick - 1, tick=tick)
        count[tick - 1], last[tick - 1] = 1, tick
    for tick, key in enumerate(stream, start=capacity + 1):
        if key not in held:
            victim = min(held, key=lambda k: (count[k], last[k]))
            held.remove(victim)
            held.add(key)
            assert insert(cache, key) == (1, {victim})
        touch(cache, key, tick=tick)
        count[key] += 1
        last[key] = tick
        assert resident(cache) == held


def test_lru_policy_scores_are_last_use_ticks():
    policy = LruPolicy(4)
    policy.on_access(np.array([1, 3]), 7)
    assert policy.scores().tolist() == [0, 7, 0, 7]
