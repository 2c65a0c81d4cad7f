"""Faults on expert-parallel members (sim/engine/ep_faults.py): a failed GPU takes its rank's experts away
until its shard is restored; tokens are rerouted, spread, or their iteration waits.

Toy profile (tests/engine_fixtures.py): host link 10 GB/s + 1 ms, gpu_to_gpu 100 GB/s + 10 us. The model
has 8 experts over 4 ranks (2 per rank, contiguous), 3 MoE layers, top-2, zipf routing."""

from __future__ import annotations

import numpy as np
import pytest

from engine_fixtures import load, scenario_data, tiny_model, write_toy_profile
from sim.engine.ep_faults import Failover
from sim.engine.simulation import simulate
from sim.metrics import expert_parallel_summary

MODEL8 = {"name": "tiny-moe", "hidden_size": 64, "num_layers": 3, "vocab_size": 128, "attention_type": "mha",
          "num_attention_heads": 2, "num_kv_heads": 2, "head_dim": 32, "num_experts": 8, "top_k": 2,
          "expert_ffn_size": 128}
FAIL_GPU1 = {"kind": "gpu_fail", "gpu": 1, "at_s": 0.1, "duration_s": 0.05}


def _data(tmp_path, faults=None, num_gpus=4, ep=4, max_requests=20):
    data = scenario_data(write_toy_profile(tmp_path), model=MODEL8, max_requests=max_requests, output_tokens=6,
                         rate_per_s=50.0, hardware={"gpu_memory_bytes": 1.0e9, "num_gpus": num_gpus,
                                                    "parallelism": {"ep": ep}},
                         policies={"expert_cache": {"name": "all_resident"}})
    data["workload"]["routing"] = {"kind": "zipf", "exponent": 1.0}
    if faults:
        data["faults"] = faults
    return data


def _all_served(result):
    req = result.requests
    assert (req["status"] == "completed").all()
    assert (req["generated_tokens"] == req["output_tokens"]).all()


def test_a_fault_after_the_run_equals_the_fault_free_ep_run(tmp_path):
    base = simulate(load(_data(tmp_path), tmp_path))
    late = simulate(load(_data(tmp_path, {"events": [{**FAIL_GPU1, "at_s": 1e6}]}), tmp_path))
    assert base.requests.equals(late.requests)
    assert base.iterations.equals(late.iterations)
    assert late.extra["faults"]["expert_failover"]["routing_fidelity"] == 1.0


@pytest.mark.parametrize("policy", ["reroute", "spread"])
def test_a_failed_member_reroutes_its_tokens_and_every_request_ends(tmp_path, policy):
    result = simulate(load(_data(tmp_path, {"events": [FAIL_GPU1], "expert_failover": policy}), tmp_path))
    _all_served(result)
    fo = expert_parallel_summary(result)["failover"]
    assert fo["policy"] == policy
    assert 0 < fo["rerouted_fraction"] and fo["routing_fidelity"] == pytest.approx(1 - fo["rerouted_fraction"])
    assert fo["routing_fidelity"] < 1 and fo["waiting_fraction"] == 0 and fo["faulted_iterations"] > 0
    assert fo["rerouted_while_down_fraction"] > fo["rerouted_fraction"]
    # While rank 1 was down it computed no token-expert pair and held no sequence.
    planner = result.replicas[0].planner
    assert planner.stats.device_tokens[:, 1].sum() < planner.stats.device_tokens[:, 0].sum()


def test_restore_moves_the_members_shard_over_the_recovery_source(tmp_path):
    """Shard = non-expert weights (tp = 1: all of them) + the rank's 2 experts x 3 MoE layers; host:
    1 ms + shard / 10 GB/s; peer on the same node: 10 us + shard / 100 GB/s."""
    model = tiny_model(**{k: v for k, v in MODEL8.items() if k != "name"})
    shard = model.non_expert_weight_bytes + 2 * model.num_moe_layers * model.expert_bytes
    host_s, peer_s = 1e-3 + shard / 10e9, 1e-5 + shard / 100e9
    # dp 1: no other GPU holds rank 1's experts, so a peer restore falls back to the host; dp 2: GPU 5 holds it.
    for source, gpus, seconds, origin in (("host", 4, host_s, "host"), ("peer", 4, host_s, "host (no live peer holds the shard)"),
                                          ("peer", 8, peer_s, "peer (gpu_to_gpu)")):
        result = simulate(load(_data(tmp_path, {"events": [FAIL_GPU1], "recovery": {"source": source}}, num_gpus=gpus),
                               tmp_path))
        rec = result.extra["faults"]["recoveries"][0]
        assert rec["restore_bytes"] == pytest.approx(shard)
        assert (rec["restore_s"], rec["source"]) == (pytest.approx(seconds), origin)
        assert rec["restored_at_s"] == pytest.approx(0.15 + seconds)


