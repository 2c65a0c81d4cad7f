"""Expert placement: which ranks of an expert-parallel group hold each routed expert, per MoE layer.

A placement is a share matrix ``share[layer, expert, rank]``: the fraction of an expert's tokens that
rank computes (1 on the one rank holding it; 1/c on each of c copies of a replicated expert). The
functions here are pure and work on one layer's expert loads; ``ExpertPlacement`` keeps the share
matrix for all layers and recomputes it from the loads seen so far when asked to (EPLB-style
periodic rebalancing)."""

from __future__ import annotations

import numpy as np

from sim.policies.ep_specs import PlacementSpec


def contiguous(num_experts: int, num_ranks: int) -> np.ndarray:
    """Rank of each expert: experts [0, E/R) on rank 0, [E/R, 2E/R) on rank 1, ..."""
    return (np.arange(num_experts) * num_ranks) // num_experts


def round_robin(num_experts: int, num_ranks: int) -> np.ndarray:
    """Rank of each expert: expert e on rank e mod R."""
    return np.arange(num_experts) % num_ranks


def load_balanced(loads: np.ndarray, num_ranks: int) -> np.ndarray:
    """Rank of each expert by greedy longest-processing-time: heaviest expert first, onto the rank with
    the least load that still has a free slot (every rank holds E/R experts: memory is per rank).
    Ties go to the lower expert index and the lower rank, so the result is deterministic."""
    E = len(loads)
    slots = np.full(num_ranks, E // num_ranks)
    slots[: E % num_ranks] += 1
    owner = np.empty(E, dtype=np.int64)
    rank_load = np.zeros(num_ranks)
    for e in np.argsort(-np.asarray(loads, dtype=np.float64), kind="stable"):
        free = np.flatnonzero(slots > 0)
        r = free[np.argmin(rank_load[free])]
        owner[e] = r
        rank_load[r] += loads[e]
        slots[r] -= 1
    return owner


def replicate(owner: np.ndarray, loads: np.ndarray, num_ranks: int, redundant: int) -> np.ndarray:
    """Share matrix [E, R] after adding ``redundant`` copies: each copy goes to the expert with the
    highest load per copy, on the least-loaded rank that has no copy of it yet (ties: lower index)."""
    E = len(owner)
    loads = np.asarray(loads, dtype=np.float64)
    has = np.zeros((E, num_ranks), dtype=bool)
    has[np.arange(E), owner] = True
    for _ in range(redundant):
        copies = has.sum(axis=1)
        per_copy = np.where(copies < num_ranks, loads / copies, -np.inf)
        e = int(np.argmax(per_copy))
        if not np.isfinite(per_copy[e]):
            break  # every expert is already on every rank
        rank_load = (has * (loads / copies)[:, None]).sum(axis=0)
        rank_load[has[e]] = np.inf
        has[e, int(np.argmin(rank_load))] = True
    return has / has.sum(axis=1, keepdims=True)


class ExpertPlacement:
    """The share matrix of every MoE layer, and the loads it is rebalanced from."""

    def __init__(self, spec: PlacementSpec, *, num_layers: int, num_experts: int, num_ranks: int) -> None:
        self.spec = spec
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.num_ranks = num_ranks
        self.loads = np.zeros((num_layers, num_experts))
        self.iterations = 0
        self.recomputations = 0
        self.share = self._compute(np.ones((num_layers, num_experts)))

    def _compute(self, loads: np.ndarray) -> np.ndarray:
        E, R = self.num_experts, self.num_ranks
        share = np.zeros((self.num_layers, E, R))
        for layer in range(self.num_layers):
            if self.spec.name == "contiguous":
                owner = contiguous(E, R)
            elif self.spec.name == "round_robin":
                owner = round_robin(E, R)
            else:
                owner = load_balanced(loads[layer], R)
            if self.spec.redundant_experts:
                share[layer] = replicate(owner, loads[layer], R, self.spec.redundant_experts)
            else:
                share[layer, np.arange(E), owner] = 1.0
        return share

    @property
    def experts_per_rank(self) -> int:
        """Most expert copies any rank holds in any layer (its memory must hold them)."""
        return int((self.share > 0).sum(axis=1).max())

    def observe(self, counts: np.ndarray) -> None:
        """Add one iteration's routed counts [layer, expert]; rebalance when it is due."""
        self.loads += counts
        self.iterations += 1
        every = self.spec.recompute_every_iterations
        if every and self.iterations % every == 0:
            self.share = self._compute(self.loads)
            self.recomputations += 1


__all__ = ["contiguous", "round_robin", "load_balanced", "replicate", "ExpertPlacement"]
