"""Closed-loop workloads: N clients, each sending its next request when its previous one finished.

The rule (``ClosedLoopIssuer``) is checked on its own, then through whole simulated runs on the toy profile of
``engine_fixtures``: never more than ``clients`` requests outstanding, each next request sent exactly a think
time after an answer, one client's requests served alone, and the workload's mistakes as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.engine.simulation import build_request_table, simulate
from sim.metrics import summarize
from sim.workload.closed_loop import ClosedLoop, ClosedLoopIssuer

from engine_fixtures import load, scenario_data, write_toy_profile

FINAL = {"completed", "failed", "rejected", "dropped"}


def closed_data(profile: Path, *, clients: int, think_time_s: float = 0.0, think_time: str = "fixed",
                max_requests: int = 12, prompt_tokens: int = 8, output_tokens: int = 3, **kw) -> dict:
    data = scenario_data(profile, max_requests=max_requests, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                         **kw)
    data["workload"]["arrivals"] = {
        "kind": "closed_loop", "clients": clients, "think_time_s": think_time_s, "think_time": think_time,
        "prompt_tokens": {"dist": "fixed", "tokens": prompt_tokens},
        "output_tokens": {"dist": "fixed", "tokens": output_tokens},
    }
    return data


def one_client_from_requests_csv(profile: Path) -> dict:
    """One client sending the requests of ``reqs.csv`` (beside the profile: columns t, p, o) in order."""
    data = closed_data(profile, clients=1)
    data["workload"]["arrivals"] = {
        "kind": "closed_loop", "clients": 1,
        "requests": {"path": "reqs.csv", "format": "csv", "time_unit": "s",
                     "columns": {"arrival": "t", "prompt_tokens": "p", "output_tokens": "o"}},
    }
    data["workload"]["max_requests"] = None
    return data


def outstanding_peak(req: pd.DataFrame) -> int:
    """Most requests sent and not yet answered at any instant (an answer at t frees its client before a send at t)."""
    events = sorted([(t, 1) for t in req["arrived_at_s"]] + [(t, -1) for t in req["finished_at_s"]])
    level = peak = 0
    for _, step in events:  # at equal times -1 sorts first
        level += step
        peak = max(peak, level)
    return peak


# ---------------------------------------------------------------- the rule


def test_issuer_sends_the_first_clients_at_zero_then_one_per_answer_in_id_order():
    loop = ClosedLoop(3, np.array([9.0, 9.0, 9.0, 0.5, 1.5]))
    issuer = ClosedLoopIssuer(loop, 5)
    assert issuer.initial() == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert issuer.after_finish(10.0) == (3, 10.5)
    assert issuer.after_finish(11.0) == (4, 12.5)
    assert issuer.after_finish(12.0) is None


def test_issuer_with_more_clients_than_requests_sends_them_all_at_once():
    issuer = ClosedLoopIssuer(ClosedLoop(8, np.zeros(3)), 3)
    assert issuer.initial() == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert issuer.after_finish(1.0) is None


@pytest.mark.parametrize("clients, think", [(0, [0.0]), (1, [-1.0]), (1, [np.nan])])
def test_closed_loop_rejects_no_clients_and_bad_think_times(clients, think):
    with pytest.raises(ValueError):
        ClosedLoop(clients, np.array(think))


# ---------------------------------------------------------------- whole runs


def test_one_client_is_served_alone_and_each_request_follows_the_last_answer(tmp_path: Path):
    """One client, think 0.25 s: request i+1 is sent 0.25 s after request i's answer, nothing queues, and every
    request (same lengths) takes exactly what one request alone takes in an open-loop run."""
    prof = write_toy_profile(tmp_path)
    alone = simulate(load(scenario_data(prof, max_requests=1), tmp_path)).requests.iloc[0]
    result = simulate(load(closed_data(prof, clients=1, think_time_s=0.25, max_requests=6), tmp_path))
    req = result.requests.sort_values("request_id")
    assert (req["status"] == "completed").all() and len(req) == 6
    assert req["arrived_at_s"].iloc[0] == 0.0
    np.testing.assert_allclose(req["arrived_at_s"].to_numpy()[1:], req["finished_at_s"].to_numpy()[:-1] + 0.25,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(req["e2e_s"], alone["e2e_s"], rtol=1e-8)  # float sums at other offsets
    assert (req["admitted_at_s"] == req["arrived_at_s"]).all()


@pytest.mark.parametrize("clients", [1, 2, 5])
def test_never_more_than_clients_outstanding_and_always_that_many_until_the_tail(tmp_path: Path, clients: int):
    prof = write_toy_profile(tmp_path)
    result = simulate(load(closed_data(prof, clients=clients, max_requests=20), tmp_path))
    req = result.requests
    assert (req["status"] == "completed").all()
    assert outstanding_peak(req) == clients
    assert (req["arrived_at_s"] == 0.0).sum() == clients
    # With no think time every answer sends the next request at once: each arrival but the first `clients`
    # is some request's finish time.
    finishes = set(req["finished_at_s"].round(12))
    later = req.sort_values("request_id")["arrived_at_s"].iloc[clients:]
    assert all(round(t, 12) in finishes for t in later)


def test_exponential_think_times_are_seeded_and_have_their_mean(tmp_path: Path):
    prof = write_toy_profile(tmp_path)
    data = closed_data(prof, clients=2, think_time_s=0.5, think_time="exponential", max_requests=4000)
    tables = [build_request_table(load(data, tmp_path), np.random.default_rng(seed)) for seed in (1, 1, 2)]
    assert tables[0].equals(tables[1]) and not tables[0].equals(tables[2])
    think = tables[0].closed_loop.think_s
    assert think.mean() == pytest.approx(0.5, rel=0.06) and think.std() == pytest.approx(0.5, rel=0.1)
    assert (tables[0].arrival_s == 0).all()


def test_a_closed_loop_run_is_deterministic(tmp_path: Path):
    prof = write_toy_profile(tmp_path)
    data = closed_data(prof, clients=3, think_time_s=0.01, think_time="exponential", max_requests=15)
    a, b = (simulate(load(data, tmp_path)).requests for _ in range(2))
    pd.testing.assert_frame_equal(a, b)


def test_requests_from_a_trace_keep_their_order_and_lengths_and_ignore_its_times(tmp_path: Path):
    prof = write_toy_profile(tmp_path)
    pd.DataFrame({"t": [5.0, 6.0, 100.0], "p": [4, 16, 8], "o": [2, 5, 3]}).to_csv(tmp_path / "reqs.csv", index=False)
    data = one_client_from_requests_csv(prof)
    req = simulate(load(data, tmp_path)).requests.sort_values("request_id")
    assert req["prompt_tokens"].tolist() == [4, 16, 8] and req["output_tokens"].tolist() == [2, 5, 3]
    assert req["arrived_at_s"].iloc[0] == 0.0 and req["arrived_at_s"].iloc[2] < 100.0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), clients=st.integers(1, 6), in_flight=st.sampled_from(["requeue", "fail"]))
def test_no_client_waits_forever_under_random_failures(tmp_path_factory, seed, clients, in_flight):
    """Failed and requeued requests still answer their clients: every request ends, never above `clients`."""
    tmp = tmp_path_factory.mktemp("cl")
    data = closed_data(write_toy_profile(tmp), clients=clients, max_requests=30, prompt_tokens=64, output_tokens=50,
                       hardware={"num_gpus": 2})
    data["faults"] = {"random": [{"kind": "gpu_fail", "mtbf_s": 3e-4, "mttr_s": 1e-4, "seed": seed,
                                  "horizon_s": 0.01}], "in_flight": in_flight, "no_replica": "wait"}
    result = simulate(load(data, tmp))
    req = result.requests
    assert len(req) == 30 and set(req["status"]) <= FINAL
    assert outstanding_peak(req) <= clients


# ---------------------------------------------------------------- mistakes


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "closed.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["workload"].update(max_requests=None, max_duration_s=30.0), "limit it with max_requests, not max_duration_s"),
    (lambda d: d["workload"].update(max_requests=None), "needs a limit: set max_requests"),
    (lambda d: d["workload"]["arrivals"].pop("output_tokens"), "give prompt_tokens and output_tokens, or requests"),
    (lambda d: d["workload"]["arrivals"].update(requests={"path": "azure-2023-conv"}), "not both"),
    (lambda d: d["workload"]["arrivals"].update(clients=0), "workload.arrivals.clients"),
    (lambda d: d["workload"]["arrivals"].update(think_time="gamma"), "workload.arrivals.think_time"),
    (lambda d: d.update(faults={"random": [{"kind": "gpu_fail", "mtbf_s": 1.0}]}), "faults.random[0]: horizon_s is needed"),
])
def test_closed_loop_mistakes_are_one_line_errors(tmp_path: Path, capsys, change, expected):
    data = closed_data(write_toy_profile(tmp_path), clients=2)
    change(data)
    path = _write(tmp_path, data)
    assert main(["simulate", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moesim: error: {path}") and expected in err and err.count("\n") == 1


def test_plan_refuses_a_closed_loop_with_what_to_do_instead(tmp_path: Path, capsys):
    data = closed_data(write_toy_profile(tmp_path), clients=2)
    data["slo"] = {"ttft_p99_s": 1.0, "tbt_p99_s": 1.0, "attainment": 0.9}
    data["plan"] = {"candidates": {"hardware.num_gpus": [1, 2]}}
    path = _write(tmp_path, data)
    assert main(["plan", str(path), "--no-progress", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "has no arrival rate" in err and "workload.arrivals.clients" in err and err.count("\n") == 1


def test_simulate_prints_and_records_the_loop(tmp_path: Path, capsys):
    path = _write(tmp_path, closed_data(write_toy_profile(tmp_path), clients=3, think_time_s=0.5))
    assert main(["simulate", str(path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "closed loop  3 clients, each sending its next request when answered (fixed think time 500.0 ms)" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["requests"]["closed_loop"]["clients"] == 3
    assert main(["report", str(tmp_path / "o"), "--out", str(tmp_path / "r.html")]) == 0
    assert "3 clients, each sending its next request when answered (fixed think time" in (tmp_path / "r.html").read_text()


def test_a_sweep_over_clients_runs_each_concurrency(tmp_path: Path):
    data = closed_data(write_toy_profile(tmp_path), clients=1, max_requests=8, output_tokens=10)
    data["sweep"] = {"axes": {"workload.arrivals.clients": [1, 4]}}
    path = _write(tmp_path, data)
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "s" / "sweep.csv")
    assert table["workload.arrivals.clients"].tolist() == [1, 4]
    assert table["completed"].tolist() == [8, 8]
    assert table["e2e_p50_s"].iloc[1] != table["e2e_p50_s"].iloc[0]  # four clients share iterations


def test_with_no_think_time_the_next_request_joins_the_very_next_iteration(tmp_path: Path):
    """An answer at the end of an iteration sends the next request before the server forms its next batch
    (the runtime does the same), so one client's requests run back to back with no idle iteration gap."""
    prof = write_toy_profile(tmp_path)
    result = simulate(load(closed_data(prof, clients=1, max_requests=5), tmp_path))
    it = result.iterations
    ends = (it["started_at_s"] + it["duration_s"]).to_numpy()
    np.testing.assert_allclose(it["started_at_s"].to_numpy()[1:], ends[:-1], rtol=0, atol=1e-15)
    assert len(it) == 5 * 3  # prefill + 2 decodes per request, never a batch of two


