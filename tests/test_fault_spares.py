"""Spare GPUs (``faults.spare_gpus``): a free spare takes a failed GPU's place at once and restores its
weights (an EP member: its shard); the repaired GPU joins the spare pool.

Toy profile and tiny model of ``engine_fixtures`` (see tests/test_faults.py): a GPU restores 296,064 B;
storage at 1 GB/s reads them in 296.064 us; the host link moves 10 GB/s after 1 ms; gpu_to_gpu 100 GB/s
after 10 us."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_fixtures import h2d_s, load, tiny_model
from sim.engine.simulation import simulate
from sim.plan import run_plan
from test_ep_faults import FAIL_GPU1, MODEL8, _all_served, _data
from test_faults import FINAL, RESTORE_BYTES, run
from test_plan import PLAN

STORAGE = {"source": "storage", "storage_gbps": 1.0}
STORAGE_S = RESTORE_BYTES / 1e9


def test_zero_spares_is_the_run_without_spares(tmp_path: Path) -> None:
    """spare_gpus: 0 (the default) restores the GPU onto itself after its repair, as before; a spare with no
    failure changes nothing."""
    fail = {"kind": "gpu_fail", "gpu": 1, "at_s": 2e-4, "duration_s": 1e-3}
    before, s_before = run(tmp_path, {"events": [fail], "recovery": STORAGE})
    zero, s_zero = run(tmp_path, {"events": [fail], "recovery": STORAGE, "spare_gpus": 0})
    pd.testing.assert_frame_equal(before.requests, zero.requests)
    pd.testing.assert_frame_equal(before.iterations, zero.iterations)
    assert s_before["faults"]["recoveries"] == s_zero["faults"]["recoveries"]
    rec = s_zero["faults"]["recoveries"][0]
    assert rec["spare_gpu"] is None and s_zero["faults"]["spares_used"] == 0
    assert rec["time_to_recovery_s"] == pytest.approx(1e-3 + STORAGE_S, rel=1e-9)
    base, _ = run(tmp_path)
    idle, s_idle = run(tmp_path, {"events": [{"kind": "gpu_slow", "gpu": 0, "at_s": 0.0, "factor": 1.0}],
                                  "spare_gpus": 1})
    pd.testing.assert_frame_equal(base.requests, idle.requests)
    pd.testing.assert_frame_equal(base.iterations, idle.iterations)
    assert s_idle["faults"]["spare_pool_at_end"] == [2]


@pytest.mark.parametrize("recovery, seconds, source", [
    (STORAGE, STORAGE_S, "storage"),
    ({"source": "host"}, h2d_s(RESTORE_BYTES), "host"),
    ({"source": "peer"}, 1e-5 + RESTORE_BYTES / 100e9, "peer (gpu_to_gpu)"),  # the spare sits on node 0
])
def test_a_spare_restores_at_once_without_waiting_for_the_repair(tmp_path: Path, recovery, seconds, source) -> None:
    """GPU 1 is down for 2 ms; spare GPU 2 takes its place at the failure: back after bytes / bandwidth.
    Arrivals span 4 ms, so position 1 (on the spare) gets new requests after its restore."""
    result, summary = run(tmp_path, {"events": [{"kind": "gpu_fail", "gpu": 1, "at_s": 2e-4, "duration_s": 2e-3}],
                                     "recovery": recovery, "spare_gpus": 1}, rate_per_s=10_000)
    faults = summary["faults"]
    rec = faults["recoveries"][0]
    assert rec["spare_gpu"] == 2 and faults["spares_used"] == 1
    assert (rec["source"], rec["restore_bytes"]) == (source, RESTORE_BYTES)
    assert rec["restore_started_at_s"] == pytest.approx(2e-4)
    assert rec["restore_s"] == pytest.approx(seconds, rel=1e-12)
    assert rec["time_to_recovery_s"] == pytest.approx(seconds, rel=1e-9)
    assert (result.requests["status"] == "completed").all()
    assert rec["restored_at_s"] < 2e-4 + 2e-3  # before GPU 1's repair
    # Position 1 serves again (on the spare).
    it = result.iterations
    assert (it[(it["replica"] == 1)]["started_at_s"] >= rec["restored_at_s"]).any()
    # The repaired GPU 1 joined the pool instead of restoring itself: one restore's bytes in all.
    assert faults["spare_pool_at_end"] == [1]
    assert faults["bytes_moved_for_recovery"] == RESTORE_BYTES


def test_two_failures_one_spare_the_second_waits_for_its_repair(tmp_path: Path) -> None:
    """GPU 0 fails for 1 s and takes the spare; GPU 1 fails 0.1 ms later for 0.5 ms: no spare is free, so
    it restores itself after its repair (0.3 ms + 0.5 ms + 296.064 us)."""
    result, summary = run(tmp_path, {"events": [
        {"kind": "gpu_fail", "gpu": 0, "at_s": 2e-4, "duration_s": 1.0},
        {"kind": "gpu_fail", "gpu": 1, "at_s": 3e-4, "duration_s": 5e-4},
    ], "recovery": STORAGE, "spare_gpus": 1})
    first, second = summary["faults"]["recoveries"]
    assert (first["gpu"], first["spare_gpu"]) == (0, 2)
    assert first["restored_at_s"] == pytest.approx(2e-4 + STORAGE_S)
    assert (second["gpu"], second["spare_gpu"]) == (1, None)
    assert second["restored_at_s"] == pytest.approx(3e-4 + 5e-4 + STORAGE_S)
    assert summary["faults"]["spares_used"] == 1
    assert set(result.requests["status"]) <= FINAL


def test_two_failures_one_spare_the_second_takes_the_refilled_pool(tmp_path: Path) -> None:
    """GPU 0 fails for 0.4 ms and takes the spare; GPU 1 fails at 0.3 ms for 1 s. GPU 0 is repaired at
    0.6 ms, joins the pool and takes GPU 1's place at once: back at 0.6 ms + 296.064 us."""
    _, summary = run(tmp_path, {"events": [
        {"kind": "gpu_fail", "gpu": 0, "at_s": 2e-4, "duration_s": 4e-4},
        {"kind": "gpu_fail", "gpu": 1, "at_s": 3e-4, "duration_s": 1.0},
    ], "recovery": STORAGE, "spare_gpus": 1})
    first, second = summary["faults"]["recoveries"]
    assert (first["spare_gpu"], second["spare_gpu"]) == (2, 0)
    assert second["restore_started_at_s"] == pytest.approx(6e-4)
    assert second["restored_at_s"] == pytest.approx(6e-4 + STORAGE_S)
    assert summary["faults"]["bytes_moved_for_recovery"] == 2 * RESTORE_BYTES
    pool = [e for e in summary["faults"]["events"] if e["event"] == "to_spare_pool"]
    assert pool[0]["gpu"] == 0 and pool[0]["at_s"] == pytest.approx(6e-4)


