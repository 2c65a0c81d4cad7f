"""Expert parallelism: link topology and collectives, placement, capacity-aware drop/reroute, the EP
planner's timeline (checked against the SimPy reference), and scenario errors.

Toy profile (tests/engine_fixtures.py): NVLink 100 GB/s per GPU port with 10 us latency, the host link
(the PCIe port) 10 GB/s with 1 ms latency, NICs 10 GB/s with 100 us latency. The 8-expert tiny model
has hidden 64, so one token's hidden state is 64 x 2 B (bf16) = 128 B."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_fixtures import TINY_MODEL, load, scenario_data, tiny_model, toy_profile, write_toy_profile
from sim.engine.expert_parallel import ExpertParallelPlanner, MicroBatch, _rank_work
from sim.engine.iteration import BatchShape, IterationPlanner, time_plan
from sim.engine.placement import ExpertPlacement, contiguous, load_balanced, replicate, round_robin
from sim.engine.reference import time_plan_with_simpy
from sim.engine.simulation import simulate
from sim.engine.topology import build_topology
from sim.errors import ScenarioError
from sim.policies.cache import make_cache
from sim.policies.capacity import capacity, expanded_drop, reroute, threshold_drop, token_drop
from sim.policies.ep_specs import ExpertParallelSpec, PlacementSpec, TopologySpec

TOKEN_BYTES = 64 * 2
MODEL8 = {**TINY_MODEL, "num_experts": 8, "top_k": 2, "num_layers": 3}


# ---------------------------------------------------------------- topology


def test_uniform_all_to_all_on_nvlink_is_bytes_per_port_over_bandwidth_plus_latency():
    """8 GPUs, every GPU sends 1 MB to every other: each port moves 7 MB at 100 GB/s = 70 us, + 10 us."""
    topo = build_topology(TopologySpec(intra_node="nvlink"), toy_profile(), group_gpus=8, gpus_per_node=8)
    flows = np.full((8, 8), 1e6)
    assert topo.all_to_all_s(flows) == pytest.approx(7e6 / 100e9 + 1e-5)


def test_pcie_all_to_all_contends_on_the_shared_host_bridge():
    """56 flows of 1 MB cross the node's one bridge (10 GB/s): 56 MB / 10 GB/s = 5.6 ms, + 1 ms latency."""
    topo = build_topology(TopologySpec(intra_node="pcie"), toy_profile(), group_gpus=8, gpus_per_node=8)
    assert topo.all_to_all_s(np.full((8, 8), 1e6)) == pytest.approx(56e6 / 10e9 + 1e-3)
    wide = build_topology(TopologySpec(intra_node="pcie", host_bridge_gbps=1000), toy_profile(), group_gpus=8, gpus_per_node=8)
    assert wide.all_to_all_s(np.full((8, 8), 1e6)) == pytest.approx(7e6 / 10e9 + 1e-3)  # then the x16 port binds


def test_two_nodes_all_to_all_is_bound_by_the_nic():
    """2 nodes x 4 GPUs: each GPU sends 4 MB off-node through its 10 GB/s NIC = 400 us, + 100 us latency."""
    topo = build_topology(TopologySpec(), toy_profile(), group_gpus=8, gpus_per_node=4)
    assert topo.all_to_all_s(np.full((8, 8), 1e6)) == pytest.approx(4e6 / 10e9 + 1e-4)


def test_local_bytes_are_free_and_layers_are_independent():
    topo = build_topology(TopologySpec(), toy_profile(), group_gpus=2, gpus_per_node=8)
    flows = np.array([[[5e6, 0.0], [0.0, 5e6]], [[0.0, 1e6], [0.0, 0.0]]])
    assert topo.all_to_all_s(flows) == pytest.approx([0.0, 1e6 / 100e9 + 1e-5])


def test_ring_all_reduce_of_two_gpus():
    """n = 2: 2 steps of nbytes / 2 each: 2 x (0.5 MB / 100 GB/s + 10 us)."""
    topo = build_topology(TopologySpec(), toy_profile(), group_gpus=2, gpus_per_node=8)
    assert topo.all_reduce_s(1e6, np.arange(2)) == pytest.approx(2 * (0.5e6 / 100e9 + 1e-5))
    assert topo.all_reduce_s(1e6, np.arange(1)) == 0.0


