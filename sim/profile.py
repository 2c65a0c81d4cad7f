"""How long work takes on one kind of GPU node: the hardware profile and its lookups.

A profile is one YAML file: ``name``, ``source`` (datasheet, measured or public-measurements),
``provenance`` (free mapping: who, when, how, which documents), ``gpu``, ``links``, ``cpu`` and
``operations``, one latency model per operation. The work an operation does (FLOPs, bytes) comes
from ``sim.work``; the profile only turns work into seconds.

Latency models (``kind``):

- ``roofline``: ``fixed_s + max(flops / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency))``.
- ``table`` (expert_ffn, dense_gemm, gate only): measured seconds on a token grid per shape,
  interpolated log-log; outside the grid, or for a shape that was not measured, the roofline
  of ``extrapolation`` (scaled to meet the nearest measured point); ``extrapolated_counts()``
  says how often that happened.

Optional overhead terms (absent: 0 s; datasheet and imported profiles do not model them), each affine
in the work it accompanies and never negative (``max(0, ...)``):

- ``layer_overhead``: per decoder layer per iteration, ``fixed_s + per_token_s * tokens + per_sequence_s *
  sequences`` of the batch: norms, residual adds, KV-cache writes, router output to the host, cache
  bookkeeping and the framework's per-layer Python, i.e. everything a layer does besides its modelled ops.
- ``expert_overhead``: per routed expert call, ``fixed_s + per_token_s * tokens`` routed to it: token
  gather, weighting and scatter-add (index_add_) around the expert FFN.
- ``iteration_overhead``: once per iteration, ``fixed_s + per_token_s * tokens + per_sequence_s * sequences``:
  batch assembly, embedding, sampling, scheduling.
- ``load_interference``: compute time added per expert load, ``s_per_byte * nbytes`` of the load: the
  slowdown of the compute stream while a host->device copy runs beside it. On a GPU a DMA copy engine
  leaves the SMs alone (absent: 0 s); on a CPU the copy thread takes memory bandwidth, cache and the GIL
  from the compute thread (``calibrate.overhead`` measures all the compute-stream time a load adds, its
  cache bookkeeping and job submission included). The planner charges it to the expert op that waits for the load (see
  ``sim.engine.iteration``).

Lookups are ``<operation>_s(...)`` with keyword sizes; they take numpy arrays or scalars and
return seconds (an array, or a numpy float for a scalar). No work costs 0 s exactly: an expert
with no tokens is not run. Rates named ``*_gbps`` are GB/s (1e9 bytes/s), not gigabits.
Every problem a user can fix raises ``ProfileError`` naming the file and the key path."""

from __future__ import annotations

import dataclasses
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from sim.errors import ProfileError
from sim.work import DTYPE_BYTES, AttentionShape, ExpertShape, GemmShape

OPERATIONS: tuple[str, ...] = ("expert_ffn", "dense_gemm", "attention_prefill", "attention_decode", "gate")
_SHAPE_OF_OP: dict[str, type] = {"expert_ffn": ExpertShape, "dense_gemm": GemmShape, "gate": GemmShape}


