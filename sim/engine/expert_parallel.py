"""Expert parallelism: one replica spread over ``ep`` ranks of ``tp`` GPUs, timed per iteration.

Token attribution (DESIGN choice, documented in the README): attention is data-parallel inside the
replica. A sequence is pinned to one rank when it first appears in a batch (the rank with the fewest
sequences of that batch, ties to the lower rank) and stays there while it keeps appearing; its
tokens and KV live there, so its tokens are the ones that rank dispatches. Routing is drawn per rank
(``RoutingSource.counts`` of the rank's segments), so ``counts[rank, layer, expert]`` is exact.

Per MoE layer and micro-batch the group runs, in this order on one compute stream and one
communication resource (the links, see ``sim.engine.topology``):

  attention (slowest rank; TP all-reduce after it) -> gate -> dispatch all-to-all (async) ->
  shared expert (and TP all-reduce) -> routed experts (the slowest rank: its grouped GEMMs over its
  local tokens, times its degradation factor) -> combine all-to-all (async) -> next layer waits.

Dispatch bytes from rank s to rank d are ``tokens of s routed to experts on d x hidden x activation
bytes`` (pairs to a local expert are free); combine is the reverse. Ops and communications become an
``IterationPlan`` whose loads are the communications (FIFO on the links, issued after an op, waited
for by an op), so ``sim.engine.iteration.time_plan`` times it and ``sim.engine.reference`` checks it
with SimPy; overlap options (two micro-batches, ScMoE shortcut positions) only change the op order
and dependencies, and the saving is whatever the timeline gives.

Simplifications, stated: attention and the dense/shared FFN of a rank with tp GPUs take 1/tp of the
one-GPU time; the lm_head runs on ceil(emitting / ep) tokens; a rank's dispatch bytes are split evenly
over its tp GPUs; the replica's KV cache is pooled over its GPUs (a rank's share is not tracked)."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil

import numpy as np

from sim.engine.iteration import BatchShape, IterationPlan, IterationPlanner
from sim.engine.memory import MemoryBudget
from sim.engine.placement import ExpertPlacement
from sim.engine.topology import Topology, build_topology, measured_collectives
from sim.errors import CapacityError, ScenarioError, TraceError
from sim.policies.cache import make_cache
from sim.policies.capacity import capacity, expanded_drop, reroute, threshold_drop, token_drop
from sim.policies.ep_specs import ExpertParallelSpec
from sim.profile import HardwareProfile
from sim.spec import ModelSpec
from sim.work import DTYPE_BYTES, ExpertShape
from sim.workload.routing import GeneratedRouting, MarkovGeneratedRouting, ReplayedRouting, RoutingSource, Segment

SCORED_CAPACITY = ("reroute", "expanded_drop", "threshold")


# ---------------------------------------------------------------- routing per rank


@dataclass(slots=True)
class RankWork:
    """The tokens of one rank in one micro-batch."""

    shape: BatchShape
    tokens: int
    sequences: int
    cand: np.ndarray | None = None  # [tokens, layers, E] expert ids, best first (scored routing only)
    score: np.ndarray | None = None  # [tokens, layers, E] softmax gate scores, same order


@dataclass(slots=True)
class MicroBatch:
    ranks: list[RankWork]
    counts_src: np.ndarray  # [ranks, layers, experts] pairs as routed (before capacity)


class ExpertParallelRouting:
    """Wraps a routing source: pins sequences to ranks, splits micro-batches, routes each rank.

    ``counts(segments)`` returns a list of ``MicroBatch`` (the replica hands it, unopened, to the
    planner). With ``scored`` the generated router's gate logits are drawn per token (log popularity
    plus Gumbel noise: the same top-k distribution as ``GeneratedRouting``) and their softmax kept."""

    def __init__(self, routing: RoutingSource, *, num_ranks: int, num_microbatches: int, top_k: int, scored: bool) -> None:
        self.routing = routing
        self.num_layers = routing.num_layers
        self.num_experts = routing.num_experts
        self.num_ranks = num_ranks
        self.num_microbatches = num_microbatches
        self.top_k = top_k
        self.scored = scored
        self._replay_scores = isinstance(routing, ReplayedRouting)
        if self._replay_scores and scored and any(s.gates is None for s in routing.sequences):
            raise TraceError("the replayed routing trace has no gate scores; a threshold drop needs them")
        if scored and not self._replay_scores and (
            not isinstance(routing, GeneratedRouting) or isinstance(routing, MarkovGeneratedRouting)
        ):
            raise ValueError("scored routing needs a uniform or zipf routing source, or a replay with gate scores")
        self._rank_of: dict[int, int] = {}
        self.alive_ranks: np.ndarray | None = None  # set by the EP fault injector: no sequence goes to a down rank

    def _assign(self, segments: list[Segment]) -> list[int]:
        R = self.num_ranks
        alive = self.alive_ranks
        per_rank = [0] * R if alive is None else [0 if up else float("inf") for up in alive]
        ranks = []
        keep: dict[int, int] = {}
        for rid, _, _ in segments:
            r = self._rank_of.get(rid)
            if r is not None and alive is not None and not alive[r]:
                r = None  # its rank failed: re-pinned to a live one
            if r is not None:
                per_rank[r] += 1
            keep[rid] = -1 if r is None else r
        for rid, _, _ in segments:
            if keep[rid] < 0:
                r = per_rank.index(min(per_rank))
                per_rank[r] += 1
                keep[rid] = r
        self._rank_of = keep  # only sequences of this batch stay pinned
        for rid, _, _ in segments:
            ranks.append(keep[rid])
        return ranks

    def counts(self, segments) -> list[MicroBatch]:
        segments = list(segments)
        ranks = self._assign(segments)
        M, R = self.num_microbatches, self.num_ranks
        groups: list[list[list[Segment]]] = [[[] for _ in range(R)] for _ in range(M)]
        seen = [0] * R
        for seg, r in zip(segments, ranks):
            groups[seen[r] % M][r].append(seg)  # alternate a rank's sequences over micro-batches
            seen[r] += 1
        out = []
        grouped = getattr(self.routing, "counts_by_group", None)
        for m in range(M):
            works = [_rank_work(groups[m][r]) for r in range(R)]
            if self.scored:
                counts = []
                for r, work in enumerate(works):
                    if self._replay_scores:
                        work.cand, work.score, c = self._scored_replay(groups[m][r])
                    else:
                        work.cand, work.score, c = self._scored(work.tokens)
                    counts.append(c)
                counts_src = np.stack(counts)
            elif grouped is not None:
                # One draw for all ranks (per-rank calls would repeat the source's per-call work R times).
                segs = [seg for r in range(R) for seg in groups[m][r]]
                owners = [r for r in range(R) for _ in groups[m][r]]
                counts_src = grouped(segs, owners, R)
            else:
                counts_src = np.stack([self.routing.counts(groups[m][r]) for r in range(R)])
            out.append(MicroBatch(ranks=works, counts_src=counts_src))
        return out

    def _scored(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        L, E = self.num_layers, self.num_experts
        src: GeneratedRouting = self.routing  # type: ignore[assignment]
        logits = src._log_p[None, :, :] + src._rng.gumbel(size=(n, L, E))
        cand = np.argsort(-logits, axis=2, kind="stable")
        srt = np.take_along_axis(logits, cand, axis=2)
        score = np.exp(srt - srt[:, :, :1])
        score /= score.sum(axis=2, keepdims=True)
        flat = cand[:, :, : self.top_k] + (np.arange(L) * E)[None, :, None]
        counts = np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)
        return cand, score, counts


    def _scored_replay(self, segments: list[Segment]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The recorded top-k ids and gate scores of a rank's tokens ([tokens, layers, top_k]): enough for
        a threshold drop, which looks at the top-k only."""
        L, E, k = self.num_layers, self.num_experts, self.top_k
        src: ReplayedRouting = self.routing  # type: ignore[assignment]
        ids, scores = [np.zeros((0, L, k), dtype=np.int64)], [np.zeros((0, L, k))]
        for rid, start, n in segments:
            seq = src.sequences[rid % len(src.sequences)]
            pos = (start + np.arange(n)) % seq.experts.shape[0]
            ids.append(seq.experts[pos])
            scores.append(seq.gates[pos])  # type: ignore[index]
        cand, score = np.concatenate(ids), np.concatenate(scores)
        flat = cand + (np.arange(L) * E)[None, :, None]
        return cand, score, np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)


