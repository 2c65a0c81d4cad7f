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
      f"{r['dropped']:,} dropped, {r['unfinished']:,} unfinished" + (f"  reasons: {r['reasons']}" if r["reasons"] else ""))
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
    for res in summary["resources"]:
        p(f"GPU {res['replica']}        compute {res['compute_utilization']:.1%} busy, host-to-device "
          f"{res['h2d_utilization']:.1%} busy ({_gb(res['h2d_bytes'])} GB moved), stalled on loads {res['stall_s']:,.1f} s, "
          f"{res['iterations']:,} iterations")
    p(f"preemptions  {summary['preemptions']:,}")


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
