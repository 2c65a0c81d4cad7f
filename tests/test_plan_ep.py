"""``moesim plan`` over the expert-parallel degree: ``hardware.parallelism.ep`` is an ordinary candidate axis,
and an EP candidate's "what binds" can name its all-to-all links or its stragglers (the EP rows of the run
summary's ``resources`` carry ``links_utilization`` and ``straggler_wait_fraction``)."""

from __future__ import annotations

import copy

import yaml

from test_plan import PLAN
from sim.plan import Probe, _binding, busy_fields, run_plan


def test_ep_degree_is_a_plan_axis_and_ep_candidates_expose_link_and_straggler_busy(tmp_path):
    data = copy.deepcopy(PLAN)
    data["hardware"] = {"profile": "h100-80gb", "num_gpus": 2, "expert_memory": {"all": True}}
    data["policies"] = {"expert_cache": {"name": "all_resident"}}
    data["plan"]["candidates"] = {"hardware.parallelism.ep": [1, 2]}
    data["plan"]["max_requests_per_probe"] = 20
    data["plan"]["rate_search"] = {"low_scale": 0.25, "high_scale": 16, "iterations": 2}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    table, results = run_plan(path, jobs=1, progress=False)
    by_ep = {r.values["hardware.parallelism.ep"]: r for r in results}
    assert set(by_ep) == {1, 2} and all(r.status != "pruned" for r in results)
    assert all(r.num_gpus == 2 and r.binding for r in results)
    busy = by_ep[2].probes[-1].busy
    assert {"links_utilization", "straggler_wait_fraction", "compute_utilization"} <= set(busy)
    assert 0 < busy["links_utilization"] < 1 and 0 <= busy["straggler_wait_fraction"] < 1
    assert "links_utilization" not in by_ep[1].probes[-1].busy  # two single-GPU replicas have no all-to-all


def test_binding_names_ep_links_all_to_all_and_stragglers():
    summary = {"resources": [{"replica": 0, "compute_utilization": 0.3, "h2d_utilization": 0.0,
                              "links_utilization": 0.8, "straggler_wait_fraction": 0.1}]}
    probe = Probe(scale=1, rate_per_s=1, met=True, ttft_p99_s=0.1, tbt_p99_s=0.1, attainment=1.0, compute_utilization=0.3,
                  h2d_utilization=0.0, kv_peak_fraction=0.1, preemptions=0, rejected=0, busy=busy_fields(summary))
    assert _binding(probe) == "all-to-all (80% busy)"
    probe.busy = {**probe.busy, "links_utilization": 0.2, "straggler_wait_fraction": 0.7}
    assert _binding(probe) == "stragglers (70% busy)"
