"""Render a run, sweep or plan folder into one self-contained HTML file (Jinja2 with autoescaping;
plots inlined as base64 PNGs, no scripts, nothing fetched)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from sim import __version__
from sim.errors import MoesimError
from sim.report import plots
from sim.report.sections import RunData, run_sections


def _read_table(folder: Path, stem: str) -> pd.DataFrame:
    for suffix, reader in ((".parquet", pd.read_parquet), (".csv", pd.read_csv)):
        path = folder / f"{stem}{suffix}"
        if path.exists():
            return reader(path)
    raise MoesimError(f"{folder}: not a run folder: {stem}.csv (or .parquet) is missing")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sim.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    env.globals.update(
        pct=lambda v: "-" if v is None else f"{v:.1%}",
        gb=lambda v: "-" if v is None else f"{v / 1e9:,.2f}",
        secs=lambda v: "-" if v is None else (f"{v * 1e3:,.1f} ms" if v < 1 else f"{v:,.2f} s"),
    )
    return env


def _read_json(folder: Path, name: str, what: str, how: str) -> dict[str, Any]:
    """A folder's JSON file, with one-line errors that say how to make the folder."""
    path = folder / name
    if not path.exists():
        raise MoesimError(f"{folder}: not {what} (no {name}); make one with `{how}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def render_run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default: RUN_DIR/report.html) from a run folder written by ``moesim simulate --out``."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir, "summary.json", "a run folder", "moesim simulate --out DIR")
    requests = _read_table(run_dir, "requests")
    iterations = _read_table(run_dir, "iterations")
    figures = {
        "latency": plots.latency_cdfs(requests, summary["slo"]),
        "throughput": plots.throughput_over_time(requests),
        "latency_vs_load": plots.latency_vs_load(requests, summary["slo"]),
        "memory": plots.memory_over_time(iterations, summary["memory"]),
        "utilisation": plots.utilisation_over_time(iterations),
        "breakdown": plots.iteration_breakdown(iterations),
    }
    if "h2d_weights_s" in iterations:  # speculative decoding / CPU offloading (sim.engine.offload)
        from sim.report.tune_report import decode_breakdown_over_time

        figures["offload"] = decode_breakdown_over_time(iterations)
    if "faults" in summary:
        figures["faults"] = plots.fault_timeline(summary["faults"], summary["slo"])
    if "expert_parallel" in summary:
        figures["ep_breakdown"] = plots.ep_layer_breakdown(_read_table(run_dir, "ep_layers"))
        figures["ep_heatmap"] = plots.ep_imbalance_heatmap(_read_table(run_dir, "ep_device_tokens"))
    html = _environment().get_template("run.html.j2").render(
        summary=summary,
        figures=figures,
        sections=run_sections(RunData(run_dir, summary, requests, iterations)),
        version=__version__,
        run_dir=str(run_dir),
        scenario_text=(run_dir / "scenario.resolved.yaml").read_text() if (run_dir / "scenario.resolved.yaml").exists() else "",
        provenance_text=(run_dir / "profile.provenance.yaml").read_text() if (run_dir / "profile.provenance.yaml").exists() else "",
    )
    return _write(html, Path(out) if out else run_dir / "report.html")


def _write(html: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out


def render_report(folder: Path, out: Path | None = None) -> Path:
    """Whichever report the folder holds: a plan (plan.json), a sweep (sweep.csv) or a run (summary.json)."""
    folder = Path(folder)
    if (folder / "tune.json").exists():
        from sim.report.tune_report import render_tune_report

        return render_tune_report(folder, out)
    if (folder / "plan.json").exists():
        return render_plan_report(folder, out)
    if (folder / "sweep.csv").exists():
        return render_sweep_report(folder, out)
    if (folder / "comparison.csv").exists() and (folder / "summary.json").exists():
        return render_validation_report(folder, out)
    return render_run_report(folder, out)


def render_validation_report(folder: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default: FOLDER/report.html, the report ``moesim validate`` itself writes) from a folder
    written by ``moesim validate``: the verdict, every run, the summary it printed, the same-batch time
    breakdown and the figures (``sim.report.validation``)."""
    from sim.report.validation import validation_context

    folder = Path(folder)
    summary = _read_json(folder, "summary.json", "a validation folder", "moesim validate SCENARIO")
    html = _environment().get_template("validation.html.j2").render(
        summary=summary, version=__version__, folder=str(folder), **validation_context(folder, summary))
    return _write(html, Path(out) if out else folder / "report.html")


def render_plan_report(plan_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default: PLAN_DIR/report.html) from a folder written by ``moesim plan``."""
    plan_dir = Path(plan_dir)
    plan = _read_json(plan_dir, "plan.json", "a plan folder", "moesim plan")
    table = pd.DataFrame(plan["table"])
    figures = {
        "pareto": plots.plan_pareto(table, plan["target_rate_per_s"]),
        "load": plots.plan_load_curves(plan["candidates"], plan["slo"].get("ttft_p99_s"), plan["target_rate_per_s"]),
    }
    html = _environment().get_template("plan.html.j2").render(
        plan=plan, rows=plan["table"], axes=plan["axes"], figures=figures, version=__version__, plan_dir=str(plan_dir),
        slo_text=", ".join(f"{k} = {v}" for k, v in plan["slo"].items() if v is not None and v != {}),
        num=lambda v, f="{:.3g}": "-" if v is None else f.format(v),
    )
    return _write(html, Path(out) if out else plan_dir / "report.html")


SWEEP_METRICS = ["requests_per_s", "output_tokens_per_s", "ttft_p99_s", "tbt_p99_s", "e2e_p99_s", "hit_rate", "slo_attainment", "preemptions",
                 "e2e_p50_s", "routing_fidelity", "h2d_gb", "ep_moe_s_per_kpair", "ep_dropped_fraction", "ep_exposed_comm_s"]


def render_sweep_report(sweep_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default: SWEEP_DIR/report.html) from a folder written by ``moesim sweep``."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "sweep.csv"
    if not path.exists():
        raise MoesimError(f"{sweep_dir}: not a sweep folder (no sweep.csv); make one with `moesim sweep`")
    table = pd.read_csv(path)
    columns = list(table.columns)
    axes = columns[columns.index("point") + 1: columns.index("key")]  # sweep.csv: point, axes..., key, metrics...
    metrics = [m for m in SWEEP_METRICS if m in table and table[m].notna().any()]
    figure = plots.sweep_metrics(table, axes, metrics) if axes and metrics else None
    # A policy comparison (variants) also gets the memory / latency / fidelity trade-off.
    tradeoff = plots.offload_tradeoff(table) if "variant" in axes and "expert_fraction" in table else None
    gamma_axes = [a for a in axes if a.endswith(".gamma")]
    if gamma_axes and "ep_moe_s_per_kpair" in table and table["ep_moe_s_per_kpair"].notna().any():
        speedup = plots.speedup_vs_gamma(table, gamma_axes[0], [a for a in axes if a != gamma_axes[0]])
    else:
        speedup = None
    shown = table.drop(columns=["key"])
    html = _environment().get_template("sweep.html.j2").render(
        name=sweep_dir.name, axes=axes, columns=list(shown.columns),
        rows=[["-" if pd.isna(v) else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row] for row in shown.itertuples(index=False)],
        figure=figure, tradeoff=tradeoff, speedup=speedup, version=__version__, sweep_dir=str(sweep_dir),
    )
    return _write(html, Path(out) if out else sweep_dir / "report.html")