def _rank_work(segments: list[Segment]) -> RankWork:
    """A rank's batch shape from its segments: one new token is a decode step, more a prefill chunk."""
    pre_new, pre_ctx, dec_ctx = [], [], []
    for _, pos, n in segments:
        if n == 1:
            dec_ctx.append(pos)
        else:
            pre_new.append(n)
            pre_ctx.append(pos)
    shape = BatchShape(
        prefill_new_tokens=np.asarray(pre_new, dtype=np.int64), prefill_context_tokens=np.asarray(pre_ctx, dtype=np.int64),
        decode_context_tokens=np.asarray(dec_ctx, dtype=np.int64), num_emitting=len(dec_ctx),
    )
    return RankWork(shape=shape, tokens=shape.num_tokens, sequences=len(segments))


# ---------------------------------------------------------------- statistics


@dataclass
class ExpertParallelStats:
    """Per MoE layer sums over iterations and micro-batches (seconds, tokens, pairs)."""

    num_layers: int
    num_ranks: int
    attention_s: np.ndarray = field(init=False)
    gate_s: np.ndarray = field(init=False)
    shared_s: np.ndarray = field(init=False)
    expert_s: np.ndarray = field(init=False)  # slowest rank
    straggler_wait_s: np.ndarray = field(init=False)  # slowest minus mean rank: the time ranks wait
    dispatch_s: np.ndarray = field(init=False)
    combine_s: np.ndarray = field(init=False)
    device_tokens: np.ndarray = field(init=False)  # [layers, ranks] token-expert pairs computed
    imbalance_sum: np.ndarray = field(init=False)
    imbalance_n: np.ndarray = field(init=False)
    routed_pairs: int = 0
    dropped_pairs: int = 0
    rerouted_pairs: int = 0
    dispatch_bytes: float = 0.0

    def __post_init__(self) -> None:
        L, R = self.num_layers, self.num_ranks
        for name in ("attention_s", "gate_s", "shared_s", "expert_s", "straggler_wait_s", "dispatch_s", "combine_s",
                     "imbalance_sum", "imbalance_n"):
            setattr(self, name, np.zeros(L))
        self.device_tokens = np.zeros((L, R))

    def layer_table(self) -> dict[str, np.ndarray]:
        mean_imb = np.divide(self.imbalance_sum, self.imbalance_n, out=np.ones(self.num_layers), where=self.imbalance_n > 0)
        return {
            "moe_layer": np.arange(self.num_layers), "attention_s": self.attention_s, "gate_s": self.gate_s,
            "shared_s": self.shared_s, "expert_compute_s": self.expert_s, "straggler_wait_s": self.straggler_wait_s,
            "dispatch_s": self.dispatch_s, "combine_s": self.combine_s, "mean_imbalance": mean_imb,
        }


