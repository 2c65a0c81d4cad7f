"""The ``faults:`` section of a scenario and the fault schedule it expands to.

A fault hits one GPU (or every GPU of a node) at a time and either ends after ``duration_s`` or
stays until the end of the run:

* ``gpu_fail``     the GPU stops serving; its requests are re-queued or failed (``in_flight``),
                   and when the fault ends it restores its weights (``recovery``) before serving again;
* ``node_fail``    every GPU of the node fails at once;
* ``gpu_slow``     the GPU's compute ops take ``factor`` times longer (thermal throttling, a noisy neighbour);
* ``link_degrade`` the GPU's host-to-device link keeps ``bandwidth_fraction`` of its bandwidth
                   (expert loads and KV swap-ins slow down).

Faults come from a list at given times (``events``) or are drawn (``random``): per GPU (per node
for ``node_fail``), times between failures and repair durations are exponential with the given
means (MTBF, MTTR), from the section's own seed, so changing the faults never changes the arrivals.
``expand_schedule`` is pure: the same section, GPU count and horizon always give the same list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim.errors import ScenarioError


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Timed(Spec):
    at_s: float = Field(ge=0, description="Simulated time the fault starts, seconds.")
    duration_s: float | None = Field(None, gt=0, description="How long it lasts; none: until the end of the run.")


class GpuFailSpec(_Timed):
    """One GPU (replica) stops serving."""

    kind: Literal["gpu_fail"]
    gpu: int = Field(ge=0, description="GPU index, 0 .. hardware.num_gpus - 1.")


class NodeFailSpec(_Timed):
    """Every GPU of one node stops serving (GPUs are numbered node by node)."""

    kind: Literal["node_fail"]
    node: int = Field(ge=0, description="Node index, 0 .. hardware.num_nodes - 1.")


class GpuSlowSpec(_Timed):
    """One GPU computes ``factor`` times slower."""

    kind: Literal["gpu_slow"]
    gpu: int = Field(ge=0)
    factor: float = Field(ge=1, description="Compute-time multiplier (2: every compute op takes twice as long).")


class LinkDegradeSpec(_Timed):
    """The host-to-device link of one GPU (or of every GPU) loses bandwidth."""

    kind: Literal["link_degrade"]
    gpu: int | None = Field(None, ge=0, description="GPU index; none: every GPU.")
    link: Literal["host_to_device"] = "host_to_device"
    bandwidth_fraction: float = Field(gt=0, le=1, description="Fraction of the link's bandwidth that remains.")


FaultEventSpec = Annotated[GpuFailSpec | NodeFailSpec | GpuSlowSpec | LinkDegradeSpec, Field(discriminator="kind")]


class RandomFaultsSpec(Spec):
    """Faults drawn per GPU (per node for node_fail): exponential times between failures (mean
    ``mtbf_s``) and repair durations (mean ``mttr_s``; none: the first failure stays)."""

    kind: Literal["gpu_fail", "node_fail", "gpu_slow", "link_degrade"]
    mtbf_s: float = Field(gt=0, description="Mean time between failures of one GPU (node), seconds.")
    mttr_s: float | None = Field(None, gt=0, description="Mean time to repair, seconds; none: never repaired.")
    factor: float = Field(2.0, ge=1, description="gpu_slow: compute-time multiplier.")
    bandwidth_fraction: float = Field(0.25, gt=0, le=1, description="link_degrade: bandwidth that remains.")
    horizon_s: float | None = Field(None, gt=0, description="Draw faults until then; default: the last arrival.")
    seed: int = Field(0, ge=0, description="Seed of these draws (independent of the workload's seed).")


class RecoverySpec(Spec):
    """Where a recovered GPU restores its weights and experts from, before serving again."""

    source: Literal["host", "peer", "storage"] = Field(
        "host", description="host: host memory over PCIe; peer: a live GPU over gpu_to_gpu (node_to_node across "
        "nodes; host when none is alive); storage: checkpoint storage at storage_gbps."
    )
    storage_gbps: float | None = Field(None, gt=0, description="Read bandwidth of checkpoint storage per GPU, GB/s.")
    storage_latency_s: float = Field(0.0, ge=0, description="Fixed cost of one restore from storage, seconds.")

    @model_validator(mode="after")
    def _storage_needs_bandwidth(self) -> "RecoverySpec":
        if self.source == "storage" and self.storage_gbps is None:
            raise ValueError("source 'storage' needs storage_gbps (the checkpoint storage's read bandwidth)")
        return self


class FaultsSpec(Spec):
    """Fault schedule and how serving reacts to it."""

    events: list[FaultEventSpec] = Field(default_factory=list, description="Faults at given times.")
    random: list[RandomFaultsSpec] = Field(default_factory=list, description="Faults drawn from MTBF/MTTR.")
    in_flight: Literal["requeue", "fail"] = Field(
        "requeue", description="Requests on a failed GPU: re-queued on the others (KV lost, prefill redone), "
        "or failed with reason gpu_failed."
    )
    no_replica: Literal["wait", "reject"] = Field(
        "wait", description="Arrivals while no GPU is serving: wait for one to recover, or be rejected."
    )
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    spare_gpus: int = Field(
        0, ge=0, description="Idle GPUs of the same profile kept as spares (they are paid for). A failed GPU's place "
        "is taken at once by a free spare, which restores its weights / shard from recovery.source and serves; the "
        "failed GPU, once repaired, joins the spare pool. 0: a failed GPU restores itself after its repair."
    )
    expert_failover: Literal["reroute", "spread", "wait"] = Field(
        "reroute", description="Expert parallelism: tokens routed to a failed rank's experts go to the layer's most "
        "requested available expert (reroute), are spread over the available experts (spread), or their "
        "iteration waits for the restore (wait)."
    )
    timeline_window_s: float | None = Field(
        None, gt=0, description="Window of the latency/SLO timeline; default: 1/50 of the run."
    )

    @property
    def active(self) -> bool:
        return bool(self.events or self.random)


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault on one GPU: ``kind`` is fail, slow or link; ``value`` is the factor or bandwidth fraction."""

    at_s: float
    gpu: int
    kind: str  # "fail" | "slow" | "link"
    value: float
    duration_s: float | None
    origin: str  # "events[i]" or "random[i]", for messages and the report


