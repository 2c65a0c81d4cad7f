"""``moesim tune SCENARIO``: the best offloading strategy, draft length, batch size and micro-batching.

SpecMoEOff's optimizer (PAPERS.md 2.4) fixes what is convex analytically and grid-searches the rest with a
profiling-based estimator. Here: every combination of the scenario's ``tune`` section (strategy x k x batch
x micro-batches) is first estimated by the roofline (``sim.roofline``, milliseconds each) and checked
against memory (a batch whose KV caches do not fit GPU or host memory is infeasible); then the
simulator runs the best estimate of every (strategy, k) pair -- the throughput curve over k -- and of every
(strategy, batch) pair, and the ``simulate_top`` next-best estimates within ``keep_estimate_ratio`` of the
best. The best simulated configuration wins. Results go to a folder (tune.csv, tune.json) and an HTML
report (``sim.report.tune_report``)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sim.engine.offload import plan_offload_memory
from sim.engine.simulation import build_request_table, simulate
from sim.engine.speculative import BREAKDOWN_COLUMNS, mean_emitted_tokens, read_run_lengths, resolve_draft_model
from sim.policies.offload_specs import EmpiricalAcceptance
from sim.errors import CapacityError, MoesimError, ScenarioError
from sim.roofline import estimate_decode, max_batch_in_memory
from sim.scenario import LoadedScenario, find_scenario, parse_scenario, read_yaml, resolve, set_key_path

_PIPELINED = {"moe_lightning", "specmoeoff"}


def strategy_settings(strategy: str, k: int, batch: int, micro_batches: int) -> dict[str, Any]:
    """Scenario key paths -> values that make one configuration."""
    offload: dict[str, Any] = {}
    if strategy in _PIPELINED:
        offload = {"attention": {"decode": "cpu"}, "stream_experts": "all", "micro_batches": micro_batches}
    elif strategy == "fiddler":
        offload = {"cpu_experts": True}
    return {
        "policies.offload": offload,
        "policies.batching.max_num_seqs": batch,
        "policies.speculative.draft_length": k if strategy == "specmoeoff" else 0,
    }


def configurations(loaded: LoadedScenario) -> list[dict[str, Any]]:
    tune = loaded.scenario.tune
    has_draft = loaded.scenario.policies.speculative is not None
    out = []
    for strategy in tune.strategies:
        ks = tune.draft_lengths if strategy == "specmoeoff" else [0]
        if strategy == "specmoeoff" and not has_draft:
            raise ScenarioError(f"{loaded.source}: tune.strategies: specmoeoff needs policies.speculative (a draft model "
                                f"and acceptance)")
        ms = tune.micro_batches if strategy in _PIPELINED else [1]
        for k in ks:
            for batch in tune.batch_sizes:
                for m in ms:
                    out.append({"strategy": strategy, "k": int(k), "batch": int(batch), "micro_batches": int(m)})
    return out


def _variant(data: dict[str, Any], source: str, base_dir: Path, config: dict[str, Any], max_requests: int) -> LoadedScenario:
    point = copy.deepcopy(data)
    point.pop("sweep", None)
    for key, value in strategy_settings(config["strategy"], config["k"], config["batch"], config["micro_batches"]).items():
        if key.startswith("policies.speculative") and not (point.get("policies") or {}).get("speculative"):
            continue  # no draft model: plain decoding
        set_key_path(point, key, value, source, section="tune")
    set_key_path(point, "workload.max_requests", max(max_requests, config["batch"]), source, section="tune")
    label = ", ".join(f"{k}={v}" for k, v in config.items())
    try:
        return resolve(parse_scenario(point, source), source, base_dir)
    except ScenarioError as exc:
        raise ScenarioError(f"{exc} [tune configuration {label}]") from None


def estimate(loaded: LoadedScenario, config: dict[str, Any], prompt: float, output: float) -> dict[str, Any]:
    """Roofline estimate and memory check of one configuration (no simulation)."""
    sc = loaded.scenario
    spec = sc.policies.speculative
    draft = resolve_draft_model(spec, loaded.source) if spec is not None and config["k"] > 0 else None
    row: dict[str, Any] = {**config}
    try:
        budget = plan_offload_memory(loaded, draft, pipelined=sc.policies.offload.active)
    except CapacityError as exc:
        return {**row, "infeasible": str(exc)}
    kv_tokens = budget.kv_blocks * budget.kv_block_tokens
    fits = max_batch_in_memory(loaded.model, kv_tokens * loaded.model.kv_bytes_per_token, prompt, output)
    row["max_batch_in_memory"] = fits
    if fits < config["batch"]:
        where = "host" if budget.kv_on_host else "GPU"
        return {**row, "infeasible": f"the KV cache ({where}) holds {fits} requests of {prompt + output:.0f} tokens, "
                                     f"fewer than the batch of {config['batch']}"}
    off = sc.policies.offload
    draft_profile = loaded.host_profile if spec is not None and spec.draft_placement == "cpu" else loaded.profile
    emitted = 1.0
    if spec is not None:
        runs = (read_run_lengths(spec.acceptance, loaded.base_dir, loaded.source)
                if isinstance(spec.acceptance, EmpiricalAcceptance) else None)
        emitted = mean_emitted_tokens(spec.acceptance, config["k"], sc.workload.tasks, run_lengths=runs)
    est = estimate_decode(
        model=loaded.model, profile=loaded.profile, host=loaded.host_profile, batch=config["batch"],
        context_tokens=prompt + output / 2.0, draft_length=config["k"], emitted_per_step=emitted,
        micro_batches=config["micro_batches"], attention_decode=off.attention.decode, cpu_experts=off.cpu_experts,
        resident_experts=budget.expert_slots, stream_all=off.stream_experts == "all", draft=draft,
        draft_profile=draft_profile, cpu_chunked=off.cpu_attention_kernel == "chunked",
        draft_kv_gpu_fraction=spec.draft_kv_gpu_fraction if spec is not None else 1.0,
    )
    return {**row, "infeasible": "", "estimate_tokens_per_s": est.throughput_tokens_per_s,
            "estimate_iteration_s": est.iteration_s, "estimate_bound": est.bound}


def _simulate_row(loaded: LoadedScenario) -> dict[str, Any]:
    from sim.metrics import summarize

    started = time.perf_counter()
    result = simulate(loaded)
    summary = summarize(result)
    it = result.iterations
    decode = it[it["num_prefill_seqs"] == 0] if len(it) else it
    out: dict[str, Any] = {
        "sim_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
        "sim_tpot_p50_s": summary["latency"]["tpot_p50_s"],
        "sim_iterations": len(it),
        "sim_wall_s": time.perf_counter() - started,
    }
    if len(decode) and "emitted_tokens" in decode:
        out["sim_emitted_per_seq_step"] = float(decode["emitted_tokens"].sum() / max(1, decode["num_decode_seqs"].sum()))
        out["sim_decode_iteration_s"] = float(decode["duration_s"].mean())
        for col in (*BREAKDOWN_COLUMNS, "draft_s"):
            out[f"iter_{col}"] = float(decode[col].mean())
    return out


def run_tune(path: str | Path, out_dir: Path, *, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Estimate every configuration, simulate the chosen ones, write tune.csv / tune.json; return the result."""
    import pandas as pd

    file = find_scenario(path)
    data = read_yaml(file)
    source = str(path)
    base = resolve(parse_scenario(copy.deepcopy(data), source), source, file.parent)
    tune = base.scenario.tune
    table = build_request_table(base, np.random.default_rng(np.random.SeedSequence(base.scenario.workload.seed).spawn(2)[0]))
    if not len(table):
        raise MoesimError(f"{source}: workload: no requests to tune for")
    prompt, output = float(np.mean(table.prompt_tokens)), float(np.mean(table.output_tokens))
    started = time.perf_counter()
    rows, variants = [], []
    for config in configurations(base):
        variant = _variant(data, source, file.parent, config, tune.max_requests)
        variants.append(variant)
        rows.append(estimate(variant, config, prompt, output))
    frame = pd.DataFrame(rows)
    estimate_wall_s = time.perf_counter() - started
    feasible = frame[frame["infeasible"] == ""] if "infeasible" in frame else frame
    if not len(feasible):
        raise MoesimError(f"{source}: tune: no configuration fits memory; first reason: {rows[0]['infeasible']}")
    # What to simulate: the best estimate per (strategy, k) and per (strategy, batch), then the next best.
    chosen: list[int] = []
    for keys in (["strategy", "k"], ["strategy", "batch"]):
        for _, group in feasible.groupby(keys, sort=False):
            chosen.append(int(group["estimate_tokens_per_s"].idxmax()))
    best_estimate = float(feasible["estimate_tokens_per_s"].max())
    extra = feasible[feasible["estimate_tokens_per_s"] >= tune.keep_estimate_ratio * best_estimate]
    for index in extra.sort_values("estimate_tokens_per_s", ascending=False).index[: tune.simulate_top]:
        chosen.append(int(index))
    chosen = sorted(set(chosen))
    frame["simulated"] = False
    sim_rows: dict[int, dict[str, Any]] = {}
    for n, index in enumerate(chosen, 1):
        config = {k: rows[index][k] for k in ("strategy", "k", "batch", "micro_batches")}
        log(f"[{n}/{len(chosen)}] simulating {config}")
        try:
            sim_rows[index] = _simulate_row(variants[index])
        except CapacityError as exc:
            sim_rows[index] = {"sim_error": str(exc)}
        frame.loc[index, "simulated"] = True
    sims = pd.DataFrame.from_dict(sim_rows, orient="index")
    frame = frame.join(sims)
    best_row = frame.loc[frame["sim_tokens_per_s"].idxmax()] if "sim_tokens_per_s" in frame and frame["sim_tokens_per_s"].notna().any() else None
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "tune.csv", index=False)
    result = {
        "scenario": base.scenario.name,
        "source": source,
        "model": base.model.name,
        "profile": base.profile.name,
        "host_profile": base.host_profile.name if base.host_profile is not None else None,
        "mean_prompt_tokens": prompt,
        "mean_output_tokens": output,
        "configurations": len(rows),
        "simulated": len(chosen),
        "estimate_wall_s": estimate_wall_s,
        "wall_s": time.perf_counter() - started,
        "best": None if best_row is None else {k: _plain(v) for k, v in best_row.items()},
        "table": [{k: _plain(v) for k, v in r.items()} for r in frame.to_dict(orient="records")],
    }
    tmp = out_dir / "tune.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out_dir / "tune.json")
    return result


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


__all__ = ["run_tune", "configurations", "estimate", "strategy_settings"]