# ---------------------------------------------------------------- the planner


@dataclass(slots=True)
class _Costs:
    """One micro-batch's op seconds: per decoder layer (attention, dense) and per MoE layer."""

    attention_full: float
    attention_sliding: float
    dense: float
    gate: float
    shared: float
    expert: np.ndarray  # [moe layers]
    dispatch: np.ndarray
    combine: np.ndarray


class ExpertParallelPlanner:
    """Turns a batch split over ranks into an iteration plan for one expert-parallel group."""

    def __init__(
        self, *, model: ModelSpec, profile: HardwareProfile, spec: ExpertParallelSpec, topology: Topology,
        ep: int, tp: int, placement: ExpertPlacement,
    ) -> None:
        self.model = model
        self.profile = profile
        self.spec = spec
        self.topology = topology
        self.ep, self.tp = ep, tp
        self.placement = placement
        self.cache = make_cache("all_resident", num_layers=model.num_moe_layers, num_experts=model.num_experts,
                                capacity_experts=model.num_moe_layers * model.num_experts, per_layer=False)
        # The single-GPU planner supplies the per-op costs (memoised profile lookups), never the plan.
        self.base = IterationPlanner(model=model, profile=profile, cache=self.cache)
        self.num_moe = model.num_moe_layers
        self.num_experts = model.num_experts
        self.top_k = model.top_k
        self.token_bytes = model.hidden_size * DTYPE_BYTES[spec.activation_dtype]
        shape = model.expert_shape
        self.expert_shape = shape if tp == 1 else ExpertShape(shape.hidden, max(1, shape.ffn // tp), shape.num_matrices,
                                                              shape.weight_dtype, shape.act_dtype)
        self.slowdown = np.ones(ep)
        for rank, factor in spec.degraded_ranks.items():
            self.slowdown[rank] = factor
        self.rank_gpus = [np.arange(r * tp, (r + 1) * tp) for r in range(ep)]
        self.stats = ExpertParallelStats(self.num_moe, ep)
        self._tp_ar_memo: dict[int, float] = {}
        self.failover = None  # sim.engine.ep_faults.Failover when the scenario has faults

    def failover_block(self):
        """The event an iteration must wait for before it runs (a failed rank's restore), or None."""
        return None if self.failover is None else self.failover.block()

    # ---------------------------------------------------------------- costs

    def _tp_all_reduce_s(self, tokens: int) -> float:
        if self.tp == 1 or tokens == 0:
            return 0.0
        s = self._tp_ar_memo.get(tokens)
        if s is None:
            s = float(self.topology.all_reduce_s(tokens * self.token_bytes, self.rank_gpus[0]))
            self._tp_ar_memo[tokens] = s
        return s

    def _gpu_bytes(self, rank_bytes: np.ndarray) -> np.ndarray:
        """[..., R, R] rank-to-rank bytes as [..., G, G] GPU bytes: GPU t of rank s sends 1/tp to GPU t of rank d."""
        if self.tp == 1:
            return rank_bytes
        eye = np.eye(self.tp) / self.tp
        out = np.einsum("...sd,tu->...stdu", rank_bytes, eye)
        G = self.ep * self.tp
        return out.reshape(rank_bytes.shape[:-2] + (G, G))

    def _kept(self, mb: MicroBatch) -> np.ndarray:
        """Pairs computed [rank, layer, expert] after the capacity policy; updates the statistics."""
        cap_spec = self.spec.capacity
        counts = mb.counts_src
        st = self.stats
        if cap_spec.name == "none":
            st.routed_pairs += int(counts.sum())
            return counts
        tokens = np.array([w.tokens for w in mb.ranks])
        if cap_spec.name == "drop":
            out = token_drop(counts, tokens, self.top_k, cap_spec.gamma)
            st.routed_pairs += out.routed_pairs
            st.dropped_pairs += out.dropped_pairs
            return out.kept
        L, E = self.num_moe, self.num_experts
        offsets = (np.arange(L) * E)[None, :, None]
        kept = np.zeros_like(counts)
        if cap_spec.name == "threshold":
            load = (counts.sum(axis=0)[:, :, None] * self.placement.share).sum(axis=1)  # [L, R]
            rho = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-12)
            t_rank = cap_spec.threshold * (np.minimum(rho, 1.0) if cap_spec.load_aware else np.ones_like(rho))
            # A replicated expert takes the threshold of its first copy's rank.
            owner = self.placement.share.argmax(axis=2)  # [L, E]
            t_id = np.take_along_axis(t_rank, owner, axis=1).ravel()
        for r, w in enumerate(mb.ranks):
            if w.tokens == 0:
                continue
            C = w.cand.shape[2]  # every expert (generated scores), or the top-k (a replayed trace)
            cand = (w.cand + offsets).reshape(-1, C)
            score = w.score.reshape(-1, C)
            cap = int(capacity(getattr(cap_spec, "gamma", 1.0), self.top_k, w.tokens, E))
            if cap_spec.name == "reroute":
                out = reroute(cand, score, self.top_k, cap, cap_spec.rounds, L * E)
            elif cap_spec.name == "expanded_drop":
                local = (self.placement.share[:, :, r] > 0)  # [L, E]
                local_cand = np.take_along_axis(np.broadcast_to(local, (w.tokens, L, E)), w.cand, axis=2).reshape(-1, E)
                out = expanded_drop(cand, score, self.top_k, cap, local_cand, L * E)
            else:
                out = threshold_drop(cand, score, self.top_k, t_id)
            kept[r] = out.kept.reshape(L, E)
            st.routed_pairs += out.routed_pairs
            st.dropped_pairs += out.dropped_pairs
            st.rerouted_pairs += out.rerouted_pairs
        return kept

    def _costs(self, mb: MicroBatch) -> _Costs:
        base, tp = self.base, self.tp
        att_full, att_sliding, dense, gate, shared = [], [], [], [], []
        for w in mb.ranks:
            if w.tokens == 0:
                for lst in (att_full, att_sliding, dense, gate, shared):
                    lst.append(0.0)
                continue
            proj, g, sh, de = base._token_costs(w.tokens)
            layer_over = base._overheads(w.tokens, w.sequences)[0] if base._has_batch_overhead else 0.0
            ar = self._tp_all_reduce_s(w.tokens)
            full = base._attention_core_s(w.shape, sliding=False)
            slid = base._attention_core_s(w.shape, sliding=True) if base.sliding_window else full
            att_full.append((proj + full) / tp + layer_over + ar)
            att_sliding.append((proj + slid) / tp + layer_over + ar)
            dense.append(de / tp + ar)
            gate.append(g)
            shared.append(sh / tp + ar)
        kept = self._kept(mb)  # [R, L, E]
        share = self.placement.share  # [L, E, R]
        if self.failover is not None:  # a failed rank's experts are routed around (sim.engine.ep_faults)
            kept, share = self.failover.apply(kept, share)
        total = kept.sum(axis=0)  # [L, E]
        dev_tokens = total[:, :, None] * share  # [L, E, R]
        expert_s = self.profile.routed_expert_s(tokens=dev_tokens, shape=self.expert_shape)
        rank_s = expert_s.sum(axis=1) * self.slowdown[None, :]  # [L, R]
        slowest = rank_s.max(axis=1)
        flows = np.einsum("sle,led->lsd", kept, share) * self.token_bytes  # [L, R(src), R(dst)]
        gpu_flows = self._gpu_bytes(flows)
        dispatch = self.topology.all_to_all_s(gpu_flows)
        # Combine sends the same bytes back: the transpose swaps each port's in and out and keeps the
        # per-node bridge and NIC totals, so it lasts exactly as long as the dispatch.
        combine = dispatch
        st = self.stats
        st.attention_s += max(att_full)
        st.gate_s += max(gate)
        st.shared_s += max(shared)
        st.expert_s += slowest
        st.straggler_wait_s += slowest - rank_s.mean(axis=1)
        st.dispatch_s += dispatch
        st.combine_s += combine
        per_rank_tokens = dev_tokens.sum(axis=1)  # [L, R]
        st.device_tokens += per_rank_tokens
        mean = per_rank_tokens.mean(axis=1)
        has = mean > 0
        st.imbalance_sum[has] += per_rank_tokens.max(axis=1)[has] / mean[has]
        st.imbalance_n += has
        idx = np.arange(self.ep)
        st.dispatch_bytes += float(flows.sum() - flows[:, idx, idx].sum())
        return _Costs(max(att_full), max(att_sliding), max(dense), max(gate), max(shared),
                      slowest, dispatch, combine)

    # ---------------------------------------------------------------- the plan

    def plan(self, batch: BatchShape, microbatches: list[MicroBatch], start_offset_s: float = 0.0) -> IterationPlan:
        """Plan one iteration of the group: ``microbatches`` come from ``ExpertParallelRouting.counts``."""
        plan = IterationPlan(start_offset_s=start_offset_s)
        costs = [self._costs(mb) for mb in microbatches]
        overlap = self.spec.overlap
        if overlap.name == "scmoe":
            self._plan_scmoe(plan, costs[0], overlap.position)
        else:
            self._plan_sequential(plan, costs)
        total = sum(mb.counts_src.sum(axis=0) for mb in microbatches)
        plan.hits = int((total > 0).sum())
        self.placement.observe(total)
        tokens_max = max(w.tokens for mb in microbatches for w in mb.ranks)
        if batch.num_emitting:
            emitting = ceil(batch.num_emitting / self.ep)
            plan.add_op(float(self.profile.dense_gemm_s(tokens=emitting, shape=self.base.lm_head_shape)) / self.tp, "lm_head")
        if self.base._has_batch_overhead:
            seqs = max(w.sequences for mb in microbatches for w in mb.ranks)
            over = self.base._overheads(tokens_max, seqs)[1]
            if over:
                plan.add_op(over, "iteration_overhead")
        return plan

    def _attention(self, c: _Costs, layer: int) -> float:
        return c.attention_sliding if self.base.layer_is_sliding[layer] else c.attention_full

    @staticmethod
    def _comm(plan: IterationPlan, seconds: float, after: int) -> int:
        """Queue a communication on the links after op ``after``; -1 when nothing crosses a link."""
        return plan.add_load(float(seconds), after, prefetch=False) if seconds > 0 else -1

    def _plan_sequential(self, plan: IterationPlan, costs: list[_Costs]) -> None:
        """No overlap (one micro-batch) or two-micro-batch overlap: while one micro-batch's tokens are
        on the links, the other's attention, gate and experts run. (Hot loop: lists filled directly.)"""
        M = len(costs)
        op_s, op_kind, op_load = plan.op_s, plan.op_kind, plan.op_load
        load_s, issue_after, is_prefetch = plan.load_s, plan.load_issue_after, plan.load_is_prefetch
        prev = [-1] * M  # combine each micro-batch's next layer waits for
        sliding = self.base.layer_is_sliding
        experts = [c.expert.tolist() for c in costs]
        dispatch = [c.dispatch.tolist() for c in costs]
        combine = [c.combine.tolist() for c in costs]
        moe = 0
        for layer, is_moe in enumerate(self.base.layer_is_moe):
            if not is_moe:
                for m, c in enumerate(costs):
                    op_s.extend((c.attention_sliding if sliding[layer] else c.attention_full, c.dense))
                    op_kind.extend(("attention", "dense_ffn"))
                    op_load.extend((prev[m], -1))
                    prev[m] = -1
                continue
            disp = [-1] * M
            for m, c in enumerate(costs):
                op_s.extend((c.attention_sliding if sliding[layer] else c.attention_full, c.gate))
                op_kind.extend(("attention", "gate"))
                op_load.extend((prev[m], -1))
                d = dispatch[m][moe]
                if d > 0:
                    disp[m] = len(load_s)
                    load_s.append(d)
                    issue_after.append(len(op_s) - 1)
                    is_prefetch.append(False)
                op_s.append(c.shared)
                op_kind.append("shared")
                op_load.append(-1)
            for m in range(M):
                op_s.append(experts[m][moe])
                op_kind.append("experts")
                op_load.append(disp[m])
                cb = combine[m][moe]
                if cb > 0:
                    prev[m] = len(load_s)
                    load_s.append(cb)
                    issue_after.append(len(op_s) - 1)
                    is_prefetch.append(False)
                else:
                    prev[m] = -1
            moe += 1
        if max(prev) >= 0:
            plan.add_op(0.0, "sync", max(prev))

    def _plan_scmoe(self, plan: IterationPlan, c: _Costs, position: int) -> None:
        """ScMoE: the routed experts of a MoE layer read an earlier representation, so its gate and
        dispatch run early (position 1: before this layer's attention; 2: after the previous layer's
        attention; 3: before the previous layer's attention); the experts run before the shared
        expert, whose time then hides the combine."""
        is_moe = self.base.layer_is_moe
        n_layers = len(is_moe)
        moe_index = np.cumsum(is_moe) - 1
        early: dict[int, int] = {}  # decoder layer -> its dispatch, issued early
        prev = -1
        for layer in range(n_layers):
            j = int(moe_index[layer])
            if not is_moe[layer]:
                plan.add_op(self._attention(c, layer), "attention", prev)
                plan.add_op(c.dense, "dense_ffn")
                prev = -1
                continue
            nxt = layer + 1 < n_layers and is_moe[layer + 1]
            if position == 1:
                g = plan.add_op(c.gate, "gate", prev)
                early[layer] = self._comm(plan, c.dispatch[j], g)
                plan.add_op(self._attention(c, layer), "attention")
            elif position == 2:
                plan.add_op(self._attention(c, layer), "attention", prev)
                if layer not in early:
                    g = plan.add_op(c.gate, "gate")
                    early[layer] = self._comm(plan, c.dispatch[j], g)
                if nxt:
                    g = plan.add_op(c.gate, "gate")
                    early[layer + 1] = self._comm(plan, c.dispatch[j + 1], g)
            else:
                if nxt:
                    g = plan.add_op(c.gate, "gate", prev)
                    early[layer + 1] = self._comm(plan, c.dispatch[j + 1], g)
                    plan.add_op(self._attention(c, layer), "attention")
                else:
                    plan.add_op(self._attention(c, layer), "attention", prev)
                if layer not in early:
                    g = plan.add_op(c.gate, "gate")
                    early[layer] = self._comm(plan, c.dispatch[j], g)
            x = plan.add_op(float(c.expert[j]), "experts", early.pop(layer))
            prev = self._comm(plan, c.combine[j], x)
            plan.add_op(c.shared, "shared")
        if prev >= 0:
            plan.add_op(0.0, "sync", prev)


