"""``moesim calibrate`` and ``moesim profile show|compare``: registered into sim's parser, torch imported on use.

``calibrate`` measures (calibrate.measure), writes every point as it goes to ``<out stem>.points.csv``,
resumes from that file when rerun, fits (calibrate.fit) and writes the profile YAML. Errors a user can fix
are ``MoesimError``s: sim's ``main`` prints them as one line and exits 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from calibrate.errors import CalibrationError

QUICK_MODELS = ("olmoe-1b-7b", "qwen3-30b-a3b")
FULL_MODELS = ("olmoe-1b-7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "switch-base-8",
               "gpt-oss-20b", "phi-3.5-moe")
DTYPES = ("bf16", "fp32", "fp16")


def register(sub: Any) -> None:
    """Add ``calibrate`` and ``profile`` to moesim's subcommands."""
    p = sub.add_parser("calibrate", help="measure kernels and copies on this machine and write a hardware profile",
                       description="Measure expert FFN, dense GEMM, gate, attention (SDPA) and host copies, "
                                   "fit latency models and write a profile YAML plus its points CSV.")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="where to measure (default: cpu)")
    p.add_argument("--model", action="extend", nargs="+", default=None, metavar="NAME",
                   help=f"catalog models whose shapes to measure (default quick: {', '.join(QUICK_MODELS)}; "
                        f"full: {', '.join(FULL_MODELS)})")
    p.add_argument("--quick", action="store_true", help="a small grid, < 2 minutes on a 2-core CPU")
    p.add_argument("--out", required=True, metavar="PROFILE", help="profile YAML to write; points go to "
                   "<stem>.points.csv next to it")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1: on a shared 2-core box 2 threads wait on the scheduler)")
    p.add_argument("--dtype", action="extend", nargs="+", default=None, metavar="DTYPE",
                   help="GEMM dtypes (default bf16; fp32 and fp16 also possible)")
    p.add_argument("--name", help="profile name (default: the --out file stem)")
    p.add_argument("--fresh", action="store_true", help="discard an existing points file instead of resuming")
    p.add_argument("--fit-only", action="store_true", help="measure nothing; refit the existing points file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--note", help="free text for the profile's provenance (e.g. what else ran on the machine)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibration from its points file (an error if there is none); "
                        "a rerun without --fresh resumes as well")
    p.add_argument("--collectives", default="auto", choices=("auto", "nccl", "gloo", "none"),
                   help="all-to-all / all-reduce: auto = NCCL when 2+ GPUs are visible, else skipped (said in the "
                        "profile); gloo = 2 CPU processes, a test path of the measuring code (default: auto)")
    p.add_argument("--cpu-clock", default="wall", choices=("wall", "thread"),
                   help="CPU timing at 1 thread: wall (perf_counter_ns, default) or thread (the thread's CPU time, "
                        "time_thread_ns: far less disturbed by other processes on a shared machine)")
    p.add_argument("--no-overheads", action="store_true",
                   help="skip the per-layer / per-expert / per-iteration overhead and load-interference terms "
                        "measured on the CPU runtime (calibrate.overhead)")
    p.set_defaults(func=cmd_calibrate)

    pr = sub.add_parser("profile", help="show a hardware profile's fits, or compare two profiles")
    prs = pr.add_subparsers(dest="profile_command", metavar="ACTION")
    q = prs.add_parser("show", help="hardware, links and each operation's model and fit error")
    q.add_argument("profile", metavar="PROFILE", help="shipped name or YAML path")
    q.add_argument("--html", metavar="OUT", help="also write an HTML page: measured points vs fitted curves per op")
    q.set_defaults(func=cmd_profile_show)
    q = prs.add_parser("compare", help="relative difference of B's lookups from A's at A's and B's measured sizes")
    q.add_argument("a", metavar="A")
    q.add_argument("b", metavar="B")
    q.add_argument("--html", metavar="OUT", help="also write an HTML page: both profiles' points and curves per op")
    q.set_defaults(func=cmd_profile_compare)
    _register_profile_import(prs)
    pr.set_defaults(func=lambda a: (pr.print_help(sys.stderr), 2)[1])
    register_validate(sub)


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse turns the error into a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def register_validate(sub: Any) -> None:
    """``moesim validate``: the real CPU runtime against the simulator (calibrate.validate)."""
    v = sub.add_parser("validate", help="run a scenario on the real CPU runtime and compare the simulator with it",
                       description="Calibrate this CPU for the scenario's model shapes (or take --profile), serve "
                                   "the scenario for real with the small PyTorch MoE runtime, simulate the same "
                                   "arrivals with the recorded routing, and compare per-request latency, throughput "
                                   "and cache hits. Exits 1 when an error bound is exceeded.")
    v.add_argument("scenario", metavar="SCENARIO", help="scenario YAML (e.g. scenarios/validate-all-resident.yaml)")
    v.add_argument("--profile", help="use this profile instead of calibrating (a YAML path or shipped name)")
    v.add_argument("--quick", action="store_true", help="the CI check: short calibration, the first 16 requests, bounds 15%%/40%%/10%%")
    v.add_argument("--out", metavar="DIR", help="folder for the tables and report (default reports/validate-NAME)")
    v.add_argument("--max-requests", type=int, metavar="N", help="serve only the first N requests")
    v.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the runtime serves and the calibration measures (cuda needs a GPU; default cpu)")
    v.add_argument("--repeats", type=_positive_int, metavar="N",
                   help="serve the requests N times (one calibration) and judge the median run (default: 3, "
                        "--quick: 1)")
    v.add_argument("--time-scale", type=_positive_float, default=1.0, metavar="X",
                   help="stretch the arrival times (and a closed loop's think times) by X for the runtime and the "
                        "simulator alike: 2 halves the load, 0.5 doubles it (default 1)")
    v.add_argument("--no-progress", action="store_true", help="no calibration progress bar")
    v.add_argument("--routers", choices=("auto", "trained", "seeded"), default="auto",
                   help="the runtime's routers: trained (shipped, learned on text), seeded (random), or auto "
                        "(default: trained when the shipped file matches the model and seed, else seeded)")
    v.add_argument("--prompts", choices=("random", "text"), default="random",
                   help="the runtime's prompt tokens: random ids (default) or windows of held-out standard-library "
                        "source text (what the trained routers learned on)")
    v.add_argument("--report", nargs="?", const=True, metavar="HTML",
                   help="also write the HTML report to this file (default: reports/validate-NAME.html)")
    v.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from calibrate.validate import cmd_validate

    return cmd_validate(args)


