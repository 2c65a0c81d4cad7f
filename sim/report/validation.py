"""The validation report, from a folder ``moesim validate`` wrote: one renderer for the report ``validate``
writes (``report.html``), the text it prints, and ``moesim report FOLDER``.

Everything comes from the folder's files: ``summary.json`` (verdict, bounds, metrics), ``comparison.csv`` (per
request, runtime against simulator) and, when present, the run's ``runtime_iterations.csv``,
``sim_iterations.csv`` and ``same_batch_iterations.csv`` (for a repeated validation, those of the median run's
``run-K/``). A folder written by an older version, lacking some metrics or tables, renders what it has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.report.plots import _png, plt  # plots sets the Agg backend before pyplot loads

# The runtime's per-iteration time categories; the simulator's same-batch prediction has ``sim_<name>`` for each.
BREAKDOWN = ("attention_s", "gate_s", "expert_compute_s", "load_wait_s", "lm_head_s", "other_s")


def _has_breakdown(same_batch: pd.DataFrame | None) -> bool:
    """Whether a same-batch table has every category on both sides (older folders may lack some)."""
    return same_batch is not None and all(c in same_batch and f"sim_{c}" in same_batch for c in BREAKDOWN)


def _has(m: dict[str, Any], *keys: str) -> bool:
    return all(m.get(k) is not None for k in keys)


def validation_text(summary: dict[str, Any]) -> str:
    """The plain-text summary ``moesim validate`` prints and the report shows: errors, decisions, diagnostics,
    every run of a repeated validation, the bounds and the verdict."""
    m = summary.get("metrics", {})
    scale = summary.get("time_scale", 1.0)
    lines = [f"validate {summary.get('scenario')} (profile {summary.get('profile')}): {m.get('num_requests', '?')} "
             f"requests, routers {summary.get('routers', '?')}, {summary.get('prompts', '?')} prompts"
             + (f", arrival times x{scale:g}" if scale != 1.0 else "")]
    lines.append(f"{'metric':22s} {'median APE':>11s} {'P95 APE':>9s} {'median bias':>12s}")
    for k in ("e2e", "ttft", "tpot"):
        if _has(m, f"{k}_ape_median", f"{k}_ape_p95", f"{k}_bias_median"):
            lines.append(f"{k:22s} {m[k + '_ape_median']:11.1%} {m[k + '_ape_p95']:9.1%} {m[k + '_bias_median']:+12.1%}")
    if _has(m, "throughput_real_tok_s", "throughput_sim_tok_s", "throughput_error"):
        lines.append(f"{'throughput tok/s':22s} runtime {m['throughput_real_tok_s']:.1f}, simulator "
                     f"{m['throughput_sim_tok_s']:.1f} (error {m['throughput_error']:.1%})")
    if _has(m, "hits_real", "misses_real", "hits_sim", "misses_sim"):
        lines.append(f"{'free-running hits/miss':22s} runtime {m['hits_real']} / {m['misses_real']}, simulator "
                     f"{m['hits_sim']} / {m['misses_sim']}")
    if _has(m, "same_batch_hits_real", "same_batch_iteration_ape_median", "same_batch_total_time_bias"):
        lines.append(f"{'same batches':22s} hits/misses runtime {m['same_batch_hits_real']} / "
                     f"{m['same_batch_misses_real']}, simulator {m['same_batch_hits_sim']} / {m['same_batch_misses_sim']}; "
                     f"iteration time APE median {m['same_batch_iteration_ape_median']:.1%}, P95 "
                     f"{m['same_batch_iteration_ape_p95']:.1%}, total {m['same_batch_total_time_bias']:+.1%}")
    if m.get("same_batch_bias_by_quarter"):
        lines.append(f"{'same batches by time':22s} total error in each quarter of the run "
                     + " ".join(f"{b:+.1%}" for b in m["same_batch_bias_by_quarter"])
                     + " (a spread here is the machine's speed drifting during the run)")
    change = m.get("speed_probe_change")
    if change:
        lines.append(f"{'machine speed probe':22s} expert FFN probe vs at calibration: {change['before_serving']:+.1%} "
                     f"before serving, {change['after_serving']:+.1%} after (+ = the machine ran slower; the same-batch "
                     f"error moves the other way when the machine drifted)")
    if m.get("same_batch_prefetch_hits_real"):
        lines.append(f"{'prefetch hits':22s} runtime {m['same_batch_prefetch_hits_real']}, simulator "
                     f"{m['same_batch_prefetch_hits_sim']} (same batches)")
    if _has(m, "iterations_real", "mean_iteration_real_s", "iterations_sim", "mean_iteration_sim_s"):
        lines.append(f"{'iterations':22s} runtime {m['iterations_real']} (mean {m['mean_iteration_real_s'] * 1e3:.2f} ms), "
                     f"simulator {m['iterations_sim']} (mean {m['mean_iteration_sim_s'] * 1e3:.2f} ms)")
    b = m.get("breakdown_real_s")
    if b and b.get("duration_s"):
        lines.append("runtime time split    " + ", ".join(
            f"{k.removesuffix('_s')} {v / b['duration_s']:.0%}" for k, v in b.items()
            if k not in ("duration_s", "copy_busy_s", "copy_dispatch_s")))
    ce = m.get("same_batch_copy_engine_s")
    if ce and ce.get("loads"):
        lines.append(f"{'copy engine':22s} {ce['loads']} loads; runtime copying {ce['runtime_copy_busy']:.2f} s, queued with "
                     f"the copy thread free {ce['runtime_dispatch']:.2f} s, compute waiting {ce['runtime_load_wait']:.2f} s; "
                     f"simulator copying {ce['simulator_copy_busy']:.2f} s, stalled {ce['simulator_stall']:.2f} s")
    es = m.get("error_structure", {})
    if "service_ape_median" in es:
        lines.append(f"{'error structure':22s} service (its iterations, same batches) APE median {es['service_ape_median']:.1%}, "
                     f"P95 {es['service_ape_p95']:.1%}; e2e APE short half {es['e2e_ape_median_short_half']:.1%}, long half "
                     f"{es['e2e_ape_median_long_half']:.1%}; queueing excess P95 {es['closed_loop_excess_p95']:.1%}")
    la = m.get("load_average_serving")
    if la:
        lines.append(f"{'load average':22s} {la['before'][0]:.2f} before serving, {la['after'][0]:.2f} after (1-minute)")
    rep = m.get("repeats")
    if rep:
        lines.append(f"the figures above are run {rep['median_run']} of {len(rep['runs'])} (the median run); every run:")
        for r in rep["runs"]:
            lines.append(f"  run {r['run']}: e2e APE median {r['e2e_ape_median']:.1%}, P95 {r['e2e_ape_p95']:.1%} "
                         f"(bias {r['e2e_bias_median']:+.1%}), throughput error {r['throughput_error']:.1%}, same batches "
                         f"{r['same_batch_total_time_bias']:+.1%}, iterations {r['iterations_real']} / {r['iterations_sim']}"
                         + (f", speed probe {r['speed_probe_change']['before_serving']:+.1%} / "
                            f"{r['speed_probe_change']['after_serving']:+.1%}" if r.get("speed_probe_change") else ""))
        med = rep["median_over_runs"]
        lines.append(f"  median over runs (judged): e2e APE median {med['e2e_ape_median']:.1%}, P95 {med['e2e_ape_p95']:.1%}, "
                     f"throughput error {med['throughput_error']:.1%}")
    bounds = summary.get("bounds", {})
    if _has(bounds, "median_e2e_ape", "p95_e2e_ape", "throughput_error"):
        lines.append(f"bounds{' (quick)' if summary.get('quick') else ''}: median e2e <= {bounds['median_e2e_ape']:.0%}, "
                     f"P95 <= {bounds['p95_e2e_ape']:.0%}, throughput <= {bounds['throughput_error']:.0%}, "
                     f"identical hits/misses")
    lines.append("PASS" if summary.get("passed") else "FAIL: " + "; ".join(summary.get("failures", [])))
    return "\n".join(lines)


def validation_figures(comparison: pd.DataFrame, real_it: pd.DataFrame | None, sim_it: pd.DataFrame | None,
                       same_batch: pd.DataFrame | None) -> list[tuple[str, str]]:
    """(title, base64 PNG) pairs: predicted-vs-measured scatter plots; with the run's iteration tables, the
    timelines and the per-iteration breakdown side by side; with the service error, the error structure."""
    out = []
    c = comparison
    shown = [m for m in ("e2e", "ttft", "tpot") if f"{m}_s_real" in c and f"{m}_s_sim" in c]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.8), squeeze=False)
        for ax, m in zip(axes[0], shown):
            real, sim = c[f"{m}_s_real"], c[f"{m}_s_sim"]
            ax.scatter(real, sim, s=12)
            hi = float(np.nanmax([real.max(), sim.max()])) * 1.05
            ax.plot([0, hi], [0, hi], "k--", lw=0.8)
            ax.set_xlabel(f"measured {m} (s)")
            ax.set_ylabel(f"predicted {m} (s)")
        out.append(("Predicted vs measured, per request", _png(fig)))

    if real_it is not None and sim_it is not None and {"arrived_at_s", "finished_at_s_real", "finished_at_s_sim"} <= set(c):
        fig, axes = plt.subplots(2, 1, figsize=(12, 6.5))
        ax = axes[0]
        ax.plot(real_it["started_at_s"], real_it["duration_s"] * 1e3, ".-", lw=0.6, ms=3, label="runtime")
        ax.plot(sim_it["started_at_s"], sim_it["duration_s"] * 1e3, ".-", lw=0.6, ms=3, label="simulator")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("iteration (ms)")
        ax.legend(loc="upper right")
        ax = axes[1]
        # Each side from its own arrival: in a closed loop the simulator sends a request when its own earlier
        # answer comes (``arrived_at_s_sim``; older folders have only the runtime's).
        sim_arrived = c["arrived_at_s_sim"] if "arrived_at_s_sim" in c else c["arrived_at_s"]
        for i, (arrived, sim_at, real_end, sim_end) in enumerate(zip(c["arrived_at_s"], sim_arrived,
                                                                     c["finished_at_s_real"], c["finished_at_s_sim"])):
            ax.plot([arrived, real_end], [i - 0.15, i - 0.15], color="C0", lw=2)
            ax.plot([sim_at, sim_end], [i + 0.15, i + 0.15], color="C1", lw=2)
        ax.set_xlabel("time (s): arrival to last token (blue runtime, orange simulator)")
        ax.set_ylabel("request")
        out.append(("Timelines: iteration durations, and each request from arrival to finish", _png(fig)))

    if _has_breakdown(same_batch):
        n = min(len(same_batch), 80)
        fig, ax = plt.subplots(figsize=(12, 4))
        x = np.arange(n)
        bottom_r = np.zeros(n)
        bottom_s = np.zeros(n)
        for j, col in enumerate(BREAKDOWN):
            r = same_batch[col].to_numpy()[:n] * 1e3
            s = same_batch[f"sim_{col}"].to_numpy()[:n] * 1e3
            ax.bar(x - 0.2, r, 0.4, bottom=bottom_r, color=f"C{j}", label=col.removesuffix("_s"))
            ax.bar(x + 0.2, s, 0.4, bottom=bottom_s, color=f"C{j}", hatch="//", edgecolor="white", lw=0)
            bottom_r += r
            bottom_s += s
        ax.set_xlabel(f"iteration (first {n}; left bar runtime, hatched right bar simulator on the same batch)")
        ax.set_ylabel("ms")
        ax.legend(ncol=6, fontsize=8, loc="upper right")
        out.append(("Per-iteration time breakdown, side by side", _png(fig)))

    if {"service_error", "e2e_error", "misses_per_iteration", "e2e_s_real"} <= set(c):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        ax = axes[0]
        sc = ax.scatter(c["e2e_s_real"], c["e2e_error"] * 100, c=c["misses_per_iteration"], s=14, cmap="viridis")
        fig.colorbar(sc, ax=ax, label="misses per iteration it was in")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("measured e2e (s)")
        ax.set_ylabel("e2e error (%)")
        ax = axes[1]
        ax.scatter(c["service_error"] * 100, c["e2e_error"] * 100, s=14)
        lo = float(min(c["service_error"].min(), c["e2e_error"].min())) * 100
        hi = float(max(c["service_error"].max(), c["e2e_error"].max())) * 100
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("service error: its iterations, same batches (%)")
        ax.set_ylabel("e2e error, free-running replay (%)")
        out.append(("Error structure: which requests, and cost model vs queueing feedback", _png(fig)))
    return out


def breakdown_table(same_batch: pd.DataFrame) -> pd.DataFrame:
    """Seconds of each time category over all iterations, runtime against the simulator on the same batches."""
    table = pd.DataFrame({"runtime": [float(same_batch[c].sum()) for c in BREAKDOWN],
                          "simulator": [float(same_batch[f"sim_{c}"].sum()) for c in BREAKDOWN]},
                         index=[c.removesuffix("_s") for c in BREAKDOWN])
    table.loc["iteration total"] = [float(same_batch["duration_s"].sum()), float(same_batch["predicted_s"].sum())]
    return table


def run_tables_folder(folder: Path, summary: dict[str, Any]) -> Path:
    """Where the run's iteration tables are: the folder itself, or for a repeated validation its median run's."""
    rep = summary.get("metrics", {}).get("repeats")
    if rep:
        run = folder / f"run-{rep['median_run']}"
        return run if run.is_dir() else Path(rep["runs"][rep["median_run"] - 1]["folder"])
    return folder


def _optional_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def validation_context(folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """What the template shows, read from the folder."""
    comparison = pd.read_csv(folder / "comparison.csv")
    tables = run_tables_folder(folder, summary)
    same_batch = _optional_csv(tables / "same_batch_iterations.csv")
    breakdown = None
    if _has_breakdown(same_batch) and {"duration_s", "predicted_s"} <= set(same_batch):
        breakdown = breakdown_table(same_batch)
    figures = validation_figures(comparison, _optional_csv(tables / "runtime_iterations.csv"),
                                 _optional_csv(tables / "sim_iterations.csv"), same_batch)
    return {"text": validation_text(summary), "figures": figures,
            "breakdown": None if breakdown is None else breakdown.reset_index(names="category").to_dict("records")}
