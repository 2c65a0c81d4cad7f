"""Turn a run's tables into the summary a capacity planner reads: latency percentiles, throughput,
SLO attainment, memory by kind, expert-cache behaviour and link use.

Every number here is computed from the run's own records; nothing is estimated."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sim.engine.simulation import SimulationResult
from sim.policies.cache import belady_misses
from sim.scenario import SloTargets

# Belady's MIN walks the access stream in Python; past this many accesses it is skipped and said so.
BELADY_MAX_ACCESSES = 3_000_000


def _percentiles(values: np.ndarray | pd.Series, prefix: str) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return {f"{prefix}_p50_s": None, f"{prefix}_p90_s": None, f"{prefix}_p99_s": None, f"{prefix}_mean_s": None}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        f"{prefix}_p50_s": float(p50),
        f"{prefix}_p90_s": float(p90),
        f"{prefix}_p99_s": float(p99),
        f"{prefix}_mean_s": float(arr.mean()),
    }


def _percentile(values: pd.Series | np.ndarray, q: float) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.percentile(arr, q)) if arr.size else None


def slo_report(requests: pd.DataFrame, tbt_samples_s: np.ndarray | None, targets: SloTargets, attainment: float) -> dict[str, Any]:
    """Each percentile target checked against the run, and the fraction of requests meeting every
    per-request bound (a request that was rejected or dropped meets none)."""
    checks: dict[str, Any] = {}
    ok = np.ones(len(requests), dtype=bool)
    completed = (requests["status"] == "completed").to_numpy()
    ok &= completed
    spec = [
        ("ttft_p50_s", "ttft_s", 50), ("ttft_p99_s", "ttft_s", 99),
        ("e2e_p95_s", "e2e_s", 95), ("e2e_p99_s", "e2e_s", 99),
    ]
    for key, column, q in spec:
        target = getattr(targets, key)
        if target is None:
            continue
        observed = _percentile(requests.loc[completed, column], q)
        checks[key] = {"target_s": target, "observed_s": observed, "met": observed is not None and observed <= target}
        ok &= (requests[column].fillna(math.inf) <= target).to_numpy()
    if targets.tbt_p99_s is not None:
        observed = _percentile(tbt_samples_s, 99) if tbt_samples_s is not None else _percentile(requests["max_tbt_s"], 99)
        checks["tbt_p99_s"] = {
            "target_s": targets.tbt_p99_s, "observed_s": observed,
            "met": observed is not None and observed <= targets.tbt_p99_s,
        }
        ok &= (requests["max_tbt_s"] <= targets.tbt_p99_s).to_numpy()
    fraction = float(ok.mean()) if len(ok) else None
    return {
        "targets": checks,
        "attainment": fraction,
        "attainment_target": attainment,
        "met": bool(checks) and all(c["met"] for c in checks.values()) and fraction is not None and fraction >= attainment,
        "has_targets": bool(checks),
    }


def _closed_loop_fields(arrivals: Any) -> dict[str, Any]:
    """How a closed-loop workload sent its requests (empty for open-loop arrivals)."""
    if arrivals.kind != "closed_loop":
        return {}
    if arrivals.think_times_s is not None:  # recorded pauses (a validation replay): their mean
        pauses = arrivals.think_times_s[arrivals.clients:]
        mean_s = sum(pauses) / len(pauses) if pauses else 0.0
        return {"closed_loop": {"clients": arrivals.clients, "think_time_s": mean_s, "think_time": "recorded"}}
    return {"closed_loop": {"clients": arrivals.clients, "think_time_s": arrivals.think_time_s,
                            "think_time": arrivals.think_time}}


def summarize(result: SimulationResult) -> dict[str, Any]:
    """The run's summary as plain JSON-ready values."""
    scenario = result.loaded.scenario
    model = result.loaded.model
    req = result.requests
    it = result.iterations
    budget = result.budget
    completed = req[req["status"] == "completed"]
    first_arrival = float(req["arrived_at_s"].min()) if len(req) else 0.0
    last_finish = float(req["finished_at_s"].max()) if len(req) and req["finished_at_s"].notna().any() else 0.0
    span_s = max(last_finish - first_arrival, 1e-12)
    status_counts = req["status"].value_counts().to_dict()
    reasons = req.loc[req["reason"] != "", "reason"].value_counts().to_dict()

    out: dict[str, Any] = {
        "scenario": scenario.name,
        "model": model.name,
        "profile": result.loaded.profile.name,
        "profile_source": result.loaded.profile.source,
        "num_gpus": scenario.hardware.num_gpus,
        "partial": result.partial,
        "simulated_s": result.simulated_s,
        "requests": {
            "arrived": int(len(req)),
            "completed": int(status_counts.get("completed", 0)),
            "rejected": int(status_counts.get("rejected", 0)),
            "dropped": int(status_counts.get("dropped", 0)),
            "failed": int(status_counts.get("failed", 0)),
            "unfinished": int(sum(v for k, v in status_counts.items() if k.startswith("unfinished"))),
            "reasons": {str(k): int(v) for k, v in reasons.items()},
            "trace_rows_skipped": int(result.extra.get("table_skipped_rows", 0)),
            **_closed_loop_fields(scenario.workload.arrivals),
        },
        "profile_outside_measured": {str(k): int(v) for k, v in result.extra.get("profile_outside_measured", {}).items()},
        "throughput": {
            "span_s": span_s,
            "requests_per_s": len(completed) / span_s,
            "output_tokens_per_s": float(completed["output_tokens"].sum()) / span_s,
            "prompt_tokens_per_s": float(completed["prompt_tokens"].sum()) / span_s,
        },
        "latency": {
            **_percentiles(completed["ttft_s"], "ttft"),
            **_percentiles(result.tbt_samples_s, "tbt"),
            **_percentiles(completed["tpot_s"], "tpot"),
            **_percentiles(completed["e2e_s"], "e2e"),
            **_percentiles(completed["admitted_at_s"] - completed["arrived_at_s"], "queue"),
        },
        "slo": slo_report(req, result.tbt_samples_s, scenario.slo, scenario.slo.attainment),
        "preemptions": int(sum(r.preemptions for r in result.replicas)),
        "memory": _memory(result),
        "expert_cache": _cache(result),
        "resources": _resources(result, span_s),
    }
    if scenario.slo.per_task and req["task"].notna().any():
        out["slo"]["per_task"] = {
            task: slo_report(
                req[req["task"] == task], None, targets, scenario.slo.attainment
            )
            for task, targets in scenario.slo.per_task.items()
        }
    if "offload" in result.extra:  # speculative decoding / CPU offloading (sim.engine.offload)
        out["offload"] = _offload(result)
    if "faults" in result.extra:
        from sim.fault_metrics import fault_summary

        out["faults"] = fault_summary(result.extra["faults"], req, scenario.slo, scenario.faults.timeline_window_s)
    ep = expert_parallel_summary(result)
    if ep is not None:
        out["expert_parallel"] = ep
    out["sim_events"] = result.events
    out["iterations"] = int(len(it))
    del budget
    return out


