"""Expert residency: which routed experts sit in GPU memory, and which one leaves when room is needed.

An expert is named by its key ``moe_layer * num_experts + expert``. ``ExpertCache`` holds the slots
(global, or an equal share per MoE layer) and asks its eviction policy for a victim among the
resident experts that are not pinned (an expert the current layer still needs is pinned). The same
objects serve the simulator and the real runtime, so both make identical decisions.

Lifecycle of a slot: empty -> loading (the engine has started the copy) -> resident; only a resident
unpinned expert can be evicted."""

from __future__ import annotations

import heapq
from typing import Protocol

import numpy as np

from sim.errors import PolicyError


class EvictionPolicy(Protocol):
    """Scores resident experts; the lowest score is evicted."""

    def on_access(self, keys: np.ndarray, tick: int) -> None: ...

    def scores(self) -> np.ndarray: ...


class LruPolicy:
    """Least recently used: the score is the tick of the last access."""

    def __init__(self, num_keys: int) -> None:
        self._last = np.zeros(num_keys, dtype=np.int64)

    def on_access(self, keys: np.ndarray, tick: int) -> None:
        self._last[keys] = tick

    def scores(self) -> np.ndarray:
        return self._last


class LfuPolicy:
    """Least frequently used; among equals, the least recently used."""

    def __init__(self, num_keys: int) -> None:
        self._count = np.zeros(num_keys, dtype=np.int64)
        self._score = np.zeros(num_keys, dtype=np.int64)

    def on_access(self, keys: np.ndarray, tick: int) -> None:
        self._count[keys] += 1
        # Ticks stay far below 2**32 in any run, so count dominates and recency breaks ties.
        self._score[keys] = (self._count[keys] << 32) + tick

    def scores(self) -> np.ndarray:
        return self._score


