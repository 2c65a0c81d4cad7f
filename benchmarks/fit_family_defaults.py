"""Refit the Markov routing generator's per-family defaults (sim.workload.routing.FAMILY_DEFAULTS) to moe-lrc's
real LRU / LFU / static hit-rate curves in ../shared (MIT, Liang et al. 2025), at 1, 2, 3 and 4 x top_k slots.

    PYTHONPATH=. python benchmarks/fit_family_defaults.py [--jobs 2] [family ...]

Per family: zipf_exponent by least squares to the static curve; then for each locality and working-set size,
persistence by bisection on the mean LRU error; the kept combination has the smallest worst-case error over
LRU and LFU at every size. Prints one line per family to paste into FAMILY_DEFAULTS."""

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

    def run(p: float, loc: float, hot: int) -> dict:
        return generated_hit_rates(E, k, exponent, p, sizes, num_layers=2, num_requests=16, seed=3, locality=loc,
                                   hot_experts=hot, policies=("LRU", "LFU"), coupling=MIXTRAL_COUPLING, zipf_offset=offset)

    best = None
    for loc in LOCALITIES:
        for hm in HOT_MULTS if loc > 0 else (2,):
            hot = max(k + 1, min(E, int(round(hm * k))))
            # LRU error is close to linear in persistence: a secant step from p = 0 and p = 0.4, then one more.
            e0 = (np.array(run(0.0, loc, hot)["LRU"]["overall"]) - lru).mean()
            e1 = (np.array(run(0.4, loc, hot)["LRU"]["overall"]) - lru).mean()
            p = 0.0 if e0 >= 0 else float(np.clip(0.4 * e0 / (e0 - e1), 0.0, 0.95)) if e1 != e0 else 0.0
            if 0 < p:
                e2 = (np.array(run(p, loc, hot)["LRU"]["overall"]) - lru).mean()
                slope = (e2 - e0) / p
                p = float(np.clip(p - e2 / slope, 0.0, 0.95)) if slope > 0 else p
            p = round(p, 3)
            c = run(p, loc, hot)
            worst = max(np.abs(np.array(c["LRU"]["overall"]) - lru).max(), np.abs(np.array(c["LFU"]["overall"]) - lfu).max())
            if best is None or worst < best[0]:
                best = (worst, {"zipf_exponent": exponent, **({"zipf_offset": offset} if offset else {}),
                                "persistence": p, "locality": loc, "hot_experts_per_top_k": hm})
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