class _Section(BaseModel):
    """Base of every profile section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- latency models


class FitError(_Section):
    """How far a fitted model is from the measurements it came from (relative errors, |fit - meas| / meas)."""

    median_rel_error: float = Field(ge=0)
    p95_rel_error: float = Field(ge=0)
    max_rel_error: float = Field(ge=0)
    num_points: int = Field(ge=1)
    mean_rel_error: float | None = Field(default=None, ge=0, description="MAPE; optional (older profiles lack it).")
    note: str = ""


class RooflineParams(_Section):
    """A fixed cost per call plus the slower of compute and memory traffic, at a fraction of peak."""

    fixed_s: float = Field(ge=0, description="Launch and overhead per call.")
    compute_efficiency: float = Field(gt=0, le=1, description="Fraction of the GPU's peak FLOP/s reached.")
    memory_efficiency: float = Field(gt=0, le=1, description="Fraction of the GPU's memory bandwidth reached.")

    def roofline_s(
        self, flops: np.ndarray, nbytes: np.ndarray, peak_flops_per_s: float, bytes_per_s: float
    ) -> np.ndarray:
        compute_s = flops / (peak_flops_per_s * self.compute_efficiency)
        memory_s = nbytes / (bytes_per_s * self.memory_efficiency)
        return self.fixed_s + np.maximum(compute_s, memory_s)


class RooflineModel(RooflineParams):
    """An operation modelled by its roofline alone (datasheet profiles, or a roofline fitted to measurements)."""

    kind: Literal["roofline"]
    fit_error: FitError | None = Field(description="null for a datasheet profile; required key.")
    def seconds(
        self, *, tokens: np.ndarray, shape: Any, flops: np.ndarray, nbytes: np.ndarray,
        peak_flops_per_s: float, bytes_per_s: float,
    ) -> tuple[np.ndarray, int]:
        """Seconds per call and how many of them fell outside measured data (none: a roofline claims no grid)."""
        return self.roofline_s(flops, nbytes, peak_flops_per_s, bytes_per_s), 0


class TableRow(_Section):
    """Measured seconds of one shape at increasing token counts."""

    shape: dict[str, int | str] = Field(description="Every field of the op's shape, e.g. hidden, ffn, num_matrices, ...")
    tokens: list[int] = Field(min_length=1)
    latency_s: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _grid_is_usable(self) -> "TableRow":
        if len(self.tokens) != len(self.latency_s):
            raise ValueError(f"tokens has {len(self.tokens)} values but latency_s has {len(self.latency_s)}")
        if self.tokens[0] <= 0 or any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError(f"tokens must be positive and strictly increasing; got {self.tokens}")
        if any(s <= 0 for s in self.latency_s):
            raise ValueError(f"latency_s must be positive; got {self.latency_s}")
        return self


class TableModel(_Section):
    """Measured latencies on a token grid per shape; roofline beyond the grid and for unmeasured shapes."""

    kind: Literal["table"]
    fit_error: FitError | None = Field(description="e.g. leave-one-out error of the interpolation; required key.")
    extrapolation: RooflineParams
    rows: list[TableRow] = Field(min_length=1)
    _grids: dict[frozenset, tuple[np.ndarray, np.ndarray]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _shapes_are_distinct(self) -> "TableModel":
        seen: set[frozenset] = set()
        for i, row in enumerate(self.rows):
            key = frozenset(row.shape.items())
            if key in seen:
                raise ValueError(f"rows[{i}] repeats the shape {row.shape}")
            seen.add(key)
        return self

    def model_post_init(self, __context: Any) -> None:
        for row in self.rows:
            key = frozenset(row.shape.items())
            self._grids[key] = (np.asarray(row.tokens, dtype=np.float64), np.asarray(row.latency_s, dtype=np.float64))

    def seconds(
        self, *, tokens: np.ndarray, shape: Any, flops: np.ndarray, nbytes: np.ndarray,
        peak_flops_per_s: float, bytes_per_s: float,
    ) -> tuple[np.ndarray, int]:
        """Interpolated seconds per call, and how many calls (with tokens > 0) were outside measured data."""
        roof = self.extrapolation.roofline_s(flops, nbytes, peak_flops_per_s, bytes_per_s)
        grid = self._grids.get(frozenset(dataclasses.asdict(shape).items()))
        if grid is None:
            return roof, int(np.count_nonzero(tokens > 0))
        grid_tokens, grid_s = grid
        inside = np.interp(np.log(np.maximum(tokens, 1e-300)), np.log(grid_tokens), np.log(grid_s))

        def edge_roof(t: float) -> float:
            return float(self.extrapolation.roofline_s(shape.flops(t), shape.bytes_moved(t), peak_flops_per_s, bytes_per_s))

        # Beyond the grid, follow the roofline's shape but meet the measured edge point (no jump at the edge).
        lo_t, hi_t = grid_tokens[0], grid_tokens[-1]
        below = grid_s[0] * roof / edge_roof(lo_t)
        above = grid_s[-1] * roof / edge_roof(hi_t)
        out = np.where(tokens < lo_t, below, np.where(tokens > hi_t, above, np.exp(inside)))
        outside = (tokens > 0) & ((tokens < lo_t) | (tokens > hi_t))
        return out, int(np.count_nonzero(outside))


class EfficiencyRow(_Section):
    """Compute efficiency measured per prompt length for one head dimension."""

    qk_head_dim: int = Field(ge=1)
    tokens: list[int] = Field(min_length=1, description="New tokens per sequence at which efficiency was measured.")
    compute_efficiency: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _grid_is_usable(self) -> "EfficiencyRow":
        if len(self.tokens) != len(self.compute_efficiency):
            raise ValueError(f"tokens has {len(self.tokens)} values but compute_efficiency has "
                             f"{len(self.compute_efficiency)}")
        if self.tokens[0] <= 0 or any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError(f"tokens must be positive and strictly increasing; got {self.tokens}")
        if any(not 0 < e <= 1 for e in self.compute_efficiency):
            raise ValueError(f"compute_efficiency must be in (0, 1]; got {self.compute_efficiency}")
        return self


def _nearest_head_dim(rows: list[Any], head_dim: int) -> tuple[Any, bool]:
    """The row measured at ``head_dim``, else the nearest one (and False: not measured at this head_dim)."""
    exact = next((r for r in rows if r.qk_head_dim == head_dim), None)
    if exact is not None:
        return exact, True
    return min(rows, key=lambda r: (abs(np.log(r.qk_head_dim / head_dim)), r.qk_head_dim)), False


class EfficiencyTableModel(_Section):
    """Attention prefill as a roofline whose compute efficiency was measured per prompt length.

    On a CPU the SDPA kernel's attained FLOP/s grows with the sequence length (its blocking) and depends on
    the head dimension, but not on the number of query / KV heads (measured: MHA 16/16 and GQA 32/4 at head
    dim 128 agree within a few %), so one roofline cannot fit the whole range. Per head dimension,
    ``compute_efficiency[i]`` is the efficiency measured at ``tokens[i]`` new tokens, interpolated log-log
    between grid points and held at the edge value outside (roofline extrapolation). Lengths outside the grid
    and head dimensions not measured (the nearest one's row is used) are counted by ``extrapolated_counts``."""

    kind: Literal["efficiency_table"]
    fit_error: FitError | None = Field(description="error of this model at the measured points; required key.")
    fixed_s: float = Field(ge=0, description="Launch and overhead per call.")
    memory_efficiency: float = Field(gt=0, le=1)
    rows: list[EfficiencyRow] = Field(min_length=1)

    def seconds_at(self, tokens: np.ndarray, flops: np.ndarray, nbytes: np.ndarray, peak_flops_per_s: float,
                   bytes_per_s: float, head_dim: int) -> tuple[np.ndarray, int]:
        """Seconds per call and how many calls (tokens > 0) were outside measured data."""
        row, exact = _nearest_head_dim(self.rows, head_dim)
        t = np.maximum(np.asarray(tokens, dtype=np.float64), 1e-300)
        ce = np.exp(np.interp(np.log(t), np.log(np.asarray(row.tokens, dtype=np.float64)),
                              np.log(np.asarray(row.compute_efficiency, dtype=np.float64))))
        s = self.fixed_s + np.maximum(flops / (peak_flops_per_s * ce), nbytes / (bytes_per_s * self.memory_efficiency))
        run = t >= 1
        outside = run if not exact else run & ((t < row.tokens[0]) | (t > row.tokens[-1]))
        return s, int(np.count_nonzero(outside))


class HeadDimRoofline(RooflineParams):
    """A roofline fitted to the measurements of one head dimension (every head count of it)."""

    qk_head_dim: int = Field(ge=1)
    fit_error: FitError | None = None
    valid_range: dict[str, list[float]] | None = None


class RooflineByHeadDimModel(_Section):
    """Attention decode: one roofline per measured head dimension (the nearest one for others, counted)."""

    kind: Literal["roofline_by_head_dim"]
    fit_error: FitError | None = Field(description="error over every measured point; required key.")
    rows: list[HeadDimRoofline] = Field(min_length=1)


class GroupedTableRow(_Section):
    """Measured seconds of ONE grouped call over ``num_experts`` experts x ``tokens`` tokens each, one shape."""

    shape: dict[str, int | str] = Field(description="Every field of ExpertShape.")
    num_experts: list[int] = Field(min_length=1)
    tokens: list[int] = Field(min_length=1, description="Tokens per expert.")
    latency_s: list[list[float]] = Field(min_length=1, description="latency_s[i][j]: num_experts[i], tokens[j].")

    @model_validator(mode="after")
    def _grid_is_usable(self) -> "GroupedTableRow":
        for name in ("num_experts", "tokens"):
            v = getattr(self, name)
            if v[0] <= 0 or any(b <= a for a, b in zip(v, v[1:])):
                raise ValueError(f"{name} must be positive and strictly increasing; got {v}")
        if len(self.latency_s) != len(self.num_experts) or any(len(r) != len(self.tokens) for r in self.latency_s):
            raise ValueError(f"latency_s must be {len(self.num_experts)} rows of {len(self.tokens)} values")
        if any(s <= 0 for r in self.latency_s for s in r):
            raise ValueError("latency_s must be positive")
        return self


class GroupedExpertModel(_Section):
    """Several experts in one grouped call (a batched GEMM, as engines run a layer's experts).

    Inside a shape's (num_experts x tokens per expert) grid: bilinear log-log interpolation. Outside: the
    ``extrapolation`` roofline of the group's total work, scaled to meet the nearest grid point; an unmeasured
    shape: the roofline alone. Both are counted by ``extrapolated_counts``."""

    kind: Literal["grouped_table"]
    fit_error: FitError | None = Field(description="leave-one-out error along each tokens axis; required key.")
    extrapolation: RooflineParams
    rows: list[GroupedTableRow] = Field(min_length=1)

    def row_for(self, shape: ExpertShape) -> GroupedTableRow | None:
        key = dataclasses.asdict(shape)
        return next((r for r in self.rows if r.shape == key), None)

    def seconds(self, *, num_experts: float, tokens: float, shape: ExpertShape, roof: Any) -> tuple[float, bool]:
        """Seconds of one grouped call; ``roof(e, t)`` is the extrapolation roofline of e experts x t tokens.
        Returns (seconds, whether it was outside measured data)."""
        row = self.row_for(shape)
        if row is None:
            return float(roof(num_experts, tokens)), True
        es, ts = np.asarray(row.num_experts, dtype=np.float64), np.asarray(row.tokens, dtype=np.float64)
        e_c, t_c = float(np.clip(num_experts, es[0], es[-1])), float(np.clip(tokens, ts[0], ts[-1]))
        le, lt = np.log(es), np.log(ts)
        grid = np.log(np.asarray(row.latency_s, dtype=np.float64))
        along_t = np.array([np.interp(np.log(t_c), lt, g) for g in grid])
        inside = float(np.exp(np.interp(np.log(e_c), le, along_t)))
        outside = (e_c, t_c) != (float(num_experts), float(tokens))
        if outside:
            inside *= float(roof(num_experts, tokens)) / float(roof(e_c, t_c))
        return inside, outside


class CpuAttentionRow(_Section):
    """CPU decode attention at one thread count: ``fixed_s + max(flops / flops_per_s, bytes / bytes_per_s)``."""

    threads: int = Field(ge=1)
    fixed_s: float = Field(ge=0)
    flops_per_s: float = Field(gt=0, description="Attained FLOP/s of the decode attention at this thread count.")
    bytes_per_s: float = Field(gt=0, description="Attained bytes/s (KV cache read) at this thread count.")
    fit_error: FitError | None = None
    batch: list[int] = Field(min_length=2, max_length=2, description="Measured batch range [lo, hi].")
    context: list[int] = Field(min_length=2, max_length=2, description="Measured context range [lo, hi].")
    layouts: list[str] = Field(default_factory=list, description="Head layouts measured, e.g. '32q/4kv x 128'.")


class CpuAttentionModel(_Section):
    """The decode attention SpecMoEOff / MoE-Lightning run on the host CPU, by thread count."""

    kind: Literal["roofline_by_threads"]
    rows: list[CpuAttentionRow] = Field(min_length=1)

    @model_validator(mode="after")
    def _threads_are_distinct(self) -> "CpuAttentionModel":
        threads = [r.threads for r in self.rows]
        if len(set(threads)) != len(threads):
            raise ValueError(f"rows repeat a thread count: {threads}")
        return self


COLLECTIVE_KINDS: tuple[str, ...] = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter")


class CollectiveRow(_Section):
    """Measured seconds of one collective on ``num_gpus`` ranks by per-rank buffer size (bytes)."""

    kind: Literal["all_to_all", "all_reduce", "all_gather", "reduce_scatter"]
    num_gpus: int = Field(ge=2)
    nbytes: list[int] = Field(min_length=1, description="Per-rank buffer bytes (nccl-tests 'size').")
    latency_s: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _grid_is_usable(self) -> "CollectiveRow":
        if len(self.nbytes) != len(self.latency_s):
            raise ValueError(f"nbytes has {len(self.nbytes)} values but latency_s has {len(self.latency_s)}")
        if self.nbytes[0] <= 0 or any(b <= a for a, b in zip(self.nbytes, self.nbytes[1:])):
            raise ValueError(f"nbytes must be positive and strictly increasing; got {self.nbytes}")
        if any(s <= 0 for s in self.latency_s):
            raise ValueError("latency_s must be positive")
        return self


class Collectives(_Section):
    """Measured (or imported) collective latencies, or why there are none (``skipped``)."""

    backend: str = Field(description="nccl, gloo (CPU test path), or none.")
    provenance: str = Field(description="Where the numbers come from (measured here, imported from ...).")
    skipped: str | None = Field(default=None, description="Why nothing was measured (e.g. one GPU).")
    rows: list[CollectiveRow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rows_or_reason(self) -> "Collectives":
        if not self.rows and not self.skipped:
            raise ValueError("give rows, or say in 'skipped' why there are none")
        keys = [(r.kind, r.num_gpus) for r in self.rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"rows repeat a (kind, num_gpus): {keys}")
        return self


# A GEMM-like op is sized by tokens alone for a given shape, so it can be measured on a token grid;
# attention has two size axes (new tokens x context) and is roofline-only until a 2-D table exists.
TokenOpModel = Annotated[Union[RooflineModel, TableModel], Field(discriminator="kind")]
AttentionOpModel = Annotated[Union[RooflineModel, EfficiencyTableModel, RooflineByHeadDimModel], Field(discriminator="kind")]
_KIND_TAGS = ("roofline", "table", "efficiency_table", "roofline_by_head_dim")


class BatchOverhead(_Section):
    """Seconds ``max(0, fixed_s + per_token_s * tokens + per_sequence_s * sequences)`` (per layer or per iteration)."""

    fixed_s: float = Field(default=0.0, allow_inf_nan=False)
    per_token_s: float = Field(default=0.0, allow_inf_nan=False)
    per_sequence_s: float = Field(default=0.0, allow_inf_nan=False)
    fit_error: FitError | None = Field(default=None, description="null when not fitted (datasheet).")

    def seconds(self, tokens: np.ndarray, sequences: np.ndarray) -> np.ndarray:
        return np.maximum(0.0, self.fixed_s + self.per_token_s * tokens + self.per_sequence_s * sequences)


class ExpertOverhead(_Section):
    """Seconds ``max(0, fixed_s + per_token_s * tokens)`` per expert call (0 for an expert with no tokens), and
    the share ``kernel_scale`` of the ``expert_ffn`` table that the call pays (``routed_expert_s``).

    Why a scale: the table times an expert alone, its weights rotated cold; inside a serving iteration the
    same call runs between other layers' work and costs an amount that is affine in its tokens rather than
    the table's shape (on the CPU runtime the fitted scale is near 0). 1.0 (the default) keeps the table."""

    fixed_s: float = Field(default=0.0, allow_inf_nan=False)
    per_token_s: float = Field(default=0.0, allow_inf_nan=False)
    kernel_scale: float = Field(default=1.0, ge=0, allow_inf_nan=False,
                                description="Share of the expert_ffn table each call pays (1: all of it).")
    fit_error: FitError | None = Field(default=None, description="null when not fitted (datasheet).")

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        return np.where(tokens > 0, np.maximum(0.0, self.fixed_s + self.per_token_s * tokens), 0.0)


class LoadInterference(_Section):
    """Compute seconds ``s_per_byte * nbytes`` added per expert load (the copy slowing the compute beside it)."""

    s_per_byte: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    fit_error: FitError | None = Field(default=None, description="null when not fitted (datasheet).")


OVERHEADS: tuple[str, ...] = ("layer_overhead", "expert_overhead", "iteration_overhead", "load_interference")


class Operations(_Section):
    """One latency model per operation; all five are required so a lookup never finds a hole.
    The overhead terms are optional: absent means not modelled (0 s)."""

    expert_ffn: TokenOpModel = Field(description="One routed or shared expert FFN call (ExpertShape).")
    dense_gemm: TokenOpModel = Field(description="A dense projection: QKV, output, LM head (GemmShape).")
    attention_prefill: AttentionOpModel = Field(description="Attention core of one sequence's prefill chunk.")
    attention_decode: AttentionOpModel = Field(description="Attention core of one decode step of a batch.")
    gate: TokenOpModel = Field(description="Router GEMM + softmax + top-k (GemmShape of the router).")
    layer_overhead: BatchOverhead | None = Field(default=None, description="Per decoder layer per iteration; null: 0 s.")
    expert_overhead: ExpertOverhead | None = Field(default=None, description="Per routed expert call; null: 0 s.")
    iteration_overhead: BatchOverhead | None = Field(default=None, description="Once per iteration; null: 0 s.")
    load_interference: LoadInterference | None = Field(
        default=None, description="Compute time added per expert load overlapping compute; null: 0 s.")
    grouped_expert_ffn: GroupedExpertModel | None = Field(
        default=None, description="Several experts in one grouped call; null: the sum of expert_ffn calls.")
    cpu_attention_decode: CpuAttentionModel | None = Field(
        default=None, description="Decode attention on the host CPU by thread count; null: not measured.")

    @model_validator(mode="after")
    def _table_shapes_have_every_field(self) -> "Operations":
        for op, shape_type in _SHAPE_OF_OP.items():
            model = getattr(self, op)
            if not isinstance(model, TableModel):
                continue
            expected = sorted(f.name for f in dataclasses.fields(shape_type))
            for i, row in enumerate(model.rows):
                if sorted(row.shape) != expected:
                    raise ValueError(
                        f"{op}.rows[{i}].shape has keys {sorted(row.shape)}; expected exactly {expected}"
                    )
        return self


# ---------------------------------------------------------------- hardware sections


class Gpu(_Section):
    name: str
    memory_bytes: float = Field(gt=0)
    peak_tflops: dict[str, float] = Field(description="Dense (non-sparse) peak per dtype, TFLOP/s.")
    memory_bandwidth_gbps: float = Field(gt=0, description="HBM bandwidth, GB/s.")

    @field_validator("peak_tflops")
    @classmethod
    def _known_dtypes(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(DTYPE_BYTES))
        if unknown:
            raise ValueError(f"unknown dtype(s) {unknown}; expected some of {sorted(DTYPE_BYTES)}")
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"peaks must be positive; got {bad}")
        if not value:
            raise ValueError("give at least one dtype")
        return value


class HostLink(_Section):
    """PCIe between host memory and GPU memory, one direction."""

    bandwidth_gbps: float = Field(gt=0, description="Effective bandwidth of a pinned-memory copy, GB/s.")
    latency_s: float = Field(ge=0, description="Fixed cost per copy (call, DMA setup).")
    pageable_bandwidth_factor: float = Field(gt=0, le=1, description="Pageable bandwidth / pinned bandwidth.")
    num_copy_engines: int = Field(ge=1, description="Copies that can be in flight at once in this direction.")


class Link(_Section):
    """A point-to-point link, one direction: ``latency_s + nbytes / bandwidth``."""

    bandwidth_gbps: float = Field(gt=0, description="GB/s per GPU, one direction.")
    latency_s: float = Field(ge=0)


class Links(_Section):
    host_to_device: HostLink
    device_to_host: HostLink
    gpu_to_gpu: Link = Field(description="Within a node (NVLink/NVSwitch).")
    node_to_node: Link = Field(description="Between nodes, per GPU NIC.")


class Cpu(_Section):
    name: str
    cores: int = Field(ge=1)
    peak_gflops: float = Field(gt=0, description="FP32 vector peak of all cores, GFLOP/s.")
    memory_bandwidth_gbps: float = Field(gt=0, description="DRAM bandwidth, GB/s.")


# ---------------------------------------------------------------- the profile


class HardwareProfile(_Section):
    """One node type's hardware and the latency model of every operation on it.

    Built by ``load_profile`` (which records the file for error messages) or directly from a dict.
    Frozen, except for a per-instance count of lookups that fell outside measured tables."""

    name: str
    source: Literal["datasheet", "measured", "public-measurements"]
    provenance: dict[str, Any] = Field(description="Who, when, how, which documents, device, software versions.")
    gpu: Gpu
    links: Links
    cpu: Cpu
    operations: Operations
    collectives: Collectives | None = Field(default=None, description="All-to-all / all-reduce tables; null: none.")
    _origin: str = PrivateAttr(default="")
    _extrapolated: Counter = PrivateAttr(default_factory=Counter)

    @model_validator(mode="after")
    def _datasheet_has_no_fit(self) -> "HardwareProfile":
        if self.source == "datasheet":
            fitted = [op for op in (*OPERATIONS, *OVERHEADS)
                      if getattr(self.operations, op) is not None and getattr(self.operations, op).fit_error is not None]
            if fitted:
                raise ValueError(f"a datasheet profile fits nothing, so fit_error must be null; it is set for {fitted}")
        return self

    def model_post_init(self, __context: Any) -> None:
        self._origin = f"profile {self.name!r}"

    # ------------------------------------------------------------ compute lookups

    def expert_ffn_s(self, *, tokens: np.ndarray | int, shape: ExpertShape) -> np.ndarray:
        """Seconds for one expert FFN call per element of ``tokens``; 0 tokens -> 0 s (the expert is not run)."""
        return self._token_op("expert_ffn", tokens, shape)

    def dense_gemm_s(self, *, tokens: np.ndarray | int, shape: GemmShape) -> np.ndarray:
        """Seconds for a dense projection over ``tokens`` tokens (shared experts use ``expert_ffn_s``)."""
        return self._token_op("dense_gemm", tokens, shape)

    def gate_s(self, *, tokens: np.ndarray | int, shape: GemmShape) -> np.ndarray:
        """Seconds to route ``tokens`` tokens: the router GEMM's roofline plus fixed_s for softmax and top-k."""
        return self._token_op("gate", tokens, shape)

    def attention_prefill_s(
        self, *, new_tokens: np.ndarray | int, context_tokens: np.ndarray | int, shape: AttentionShape
    ) -> np.ndarray:
        """Seconds of the attention core for each sequence (broadcast), each as its own kernel call."""
        new = _sizes("new_tokens", new_tokens)
        ctx = _sizes("context_tokens", context_tokens)
        model = self.operations.attention_prefill
        peak = self._peak_flops_per_s("attention_prefill", shape.act_dtype)
        flops, nbytes = shape.prefill_flops(new, ctx), shape.prefill_bytes(new, ctx)
        if isinstance(model, EfficiencyTableModel):
            s, num_outside = model.seconds_at(np.broadcast_to(new, np.broadcast(new, ctx).shape), flops, nbytes,
                                              peak, self._hbm_bytes_per_s, shape.qk_head_dim)
        else:
            s, num_outside = model.roofline_s(flops, nbytes, peak, self._hbm_bytes_per_s), 0
        if num_outside:
            self._extrapolated["attention_prefill"] += num_outside
        return _out(np.where(new > 0, s, 0.0))

    def attention_decode_s(self, *, context_tokens: np.ndarray | int, shape: AttentionShape) -> float:
        """Seconds of one decode step for a whole batch: one kernel call, so one fixed_s and the summed work."""
        ctx = np.atleast_1d(_sizes("context_tokens", context_tokens))
        if ctx.size == 0:
            return 0.0
        model = self.operations.attention_decode
        peak = self._peak_flops_per_s("attention_decode", shape.act_dtype)
        flops = float(np.sum(shape.decode_flops(ctx)))
        nbytes = float(np.sum(shape.decode_bytes(ctx)))
        exact = True
        if isinstance(model, RooflineByHeadDimModel):
            model, exact = _nearest_head_dim(model.rows, shape.qk_head_dim)
        rng = getattr(model, "valid_range", None) or {}
        c_rng, b_rng = rng.get("context"), rng.get("batch")
        if (not exact or (c_rng and (ctx.min() < c_rng[0] or ctx.max() > c_rng[1]))
                or (b_rng and not b_rng[0] <= ctx.size <= b_rng[1])):
            self._extrapolated["attention_decode"] += 1
        return float(model.roofline_s(flops, nbytes, peak, self._hbm_bytes_per_s))

    def grouped_expert_ffn_s(self, *, tokens: np.ndarray | list[int], shape: ExpertShape) -> float:
        """Seconds of ONE grouped call running every expert of ``tokens`` (tokens per expert, e.g. one layer's
        routing counts) that has tokens > 0, as engines run a layer's experts (one batched GEMM).

        Looked up at (number of active experts, mean tokens per active expert): a grouped kernel's work is the
        total tokens, so uneven routing costs about what even routing of the same total does. Without a
        ``grouped_expert_ffn`` measurement: the sum of ``expert_ffn_s`` of each active expert (what the
        engine charges today), so callers need no special case."""
        t = np.asarray(tokens, dtype=np.float64).ravel()
        if np.any(t < 0) or np.any(np.isnan(t)):
            raise ValueError(f"tokens must be >= 0; got {tokens!r}")
        t = t[t > 0]
        if t.size == 0:
            return 0.0
        model = self.operations.grouped_expert_ffn
        if model is None:
            return float(np.sum(self.expert_ffn_s(tokens=t, shape=shape)))
        peak = self._peak_flops_per_s("grouped_expert_ffn", _compute_dtype("grouped_expert_ffn", shape, self._origin))

        def roof(e: float, per: float) -> float:
            return float(model.extrapolation.roofline_s(e * shape.flops(per), e * shape.bytes_moved(per), peak,
                                                        self._hbm_bytes_per_s))

        s, outside = model.seconds(num_experts=float(t.size), tokens=float(t.mean()), shape=shape, roof=roof)
        if outside:
            self._extrapolated["grouped_expert_ffn"] += 1
        return s

    def cpu_attention_decode_s(self, *, context_tokens: np.ndarray | list[int], shape: AttentionShape,
                               threads: int) -> float | None:
        """Seconds of one decode attention step of a batch on the HOST CPU with ``threads`` torch threads
        (the CPU attention of SpecMoEOff / MoE-Lightning), or None when this profile has no CPU-attention
        measurement at that thread count (see ``cpu_attention_threads``). One call for the whole batch."""
        model = self.operations.cpu_attention_decode
        row = None if model is None else next((r for r in model.rows if r.threads == int(threads)), None)
        if row is None:
            return None
        ctx = np.atleast_1d(_sizes("context_tokens", context_tokens))
        if ctx.size == 0:
            return 0.0
        if (ctx.size < row.batch[0] or ctx.size > row.batch[1] or ctx.min() < row.context[0]
                or ctx.max() > row.context[1]):
            self._extrapolated["cpu_attention_decode"] += 1
        flops = float(np.sum(shape.decode_flops(ctx)))
        nbytes = float(np.sum(shape.decode_bytes(ctx)))
        return row.fixed_s + max(flops / row.flops_per_s, nbytes / row.bytes_per_s)

    @property
    def cpu_attention_threads(self) -> list[int]:
        """Thread counts at which CPU decode attention was measured ([] when none)."""
        model = self.operations.cpu_attention_decode
        return [] if model is None else sorted(r.threads for r in model.rows)

    # ------------------------------------------------------------ collectives

    def collective_s(self, kind: str, nbytes: np.ndarray | float, num_gpus: int) -> np.ndarray | float | None:
        """Seconds of one ``kind`` collective (all_to_all, all_reduce, all_gather, reduce_scatter) over
        ``num_gpus`` ranks with ``nbytes`` per-rank buffer bytes, or None when this profile has no measurement
        of that kind at that GPU count (no guess: the caller falls back to its link model).

        Log-log interpolation between measured sizes; below the smallest size the smallest's time (latency
        floor), above the largest its bandwidth (time scales with bytes); both counted by ``extrapolated_counts``.
        0 bytes -> 0 s."""
        if kind not in COLLECTIVE_KINDS:
            raise ValueError(f"unknown collective {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}")
        coll = self.collectives
        row = None if coll is None else next((r for r in coll.rows if r.kind == kind and r.num_gpus == int(num_gpus)),
                                             None)
        if row is None:
            return None
        b = _sizes("nbytes", nbytes)
        xs, ys = np.asarray(row.nbytes, dtype=np.float64), np.asarray(row.latency_s, dtype=np.float64)
        inside = np.exp(np.interp(np.log(np.maximum(b, 1.0)), np.log(xs), np.log(ys)))
        s = np.where(b > xs[-1], ys[-1] * b / xs[-1], inside)
        outside = int(np.count_nonzero((b > 0) & ((b < xs[0]) | (b > xs[-1]))))
        if outside:
            self._extrapolated[f"collective:{kind}"] += outside
        return _out(np.where(b > 0, s, 0.0))

    @property
    def collective_kinds(self) -> list[tuple[str, int]]:
        """(kind, num_gpus) pairs this profile has collective measurements for."""
        return [] if self.collectives is None else [(r.kind, r.num_gpus) for r in self.collectives.rows]

    # ------------------------------------------------------------ overhead lookups

    @property
    def has_overheads(self) -> bool:
        """Whether any overhead term is modelled (a profile without them predicts 0 s for each)."""
        return any(getattr(self.operations, op) is not None for op in OVERHEADS)

    def layer_overhead_s(self, *, tokens: np.ndarray | int, sequences: np.ndarray | int = 0) -> np.ndarray:
        """Seconds of per-layer overhead for one decoder layer of a batch; 0 tokens -> 0 s (no layer runs)."""
        return _batch_overhead(self.operations.layer_overhead, tokens, sequences)

    def expert_overhead_s(self, *, tokens: np.ndarray | int) -> np.ndarray:
        """Seconds of gather/scatter around one expert call per element of ``tokens``; 0 tokens -> 0 s."""
        t = _sizes("tokens", tokens)
        model = self.operations.expert_overhead
        if model is None:
            return _out(np.zeros_like(t))
        return _out(model.seconds(t))

    def routed_expert_s(self, *, tokens: np.ndarray | int, shape: Any) -> np.ndarray:
        """Seconds of one routed expert call per element of ``tokens``: the ``expert_ffn`` table (times the
        overhead's ``kernel_scale``) plus ``expert_overhead``; what the planners charge per expert."""
        ffn = self.expert_ffn_s(tokens=tokens, shape=shape)
        model = self.operations.expert_overhead
        if model is None:
            return ffn
        return _out(model.kernel_scale * np.asarray(ffn) + model.seconds(_sizes("tokens", tokens)))

    def iteration_overhead_s(self, *, tokens: np.ndarray | int, sequences: np.ndarray | int = 0) -> np.ndarray:
        """Seconds of per-iteration overhead (batch assembly, embedding, sampling); 0 tokens -> 0 s."""
        return _batch_overhead(self.operations.iteration_overhead, tokens, sequences)

    def load_interference_s(self, *, nbytes: np.ndarray | float) -> np.ndarray:
        """Compute seconds one load of ``nbytes`` adds to the stream beside it; 0 when not modelled."""
        b = _sizes("nbytes", nbytes)
        model = self.operations.load_interference
        if model is None:
            return _out(np.zeros(b.shape))
        return _out(np.where(b > 0, model.s_per_byte * b, 0.0))

    # ------------------------------------------------------------ copy lookups

    def h2d_copy_s(self, *, nbytes: np.ndarray | float, pinned: bool = True) -> np.ndarray:
        """Seconds to copy host -> GPU; pageable memory is slower by the profile's factor. 0 bytes -> 0 s."""
        return _host_copy_s(self.links.host_to_device, nbytes, pinned)

    def d2h_copy_s(self, *, nbytes: np.ndarray | float, pinned: bool = True) -> np.ndarray:
        """Seconds to copy GPU -> host. 0 bytes -> 0 s."""
        return _host_copy_s(self.links.device_to_host, nbytes, pinned)

    def gpu_to_gpu_s(self, *, nbytes: np.ndarray | float) -> np.ndarray:
        """Seconds to send ``nbytes`` to another GPU of the same node. 0 bytes -> 0 s."""
        return _link_s(self.links.gpu_to_gpu, nbytes)

    def node_to_node_s(self, *, nbytes: np.ndarray | float) -> np.ndarray:
        """Seconds for one GPU to send ``nbytes`` to a GPU on another node over its NIC. 0 bytes -> 0 s."""
        return _link_s(self.links.node_to_node, nbytes)

    # ------------------------------------------------------------ reporting

    def extrapolated_counts(self) -> dict[str, int]:
        """Calls per operation answered outside measured tables since this profile was loaded."""
        return dict(self._extrapolated)

    def describe(self) -> dict[str, Any]:
        """One row for a CLI listing."""
        bf16 = self.gpu.peak_tflops.get("bf16")
        return {
            "name": self.name,
            "source": self.source,
            "gpu": self.gpu.name,
            "memory_gib": round(self.gpu.memory_bytes / 2**30, 1),
            "peak_bf16_tflops": bf16,
            "hbm_gbps": self.gpu.memory_bandwidth_gbps,
            "h2d_gbps": self.links.host_to_device.bandwidth_gbps,
        }

    def with_links(
        self,
        *,
        host_to_device_gbps: float | None = None,
        gpu_to_gpu_gbps: float | None = None,
        node_to_node_gbps: float | None = None,
    ) -> "HardwareProfile":
        """A copy with some link bandwidths replaced (a scenario's what-if); None keeps the profile's."""
        links = self.links
        if host_to_device_gbps is not None:
            links = links.model_copy(update={"host_to_device": links.host_to_device.model_copy(
                update={"bandwidth_gbps": float(host_to_device_gbps)})})
        if gpu_to_gpu_gbps is not None:
            links = links.model_copy(update={"gpu_to_gpu": links.gpu_to_gpu.model_copy(
                update={"bandwidth_gbps": float(gpu_to_gpu_gbps)})})
        if node_to_node_gbps is not None:
            links = links.model_copy(update={"node_to_node": links.node_to_node.model_copy(
                update={"bandwidth_gbps": float(node_to_node_gbps)})})
        data = self.model_dump()
        data["links"] = links.model_dump()
        copy = HardwareProfile.model_validate(data)
        copy._origin = self._origin
        return copy

    # ------------------------------------------------------------ internals

    @property
    def _hbm_bytes_per_s(self) -> float:
        return self.gpu.memory_bandwidth_gbps * 1e9

    def _peak_flops_per_s(self, op: str, dtype: str) -> float:
        peak = self.gpu.peak_tflops.get(dtype)
        if peak is None:
            raise ProfileError(
                f"{self._origin}: operations.{op} has no peak for dtype {dtype!r}; "
                f"has: {', '.join(sorted(self.gpu.peak_tflops))}"
            )
        return peak * 1e12

    def _token_op(self, op: str, tokens: np.ndarray | int, shape: ExpertShape | GemmShape) -> np.ndarray:
        t = _sizes("tokens", tokens)
        peak = self._peak_flops_per_s(op, _compute_dtype(op, shape, self._origin))
        model = getattr(self.operations, op)
        s, num_outside = model.seconds(
            tokens=t, shape=shape, flops=shape.flops(t), nbytes=shape.bytes_moved(t),
            peak_flops_per_s=peak, bytes_per_s=self._hbm_bytes_per_s,
        )
        if num_outside:
            self._extrapolated[op] += num_outside
        return _out(np.where(t > 0, s, 0.0))


def _compute_dtype(op: str, shape: ExpertShape | GemmShape, origin: str) -> str:
    """The dtype the multiply runs in: the wider of weights and activations.

    Weight-only quantisation (int4/fp8 weights, bf16 activations) dequantises and multiplies in bf16;
    fp8 weights with fp8 activations run on fp8 tensor cores."""
    for dtype in (shape.weight_dtype, shape.act_dtype):
        if dtype not in DTYPE_BYTES:
            raise ProfileError(f"{origin}: operations.{op}: unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    if DTYPE_BYTES[shape.weight_dtype] > DTYPE_BYTES[shape.act_dtype]:
        return shape.weight_dtype
    return shape.act_dtype


def _sizes(name: str, value: np.ndarray | float) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if np.any(arr < 0) or np.any(np.isnan(arr)):
        raise ValueError(f"{name} must be >= 0; got {value!r}")
    return arr


def _out(arr: np.ndarray) -> np.ndarray:
    """A numpy float (a subclass of float) for scalar input, the array otherwise."""
    return arr[()] if arr.ndim == 0 else arr


def _batch_overhead(model: BatchOverhead | None, tokens: np.ndarray | int, sequences: np.ndarray | int) -> np.ndarray:
    t = _sizes("tokens", tokens)
    n = _sizes("sequences", sequences)
    if model is None:
        return _out(np.zeros(np.broadcast(t, n).shape))
    return _out(np.where(t > 0, model.seconds(t, n), 0.0))


def _host_copy_s(link: HostLink, nbytes: np.ndarray | float, pinned: bool) -> np.ndarray:
    b = _sizes("nbytes", nbytes)
    bandwidth = link.bandwidth_gbps * 1e9 * (1.0 if pinned else link.pageable_bandwidth_factor)
    return _out(np.where(b > 0, link.latency_s + b / bandwidth, 0.0))


def _link_s(link: Link, nbytes: np.ndarray | float) -> np.ndarray:
    b = _sizes("nbytes", nbytes)
    return _out(np.where(b > 0, link.latency_s + b / (link.bandwidth_gbps * 1e9), 0.0))


# ---------------------------------------------------------------- loading


def shipped_profiles() -> list[str]:
    """Names of the profiles inside the package (file stems of sim/data/profiles/*.yaml)."""
    folder = resources.files("sim.data.profiles")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A shipped profile by name (case-insensitive), or a YAML file by path; ProfileError on any problem."""
    ref = str(name_or_path)
    shipped = shipped_profiles()
    is_path = isinstance(name_or_path, Path) or ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref
    if not is_path:
        if ref.lower() not in shipped:
            raise ProfileError(f"unknown profile {ref!r}; shipped profiles: {', '.join(shipped)}")
        origin = f"{ref.lower()}.yaml"
        text = resources.files("sim.data.profiles").joinpath(origin).read_text(encoding="utf-8")
    else:
        origin = ref
        try:
            text = Path(ref).read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(
                f"{ref}: cannot read profile ({exc.strerror or exc}); shipped profiles: {', '.join(shipped)}"
            ) from None
    return parse_profile(text, origin=origin)


def parse_profile(text: str, *, origin: str) -> HardwareProfile:
    """Validate profile YAML text; ``origin`` (a file name) starts every error message."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ProfileError(f"{origin}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: expected a mapping with keys {', '.join(HardwareProfile.model_fields)}; "
                           f"got {type(data).__name__}")
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{origin}: {_describe_error(exc)}") from None
    profile._origin = origin
    return profile


def _describe_error(exc: ValidationError) -> str:
    """One line for the most useful error: an unknown key first, since a typo also causes 'missing'."""
    err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    loc = err["loc"]
    where = _key_path(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        expected = _expected_keys(loc[:-1])
        choices = f"; expected one of: {', '.join(expected)}" if expected else ""
        return f"{where}: unknown key{choices}"
    if err["type"] == "missing":
        return f"{where}: missing required key"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        expected = err.get("ctx", {}).get("expected_tags") or ", ".join(repr(k) for k in _KIND_TAGS)
        got = err["input"].get("kind") if isinstance(err["input"], dict) else None
        what = f"unknown kind {got!r}" if got is not None else "missing key 'kind'"
        return f"{where}.kind: {what}; expected one of: {expected}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}{shown}"


def _key_path(loc: tuple[Any, ...]) -> str:
    """``operations.expert_ffn.rows[0].tokens``: list indexes in brackets, union tags dropped."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _KIND_TAGS and prev in OPERATIONS:
            pass  # pydantic inserts the discriminator value; it is not a key the user wrote
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out


def _expected_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at ``loc`` (a model's field names), walking the schema from HardwareProfile."""
    models: list[type[BaseModel]] = [HardwareProfile]
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            prev = part
            continue
        if part in _KIND_TAGS and prev in OPERATIONS:
            models = [m for m in models if m.model_fields.get("kind") and part in get_args(m.model_fields["kind"].annotation)]
        else:
            field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
            if field is None:
                return []  # inside a free mapping (provenance, shape): any key goes
            models = _models_in(field.annotation)
        prev = part
    if len(models) != 1:
        return []
    return list(models[0].model_fields)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]