def test_wait_stalls_until_the_restore_and_loses_nothing(tmp_path):
    result = simulate(load(_data(tmp_path, {"events": [FAIL_GPU1], "expert_failover": "wait"}), tmp_path))
    _all_served(result)
    fo = result.extra["faults"]["expert_failover"]
    assert fo["routing_fidelity"] == 1.0 and fo["rerouted_fraction"] == 0
    assert fo["blocked_iterations"] >= 1 and fo["waiting_fraction"] > 0
    restored = result.extra["faults"]["recoveries"][0]["restored_at_s"]
    it = result.iterations
    # The stalled iteration started before the failure ended and its tokens came only after the restore.
    stalled = it[(it["started_at_s"] < restored) & (it["started_at_s"] + it["duration_s"] > restored)]
    assert len(stalled) == 1 and fo["wait_s"] == pytest.approx(restored - float(stalled["started_at_s"].iloc[0]))


def test_wait_with_a_member_that_never_returns_hands_the_group_back(tmp_path):
    """dp 2 x ep 4: GPU 1 fails for good under wait: its group fails, its requests are re-queued on the other."""
    never = {"kind": "gpu_fail", "gpu": 1, "at_s": 0.1}
    result = simulate(load(_data(tmp_path, {"events": [never], "expert_failover": "wait"}, num_gpus=8), tmp_path))
    _all_served(result)
    assert not result.replicas[0].alive and result.replicas[1].alive
    assert result.extra["faults"]["unrecovered"] == 1


def test_failover_renormalises_a_replicated_experts_share_and_blocks_only_on_waiting_pairs():
    import simpy

    fo = Failover(simpy.Environment(), 2, "wait")
    share = np.zeros((1, 2, 2))
    share[0, 0] = [0.5, 0.5]  # expert 0 on both ranks
    share[0, 1] = [0.0, 1.0]  # expert 1 on rank 1 only
    kept = np.array([[[4, 0]], [[2, 0]]])  # only expert 0 requested
    fo.set_alive(1, False)
    out, live = fo.apply(kept, share)
    assert np.array_equal(out, kept) and live[0, 0].tolist() == [1.0, 0.0] and fo.block() is None
    out, _ = fo.apply(np.array([[[1, 3]], [[0, 0]]]), share)  # expert 1 is down: the iteration waits
    assert fo.block() is not None and fo.stats.waiting == 4


def test_a_slow_member_slows_its_rank_only_while_the_fault_lasts(tmp_path):
    """gpu_slow x 4 on GPU 1 makes rank 1 the straggler: more straggler wait than the fault-free run; after the
    fault its factor is back to the static one (1)."""
    base = simulate(load(_data(tmp_path), tmp_path))
    slow = simulate(load(_data(tmp_path, {"events": [{"kind": "gpu_slow", "gpu": 1, "at_s": 0.0, "duration_s": 0.2,
                                                      "factor": 4.0}]}), tmp_path))
    _all_served(slow)
    planner = slow.replicas[0].planner
    assert planner.stats.straggler_wait_s.sum() > base.replicas[0].planner.stats.straggler_wait_s.sum()
    assert planner.slowdown.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_losing_every_member_for_good_ends_every_request(tmp_path):
    """The whole group's node fails for good at 0.1 s: the group fails, and each request ends completed
    (before), failed (in flight) or rejected (arrived after), none unfinished."""
    result = simulate(load(_data(tmp_path, {"events": [{"kind": "node_fail", "node": 0, "at_s": 0.1}]}), tmp_path))
    status = result.requests["status"]
    assert set(status) <= {"completed", "failed", "rejected"} and (status != "completed").any()
    assert (status == "completed").any() and not result.partial
