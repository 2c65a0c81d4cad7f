"""A slow, obviously correct timing of an iteration plan: one SimPy process per operation.

``sim.engine.iteration.time_plan`` computes an iteration's timeline with a tight recurrence, because
one SimPy event per expert per layer is too slow for hours of traffic (DESIGN.md, "Speed: where
events are spent"). A recurrence is easy to get subtly wrong, so this module times the same
``IterationPlan`` the plain way, with nothing clever in it, and tests check that both agree:

* the compute stream and the copy engine (host->device link) are ``simpy.Resource(capacity=1)``;
* a *swap* process holds both for ``start_offset_s`` before anything else runs (a KV swap-out or
  swap-in at the iteration start keeps the GPU busy);
* one process per load: it waits until the op named by ``load_issue_after`` ends (or for the
  iteration start when that is -1), then queues for the copy engine, first come first served;
* one process per compute op, in stream order: op i waits for op i-1 to end, takes the stream,
  waits (holding it) for the load it needs, then computes.

The iteration ends when every process has ended, so a prefetch still in flight holds it open.
Nothing here is used by the simulator itself; it exists for tests."""

from __future__ import annotations

import simpy

from sim.engine.iteration import IterationPlan, IterationTiming


def time_plan_with_simpy(plan: IterationPlan) -> IterationTiming:
    """Time ``plan`` with one SimPy process per op and per load; raise ValueError if it cannot finish.

    A plan cannot finish when an op waits for a load that is only issued after that op ends."""
    env = simpy.Environment()
    stream = simpy.Resource(env, capacity=1)
    copy_engine = simpy.Resource(env, capacity=1)
    op_done = [env.event() for _ in plan.op_s]
    load_done = [env.event() for _ in plan.load_s]
    used = {"compute_s": 0.0, "copy_s": 0.0, "stall_s": 0.0}

    def swap():
        # Created first, so it is first in both queues: nothing runs before the offset has passed.
        with stream.request() as on_stream, copy_engine.request() as on_copy:
            yield on_stream & on_copy
            yield env.timeout(plan.start_offset_s)

    def load(j: int):
        after = plan.load_issue_after[j]
        if after >= 0:
            yield op_done[after]
        with copy_engine.request() as req:
            yield req
            began = env.now
            yield env.timeout(plan.load_s[j])
            used["copy_s"] += env.now - began
        load_done[j].succeed()

    def compute(i: int):
        if i > 0:
            yield op_done[i - 1]
        with stream.request() as req:
            yield req
            needs = plan.op_load[i]
            if needs >= 0:
                waiting_since = env.now
                yield load_done[needs]
                used["stall_s"] += env.now - waiting_since
            began = env.now
            yield env.timeout(plan.op_s[i])
            used["compute_s"] += env.now - began
        op_done[i].succeed()

    env.process(swap())
    for j in range(len(plan.load_s)):
        env.process(load(j))
    for i in range(len(plan.op_s)):
        env.process(compute(i))
    env.run()

    stuck_ops = [i for i, done in enumerate(op_done) if not done.triggered]
    stuck_loads = [j for j, done in enumerate(load_done) if not done.triggered]
    if stuck_ops or stuck_loads:
        raise ValueError(
            f"plan cannot finish: ops {stuck_ops} and loads {stuck_loads} never ran "
            f"(an op waits for a load issued after it)"
        )
    return IterationTiming(
        duration_s=env.now,
        compute_busy_s=used["compute_s"],
        copy_busy_s=used["copy_s"],
        stall_s=used["stall_s"],
        loads=len(plan.load_s),
    )


__all__ = ["time_plan_with_simpy"]
