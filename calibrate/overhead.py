"""Measuring the overhead the kernel tables leave out, on the CPU runtime itself.

The op tables (``calibrate.measure``) time each kernel alone. A real iteration of ``calibrate.runtime`` also
runs RMSNorms, residual adds, KV-cache writes and stacking, the router's output to numpy, the expert cache's
bookkeeping, the token gather / weighting / ``index_add_`` scatter around every expert, batch assembly,
embedding and sampling, and its Python around all of that. This module runs the runtime's own iteration
(``Runtime.run_batch``: the code that serves requests) on a grid of batches, every expert resident, and
fits what the runtime measured beyond what the profile's op lookups predict for the same batch:

- ``expert_overhead`` (per expert call, affine in its tokens, plus the share ``kernel_scale`` of the
  ``expert_ffn`` table the call pays): the runtime's expert time of an iteration (every ``_run_expert``:
  gather, FFN, weighting, scatter-add; and each shared expert, one call over every token) against the
  ``expert_ffn_s`` of its calls, the number of calls and the tokens routed. The isolated table's shape does not carry over to calls inside an iteration (a grid batch of
  one decode token came out 10-14% slow with the table kept whole), so its share is fitted.
- ``layer_overhead`` (per layer, affine in the batch's tokens and sequences): the runtime's attention + gate
  time per layer minus the planner's projections + attention core + gate for that batch.
- ``iteration_overhead`` (affine in tokens and sequences): the runtime's LM head + other time minus the
  LM head lookup.

- ``load_interference`` (per byte loaded): the same grid run again with an LRU expert cache of half the experts,
  so misses are copied by the runtime's copy thread while the compute thread runs the layer's experts. The
  runtime's compute-stream time of each iteration (its duration minus the time it waited for loads) minus the
  planner's ops for it (kernels + the overheads just fitted), against the bytes loaded in it: what each load
  costs the compute thread (the copy thread's memory traffic and GIL time slowing the experts beside it, and
  the per-miss cache bookkeeping and job submission). A planner with its own LRU cache of the same size plans
  every batch in the same order, so its loads match the runtime's (checked).

Residuals are fitted by ordinary least squares on medians over repeats (interleaved rounds, as
``measure_group`` does, so a burst of foreign load hits few samples of each point). Each term's
``fit_error`` is the error of the part it completes (e.g. ffn + overhead vs the measured expert call),
and ``provenance.overheads.iteration_check`` the error of the whole predicted iteration."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from calibrate.fit import error_stats

# The model ``moesim calibrate`` measures the overhead terms on: the CPU runtime cannot hold a catalog
# model, and the terms are the runtime's framework costs (per layer, per expert call, per iteration), so a
# small model of the validation scenarios' shape (scenarios/validate-*.yaml) is what they are measured on.
RUNTIME_SPEC: dict[str, Any] = {
    "name": "tiny-mixtral", "source": "Mixtral-8x7B config scaled down for the CPU validation runtime",
    "hidden_size": 512, "num_layers": 8, "vocab_size": 2048, "attention_type": "gqa", "num_attention_heads": 8,
    "num_kv_heads": 2, "head_dim": 64, "num_experts": 8, "top_k": 2, "expert_ffn_size": 1024,
}


def runtime_spec() -> Any:
    """The ModelSpec of ``RUNTIME_SPEC``."""
    from sim.spec import ModelSpec

    return ModelSpec.model_validate(RUNTIME_SPEC)


# Batches (context before, new tokens, is prefill) covering decode-only, prefill-only and mixed iterations.
# Decode batches of every size up to a full batch, each at a short and a long context: serving spends most
# iterations decoding, and the fit weighs every grid batch alike, so decode shapes must dominate the grid
# as they dominate a run (with a grid of mostly prefill, decode iterations came out 5-10% slow).
_DECODE_BATCHES = (1, 2, 3, 4, 5, 6, 7, 8)
_PREFILL_CHUNKS = ((16,), (64,), (128,), (48, 48), (24, 96))
_MIXED = ((1, 96), (2, 24), (3, 64), (4, 96), (6, 16), (8, 32))


def overhead_batches(seed: int = 0, max_context: int = 192) -> list[list[tuple[int, int, bool]]]:
    """The grid of batches the overhead is measured on (seeded decode contexts)."""
    rng = np.random.default_rng(seed)
    middle = max_context // 2

    def decodes(n: int, low: int = 16, high: int = max_context) -> list[tuple[int, int, bool]]:
        return [(int(c), 1, False) for c in rng.integers(low, high, n)]

    batches = [decodes(b, 16, middle) for b in _DECODE_BATCHES]
    batches += [decodes(b, middle, max_context) for b in _DECODE_BATCHES]
    batches += [[(0, n, True) for n in chunk] for chunk in _PREFILL_CHUNKS]
    batches += [decodes(b) + [(int(rng.integers(0, 64)), n, True)] for b, n in _MIXED]
    return batches


def _lstsq(columns: list[np.ndarray], y: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Least squares of ``y ~ columns`` in units of ``scale`` (the measured total the residual ``y`` belongs
    to): relative error, as every other fit here, so small batches weigh as much as large ones."""
    a = np.stack(columns, axis=1) / scale[:, None]
    coef, *_ = np.linalg.lstsq(a, y / scale, rcond=None)
    return coef


