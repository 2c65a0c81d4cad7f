"""Extra run-folder tables that reports draw from, derived from a finished simulation.

``expert_load``: for each (MoE layer, expert), how many iterations routed at least one token to it, from
the expert-access stream the engine records for the cache's Belady bound (absent when every expert is
resident: the engine records no accesses then). Its spread across experts of a layer is the routing
imbalance the report's heatmap shows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def expert_load(result: Any) -> pd.DataFrame | None:
    """Columns layer, expert, iterations; None when the run recorded no expert accesses."""
    arrays = [a for rep in result.replicas for a in getattr(rep, "accesses", [])]
    if not arrays:
        return None
    model = result.loaded.model
    experts = int(model.num_experts)
    counts = np.bincount(np.concatenate(arrays).astype(np.int64), minlength=int(model.num_moe_layers) * experts)
    layer, expert = np.divmod(np.arange(counts.size), experts)
    return pd.DataFrame({"layer": layer, "expert": expert, "iterations": counts})