def _offload(result: SimulationResult) -> dict[str, Any]:
    """The speculative / offloading set-up, acceptance as it happened, and mean busy seconds per decode iteration."""
    from sim.engine.speculative import BREAKDOWN_COLUMNS

    it = result.iterations
    decode = it[it["num_prefill_seqs"] == 0] if len(it) else it
    drafted = int(it["drafted_tokens"].sum()) if len(it) else 0
    out = dict(result.extra["offload"])
    out["drafted_tokens"] = drafted
    out["accepted_tokens"] = int(it["accepted_tokens"].sum()) if len(it) else 0
    out["acceptance_rate"] = out["accepted_tokens"] / drafted if drafted else None
    seqs = int(decode["num_decode_seqs"].sum()) if len(decode) else 0
    out["tokens_per_decode_step"] = float(decode["emitted_tokens"].sum()) / seqs if seqs else None
    out["decode_iteration_mean_s"] = float(decode["duration_s"].mean()) if len(decode) else None
    out["decode_breakdown_mean_s"] = {c: float(decode[c].mean()) if len(decode) else 0.0
                                      for c in (*BREAKDOWN_COLUMNS, "draft_s")}
    return out


def _time_weighted(values: pd.Series, weights: pd.Series) -> float:
    total = float(weights.sum())
    return float((values * weights).sum() / total) if total > 0 else 0.0


def _memory(result: SimulationResult) -> dict[str, Any]:
    b = result.budget
    it = result.iterations
    kv_used = it["kv_blocks_used"] * b.kv_block_bytes if len(it) else pd.Series([0.0])
    experts = it["experts_resident"] * b.expert_slot_bytes if len(it) else pd.Series([0.0])
    dur = it["duration_s"] if len(it) else pd.Series([1.0])
    return {
        "gpu_bytes": b.gpu_bytes,
        "non_expert_weights_bytes": b.non_expert_bytes,
        "expert_slots": b.expert_slots,
        "expert_slots_bytes": b.expert_bytes,
        "expert_slot_bytes": b.expert_slot_bytes,
        "kv_block_bytes": b.kv_block_bytes,
        "experts_resident_peak_bytes": float(experts.max()),
        "experts_resident_mean_bytes": _time_weighted(experts, dur),
        "kv_capacity_bytes": b.kv_bytes,
        "kv_capacity_tokens": b.kv_blocks * b.kv_block_tokens,
        "kv_peak_bytes": float(kv_used.max()),
        "kv_mean_bytes": _time_weighted(kv_used, dur),
        "reserve_bytes": b.reserve_bytes,
        "peak_total_bytes": b.non_expert_bytes + float(experts.max()) + float(kv_used.max()) + b.reserve_bytes,
    }


