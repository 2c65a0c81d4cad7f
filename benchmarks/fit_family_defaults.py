"""Refit the Markov routing generator's per-family defaults (sim.workload.routing.FAMILY_DEFAULTS) to moe-lrc's
real LRU / LFU / static hit-rate curves in ../shared (MIT, Liang et al. 2025), at 1, 2, 3 and 4 x top_k slots.

    PYTHONPATH=. python benchmarks/fit_family_defaults.py [--jobs 2] [family ...]

Per family: zipf_exponent by least squares to the static curve; then for each locality, working-set size and
working-set skew, persistence by a secant search on the mean LRU error, then nudged by +-0.03 to the smallest
worst-case error over LRU and LFU at every size; the 5 best are re-run on a larger sample with another seed and
the one with the smallest worst error over both is kept. A family still worse than 0.045 after that also tries
the refractory redraw (refractory, refractory_tokens). Prints one line per family to paste into FAMILY_DEFAULTS.

The skew (hot_skew: the j-th working-set expert is picked with weight (j + 1)^-skew) is what brings the points at
exactly top_k slots in: with equally likely working-set experts, LFU at 1 x top_k came out up to 8 points low and
LFU at 2 x top_k up to 5 points high, because a real request leans on its few most used experts."""

from __future__ import annotations

import argparse
import csv
import json
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from sim.workload.routing import MIXTRAL_COUPLING
from sim.workload.routing_stats import generated_hit_rates, static_hit_rates

LRC = Path(__file__).resolve().parents[2] / "shared/data/expert_routing/moe_lrc_cache_hit_rates/expert_cache_hit_rate_curves.csv"
MULTS = (1, 2, 3, 4)
LOCALITIES = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
HOT_MULTS = (1.5, 2, 3)
HOT_SKEWS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
REFRACTORY = tuple((r, n) for r in (0.5, 1.0) for n in (2, 3, 4))  # (probability, tokens)
REFRACTORY_WHEN_WORSE_THAN = 0.045


def curves() -> dict[str, dict]:
    out: dict[str, dict] = {}
    with LRC.open() as fh:
        for row in csv.DictReader(fh):
            fam = row["model_key"] if row["component"] == "causal_decoder" else f"{row['model_key']}-{row['component']}"
            d = out.setdefault(fam, {"E": int(row["num_routed_experts"]), "k": int(row["top_k"])})
            m = float(row["cache_m"])
            if m in MULTS:
                d.setdefault(row["policy"], {})[int(m)] = float(row["hit_rate"])
    return out


