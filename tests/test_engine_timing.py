"""Iteration timing: the fast recurrence against the SimPy reference, and whole runs against hand arithmetic.

``time_plan`` (the recurrence the simulator uses) and ``time_plan_with_simpy`` (one SimPy process per
op and per load) must give the same timeline for any plan, random or made by the real planner. The
hand-computed cases use the toy profile of ``engine_fixtures``: an op costs max(FLOPs, bytes) / 1e12 s
and an expert load 1 ms + bytes / 10 GB/s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.engine.iteration import BatchShape, IterationPlan, IterationPlanner, IterationTiming, time_plan
from sim.engine.reference import time_plan_with_simpy
from sim.engine.simulation import simulate
from sim.policies.cache import make_cache
from sim.spec import ModelSpec

from engine_fixtures import (
    TINY_MODEL,
    h2d_s,
    load,
    roofline_s,
    scenario_data,
    tiny_model,
    toy_profile,
    write_toy_profile,
)

TIMERS = [time_plan, time_plan_with_simpy]
TOY = toy_profile()


def assert_same_timing(fast: IterationTiming, slow: IterationTiming) -> None:
    assert fast.loads == slow.loads
    for name in ("duration_s", "compute_busy_s", "copy_busy_s", "stall_s"):
        assert getattr(fast, name) == pytest.approx(getattr(slow, name), rel=1e-12, abs=1e-15), name


def make_plan(
    ops: list[tuple[float, int]], loads: list[tuple[float, int]], start_offset_s: float = 0.0
) -> IterationPlan:
    """ops: (seconds, load it waits for or -1); loads: (seconds, op after which it is issued or -1)."""
    plan = IterationPlan(start_offset_s=start_offset_s)
    for seconds, after in loads:
        plan.add_load(seconds, after, prefetch=False)
    for seconds, needs in ops:
        plan.add_op(seconds, "op", needs)
    return plan


# ---------------------------------------------------------------- plans timed by hand

GB = 1e9
LOAD_1GB_S = 1e-3 + GB / 10e9  # 0.101 s


@pytest.mark.parametrize("timer", TIMERS)
def test_two_loads_on_one_link_serialise(timer):
    """Two 1 GB loads issued together: the second queues behind the first, so it is done at 0.202 s."""
    plan = make_plan(ops=[(0.0, 0), (0.0, 1)], loads=[(h2d_s(GB), -1), (h2d_s(GB), -1)])
    timing = timer(plan)
    assert h2d_s(GB) == pytest.approx(0.101)
    assert timing.duration_s == pytest.approx(0.202)
    assert timing.stall_s == pytest.approx(0.202)
    assert timing.copy_busy_s == pytest.approx(0.202)
    assert timing.loads == 2


@pytest.mark.parametrize("timer", TIMERS)
def test_one_load_takes_latency_plus_bytes_over_bandwidth(timer):
    timing = timer(make_plan(ops=[(0.0, 0)], loads=[(LOAD_1GB_S, -1)]))
    assert timing.duration_s == pytest.approx(0.101)


@pytest.mark.parametrize("timer", TIMERS)
def test_compute_hides_a_load_issued_before_it(timer):
    """A 0.05 s op runs while a 0.101 s load is in flight; the op that needs the load waits 0.051 s."""
    plan = make_plan(ops=[(0.05, -1), (0.01, 0)], loads=[(LOAD_1GB_S, -1)])
    timing = timer(plan)
    assert timing.duration_s == pytest.approx(0.111)
    assert timing.stall_s == pytest.approx(0.051)
    assert timing.compute_busy_s == pytest.approx(0.06)


@pytest.mark.parametrize("timer", TIMERS)
def test_a_load_issued_after_an_op_starts_when_the_op_ends(timer):
    """Issued when the 0.02 s op ends: done at 0.121 s; the op that needs it ends at 0.131 s."""
    plan = make_plan(ops=[(0.02, -1), (0.01, 0)], loads=[(LOAD_1GB_S, 0)])
    assert timer(plan).duration_s == pytest.approx(0.131)


@pytest.mark.parametrize("timer", TIMERS)
def test_a_prefetch_still_in_flight_holds_the_iteration_open(timer):
    plan = make_plan(ops=[(0.01, -1)], loads=[(LOAD_1GB_S, 0)])
    timing = timer(plan)
    assert timing.duration_s == pytest.approx(0.111)
    assert timing.stall_s == 0.0


@pytest.mark.parametrize("timer", TIMERS)
def test_start_offset_delays_the_stream_and_the_copy_engine(timer):
    """A 0.5 s swap at the start: the load runs 0.5..0.601, the first op 0.5..0.52, the second 0.601..0.611."""
    plan = make_plan(ops=[(0.02, -1), (0.01, 0)], loads=[(LOAD_1GB_S, -1)], start_offset_s=0.5)
    timing = timer(plan)
    assert timing.duration_s == pytest.approx(0.611)
    assert timing.stall_s == pytest.approx(0.081)
    assert timing.compute_busy_s == pytest.approx(0.03)
    assert timing.copy_busy_s == pytest.approx(0.101)


@pytest.mark.parametrize("timer", TIMERS)
def test_an_empty_plan_lasts_its_start_offset(timer):
    assert timer(IterationPlan(start_offset_s=0.25)).duration_s == pytest.approx(0.25)


def test_reference_rejects_a_plan_whose_op_waits_for_a_later_load():
    plan = make_plan(ops=[(0.01, 0)], loads=[(0.1, 0)])
    with pytest.raises(ValueError, match="cannot finish"):
        time_plan_with_simpy(plan)


# ---------------------------------------------------------------- random plans: fast == reference

durations = st.one_of(st.just(0.0), st.floats(1e-6, 1e-2, allow_nan=False))


@st.composite
def random_plans(draw) -> IterationPlan:
    """Plans that keep the IterationPlan contract: loads issued in FIFO order at nondecreasing points,
    and an op only waits for a load issued before it starts."""
    n_ops = draw(st.integers(0, 12))
    n_loads = draw(st.integers(0, 8))
    issue = sorted(draw(st.lists(st.integers(-1, n_ops - 1), min_size=n_loads, max_size=n_loads)))
    plan = IterationPlan(start_offset_s=draw(st.one_of(st.just(0.0), st.floats(0.0, 1e-2))))
    for after in issue:
        plan.add_load(draw(durations), after, prefetch=draw(st.booleans()))
    for i in range(n_ops):
        waitable = [j for j, after in enumerate(issue) if after < i]
        needs = draw(st.sampled_from([-1, *waitable]))
        plan.add_op(draw(durations), "op", needs)
    return plan


@settings(max_examples=300, deadline=None)
@given(plan=random_plans())
def test_fast_timing_matches_simpy_reference_on_random_plans(plan):
    assert_same_timing(time_plan(plan), time_plan_with_simpy(plan))


@settings(max_examples=200, deadline=None)
@given(plan=random_plans())
def test_timing_accounts_for_every_second(plan):
    """The stream is busy or stalled from the offset to its last op; loads fit inside the iteration."""
    t = time_plan(plan)
    assert t.stall_s >= 0.0
    assert t.compute_busy_s == pytest.approx(sum(plan.op_s))
    assert t.copy_busy_s == pytest.approx(sum(plan.load_s))
    assert t.duration_s >= plan.start_offset_s + t.compute_busy_s + t.stall_s - 1e-12
    assert t.duration_s >= plan.start_offset_s + t.copy_busy_s - 1e-12
    if not plan.load_s:
        assert t.duration_s == pytest.approx(plan.start_offset_s + sum(plan.op_s))


# ---------------------------------------------------------------- plans made by the real planner


@st.composite
def small_models(draw) -> ModelSpec:
    num_experts = draw(st.integers(2, 6))
    num_layers = draw(st.integers(1, 4))
    first_dense = draw(st.integers(0, num_layers - 1))
    sliding = draw(st.booleans())
    shared = draw(st.integers(0, 1))
    fields = {
        **TINY_MODEL,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": draw(st.integers(1, num_experts)),
        "first_k_dense_replace": first_dense,
        "dense_ffn_size": 96 if first_dense else None,
        "num_shared_experts": shared,
        "shared_expert_ffn_size": 64 if shared else None,
        "sliding_window_tokens": 4 if sliding else None,
        "layer_attention_pattern": ("sliding", "full") if sliding else ("full",),
    }
    return ModelSpec.model_validate(fields)


@st.composite
def batches(draw) -> BatchShape:
    n_prefill = draw(st.integers(0, 3))
    n_decode = draw(st.integers(0 if n_prefill else 1, 4))
    return BatchShape(
        prefill_new_tokens=np.array(draw(st.lists(st.integers(1, 40), min_size=n_prefill, max_size=n_prefill)), dtype=np.int64),
        prefill_context_tokens=np.array(draw(st.lists(st.integers(0, 40), min_size=n_prefill, max_size=n_prefill)), dtype=np.int64),
        decode_context_tokens=np.array(draw(st.lists(st.integers(1, 80), min_size=n_decode, max_size=n_decode)), dtype=np.int64),
        num_emitting=draw(st.integers(0, n_prefill + n_decode)),
    )


@st.composite
def planner_runs(draw):
    model = draw(small_models())
    total = model.num_moe_layers * model.num_experts
    per_layer = draw(st.booleans())  # a per-layer cache needs a slot per MoE layer
    cache = make_cache(
        draw(st.sampled_from(["lru", "lfu", "all_resident"])), num_layers=model.num_moe_layers,
        num_experts=model.num_experts, per_layer=per_layer,
        capacity_experts=draw(st.integers(model.num_moe_layers if per_layer else 1, total)),
    )
    planner = IterationPlanner(
        model=model, profile=TOY, cache=cache, prefetch=draw(st.sampled_from(["none", "next_layer"])),
        prefetch_predictor=draw(st.sampled_from(["oracle", "frequency"])),
        prefetch_max_experts=draw(st.one_of(st.none(), st.integers(1, model.num_experts))),
    )
    shape = (model.num_moe_layers, model.num_experts)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        counts = np.array(
            draw(st.lists(st.integers(0, 6), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1])),
            dtype=np.int64,
        ).reshape(shape)
        offset = draw(st.one_of(st.just(0.0), st.floats(0.0, 1e-3)))
        steps.append((draw(batches()), counts, offset))
    return planner, steps


@settings(max_examples=150, deadline=None)
@given(run=planner_runs())
def test_fast_timing_matches_simpy_reference_on_planner_plans(run):
    planner, steps = run
    for batch, counts, offset in steps:
        plan = planner.plan(batch, counts, start_offset_s=offset)
        # The planner keeps the contract the recurrence relies on.
        assert plan.load_issue_after == sorted(plan.load_issue_after)
        for i, needs in enumerate(plan.op_load):
            if needs >= 0:
                assert plan.load_issue_after[needs] < i
        # Every miss is loaded on demand (into a slot, or through staging when none can be freed).
        assert len(plan.load_s) == plan.misses + sum(plan.load_is_prefetch)
        assert planner.cache.num_resident <= planner.cache.capacity_experts
        assert_same_timing(time_plan(plan), time_plan_with_simpy(plan))


# ---------------------------------------------------------------- whole runs against hand arithmetic
#
# The tiny model (engine_fixtures.TINY_MODEL): hidden 64, 2 layers, both MoE, 2 heads of 32 (MHA),
# vocab 128, 2 SwiGLU experts of width 128, top_k 2 (every token uses both experts).


def gemm_s(tokens: int, n_in: int, n_out: int) -> float:
    """bf16 GEMM: 2*t*in*out FLOPs; weights once plus activations in and out per token."""
    return roofline_s(2 * tokens * n_in * n_out, 2 * (n_in * n_out + tokens * (n_in + n_out)))


def expert_s(tokens: int) -> float:
    """SwiGLU expert 64 x 128 (3 matrices, 24576 params = 49152 bytes); per token 2*64 + 2*128 activations."""
    return roofline_s(2 * tokens * 24576, 49152 + tokens * (2 * 64 + 2 * 128) * 2)


def attention_s(*, new: int, context: int, decode: bool) -> float:
    """Projections q, k, v, o (64 x 64 each) plus the core: 256 FLOPs per (query, key) pair over both
    heads; KV 256 bytes per token per layer; activations 2 heads x 64 x 2 bytes per query."""
    tokens = 1 if decode else new
    projections = 4 * gemm_s(tokens, 64, 64)
    if decode:
        core = roofline_s(256 * (context + 1), (context + 1) * 256 + 256)
    else:
        core = roofline_s(256 * (new * context + new * (new + 1) / 2), (new + context) * 256 + new * 256)
    return projections + core


def gate_s(tokens: int) -> float:
    return gemm_s(tokens, 64, 2)


def lm_head_s() -> float:
    return gemm_s(1, 64, 128)


def iteration_parts(*, tokens: int, new: int, context: int, decode: bool) -> tuple[float, float, float]:
    """Per-layer attention, gate and one expert's seconds for a batch of one sequence."""
    return attention_s(new=new, context=context, decode=decode), gate_s(tokens), expert_s(tokens)


