"""Invariants of whole runs over random small scenarios (hypothesis).

Each example is a tiny MoE model on the toy profile with a few dozen requests at most and a KV cache
of a few blocks, so admission, rejection, queue timeouts and preemption (recompute or swap) all happen.
Whatever the policies, a run must account for every request, never hold more KV blocks or experts
than memory allows, never keep a resource busy longer than the wall clock, never emit a token before
its request arrived, and repeat itself exactly for the same seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import Phase, given, reject, settings
from hypothesis import strategies as st

from sim.engine.simulation import SimulationResult, simulate
from sim.errors import CapacityError
from sim.scenario import LoadedScenario

from engine_fixtures import TINY_MODEL, load, scenario_data, tiny_model, write_toy_profile

EPS = 1e-9


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy-profile")
    write_toy_profile(folder)
    return folder


@st.composite
def scenarios(draw, folder: Path) -> dict[str, Any]:
    """A scenario mapping (printed as is when an example fails)."""
    num_experts = draw(st.sampled_from([2, 4]))
    model = {**TINY_MODEL, "num_experts": num_experts, "top_k": draw(st.integers(1, 2))}
    spec = tiny_model(**model)
    total_experts = spec.num_moe_layers * spec.num_experts
    cache = draw(st.sampled_from(["all_resident", "lru", "lfu"]))
    scope = draw(st.sampled_from(["global", "per_layer"]))
    fewest_slots = spec.num_moe_layers if scope == "per_layer" else 1  # fewer is a PolicyError
    slots = total_experts if cache == "all_resident" else draw(st.integers(fewest_slots, total_experts))
    low, spread = draw(st.integers(1, 48)), draw(st.integers(0, 40))
    out_low, out_spread = draw(st.integers(1, 24)), draw(st.integers(0, 16))
    block_tokens = draw(st.sampled_from([4, 16]))
    # Room for a request of middling length, so the longest ones are rejected and a few at once
    # preempt each other. (When even the shortest drawn request does not fit, simulate raises.)
    fewest_blocks = -(-(low + spread // 2 + out_low + out_spread // 2) // block_tokens)
    kv_blocks = draw(st.integers(fewest_blocks, fewest_blocks + 12))
    block_bytes = block_tokens * spec.kv_bytes_per_token
    # Memory for exactly this many KV blocks once weights and expert slots are placed (no reserve).
    gpu_bytes = spec.non_expert_weight_bytes + slots * spec.expert_bytes + (kv_blocks + 0.5) * block_bytes
    policies: dict[str, Any] = {
        "scheduler": {"name": draw(st.sampled_from(["fcfs", "shortest_prompt_first"]))},
        "batching": {
            "max_num_seqs": draw(st.integers(1, 8)),
            "max_batch_tokens": draw(st.integers(8, 128)),
            "chunked_prefill": draw(st.booleans()),
            "kv_block_tokens": block_tokens,
            "queue_timeout_s": draw(st.one_of(st.none(), st.floats(1e-3, 0.2))),
        },
        "preemption": {"mode": draw(st.sampled_from(["recompute", "swap"]))},
        "expert_cache": {"name": cache}
        if cache == "all_resident"
        else {"name": cache, "scope": scope},
        "prefetch": draw(
            st.sampled_from(
                [{"name": "none"}, {"name": "next_layer"}, {"name": "next_layer", "predictor": "frequency"}]
            )
        ),
    }
    data = scenario_data(
        folder / "toy-round.yaml",
        model=model,
        max_requests=draw(st.integers(1, 30)),
        rate_per_s=draw(st.sampled_from([10.0, 100.0, 1000.0])),
        seed=draw(st.integers(0, 2**16)),
        hardware={
            "num_gpus": draw(st.integers(1, 2)),
            "gpu_memory_bytes": gpu_bytes,
            "reserve_fraction": 0.0,
            "expert_memory": {"all": True} if cache == "all_resident" else {"experts": slots},
        },
        policies=policies,
    )
    data["workload"]["arrivals"]["prompt_tokens"] = {"dist": "uniform", "low": low, "high": low + spread}
    data["workload"]["arrivals"]["output_tokens"] = {"dist": "uniform", "low": out_low, "high": out_low + out_spread}
    data["workload"]["routing"] = draw(st.sampled_from([{"kind": "uniform"}, {"kind": "zipf", "exponent": 1.2}]))
    return data


def check_invariants(result: SimulationResult) -> None:
    req = result.requests
    it = result.iterations
    budget = result.budget
    batching = result.loaded.scenario.policies.batching

    # Conservation: every arrival ends completed, rejected or dropped; none is left in flight.
    assert not result.partial
    assert len(req) == result.extra["num_arrivals"]
    counts = req["status"].value_counts()
    assert counts.get("completed", 0) + counts.get("rejected", 0) + counts.get("dropped", 0) == len(req), counts
    done = req["status"] == "completed"
    assert (req.loc[done, "generated_tokens"] == req.loc[done, "output_tokens"]).all()
    assert (req.loc[~done, "reason"] != "").all()
    assert (req["finished_at_s"] >= req["arrived_at_s"]).all()

    # No token before arrival; the first token comes no later than the last.
    emitted = req["first_token_at_s"].notna()
    assert (req.loc[emitted, "first_token_at_s"] >= req.loc[emitted, "arrived_at_s"]).all()
    assert (req.loc[done, "ttft_s"] <= req.loc[done, "e2e_s"] + EPS).all()
    assert (req.loc[done, "ttft_s"] >= 0).all()
    admitted = req["admitted_at_s"].notna()
    assert (req.loc[admitted, "admitted_at_s"] >= req.loc[admitted, "arrived_at_s"]).all()
    assert (result.tbt_samples_s >= 0).all()

    if not len(it):
        return
    # Memory: never more KV blocks or experts than the split made room for.
    assert (it["kv_blocks_used"] <= budget.kv_blocks).all(), (it["kv_blocks_used"].max(), budget.kv_blocks)
    assert (it["kv_blocks_used"] >= 0).all()
    assert (it["experts_resident"] <= budget.expert_slots).all(), (it["experts_resident"].max(), budget.expert_slots)
    # Batching limits.
    assert (it["num_tokens"] <= batching.max_batch_tokens).all()
    assert (it["num_prefill_seqs"] + it["num_decode_seqs"] <= batching.max_num_seqs).all()

    # Resources: within an iteration and over the run, busy time fits in wall time.
    assert (it["duration_s"] >= 0).all() and (it["stall_s"] >= 0).all()
    assert (it["compute_busy_s"] <= it["duration_s"] + EPS).all()
    assert (it["copy_busy_s"] <= it["duration_s"] + EPS).all()
    for _, mine in it.groupby("replica"):
        starts = mine["started_at_s"].to_numpy()
        ends = starts + mine["duration_s"].to_numpy()
        assert (starts[1:] >= ends[:-1] - EPS).all(), "iterations of one replica overlap"
        wall_s = ends.max() - starts.min()
        assert mine["compute_busy_s"].sum() <= wall_s + EPS
        assert mine["copy_busy_s"].sum() <= wall_s + EPS
        assert ends.max() <= result.simulated_s + EPS


def run(loaded: LoadedScenario) -> SimulationResult:
    """Simulate; a workload whose every request outgrows the KV cache is refused up front, so skip it."""
    try:
        return simulate(loaded)
    except CapacityError as exc:
        assert "fewer than the smallest request" in str(exc)
        reject()


# No shrinking: each step of it is a whole simulation, and a failing scenario prints readably as is.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


@settings(max_examples=150, deadline=None, phases=NO_SHRINK)
@given(data=st.data())
def test_every_run_keeps_the_invariants(profile_dir, data):
    check_invariants(run(load(data.draw(scenarios(profile_dir)), profile_dir)))


@settings(max_examples=25, deadline=None, phases=NO_SHRINK)
@given(data=st.data())
def test_same_seed_gives_identical_tables(profile_dir, data):
    loaded = load(data.draw(scenarios(profile_dir)), profile_dir)
    first, second = run(loaded), run(loaded)
    assert first.requests.equals(second.requests)
    assert first.iterations.equals(second.iterations)
    assert np.array_equal(first.tbt_samples_s, second.tbt_samples_s)


def test_different_seeds_give_different_runs(profile_dir):
    runs = []
    for seed in range(4):
        data = scenario_data(profile_dir / "toy-round.yaml", max_requests=10, rate_per_s=100.0, seed=seed)
        data["workload"]["arrivals"]["prompt_tokens"] = {"dist": "uniform", "low": 1, "high": 64}
        runs.append(simulate(load(data, profile_dir)).requests)
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            assert not runs[i].equals(runs[j])
            assert not np.array_equal(runs[i]["arrived_at_s"], runs[j]["arrived_at_s"])


def test_small_kv_cache_preempts_and_still_completes_everything(profile_dir):
    """8 requests of 40 + 20 tokens arriving together share 7 blocks of 16 tokens: two prompts are
    admitted (3 blocks each), and when both decodes need a fourth block one must be preempted."""
    spec = tiny_model()
    data = scenario_data(
        profile_dir / "toy-round.yaml", max_requests=8, rate_per_s=1e6, prompt_tokens=40, output_tokens=20,
        hardware={
            "gpu_memory_bytes": spec.non_expert_weight_bytes + spec.routed_expert_bytes_total + 7.5 * 16 * spec.kv_bytes_per_token,
            "reserve_fraction": 0.0,
        },
    )
    for mode in ("recompute", "swap"):
        data["policies"] = {"expert_cache": {"name": "all_resident"}, "preemption": {"mode": mode}}
        result = simulate(load(data, profile_dir))
        check_invariants(result)
        assert result.budget.kv_blocks == 7
        assert (result.requests["status"] == "completed").all()
        assert result.requests["preemptions"].sum() > 0, mode


def test_a_recomputed_request_longer_than_the_batch_budget_does_not_stall_the_replica(profile_dir):
    """Without chunked prefill, a request preempted by recompute must prefill prompt + generated
    tokens in one iteration. Here 2 requests (1 + 12 tokens) share 5 KV blocks of 4 tokens, so one is
    preempted after it has generated several tokens, and its recompute (> 8 tokens) exceeds
    max_batch_tokens = 8. Swap mode finishes both; recompute must also end every request (complete it,
    or reject it as vLLM ignores a prompt over the limit), never stop with the request unservable."""
    spec = tiny_model()
    data = scenario_data(
        profile_dir / "toy-round.yaml", max_requests=2, rate_per_s=1e6, prompt_tokens=1, output_tokens=12,
        hardware={
            "gpu_memory_bytes": spec.non_expert_weight_bytes + spec.routed_expert_bytes_total + 5.5 * 4 * spec.kv_bytes_per_token,
            "reserve_fraction": 0.0,
        },
    )
    for mode in ("swap", "recompute"):
        data["policies"] = {
            "expert_cache": {"name": "all_resident"},
            "preemption": {"mode": mode},
            "batching": {"max_batch_tokens": 8, "chunked_prefill": False, "kv_block_tokens": 4},
        }
        result = simulate(load(data, profile_dir))
        assert result.budget.kv_blocks == 5
        check_invariants(result)
        assert result.requests["preemptions"].sum() > 0, mode
        assert set(result.requests["status"]) <= {"completed", "rejected"}, mode
