"""What a fault did to service: a latency / SLO-attainment timeline and recovery figures.

The timeline groups requests by arrival time into fixed windows; each window gives how many arrived,
completed, failed or were rejected, TTFT and end-to-end percentiles of its completed requests, and the
fraction meeting the SLO (``sim.metrics.slo_report``'s per-request rule: a failed request meets none).
Windows are by arrival, so a window's latency is what a user arriving then experienced."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sim.metrics import slo_report
from sim.scenario import SloSpec

DEFAULT_WINDOWS = 50


def timeline(requests: pd.DataFrame, slo: SloSpec, window_s: float | None = None) -> pd.DataFrame:
    """One row per window of arrivals, from the first arrival to the last."""
    columns = ["window_start_s", "window_end_s", "arrived", "completed", "failed", "rejected", "dropped",
               "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s", "slo_attainment"]
    if not len(requests):
        return pd.DataFrame(columns=columns)
    arrived = requests["arrived_at_s"].to_numpy(dtype=float)
    start, end = float(arrived.min()), float(arrived.max())
    width = window_s if window_s is not None else max((end - start) / DEFAULT_WINDOWS, 1e-9)
    index = np.floor((arrived - start) / width).astype(np.int64)
    rows = []
    for w in range(int(index.max()) + 1):
        mine = requests[index == w]
        done = mine[mine["status"] == "completed"]
        status = mine["status"].value_counts()
        report = slo_report(mine, None, slo, slo.attainment) if len(mine) else {"attainment": None}
        rows.append({
            "window_start_s": start + w * width, "window_end_s": start + (w + 1) * width,
            "arrived": int(len(mine)), "completed": int(status.get("completed", 0)),
            "failed": int(status.get("failed", 0)), "rejected": int(status.get("rejected", 0)),
            "dropped": int(status.get("dropped", 0)),
            "ttft_p50_s": _q(done["ttft_s"], 50), "ttft_p99_s": _q(done["ttft_s"], 99),
            "e2e_p50_s": _q(done["e2e_s"], 50), "e2e_p99_s": _q(done["e2e_s"], 99),
            "slo_attainment": report["attainment"],
        })
    return pd.DataFrame(rows, columns=columns)


def _q(values: pd.Series, q: float) -> float | None:
    arr = values.dropna().to_numpy(dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


def fault_summary(faults: dict[str, Any], requests: pd.DataFrame, slo: SloSpec, window_s: float | None) -> dict[str, Any]:
    """The injector's record plus the timeline and, per fault, SLO attainment before, during and after it."""
    table = timeline(requests, slo, window_s)
    out = dict(faults)
    out["timeline"] = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                       for row in table.to_dict(orient="records")]
    arrived = requests["arrived_at_s"].to_numpy(dtype=float)
    phases = []
    for fault, gpu, start_s, end_s in _intervals(faults):
        spans = {"before": (-np.inf, start_s), "during": (start_s, end_s), "after": (end_s, np.inf)}
        row: dict[str, Any] = {"gpu": gpu, "fault": fault, "start_s": start_s, "end_s": None if np.isinf(end_s) else end_s}
        for name, (lo, hi) in spans.items():
            mine = requests[(arrived >= lo) & (arrived < hi)]
            row[f"{name}_requests"] = int(len(mine))
            row[f"{name}_slo_attainment"] = slo_report(mine, None, slo, slo.attainment)["attainment"] if len(mine) else None
            done = mine[mine["status"] == "completed"]
            row[f"{name}_ttft_p99_s"] = _q(done["ttft_s"], 99)
        row["slo_whole_again_at_s"] = _whole_again(table, end_s, slo.attainment)
        phases.append(row)
    out["around_faults"] = phases
    return out


def _whole_again(table: pd.DataFrame, end_s: float, target: float) -> float | None:
    """Start of the first window, from the fault's end on, whose arrivals meet the SLO attainment target
    again: the service is whole for users arriving from then (None: not within the run)."""
    if np.isinf(end_s) or not len(table):
        return None
    after = table[(table["window_end_s"] > end_s) & (table["slo_attainment"].astype(float) >= target)]
    return float(after["window_start_s"].iloc[0]) if len(after) else None


def _intervals(faults: dict[str, Any]) -> list[tuple[str, int, float, float]]:
    """(fault, gpu, start, end) of every outage (failed until back in service) and every slowdown or
    degraded link (start to end); end is inf when it lasts past the run."""
    out = [("fail", r["gpu"], r["failed_at_s"], r["restored_at_s"] if r["restored_at_s"] is not None else np.inf)
           for r in faults["recoveries"]]
    open_: dict[tuple[int, str, str], list[float]] = {}
    for e in faults["events"]:
        if e["fault"] not in ("slow", "link"):
            continue
        key = (e["gpu"], e["fault"], e["origin"])
        if e["event"] == "start":
            open_.setdefault(key, []).append(e["at_s"])
        elif open_.get(key):
            out.append((e["fault"], e["gpu"], open_[key].pop(0), e["at_s"]))
    out += [(fault, gpu, at_s, np.inf) for (gpu, fault, _), starts in open_.items() for at_s in starts]
    return sorted(out, key=lambda t: (t[2], t[1]))


__all__ = ["timeline", "fault_summary"]