def test_hand_formulas_agree_with_the_toy_numbers():
    """Spot checks of the helpers: an expert on 8 tokens is compute bound (393216 FLOP -> 0.393 µs)."""
    assert expert_s(8) == pytest.approx(393216e-12)
    assert expert_s(1) == pytest.approx(max(49152, 49152 + 768) * 1e-12)
    assert h2d_s(49152) == pytest.approx(1e-3 + 4.9152e-6)


def test_one_request_all_resident_takes_the_sum_of_its_profile_latencies(tmp_path: Path):
    """Prompt 8, output 3: one prefill iteration (8 tokens) and decodes at context 8 and 9."""
    prompt, output = 8, 3
    loaded = load(scenario_data(write_toy_profile(tmp_path), prompt_tokens=prompt, output_tokens=output), tmp_path)
    result = simulate(loaded)

    expected = []
    a, g, x = iteration_parts(tokens=prompt, new=prompt, context=0, decode=False)
    expected.append(2 * (a + g + 2 * x) + lm_head_s())
    for context in range(prompt, prompt + output - 1):
        a, g, x = iteration_parts(tokens=1, new=1, context=context, decode=True)
        expected.append(2 * (a + g + 2 * x) + lm_head_s())

    it = result.iterations
    assert list(it["duration_s"]) == pytest.approx(expected, rel=1e-12)
    assert (it["expert_loads"] == 0).all() and (it["stall_s"] == 0).all()
    req = result.requests.iloc[0]
    assert req["status"] == "completed"
    assert req["ttft_s"] == pytest.approx(expected[0], rel=1e-9)
    assert req["e2e_s"] == pytest.approx(sum(expected), rel=1e-9)