# ---------------------------------------------------------------- placement


def test_contiguous_and_round_robin():
    assert contiguous(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert round_robin(8, 4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_load_balanced_greedy_fills_the_lighter_rank():
    """8,7,6,5,4,3,2,1 on 2 ranks of 4 slots: 8->0, 7->1, 6->1, 5->0, 4->0 (tie), 3->1, 2->1, 1->0: 18 vs 18."""
    owner = load_balanced(np.array([8, 7, 6, 5, 4, 3, 2, 1]), 2)
    assert owner.tolist() == [0, 1, 1, 0, 0, 1, 1, 0]


def test_a_hot_expert_is_replicated_on_the_other_rank():
    share = replicate(np.array([0, 1]), np.array([9.0, 1.0]), 2, redundant=1)
    assert share.tolist() == [[0.5, 0.5], [0.0, 1.0]]


def test_placement_is_recomputed_from_observed_loads():
    placement = ExpertPlacement(PlacementSpec(name="load_balanced", recompute_every_iterations=2),
                                num_layers=1, num_experts=4, num_ranks=2)
    for _ in range(2):
        placement.observe(np.array([[10, 9, 1, 0]]))
    # 10 -> 0, 9 -> 1, 1 -> 1, 0 -> 0
    assert placement.share[0].argmax(axis=1).tolist() == [0, 1, 1, 0]
    assert placement.recomputations == 1


# ---------------------------------------------------------------- capacity


def test_capacity_definition():
    """ceil(gamma x k x T / E): 1.0 x 2 x 10 / 8 = 2.5 -> 3; never below 1."""
    assert capacity(1.0, 2, 10, 8) == 3
    assert capacity(0.01, 2, 1, 8) == 1


def test_token_drop_cuts_each_expert_at_capacity():
    counts = np.array([[[6, 2, 0, 0]]])  # one rank, one layer, 4 tokens x top-2 over 4 experts
    out = token_drop(counts, np.array([4]), top_k=2, gamma=1.0)  # capacity ceil(2) = 2
    assert out.kept.tolist() == [[[2, 2, 0, 0]]]
    assert (out.routed_pairs, out.dropped_pairs) == (8, 4)


def test_reroute_moves_overflow_to_the_next_best_expert():
    """k = 1, capacity 1: all three tokens want expert 0 (scores .6, .5, .4); token 0 keeps it, tokens 1
    and 2 move to their second choices (1 and 2), which have room."""
    cand = np.array([[0, 1, 2], [0, 1, 2], [0, 2, 1]])
    score = np.array([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2], [0.4, 0.35, 0.25]])
    one = reroute(cand, score, top_k=1, cap=1, rounds=1, num_ids=3)
    assert one.kept.tolist() == [1, 1, 1]
    assert (one.dropped_pairs, one.rerouted_pairs) == (0, 2)
    none = reroute(cand, score, top_k=1, cap=1, rounds=0, num_ids=3)
    assert none.kept.tolist() == [1, 0, 0] and none.dropped_pairs == 2


def test_expanded_drop_adds_local_experts_within_capacity():
    """k = 1, capacity 1, expert 2 is local: token 0 keeps expert 0; token 1 loses 0 but the local
    expert 2 takes it (higher score than token 0's)."""
    cand = np.array([[0, 1, 2], [0, 2, 1]])
    score = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    local = cand == 2
    out = expanded_drop(cand, score, top_k=1, cap=1, local_cand=local, num_ids=3)
    assert out.kept.tolist() == [1, 0, 1]
    assert (out.dropped_pairs, out.rerouted_pairs) == (1, 1)


def test_threshold_drop_uses_renormalised_top_k_scores():
    cand = np.array([[0, 1, 2], [1, 0, 2]])
    score = np.array([[0.5, 0.05, 0.45], [0.3, 0.3, 0.4]])  # top-2 renormalised: (.91, .09) and (.5, .5)
    out = threshold_drop(cand, score, top_k=2, threshold_of_id=np.full(3, 0.1))
    assert out.kept.tolist() == [2, 1, 0] and out.dropped_pairs == 1


# ---------------------------------------------------------------- the planner


def _planner(ep: int = 8, *, model: dict = MODEL8, intra: str = "nvlink", profile=None, **spec) -> ExpertParallelPlanner:
    profile = profile or toy_profile()
    m = tiny_model(**{k: v for k, v in model.items() if k != "name"})
    ep_spec = ExpertParallelSpec(**spec)
    topo = build_topology(TopologySpec(intra_node=intra), profile, group_gpus=ep, gpus_per_node=8)
    placement = ExpertPlacement(ep_spec.placement, num_layers=m.num_moe_layers, num_experts=m.num_experts, num_ranks=ep)
    return ExpertParallelPlanner(model=m, profile=profile, spec=ep_spec, topology=topo, ep=ep, tp=1, placement=placement)


def _microbatch(counts_src: np.ndarray, tokens_per_rank: list[int]) -> MicroBatch:
    ranks = [_rank_work([(r, 100, 1)] * 0 + [(r * 1000 + i, 100, 1) for i in range(t)]) for r, t in enumerate(tokens_per_rank)]
    return MicroBatch(ranks=ranks, counts_src=np.asarray(counts_src))


def _decode_batch(n: int) -> BatchShape:
    return BatchShape(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.full(n, 100, dtype=np.int64), n)


def test_uniform_routing_gives_the_analytical_all_to_all_time():
    """8 ranks x 8 tokens, top-2, one expert per rank, each rank sends 2 tokens to every expert: per
    layer each port moves 7 x 2 x 128 B = 1,792 B: 1792 / 100e9 + 10 us, for dispatch and combine."""
    planner = _planner()
    counts = np.full((8, 3, 8), 2)
    planner.plan(_decode_batch(64), [_microbatch(counts, [8] * 8)])
    expect = 7 * 2 * TOKEN_BYTES / 100e9 + 1e-5
    assert planner.stats.dispatch_s == pytest.approx([expect] * 3)
    assert planner.stats.combine_s == pytest.approx([expect] * 3)
    assert planner.stats.straggler_wait_s == pytest.approx([0.0] * 3, abs=1e-15)
    assert planner.stats.dispatch_bytes == pytest.approx(3 * 8 * 7 * 2 * TOKEN_BYTES)


def test_one_gpu_has_no_communication_and_matches_the_single_gpu_planner():
    profile = toy_profile()
    planner = _planner(ep=1, profile=profile)
    m = tiny_model(**{k: v for k, v in MODEL8.items() if k != "name"})
    single = IterationPlanner(model=m, profile=profile, cache=make_cache(
        "all_resident", num_layers=m.num_moe_layers, num_experts=8, capacity_experts=24, per_layer=False))
    counts = np.array([[5, 3, 0, 0, 1, 0, 0, 7], [2, 2, 2, 2, 2, 2, 2, 2], [16, 0, 0, 0, 0, 0, 0, 0]])
    batch = _decode_batch(8)
    ep_plan = planner.plan(batch, [_microbatch(counts[None], [8])])
    assert ep_plan.load_s == []
    assert time_plan(ep_plan).duration_s == pytest.approx(time_plan(single.plan(batch, counts)).duration_s, rel=1e-12)


def test_infinite_gamma_is_no_drop():
    counts = np.random.default_rng(1).integers(0, 9, size=(8, 3, 8))
    tokens = [8] * 8
    plain = _planner()
    huge = _planner(capacity={"name": "drop", "gamma": 1e12})
    a = plain.plan(_decode_batch(64), [_microbatch(counts, tokens)])
    b = huge.plan(_decode_batch(64), [_microbatch(counts, tokens)])
    assert a.op_s == b.op_s and a.load_s == b.load_s
    assert huge.stats.dropped_pairs == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), gamma=st.floats(0.1, 4.0), skew=st.floats(0.0, 3.0))
