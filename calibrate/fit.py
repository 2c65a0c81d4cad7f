"""Turning measured points into a hardware profile: tables, roofline fits, link fits and their errors.

- expert_ffn, dense_gemm, gate: ``kind: table`` (the measured token grid per shape) with a roofline
  ``extrapolation`` fitted to all of the op's points; ``fit_error`` is the leave-one-out error of the table
  (each grid point predicted from the others, as a lookup between grid points would be), which is the
  honest error of an interpolating table (in-sample it is zero).
- attention_prefill, attention_decode: ``kind: roofline`` fitted to the points (the profile has no 2-D table).
- host copy: ``latency_s + nbytes / bandwidth`` by least squares on relative error.

Fits minimise relative error, since latencies span four decades. Every error is |fit - measured| / measured."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from calibrate.errors import CalibrationError
from sim.profile import RooflineParams, TableModel
from sim.work import AttentionShape, ExpertShape, GemmShape

TABLE_OPS = ("expert_ffn", "dense_gemm", "gate")
ATTENTION_OPS = ("attention_prefill", "attention_decode")


# ---------------------------------------------------------------- error statistics


def error_stats(rel_errors: Sequence[float] | np.ndarray, note: str = "") -> dict[str, Any]:
    """A ``FitError`` mapping: median / p95 / max / mean (MAPE) of relative errors."""
    e = np.abs(np.asarray(rel_errors, dtype=np.float64))
    if e.size == 0:
        raise CalibrationError("no points to compute a fit error from")
    return {
        "median_rel_error": round(float(np.median(e)), 5),
        "p95_rel_error": round(float(np.percentile(e, 95)), 5),
        "max_rel_error": round(float(np.max(e)), 5),
        "num_points": int(e.size),
        "mean_rel_error": round(float(np.mean(e)), 5),
        "note": note,
    }


# ---------------------------------------------------------------- roofline and link fits


def _fixed_for(t: np.ndarray, roof: np.ndarray) -> np.ndarray:
    """Best fixed cost >= 0 per candidate (rows of ``roof``) under squared relative error: weighted least squares."""
    w = 1.0 / t**2
    return np.maximum(0.0, ((t - roof) * w).sum(axis=-1) / w.sum())


def fit_roofline(
    flops: np.ndarray, nbytes: np.ndarray, t: np.ndarray, peak_flops_per_s: float, bytes_per_s: float,
) -> tuple[dict[str, float], np.ndarray]:
    """``fixed_s + max(flops / (peak * ce), bytes / (bw * me))`` minimising mean relative error.

    A coarse log grid over (ce, me) in [1e-4, 1], then two finer grids around the best; fixed_s in closed form.
    Returns the parameters and the relative errors at the points."""
    flops, nbytes, t = (np.asarray(a, dtype=np.float64) for a in (flops, nbytes, t))
    c_time = flops / peak_flops_per_s  # seconds at efficiency 1
    m_time = nbytes / bytes_per_s
    lo_c, hi_c, lo_m, hi_m = -4.0, 0.0, -4.0, 0.0
    best = (math.inf, 1.0, 1.0, 0.0)
    for n in (61, 31, 31):
        ce = 10.0 ** np.linspace(lo_c, hi_c, n)
        me = 10.0 ** np.linspace(lo_m, hi_m, n)
        roof = np.maximum(c_time[None, None, :] / ce[:, None, None], m_time[None, None, :] / me[None, :, None])
        fixed = _fixed_for(t, roof)
        err = np.abs(fixed[..., None] + roof - t) / t
        score = err.mean(axis=-1)
        i, j = np.unravel_index(np.argmin(score), score.shape)
        if score[i, j] < best[0]:
            best = (float(score[i, j]), float(ce[i]), float(me[j]), float(fixed[i, j]))
        step_c = (hi_c - lo_c) / (n - 1)
        step_m = (hi_m - lo_m) / (n - 1)
        lc, lm = math.log10(best[1]), math.log10(best[2])
        lo_c, hi_c = max(-6.0, lc - 2 * step_c), min(0.0, lc + 2 * step_c)
        lo_m, hi_m = max(-6.0, lm - 2 * step_m), min(0.0, lm + 2 * step_m)
    _, ce_best, me_best, fixed_best = best
    params = {"fixed_s": fixed_best, "compute_efficiency": ce_best, "memory_efficiency": me_best}
    pred = RooflineParams(**params).roofline_s(flops, nbytes, peak_flops_per_s, bytes_per_s)
    return params, (pred - t) / t


def fit_link(nbytes: np.ndarray, t: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """``latency_s + nbytes / bandwidth`` by least squares on relative error; latency clamped at 0."""
    b, t = np.asarray(nbytes, dtype=np.float64), np.asarray(t, dtype=np.float64)
    a = np.stack([np.ones_like(b), b], axis=1) / t[:, None]
    (lat, inv_bw), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if lat < 0 or inv_bw <= 0:  # a pure bandwidth fit
        lat = 0.0
        inv_bw = float(np.sum(b / t) / np.sum((b / t) ** 2))
    pred = lat + b * inv_bw
    return {"latency_s": float(lat), "bandwidth_gbps": float(1.0 / inv_bw / 1e9)}, (pred - t) / t


# ---------------------------------------------------------------- points -> shapes


def _num(row: dict[str, str], key: str) -> int:
    return int(row[key])


def shape_of(row: dict[str, str]) -> ExpertShape | GemmShape:
    """The sim.work shape a table-op point measured (weights and activations in the measured dtype)."""
    dt = row["dtype"]
    if row["op"] == "expert_ffn":
        return ExpertShape(hidden=_num(row, "hidden"), ffn=_num(row, "ffn"), num_matrices=_num(row, "num_matrices"),
                           weight_dtype=dt, act_dtype=dt)
    return GemmShape(in_features=_num(row, "in_features"), out_features=_num(row, "out_features"),
                     weight_dtype=dt, act_dtype=dt)


def attention_shape_of(row: dict[str, str]) -> AttentionShape:
    d = _num(row, "head_dim")
    return AttentionShape(num_heads=_num(row, "num_heads"), qk_head_dim=d, v_head_dim=d,
                          kv_bytes_per_token=2 * _num(row, "num_kv_heads") * d * 2.0, act_dtype=row["dtype"])


def attention_work(row: dict[str, str]) -> tuple[float, float]:
    """FLOPs and bytes of a measured attention point, as the profile's lookup would compute them."""
    shape = attention_shape_of(row)
    if row["op"] == "attention_decode":
        b, c = _num(row, "batch"), _num(row, "context")
        return b * float(shape.decode_flops(c)), b * float(shape.decode_bytes(c))
    n = _num(row, "tokens")
    return float(shape.prefill_flops(n, 0)), float(shape.prefill_bytes(n, 0))