def test_load_bound_run_takes_loads_times_link_time_plus_unhidden_compute(tmp_path: Path):
    """One expert slot, LRU, no prefetch. Start: expert (0, 0) resident. Every iteration needs all 4 experts.

    Iteration 1: layer 0 hits (0, 0) and loads (0, 1) (its slot is pinned, so it streams through
    staging): attention + gate + L + x (the hit's x hides under the load). Layer 1 misses both: the two
    loads serialise, attention + gate + 2L + x. Later iterations miss all 4: 2 x (attention + gate + 2L + x).
    L = 1 ms + 49152 B / 10 GB/s."""
    prompt, output = 8, 4
    data = scenario_data(
        write_toy_profile(tmp_path), prompt_tokens=prompt, output_tokens=output,
        hardware={"expert_memory": {"experts": 1}}, policies={"expert_cache": {"name": "lru"}},
    )
    result = simulate(load(data, tmp_path))
    L = h2d_s(49152)

    a, g, x = iteration_parts(tokens=prompt, new=prompt, context=0, decode=False)
    expected = [(a + g + L + x) + (a + g + 2 * L + x) + lm_head_s()]
    loads = [3]
    for context in range(prompt, prompt + output - 1):
        a, g, x = iteration_parts(tokens=1, new=1, context=context, decode=True)
        expected.append(2 * (a + g + 2 * L + x) + lm_head_s())
        loads.append(4)

    it = result.iterations
    assert list(it["expert_loads"]) == loads
    assert list(it["expert_misses"]) == loads
    assert list(it["copy_busy_s"]) == pytest.approx([n * L for n in loads], rel=1e-12)
    assert list(it["duration_s"]) == pytest.approx(expected, rel=1e-12)
    req = result.requests.iloc[0]
    assert req["e2e_s"] == pytest.approx(sum(expected), rel=1e-9)
    # Load bound: the link is busy for all but the compute that cannot overlap a load.
    assert req["e2e_s"] == pytest.approx(sum(loads) * L, rel=0.01)
    assert result.budget.expert_slots == 1
    assert (it["experts_resident"] <= 1).all()


