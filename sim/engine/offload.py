"""Set-up of the speculative / CPU-offloading engine: memory split over GPU and host, planner, replica.

``build_offload_setup`` returns None for a scenario that uses neither ``policies.speculative`` (with
k > 0) nor a non-default ``policies.offload``, so plain scenarios run the plain engine untouched.

Memory (per replica): the GPU holds the non-expert weights, the expert slots, a double staging buffer
(two layers of experts, when experts are streamed by the pipelined planner), the reserve, the draft model's
weights when it runs on the GPU, and the KV cache of whatever attends on the GPU. The host holds every
routed expert (the offloaded copy), the draft's weights when it runs on the CPU, and the KV cache of
whatever attends on the CPU (``policies.offload.attention.decode: cpu`` moves the target's KV there;
``policies.speculative.draft_kv_gpu_fraction`` f < 1 keeps f of the draft's KV bytes per token on the GPU
and 1 - f on the host, ``sim.engine.draft_kv``).
Each cached token needs room in both places at once, so the number of KV blocks is the smaller of the two
pools' (``hardware.host_memory_bytes`` bounds the host pool)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.engine.draft_kv import HostDraftAttention
from sim.engine.host_compute import PipelinedIteration, host_threads, require_host
from sim.engine.memory import MemoryBudget
from sim.engine.speculative import (
    AcceptanceModel,
    DraftCost,
    SpecReplica,
    VerifyIterationPlanner,
    read_run_lengths,
    resolve_draft_model,
)
from sim.policies.offload_specs import EmpiricalAcceptance
from sim.errors import CapacityError
from sim.scenario import LoadedScenario, expert_memory_bytes, gpu_memory_bytes
from sim.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class OffloadMemoryBudget(MemoryBudget):
    """A MemoryBudget whose KV blocks may live on the host; ``kv_block_bytes`` is the GPU's share of a block."""

    host_bytes: float = 0.0
    host_expert_bytes: float = 0.0
    host_kv_block_bytes: float = 0.0
    staging_bytes: float = 0.0
    draft_weight_bytes: float = 0.0
    draft_on_gpu: bool = True
    kv_on_host: bool = False
    draft_kv_gpu_fraction: float = 1.0

    @property
    def host_kv_bytes(self) -> float:
        return self.kv_blocks * self.host_kv_block_bytes