def _cache(result: SimulationResult) -> dict[str, Any]:
    it = result.iterations
    hits = int(it["expert_hits"].sum()) if len(it) else 0
    misses = int(it["expert_misses"].sum()) if len(it) else 0
    total = hits + misses
    caches = [r.planner.cache for r in result.replicas]
    out: dict[str, Any] = {
        "policy": result.loaded.scenario.policies.expert_cache.name,
        "capacity_experts": caches[0].capacity_experts if caches else 0,
        "total_experts": result.loaded.model.num_moe_layers * result.loaded.model.num_experts,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / total if total else None,
        "prefetch_hits": int(it["prefetch_hits"].sum()) if len(it) else 0,
        "evictions": int(sum(c.evictions for c in caches)),
        "routing_fidelity": _routing_fidelity(result),
    }
    planners = [r.planner for r in result.replicas if hasattr(r.planner, "offload_summary")]
    if planners:  # eMoE and the other offloading policies (sim.engine.offload_policies)
        out["offload"] = planners[0].offload_summary()
    refusals = sum(getattr(r, "held", 0) for r in result.replicas)
    if refusals:
        out["admission_refusals"] = int(refusals)
    accesses = [r.accesses for r in result.replicas]
    n_access = sum(sum(len(a) for a in acc) for acc in accesses)
    if caches and not caches[0].holds_everything and n_access:
        if n_access <= BELADY_MAX_ACCESSES and not caches[0].per_layer:
            optimal = 0
            for rep, acc in zip(result.replicas, accesses):
                stream = np.concatenate(acc) if acc else np.zeros(0, dtype=np.int32)
                start = np.zeros(rep.planner.cache.resident.shape, dtype=bool)
                # Belady starts from the same warm fill the policy started from.
                start[_initial_fill(rep.planner.cache)] = True
                optimal += belady_misses(stream, rep.planner.cache.capacity_experts, start)
            out["belady_misses"] = optimal
            out["belady_hit_rate"] = 1.0 - optimal / n_access
        else:
            out["belady_misses"] = None
            out["belady_note"] = (
                "skipped: per-layer scope" if caches[0].per_layer
                else f"skipped: {n_access:,} accesses exceed {BELADY_MAX_ACCESSES:,}"
            )
    return out


def _routing_fidelity(result: SimulationResult) -> float:
    """Token-expert assignments served by the expert the gate selected, over all assignments; 1.0
    for policies that never reroute (every miss is fetched)."""
    total = kept = 0
    for rep in result.replicas:
        total += getattr(rep.planner, "num_assignments", 0)
        kept += getattr(rep.planner, "num_kept", 0)
        failover = getattr(rep.planner, "failover", None)  # an expert-parallel group routing around a failed rank
        if failover is not None:
            total += failover.stats.assignments
            kept += failover.stats.kept
    return kept / total if total else 1.0


def _initial_fill(cache) -> np.ndarray:
    per_layer = cache.capacity_experts // cache.num_layers
    extra = cache.capacity_experts - per_layer * cache.num_layers
    keys = []
    for layer in range(cache.num_layers):
        n = min(cache.num_experts, per_layer + (1 if layer < extra else 0))
        keys.extend(layer * cache.num_experts + np.arange(n))
    return np.asarray(keys, dtype=np.int64)


def _resources(result: SimulationResult, span_s: float) -> list[dict[str, Any]]:
    it = result.iterations
    rows = []
    load_bytes = result.loaded.model.expert_bytes
    for rep in result.replicas:
        mine = it[it["replica"] == rep.index]
        compute = float(mine["compute_busy_s"].sum())
        copy = float(mine["copy_busy_s"].sum())
        loads = int(mine["expert_loads"].sum())
        if hasattr(rep.planner, "placement"):
            # An expert-parallel group: its plan's 'loads' are all-to-alls on the links, not expert copies.
            rows.append(
                {
                    "replica": rep.index, "compute_busy_s": compute, "compute_utilization": compute / span_s,
                    "h2d_busy_s": 0.0, "h2d_utilization": 0.0, "h2d_bytes": rep.swap_bytes, "expert_loads": 0,
                    "links_busy_s": copy, "links_utilization": copy / span_s,
                    # Mean rank time spent waiting for the slowest rank's experts (a plan names it 'stragglers').
                    "straggler_wait_fraction": float(rep.planner.stats.straggler_wait_s.sum()) / span_s,
                    "stall_s": float(mine["stall_s"].sum()), "iterations": int(len(mine)),
                }
            )
            continue
        rows.append(
            {
                "replica": rep.index,
                "compute_busy_s": compute,
                "compute_utilization": compute / span_s,
                "h2d_busy_s": copy,
                "h2d_utilization": copy / span_s,
                "h2d_bytes": loads * load_bytes + rep.swap_bytes,
                "expert_loads": loads,
                "stall_s": float(mine["stall_s"].sum()),
                "iterations": int(len(mine)),
            }
        )
    return rows


