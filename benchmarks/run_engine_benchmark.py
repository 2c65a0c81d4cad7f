"""Engine speed benchmark: simulate the full Azure 2023 conversation hour and fractions of it.

Each run happens in a fresh subprocess so its peak memory (max RSS) is its own. Reports wall time,
simulated seconds per wall second, SimPy events per second, iterations per second and peak memory,
and the cost ratio between fractions of the trace (linear growth means ratio ~ fraction ratio).

    python benchmarks/run_engine_benchmark.py [--fractions 0.25 0.5 1.0] [--out benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "mixtral-offload-full-hour.yaml"
TRACE_SPAN_S = 3502.0  # the conversation trace's span; fractions cut it by time

CHILD = r"""
import json, resource, sys, time
import yaml
from sim.scenario import parse_scenario, resolve
from sim.engine.simulation import simulate
from sim.metrics import summarize
from pathlib import Path

path, max_duration = sys.argv[1], float(sys.argv[2])
data = yaml.safe_load(Path(path).read_text())
data["workload"]["max_duration_s"] = max_duration
loaded = resolve(parse_scenario(data, path), path, Path(path).parent)
t0 = time.process_time(); w0 = time.perf_counter()
result = simulate(loaded)
cpu_s = time.process_time() - t0; wall_s = time.perf_counter() - w0
summary = summarize(result)
print(json.dumps({
    "max_duration_s": max_duration,
    "requests": summary["requests"]["arrived"],
    "completed": summary["requests"]["completed"],
    "iterations": summary["iterations"],
    "simulated_s": result.simulated_s,
    "events": result.events,
    "wall_s": wall_s,
    "cpu_s": cpu_s,
    "sim_s_per_wall_s": result.simulated_s / wall_s,
    "events_per_s": result.events / wall_s,
    "iterations_per_s": summary["iterations"] / wall_s,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    "hit_rate": summary["expert_cache"]["hit_rate"],
}))
"""


def run_one(fraction: float) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(SCENARIO), str(TRACE_SPAN_S * fraction)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{proc.stderr}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["fraction"] = fraction
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    rows = []
    for fraction in args.fractions:
        row = run_one(fraction)
        rows.append(row)
        print(
            f"fraction {fraction:>4}: {row['requests']:>6,} requests, {row['iterations']:>7,} iterations, "
            f"wall {row['wall_s']:7.1f} s (cpu {row['cpu_s']:.1f} s), {row['sim_s_per_wall_s']:8.1f} sim-s/wall-s, "
            f"{row['events_per_s']:9,.0f} events/s, peak {row['peak_rss_mb']:6.0f} MB",
            flush=True,
        )
    base = rows[0]
    for row in rows[1:]:
        print(
            f"cost ratio {row['fraction'] / base['fraction']:.1f}x trace -> {row['cpu_s'] / base['cpu_s']:.2f}x cpu time, "
            f"{row['iterations'] / base['iterations']:.2f}x iterations"
        )
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
