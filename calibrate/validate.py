"""``moesim validate``: run a scenario for real on the CPU runtime and compare the simulator against it.

Steps, back to back (NOTES-CPU-MEASUREMENT: calibrate and run together on a noisy machine):

1. calibrate this machine for the scenario's exact model shapes (``calibrate.measure`` / ``calibrate.fit``),
   or take ``--profile``;
2. serve the scenario's requests with ``calibrate.runtime`` (real GEMMs, real copies, real batching);
3. write the runtime's request table as a CSV trace and its observed routing as a Parquet routing trace,
   and simulate the same scenario with those arrivals, that routing and the profile;
4. compare per request (e2e, TTFT, TPOT: absolute percentage error, median and P95), throughput, cache
   hits and misses, and the per-iteration time breakdown; write CSVs, ``summary.json`` and ``report.html``.

The exit code is 1 when a bound is exceeded. Bounds (issue #8): median |e2e error| <= 5%, P95 <= 15%,
throughput error <= 5%, identical hit, miss and prefetch-hit counts on the runtime's batches.

``--quick`` (CI, < 3 minutes on 2 cores with its calibration): a short calibration (``QUICK_CALIBRATION``,
two overhead rounds) and the scenario's first 16 requests; bounds median e2e <= 15%, P95 <= 40%,
throughput <= 10%, and the same identical counts. Why these: a quick calibration takes 6 repeats per point
instead of 15 (its table entries carry a few % more noise), 16 requests make the P95 one request's error,
and a CI runner is as shared as this box; they still fail when the model misses an effect (leaving out
copy time or the overhead terms moves the medians by 30-70% on these scenarios), and decision counts
are exact."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from calibrate.errors import CalibrationError
from calibrate.timing import Budget
from calibrate.validate_report import error_structure, plan_breakdown, request_service
from sim.report.validation import BREAKDOWN


@dataclass(frozen=True, slots=True)
class Bounds:
    median_e2e_ape: float
    p95_e2e_ape: float
    throughput_error: float


FULL_BOUNDS = Bounds(median_e2e_ape=0.05, p95_e2e_ape=0.15, throughput_error=0.05)
QUICK_BOUNDS = Bounds(median_e2e_ape=0.15, p95_e2e_ape=0.40, throughput_error=0.10)
# --quick: a short calibration (fewer repeats, two overhead rounds) and the scenario's first requests only.
QUICK_CALIBRATION = Budget(max_repeats=6, time_s=0.05, rounds=2)
QUICK_OVERHEAD_ROUNDS = 2
QUICK_MAX_REQUESTS = 16
# The full validation serves the requests this many times and judges the median run: the runtime does not
# repeat itself on a shared machine (its memory bandwidth drifts by 10-25% over seconds, see README).
FULL_REPEATS = 3


@dataclass
class ValidationResult:
    scenario: str
    profile: str
    metrics: dict[str, Any]
    failures: list[str]
    folder: Path
    comparison: pd.DataFrame
    runtime_iterations: pd.DataFrame
    sim_iterations: pd.DataFrame
    same_batch: pd.DataFrame  # runtime iterations with the planner's prediction of each (``replay_batches``)
    routers: str = "seeded"  # which routers the runtime's gates used (``TinyMoE.router_source``)
    prompts: str = "random"  # the runtime's prompt tokens (``Runtime``)
    time_scale: float = 1.0  # arrival (and think) times stretched by this for both sides (``--time-scale``)

    @property
    def passed(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------- calibration for the runtime's shapes


def calibration_tasks(spec: Any, *, threads: int = 1, device: str = "cpu") -> list[Any]:
    """The quick plan for ``spec`` plus what the quick plan skips but the runtime runs: every attention
    projection shape, the LM head and a copy of exactly one expert."""
    from calibrate.measure import QUICK_GEMM_TOKENS, Task, _dedup, build_plan, is_concurrent

    # The runtime runs one expert per call at the calibration's thread count, and one copy at a time: no grouped,
    # other-thread or concurrent-copy points.
    tasks = [t for t in build_plan([spec], quick=True, device=device, threads=threads, dtypes=["bf16"])
             if t.op != "grouped_expert_ffn" and t.threads == threads and not is_concurrent(t)]
    for g in (*spec.attention_projection_shapes, spec.lm_head_shape):
        for t in QUICK_GEMM_TOKENS:
            tasks.append(Task.of("dense_gemm", "bf16", threads, in_features=g.in_features,
                                 out_features=g.out_features, tokens=t))
    copy = {"op": "h2d_copy", "pinned": 1} if device == "cuda" else {"op": "host_copy"}
    tasks.append(Task.of(copy.pop("op"), "bf16", threads, nbytes=int(spec.expert_bytes), **copy))
    return _dedup(tasks)


def calibrate_for(spec: Any, out: Path, *, threads: int = 1, budget: Any = None, progress: bool = False,
                  overheads: bool = True, overhead_rounds: int = 5, device: str = "cpu") -> Path:
    """Measure ``spec``'s shapes on this CPU and write the profile ``out`` (points next to it).

    With ``overheads`` (default) the profile also gets ``layer_overhead``, ``expert_overhead``,
    ``iteration_overhead`` and ``load_interference`` (compute time each expert load adds beside it)
    measured on the runtime (``calibrate.overhead``)."""
    import torch

    from calibrate.cli import points_path_for, write_profile
    from calibrate.environment import collect_environment, load_average
    from calibrate.measure import read_points, run_tasks
    from calibrate.timing import Budget

    torch.set_num_threads(threads)
    env = json.loads(json.dumps(collect_environment(device, threads), default=str))  # plain types, as the CLI stores it
    points_path = points_path_for(out)
    device_name = str(env.get("gpu_name") if device == "cuda" else env["cpu_model"])
    run_tasks(calibration_tasks(spec, threads=threads, device=device), points_path, device=device, device_name=device_name,
              budget=budget or Budget(max_repeats=15, time_s=0.3), progress=progress, fresh=True)
    env["load_average_at_end"] = list(load_average())
    note = {"note": f"moesim validate: shapes of {spec.name}"}
    write_profile(read_points(points_path), env, out=out, name=out.stem, threads=threads, points_path=points_path,
                  quiet=True, extra_provenance=note)
    if overheads:
        # What the kernel tables leave out (norms, KV writes, router output, cache bookkeeping, gather /
        # scatter, Python), measured on the runtime itself against the kernels-only profile just written.
        from calibrate.overhead import measure_overheads
        from sim.profile import load_profile

        ops, prov = measure_overheads(spec, load_profile(out), threads=threads, rounds=overhead_rounds,
                                      fit_kernel_scale=True, device=device)
        env["load_average_at_end"] = list(load_average())
        write_profile(read_points(points_path), env, out=out, name=out.stem, threads=threads, points_path=points_path,
                      quiet=True, extra_provenance={**note, "overheads": prov}, extra_operations=ops)
        if device == "cpu":  # on CUDA the calibrated h2d link is the copy stream's own (no copy thread to wake)
            set_copy_link_from_runtime(spec, out, threads=threads, rounds=max(1, overhead_rounds // 2))
    return out


def set_copy_link_from_runtime(spec: Any, profile_path: Path, *, threads: int = 1, rounds: int = 2) -> dict[str, Any]:
    """Replace the profile's ``links.host_to_device`` (a copy timed alone) by the link measured on the runtime's
    copy thread beside compute (``calibrate.runtime.copy_link``); the isolated figures stay in the provenance."""
    from calibrate.runtime.copy_link import measure_copy_link
    from sim.profile import parse_profile

    link = measure_copy_link(spec, threads=threads, rounds=rounds)
    text = profile_path.read_text(encoding="utf-8")
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    data = yaml.safe_load(text)
    h2d = data["links"]["host_to_device"]
    isolated = {"bandwidth_gbps": h2d["bandwidth_gbps"], "latency_s": h2d["latency_s"]}
    h2d["bandwidth_gbps"], h2d["latency_s"] = link["bandwidth_gbps"], link["latency_s"]
    data.setdefault("provenance", {})["copy_link"] = {**link["provenance"], "isolated_copy": isolated}
    out = header + yaml.safe_dump(data, sort_keys=False, width=120)
    parse_profile(out, origin=str(profile_path))
    profile_path.write_text(out, encoding="utf-8")
    return link


# ---------------------------------------------------------------- the machine's speed over the validation


def speed_probe(spec: Any, *, threads: int = 1, time_s: float = 0.6, device: str = "cpu") -> float:
    """Median seconds of one fixed piece of the runtime's work: ``spec``'s expert FFN at 1, 4 and 16 tokens over
    cold rotating weights (memory-bound, as serving is), one call of each per sample.

    Taken right after the calibration and before and after each served run: the ratio says how much faster or
    slower the machine ran while serving than when the profile was measured, which on a shared VM explains a
    simulator that is off on the very batches the runtime ran (``same_batch_total_time_bias``)."""
    import torch

    from calibrate.measure import Task, _make_call
    from calibrate.timing import sample

    shape = spec.expert_shape
    bufs: dict[str, Any] = {}
    calls = [_make_call(Task.of("expert_ffn", "bf16", threads, hidden=shape.hidden, ffn=shape.ffn,
                                num_matrices=3, tokens=t), bufs, device) for t in (1, 4, 16)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            samples = sample(lambda i: [call(i) for call in calls], warmup=2, min_repeats=5, max_repeats=200,
                             time_s=time_s, cuda=device == "cuda")
    finally:
        torch.set_num_threads(previous)
    return float(np.median(samples))


def probe_change(probe_s: dict[str, float]) -> dict[str, float]:
    """Each probe after the calibration's, as a relative change (+ = the machine ran slower than at calibration)."""
    base = probe_s["calibration"]
    return {k: v / base - 1.0 for k, v in probe_s.items() if k != "calibration"}