def test_dropping_never_makes_a_layer_slower(seed, gamma, skew):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 9) ** skew
    tokens = rng.integers(0, 12, size=8)
    counts = np.stack([[rng.multinomial(2 * t, p / p.sum()) for _ in range(3)] for t in tokens])
    counts = np.minimum(counts, tokens[:, None, None])
    plain, dropping = _planner(intra="pcie"), _planner(intra="pcie", capacity={"name": "drop", "gamma": gamma})
    a = plain._costs(_microbatch(counts, tokens.tolist()))
    b = dropping._costs(_microbatch(counts, tokens.tolist()))
    assert np.all(b.expert <= a.expert + 1e-15)
    assert np.all(b.dispatch <= a.dispatch + 1e-15) and np.all(b.combine <= a.combine + 1e-15)


def test_a_degraded_rank_becomes_the_straggler():
    counts = np.full((8, 3, 8), 2)
    slow = _planner(degraded_ranks={3: 2.0})
    fast = _planner()
    a = fast._costs(_microbatch(counts, [8] * 8))
    b = slow._costs(_microbatch(counts, [8] * 8))
    assert b.expert == pytest.approx(2 * a.expert)
    assert slow.stats.straggler_wait_s == pytest.approx(2 * a.expert - (9 / 8) * a.expert)


