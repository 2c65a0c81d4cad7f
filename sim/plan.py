"""Capacity planning: the cheapest candidate configuration that meets the SLO at a target load.

For every combination of the scenario's ``plan.candidates`` this module

1. prunes what cannot work without simulating it (the weights and one request do not fit),
2. probes the target rate, and the lowest rate of the search when the target is missed: a candidate
   that misses the SLO even at the lowest rate is pruned, with the bound it broke,
3. finds the maximum sustainable rate by bisection (in log space) on the arrival rate, between the
   target and the highest rate (target met) or the lowest rate and the target (target missed), where
   "sustainable" means the scenario's SLO holds (percentile targets and attainment),
4. prices it (GPU-hours from an editable price table) and says what binds it at its limit.

Probes of all candidates share one pool of worker processes; each probe simulates a capped number of
requests, and a candidate's search depends only on its own probes, so a plan is deterministic for the
scenario's seed whatever the number of workers.
``write_plan`` writes plan.csv (the ranked table) and plan.json (everything, probes included)."""

from __future__ import annotations

import copy
import itertools
import json
import math
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Generator

import pandas as pd
import yaml

from sim.errors import CapacityError, ScenarioError
from sim.scenario import Scenario, axis_values, find_scenario, parse_scenario, read_yaml, resolve, set_key_path


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
    busy: dict[str, float] = field(default_factory=dict)  # every busy/utilisation field of the run (max over GPUs)


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
    max_rate_upper_per_s: float | None = None  # the lowest probed rate that missed the SLO
    target_rate_per_s: float | None = None
    headroom: float | None = None
    failure_headroom_usd_per_hour: float | None = None  # price of the GPUs the plan may lose (tolerate_failures)
    binding: str = ""
    limit: str = ""  # what broke first above the sustainable rate
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
    plan = out.pop("plan", None) or {}
    if plan.get("tolerate_failures", 0):
        out["faults"] = failed_from_start(out, plan["tolerate_failures"], plan.get("failure_unit", "gpu"))
    return out


def failed_from_start(data: dict[str, Any], tolerate: int, unit: str = "gpu") -> dict[str, Any]:
    """The faults: block of a failure-headroom probe: the last ``tolerate`` GPUs (or nodes) fail at time 0
    for good, so the probe measures the deployment with them lost (their requests go to the others)."""
    hardware = data.get("hardware", {})
    count = int(hardware.get("num_nodes" if unit == "node" else "num_gpus", 1))
    kind, key = ("node_fail", "node") if unit == "node" else ("gpu_fail", "gpu")
    events = [{"kind": kind, key: count - 1 - i, "at_s": 0.0} for i in range(tolerate)]
    # A probe reads only the run's totals: one timeline window keeps the fault summary cheap.
    return {"events": events, "timeline_window_s": 1e12}


def _probe(data: dict[str, Any], source: str, base_dir: Path, scale: float, max_requests: int) -> Probe:
    from sim.engine.simulation import simulate
    from sim.metrics import summarize

    loaded = resolve(parse_scenario(_scaled(data, scale, max_requests), source), source, base_dir)
    result = simulate(loaded, record_accesses=False)  # a probe needs no Belady bound: skip the access log
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
        busy=busy_fields(s),
    )


# Busy or utilisation fields of a run summary -> the resource they measure, as the plan names it. A field
# not listed here still counts (named after itself): a new engine metric such as an all-to-all link's busy
# fraction binds a plan as soon as the summary carries it, and gets a nicer name by one line here.
BINDING_LABELS = {
    "compute_utilization": "compute",
    "h2d_utilization": "PCIe (expert loads)",
    "all_to_all_utilization": "all-to-all",
    "a2a_utilization": "all-to-all",
    "interconnect_utilization": "all-to-all",
    "links_utilization": "all-to-all",  # an expert-parallel group's links carry its all-to-alls
    "straggler_wait_fraction": "stragglers",
    "straggler_utilization": "stragglers",
}
BUSY_SUFFIXES = ("_utilization", "_utilisation", "_busy_fraction", "_wait_fraction")
SATURATED = 0.5  # a resource busier than this at the sustainable limit is named as what binds