# ---------------------------------------------------------------- the simulator's replay of a run


def replay_scenario(loaded: Any, table: Any, recorder: Any, profile_path: Path, folder: Path) -> Any:
    """The scenario with the run's arrivals (CSV trace), the runtime's routing (Parquet) and ``profile_path``.

    A closed loop stays a closed loop, with the same clients and the same think times (drawn ones too), sending
    the CSV's requests in order: the simulator decides its own arrival times from its own answers, as the
    runtime did."""
    from sim.scenario import parse_scenario, resolve

    model = loaded.model
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "arrival_s": np.asarray(table.arrival_s), "prompt_tokens": np.asarray(table.prompt_tokens),
        "output_tokens": np.asarray(table.output_tokens),
    }).to_csv(folder / "arrivals.csv", index=False)
    # The runtime's observed routing, in the canonical format; the simulator replays this file.
    recorder.write_routing_trace(folder / "routing.parquet", model.name, model.num_experts)
    data = loaded.scenario.model_dump(mode="json")
    data["hardware"]["profile"] = str(profile_path.resolve())
    trace = {
        "path": "arrivals.csv", "format": "csv", "time_unit": "s", "time_origin": "trace",
        "columns": {"arrival": "arrival_s", "prompt_tokens": "prompt_tokens", "output_tokens": "output_tokens"},
    }
    if table.closed_loop is None:
        data["workload"]["arrivals"] = {"kind": "trace", **trace}
    else:  # the runtime's own think times, as the table has them (drawn, and stretched by --time-scale)
        loop = table.closed_loop
        data["workload"]["arrivals"] = {"kind": "closed_loop", "clients": loop.clients,
                                        "think_times_s": [float(t) for t in loop.think_s], "requests": trace}
    data["workload"]["routing"] = {"kind": "replay", "path": "routing.parquet"}
    data["workload"]["max_requests"] = None
    data["workload"]["max_duration_s"] = None
    data["sweep"] = {"axes": {}}
    # Written beside arrivals.csv and routing.parquet: `moesim simulate FOLDER/replay-scenario.yaml` reruns the
    # simulator's side of the comparison.
    source = folder / "replay-scenario.yaml"
    source.write_text(yaml.safe_dump(data, sort_keys=False, width=120), encoding="utf-8")
    return resolve(parse_scenario(data, str(source)), str(source), folder)