def fit_expert_calls(ffn_s: np.ndarray, call_tokens: list[np.ndarray], real_s: np.ndarray, *,
                     fit_kernel_scale: bool) -> tuple[float, float, float, np.ndarray]:
    """Fit ``real_s[i] ~ scale * ffn_s[i] + sum over batch i's calls of max(0, fixed + per_token * tokens)``.

    ``ffn_s[i]``: the expert_ffn table summed over batch i's calls; ``call_tokens[i]``: each call's tokens.
    Relative least squares for ``fixed``/``per_token``; ``scale`` is 1 unless ``fit_kernel_scale``, then
    searched on [0, 1] rather than solved for: the table is itself nearly affine in tokens, so a free share
    is ill-conditioned (a noisy grid gave 2.2 with negative per-call terms). Returns (scale, fixed,
    per_token, predicted seconds per batch)."""
    n_calls = np.array([len(t) for t in call_tokens], dtype=np.float64)
    routed = np.array([float(np.sum(t)) for t in call_tokens])

    def fit(scale: float) -> tuple[float, float, float, np.ndarray]:
        fixed, per_tok = _lstsq([n_calls, routed], real_s - scale * ffn_s, real_s)
        pred = scale * ffn_s + np.array([float(np.sum(np.maximum(0.0, fixed + per_tok * t))) for t in call_tokens])
        return scale, float(fixed), float(per_tok), pred

    scales = np.linspace(0.0, 1.0, 21) if fit_kernel_scale else np.array([1.0])
    return min((fit(float(sc)) for sc in scales), key=lambda f: float(np.sum((f[3] / real_s - 1.0) ** 2)))


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def measure_overheads(spec: Any, profile: Any, *, seed: int = 0, threads: int = 1, rounds: int = 5,
                      log: Any = None, fit_kernel_scale: bool = False, device: str = "cpu"
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the runtime on the grid and fit the three overhead terms against ``profile``'s op lookups.

    ``fit_kernel_scale``: also fit the share of the ``expert_ffn`` table an expert call pays. Only for a
    profile of exactly ``spec``'s shapes (``moesim validate``): the fitted call cost is then ``spec``'s own,
    and a general profile (``moesim calibrate``), used for other models' experts, keeps the whole table.

    Returns the ``operations`` entries (``layer_overhead``, ``expert_overhead``, ``iteration_overhead``) and a
    provenance mapping (grid, method, fitted coefficients, errors)."""
    import torch

    from calibrate.runtime.server import Runtime
    from sim.engine.iteration import BatchShape, IterationPlanner
    from sim.policies.cache import make_cache

    from sim.profile import OVERHEADS, HardwareProfile

    # The kernels alone: any overhead terms the profile already has are left out of the predictions.
    data = profile.model_dump()
    data["operations"].update({op: None for op in OVERHEADS})
    profile = HardwareProfile.model_validate(data)
    batches = overhead_batches(seed)
    runtime = Runtime.for_measurement(spec, seed=seed, threads=threads, device=device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    samples: list[list[dict[str, Any]]] = [[] for _ in batches]
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            runtime._warm_up()
            for b in batches:  # one untimed pass: first-call costs of each size stay out
                runtime.run_batch(b)
            for _ in range(rounds):
                for i, b in enumerate(batches):
                    samples[i].append(runtime.run_batch(b))
    finally:
        runtime.close()
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started

    # The planner's own lookups for each batch (a profile without overheads: the kernels alone).
    L = spec.num_layers
    cache = make_cache("all_resident", num_layers=spec.num_moe_layers, num_experts=spec.num_experts,
                       capacity_experts=spec.num_moe_layers * spec.num_experts, per_layer=False)
    planner = IterationPlanner(model=spec, profile=profile, cache=cache)
    rows = []
    for b, runs in zip(batches, samples):
        pre = [(pos, n) for pos, n, p in b if p]
        shape = BatchShape(prefill_new_tokens=np.asarray([n for _, n in pre], dtype=np.int64),
                           prefill_context_tokens=np.asarray([p for p, _ in pre], dtype=np.int64),
                           decode_context_tokens=np.asarray([pos for pos, _, p in b if not p], dtype=np.int64),
                           num_emitting=len(b))
        tokens, seqs = shape.num_tokens, len(b)
        proj, gate, _, _ = planner._token_costs(tokens)
        layer_pred = proj + planner._attention_core_s(shape, sliding=False) + gate
        lm_pred = float(profile.dense_gemm_s(tokens=len(b), shape=spec.lm_head_shape))
        med = {k: float(np.median([r[k] for r in runs]))
               for k in ("attention_s", "gate_s", "expert_compute_s", "lm_head_s", "other_s", "duration_s")}
        counts = runs[0]["counts"]
        if any(not np.array_equal(r["counts"], counts) for r in runs):
            raise RuntimeError("the runtime routed the same batch differently between repeats")
        call_tokens = counts[counts > 0].astype(np.float64)
        ffn_pred = float(np.sum(profile.expert_ffn_s(tokens=call_tokens, shape=spec.expert_shape)))
        if spec.num_shared_experts:  # a shared expert is one more call per layer over every token
            shared_calls = spec.num_moe_layers * spec.num_shared_experts
            ffn_pred += shared_calls * float(profile.expert_ffn_s(tokens=tokens, shape=spec.shared_expert_shape))
            call_tokens = np.concatenate([call_tokens, np.full(shared_calls, float(tokens))])
        rows.append(dict(tokens=tokens, seqs=seqs, layer_real=(med["attention_s"] + med["gate_s"]) / L,
                         layer_pred=layer_pred, iter_real=med["lm_head_s"] + med["other_s"], lm_pred=lm_pred,
                         expert_real=med["expert_compute_s"], duration=med["duration_s"], call_tokens=call_tokens,
                         ffn_pred=ffn_pred))

    tok = np.array([r["tokens"] for r in rows], dtype=np.float64)
    seq = np.array([r["seqs"] for r in rows], dtype=np.float64)
    one = np.ones_like(tok)

    def batch_fit(real: np.ndarray, pred: np.ndarray, note: str) -> dict[str, Any]:
        fixed, per_tok, per_seq = _lstsq([one, tok, seq], real - pred, real)
        fitted = pred + np.maximum(0.0, fixed + per_tok * tok + per_seq * seq)
        return {"fixed_s": _r(fixed), "per_token_s": _r(per_tok), "per_sequence_s": _r(per_seq),
                "fit_error": error_stats(fitted / real - 1.0, note)}

    # Experts: the runtime's expert time of an iteration against the expert_ffn lookups of its routing, the
    # number of expert calls and the tokens routed (k per token): a per-call fixed + per-token cost.
    ffn_sum = np.array([r["ffn_pred"] for r in rows])
    expert_real = np.array([r["expert_real"] for r in rows])
    # With ``fit_kernel_scale`` the table's share is fitted too: an expert alone with cold rotated weights is
    # not what the call costs between the other work of an iteration (near 0 on the CPU runtime, where a
    # call is affine in its tokens).
    e_scale, e_fixed, e_tok, e_pred = fit_expert_calls(ffn_sum, [r["call_tokens"] for r in rows], expert_real,
                                                       fit_kernel_scale=fit_kernel_scale)
    expert = {"fixed_s": _r(e_fixed), "per_token_s": _r(e_tok), "kernel_scale": _r(e_scale),
              "fit_error": error_stats(e_pred / expert_real - 1.0,
                                       "expert_ffn + overhead of every call vs the runtime's expert time, per grid "
                                       "batch (in-sample)")}
    layer = batch_fit(np.array([r["layer_real"] for r in rows]), np.array([r["layer_pred"] for r in rows]),
                      "projections + attention core + gate + overhead vs the runtime's attention + gate time "
                      "per layer, per grid batch (in-sample)")
    iteration = batch_fit(np.array([r["iter_real"] for r in rows]), np.array([r["lm_pred"] for r in rows]),
                          "LM head + overhead vs the runtime's LM head + other time, per grid batch (in-sample)")
    operations = {"layer_overhead": layer, "expert_overhead": expert, "iteration_overhead": iteration}
    interference, interference_prov = measure_load_interference(
        spec, profile, operations, seed=seed, threads=threads, rounds=rounds, device=device)
    operations["load_interference"] = interference

    # The whole iteration, predicted with the fitted terms, against the measured durations.
    data = profile.model_dump()
    data["operations"].update(operations)
    fitted_profile = HardwareProfile.model_validate(data)
    check_planner = IterationPlanner(model=spec, profile=fitted_profile, cache=cache)
    base_planner = IterationPlanner(model=spec, profile=profile, cache=cache)
    errs, base_errs = [], []
    for b, runs, r in zip(batches, samples, rows):
        counts = runs[0]["counts"]
        pre = [(pos, n) for pos, n, p in b if p]
        shape = BatchShape(prefill_new_tokens=np.asarray([n for _, n in pre], dtype=np.int64),
                           prefill_context_tokens=np.asarray([p for p, _ in pre], dtype=np.int64),
                           decode_context_tokens=np.asarray([pos for pos, _, p in b if not p], dtype=np.int64),
                           num_emitting=len(b))
        errs.append(sum(check_planner.plan(shape, counts).op_s) / r["duration"] - 1.0)
        base_errs.append(sum(base_planner.plan(shape, counts).op_s) / r["duration"] - 1.0)
    check = error_stats(errs, "planner with the fitted overheads vs the runtime's iteration duration, per grid "
                              "batch (in-sample)")
    without = error_stats(base_errs, "the same without the overhead terms")
    provenance = {
        "method": ("runtime's own iteration (calibrate.runtime Runtime.run_batch, all experts resident) on a grid "
                   "of batches; residual of its timers over the profile's op lookups, least squares (see "
                   "calibrate/overhead.py)"),
        "grid": [[list(s) for s in b] for b in batches],
        "rounds": rounds, "threads": threads, "measure_s": round(elapsed, 1),
        "iteration_check": check, "iteration_check_without_overheads": without,
        "iteration_check_per_batch": [round(float(e), 4) for e in errs],
        "median_bias_without_overheads": round(float(np.median(base_errs)), 4),
        "load_interference": interference_prov,
    }
    if log:
        log(f"overheads: layer {layer['fixed_s']:.3g} s + {layer['per_token_s']:.3g} s/token + "
            f"{layer['per_sequence_s']:.3g} s/seq; expert {expert['kernel_scale']:.2g} x table + {expert['fixed_s']:.3g} s + "
            f"{expert['per_token_s']:.3g} s/token; iteration {iteration['fixed_s']:.3g} s; load interference {interference['s_per_byte']:.3g} s/byte; "
            f"whole-iteration error median "
            f"{check['median_rel_error']:.1%} (without: {without['median_rel_error']:.1%})")
    return operations, provenance



def measure_load_interference(spec: Any, profile: Any, operations: dict[str, Any], *, seed: int = 0,
                              threads: int = 1, rounds: int = 5, device: str = "cpu"
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``load_interference``: the compute time each expert load adds beside it, on the runtime.

    ``profile`` holds the kernels alone and ``operations`` the overhead terms fitted on the all-resident grid.
    The grid runs with an LRU cache of half the experts (global scope), so loads happen; a planner with the
    same cache plans each batch in the same order. Fitted per timed run (the cache state, so the loads,
    differ between rounds): runtime compute-stream time (duration - load wait) - the plan's ops ~ s_per_byte *
    bytes loaded, relative least squares without an intercept. Returns the ``operations`` entry and its provenance."""
    import torch

    from calibrate.runtime.expert_store import ExpertStore
    from calibrate.runtime.server import Runtime
    from sim.engine.iteration import BatchShape, IterationPlanner, time_plan
    from sim.policies.cache import make_cache
    from sim.profile import HardwareProfile

    data = profile.model_dump()
    data["operations"].update(operations)
    data["operations"]["load_interference"] = None
    fitted = HardwareProfile.model_validate(data)
    n_layers, n_experts = spec.num_moe_layers, spec.num_experts
    capacity = max(1, n_layers * n_experts // 2)

    def lru() -> Any:
        return make_cache("lru", num_layers=n_layers, num_experts=n_experts, capacity_experts=capacity,
                          per_layer=False)

    batches = overhead_batches(seed)
    runtime = Runtime.for_measurement(spec, seed=seed, threads=threads, device=device)
    runtime.store.close()
    runtime.store = ExpertStore(runtime.model.host_experts, lru(), num_experts=n_experts, device=device)
    planner = IterationPlanner(model=spec, profile=fitted, cache=lru())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            runtime._warm_up()
            for r in range(rounds + 1):  # round 0 untimed: first-call costs and a cold cache stay out
                for b in batches:
                    out = runtime.run_batch(b)
                    pre = [(pos, n) for pos, n, p in b if p]
                    shape = BatchShape(
                        prefill_new_tokens=np.asarray([n for _, n in pre], dtype=np.int64),
                        prefill_context_tokens=np.asarray([p for p, _ in pre], dtype=np.int64),
                        decode_context_tokens=np.asarray([pos for pos, _, p in b if not p], dtype=np.int64),
                        num_emitting=len(b))
                    counts = out["counts"]
                    plan = planner.plan(shape, counts)
                    if plan.misses != out["expert_misses"]:
                        raise RuntimeError(f"the planner's cache loaded {plan.misses} experts where the runtime's "
                                           f"loaded {out['expert_misses']}")
                    if r == 0:
                        continue
                    rows.append(dict(loads=plan.misses, stream_real=out["duration_s"] - out["load_wait_s"],
                                     stream_pred=float(sum(plan.op_s)), duration=out["duration_s"], plan=plan))
    finally:
        runtime.close()
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started

    nbytes = float(spec.expert_bytes)
    loaded = np.array([r["loads"] for r in rows], dtype=np.float64) * nbytes
    real = np.array([r["stream_real"] for r in rows])
    pred = np.array([r["stream_pred"] for r in rows])
    (per_byte,) = _lstsq([loaded], real - pred, real)
    per_byte = max(0.0, float(per_byte))
    term = {"s_per_byte": _r(per_byte),
            "fit_error": error_stats((pred + per_byte * loaded) / real - 1.0,
                                     "planned compute ops + interference of the iteration's loads vs the "
                                     "runtime's duration minus load wait, per timed run of the half-cache grid (in-sample)")}
    # The whole iteration with and without the term, against the measured durations.
    data["operations"]["load_interference"] = term
    with_term = IterationPlanner(model=spec, profile=HardwareProfile.model_validate(data), cache=lru())
    errs, base_errs = [], []
    for r in rows:
        plan = r["plan"]
        errs.append(_duration_with(plan, with_term.load_interference_s) / r["duration"] - 1.0)
        base_errs.append(time_plan(plan).duration_s / r["duration"] - 1.0)
    provenance = {
        "method": ("the overhead grid again with an LRU cache of half the experts (runtime copy thread); runtime "
                   "duration minus load wait, minus the planned compute ops, vs bytes loaded, least squares (see calibrate/overhead.py)"),
        "capacity_experts": capacity, "rounds": rounds, "timed_runs": len(rows),
        "loads_per_run": {"min": int(min(r["loads"] for r in rows)), "max": int(max(r["loads"] for r in rows)),
                          "mean": round(float(np.mean([r["loads"] for r in rows])), 2)},
        "s_per_load": _r(per_byte * nbytes), "measure_s": round(elapsed, 1),
        "iteration_check": error_stats(errs, "planner with the interference vs the runtime's iteration duration, "
                                             "per timed run of the half-cache grid (in-sample)"),
        "iteration_check_without": error_stats(base_errs, "the same without the interference term"),
        "median_bias": round(float(np.median(errs)), 4),
        "median_bias_without": round(float(np.median(base_errs)), 4),
    }
    return term, provenance


def _duration_with(plan: Any, interference_s: float) -> float:
    """``plan``'s duration with ``interference_s`` added to each op that waits for a load (as the planner does)."""
    from dataclasses import replace

    from sim.engine.iteration import time_plan

    ops = [s + interference_s if load >= 0 else s for s, load in zip(plan.op_s, plan.op_load)]
    return time_plan(replace(plan, op_s=ops)).duration_s
