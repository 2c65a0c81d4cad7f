"""Capacity-aware inference: which token-expert pairs of a rank are computed, dropped or rerouted.

Follows Capacity-Aware Inference (He et al., arXiv 2503.05066; PAPERS.md section 4) and DualSparse-MoE's
threshold drop (arXiv 2508.18376; section 3). Capacity is enforced per rank on its own tokens before
the all-to-all: ``capacity = max(1, ceil(gamma x top_k x T_rank / num_experts))``.

* ``token_drop``: each expert keeps at most ``capacity`` of a rank's tokens. Which ones (the highest
  scores) does not change the timing or the dropped fraction, so it works on counts alone.
* ``reroute``, ``expanded_drop`` and ``threshold_drop`` need each token's gate scores: they take
  ``cand[rows, C]`` (expert ids, best first, every expert of the layer) and ``score[rows, C]`` for the
  tokens of one rank, one row per (token, layer), with ids made global (``layer x E + expert``, of
  ``num_ids``) so all layers go through one vectorised call (per id, the kept pairs are the
  top-``capacity`` scores: a lexsort by (id, -score) and a rank within each id).

Every function returns kept counts per expert and the pairs dropped and rerouted, the accuracy proxy
the report shows (fraction of the top-k token-expert work not computed as routed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def capacity(gamma: float, top_k: int, tokens: np.ndarray | int, num_experts: int) -> np.ndarray:
    """Per-expert capacity of a rank holding ``tokens`` tokens (Switch/GShard definition, at least 1)."""
    if not np.isfinite(gamma):
        return np.full(np.shape(tokens), np.iinfo(np.int64).max // 4, dtype=np.int64)
    return np.maximum(1, np.ceil(gamma * top_k * np.asarray(tokens, dtype=np.float64) / num_experts)).astype(np.int64)


@dataclass(frozen=True, slots=True)
class CapacityOutcome:
    """Kept pairs per [..., expert] and the totals of routed, dropped and rerouted pairs."""

    kept: np.ndarray
    routed_pairs: int
    dropped_pairs: int
    rerouted_pairs: int = 0


def token_drop(counts_src: np.ndarray, tokens_src: np.ndarray, top_k: int, gamma: float) -> CapacityOutcome:
    """Token Drop on counts: ``counts_src[rank, layer, expert]`` tokens of each rank, ``tokens_src[rank]``."""
    cap = capacity(gamma, top_k, tokens_src, counts_src.shape[-1])
    kept = np.minimum(counts_src, cap.reshape((-1,) + (1,) * (counts_src.ndim - 1)))
    routed = int(counts_src.sum())
    return CapacityOutcome(kept=kept, routed_pairs=routed, dropped_pairs=routed - int(kept.sum()))


def _keep_top(experts: np.ndarray, scores: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Mask of pairs kept when each expert e keeps its ``room[e]`` highest-score pairs."""
    if len(experts) == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-scores, experts))
    e_sorted = experts[order]
    starts = np.flatnonzero(np.r_[True, e_sorted[1:] != e_sorted[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(e_sorted)]))
    rank_in_expert = np.arange(len(e_sorted)) - group_start
    keep = np.empty(len(experts), dtype=bool)
    keep[order] = rank_in_expert < room[e_sorted]
    return keep