def test_requests_rejected_one_after_another_do_not_recurse(tmp_path: Path):
    """Every second request is too long for the KV cache: each rejection answers its client at once."""
    prof = write_toy_profile(tmp_path)
    n = 3000
    lengths = [8 if i % 2 == 0 else 10**8 for i in range(n)]
    pd.DataFrame({"t": np.zeros(n), "p": lengths, "o": 2}).to_csv(tmp_path / "reqs.csv", index=False)
    data = one_client_from_requests_csv(prof)
    req = simulate(load(data, tmp_path)).requests
    assert (req["status"] == "rejected").sum() == n // 2 and (req["status"] == "completed").sum() == n // 2


def test_scaling_the_rate_of_a_closed_loop_scales_its_think_times(tmp_path: Path):
    data = closed_data(write_toy_profile(tmp_path), clients=2, think_time_s=0.6)
    table = build_request_table(load(data, tmp_path), np.random.default_rng(0))
    faster = table.scale_rate(3.0)
    assert faster.closed_loop.clients == 2
    np.testing.assert_allclose(faster.closed_loop.think_s, 0.2)
    assert faster.limit(max_requests=5).closed_loop.think_s.shape == (5,)


def test_recorded_think_times_are_used_in_order_and_must_match_the_requests(tmp_path: Path, capsys):
    prof = write_toy_profile(tmp_path)
    data = closed_data(prof, clients=1, max_requests=4)
    data["workload"]["arrivals"]["think_times_s"] = [9.0, 0.5, 0.25, 1.0]
    req = simulate(load(data, tmp_path)).requests.sort_values("request_id")
    gaps = req["arrived_at_s"].to_numpy()[1:] - req["finished_at_s"].to_numpy()[:-1]
    np.testing.assert_allclose(gaps, [0.5, 0.25, 1.0], rtol=1e-9)
    # The summary says the pauses were recorded, with their mean (the first client's own pause is never used).
    loop = summarize(simulate(load(data, tmp_path)))["requests"]["closed_loop"]
    assert loop["think_time"] == "recorded" and loop["think_time_s"] == pytest.approx(1.75 / 3)
    data["workload"]["arrivals"]["think_times_s"] = [0.5, 0.5]
    path = _write(tmp_path, data)
    assert main(["simulate", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "think_times_s has 2 pauses for 4 requests; expected one per request" in capsys.readouterr().err
