"""The offloading policy family inside the engine (sim.engine.offload_policies), each rule pinned to a case small
enough to count by hand: eMoE's Eq. 2 top-L residency and periodic invocation, rerouted misses and their
routing fidelity, staged fetches, pre-gated / prefetch-all / MoE-Infinity loads, the predictor's own
memory and time, and Algorithm-1 admission holding or admitting a request inside a run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine_fixtures import load, roofline_s, scenario_data, tiny_model, toy_profile, write_toy_profile
from sim.engine.iteration import BatchShape, time_plan
from sim.engine.memory import plan_memory
from sim.engine.offload_policies import (
    ActivationMatcher,
    ActivationPolicy,
    EmoeResidency,
    OffloadPlanner,
    StaticHotResidency,
    predictor_call_s,
)
from sim.engine.simulation import simulate
from sim.errors import CapacityError, ScenarioError
from sim.metrics import summarize
from sim.policies.cache import ExpertCache, LruPolicy
from sim.policies.emoe import EmoePlanner
from sim.policies.offload_policy_specs import PredictorModelSpec
from sim.sweep import metrics_row
from sim.work import GemmShape

# 2 MoE layers x 4 experts, top-1: key = layer * 4 + expert.
MODEL = tiny_model(num_experts=4, top_k=1)


def decode(n: int = 1) -> BatchShape:
    empty = np.zeros(0, dtype=np.int64)
    return BatchShape(empty, empty, np.full(n, 4, dtype=np.int64), num_emitting=n)


def cache(capacity: int, model=MODEL, policy=None) -> ExpertCache:
    total = model.num_moe_layers * model.num_experts
    return ExpertCache(num_layers=model.num_moe_layers, num_experts=model.num_experts, capacity_experts=capacity,
                       per_layer=False, policy=policy or LruPolicy(total))


def planner(capacity: int, model=MODEL, policy=None, **kw) -> OffloadPlanner:
    return OffloadPlanner(model=model, profile=toy_profile(), cache=cache(capacity, model, policy), **kw)


def req(rid: int, task: str, tokens: int):
    return SimpleNamespace(request_id=rid, task=task, prompt_tokens=tokens)


class FixedForecast:
    """A predictor that always forecasts the same per-task frequency."""

    def __init__(self, freq):
        self.freq = freq

    def predict_all(self, task, previous, *, actual=None):
        return self.freq[task]


# ---------------------------------------------------------------- eMoE: Eq. 2 top-L and periodic invocation


def emoe_planner(period: int, predictor_s: float = 0.0) -> OffloadPlanner:
    freq = {"math": np.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]),
            "code": np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])}
    emoe = EmoePlanner(num_layers=2, num_experts=4, predictor=FixedForecast(freq), experts_per_layer=2,
                       expected_output_tokens={"math": 30, "code": 60},
                       sensitivity={"math": np.array([1, 0]), "code": np.array([1, 1])}, period=period)
    return planner(4, residency=EmoeResidency(emoe, None), miss="reroute", predictor_s=predictor_s)


def run(p: OffloadPlanner, counts, batch=(), running=()):
    counts = np.asarray(counts, dtype=np.int64)
    p.observe_batch([(r, 1) for r in batch], list(running), counts)
    return p.plan(decode(), counts)


def test_emoe_loads_the_eq2_top_l_experts_layer_by_layer_and_waits_only_for_its_own():
    """Running: math 10 + 20 tokens (W_o 30), code 40 (W_o 60); math insensitive at layer 1. Eq. 2:
    layer 0 N = [55, 47, 39, 49], layer 1 N = [10, 20, 30, 40]; top-2 -> keys {0, 3} and {7, 6}.
    The cache starts with {0, 1, 4, 5}: 3 loads (3, 6, 7), 3 evictions (1, 4, 5)."""
    p = emoe_planner(period=1)
    r0, r1, r2 = req(0, "math", 10), req(1, "code", 40), req(2, "math", 20)
    first = run(p, [[1, 0, 0, 0], [1, 0, 0, 0]], [r0], [r0])  # prompt 0: every expert served, none loaded
    assert first.load_s == [] and first.hits == 2
    plan = run(p, [[1, 0, 0, 1], [0, 0, 1, 1]], [r1, r2], [r0, r1, r2])  # prompts 1 and 2 call the predictor
    assert set(np.flatnonzero(p.cache.resident)) == {0, 3, 6, 7}
    assert len(plan.load_s) == 3 and plan.load_issue_after == [-1, -1, -1]  # queued at the start, layer order
    assert (plan.hits, plan.misses, plan.prefetch_hits) == (4, 0, 3)  # 3, 6, 7 wait for their loads; 0 does not
    assert p.cache.evictions == 3
    assert plan.op_kind.count("predictor") == 2
    assert p.routing_fidelity == 1.0


def test_emoe_calls_the_predictor_every_period_prompts_and_serves_everything_before_the_first_call():
    """Period 3, one new prompt per iteration: the predictor runs at prompts 3 and 6 (each call one op of
    predictor_s on the stream); prompts 0-2 fetch their misses into the cache instead of rerouting."""
    p = emoe_planner(period=3, predictor_s=0.25)
    calls, rerouted_before = [], []
    for i in range(7):
        r = req(i, "code", 8)
        plan = run(p, [[0, 0, 1, 0], [0, 0, 0, 1]], [r], [r])
        calls.append(plan.op_kind.count("predictor"))
        if i < 3:
            rerouted_before.append(p.num_rerouted)
            assert sum(op for op, kind in zip(plan.op_s, plan.op_kind) if kind == "predictor") == 0
    assert calls == [0, 0, 0, 1, 0, 0, 1]
    assert rerouted_before == [0, 0, 0]
    assert p.residency.planner.num_predictor_calls == 2
    assert p.predictor_calls == 2 and p.offload_summary()["predictor_busy_s"] == pytest.approx(0.5)


# ---------------------------------------------------------------- miss handling and routing fidelity


def static_planner(miss: str) -> OffloadPlanner:
    """Popularity [[4,3,2,1],[1,2,3,4]], 4 slots: pinned {0, 1} and {6, 7} (keys); start {0, 1, 4, 5}."""
    pop = np.array([[4, 3, 2, 1], [1, 2, 3, 4]], dtype=float)
    return planner(4, residency=StaticHotResidency(pop, 4), miss=miss)


def test_reroute_moves_missed_assignments_to_the_preferred_resident_expert_and_counts_fidelity():
    """Counts [[2,0,3,0],[1,1,0,2]] (9 assignments). Layer 0: expert 2 absent, its 3 go to expert 0
    (popularity 4 > 3). Layer 1: experts 0 and 1 absent, their 2 go to expert 3. Fidelity 4/9, no load
    besides the 2 residency loads (6, 7); demand hits: 0 and 7, misses: 2, 4, 5."""
    p = static_planner("reroute")
    plan = run(p, [[2, 0, 3, 0], [1, 1, 0, 2]])
    assert p.routing_fidelity == pytest.approx(4 / 9)
    assert (plan.hits, plan.misses, len(plan.load_s)) == (2, 3, 2)
    assert p.staged_loads == 0 and set(np.flatnonzero(p.cache.resident)) == {0, 1, 6, 7}
    five = float(toy_profile().expert_ffn_s(tokens=5, shape=MODEL.expert_shape))
    four = float(toy_profile().expert_ffn_s(tokens=4, shape=MODEL.expert_shape))
    assert plan.op_s[plan.op_kind.index("experts")] == pytest.approx(five)  # layer 0: expert 0 with 2 + 3 tokens
    assert plan.op_s[plan.op_kind.index("expert")] == pytest.approx(four)  # layer 1: expert 3 (in flight), 2 + 2


def test_fetch_streams_misses_through_staging_and_keeps_the_resident_set():
    """Same counts with miss: fetch: experts 2 (layer 0), 0 and 1 (layer 1) are loaded on demand
    (3 staged loads after the gates) without displacing the pinned set; fidelity stays 1."""
    p = static_planner("fetch")
    plan = run(p, [[2, 0, 3, 0], [1, 1, 0, 2]])
    assert p.routing_fidelity == 1.0
    assert len(plan.load_s) == 5 and p.staged_loads == 3 and plan.bypassed == 3
    assert set(np.flatnonzero(p.cache.resident)) == {0, 1, 6, 7}


def test_routing_fidelity_is_one_for_lru_and_below_one_for_rerouting_in_a_run(tmp_path: Path):
    profile = write_toy_profile(tmp_path)
    model = dict(tiny_model(num_experts=4, top_k=1).model_dump(mode="json"))
    common = dict(model=model, max_requests=4, output_tokens=4, hardware={"expert_memory": {"experts": 4}})
    lru = summarize(simulate(load(scenario_data(profile, policies={"expert_cache": {"name": "lru"}}, **common), tmp_path)))
    rer = summarize(simulate(load(scenario_data(profile, policies={"expert_cache": {"name": "static_hot", "miss": "reroute"}},
                                                **common), tmp_path)))
    assert lru["expert_cache"]["routing_fidelity"] == 1.0 and metrics_row(lru)["routing_fidelity"] == 1.0
    assert 0.0 < rer["expert_cache"]["routing_fidelity"] < 1.0
    assert metrics_row(rer)["routing_fidelity"] == rer["expert_cache"]["routing_fidelity"]
    assert rer["expert_cache"]["offload"]["rerouted"] > 0


# ---------------------------------------------------------------- the alternatives' loads


def test_pre_gated_loads_the_next_layer_during_the_current_one():
    """LRU, 4 slots, start {0, 1, 4, 5}; both layers use experts 2 and 3. Layer 0 has no pre-gate: 2 loads
    on demand (misses). Layer 0's gate selects layer 1's 6, 7: loaded while layer 0 computes (2 prefetches,
    used as prefetch hits). Accuracy 0 instead: layer 1's 2 assignments go to wrong experts (fidelity 1/2)."""
    p = planner(4, offload_prefetch="pre_gated", pregate_accuracy=1.0)
    plan = run(p, [[0, 0, 1, 1], [0, 0, 1, 1]])
    assert (plan.misses, plan.hits, plan.prefetch_hits, len(plan.load_s)) == (2, 2, 2, 4)
    assert plan.load_is_prefetch == [False, False, True, True]
    wrong = planner(4, offload_prefetch="pre_gated", pregate_accuracy=0.0, rng=np.random.default_rng(1))
    run(wrong, [[0, 0, 1, 1], [0, 0, 1, 1]])
    assert wrong.routing_fidelity == pytest.approx(0.5)