def resources_frame(summary: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(summary["resources"])


def _ep_stats(result: SimulationResult) -> list[Any]:
    """The expert-parallel statistics of each replica (empty for single-GPU replicas)."""
    return [r.planner.stats for r in result.replicas if hasattr(r.planner, "placement")]


def expert_parallel_tables(result: SimulationResult) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Per MoE layer time breakdown summed over replicas and iterations, and token-expert pairs per
    (layer, rank) for the imbalance heatmap; None when no replica spans several GPUs."""
    stats = _ep_stats(result)
    if not stats:
        return None
    layers = pd.DataFrame(stats[0].layer_table())
    for st in stats[1:]:
        other = pd.DataFrame(st.layer_table())
        for col in layers.columns:
            if col.endswith("_s"):
                layers[col] += other[col]
    layers["mean_imbalance"] = np.mean([st.layer_table()["mean_imbalance"] for st in stats], axis=0)
    tokens = sum(st.device_tokens for st in stats)
    device = pd.DataFrame(tokens, columns=[f"rank_{r}" for r in range(tokens.shape[1])])
    device.insert(0, "moe_layer", np.arange(len(device)))
    return layers, device


def _collective_model(result: SimulationResult, kind: str) -> str:
    """measured | link (| mixed when replicas differ) for collective ``kind`` of the EP groups."""
    models = {r.planner.topology.collective_model(kind) for r in result.replicas if hasattr(r.planner, "topology")}
    return models.pop() if len(models) == 1 else "mixed"


def expert_parallel_summary(result: SimulationResult) -> dict[str, Any] | None:
    """Totals of the expert-parallel groups: where MoE-layer time went, imbalance, drops."""
    stats = _ep_stats(result)
    if not stats:
        return None
    scenario = result.loaded.scenario
    par = scenario.hardware.parallelism
    spec = scenario.policies.expert_parallel
    tables = expert_parallel_tables(result)
    assert tables is not None
    layers, device = tables
    routed = sum(st.routed_pairs for st in stats)
    it = result.iterations
    total = {c: float(layers[c].sum()) for c in
             ("attention_s", "gate_s", "shared_s", "expert_compute_s", "straggler_wait_s", "dispatch_s", "combine_s")}
    tok = device.drop(columns=["moe_layer"]).to_numpy()
    return {
        "dp": scenario.hardware.num_gpus // (par.ep * par.tp), "ep": par.ep, "tp": par.tp,
        "intra_node": scenario.hardware.topology.intra_node,
        # measured: the profile's NCCL table (busiest-port mapping, sim/engine/topology.py); link: bandwidth + latency.
        "collective_model": _collective_model(result, "all_to_all"),
        "all_reduce_model": _collective_model(result, "all_reduce") if par.tp > 1 else None,
        "placement": spec.placement.name, "redundant_experts": spec.placement.redundant_experts,
        "placement_recomputations": int(sum(r.planner.placement.recomputations for r in result.replicas)),
        "capacity": spec.capacity.name, "gamma": getattr(spec.capacity, "gamma", None),
        "overlap": spec.overlap.name + (f"-pos{spec.overlap.position}" if spec.overlap.name == "scmoe" else ""),
        "routed_pairs": int(routed),
        "dropped_fraction": sum(st.dropped_pairs for st in stats) / routed if routed else 0.0,
        "rerouted_fraction": sum(st.rerouted_pairs for st in stats) / routed if routed else 0.0,
        "dispatch_bytes": float(sum(st.dispatch_bytes for st in stats)),
        "totals_s": total,
        # Compute-stream seconds spent waiting for the links: the communication overlap did not hide.
        "exposed_comm_s": float(it["stall_s"].sum()) if len(it) else 0.0,
        "busy_s": float(it["duration_s"].sum()) if len(it) else 0.0,
        "mean_imbalance": float(layers["mean_imbalance"].mean()),
        "overall_imbalance": float((tok.max(axis=1) / np.maximum(tok.mean(axis=1), 1e-12)).mean()),
        # Faults on EP members (sim/engine/ep_faults.py): routing fidelity, rerouted / waiting fractions, stall.
        "failover": result.extra.get("faults", {}).get("expert_failover"),
    }
