"""Typed scenario sections for the policies: scheduler, batching, preemption, expert cache, prefetch.

Each policy is named by ``name`` with its parameters (a discriminated union), so a later policy
adds one class here and one implementation beside it, and old scenarios stay valid."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sim.policies.offload_policy_specs import (
    AllNextLayerPrefetchSpec,
    EmoeCacheSpec,
    MoeInfinityCacheSpec,
    PreGatedPrefetchSpec,
    StaticHotCacheSpec,
)


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- scheduler


class FcfsSchedulerSpec(Spec):
    """First come, first served: the baseline of every serving engine."""

    name: Literal["fcfs"] = "fcfs"


class ShortestPromptFirstSpec(Spec):
    """Admit the waiting request with the shortest prompt first (ties by arrival)."""

    name: Literal["shortest_prompt_first"]


class ShortestPredictedJobFirstSpec(Spec):
    """Admit the request whose task is expected to generate the fewest tokens first (ties by arrival)."""

    name: Literal["shortest_predicted_job_first"]
    expected_output_tokens: dict[str, float] = Field(
        default_factory=dict, description="Profiled mean output tokens per task (the request's task name)."
    )
    default_output_tokens: float = Field(128.0, gt=0, description="Expected output tokens of a task not listed.")


class EmoeSloSchedulerSpec(Spec):
    """eMoE's task-aware SLO scheduler (Algorithm 1): admit in order of SLO deadline, and only when no
    running request within its SLO would miss it by the latency estimate
    t_i = dE + (W + n_i * G_i) * c + r_i."""

    name: Literal["emoe_slo"]
    expected_output_tokens: dict[str, float] = Field(
        default_factory=dict, description="Profiled mean output tokens per task (G_i starts here)."
    )
    default_output_tokens: float = Field(128.0, gt=0, description="Expected output tokens of a task not listed.")
    slo_s: dict[str, float] = Field(default_factory=dict, description="End-to-end latency SLO per task, seconds.")
    default_slo_s: float | None = Field(None, gt=0, description="SLO of a task not listed (none: no SLO).")
    expert_load_s: dict[str, float] = Field(
        default_factory=dict, description="dE: expert loading latency caused by admitting a request of this task."
    )
    default_expert_load_s: float | None = Field(
        None, ge=0, description="dE of a task not listed (none: from the profile, the task's sensitive layers x top_k loads)."
    )
    per_token_s: float | None = Field(
        None, ge=0, description="c: average expert compute + communication latency per token (none: from the profile)."
    )
    max_batch_tokens: int | None = Field(
        None, gt=0, description="Tmax: admit only while the batch's input tokens stay below this."
    )


SchedulerSpec = Annotated[
    FcfsSchedulerSpec | ShortestPromptFirstSpec | ShortestPredictedJobFirstSpec | EmoeSloSchedulerSpec,
    Field(discriminator="name"),
]


# ---------------------------------------------------------------- batching and preemption


class BatchingSpec(Spec):
    """Iteration-level (continuous) batching limits, as in vLLM/Orca."""

    max_num_seqs: int = Field(256, gt=0, description="Most sequences in one iteration.")
    max_batch_tokens: int = Field(8192, gt=0, description="Token budget of one iteration (prefill + decode).")
    chunked_prefill: bool = Field(True, description="Split long prompts over iterations (Sarathi/vLLM style).")
    kv_block_tokens: int = Field(16, gt=0, description="Tokens per paged KV-cache block.")
    queue_timeout_s: float | None = Field(
        None, gt=0, description="Drop a request still waiting for its first admission after this long."
    )


class PreemptionSpec(Spec):
    """What happens to a running request when the KV cache runs out."""

    mode: Literal["recompute", "swap"] = Field(
        "recompute", description="recompute: drop its KV and redo prefill later; swap: copy KV to host and back."
    )


# ---------------------------------------------------------------- expert cache


class AllResidentSpec(Spec):
    """Every routed expert stays in GPU memory: no loads (needs hardware.expert_memory to hold them all)."""

    name: Literal["all_resident"]


class LruCacheSpec(Spec):
    """On-demand loading; evict the least recently used expert."""

    name: Literal["lru"] = "lru"
    scope: Literal["global", "per_layer"] = Field(
        "global", description="One pool for all layers, or an equal share of slots per MoE layer."
    )


class LfuCacheSpec(Spec):
    """On-demand loading; evict the least frequently used expert (ties: least recently used)."""

    name: Literal["lfu"]
    scope: Literal["global", "per_layer"] = "global"


ExpertCacheSpec = Annotated[
    AllResidentSpec | LruCacheSpec | LfuCacheSpec | EmoeCacheSpec | StaticHotCacheSpec | MoeInfinityCacheSpec,
    Field(discriminator="name"),
]


# ---------------------------------------------------------------- prefetch


class NoPrefetchSpec(Spec):
    """Load an expert only when the gate has chosen it."""

    name: Literal["none"] = "none"


class NextLayerPrefetchSpec(Spec):
    """While layer l computes, load the experts predicted for layer l+1.

    ``oracle`` knows the routing (an upper bound on what prediction can give); ``frequency`` predicts
    the ``max_experts`` most often used experts of that layer so far."""

    name: Literal["next_layer"]
    predictor: Literal["oracle", "frequency"] = "oracle"
    max_experts: int | None = Field(None, gt=0, description="At most this many prefetches per layer.")


PrefetchSpec = Annotated[
    NoPrefetchSpec | NextLayerPrefetchSpec | PreGatedPrefetchSpec | AllNextLayerPrefetchSpec, Field(discriminator="name")
]
