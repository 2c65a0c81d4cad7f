"""Next-layer prefetch decisions, shared by the simulator's planner and the real runtime.

``sim.engine.iteration.IterationPlanner`` and ``calibrate.runtime`` both call these two functions,
so for the same routing they predict the same experts and reserve the same cache slots:

* ``predict_next_layer``: which experts of a MoE layer to prefetch, most used first;
* ``reserve_prefetch``: which of those get a slot (the rest are not loaded)."""

from __future__ import annotations

import numpy as np

from sim.policies.cache import ExpertCache


def predict_next_layer(predictor: str, layer_counts: np.ndarray, layer_use_counts: np.ndarray,
                       max_experts: int) -> np.ndarray:
    """Expert ids to prefetch for one MoE layer, at most ``max_experts``, most used first.

    ``oracle``: the experts this iteration's routing really sends tokens to (``layer_counts[expert]``
    tokens each); ``frequency``: the experts most often used by earlier iterations
    (``layer_use_counts[expert]`` iterations each), ties broken by the lower id."""
    if predictor == "oracle":
        chosen = np.flatnonzero(layer_counts)
        chosen = chosen[np.argsort(-layer_counts[chosen], kind="stable")]
    else:
        chosen = np.argsort(-layer_use_counts, kind="stable")
    return chosen[:max_experts]


def reserve_prefetch(cache: ExpertCache, pinned: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Give the non-resident ``keys`` (one layer's predicted experts) slots; return the keys to load.

    The whole predicted set is pinned first, so a prefetch never evicts another expert it predicts;
    keys that found no slot are unpinned and not loaded. The loaded keys stay pinned until their layer
    has run (the caller unpins the layer)."""
    pinned[keys] = True
    absent = keys[~cache.resident[keys]]
    if not len(absent):
        return absent
    placed = cache.insert_many(absent, pinned)
    pinned[absent[placed:]] = False
    return absent[:placed]