def needs_oracle(loaded: Any) -> bool:
    prefetch = loaded.scenario.policies.prefetch
    return prefetch.name == "next_layer" and getattr(prefetch, "predictor", "oracle") == "oracle"


def record_oracle_routing(loaded: Any, table: Any, folder: Path, *, seed: int, routers: str = "auto",
                          prompts: str = "random", device: str = "cpu") -> dict[int, np.ndarray]:
    """The routing an oracle prefetcher knows in advance: a first, untimed pass over the same requests
    (every expert resident, no prefetch, all arriving at once), written as ``oracle-routing.parquet`` in the
    canonical format and read back by request id. The measured run's gates follow it (``Runtime``)."""
    from calibrate.runtime.server import Runtime
    from sim.scenario import parse_scenario, resolve
    from sim.workload.routing_trace import read_routing_trace

    data = loaded.scenario.model_dump(mode="json")
    data["hardware"]["expert_memory"] = {"all": True}
    data["policies"]["expert_cache"] = {"name": "all_resident"}
    data["policies"]["prefetch"] = {"name": "none"}
    data["sweep"] = {"axes": {}}
    first = resolve(parse_scenario(data, loaded.source), loaded.source, loaded.base_dir)
    runtime = Runtime(first, seed=seed, routers=routers, prompts=prompts, device=device)
    recorder = runtime.serve(table, time_scale=0.0)
    path = recorder.write_routing_trace(folder / "oracle-routing.parquet", loaded.model.name, loaded.model.num_experts)
    return {s.request_id: s.experts for s in read_routing_trace(path, gates=False).sequences}