# ---------------------------------------------------------------- set-up and checks


def group_shape(loaded) -> tuple[int, int, int]:
    """(dp, ep, tp) of the scenario."""
    hw = loaded.scenario.hardware
    par = hw.parallelism
    return hw.num_gpus // (par.ep * par.tp), par.ep, par.tp


def check_expert_parallel(loaded) -> None:
    """What the scenario language alone cannot check: the model's experts, the routing, the memory."""
    scenario = loaded.scenario
    src = loaded.source
    dp, ep, tp = group_shape(loaded)
    spec = scenario.policies.expert_parallel
    model = loaded.model
    if ep * tp == 1:
        return
    if model.num_experts % ep:
        raise ScenarioError(
            f"{src}: hardware.parallelism.ep: {ep} ranks do not divide the {model.num_experts} routed experts of {model.name}"
        )
    if model.expert_ffn_size % tp:
        raise ScenarioError(
            f"{src}: hardware.parallelism.tp: {tp} does not divide the expert FFN width {model.expert_ffn_size} of {model.name}"
        )
    if scenario.policies.expert_cache.name != "all_resident":
        raise ScenarioError(
            f"{src}: policies.expert_cache: expert parallelism keeps every expert resident on its rank; "
            f"set {{name: all_resident}} (got {scenario.policies.expert_cache.name!r})"
        )
    if scenario.policies.prefetch.name != "none":
        raise ScenarioError(f"{src}: policies.prefetch: expert parallelism has nothing to prefetch; set {{name: none}}")
    for rank in spec.degraded_ranks:
        if not 0 <= rank < ep:
            raise ScenarioError(f"{src}: policies.expert_parallel.degraded_ranks: rank {rank} is not in 0..{ep - 1}")
    if spec.activation_dtype not in DTYPE_BYTES:
        raise ScenarioError(
            f"{src}: policies.expert_parallel.activation_dtype: unknown dtype {spec.activation_dtype!r}; "
            f"expected one of {sorted(DTYPE_BYTES)}"
        )
    kind = scenario.workload.routing.kind
    if spec.capacity.name in SCORED_CAPACITY and kind not in ("uniform", "zipf") and not (
        kind == "replay" and spec.capacity.name == "threshold"
    ):
        raise ScenarioError(
            f"{src}: policies.expert_parallel.capacity: {spec.capacity.name} needs per-token gate scores over every "
            f"expert, which only generated uniform/zipf routing provides (got routing kind {kind!r}; a replayed "
            f"trace with gate scores serves threshold); use drop, which needs counts only"
        )
    hw = scenario.hardware
    per_node = hw.num_gpus // hw.num_nodes
    for replica in range(dp):
        try:
            measured_collectives(hw.topology, loaded.profile, group_gpus=ep * tp, gpus_per_node=per_node, tp=tp,
                                 first_gpu=replica * ep * tp)
        except ValueError as exc:
            raise ScenarioError(f"{src}: hardware.topology.collective_model: {exc}") from None
    plan_memory_ep(loaded)


