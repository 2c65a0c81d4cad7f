"""Import NVIDIA AIConfigurator's measured kernel tables as a moesim hardware profile.

Source: ``ai-dynamo/aiconfigurator`` at commit ``SOURCE_COMMIT`` (Apache-2.0), copied unchanged into
``../shared/data/gpu_profiling/aiconfigurator`` (see shared/data/SOURCES.md section 3a). Latencies there are
milliseconds per call, timed on one GPU; the profile stores seconds.

What becomes what:

- ``expert_ffn`` (``kind: table``) from the fused-MoE table (``moe_perf.parquet``), rows with
  ``distribution == balanced``, ``moe_tp_size == moe_ep_size == 1``, for every catalog expert shape
  (hidden, inter_size, num_experts, topk) the table has, in bf16 and, where present, fp8 (block-scaled) and
  MXFP4 weights. A row there is ONE MoE layer's routed experts (all of them, one fused grouped kernel) for
  ``num_tokens`` tokens; the simulator needs ONE expert for ``t`` tokens. The conversion:

      assignments     = num_tokens * topk
      active experts  = min(num_experts, assignments)
      tokens/expert   = assignments / active experts         (balanced routing: every active expert equal)
      seconds/expert  = layer seconds / active experts

  ASSUMPTION: the experts of a layer run back to back inside one grouped kernel, so each active expert
  costs an equal share of the layer time (the kernel's launch overhead is spread over them, and the
  simulator summing per-expert times gets the layer time back). Points whose tokens/expert is not an
  integer are dropped (balanced routing cannot split them evenly). Several num_tokens give 1 token per
  expert (``assignments <= num_experts``); the smallest num_tokens is kept (one sequence decoding: ``topk``
  experts with one token each), so a small decode batch is modelled as measured; with many experts at
  one token each the share of the fixed overhead is then overestimated.
  Two models with one ExpertShape (gpt-oss-20b and -120b: 32 vs 128 experts) get the first one's row.
  ``weight_dtype`` is the measured weight format; ``act_dtype`` is bf16 (the activations the layer receives;
  fp8 kernels quantise them inside), the convention of the catalog's ExpertShape.
- ``dense_gemm`` (``kind: table``) from ``gemm_perf.parquet`` (bf16, ``m`` = tokens, ``n`` = out_features,
  ``k`` = in_features) for the catalog's attention projections and LM heads whose (n, k) was measured.
- ``gate`` (``kind: table``): the router GEMM (hidden x num_experts) from the same table plus
  ``GATE_EXTRA_S``, the datasheet profile's softmax and top-k kernels (its gate fixed_s less one GEMM launch).
- ``attention_prefill`` / ``attention_decode`` (``kind: roofline``): fixed_s and efficiencies fitted to the
  context / generation attention tables (bf16 activations and KV cache, full attention, catalog head
  configurations) by minimising the mean relative error; ``fit_error`` is that in-sample error.
- ``fit_error`` of a table: leave-one-out error on the imported grid (each point predicted from the others
  of its row through the profile's own lookup). Each table's ``extrapolation`` roofline is fitted to all
  of its imported points.
- ``gpu``, ``links``, ``cpu``: copied from the datasheet profile of the same GPU. The links are published
  PCIe/NVLink figures, NOT measurements, and the provenance says so.

Token grids are subsampled to at most ``MAX_GRID_POINTS`` log-spaced points per shape so that the shipped
files stay small."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from calibrate.errors import CalibrationError
from calibrate.fit import error_stats, fit_roofline, leave_one_out_errors
from sim.profile import RooflineParams, load_profile
from sim.spec import ModelSpec, load_catalog
from sim.work import DTYPE_BYTES, AttentionShape, ExpertShape, GemmShape

SOURCE_REPO = "ai-dynamo/aiconfigurator"
SOURCE_COMMIT = "095f58a51c4ca8e61b66ec108d86f223f8d559ce"
LICENCE = "Apache-2.0"
LICENCE_FILE = "LICENSE-aiconfigurator-Apache-2.0.txt"  # shipped next to the profiles in sim/data/profiles
MAX_GRID_POINTS = 16
GATE_EXTRA_S = 6.0e-6  # datasheet gate fixed_s 9 us (GEMM + softmax + top-k) less the GEMM's 3 us, now measured
MAX_ATTENTION_FIT_POINTS = 800

# The repository layout: <repo>/../shared/data/gpu_profiling/aiconfigurator
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpu_profiling" / "aiconfigurator"

# AIConfigurator's moe_dtype -> (ExpertShape.weight_dtype, act_dtype)
MOE_DTYPES: dict[str, tuple[str, str]] = {"bfloat16": ("bf16", "bf16"), "fp8_block": ("fp8", "bf16"),
                                          "w4a16_mxfp4": ("mxfp4", "bf16")}


@dataclass(frozen=True)
class GpuSource:
    """Where one GPU's tables are, and the datasheet profile its hardware sections come from."""

    system: str
    moe: str
    gemm: str
    attention: str
    datasheet: str
    name: str