def test_two_misses_in_a_layer_serialise_on_the_link_end_to_end(tmp_path: Path):
    """A decode iteration misses both experts of each layer. Per layer, the first is ready L after the
    gate; the second queued behind it on the link and is ready at 2L, which is x after the first
    expert finished computing. So the stream stalls 2 x (L + (L - x)) and the link is busy 4L."""
    data = scenario_data(
        write_toy_profile(tmp_path), prompt_tokens=4, output_tokens=2,
        hardware={"expert_memory": {"experts": 1}}, policies={"expert_cache": {"name": "lru"}},
    )
    it = simulate(load(data, tmp_path)).iterations
    decode = it.iloc[1]
    L = h2d_s(49152)
    x = expert_s(1)
    assert decode["stall_s"] == pytest.approx(2 * (L + (L - x)), rel=1e-12)
    assert decode["copy_busy_s"] == pytest.approx(4 * L, rel=1e-12)


# ---------------------------------------------------------------- planner decisions, by hand


def decode_batch(context: int) -> BatchShape:
    empty = np.zeros(0, dtype=np.int64)
    return BatchShape(empty, empty, np.array([context], dtype=np.int64), num_emitting=1)


@pytest.mark.parametrize("timer", TIMERS)
def test_next_layer_prefetch_hides_loads_behind_the_previous_layer(timer):
    """2 MoE layers of 4 experts, 2 slots per layer (per-layer scope): experts 0, 1 of each layer start
    resident. Layer 0 uses experts 0, 1 (hits); layer 1 uses 2, 3 (misses). Without prefetch the two
    loads start after layer 1's gate; with oracle next-layer prefetch they start once layer 0's gate
    has chosen its experts, so layer 0's experts and layer 1's attention and gate (2x + A + G) hide
    under them."""
    model = tiny_model(num_experts=4)
    counts = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=np.int64)
    a = attention_s(new=1, context=5, decode=True)
    g = gemm_s(1, 64, 4)  # the router of 4 experts
    x = expert_s(1)
    L = h2d_s(49152)
    durations = {}
    for prefetch in ("none", "next_layer"):
        cache = make_cache("lru", num_layers=2, num_experts=4, capacity_experts=4, per_layer=True)
        planner = IterationPlanner(model=model, profile=TOY, cache=cache, prefetch=prefetch)
        plan = planner.plan(decode_batch(5), counts)
        # A prefetched expert counts as a hit (and a prefetch hit).
        assert (plan.hits, plan.misses) == ((4, 0) if prefetch == "next_layer" else (2, 2))
        assert plan.prefetch_hits == (2 if prefetch == "next_layer" else 0)
        durations[prefetch] = timer(plan).duration_s
    assert a + g + 2 * x < L  # the premise: the loads are the long pole
    assert durations["none"] == pytest.approx((a + g + 2 * x) + (a + g + 2 * L + x) + lm_head_s(), rel=1e-12)
    assert durations["next_layer"] == pytest.approx((a + g) + 2 * L + x + lm_head_s(), rel=1e-12)


