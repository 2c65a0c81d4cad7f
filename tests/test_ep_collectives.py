"""Measured collectives in the expert-parallel topology: the profile's NCCL table where it has one for
that kind and GPU count on one NVLink node, the link model otherwise (sim/engine/topology.py).

The toy profile (tests/engine_fixtures.py) gets a hand-made ``collectives`` section: all_to_all on 8 GPUs
of 1 ms at an 8 MB per-rank buffer and 10 ms at 80 MB (log-log interpolation between them is then
linear: t = buffer / 8 GB/s), all_reduce on 2 GPUs of 0.5 ms at 1 MB and 5 ms at 10 MB."""

from __future__ import annotations

import numpy as np
import pytest

from engine_fixtures import TOY_PROFILE_YAML, load, scenario_data
from sim.engine.simulation import simulate
from sim.engine.topology import build_topology
from sim.errors import ScenarioError
from sim.metrics import expert_parallel_summary
from sim.policies.ep_specs import TopologySpec
from sim.profile import parse_profile

COLLECTIVES_YAML = """\
collectives:
  backend: nccl
  provenance: hand-made for tests
  rows:
  - {kind: all_to_all, num_gpus: 8, nbytes: [8000000, 80000000], latency_s: [1.0e-3, 1.0e-2]}
  - {kind: all_reduce, num_gpus: 2, nbytes: [1000000, 10000000], latency_s: [5.0e-4, 5.0e-3]}
"""
MODEL8 = {"name": "tiny-moe", "hidden_size": 64, "num_layers": 3, "vocab_size": 128, "attention_type": "mha",
          "num_attention_heads": 2, "num_kv_heads": 2, "head_dim": 32, "num_experts": 8, "top_k": 2,
          "expert_ffn_size": 128}


def _profile():
    return parse_profile(TOY_PROFILE_YAML + COLLECTIVES_YAML, origin="toy-nccl.yaml")


def _write(tmp_path):
    path = tmp_path / "toy-nccl.yaml"
    path.write_text(TOY_PROFILE_YAML + COLLECTIVES_YAML, encoding="utf-8")
    return path


def test_uniform_all_to_all_takes_the_measured_time_of_its_buffer():
    """1 MB to each of 7 peers (+1 MB to itself) = an 8 MB nccl-tests buffer: the table's 1 ms exactly
    (the link model would give 7 MB / 100 GB/s + 10 us = 80 us)."""
    topo = build_topology(TopologySpec(), _profile(), group_gpus=8, gpus_per_node=8)
    assert topo.collective_model("all_to_all") == "measured"
    assert topo.all_to_all_s(np.full((8, 8), 1e6)) == pytest.approx(1e-3)
    link = build_topology(TopologySpec(collective_model="link"), _profile(), group_gpus=8, gpus_per_node=8)
    assert link.collective_model("all_to_all") == "link"
    assert link.all_to_all_s(np.full((8, 8), 1e6)) == pytest.approx(7e6 / 100e9 + 1e-5)


def test_a_skewed_all_to_all_maps_onto_the_uniform_one_with_the_same_busiest_port():
    """GPU 0 sends 2 MB to each peer (14 MB off its port), the others 1 MB: the busiest port carries 14 MB,
    as a uniform all-to-all of buffer 14 MB x 8 / 7 = 16 MB does: 16 MB / 8 GB/s = 2 ms. Layers independent,
    an empty layer 0 s."""
    topo = build_topology(TopologySpec(), _profile(), group_gpus=8, gpus_per_node=8)
    skewed = np.full((8, 8), 1e6)
    skewed[0] = 2e6
    flows = np.stack([skewed, np.zeros((8, 8)), np.diag(np.full(8, 5e6))])
    assert topo.all_to_all_s(flows) == pytest.approx([2e-3, 0.0, 0.0])


def test_tp_all_reduce_uses_the_measured_table_for_its_gpu_count():
    """ep 4 x tp 2: the all-to-all over 8 GPUs and the all-reduce over 2 both measured; 2 MB all-reduce =
    log-log between (1 MB, 0.5 ms) and (10 MB, 5 ms) = 1 ms."""
    topo = build_topology(TopologySpec(), _profile(), group_gpus=8, gpus_per_node=8, tp=2)
    assert topo.collective_model("all_reduce") == "measured"
    assert topo.all_reduce_s(2e6, np.arange(2)) == pytest.approx(1e-3)


@pytest.mark.parametrize("spec, gpus, per_node", [
    (TopologySpec(), 4, 8),  # no all_to_all table on 4 GPUs
    (TopologySpec(intra_node="pcie"), 8, 8),  # the table was measured on NVLink
    (TopologySpec(), 8, 4),  # two nodes
])
def test_auto_falls_back_to_the_link_model_without_a_fitting_table(spec, gpus, per_node):
    topo = build_topology(spec, _profile(), group_gpus=gpus, gpus_per_node=per_node)
    assert topo.collective_model("all_to_all") == "link"
    flows = np.full((gpus, gpus), 1e6)
    ref = build_topology(spec.model_copy(update={"collective_model": "link"}), _profile(), group_gpus=gpus,
                         gpus_per_node=per_node)
    assert topo.all_to_all_s(flows) == pytest.approx(ref.all_to_all_s(flows))


def _data(tmp_path, ep, topology):
    data = scenario_data(_write(tmp_path), model=MODEL8, max_requests=6, output_tokens=4, rate_per_s=50.0,
                         hardware={"gpu_memory_bytes": 1.0e9, "num_gpus": ep, "parallelism": {"ep": ep},
                                   "topology": topology},
                         policies={"expert_cache": {"name": "all_resident"}})
    data["workload"]["routing"] = {"kind": "zipf", "exponent": 1.0}
    return data


def test_measured_without_a_table_is_a_one_line_error(tmp_path):
    with pytest.raises(ScenarioError, match=r"hardware.topology.collective_model: profile 'toy-round' has no "
                                            r"measured all_to_all on 4 GPUs"):
        load(_data(tmp_path, 4, {"collective_model": "measured"}), tmp_path)


def test_the_summary_says_which_model_costed_the_collectives(tmp_path):
    measured = simulate(load(_data(tmp_path, 8, {}), tmp_path))
    link = simulate(load(_data(tmp_path, 8, {"collective_model": "link"}), tmp_path))
    s_m, s_l = expert_parallel_summary(measured), expert_parallel_summary(link)
    assert (s_m["collective_model"], s_l["collective_model"]) == ("measured", "link")
    # The table's 1 ms floor is far above the link model's microseconds for these few-KB all-to-alls.
    assert s_m["totals_s"]["dispatch_s"] > 10 * s_l["totals_s"]["dispatch_s"] > 0
