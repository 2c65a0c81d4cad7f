"""What happens to tokens routed to experts that are unavailable (their expert-parallel GPU failed and
they are not yet restored): a pure policy over routing counts, for the expert-parallel engine.

``route_around(counts, available, policy=...)`` receives ``counts[moe_layer, expert]`` (token-expert
assignments of one iteration) and ``available[moe_layer, expert]`` and returns what is computed now,
what waits, and the routing fidelity:

* ``wait``: assignments to unavailable experts are held until the expert is restored (the engine keeps
  those tokens' sequences out of the batch or stalls the layer; served = available part only);
* ``reroute``: they go to the best-preferred available expert of the layer, eMoE's miss handling
  (``sim.policies.emoe.reroute_counts``); a layer with no available expert keeps them waiting;
* ``spread``: they are spread over the layer's available experts in proportion to ``preference``
  (capacity-aware reroute: the failed experts' load is not piled onto one straggler), with
  largest-remainder rounding so counts stay integers and sum exactly.

Routing fidelity = assignments served by the expert the router chose / all assignments, the cost the
issue asks the engine to report (eMoE's definition)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from sim.errors import PolicyError
from sim.policies.emoe import reroute_counts

FailoverPolicy = Literal["wait", "reroute", "spread"]


@dataclass(frozen=True)
class FailoverDecision:
    served: np.ndarray  # [layers, E] assignments computed this iteration, per expert that computes them
    waiting: np.ndarray  # [layers, E] assignments held for an unavailable expert (by the expert chosen)
    assignments: int
    kept: int  # served by the expert the router chose
    rerouted: int

    @property
    def fidelity(self) -> float:
        return self.kept / self.assignments if self.assignments else 1.0


def route_around(
    counts: np.ndarray,
    available: np.ndarray,
    policy: FailoverPolicy = "wait",
    preference: np.ndarray | None = None,
) -> FailoverDecision:
    """Apply ``policy`` to one iteration's routing; ``preference`` defaults to uniform (ties: lowest id)."""
    counts = np.asarray(counts, dtype=np.int64)
    available = np.asarray(available, dtype=bool)
    if counts.shape != available.shape:
        raise PolicyError(f"counts {counts.shape} and availability {available.shape} differ in shape")
    pref = np.ones(counts.shape, dtype=float) if preference is None else np.asarray(preference, dtype=float)
    total = int(counts.sum())
    kept = int(np.where(available, counts, 0).sum())
    if policy == "wait":
        return FailoverDecision(np.where(available, counts, 0), np.where(available, 0, counts), total, kept, 0)
    if policy == "reroute":
        served, _, _ = reroute_counts(counts, available, pref)
        # reroute_counts leaves a layer with nothing available as it is (an on-demand load there); here
        # those experts are gone, so their tokens wait.
        dead = ~available.any(axis=1)
        waiting = np.where(dead[:, None], counts, 0)
        served = np.where(dead[:, None], 0, served)
        return FailoverDecision(served, waiting, total, kept, total - kept - int(waiting.sum()))
    if policy == "spread":
        served = np.where(available, counts, 0)
        waiting = np.zeros_like(counts)
        for layer in range(counts.shape[0]):
            missed = int(counts[layer][~available[layer]].sum())
            if missed == 0:
                continue
            if not available[layer].any():
                waiting[layer] = counts[layer]
                continue
            served[layer] += _spread(missed, np.where(available[layer], np.maximum(pref[layer], 0.0), 0.0), available[layer])
        return FailoverDecision(served, waiting, total, kept, total - kept - int(waiting.sum()))
    raise PolicyError(f"unknown failover policy {policy!r}; expected one of wait, reroute, spread")


def available_experts(holders: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """``available[layer, expert]``: some live GPU holds a usable copy. ``holders[gpu, layer, expert]`` is the
    expert-parallel placement (True where that GPU holds that expert; a replicated expert has several
    holders); ``alive[gpu]`` is False for a failed GPU and for one still restoring its experts."""
    holders = np.asarray(holders, dtype=bool)
    alive = np.asarray(alive, dtype=bool)
    if holders.ndim != 3 or holders.shape[0] != alive.shape[0]:
        raise PolicyError(f"holders {holders.shape} must be [gpus, layers, experts] with gpus = {alive.shape[0]}")
    return holders[alive].any(axis=0)


def _spread(n: int, weights: np.ndarray, available: np.ndarray) -> np.ndarray:
    """``n`` assignments over the available experts in proportion to ``weights`` (largest remainder)."""
    if weights.sum() <= 0:
        weights = available.astype(float)
    share = n * weights / weights.sum()
    out = np.floor(share).astype(np.int64)
    left = n - int(out.sum())
    order = np.lexsort((np.arange(len(share)), -(share - out)))  # largest remainder, then lowest id
    out[order[:left]] += 1
    return out


__all__ = ["FailoverDecision", "FailoverPolicy", "available_experts", "route_around"]