def check_faults(faults: FaultsSpec, num_gpus: int, num_nodes: int, source: str) -> None:
    """GPU and node indices must exist: one-line error naming the key path."""
    for i, event in enumerate(faults.events):
        if getattr(event, "gpu", None) is not None and event.gpu >= num_gpus:
            raise ScenarioError(
                f"{source}: faults.events[{i}].gpu: GPU {event.gpu} does not exist: hardware.num_gpus is "
                f"{num_gpus} (GPUs 0..{num_gpus - 1})"
            )
        if isinstance(event, NodeFailSpec) and event.node >= num_nodes:
            raise ScenarioError(
                f"{source}: faults.events[{i}].node: node {event.node} does not exist: hardware.num_nodes is "
                f"{num_nodes} (nodes 0..{num_nodes - 1})"
            )


def gpus_of_node(node: int, num_gpus: int, num_nodes: int) -> list[int]:
    per_node = num_gpus // num_nodes
    return list(range(node * per_node, (node + 1) * per_node))


def node_of_gpu(gpu: int, num_gpus: int, num_nodes: int) -> int:
    return gpu // (num_gpus // num_nodes)


_KIND = {"gpu_fail": "fail", "node_fail": "fail", "gpu_slow": "slow", "link_degrade": "link"}


def expand_schedule(faults: FaultsSpec, num_gpus: int, num_nodes: int, horizon_s: float) -> list[Fault]:
    """Every fault per GPU, sorted by start time (ties: the order written, then GPU)."""
    out: list[tuple[float, int, int, Fault]] = []
    for i, event in enumerate(faults.events):
        origin = f"events[{i}]"
        kind = _KIND[event.kind]
        if isinstance(event, NodeFailSpec):
            gpus = gpus_of_node(event.node, num_gpus, num_nodes)
        elif isinstance(event, LinkDegradeSpec) and event.gpu is None:
            gpus = list(range(num_gpus))
        else:
            gpus = [event.gpu]  # type: ignore[list-item]
        value = getattr(event, "factor", None) or getattr(event, "bandwidth_fraction", None) or 1.0
        for gpu in gpus:
            out.append((event.at_s, len(out), gpu, Fault(event.at_s, gpu, kind, float(value), event.duration_s, origin)))
    for i, rnd in enumerate(faults.random):
        origin = f"random[{i}]"
        kind = _KIND[rnd.kind]
        value = {"fail": 1.0, "slow": rnd.factor, "link": rnd.bandwidth_fraction}[kind]
        units = num_nodes if rnd.kind == "node_fail" else num_gpus
        until = rnd.horizon_s if rnd.horizon_s is not None else horizon_s
        for unit, seq in enumerate(np.random.SeedSequence(rnd.seed).spawn(units)):
            gpus = gpus_of_node(unit, num_gpus, num_nodes) if rnd.kind == "node_fail" else [unit]
            for at_s, duration_s in draw_failures(np.random.default_rng(seq), rnd.mtbf_s, rnd.mttr_s, until):
                for gpu in gpus:
                    out.append((at_s, len(out), gpu, Fault(at_s, gpu, kind, float(value), duration_s, origin)))
    out.sort(key=lambda t: (t[0], t[1]))
    return [f for *_, f in out]


def draw_failures(
    rng: np.random.Generator, mtbf_s: float, mttr_s: float | None, horizon_s: float
) -> list[tuple[float, float | None]]:
    """(start, duration) of one unit's failures before ``horizon_s``: up time ~ Exp(mtbf), repair ~ Exp(mttr)."""
    out: list[tuple[float, float | None]] = []
    t = 0.0
    while True:
        t += float(rng.exponential(mtbf_s))
        if t >= horizon_s:
            return out
        if mttr_s is None:
            out.append((t, None))
            return out
        duration = float(rng.exponential(mttr_s))
        out.append((t, duration))
        t += duration


__all__ = ["FaultsSpec", "Fault", "check_faults", "expand_schedule", "draw_failures"]