class ExpertCache:
    """GPU slots for routed experts with a capacity, global or split per MoE layer."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        capacity_experts: int,
        per_layer: bool,
        policy: EvictionPolicy,
    ) -> None:
        total = num_layers * num_experts
        if capacity_experts < 1:
            raise PolicyError("an expert cache needs room for at least one expert")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.per_layer = per_layer
        self.capacity_experts = min(capacity_experts, total)
        self.layer_capacity = max(1, self.capacity_experts // num_layers) if per_layer else self.capacity_experts
        if per_layer:
            self.capacity_experts = self.layer_capacity * num_layers
        self.policy = policy
        self.resident = np.zeros(total, dtype=bool)
        self._layer_count = np.zeros(num_layers, dtype=np.int64)
        self.num_resident = 0
        self.evictions = 0
        self._fill_at_start()

    @property
    def holds_everything(self) -> bool:
        return self.capacity_experts >= self.num_layers * self.num_experts

    def _fill_at_start(self) -> None:
        """Model loading fills the slots before serving starts: the same number of experts per layer."""
        per_layer = self.capacity_experts // self.num_layers
        extra = self.capacity_experts - per_layer * self.num_layers
        for layer in range(self.num_layers):
            n = min(self.num_experts, per_layer + (1 if layer < extra else 0))
            keys = layer * self.num_experts + np.arange(n)
            self.resident[keys] = True
            self._layer_count[layer] = n
        self.num_resident = int(self.resident.sum())

    def touch(self, keys: np.ndarray, tick: int) -> None:
        """Record uses of resident experts (the policy's recency/frequency)."""
        self.policy.on_access(keys, tick)

    def insert_many(self, keys: np.ndarray, pinned: np.ndarray) -> int:
        """Make ``keys`` (non-resident, all of one layer) resident, evicting unpinned experts as needed.

        The victims are the lowest-scored unpinned residents, exactly those a one-by-one insertion
        would pick (new keys are pinned, so they never compete). Returns how many of ``keys``, from
        the front, got a slot; the rest found every candidate slot pinned and change nothing."""
        m = len(keys)
        if m == 0:
            return 0
        layer = int(keys[0]) // self.num_experts
        if self.per_layer:
            free = self.layer_capacity - int(self._layer_count[layer])
        else:
            free = self.capacity_experts - self.num_resident
        need = m - free
        if need > 0:
            victims = self._choose_victims(layer, pinned, need)
            self.resident[victims] = False
            self.num_resident -= len(victims)
            self.evictions += len(victims)
            free += len(victims)
            if self.per_layer:
                self._layer_count[layer] -= len(victims)  # per-layer victims come from this layer
        placed = max(0, min(m, free))
        self.resident[keys[:placed]] = True
        if self.per_layer:  # only a per-layer cache needs its layers' occupancy
            self._layer_count[layer] += placed
        self.num_resident += placed
        return placed

    def _choose_victims(self, layer: int, pinned: np.ndarray, count: int) -> np.ndarray:
        """Up to ``count`` unpinned resident keys with the lowest policy scores."""
        if self.per_layer:
            lo, hi = layer * self.num_experts, (layer + 1) * self.num_experts
        else:
            lo, hi = 0, len(self.resident)
        candidates = np.flatnonzero(self.resident[lo:hi] > pinned[lo:hi])  # resident and not pinned
        if lo:
            candidates += lo
        if len(candidates) <= count:
            return candidates
        scores = self.policy.scores()[candidates]
        return candidates[np.argpartition(scores, count - 1)[:count]]


def make_cache(
    name: str, *, num_layers: int, num_experts: int, capacity_experts: int, per_layer: bool
) -> ExpertCache:
    """The cache a scenario names; 'all_resident' is a cache with a slot for every expert."""
    total = num_layers * num_experts
    if name == "all_resident":
        return ExpertCache(
            num_layers=num_layers, num_experts=num_experts, capacity_experts=total, per_layer=False,
            policy=LruPolicy(total),
        )
    if name not in ("lru", "lfu"):
        raise PolicyError(f"unknown expert cache {name!r}; expected all_resident, lru or lfu")
    if per_layer and capacity_experts < num_layers:
        raise PolicyError(
            f"policies.expert_cache: a per_layer cache needs at least one slot per MoE layer "
            f"({num_layers}), but the expert memory holds {capacity_experts} experts; use scope: global "
            f"or give hardware.expert_memory more room"
        )
    policy: EvictionPolicy = LruPolicy(total) if name == "lru" else LfuPolicy(total)
    return ExpertCache(
        num_layers=num_layers, num_experts=num_experts, capacity_experts=capacity_experts,
        per_layer=per_layer, policy=policy,
    )


def belady_misses(stream: np.ndarray, capacity: int, initial: np.ndarray | None = None) -> int:
    """Fewest misses any cache of ``capacity`` slots can have on this access stream (Belady's MIN).

    On a miss with a full cache, evict the resident key whose next use is furthest away. Used as a
    lower bound beside the simulated policy's misses."""
    n = len(stream)
    if n == 0:
        return 0
    # next_use[i]: index of the next access to the same key after i (n if none).
    order = np.argsort(stream, kind="stable")
    sorted_keys = stream[order]
    next_use = np.full(n, n, dtype=np.int64)
    same = sorted_keys[1:] == sorted_keys[:-1]
    next_use[order[:-1][same]] = order[1:][same]
    first_use: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        first_use[int(stream[i])] = i
    resident: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next_use, key), lazily invalidated
    if initial is not None:
        for key in np.flatnonzero(initial)[:capacity]:
            nu = first_use.get(int(key), n)
            resident[int(key)] = nu
            heapq.heappush(heap, (-nu, int(key)))
    misses = 0
    for i in range(n):
        key = int(stream[i])
        nu = int(next_use[i])
        if key not in resident:
            misses += 1
            if len(resident) >= capacity:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) == -neg:
                        del resident[victim]
                        break
        resident[key] = nu
        heapq.heappush(heap, (-nu, key))
    return misses