def test_prefetch_all_of_next_layer_loads_only_what_is_absent():
    """3 MoE layers x 4 experts, 11 slots: only key 11 (layer 2, expert 3) starts absent. Each layer uses
    expert 0, layer 2 expert 3. Prefetch-all loads key 11 once, after layer 1's gate; layer 2 waits for it
    (a prefetch hit). Plain LRU instead misses it at layer 2's gate."""
    model = tiny_model(num_experts=4, top_k=1, num_layers=3)
    counts = [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    p = planner(11, model, offload_prefetch="all_next_layer")
    plan = run(p, counts)
    assert (len(plan.load_s), plan.hits, plan.misses, plan.prefetch_hits) == (1, 3, 0, 1)
    gate_ops = [i for i, k in enumerate(plan.op_kind) if k == "gate"]
    assert plan.load_issue_after == [gate_ops[1]]
    lru = planner(11, model)
    plan = run(lru, counts)
    assert (len(plan.load_s), plan.hits, plan.misses) == (1, 2, 1)


def test_moe_infinity_prefetches_the_best_matching_activation_matrix_and_evicts_low_activation():
    """The collection holds one matrix [[0,0,1,1],[0,0,1,1]]; eviction scores: 2, 3, 6, 7 active once,
    then shallower layers. 4 slots start {0, 1, 4, 5}. Layer 0's misses 2, 3 evict 4, 5 (lowest: deep and
    inactive). The partial matrix matches the stored one, whose layer 1 says 6, 7: prefetched, evicting
    0, 1. Totals: 4 loads, 2 misses, 2 hits that were prefetches."""
    policy = ActivationPolicy(2, 4)
    matcher = ActivationMatcher(2, 4, capacity=8)
    matcher.add(np.array([[0, 0, 1, 1], [0, 0, 1, 1]]))
    policy.set_activation(matcher.activation())
    p = planner(4, policy=policy, matcher=matcher, offload_prefetch="moe_infinity")
    plan = run(p, [[0, 0, 1, 1], [0, 0, 1, 1]])
    assert (len(plan.load_s), plan.misses, plan.hits, plan.prefetch_hits) == (4, 2, 2, 2)
    assert set(np.flatnonzero(p.cache.resident)) == {2, 3, 6, 7}
    assert matcher.size == 2  # this iteration's matrix joined the collection


# ---------------------------------------------------------------- the predictor's own cost


def test_predictor_memory_comes_out_of_the_expert_memory_and_its_time_is_a_gemm(tmp_path: Path):
    """Tiny expert: 3 x 64 x 128 bf16 = 49,152 bytes. 10 experts of memory minus a 49,152-parameter bf16
    predictor (98,304 bytes = 2 experts) leaves 8 slots. One call: a 64 -> 768 GEMM over 2 MoE layers x
    top-1 = 2 tokens on the toy roofline."""
    profile = write_toy_profile(tmp_path)
    model = tiny_model(num_experts=4, top_k=1)
    pm = {"params": 49152, "hidden": 64, "dtype": "bf16"}
    data = scenario_data(profile, model=model.model_dump(mode="json"), hardware={"expert_memory": {"bytes": 10 * 49152}},
                         policies={"expert_cache": {"name": "emoe", "predictor": {"kind": "parametric", "model": pm}}})
    assert plan_memory(load(data, tmp_path)).expert_slots == 8
    shape = GemmShape(64, 768, "bf16")
    expected = roofline_s(shape.flops(2), shape.bytes_moved(2))
    assert predictor_call_s(toy_profile(), PredictorModelSpec(**pm), model) == pytest.approx(expected)


def test_learned_predictor_is_trained_on_the_first_part_of_the_trace_and_measured_on_the_rest(tmp_path: Path):
    profile = write_toy_profile(tmp_path)
    model = tiny_model(num_experts=4, top_k=1).model_dump(mode="json")
    data = scenario_data(profile, model=model, max_requests=3, hardware={"expert_memory": {"experts": 4}},
                         policies={"expert_cache": {"name": "emoe", "period": 1,
                                                    "predictor": {"kind": "learned", "variant": "L",
                                                                  "generated_sequences": 10, "generated_tokens": 20,
                                                                  "model": {"params": 1000, "hidden": 10}}}})
    data["workload"]["routing"] = {"kind": "zipf", "exponent": 1.5}
    data["workload"]["tasks"] = {"qa": 1, "conversation": 1}
    summary = summarize(simulate(load(data, tmp_path)))
    acc = summary["expert_cache"]["offload"]["predictor_accuracy"]
    assert acc["variant"] == "eMoE-L"
    assert acc["trained_tokens"] + acc["test_tokens"] == 10 * 20
    assert acc["trained_tokens"] == 2 * round(0.8 * 100)  # per task: 5 sequences x 20 tokens
    assert 0.0 <= acc["top_k_precision"] <= 1.0 and acc["random_precision"] == 0.25
    assert summary["expert_cache"]["offload"]["predictor_calls"] == 2  # prompts 1 and 2 (period 1)


def test_emoe_with_a_prefetch_policy_is_a_one_line_scenario_error(tmp_path: Path):
    profile = write_toy_profile(tmp_path)
    data = scenario_data(profile, model=tiny_model(num_experts=4, top_k=1).model_dump(mode="json"),
                         hardware={"expert_memory": {"experts": 4}},
                         policies={"expert_cache": {"name": "emoe"}, "prefetch": {"name": "next_layer"}})
    with pytest.raises(ScenarioError, match=r"engine-test\.yaml: policies: expert_cache emoe brings its own loading; "
                                            r"use prefetch: \{name: none\} \(got next_layer\)$"):
        load(data, tmp_path)


def test_a_predictor_larger_than_the_expert_memory_is_named_in_the_capacity_error(tmp_path: Path):
    profile = write_toy_profile(tmp_path)
    data = scenario_data(profile, model=tiny_model(num_experts=4, top_k=1).model_dump(mode="json"),
                         hardware={"expert_memory": {"experts": 4}}, policies={"expert_cache": {"name": "emoe"}})
    with pytest.raises(CapacityError, match=r"holds no expert of 0\.00 GB after the eMoE predictor's 0\.216 GB"):
        simulate(load(data, tmp_path))


# ---------------------------------------------------------------- Algorithm 1 inside the engine


def two_requests(tmp_path: Path, per_token_s: float):
    profile = write_toy_profile(tmp_path)
    data = scenario_data(profile, max_requests=2, rate_per_s=1e5, output_tokens=200,
                         policies={"expert_cache": {"name": "all_resident"},
                                   "scheduler": {"name": "emoe_slo", "slo_s": {"t": 5.0}, "per_token_s": per_token_s,
                                                 "expected_output_tokens": {"t": 200}}})
    data["workload"]["tasks"] = {"t": 1.0}
    result = simulate(load(data, tmp_path))
    first, second = result.requests.sort_values("arrived_at_s").itertuples()
    assert second.arrived_at_s < first.finished_at_s  # the second arrives while the first runs
    return first, second, summarize(result)


def test_algorithm1_holds_a_request_that_would_push_a_running_one_past_its_slo(tmp_path: Path):
    """c = 1 s/token: admitting 8 more input tokens makes the running request's estimate
    t = 0 (same task: no expert load) + (8 + n*G) * 1 s + r >= 8 s > its 5 s SLO, so the second request
    waits until the first has finished (then nothing running is left to protect)."""
    first, second, summary = two_requests(tmp_path, per_token_s=1.0)
    assert second.admitted_at_s >= first.finished_at_s
    assert summary["expert_cache"]["admission_refusals"] >= 1


def test_algorithm1_admits_when_the_estimate_stays_within_the_slo(tmp_path: Path):
    first, second, summary = two_requests(tmp_path, per_token_s=0.0)
    assert second.admitted_at_s < first.finished_at_s
    assert "admission_refusals" not in summary["expert_cache"]


def test_timeline_of_an_emoe_plan_is_exact():
    """The residency loads are ordinary loads of the plan: the iteration holds open until they finish."""
    p = emoe_planner(period=1)
    r0, r1 = req(0, "math", 10), req(1, "code", 40)
    run(p, [[1, 0, 0, 0], [1, 0, 0, 0]], [r0], [r0])
    plan = run(p, [[1, 0, 0, 0], [0, 0, 0, 1]], [r1], [r0, r1])
    timing = time_plan(plan)
    assert timing.loads == len(plan.load_s) > 0
    assert timing.duration_s >= sum(plan.load_s)
