"""What a runtime run records: one row per request, one per iteration, and the routing it observed.

Times are seconds from the run's start (``perf_counter`` based). The routing is kept per request as
expert ids ``[token position, layer, top_k]``, the layout of ``sim.workload.routing_trace``, so the
simulator can replay exactly the choices the runtime made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request_id: int
    arrived_at_s: float
    prompt_tokens: int
    output_tokens: int
    generated_tokens: int
    status: str
    admitted_at_s: float
    first_token_at_s: float
    finished_at_s: float
    preemptions: int
    token_times_s: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class RuntimeIteration:
    started_at_s: float
    duration_s: float
    num_prefill_seqs: int
    num_decode_seqs: int
    num_tokens: int
    expert_hits: int
    expert_misses: int
    bypassed: int
    prefetch_hits: int  # hits on experts whose prefetch load this iteration issued
    attention_s: float  # norms, projections and SDPA of every layer
    gate_s: float  # router GEMM, softmax, top-k, and the cache decisions
    expert_compute_s: float  # expert FFNs including token gather and scatter-add
    load_wait_s: float  # the compute thread waiting for expert copies (and, at the end, for prefetches)
    copy_busy_s: float  # copy-thread time of this iteration's loads (misses and prefetches)
    copy_dispatch_s: float  # loads queued while the copy thread was free (wake-up, GIL, scheduling)
    lm_head_s: float
    other_s: float  # embedding, batch assembly, bookkeeping: the rest of the wall time


@dataclass
class RunRecorder:
    num_layers: int
    top_k: int
    requests: list[RequestRecord] = field(default_factory=list)
    iterations: list[RuntimeIteration] = field(default_factory=list)
    # request id -> {position: [layers, top_k]}; positions recomputed after preemption keep their first routing
    routing: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    gates: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # same layout, renormalised gate weights
    rerouted_positions: int = 0  # recomputed positions whose routing differed from the first pass
    forced_positions: int = 0  # token-layers whose gate's own top-k differed from a given (oracle) routing
    # Per iteration, its segments (request id, first position, tokens, is prefill, emits a token), so the
    # simulator's planner can be fed exactly the batches the runtime ran.
    batches: list[tuple[tuple[int, int, int, bool, bool], ...]] = field(default_factory=list)

    def record_routing(self, request_id: int, first_position: int, experts: np.ndarray,
                       gates: np.ndarray | None = None) -> None:
        """``experts`` [tokens, layers, top_k] (and their gate weights) for positions first_position, +1, ..."""
        seq = self.routing.setdefault(request_id, {})
        gseq = self.gates.setdefault(request_id, {})
        for i in range(experts.shape[0]):
            pos = first_position + i
            old = seq.get(pos)
            if old is None:
                seq[pos] = experts[i]
                if gates is not None:
                    gseq[pos] = gates[i]
            elif not np.array_equal(np.sort(old, axis=-1), np.sort(experts[i], axis=-1)):
                self.rerouted_positions += 1

    def routing_of(self, request_id: int) -> np.ndarray:
        """[positions, layers, top_k] int16, positions 0..n-1 (n = what the request computed)."""
        seq = self.routing.get(request_id, {})
        if not seq:
            return np.zeros((0, self.num_layers, self.top_k), dtype=np.int16)
        n = max(seq) + 1
        assert len(seq) == n, "a request's positions are computed in order"
        return np.stack([seq[p] for p in range(n)]).astype(np.int16)

    def gates_of(self, request_id: int) -> np.ndarray | None:
        """Gate weights [positions, layers, top_k] float32 matching ``routing_of``; None if not recorded."""
        seq = self.gates.get(request_id, {})
        n = len(self.routing.get(request_id, {}))
        if len(seq) != n:
            return None
        return np.stack([seq[p] for p in range(n)]).astype(np.float32) if n else np.zeros(
            (0, self.num_layers, self.top_k), dtype=np.float32)

    def write_routing_trace(self, path: Path, model: str, num_experts: int) -> Path:
        """The routing the run observed, in the canonical routing-trace format (``sim.workload.routing_trace``):
        one row group per 64 requests, gate weights included when every request has them."""
        from sim.workload.routing_trace import RoutingTraceMeta, RoutingTraceWriter, TraceSequence

        meta = RoutingTraceMeta(model=model, num_layers=self.num_layers, num_experts=num_experts, top_k=self.top_k)
        ids = sorted(self.routing)
        sequences = [TraceSequence(i, self.routing_of(i), np.arange(len(self.routing[i]), dtype=np.int32),
                                   self.gates_of(i)) for i in ids]
        with_gates = all(s.gates is not None for s in sequences)
        if not with_gates:
            sequences = [TraceSequence(s.request_id, s.experts, s.positions) for s in sequences]
        with RoutingTraceWriter(path, meta, gates=with_gates) as writer:
            for start in range(0, len(sequences), 64):
                writer.append_many(sequences[start : start + 64])
        return path

    def requests_frame(self) -> pd.DataFrame:
        rows = [{k: v for k, v in asdict(r).items() if k != "token_times_s"} for r in self.requests]
        frame = pd.DataFrame(rows).sort_values("request_id", ignore_index=True)
        frame["ttft_s"] = frame["first_token_at_s"] - frame["arrived_at_s"]
        frame["e2e_s"] = frame["finished_at_s"] - frame["arrived_at_s"]
        decode_tokens = (frame["output_tokens"] - 1).clip(lower=1)
        frame["tpot_s"] = ((frame["finished_at_s"] - frame["first_token_at_s"]) / decode_tokens).where(
            frame["output_tokens"] > 1
        )
        return frame

    def token_times_frame(self) -> pd.DataFrame:
        rows = [(r.request_id, i, t) for r in self.requests for i, t in enumerate(r.token_times_s)]
        return pd.DataFrame(rows, columns=["request_id", "token_index", "at_s"])

    def iterations_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(it) for it in self.iterations])

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.requests_frame().to_csv(folder / "runtime_requests.csv", index=False)
        self.token_times_frame().to_csv(folder / "runtime_tokens.csv", index=False)
        self.iterations_frame().to_csv(folder / "runtime_iterations.csv", index=False)
