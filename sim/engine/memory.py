"""GPU memory of one replica: weights, expert slots, the paged KV cache and a reserve.

The split is fixed at start-up, as serving engines do: what is left after the non-expert weights,
the expert slots and the reserve becomes KV-cache blocks. A split that leaves no room for the KV
of even one request is a ``CapacityError`` raised before any simulation."""

from __future__ import annotations

from dataclasses import dataclass

from sim.engine.offload_policies import reserved_expert_memory_bytes
from sim.errors import CapacityError
from sim.scenario import LoadedScenario, expert_memory_bytes, gpu_memory_bytes


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Bytes per GPU by kind, and the KV cache in blocks."""

    gpu_bytes: float
    non_expert_bytes: float
    expert_slots: int
    expert_slot_bytes: float
    reserve_bytes: float
    kv_block_tokens: int
    kv_block_bytes: float
    kv_blocks: int

    @property
    def expert_bytes(self) -> float:
        return self.expert_slots * self.expert_slot_bytes

    @property
    def kv_bytes(self) -> float:
        return self.kv_blocks * self.kv_block_bytes

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.kv_block_tokens)


def plan_memory(loaded: LoadedScenario) -> MemoryBudget:
    """Split one GPU's memory; name what does not fit and by how much."""
    model = loaded.model
    scenario = loaded.scenario
    gpu = gpu_memory_bytes(loaded)
    total_experts = model.num_moe_layers * model.num_experts
    if scenario.policies.expert_cache.name == "all_resident":
        slots = total_experts
    else:
        # eMoE's predictor network lives in the expert memory (sim.engine.offload_policies).
        usable = expert_memory_bytes(loaded) - reserved_expert_memory_bytes(scenario.policies)
        slots = min(total_experts, int(max(usable, 0.0) // model.expert_bytes))
    expert_bytes = slots * model.expert_bytes
    reserve = scenario.hardware.reserve_fraction * gpu
    non_expert = float(model.non_expert_weight_bytes)
    block_tokens = scenario.policies.batching.kv_block_tokens
    block_bytes = block_tokens * model.kv_bytes_per_token
    free = gpu - non_expert - expert_bytes - reserve
    where = f"{loaded.source}: hardware"
    if free <= 0:
        raise CapacityError(
            f"{where}: {model.name} does not fit on {gpu / 1e9:.1f} GB: non-expert weights "
            f"{non_expert / 1e9:.1f} GB + expert slots {expert_bytes / 1e9:.1f} GB ({slots} experts) + reserve "
            f"{reserve / 1e9:.1f} GB leave {free / 1e9:.1f} GB for the KV cache; lower hardware.expert_memory "
            f"or use a GPU with more memory"
        )
    blocks = int(free // block_bytes)
    if blocks < 1:
        raise CapacityError(f"{where}: {free / 1e6:.1f} MB left for the KV cache holds no block of {block_bytes / 1e6:.1f} MB")
    if slots < 1:
        predictor = reserved_expert_memory_bytes(scenario.policies)
        after = f" after the eMoE predictor's {predictor / 1e9:.3f} GB" if predictor else ""
        raise CapacityError(f"{where}: expert memory holds no expert of {model.expert_bytes / 1e9:.2f} GB{after}")
    return MemoryBudget(
        gpu_bytes=gpu,
        non_expert_bytes=non_expert,
        expert_slots=slots,
        expert_slot_bytes=float(model.expert_bytes),
        reserve_bytes=reserve,
        kv_block_tokens=block_tokens,
        kv_block_bytes=block_bytes,
        kv_blocks=blocks,
    )


def max_request_tokens(budget: MemoryBudget) -> int:
    """Longest prompt + output that the KV cache can hold at once."""
    return budget.kv_blocks * budget.kv_block_tokens


__all__ = ["MemoryBudget", "plan_memory", "max_request_tokens"]