@pytest.mark.parametrize("overlap", [{"name": "none"}, {"name": "two_microbatch"}, {"name": "scmoe", "position": 1},
                                     {"name": "scmoe", "position": 2}, {"name": "scmoe", "position": 3}])
def test_overlap_timelines_agree_with_the_simpy_reference(overlap):
    planner = _planner(intra="pcie", overlap=overlap)
    counts = np.random.default_rng(3).integers(0, 5, size=(8, 3, 8))
    mbs = [_microbatch(counts, [8] * 8)] * (2 if overlap["name"] == "two_microbatch" else 1)
    plan = planner.plan(_decode_batch(64), mbs)
    assert plan.load_s  # communication exists
    fast, slow = time_plan(plan), time_plan_with_simpy(plan)
    assert fast.duration_s == pytest.approx(slow.duration_s, rel=1e-12)
    assert fast.stall_s == pytest.approx(slow.stall_s, rel=1e-9, abs=1e-15)


def test_scmoe_hides_communication_behind_attention_and_shared_expert():
    """With a shared expert, ScMoE position 2 leaves less communication exposed than no overlap (the
    compute is the same, the order differs)."""
    model = {**MODEL8, "num_shared_experts": 1, "shared_expert_ffn_size": 128}
    counts = np.full((8, 3, 8), 2)
    base = _planner(intra="pcie", model=model)
    sc = _planner(intra="pcie", model=model, overlap={"name": "scmoe", "position": 2})
    a = time_plan(base.plan(_decode_batch(64), [_microbatch(counts, [8] * 8)]))
    b = time_plan(sc.plan(_decode_batch(64), [_microbatch(counts, [8] * 8)]))
    assert b.compute_busy_s == pytest.approx(a.compute_busy_s)
    assert b.stall_s < a.stall_s and b.duration_s < a.duration_s


# ---------------------------------------------------------------- scenarios and end to end


def _ep_data(tmp_path, hardware, policies=None, **kw):
    profile = write_toy_profile(tmp_path)
    big = {**MODEL8, "hidden_size": 64}
    pol = {"expert_cache": {"name": "all_resident"}, **(policies or {})}
    data = scenario_data(profile, model=big, hardware={"gpu_memory_bytes": 1.0e9, **hardware}, policies=pol, **kw)
    data["workload"]["routing"] = {"kind": "zipf", "exponent": 1.0}
    return data


@pytest.mark.parametrize("hardware, message", [
    ({"num_gpus": 8, "parallelism": {"ep": 3}}, "ep x tp = 3 x 1 = 3 GPUs per replica does not divide num_gpus (8)"),
    ({"num_gpus": 8, "parallelism": {"ep": 4, "dp": 3}}, "dp x ep x tp = 3 x 4 x 1 = 12 must equal num_gpus (8)"),
    ({"num_gpus": 6, "parallelism": {"ep": 3}}, "hardware.parallelism.ep: 3 ranks do not divide the 8 routed experts"),
])
def test_parallelism_that_does_not_divide_is_a_one_line_error(tmp_path, hardware, message):
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(_ep_data(tmp_path, hardware), tmp_path)


def test_expert_parallel_needs_resident_experts(tmp_path):
    data = _ep_data(tmp_path, {"num_gpus": 2, "parallelism": {"ep": 2}})
    data["policies"]["expert_cache"] = {"name": "lru"}
    with pytest.raises(ScenarioError, match="policies.expert_cache: expert parallelism keeps every expert resident"):
        load(data, tmp_path)


