"""Render a run folder into one self-contained HTML file (Jinja2 with autoescaping; plots inlined)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from sim import __version__
from sim.errors import MoesimError
from sim.report import plots


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


def render_run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default: RUN_DIR/report.html) from a run folder written by ``moesim simulate --out``."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise MoesimError(f"{run_dir}: not a run folder (no summary.json); make one with `moesim simulate --out DIR`")
    try:
        summary: dict[str, Any] = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{summary_path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    requests = _read_table(run_dir, "requests")
    iterations = _read_table(run_dir, "iterations")
    figures = {
        "latency": plots.latency_cdfs(requests, summary["slo"]),
        "throughput": plots.throughput_over_time(requests),
        "memory": plots.memory_over_time(iterations, summary["memory"]),
        "utilisation": plots.utilisation_over_time(iterations),
        "breakdown": plots.iteration_breakdown(iterations),
    }
    html = _environment().get_template("run.html.j2").render(
        summary=summary,
        figures=figures,
        version=__version__,
        run_dir=str(run_dir),
        scenario_text=(run_dir / "scenario.resolved.yaml").read_text() if (run_dir / "scenario.resolved.yaml").exists() else "",
        provenance_text=(run_dir / "profile.provenance.yaml").read_text() if (run_dir / "profile.provenance.yaml").exists() else "",
    )
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out
