"""A slow, obviously correct timing of a ``FlowPlan``: one SimPy process per op, one SimPy resource per
resource (capacity 1). Op i waits for the previous op of its resource (in-order streams) and for every op
it depends on, then takes its resource and holds it for its duration. A *swap* process holds every
resource for ``start_offset_s`` first. Nothing here is used by the simulator; tests compare it with
``sim.engine.flowshop.time_flow``."""

from __future__ import annotations

import simpy

from sim.engine.flowshop import FlowPlan, FlowTiming


def time_flow_with_simpy(plan: FlowPlan) -> FlowTiming:
    env = simpy.Environment()
    resources = [simpy.Resource(env, capacity=1) for _ in range(plan.num_resources)]
    done = [env.event() for _ in plan.op_s]
    busy = [0.0] * plan.num_resources
    kind_s: dict[str, float] = {}
    previous_on: dict[int, int] = {}
    predecessor: list[int] = []
    for i, res in enumerate(plan.op_resource):
        predecessor.append(previous_on.get(res, -1))
        previous_on[res] = i

    def swap():
        requests = [r.request() for r in resources]
        yield env.all_of(requests)
        yield env.timeout(plan.start_offset_s)
        for r, req in zip(resources, requests):
            r.release(req)

    def op(i: int):
        waits = [done[d] for d in plan.op_deps[i]]
        if predecessor[i] >= 0:
            waits.append(done[predecessor[i]])
        if waits:
            yield env.all_of(waits)
        res = plan.op_resource[i]
        with resources[res].request() as req:
            yield req
            yield env.timeout(plan.op_s[i])
        busy[res] += plan.op_s[i]
        kind_s[plan.op_kind[i]] = kind_s.get(plan.op_kind[i], 0.0) + plan.op_s[i]
        done[i].succeed()

    env.process(swap())
    for i in range(len(plan.op_s)):
        env.process(op(i))
    env.run()
    if not all(e.triggered for e in done):
        raise ValueError("plan cannot finish")
    return FlowTiming(max(env.now, plan.start_offset_s), tuple(busy), kind_s)


__all__ = ["time_flow_with_simpy"]
