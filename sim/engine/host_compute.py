"""CPU attention, CPU experts and micro-batch pipelining: one iteration as a multi-resource flow shop.

MoE-Lightning (PAPERS.md section 8) and SpecMoEOff (section 2) keep the KV cache in host memory, run
decode attention on the CPU and the expert FFNs on the GPU, stream expert weights over PCIe while the
previous layer computes, and split the batch into micro-batches so that the CPU works on one while the
GPU works on another. Fiddler (section 9) runs a non-resident expert on the CPU when shipping its
activations is cheaper than fetching its weights. Here none of that overlap is assumed: each micro-batch
and layer is a chain of ops on five in-order resources (``sim.engine.flowshop``: GPU stream, weight copy
engine, CPU, activation H2D, activation D2H) with their dependencies, and ``time_flow`` times it.

Per layer l and micro-batch j:

* GPU ``pre``: QKV projections, plus the attention core of the parts placed on the GPU;
* CPU attention (when placed there): QKV cross to the host (act D2H), the host profile's attention time
  (``verify_attention_s``: decode for one query, a prefill-like chunk for k+1), the output crosses back (act H2D);
* GPU ``post``: output projection, gate and shared experts (or the dense FFN);
* experts: resident ones on the GPU at once; fetched ones after their weights arrived; CPU ones after their
  activations crossed (hidden x tokens each way), and the next layer waits for their results.

Weights: a layer's non-resident experts are copied into one of two staging buffers (double buffering),
so layer l's copies may start once layer l-2's experts have run. Resident experts are the expert cache's
static initial fill (hardware.expert_memory); nothing is evicted. ``stream_experts: all`` copies every
non-resident expert of every layer (the large-batch regime), ``routed`` only those the routing chose.

Simplifications (documented in the README text): activation links are separate in-order streams whose
bandwidth is not shared with weight copies (hidden states are well under 1% of the bytes); the profile's
per-layer/per-expert overhead terms are not applied here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.engine.flowshop import ACT_D2H, ACT_H2D, COPY, CPU, GPU, FlowPlan, FlowTiming, time_flow
from sim.engine.speculative import verify_attention_s
from sim.errors import ScenarioError
from sim.policies.cache import ExpertCache
from sim.policies.offload_specs import OffloadSpec
from sim.profile import HardwareProfile
from sim.spec import ModelSpec
from sim.work import dtype_bytes


def host_threads(host: HardwareProfile) -> int | None:
    """Threads the host profile was measured with (its provenance), or None when not recorded."""
    env = host.provenance.get("environment") if isinstance(host.provenance, dict) else None
    threads = env.get("threads") if isinstance(env, dict) else None
    return int(threads) if threads is not None else None


def require_host(host: HardwareProfile | None, source: str, why: str) -> HardwareProfile:
    if host is None:
        raise ScenarioError(
            f"{source}: hardware.host_profile: {why} runs on the CPU, so give a host CPU profile "
            f"(e.g. host_profile: cpu-this-machine, or a file from `moesim calibrate --device cpu`); "
            f"moesim never invents CPU latencies"
        )
    return host


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """One micro-batch of an iteration: prefill chunks and verified/decoded tokens per sequence."""

    prefill_new: np.ndarray
    prefill_ctx: np.ndarray
    decode_ctx: np.ndarray
    decode_queries: np.ndarray  # k_i + 1 per decoding sequence (1 without speculation)
    emitting: int

    @property
    def tokens(self) -> int:
        return int(self.prefill_new.sum() + self.decode_queries.sum())


@dataclass(frozen=True, slots=True)
class StepResult:
    duration_s: float
    gpu_busy_s: float
    copy_busy_s: float
    loads: int
    hits: int
    misses: int
    cpu_experts: int
    breakdown: tuple[float, float, float, float, float, float]
    timing: FlowTiming


class PipelinedIteration:
    """Plans and times one iteration of the offloading engine; decisions never depend on timing."""

    def __init__(self, *, model: ModelSpec, profile: HardwareProfile, host: HardwareProfile | None,
                 cache: ExpertCache, offload: OffloadSpec) -> None:
        self.model = model
        self.gpu = profile
        self.host = host
        self.cache = cache
        self.offload = offload
        self.num_experts = model.num_experts
        self.moe_layers = set(model.moe_layer_indices)
        self.sliding = set(model.sliding_layer_indices)
        self.window = model.sliding_window_tokens
        self.shape = model.attention_shape
        self.projections = model.attention_projection_shapes
        act = dtype_bytes(self.shape.act_dtype)
        q_out = self.shape.num_heads * self.shape.qk_head_dim
        kv_out = int(self.shape.kv_bytes_per_token // dtype_bytes(model.kv_dtype))  # K and V widths together
        self.qkv_bytes_per_token = (q_out + kv_out) * act
        self.attn_out_bytes_per_token = self.shape.num_heads * self.shape.v_head_dim * act
        self.hidden_bytes_per_token = model.hidden_size * act
        self.kv_bytes_per_token_layer = self.shape.kv_bytes_per_token
        self.expert_load_s = float(profile.h2d_copy_s(nbytes=model.expert_bytes, pinned=True))
        self.kv_on_host = offload.attention.decode == "cpu"

    # ------------------------------------------------------------ micro-batches

    def split(self, batch, drafts: np.ndarray) -> list[list[int]]:
        """Entries per micro-batch: longest first, each to the micro-batch with the fewest tokens (MoE-Lightning A.2)."""
        sizes = [n if req.in_prefill else int(drafts[i]) + 1 for i, (req, n) in enumerate(batch)]
        m = min(self.offload.micro_batches, len(batch))
        groups: list[list[int]] = [[] for _ in range(m)]
        load = [0] * m
        for i in sorted(range(len(batch)), key=lambda i: (-sizes[i], i)):
            j = min(range(m), key=lambda j: (load[j], j))
            groups[j].append(i)
            load[j] += sizes[i]
        return [sorted(g) for g in groups if g]

    def run(self, batch, segments, drafts: np.ndarray, routing, start_offset_s: float) -> StepResult:
        groups = self.split(batch, drafts)
        mbs, counts = [], []
        for group in groups:
            pn, pc, dc, dq = [], [], [], []
            emitting = 0
            for i in group:
                req, n = batch[i]
                if req.in_prefill:
                    pn.append(n)
                    pc.append(req.context)
                    emitting += req.context + n >= req.prefill_target
                else:
                    dc.append(req.context)
                    dq.append(int(drafts[i]) + 1)
                    emitting += int(drafts[i]) + 1
            a = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
            mbs.append(MicroBatch(a(pn), a(pc), a(dc), a(dq), emitting))
            counts.append(routing.counts([segments[i] for i in group]))
        plan, stats = self.plan(mbs, counts, start_offset_s)
        timing = time_flow(plan)
        k = timing.kind_s
        breakdown = (k.get("weights_h2d", 0.0), k.get("gpu_moe", 0.0), k.get("gpu_other", 0.0),
                     k.get("cpu_attention", 0.0), k.get("cpu_experts", 0.0), k.get("act_transfer", 0.0))
        return StepResult(timing.duration_s, timing.busy_s[GPU], timing.busy_s[COPY], stats["loads"], stats["hits"],
                          stats["misses"], stats["cpu_experts"], breakdown, timing)

    # ------------------------------------------------------------ costs

    def _attention_parts(self, mb: MicroBatch, sliding: bool) -> tuple[float, float]:
        """(GPU seconds, CPU seconds) of the attention core of one micro-batch in one layer."""
        pc, dc = mb.prefill_ctx, mb.decode_ctx
        if sliding and self.window:
            pc, dc = np.minimum(pc, self.window), np.minimum(dc, self.window)
        placement = self.offload.attention
        gpu_s = cpu_s = 0.0
        if len(mb.prefill_new):
            prof = self.gpu if placement.prefill == "gpu" else self.host
            s = float(np.sum(prof.attention_prefill_s(new_tokens=mb.prefill_new, context_tokens=pc, shape=self.shape)))
            if placement.prefill == "gpu":
                gpu_s += s
            else:
                cpu_s += s
        if len(dc):
            prof = self.gpu if placement.decode == "gpu" else self.host
            chunked = placement.decode == "cpu" and self.offload.cpu_attention_kernel == "chunked"
            s = verify_attention_s(prof, context_tokens=dc, query_tokens=mb.decode_queries, shape=self.shape,
                                   chunked=chunked)
            if placement.decode == "gpu":
                gpu_s += s
            else:
                cpu_s += s
        return gpu_s, cpu_s

    def _cpu_attention_tokens(self, mb: MicroBatch) -> int:
        placement = self.offload.attention
        return (int(mb.prefill_new.sum()) if placement.prefill == "cpu" else 0) + \
               (int(mb.decode_queries.sum()) if placement.decode == "cpu" else 0)

    # ------------------------------------------------------------ planning

    def plan(self, mbs: list[MicroBatch], counts: list[np.ndarray], start_offset_s: float = 0.0) -> tuple[FlowPlan, dict]:
        """The flow-shop plan of one iteration; ``counts[j][moe_layer, expert]`` are micro-batch j's routing counts."""
        gpu, host = self.gpu, self.host
        model = self.model
        E = self.num_experts
        plan = FlowPlan(start_offset_s=start_offset_s)
        stats = {"loads": 0, "hits": 0, "misses": 0, "cpu_experts": 0}
        M = len(mbs)
        tokens = [mb.tokens for mb in mbs]
        pre_s = [sum(float(gpu.dense_gemm_s(tokens=t, shape=s)) for s in self.projections[:-1]) for t in tokens]
        o_s = [float(gpu.dense_gemm_s(tokens=t, shape=self.projections[-1])) for t in tokens]
        gate_s = [float(gpu.gate_s(tokens=t, shape=model.router_shape)) for t in tokens]
        shared_s = [model.num_shared_experts * float(gpu.expert_ffn_s(tokens=t, shape=model.shared_expert_shape))
                    if model.shared_expert_shape is not None else 0.0 for t in tokens]
        dense_s = [float(gpu.expert_ffn_s(tokens=t, shape=model.dense_ffn_shape)) if model.dense_ffn_shape else 0.0
                   for t in tokens]
        attn = {flag: [self._attention_parts(mb, flag) for mb in mbs] for flag in {False, bool(self.sliding)}}
        cpu_tok = [self._cpu_attention_tokens(mb) for mb in mbs]
        # KV of GPU-prefilled chunks when the cache lives on the host: the context comes up, the new KV goes down.
        kv_up_s = kv_down_s = [0.0] * M
        if self.kv_on_host and self.offload.attention.prefill == "gpu":
            kv = self.kv_bytes_per_token_layer
            kv_up_s = [float(gpu.h2d_copy_s(nbytes=float(mb.prefill_ctx.sum()) * kv)) for mb in mbs]
            kv_down_s = [float(gpu.d2h_copy_s(nbytes=float(mb.prefill_new.sum()) * kv)) for mb in mbs]
        qkv_down_s = [float(gpu.d2h_copy_s(nbytes=t * self.qkv_bytes_per_token)) for t in cpu_tok]
        out_up_s = [float(gpu.h2d_copy_s(nbytes=t * self.attn_out_bytes_per_token)) for t in cpu_tok]
        expert_gpu = [gpu.expert_ffn_s(tokens=c, shape=model.expert_shape) for c in counts]
        total = np.sum(counts, axis=0)  # [moe_layer, expert]
        decide_cpu = self.offload.cpu_experts
        if decide_cpu:
            expert_cpu = [host.expert_ffn_s(tokens=c, shape=model.expert_shape) for c in counts]
            hid = self.hidden_bytes_per_token
            act_s = [gpu.d2h_copy_s(nbytes=c * hid) + gpu.h2d_copy_s(nbytes=c * hid) for c in counts]

        # Choose, per (layer, expert), where it runs: resident -> GPU; else CPU or fetch, whichever is faster
        # by the profiles (Fiddler's rule: cpu(tokens) + activations vs load + gpu(tokens)).
        L = model.num_moe_layers
        resident = self.cache.resident.reshape(L, E)
        used = total > 0
        on_cpu = np.zeros((L, E), dtype=bool)
        if decide_cpu:
            cpu_cost = sum(expert_cpu[j] + act_s[j] for j in range(M))
            gpu_cost = self.expert_load_s + sum(expert_gpu)
            on_cpu = used & ~resident & (cpu_cost < gpu_cost)
        if self.offload.stream_experts == "all":
            fetch = ~resident & ~on_cpu
        else:
            fetch = used & ~resident & ~on_cpu
        stats["hits"] = int((used & resident).sum())
        stats["misses"] = int((used & ~resident).sum())
        stats["cpu_experts"] = int(on_cpu.sum())

        load_ops: dict[int, list[int]] = {}  # moe layer -> its load ops (experts in id order)
        experts_done: dict[int, list[int]] = {}  # moe layer -> GPU expert ops (buffer freed after them)

        def issue_loads(m: int) -> None:
            if m >= L or m in load_ops:
                return
            deps = tuple(experts_done.get(m - 2, ()))
            ops = []
            for e in np.flatnonzero(fetch[m]).tolist():
                ops.append(plan.add(self.expert_load_s, COPY, "weights_h2d", deps))
            load_ops[m] = ops
            stats["loads"] += len(ops)

        end_of_layer: list[tuple[int, ...]] = [() for _ in range(M)]
        issue_loads(0)
        issue_loads(1)

        def attention_part(layer: int, j: int) -> None:
            sl = layer in self.sliding
            g_attn, c_attn = attn[sl][j]
            deps = end_of_layer[j]
            if kv_up_s[j]:
                deps = deps + (plan.add(kv_up_s[j], ACT_H2D, "act_transfer", deps),)
            pre = plan.add(pre_s[j] + g_attn, GPU, "gpu_other", deps)
            last = (pre,)
            if kv_down_s[j]:
                plan.add(kv_down_s[j], ACT_D2H, "act_transfer", (pre,))
            if cpu_tok[j]:
                down = plan.add(qkv_down_s[j], ACT_D2H, "act_transfer", (pre,))
                cpu = plan.add(c_attn, CPU, "cpu_attention", (down,))
                last = (plan.add(out_up_s[j], ACT_H2D, "act_transfer", (cpu,)),)
            end_of_layer[j] = last

        def ffn_part(layer: int, j: int, moe: int) -> None:
            deps = end_of_layer[j]
            if moe < 0:
                end_of_layer[j] = (plan.add(o_s[j] + dense_s[j], GPU, "gpu_other", deps),)
                return
            post = plan.add(o_s[j] + gate_s[j] + shared_s[j], GPU, "gpu_other", deps)
            ends = [post]
            row = counts[j][moe]
            mine = row > 0
            res_s = float(expert_gpu[j][moe][mine & resident[moe]].sum())
            if res_s:
                ends.append(plan.add(res_s, GPU, "gpu_moe", (post,)))
                experts_done.setdefault(moe, []).append(ends[-1])
            fetched = np.flatnonzero(mine & fetch[moe]).tolist()
            if fetched:
                ids = np.flatnonzero(fetch[moe]).tolist()
                last_load = load_ops[moe][max(ids.index(e) for e in fetched)]
                fet_s = float(expert_gpu[j][moe][fetched].sum())
                ends.append(plan.add(fet_s, GPU, "gpu_moe", (post, last_load)))
                experts_done.setdefault(moe, []).append(ends[-1])
            cpu_ids = np.flatnonzero(mine & on_cpu[moe])
            if len(cpu_ids):
                t = float(row[cpu_ids].sum())
                down = plan.add(float(gpu.d2h_copy_s(nbytes=t * self.hidden_bytes_per_token)), ACT_D2H, "act_transfer", (post,))
                cpu = plan.add(float(expert_cpu[j][moe][cpu_ids].sum()), CPU, "cpu_experts", (down,))
                ends.append(plan.add(float(gpu.h2d_copy_s(nbytes=t * self.hidden_bytes_per_token)), ACT_H2D,
                                     "act_transfer", (cpu,)))
            end_of_layer[j] = tuple(ends)

        for j in range(M):
            attention_part(0, j)
        moe_index = {layer: i for i, layer in enumerate(model.moe_layer_indices)}
        for layer in range(model.num_layers):
            moe = moe_index.get(layer, -1)
            if moe >= 0:
                issue_loads(moe + 1)  # its buffer frees when layer moe-1's experts have run
            for j in range(M):
                ffn_part(layer, j, moe)
                if layer + 1 < model.num_layers:
                    attention_part(layer + 1, j)
        for j in range(M):
            if mbs[j].emitting:
                plan.add(float(gpu.dense_gemm_s(tokens=mbs[j].emitting, shape=model.lm_head_shape)), GPU, "gpu_other",
                         end_of_layer[j])
        return plan, stats
