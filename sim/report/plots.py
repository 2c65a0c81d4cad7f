"""Figures of one run, each returned as an inlined PNG (base64), drawn with matplotlib's Agg backend.

Every figure is computed from the run folder's own tables; nothing is estimated here."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def latency_cdfs(requests: pd.DataFrame, slo: dict[str, Any]) -> str:
    """CDFs of TTFT, TPOT and end-to-end latency, with the SLO targets drawn where set."""
    done = requests[requests["status"] == "completed"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, column, label, target_key in (
        (axes[0], "ttft_s", "TTFT (s)", "ttft_p99_s"),
        (axes[1], "tpot_s", "time per output token (s)", "tbt_p99_s"),
        (axes[2], "e2e_s", "end-to-end (s)", "e2e_p95_s"),
    ):
        values = np.sort(done[column].dropna().to_numpy())
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size, color="#1f77b4")
        target = slo.get("targets", {}).get(target_key)
        if target:
            ax.axvline(target["target_s"], color="#d62728", linestyle="--", label=f"SLO {target_key}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    return _png(fig)


def _windows(iterations: pd.DataFrame, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    start = iterations["started_at_s"].to_numpy()
    end = start + iterations["duration_s"].to_numpy()
    edges = np.linspace(start.min(), end.max(), bins + 1) if len(start) else np.linspace(0, 1, bins + 1)
    return edges, np.digitize(start, edges[1:-1])


def throughput_over_time(requests: pd.DataFrame, bins: int = 60) -> str:
    """Arrivals and completions per second over the run."""
    fig, ax = plt.subplots(figsize=(13, 3))
    arrived = requests["arrived_at_s"].dropna().to_numpy()
    finished = requests.loc[requests["status"] == "completed", "finished_at_s"].to_numpy()
    hi = max(arrived.max() if arrived.size else 1.0, finished.max() if finished.size else 1.0)
    edges = np.linspace(0, hi, bins + 1)
    width = edges[1] - edges[0]
    ax.plot(edges[:-1], np.histogram(arrived, edges)[0] / width, label="arrivals / s")
    ax.plot(edges[:-1], np.histogram(finished, edges)[0] / width, label="completions / s")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("requests / s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def memory_over_time(iterations: pd.DataFrame, memory: dict[str, Any]) -> str:
    """GPU memory by kind over time: weights, resident experts, KV cache in use, reserve (replica 0)."""
    it = iterations[iterations["replica"] == 0]
    fig, ax = plt.subplots(figsize=(13, 3.2))
    t = it["started_at_s"].to_numpy()
    weights = np.full_like(t, memory["non_expert_weights_bytes"] / 1e9, dtype=float)
    experts = it["experts_resident"].to_numpy() * memory["expert_slot_bytes"] / 1e9
    kv = it["kv_blocks_used"].to_numpy() * memory["kv_block_bytes"] / 1e9
    reserve = np.full_like(t, memory["reserve_bytes"] / 1e9, dtype=float)
    if t.size:
        ax.stackplot(t, weights, experts, kv, reserve, labels=["weights", "experts", "KV cache", "reserve"], alpha=0.8)
    ax.axhline(memory["gpu_bytes"] / 1e9, color="black", linestyle="--", linewidth=1, label="GPU memory")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("GB")
    ax.legend(loc="lower right", fontsize=8, ncol=5)
    ax.grid(alpha=0.3)
    return _png(fig)


def utilisation_over_time(iterations: pd.DataFrame, bins: int = 60) -> str:
    """Compute-stream and host-to-device busy fraction, and expert-cache hit rate, per time window."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 3.2))
    if len(iterations):
        edges, idx = _windows(iterations, bins)
        width = edges[1] - edges[0]
        frame = iterations.assign(window=idx)
        grouped = frame.groupby("window")
        x = edges[:-1][grouped.size().index]
        replicas = max(int(iterations["replica"].nunique()), 1)
        ax1.plot(x, grouped["compute_busy_s"].sum() / width / replicas, label="compute stream")
        ax1.plot(x, grouped["copy_busy_s"].sum() / width / replicas, label="host-to-device link")
        hits = grouped["expert_hits"].sum()
        total = hits + grouped["expert_misses"].sum()
        ax2.plot(x, (hits / total.replace(0, np.nan)).to_numpy(), color="#2ca02c")
    ax1.set_ylabel("busy fraction")
    ax1.set_ylim(0, 1.05)
    ax1.legend(fontsize=8)
    ax2.set_ylabel("expert-cache hit rate")
    ax2.set_ylim(0, 1.05)
    for ax in (ax1, ax2):
        ax.set_xlabel("simulated time (s)")
        ax.grid(alpha=0.3)
    return _png(fig)


