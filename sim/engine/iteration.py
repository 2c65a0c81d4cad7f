"""One iteration of one replica: what runs on the compute stream and the copy engine, and when.

An iteration's timeline is a small flow shop (DESIGN.md, "Speed"): the copy engine loads experts
one at a time in FIFO order, the compute stream runs attention, gate, shared experts and routed experts in
order, and an expert starts when both its load and the stream are done. A layer's loads are issued once its
gate has run, so its shared experts (which need no routing and no load) compute while they are in flight.
Planning and timing are split:

* ``IterationPlanner.plan`` makes every decision (cache hits, evictions, prefetches, expert order)
  and returns an ``IterationPlan`` of compute ops and loads with their dependencies. Decisions never
  depend on timing, so the same plan can be timed two ways.
* ``time_plan`` computes the timeline with a tight recurrence; ``sim.engine.reference`` runs the
  same plan as SimPy processes on SimPy resources. Tests check that both agree.

Load interference (``operations.load_interference`` of the profile; absent on GPU profiles: 0 s): a copy
running beside the stream slows it (on a CPU the copy thread takes memory bandwidth, cache and the GIL from
the compute thread, and the measured term also holds the per-miss cache bookkeeping and job submission).
Each load's slowdown is charged, as extra seconds, to the expert op that waits for that
load, not spread over the ops that run while the load is in flight: an approximation that keeps the
plan's ops fixed-length (so both timers stay exact and agree). It puts the slowdown after the load instead
of during it, where a stall could have hidden part of it, and a prefetch that no op waits for adds none."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sim.engine.layer_stats import LayerStats
from sim.policies.cache import ExpertCache
from sim.policies.next_layer import predict_next_layer, reserve_prefetch
from sim.profile import HardwareProfile
from sim.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class BatchShape:
    """The tokens of one iteration: prefill chunks and decode steps."""

    prefill_new_tokens: np.ndarray  # per prefilling sequence: tokens computed this iteration
    prefill_context_tokens: np.ndarray  # per prefilling sequence: tokens already in its KV cache
    decode_context_tokens: np.ndarray  # per decoding sequence: tokens in its KV cache
    num_emitting: int  # sequences that produce an output token at the end of this iteration

    @property
    def num_tokens(self) -> int:
        return int(self.prefill_new_tokens.sum()) + len(self.decode_context_tokens)


@dataclass(slots=True)
class IterationPlan:
    """Compute ops in stream order and loads in copy-engine order, with their dependencies.

    ``op_load[i]`` is the load op i waits for (-1: none). ``load_issue_after[j]`` is the compute op
    after whose end load j is issued (-1: the iteration start); loads are issued in FIFO order."""

    op_s: list[float] = field(default_factory=list)
    op_kind: list[str] = field(default_factory=list)
    op_load: list[int] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    load_issue_after: list[int] = field(default_factory=list)
    load_is_prefetch: list[bool] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    bypassed: int = 0  # misses loaded into a staging buffer because no slot could be freed
    accesses: list[np.ndarray] = field(default_factory=list)  # expert keys in access order
    start_offset_s: float = 0.0  # stream and copy engine are busy until then (e.g. a KV swap-out)
    # Per-layer totals (sim.engine.layer_stats): the MoE layer each load is for, and the planner's stall
    # list that time_plan adds each wait to (None: the planner keeps no per-layer totals).
    load_layer: list[int] = field(default_factory=list)
    layer_stall_s: list[float] | None = None

    def add_op(self, seconds: float, kind: str, load: int = -1) -> int:
        self.op_s.append(seconds)
        self.op_kind.append(kind)
        self.op_load.append(load)
        return len(self.op_s) - 1

    def add_load(self, seconds: float, issue_after: int, prefetch: bool) -> int:
        self.load_s.append(seconds)
        self.load_issue_after.append(issue_after)
        self.load_is_prefetch.append(prefetch)
        return len(self.load_s) - 1


@dataclass(frozen=True, slots=True)
class IterationTiming:
    """When the iteration ended and how its resources were used."""

    duration_s: float
    compute_busy_s: float
    copy_busy_s: float
    stall_s: float  # time the stream waited for loads
    loads: int


def time_plan(plan: IterationPlan) -> IterationTiming:
    """The exact timeline of a plan: each op starts when the stream is free and its load is done."""
    if not plan.load_s:
        busy = float(sum(plan.op_s))
        return IterationTiming(plan.start_offset_s + busy, busy, 0.0, 0.0, 0)
    n_loads = len(plan.load_s)
    load_done = [0.0] * n_loads
    copy_free = plan.start_offset_s
    next_load = 0
    t = plan.start_offset_s
    stall = 0.0
    issue_after = plan.load_issue_after
    load_s = plan.load_s
    layer_stall_s, load_layer = plan.layer_stall_s, plan.load_layer

    # Loads issued at the iteration start.
    while next_load < n_loads and issue_after[next_load] < 0:
        copy_free = max(copy_free, plan.start_offset_s) + load_s[next_load]
        load_done[next_load] = copy_free
        next_load += 1
    for i, (seconds, load) in enumerate(zip(plan.op_s, plan.op_load)):
        if load >= 0:
            ready = load_done[load]
            if ready > t:
                stall += ready - t
                if layer_stall_s is not None:
                    layer_stall_s[load_layer[load]] += ready - t
                t = ready
        t += seconds
        # Loads issued when op i ends queue on the copy engine in FIFO order.
        while next_load < n_loads and issue_after[next_load] == i:
            copy_free = max(copy_free, t) + load_s[next_load]
            load_done[next_load] = copy_free
            next_load += 1
    copy_busy = float(sum(load_s))
    end = max(t, copy_free)  # a prefetch still in flight holds the iteration open
    return IterationTiming(end, float(sum(plan.op_s)), copy_busy, stall, n_loads)


def add_moe_layer_head(plan: IterationPlan, attention_s: float, gate_s: float, shared_s: float) -> int:
    """Append a MoE layer's attention and gate ops, then its shared experts if any; return the gate op's index,
    after which the layer's loads are issued. Shared experts need no routing and no load, so they run while
    those loads are in flight. (Both planners' layer loops call this.)"""
    plan.op_s.extend((attention_s, gate_s))
    plan.op_kind.extend(("attention", "gate"))
    plan.op_load.extend((-1, -1))
    gate_op = len(plan.op_s) - 1
    if shared_s:
        plan.op_s.append(shared_s)
        plan.op_kind.append("shared")
        plan.op_load.append(-1)
    return gate_op


class IterationPlanner:
    """Turns a batch and its routing into an iteration plan, using the profile's latencies only."""

    observes_batches = False  # True: the replica calls observe_batch() before plan() (sim.engine.offload_policies)

    def __init__(
        self,
        *,
        model: ModelSpec,
        profile: HardwareProfile,
        cache: ExpertCache,
        prefetch: str = "none",
        prefetch_predictor: str = "oracle",
        prefetch_max_experts: int | None = None,
        record_accesses: bool = False,
    ) -> None:
        self.model = model
        self.profile = profile
        self.cache = cache
        self.prefetch = prefetch
        self.prefetch_predictor = prefetch_predictor
        self.prefetch_max_experts = prefetch_max_experts or model.top_k
        self.record_accesses = record_accesses
        # Facts of the model, computed once (pydantic properties are recomputed on every access).
        self.num_experts = model.num_experts
        self.num_moe_layers = model.num_moe_layers
        self.layer_is_moe = [i in set(model.moe_layer_indices) for i in range(model.num_layers)]
        sliding = set(model.sliding_layer_indices)
        self.layer_is_sliding = [i in sliding for i in range(model.num_layers)]
        self.sliding_window = model.sliding_window_tokens
        self.expert_shape = model.expert_shape
        self.shared_shape = model.shared_expert_shape
        self.num_shared = model.num_shared_experts
        self.dense_shape = model.dense_ffn_shape
        self.router_shape = model.router_shape
        self.lm_head_shape = model.lm_head_shape
        self.attention_shape = model.attention_shape
        self.projection_shapes = model.attention_projection_shapes
        self.expert_load_s = float(profile.h2d_copy_s(nbytes=model.expert_bytes, pinned=True))
        self.expert_bytes = float(model.expert_bytes)
        # Compute seconds a load adds to the op that waits for it (0 unless the profile models it).
        self.load_interference_s = float(profile.load_interference_s(nbytes=model.expert_bytes))
        # Frequency statistics for the 'frequency' prefetch predictor: uses per (layer, expert).
        self.use_counts = np.zeros((self.num_moe_layers, self.num_experts), dtype=np.int64)
        self._tick = 0
        self._token_cost_memo: dict[int, tuple[float, float, float, float]] = {}
        self._lm_head_memo: dict[int, float] = {}
        # Overhead terms of the profile (absent: 0 s), memoised per (tokens, sequences).
        self._has_batch_overhead = (profile.operations.layer_overhead is not None
                                    or profile.operations.iteration_overhead is not None)
        self._overhead_memo: dict[tuple[int, int], tuple[float, float]] = {}
        self._pinned = np.zeros(self.num_moe_layers * self.num_experts, dtype=bool)
        # Run totals per MoE layer (hits, misses, time split); a planner that plans layers its own way sets None.
        moe_sliding = [self.layer_is_sliding[i] for i in model.moe_layer_indices]
        self.layer_stats: LayerStats | None = LayerStats(moe_sliding, self.use_counts)

    # ---------------------------------------------------------------- per-layer costs

    def _attention_core_s(self, batch: BatchShape, sliding: bool) -> float:
        """softmax(QK^T)V of every sequence in the batch, in one layer."""
        seconds = 0.0
        pre_ctx = batch.prefill_context_tokens
        dec_ctx = batch.decode_context_tokens
        if sliding and self.sliding_window:
            pre_ctx = np.minimum(pre_ctx, self.sliding_window)
            dec_ctx = np.minimum(dec_ctx, self.sliding_window)
        if len(batch.prefill_new_tokens):
            seconds += float(
                np.sum(
                    self.profile.attention_prefill_s(
                        new_tokens=batch.prefill_new_tokens, context_tokens=pre_ctx, shape=self.attention_shape
                    )
                )
            )
        if len(dec_ctx):
            seconds += float(self.profile.attention_decode_s(context_tokens=dec_ctx, shape=self.attention_shape))
        return seconds

    # ---------------------------------------------------------------- planning

    def _token_costs(self, tokens: int) -> tuple[float, float, float, float]:
        """Projections, gate, shared experts and dense FFN for ``tokens`` tokens; memoised, since
        decode iterations repeat the same token counts and the profile lookups are pure."""
        costs = self._token_cost_memo.get(tokens)
        if costs is None:
            profile = self.profile
            projections_s = sum(float(profile.dense_gemm_s(tokens=tokens, shape=s)) for s in self.projection_shapes)
            gate_s = float(profile.gate_s(tokens=tokens, shape=self.router_shape))
            shared_s = (  # a shared expert is one expert call over every token, charged as a routed call is
                self.num_shared * float(profile.routed_expert_s(tokens=tokens, shape=self.shared_shape))
                if self.shared_shape is not None
                else 0.0
            )
            dense_s = float(profile.expert_ffn_s(tokens=tokens, shape=self.dense_shape)) if self.dense_shape else 0.0
            costs = (projections_s, gate_s, shared_s, dense_s)
            self._token_cost_memo[tokens] = costs
        return costs

    def _overheads(self, tokens: int, sequences: int) -> tuple[float, float]:
        """The profile's per-layer and per-iteration overheads for a batch; memoised like ``_token_costs``."""
        key = (tokens, sequences)
        costs = self._overhead_memo.get(key)
        if costs is None:
            profile = self.profile
            costs = (float(profile.layer_overhead_s(tokens=tokens, sequences=sequences)),
                     float(profile.iteration_overhead_s(tokens=tokens, sequences=sequences)))
            self._overhead_memo[key] = costs
        return costs

    def plan(self, batch: BatchShape, counts: np.ndarray, start_offset_s: float = 0.0) -> IterationPlan:
        """Plan one iteration; ``counts[moe_layer, expert]`` is how many tokens chose each expert."""
        plan = IterationPlan(start_offset_s=start_offset_s)
        tokens = batch.num_tokens
        projections_s, gate_s, shared_s, dense_s = self._token_costs(tokens)
        layer_overhead_s = iteration_overhead_s = 0.0
        if self._has_batch_overhead:
            sequences = len(batch.prefill_new_tokens) + len(batch.decode_context_tokens)
            layer_overhead_s, iteration_overhead_s = self._overheads(tokens, sequences)
        # The per-layer overhead rides on each layer's attention op: like the runtime's norms, KV writes
        # and bookkeeping, it runs on the stream before the layer's loads are issued.
        attention_full_s = projections_s + layer_overhead_s + self._attention_core_s(batch, sliding=False)
        attention_sliding_s = (
            projections_s + layer_overhead_s + self._attention_core_s(batch, sliding=True)
            if self.sliding_window else attention_full_s
        )
        expert_s = self.profile.routed_expert_s(tokens=counts, shape=self.expert_shape)
        used = counts > 0
        stats = self.layer_stats
        if stats is not None:  # accesses per layer come from use_counts, which plan() updates below
            stats.expert_s_grid += expert_s
            stats.attention_full_s += attention_full_s
            stats.attention_sliding_s += attention_sliding_s
            stats.gate_shared_s += gate_s + shared_s
            stats.last = (expert_s, attention_full_s, attention_sliding_s, gate_s + shared_s)
            plan.layer_stall_s = stats.stall_s

        cache = self.cache
        if cache.holds_everything:
            # Fast path: nothing to load, the stream runs every op back to back.
            n_layers = len(self.layer_is_moe)
            n_sliding = sum(self.layer_is_sliding)
            plan.add_op(
                (n_layers - n_sliding) * attention_full_s
                + n_sliding * attention_sliding_s
                + (n_layers - self.num_moe_layers) * dense_s
                + self.num_moe_layers * (gate_s + shared_s)
                + float(expert_s.sum()),
                "layers",
            )
            plan.hits += int(used.sum())
        else:
            self._plan_layers(plan, counts, used, expert_s, attention_full_s, attention_sliding_s, gate_s, shared_s, dense_s)
        if batch.num_emitting:
            lm_head_s = self._lm_head_memo.get(batch.num_emitting)
            if lm_head_s is None:
                lm_head_s = float(self.profile.dense_gemm_s(tokens=batch.num_emitting, shape=self.lm_head_shape))
                self._lm_head_memo[batch.num_emitting] = lm_head_s
            plan.add_op(lm_head_s, "lm_head")
        if iteration_overhead_s:
            plan.add_op(iteration_overhead_s, "iteration_overhead")
        # Only now does this iteration's routing enter the 'frequency' predictor's statistics: a
        # prediction made while planning must not know the routing it predicts.
        self.use_counts += used
        return plan

    def _predict(self, moe_layer: int, counts: np.ndarray) -> np.ndarray:
        """Experts to prefetch for a MoE layer, most used first."""
        return predict_next_layer(self.prefetch_predictor, counts[moe_layer], self.use_counts[moe_layer],
                                  self.prefetch_max_experts)

    def _plan_layers(
        self,
        plan: IterationPlan,
        counts: np.ndarray,
        used: np.ndarray,
        expert_s: np.ndarray,
        attention_full_s: float,
        attention_sliding_s: float,
        gate_s: float,
        shared_s: float,
        dense_s: float,
    ) -> None:
        # Hot loop (one pass per MoE layer per iteration): per-layer data is moved to Python lists
        # once, because numpy's per-call cost dominates on arrays of a handful of experts.
        cache = self.cache
        resident = cache.resident
        E = self.num_experts
        pinned = self._pinned
        load_s = self.expert_load_s
        interference_s = self.load_interference_s
        layer_ids, expert_ids = np.nonzero(used)
        needed_all = expert_ids.tolist()
        times_all = expert_s[layer_ids, expert_ids].tolist()
        bounds = np.concatenate(([0], np.cumsum(used.sum(axis=1)))).tolist()
        op_s, op_kind, op_load = plan.op_s, plan.op_kind, plan.op_load
        loads_s, issue_after, is_prefetch = plan.load_s, plan.load_issue_after, plan.load_is_prefetch
        stats = self.layer_stats
        if stats is not None:  # per-layer totals, bound once: the loop adds to list slots only
            load_layer, layer_misses, layer_loads_s = plan.load_layer, stats.misses, stats.loads_s
            layer_prefetch_hits, layer_interference_s = stats.prefetch_hits, stats.interference_s
        # Load index of each expert key prefetched in this iteration.
        prefetched: dict[int, int] = {}
        prefetching = self.prefetch == "next_layer"
        record = self.record_accesses
        accessed: list[int] = []
        moe_layer = 0
        for layer, is_moe in enumerate(self.layer_is_moe):
            attention_s = attention_sliding_s if self.layer_is_sliding[layer] else attention_full_s
            if not is_moe:
                op_s.extend((attention_s, dense_s))
                op_kind.extend(("attention", "dense_ffn"))
                op_load.extend((-1, -1))
                continue
            if prefetching and moe_layer == 0:
                # The first MoE layer has no predecessor to hide its loads behind: start at once.
                self._prefetch(plan, 0, counts, prefetched, len(op_s) - 1)
            gate_op = add_moe_layer_head(plan, attention_s, gate_s, shared_s)
            lo, hi = bounds[moe_layer], bounds[moe_layer + 1]
            base = moe_layer * E
            keys = [base + e for e in needed_all[lo:hi]]
            times = times_all[lo:hi]
            self._tick += 1
            if record:
                accessed.extend(keys)
            is_resident = resident[keys].tolist()
            ready_s = 0.0
            waits: list[tuple[int, float]] = []  # (load index, seconds) of prefetched experts in flight
            miss_keys: list[int] = []
            miss_times: list[float] = []
            for key, here, seconds in zip(keys, is_resident, times):
                if here:
                    load = prefetched.get(key, -1)
                    if load < 0:
                        ready_s += seconds
                    else:
                        waits.append((load, seconds))
                else:
                    miss_keys.append(key)
                    miss_times.append(seconds)
            plan.hits += len(keys) - len(miss_keys)
            plan.prefetch_hits += len(waits)
            if waits and stats is not None:
                layer_prefetch_hits[moe_layer] += len(waits)
                layer_interference_s[moe_layer] += interference_s * len(waits)
            # Resident and already loaded: one back-to-back run on the stream, no dependency.
            if ready_s:
                op_s.append(ready_s)
                op_kind.append("experts")
                op_load.append(-1)
            # Prefetched experts in flight, in the order their loads finish (FIFO copy engine).
            for load, seconds in sorted(waits):
                op_s.append(seconds + interference_s)
                op_kind.append("expert")
                op_load.append(load)
            pinned[keys] = True  # the gate has chosen them: nothing may evict them in this layer
            if miss_keys:
                # Misses: loaded on demand once the gate has chosen them, computed as each arrives.
                m = len(miss_keys)
                plan.misses += m
                placed = cache.insert_many(np.asarray(miss_keys, dtype=np.int64), pinned)
                # A miss with no evictable slot streams through a staging buffer without becoming
                # resident, as offloading engines with tiny caches do.
                plan.bypassed += m - placed
                first = len(loads_s)
                loads_s.extend([load_s] * m)
                issue_after.extend([gate_op] * m)
                is_prefetch.extend([False] * m)
                if stats is not None:
                    load_layer.extend([moe_layer] * m)
                    layer_misses[moe_layer] += m
                    layer_loads_s[moe_layer] += load_s * m
                    layer_interference_s[moe_layer] += interference_s * m
                op_s.extend([t + interference_s for t in miss_times] if interference_s else miss_times)
                op_kind.extend(["expert"] * m)
                op_load.extend(range(first, first + m))
            if prefetching and moe_layer + 1 < self.num_moe_layers:
                # Once the gate has run, load what the next MoE layer is predicted to need, behind
                # this layer's own misses on the copy engine, while this layer's experts compute.
                self._prefetch(plan, moe_layer + 1, counts, prefetched, gate_op)
            cache.touch(np.asarray(keys, dtype=np.int64), self._tick)
            # This layer is done: its experts (and what was prefetched for it) may be evicted again.
            pinned[base : base + E] = False
            moe_layer += 1
        if record and accessed:
            plan.accesses.append(np.asarray(accessed, dtype=np.int32))

    def _prefetch(
        self, plan: IterationPlan, target: int, counts: np.ndarray, prefetched: dict[int, int], issue_after: int
    ) -> None:
        """Queue loads for the predicted experts of MoE layer ``target`` that are not resident."""
        keys = target * self.num_experts + self._predict(target, counts)
        queued = reserve_prefetch(self.cache, self._pinned, keys).tolist()
        for key in queued:
            prefetched[key] = plan.add_load(self.expert_load_s, issue_after, prefetch=True)
        if queued and self.layer_stats is not None:
            plan.load_layer.extend([target] * len(queued))
            self.layer_stats.loads_s[target] += self.expert_load_s * len(queued)
