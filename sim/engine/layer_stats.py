"""Per-MoE-layer totals of a single-GPU run: expert-cache hits and where the stream's time went.

The planner (``sim.engine.iteration``) adds to these accumulators as it plans each iteration, and
``time_plan`` adds each stall to the layer whose load the stream waited for. Everything is summed over
the run, one slot per MoE layer, so the cost per iteration is a few vector adds; the ``layers`` table of
a run folder (``sim.report.sections``) is made from them. What no MoE layer owns (dense layers, the LM
head, the per-iteration overhead) is left out: the table's compute seconds plus those ops make the run's
compute busy time. A straggler fault's ``slowdown`` scales an iteration's ops after planning: the replica
then calls ``scale_last``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


class LayerStats:
    """Run totals per MoE layer; lists where the hot loop adds one element, arrays where it adds a vector."""

    def __init__(self, moe_layer_is_sliding: list[bool], use_counts: np.ndarray) -> None:
        n = len(moe_layer_is_sliding)
        self.sliding = np.asarray(moe_layer_is_sliding, dtype=bool)
        # The planner's iterations-per-(layer, expert) array, updated in place: its row sums are the
        # layer's accesses (hits + misses), so no per-iteration work is needed for them.
        self.use_counts = use_counts
        self.misses = [0] * n
        self.prefetch_hits = [0] * n
        self.expert_s_grid = np.zeros(use_counts.shape)  # expert FFN seconds (and overheads) per (layer, expert)
        self.interference_s = [0.0] * n  # load interference charged to the layer's waiting experts
        self.loads_s = [0.0] * n  # copy-engine seconds of the loads for the layer (demand and prefetch)
        self.stall_s = [0.0] * n  # stream seconds spent waiting for those loads
        # Per-layer costs that are the same in every MoE layer of an iteration: summed as scalars.
        self.attention_full_s = 0.0
        self.attention_sliding_s = 0.0
        self.gate_shared_s = 0.0
        self.last: tuple[np.ndarray, float, float, float] | None = None  # the last iteration's compute costs

    def scale_last(self, factor: float) -> None:
        """The last planned iteration ran ``factor`` times slower (a straggler fault): scale its compute
        costs. Load interference is not scaled (0 s on GPU profiles, where faults apply)."""
        if self.last is None:
            return
        expert_s, attention_full_s, attention_sliding_s, gate_shared_s = self.last
        extra = factor - 1.0
        self.expert_s_grid += extra * expert_s
        self.attention_full_s += extra * attention_full_s
        self.attention_sliding_s += extra * attention_sliding_s
        self.gate_shared_s += extra * gate_shared_s
        self.last = None

    def frame(self) -> pd.DataFrame:
        misses = np.asarray(self.misses, dtype=np.int64)
        return pd.DataFrame({
            "layer": np.arange(len(misses)),
            "hits": self.use_counts.sum(axis=1) - misses,
            "misses": misses,
            "prefetch_hits": np.asarray(self.prefetch_hits, dtype=np.int64),
            "attention_s": np.where(self.sliding, self.attention_sliding_s, self.attention_full_s),
            "gate_shared_s": np.full(len(misses), self.gate_shared_s),
            "experts_s": self.expert_s_grid.sum(axis=1) + np.asarray(self.interference_s),
            "stall_s": np.asarray(self.stall_s),
            "loads_busy_s": np.asarray(self.loads_s),
        })


def layers_table(result: Any) -> pd.DataFrame | None:
    """The run's ``layers`` table, summed over replicas; None when a planner keeps no per-layer totals
    (expert parallelism writes ep_layers instead; offloading policies and speculative decoding plan
    their own way)."""
    if result.extra.get("offload") is not None:
        return None
    stats = [getattr(rep.planner, "layer_stats", None) for rep in result.replicas]
    if not stats or any(s is None for s in stats):
        return None
    frames = [s.frame() for s in stats]
    total = frames[0]
    for other in frames[1:]:
        total = total.set_index("layer").add(other.set_index("layer")).reset_index()
    return total