def test_a_gpu_lost_for_good_is_replaced_by_the_spare(tmp_path: Path) -> None:
    """The only GPU fails for good: without a spare nothing is served after; with one, every request ends
    completed (the spare serves from the failure + restore on)."""
    fail = {"kind": "gpu_fail", "gpu": 0, "at_s": 2e-4}
    result, summary = run(tmp_path, {"events": [fail], "recovery": STORAGE, "spare_gpus": 1}, hardware={"num_gpus": 1})
    assert (result.requests["status"] == "completed").all()
    assert summary["faults"]["recoveries"][0]["restored_at_s"] == pytest.approx(2e-4 + STORAGE_S)
    without, _ = run(tmp_path, {"events": [fail], "recovery": STORAGE}, hardware={"num_gpus": 1})
    assert not (without.requests["status"] == "completed").all()


def test_an_ep_member_replaced_by_a_spare_restores_only_its_shard(tmp_path: Path) -> None:
    """Member 1 of an EP-4 group fails at 0.1 s for 0.05 s; spare GPU 4 restores its shard (non-expert weights +
    2 experts x 3 MoE layers) from the host right away: back at 0.1 s + 1 ms + shard / 10 GB/s."""
    model = tiny_model(**{k: v for k, v in MODEL8.items() if k != "name"})
    shard = model.non_expert_weight_bytes + 2 * model.num_moe_layers * model.expert_bytes
    result = simulate(load(_data(tmp_path, {"events": [FAIL_GPU1], "spare_gpus": 1}), tmp_path))
    _all_served(result)
    faults = result.extra["faults"]
    rec = faults["recoveries"][0]
    assert (rec["gpu"], rec["spare_gpu"], rec["source"]) == (1, 4, "host")
    assert rec["restore_bytes"] == pytest.approx(shard)
    assert rec["restored_at_s"] == pytest.approx(0.1 + 1e-3 + shard / 10e9)
    assert faults["spare_pool_at_end"] == [1]  # GPU 1, repaired at 0.15 s, is the new spare


