"""Capacity planning: the cheapest candidate configuration that meets the SLO at a target load.

For every combination of the scenario's ``plan.candidates`` this module

1. prunes what cannot work without simulating it (the weights and one request do not fit),
2. probes the lowest rate of the search: a candidate that misses the SLO even there is pruned,
3. finds the maximum sustainable rate by bisection (in log space) on the arrival rate, where
   "sustainable" means the scenario's SLO holds (percentile targets and attainment),
4. prices it (GPU-hours from an editable price table) and says what binds it at its limit.

Each candidate's search runs in its own worker process; probes simulate a capped number of requests."""

from __future__ import annotations

import copy
import itertools
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sim.errors import CapacityError, ScenarioError
from sim.scenario import Scenario, find_scenario, parse_scenario, read_yaml, resolve, set_key_path


@dataclass
class Probe:
    scale: float
    rate_per_s: float
    met: bool
    ttft_p99_s: float | None
    tbt_p99_s: float | None
    attainment: float | None
    compute_utilization: float
    h2d_utilization: float
    kv_peak_fraction: float
    preemptions: int
    rejected: int


@dataclass
class CandidateResult:
    index: int
    values: dict[str, Any]
    status: str  # "meets target", "below target", "pruned"
    reason: str = ""
    profile: str = ""
    num_gpus: int = 0
    max_rate_per_s: float | None = None
    usd_per_hour: float | None = None
    usd_per_million_output_tokens: float | None = None
    headroom: float | None = None
    binding: str = ""
    at_target: Probe | None = None
    probes: list[Probe] = field(default_factory=list)


def load_prices(path: str | None, base_dir: Path) -> dict[str, float]:
    """Profile name -> USD per GPU-hour (shipped table unless the plan names one)."""
    if path is None:
        text = resources.files("sim.data").joinpath("prices.yaml").read_text()
        origin = "sim/data/prices.yaml"
    else:
        file = Path(path) if Path(path).is_absolute() else base_dir / path
        try:
            text = file.read_text()
        except OSError:
            raise ScenarioError(f"plan.prices: cannot read {file}") from None
        origin = str(file)
    data = yaml.safe_load(text) or {}
    prices = data.get("usd_per_gpu_hour")
    if not isinstance(prices, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in prices.values()):
        raise ScenarioError(f"{origin}: usd_per_gpu_hour: expected a mapping of profile name -> positive price")
    return {str(k): float(v) for k, v in prices.items()}


def _scaled(data: dict[str, Any], scale: float, max_requests: int) -> dict[str, Any]:
    """The scenario at ``scale`` times its own arrival rate, cut to ``max_requests`` requests."""
    out = copy.deepcopy(data)
    arrivals = out["workload"]["arrivals"]
    if arrivals["kind"] == "trace":
        arrivals["rate_scale"] = arrivals.get("rate_scale", 1.0) * scale
    else:
        arrivals["rate_per_s"] = arrivals["rate_per_s"] * scale
    out["workload"]["max_requests"] = min(max_requests, out["workload"].get("max_requests") or max_requests)
    out["workload"].pop("max_duration_s", None)
    out.pop("sweep", None)
    out.pop("plan", None)
    return out


def _probe(data: dict[str, Any], source: str, base_dir: Path, scale: float, max_requests: int) -> Probe:
    from sim.engine.simulation import simulate
    from sim.metrics import summarize

    loaded = resolve(parse_scenario(_scaled(data, scale, max_requests), source), source, base_dir)
    result = simulate(loaded)
    s = summarize(result)
    req = result.requests
    span = float(req["arrived_at_s"].max() - req["arrived_at_s"].min()) if len(req) > 1 else 1.0
    res = s["resources"]
    mem = s["memory"]
    return Probe(
        scale=scale,
        rate_per_s=len(req) / span if span > 0 else float("inf"),
        met=bool(s["slo"]["met"]),
        ttft_p99_s=s["latency"]["ttft_p99_s"],
        tbt_p99_s=s["latency"]["tbt_p99_s"],
        attainment=s["slo"]["attainment"],
        compute_utilization=max(r["compute_utilization"] for r in res),
        h2d_utilization=max(r["h2d_utilization"] for r in res),
        kv_peak_fraction=mem["kv_peak_bytes"] / mem["kv_capacity_bytes"] if mem["kv_capacity_bytes"] else 0.0,
        preemptions=s["preemptions"],
        rejected=s["requests"]["rejected"],
    )