def fit_one(item: tuple[str, dict]) -> tuple[str, dict, float]:
    fam, d = item
    E, k = d["E"], d["k"]
    ms = [m for m in MULTS if m * k <= E]
    sizes = [m * k for m in ms]
    static = np.array([d["static"][m] for m in ms])
    grid = np.round(np.arange(0.0, 2.51, 0.05), 2)
    errs = [float(((static_hit_rates(E, k, s, sizes) - static) ** 2).sum()) for s in grid]
    exponent, offset = float(grid[int(np.argmin(errs))]), 0.0
    if np.abs(static_hit_rates(E, k, exponent, sizes) - static).max() > 0.03:
        # Zipf cannot follow this static curve: try Zipf-Mandelbrot 1/(rank + offset)^exponent (smallest worst error).
        cands = [(float(np.abs(static_hit_rates(E, k, s, sizes, q) - static).max()), float(s), float(q))
                 for q in (0, 1, 2, 4, 8, 16, 24, 32) for s in np.round(np.arange(0.2, 6.01, 0.1), 2)]
        _, exponent, offset = min(cands)
    lru = np.array([d["LRU"][m] for m in ms])
    lfu = np.array([d["LFU"][m] for m in ms])

    def curves_of(p: float, loc: float, hot: int, skew: float, refr: tuple[float, int], policies: tuple, **size) -> dict:
        return generated_hit_rates(E, k, exponent, p, sizes, locality=loc, hot_experts=hot, policies=policies,
                                   coupling=MIXTRAL_COUPLING, zipf_offset=offset, hot_skew=skew,
                                   refractory=refr[0], refractory_tokens=refr[1], **size)

    def worst_error(p: float, loc: float, hot: int, skew: float, refr: tuple[float, int], **size) -> float:
        c = curves_of(p, loc, hot, skew, refr, ("LRU", "LFU"), **size)
        return float(max(np.abs(np.array(c["LRU"]["overall"]) - lru).max(),
                         np.abs(np.array(c["LFU"]["overall"]) - lfu).max()))

    search = {"num_layers": 2, "num_requests": 16, "seed": 3}

    def search_grid(grid: list[tuple[float, float, float, tuple[float, int]]]) -> list[tuple]:
        found = []
        for loc, hm, skew, refr in grid:
            hot = max(k + 1, min(E, int(round(hm * k))))

            def lru_error(p: float, loc: float = loc, hot: int = hot, skew: float = skew, refr: tuple = refr) -> float:
                return float((np.array(curves_of(p, loc, hot, skew, refr, ("LRU",), **search)["LRU"]["overall"]) - lru).mean())

            # LRU error is close to linear in persistence: a secant step from p = 0 and p = 0.4, then one more.
            e0, e1 = lru_error(0.0), lru_error(0.4)
            p = 0.0 if e0 >= 0 else float(np.clip(0.4 * e0 / (e0 - e1), 0.0, 0.95)) if e1 != e0 else 0.0
            if 0 < p:
                e2 = lru_error(p)
                slope = (e2 - e0) / p
                p = float(np.clip(p - e2 / slope, 0.0, 0.95)) if slope > 0 else p
            p = round(p, 3)
            # Then persistence nudged to the smallest worst LRU/LFU error (the mean LRU root trades ends of the curve).
            for p_try in sorted({p, max(0.0, round(p - 0.03, 3)), round(min(0.95, p + 0.03), 3)}):
                found.append((worst_error(p_try, loc, hot, skew, refr, **search), p_try, loc, hm, hot, skew, refr))
        return found

    off = (0.0, 0)
    candidates = search_grid([(loc, hm, sk, off) for loc in LOCALITIES
                              for hm, sk in ([(hm, sk) for hm in HOT_MULTS for sk in HOT_SKEWS] if loc > 0 else [(2, 0.0)])])
    if min(candidates)[0] > REFRACTORY_WHEN_WORSE_THAN:
        # Still outside: add the refractory redraw (LRU at 2-3 x top_k below independent draws, e.g. LLaMA-MoE).
        candidates += search_grid([(loc, hm, sk, refr) for loc in (0.15, 0.3, 0.45) for hm in (2, 3) for sk in (0.0, 2.0)
                                   for refr in REFRACTORY])
    # The 5 best on the search sample are re-run on a larger, independent one (4 layers, 32 requests, seed 11);
    # the kept one has the smallest worst error over both, so sampling noise of one seed does not pick it.
    candidates.sort()
    best = None
    for worst, p, loc, hm, hot, skew, refr in candidates[:5]:
        both = max(worst, worst_error(p, loc, hot, skew, refr, num_layers=4, num_requests=32, seed=11))
        if best is None or both < best[0]:
            best = (both, {"zipf_exponent": exponent, **({"zipf_offset": offset} if offset else {}),
                           "persistence": p, "locality": loc, "hot_experts_per_top_k": hm,
                           **({"hot_skew": skew} if skew else {}),
                           **({"refractory": refr[0], "refractory_tokens": refr[1]} if refr[0] else {})})
    assert best is not None
    return fam, best[1], float(best[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    items = [(f, d) for f, d in curves().items() if not args.families or f in args.families]
    with Pool(args.jobs) as pool:
        for fam, par, worst in pool.imap_unordered(fit_one, items):
            print(json.dumps({"family": fam, **par, "worst_search_error": round(worst, 3)}), flush=True)


if __name__ == "__main__":
    main()
