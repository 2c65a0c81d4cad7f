"""Faults during a run: failures, slowdowns, degraded links, recovery, and the schedule they come from.

Runs use the toy profile and tiny model of ``engine_fixtures`` (an op costs max(FLOPs, bytes) / 1e12 s;
the host link moves 10 GB/s after 1 ms; gpu_to_gpu 100 GB/s after 10 us). Requests arrive at 100,000/s
so that many are in flight at once on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.engine.simulation import simulate
from sim.errors import ScenarioError
from sim.faults import FaultsSpec, draw_failures, expand_schedule
from sim.metrics import summarize

from engine_fixtures import h2d_s, load, scenario_data, write_toy_profile

FINAL = {"completed", "failed", "rejected", "dropped"}
# The tiny model's bytes (bf16): 2 layers x 2 experts x 3 matrices of 64 x 128 -> 196,608 B of experts;
# embedding 128x64 + untied head 64x128 + norms 64x5 + attention 2 x 4 x 64x64 + routers 2 x 64x2
# = 49,728 parameters -> 99,456 B of non-expert weights. A GPU restores 296,064 B.
RESTORE_BYTES = 99_456 + 196_608


def run(tmp_path: Path, faults: dict | None = None, **kw):
    prof = write_toy_profile(tmp_path)
    args = dict(max_requests=40, rate_per_s=100_000, output_tokens=400, prompt_tokens=64, hardware={"num_gpus": 2})
    args.update(kw)
    data = scenario_data(prof, **args)
    if faults is not None:
        data["faults"] = faults
    result = simulate(load(data, tmp_path))
    return result, summarize(result)


def test_no_faults_equals_baseline_exactly(tmp_path: Path) -> None:
    """Faults that change nothing (factor 1, full bandwidth) route through the injector and give the same run."""
    base, _ = run(tmp_path)
    neutral, summary = run(tmp_path, {"events": [
        {"kind": "gpu_slow", "gpu": 0, "at_s": 0.0, "factor": 1.0},
        {"kind": "link_degrade", "at_s": 0.0, "bandwidth_fraction": 1.0},
    ]})
    pd.testing.assert_frame_equal(base.requests, neutral.requests)
    pd.testing.assert_frame_equal(base.iterations, neutral.iterations)
    assert np.array_equal(base.tbt_samples_s, neutral.tbt_samples_s)
    empty, _ = run(tmp_path, {})
    pd.testing.assert_frame_equal(base.requests, empty.requests)
    assert summary["faults"]["outages"] == 0


def test_failure_requeues_in_flight_requests_on_the_survivor(tmp_path: Path) -> None:
    result, summary = run(tmp_path, {"events": [{"kind": "gpu_fail", "gpu": 1, "at_s": 2e-4, "duration_s": 2e-4}]})
    req = result.requests
    faults = summary["faults"]
    assert faults["requeued"] > 0  # the case is not vacuous: GPU 1 held requests when it failed
    assert (req["status"] == "completed").all()
    rec = faults["recoveries"][0]
    # GPU 1 starts no iteration while it is down or restoring.
    it = result.iterations
    down = it[(it["replica"] == 1) & (it["started_at_s"] >= rec["failed_at_s"]) & (it["started_at_s"] < rec["restored_at_s"])]
    assert down.empty


def test_failure_without_spare_fails_requests_explicitly(tmp_path: Path) -> None:
    """One GPU, lost for good, policy 'fail': in-flight requests fail with gpu_failed, later arrivals are
    rejected; every request has a final status and none vanish."""
    result, summary = run(
        tmp_path, {"events": [{"kind": "gpu_fail", "gpu": 0, "at_s": 2e-4}], "in_flight": "fail", "no_replica": "reject"},
        hardware={"num_gpus": 1},
    )
    req = result.requests
    assert len(req) == 40
    assert set(req["status"]) <= FINAL
    failed = req[req["status"] == "failed"]
    assert len(failed) > 0 and set(failed["reason"]) == {"gpu_failed"}
    assert summary["faults"]["failed_requests"] == len(failed)
    rejected = req[req["status"] == "rejected"]
    assert len(rejected) > 0 and set(rejected["reason"]) == {"no_replica_alive"}
    assert (rejected["arrived_at_s"] >= 2e-4).all()
    assert summary["requests"]["failed"] == len(failed)
    assert summary["requests"]["unfinished"] == 0


def test_requests_waiting_for_a_gpu_that_never_returns_end_too(tmp_path: Path) -> None:
    """Default policies (requeue, wait) with the only GPU gone for good: nothing can serve, so the run
    still ends with a final status for every request instead of waiting forever."""
    result, _ = run(tmp_path, {"events": [{"kind": "gpu_fail", "gpu": 0, "at_s": 2e-4}]}, hardware={"num_gpus": 1})
    assert set(result.requests["status"]) <= FINAL
    assert (result.requests["status"] == "failed").any()


def test_arrivals_wait_for_recovery(tmp_path: Path) -> None:
    """One GPU down for 1 ms with policy 'wait': nothing is lost, everything completes after the restore."""
    result, summary = run(tmp_path, {"events": [{"kind": "gpu_fail", "gpu": 0, "at_s": 2e-4, "duration_s": 1e-3}]},
                          hardware={"num_gpus": 1})
    assert (result.requests["status"] == "completed").all()
    rec = summary["faults"]["recoveries"][0]
    waited = result.requests[result.requests["arrived_at_s"].between(2e-4, 1.2e-3)]
    assert len(waited) and (waited["first_token_at_s"] >= rec["restored_at_s"]).all()


def test_recovery_time_is_bytes_over_bandwidth(tmp_path: Path) -> None:
    """From storage at 1 GB/s with no fixed cost: 296,064 B take 296.064 us after the 1 ms outage;
    from host memory: 1 ms + 296,064 B / 10 GB/s; from a peer on the same node: 10 us + B / 100 GB/s."""
    fail = {"kind": "gpu_fail", "gpu": 1, "at_s": 2e-4, "duration_s": 1e-3}
    cases = [
        ({"source": "storage", "storage_gbps": 1.0}, RESTORE_BYTES / 1e9, "storage"),
        ({"source": "host"}, h2d_s(RESTORE_BYTES), "host"),
        ({"source": "peer"}, 1e-5 + RESTORE_BYTES / 100e9, "peer (gpu_to_gpu)"),
    ]
    for recovery, seconds, source in cases:
        _, summary = run(tmp_path, {"events": [fail], "recovery": recovery})
        rec = summary["faults"]["recoveries"][0]
        assert rec["restore_bytes"] == RESTORE_BYTES
        assert rec["source"] == source
        assert rec["restore_s"] == pytest.approx(seconds, rel=1e-12)
        assert rec["time_to_recovery_s"] == pytest.approx(1e-3 + seconds, rel=1e-9)
        assert summary["faults"]["bytes_moved_for_recovery"] == RESTORE_BYTES


def test_slowdown_scales_compute_by_its_factor(tmp_path: Path) -> None:
    """One request alone: the same batches run, each with 3x the compute."""
    base, _ = run(tmp_path, max_requests=1, hardware={"num_gpus": 1})
    slow, _ = run(tmp_path, {"events": [{"kind": "gpu_slow", "gpu": 0, "at_s": 0.0, "factor": 3.0}]},
                  max_requests=1, hardware={"num_gpus": 1})
    assert len(base.iterations) == len(slow.iterations) > 1
    np.testing.assert_allclose(slow.iterations["compute_busy_s"], 3.0 * base.iterations["compute_busy_s"], rtol=1e-12)
    np.testing.assert_allclose(slow.iterations["duration_s"], 3.0 * base.iterations["duration_s"], rtol=1e-12)


def test_slowdown_ends_after_its_duration(tmp_path: Path) -> None:
    base, _ = run(tmp_path, max_requests=1, hardware={"num_gpus": 1})
    first = float(base.iterations["started_at_s"].iloc[1])
    slow, _ = run(tmp_path, {"events": [{"kind": "gpu_slow", "gpu": 0, "at_s": 0.0, "factor": 2.0, "duration_s": first}]},
                  max_requests=1, hardware={"num_gpus": 1})
    ratio = (slow.iterations["compute_busy_s"] / base.iterations["compute_busy_s"]).to_numpy()
    assert ratio[0] == pytest.approx(2.0) and ratio[-1] == pytest.approx(1.0)


def test_degraded_link_slows_each_expert_load(tmp_path: Path) -> None:
    """One expert slot of four: every expert is loaded on demand; at half bandwidth a load of one
    expert (49,152 B) takes 1 ms + 49,152 B / 5 GB/s."""
    policies = {"expert_cache": {"name": "lru"}}
    hw = {"num_gpus": 1, "expert_memory": {"experts": 1}}
    base, _ = run(tmp_path, max_requests=1, hardware=hw, policies=policies)
    slow, _ = run(tmp_path, {"events": [{"kind": "link_degrade", "gpu": 0, "at_s": 0.0, "bandwidth_fraction": 0.5}]},
                  max_requests=1, hardware=hw, policies=policies)
    loads = slow.iterations["expert_loads"]
    assert loads.sum() > 0 and loads.sum() == base.iterations["expert_loads"].sum()
    per_load = 1e-3 + 49_152 / 5e9
    np.testing.assert_allclose(slow.iterations["copy_busy_s"], loads * per_load, rtol=1e-12)
    np.testing.assert_allclose(base.iterations["copy_busy_s"], loads * h2d_s(49_152), rtol=1e-12)


def test_node_failure_takes_down_every_gpu_of_the_node(tmp_path: Path) -> None:
    _, summary = run(tmp_path, {"events": [{"kind": "node_fail", "node": 1, "at_s": 2e-4, "duration_s": 1e-4}]},
                     hardware={"num_gpus": 4, "num_nodes": 2})
    assert sorted(r["gpu"] for r in summary["faults"]["recoveries"]) == [2, 3]
    assert summary["requests"]["completed"] == 40


def test_timeline_covers_every_request(tmp_path: Path) -> None:
    _, summary = run(tmp_path, {"events": [{"kind": "gpu_fail", "gpu": 1, "at_s": 2e-4, "duration_s": 2e-4}],
                                "timeline_window_s": 1e-4})
    rows = summary["faults"]["timeline"]
    assert sum(r["arrived"] for r in rows) == 40
    assert all(b["window_start_s"] == pytest.approx(a["window_end_s"]) for a, b in zip(rows, rows[1:]))
    around = summary["faults"]["around_faults"][0]
    assert around["fault"] == "fail" and around["start_s"] == 2e-4
    assert around["before_requests"] + around["during_requests"] + around["after_requests"] == 40


# ---------------------------------------------------------------- the schedule


def test_mtbf_draws_are_deterministic_per_seed() -> None:
    spec = FaultsSpec.model_validate({"random": [{"kind": "gpu_fail", "mtbf_s": 100.0, "mttr_s": 10.0, "seed": 7}]})
    a = expand_schedule(spec, num_gpus=4, num_nodes=1, horizon_s=2000.0)
    b = expand_schedule(spec, num_gpus=4, num_nodes=1, horizon_s=2000.0)
    assert a == b and len(a) > 4
    other = FaultsSpec.model_validate({"random": [{"kind": "gpu_fail", "mtbf_s": 100.0, "mttr_s": 10.0, "seed": 8}]})
    assert expand_schedule(other, num_gpus=4, num_nodes=1, horizon_s=2000.0) != a
    assert all(f.at_s < 2000.0 for f in a)
    assert [f.at_s for f in a] == sorted(f.at_s for f in a)


def test_mtbf_draws_have_the_given_means() -> None:
    """Up times ~ Exp(mtbf), repairs ~ Exp(mttr): over 20,000 failures the means are within 3%."""
    draws = draw_failures(np.random.default_rng(0), 100.0, 10.0, horizon_s=2.2e6)
    starts = np.array([s for s, _ in draws])
    repairs = np.array([d for _, d in draws])
    ups = np.diff(np.concatenate(([0.0], starts))) - np.concatenate(([0.0], repairs[:-1]))
    assert len(draws) > 19_000
    assert ups.mean() == pytest.approx(100.0, rel=0.03)
    assert repairs.mean() == pytest.approx(10.0, rel=0.03)


def test_node_failure_draws_fail_whole_nodes() -> None:
    spec = FaultsSpec.model_validate({"random": [{"kind": "node_fail", "mtbf_s": 50.0, "seed": 1}]})
    faults = expand_schedule(spec, num_gpus=4, num_nodes=2, horizon_s=1000.0)
    assert sorted(f.gpu for f in faults) == [0, 1, 2, 3]  # no repair: each node fails once, both GPUs
    assert all(f.duration_s is None for f in faults)


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ({"events": [{"kind": "gpu_fail", "gpu": 2, "at_s": 1.0}]},
         "faults.events[0].gpu: GPU 2 does not exist: hardware.num_gpus is 2 (GPUs 0..1)"),
        ({"events": [{"kind": "node_fail", "node": 1, "at_s": 1.0}]},
         "faults.events[0].node: node 1 does not exist: hardware.num_nodes is 1 (nodes 0..0)"),
        ({"events": [{"kind": "gpu_fail", "gpu": 0, "at_s": -1.0}]},
         "faults.events[0].at_s: Input should be greater than or equal to 0 (got -1.0)"),
        ({"events": [{"kind": "gpu_slow", "gpu": 0, "at_s": 1.0, "factor": 0.5}]},
         "faults.events[0].factor: Input should be greater than or equal to 1 (got 0.5)"),
        ({"recovery": {"source": "storage"}},
         "faults.recovery: source 'storage' needs storage_gbps (the checkpoint storage's read bandwidth)"),
        ({"events": [{"kind": "gpu_melt", "at_s": 1.0}]}, "faults.events[0]: unknown 'kind' 'gpu_melt'; expected one of 'gpu_fail', 'node_fail', 'gpu_slow', 'link_degrade'"),
    ],
)
def test_bad_faults_are_one_line_errors(tmp_path: Path, faults: dict, message: str) -> None:
    prof = write_toy_profile(tmp_path)
    data = scenario_data(prof, hardware={"num_gpus": 2})
    data["faults"] = faults
    with pytest.raises(ScenarioError) as err:
        load(data, tmp_path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_summary_run_folder_and_report_show_the_faults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from sim.cli import main

    prof = write_toy_profile(tmp_path)
    data = scenario_data(prof, max_requests=40, rate_per_s=100_000, output_tokens=400, prompt_tokens=64,
                         hardware={"num_gpus": 2})
    data["slo"] = {"ttft_p99_s": 1.0}
    data["faults"] = {"events": [{"kind": "gpu_fail", "gpu": 1, "at_s": 2e-4, "duration_s": 2e-4},
                                 {"kind": "gpu_slow", "gpu": 0, "at_s": 1e-4, "factor": 2.0}],
                      "recovery": {"source": "storage", "storage_gbps": 1.0}}
    path = tmp_path / "faulty.yaml"
    path.write_text(yaml.safe_dump(data))
    out_dir = tmp_path / "run"
    assert main(["simulate", str(path), "--no-progress", "--out", str(out_dir), "--report"]) == 0
    out = capsys.readouterr().out
    assert "faults       1 GPU outage(s), 0 not recovered" in out
    assert "restore 0.3 ms from storage" in out
    assert "GPU 0 slowed 0.000 s - end" in out
    timeline = pd.read_csv(out_dir / "timeline.csv")
    assert timeline["arrived"].sum() == 40
    html = (out_dir / "report.html").read_text()
    assert "Faults and recovery" in html and 'alt="fault timeline"' in html


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    in_flight=st.sampled_from(["requeue", "fail"]),
    no_replica=st.sampled_from(["wait", "reject"]),
    mttr=st.sampled_from([None, 1e-4, 1e-3]),
    preemption=st.sampled_from(["recompute", "swap"]),
)
def test_no_request_vanishes_under_random_failures(tmp_path_factory, seed, in_flight, no_replica, mttr, preemption) -> None:
    """Any schedule of failures (whole nodes too), any policy: every request ends completed, failed,
    rejected or dropped, and what completed generated all its tokens."""
    tmp = tmp_path_factory.mktemp("rnd")
    faults = {"random": [{"kind": "gpu_fail", "mtbf_s": 3e-4, "mttr_s": mttr, "seed": seed},
                         {"kind": "node_fail", "mtbf_s": 1e-3, "mttr_s": 2e-4, "seed": seed + 1}],
              "in_flight": in_flight, "no_replica": no_replica}
    result, summary = run(tmp, faults, hardware={"num_gpus": 4, "num_nodes": 2},
                          policies={"expert_cache": {"name": "all_resident"}, "preemption": {"mode": preemption}})
    req = result.requests
    assert len(req) == 40 and set(req["status"]) <= FINAL
    done = req[req["status"] == "completed"]
    assert (done["generated_tokens"] == done["output_tokens"]).all()
    assert summary["requests"]["unfinished"] == 0
    for rec in summary["faults"]["recoveries"]:
        if rec["restored_at_s"] is not None:
            assert rec["restored_at_s"] >= rec["failed_at_s"] + rec["restore_s"]
