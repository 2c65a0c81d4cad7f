"""The multi-resource flow shop of the offloading engine: the one-pass timer against the SimPy reference.

``time_flow`` (used by the simulator) and ``time_flow_with_simpy`` (one SimPy process per op) must agree
on any plan: random plans over up to five resources, plans made by the pipelined planner (CPU attention,
CPU experts, micro-batches, streamed weights), and the plain engine's two-resource plans converted to
flow plans. Hand-computed cases pin the pipelining that must emerge from the dependencies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.engine.flowshop import ACT_D2H, ACT_H2D, COPY, CPU, GPU, FlowPlan, FlowTiming, time_flow
from sim.engine.flowshop_reference import time_flow_with_simpy
from sim.engine.host_compute import MicroBatch, PipelinedIteration
from sim.engine.iteration import IterationPlan, time_plan
from sim.policies.cache import make_cache
from sim.policies.offload_specs import OffloadSpec

from engine_fixtures import tiny_model, toy_profile
from test_engine_timing import planner_runs

TOY = toy_profile()


def assert_same(fast: FlowTiming, slow: FlowTiming) -> None:
    assert fast.duration_s == pytest.approx(slow.duration_s, rel=1e-12, abs=1e-15)
    assert fast.busy_s == pytest.approx(slow.busy_s, rel=1e-12, abs=1e-15)
    for kind, seconds in fast.kind_s.items():
        assert slow.kind_s.get(kind, 0.0) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- by hand


@pytest.mark.parametrize("timer", [time_flow, time_flow_with_simpy])
def test_two_micro_batches_overlap_cpu_attention_with_gpu_work(timer):
    """GPU pre (1 s) -> CPU attention (2 s) -> GPU post (1 s), for micro-batches a and b, GPU order
    pre_a, pre_b, post_a, post_b: CPU runs a in [1, 3] and b in [3, 5]; post_a [3, 4], post_b [5, 6]."""
    plan = FlowPlan()
    pre_a = plan.add(1.0, GPU, "gpu")
    pre_b = plan.add(1.0, GPU, "gpu")
    att_a = plan.add(2.0, CPU, "cpu", (pre_a,))
    att_b = plan.add(2.0, CPU, "cpu", (pre_b,))
    plan.add(1.0, GPU, "gpu", (att_a,))
    plan.add(1.0, GPU, "gpu", (att_b,))
    t = timer(plan)
    assert t.duration_s == pytest.approx(6.0)  # serial would be 8 s
    assert t.busy_s[GPU] == pytest.approx(4.0) and t.busy_s[CPU] == pytest.approx(4.0)


@pytest.mark.parametrize("timer", [time_flow, time_flow_with_simpy])
def test_in_order_resource_waits_for_its_previous_op(timer):
    """The copy engine is in order: a load issued second waits for the first even if its dependency is met."""
    plan = FlowPlan()
    slow = plan.add(5.0, GPU, "gpu")
    plan.add(1.0, COPY, "load", (slow,))  # starts at 5
    plan.add(1.0, COPY, "load")  # no dependency, but behind the first load: [6, 7]
    assert timer(plan).duration_s == pytest.approx(7.0)


@pytest.mark.parametrize("timer", [time_flow, time_flow_with_simpy])
def test_start_offset_holds_every_resource(timer):
    plan = FlowPlan(start_offset_s=2.0)
    plan.add(1.0, CPU, "cpu")
    plan.add(1.0, ACT_D2H, "act")
    assert timer(plan).duration_s == pytest.approx(3.0)


def test_a_dependency_on_a_later_op_is_refused():
    plan = FlowPlan()
    with pytest.raises(ValueError, match="dependencies must be earlier ops"):
        plan.add(1.0, GPU, "gpu", (0,))


# ---------------------------------------------------------------- random plans


@st.composite
def random_flow_plans(draw) -> FlowPlan:
    n_res = draw(st.integers(1, 5))
    plan = FlowPlan(num_resources=n_res, start_offset_s=draw(st.one_of(st.just(0.0), st.floats(0.0, 1e-2))))
    for i in range(draw(st.integers(0, 16))):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        plan.add(draw(st.one_of(st.just(0.0), st.floats(1e-6, 1e-2))), draw(st.integers(0, n_res - 1)),
                 draw(st.sampled_from(["a", "b", "c"])), tuple(deps))
    return plan


@settings(max_examples=200, deadline=None)
@given(plan=random_flow_plans())
def test_one_pass_timer_matches_simpy_reference_on_random_plans(plan):
    assert_same(time_flow(plan), time_flow_with_simpy(plan))


def as_flow(plan: IterationPlan) -> FlowPlan:
    """The plain engine's plan as a flow plan: loads on COPY issued after their op, ops wait for their load."""
    flow = FlowPlan(start_offset_s=plan.start_offset_s)
    load_index: dict[int, int] = {}
    op_index: dict[int, int] = {}
    next_load = 0

    def issue(after: int) -> None:
        nonlocal next_load
        while next_load < len(plan.load_s) and plan.load_issue_after[next_load] == after:
            deps = (op_index[after],) if after >= 0 else ()
            load_index[next_load] = flow.add(plan.load_s[next_load], COPY, "load", deps)
            next_load += 1

    issue(-1)
    for i, (seconds, load) in enumerate(zip(plan.op_s, plan.op_load)):
        op_index[i] = flow.add(seconds, GPU, "op", (load_index[load],) if load >= 0 else ())
        issue(i)
    return flow


