"""The ``moesim`` command line: models, profiles, scenario, simulate.

Every user-fixable error is one line on stderr and exit code 2; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from sim import __version__, trace_cli
from sim.errors import MoesimError


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.2f}"


def _params(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.0f}M"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------- models and profiles


def cmd_models(args: argparse.Namespace) -> int:
    from sim.spec import catalog_rows, describe, get_model

    if args.name:
        spec = get_model(args.name)
        for key, value in describe(spec).items():
            print(f"{key}: {value}")
        return 0
    rows = [
        [
            r["name"], _params(r["total_params"]), _params(r["active_params"]), str(r["num_experts"]),
            str(r["top_k"]), str(r["num_shared_experts"]), f"{r['expert_bytes'] / 1e6:,.1f}",
            f"{r['kv_bytes_per_token'] / 1024:,.1f}",
        ]
        for r in catalog_rows()
    ]
    print(_table(["model", "total", "active", "experts", "top-k", "shared", "MB/expert", "KV KiB/token"], rows))
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from sim.profile import load_profile, shipped_profiles

    if args.name:
        profile = load_profile(args.name)
        print(json.dumps(profile.model_dump(mode="json"), indent=2))
        return 0
    rows = []
    for name in shipped_profiles():
        d = load_profile(name).describe()
        rows.append(
            [d["name"], d["source"], str(d["gpu"]), f"{d['memory_gib']:.0f}", f"{d['peak_bf16_tflops']:.3g}",
             f"{d['hbm_gbps']:.0f}", f"{d['h2d_gbps']:.1f}"]
        )
    print(_table(["profile", "source", "gpu", "GiB", "bf16 TFLOPS", "HBM GB/s", "H2D GB/s"], rows))
    return 0


# ---------------------------------------------------------------- scenarios


def cmd_scenario_check(args: argparse.Namespace) -> int:
    from sim.errors import ScenarioError
    from sim.scenario import expand_sweep, find_scenario, load_scenario, read_yaml, resolve

    for name in args.files:
        loaded = load_scenario(name)
        points = expand_sweep(read_yaml(find_scenario(name)), str(name))
        for values, point in points[1:] if len(points) > 1 else []:
            try:
                resolve(point, str(name), loaded.base_dir)
            except ScenarioError as exc:
                label = ", ".join(f"{k}={v}" for k, v in values.items())
                raise ScenarioError(f"{exc} [sweep point {label}]") from None
        extra = f", {len(points)} sweep points" if len(points) > 1 else ""
        print(f"{name}: ok ({loaded.model.name} on {loaded.scenario.hardware.num_gpus}x {loaded.profile.name}{extra})")
    return 0


def cmd_scenario_show(args: argparse.Namespace) -> int:
    import yaml

    from sim.scenario import load_scenario, resolved_dict, resolved_facts

    loaded = load_scenario(args.file)
    print(yaml.safe_dump(resolved_dict(loaded), sort_keys=False), end="")
    print("# resolved:")
    for key, value in resolved_facts(loaded).items():
        print(f"#   {key}: {value}")
    return 0


def cmd_scenario_schema(args: argparse.Namespace) -> int:
    from sim.scenario import json_schema_text

    text = json_schema_text()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_scenario_list(args: argparse.Namespace) -> int:
    from sim.scenario import find_scenario, read_yaml, shipped_scenarios

    for name in shipped_scenarios():
        data = read_yaml(find_scenario(name)) or {}
        print(f"{name:32s} {data.get('description', '')}")
    return 0


# ---------------------------------------------------------------- simulate


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def print_summary(summary: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout  # looked up at call time, so redirected output is honoured
    r = summary["requests"]
    t = summary["throughput"]
    lat = summary["latency"]
    mem = summary["memory"]
    cache = summary["expert_cache"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    status = "PARTIAL (stopped early)" if summary["partial"] else "complete"
    p(f"scenario {summary['scenario']}: {summary['model']} on {summary['num_gpus']}x {summary['profile']} "
      f"[profile source: {summary['profile_source']}] - {status}")
    p(f"requests     {r['arrived']:,} arrived, {r['completed']:,} completed, {r['rejected']:,} rejected, "
      f"{r['dropped']:,} dropped, " + (f"{r['failed']:,} failed, " if r.get("failed") else "")
      + f"{r['unfinished']:,} unfinished" + (f"  reasons: {r['reasons']}" if r["reasons"] else ""))
    if r.get("closed_loop"):
        loop = r["closed_loop"]
        think = f"{loop['think_time']} think time {_fmt_s(loop['think_time_s'])}" if loop["think_time_s"] else "no think time"
        p(f"closed loop  {loop['clients']:,} clients, each sending its next request when answered ({think})")
    p(f"throughput   {t['requests_per_s']:,.2f} req/s, {t['output_tokens_per_s']:,.0f} output tok/s, "
      f"{t['prompt_tokens_per_s']:,.0f} prompt tok/s over {t['span_s']:,.0f} s")
    for name, label in (("ttft", "TTFT"), ("tbt", "TBT"), ("tpot", "TPOT"), ("e2e", "end-to-end"), ("queue", "queueing")):
        p(f"{label:12s} P50 {_fmt_s(lat[f'{name}_p50_s'])}, P90 {_fmt_s(lat[f'{name}_p90_s'])}, "
          f"P99 {_fmt_s(lat[f'{name}_p99_s'])}")
    slo = summary["slo"]
    if slo["has_targets"]:
        checks = ", ".join(
            f"{k} {_fmt_s(v['observed_s'])} {'<=' if v['met'] else '>'} {_fmt_s(v['target_s'])}" for k, v in slo["targets"].items()
        )
        p(f"SLO          {'MET' if slo['met'] else 'MISSED'}: {checks}; attainment {slo['attainment']:.1%} "
          f"(target {slo['attainment_target']:.0%})")
    p(f"GPU memory   {_gb(mem['gpu_bytes'])} GB: weights {_gb(mem['non_expert_weights_bytes'])}, expert slots "
      f"{_gb(mem['expert_slots_bytes'])} ({mem['expert_slots']} experts), KV peak {_gb(mem['kv_peak_bytes'])} / "
      f"mean {_gb(mem['kv_mean_bytes'])} of {_gb(mem['kv_capacity_bytes'])}, reserve {_gb(mem['reserve_bytes'])}")
    hit = "-" if cache["hit_rate"] is None else f"{cache['hit_rate']:.1%}"
    line = (f"expert cache {cache['policy']}: {cache['capacity_experts']}/{cache['total_experts']} experts, hit rate {hit} "
            f"({cache['misses']:,} misses, {cache['prefetch_hits']:,} prefetch hits, {cache['evictions']:,} evictions)")
    if cache.get("belady_hit_rate") is not None:
        line += f"; Belady optimum {cache['belady_hit_rate']:.1%}"
    elif cache.get("belady_note"):
        line += f"; Belady {cache['belady_note']}"
    p(line)
    line = f"routing      fidelity {cache.get('routing_fidelity', 1.0):.1%} (assignments served by the selected expert)"
    off = cache.get("offload")
    if off:
        line += f"; {off['rerouted']:,} rerouted, {off['staged_loads']:,} staged loads, {off['residency_loads']:,} residency loads"
        if "prompts" in off:
            line += f"; eMoE predictor called {off['predictor_calls']} times in {off['prompts']} prompts (every {off['period']})"
        acc = off.get("predictor_accuracy")
        if acc and acc.get("top_k_recall") is not None:
            line += (f"; {acc['variant']} measured top-k precision {acc['top_k_precision']:.1%} / recall "
                     f"{acc['top_k_recall']:.1%} on {acc['test_tokens']:,} held-out tokens (random {acc['random_precision']:.1%})")
    if cache.get("admission_refusals"):
        line += f"; Algorithm-1 admission held requests back {cache['admission_refusals']:,} times"
    p(line)
    for res in summary["resources"]:
        if "links_busy_s" in res:
            p(f"replica {res['replica']}    compute {res['compute_utilization']:.1%} busy, links {res['links_utilization']:.1%} busy, "
              f"waiting for all-to-all {res['stall_s']:,.1f} s, {res['iterations']:,} iterations")
            continue
        p(f"GPU {res['replica']}        compute {res['compute_utilization']:.1%} busy, host-to-device "
          f"{res['h2d_utilization']:.1%} busy ({_gb(res['h2d_bytes'])} GB moved), stalled on loads {res['stall_s']:,.1f} s, "
          f"{res['iterations']:,} iterations")
    p(f"preemptions  {summary['preemptions']:,}")
    off = summary.get("offload")
    if off:  # speculative decoding / CPU offloading
        b = off["decode_breakdown_mean_s"]
        acc = "-" if off["acceptance_rate"] is None else f"{off['acceptance_rate']:.1%}"
        per_step = "-" if off["tokens_per_decode_step"] is None else f"{off['tokens_per_decode_step']:.2f}"
        if off["draft_length"]:
            p(f"speculative  k={off['draft_length']} draft {off['draft_model'] or '-'}: {off['accepted_tokens']:,} of "
              f"{off['drafted_tokens']:,} drafts accepted ({acc}), {per_step} tokens per sequence per decode step")
        p(f"placement    attention prefill {off['attention']['prefill']} / decode {off['attention']['decode']}, CPU experts "
          f"{'on' if off['cpu_experts'] else 'off'}, {off['micro_batches']} micro-batch(es); host "
          f"{off['host_profile'] or '-'} ({off['host_threads'] or '?'} thread(s)); KV on {'host' if off['kv_on_host'] else 'GPU'}"
          + (f"; draft KV {off['draft_kv_gpu_fraction']:.0%} GPU / rest host (CPU attention)"
             if off["draft_length"] and off.get("draft_on_gpu") and off.get("draft_kv_gpu_fraction", 1.0) < 1 else ""))
        p(f"decode step  {_fmt_s(off['decode_iteration_mean_s'])} mean: busy H2D weights {_fmt_s(b['h2d_weights_s'])}, "
          f"GPU MoE {_fmt_s(b['gpu_moe_s'])}, GPU other {_fmt_s(b['gpu_other_s'])}, CPU attention "
          f"{_fmt_s(b['cpu_attention_s'])}, CPU experts {_fmt_s(b['cpu_experts_s'])}, activations "
          f"{_fmt_s(b['act_transfer_s'])}, draft {_fmt_s(b['draft_s'])}")
    ep = summary.get("expert_parallel")
    if ep:
        tot = ep["totals_s"]
        p(f"expert par.  dp {ep['dp']} x ep {ep['ep']} x tp {ep['tp']} over {ep['intra_node']} ({ep.get('collective_model', 'link')} collectives), placement {ep['placement']}, "
          f"capacity {ep['capacity']}, overlap {ep['overlap']}: MoE-layer seconds attention {tot['attention_s']:,.2f}, "
          f"experts {tot['expert_compute_s']:,.2f} (straggler wait {tot['straggler_wait_s']:,.2f}), dispatch "
          f"{tot['dispatch_s']:,.2f}, combine {tot['combine_s']:,.2f}, exposed comm {ep['exposed_comm_s']:,.2f}; "
          f"imbalance max/mean {ep['mean_imbalance']:.2f}; dropped {ep['dropped_fraction']:.1%}, rerouted {ep['rerouted_fraction']:.1%}")
        fo = ep.get("failover")
        if fo:
            p(f"failover     {fo['policy']}: routing fidelity {fo['routing_fidelity']:.1%}, rerouted {fo['rerouted_fraction']:.1%}, "
              f"waiting {fo['waiting_fraction']:.1%} ({fo['blocked_iterations']} iterations stalled {fo['wait_s']:,.3f} s) "
              f"over {fo['faulted_iterations']} iterations with a rank down ({fo['rerouted_while_down_fraction']:.1%} rerouted there)")
    outside = summary.get("profile_outside_measured") or {}
    if outside:
        ops = ", ".join(f"{op} ({n:,} lookups)" for op, n in sorted(outside.items()))
        p(f"warning      the scenario asked profile {summary['profile']} outside its measured range for {ops}: "
          f"those latencies are extrapolated (roofline), not measured")
    if "faults" in summary:
        print_faults(summary["faults"], p)


def print_faults(faults: dict[str, Any], p: Callable[..., None]) -> None:
    """Outages, recovery and SLO attainment before / during / after each (sim/fault_metrics.py)."""
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    p(f"faults       {faults['outages']} GPU outage(s), {faults['unrecovered']} not recovered; "
      f"{faults['requeued']:,} requests re-queued, {faults['failed_requests']:,} failed; "
      f"{_gb(faults['bytes_moved_for_recovery'])} GB moved for recovery"
      + (f"; {faults['spare_gpus']} spare GPU(s), {faults['spares_used']} outage(s) taken over by a spare"
         if faults.get("spare_gpus") else ""))
    for rec in faults["recoveries"]:
        back = ("not restored" if rec["restored_at_s"] is None else
                f"back at {rec['restored_at_s']:,.3f} s (restore {_fmt_s(rec['restore_s'])} from {rec['source']}, "
                f"{_gb(rec['restore_bytes'])} GB moved, "
                f"time to recovery {_fmt_s(rec['time_to_recovery_s'])})")
        onto = "" if rec.get("spare_gpu") is None else f", replaced at once by spare GPU {rec['spare_gpu']}"
        p(f"  GPU {rec['gpu']} failed at {rec['failed_at_s']:,.3f} s{onto}, {back}")
    names = {"fail": "down", "slow": "slowed", "link": "link degraded"}
    for a in faults["around_faults"]:
        until = "end" if a["end_s"] is None else f"{a['end_s']:,.3f} s"
        p(f"  GPU {a['gpu']} {names[a['fault']]} {a['start_s']:,.3f} s - {until}: SLO attainment before "
          f"{pct(a['before_slo_attainment'])}, during {pct(a['during_slo_attainment'])}, after "
          f"{pct(a['after_slo_attainment'])}; TTFT P99 {_fmt_s(a['before_ttft_p99_s'])} / "
          f"{_fmt_s(a['during_ttft_p99_s'])} / {_fmt_s(a['after_ttft_p99_s'])}"
          + ("" if a.get("slo_whole_again_at_s") is None else
             f"; attainment target met again by arrivals from {a['slo_whole_again_at_s']:,.1f} s"))


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.engine.simulation import simulate
    from sim.metrics import summarize
    from sim.run_folder import write_run_folder
    from sim.scenario import DEFAULT_SCENARIO, load_scenario

    loaded = load_scenario(args.scenario or DEFAULT_SCENARIO)
    result = simulate(loaded, progress=not args.no_progress and sys.stderr.isatty(), stop_at_s=args.stop_at)
    summary = summarize(result)
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    else:
        print_summary(summary)
    out_dir = args.out or (Path("runs") / loaded.scenario.name if args.report else None)
    if out_dir:
        folder = write_run_folder(result, summary, Path(out_dir), fmt=args.format)
        sys.stdout.flush()
        print(f"run folder: {folder}" + (" (partial)" if result.partial else ""), file=sys.stderr)
        if args.report:
            from sim.report.render import render_run_report

            report = render_run_report(folder, Path(args.report) if args.report is not True else None)
            print(f"report: {report}", file=sys.stderr)
    return 130 if result.partial and args.stop_at is None else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from sim.scenario import find_scenario
    from sim.sweep import SweepInterrupted, run_sweep

    stem = find_scenario(args.scenario).stem
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{stem}"
    try:
        table = run_sweep(args.scenario, out, jobs=args.jobs, progress=not args.no_progress and sys.stderr.isatty(),
                          executor=args.executor, address=args.address)
    except SweepInterrupted as stop:
        print(f"moesim: interrupted: {stop.done} of {stop.total} points done, kept in {out / 'points'}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    shown = table.drop(columns=["key"])
    if "infeasible" in shown:  # the full reason is in sweep.csv; keep the terminal table narrow
        shown["infeasible"] = shown["infeasible"].map(lambda r: r if not isinstance(r, str) or len(r) < 48 else r[:45] + "...")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    sys.stdout.flush()
    print(f"sweep table: {out / 'sweep.csv'}; run folders: {out / 'points'}", file=sys.stderr)
    _write_folder_report(args.report, "sweep", stem, out)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import pandas as pd

    from sim.plan import DEFAULT_PLAN, parse_budget, recommended, run_plan, write_plan
    from sim.scenario import find_scenario

    scenario = args.scenario or DEFAULT_PLAN
    stem = find_scenario(scenario).stem
    overrides = {"target_rate_per_s": args.target_rate, **(parse_budget(args.budget) if args.budget else {})}
    table, results = run_plan(scenario, jobs=args.jobs, progress=not args.no_progress and sys.stderr.isatty(),
                              executor=args.executor, address=args.address, overrides=overrides)
    out = write_plan(Path(args.out) if args.out else Path("runs") / f"plan-{stem}", scenario, table, results, overrides)
    shown = table.drop(columns=["reason", "limit", "probes", "max_rate_upper_per_s"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    best = recommended(table)
    if best is not None:
        axes = ", ".join(f"{k}={best[k]}" for k in results[0].values)
        print(f"\nrecommended: candidate {best['candidate']} ({axes}): sustains {best['max_rate_per_s']:.3g} req/s, "
              f"headroom {'at least ' if pd.isna(best['max_rate_upper_per_s']) else ''}{best['headroom']:.2f}x, "
              f"${best['usd_per_hour']:.2f}/h, bound by {best['binding']}")
    else:
        print("\nno candidate meets the target rate within the SLO; the closest are listed above")
    for _, row in table[table["status"] != "meets target"].iterrows():
        print(f"candidate {row['candidate']}: {row['status']}: {row['reason']}")
    sys.stdout.flush()
    print(f"plan table: {out / 'plan.csv'}; details: {out / 'plan.json'}", file=sys.stderr)
    _write_folder_report(args.report, "plan", stem, out)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from sim.scenario import find_scenario
    from sim.tune import run_tune

    stem = find_scenario(args.scenario).stem
    out = Path(args.out) if args.out else Path("runs") / f"tune-{stem}"
    log = (lambda s: print(s, file=sys.stderr)) if not args.no_progress else (lambda s: None)
    result = run_tune(args.scenario, out, log=log)
    best = result["best"]
    shown = [r for r in result["table"] if r.get("simulated")]
    print(f"{result['configurations']} configurations estimated, {result['simulated']} simulated "
          f"({result['wall_s']:.0f} s)")
    print(f"{'strategy':14s} {'k':>3s} {'batch':>5s} {'mb':>3s} {'estimate tok/s':>15s} {'simulated tok/s':>16s}")
    for r in shown:
        sim_v = r.get("sim_tokens_per_s")
        print(f"{r['strategy']:14s} {r['k']:3d} {r['batch']:5d} {r['micro_batches']:3d} "
              f"{r['estimate_tokens_per_s']:15.3g} {'-' if sim_v is None else f'{sim_v:.3g}':>16s}")
    if best is not None:
        print(f"best: {best['strategy']}, k={best['k']}, batch={best['batch']}, micro_batches={best['micro_batches']}: "
              f"{best['sim_tokens_per_s']:.3g} output tokens/s simulated")
    sys.stdout.flush()
    print(f"tune table: {out / 'tune.csv'}; details: {out / 'tune.json'}", file=sys.stderr)
    _write_folder_report(args.report, "tune", stem, out)
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from sim.checkpoint import checkpoint_report
    from sim.errors import ScenarioError
    from sim.scenario import load_scenario

    loaded = load_scenario(args.scenario)
    spec = loaded.scenario.checkpoint
    if spec is None:
        raise ScenarioError(f"{args.scenario}: checkpoint: this command needs a checkpoint: section "
                            "(pec_experts_per_layer, interval_iterations, total_iterations, storage_gbps, ...)")
    try:
        report = checkpoint_report(loaded.model, loaded.profile, spec, loaded.scenario.hardware.num_gpus)
    except ValueError as exc:
        raise ScenarioError(f"{args.scenario}: checkpoint: {exc}") from None
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return 0
    print(f"checkpointing {report['model']} on {report['num_ranks']} ranks of {report['profile']}: "
          f"{_fmt_s(report['iteration_s'])} per iteration, a checkpoint every {report['interval_iterations']} iterations")
    pct = lambda v: "-" if v is None else f"{v:.3%}"  # noqa: E731
    rows = [[c["name"], _gb(c["total_bytes"]), _gb(c["rank_bytes"]), _fmt_s(c["snapshot_s"]), _fmt_s(c["persist_s"]),
             _fmt_s(c["stall_per_checkpoint_s"]), f"{c['save_overhead_fraction']:.2%}",
             f"{c['min_interval_iterations']}" + ("" if c["interval_ok"] else " (!)"),
             pct(c["plt_per_fault"]), pct(c["plt_expected"]), f"{c['staleness_mean_iterations']:.1f}"]
            for c in report["cases"]]
    print(_table(["checkpoint", "GB total", "GB/rank", "snapshot", "persist", "stall/ckpt", "overhead",
                  "min interval", "PLT/fault", "PLT expected", "stale iters"], rows))
    print("\nrestoring one rank's shard:")
    print(_table(["from", "seconds", "GB", "stale iterations (mean)", "note"],
                 [[r["source"], _fmt_s(r["seconds"]), _gb(r["bytes"]), f"{r['stale_iterations_mean']:.1f}", r["note"]]
                  for r in report["restore"]]))
    return 0


def _write_folder_report(report: str | bool | None, kind: str, stem: str, folder: Path) -> None:
    """`--report` of sweep and plan: render FOLDER to the given file or reports/KIND-STEM.html."""
    if not report:
        return
    from sim.report.render import render_report

    target = Path("reports") / f"{kind}-{stem}.html" if report is True else Path(report)
    print(f"report: {render_report(folder, target)}", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from sim.report.render import render_report

    path = render_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"report: {path}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Trace-driven discrete-event simulator of Mixture-of-Experts LLM inference.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the model catalog, or show one model's derived sizes")
    p.add_argument("action", nargs="?", choices=["show"], help="'show NAME' for one model's detail")
    p.add_argument("name", nargs="?", help="catalog name, e.g. mixtral-8x7b")
    p.set_defaults(func=cmd_models, _needs_name_with_show=True)

    p = sub.add_parser("profiles", help="list the shipped hardware profiles, or show one")
    p.add_argument("action", nargs="?", choices=["show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_profiles, _needs_name_with_show=True)

    sc = sub.add_parser("scenario", help="check, show, list scenarios, or print the JSON Schema")
    scs = sc.add_subparsers(dest="scenario_command", metavar="ACTION")
    p = scs.add_parser("check", help="validate scenario files (every sweep point too)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_scenario_check)
    p = scs.add_parser("show", help="print a scenario with every default filled in")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_scenario_show)
    p = scs.add_parser("schema", help="print (or --out write) the scenario JSON Schema")
    p.add_argument("--out", metavar="PATH")
    p.set_defaults(func=cmd_scenario_schema)
    p = scs.add_parser("list", help="list the shipped scenarios")
    p.set_defaults(func=cmd_scenario_list)
    sc.set_defaults(func=lambda a: _usage(sc))

    p = sub.add_parser("simulate", help="simulate one scenario and print its summary")
    p.add_argument("scenario", nargs="?", help="scenario YAML or shipped name (default: the shipped default)")
    p.add_argument("--out", metavar="DIR", help="write the run folder (tables, summary.json) here")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv", help="table format in the run folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-at", type=float, metavar="SECONDS", help="stop at this simulated time (a partial run)")
    p.add_argument(
        "--report", nargs="?", const=True, metavar="HTML",
        help="also write a self-contained HTML report (default: RUN_DIR/report.html; run folder default runs/NAME)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("sweep", help="run every point of a scenario's sweep grid (cached, resumable, parallel)")
    p.add_argument("scenario", help="scenario YAML (with a sweep: block) or shipped name")
    _add_many_runs_options(p, "sweep")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plan", help="the cheapest candidate configuration that meets the SLO at a target rate")
    p.add_argument("scenario", nargs="?", help="scenario YAML with a plan: block, or shipped name (default: mixtral-plan)")
    p.add_argument("--target-rate", type=float, metavar="REQ_PER_S", help="requests/s to sustain (overrides plan.target_rate_per_s)")
    p.add_argument("--budget", metavar="LIMIT",
                   help="prune candidates over it before simulating: a cost per hour (40, $40/h) or a GPU count (8gpus)")
    _add_many_runs_options(p, "plan")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("tune", help="best offloading strategy, draft length k, batch and micro-batches (roofline + simulation)")
    p.add_argument("scenario", help="scenario YAML (its tune: block sets the search space) or shipped name")
    p.add_argument("--out", metavar="DIR", help="results folder (default: runs/tune-NAME)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--report", nargs="?", const=True, metavar="HTML",
                   help="also write a self-contained HTML report (default: reports/tune-NAME.html)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("checkpoint", help="training-side what-if: full vs PEC partial expert checkpoints")
    p.add_argument("scenario", help="scenario YAML with a checkpoint: section, or shipped name")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("report", help="render a run, sweep or plan folder into one self-contained HTML report")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `moesim simulate --out`, `sweep` or `plan`")
    p.add_argument("-o", "--out", metavar="HTML", help="output file (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
    trace_cli.register(sub)
    _register_calibrate(sub)
    return parser


def _register_calibrate(sub: Any) -> None:
    """``calibrate`` and ``profile show|compare`` live in calibrate/ (torch, imported only when run).

    calibrate.cli itself imports neither torch nor anything heavy, so building the parser stays fast;
    ``import sim.cli`` imports nothing from calibrate."""
    try:
        from calibrate.cli import register
    except ImportError:  # an install without the calibrator
        return
    register(sub)


def _add_many_runs_options(p: argparse.ArgumentParser, kind: str) -> None:
    """Options shared by the commands that run many simulations (sweep, plan)."""
    p.add_argument("--out", metavar="DIR", help=f"results folder (default: runs/{kind}-NAME)")
    p.add_argument("--jobs", type=int, metavar="N", help="worker processes (default: all cores; 1 runs in-process)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where simulations run: local processes (default) or Ray (pip install 'moesim[ray]')")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto; default: start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--report", nargs="?", const=True, metavar="HTML",
        help=f"also write a self-contained HTML report (default: reports/{kind}-NAME.html)",
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "_needs_name_with_show", False):
        if args.action == "show" and not args.name:
            print(f"moesim: error: '{args.command} show' needs a name", file=sys.stderr)
            return 2
        if args.action is None and args.name is None:
            pass
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MoesimError as exc:
        if args.debug:
            raise
        print(f"moesim: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if args.debug or exc.name != "torch":
            raise
        # calibrate/validate/profile import measure code that needs torch, an optional extra.
        print(f"moesim: error: '{args.command}' needs PyTorch: pip install 'moesim[calibrate]' "
              "(torch 2.13.0, CPU build)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