def _register_profile_import(prs: Any) -> None:
    """``moesim profile import aiconfigurator --gpu h100|h200|a100 --out P.yaml`` (calibrate.importers)."""
    from calibrate.importers.aiconfigurator import DEFAULT_DATA_DIR, GPUS

    q = prs.add_parser("import", help="build a profile from public GPU measurements")
    src = q.add_subparsers(dest="import_source", metavar="SOURCE", required=True)
    a = src.add_parser("aiconfigurator", help="NVIDIA AIConfigurator's kernel database (Apache-2.0)",
                       description="Turn AIConfigurator's fused-MoE, GEMM and attention tables into a profile "
                                   "(per-expert tables, fitted attention rooflines; links from the datasheet).")
    a.add_argument("--gpu", required=True, choices=sorted(GPUS), help="which GPU's tables to import")
    a.add_argument("--out", required=True, metavar="PROFILE", help="profile YAML to write")
    a.add_argument("--data", default=str(DEFAULT_DATA_DIR), metavar="DIR",
                   help="the aiconfigurator folder of shared/data/gpu_profiling (default: %(default)s)")
    a.set_defaults(func=cmd_profile_import_aiconfigurator)


def cmd_profile_import_aiconfigurator(args: argparse.Namespace) -> int:
    from calibrate.importers.aiconfigurator import write_profile

    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml"):
        raise CalibrationError(f"--out {args.out}: a profile is a .yaml file")
    profile = write_profile(args.gpu, out, args.data)
    for op, m in profile["operations"].items():
        what = f"table, {len(m['rows'])} shapes" if m["kind"] == "table" else "roofline"
        print(f"{op:18s} {what:18s} MAPE {m['fit_error']['mean_rel_error']:6.1%}", file=sys.stderr)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)", file=sys.stderr)
    return 0