def test_ep1_scenario_is_the_single_gpu_engine(tmp_path):
    plain = simulate(load(_ep_data(tmp_path, {"num_gpus": 2}, max_requests=6, output_tokens=4), tmp_path))
    explicit = simulate(load(_ep_data(tmp_path, {"num_gpus": 2, "parallelism": {"ep": 1, "tp": 1, "dp": 2}},
                                      max_requests=6, output_tokens=4), tmp_path))
    assert plain.requests.equals(explicit.requests)


def test_gamma_to_infinity_end_to_end_equals_no_drop(tmp_path):
    hw = {"num_gpus": 8, "parallelism": {"ep": 8}}
    none = simulate(load(_ep_data(tmp_path, hw, max_requests=12, output_tokens=5, rate_per_s=50.0), tmp_path))
    huge = simulate(load(_ep_data(tmp_path, hw, {"expert_parallel": {"capacity": {"name": "drop", "gamma": 1e12}}},
                                  max_requests=12, output_tokens=5, rate_per_s=50.0), tmp_path))
    assert none.requests.equals(huge.requests)
    tight = simulate(load(_ep_data(tmp_path, hw, {"expert_parallel": {"capacity": {"name": "drop", "gamma": 0.5}}},
                                   max_requests=12, output_tokens=5, rate_per_s=50.0), tmp_path))
    assert tight.replicas[0].planner.stats.dropped_pairs > 0
    assert tight.requests["e2e_s"].sum() <= none.requests["e2e_s"].sum()


@pytest.mark.parametrize("capacity", [{"name": "reroute", "gamma": 1.0, "rounds": 2}, {"name": "expanded_drop", "gamma": 1.0},
                                      {"name": "threshold", "threshold": 0.3}])
def test_scored_capacity_policies_run_end_to_end(tmp_path, capacity):
    hw = {"num_gpus": 4, "parallelism": {"ep": 4}}
    res = simulate(load(_ep_data(tmp_path, hw, {"expert_parallel": {"capacity": capacity, "overlap": {"name": "two_microbatch"}}},
                                 max_requests=8, output_tokens=4, rate_per_s=50.0), tmp_path))
    st_ = res.replicas[0].planner.stats
    assert (res.requests["status"] == "completed").all()
    assert st_.routed_pairs > 0 and st_.dropped_pairs + st_.rerouted_pairs > 0


def test_scored_capacity_needs_generated_routing(tmp_path):
    data = _ep_data(tmp_path, {"num_gpus": 2, "parallelism": {"ep": 2}},
                    {"expert_parallel": {"capacity": {"name": "reroute", "gamma": 1.0}}})
    data["workload"]["routing"] = {"kind": "markov", "family": "mixtral"}
    with pytest.raises(ScenarioError, match="capacity: reroute needs per-token gate scores"):
        load(data, tmp_path)


def test_tensor_parallel_ranks_over_two_nodes_run_end_to_end(tmp_path):
    """dp 1 x ep 2 x tp 2 on 2 nodes of 2 GPUs: the all-to-all crosses the NICs, attention all-reduces
    inside each rank; every request completes and dispatch bytes are counted."""
    hw = {"num_gpus": 4, "num_nodes": 2, "parallelism": {"ep": 2, "tp": 2}}
    res = simulate(load(_ep_data(tmp_path, hw, max_requests=6, output_tokens=4, rate_per_s=50.0), tmp_path))
    planner = res.replicas[0].planner
    assert (res.requests["status"] == "completed").all()
    assert planner.topology.node_of.tolist() == [0, 0, 1, 1]
    assert planner.stats.dispatch_bytes > 0 and planner.stats.dispatch_s.sum() > 0


