"""Do repeated calibrations on the same machine agree? (issue #6: within 10% per op.)

Runs ``moesim calibrate --quick`` (or the full grid with ``--full``) ``--runs`` times back to back, or takes
profiles already measured (``--profiles A.yaml B.yaml ...``), and compares every later run with the first
at two levels:

- the fitted models the simulator uses (``moesim profile compare``: each op's lookups at the measured sizes),
  median, P95 and max |B/A - 1| per op; an op agrees when its P95 is within ``--tolerance`` (10%);
- the raw measured points, matched by op and shape: share within the tolerance, median and P95 |diff|.

Wall time and the 1-minute load average of each run are recorded: on a shared machine both matter.

    python benchmarks/calibration_repeatability.py [--runs 2] [--full] [--out results.json]
    python benchmarks/calibration_repeatability.py --profiles a.yaml b.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

POINT_KEY = ("op", "dtype", "threads", "hidden", "ffn", "num_matrices", "in_features", "out_features", "top_k",
             "tokens", "batch", "context", "num_heads", "num_kv_heads", "head_dim", "nbytes", "pinned", "num_experts",
             "streams")


def calibrate(out: Path, full: bool) -> dict[str, float]:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "sim.cli", "calibrate", "--out", str(out), "--fresh"] + ([] if full else ["--quick"])
    subprocess.run(cmd, check=True)
    return {"wall_s": round(time.perf_counter() - started, 1), "load_average_1min_at_start": round(load, 2)}


def point_table(profile: Path) -> dict[tuple, float]:
    import pandas as pd

    from calibrate.cli import points_path_for

    df = pd.read_csv(points_path_for(profile), dtype=str, keep_default_na=False)
    cols = [c for c in POINT_KEY if c in df.columns]
    return {tuple(r[c] for c in cols): float(r["median_s"]) for _, r in df.iterrows()}


def compare_points(a: dict[tuple, float], b: dict[tuple, float], tolerance: float) -> dict[str, dict[str, float]]:
    by_op: dict[str, list[float]] = {}
    for key, value in a.items():
        if key in b and value > 0:
            by_op.setdefault(key[0], []).append(abs(b[key] / value - 1.0))
    out = {}
    for op, diffs in sorted(by_op.items()):
        d = np.asarray(diffs)
        out[op] = {"num_points": int(d.size), "share_within": round(float(np.mean(d <= tolerance)), 3),
                   "median_abs_diff": round(float(np.median(d)), 4), "p95_abs_diff": round(float(np.quantile(d, 0.95)), 4)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="the full grid instead of --quick")
    ap.add_argument("--profiles", nargs="+", type=Path, help="compare these instead of calibrating")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from calibrate.cli import compare_profiles
    from sim.profile import load_profile

    runs: list[dict] = []
    if args.profiles:
        profiles = args.profiles
    else:
        folder = Path(tempfile.mkdtemp(prefix="moesim-repeat-"))
        profiles = [folder / f"run{i}.yaml" for i in range(args.runs)]
        for p in profiles:
            runs.append({"profile": str(p), **calibrate(p, args.full)})
            print(json.dumps(runs[-1]), flush=True)
    first = load_profile(str(profiles[0]))
    comparisons = []
    for p in profiles[1:]:
        fitted = compare_profiles(first, load_profile(str(p)))
        points = compare_points(point_table(profiles[0]), point_table(p), args.tolerance)
        agree = {op: s["p95_abs_diff"] <= args.tolerance for op, s in fitted.items()}
        comparisons.append({"a": str(profiles[0]), "b": str(p), "fitted": fitted, "points": points,
                            "ops_agreeing": agree, "all_ops_agree": all(agree.values())})
        print(f"\n{p} vs {profiles[0]}: fitted lookups (what the simulator uses) and measured points")
        print(f"{'op':20s} {'fit med':>8s} {'fit P95':>8s} {'fit max':>8s} | {'points':>6s} {'within':>7s} "
              f"{'pt med':>7s} {'pt P95':>7s}  agree")
        for op in sorted(set(fitted) | set(points)):
            f, q = fitted.get(op), points.get(op)
            fit_cols = (f"{f['median_abs_diff']:8.1%} {f['p95_abs_diff']:8.1%} {f['max_abs_diff']:8.1%}" if f
                        else f"{'-':>8s} {'-':>8s} {'-':>8s}")
            pt_cols = (f"{q['num_points']:6d} {q['share_within']:7.0%} {q['median_abs_diff']:7.1%} {q['p95_abs_diff']:7.1%}"
                       if q else f"{'-':>6s} {'-':>7s} {'-':>7s} {'-':>7s}")
            print(f"{op:20s} {fit_cols} | {pt_cols}  {'' if op not in agree else ('yes' if agree[op] else 'NO')}")
    result = {"tolerance": args.tolerance, "runs": runs, "comparisons": comparisons}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(c["all_ops_agree"] for c in comparisons) else 1


if __name__ == "__main__":
    sys.exit(main())
