"""How steady is this machine's speed? The question behind every validation bound on a shared VM.

Two measurements, each over ``--seconds`` of wall time, reported in 0.5-s windows:

1. *Across CPUs*: a pure-Python loop pinned to CPU 1 and, at the same time, a loop of small expert-FFN GEMMs (the
   runtime's kind of work, bf16, one thread) pinned to CPU 0. If the two CPUs slowed down together, a probe
   on one could correct the other; the correlation of their window rates says whether they do.
2. *On one CPU*: the same GEMM loop, each step preceded by a tiny pure-Python pilot, on CPU 0. The pilot's rate
   against the GEMMs' rate says how much of the GEMMs' swing a probe on the same thread would explain.

    python benchmarks/machine_speed_drift.py [--seconds 60] [--out FILE.json]

Prints one JSON object: the spread (max / min - 1) of each rate, the correlations, and the GEMMs' spread left
after dividing by the pilot's. Needs torch and two CPUs (Linux ``sched_setaffinity``)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

WINDOW_S = 0.5


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _python_step() -> None:
    total = 0
    for i in range(2000):
        total += i


def _gemm_step_factory():
    import torch

    torch.set_num_threads(1)
    weights = [(torch.randn(1024, 512, dtype=torch.bfloat16), torch.randn(512, 1024, dtype=torch.bfloat16))
               for _ in range(8)]
    xs = [torch.randn(t, 512, dtype=torch.bfloat16) for t in (1, 4, 16)]

    def step() -> None:
        with torch.inference_mode():
            for up, down in weights:
                for x in xs:
                    (x @ up.T) @ down.T

    return step


def _windows(step, seconds: float) -> list[tuple[float, float]]:
    """(window start on the shared clock, steps per second) for each 0.5-s window."""
    out = []
    end = time.time() + seconds
    while time.time() < end:
        start, t0, n = time.time(), time.perf_counter(), 0
        while time.perf_counter() - t0 < WINDOW_S:
            step()
            n += 1
        out.append((start, n / (time.perf_counter() - t0)))
    return out


def _python_worker(cpu: int, seconds: float, queue) -> None:
    _pin(cpu)
    queue.put(_windows(_python_step, seconds))


def _spread(rates: np.ndarray) -> float:
    return float(rates.max() / rates.min() - 1.0)


def across_cpus(seconds: float) -> dict[str, float]:
    queue = mp.get_context("fork").Queue()
    other = mp.get_context("fork").Process(target=_python_worker, args=(1, seconds, queue))
    other.start()
    _pin(0)
    gemm = np.array(_windows(_gemm_step_factory(), seconds))
    python = np.array(queue.get())
    other.join()
    aligned = np.interp(gemm[:, 0], python[:, 0], python[:, 1])
    inside = (gemm[:, 0] >= python[0, 0]) & (gemm[:, 0] <= python[-1, 0])
    return {"gemm_cpu0_spread": _spread(gemm[:, 1]), "python_cpu1_spread": _spread(python[:, 1]),
            "correlation": float(np.corrcoef(gemm[inside, 1], aligned[inside])[0, 1]), "windows": int(inside.sum())}


def same_cpu(seconds: float) -> dict[str, float]:
    _pin(0)
    gemm = _gemm_step_factory()
    rows = []
    end = time.time() + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        _python_step()
        t1 = time.perf_counter()
        gemm()
        rows.append((t0, t1 - t0, time.perf_counter() - t1))
    r = np.array(rows)
    window = ((r[:, 0] - r[0, 0]) // WINDOW_S).astype(int)
    per = np.array([[r[window == k, 1].mean(), r[window == k, 2].mean()] for k in np.unique(window)])
    pilot, work = per[:, 0] / per[:, 0].mean(), per[:, 1] / per[:, 1].mean()
    return {"gemm_spread": _spread(1 / work), "pilot_spread": _spread(1 / pilot),
            "correlation": float(np.corrcoef(pilot, work)[0, 1]),
            "gemm_std": float(work.std()), "gemm_std_after_pilot": float((work / pilot).std()),
            "windows": int(len(per))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("machine_speed_drift: needs two CPUs")
    result = {"seconds": args.seconds, "load_average_1min": os.getloadavg()[0],
              "across_cpus": across_cpus(args.seconds), "same_cpu": same_cpu(args.seconds)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