def points_path_for(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".yaml").removesuffix(".yml") + ".points.csv")


def _env_path_for(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".yaml").removesuffix(".yml") + ".env.json")


def _check_args(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """Models and dtypes, or a CalibrationError/CatalogError naming the bad value (before torch is imported)."""
    from sim.spec import get_model

    if args.device not in ("cpu", "cuda"):
        raise CalibrationError(f"--device {args.device!r}: expected cpu or cuda")
    if args.threads < 1:
        raise CalibrationError(f"--threads {args.threads}: must be >= 1")
    dtypes = args.dtype or ["bf16"]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise CalibrationError(f"--dtype {bad[0]!r}: expected one of {', '.join(DTYPES)}")
    names = args.model or list(QUICK_MODELS if args.quick else FULL_MODELS)
    return [get_model(n) for n in names], list(dict.fromkeys(dtypes))


def cmd_calibrate(args: argparse.Namespace) -> int:
    models, dtypes = _check_args(args)
    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml"):
        raise CalibrationError(f"--out {args.out}: a profile is a .yaml file")
    points_path = points_path_for(out)
    if args.resume and args.fresh:
        raise CalibrationError("--resume and --fresh contradict each other: --fresh discards the points --resume continues")
    if args.resume and not points_path.exists():
        raise CalibrationError(f"--resume: {points_path} does not exist, so there is nothing to resume; "
                               f"run without --resume to start")
    import torch

    from calibrate.collectives import plan_collectives
    from calibrate.environment import collect_environment, load_average
    from calibrate.measure import _dedup, build_plan, read_points, run_tasks
    from calibrate.timing import Budget

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CalibrationError(f"--device cuda: no CUDA device is available (torch {torch.__version__}); "
                               f"use --device cpu")
    gpu_count = torch.cuda.device_count() if args.device == "cuda" else 0
    backend, world_sizes, coll_why = plan_collectives(args.collectives, device=args.device, gpu_count=gpu_count)
    overheads = args.device == "cpu" and not args.no_overheads
    torch.set_num_threads(args.threads)
    env = collect_environment(args.device, args.threads)
    env["cpu_clock"] = args.cpu_clock
    device_name = env.get("gpu_name") if args.device == "cuda" else env["cpu_model"]
    env_path = _env_path_for(out)
    overheads_path = out.with_name(out.name.removesuffix(".yaml").removesuffix(".yml") + ".overheads.json")
    started = time.perf_counter()
    measured_now = 0
    if not args.fit_only:
        tasks = build_plan(models, quick=args.quick, device=args.device, threads=args.threads, dtypes=dtypes)
        if overheads:  # the runtime model's shapes, so its overhead residuals are fitted against measured tables
            from calibrate.overhead import runtime_spec
            from calibrate.validate import calibration_tasks

            tasks = _dedup([*tasks, *calibration_tasks(runtime_spec(), threads=args.threads)])
        budget = (Budget(max_repeats=15, time_s=0.3, clock=args.cpu_clock) if args.quick
                  else Budget(max_repeats=20, time_s=0.5, clock=args.cpu_clock))
        runs = _read_runs(env_path) if points_path.exists() and not args.fresh else []
        runs.append(env)
        out.parent.mkdir(parents=True, exist_ok=True)
        env_path.write_text(json.dumps({"runs": runs}, indent=1), encoding="utf-8")
        if args.fresh and overheads_path.exists():
            overheads_path.unlink()
        try:
            result = run_tasks(tasks, points_path, device=args.device, device_name=str(device_name), budget=budget,
                               progress=not args.no_progress, fresh=args.fresh)
            measured_now = result.measured
            measured_now += _measure_collectives(backend, world_sizes, points_path, str(device_name), args)
        except KeyboardInterrupt:
            kept = len(read_points(points_path))
            print(f"moesim: interrupted: {kept} points kept in {points_path}; run the same command again "
                  f"(or add --resume) to continue", file=sys.stderr)
            return 130
        resumed = f", {result.skipped} resumed from {points_path}" if result.skipped else ""
        print(f"measured {result.measured} points in {time.perf_counter() - started:.0f} s{resumed} "
              f"(load average now {load_average()[0]:.2f})", file=sys.stderr)
    points = read_points(points_path)
    if not points:
        raise CalibrationError(f"{points_path}: no measured points to fit")
    runs = _read_runs(env_path) or [env]
    environment = dict(runs[0])
    environment["load_average_at_end"] = list(load_average())
    environment["collectives"] = ({"backend": backend, "provenance": coll_why} if backend
                                  else {"backend": "none", "skipped": coll_why})
    if len(runs) > 1:
        environment["resumed_runs"] = [r.get("started_at") for r in runs[1:]]
    extra = {"note": args.note} if args.note else {}
    name = args.name or out.stem
    write_profile(points, environment, out=out, name=name, threads=args.threads, points_path=points_path,
                  extra_provenance={**extra, "overheads": "not measured yet" if overheads else _no_overheads_why(args)},
                  quiet=overheads)
    if not overheads:
        return 0
    try:
        ops, prov = _overhead_terms(out, overheads_path, reuse=measured_now == 0, args=args)
    except KeyboardInterrupt:
        print(f"moesim: interrupted while measuring the overhead terms: {len(points)} points kept in {points_path} "
              f"(the profile {out} has no overhead terms yet); run the same command again to measure them",
              file=sys.stderr)
        return 130
    environment["load_average_at_end"] = list(load_average())
    write_profile(points, environment, out=out, name=name, threads=args.threads, points_path=points_path,
                  extra_provenance={**extra, "overheads": prov}, extra_operations=ops)
    print(f"calibration took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def _no_overheads_why(args: argparse.Namespace) -> str:
    if args.device != "cpu":
        return ("skipped: the overhead terms are measured on the CPU runtime (calibrate.runtime); a CUDA runtime "
                "is not part of moesim")
    return "skipped: --no-overheads"


def _measure_collectives(backend: str | None, world_sizes: list[int], points_path: Path, device_name: str,
                         args: argparse.Namespace) -> int:
    """Measure the collectives not yet in the points file; returns how many points were added."""
    if backend is None:
        return 0
    from calibrate.collectives import GLOO_SIZES_BYTES, NCCL_SIZES_BYTES, measure_collectives
    from calibrate.measure import append_points, read_points

    done = {int(r["num_ranks"]) for r in read_points(points_path) if r["op"] in ("all_to_all", "all_reduce")}
    added = 0
    for n in world_sizes:
        if n in done:
            continue
        print(f"collectives: {backend}, {n} ranks ...", file=sys.stderr)
        sizes = GLOO_SIZES_BYTES if backend == "gloo" else NCCL_SIZES_BYTES
        rows = measure_collectives(backend=backend, world_size=n, sizes_bytes=sizes, repeats=5 if args.quick else 20,
                                   device_name=device_name, threads=args.threads)
        append_points(points_path, rows)
        added += len(rows)
    return added


def _overhead_terms(out: Path, overheads_path: Path, *, reuse: bool,
                    args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The overhead operations and their provenance: measured on the CPU runtime against the kernels-only
    profile just written to ``out``, or (``reuse``: nothing was re-measured) read back from ``overheads_path``."""
    from calibrate.overhead import measure_overheads, runtime_spec
    from sim.profile import load_profile

    if reuse and overheads_path.exists():
        saved = json.loads(overheads_path.read_text(encoding="utf-8"))
        print(f"overheads: reused from {overheads_path} (no point was re-measured)", file=sys.stderr)
        return saved["operations"], saved["provenance"]
    spec = runtime_spec()
    print(f"overheads: measuring the runtime's per-layer / per-expert / per-iteration overhead and load "
          f"interference on {spec.name} ...", file=sys.stderr)
    ops, prov = measure_overheads(spec, load_profile(out), threads=args.threads, rounds=3 if args.quick else 5,
                                  log=lambda m: print(m, file=sys.stderr))
    prov = {"model": f"{spec.name} (calibrate.overhead.RUNTIME_SPEC)", **prov}
    overheads_path.write_text(json.dumps({"operations": ops, "provenance": prov}, default=float), encoding="utf-8")
    return ops, prov


def _read_runs(env_path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(env_path.read_text(encoding="utf-8")).get("runs", []))
    except (OSError, ValueError):
        return []


def write_profile(points: list[dict[str, str]], environment: dict[str, Any], *, out: Path, name: str,
                  threads: int, points_path: Path, quiet: bool = False,
                  extra_provenance: dict[str, Any] | None = None,
                  extra_operations: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit, validate with sim's own loader, and write ``out`` atomically; print one line per op.

    ``extra_operations`` (e.g. the overhead terms of ``calibrate.overhead``) are added to ``operations``."""
    import yaml

    from calibrate.fit import build_profile, op_mape
    from sim.profile import parse_profile

    profile, summary = build_profile(points, environment, name=name, threads=threads, points_file=points_path.name,
                                     extra_provenance=extra_provenance)
    profile["operations"].update(extra_operations or {})
    header = (f"# {name}: MEASURED by `moesim calibrate` ({environment.get('device')}); every point is in "
              f"{points_path.name}.\n# Units: seconds, bytes; *_gbps = GB/s. See provenance for the environment, "
              f"load average and fit errors.\n")
    text = header + yaml.safe_dump(profile, sort_keys=False, width=120)
    parse_profile(text, origin=str(out))  # what we write must load
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    if not quiet:
        noisy = [r for r in points if r.get("cv") and float(r["cv"]) > 0.1]
        if noisy:
            print(f"warning: {len(noisy)} of {len(points)} points vary by more than 10% between repeats (CV > 0.1): "
                  f"the machine was loaded (see load_avg_1m in {points_path.name}); rerun with --fresh when idle",
                  file=sys.stderr)
        for op, mape in op_mape(summary).items():
            print(f"{op:18s} MAPE {mape:6.1%}", file=sys.stderr)
        for key, c in profile["provenance"].get("concurrent_copies", {}).items():
            if key.startswith("streams_"):
                print(f"{key.removeprefix('streams_')} copies at once: " + ", ".join(
                    f"{b / 2**20:.0f} MiB {g:.1f} GB/s ({x:.2f}x one)"
                    for b, g, x in zip(c["nbytes"], c["aggregate_gbps"], c["speedup_vs_one_copy"])), file=sys.stderr)
        print(f"wrote {out} ({len(points)} points in {points_path})", file=sys.stderr)
    return profile


# ---------------------------------------------------------------- profile show / compare


def _fmt_fit(fe: Any) -> str:
    if fe is None:
        return "no fit (datasheet)"
    mape = "" if fe.mean_rel_error is None else f"MAPE {fe.mean_rel_error:.1%}, "
    return f"{mape}median {fe.median_rel_error:.1%}, p95 {fe.p95_rel_error:.1%}, max {fe.max_rel_error:.1%} over {fe.num_points}"


def cmd_profile_show(args: argparse.Namespace) -> int:
    from sim.profile import OPERATIONS, load_profile

    p = load_profile(args.profile)
    prov = p.provenance
    print(f"profile {p.name} [source: {p.source}]")
    if prov.get("summary"):
        print(f"  {' '.join(str(prov['summary']).split())}")
    env = prov.get("environment") or {}
    if env:
        print(f"  measured on {env.get('cpu_model', '?')} with torch {env.get('torch', '?')}, {env.get('threads', '?')} "
              f"thread(s), load average at start {env.get('load_average_at_start')}")
    g = p.gpu
    peaks = ", ".join(f"{k} {v:g}" for k, v in g.peak_tflops.items())
    print(f"gpu   {g.name}: {g.memory_bytes / 2**30:.1f} GiB, peak TFLOP/s {peaks}, memory {g.memory_bandwidth_gbps:g} GB/s")
    h = p.links.host_to_device
    print(f"h2d   {h.bandwidth_gbps:g} GB/s + {h.latency_s * 1e6:.1f} us (pageable x{h.pageable_bandwidth_factor:g})"
          + (" - host memory copy, not PCIe" if "host_to_device" in prov else ""))
    print(f"cpu   {p.cpu.name}: {p.cpu.cores} cores, {p.cpu.peak_gflops:g} GFLOP/s, {p.cpu.memory_bandwidth_gbps:g} GB/s")
    for op in OPERATIONS:
        m = getattr(p.operations, op)
        if m.kind == "table":
            lo = min(r.tokens[0] for r in m.rows)
            hi = max(r.tokens[-1] for r in m.rows)
            e = m.extrapolation
            print(f"{op:18s} table: {len(m.rows)} shapes, tokens {lo}..{hi}; extrapolation fixed {e.fixed_s * 1e6:.1f} us, "
                  f"compute eff {e.compute_efficiency:.3g}, memory eff {e.memory_efficiency:.3g}; {_fmt_fit(m.fit_error)}")
        elif m.kind == "efficiency_table":
            dims = ", ".join(f"head dim {r.qk_head_dim}: tokens {r.tokens[0]}..{r.tokens[-1]}, compute eff "
                             f"{min(r.compute_efficiency):.3g}..{max(r.compute_efficiency):.3g}" for r in m.rows)
            print(f"{op:18s} efficiency table ({dims}), fixed {m.fixed_s * 1e6:.1f} us; {_fmt_fit(m.fit_error)}")
        elif m.kind == "roofline_by_head_dim":
            dims = "; ".join(f"head dim {r.qk_head_dim}: fixed {r.fixed_s * 1e6:.1f} us, compute eff "
                             f"{r.compute_efficiency:.3g}, memory eff {r.memory_efficiency:.3g}" for r in m.rows)
            print(f"{op:18s} roofline per head dim ({dims}); {_fmt_fit(m.fit_error)}")
        else:
            print(f"{op:18s} roofline: fixed {m.fixed_s * 1e6:.1f} us, compute eff {m.compute_efficiency:.3g}, "
                  f"memory eff {m.memory_efficiency:.3g}; {_fmt_fit(m.fit_error)}")
    _show_sections(p)
    for key in ("points_file", "licence"):
        if key in prov:
            print(f"{key}: {prov[key]}")
    _maybe_html(args, [(args.profile, p)], f"profile {p.name}")
    return 0


def _show_sections(p: Any) -> None:
    """The optional sections: grouped experts, CPU attention by threads, overheads, collectives."""
    ops = p.operations
    if ops.grouped_expert_ffn is not None:
        g = ops.grouped_expert_ffn
        r = g.rows[0]
        print(f"{'grouped_expert_ffn':18s} grouped table: {len(g.rows)} shape(s), experts {r.num_experts[0]}.."
              f"{r.num_experts[-1]} x tokens {r.tokens[0]}..{r.tokens[-1]}; {_fmt_fit(g.fit_error)}")
    if ops.cpu_attention_decode is not None:
        for r in ops.cpu_attention_decode.rows:
            print(f"{'cpu_attention':18s} {r.threads} thread(s): fixed {r.fixed_s * 1e6:.1f} us, "
                  f"{r.flops_per_s / 1e9:.3g} GFLOP/s, {r.bytes_per_s / 1e9:.3g} GB/s; batch {r.batch[0]}..{r.batch[1]}, "
                  f"context {r.context[0]}..{r.context[1]}; {_fmt_fit(r.fit_error)}")
    for op in ("layer_overhead", "expert_overhead", "iteration_overhead", "load_interference"):
        m = getattr(ops, op)
        if m is not None:
            terms = ", ".join(f"{k} {v:.3g}" for k, v in m.model_dump().items() if k != "fit_error")
            print(f"{op:18s} {terms}; {_fmt_fit(m.fit_error)}")
    c = p.collectives
    if c is None:
        print("collectives        none in this profile")
    elif c.skipped:
        print(f"collectives        {c.skipped}")
    else:
        kinds = sorted({r.kind for r in c.rows})
        gpus = sorted({r.num_gpus for r in c.rows})
        print(f"collectives        {c.backend}: {', '.join(kinds)} on {gpus} ranks, "
              f"{min(r.nbytes[0] for r in c.rows)}..{max(r.nbytes[-1] for r in c.rows)} bytes; {c.provenance}")


def _maybe_html(args: argparse.Namespace, profiles: list[tuple[str, Any]], title: str) -> None:
    if not getattr(args, "html", None):
        return
    from calibrate.profile_html import render_profiles

    out = render_profiles(profiles, Path(args.html), title)
    print(f"wrote {out}", file=sys.stderr)


def _probes(p: Any) -> dict[str, list[tuple[Any, Any]]]:
    """(size, shape) probes for each op of a profile: its measured table grids, else a fixed set."""
    from sim.profile import TableModel
    from sim.work import AttentionShape, ExpertShape, GemmShape

    out: dict[str, list[tuple[Any, Any]]] = {}
    for op in ("expert_ffn", "dense_gemm", "gate"):
        m = getattr(p.operations, op)
        probes = []
        if isinstance(m, TableModel):
            for r in m.rows:
                shape = (ExpertShape if op == "expert_ffn" else GemmShape)(**r.shape)
                probes += [(t, shape) for t in r.tokens]
        out[op] = probes
    attn = AttentionShape(num_heads=16, qk_head_dim=128, v_head_dim=128, kv_bytes_per_token=8192)
    out["attention_decode"] = [((b, c), attn) for b in (1, 4, 16) for c in (256, 1024, 4096)]
    out["attention_prefill"] = [(n, attn) for n in (32, 128, 512, 1024)]
    out["host_to_device"] = [(mb * 2**20, None) for mb in (1, 4, 16, 64, 256)]
    return out


def _lookup(p: Any, op: str, size: Any, shape: Any) -> float:
    if op == "expert_ffn":
        return float(p.expert_ffn_s(tokens=size, shape=shape))
    if op == "dense_gemm":
        return float(p.dense_gemm_s(tokens=size, shape=shape))
    if op == "gate":
        return float(p.gate_s(tokens=size, shape=shape))
    if op == "attention_decode":
        b, c = size
        return float(p.attention_decode_s(context_tokens=[c] * b, shape=shape))
    if op == "attention_prefill":
        return float(p.attention_prefill_s(new_tokens=size, context_tokens=0, shape=shape))
    return float(p.h2d_copy_s(nbytes=size))


def compare_profiles(a: Any, b: Any) -> dict[str, dict[str, float]]:
    """Per op: relative difference (B / A - 1) of the two profiles' lookups at both profiles' probe sizes."""
    import numpy as np

    pa, pb = _probes(a), _probes(b)
    out = {}
    for op in pa:
        seen, diffs = set(), []
        for size, shape in pa[op] + pb[op]:
            key = (repr(size), repr(shape))
            if key in seen:
                continue
            seen.add(key)
            try:
                diffs.append(_lookup(b, op, size, shape) / _lookup(a, op, size, shape) - 1.0)
            except Exception:  # a dtype one profile lacks: not comparable at this probe
                continue
        if diffs:
            d = np.abs(np.asarray(diffs))
            out[op] = {"num_probes": len(diffs), "median_abs_diff": float(np.median(d)),
                       "p95_abs_diff": float(np.quantile(d, 0.95)), "max_abs_diff": float(np.max(d)),
                       "mean_diff": float(np.mean(diffs))}
    return out


def cmd_profile_compare(args: argparse.Namespace) -> int:
    from sim.profile import load_profile

    a, b = load_profile(args.a), load_profile(args.b)
    print(f"B = {b.name} [{b.source}] vs A = {a.name} [{a.source}]: relative difference B/A - 1 at measured sizes")
    print(f"{'operation':18s} {'probes':>6s} {'median |diff|':>14s} {'P95 |diff|':>11s} {'max |diff|':>11s} "
          f"{'mean diff':>10s}")
    for op, s in compare_profiles(a, b).items():
        print(f"{op:18s} {s['num_probes']:6d} {s['median_abs_diff']:14.1%} {s['p95_abs_diff']:11.1%} "
              f"{s['max_abs_diff']:11.1%} {s['mean_diff']:+10.1%}")
    _maybe_html(args, [(args.a, a), (args.b, b)], f"profiles compared: A = {a.name}, B = {b.name}")
    return 0
