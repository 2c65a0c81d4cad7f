"""Could a speed pilot inside the runtime correct the validation for the machine's drift? A tried idea, kept
so that its verdict can be re-measured.

The runtime serves a validation scenario ``--runs`` times; before every iteration it times a tiny fixed
pure-Python loop (the pilot, ~0.1 ms against ~40 ms iterations). For each run and each quarter of it, the
simulator's same-batch total error (its predicted time of the runtime's own batches, with ``--profile``) is set
beside the pilot's change against the pilot timed alone just before the runs. If the pilot tracked the machine,
"(1 + error) x (1 + pilot change)" would be about constant and the drift could be divided out.

    python benchmarks/validation_speed_pilot.py scenarios/validate-closed-loop.yaml --profile reports/validate-validate-closed-loop/profile.yaml [--runs 4]

The profile is one `moesim validate` calibrated for the scenario's model (its ``profile.yaml``)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def pilot_s() -> float:
    started = time.perf_counter()
    total = 0
    for i in range(3000):
        total += i
    return time.perf_counter() - started


def main() -> None:
    from calibrate.runtime.server import Runtime
    from calibrate.validate import replay_batches, replay_scenario
    from sim.engine.simulation import build_request_table
    from sim.scenario import load_scenario

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--profile", required=True, help="a profile `moesim validate` calibrated for this scenario")
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args()
    loaded = load_scenario(args.scenario)
    seed = loaded.scenario.workload.seed
    table = build_request_table(loaded, np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0]))
    pilots: list[float] = []
    serve_iteration = Runtime._iteration

    def with_pilot(self, batch, rec, clock):  # type: ignore[no-untyped-def]
        pilots.append(pilot_s())
        return serve_iteration(self, batch, rec, clock)

    Runtime._iteration = with_pilot  # type: ignore[method-assign]
    alone = float(np.median([pilot_s() for _ in range(3000)]))
    quarters = []
    work = Path(tempfile.mkdtemp())
    for run in range(args.runs):
        pilots.clear()
        rec = Runtime(loaded, seed=seed).serve(table)
        replay = replay_scenario(loaded, table, rec, Path(args.profile).resolve(), work / f"run-{run}")
        predicted = replay_batches(replay, rec)["predicted_s"].to_numpy()
        measured = rec.iterations_frame()["duration_s"].to_numpy()
        pilot = np.asarray(pilots)
        quarter = np.minimum((np.arange(len(measured)) * 4) // len(measured), 3)
        for q in range(4):
            at = quarter == q
            quarters.append((predicted[at].sum() / measured[at].sum() - 1.0, np.median(pilot[at]) / alone - 1.0))
        print(json.dumps({"run": run, "same_batch_error": round(float(predicted.sum() / measured.sum() - 1.0), 4),
                          "pilot_change": round(float(np.median(pilot) / alone - 1.0), 4),
                          "busy_s": round(float(measured.sum()), 2)}), flush=True)
    q = np.asarray(quarters)
    corrected = (1.0 + q[:, 0]) * (1.0 + q[:, 1]) - 1.0
    print(json.dumps({"quarters": len(q), "correlation": round(float(np.corrcoef(q[:, 0], q[:, 1])[0, 1]), 3),
                      "error_std": round(float(q[:, 0].std()), 4), "corrected_std": round(float(corrected.std()), 4),
                      "error_mean": round(float(q[:, 0].mean()), 4), "corrected_mean": round(float(corrected.mean()), 4)}))


if __name__ == "__main__":
    main()