# ---------------------------------------------------------------- comparison


def _ape(sim: pd.Series, real: pd.Series) -> pd.Series:
    return ((sim - real) / real).abs()


def compare(real_req: pd.DataFrame, sim_req: pd.DataFrame, real_it: pd.DataFrame, sim_it: pd.DataFrame
            ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Per-request errors and run-level agreement; the merged per-request table.

    ``arrived_at_s`` is the runtime's arrival, ``arrived_at_s_sim`` the simulator's: the same in an open loop, each
    side's own in a closed loop (a request is sent when an earlier one is answered there)."""
    cols = ["request_id", "arrived_at_s", "prompt_tokens", "output_tokens", "ttft_s", "e2e_s", "tpot_s", "finished_at_s"]
    sim_side = sim_req[["request_id", "arrived_at_s", *cols[4:]]].rename(columns={"arrived_at_s": "arrived_at_s_sim"})
    merged = real_req[cols].merge(sim_side, on="request_id", suffixes=("_real", "_sim"))
    metrics: dict[str, Any] = {"num_requests": int(len(merged))}
    for m in ("e2e", "ttft", "tpot"):
        ape = _ape(merged[f"{m}_s_sim"], merged[f"{m}_s_real"]).dropna()
        merged[f"{m}_ape"] = _ape(merged[f"{m}_s_sim"], merged[f"{m}_s_real"])
        metrics[f"{m}_ape_median"] = float(ape.median()) if len(ape) else float("nan")
        metrics[f"{m}_ape_p95"] = float(ape.quantile(0.95)) if len(ape) else float("nan")
        metrics[f"{m}_bias_median"] = float(((merged[f"{m}_s_sim"] - merged[f"{m}_s_real"]) / merged[f"{m}_s_real"]).median())

    def throughput(frame: pd.DataFrame, arrived: str, finished: str) -> float:
        span = float(frame[finished].max() - frame[arrived].min())
        return float(frame["output_tokens"].sum()) / span

    real_tp = throughput(merged, "arrived_at_s", "finished_at_s_real")
    sim_tp = throughput(merged, "arrived_at_s_sim", "finished_at_s_sim")
    metrics.update(throughput_real_tok_s=real_tp, throughput_sim_tok_s=sim_tp,
                   throughput_error=abs(sim_tp - real_tp) / real_tp)
    metrics.update(
        hits_real=int(real_it["expert_hits"].sum()), hits_sim=int(sim_it["expert_hits"].sum()),
        misses_real=int(real_it["expert_misses"].sum()), misses_sim=int(sim_it["expert_misses"].sum()),
        iterations_real=int(len(real_it)), iterations_sim=int(len(sim_it)),
        mean_iteration_real_s=float(real_it["duration_s"].mean()), mean_iteration_sim_s=float(sim_it["duration_s"].mean()),
    )
    breakdown = {c: float(real_it[c].sum()) for c in ("attention_s", "gate_s", "expert_compute_s", "load_wait_s",
                                                     "copy_busy_s", "copy_dispatch_s", "lm_head_s", "other_s",
                                                     "duration_s")}
    breakdown_sim = {c: float(sim_it[c].sum()) for c in ("compute_busy_s", "stall_s", "copy_busy_s", "duration_s")}
    metrics["breakdown_real_s"] = breakdown
    metrics["breakdown_sim_s"] = breakdown_sim
    return metrics, merged


def replay_batches(replay: Any, recorder: Any) -> pd.DataFrame:
    """The simulator's planner fed exactly the runtime's batches and routing, iteration by iteration:
    its cache decisions (hits, misses) and its predicted duration of each real iteration.

    This separates the cost model from queueing feedback: in the free-running replay a different iteration time
    changes how requests are batched, and so the routing each iteration sees and the hit counts."""
    from sim.engine.iteration import BatchShape, IterationPlanner, time_plan
    from sim.policies.cache import make_cache
    from sim.workload.routing import RecordedSequence, ReplayedRouting
    from sim.workload.routing_trace import read_routing_trace

    model, policies = replay.model, replay.scenario.policies
    from sim.engine.memory import plan_memory

    budget = plan_memory(replay)
    cache_spec = policies.expert_cache
    cache = make_cache(cache_spec.name, num_layers=model.num_moe_layers, num_experts=model.num_experts,
                       capacity_experts=budget.expert_slots,
                       per_layer=getattr(cache_spec, "scope", "global") == "per_layer")
    planner = IterationPlanner(model=model, profile=replay.profile, cache=cache, prefetch=policies.prefetch.name,
                               prefetch_predictor=getattr(policies.prefetch, "predictor", "oracle"),
                               prefetch_max_experts=getattr(policies.prefetch, "max_experts", None))
    # The routing trace file the runtime wrote (what the free-running replay reads too), by request id.
    trace = {s.request_id: s.experts for s in read_routing_trace(replay.base_dir / "routing.parquet", gates=False).sequences}
    sequences = [RecordedSequence(str(i), trace[i]) for i in range(max(trace) + 1)]
    routing = ReplayedRouting(sequences, model.num_experts)
    rows = []
    for batch in recorder.batches:
        pre = [(pos, n) for _, pos, n, is_prefill, _ in batch if is_prefill]
        shape = BatchShape(
            prefill_new_tokens=np.asarray([n for _, n in pre], dtype=np.int64),
            prefill_context_tokens=np.asarray([p for p, _ in pre], dtype=np.int64),
            decode_context_tokens=np.asarray([pos for _, pos, _, is_prefill, _ in batch if not is_prefill], dtype=np.int64),
            num_emitting=sum(1 for *_, emits in batch if emits),
        )
        counts = routing.counts([(r, pos, n) for r, pos, n, _, _ in batch])
        plan = planner.plan(shape, counts)
        timing = time_plan(plan)
        split = plan_breakdown(planner, plan, timing, shape, counts)
        rows.append((timing.duration_s, timing.compute_busy_s, timing.stall_s, timing.copy_busy_s, plan.hits,
                     plan.misses, plan.prefetch_hits, len(plan.load_s), *(split[c] for c in BREAKDOWN)))
    return pd.DataFrame(rows, columns=["predicted_s", "predicted_compute_s", "predicted_stall_s", "predicted_copy_s",
                                       "hits", "misses", "prefetch_hits", "loads", *(f"sim_{c}" for c in BREAKDOWN)])


def same_batch_metrics(real_it: pd.DataFrame, planned: pd.DataFrame) -> dict[str, Any]:
    ape = ((planned["predicted_s"] - real_it["duration_s"]) / real_it["duration_s"]).abs()
    bias = (planned["predicted_s"].sum() - real_it["duration_s"].sum()) / real_it["duration_s"].sum()
    quarters = pd.qcut(real_it["started_at_s"], 4, labels=False, duplicates="drop") if len(real_it) >= 8 else None
    by_quarter = [] if quarters is None else [
        float(planned["predicted_s"][quarters == q].sum() / real_it["duration_s"][quarters == q].sum() - 1.0)
        for q in sorted(set(quarters))]
    return {
        "same_batch_bias_by_quarter": by_quarter,
        "same_batch_iteration_ape_median": float(ape.median()), "same_batch_iteration_ape_p95": float(ape.quantile(0.95)),
        "same_batch_total_time_bias": float(bias),
        "same_batch_hits_real": int(real_it["expert_hits"].sum()), "same_batch_hits_sim": int(planned["hits"].sum()),
        "same_batch_misses_real": int(real_it["expert_misses"].sum()),
        "same_batch_misses_sim": int(planned["misses"].sum()),
        "same_batch_prefetch_hits_real": int(real_it["prefetch_hits"].sum()),
        "same_batch_prefetch_hits_sim": int(planned["prefetch_hits"].sum()),
        "same_batch_iterations_with_other_decisions": int(
            ((planned["hits"].to_numpy() != real_it["expert_hits"].to_numpy())
             | (planned["misses"].to_numpy() != real_it["expert_misses"].to_numpy())
             | (planned["prefetch_hits"].to_numpy() != real_it["prefetch_hits"].to_numpy())).sum()),
    }


ERROR_KEYS: tuple[str, ...] = ("e2e_ape_median", "e2e_ape_p95", "throughput_error")


def check_bounds(metrics: dict[str, Any], bounds: Bounds) -> list[str]:
    return error_failures(metrics, bounds) + count_failures(metrics)


def error_failures(values: dict[str, float], bounds: Bounds) -> list[str]:
    """The latency and throughput bounds (``ERROR_KEYS``) that ``values`` exceed."""
    failures = []
    for key, bound in zip(ERROR_KEYS, (bounds.median_e2e_ape, bounds.p95_e2e_ape, bounds.throughput_error)):
        value = values[key]
        if not (value <= bound):
            failures.append(f"{key} {value:.1%} > {bound:.0%}")
    return failures


def count_failures(metrics: dict[str, Any]) -> list[str]:
    """Hit, miss and prefetch-hit counts that differ on the runtime's own batches: in the free-running replay they agree
    only when the timing does (other iteration times -> other batches -> other routing per iteration)."""
    failures = []
    for kind in ("hits", "misses", "prefetch_hits"):
        real, sim = metrics[f"same_batch_{kind}_real"], metrics[f"same_batch_{kind}_sim"]
        if real != sim:
            failures.append(f"{kind} on the runtime's batches: runtime {real} != simulator {sim}")
    return failures


def run_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """One run's verdict figures, as ``summary.json`` lists them for repeated runs."""
    keys = (*ERROR_KEYS, "e2e_bias_median", "same_batch_total_time_bias", "iterations_real", "iterations_sim")
    return {**{k: metrics[k] for k in keys}, "speed_probe_change": metrics.get("speed_probe_change")}


# ---------------------------------------------------------------- the whole validation


def validate(scenario: str | Path, *, profile: str | Path | None = None, quick: bool = False,
             out: Path | None = None, calibration_budget: Any = None, max_requests: int | None = None,
             progress: bool = False, log: Any = None, routers: str = "auto", prompts: str = "random",
             repeats: int = 1, device: str = "cpu", time_scale: float = 1.0) -> ValidationResult:
    """Calibrate (unless ``profile``), run the runtime, simulate the replay, compare. See the module docstring.

    ``routers`` (``calibrate.runtime.routers``): "auto" (default) routes with the shipped trained routers when
    they match the scenario's model and seed, else the seeded ones; "trained" or "seeded" force one.
    ``prompts``: "random" (default) token ids or "text" (held-out standard-library source bytes).
    ``repeats``: serve the same requests this many times (one calibration), compare the simulator with each run
    (``run-K/`` folders) and judge the bounds on the median over runs of each error; hit counts must agree
    in every run. The result is the median run's (by median e2e error), with every run in its metrics.
    ``device``: "cpu", or "cuda" (calibration, runtime and probe on the GPU; needs one).
    ``time_scale``: stretch the arrival times (and a closed loop's think times) by this, for the runtime and the
    simulator alike (2 halves the load)."""
    from sim.engine.simulation import build_request_table
    from sim.scenario import load_scenario

    from calibrate.runtime.server import check_device

    if repeats < 1:
        raise CalibrationError(f"repeats: expected at least 1, got {repeats}")
    if not 0 < time_scale < float("inf"):
        raise CalibrationError(f"time_scale: expected a number above 0, got {time_scale}")
    check_device(device)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    loaded = load_scenario(scenario)
    name = loaded.scenario.name
    folder = Path(out) if out else Path("reports") / f"validate-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    if quick:
        calibration_budget = calibration_budget or QUICK_CALIBRATION
        max_requests = max_requests or QUICK_MAX_REQUESTS
    if profile is None:
        t = time.perf_counter()
        profile_path = calibrate_for(loaded.model, folder / "profile.yaml", budget=calibration_budget, progress=progress,
                                     overhead_rounds=QUICK_OVERHEAD_ROUNDS if quick else 5, device=device)
        say(f"calibrated {loaded.model.name}'s shapes in {time.perf_counter() - t:.0f} s -> {profile_path}")
    else:
        from sim.profile import load_profile

        p = Path(profile)
        profile_path = p if p.exists() else None  # a shipped name: resolve gives its path below
        if profile_path is None:
            load_profile(str(profile))  # raises ProfileError naming the choices
            import sim.data.profiles as shipped

            profile_path = Path(shipped.__file__).parent / f"{profile}.yaml"
    seeds = np.random.SeedSequence(loaded.scenario.workload.seed).spawn(2)
    table = build_request_table(loaded, np.random.default_rng(seeds[0]))
    if max_requests is not None:
        table = table.limit(max_requests=max_requests)
    if time_scale != 1.0:
        table = table.scale_rate(1.0 / time_scale)
    seed = loaded.scenario.workload.seed
    oracle = None
    if needs_oracle(loaded):
        t = time.perf_counter()
        oracle = record_oracle_routing(loaded, table, folder, seed=seed, routers=routers, prompts=prompts, device=device)
        say(f"recorded the oracle prefetcher's routing in a first pass in {time.perf_counter() - t:.1f} s")
    bounds = QUICK_BOUNDS if quick else FULL_BOUNDS
    # The machine's speed as the calibration just saw it (a given profile was measured at another time: no probes).
    calibration_probe_s = speed_probe(loaded.model, device=device) if profile is None else None
    runs = []
    for k in range(repeats):
        run_folder = folder if repeats == 1 else folder / f"run-{k + 1}"
        if repeats > 1:
            say(f"run {k + 1} of {repeats}")
        runs.append(serve_and_compare(loaded, table, profile_path, run_folder, scenario=str(scenario), seed=seed,
                                      oracle=oracle, routers=routers, prompts=prompts, quick=quick, bounds=bounds,
                                      say=say, calibration_probe_s=calibration_probe_s, device=device,
                                      time_scale=time_scale))
    if repeats == 1:
        return runs[0]
    return median_run(runs, bounds, folder, quick=quick)


def median_run(runs: list[ValidationResult], bounds: Bounds, folder: Path, *, quick: bool) -> ValidationResult:
    """Repeated runs judged together: the bounds on the median over runs of each error, the hit counts in
    every run; the result is the median run (by median e2e error), written to ``folder`` (summary, report)."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].metrics["e2e_ape_median"])
    chosen = runs[order[len(runs) // 2]]
    medians = {k: float(np.median([r.metrics[k] for r in runs])) for k in ERROR_KEYS}
    failures = error_failures(medians, bounds)
    for i, r in enumerate(runs):
        failures += [f"run {i + 1}: {f}" for f in count_failures(r.metrics)]
    summaries = [{"run": i + 1, "folder": str(r.folder), **run_summary(r.metrics)} for i, r in enumerate(runs)]
    metrics = {**chosen.metrics, "repeats": {"median_run": order[len(runs) // 2] + 1, "runs": summaries,
                                             "median_over_runs": medians}}
    vr = ValidationResult(scenario=chosen.scenario, profile=chosen.profile, metrics=metrics, failures=failures,
                          folder=folder, comparison=chosen.comparison, runtime_iterations=chosen.runtime_iterations,
                          sim_iterations=chosen.sim_iterations, same_batch=chosen.same_batch, routers=chosen.routers,
                          prompts=chosen.prompts, time_scale=chosen.time_scale)
    chosen.comparison.to_csv(folder / "comparison.csv", index=False)  # `moesim report FOLDER` renders the median run
    write_outcome(vr, bounds, quick=quick)
    return vr


def write_outcome(vr: ValidationResult, bounds: Bounds, *, quick: bool) -> None:
    """``summary.json`` (verdict, bounds, every metric) and ``report.html`` in the result's folder."""
    summary = {"scenario": vr.scenario, "profile": vr.profile, "routers": vr.routers, "prompts": vr.prompts,
               "time_scale": vr.time_scale, "quick": quick, "bounds": asdict(bounds), "passed": vr.passed,
               "failures": vr.failures, "metrics": vr.metrics}
    (vr.folder / "summary.json").write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
    from sim.report.render import render_validation_report

    render_validation_report(vr.folder)  # report.html, from the files just written (as `moesim report` does)


def serve_and_compare(loaded: Any, table: Any, profile_path: Path, folder: Path, *, scenario: str, seed: int,
                      oracle: dict[int, np.ndarray] | None, routers: str, prompts: str, quick: bool, bounds: Bounds,
                      say: Any, calibration_probe_s: float | None = None, device: str = "cpu",
                      time_scale: float = 1.0) -> ValidationResult:
    """One run: serve ``table`` on the runtime, simulate its replay, compare; write the tables, ``summary.json``
    and ``report.html`` to ``folder``."""
    from calibrate.environment import load_average
    from calibrate.runtime.server import Runtime
    from sim.engine.simulation import simulate

    folder.mkdir(parents=True, exist_ok=True)
    probe_s = {"calibration": calibration_probe_s} if calibration_probe_s else {}
    runtime = Runtime(loaded, seed=seed, oracle_routing=oracle, routers=routers, prompts=prompts, device=device)
    say(f"routers: {runtime.model.router_source}; prompts: {prompts}")
    if probe_s:
        probe_s["before_serving"] = speed_probe(loaded.model, device=device)
    t = time.perf_counter()
    load_before = list(load_average())
    recorder = runtime.serve(table)
    load_after = list(load_average())
    if probe_s:
        probe_s["after_serving"] = speed_probe(loaded.model, device=device)
    say(f"runtime served {len(table)} requests in {time.perf_counter() - t:.1f} s "
        f"({len(recorder.iterations)} iterations)")
    recorder.write(folder)
    replay = replay_scenario(loaded, table, recorder, profile_path, folder)
    result = simulate(replay)
    if result.partial:
        raise CalibrationError(f"{scenario}: the simulator did not finish the replay")
    result.requests.to_csv(folder / "sim_requests.csv", index=False)
    result.iterations.to_csv(folder / "sim_iterations.csv", index=False)
    real_req = recorder.requests_frame()
    metrics, merged = compare(real_req, result.requests, recorder.iterations_frame(), result.iterations)
    metrics["rerouted_positions"] = recorder.rerouted_positions
    metrics["load_average_serving"] = {"before": load_before, "after": load_after}
    if probe_s:
        metrics["speed_probe_s"] = probe_s
        metrics["speed_probe_change"] = probe_change(probe_s)
    metrics["forced_positions"] = recorder.forced_positions
    planned = replay_batches(replay, recorder)
    real_it = recorder.iterations_frame()
    metrics.update(same_batch_metrics(real_it, planned))
    same_batch = pd.concat([real_it, planned], axis=1)
    same_batch.to_csv(folder / "same_batch_iterations.csv", index=False)
    metrics["same_batch_breakdown_s"] = {c: {"runtime": float(same_batch[c].sum()), "simulator": float(same_batch[f"sim_{c}"].sum())}
                                         for c in BREAKDOWN}
    metrics["same_batch_copy_engine_s"] = {
        "runtime_copy_busy": float(real_it["copy_busy_s"].sum()), "runtime_dispatch": float(real_it["copy_dispatch_s"].sum()),
        "runtime_load_wait": float(real_it["load_wait_s"].sum()), "simulator_copy_busy": float(planned["predicted_copy_s"].sum()),
        "simulator_stall": float(planned["predicted_stall_s"].sum()), "loads": int(planned["loads"].sum())}
    merged = merged.merge(request_service(recorder, real_it, planned), on="request_id", how="left")
    structure, merged = error_structure(merged, real_req)
    metrics["error_structure"] = structure
    failures = check_bounds(metrics, bounds)
    merged.to_csv(folder / "comparison.csv", index=False)
    vr = ValidationResult(scenario=scenario, profile=str(profile_path), metrics=metrics, failures=failures,
                          folder=folder, comparison=merged, runtime_iterations=real_it,
                          sim_iterations=result.iterations, same_batch=same_batch, routers=runtime.model.router_source,
                          prompts=prompts, time_scale=time_scale)
    write_outcome(vr, bounds, quick=quick)
    return vr


def cmd_validate(args: Any) -> int:
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else FULL_REPEATS)
    result = validate(args.scenario, profile=args.profile, quick=args.quick, repeats=repeats,
                      out=Path(args.out) if args.out else None, max_requests=args.max_requests,
                      progress=not args.no_progress, routers=getattr(args, "routers", "auto"),
                      prompts=getattr(args, "prompts", "random"), device=getattr(args, "device", "cpu"),
                      time_scale=getattr(args, "time_scale", 1.0))
    from sim.report.validation import validation_text

    print(validation_text(json.loads((Path(result.folder) / "summary.json").read_text(encoding="utf-8"))))
    print(f"wrote {result.folder}/report.html, summary.json and the runtime/simulator tables")
    if getattr(args, "report", None):
        # --report [HTML]: the report also as a file of its own, like simulate/sweep/plan (default
        # reports/validate-NAME.html); it is self-contained, so a copy is the whole report.
        import shutil

        target = Path("reports") / f"validate-{Path(args.scenario).stem}.html" if args.report is True else Path(args.report)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(result.folder) / "report.html", target)
        print(f"report: {target}")
    return 0 if result.passed else 1
