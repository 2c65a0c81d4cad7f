"""A run as a user sees it: limits it cannot meet, a stopped run, the run folder, the default scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import simpy

from sim.cli import main
from sim.engine.simulation import simulate
from sim.errors import CapacityError, ScenarioError
from sim.metrics import summarize
from sim.run_folder import write_run_folder
from sim.scenario import load_scenario, parse_scenario, resolve


def _scenario(tmp_path: Path, **overrides) -> dict:
    data = {
        "model": "olmoe-1b-7b",
        "hardware": {"profile": "h100-80gb", "expert_memory": {"experts": 256}},
        "workload": {
            "arrivals": {
                "kind": "poisson", "rate_per_s": 2.0,
                "prompt_tokens": {"dist": "uniform", "low": 50, "high": 400},
                "output_tokens": {"dist": "uniform", "low": 5, "high": 60},
            },
            "max_requests": 40,
            "seed": 3,
        },
        "policies": {"expert_cache": {"name": "lru"}},
    }
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def _load(tmp_path: Path, data: dict):
    return resolve(parse_scenario(data, "t.yaml"), "t.yaml", tmp_path)


def test_weights_that_do_not_fit_are_one_clear_error(tmp_path):
    loaded = _load(tmp_path, _scenario(tmp_path, **{"model": "mixtral-8x7b", "hardware.profile": "a100-40gb",
                                                     "hardware.expert_memory": {"fraction": 0.99}}))
    with pytest.raises(CapacityError, match=r"does not fit on .* GB: non-expert weights"):
        simulate(loaded)


def test_no_request_fits_the_kv_cache_is_one_clear_error(tmp_path):
    data = _scenario(tmp_path, **{"hardware.gpu_memory_bytes": 3.6e9, "hardware.expert_memory": {"experts": 16},
                                  "hardware.reserve_fraction": 0.0})
    data["workload"]["arrivals"]["prompt_tokens"] = {"dist": "fixed", "tokens": 30000}
    with pytest.raises(CapacityError, match="fewer than the smallest request"):
        simulate(_load(tmp_path, data))


def test_a_request_that_never_fits_is_rejected_with_a_reason(tmp_path):
    data = _scenario(tmp_path, **{"hardware.gpu_memory_bytes": 3.6e9, "hardware.expert_memory": {"experts": 16},
                                  "hardware.reserve_fraction": 0.0})
    loaded = _load(tmp_path, data)
    from sim.engine.memory import max_request_tokens, plan_memory

    limit = max_request_tokens(plan_memory(loaded))
    data["workload"]["arrivals"]["prompt_tokens"] = {"dist": "uniform", "low": limit - 100, "high": limit}
    result = simulate(_load(tmp_path, data))
    req = result.requests
    too_big = req["prompt_tokens"] + req["output_tokens"] > limit
    assert too_big.any() and (~too_big).any()
    assert (req.loc[too_big, "status"] == "rejected").all()
    assert (req.loc[too_big, "reason"] == "exceeds_kv_capacity").all()
    assert (req.loc[~too_big, "status"] == "completed").all()


def test_no_chunking_rejects_prompts_longer_than_the_token_budget(tmp_path):
    data = _scenario(tmp_path, **{"policies.batching": {"chunked_prefill": False, "max_batch_tokens": 200}})
    result = simulate(_load(tmp_path, data))
    req = result.requests
    long = req["prompt_tokens"] > 200
    assert long.any()
    assert (req.loc[long, "reason"] == "prompt_exceeds_batch_tokens").all()
    assert (req.loc[~long, "status"] == "completed").all()


def test_queue_timeout_drops_waiting_requests_with_a_reason(tmp_path):
    data = _scenario(tmp_path, **{"policies.batching": {"max_num_seqs": 1, "queue_timeout_s": 0.05}})
    data["workload"]["arrivals"]["rate_per_s"] = 200.0
    result = simulate(_load(tmp_path, data))
    req = result.requests
    dropped = req["status"] == "dropped"
    assert dropped.any()
    assert (req.loc[dropped, "reason"] == "queue_timeout").all()
    assert set(req["status"]) <= {"completed", "dropped"}


def test_stop_at_keeps_what_finished_and_marks_the_rest(tmp_path):
    full = simulate(_load(tmp_path, _scenario(tmp_path)))
    cut = simulate(_load(tmp_path, _scenario(tmp_path)), stop_at_s=full.simulated_s / 3)
    assert cut.partial and not full.partial
    statuses = set(cut.requests["status"])
    assert any(s.startswith("unfinished") for s in statuses)
    done = cut.requests[cut.requests["status"] == "completed"]
    # What finished before the stop finished exactly as in the full run.
    merged = done.merge(full.requests, on="request_id", suffixes=("", "_full"))
    assert (merged["finished_at_s"] == merged["finished_at_s_full"]).all()
    assert summarize(cut)["partial"] is True


def test_ctrl_c_stops_cleanly_and_keeps_partial_results(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_run = simpy.Environment.run

    def interrupted(self, until=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_run(self, until)

    monkeypatch.setattr(simpy.Environment, "run", interrupted)
    result = simulate(_load(tmp_path, _scenario(tmp_path)))
    assert result.partial
    assert len(result.requests) > 0
    assert summarize(result)["requests"]["unfinished"] > 0


def test_run_folder_holds_tables_and_summary(tmp_path):
    result = simulate(_load(tmp_path, _scenario(tmp_path)))
    summary = summarize(result)
    folder = write_run_folder(result, summary, tmp_path / "run")
    names = {p.name for p in folder.iterdir()}
    assert {"scenario.resolved.yaml", "profile.provenance.yaml", "requests.csv", "iterations.csv",
            "resources.csv", "summary.json"} <= names
    assert not (tmp_path / "run.tmp").exists()
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["requests"]["completed"] == summary["requests"]["completed"] == 40
    assert len(pd.read_csv(folder / "requests.csv")) == 40
    # The resolved scenario is itself runnable.
    again = load_scenario(folder / "scenario.resolved.yaml")
    assert again.model == result.loaded.model


def test_throughput_and_latency_come_from_the_request_table(tmp_path):
    result = simulate(_load(tmp_path, _scenario(tmp_path)))
    summary = summarize(result)
    req = result.requests
    span = req["finished_at_s"].max() - req["arrived_at_s"].min()
    assert summary["throughput"]["output_tokens_per_s"] == pytest.approx(req["output_tokens"].sum() / span)
    assert summary["latency"]["ttft_p99_s"] == pytest.approx(req["ttft_s"].quantile(0.99))
    assert len(result.tbt_samples_s) == int((req["output_tokens"] - 1).sum())


def test_slo_attainment_counts_requests_meeting_every_bound(tmp_path):
    data = _scenario(tmp_path, slo={"ttft_p99_s": 0.05, "attainment": 0.5})
    result = simulate(_load(tmp_path, data))
    slo = summarize(result)["slo"]
    expected = (result.requests["ttft_s"] <= 0.05).mean()
    assert slo["attainment"] == pytest.approx(expected)
    assert slo["targets"]["ttft_p99_s"]["met"] == (result.requests["ttft_s"].quantile(0.99) <= 0.05)


def test_encoder_decoder_models_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ScenarioError, match="encoder-decoder"):
        simulate(_load(tmp_path, _scenario(tmp_path, model="switch-base-8")))


def test_default_simulate_command_runs_the_shipped_scenario(capsys, tmp_path):
    code = main(["simulate", "--no-progress", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    assert "scenario mixtral-offload-h100: mixtral-8x7b on 1x h100-80gb" in out
    assert "expert cache lfu" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["requests"]["arrived"] == summary["requests"]["completed"] > 0
