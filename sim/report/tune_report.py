"""The HTML report of ``moesim tune``: best configuration, throughput over k and batch, per-iteration breakdown.

Figures are drawn from the tune folder's own tune.json (estimates and simulated results); nothing is
estimated here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sim import __version__
from sim.report import plots
from sim.report.plots import plt
from sim.report.render import _environment, _read_json, _write

_BREAKDOWN = (("iter_h2d_weights_s", "host-to-device weights"), ("iter_gpu_moe_s", "GPU MoE"),
              ("iter_gpu_other_s", "GPU other"), ("iter_cpu_attention_s", "CPU attention"),
              ("iter_cpu_experts_s", "CPU experts"), ("iter_act_transfer_s", "activations over PCIe"),
              ("iter_draft_s", "draft model"))


def throughput_curves(table: pd.DataFrame, x: str) -> str:
    """Simulated (solid) and roofline-estimated (dashed) throughput against ``x``, one colour per strategy:
    the best configuration of each strategy at each value of ``x``."""
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for i, (strategy, rows) in enumerate(table.groupby("strategy", sort=False)):
        colour = f"C{i}"
        est = rows.groupby(x)["estimate_tokens_per_s"].max()
        ax.plot(est.index, est.values, ls="--", color=colour, alpha=0.6, label=f"{strategy} (roofline)")
        if "sim_tokens_per_s" in rows:
            sim = rows.dropna(subset=["sim_tokens_per_s"]).groupby(x)["sim_tokens_per_s"].max()
            ax.plot(sim.index, sim.values, marker="o", color=colour, label=f"{strategy} (simulated)")
    ax.set_xlabel({"k": "draft length k", "batch": "batch (max_num_seqs)"}.get(x, x))
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return plots._png(fig)


def breakdown_bars(rows: pd.DataFrame) -> str:
    """Mean seconds per decode iteration by resource/kind (busy time: they overlap when pipelined)."""
    fig, ax = plt.subplots(figsize=(12, 3.6))
    labels = [f"{r.strategy} k={r.k} b={r.batch} m={r.micro_batches}" for r in rows.itertuples()]
    width = 0.8 / len(_BREAKDOWN)
    for i, (col, name) in enumerate(_BREAKDOWN):
        values = rows[col].fillna(0.0).to_numpy() if col in rows else [0.0] * len(rows)
        ax.bar([j + i * width for j in range(len(rows))], values, width=width, label=name, color=f"C{i}")
    if "sim_decode_iteration_s" in rows:
        ax.scatter([j + 0.4 - width / 2 for j in range(len(rows))], rows["sim_decode_iteration_s"], color="k",
                   marker="_", s=400, label="iteration (wall)", zorder=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("seconds per decode iteration")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=4)
    return plots._png(fig)


def decode_breakdown_over_time(iterations: pd.DataFrame) -> str:
    """Busy seconds of each kind of work per decode iteration of one run, against simulated time."""
    decode = iterations[iterations["num_prefill_seqs"] == 0]
    fig, ax = plt.subplots(figsize=(13, 3.4))
    for i, (col, name) in enumerate(_BREAKDOWN):
        column = col.removeprefix("iter_")
        if column in decode and decode[column].any():
            ax.plot(decode["started_at_s"], decode[column], lw=1, color=f"C{i}", label=name)
    ax.plot(decode["started_at_s"], decode["duration_s"], lw=1.5, color="k", label="iteration")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("seconds per decode iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    return plots._png(fig)


def render_tune_report(tune_dir: Path, out: Path | None = None) -> Path:
    tune_dir = Path(tune_dir)
    result = _read_json(tune_dir, "tune.json", "a tune folder", "moesim tune SCENARIO")
    table = pd.DataFrame(result["table"])
    feasible = table[table["infeasible"].fillna("") == ""]
    simulated = feasible[feasible.get("sim_tokens_per_s", pd.Series(dtype=float)).notna()] if "sim_tokens_per_s" in feasible else feasible.iloc[:0]
    best_per_strategy = (simulated.loc[simulated.groupby("strategy", sort=False)["sim_tokens_per_s"].idxmax()]
                         if len(simulated) else simulated)
    spec_rows = simulated[simulated["strategy"] == "specmoeoff"]
    spec_best_per_k = (spec_rows.loc[spec_rows.groupby("k")["sim_tokens_per_s"].idxmax()] if len(spec_rows) else spec_rows)
    figures = {
        "k": throughput_curves(feasible, "k"),
        "batch": throughput_curves(feasible, "batch"),
        "strategies": breakdown_bars(best_per_strategy) if len(best_per_strategy) else None,
        "per_k": breakdown_bars(spec_best_per_k) if len(spec_best_per_k) else None,
    }
    columns = [c for c in ("strategy", "k", "batch", "micro_batches", "max_batch_in_memory", "estimate_tokens_per_s",
                           "estimate_bound", "sim_tokens_per_s", "sim_emitted_per_seq_step", "sim_decode_iteration_s",
                           "sim_tpot_p50_s", "infeasible") if c in table]

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    html = _environment().get_template("tune.html.j2").render(
        result=result, columns=columns, rows=[[fmt(r.get(c)) for c in columns] for r in result["table"]],
        best=result["best"], figures=figures, version=__version__, tune_dir=str(tune_dir), fmt=fmt,
    )
    return _write(html, Path(out) if out else tune_dir / "report.html")


__all__ = ["render_tune_report", "decode_breakdown_over_time"]
