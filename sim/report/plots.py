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
