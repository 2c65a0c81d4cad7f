"""How reproducible is the reference itself? Serve a validation scenario several times with the real CPU
runtime and compare every pair of runs, exactly as ``moesim validate`` compares the simulator with
a run: per-request end-to-end APE (median, P95) and throughput error. A simulator cannot be checked against a
reference more tightly than the reference repeats: these figures are the noise floor of the validation bounds
on the machine, at its load (the 1-minute load average is recorded with each run).

    python benchmarks/validation_noise_floor.py scenarios/validate-all-resident.yaml [--runs 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from calibrate.runtime.server import Runtime
    from calibrate.validate import needs_oracle, record_oracle_routing
    from sim.engine.simulation import build_request_table
    from sim.scenario import load_scenario

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    loaded = load_scenario(args.scenario)
    seed = loaded.scenario.workload.seed
    table = build_request_table(loaded, np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0]))
    oracle = None
    if needs_oracle(loaded):
        import tempfile

        oracle = record_oracle_routing(loaded, table, Path(tempfile.mkdtemp()), seed=seed)
    runs = []
    for r in range(args.runs):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        rec = Runtime(loaded, seed=seed, oracle_routing=oracle).serve(table)
        req = rec.requests_frame().set_index("request_id")
        it = rec.iterations_frame()
        span = float(req["finished_at_s"].max() - req["arrived_at_s"].min())
        runs.append(dict(e2e=req["e2e_s"].to_numpy(), throughput=float(req["output_tokens"].sum()) / span,
                         load_average=load, wall_s=time.perf_counter() - started, iterations=len(it),
                         misses=int(it["expert_misses"].sum()), busy_s=float(it["duration_s"].sum())))
    rows = []
    for r, run in enumerate(runs):
        rows.append({"run": r, "load_average_1min": round(run["load_average"], 2), "iterations": run["iterations"],
                     "misses": run["misses"], "busy_s": round(run["busy_s"], 3),
                     "throughput_tok_s": round(run["throughput"], 2)})
        print(json.dumps(rows[-1]))
    # Every pair of runs, compared as `moesim validate` compares the simulator with a run: no run is the truth.
    pairs = []
    for a, b in itertools.combinations(range(len(runs)), 2):
        ape = np.abs(runs[b]["e2e"] / runs[a]["e2e"] - 1.0)
        pairs.append({"runs": [a, b], "e2e_ape_median": round(float(np.median(ape)), 4),
                      "e2e_ape_p95": round(float(np.quantile(ape, 0.95)), 4),
                      "throughput_error": round(abs(runs[b]["throughput"] / runs[a]["throughput"] - 1.0), 4)})
        print(json.dumps(pairs[-1]))
    if args.out:
        Path(args.out).write_text(json.dumps({"scenario": args.scenario, "runs": rows, "pairs": pairs}, indent=1))


if __name__ == "__main__":
    main()
