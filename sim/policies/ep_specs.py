"""Typed scenario sections for expert parallelism: the parallel layout, the link topology, and the
expert-parallel policies (placement, capacity-aware drop/reroute, overlap, degraded devices).

``hardware.parallelism`` and ``hardware.topology`` say how the GPUs are grouped and wired;
``policies.expert_parallel`` says what is decided inside one expert-parallel group. Every key has a
default, so a scenario without them is the single-GPU data-parallel engine it always was."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- hardware


class ParallelismSpec(Spec):
    """How ``hardware.num_gpus`` are split: ``dp`` replicas, each an expert-parallel group of
    ``ep`` ranks of ``tp`` GPUs (num_gpus = dp x ep x tp). A request is served by one replica.

    Inside a replica the sequences are spread over the ``ep`` ranks (data-parallel attention: a
    sequence's tokens and KV live on one rank), attention and dense parts are tensor-parallel over
    the ``tp`` GPUs of a rank (all-reduce after each), and the routed experts are spread over the
    ``ep`` ranks (each expert's FFN split ``tp`` ways inside its rank)."""

    ep: int = Field(1, ge=1, description="Expert-parallel degree: ranks the routed experts are spread over.")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree of each rank (attention, dense, expert FFN slices).")
    dp: int | None = Field(None, ge=1, description="Data-parallel replicas; default num_gpus / (ep x tp).")


class TopologySpec(Spec):
    """The links between GPUs. Intra-node: ``nvlink`` (an NVSwitch: every GPU has its own port of the
    profile's gpu_to_gpu bandwidth each way) or ``pcie`` (each GPU's x16 port, and all GPU-to-GPU
    traffic of a node crosses one shared host bridge). Inter-node: one NIC per GPU. Bandwidths not
    given come from the profile's links (GB/s = 1e9 bytes/s)."""

    intra_node: Literal["nvlink", "pcie"] = Field("nvlink", description="NVLink/NVSwitch, or PCIe with a shared host bridge.")
    pcie_gbps: float | None = Field(None, gt=0, description="Per-GPU PCIe port; default the profile's host_to_device.")
    host_bridge_gbps: float | None = Field(
        None, gt=0, description="Shared host bridge (root complex) of a node, PCIe only; default = pcie_gbps (one shared root)."
    )
    nic_gbps: float | None = Field(None, gt=0, description="Per-GPU network bandwidth; default the profile's node_to_node.")
    nic_latency_s: float | None = Field(None, ge=0, description="Network latency; default the profile's node_to_node.")
    collective_model: Literal["auto", "measured", "link"] = Field(
        "auto", description="Cost of all-to-all / all-reduce: measured = the profile's NCCL table for that kind and "
        "GPU count (one NVLink node only); link = link bandwidth and latency; auto = measured where the profile "
        "has the table, else link."
    )


# ---------------------------------------------------------------- policies


class PlacementSpec(Spec):
    """Which rank holds which expert, per MoE layer.

    contiguous: experts [0, E/ep) on rank 0, ...; round_robin: expert e on rank e mod ep;
    load_balanced: greedy longest-processing-time over the experts' loads seen so far (uniform before
    any); ``redundant_experts`` extra copies per layer of the hottest experts (EPLB-style), each on the
    least-loaded rank without a copy; a replicated expert's tokens are split evenly over its copies."""

    name: Literal["contiguous", "round_robin", "load_balanced"] = "contiguous"
    redundant_experts: int = Field(0, ge=0, description="Extra expert copies per MoE layer (hot experts replicated).")
    recompute_every_iterations: int | None = Field(
        None, gt=0, description="Recompute a load_balanced/redundant placement from the loads seen so far every N iterations."
    )


class NoCapacitySpec(Spec):
    """No capacity limit: every token-expert pair is computed."""

    name: Literal["none"] = "none"


class TokenDropSpec(Spec):
    """Capacity-Aware Inference, Token Drop: on each rank, each expert keeps at most
    capacity = ceil(gamma x top_k x local tokens / num_experts) of the rank's tokens (the highest
    scores), the rest are dropped before the all-to-all."""

    name: Literal["drop"]
    gamma: float = Field(gt=0, description="Capacity factor.")


class TokenRerouteSpec(Spec):
    """Multi-round reroute (the v1 'Token Reroute'): a dropped pair moves to the token's next-best
    expert not yet chosen, which may overflow and drop again; after ``rounds`` rounds the overflow
    is dropped. Needs per-token gate scores (generated uniform/zipf routing)."""

    name: Literal["reroute"]
    gamma: float = Field(gt=0)
    rounds: int = Field(2, ge=1, le=8)


class ExpandedDropSpec(Spec):
    """Expanded Drop: each token's candidates are its top-k plus every expert on its own rank; per
    expert the ``capacity`` highest scores are kept (local additions cost no communication). Needs
    per-token gate scores."""

    name: Literal["expanded_drop"]
    gamma: float = Field(gt=0)


class ThresholdDropSpec(Spec):
    """DualSparse-MoE 1T-drop: drop a pair whose top-k-renormalised score is below the threshold; with
    ``load_aware`` the threshold of a rank with load ratio rho < 1 is threshold x rho. Needs scores."""

    name: Literal["threshold"]
    threshold: float = Field(gt=0, lt=1, description="T_max on the renormalised top-k score.")
    load_aware: bool = True


CapacitySpec = Annotated[
    NoCapacitySpec | TokenDropSpec | TokenRerouteSpec | ExpandedDropSpec | ThresholdDropSpec, Field(discriminator="name")
]


class NoOverlapSpec(Spec):
    """Dispatch, experts and combine run one after the other."""

    name: Literal["none"] = "none"


class TwoMicrobatchSpec(Spec):
    """Split each iteration's sequences into two micro-batches whose communication overlaps the other's compute."""

    name: Literal["two_microbatch"]


class ScmoeSpec(Spec):
    """ScMoE shortcut schedule: the routed experts of layer l read an earlier representation, so their
    gate and dispatch start early: position 1 = layer l's input, 2 = layer l-1 after attention,
    3 = layer l-1's input. Combine must finish before the layer's output is used."""

    name: Literal["scmoe"]
    position: Literal[1, 2, 3] = 2


OverlapSpec = Annotated[NoOverlapSpec | TwoMicrobatchSpec | ScmoeSpec, Field(discriminator="name")]


class ExpertParallelSpec(Spec):
    """Decisions inside one expert-parallel group (used when a replica spans several GPUs)."""

    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    capacity: CapacitySpec = Field(default_factory=NoCapacitySpec)
    overlap: OverlapSpec = Field(default_factory=NoOverlapSpec)
    activation_dtype: str = Field("bf16", description="Dtype of the hidden states sent by all-to-all and all-reduce.")
    degraded_ranks: dict[int, float] = Field(
        default_factory=dict, description="What-if: rank -> slowdown factor of its compute (e.g. {3: 1.5})."
    )