def _binding(p: Probe) -> str:
    """What limits a configuration at its highest sustainable load."""
    if p.rejected:
        return "KV memory (requests rejected)"
    if p.preemptions or p.kv_peak_fraction > 0.95:
        return "KV memory"
    loads = {"PCIe (expert loads)": p.h2d_utilization, "compute": p.compute_utilization}
    name, value = max(loads.items(), key=lambda kv: kv[1])
    return name if value > 0.5 else "latency SLO (resources not saturated)"


def search_candidate(
    index: int, values: dict[str, Any], data: dict[str, Any], source: str, base_dir: str,
    target_rate_per_s: float | None, prices: dict[str, float],
) -> CandidateResult:
    """Prune or probe one candidate, then bisect its maximum sustainable rate."""
    base = Path(base_dir)
    scenario: Scenario = parse_scenario(data, source)
    plan = scenario.plan
    profile = scenario.hardware.profile
    result = CandidateResult(index=index, values=values, status="pruned", profile=profile, num_gpus=scenario.hardware.num_gpus)
    price = prices.get(profile)
    if price is not None:
        result.usd_per_hour = price * scenario.hardware.num_gpus
    cap = plan.max_requests_per_probe
    search = plan.rate_search
    try:
        resolve(scenario, source, base)
        low = _probe(data, source, base, search.low_scale, cap)
    except CapacityError as exc:
        result.reason = "does not fit: " + str(exc).split(": hardware: ", 1)[-1]
        return result
    result.probes.append(low)
    if not low.met:
        result.reason = (
            f"misses the SLO even at {low.rate_per_s:.3g} req/s (TTFT P99 {low.ttft_p99_s:.3g} s, "
            f"attainment {0 if low.attainment is None else low.attainment:.0%})"
        )
        result.binding = _binding(low)
        return result
    best = low
    lo, hi = math.log(search.low_scale), math.log(search.high_scale)
    top = _probe(data, source, base, search.high_scale, cap)
    result.probes.append(top)
    if top.met:
        best = top
    else:
        for _ in range(search.iterations):
            mid = (lo + hi) / 2
            p = _probe(data, source, base, math.exp(mid), cap)
            result.probes.append(p)
            if p.met:
                lo, best = mid, p
            else:
                hi = mid
    result.max_rate_per_s = best.rate_per_s
    result.binding = _binding(best)
    target = target_rate_per_s or low.rate_per_s / search.low_scale
    result.headroom = best.rate_per_s / target
    if best.rate_per_s >= target:
        result.status = "meets target"
        scale_at_target = search.low_scale * target / low.rate_per_s
        result.at_target = _probe(data, source, base, scale_at_target, cap)
    else:
        result.status = "below target"
        result.reason = f"sustains {best.rate_per_s:.3g} req/s < target {target:.3g} req/s"
    if result.usd_per_hour is not None:
        mean_output = _mean_output_tokens(data, source, base)
        tokens_per_hour = min(best.rate_per_s, target) * mean_output * 3600.0
        result.usd_per_million_output_tokens = result.usd_per_hour / tokens_per_hour * 1e6
    return result


def _mean_output_tokens(data: dict[str, Any], source: str, base: Path) -> float:
    import numpy as np

    from sim.engine.simulation import build_request_table

    loaded = resolve(parse_scenario(_scaled(data, 1.0, data["plan"]["max_requests_per_probe"]), source), source, base)
    table = build_request_table(loaded, np.random.default_rng(np.random.SeedSequence(loaded.scenario.workload.seed).spawn(2)[0]))
    return float(table.output_tokens.mean())