def test_plan_prices_the_spares(tmp_path: Path) -> None:
    """A plan scenario's spares are paid for: 2 H100s + 1 spare cost 3 H100-hours per hour."""
    prices = {}
    for spares in (0, 1):
        data = copy.deepcopy(PLAN)
        data["plan"]["candidates"] = {"hardware.num_gpus": [2]}
        data["plan"]["budget_usd_per_hour"] = 0.01  # pruned before any probe: the price is all we read
        data["faults"] = {"spare_gpus": spares}
        path = tmp_path / f"plan-{spares}.yaml"
        path.write_text(yaml.safe_dump(data))
        table, _ = run_plan(path, jobs=1, progress=False)
        prices[spares] = float(table["usd_per_hour"].iloc[0])
    assert prices[1] == pytest.approx(prices[0] * 3 / 2)
    assert np.isfinite(prices[0]) and prices[0] > 0


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), spares=st.integers(1, 2), mttr=st.sampled_from([None, 1e-4, 1e-3]),
       no_replica=st.sampled_from(["wait", "reject"]))
def test_no_request_vanishes_with_spares(tmp_path_factory, seed, spares, mttr, no_replica) -> None:
    """Random GPU and node failures with spares: every request ends with a final status and every outage
    is back exactly one restore after its last restore started."""
    tmp = tmp_path_factory.mktemp("spares")
    faults = {"random": [{"kind": "gpu_fail", "mtbf_s": 3e-4, "mttr_s": mttr, "seed": seed},
                         {"kind": "node_fail", "mtbf_s": 1e-3, "mttr_s": 2e-4, "seed": seed + 1}],
              "no_replica": no_replica, "spare_gpus": spares, "recovery": STORAGE}
    result, summary = run(tmp, faults, hardware={"num_gpus": 4, "num_nodes": 2},
                          policies={"expert_cache": {"name": "all_resident"}})
    req = result.requests
    assert len(req) == 40 and set(req["status"]) <= FINAL and summary["requests"]["unfinished"] == 0
    for rec in summary["faults"]["recoveries"]:
        if rec["restored_at_s"] is not None:
            assert rec["restored_at_s"] == pytest.approx(rec["restore_started_at_s"] + STORAGE_S)
            assert rec["restored_at_s"] >= rec["failed_at_s"] + STORAGE_S
    positions = {rec["gpu"] for rec in summary["faults"]["recoveries"]}
    assert positions <= set(range(4))  # outages are of serving positions; spares are numbered 4, 5


def test_a_wait_group_whose_member_is_lost_for_good_is_whole_again_on_the_spare(tmp_path: Path) -> None:
    """expert_failover wait: member 1 never returns, but the spare takes its place, so the group is not handed
    back (no request re-queued); its blocked iteration resumes once the spare has the shard."""
    lost = {k: v for k, v in FAIL_GPU1.items() if k != "duration_s"}
    result = simulate(load(_data(tmp_path, {"events": [lost], "expert_failover": "wait", "spare_gpus": 1}), tmp_path))
    _all_served(result)
    faults = result.extra["faults"]
    rec = faults["recoveries"][0]
    assert rec["spare_gpu"] == 4 and rec["requeued"] == 0
    assert result.replicas[0].alive and faults["spare_pool_at_end"] == []


def test_cli_fault_lines_show_the_spare(tmp_path: Path) -> None:
    from sim.cli import print_faults

    _, summary = run(tmp_path, {"events": [{"kind": "gpu_fail", "gpu": 1, "at_s": 2e-4, "duration_s": 2e-3}],
                                "recovery": STORAGE, "spare_gpus": 1}, rate_per_s=10_000)
    lines: list[str] = []
    print_faults(summary["faults"], lambda *a: lines.append(" ".join(map(str, a))))
    text = "\n".join(lines)
    assert "1 spare GPU(s), 1 outage(s) taken over by a spare" in text
    assert "GPU 1 failed at 0.000 s, replaced at once by spare GPU 2" in text
    assert "0.00 GB moved" in text and "restore 0.3 ms from storage" in text
