"""How much of a trace's prompts a prefix (KV-block) cache could reuse, from the requests' prefix-block ids.

A prompt is a chain of KV blocks (Mooncake: 512 tokens each); equal block ids are the same prefix, so a block
whose id was already seen can be served from a prefix cache instead of being recomputed. Two figures:

  infinite cache   share of prompt blocks whose id occurred earlier in the trace (every block is kept forever):
                   1 - distinct ids / all ids, one ``np.unique`` over the flat id array.
  LRU of N blocks  share of prompt blocks found in an LRU cache of N blocks that every request's blocks pass
                   through in arrival order (looked up, then made most recent). One pass per size with an
                   OrderedDict, so memory is O(N) beyond the id array and time is linear in the number of ids."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_SLICE = 1 << 20


def reuse_infinite(blocks: np.ndarray) -> float:
    """Share of block references whose id appeared earlier (NaN without any block)."""
    n = len(blocks)
    if n == 0:
        return float("nan")
    return 1.0 - len(np.unique(blocks)) / n


def reuse_lru(blocks: np.ndarray, capacity_blocks: int) -> float:
    """Share of block references that hit an LRU cache of ``capacity_blocks`` blocks (starting empty)."""
    if capacity_blocks < 1:
        raise ValueError(f"LRU capacity must be >= 1 block, got {capacity_blocks}")
    if len(blocks) == 0:
        return float("nan")
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for start in range(0, len(blocks), _SLICE):  # Python ints for one slice at a time, not the whole trace
        for block in blocks[start : start + _SLICE].tolist():
            if block in cache:
                hits += 1
                cache.move_to_end(block)
            else:
                cache[block] = None
                if len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return hits / len(blocks)


def prefix_reuse(blocks: np.ndarray, offsets: np.ndarray, lru_blocks: Sequence[int] = ()) -> dict:
    """The reuse figures of a trace's flat prefix-block ids (``offsets``: len + 1 request boundaries)."""
    per_request = np.diff(offsets)
    out: dict = {
        "requests": int(len(per_request)),
        "blocks": int(len(blocks)),
        "distinct_blocks": int(len(np.unique(blocks))),
        "blocks_per_request_mean": round(float(per_request.mean()), 3) if len(per_request) else float("nan"),
        "reuse_infinite_cache": round(reuse_infinite(blocks), 5),
        "reuse_lru": {int(c): round(reuse_lru(blocks, int(c)), 5) for c in lru_blocks},
    }
    return out