@pytest.mark.parametrize("kind", ["uniform", "markov", "replay"])
def test_grouped_routing_counts_give_each_rank_its_own_tokens(kind, tmp_path):
    """Each group's counts sum to its tokens x top_k per layer; for the Markov source one group is
    exactly ``counts`` (same draws, same order)."""
    from sim.workload.routing import MarkovRouting, RecordedSequence, ReplayedRouting, UniformRouting, build_routing

    segments = [(0, 0, 1), (1, 5, 1), (2, 0, 40), (3, 2, 1), (4, 0, 3)]
    groups = [0, 1, 1, 2, 0]
    if kind == "replay":
        rng = np.random.default_rng(0)
        seqs = [RecordedSequence(str(i), np.argsort(rng.random((50, 3, 8)), axis=2)[:, :, :2]) for i in range(3)]
        make = lambda: ReplayedRouting(seqs, 8)  # noqa: E731
    else:
        spec = UniformRouting() if kind == "uniform" else MarkovRouting(kind="markov", family="mixtral")
        make = lambda: build_routing(spec, num_layers=3, num_experts=8, top_k=2,  # noqa: E731
                                     rng=np.random.default_rng(7), base_dir=tmp_path)
    grouped = make().counts_by_group(segments, groups, 3)
    tokens = np.array([1 + 3, 1 + 40, 1])
    assert grouped.sum(axis=2).tolist() == (2 * tokens[:, None] * np.ones((1, 3), dtype=int)).tolist()
    if kind == "markov":
        assert make().counts(segments).tolist() == make().counts_by_group(segments, [0] * 5, 1)[0].tolist()


def test_threshold_drop_on_replayed_real_mixtral_routing_uses_the_trace_scores(tmp_path):
    """Real Mixtral-8x7B top-2 routing (GSM8K, ../shared, no licence: read, never copied) with its gate
    scores: a threshold of 0.5 on the renormalised top-2 scores drops every pair but the top-1 (ties kept),
    so at most half the pairs survive; 0.01 keeps almost all."""
    from pathlib import Path

    trace = (Path(__file__).resolve().parents[2] / "shared" / "data" / "expert_routing"
             / "mixtral_8x7b_per_token_speculative_moe" / "gsm8k_2_routing.jsonl")
    mixtral = {"name": "mixtral-8x7b"}
    fractions = []
    for threshold in (0.5, 0.01):
        data = _ep_data(tmp_path, {"num_gpus": 8, "parallelism": {"ep": 8}, "gpu_memory_bytes": None},
                        {"expert_parallel": {"capacity": {"name": "threshold", "threshold": threshold, "load_aware": False}}},
                        max_requests=4, output_tokens=3, prompt_tokens=4, rate_per_s=50.0)
        data["model"] = mixtral
        data["hardware"] = {"profile": "h100-80gb", "num_gpus": 8, "parallelism": {"ep": 8}}
        data["workload"]["routing"] = {"kind": "replay", "path": str(trace), "format": "jsonl"}
        res = simulate(load(data, tmp_path))
        st_ = res.replicas[0].planner.stats
        fractions.append(st_.dropped_pairs / st_.routed_pairs)
    assert 0.45 <= fractions[0] <= 0.5
    assert fractions[1] < 0.05


def test_run_and_sweep_reports_show_the_expert_parallel_figures(tmp_path):
    import pandas as pd

    from sim.metrics import summarize
    from sim.report.render import render_run_report, render_sweep_report
    from sim.run_folder import write_run_folder

    hw = {"num_gpus": 4, "parallelism": {"ep": 4}}
    res = simulate(load(_ep_data(tmp_path, hw, {"expert_parallel": {"capacity": {"name": "drop", "gamma": 1.0}}},
                                 max_requests=6, output_tokens=4, rate_per_s=50.0), tmp_path))
    summary = summarize(res)
    ep = summary["expert_parallel"]
    assert (ep["dp"], ep["ep"], ep["tp"]) == (1, 4, 1) and ep["routed_pairs"] > 0
    folder = write_run_folder(res, summary, tmp_path / "run")
    layers = pd.read_csv(folder / "ep_layers.csv")
    assert len(layers) == 3 and (layers["dispatch_s"] > 0).all()
    html = render_run_report(folder).read_text()
    assert "Expert parallelism" in html and 'alt="imbalance heatmap"' in html and 'alt="per-layer time breakdown"' in html
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    pd.DataFrame({"point": [0, 1], "policies.expert_parallel.capacity.gamma": [1.0, 1000.0], "key": ["a", "b"],
                  "requests_per_s": [2.0, 1.0], "ep_moe_s_per_kpair": [0.5, 1.0], "ep_dropped_fraction": [0.1, 0.0]}
                 ).to_csv(sweep / "sweep.csv", index=False)
    assert 'alt="speedup against gamma"' in render_sweep_report(sweep).read_text()
