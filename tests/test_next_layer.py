"""The next-layer prefetch decisions shared by the simulator's planner and the real runtime (hand-computed)."""

from __future__ import annotations

import numpy as np

from sim.policies.cache import make_cache
from sim.policies.next_layer import predict_next_layer, reserve_prefetch


def test_oracle_predicts_the_used_experts_most_tokens_first() -> None:
    counts = np.array([0, 3, 0, 5, 3, 1])
    # 5 tokens on expert 3, then 3 each on experts 1 and 4 (lower id first), then 1 on expert 5.
    assert predict_next_layer("oracle", counts, np.zeros(6, np.int64), 3).tolist() == [3, 1, 4]
    assert predict_next_layer("oracle", np.array([0, 0, 2, 0]), np.zeros(4, np.int64), 3).tolist() == [2]


def test_frequency_predicts_the_most_used_so_far_whatever_this_iteration_routes() -> None:
    uses = np.array([4, 9, 9, 0])
    assert predict_next_layer("frequency", np.array([7, 0, 0, 7]), uses, 2).tolist() == [1, 2]


def test_reserve_prefetch_loads_absent_keys_into_evicted_slots() -> None:
    cache = make_cache("lru", num_layers=2, num_experts=4, capacity_experts=3, per_layer=False)
    assert cache.resident.tolist() == [True, True, False, False, True, False, False, False]  # the starting fill
    pinned = np.zeros(8, dtype=bool)
    cache.touch(np.array([4]), 1)
    cache.touch(np.array([0]), 2)
    cache.touch(np.array([1]), 3)
    # Predict layer 1 experts 0 and 1 (keys 4, 5): key 4 is resident, key 5 takes the least recently used
    # unpinned slot; key 4 is pinned with it, so the victim is key 0 (tick 2), not key 4 (tick 1).
    load = reserve_prefetch(cache, pinned, np.array([4, 5]))
    assert load.tolist() == [5]
    assert cache.resident.tolist() == [False, True, False, False, True, True, False, False]
    assert pinned[[4, 5]].all() and not pinned[[0, 1]].any()
    # With every other slot pinned, nothing is placed and the key is unpinned again.
    pinned[:] = True
    pinned[6] = False
    assert reserve_prefetch(cache, pinned, np.array([6])).tolist() == []
    assert not pinned[6] and not cache.resident[6]
