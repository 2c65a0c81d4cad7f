"""Training-side what-if for MoE checkpointing: full versus PEC partial expert checkpoints.

Follows PEC / MoC-System (Cai, Qin, Huang; ASPLOS'25; ../shared/PAPERS.md section 5):

* checkpoint size: full C = (P_ne + P_e)(B_w + B_o); PEC saves only K of the N experts of every MoE
  layer per checkpoint, C_pec = (P_ne + (K/N) P_e)(B_w + B_o); non-expert state is always saved in full;
* fully sharded: every rank saves 1/R of the non-expert state, and the experts saved in a checkpoint are
  interleaved over the ranks (the busiest rank saves ceil(L*K / R) experts' states);
* two-level asynchronous saving: a GPU->CPU snapshot that must finish within the next iteration (or
  training stalls for the rest), then a CPU->storage persist that bounds the shortest interval;
* experts are chosen round-robin (sequential selection), so on a fault an expert restored from a
  checkpoint that is j checkpoints older than the latest loses j * I_ckpt iterations of updates;
* PLT, the proportion of lost tokens: PLT = (1/N_moe) sum_layers sum_faults L_ij / (T_i * TopK_i) with
  L_ij the token-expert assignments whose updates were lost. Under uniform routing each expert receives
  T*TopK/N assignments per iteration, so one fault loses sum_e age_e * I / (N * total_iterations) of all.

Sizes come from the model spec (sim/spec.py), bandwidths from the scenario and the hardware profile."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sim.work import dtype_bytes


class CheckpointSpec(BaseModel):
    """The ``checkpoint:`` section of a scenario (training job, not serving)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_ranks: int | None = Field(None, ge=1, description="Training GPUs sharing the checkpoint; default hardware.num_gpus.")
    pec_experts_per_layer: int = Field(ge=1, description="K_pec: experts of each MoE layer saved per checkpoint.")
    interval_iterations: int = Field(ge=1, description="I_ckpt: iterations between checkpoints.")
    total_iterations: int = Field(ge=1, description="Length of the training run, iterations (PLT's denominator).")
    iteration_s: float | None = Field(None, gt=0, description="Seconds per training iteration; default: from mfu.")
    tokens_per_iteration: int | None = Field(
        None, ge=1, description="Global batch tokens per iteration (needed to derive iteration_s from mfu)."
    )
    mfu: float = Field(0.2, gt=0, le=1, description="Model FLOPs utilisation used to derive iteration_s (PEC's scaling study: 20%).")
    weight_bytes_per_param: float | None = Field(None, gt=0, description="B_w; default: the model's weight dtype.")
    optimizer_bytes_per_param: float = Field(12.0, ge=0, description="B_o; Adam with fp32 master, m and v: 12.")
    snapshot_gbps: float | None = Field(None, gt=0, description="GPU->CPU snapshot bandwidth per rank; default: the profile's device_to_host.")
    storage_gbps: float = Field(gt=0, description="CPU->storage persist bandwidth per rank, GB/s.")
    mtbf_s: float | None = Field(None, gt=0, description="Mean time between failures of the whole job, seconds.")
    restart_s: float = Field(0.0, ge=0, description="O_restart: seconds to restart after a fault.")


@dataclass(frozen=True)
class CheckpointCase:
    """One way of checkpointing (full or PEC) and what it costs."""

    name: str
    experts_per_layer: int
    total_bytes: float
    rank_bytes: float  # the busiest rank's share
    snapshot_s: float
    persist_s: float
    stall_per_checkpoint_s: float
    save_overhead_fraction: float  # stall / time between checkpoints
    min_interval_iterations: int  # persist must finish before the next checkpoint starts
    interval_ok: bool
    lost_iterations_per_fault: float  # recomputed since the latest checkpoint (I/2 on average)
    plt_per_fault: float
    expected_faults: float | None
    plt_expected: float | None
    staleness_mean_iterations: float  # mean age of a restored expert's state behind the latest checkpoint
    staleness_max_iterations: float
    overhead_s: float | None  # PEC's O_ckpt over the whole run


def round_robin_ages(num_experts: int, k: int) -> list[float]:
    """Mean, over the checkpoints of one round-robin cycle, of how many checkpoints ago each expert was
    last saved (0 for the ones saved in the latest), assuming the cycle has run at least once."""
    k = min(k, num_experts)
    cycle = num_experts // math.gcd(num_experts, k)  # checkpoints until the pointer returns to 0
    last_saved = [-(10**9)] * num_experts
    pointer = 0
    # Warm up one full cycle so every expert has been saved, then average over the next cycle.
    totals = [0.0] * num_experts
    for c in range(2 * cycle):
        for i in range(k):
            last_saved[(pointer + i) % num_experts] = c
        pointer = (pointer + k) % num_experts
        if c >= cycle:
            for e in range(num_experts):
                totals[e] += c - last_saved[e]
    return [t / cycle for t in totals]


def _max_age(num_experts: int, k: int) -> int:
    k = min(k, num_experts)
    return math.ceil(num_experts / k) - 1


