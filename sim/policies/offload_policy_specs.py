"""Scenario sections of the expert-offloading policy family: eMoE, its predictor and task profiles,
and the alternatives it is compared with (static hot experts, MoE-Infinity, pre-gated, prefetch-all).

They join the ``expert_cache`` / ``prefetch`` unions of ``sim.policies.specs``; the engine side is
``sim.engine.offload_policies``. Defaults that come from a paper say so ([R] read in the paper, [I] our choice)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- tasks


class TaskProfileSpec(_Spec):
    """What eMoE profiles offline per task type: expected output length (W_o of Eq. 2, G_i of Eq. 3),
    an end-to-end SLO, and how many MoE layers, counted from the input side, are insensitive to
    inaccurate routing (s = 0 there: Eq. 2 loads no expert on the task's behalf)."""

    expected_output_tokens: float = Field(gt=0, description="Profiled mean output tokens of the task.")
    slo_s: float | None = Field(None, gt=0, description="End-to-end latency SLO of the task, seconds (none: no SLO).")
    insensitive_fraction: float = Field(
        0.0, ge=0, le=1,
        description="Fraction of MoE layers, from the input side, where the task is insensitive (s = 0).",
    )


# The paper's observations [R]: classification and similarity tolerate inaccurate routing everywhere,
# conversation and summarisation nowhere, QA in part. The numbers (output lengths, SLOs, QA's half)
# are [I]: the paper profiles them per deployment and does not print them. Override per scenario.
DEFAULT_TASK_PROFILES: dict[str, TaskProfileSpec] = {
    "classification": TaskProfileSpec(expected_output_tokens=8, slo_s=10.0, insensitive_fraction=1.0),
    "similarity": TaskProfileSpec(expected_output_tokens=8, slo_s=10.0, insensitive_fraction=1.0),
    "qa": TaskProfileSpec(expected_output_tokens=64, slo_s=60.0, insensitive_fraction=0.5),
    "conversation": TaskProfileSpec(expected_output_tokens=256, slo_s=300.0, insensitive_fraction=0.0),
    "summarization": TaskProfileSpec(expected_output_tokens=128, slo_s=180.0, insensitive_fraction=0.0),
}


# ---------------------------------------------------------------- eMoE's predictor


class PredictorModelSpec(_Spec):
    """The predictor network's size, from which its GPU memory (params x dtype bytes, taken from the
    expert memory) and its time per invocation (a GEMM of params/hidden x hidden over its input
    sequence of MoE layers x top_k expert ids, from the profile) are derived. Default: the paper's
    XLNet predictor, 0.108 B parameters [R], hidden 768 (XLNet-base)."""

    params: float = Field(1.08e8, gt=0, description="Parameters of the predictor network.")
    hidden: int = Field(768, gt=0, description="Hidden size (the GEMM's input width).")
    dtype: str = Field("bf16", description="Dtype of its weights.")


class ParametricPredictorSpec(_Spec):
    """Oracle plus noise: the routing of the iteration that schedules the prompt, with each selected
    expert swapped for a wrong one with probability 1 - accuracy. Default accuracy: the paper's XLNet
    predictor on Mixtral, 0.71 [R, Table 2]."""

    kind: Literal["parametric"] = "parametric"
    accuracy: float = Field(0.71, ge=0, le=1)
    model: PredictorModelSpec = Field(default_factory=PredictorModelSpec)


class LearnedPredictorSpec(_Spec):
    """Frequency and transition statistics per task (``sim.policies.emoe.TransitionPredictor``),
    trained on the first ``train_fraction`` of a routing trace and measured on the rest (its top-k
    precision/recall go into the run summary). Trace: ``trace`` (Parquet or JSONL of the scenario's
    model), else sequences drawn from the scenario's routing generator with its own seed."""

    kind: Literal["learned"]
    variant: Literal["A", "L"] = Field("A", description="eMoE-A (all layers from the previous prompt) or eMoE-L.")
    trace: str | None = Field(None, description="Routing trace to train on, relative to the scenario's folder.")
    train_fraction: float = Field(0.8, gt=0, lt=1, description="Share of the trace's tokens used for training [R].")
    generated_sequences: int = Field(48, gt=1, description="Sequences drawn from the routing generator (no trace).")
    generated_tokens: int = Field(32, gt=1, description="Tokens per drawn sequence.")
    model: PredictorModelSpec = Field(default_factory=PredictorModelSpec)


PredictorSpec = Annotated[ParametricPredictorSpec | LearnedPredictorSpec, Field(discriminator="kind")]

MissMode = Literal["reroute", "fetch"]
_MISS = ("reroute: a token whose expert is not resident goes to a resident expert of the layer (no load; "
         "counts against routing fidelity); fetch: load it on demand through a staging buffer.")


# ---------------------------------------------------------------- residency policies (expert_cache)


class EmoeCacheSpec(_Spec):
    """eMoE (arXiv 2503.06823): experts resident = top-L per layer by Eq. 2's expected token load of the
    running requests' tasks; predictor invoked every ``period`` prompts, the first prompts (until the
    first invocation) run with every expert served (fetched on demand); loads go layer by layer on
    the copy engine, overlapped with non-expert compute."""

    name: Literal["emoe"]
    period: int = Field(40, ge=1, description="Prompts between predictor invocations [R: 40].")
    predictor: PredictorSpec = Field(default_factory=ParametricPredictorSpec)
    miss: MissMode = Field("reroute", description=_MISS + " The paper reroutes [R].")
    task_aware: bool = Field(True, description="Use the tasks' sensitivity (false: every layer sensitive).")


class StaticHotCacheSpec(_Spec):
    """Fiddler-style static hot experts: the most popular experts of each layer, measured on a profiling
    sample of the routing, pinned for the whole run."""

    name: Literal["static_hot"]
    profile_tokens: int = Field(2048, gt=0, description="Tokens drawn from the routing to rank popularity.")
    miss: MissMode = Field("fetch", description=_MISS)


class MoeInfinityCacheSpec(_Spec):
    """MoE-Infinity-style activation-aware prefetch and caching: the iteration's partial expert
    activation matrix (layers so far x experts) is matched (cosine) against a collection of past ones;
    the best match's next layer is prefetched in order of its activation ratio, and the cache evicts
    the expert with the lowest activation ratio over the collection (shallower layers kept on ties)."""

    name: Literal["moe_infinity"]
    collection_size: int = Field(64, gt=0, description="Past activation matrices kept (FIFO).")
    miss: MissMode = Field("fetch", description=_MISS)


# ---------------------------------------------------------------- prefetch policies


class PreGatedPrefetchSpec(_Spec):
    """Pre-gated MoE (ISCA 2024): the gate of layer l also selects layer l+1's experts, which are loaded
    while layer l runs; the first MoE layer loads on demand. A misprediction is not corrected: the
    pre-selected expert serves the token (routing fidelity = accuracy)."""

    name: Literal["pre_gated"]
    accuracy: float = Field(1.0, ge=0, le=1, description="Share of assignments the pre-gate gets right.")


class AllNextLayerPrefetchSpec(_Spec):
    """Prefetch every expert of layer l+1 while layer l runs (MoE-Prefetch / SE-MoE style)."""

    name: Literal["all_next_layer"]
