"""What ``moesim validate`` adds to its comparison: where the error comes from (the report itself is rendered
from the folder by ``sim.report.validation``).

Per request, the *service error* is the simulator's predicted time of the runtime's own iterations that
request was in (same batches, same routing) against their measured time. It is the cost model's error as
that request saw it, free of queueing feedback. Where the per-request end-to-end error follows the service
error, the cost model explains it; where it is larger, queueing feedback amplified it (another iteration
time -> other batches -> other waiting)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sim.report.validation import BREAKDOWN

# The simulator's op kinds and the runtime's breakdown columns (``BREAKDOWN``) they correspond to.
_KIND_TO_COLUMN = {"attention": "attention_s", "gate": "gate_s", "experts": "expert_compute_s",
                   "expert": "expert_compute_s", "lm_head": "lm_head_s", "iteration_overhead": "other_s",
                   "dense_ffn": "expert_compute_s", "shared": "expert_compute_s"}


def plan_breakdown(planner: Any, plan: Any, timing: Any, shape: Any, counts: np.ndarray) -> dict[str, float]:
    """The simulator's predicted seconds of one iteration in the runtime's categories (``BREAKDOWN``).

    The all-resident fast path plans one ``layers`` op; it is split with the planner's own per-layer costs."""
    out = dict.fromkeys(BREAKDOWN, 0.0)
    for seconds, kind in zip(plan.op_s, plan.op_kind):
        if kind == "layers":
            tokens = shape.num_tokens
            projections_s, gate_s, _, _ = planner._token_costs(tokens)
            sequences = len(shape.prefill_new_tokens) + len(shape.decode_context_tokens)
            layer_overhead_s = planner._overheads(tokens, sequences)[0] if planner._has_batch_overhead else 0.0
            n_layers = len(planner.layer_is_moe)
            attention = n_layers * (projections_s + layer_overhead_s + planner._attention_core_s(shape, sliding=False))
            gate = planner.num_moe_layers * gate_s
            out["attention_s"] += attention
            out["gate_s"] += gate
            out["expert_compute_s"] += seconds - attention - gate
        else:
            out[_KIND_TO_COLUMN.get(kind, "other_s")] += seconds
    out["load_wait_s"] = timing.duration_s - timing.compute_busy_s  # stall plus copies that outlast the stream
    return out


def request_service(recorder: Any, real_it: pd.DataFrame, planned: pd.DataFrame) -> pd.DataFrame:
    """Per request: measured and predicted seconds of the (same-batch) iterations it was in, their misses."""
    real = real_it["duration_s"].to_numpy()
    pred = planned["predicted_s"].to_numpy()
    misses = real_it["expert_misses"].to_numpy()
    acc: dict[int, list[float]] = {}
    for i, batch in enumerate(recorder.batches):
        for rid, *_ in batch:
            row = acc.setdefault(rid, [0.0, 0.0, 0.0, 0.0])
            row[0] += real[i]
            row[1] += pred[i]
            row[2] += misses[i]
            row[3] += 1
    frame = pd.DataFrame([(rid, *v) for rid, v in acc.items()],
                         columns=["request_id", "service_real_s", "service_sim_s", "service_misses", "service_iterations"])
    frame["service_error"] = frame["service_sim_s"] / frame["service_real_s"] - 1.0
    frame["misses_per_iteration"] = frame["service_misses"] / frame["service_iterations"]
    return frame


def error_structure(merged: pd.DataFrame, real_req: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """Which requests carry the error: short vs long, queued vs not, and service (cost model) vs queueing feedback.

    (``closed_loop_excess_p95`` keeps its older name: the free-running replay, not a closed-loop workload.)"""
    m = merged.copy()
    m["queue_real_s"] = (real_req.set_index("request_id")["admitted_at_s"]
                         - real_req.set_index("request_id")["arrived_at_s"]).reindex(m["request_id"]).to_numpy()
    m["e2e_error"] = m["e2e_s_sim"] / m["e2e_s_real"] - 1.0
    out: dict[str, Any] = {}
    short = m["e2e_s_real"] <= m["e2e_s_real"].median()
    out["e2e_ape_median_short_half"] = float(m.loc[short, "e2e_ape"].median())
    out["e2e_ape_median_long_half"] = float(m.loc[~short, "e2e_ape"].median())
    queued = m["queue_real_s"] > 0.5 * m["e2e_s_real"]
    out["requests_queued_over_half_their_e2e"] = int(queued.sum())
    if "service_error" in m:
        service_ape = m["service_error"].abs()
        out["service_ape_median"] = float(service_ape.median())
        out["service_ape_p95"] = float(service_ape.quantile(0.95))
        out["service_bias_median"] = float(m["service_error"].median())
        # Queueing feedback's part: how far each request's e2e error is from its service error.
        out["closed_loop_excess_p95"] = float((m["e2e_error"] - m["service_error"]).abs().quantile(0.95))
        if len(m) > 2 and m["e2e_error"].std() > 0 and m["service_error"].std() > 0:
            out["e2e_vs_service_error_correlation"] = float(np.corrcoef(m["e2e_error"], m["service_error"])[0, 1])
    worst = m.nlargest(min(5, len(m)), "e2e_ape")
    cols = [c for c in ("request_id", "prompt_tokens", "output_tokens", "e2e_s_real", "e2e_ape", "e2e_error",
                        "queue_real_s", "service_error", "misses_per_iteration") if c in m]
    out["worst_requests"] = [{k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in row.items()}
                             for row in worst[cols].to_dict("records")]
    return out, m