@pytest.mark.parametrize("timer", TIMERS)
def test_shared_experts_run_while_the_layers_loads_are_in_flight(timer):
    """The prefetch test's setting without prefetch, plus one shared expert per layer (time S). Layer 0 hits:
    its shared expert adds S to the stream. Layer 1 misses both experts: its loads are issued after its gate
    and its shared expert runs under them (S < L), so it adds nothing. Total: exactly S more than without."""
    counts = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=np.int64)
    durations = {}
    for shared in (0, 1):
        model = tiny_model(num_experts=4, num_shared_experts=shared, shared_expert_ffn_size=256 if shared else None)
        cache = make_cache("lru", num_layers=2, num_experts=4, capacity_experts=4, per_layer=True)
        plan = IterationPlanner(model=model, profile=TOY, cache=cache).plan(decode_batch(5), counts)
        assert plan.op_kind.count("shared") == 2 * shared
        durations[shared] = timer(plan).duration_s
    shared_model = tiny_model(num_experts=4, num_shared_experts=1, shared_expert_ffn_size=256)
    S = float(TOY.expert_ffn_s(tokens=1, shape=shared_model.shared_expert_shape))
    assert 0 < S < h2d_s(49152)  # the premise: a load outlasts the shared expert
    assert durations[1] - durations[0] == pytest.approx(S, rel=1e-9)