def candidates(path: str | Path) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], Scenario, Path]:
    """Every candidate as (axis values, full scenario data), validated up front."""
    file = find_scenario(path)
    raw = read_yaml(file)
    base = parse_scenario(raw, str(path))
    axes = base.plan.candidates
    if not axes:
        raise ScenarioError(f"{path}: plan.candidates: give at least one key path with a list of values to compare")
    out = []
    names = list(axes)
    filled = base.model_dump(mode="json")
    filled["model"] = raw["model"]
    for combo in itertools.product(*(axes[n] for n in names)):
        values = dict(zip(names, combo))
        data = copy.deepcopy(filled)
        for key_path, value in values.items():
            set_key_path(data, key_path, value, str(path), section="plan.candidates")
        parse_scenario(data, f"{path} [candidate {values}]")
        out.append((values, data))
    return out, base, file.parent


def run_plan(path: str | Path, *, jobs: int | None = None, progress: bool = True) -> tuple[pd.DataFrame, list[CandidateResult]]:
    """Search every candidate; returns the ranked table and the full results."""
    cands, base, base_dir = candidates(path)
    prices = load_prices(base.plan.prices, base_dir)
    results: list[CandidateResult] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cands), unit="candidate", desc="plan")
    try:
        args = [
            (i, values, data, str(path), str(base_dir), base.plan.target_rate_per_s, prices)
            for i, (values, data) in enumerate(cands)
        ]
        if jobs == 1:
            for a in args:
                results.append(search_candidate(*a))
                if bar:
                    bar.update()
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for r in pool.map(search_candidate, *zip(*args)):
                    results.append(r)
                    if bar:
                        bar.update()
    finally:
        if bar:
            bar.close()
    return rank(results, base.plan.objective), results


def rank(results: list[CandidateResult], objective: str) -> pd.DataFrame:
    """Candidates that meet the target first, cheapest (or fewest GPUs) first; then the rest."""
    rows = []
    for r in results:
        rows.append({
            "candidate": r.index, **r.values, "status": r.status,
            "max_rate_per_s": r.max_rate_per_s, "headroom": r.headroom, "num_gpus": r.num_gpus,
            "usd_per_hour": r.usd_per_hour, "usd_per_million_output_tokens": r.usd_per_million_output_tokens,
            "ttft_p99_at_target_s": r.at_target.ttft_p99_s if r.at_target else None,
            "tbt_p99_at_target_s": r.at_target.tbt_p99_s if r.at_target else None,
            "binding": r.binding, "reason": r.reason, "probes": len(r.probes),
        })
    table = pd.DataFrame(rows)
    order = {"meets target": 0, "below target": 1, "pruned": 2}
    cost_key = "usd_per_hour" if objective == "cost" else "num_gpus"
    table["_order"] = table["status"].map(order)
    table["_cost"] = table[cost_key].fillna(float("inf"))
    table["_rate"] = -table["max_rate_per_s"].fillna(0.0)
    table = table.sort_values(["_order", "_cost", "_rate", "candidate"]).drop(columns=["_order", "_cost", "_rate"])
    table.insert(0, "rank", range(1, len(table) + 1))
    table["pareto"] = pareto_mask(table)
    return table.reset_index(drop=True)


def pareto_mask(table: pd.DataFrame) -> list[bool]:
    """Not dominated on (lower cost per hour, higher sustainable rate) among candidates with both."""
    mask = []
    for _, row in table.iterrows():
        cost, rate = row["usd_per_hour"], row["max_rate_per_s"]
        if pd.isna(cost) or pd.isna(rate):
            mask.append(False)
            continue
        dominated = any(
            (o["usd_per_hour"] <= cost and o["max_rate_per_s"] >= rate)
            and (o["usd_per_hour"] < cost or o["max_rate_per_s"] > rate)
            for _, o in table.iterrows()
            if not pd.isna(o["usd_per_hour"]) and not pd.isna(o["max_rate_per_s"])
        )
        mask.append(not dominated)
    return mask
