"""``moesim plan``: pruning with reasons, the rate search, ranking, the Pareto front, outputs and CLI errors.

The plans here are OLMoE under fixed-length Poisson traffic (1024-token prompts, 32 output tokens), 40
requests per probe: each candidate searches in well under a second."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.plan import pareto_mask, rate_precision, run_plan, write_plan

PLAN: dict[str, Any] = {
    "name": "tiny-plan",
    "model": "olmoe-1b-7b",
    "hardware": {"profile": "h100-80gb"},
    "workload": {
        "arrivals": {"kind": "poisson", "rate_per_s": 2.0, "prompt_tokens": {"dist": "fixed", "tokens": 1024},
                     "output_tokens": {"dist": "fixed", "tokens": 32}},
        "seed": 3,
    },
    "slo": {"ttft_p99_s": 0.1, "attainment": 0.9},
    "plan": {
        "target_rate_per_s": 4.0,
        "candidates": {
            "hardware": [
                {"profile": "h100-80gb"},
                {"profile": "a100-80gb"},
                # 12.9 GB of experts on a GPU cut to 4 GB: cannot fit, never simulated.
                {"profile": "h100-80gb", "gpu_memory_bytes": 4.0e9, "expert_memory": {"all": True}},
                # 64 of 1024 experts resident, loaded over a 0.2 GB/s link: far over the TTFT bound at any load.
                {"profile": "h100-80gb", "expert_memory": {"experts": 64}, "links": {"host_to_device_gbps": 0.2}},
            ],
        },
        "rate_search": {"low_scale": 0.25, "high_scale": 64, "iterations": 4},
        "max_requests_per_probe": 40,
    },
}


def _write(tmp_path: Path, data: dict[str, Any], name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[pd.DataFrame, list, Path]:
    tmp = tmp_path_factory.mktemp("plan")
    path = _write(tmp, PLAN)
    table, results = run_plan(path, jobs=1, progress=False)
    return table, results, path


def test_ranking_puts_the_cheapest_candidate_meeting_the_target_first(planned):
    table, _, _ = planned
    assert list(table["status"]) == ["meets target", "meets target", "pruned", "pruned"]
    # A100 ($5.12/h) before H100 ($12.29/h): both meet 4 req/s.
    assert [h["profile"] for h in table["hardware"][:2]] == ["a100-80gb", "h100-80gb"]
    assert list(table["rank"]) == [1, 2, 3, 4]
    assert (table.loc[:1, "headroom"] >= 1.0).all()
    assert table.loc[0, "usd_per_hour"] == pytest.approx(5.12)


def test_a_candidate_whose_weights_do_not_fit_is_pruned_unsimulated(planned):
    _, results, _ = planned
    r = results[2]
    assert r.status == "pruned" and r.probes == []
    assert r.reason == "does not fit: 12.9 GB of experts is more than the GPU's 4.0 GB"


def test_a_candidate_missing_the_slo_at_low_load_is_pruned_with_the_bound_it_broke(planned):
    _, results, _ = planned
    r = results[3]
    assert r.status == "pruned"
    # Probed at the target (4 req/s, missed), then at the lowest rate (0.25 x the workload's own), missed again.
    assert [p.met for p in r.probes] == [False, False]
    assert r.probes[0].rate_per_s == pytest.approx(4.0)
    assert r.probes[1].scale == 0.25
    assert r.probes[1].rate_per_s / 0.25 == pytest.approx(r.probes[0].rate_per_s / r.probes[0].scale)
    assert r.reason.startswith(f"misses the SLO even at {r.probes[1].rate_per_s:.3g} req/s (TTFT P99 ")
    assert "> 0.1 s" in r.reason
    assert r.probes[1].busy["h2d_utilization"] > 0.9
    assert r.binding == f"PCIe (expert loads) ({r.probes[1].busy['h2d_utilization']:.0%} busy)"


def test_a_faster_gpu_never_sustains_less_and_the_search_brackets_the_limit(planned):
    _, results, _ = planned
    h100, a100 = results[0], results[1]
    assert h100.max_rate_per_s >= a100.max_rate_per_s > 4.0
    for r in (h100, a100):
        met = [p.rate_per_s for p in r.probes if p.met]
        missed = [p.rate_per_s for p in r.probes if not p.met]
        assert r.max_rate_per_s == max(met)
        # Monotone in load: every probe that met the SLO is below every probe that missed it.
        assert not missed or max(met) < min(missed)
        if r.max_rate_upper_per_s is not None:
            assert r.max_rate_upper_per_s == min(missed)
            # 4 bisection steps over [target, 64 x the workload's rate]: at most that ratio ** (1/16) apart.
            bracket = 64 / r.probes[0].scale
            assert r.max_rate_upper_per_s / r.max_rate_per_s <= bracket ** (1 / 16) * (1 + 1e-9)
        # The first probe is at the target and is the candidate's at-target result.
        assert r.probes[0].rate_per_s == pytest.approx(4.0) and r.at_target is r.probes[0]


def test_the_plan_is_deterministic_and_the_same_with_a_pool(planned, tmp_path):
    table, _, path = planned
    pooled, _ = run_plan(path, jobs=2, progress=False)
    pd.testing.assert_frame_equal(pooled, table)


def test_rate_precision_is_the_bisected_bracket():
    p = rate_precision(0.25, 64.0, 2.0, 4)
    assert p["above_target"] == pytest.approx(32 ** (1 / 16))
    assert p["below_target"] == pytest.approx(8 ** (1 / 16))


def test_pareto_mask_on_a_hand_made_table():
    nan = float("nan")
    table = pd.DataFrame({
        "usd_per_hour":         [10.0, 20.0, 20.0, 30.0, 5.0, 40.0],
        "max_rate_per_s":       [1.0,  2.0,  1.5,  2.0,  nan, 3.0],
        "ttft_p99_at_target_s": [0.5,  0.5,  0.4,  0.5,  nan, 0.1],
    })
    # 0: cheapest; 1: faster; 2: lower TTFT than 1 at the same cost; 3: dominated by 1; 4: unknown; 5: best rate/TTFT.
    assert pareto_mask(table) == [True, True, True, False, False, True]
    two = pareto_mask(table, (("usd_per_hour", -1), ("max_rate_per_s", +1)))
    assert two == [True, True, False, False, False, True]


def test_plan_outputs_and_report(planned, tmp_path):
    table, results, path = planned
    out = write_plan(tmp_path / "out", path, table, results)
    doc = json.loads((out / "plan.json").read_text())
    assert doc["recommended"]["candidate"] == 1 and doc["recommended"]["headroom"] >= 1
    assert doc["pareto"] == [c for c, p in zip(table["candidate"], table["pareto"]) if p]
    assert [c["status"] for c in doc["candidates"]] == [r.status for r in results]
    assert len(doc["candidates"][0]["probes"]) == len(results[0].probes)
    own = doc["workload_rate_per_s"]
    assert doc["rate_search"]["precision"]["above_target"] == pytest.approx((64 * own / 4.0) ** (1 / 16))
    assert len(pd.read_csv(out / "plan.csv")) == 4
    assert main(["report", str(out), "-o", str(tmp_path / "plan.html")]) == 0
    html = (tmp_path / "plan.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "does not fit: 12.9 GB of experts is more than the GPU&#39;s 4.0 GB" in html


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    data = copy.deepcopy(PLAN)
    data["plan"]["candidates"] = {}
    path = _write(tmp_path, data)
    code, out, err = _run(capsys, "plan", str(path), "--no-progress", "--out", str(tmp_path / "o"))
    assert (code, out) == (2, "")
    assert err == (f"moesim: error: {path}: plan.candidates: give at least one key path with a list of values "
                   "to compare\n")
    data = copy.deepcopy(PLAN)
    data["plan"]["prices"] = "missing.yaml"
    code, _, err = _run(capsys, "plan", str(_write(tmp_path, data)), "--no-progress")
    assert code == 2 and err == f"moesim: error: plan.prices: cannot read {tmp_path / 'missing.yaml'}\n"
    data["plan"]["candidates"] = {"hardware.profle": ["h100-80gb"]}
    code, _, err = _run(capsys, "plan", str(_write(tmp_path, data)), "--no-progress")
    assert code == 2 and err.startswith("moesim: error: ") and err.count("\n") == 1


def test_prices_file_override_changes_the_ranking(tmp_path, capsys):
    data = copy.deepcopy(PLAN)
    data["plan"]["candidates"]["hardware"] = PLAN["plan"]["candidates"]["hardware"][:2]
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump({"usd_per_gpu_hour": {"h100-80gb": 1.0, "a100-80gb": 2.0}}))
    data["plan"]["prices"] = "prices.yaml"
    path = _write(tmp_path, data)
    code, out, err = _run(capsys, "plan", str(path), "--no-progress", "--out", str(tmp_path / "o"),
                          "--report", str(tmp_path / "r.html"))
    assert code == 0
    table = pd.read_csv(tmp_path / "o" / "plan.csv")
    assert list(table["usd_per_hour"]) == [1.0, 2.0]
    assert "recommended: candidate 0 " in out and "$1.00/h" in out
    assert err.endswith(f"report: {tmp_path / 'r.html'}\n")
    (tmp_path / "bad.yaml").write_text("usd_per_gpu_hour: {h100-80gb: -1}\n")
    data["plan"]["prices"] = "bad.yaml"
    code, _, err = _run(capsys, "plan", str(_write(tmp_path, data)), "--no-progress")
    assert (code, err) == (2, f"moesim: error: {tmp_path / 'bad.yaml'}: usd_per_gpu_hour: expected a mapping of "
                              "profile name -> positive price\n")


def test_budget_prunes_before_simulating_and_target_rate_overrides(tmp_path, capsys):
    data = copy.deepcopy(PLAN)
    data["plan"]["candidates"] = {"hardware.profile": ["h100-80gb", "a100-80gb"], "hardware.num_gpus": {"min": 1, "max": 2, "num": 2}}
    path = _write(tmp_path, data)
    code, out, _ = _run(capsys, "plan", str(path), "--no-progress", "--jobs", "1", "--out", str(tmp_path / "o"),
                        "--budget", "$12/h", "--target-rate", "2")
    assert code == 0
    doc = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert doc["target_rate_per_s"] == 2.0 and doc["budget"] == {"usd_per_hour": 12.0, "max_gpus": None}
    by = {(c["values"]["hardware.profile"], c["values"]["hardware.num_gpus"]): c for c in doc["candidates"]}
    # Range {min 1, max 2, num 2} -> GPU counts 1 and 2. Over $12/h (H100 x1 at $12.29, H100 x2): never probed.
    assert set(by) == {("h100-80gb", 1), ("h100-80gb", 2), ("a100-80gb", 1), ("a100-80gb", 2)}
    for key in [("h100-80gb", 1), ("h100-80gb", 2)]:
        assert by[key]["status"] == "pruned" and by[key]["probes"] == []
    assert by[("h100-80gb", 1)]["reason"] == "over budget: $12.29/h > $12.00/h"
    for key in [("a100-80gb", 1), ("a100-80gb", 2)]:
        assert by[key]["status"] == "meets target" and by[key]["probes"][0]["rate_per_s"] == pytest.approx(2.0)
    assert f"recommended: candidate {by[('a100-80gb', 1)]['index']} " in out  # A100 x1, the cheapest within budget
    code, _, _ = _run(capsys, "plan", str(path), "--no-progress", "--jobs", "1", "--out", str(tmp_path / "g"), "--budget", "1gpu")
    doc = json.loads((tmp_path / "g" / "plan.json").read_text())
    assert code == 0 and [c["reason"] for c in doc["candidates"] if c["values"]["hardware.num_gpus"] == 2] == [
        "over budget: 2 GPUs > 1"] * 2
    code, _, err = _run(capsys, "plan", str(path), "--no-progress", "--budget", "lots")
    assert (code, err) == (2, "moesim: error: --budget lots: expected a cost per hour (e.g. 40 or $40/h) or a GPU count "
                              "(e.g. 8gpus)\n")


def test_binding_reads_any_busy_field_of_the_summary():
    from sim.plan import Probe, _binding, busy_fields

    summary = {
        "resources": [
            {"replica": 0, "compute_utilization": 0.4, "h2d_utilization": 0.3, "all_to_all_utilization": 0.7},
            {"replica": 1, "compute_utilization": 0.6, "h2d_utilization": 0.2, "all_to_all_utilization": 0.9},
        ],
        "busy": {"straggler_wait_fraction": 0.2, "nvlink_utilization": 0.1},
    }
    busy = busy_fields(summary)
    assert busy == {"compute_utilization": 0.6, "h2d_utilization": 0.3, "all_to_all_utilization": 0.9,
                    "straggler_wait_fraction": 0.2, "nvlink_utilization": 0.1}
    probe = Probe(scale=1, rate_per_s=1, met=True, ttft_p99_s=0.1, tbt_p99_s=0.1, attainment=1.0, compute_utilization=0.6,
                  h2d_utilization=0.3, kv_peak_fraction=0.1, preemptions=0, rejected=0, busy=busy)
    assert _binding(probe) == "all-to-all (90% busy)"
    probe.busy = {**busy, "all_to_all_utilization": 0.1, "straggler_wait_fraction": 0.95}
    assert _binding(probe) == "stragglers (95% busy)"
    probe.busy = {"compute_utilization": 0.2, "nvlink_utilization": 0.8}  # an unlisted field is named after itself
    assert _binding(probe) == "nvlink (80% busy)"
    probe.busy = {"compute_utilization": 0.2}
    assert _binding(probe) == "latency SLO (resources not saturated)"
    probe.preemptions = 3
    assert _binding(probe) == "KV memory"


def test_plan_without_a_scenario_runs_the_shipped_default(tmp_path, capsys, monkeypatch):
    import sim.plan
    from sim.plan import DEFAULT_PLAN, candidates

    # The shipped default compares the three GPUs, 1-8 GPUs, expert budgets and cache policies.
    cands, base, _ = candidates(DEFAULT_PLAN)
    values = [v for v, _ in cands]
    assert {v["hardware.profile"] for v in values} == {"a100-80gb", "h100-80gb", "h200"}
    assert sorted({v["hardware.num_gpus"] for v in values}) == [1, 2, 4, 8]
    assert len({v["hardware.expert_memory.fraction"] for v in values}) >= 2
    assert len({v["policies.expert_cache.name"] for v in values}) >= 2
    # `moesim plan` with no argument plans whatever DEFAULT_PLAN names (here a tiny one).
    data = copy.deepcopy(PLAN)
    data["plan"]["candidates"]["hardware"] = PLAN["plan"]["candidates"]["hardware"][1:2]
    monkeypatch.setattr(sim.plan, "DEFAULT_PLAN", str(_write(tmp_path, data, "tiny.yaml")))
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "plan", "--no-progress", "--jobs", "1", "--report")
    assert code == 0 and "recommended: candidate 0 " in out
    assert err.endswith(f"report: {Path('reports') / 'plan-tiny.html'}\n") and (tmp_path / "runs" / "plan-tiny" / "plan.json").exists()
