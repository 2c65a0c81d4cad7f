"""``moesim profile show|compare --html OUT``: measured points against each profile's fitted curves.

One figure per operation: the measured points (the profile's points file when it has one next to it,
else the profile's own table rows, which are measurements too) as markers, and the profile's lookup (the
same function the simulator calls) as lines over a range reaching past the measured one, so the
extrapolation is visible. ``compare`` draws both profiles' curves (and points) on the same axes."""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibrate.fit import attention_shape_of, shape_of


def points_for(ref: str, profile: Any) -> list[dict[str, str]]:
    """The measured points of a profile: its ``provenance.points_file`` next to the YAML ([] when none)."""
    from calibrate.measure import read_points

    name = profile.provenance.get("points_file")
    if not name:
        return []
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        path = Path(ref).parent / str(name)
    else:
        path = Path(str(resources.files("sim.data.profiles").joinpath(str(name))))
    try:
        return read_points(path) if path.exists() else []
    except Exception:  # an unreadable points file only loses the markers
        return []


def _grid(lo: float, hi: float, n: int = 60) -> np.ndarray:
    return np.unique(np.round(np.geomspace(max(lo, 1.0), hi, n)))


def _layout(row: dict[str, str]) -> str:
    return f"{row['num_heads']}q/{row['num_kv_heads']}kv x {row['head_dim']}"


Series = tuple[str, np.ndarray, np.ndarray]  # label, x, seconds


def op_series(profile: Any, points: list[dict[str, str]]) -> dict[str, tuple[str, list[Series], list[Series]]]:
    """Per figure: (x label, measured series, fitted series) of one profile."""
    from sim.profile import TableModel
    from sim.work import ExpertShape, GemmShape

    figs: dict[str, tuple[str, list[Series], list[Series]]] = {}
    threads = int((profile.provenance.get("environment") or {}).get("threads", 1) or 1)
    pts = [r for r in points if int(r["threads"]) == threads]
    for op, lookup in (("expert_ffn", profile.expert_ffn_s), ("dense_gemm", profile.dense_gemm_s),
                       ("gate", profile.gate_s)):
        model = getattr(profile.operations, op)
        measured, fitted = [], []
        if isinstance(model, TableModel):
            for i, row in enumerate(model.rows[:6]):
                shape = (ExpertShape if op == "expert_ffn" else GemmShape)(**row.shape)
                label = " ".join(f"{v}" for k, v in row.shape.items() if not str(k).endswith("dtype"))
                mine = [r for r in pts if r["op"] == op and shape_of(r) == shape]
                if mine:
                    measured.append((label, np.array([float(r["tokens"]) for r in mine]),
                                     np.array([float(r["median_s"]) for r in mine])))
                else:
                    measured.append((label, np.asarray(row.tokens, float), np.asarray(row.latency_s, float)))
                x = _grid(max(1, row.tokens[0] / 2), row.tokens[-1] * 2)
                fitted.append((label, x, np.asarray(lookup(tokens=x, shape=shape))))
        figs[op] = ("tokens", measured, fitted)
    # attention prefill: by prompt length, per layout measured
    measured, fitted = [], []
    for lay in sorted({_layout(r) for r in pts if r["op"] == "attention_prefill"}):
        mine = [r for r in pts if r["op"] == "attention_prefill" and _layout(r) == lay]
        x_m = np.array([float(r["tokens"]) for r in mine])
        measured.append((lay, x_m, np.array([float(r["median_s"]) for r in mine])))
        shape = attention_shape_of(mine[0])
        x = _grid(x_m.min() / 2, x_m.max() * 2)
        fitted.append((lay, x, np.asarray(profile.attention_prefill_s(new_tokens=x, context_tokens=0, shape=shape))))
    figs["attention_prefill"] = ("prompt tokens", measured, fitted)
    # attention decode: by context, per layout and batch
    measured, fitted = [], []
    dec = [r for r in pts if r["op"] == "attention_decode"]
    for lay in sorted({_layout(r) for r in dec}):
        for b in sorted({int(r["batch"]) for r in dec if _layout(r) == lay}):
            mine = [r for r in dec if _layout(r) == lay and int(r["batch"]) == b]
            x_m = np.array([float(r["context"]) for r in mine])
            measured.append((f"{lay}, batch {b}", x_m, np.array([float(r["median_s"]) for r in mine])))
            shape = attention_shape_of(mine[0])
            x = _grid(x_m.min() / 2, x_m.max() * 2, 30)
            fitted.append((f"{lay}, batch {b}", x, np.array(
                [profile.attention_decode_s(context_tokens=[c] * b, shape=shape) for c in x])))
    figs["attention_decode"] = ("context tokens", measured, fitted)
    figs.update(_extra_series(profile, points, threads))
    return figs