def reroute(cand: np.ndarray, score: np.ndarray, top_k: int, cap: int, rounds: int, num_ids: int) -> CapacityOutcome:
    """Multi-round reroute for one rank and layer. Round 0 is Token Drop on the top-k; in each later
    round every dropped pair moves to the token's next-best candidate not yet tried, competing for
    what capacity is left; what still overflows after ``rounds`` rounds is dropped."""
    n, C = cand.shape
    E = num_ids
    kept = np.zeros(E, dtype=np.int64)
    if n == 0:
        return CapacityOutcome(kept=kept, routed_pairs=0, dropped_pairs=0)
    tok = np.repeat(np.arange(n), top_k)
    slot = np.tile(np.arange(top_k), n)
    exp = cand[tok, slot]
    sc = score[tok, slot]
    room = np.full(E, cap, dtype=np.int64)
    next_slot = np.full(n, top_k)  # next candidate column each token would try
    moved = 0  # pairs computed at an expert other than the one first routed to
    for r in range(rounds + 1):
        keep = _keep_top(exp, sc, room)
        np.add.at(kept, exp[keep], 1)
        if r:
            moved += int(keep.sum())
        room -= np.bincount(exp[keep], minlength=E)
        lost_tok = tok[~keep]
        if r == rounds or len(lost_tok) == 0:
            break
        # The i-th dropped pair of a token takes its (next_slot + i)-th candidate.
        order = np.argsort(lost_tok, kind="stable")
        lost_tok = lost_tok[order]
        first = np.r_[True, lost_tok[1:] != lost_tok[:-1]]
        starts = np.flatnonzero(first)
        offset = np.arange(len(lost_tok)) - np.repeat(starts, np.diff(np.r_[starts, len(lost_tok)]))
        col = next_slot[lost_tok] + offset
        ok = col < C
        np.add.at(next_slot, lost_tok, 1)
        tok, col = lost_tok[ok], col[ok]
        exp, sc = cand[tok, col], score[tok, col]
    routed = n * top_k
    return CapacityOutcome(kept=kept, routed_pairs=routed, dropped_pairs=routed - int(kept.sum()), rerouted_pairs=moved)


def expanded_drop(
    cand: np.ndarray, score: np.ndarray, top_k: int, cap: int, local_cand: np.ndarray, num_ids: int
) -> CapacityOutcome:
    """Expanded Drop for one rank: candidates are each token's top-k plus every candidate with
    ``local_cand`` set (the rank's own experts); per expert the ``cap`` highest scores are kept. A token
    may end with more than k experts (the paper does not limit it). ``dropped`` counts lost top-k pairs;
    the extra local pairs computed are reported as rerouted."""
    n, C = cand.shape
    if n == 0:
        return CapacityOutcome(kept=np.zeros(num_ids, dtype=np.int64), routed_pairs=0, dropped_pairs=0)
    was_top = np.zeros((n, C), dtype=bool)
    was_top[:, :top_k] = True
    chosen = was_top | local_cand
    exp, sc, top = cand[chosen], score[chosen], was_top[chosen]
    keep = _keep_top(exp, sc, np.full(num_ids, cap, dtype=np.int64))
    kept = np.bincount(exp[keep], minlength=num_ids).astype(np.int64)
    routed = n * top_k
    return CapacityOutcome(kept=kept, routed_pairs=routed, dropped_pairs=routed - int((keep & top).sum()),
                           rerouted_pairs=int((keep & ~top).sum()))


def threshold_drop(cand: np.ndarray, score: np.ndarray, top_k: int, threshold_of_id: np.ndarray) -> CapacityOutcome:
    """DualSparse 1T-drop: a top-k pair is dropped when its score renormalised over the token's top-k
    is below the threshold of the rank holding that expert (``threshold_of_id[expert id]``)."""
    n = cand.shape[0]
    num_ids = len(threshold_of_id)
    if n == 0:
        return CapacityOutcome(kept=np.zeros(num_ids, dtype=np.int64), routed_pairs=0, dropped_pairs=0)
    top_e = cand[:, :top_k]
    top_s = score[:, :top_k]
    norm = top_s / top_s.sum(axis=1, keepdims=True)
    keep = norm >= threshold_of_id[top_e]
    kept = np.bincount(top_e[keep], minlength=num_ids).astype(np.int64)
    return CapacityOutcome(kept=kept, routed_pairs=n * top_k, dropped_pairs=int((~keep).sum()))


__all__ = ["capacity", "CapacityOutcome", "token_drop", "reroute", "expanded_drop", "threshold_drop"]
