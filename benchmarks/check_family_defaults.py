"""Print, per moe-lrc model, generated minus published LRU / LFU / static hit rates at 1-4 x top_k slots per
layer for the family defaults (what tests/test_routing_stats.py asserts, on the same seed and size).

    PYTHONPATH=. python benchmarks/check_family_defaults.py [family ...]"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from sim.workload.routing import FAMILY_DEFAULTS
from sim.workload.routing_stats import generated_hit_rates

LRC = Path(__file__).resolve().parents[2] / "shared/data/expert_routing/moe_lrc_cache_hit_rates/expert_cache_hit_rate_curves.csv"


def main() -> None:
    out: dict[str, dict] = {}
    with LRC.open() as fh:
        for row in csv.DictReader(fh):
            fam = row["model_key"] if row["component"] == "causal_decoder" else f"{row['model_key']}-{row['component']}"
            d = out.setdefault(fam, {"E": int(row["num_routed_experts"]), "k": int(row["top_k"])})
            d.setdefault(row["policy"], {})[float(row["cache_m"])] = float(row["hit_rate"])
    for fam in sys.argv[1:] or sorted(out):
        d, par = out[fam], FAMILY_DEFAULTS[fam]
        ms = [m for m in (1, 2, 3, 4) if m * d["k"] <= d["E"]]
        hot = max(d["k"] + 1, int(round(par["hot_experts_per_top_k"] * d["k"])))
        g = generated_hit_rates(
            d["E"], d["k"], par["zipf_exponent"], par["persistence"], [m * d["k"] for m in ms], num_requests=32, seed=7,
            locality=par["locality"], hot_experts=hot, policies=("LRU", "LFU", "static"), coupling=par["layer_coupling"],
            zipf_offset=par.get("zipf_offset", 0.0), hot_skew=par.get("hot_skew", 0.0),
            refractory=par.get("refractory", 0.0), refractory_tokens=int(par.get("refractory_tokens", 0)),
        )
        errs = {p: [round(g[p]["overall"][i] - d[p][float(m)], 3) for i, m in enumerate(ms)] for p in ("LRU", "LFU", "static")}
        worst = max(abs(e) for v in errs.values() for e in v)
        print(fam, round(worst, 3), errs, flush=True)


if __name__ == "__main__":
    main()
