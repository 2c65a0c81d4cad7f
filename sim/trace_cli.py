"""``moesim trace``: convert, inspect and fit expert-routing traces.

    moesim trace convert JSONL PARQUET --model NAME   speculative-moe JSONL -> canonical Parquet
    moesim trace stats ROUTING [--out DIR]            statistics, hit-rate curves (JSON + PNG)
    moesim trace fit-routing ROUTING --out YAML       parameters of the fitted routing generator
    moesim trace fit TRACE [--out gen.yaml]           fit an arrival generator to a request trace

ROUTING is a canonical Parquet trace or a speculative-moe JSONL table. Errors are MoesimErrors, so
``sim.cli.main`` prints them as one line and exits 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sim.errors import TraceError


def _meta_for_model(name: str):
    from sim.spec import get_model
    from sim.workload.routing_trace import RoutingTraceMeta

    spec = get_model(name)
    return RoutingTraceMeta(model=name, num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k)


def _load(path: str, model: str | None):
    from sim.workload.routing_trace import load_any_routing

    meta = _meta_for_model(model) if model else None
    return load_any_routing(Path(path), model=model or "unknown", meta=meta)


def cmd_trace_convert(args: argparse.Namespace) -> int:
    from sim.workload.routing_trace import RoutingTrace, import_speculative_moe_jsonl, write_routing_trace

    meta = _meta_for_model(args.model)
    trace = import_speculative_moe_jsonl(Path(args.jsonl), meta)
    if args.no_gates:
        trace = RoutingTrace(trace.meta, [type(s)(s.request_id, s.experts, s.positions, None, s.task) for s in trace.sequences])
    out = Path(args.parquet)
    try:
        write_routing_trace(out, trace)
    except OSError as exc:
        raise TraceError(f"{out}: cannot write ({exc.strerror})") from None
    size = out.stat().st_size
    n = trace.num_token_layers
    print(f"wrote {out}: {len(trace.sequences)} requests, {n:,} token-layers, {size:,} bytes "
          f"({size / max(n, 1):.2f} bytes per token-layer)")
    return 0


def _summary_lines(stats: dict) -> list[str]:
    pop, per = stats["popularity"]["overall"], stats["persistence"]["overall"]
    hr = stats["hit_rate"]
    lines = [
        f"{stats['requests']} requests, {stats['tokens']:,} tokens, {stats['num_layers']} MoE layers, "
        f"{stats['num_experts']} experts, top-{stats['top_k']}",
        f"popularity      entropy {pop['entropy']:.3f} (1 = uniform), max/mean {pop['max_over_mean']:.2f}, Gini {pop['gini']:.3f}",
        "load imbalance  " + ", ".join(
            f"max/mean {li['overall']:.2f} per {li['batch_tokens']} tokens" for li in stats["load_imbalance"] if li["overall"]
        ),
        f"persistence     same expert set as previous token {per['same_set']:.3f}, overlap {per['overlap']:.3f}, "
        f"median reuse distance {stats['reuse_distance']['median_tokens']} tokens",
        f"transitions     layer l -> l+1 normalised MI {stats['layer_transitions']['overall']['normalized_mi']:.3f}, "
        f"P(top next expert) {stats['layer_transitions']['overall']['top1_next_probability']:.3f}",
        "prompt overlap  " + ", ".join(
            f"Jaccard {po['jaccard']:.3f} ({'all' if po['first_tokens'] is None else 'first ' + str(po['first_tokens'])} tokens)"
            for po in stats["prompt_overlap"] if po["jaccard"] is not None
        ),
    ]
    if stats["tasks"]["js_divergence"]:
        lines.append("tasks           " + ", ".join(f"JS({k}) {v:.3f}" for k, v in stats["tasks"]["js_divergence"].items()))
    lines.append("hit rate        slots/layer " + " ".join(f"{s:>5d}" for s in hr["sizes"]))
    for policy in ("LRU", "LFU", "static"):
        lines.append(f"  {policy:6s}                  " + " ".join(f"{x:5.3f}" for x in hr[policy]["overall"]))
    return lines


def cmd_trace_stats(args: argparse.Namespace) -> int:
    from sim.workload.routing_stats import plot_hit_rate_curves, plot_routing_stats, routing_stats

    trace = _load(args.routing, args.model)
    seqs = trace.sequences[: args.max_requests] if args.max_requests else trace.sequences
    if not seqs:
        raise TraceError(f"{args.routing}: no complete tokens to analyse")
    stats = routing_stats([s.experts for s in seqs], trace.meta.num_experts, tasks=[s.task for s in seqs])
    stats["trace"] = str(args.routing)
    stats["model"] = trace.meta.model
    for line in _summary_lines(stats):
        print(line)
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "routing_stats.json.tmp"
            tmp.write_text(json.dumps(stats, indent=1), encoding="utf-8")
            tmp.replace(out / "routing_stats.json")
        except OSError as exc:
            raise TraceError(f"{out}: cannot write ({exc.strerror})") from None
        plot_hit_rate_curves(stats["hit_rate"], out / "hit_rate.png", f"{trace.meta.model}: per-layer cache hit rate")
        plot_routing_stats(stats, out / "routing_stats.png", f"{trace.meta.model}: routing statistics")
        print(f"wrote {out / 'routing_stats.json'}, {out / 'hit_rate.png'} and {out / 'routing_stats.png'}")
    return 0


def cmd_trace_fit_routing(args: argparse.Namespace) -> int:
    from sim.workload.routing import fit_routing

    trace = _load(args.routing, args.model)
    if not trace.sequences:
        raise TraceError(f"{args.routing}: no complete tokens to fit")
    params = fit_routing([s.experts for s in trace.sequences], trace.meta.num_experts, trace.meta.model,
                         tasks=[s.task for s in trace.sequences])
    out = Path(args.out)
    try:
        out.write_text(params.to_yaml(), encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{out}: cannot write ({exc.strerror})") from None
    coupling = 0.0 if params.coupling is None or not len(params.coupling) else float(params.coupling.mean())
    tasks = ", ".join(params.task_popularity) if params.task_popularity else "none"
    print(f"wrote {out}: {trace.meta.model}, mean persistence {params.persistence.mean():.3f}, locality {params.locality}, "
          f"mean layer coupling {coupling:.3f}, task popularity for: {tasks}; "
          f"use it as workload.routing: {{kind: fitted, path: {out}}}")
    return 0


def cmd_trace_fit(args: argparse.Namespace) -> int:
    """Fit the arrival generator (sim.workload.arrival_fit) to a request trace and write it as YAML."""
    from sim.workload.arrival_fit import fit_arrivals
    from sim.workload.arrivals import ColumnMap, TraceFile, load_trace, shipped_traces

    fields: dict = {"path": args.trace, "on_bad_row": args.on_bad_row}
    if args.format:
        fields["format"] = args.format
    elif args.trace not in shipped_traces():
        suffix = Path(args.trace).name.lower().removesuffix(".gz")
        fields["format"] = "mooncake" if suffix.endswith(".jsonl") and not args.columns else (
            "parquet" if suffix.endswith(".parquet") else "jsonl" if suffix.endswith(".jsonl") else "csv")
        if fields["format"] == "csv" and not args.columns:
            fields["format"] = "azure2023"
    if args.columns:
        names = [c.strip() for c in args.columns.split(",")]
        if len(names) not in (3, 4):
            raise TraceError(f"--columns {args.columns!r}: expected ARRIVAL,PROMPT,OUTPUT[,TASK]")
        mapping = dict(zip(("arrival", "prompt_tokens", "output_tokens", "task"), names))
        fields["columns"] = ColumnMap(**mapping, prefix_blocks=args.prefix_column)
        fields["time_unit"] = args.time_unit or "s"
    elif args.prefix_column:
        raise TraceError("--prefix-column needs --columns (a csv / jsonl / parquet trace; mooncake reads hash_ids itself)")
    try:
        spec = TraceFile(**fields)
    except ValueError as exc:
        raise TraceError(f"{args.trace}: {str(exc).splitlines()[-1].strip()}") from None
    table = load_trace(spec, base_dir=Path.cwd())
    model = fit_arrivals(table.arrival_s, table.prompt_tokens, table.output_tokens, source=args.trace, window_s=args.window_s)
    rep = model.report
    print(f"{args.trace}: {model.num_requests:,} requests over {model.duration_s:.0f} s, {model.rate_per_s:.3f} req/s"
          + (f", {table.skipped_rows} broken rows skipped" if table.skipped_rows else ""))
    for title, key, chosen, name in (
        ("inter-arrival (whole trace)", "inter_arrival_families", model.stationary, model.stationary_family),
        (f"inter-arrival (under the {args.window_s:g}-s rate profile)", "inter_arrival_families_under_rate_profile",
         model.profiled, model.profiled.family),
    ):
        zeros = f"{chosen.zero_fraction:.1%} of gaps are 0, the others: " if chosen.zero_fraction else ""
        print(f"{title}: {zeros}mean {chosen.mean_s:.4g} s, CV {chosen.cv:.3f}; chosen {name}")
        for family, r in rep[key].items():
            mark = "*" if family == name else " "
            params = ", ".join(f"{k} {v:.4g}" for k, v in r["params"].items())
            print(f"  {mark} {family:11s} KS D {r['ks_d']:.4f}  log-lik {r['log_likelihood']:>10.1f}  ({params})")
    b = rep["burstiness"]
    print(f"burstiness: B {b['goh_barabasi_b']:.3f}, count dispersion per {args.window_s:g} s {b['count_dispersion']:.2f}")
    for name in ("prompt_tokens", "output_tokens"):
        q = rep[name]
        print(f"{name}: mean {q['mean']:.1f}, p10 {q['p10']:.0f}, p50 {q['p50']:.0f}, p90 {q['p90']:.0f}, p99 {q['p99']:.0f}")
    print(f"prompt/output rank correlation {model.length_rank_correlation:.3f}")
    if table.prefix_blocks is not None and table.prefix_offsets is not None:
        from sim.workload.prefix_reuse import prefix_reuse

        try:
            lru = [int(x) for x in args.prefix_lru_blocks.split(",")] if args.prefix_lru_blocks else []
        except ValueError:
            lru = [0]
        if any(c < 1 for c in lru):
            raise TraceError(f"--prefix-lru-blocks {args.prefix_lru_blocks!r}: expected whole numbers of blocks >= 1")
        reuse = prefix_reuse(table.prefix_blocks, table.prefix_offsets, lru)
        model.report["prefix_reuse"] = reuse
        print(f"prefix blocks: {reuse['blocks']:,} in prompts ({reuse['blocks_per_request_mean']:.1f} per request), "
              f"{reuse['distinct_blocks']:,} distinct; already seen earlier (infinite cache) "
              f"{reuse['reuse_infinite_cache']:.1%}"
              + "".join(f", LRU of {c:,} blocks {r:.1%}" for c, r in reuse["reuse_lru"].items()))
    if args.out:
        out = _write_yaml(args.out, model.to_dict())
        print(f"wrote {out}; use it as workload.arrivals: {{kind: fitted, path: {out}}}")
    if args.mmpp_out:
        out = _write_yaml(args.mmpp_out, model.mmpp_arrivals_spec())
        print(f"wrote {out}: the fitted MMPP-2 as a `kind: mmpp` workload.arrivals mapping")
    return 0


def _write_yaml(path: str, data: dict) -> Path:
    """Write ``data`` as YAML to ``path``; a path that cannot be written is a one-line TraceError."""
    import yaml

    out = Path(path)
    try:
        out.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120), encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{out}: cannot write ({exc.strerror})") from None
    return out


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``trace`` command group to the top-level parser's subcommands."""
    tr = sub.add_parser("trace", help="convert, inspect and fit expert-routing traces; fit arrival generators")
    trs = tr.add_subparsers(dest="trace_command", metavar="ACTION")

    p = trs.add_parser("convert", help="convert a speculative-moe JSONL routing table to the canonical Parquet trace")
    p.add_argument("jsonl", metavar="JSONL")
    p.add_argument("parquet", metavar="PARQUET")
    p.add_argument("--model", required=True, help="catalog model the routing was recorded from (checks its shape)")
    p.add_argument("--no-gates", action="store_true", help="drop the gate scores (about 4x smaller)")
    p.set_defaults(func=cmd_trace_convert)

    p = trs.add_parser("stats", help="routing statistics and LRU/LFU/static hit-rate curves")
    p.add_argument("routing", metavar="ROUTING", help="canonical Parquet trace or speculative-moe JSONL")
    p.add_argument("--out", metavar="DIR", help="write routing_stats.json and hit_rate.png here")
    p.add_argument("--model", help="catalog model, to check a JSONL table's shape")
    p.add_argument("--max-requests", type=int, metavar="N", help="analyse only the first N requests")
    p.set_defaults(func=cmd_trace_stats)

    p = trs.add_parser("fit-routing", help="fit the Markov routing generator to a routing trace (YAML)")
    p.add_argument("routing", metavar="ROUTING")
    p.add_argument("--out", required=True, metavar="YAML")
    p.add_argument("--model", help="catalog model, to check a JSONL table's shape")
    p.set_defaults(func=cmd_trace_fit_routing)

    p = trs.add_parser("fit", help="fit an arrival generator (gaps, rate profile, lengths) to a request trace (YAML)")
    p.add_argument("trace", metavar="TRACE", help="shipped trace name (azure-2023-conv, azure-2023-code) or a file")
    p.add_argument("--out", metavar="YAML", help="write the fitted generator here")
    p.add_argument("--format", choices=["azure2023", "mooncake", "csv", "jsonl", "parquet"],
                   help="default: shipped trace's own, mooncake for .jsonl, azure2023 for .csv")
    p.add_argument("--columns", metavar="ARRIVAL,PROMPT,OUTPUT[,TASK]", help="column names for csv / jsonl / parquet")
    p.add_argument("--time-unit", choices=["s", "ms", "us", "datetime"], help="unit of the arrival column (default s)")
    p.add_argument("--window-s", type=float, default=60.0, help="window of the rate profile (default 60 s)")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error", help="skip and count broken rows")
    p.add_argument("--mmpp-out", metavar="YAML", help="write the fitted MMPP-2 as a kind: mmpp arrivals mapping")
    p.add_argument("--prefix-column", metavar="NAME",
                   help="column with prefix-block ids (with --columns; mooncake traces use hash_ids)")
    p.add_argument("--prefix-lru-blocks", metavar="N[,N...]",
                   help="also report prefix reuse through an LRU cache of N blocks (each size given)")
    p.set_defaults(func=cmd_trace_fit)

    def usage(_args: argparse.Namespace) -> int:
        import sys

        tr.print_help(sys.stderr)
        return 2

    tr.set_defaults(func=usage)
