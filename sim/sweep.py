"""Run every point of a scenario's sweep grid, in parallel, with results cached per point.

Each point is keyed by a hash of its resolved scenario, its hardware profile and the moesim version,
and its run folder is written atomically under ``OUT/points/KEY``; a point whose folder exists is
not simulated again, so an interrupted sweep resumes where it stopped and a re-run is instant."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sim import __version__
from sim.errors import CapacityError
from sim.scenario import expand_sweep, find_scenario, read_yaml, resolve, resolved_dict


@dataclass(frozen=True)
class SweepPoint:
    index: int
    values: dict[str, Any]
    key: str
    scenario: dict[str, Any]  # the resolved scenario of this point, itself a valid scenario


def point_key(scenario: dict[str, Any], profile: dict[str, Any]) -> str:
    """Hash of what determines a point's result: scenario, profile and code version."""
    blob = json.dumps({"scenario": scenario, "profile": profile, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_points(path: str | Path) -> tuple[list[SweepPoint], Path]:
    """Expand and resolve every point (errors name the point) before anything runs."""
    file = find_scenario(path)
    points = []
    for index, (values, scenario) in enumerate(expand_sweep(read_yaml(file), str(path))):
        loaded = resolve(scenario, str(path), file.parent)
        resolved = resolved_dict(loaded)
        key = point_key(resolved, loaded.profile.model_dump(mode="json"))
        points.append(SweepPoint(index=index, values=values, key=key, scenario=resolved))
    return points, file.parent


def run_point(scenario: dict[str, Any], base_dir: str, out_dir: str) -> dict[str, Any]:
    """Simulate one point and write its run folder (runs in a worker process)."""
    from sim.engine.simulation import simulate
    from sim.metrics import summarize
    from sim.run_folder import write_run_folder
    from sim.scenario import parse_scenario

    source = str(Path(out_dir) / "scenario.resolved.yaml")
    loaded = resolve(parse_scenario(scenario, source), source, Path(base_dir))
    try:
        result = simulate(loaded)
    except CapacityError as exc:
        # An infeasible point is a result of the sweep, not a failure of it: record why.
        summary = {"infeasible": str(exc).split(": hardware: ", 1)[-1]}
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    summary = summarize(result)
    write_run_folder(result, summary, Path(out_dir))
    return summary


def metrics_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a sweep table compares (only the reason, for an infeasible point)."""
    if "infeasible" in summary:
        return {"infeasible": summary["infeasible"]}
    lat = summary["latency"]
    return {
        "completed": summary["requests"]["completed"],
        "rejected": summary["requests"]["rejected"],
        "requests_per_s": summary["throughput"]["requests_per_s"],
        "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
        "ttft_p99_s": lat["ttft_p99_s"],
        "tbt_p99_s": lat["tbt_p99_s"],
        "e2e_p90_s": lat["e2e_p90_s"],
        "e2e_p99_s": lat["e2e_p99_s"],
        "hit_rate": summary["expert_cache"]["hit_rate"],
        "routing_fidelity": summary["expert_cache"].get("routing_fidelity", 1.0),
        "belady_hit_rate": summary["expert_cache"].get("belady_hit_rate"),
        "ttft_p50_s": lat["ttft_p50_s"],
        "e2e_p50_s": lat["e2e_p50_s"],
        "expert_fraction": summary["expert_cache"]["capacity_experts"] / max(summary["expert_cache"]["total_experts"], 1),
        "expert_memory_gb": summary["memory"]["expert_slots_bytes"] / 1e9,
        "gpu_memory_peak_gb": summary["memory"]["peak_total_bytes"] / 1e9,
        "h2d_gb": sum(r["h2d_bytes"] for r in summary["resources"]) / 1e9,
        "slo_attainment": summary["slo"]["attainment"],
        "slo_met": summary["slo"]["met"],
        "preemptions": summary["preemptions"],
        **_expert_parallel_row(summary),
    }


def _expert_parallel_row(summary: dict[str, Any]) -> dict[str, Any]:
    """Expert-parallel columns (absent for single-GPU replicas)."""
    ep = summary.get("expert_parallel")
    if not ep:
        return {}
    tot = ep["totals_s"]
    moe_s = tot["expert_compute_s"] + tot["dispatch_s"] + tot["combine_s"]
    return {
        "ep_moe_s_per_kpair": 1e3 * moe_s / ep["routed_pairs"] if ep["routed_pairs"] else None,
        "ep_dropped_fraction": ep["dropped_fraction"],
        "ep_rerouted_fraction": ep["rerouted_fraction"],
        "ep_straggler_wait_s": tot["straggler_wait_s"],
        "ep_exposed_comm_s": ep["exposed_comm_s"],
        "ep_imbalance": ep["mean_imbalance"],
    }


def run_sweep(path: str | Path, out: Path, *, jobs: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Run (or reuse) every point; returns one row per point with its axis values and metrics."""
    points, base_dir = plan_points(path)
    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    summaries: dict[int, dict[str, Any]] = {}
    todo = []
    for point in points:
        cached = out / "points" / point.key / "summary.json"
        if cached.exists():
            summaries[point.index] = json.loads(cached.read_text())
        else:
            todo.append(point)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(points), initial=len(points) - len(todo), unit="point", desc="sweep")
    try:
        if todo and (jobs or 0) == 1:
            for point in todo:
                summaries[point.index] = run_point(point.scenario, str(base_dir), str(out / "points" / point.key))
                if bar:
                    bar.update()
        elif todo:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                pending: dict[Future, SweepPoint] = {
                    pool.submit(run_point, p.scenario, str(base_dir), str(out / "points" / p.key)): p for p in todo
                }
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        point = pending.pop(future)
                        summaries[point.index] = future.result()
                        if bar:
                            bar.update()
    finally:
        if bar:
            bar.close()
    rows = []
    for point in points:
        row = {"point": point.index, **point.values, "key": point.key, **metrics_row(summaries[point.index])}
        rows.append(row)
    table = pd.DataFrame(rows)
    tmp = out / "sweep.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "sweep.csv")
    return table
