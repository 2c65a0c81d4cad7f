"""Per-MoE-layer totals of single-GPU runs (sim.engine.layer_stats): hits and misses by hand, and the
per-layer time split summing to the iterations' compute, copy and stall totals; the run folder's
layers table and the report sections it brings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.engine.iteration import IterationPlanner, time_plan
from sim.engine.simulation import simulate
from sim.metrics import summarize
from sim.policies.cache import make_cache
from sim.report.render import render_report
from sim.run_folder import write_run_folder

from engine_fixtures import TINY_MODEL, h2d_s, load, scenario_data, tiny_model, toy_profile, write_toy_profile
from test_engine_timing import attention_s, decode_batch, expert_s, gate_s

TOY = toy_profile()
L = h2d_s(49152)  # one expert of the tiny model over the toy link


def _run(planner: IterationPlanner, counts_seq: list[np.ndarray]) -> tuple[list, list]:
    plans, timings = [], []
    for counts in counts_seq:
        plan = planner.plan(decode_batch(5), np.asarray(counts, dtype=np.int64))
        plans.append(plan)
        timings.append(time_plan(plan))
    return plans, timings


def _check_sums(frame: pd.DataFrame, plans: list, timings: list) -> None:
    """Per-layer parts + the ops no MoE layer owns = compute busy; loads = copy busy; stalls = stall."""
    outside = sum(s for p in plans for s, kind in zip(p.op_s, p.op_kind) if kind in ("lm_head", "iteration_overhead"))
    layer_compute = (frame["attention_s"] + frame["gate_shared_s"] + frame["experts_s"]).sum()
    assert layer_compute + outside == pytest.approx(sum(t.compute_busy_s for t in timings), rel=1e-12)
    assert frame["loads_busy_s"].sum() == pytest.approx(sum(t.copy_busy_s for t in timings), rel=1e-12, abs=1e-15)
    assert frame["stall_s"].sum() == pytest.approx(sum(t.stall_s for t in timings), rel=1e-12, abs=1e-15)
    assert frame["hits"].sum() == sum(p.hits for p in plans)
    assert frame["misses"].sum() == sum(p.misses for p in plans)
    assert frame["prefetch_hits"].sum() == sum(p.prefetch_hits for p in plans)


def test_hits_misses_loads_and_stalls_per_layer_by_hand():
    """2 MoE layers x 2 experts, one expert slot in one LRU pool (warm start: (0,0) resident), each layer
    uses its expert 0 or nothing. it1 L0 (0,0): hit. it2 L0 (0,0): hit; L1 (1,0): miss, evicts (0,0).
    it3 L1 (1,0): hit. it4 L0 (0,0): miss, evicts (1,0). it5 L1 (1,0): miss. So L0: 2 hits, 1 miss;
    L1: 1 hit, 2 misses. No layer has a hit beside its miss, so each miss stalls the stream for a whole
    load L (issued at the gate's end, the link idle)."""
    cache = make_cache("lru", num_layers=2, num_experts=2, capacity_experts=1, per_layer=False)
    planner = IterationPlanner(model=tiny_model(), profile=TOY, cache=cache)
    plans, timings = _run(planner, [[[1, 0], [0, 0]], [[1, 0], [1, 0]], [[0, 0], [1, 0]], [[1, 0], [0, 0]],
                                    [[0, 0], [1, 0]]])
    assert [(p.hits, p.misses) for p in plans] == [(1, 0), (1, 1), (1, 0), (0, 1), (0, 1)]  # the premise
    frame = planner.layer_stats.frame()
    assert list(frame["layer"]) == [0, 1]
    assert list(frame["hits"]) == [2, 1]
    assert list(frame["misses"]) == [1, 2]
    assert list(frame["prefetch_hits"]) == [0, 0]
    assert list(frame["loads_busy_s"]) == pytest.approx([L, 2 * L], rel=1e-12)
    assert list(frame["stall_s"]) == pytest.approx([L, 2 * L], rel=1e-12)
    # Every layer runs attention and the gate in each of the 5 iterations; experts only where used.
    a, g, x = attention_s(new=1, context=5, decode=True), gate_s(1), expert_s(1)
    assert list(frame["attention_s"]) == pytest.approx([5 * a, 5 * a], rel=1e-12)
    assert list(frame["gate_shared_s"]) == pytest.approx([5 * g, 5 * g], rel=1e-12)
    assert list(frame["experts_s"]) == pytest.approx([3 * x, 3 * x], rel=1e-12)
    _check_sums(frame, plans, timings)


def test_prefetched_loads_and_their_waits_belong_to_the_layer_they_are_for():
    """4 experts, 2 slots per layer; layer 0 uses its resident 0, 1; layer 1 uses 2, 3, which oracle
    next-layer prefetch loads while layer 0 runs: layer 1 has 2 prefetch hits and both loads (2L)."""
    model = tiny_model(num_experts=4)
    cache = make_cache("lru", num_layers=2, num_experts=4, capacity_experts=4, per_layer=True)
    planner = IterationPlanner(model=model, profile=TOY, cache=cache, prefetch="next_layer")
    plans, timings = _run(planner, [[[1, 1, 0, 0], [0, 0, 1, 1]]])
    frame = planner.layer_stats.frame()
    assert list(frame["hits"]) == [2, 2] and list(frame["misses"]) == [0, 0]
    assert list(frame["prefetch_hits"]) == [0, 2]
    assert list(frame["loads_busy_s"]) == pytest.approx([0.0, 2 * L], rel=1e-12)
    assert frame["stall_s"].iloc[0] == 0.0 and frame["stall_s"].iloc[1] > 0.0
    _check_sums(frame, plans, timings)


def test_all_resident_fast_path_counts_every_access_as_a_hit():
    planner = IterationPlanner(model=tiny_model(num_experts=4), profile=TOY,
                               cache=make_cache("all_resident", num_layers=2, num_experts=4, capacity_experts=8,
                                                    per_layer=False))
    counts = [[[1, 2, 0, 0], [0, 0, 0, 3]], [[0, 0, 0, 1], [1, 1, 1, 0]]]
    plans, timings = _run(planner, counts)
    frame = planner.layer_stats.frame()
    assert list(frame["hits"]) == [3, 4] and list(frame["misses"]) == [0, 0]
    assert (frame["loads_busy_s"] == 0).all() and (frame["stall_s"] == 0).all()
    _check_sums(frame, plans, timings)


@pytest.mark.parametrize("cache", ["lru", "all_resident"])
def test_a_run_folder_holds_the_layers_table_and_the_report_draws_it(tmp_path: Path, cache: str):
    hardware = {"expert_memory": {"experts": 2}} if cache == "lru" else {"expert_memory": {"all": True}}
    data = scenario_data(write_toy_profile(tmp_path), model={**TINY_MODEL,
                         "num_experts": 4}, prompt_tokens=6, output_tokens=4, max_requests=3, rate_per_s=50.0,
                         hardware=hardware, policies={"expert_cache": {"name": cache}})
    result = simulate(load(data, tmp_path))
    folder = write_run_folder(result, summarize(result), tmp_path / "run")
    layers = pd.read_csv(folder / "layers.csv")
    it = pd.read_csv(folder / "iterations.csv")
    assert list(layers.columns) == ["layer", "hits", "misses", "prefetch_hits", "attention_s", "gate_shared_s",
                                    "experts_s", "stall_s", "loads_busy_s"]
    assert len(layers) == 2
    assert layers["hits"].sum() == it["expert_hits"].sum() and layers["misses"].sum() == it["expert_misses"].sum()
    assert (layers["misses"].sum() > 0) == (cache == "lru")
    assert layers["stall_s"].sum() == pytest.approx(it["stall_s"].sum(), rel=1e-9, abs=1e-15)
    assert layers["loads_busy_s"].sum() == pytest.approx(it["copy_busy_s"].sum(), rel=1e-9, abs=1e-15)
    # The tiny model has no dense layer, so only the LM head is outside the layers: busy - layers > 0.
    outside = it["compute_busy_s"].sum() - (layers["attention_s"] + layers["gate_shared_s"] + layers["experts_s"]).sum()
    assert 0 < outside < 0.5 * it["compute_busy_s"].sum()
    html = render_report(folder).read_text()
    assert "<h2>Expert-cache hit rate by layer</h2>" in html and "<h2>Per-layer time breakdown</h2>" in html
    assert "attention, gate + shared experts, experts, waiting for expert loads." in html
    assert "Not stacked: copy engine busy loading the layer&#39;s experts" in html


def test_offloading_policies_write_no_layers_table(tmp_path: Path):
    data = scenario_data(write_toy_profile(tmp_path), prompt_tokens=6, output_tokens=3, max_requests=2,
                         hardware={"expert_memory": {"experts": 2}}, policies={"expert_cache": {"name": "static_hot"}})
    result = simulate(load(data, tmp_path))
    folder = write_run_folder(result, summarize(result), tmp_path / "run")
    assert (folder / "iterations.csv").exists() and not (folder / "layers.csv").exists()
    assert "Per-layer time breakdown" not in render_report(folder).read_text()


def test_a_straggler_slowdown_scales_the_layers_compute_like_the_iterations(tmp_path: Path):
    """A gpu_slow fault multiplies every op by 3 after planning: the per-layer compute seconds follow, so
    they still add up (with the LM head) to the iterations' compute busy time, and are 3x the plain run's."""
    frames = {}
    for factor in (1.0, 3.0):
        data = scenario_data(write_toy_profile(tmp_path), prompt_tokens=6, output_tokens=4, max_requests=1,
                             hardware={"expert_memory": {"experts": 2}}, policies={"expert_cache": {"name": "lru"}})
        data["faults"] = {"events": [{"kind": "gpu_slow", "gpu": 0, "at_s": 0.0, "factor": factor}]}
        result = simulate(load(data, tmp_path))
        layers = result.replicas[0].planner.layer_stats.frame()
        it = result.iterations
        compute = (layers["attention_s"] + layers["gate_shared_s"] + layers["experts_s"]).sum()
        frames[factor] = (layers, it, compute)
    (base, base_it, base_compute), (slow, slow_it, slow_compute) = frames[1.0], frames[3.0]
    assert slow_compute == pytest.approx(3.0 * base_compute, rel=1e-12)
    outside_base = base_it["compute_busy_s"].sum() - base_compute
    assert outside_base > 0
    assert slow_it["compute_busy_s"].sum() == pytest.approx(slow_compute + 3.0 * outside_base, rel=1e-12)
    assert list(slow["misses"]) == list(base["misses"])