def busy_fields(summary: dict[str, Any]) -> dict[str, float]:
    """Every busy/utilisation fraction in a run summary: the fields of each ``resources`` row (per GPU)
    and of an optional top-level ``busy`` mapping whose names end in one of ``BUSY_SUFFIXES``, each the
    maximum over GPUs (the busiest GPU binds)."""
    out: dict[str, float] = {}
    rows = list(summary.get("resources") or []) + [summary.get("busy") or {}]
    for row in rows:
        for name, value in row.items():
            if name.endswith(BUSY_SUFFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = max(out.get(name, 0.0), float(value))
    return out


def _binding(p: Probe) -> str:
    """What limits a configuration at its highest sustainable load: KV memory when requests were rejected
    or preempted (or the KV cache ran full), else the busiest resource when it is saturated."""
    if p.rejected:
        return "KV memory (requests rejected)"
    if p.preemptions or p.kv_peak_fraction > 0.95:
        return "KV memory"
    busy = p.busy or {"compute_utilization": p.compute_utilization, "h2d_utilization": p.h2d_utilization}
    name, value = max(busy.items(), key=lambda kv: kv[1])
    label = BINDING_LABELS.get(name) or name.rsplit("_", 1)[0].replace("_", " ")
    return f"{label} ({value:.0%} busy)" if value > SATURATED else "latency SLO (resources not saturated)"


def _misses(p: Probe, slo: Any) -> str:
    """Which SLO bound a probe broke, in words (the first one that failed)."""
    parts = []
    if slo.ttft_p99_s is not None and (p.ttft_p99_s is None or p.ttft_p99_s > slo.ttft_p99_s):
        parts.append(f"TTFT P99 {_num(p.ttft_p99_s)} s > {slo.ttft_p99_s:g} s")
    if slo.tbt_p99_s is not None and (p.tbt_p99_s is None or p.tbt_p99_s > slo.tbt_p99_s):
        parts.append(f"TBT P99 {_num(p.tbt_p99_s)} s > {slo.tbt_p99_s:g} s")
    if p.attainment is None or p.attainment < slo.attainment:
        parts.append(f"attainment {0 if p.attainment is None else p.attainment:.0%} < {slo.attainment:.0%}")
    if p.rejected:
        parts.append(f"{p.rejected} requests rejected")
    return ", ".join(parts) or "SLO missed"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _workload_rate(data: dict[str, Any], source: str, base: Path, max_requests: int) -> tuple[float, float]:
    """(mean arrival rate, mean output tokens) of the probe's requests at the workload's own rate.

    Probes scale every inter-arrival time by the same factor, so a probe at ``scale`` arrives at exactly
    ``scale`` times this rate; this is what lets the search aim its first probe at the target."""
    import numpy as np

    from sim.engine.simulation import build_request_table

    loaded = resolve(parse_scenario(_scaled(data, 1.0, max_requests), source), source, base)
    seed = np.random.SeedSequence(loaded.scenario.workload.seed).spawn(2)[0]
    table = build_request_table(loaded, np.random.default_rng(seed))
    arrivals = np.asarray(table.arrival_s, dtype=float)
    span = float(arrivals.max() - arrivals.min()) if len(arrivals) > 1 else 0.0
    rate = len(arrivals) / span if span > 0 else float("inf")
    return rate, float(np.mean(table.output_tokens)) if len(arrivals) else 0.0


def rate_precision(low_scale: float, high_scale: float, target_scale: float, iterations: int) -> dict[str, float]:
    """Worst-case ratio between the true maximum sustainable rate and the one reported.

    The search brackets the limit in [target, high] when the target is met and in [low, target] when it is
    not; ``iterations`` bisection steps in log space shrink a bracket of ratio R to R ** (1 / 2**iterations)."""
    t = min(max(target_scale, low_scale), high_scale)
    return {
        "above_target": (high_scale / t) ** (1.0 / 2**iterations),
        "below_target": (t / low_scale) ** (1.0 / 2**iterations),
    }


Search = Generator[float, Probe, CandidateResult]  # yields the rate multiples to probe, returns the result


def candidate_search(
    index: int, values: dict[str, Any], data: dict[str, Any], source: str, base_dir: str,
    target_rate_per_s: float | None, prices: dict[str, float], rates: dict[str, tuple[float, float]] | None = None,
) -> Search:
    """Prune or probe one candidate, then bisect its maximum sustainable rate.

    A generator: it yields each rate multiple it wants probed and is sent the ``Probe`` back (a probe's
    exception is thrown into it), so the caller decides where probes run; it returns the result. Its
    choices depend only on its own probes, so the result does not depend on how probes are scheduled.

    The first probe is at the target rate: a candidate that meets the SLO there is searched between the
    target and ``high_scale`` (the low-rate probe, the slowest to simulate, is then never needed); one that
    misses it is probed at ``low_scale`` (pruned if it misses there too) and searched between the two.
    Assumes that a configuration meeting the SLO at some rate meets it at every lower rate. ``rates``
    memoises the workload's own rate across candidates that share a workload."""
    base = Path(base_dir)
    scenario: Scenario = parse_scenario(data, source)
    plan = scenario.plan
    slo = scenario.slo
    profile = scenario.hardware.profile
    result = CandidateResult(index=index, values=values, status="pruned", profile=profile, num_gpus=scenario.hardware.num_gpus)
    price = prices.get(profile)
    if price is not None:
        # Spare GPUs (faults.spare_gpus) sit idle but are paid for.
        result.usd_per_hour = price * (scenario.hardware.num_gpus + scenario.faults.spare_gpus)
    over = over_budget(result, plan.budget_usd_per_hour, plan.max_gpus)
    if over:
        result.reason = over
        return result
    cap = plan.max_requests_per_probe
    search = plan.rate_search
    seen: dict[float, Probe] = {}
    if plan.tolerate_failures:
        hw = scenario.hardware
        units, per_unit = (hw.num_nodes, hw.num_gpus // hw.num_nodes) if plan.failure_unit == "node" else (hw.num_gpus, 1)
        if plan.tolerate_failures >= units:
            result.reason = (f"cannot lose {plan.tolerate_failures} of its {units} {'GPU' if plan.failure_unit == 'gpu' else 'node'}(s) "
                             f"(plan.tolerate_failures) and still serve")
            return result
        if price is not None:
            result.failure_headroom_usd_per_hour = price * plan.tolerate_failures * per_unit

    def probe(scale: float) -> Generator[float, Probe, Probe]:
        if scale not in seen:
            seen[scale] = yield scale
            result.probes.append(seen[scale])
        return seen[scale]

    try:
        try:
            resolve(scenario, source, base)
        except ScenarioError as exc:
            # More expert memory than the GPU has is this candidate's fault, not the plan's: prune it.
            if ": hardware.expert_memory: " not in str(exc):
                raise
            raise CapacityError(str(exc).replace(": hardware.expert_memory: ", ": hardware: ", 1)) from None
        key = json.dumps([data["workload"], cap], sort_keys=True, default=str)
        rates = {} if rates is None else rates
        if key not in rates:
            rates[key] = _workload_rate(data, source, base, cap)
        own_rate, mean_output = rates[key]
        target = target_rate_per_s or own_rate
        result.target_rate_per_s = target
        t_scale = min(max(target / own_rate, search.low_scale), search.high_scale)
        at_target = yield from probe(t_scale)
    except CapacityError as exc:
        result.reason = "does not fit: " + str(exc).split(": hardware: ", 1)[-1]
        return result
    if at_target.met:
        lo, hi = t_scale, search.high_scale
    else:
        low = yield from probe(search.low_scale)
        if not low.met:
            result.reason = f"misses the SLO even at {low.rate_per_s:.3g} req/s ({_misses(low, slo)})"
            result.binding = _binding(low)
            return result
        lo, hi = search.low_scale, t_scale
    best, failed = seen[lo], None if hi not in seen else seen[hi]
    if hi != lo and hi not in seen:
        top = yield from probe(hi)
        if top.met:
            best = top
        else:
            failed = top
    if failed is not None:
        a, b = math.log(lo), math.log(hi)
        for _ in range(search.iterations):
            mid = (a + b) / 2
            p = yield from probe(math.exp(mid))
            if p.met:
                a, best = mid, p
            else:
                b, failed = mid, p
    result.max_rate_per_s = best.rate_per_s
    result.max_rate_upper_per_s = failed.rate_per_s if failed is not None else None
    result.binding = _binding(best)
    if failed is not None:
        result.limit = f"at {failed.rate_per_s:.3g} req/s: {_misses(failed, slo)}"
    else:
        result.limit = f"meets the SLO at the highest rate searched ({best.rate_per_s:.3g} req/s)"
    result.headroom = best.rate_per_s / target
    if at_target.met and at_target.rate_per_s >= target * (1 - 1e-9):
        result.status = "meets target"
        result.at_target = at_target
    else:
        result.status = "below target"
        result.reason = (
            f"sustains {best.rate_per_s:.3g} req/s < target {target:.3g} req/s"
            + (f"; {result.limit}" if failed is not None else "")
        )
    if result.usd_per_hour is not None and mean_output > 0:
        tokens_per_hour = min(best.rate_per_s, target) * mean_output * 3600.0
        result.usd_per_million_output_tokens = result.usd_per_hour / tokens_per_hour * 1e6
    return result


def search_candidate(
    index: int, values: dict[str, Any], data: dict[str, Any], source: str, base_dir: str,
    target_rate_per_s: float | None, prices: dict[str, float],
) -> CandidateResult:
    """One candidate's whole search, every probe run here in turn."""
    gen = candidate_search(index, values, data, source, base_dir, target_rate_per_s, prices)
    return _drive(gen, lambda scale: _probe(data, source, Path(base_dir), scale, data["plan"]["max_requests_per_probe"]))


def over_budget(result: CandidateResult, budget_usd_per_hour: float | None, max_gpus: int | None) -> str:
    """Why a candidate is over the plan's budget (pruned before anything is simulated), or ''."""
    if max_gpus is not None and result.num_gpus > max_gpus:
        return f"over budget: {result.num_gpus} GPUs > {max_gpus}"
    if budget_usd_per_hour is not None:
        if result.usd_per_hour is None:
            return f"over budget: no price for {result.profile} in the price table, so its cost is unknown"
        if result.usd_per_hour > budget_usd_per_hour:
            return f"over budget: ${result.usd_per_hour:,.2f}/h > ${budget_usd_per_hour:,.2f}/h"
    return ""


DEFAULT_PLAN = "mixtral-plan"  # what `moesim plan` with no scenario runs


def parse_budget(text: str) -> dict[str, Any]:
    """``--budget``: ``40`` / ``$40/h`` / ``40usd`` (USD per hour) or ``8gpus`` / ``8 GPUs`` (GPU count)."""
    import re

    t = text.strip().lower().replace(" ", "")
    gpus = re.fullmatch(r"(\d+)gpus?", t)
    if gpus:
        return {"max_gpus": int(gpus.group(1))}
    usd = re.fullmatch(r"\$?(\d+(?:\.\d*)?|\.\d+)(?:usd)?(?:/h|/hour|perhour)?", t)
    if usd and float(usd.group(1)) > 0:
        return {"budget_usd_per_hour": float(usd.group(1))}
    raise ScenarioError(f"--budget {text}: expected a cost per hour (e.g. 40 or $40/h) or a GPU count (e.g. 8gpus)")


def _drive(gen: Search, run: Callable[[float], Probe]) -> CandidateResult:
    try:
        scale = next(gen)
        while True:
            try:
                probe = run(scale)
            except CapacityError as exc:
                scale = gen.throw(exc)
            else:
                scale = gen.send(probe)
    except StopIteration as stop:
        return stop.value


def _with_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The scenario data with command-line settings (``--target-rate``, ``--budget``) put into its plan block."""
    if not overrides:
        return raw
    raw = copy.deepcopy(raw)
    plan = raw.setdefault("plan", {}) if isinstance(raw, dict) else {}
    plan.update({k: v for k, v in overrides.items() if v is not None})
    return raw


def candidates(
    path: str | Path, overrides: dict[str, Any] | None = None,
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], Scenario, Path]:
    """Every candidate as (axis values, full scenario data), validated up front."""
    file = find_scenario(path)
    raw = _with_overrides(read_yaml(file), overrides)
    base = parse_scenario(raw, str(path))
    axes = base.plan.candidates
    if not axes:
        raise ScenarioError(f"{path}: plan.candidates: give at least one key path with a list of values to compare")
    out = []
    names = list(axes)
    filled = base.model_dump(mode="json")
    filled["model"] = raw["model"]
    for combo in itertools.product(*(axis_values(axes[n]) for n in names)):
        values = dict(zip(names, combo))
        data = copy.deepcopy(filled)
        for key_path, value in values.items():
            set_key_path(data, key_path, value, str(path), section="plan.candidates")
        parse_scenario(data, f"{path} [candidate {values}]")
        out.append((values, data))
    return out, base, file.parent


def run_plan(
    path: str | Path, *, jobs: int | None = None, progress: bool = True, executor: str = "local",
    address: str | None = None, overrides: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, list[CandidateResult]]:
    """Search every candidate; returns the ranked table and the full results (in candidate order).

    Probes, not candidates, are the unit of parallel work: every candidate's next probe is queued as soon
    as its previous one returns, so the workers (local processes, or a Ray cluster: ``sim.executors``)
    stay busy until the last few probes of the plan. ``overrides`` sets plan keys (target rate, budget)."""
    from sim.executors import make_executor

    cands, base, base_dir = candidates(path, overrides)
    if base.workload.arrivals.kind == "closed_loop":
        raise ScenarioError(f"{path}: workload.arrivals: plan searches the highest arrival rate that meets the SLO, "
                            f"and a closed loop (kind: closed_loop) has no arrival rate; sweep "
                            f"workload.arrivals.clients with `moesim simulate` instead")
    prices = load_prices(base.plan.prices, base_dir)
    cap = base.plan.max_requests_per_probe
    rates: dict[str, tuple[float, float]] = {}
    gens = [
        candidate_search(i, values, data, str(path), str(base_dir), base.plan.target_rate_per_s, prices, rates)
        for i, (values, data) in enumerate(cands)
    ]
    results: dict[int, CandidateResult] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cands), unit="candidate", desc="plan",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}]")
    pool = make_executor(executor, jobs, address)
    try:
        pending: dict[Future, int] = {}

        def advance(i: int, step: Callable[[], float]) -> None:
            try:
                scale = step()
            except StopIteration as stop:
                results[i] = stop.value
                if bar:
                    bar.update()
                return
            pending[pool.submit(_probe, cands[i][1], str(path), base_dir, scale, cap)] = i

        for i, gen in enumerate(gens):
            advance(i, gen.__next__)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: pending[f]):
                i = pending.pop(future)
                exc = future.exception()
                if isinstance(exc, CapacityError):
                    advance(i, lambda g=gens[i], e=exc: g.throw(e))
                elif exc is not None:
                    raise exc
                else:
                    advance(i, lambda g=gens[i], p=future.result(): g.send(p))
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown()
    finally:
        if bar:
            bar.close()
    ordered = [results[i] for i in range(len(cands))]
    return rank(ordered, base.plan.objective), ordered


def rank(results: list[CandidateResult], objective: str) -> pd.DataFrame:
    """Candidates that meet the target first, cheapest (or fewest GPUs) first; then the rest."""
    rows = []
    for r in results:
        rows.append({
            "candidate": r.index, **r.values, "status": r.status,
            "max_rate_per_s": r.max_rate_per_s, "max_rate_upper_per_s": r.max_rate_upper_per_s,
            "headroom": r.headroom, "num_gpus": r.num_gpus,
            "usd_per_hour": r.usd_per_hour, "usd_per_million_output_tokens": r.usd_per_million_output_tokens,
            "ttft_p99_at_target_s": r.at_target.ttft_p99_s if r.at_target else None,
            "tbt_p99_at_target_s": r.at_target.tbt_p99_s if r.at_target else None,
            "binding": r.binding, "limit": r.limit, "reason": r.reason, "probes": len(r.probes),
        })
        if r.failure_headroom_usd_per_hour is not None:
            rows[-1]["failure_headroom_usd_per_hour"] = r.failure_headroom_usd_per_hour
    table = pd.DataFrame(rows)
    order = {"meets target": 0, "below target": 1, "pruned": 2}
    cost_key = "usd_per_hour" if objective == "cost" else "num_gpus"
    table["_order"] = table["status"].map(order)
    table["_cost"] = table[cost_key].astype(float).fillna(float("inf"))
    table["_rate"] = -table["max_rate_per_s"].astype(float).fillna(0.0)
    table = table.sort_values(["_order", "_cost", "_rate", "candidate"]).drop(columns=["_order", "_cost", "_rate"])
    table.insert(0, "rank", range(1, len(table) + 1))
    table["pareto"] = pareto_mask(table)
    return table.reset_index(drop=True)


# (column, +1 to maximise / -1 to minimise): the trade-off a buyer weighs among candidates meeting the target.
PARETO_OBJECTIVES = (("usd_per_hour", -1), ("max_rate_per_s", +1), ("ttft_p99_at_target_s", -1))


def pareto_mask(table: pd.DataFrame, objectives: tuple[tuple[str, int], ...] = PARETO_OBJECTIVES) -> list[bool]:
    """True where a row with every objective known is dominated by no other such row: no other row is
    at least as good on every objective and better on one (lower cost, higher sustainable rate, lower
    P99 TTFT at the target). A row missing any objective (pruned, or below target) is never on the front."""
    import numpy as np

    values = np.column_stack([table[c].astype(float).to_numpy() * sign for c, sign in objectives]) if len(table) else np.zeros((0, 0))
    known = ~np.isnan(values).any(axis=1) if len(table) else np.zeros(0, dtype=bool)
    mask = []
    for i in range(len(table)):
        if not known[i]:
            mask.append(False)
            continue
        others = values[known]
        dominated = ((others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)).any()
        mask.append(not bool(dominated))
    return mask


def recommended(table: pd.DataFrame) -> pd.Series | None:
    """The top-ranked candidate that meets the target, if any."""
    ok = table[table["status"] == "meets target"]
    return ok.iloc[0] if len(ok) else None


def write_plan(
    out: Path, path: str | Path, table: pd.DataFrame, results: list[CandidateResult],
    overrides: dict[str, Any] | None = None,
) -> Path:
    """plan.csv (the ranked table) and plan.json (settings, recommendation, Pareto front, every candidate
    with its probes), each written atomically."""
    from dataclasses import asdict

    from sim.sweep import code_version

    file = find_scenario(path)
    base = parse_scenario(_with_overrides(read_yaml(file), overrides), str(path))
    search = base.plan.rate_search
    target = next((r.target_rate_per_s for r in results if r.target_rate_per_s), base.plan.target_rate_per_s)
    own = next((p.rate_per_s / p.scale for r in results for p in r.probes), None)
    best = recommended(table)
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else (v.item() if hasattr(v, "item") else v)  # noqa: E731
    rows = [{k: clean(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
    doc = {
        "scenario": base.name,
        "description": base.description,
        "source": str(path),
        "slo": base.slo.model_dump(mode="json"),
        "objective": base.plan.objective,
        "budget": {"usd_per_hour": base.plan.budget_usd_per_hour, "max_gpus": base.plan.max_gpus},
        "code_version": code_version(),
        "target_rate_per_s": target,
        "workload_rate_per_s": own,
        "axes": list(base.plan.candidates),
        "rate_search": {
            **search.model_dump(mode="json"),
            "max_requests_per_probe": base.plan.max_requests_per_probe,
            "precision": rate_precision(search.low_scale, search.high_scale, (target / own) if target and own else 1.0, search.iterations),
        },
        "recommended": next((r for r in rows if best is not None and r["candidate"] == best["candidate"]), None),
        "pareto": [r["candidate"] for r in rows if r["pareto"]],
        "table": rows,
        "candidates": [asdict(r) for r in results],
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("plan.csv", table.to_csv(index=False)), ("plan.json", json.dumps(doc, indent=2, default=float) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return out