def iteration_breakdown(iterations: pd.DataFrame) -> str:
    """Where iteration time goes: compute versus waiting for expert loads, by batch size."""
    fig, ax = plt.subplots(figsize=(13, 3.2))
    if len(iterations):
        seqs = iterations["num_prefill_seqs"] + iterations["num_decode_seqs"]
        ax.scatter(seqs, iterations["compute_busy_s"] * 1e3, s=4, alpha=0.4, label="compute (ms)")
        ax.scatter(seqs, iterations["stall_s"] * 1e3, s=4, alpha=0.4, label="stalled on loads (ms)")
    ax.set_xlabel("sequences in the iteration")
    ax.set_ylabel("ms per iteration")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def fault_timeline(faults: dict[str, Any], slo: dict[str, Any]) -> str:
    """P50/P99 TTFT and SLO attainment per arrival window, with outages (red: down, orange: restoring)
    and slowdowns or degraded links (grey) shaded."""
    rows = pd.DataFrame(faults["timeline"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 5.2), sharex=True)
    if len(rows):
        mid = (rows["window_start_s"] + rows["window_end_s"]) / 2
        ax1.plot(mid, rows["ttft_p50_s"].astype(float), marker=".", label="TTFT P50")
        ax1.plot(mid, rows["ttft_p99_s"].astype(float), marker=".", label="TTFT P99")
        ax2.plot(mid, rows["slo_attainment"].astype(float), marker=".", color="#2ca02c", label="SLO attainment")
        lost = (rows["failed"] + rows["rejected"]) / rows["arrived"].replace(0, np.nan)
        ax2.plot(mid, lost, marker=".", color="#d62728", label="failed or rejected")
    end = float(rows["window_end_s"].max()) if len(rows) else 1.0
    for rec in faults["recoveries"]:
        down_until = rec["restore_started_at_s"] if rec["restore_started_at_s"] is not None else end
        for ax in (ax1, ax2):
            ax.axvspan(rec["failed_at_s"], down_until, color="#d62728", alpha=0.12)
            if rec["restored_at_s"] is not None and rec["restore_started_at_s"] is not None:
                ax.axvspan(rec["restore_started_at_s"], rec["restored_at_s"], color="#ff7f0e", alpha=0.25)
    starts = {}
    for e in faults["events"]:
        if e["fault"] in ("slow", "link"):
            key = (e["gpu"], e["fault"], e["origin"])
            if e["event"] == "start":
                starts[key] = e["at_s"]
            elif key in starts:
                begin = starts.pop(key)
                for ax in (ax1, ax2):
                    ax.axvspan(begin, e["at_s"], color="grey", alpha=0.12)
    for at_s in starts.values():
        for ax in (ax1, ax2):
            ax.axvspan(at_s, end, color="grey", alpha=0.12)
    target = slo.get("targets", {}).get("ttft_p99_s")
    if target:
        ax1.axhline(target["target_s"], color="#d62728", linestyle="--", linewidth=1, label="SLO TTFT P99")
    if slo.get("attainment_target"):
        ax2.axhline(slo["attainment_target"], color="black", linestyle="--", linewidth=1, label="attainment target")
    ax1.set_ylabel("TTFT (s)")
    ax2.set_ylabel("fraction of arrivals")
    ax2.set_ylim(-0.02, 1.05)
    ax2.set_xlabel("arrival time (s)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


# ---------------------------------------------------------------- plans and sweeps


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


def plan_pareto(table: pd.DataFrame, target_rate_per_s: float | None) -> str:
    """Cost per hour against the maximum sustainable rate, and against P99 TTFT at the target, with the
    Pareto front (cost, rate, TTFT) ringed and, on the left, joined in order of cost."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    colours = {"meets target": "#2ca02c", "below target": "#ff7f0e"}
    for status, colour in colours.items():
        rows = table[(table["status"] == status) & table["usd_per_hour"].notna() & table["max_rate_per_s"].notna()]
        ax1.scatter(rows["usd_per_hour"], rows["max_rate_per_s"], color=colour, s=30, label=status, zorder=3)
        for _, r in rows.iterrows():
            ax1.annotate(str(r["candidate"]), (r["usd_per_hour"], r["max_rate_per_s"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
    front = table[table["pareto"].astype(bool)].sort_values("usd_per_hour")
    if len(front):
        ax1.plot(front["usd_per_hour"], front["max_rate_per_s"], color="#d62728", linewidth=1, zorder=2)
        ax1.scatter(front["usd_per_hour"], front["max_rate_per_s"], s=110, facecolors="none", edgecolors="#d62728",
                    linewidths=1.5, label="Pareto front", zorder=4)
    if target_rate_per_s:
        ax1.axhline(target_rate_per_s, color="black", linestyle="--", linewidth=1, label="target rate")
    ax1.set_xlabel("cost (USD per hour)")
    ax1.set_ylabel("max sustainable rate (req/s)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    met = table[table["ttft_p99_at_target_s"].notna() & table["usd_per_hour"].notna()]
    ax2.scatter(met["usd_per_hour"], met["ttft_p99_at_target_s"], color="#2ca02c", s=30, label="meets target", zorder=3)
    for _, r in met.iterrows():
        ax2.annotate(str(r["candidate"]), (r["usd_per_hour"], r["ttft_p99_at_target_s"]), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
    if len(front):
        ax2.scatter(front["usd_per_hour"], front["ttft_p99_at_target_s"], s=110, facecolors="none",
                    edgecolors="#d62728", linewidths=1.5, label="Pareto front", zorder=4)
    ax2.set_xlabel("cost (USD per hour)")
    ax2.set_ylabel("P99 TTFT at the target rate (s)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _png(fig)


def plan_load_curves(candidates: list[dict[str, Any]], ttft_target_s: float | None, target_rate_per_s: float | None) -> str:
    """Throughput against load from the probes: each candidate's probed rates against the P99 TTFT seen
    there (filled where the SLO held, hollow where it did not)."""
    fig, ax = plt.subplots(figsize=(13, 4.5))
    cmap = plt.get_cmap("tab20")
    for n, cand in enumerate(c for c in candidates if c["probes"]):
        probes = sorted(cand["probes"], key=lambda p: p["rate_per_s"])
        rates = [p["rate_per_s"] for p in probes]
        ttft = [np.nan if p["ttft_p99_s"] is None else p["ttft_p99_s"] for p in probes]
        colour = cmap(n % 20)
        ax.plot(rates, ttft, color=colour, linewidth=1, label=f"{cand['index']}: {_label(cand['values'])}")
        for p, r, t in zip(probes, rates, ttft):
            ax.scatter([r], [t], color=colour, s=18, facecolors=colour if p["met"] else "none", zorder=3)
    if ttft_target_s:
        ax.axhline(ttft_target_s, color="#d62728", linestyle="--", linewidth=1, label="TTFT P99 target")
    if target_rate_per_s:
        ax.axvline(target_rate_per_s, color="black", linestyle=":", linewidth=1, label="target rate")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (req/s)")
    ax.set_ylabel("P99 TTFT (s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def sweep_metrics(table: pd.DataFrame, axes: list[str], metrics: list[str]) -> str:
    """Each metric against the sweep's first axis, one line per combination of the other axes."""
    x = axes[0]
    cols = 3
    rows = max(1, -(-len(metrics) // cols))
    fig, grid = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    numeric_x = pd.api.types.is_numeric_dtype(table[x])
    groups = list(table.groupby(axes[1:], sort=False)) if len(axes) > 1 else [((), table)]
    for ax, metric in zip(grid.flat, metrics):
        for key, rows_ in groups:
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join(f"{a.rsplit('.', 1)[-1]}={v}" for a, v in zip(axes[1:], key)) or metric
            xs = rows_[x] if numeric_x else rows_[x].astype(str)
            ax.plot(xs, rows_[metric].astype(float), marker="o", markersize=3, label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    for ax in list(grid.flat)[len(metrics):]:
        ax.axis("off")
    return _png(fig)


def offload_tradeoff(table: pd.DataFrame) -> str:
    """The memory / latency / fidelity trade-off of a policy comparison (a sweep with a 'variant' column):
    against the share of the model's routed experts that fit in the expert memory, each variant's
    latency, throughput, routing fidelity, hit rate, bytes moved over the host link and peak GPU memory."""
    rows = table[table["expert_fraction"].notna()] if "expert_fraction" in table else table.iloc[0:0]
    panels = [("e2e_p50_s", "P50 end-to-end (s)", True), ("e2e_p99_s", "P99 end-to-end (s)", True),
              ("ttft_p99_s", "P99 TTFT (s)", True), ("output_tokens_per_s", "output tokens / s", False),
              ("routing_fidelity", "routing fidelity", False), ("hit_rate", "expert hit rate", False),
              ("h2d_gb", "host-to-device GB (0 not drawn)", True), ("gpu_memory_peak_gb", "peak GPU memory (GB)", False)]
    fig, grid = plt.subplots(2, 4, figsize=(16, 7), squeeze=False)
    colours = plt.get_cmap("tab20")
    styles = ["-", "--", "-.", ":"]
    for ax, (metric, label, log) in zip(grid.flat, panels):
        if metric not in rows:
            ax.axis("off")
            continue
        for n, (variant, group) in enumerate(rows.groupby("variant", sort=False)):
            group = group.sort_values("expert_fraction")
            y = group[metric].astype(float)
            if log:
                y = y.where(y > 0)
            style = dict(label=str(variant), color=colours(n % 20), linestyle=styles[(n // 10) % len(styles)])
            if group["expert_fraction"].nunique() == 1 and len(group) > 1:
                # A reference that ignores the expert budget (all resident): one horizontal line.
                if y.notna().any():
                    ax.axhline(float(y.iloc[0]), linewidth=1.5, **{**style, "linestyle": "--"})
                else:
                    ax.plot([], [], **style)
                continue
            ax.plot(group["expert_fraction"] * 100, y, marker="o", markersize=3, **style)
        ax.set_xlabel("routed experts that fit (%)")
        ax.set_ylabel(label)
        if log and (rows[metric].astype(float) > 0).any():
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    handles, labels = grid[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- expert parallelism


def ep_layer_breakdown(layers: pd.DataFrame) -> str:
    """Per MoE layer, where the group's time went (summed over iterations): attention, gate and shared
    expert, expert compute of the mean rank, waiting for the slowest rank, dispatch and combine."""
    fig, ax = plt.subplots(figsize=(13, 3.6))
    x = layers["moe_layer"].to_numpy()
    parts = [
        ("attention", layers["attention_s"]),
        ("gate + shared", layers["gate_s"] + layers["shared_s"]),
        ("expert compute (mean rank)", layers["expert_compute_s"] - layers["straggler_wait_s"]),
        ("straggler wait", layers["straggler_wait_s"]),
        ("dispatch", layers["dispatch_s"]),
        ("combine", layers["combine_s"]),
    ]
    bottom = np.zeros(len(x))
    for label, values in parts:
        v = np.asarray(values, dtype=float)
        ax.bar(x, v, bottom=bottom, label=label, width=0.8)
        bottom += v
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("seconds (sum over iterations)")
    ax.set_title("Per-layer time breakdown (communication shown whole; overlap hides part of it)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def ep_imbalance_heatmap(device_tokens: pd.DataFrame) -> str:
    """Token-expert pairs computed per (MoE layer, rank), divided by the layer's mean over ranks."""
    tokens = device_tokens.drop(columns=["moe_layer"]).to_numpy(dtype=float)
    ratio = tokens / np.maximum(tokens.mean(axis=1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(min(13, 3 + 0.5 * tokens.shape[1]), 0.5 + 0.18 * tokens.shape[0] + 1))
    im = ax.imshow(ratio, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("rank")
    ax.set_ylabel("MoE layer")
    ax.set_title("Load per rank / mean (1 = balanced)", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _png(fig)


def speedup_vs_gamma(table: pd.DataFrame, gamma_axis: str, other_axes: list[str]) -> str:
    """MoE-layer speedup against gamma (relative to the largest gamma of each line) and the dropped fraction."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 3.6))
    groups = list(table.groupby(other_axes, sort=False)) if other_axes else [((), table)]
    for key, rows in groups:
        key = key if isinstance(key, tuple) else (key,)
        rows = rows.sort_values(gamma_axis)
        label = ", ".join(f"{a.rsplit('.', 1)[-1]}={v}" for a, v in zip(other_axes, key)) or "speedup"
        per_pair = rows["ep_moe_s_per_kpair"].astype(float).to_numpy()
        gamma = rows[gamma_axis].astype(float).to_numpy()
        left.plot(gamma, per_pair[-1] / per_pair, marker="o", label=label)
        right.plot(gamma, rows["ep_dropped_fraction"].astype(float) * 100, marker="o", label=label)
    for ax, ylabel in ((left, "MoE-layer speedup vs largest gamma"), (right, "token-expert pairs dropped (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("gamma (capacity factor)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------- optional run sections (sim.report.sections)


def latency_vs_load(requests: pd.DataFrame, slo: dict[str, Any], bins: int = 30) -> str:
    """Offered load against latency: per time window, the arrival rate against the P99 TTFT and the
    median end-to-end latency of the requests that arrived in it."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 3.4))
    req = requests[requests["status"] == "completed"]
    if len(req) > 1:
        arrived = requests["arrived_at_s"].to_numpy()
        edges = np.linspace(arrived.min(), arrived.max() + 1e-9, bins + 1)
        width = edges[1] - edges[0]
        rate = np.histogram(arrived, edges)[0] / width
        window = np.clip(np.digitize(req["arrived_at_s"].to_numpy(), edges) - 1, 0, bins - 1)
        grouped = req.assign(window=window).groupby("window")
        ttft = grouped["ttft_s"].quantile(0.99)
        e2e = grouped["e2e_s"].median()
        ax1.scatter(rate[ttft.index], ttft.to_numpy(), s=14, color="#1f77b4")
        ax2.scatter(rate[e2e.index], e2e.to_numpy(), s=14, color="#ff7f0e")
    target = slo.get("targets", {}).get("ttft_p99_s")
    if target:
        ax1.axhline(target["target_s"], color="#d62728", linestyle="--", label="SLO ttft_p99_s")
        ax1.legend(fontsize=8)
    ax1.set_ylabel("P99 TTFT of the window (s)")
    ax2.set_ylabel("median end-to-end of the window (s)")
    for ax in (ax1, ax2):
        ax.set_xlabel(f"arrival rate in the window (req/s; {bins} windows)")
        ax.grid(alpha=0.3)
    return _png(fig)


def hit_rate_by_layer(layers: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(13, 3))
    total = (layers["hits"] + layers["misses"]).replace(0, np.nan)
    ax.bar(layers["layer"], (layers["hits"] / total).to_numpy(), color="#2ca02c")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def layer_time_breakdown(layers: pd.DataFrame, labels: dict[str, str]) -> str:
    fig, ax = plt.subplots(figsize=(13, 3.4))
    bottom = np.zeros(len(layers))
    for column, label in labels.items():
        values = layers[column].fillna(0).to_numpy(dtype=float)
        ax.bar(layers["layer"], values, bottom=bottom, label=label)
        bottom += values
    ax.set_xlabel("layer")
    ax.set_ylabel("seconds over the run")
    ax.legend(fontsize=8, ncol=len(labels))
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def expert_load_heatmap(load: pd.DataFrame) -> str:
    grid = load.pivot(index="layer", columns="expert", values="iterations").fillna(0).to_numpy(dtype=float)
    mean = grid.mean(axis=1, keepdims=True)
    relative = np.divide(grid, mean, out=np.zeros_like(grid), where=mean > 0)
    fig, ax = plt.subplots(figsize=(13, max(3.0, min(8.0, 0.12 * grid.shape[0] + 1.5))))
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="use / layer mean")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    return _png(fig)