GPUS: dict[str, GpuSource] = {
    "h100": GpuSource("h100_sxm", "moe/vllm/0.24.0", "gemm/vllm/0.24.0", "attention/vllm/0.24.0",
                      "h100-80gb", "h100-80gb-aiconfigurator"),
    "h200": GpuSource("h200_sxm", "moe/vllm/0.24.0", "gemm/vllm/0.24.0", "attention/vllm/0.24.0",
                      "h200", "h200-aiconfigurator"),
    # A100: vLLM 0.14.0's MoE table has no balanced rows; SGLang 0.5.10's has.
    "a100": GpuSource("a100_sxm", "moe/sglang/0.5.10", "gemm/vllm/0.14.0", "attention/vllm/0.14.0",
                      "a100-80gb", "a100-80gb-aiconfigurator"),
}


# ---------------------------------------------------------------- pure conversions


def per_expert_points(num_tokens: Iterable[int], layer_s: Iterable[float], *, topk: int,
                      num_experts: int) -> list[tuple[int, float, int]]:
    """``(tokens per expert, seconds per expert, num_tokens)`` from one MoE layer's balanced measurements.

    See the module docstring: seconds per expert = layer seconds / active experts. Non-integer tokens per
    expert are dropped; of several num_tokens giving the same tokens per expert the smallest is kept."""
    out: dict[int, tuple[int, float, int]] = {}
    for n, s in sorted(zip(num_tokens, layer_s)):
        assignments = int(n) * topk
        active = min(num_experts, assignments)
        if assignments % active:
            continue
        tpe = assignments // active
        if tpe not in out:
            out[tpe] = (tpe, float(s) / active, int(n))
    return [out[t] for t in sorted(out)]


def subsample(tokens: list[int], max_points: int = MAX_GRID_POINTS) -> list[int]:
    """Indexes of at most ``max_points`` grid points, nearest to log-spaced targets; both ends kept."""
    n = len(tokens)
    if n <= max_points:
        return list(range(n))
    logs = np.log(np.asarray(tokens, dtype=np.float64))
    targets = np.linspace(logs[0], logs[-1], max_points)
    picked = sorted({int(np.argmin(np.abs(logs - t))) for t in targets} | {0, n - 1})
    return picked


def _grid_row(shape: ExpertShape | GemmShape, tokens: list[int], seconds: list[float]) -> dict[str, Any]:
    keep = subsample(tokens)
    return {"shape": dataclasses.asdict(shape), "tokens": [int(tokens[i]) for i in keep],
            "latency_s": [float(f"{seconds[i]:.5g}") for i in keep]}


# ---------------------------------------------------------------- reading tables


def _read(data_dir: Path, gpu: GpuSource, sub: str, file: str):  # -> pandas.DataFrame
    import pandas as pd

    path = data_dir / "data" / gpu.system / sub / file
    if not path.exists():
        raise CalibrationError(f"{path}: not found; point --data at a copy of AIConfigurator's data "
                               f"(shared/data/gpu_profiling/aiconfigurator)")
    return pd.read_parquet(path)


def _catalog_models() -> list[ModelSpec]:
    return list(load_catalog().values())