def test_next_layer_prefetch_never_evicts_an_expert_the_current_layer_needs():
    """The tiny model (2 MoE layers x 2 experts, both used by every token), 3 slots, one LRU pool.
    Start: (0,0), (0,1), (1,0) resident. Layer 0 needs both of its experts, which are resident, so it
    must hit both: the prefetch for layer 1, issued while layer 0 computes, may not take their slots.
    So the one miss of this iteration is in layer 1, exactly as without prefetch
    (sim/policies/cache.py: an expert the current layer still needs is pinned)."""
    counts = np.ones((2, 2), dtype=np.int64)
    for prefetch in ("none", "next_layer"):
        cache = make_cache("lru", num_layers=2, num_experts=2, capacity_experts=3, per_layer=False)
        planner = IterationPlanner(model=tiny_model(), profile=TOY, cache=cache, prefetch=prefetch)
        plan = planner.plan(decode_batch(5), counts)
        layer0_experts = [i for i, kind in enumerate(plan.op_kind[:4]) if kind.startswith("expert")]
        assert all(plan.op_load[i] < 0 for i in layer0_experts), f"{prefetch}: layer 0 waited for a load"
        assert (plan.hits, plan.misses) == (3, 1), prefetch


def test_a_prefetch_never_evicts_an_expert_predicted_for_the_same_layer():
    """3 experts per layer, 2 slots per layer (per-layer scope): (1,0), (1,1) start resident. Layer 1
    uses experts 0 and 2; the oracle predicts both, so prefetching (1,2) must take the slot of (1,1),
    which nothing needs, not that of (1,0). Expected: no miss; (1,2) is a prefetch hit."""
    cache = make_cache("lru", num_layers=2, num_experts=3, capacity_experts=4, per_layer=True)
    planner = IterationPlanner(model=tiny_model(num_experts=3), profile=TOY, cache=cache, prefetch="next_layer")
    plan = planner.plan(decode_batch(5), np.array([[1, 1, 0], [1, 0, 1]], dtype=np.int64))
    assert (plan.hits, plan.misses, plan.prefetch_hits) == (4, 0, 1)
    assert cache.resident.tolist() == [True, True, False, True, False, True]


# ---------------------------------------------------------------- overhead terms of the profile


def _overhead_profile(**operations):
    data = TOY.model_dump()
    data["operations"].update(operations)
    return type(TOY).model_validate(data)