@settings(max_examples=100, deadline=None)
@given(run=planner_runs())
def test_flow_timer_reproduces_the_plain_two_resource_timer(run):
    planner, steps = run
    for batch, counts, offset in steps:
        plan = planner.plan(batch, counts, start_offset_s=offset)
        assert time_flow(as_flow(plan)).duration_s == pytest.approx(time_plan(plan).duration_s, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- plans made by the pipelined planner


@st.composite
def pipelined_runs(draw):
    num_experts = draw(st.integers(2, 4))
    model = tiny_model(num_layers=draw(st.integers(1, 3)), num_experts=num_experts, top_k=draw(st.integers(1, num_experts)))
    total = model.num_moe_layers * model.num_experts
    cache = make_cache("lru", num_layers=model.num_moe_layers, num_experts=model.num_experts,
                       capacity_experts=draw(st.integers(1, total)), per_layer=False)
    decode = draw(st.sampled_from(["gpu", "cpu"]))
    offload = OffloadSpec(
        attention={"decode": decode, "prefill": draw(st.sampled_from(["gpu", "cpu"])) if decode == "cpu" else "gpu"},
        cpu_experts=draw(st.booleans()), micro_batches=draw(st.integers(1, 3)),
        stream_experts=draw(st.sampled_from(["routed", "all"])),
    )
    it = PipelinedIteration(model=model, profile=TOY, host=TOY, cache=cache, offload=offload)
    mbs, counts = [], []
    for _ in range(draw(st.integers(1, offload.micro_batches))):
        n_p, n_d = draw(st.integers(0, 2)), draw(st.integers(0, 3))
        pn = np.array(draw(st.lists(st.integers(1, 20), min_size=n_p, max_size=n_p)), dtype=np.int64)
        pc = np.array(draw(st.lists(st.integers(0, 20), min_size=n_p, max_size=n_p)), dtype=np.int64)
        dc = np.array(draw(st.lists(st.integers(1, 60), min_size=n_d, max_size=n_d)), dtype=np.int64)
        dq = np.array(draw(st.lists(st.integers(1, 4), min_size=n_d, max_size=n_d)), dtype=np.int64)
        mbs.append(MicroBatch(pn, pc, dc, dq, draw(st.integers(0, n_p + n_d))))
        shape = (model.num_moe_layers, model.num_experts)
        counts.append(np.array(draw(st.lists(st.integers(0, 5), min_size=shape[0] * shape[1],
                                             max_size=shape[0] * shape[1])), dtype=np.int64).reshape(shape))
    return it, mbs, counts


@settings(max_examples=150, deadline=None)
@given(run=pipelined_runs())
def test_one_pass_timer_matches_simpy_reference_on_pipelined_plans(run):
    it, mbs, counts = run
    plan, _ = it.plan(mbs, counts)
    assert_same(time_flow(plan), time_flow_with_simpy(plan))


def test_activation_links_are_separate_resources():
    """Act H2D and act D2H are their own in-order streams: a transfer each way runs at the same time."""
    plan = FlowPlan()
    plan.add(1.0, ACT_H2D, "act")
    plan.add(1.0, ACT_D2H, "act")
    assert time_flow(plan).duration_s == pytest.approx(1.0)