def _extra_series(profile: Any, points: list[dict[str, str]], threads: int) -> dict[str, tuple[str, list, list]]:
    from sim.work import ExpertShape

    figs: dict[str, tuple[str, list, list]] = {}
    grouped = profile.operations.grouped_expert_ffn
    if grouped is not None:
        measured, fitted = [], []
        row = grouped.rows[0]
        shape = ExpertShape(**row.shape)
        for i, e in enumerate(row.num_experts):
            measured.append((f"{e} experts", np.asarray(row.tokens, float), np.asarray(row.latency_s[i], float)))
            x = _grid(max(1, row.tokens[0] / 2), row.tokens[-1] * 2, 30)
            fitted.append((f"{e} experts", x, np.array([profile.grouped_expert_ffn_s(tokens=[t] * e, shape=shape)
                                                        for t in x])))
        figs["grouped_expert_ffn"] = ("tokens per expert", measured, fitted)
    cpu = profile.operations.cpu_attention_decode
    if cpu is not None:
        op = "attention_decode" if (profile.provenance.get("environment") or {}).get("device") == "cpu" \
            else "cpu_attention_decode"
        measured, fitted = [], []
        for row in cpu.rows:
            mine = [r for r in points if r["op"] == op and int(r["threads"]) == row.threads and int(r["batch"]) ==
                    row.batch[1]]
            for lay in sorted({_layout(r) for r in mine}):
                sel = [r for r in mine if _layout(r) == lay]
                x_m = np.array([float(r["context"]) for r in sel])
                label = f"{row.threads} thr, {lay}, batch {row.batch[1]}"
                measured.append((label, x_m, np.array([float(r["median_s"]) for r in sel])))
                shape = attention_shape_of(sel[0])
                x = _grid(x_m.min() / 2, x_m.max() * 2, 30)
                fitted.append((label, x, np.array([profile.cpu_attention_decode_s(
                    context_tokens=[c] * row.batch[1], shape=shape, threads=row.threads) for c in x])))
        figs["cpu_attention_decode"] = ("context tokens", measured, fitted)
    copy_pts = [r for r in points if r["op"] in ("host_copy", "h2d_copy") and r.get("pinned", "") in ("", "1")
                and r.get("streams", "") in ("", "1") and int(r["threads"]) == threads]  # the copies the link fits
    x_m = np.array([float(r["nbytes"]) for r in copy_pts]) if copy_pts else np.array([2.0**20, 2.0**30])
    x = np.geomspace(x_m.min() / 2, x_m.max() * 2, 40)
    figs["host_to_device"] = ("bytes", [("measured", x_m, np.array([float(r["median_s"]) for r in copy_pts]))]
                              if copy_pts else [], [("link fit", x, np.asarray(profile.h2d_copy_s(nbytes=x)))])
    if profile.collectives is not None and profile.collectives.rows:
        measured, fitted = [], []
        for row in profile.collectives.rows:
            if row.kind not in ("all_to_all", "all_reduce"):
                continue
            label = f"{row.kind} x{row.num_gpus}"
            measured.append((label, np.asarray(row.nbytes, float), np.asarray(row.latency_s, float)))
            x = np.geomspace(row.nbytes[0] / 2, row.nbytes[-1] * 2, 40)
            fitted.append((label, x, np.asarray(profile.collective_s(row.kind, x, row.num_gpus))))
        figs["collectives"] = ("bytes per rank", measured, fitted)
    return figs


def _figure(title: str, xlabel: str, layers: list[tuple[str, list[Series], list[Series]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sim.report.plots import _png

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k = 0
    for prefix, measured, fitted in layers:
        style = "-" if not prefix or prefix.startswith("A") else "--"
        for (label, x, y), (_, fx, fy) in zip(measured, fitted):
            c = colours[k % len(colours)]
            k += 1
            if len(x):
                ax.plot(x, y * 1e3, "o", color=c, ms=4, label=f"{prefix}{label} measured")
            ax.plot(fx, fy * 1e3, style, color=c, lw=1.2, label=f"{prefix}{label} fit")
        for label, fx, fy in fitted[len(measured):]:
            c = colours[k % len(colours)]
            k += 1
            ax.plot(fx, fy * 1e3, style, color=c, lw=1.2, label=f"{prefix}{label} fit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms per call")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    return _png(fig)


def _fit_line(profile: Any, op: str) -> str:
    m = getattr(profile.operations, op, None)
    fe = getattr(m, "fit_error", None)
    if fe is None or fe.mean_rel_error is None:
        return ""
    return f"MAPE {fe.mean_rel_error:.1%}, max {fe.max_rel_error:.1%} over {fe.num_points} points ({fe.note})"


def render_profiles(profiles: list[tuple[str, Any]], out: Path, title: str) -> Path:
    """Write a self-contained HTML page of ``profiles`` ([(reference, profile)], one or two)."""
    series = [(ref, p, op_series(p, points_for(ref, p))) for ref, p in profiles]
    ops = list(dict.fromkeys(op for _, _, figs in series for op in figs))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}"
             "td,th{padding:2px 8px;text-align:left}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for i, (ref, p, _) in enumerate(series):
        tag = f"{'AB'[i]}: " if len(series) > 1 else ""
        parts.append(f"<p><b>{html.escape(tag + p.name)}</b> [source: {html.escape(p.source)}] from "
                     f"{html.escape(ref)}</p>")
    parts.append("<p>Markers: measured points (medians). Lines: the profile's lookup, as the simulator calls it; "
                 "beyond the markers it extrapolates.</p>")
    for op in ops:
        layers = []
        for i, (_, p, figs) in enumerate(series):
            if op in figs:
                xlabel, measured, fitted = figs[op]
                layers.append((f"{'AB'[i]}: " if len(series) > 1 else "", measured, fitted))
        if not any(m or f for _, m, f in layers):
            continue
        xlabel = next(figs[op][0] for _, _, figs in series if op in figs)
        parts.append(f"<h2>{html.escape(op)}</h2>")
        for i, (_, p, _) in enumerate(series):
            line = _fit_line(p, op)
            if line:
                parts.append(f"<p>{'AB'[i] + ': ' if len(series) > 1 else ''}{html.escape(line)}</p>")
        parts.append(f"<img alt='{html.escape(op)}' src='data:image/png;base64,{_figure(op, xlabel, layers)}'>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


LookupFn = Callable[..., Any]