# ---------------------------------------------------------------- tables


def table_rows(points: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """One table row per measured shape (token grid sorted, first measurement of a duplicate kept)."""
    by_shape: dict[tuple, dict[int, float]] = defaultdict(dict)
    shapes: dict[tuple, Any] = {}
    for r in points:
        shape = shape_of(r)
        key = tuple(sorted((k, v) for k, v in _shape_dict(shape).items()))
        shapes[key] = shape
        by_shape[key].setdefault(_num(r, "tokens"), float(r["median_s"]))
    rows = []
    for key, grid in by_shape.items():
        tokens = sorted(grid)
        rows.append({"shape": _shape_dict(shapes[key]), "tokens": tokens, "latency_s": [grid[t] for t in tokens]})
    return rows


def _shape_dict(shape: ExpertShape | GemmShape) -> dict[str, int | str]:
    import dataclasses

    return dataclasses.asdict(shape)


def _shape_obj(op: str, d: dict[str, Any]) -> ExpertShape | GemmShape:
    return ExpertShape(**d) if op == "expert_ffn" else GemmShape(**d)


def leave_one_out_errors(op: str, rows: list[dict[str, Any]], extrapolation: dict[str, float],
                         peak: float, bw: float) -> np.ndarray:
    """Relative error of predicting each grid point from the rest of its row, through TableModel's own lookup."""
    errors = []
    for row in rows:
        shape = _shape_obj(op, row["shape"])
        n = len(row["tokens"])
        if n < 3:
            continue
        for j in range(n):
            keep = [i for i in range(n) if i != j]
            model = TableModel(kind="table", fit_error=None, extrapolation=RooflineParams(**extrapolation), rows=[{
                "shape": row["shape"], "tokens": [row["tokens"][i] for i in keep],
                "latency_s": [row["latency_s"][i] for i in keep]}])
            t = np.asarray(float(row["tokens"][j]))
            pred, _ = model.seconds(tokens=t, shape=shape, flops=shape.flops(t), nbytes=shape.bytes_moved(t),
                                    peak_flops_per_s=peak, bytes_per_s=bw)
            errors.append(float(pred) / row["latency_s"][j] - 1.0)
    return np.asarray(errors)


# ---------------------------------------------------------------- the profile


def _peaks(points: Sequence[dict[str, str]]) -> tuple[dict[str, float], float]:
    """Attainable rates of this device: FLOP/s per dtype and memory bytes/s.

    The best of the dedicated peak/read measurements and of every point's own rate, so fitted
    efficiencies stay <= 1 (the profile format requires it)."""
    flops_per_s: dict[str, float] = defaultdict(float)
    bytes_per_s = 0.0
    for r in points:
        t = float(r["median_s"])
        if r["op"] == "peak_gemm":
            n = _num(r, "hidden")
            flops_per_s[r["dtype"]] = max(flops_per_s[r["dtype"]], 2.0 * n**3 / t)
        elif r["op"] == "mem_read":
            bytes_per_s = max(bytes_per_s, _num(r, "nbytes") / t)
        elif r["op"] in TABLE_OPS:
            shape = shape_of(r)
            tok = _num(r, "tokens")
            flops_per_s[r["dtype"]] = max(flops_per_s[r["dtype"]], float(shape.flops(tok)) / t)
            bytes_per_s = max(bytes_per_s, float(shape.bytes_moved(tok)) / t)
        elif r["op"] in ATTENTION_OPS:
            f, b = attention_work(r)
            flops_per_s[r["dtype"]] = max(flops_per_s[r["dtype"]], f / t)
            bytes_per_s = max(bytes_per_s, b / t)
    return dict(flops_per_s), bytes_per_s


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _round_up(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits, never below it (a peak rounded down would put a point's
    efficiency above 1)."""
    r = _round(x, digits)
    if r < x:
        r = _round(r + 10.0 ** (math.floor(math.log10(x)) - digits + 1), digits)
    return r


def build_profile(
    points: Sequence[dict[str, str]], environment: dict[str, Any], *, name: str, threads: int,
    points_file: str, extra_provenance: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A profile mapping (valid for ``sim.profile.HardwareProfile``) and a per-op fit summary.

    Only points measured at ``threads`` enter the fits (other thread counts stay in the points file)."""
    from calibrate.fit_sections import (collectives_section, cpu_attention_op, decode_by_head_dim, grouped_op,
                                        prefill_efficiency_table)

    device = environment.get("device", "cpu")
    pts = [r for r in points if int(r["threads"]) == threads]
    by_op: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in pts:
        by_op[r["op"]].append(r)
    missing = [op for op in (*TABLE_OPS, *ATTENTION_OPS) if not by_op.get(op)]
    copy_op = "h2d_copy" if device == "cuda" else "host_copy"
    if not by_op.get(copy_op):
        missing.append(copy_op)
    if missing:
        raise CalibrationError(f"{points_file}: no points at {threads} thread(s) for {', '.join(missing)}; "
                               f"measure them first (run calibrate without --fit-only)")
    peaks, bytes_per_s = _peaks(pts)
    # The rates as the profile stores them (4 digits), so that every fit error below describes the stored model.
    peaks = {d: _round_up(v / 1e12) * 1e12 for d, v in peaks.items()}
    bw_gbps = _round_up(bytes_per_s / 1e9)
    bytes_per_s = bw_gbps * 1e9
    summary: dict[str, dict[str, Any]] = {}
    operations: dict[str, Any] = {}
    valid_range: dict[str, Any] = {}
    for op in TABLE_OPS:
        rows_pts = by_op[op]
        flops = np.array([float(shape_of(r).flops(_num(r, "tokens"))) for r in rows_pts])
        nbytes = np.array([float(shape_of(r).bytes_moved(_num(r, "tokens"))) for r in rows_pts])
        t = np.array([float(r["median_s"]) for r in rows_pts])
        dtypes = {r["dtype"] for r in rows_pts}
        peak = max(peaks[d] for d in dtypes)  # per-dtype peaks are applied by the lookup; fit with the main one
        if len(dtypes) > 1:  # fit each point against its own dtype's peak by scaling its compute time
            flops = flops * np.array([peak / peaks[r["dtype"]] for r in rows_pts])
        params, roof_err = fit_roofline(flops, nbytes, t, peak, bytes_per_s)
        params = {k: _round(v) for k, v in params.items()}
        params["compute_efficiency"] = min(1.0, params["compute_efficiency"])
        params["memory_efficiency"] = min(1.0, params["memory_efficiency"])
        roof_err = RooflineParams(**params).roofline_s(flops, nbytes, peak, bytes_per_s) / t - 1.0
        rows = table_rows(rows_pts)
        loo = np.concatenate([leave_one_out_errors(op, [r for r in rows if r["shape"]["weight_dtype"] == d], params,
                                                   peaks[d] * 1.0, bytes_per_s) for d in sorted(dtypes)])
        fe = error_stats(loo if loo.size else roof_err,
                         "leave-one-out over each shape's token grid (each point predicted from the others)")
        operations[op] = {"kind": "table", "fit_error": fe, "extrapolation": params, "rows": rows}
        summary[op] = {"table_loo": fe, "extrapolation_roofline": error_stats(roof_err), "num_shapes": len(rows)}
        valid_range[op] = {"tokens": [min(r["tokens"][0] for r in rows), max(r["tokens"][-1] for r in rows)],
                           "shapes": len(rows), "dtypes": sorted(dtypes)}
    for op in ATTENTION_OPS:
        rows_pts = by_op[op]
        key = "context" if op == "attention_decode" else "tokens"
        valid_range[op] = {key: [min(_num(r, key) for r in rows_pts), max(_num(r, key) for r in rows_pts)],
                           "heads": sorted({f"{r['num_heads']}q/{r['num_kv_heads']}kv x {r['head_dim']}" for r in rows_pts})}
        if op == "attention_decode":
            valid_range[op]["batch"] = [min(_num(r, "batch") for r in rows_pts), max(_num(r, "batch") for r in rows_pts)]
        if op == "attention_prefill":  # the attained FLOP/s depends on the length: an efficiency table
            operations[op], summary[op] = prefill_efficiency_table(rows_pts, peaks["bf16"], bytes_per_s)
            continue
        operations[op], summary[op] = decode_by_head_dim(rows_pts, peaks["bf16"], bytes_per_s)
    grouped_pts = by_op.get("grouped_expert_ffn", [])
    if grouped_pts:
        dt = grouped_pts[0]["dtype"]
        operations["grouped_expert_ffn"], summary["grouped_expert_ffn"] = grouped_op(
            grouped_pts, [r for r in by_op["expert_ffn"] if r["dtype"] == dt], peaks[dt], bytes_per_s)
        valid_range["grouped_expert_ffn"] = {
            "num_experts": [min(_num(r, "num_experts") for r in grouped_pts), max(_num(r, "num_experts") for r in grouped_pts)],
            "tokens": [min(_num(r, "tokens") for r in grouped_pts), max(_num(r, "tokens") for r in grouped_pts)]}
    cpu_op = "attention_decode" if device == "cpu" else "cpu_attention_decode"
    cpu_attn, cpu_summary = cpu_attention_op([r for r in points if r["op"] == cpu_op])
    if cpu_attn is not None:
        operations["cpu_attention_decode"] = cpu_attn
        summary.update({f"cpu_attention_decode[{k}]": v for k, v in cpu_summary.items()})
    single = [r for r in by_op[copy_op] if r.get("streams", "") in ("", "1")]
    copy_rows = [r for r in single if r.get("pinned", "") in ("", "1")]
    link, link_err = fit_link(np.array([_num(r, "nbytes") for r in copy_rows], dtype=float),
                              np.array([float(r["median_s"]) for r in copy_rows]))
    pageable_factor = 1.0
    if device == "cuda":  # pragma: no cover - needs a GPU
        pg = [r for r in single if r.get("pinned") == "0"]
        if pg:
            pg_link, _ = fit_link(np.array([_num(r, "nbytes") for r in pg], dtype=float),
                                  np.array([float(r["median_s"]) for r in pg]))
            pageable_factor = min(1.0, pg_link["bandwidth_gbps"] / link["bandwidth_gbps"])
    host_link = {"bandwidth_gbps": _round(link["bandwidth_gbps"]), "latency_s": _round(link["latency_s"])}
    copy_b = np.array([_num(r, "nbytes") for r in copy_rows], dtype=float)
    copy_t = np.array([float(r["median_s"]) for r in copy_rows])
    link_err = (host_link["latency_s"] + copy_b / (host_link["bandwidth_gbps"] * 1e9)) / copy_t - 1.0
    summary[copy_op] = {"link": error_stats(link_err)}
    valid_range[copy_op] = {"nbytes": [min(_num(r, "nbytes") for r in copy_rows), max(_num(r, "nbytes") for r in copy_rows)]}
    host_link.update({"pageable_bandwidth_factor": _round(pageable_factor), "num_copy_engines": 1})
    device_link = dict(host_link)
    d2h_rows = by_op.get("d2h_copy", [])
    if d2h_rows:  # pragma: no cover - needs a GPU
        d2h, _ = fit_link(np.array([_num(r, "nbytes") for r in d2h_rows], dtype=float),
                          np.array([float(r["median_s"]) for r in d2h_rows]))
        device_link.update(bandwidth_gbps=_round(d2h["bandwidth_gbps"]), latency_s=_round(d2h["latency_s"]))
        valid_range["d2h_copy"] = {"nbytes": [min(_num(r, "nbytes") for r in d2h_rows),
                                              max(_num(r, "nbytes") for r in d2h_rows)]}
    concurrent = concurrent_copies([r for r in by_op[copy_op] if r.get("streams", "") not in ("", "1")], host_link)
    cpu_name = environment.get("cpu_model", "unknown CPU")
    cores = int(environment.get("cpu_count") or 1)
    fp32 = peaks.get("fp32", peaks.get("bf16", 1e9))
    if device == "cuda":  # pragma: no cover - needs a GPU
        gpu = {"name": environment.get("gpu_name", "CUDA GPU"), "memory_bytes": environment.get("gpu_memory_bytes", 1.0),
               "peak_tflops": {d: _round(v / 1e12) for d, v in peaks.items()}, "memory_bandwidth_gbps": _round(bw_gbps)}
        cpu = {"name": f"{cpu_name} (host; nominal rate not measured)", "cores": cores,
               "peak_gflops": 1.0, "memory_bandwidth_gbps": 1.0}
    else:
        gpu = {"name": f"CPU (no GPU): {cpu_name}, {threads} of {cores} cores",
               "memory_bytes": environment.get("host_memory_bytes") or 1.0,
               "peak_tflops": {d: _round(v / 1e12) for d, v in peaks.items()},
               "memory_bandwidth_gbps": _round(bw_gbps)}
        cpu = {"name": cpu_name, "cores": cores, "peak_gflops": _round(fp32 / 1e9 * cores / max(threads, 1)),
               "memory_bandwidth_gbps": _round(bw_gbps)}
    placeholder = {"bandwidth_gbps": host_link["bandwidth_gbps"], "latency_s": host_link["latency_s"]}
    provenance: dict[str, Any] = {
        "summary": (f"Measured by `moesim calibrate` on {gpu['name']}, {threads} thread(s). Tables are medians of "
                    "repeated timed calls (outliers beyond 3 scaled MADs dropped) with cold rotating weights."),
        "environment": environment,
        "points_file": points_file,
        "num_points": len(points),
        "valid_range": valid_range,
        "peaks": ("gpu.peak_tflops and memory_bandwidth_gbps are the best rates measured on this device (hot "
                  "square GEMM, large-buffer read, or any faster measured point), not datasheet figures"),
        "fits": summary,
        "licence": "measured here; no third-party data",
    }
    if device == "cpu":
        provenance["host_to_device"] = (
            "host memory copy (torch copy_ into a preallocated host buffer from a cold source): the copy the CPU "
            "runtime does to fill its expert cache. It is NOT a PCIe transfer; there is no GPU. device_to_host, "
            "gpu_to_gpu and node_to_node repeat it as placeholders (not measured, not meaningful on one CPU).")
    elif not d2h_rows:  # pragma: no cover - needs a GPU
        provenance["device_to_host"] = "not measured: repeats host_to_device"
    if concurrent:
        provenance["concurrent_copies"] = concurrent
    load_end = environment.get("load_average_at_end")
    loads = [float(r["load_avg_1m"]) for r in points if r.get("load_avg_1m")]
    if loads:
        provenance["load_average_1m_during_measurement"] = {"min": min(loads), "median": float(np.median(loads)),
                                                            "max": max(loads)}
    if load_end:
        provenance["load_average_at_end"] = load_end
    provenance.update(extra_provenance or {})
    info = environment.get("collectives") or {}
    collectives = collectives_section(points, backend=str(info.get("backend", "none")),
                                      provenance=str(info.get("provenance", "measured here by moesim calibrate")))
    if collectives is None:
        collectives = {"backend": "none", "provenance": "not measured",
                       "skipped": str(info.get("skipped") or "not measured (no collectives run recorded)")}
    provenance["gpu_to_gpu_and_node_to_node"] = "NOT measured: placeholders (see collectives for measured collectives)"
    profile = {
        "name": name,
        "source": "measured",
        "provenance": provenance,
        "gpu": gpu,
        "links": {"host_to_device": host_link, "device_to_host": device_link,
                  "gpu_to_gpu": dict(placeholder), "node_to_node": dict(placeholder)},
        "cpu": cpu,
        "operations": operations,
        "collectives": collectives,
    }
    return profile, summary


def concurrent_copies(rows: list[dict[str, str]], link: dict[str, float]) -> dict[str, Any]:
    """Several copies at once (``streams`` > 1), against the fitted one-copy link: the bytes per second all of them
    moved together, and how many times one copy's rate that is (1 = they share one link; ``streams`` = each has
    its own). The simulator's link runs one copy at a time (``num_copy_engines`` stays 1), so this is reported."""
    out: dict[str, Any] = {}
    for streams in sorted({int(r["streams"]) for r in rows}):
        pts = sorted((r for r in rows if int(r["streams"]) == streams), key=lambda r: _num(r, "nbytes"))
        nbytes = np.array([_num(r, "nbytes") for r in pts], dtype=float)
        seconds = np.array([float(r["median_s"]) for r in pts])
        one_s = link["latency_s"] + nbytes / (link["bandwidth_gbps"] * 1e9)
        out[f"streams_{streams}"] = {
            "nbytes": [int(b) for b in nbytes], "aggregate_gbps": [_round(v) for v in streams * nbytes / seconds / 1e9],
            "speedup_vs_one_copy": [_round(v) for v in streams * one_s / seconds]}
    if out:
        out["note"] = ("aggregate rate of N simultaneous copies of nbytes each, and its ratio to one copy's fitted "
                       "rate; the simulator's link is one queue (num_copy_engines 1)")
    return out


def op_mape(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each op's headline MAPE: the table's leave-one-out error, or the efficiency table's / roofline's /
    link's in-sample error."""
    out = {}
    for op, s in summary.items():
        fe = s.get("table_loo") or s.get("efficiency_table") or s.get("roofline") or s.get("link")
        out[op] = fe["mean_rel_error"]
    return out