def _planner(profile, model, cache_name: str = "all_resident", capacity: int = 0, **kw):
    cache = make_cache(cache_name, num_layers=model.num_moe_layers, num_experts=model.num_experts,
                       capacity_experts=capacity, per_layer=False)
    return IterationPlanner(model=model, profile=profile, cache=cache, **kw)


def _batch(decode_contexts, prefill=()):
    return BatchShape(
        prefill_new_tokens=np.asarray([n for n, _ in prefill], dtype=np.int64),
        prefill_context_tokens=np.asarray([c for _, c in prefill], dtype=np.int64),
        decode_context_tokens=np.asarray(decode_contexts, dtype=np.int64),
        num_emitting=len(decode_contexts) + len(prefill),
    )


OVERHEAD_MODEL = tiny_model(num_experts=8, top_k=2, num_layers=3)


@pytest.mark.parametrize("cache_name,capacity", [("all_resident", 0), ("lru", 5)])
def test_expert_overhead_adds_exactly_its_cost_per_active_expert(cache_name, capacity):
    """A per-expert overhead of X s + Y s/token makes the stream busier by n_active * X + routed_tokens * Y."""
    counts = np.zeros((3, 8), dtype=np.int64)
    counts[0, [0, 1]] = 3
    counts[1, [2, 5, 7]] = [1, 2, 3]
    counts[2, [4, 6]] = 3
    batch = _batch([10, 20, 30])
    x, y = 2e-4, 3e-6
    base = _planner(TOY, OVERHEAD_MODEL, cache_name, capacity).plan(batch, counts)
    over = _planner(_overhead_profile(expert_overhead={"fixed_s": x, "per_token_s": y}), OVERHEAD_MODEL,
                    cache_name, capacity).plan(batch, counts)
    assert (over.hits, over.misses) == (base.hits, base.misses)
    assert sum(over.op_s) - sum(base.op_s) == pytest.approx(7 * x + counts.sum() * y, rel=1e-9)
    if cache_name == "all_resident":
        assert time_plan(over).duration_s - time_plan(base).duration_s == pytest.approx(7 * x + 18 * y, rel=1e-9)


@pytest.mark.parametrize("cache_name,capacity", [("all_resident", 0), ("lru", 5)])
def test_layer_and_iteration_overheads_are_affine_in_tokens_and_sequences(cache_name, capacity):
    counts = np.zeros((3, 8), dtype=np.int64)
    counts[:, [1, 3]] = 5
    batch = _batch([10, 20, 30], prefill=[(2, 0)])  # 5 tokens, 4 sequences
    layer = {"fixed_s": 1e-4, "per_token_s": 1e-5, "per_sequence_s": 2e-5}
    iteration = {"fixed_s": 5e-4, "per_token_s": 1e-6, "per_sequence_s": 0.0}
    base = _planner(TOY, OVERHEAD_MODEL, cache_name, capacity).plan(batch, counts)
    over = _planner(_overhead_profile(layer_overhead=layer, iteration_overhead=iteration), OVERHEAD_MODEL,
                    cache_name, capacity).plan(batch, counts)
    per_layer = 1e-4 + 5 * 1e-5 + 4 * 2e-5
    per_iteration = 5e-4 + 5 * 1e-6
    assert sum(over.op_s) - sum(base.op_s) == pytest.approx(3 * per_layer + per_iteration, rel=1e-9)
    assert over.op_kind[-1] == "iteration_overhead" and base.op_kind[-1] != "iteration_overhead"
    assert time_plan(over).compute_busy_s - time_plan(base).compute_busy_s == pytest.approx(
        3 * per_layer + per_iteration, rel=1e-9)


def test_a_profile_without_overheads_plans_as_before():
    """No overhead terms: the same op list as a profile whose terms are all zero (bar the absent op)."""
    counts = np.zeros((3, 8), dtype=np.int64)
    counts[:, [0, 2]] = 1
    zero = {"fixed_s": 0.0, "per_token_s": 0.0, "per_sequence_s": 0.0}
    a = _planner(TOY, OVERHEAD_MODEL, "lru", 4).plan(_batch([5, 6]), counts)
    b = _planner(_overhead_profile(layer_overhead=zero, iteration_overhead=zero,
                                   expert_overhead={"fixed_s": 0.0, "per_token_s": 0.0}),
                 OVERHEAD_MODEL, "lru", 4).plan(_batch([5, 6]), counts)
    assert a.op_s == b.op_s and a.load_s == b.load_s