def plan_memory_ep(loaded, experts_per_rank: int | None = None) -> MemoryBudget:
    """One GPU of an expert-parallel group: non-expert weights / tp, its ranks' experts / tp, reserve;
    the rest is KV cache, pooled over the group's GPUs (blocks per replica)."""
    from sim.scenario import gpu_memory_bytes

    model = loaded.model
    scenario = loaded.scenario
    _, ep, tp = group_shape(loaded)
    spec = scenario.policies.expert_parallel
    if experts_per_rank is None:
        experts_per_rank = model.num_experts // ep + ceil(spec.placement.redundant_experts / ep)
    gpu = gpu_memory_bytes(loaded)
    expert_bytes = experts_per_rank * model.num_moe_layers * model.expert_bytes / tp
    non_expert = float(model.non_expert_weight_bytes) / tp
    reserve = scenario.hardware.reserve_fraction * gpu
    free = gpu - non_expert - expert_bytes - reserve
    block_tokens = scenario.policies.batching.kv_block_tokens
    block_bytes = block_tokens * model.kv_bytes_per_token
    if free <= 0:
        raise CapacityError(
            f"{loaded.source}: hardware: {model.name} with ep={ep}, tp={tp} does not fit on {gpu / 1e9:.1f} GB per GPU: "
            f"non-expert weights {non_expert / 1e9:.1f} GB + {experts_per_rank} experts per layer "
            f"{expert_bytes / 1e9:.1f} GB + reserve {reserve / 1e9:.1f} GB leave {free / 1e9:.1f} GB for the KV cache"
        )
    blocks = int(ep * tp * free // block_bytes)
    if blocks < 1:
        raise CapacityError(f"{loaded.source}: hardware: no KV block of {block_bytes / 1e6:.1f} MB fits")
    return MemoryBudget(
        gpu_bytes=gpu, non_expert_bytes=non_expert, expert_slots=experts_per_rank * model.num_moe_layers,
        expert_slot_bytes=float(model.expert_bytes) / tp, reserve_bytes=reserve, kv_block_tokens=block_tokens,
        kv_block_bytes=block_bytes, kv_blocks=blocks,
    )


def build_group(loaded, profile: HardwareProfile, routing: RoutingSource, replica: int):
    """The planner and the rank-aware routing of replica ``replica``."""
    scenario = loaded.scenario
    hw = scenario.hardware
    _, ep, tp = group_shape(loaded)
    spec = scenario.policies.expert_parallel
    group = ep * tp
    topology = build_topology(hw.topology, profile, group_gpus=group, gpus_per_node=hw.num_gpus // hw.num_nodes,
                              first_gpu=replica * group, tp=tp)
    placement = ExpertPlacement(spec.placement, num_layers=loaded.model.num_moe_layers,
                                num_experts=loaded.model.num_experts, num_ranks=ep)
    planner = ExpertParallelPlanner(model=loaded.model, profile=profile, spec=spec, topology=topology, ep=ep, tp=tp,
                                    placement=placement)
    try:
        ep_routing = ExpertParallelRouting(
            routing, num_ranks=ep, num_microbatches=2 if spec.overlap.name == "two_microbatch" else 1,
            top_k=loaded.model.top_k, scored=spec.capacity.name in SCORED_CAPACITY,
        )
    except (TraceError, ValueError) as exc:
        raise ScenarioError(f"{loaded.source}: workload.routing: {exc}") from None
    return planner, ep_routing


__all__ = [
    "ExpertParallelRouting", "ExpertParallelPlanner", "ExpertParallelStats", "MicroBatch", "RankWork",
    "check_expert_parallel", "plan_memory_ep", "build_group", "group_shape",
]