def checkpoint_cases(model: Any, profile: Any, spec: CheckpointSpec, num_gpus: int) -> list[CheckpointCase]:
    """Full and PEC checkpoints of ``model`` trained on ``num_ranks`` GPUs of ``profile``."""
    ranks = spec.num_ranks or num_gpus
    layers = model.routed_expert_params_total // (model.num_experts * model.expert_params)
    n = model.num_experts
    state = (spec.weight_bytes_per_param or dtype_bytes(model.weight_dtype)) + spec.optimizer_bytes_per_param
    expert_state = model.expert_params * state
    non_expert_state = model.non_expert_params * state
    iteration_s = training_iteration_s(model, profile, spec, ranks)
    snapshot_bps = (spec.snapshot_gbps or profile.links.device_to_host.bandwidth_gbps) * 1e9
    storage_bps = spec.storage_gbps * 1e9
    interval = spec.interval_iterations
    run_s = spec.total_iterations * iteration_s
    faults = run_s / spec.mtbf_s if spec.mtbf_s else None
    out = []
    for name, k in (("full", n), (f"pec K={spec.pec_experts_per_layer}", min(spec.pec_experts_per_layer, n))):
        total = non_expert_state + layers * k * expert_state
        rank = non_expert_state / ranks + math.ceil(layers * k / ranks) * expert_state
        snap = rank / snapshot_bps
        persist = rank / storage_bps
        stall = max(0.0, snap - iteration_s)
        ages = round_robin_ages(n, k)
        plt = sum(ages) * interval / (n * spec.total_iterations)
        lost = interval / 2.0
        overhead = None
        if faults is not None:
            saves = spec.total_iterations / interval
            overhead = stall * saves + faults * (spec.restart_s + lost * iteration_s)
        out.append(CheckpointCase(
            name=name, experts_per_layer=k, total_bytes=total, rank_bytes=rank, snapshot_s=snap, persist_s=persist,
            stall_per_checkpoint_s=stall, save_overhead_fraction=stall / (interval * iteration_s),
            min_interval_iterations=max(1, math.ceil(persist / iteration_s)),
            interval_ok=persist <= interval * iteration_s, lost_iterations_per_fault=lost, plt_per_fault=plt,
            expected_faults=faults, plt_expected=None if faults is None else plt * faults,
            staleness_mean_iterations=sum(ages) / n * interval, staleness_max_iterations=_max_age(n, k) * interval,
            overhead_s=overhead,
        ))
    return out


def training_iteration_s(model: Any, profile: Any, spec: CheckpointSpec, ranks: int) -> float:
    """The scenario's iteration time, or 6 * active params * tokens / (ranks * bf16 peak * MFU)."""
    if spec.iteration_s is not None:
        return spec.iteration_s
    if spec.tokens_per_iteration is None:
        raise ValueError("give checkpoint.iteration_s, or checkpoint.tokens_per_iteration to derive it from mfu")
    peak = profile.gpu.peak_tflops.get("bf16")
    if peak is None:
        raise ValueError(f"profile {profile.name} has no bf16 peak to derive checkpoint.iteration_s from; give iteration_s")
    return 6.0 * model.active_params * spec.tokens_per_iteration / (ranks * peak * 1e12 * spec.mfu)


def restore_sources(model: Any, profile: Any, spec: CheckpointSpec, num_gpus: int) -> list[dict[str, Any]]:
    """Where a failed rank's state can come back from, how long it takes and how stale it is
    (iterations behind the moment of the fault, on average)."""
    cases = checkpoint_cases(model, profile, spec, num_gpus)
    full, pec = cases
    interval = spec.interval_iterations
    rank_bytes = full.rank_bytes  # a restored rank needs its whole shard
    rows = [{
        "source": "peer GPU (a data-parallel replica of the same shard, gpu_to_gpu)",
        "seconds": float(profile.gpu_to_gpu_s(nbytes=rank_bytes)), "bytes": rank_bytes,
        "stale_iterations_mean": 0.0, "note": "live state: nothing lost, needs a surviving replica",
    }]
    for case in cases:
        rows.append({
            "source": f"host memory snapshot, {case.name} (host_to_device)",
            "seconds": float(profile.h2d_copy_s(nbytes=rank_bytes)), "bytes": rank_bytes,
            "stale_iterations_mean": interval / 2.0 + case.staleness_mean_iterations,
            "note": "lost with the node; experts not in the latest checkpoint are older",
        })
        rows.append({
            "source": f"checkpoint storage, {case.name} ({spec.storage_gbps:g} GB/s)",
            "seconds": rank_bytes / (spec.storage_gbps * 1e9), "bytes": rank_bytes,
            "stale_iterations_mean": interval / 2.0 + case.staleness_mean_iterations,
            "note": "survives any node failure",
        })
    del pec
    return rows


def checkpoint_report(model: Any, profile: Any, spec: CheckpointSpec, num_gpus: int) -> dict[str, Any]:
    ranks = spec.num_ranks or num_gpus
    return {
        "model": model.name,
        "profile": profile.name,
        "num_ranks": ranks,
        "iteration_s": training_iteration_s(model, profile, spec, ranks),
        "interval_iterations": spec.interval_iterations,
        "cases": [asdict(c) for c in checkpoint_cases(model, profile, spec, num_gpus)],
        "restore": restore_sources(model, profile, spec, num_gpus),
    }


__all__ = ["CheckpointSpec", "CheckpointCase", "checkpoint_cases", "checkpoint_report", "round_robin_ages"]
