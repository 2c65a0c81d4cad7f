"""Scenario sections for speculative decoding and CPU offloading (SpecMoEOff, MoE-Lightning, Fiddler).

``policies.speculative``: a draft model proposes ``draft_length`` tokens per decoding sequence, the
target verifies them (and one more) in one pass; acceptance is modelled per token.
``policies.offload``: where attention runs per phase (GPU or host CPU), whether experts may run on the
CPU (Fiddler), how many micro-batches pipeline CPU and GPU work (MoE-Lightning), and whether all
non-resident experts stream every iteration (large-batch) or only the routed ones are fetched.
``tune``: the search space of ``moesim tune``.

Defaults leave the plain engine unchanged: no speculation, everything on the GPU."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim.spec import ModelSpec


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- acceptance


class FixedAcceptance(Spec):
    """Each drafted token is accepted with probability ``rate`` if every earlier one was."""

    kind: Literal["fixed"] = "fixed"
    rate: float = Field(ge=0, le=1, description="Per-token acceptance probability.")


class PerTaskAcceptance(Spec):
    """A per-token acceptance rate per request task (the workload's task labels)."""

    kind: Literal["per_task"]
    rates: dict[str, float] = Field(description="Task name -> per-token acceptance probability.")
    default_rate: float = Field(ge=0, le=1, description="Rate of a request whose task is not listed (or has none).")

    @model_validator(mode="after")
    def _rates_are_probabilities(self) -> "PerTaskAcceptance":
        bad = {k: v for k, v in self.rates.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"rates must lie in [0, 1]; got {bad}")
        return self


class EmpiricalAcceptance(Spec):
    """Accepted run lengths observed with a long draft (e.g. profiled on a dataset): each verification
    draws one length from them (seeded) and accepts ``min(length, k)`` drafted tokens. Give the lengths
    inline (``run_lengths``) or as a text file with one whole number per line (``path``, relative to the
    scenario file)."""

    kind: Literal["empirical"]
    run_lengths: list[int] | None = Field(None, min_length=1, description="Observed numbers of consecutively accepted draft tokens.")
    path: str | None = Field(None, description="Text file of run lengths, one per line ('#' starts a comment).")

    @model_validator(mode="after")
    def _one_source(self) -> "EmpiricalAcceptance":
        if (self.run_lengths is None) == (self.path is None):
            raise ValueError("give exactly one of 'run_lengths' or 'path'")
        if self.run_lengths is not None and min(self.run_lengths) < 0:
            raise ValueError("run_lengths must be >= 0")
        return self


AcceptanceSpec = Annotated[FixedAcceptance | PerTaskAcceptance | EmpiricalAcceptance, Field(discriminator="kind")]


# ---------------------------------------------------------------- speculative decoding


class DraftModel(Spec):
    """The draft model: a catalog name or an inline spec (a dense draft is a spec with one expert, top-1)."""

    name: str | None = Field(None, description="Catalog model name (see `moesim models`).")
    spec: ModelSpec | None = Field(None, description="Inline model spec, same fields as the catalog.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "DraftModel":
        if (self.name is None) == (self.spec is None):
            raise ValueError("give exactly one of 'name' (a catalog model) or 'spec' (an inline spec)")
        return self


class SpeculativeSpec(Spec):
    """Draft-then-verify decoding. ``draft_length: 0`` is plain decoding (and simulates exactly like it)."""

    draft_model: DraftModel = Field(description="The model that drafts tokens.")
    draft_length: int = Field(ge=0, le=64, description="k: tokens drafted per sequence per step.")
    draft_placement: Literal["gpu", "cpu"] = Field(
        "gpu", description="Where the draft model runs (and where its weights and KV cache live).")
    acceptance: AcceptanceSpec = Field(description="How many drafted tokens the target accepts.")
    draft_kv_gpu_fraction: float = Field(
        1.0, ge=0, le=1,
        description="Fraction of the draft model's KV cache held in GPU memory (draft_placement: gpu); the rest lives "
                    "in host memory and the draft's attention over it runs on the CPU (hardware.host_profile), as in "
                    "SpecMoEOff's batch-wise split. 1.0: all on the GPU.")

    @model_validator(mode="after")
    def _split_needs_gpu_draft(self) -> "SpeculativeSpec":
        if self.draft_kv_gpu_fraction < 1 and self.draft_placement != "gpu":
            raise ValueError("draft_kv_gpu_fraction < 1 needs draft_placement: gpu (a CPU draft keeps all its KV on the host)")
        return self


# ---------------------------------------------------------------- offloading


class AttentionPlacement(Spec):
    """Where the attention core runs, per phase. CPU decode attention keeps the KV cache in host memory."""

    prefill: Literal["gpu", "cpu"] = "gpu"
    decode: Literal["gpu", "cpu"] = "gpu"

    @model_validator(mode="after")
    def _kv_has_one_home(self) -> "AttentionPlacement":
        if self.prefill == "cpu" and self.decode == "gpu":
            raise ValueError("prefill on cpu with decode on gpu is not supported: the KV cache lives where decode attention runs")
        return self


class OffloadSpec(Spec):
    """CPU-GPU offloading: attention placement, CPU experts, micro-batch pipelining, weight streaming.

    Any non-default value switches the replica to the pipelined planner (``sim.engine.host_compute``)."""

    attention: AttentionPlacement = Field(default_factory=AttentionPlacement)
    cpu_experts: bool = Field(
        False, description="Fiddler: a non-resident expert may run on the CPU (activations cross PCIe) "
                           "when the profiles say that is faster than fetching it.")
    micro_batches: int = Field(1, ge=1, le=16, description="Micro-batches that pipeline CPU and GPU work per layer.")
    cpu_attention_kernel: Literal["chunked", "decode"] = Field(
        "chunked", description="CPU decode attention: 'chunked' times each sequence's queries (1, or k+1 when verifying) "
                               "as one multi-query chunk over its cached prefix with the host profile's attention_prefill "
                               "model (SpecMoEOff's GEMM-based kernel); 'decode' uses attention_decode for single queries.")
    stream_experts: Literal["routed", "all"] = Field(
        "routed", description="Load only the experts the routing chose, or every non-resident expert of each "
                              "layer every iteration (the large-batch regime of MoE-Lightning/SpecMoEOff).")

    @property
    def active(self) -> bool:
        return (self.attention.prefill != "gpu" or self.attention.decode != "gpu" or self.cpu_experts
                or self.micro_batches > 1 or self.stream_experts != "routed")


# ---------------------------------------------------------------- tuning


STRATEGIES = ("offload", "moe_lightning", "fiddler", "specmoeoff")


class TuneSpec(Spec):
    """What ``moesim tune`` searches. Strategies fix the placements: ``offload`` (everything on the GPU, experts
    fetched on demand through the expert cache), ``moe_lightning`` (CPU decode attention, KV in host memory,
    every expert streamed, micro-batches), ``fiddler`` (GPU attention, non-resident experts on the CPU when
    faster), ``specmoeoff`` (moe_lightning plus speculative decoding over ``draft_lengths``). Every combination
    is estimated by the roofline (``sim.roofline``); the best ones are simulated."""

    strategies: list[Literal["offload", "moe_lightning", "fiddler", "specmoeoff"]] = Field(
        default_factory=lambda: list(STRATEGIES), min_length=1)
    draft_lengths: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 6, 8], description="k values of specmoeoff.")
    batch_sizes: list[int] = Field(default_factory=lambda: [16, 64], description="policies.batching.max_num_seqs values.")
    micro_batches: list[int] = Field(default_factory=lambda: [1, 2], description="micro-batches of the pipelined strategies.")
    simulate_top: int = Field(6, ge=1, description="Besides the best estimate per strategy and k, simulate this many more.")
    keep_estimate_ratio: float = Field(
        0.5, gt=0, le=1, description="Do not simulate an extra configuration estimated below this fraction of the best.")
    max_requests: int = Field(64, gt=0, description="Requests simulated per configuration (at least the batch size).")