def test_frequency_predictor_does_not_see_the_iteration_it_predicts():
    """The 'frequency' predictor learns from past iterations only: on the first iteration it has no
    statistics (ties broken by expert id), so routing to experts 6 and 7 gets no prefetch hit."""
    counts = np.zeros((3, 8), dtype=np.int64)
    counts[:, [6, 7]] = 1
    planner = _planner(TOY, OVERHEAD_MODEL, "lru", 12, prefetch="next_layer", prefetch_predictor="frequency")
    first = planner.plan(_batch([5]), counts)
    assert first.prefetch_hits == 0
    assert planner.use_counts.tolist() == (counts > 0).astype(int).tolist()
    # Now it knows: experts 6 and 7 are the most used of every layer.
    assert planner._predict(1, counts).tolist() == [6, 7]


# ---------------------------------------------------------------- load interference


INTERFERENCE_MODEL = tiny_model(num_experts=8, top_k=2, num_layers=1)


def _interference_plans(s_per_byte: float):
    """One MoE layer, 3 experts routed, a cache of 1 slot: 3 misses, each loaded after the gate."""
    counts = np.zeros((1, 8), dtype=np.int64)
    counts[0, [5, 6, 7]] = [1, 2, 3]
    base = _planner(TOY, INTERFERENCE_MODEL, "lru", 1).plan(_batch([10, 20, 30]), counts)
    profile = _overhead_profile(load_interference={"s_per_byte": s_per_byte})
    planner = _planner(profile, INTERFERENCE_MODEL, "lru", 1)
    return base, planner.plan(_batch([10, 20, 30]), counts), planner


@pytest.mark.parametrize("timer", TIMERS)
def test_load_interference_lengthens_each_op_that_waits_for_a_load(timer):
    """Interference X per load: each of the 3 ops waiting for a load gets X more; the loads are unchanged.
    By hand, with the stream free when the loads are issued (at the gate's end g) and each expert e_i + X at
    least as long as a load L: duration = g + L + sum(e_i + X) + LM head."""
    nbytes = float(INTERFERENCE_MODEL.expert_bytes)
    base, _, _ = _interference_plans(0.0)
    load_s = base.load_s[0]
    s_per_byte = 2 * load_s / nbytes  # X = 2 L: the stream, not the link, is the bottleneck after the first load
    base, over, planner = _interference_plans(s_per_byte)
    x = planner.load_interference_s
    assert x == pytest.approx(2 * load_s, rel=1e-12)
    assert (over.misses, over.load_s) == (3, base.load_s)
    waiting = [i for i, load in enumerate(over.op_load) if load >= 0]
    assert len(waiting) == 3
    for i, (a, b) in enumerate(zip(base.op_s, over.op_s)):
        assert b - a == pytest.approx(x if i in waiting else 0.0, abs=1e-15)
    gate_end = sum(over.op_s[: waiting[0]])
    experts = [base.op_s[i] for i in waiting]
    lm_head = sum(over.op_s[waiting[-1] + 1:])
    expected = gate_end + load_s + sum(e + x for e in experts) + lm_head
    timing = timer(over)
    assert timing.duration_s == pytest.approx(expected, rel=1e-12)
    assert timing.compute_busy_s - timer(base).compute_busy_s == pytest.approx(3 * x, rel=1e-9)


def test_zero_or_absent_load_interference_leaves_timings_unchanged():
    base, zero, planner = _interference_plans(0.0)
    assert planner.load_interference_s == 0.0
    assert zero.op_s == base.op_s and zero.load_s == base.load_s
    assert time_plan(zero) == time_plan(base)
    assert float(TOY.load_interference_s(nbytes=1e6)) == 0.0