def expert_rows(moe, models: list[ModelSpec]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """expert_ffn table rows and, per row, what it came from (for the provenance)."""
    bal = moe[(moe.distribution == "balanced") & (moe.moe_tp_size == 1) & (moe.moe_ep_size == 1)]
    rows, sources = [], []
    seen: set[tuple] = set()
    shapes_done: set[ExpertShape] = set()
    for m in models:
        if m.ffn_activation != "swiglu":
            continue  # the fused-MoE kernels are gated (SwiGLU) MLPs
        key = (m.hidden_size, m.expert_ffn_size, m.num_experts, m.top_k)
        if key in seen:
            continue
        seen.add(key)
        sel = bal[(bal.hidden_size == key[0]) & (bal.inter_size == key[1]) & (bal.num_experts == key[2])
                  & (bal.topk == key[3])]
        for moe_dtype, (wdt, adt) in MOE_DTYPES.items():
            d = sel[sel.moe_dtype == moe_dtype]
            if d.empty:
                continue
            shape = ExpertShape(hidden=m.hidden_size, ffn=m.expert_ffn_size, num_matrices=3, weight_dtype=wdt,
                                act_dtype=adt)
            if shape in shapes_done:
                # e.g. gpt-oss-20b and -120b: one ExpertShape, different num_experts; the first model's table wins
                continue
            shapes_done.add(shape)
            # One kernel per shape: the framework's fastest (lowest median latency over the grid).
            kernel = d.groupby("kernel_source").latency.median().idxmin()
            med = d[d.kernel_source == kernel].groupby("num_tokens").latency.median()
            pts = per_expert_points(med.index.tolist(), (med.to_numpy() * 1e-3).tolist(),
                                    topk=m.top_k, num_experts=m.num_experts)
            rows.append(_grid_row(shape, [p[0] for p in pts], [p[1] for p in pts]))
            sources.append({"models": [x.name for x in models if (x.hidden_size, x.expert_ffn_size, x.num_experts,
                                                                   x.top_k) == key],
                            "table_shape": f"hidden {key[0]}, inter_size {key[1]}, num_experts {key[2]}, topk {key[3]}",
                            "moe_dtype": moe_dtype, "kernel_source": str(kernel)})
    return rows, sources


def gemm_rows(gemm, shapes: Iterable[GemmShape], extra_s: float = 0.0) -> list[dict[str, Any]]:
    """Table rows for the bf16 GEMM shapes whose (n, k) the table has; ``extra_s`` added to every point."""
    bf = gemm[gemm.gemm_dtype == "bfloat16"]
    rows = []
    for shape in dict.fromkeys(shapes):
        if shape.weight_dtype != "bf16" or shape.act_dtype != "bf16":
            continue
        d = bf[(bf.n == shape.out_features) & (bf.k == shape.in_features)]
        if d.empty:
            continue
        med = d.groupby("m").latency.median()
        rows.append(_grid_row(shape, [int(x) for x in med.index], (med.to_numpy() * 1e-3 + extra_s).tolist()))
    return rows


# ---------------------------------------------------------------- fits


def _peak(gpu: dict[str, Any], shape: ExpertShape | GemmShape) -> float:
    """FLOP/s of the dtype the multiply runs in (the wider of weights and activations), as sim.profile does."""
    w, a = shape.weight_dtype, shape.act_dtype
    dtype = w if DTYPE_BYTES[w] > DTYPE_BYTES[a] else a
    return gpu["peak_tflops"][dtype] * 1e12


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def table_op(op: str, rows: list[dict[str, Any]], gpu: dict[str, Any], note: str) -> dict[str, Any]:
    """A ``kind: table`` op: the rows, a roofline extrapolation fitted to all points, leave-one-out fit_error."""
    if not rows:
        raise CalibrationError(f"{op}: no catalog shape found in the imported tables")
    make = ExpertShape if op == "expert_ffn" else GemmShape
    bw = gpu["memory_bandwidth_gbps"] * 1e9
    flops, nbytes, t = [], [], []
    ref_peak = gpu["peak_tflops"]["bf16"] * 1e12
    for r in rows:
        shape = make(**r["shape"])
        tok = np.asarray(r["tokens"], dtype=np.float64)
        # scale compute to the bf16 peak the fit uses, so each point is judged against its own dtype's peak
        flops.append(shape.flops(tok) * ref_peak / _peak(gpu, shape))
        nbytes.append(shape.bytes_moved(tok))
        t.append(np.asarray(r["latency_s"]))
    params, _ = fit_roofline(np.concatenate(flops), np.concatenate(nbytes), np.concatenate(t), ref_peak, bw)
    params = {k: min(1.0, _round(v)) if k != "fixed_s" else _round(v) for k, v in params.items()}
    loo = np.concatenate([leave_one_out_errors(op, [r], params, _peak(gpu, make(**r["shape"])), bw) for r in rows])
    return {"kind": "table", "fit_error": error_stats(loo, note), "extrapolation": params, "rows": rows}


def _attention_filter(df, models: list[ModelSpec]):
    heads = {(m.num_attention_heads, m.num_kv_heads, m.head_dim) for m in models if m.attention_type != "mla"}
    d = df[(df.attn_dtype == "bfloat16") & (df.kv_cache_dtype == "bfloat16")]
    if "window_size" in d.columns:
        d = d[d.window_size == 0]
    # one kernel: the one with most rows (FA3 on Hopper, FlashAttention-2 on A100)
    d = d[d.kernel_source == d.kernel_source.value_counts().idxmax()]
    mask = [(h, kv, hd) in heads for h, kv, hd in zip(d.num_heads, d.num_key_value_heads, d.head_dim)]
    return d[mask] if any(mask) else d


def attention_op(df, models: list[ModelSpec], gpu: dict[str, Any], *, decode: bool) -> tuple[dict[str, Any], dict]:
    """A roofline fitted to an attention table; its in-sample fit_error; and what it was fitted to."""
    d = _attention_filter(df, models)
    if len(d) > MAX_ATTENTION_FIT_POINTS:  # deterministic thinning keeps the fit fast
        d = d.iloc[np.linspace(0, len(d) - 1, MAX_ATTENTION_FIT_POINTS).round().astype(int)]
    flops, nbytes = [], []
    for h, kv, hd, b, isl, step in zip(d.num_heads, d.num_key_value_heads, d.head_dim, d.batch_size, d.isl, d.step):
        shape = AttentionShape(num_heads=int(h), qk_head_dim=int(hd), v_head_dim=int(hd),
                               kv_bytes_per_token=2 * int(kv) * int(hd) * 2.0)
        if decode:  # one new token per sequence over isl + step cached tokens
            ctx = int(isl) + int(step)
            flops.append(b * float(shape.decode_flops(ctx)))
            nbytes.append(b * float(shape.decode_bytes(ctx)))
        else:  # batch_size sequences of isl new tokens, no cached context
            flops.append(b * float(shape.prefill_flops(int(isl), 0)))
            nbytes.append(b * float(shape.prefill_bytes(int(isl), 0)))
    t = d.latency.to_numpy() * 1e-3
    peak, bw = gpu["peak_tflops"]["bf16"] * 1e12, gpu["memory_bandwidth_gbps"] * 1e9
    flops_a, nbytes_a = np.asarray(flops), np.asarray(nbytes)
    params, _ = fit_roofline(flops_a, nbytes_a, t, peak, bw)
    params = {k: min(1.0, _round(v)) if k != "fixed_s" else _round(v) for k, v in params.items()}
    err = RooflineParams(**params).roofline_s(flops_a, nbytes_a, peak, bw) / t - 1.0
    what = "generation (decode)" if decode else "context (prefill)"
    fe = error_stats(err, f"in-sample error of one roofline over the {what} attention table")
    fitted_to = {"kernel_source": str(d.kernel_source.iloc[0]), "num_points": int(len(d)),
                 "heads": sorted({f"{h}q/{kv}kv x {hd}" for h, kv, hd in
                                  zip(d.num_heads, d.num_key_value_heads, d.head_dim)}),
                 "batch_size": [int(d.batch_size.min()), int(d.batch_size.max())],
                 ("context" if decode else "isl"): [int((d.isl + (d.step if decode else 0)).min()),
                                                    int((d.isl + (d.step if decode else 0)).max())]}
    return {"kind": "roofline", **params, "fit_error": fe}, fitted_to


# ---------------------------------------------------------------- the profile


NCCL_KINDS = {"alltoall": "all_to_all", "all_reduce": "all_reduce", "all_gather": "all_gather",
              "reduce_scatter": "reduce_scatter"}
NCCL_DTYPE_BYTES = {"half": 2, "int8": 1}


def nccl_file(data_dir: Path, gpu: GpuSource) -> Path | None:
    """The NCCL table of ``gpu`` (comm/nccl/<version>/nccl_perf.parquet), or None when the data has none."""
    found = sorted((data_dir / "data" / gpu.system / "comm" / "nccl").glob("*/nccl_perf.parquet"))
    return found[-1] if found else None


def collective_rows(nccl) -> list[dict[str, Any]]:
    """``collectives.rows`` from AIConfigurator's nccl_perf table: half-precision rows, message_size (elements)
    x 2 bytes = per-rank buffer bytes, latency ms -> s, the median of repeated sizes."""
    half = nccl[nccl.nccl_dtype == "half"]
    rows = []
    for (op, n), g in sorted(half.groupby(["op_name", "num_gpus"]), key=lambda kv: (str(kv[0][0]), int(kv[0][1]))):
        if op not in NCCL_KINDS:
            continue
        per = g.groupby("message_size")["latency"].median().sort_index()
        rows.append({"kind": NCCL_KINDS[op], "num_gpus": int(n),
                     "nbytes": [int(m) * NCCL_DTYPE_BYTES["half"] for m in per.index],
                     "latency_s": [float(f"{v * 1e-3:.5g}") for v in per.values]})
    return rows


def build_profile(gpu_key: str, data_dir: Path | str = DEFAULT_DATA_DIR) -> dict[str, Any]:
    """The profile mapping for ``gpu_key`` (h100, h200, a100), valid for ``sim.profile.HardwareProfile``."""
    if gpu_key not in GPUS:
        raise CalibrationError(f"--gpu {gpu_key!r}: expected one of {', '.join(GPUS)}")
    src = GPUS[gpu_key]
    data_dir = Path(data_dir)
    models = _catalog_models()
    datasheet = load_profile(src.datasheet)
    gpu = datasheet.gpu.model_dump()

    moe = _read(data_dir, src, src.moe, "moe_perf.parquet")
    gemm = _read(data_dir, src, src.gemm, "gemm_perf.parquet")
    ctx = _read(data_dir, src, src.attention, "context_attention_perf.parquet")
    gen = _read(data_dir, src, src.attention, "generation_attention_perf.parquet")
    device = str(moe.device.iloc[0])

    loo = "leave-one-out over each shape's imported token grid (each point predicted from the others)"
    e_rows, e_sources = expert_rows(moe, models)
    proj = [s for m in models for s in (*m.attention_projection_shapes, m.lm_head_shape)]
    operations: dict[str, Any] = {
        "expert_ffn": table_op("expert_ffn", e_rows, gpu, loo),
        "dense_gemm": table_op("dense_gemm", gemm_rows(gemm, proj), gpu, loo),
    }
    prefill, prefill_from = attention_op(ctx, models, gpu, decode=False)
    decode, decode_from = attention_op(gen, models, gpu, decode=True)
    operations["attention_prefill"] = prefill
    operations["attention_decode"] = decode
    operations["gate"] = table_op("gate", gemm_rows(gemm, [m.router_shape for m in models], GATE_EXTRA_S), gpu, loo)

    base = f"aic-core/src/aiconfigurator_core/systems/data/{src.system}"
    frameworks = {op: f"{sub.split('/')[1]} {sub.split('/')[2]}" for op, sub in
                  (("moe", src.moe), ("gemm", src.gemm), ("attention", src.attention))}
    provenance: dict[str, Any] = {
        "summary": (f"Imported from NVIDIA AIConfigurator's measured kernel database ({device}); kernel latencies "
                    f"are public measurements (CUDA events / CUDA graphs on one GPU), not measured here. gpu, links "
                    f"and cpu are the datasheet profile {src.datasheet!r}'s."),
        "written_by": f"moesim profile import aiconfigurator --gpu {gpu_key} (calibrate/importers/aiconfigurator.py)",
        "device": device,
        "source": {
            "repository": f"https://github.com/{SOURCE_REPO}",
            "commit": SOURCE_COMMIT,
            "files": [f"{base}/{src.moe}/moe_perf.parquet", f"{base}/{src.gemm}/gemm_perf.parquet",
                      f"{base}/{src.attention}/context_attention_perf.parquet",
                      f"{base}/{src.attention}/generation_attention_perf.parquet"],
            "frameworks": frameworks,
            "units": "latency in milliseconds per call in the source; seconds here",
        },
        "licence": (f"{LICENCE}: the kernel latencies are data of {SOURCE_REPO} (Copyright NVIDIA CORPORATION & "
                    f"AFFILIATES), redistributed under the Apache License 2.0; see {LICENCE_FILE} next to this "
                    f"file. Changes: subsampled, converted to seconds and per expert, roofline fits added."),
        "expert_ffn": {
            "selection": "moe_perf rows with distribution balanced, moe_tp_size 1, moe_ep_size 1; per shape and "
                         "dtype the kernel_source with the lowest median latency; median of repeated rows",
            "derivation": ("a source row is one MoE layer's routed experts for num_tokens tokens. With balanced "
                           "routing, active = min(num_experts, num_tokens * topk) experts each get "
                           "num_tokens * topk / active tokens; seconds per expert = layer seconds / active. "
                           "ASSUMES the experts run back to back in one grouped kernel, so each active expert "
                           "costs an equal share (launch overhead included). Non-integer tokens per expert "
                           "dropped; at 1 token per expert the smallest num_tokens (topk experts active) is kept."),
            "dtypes": "weight_dtype: bf16 = bfloat16, fp8 = fp8_block (128x128 block-scaled, activations "
                      "quantised inside the kernel), mxfp4 = w4a16_mxfp4; act_dtype bf16 throughout",
            "shapes": e_sources,
        },
        "dense_gemm": "gemm_perf bfloat16 rows: m = tokens, n = out_features, k = in_features; the catalog's "
                      "attention projections and LM heads whose (n, k) was measured (others: extrapolation)",
        "gate": (f"gemm_perf bfloat16 router GEMM (hidden x num_experts) + {GATE_EXTRA_S * 1e6:g} us for softmax "
                 f"and top-k (the datasheet profile's gate fixed_s 9 us less the GEMM launch 3 us; assumed)"),
        "attention": {"prefill_fitted_to": prefill_from, "decode_fitted_to": decode_from,
                      "note": "bf16 activations and KV cache, full attention (window 0); the decode context is "
                              "isl + step cached tokens"},
        "grid": f"each shape's token grid subsampled to at most {MAX_GRID_POINTS} log-spaced points",
        "links": ("NOT measured: published figures copied from the datasheet profile "
                  f"{src.datasheet!r} (PCIe and NVLink specifications with assumed efficiencies; see its "
                  "provenance). Replace when a host-to-device measurement exists."),
        "gpu": f"datasheet figures from profile {src.datasheet!r}",
        "cpu": f"representative host from profile {src.datasheet!r} (nominal, not measured)",
    }
    nccl_path = nccl_file(data_dir, src)
    if nccl_path is None:
        collectives: dict[str, Any] = {"backend": "none", "provenance": "not in the imported data",
                                       "skipped": f"{src.system} has no comm/nccl table in the source data"}
    else:
        import pandas as pd

        nccl = pd.read_parquet(nccl_path)
        rel = nccl_path.relative_to(data_dir / "data" / src.system).as_posix()
        collectives = {
            "backend": "nccl",
            "provenance": (f"imported from {SOURCE_REPO} {SOURCE_COMMIT[:8]} ({LICENCE}) {base}/{rel}: NCCL "
                           f"{nccl.version.iloc[0]} on {nccl.device.iloc[0]} ({nccl.framework.iloc[0]} collector), "
                           "half-precision rows; nbytes = message_size elements x 2 bytes (the per-rank buffer), "
                           "latency ms -> s, median of repeated sizes"),
            "rows": collective_rows(nccl)}
        provenance["source"]["files"].append(f"{base}/{rel}")
    return {
        "name": src.name,
        "source": "public-measurements",
        "provenance": provenance,
        "gpu": gpu,
        "links": datasheet.links.model_dump(),
        "cpu": datasheet.cpu.model_dump(),
        "operations": operations,
        "collectives": collectives,
    }


def profile_yaml(profile: dict[str, Any]) -> str:
    """The YAML text of an imported profile, with a header saying what it is."""
    import yaml

    header = (f"# {profile['name']}: IMPORTED from public measurements ({SOURCE_REPO} {SOURCE_COMMIT[:8]}, "
              f"{LICENCE}, see {LICENCE_FILE}).\n"
              "# Written by `moesim profile import aiconfigurator`; do not edit by hand, re-import instead.\n"
              "# Units: seconds, bytes; *_gbps = GB/s. links are published figures, NOT measured.\n")
    return header + yaml.safe_dump(profile, sort_keys=False, width=120)


def write_profile(gpu_key: str, out: Path | str, data_dir: Path | str = DEFAULT_DATA_DIR) -> dict[str, Any]:
    """Import, validate with sim's loader, and write ``out``; returns the profile mapping."""
    from sim.profile import parse_profile

    out = Path(out)
    profile = build_profile(gpu_key, data_dir)
    text = profile_yaml(profile)
    parse_profile(text, origin=str(out))  # what we write must load
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return profile