def plan_offload_memory(loaded: LoadedScenario, draft: ModelSpec | None, *, pipelined: bool) -> OffloadMemoryBudget:
    """Split GPU and host memory; name what does not fit and by how much."""
    model = loaded.model
    scenario = loaded.scenario
    policies = scenario.policies
    where = f"{loaded.source}: hardware"
    gpu = gpu_memory_bytes(loaded)
    host = scenario.hardware.host_memory_bytes
    total_experts = model.num_moe_layers * model.num_experts
    if policies.expert_cache.name == "all_resident":
        slots = total_experts
    else:
        slots = min(total_experts, int(expert_memory_bytes(loaded) // model.expert_bytes))
    staging = 2.0 * model.num_experts * model.expert_bytes if pipelined and slots < total_experts else 0.0
    reserve = scenario.hardware.reserve_fraction * gpu
    non_expert = float(model.non_expert_weight_bytes)
    spec = policies.speculative
    draft_on_gpu = spec is None or spec.draft_placement == "gpu"
    draft_weights = float(draft.total_weight_bytes) if draft is not None else 0.0
    draft_kv = float(draft.kv_bytes_per_token) if draft is not None else 0.0
    kv_on_host = policies.offload.attention.decode == "cpu"
    target_kv = float(model.kv_bytes_per_token)
    # The draft's KV per token: all where the draft runs, or split f / 1 - f when a GPU draft splits it.
    draft_gpu_fraction = (spec.draft_kv_gpu_fraction if draft_on_gpu else 0.0) if spec is not None else 1.0
    draft_kv_gpu = draft_gpu_fraction * draft_kv
    draft_kv_host = draft_kv - draft_kv_gpu
    gpu_per_token = (0.0 if kv_on_host else target_kv) + draft_kv_gpu
    host_per_token = (target_kv if kv_on_host else 0.0) + draft_kv_host
    block_tokens = policies.batching.kv_block_tokens
    gpu_free = gpu - non_expert - slots * model.expert_bytes - staging - reserve - (draft_weights if draft_on_gpu else 0.0)
    host_experts = float(model.routed_expert_bytes_total)
    host_free = host - host_experts - (0.0 if draft_on_gpu else draft_weights)
    if gpu_free <= 0:
        raise CapacityError(
            f"{where}: {model.name} does not fit on {gpu / 1e9:.1f} GB: non-expert weights {non_expert / 1e9:.1f} GB + "
            f"expert slots {slots * model.expert_bytes / 1e9:.1f} GB ({slots} experts) + staging buffers "
            f"{staging / 1e9:.1f} GB + reserve {reserve / 1e9:.1f} GB + draft weights "
            f"{(draft_weights if draft_on_gpu else 0.0) / 1e9:.1f} GB leave {gpu_free / 1e9:.1f} GB; lower "
            f"hardware.expert_memory or use a GPU with more memory"
        )
    if host_free <= 0:
        raise CapacityError(
            f"{where}.host_memory_bytes: {host / 1e9:.1f} GB holds the routed experts ({host_experts / 1e9:.1f} GB) "
            f"{'and the draft weights ' if not draft_on_gpu else ''}with nothing left for the KV cache"
        )
    limits = []
    if gpu_per_token:
        limits.append(int(gpu_free // (block_tokens * gpu_per_token)))
    if host_per_token:
        limits.append(int(host_free // (block_tokens * host_per_token)))
    blocks = min(limits) if limits else 0
    if blocks < 1:
        raise CapacityError(f"{where}: the memory left for the KV cache holds no block of {block_tokens} tokens")
    return OffloadMemoryBudget(
        gpu_bytes=gpu, non_expert_bytes=non_expert, expert_slots=slots, expert_slot_bytes=float(model.expert_bytes),
        reserve_bytes=reserve, kv_block_tokens=block_tokens, kv_block_bytes=block_tokens * gpu_per_token,
        kv_blocks=blocks, host_bytes=host, host_expert_bytes=host_experts,
        host_kv_block_bytes=block_tokens * host_per_token, staging_bytes=staging, draft_weight_bytes=draft_weights,
        draft_on_gpu=draft_on_gpu, kv_on_host=kv_on_host, draft_kv_gpu_fraction=draft_gpu_fraction,
    )


@dataclass
class OffloadSetup:
    """What the simulation driver needs to build speculative / offloading replicas."""

    loaded: LoadedScenario
    budget: OffloadMemoryBudget
    draft: ModelSpec | None
    draft_cost: DraftCost | None
    pipelined: bool
    draft_length: int
    acceptance_rng: np.random.Generator
    run_lengths: np.ndarray | None = None  # an empirical acceptance's lengths (inline or from its file)

    planner_class = VerifyIterationPlanner
    replica_class = SpecReplica

    def replica_kwargs(self, profile: Any, cache: Any) -> dict[str, Any]:
        scenario = self.loaded.scenario
        spec = scenario.policies.speculative
        acceptance = None
        if spec is not None and self.draft_length:
            acceptance = AcceptanceModel(spec.acceptance, self.acceptance_rng, run_lengths=self.run_lengths)
        pipelined = None
        if self.pipelined:
            pipelined = PipelinedIteration(model=self.loaded.model, profile=profile, host=self.loaded.host_profile,
                                           cache=cache, offload=scenario.policies.offload)
        return {"draft_length": self.draft_length, "acceptance": acceptance, "draft": self.draft_cost,
                "pipelined": pipelined}

    def summary(self) -> dict[str, Any]:
        b = self.budget
        host = self.loaded.host_profile
        off = self.loaded.scenario.policies.offload
        return {
            "draft_model": self.draft.name if self.draft is not None else None,
            "draft_length": self.draft_length,
            "attention": {"prefill": off.attention.prefill, "decode": off.attention.decode},
            "cpu_experts": off.cpu_experts,
            "micro_batches": off.micro_batches,
            "stream_experts": off.stream_experts,
            "pipelined": self.pipelined,
            "host_profile": host.name if host is not None else None,
            "host_threads": host_threads(host) if host is not None else None,
            "kv_on_host": b.kv_on_host,
            "host_kv_capacity_bytes": b.host_kv_bytes,
            "gpu_kv_capacity_bytes": b.kv_bytes,
            "staging_bytes": b.staging_bytes,
            "draft_weight_bytes": b.draft_weight_bytes,
            "draft_on_gpu": b.draft_on_gpu,
            "draft_kv_gpu_fraction": b.draft_kv_gpu_fraction,
        }


def build_offload_setup(loaded: LoadedScenario, profile: Any) -> OffloadSetup | None:
    """The speculative / offloading set-up of a scenario, or None when it uses neither."""
    scenario = loaded.scenario
    spec = scenario.policies.speculative
    off = scenario.policies.offload
    draft_length = spec.draft_length if spec is not None else 0
    if spec is None and not off.active:
        return None
    src = loaded.source
    if off.attention.decode == "cpu" or off.attention.prefill == "cpu":
        require_host(loaded.host_profile, src, "policies.offload.attention")
    if off.cpu_experts:
        require_host(loaded.host_profile, src, "policies.offload.cpu_experts")
    if spec is not None and spec.draft_kv_gpu_fraction < 1.0:
        require_host(loaded.host_profile, src, "policies.speculative.draft_kv_gpu_fraction < 1 (draft attention over its host KV)")
    draft = draft_cost = None
    if spec is not None and draft_length > 0:
        draft = resolve_draft_model(spec, src)
        draft_profile = profile
        if spec.draft_placement == "cpu":
            draft_profile = require_host(loaded.host_profile, src, "policies.speculative.draft_placement: cpu")
        host_attention = None
        if spec.draft_kv_gpu_fraction < 1.0:
            host_attention = HostDraftAttention(draft, profile, loaded.host_profile,
                                                chunked=off.cpu_attention_kernel == "chunked")
        draft_cost = DraftCost(draft, draft_profile, host_attention, spec.draft_kv_gpu_fraction)
    budget = plan_offload_memory(loaded, draft, pipelined=off.active)
    rng = np.random.default_rng(np.random.SeedSequence(scenario.workload.seed).spawn(3)[2])
    run_lengths = None
    if spec is not None and isinstance(spec.acceptance, EmpiricalAcceptance):
        run_lengths = read_run_lengths(spec.acceptance, loaded.base_dir, src)
    return OffloadSetup(loaded=loaded, budget=budget, draft=draft, draft_cost=draft_cost, pipelined=off.active,
                        draft_length=draft_length, acceptance_rng=rng, run_lengths=run_lengths)


__all__ = ["OffloadMemoryBudget", "OffloadSetup", "build_offload_setup", "plan_offload_memory"]
