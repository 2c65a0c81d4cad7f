"""An iteration as a flow shop over several in-order resources (GPU stream, copy engine, CPU, activation links).

The plain planner's iteration (``sim.engine.iteration``) has two resources: the compute stream and the
copy engine. Offloading adds more: the host CPU runs attention (MoE-Lightning, SpecMoEOff) or experts
(Fiddler), and activations cross PCIe in both directions on their own streams. Each resource runs its ops
one at a time in the order they were added (as a CUDA stream or a single CPU worker does); an op starts
when its resource is free and every op it depends on has ended. Pipelining across micro-batches is not
assumed anywhere: it emerges from these dependencies.

``time_flow`` computes the timeline exactly in one pass (ops are added in an order where each op's
dependencies come before it); ``sim.engine.flowshop_reference`` runs the same plan as SimPy processes,
and tests check both agree."""

from __future__ import annotations

from dataclasses import dataclass, field

# Resource indices used by the offloading planner; the timer itself accepts any small integers.
GPU, COPY, CPU, ACT_H2D, ACT_D2H = 0, 1, 2, 3, 4
RESOURCE_NAMES = ("gpu", "copy", "cpu", "act_h2d", "act_d2h")


@dataclass(slots=True)
class FlowPlan:
    """Ops in program order: ``op_resource[i]`` runs op i for ``op_s[i]`` seconds after ``op_deps[i]`` end.

    ``start_offset_s`` holds every resource busy at the start (e.g. a KV swap)."""

    num_resources: int = len(RESOURCE_NAMES)
    op_s: list[float] = field(default_factory=list)
    op_resource: list[int] = field(default_factory=list)
    op_deps: list[tuple[int, ...]] = field(default_factory=list)
    op_kind: list[str] = field(default_factory=list)
    start_offset_s: float = 0.0

    def add(self, seconds: float, resource: int, kind: str, deps: tuple[int, ...] = ()) -> int:
        """Append an op; its dependencies must already be in the plan."""
        index = len(self.op_s)
        if any(d < 0 or d >= index for d in deps):
            raise ValueError(f"op {index} ({kind}) depends on {deps}: dependencies must be earlier ops")
        if not 0 <= resource < self.num_resources:
            raise ValueError(f"op {index} ({kind}): resource {resource} outside 0..{self.num_resources - 1}")
        self.op_s.append(float(seconds))
        self.op_resource.append(resource)
        self.op_deps.append(tuple(deps))
        self.op_kind.append(kind)
        return index


@dataclass(frozen=True, slots=True)
class FlowTiming:
    """When the iteration ended, how long each resource was busy, and the seconds of each op kind."""

    duration_s: float
    busy_s: tuple[float, ...]
    kind_s: dict[str, float]


def time_flow(plan: FlowPlan) -> FlowTiming:
    """The exact timeline: each op starts when its resource is free and its dependencies have ended."""
    free = [plan.start_offset_s] * plan.num_resources
    busy = [0.0] * plan.num_resources
    end = [0.0] * len(plan.op_s)
    kind_s: dict[str, float] = {}
    finish = plan.start_offset_s
    for i, (seconds, res, deps, kind) in enumerate(zip(plan.op_s, plan.op_resource, plan.op_deps, plan.op_kind)):
        start = free[res]
        for d in deps:
            if end[d] > start:
                start = end[d]
        t = start + seconds
        end[i] = t
        free[res] = t
        busy[res] += seconds
        kind_s[kind] = kind_s.get(kind, 0.0) + seconds
        if t > finish:
            finish = t
    return FlowTiming(finish, tuple(busy), kind_s)


__all__ = ["FlowPlan", "FlowTiming", "time_flow", "GPU", "COPY", "CPU", "ACT_H2D", "ACT_D2H", "RESOURCE_NAMES"]
