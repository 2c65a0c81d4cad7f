"""Report sections appear when their data exists (and only then), user text is escaped everywhere,
and validation folders render."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import yaml

from sim.cli import main
from sim.report.render import render_report

from test_plan import PLAN
from test_sweep_report import SWEEP

EVIL = "<script>alert('x')</script> & co"
ESCAPED = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co"


def _write(tmp_path: Path, data: dict, name: str) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _simulate(tmp_path: Path, data: dict) -> Path:
    path = _write(tmp_path, data, "run.yaml")
    assert main(["simulate", str(path), "--no-progress", "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run"


def test_every_report_escapes_user_text(tmp_path, capsys):
    run = {k: v for k, v in copy.deepcopy(SWEEP).items() if k != "sweep"}
    run["name"], run["description"] = EVIL, EVIL
    folder = _simulate(tmp_path, run)
    html = render_report(folder).read_text()
    assert ESCAPED in html and "<script" not in html.lower()
    plan = copy.deepcopy(PLAN)
    plan["name"], plan["description"] = EVIL, EVIL
    plan["plan"]["candidates"]["hardware"] = plan["plan"]["candidates"]["hardware"][1:3]
    assert main(["plan", str(_write(tmp_path, plan, "plan.yaml")), "--jobs", "1", "--no-progress",
                 "--out", str(tmp_path / "plan"), "--report", str(tmp_path / "plan.html")]) == 0
    html = (tmp_path / "plan.html").read_text()
    assert html.count(ESCAPED) >= 2 and "<script" not in html.lower()
    sweep = copy.deepcopy(SWEEP)
    sweep["sweep"]["axes"] = {"policies.expert_cache.name": ["lru", "lfu"]}
    out = tmp_path / "<script>sweep"
    assert main(["sweep", str(_write(tmp_path, sweep, "sweep.yaml")), "--jobs", "1", "--no-progress",
                 "--out", str(out)]) == 0
    html = render_report(out).read_text()
    assert "&lt;script&gt;sweep" in html and "<script" not in html.lower()


def test_run_report_sections_follow_the_data(tmp_path):
    folder = _simulate(tmp_path, {k: v for k, v in SWEEP.items() if k != "sweep"})  # 512 of 1024 experts: LRU
    load = pd.read_csv(folder / "expert_load.csv")
    iterations = pd.read_csv(folder / "iterations.csv")
    # Every access of an expert is a hit or a miss, so the table sums to the run's hits + misses.
    assert load["iterations"].sum() == (iterations["expert_hits"] + iterations["expert_misses"]).sum()
    assert len(load) == 16 * 64  # OLMoE: 16 MoE layers x 64 experts
    html = render_report(folder).read_text()
    for title in ("Throughput and latency against load", "Expert load imbalance", "GPU memory by kind",
                  "Links, compute and the expert cache", "Hardware profile provenance", "Latency and SLO"):
        assert f"<h2>{title}</h2>" in html
    # The engine's per-layer table (sim.engine.layer_stats) brings the hit rate by layer and the time split.
    layers = pd.read_csv(folder / "layers.csv")
    assert len(layers) == 16 and (layers["hits"] + layers["misses"]).sum() == load["iterations"].sum()
    assert "<h2>Expert-cache hit rate by layer</h2>" in html and html.count("<img") == 9
    # Another per-layer table (e.g. a future engine's) is drawn as it comes; an unknown time column is drawn too.
    pd.DataFrame({"layer": range(4), "hits": [9, 8, 5, 0], "misses": [1, 2, 5, 0], "attention_s": [1.0] * 4,
                  "experts_s": [2.0] * 4, "all_to_all_s": [0.5] * 4, "mystery_wait_s": [0.1] * 4}).to_csv(
        folder / "layers.csv", index=False)
    html = render_report(folder).read_text()
    assert "<h2>Expert-cache hit rate by layer</h2>" in html and "<h2>Per-layer time breakdown</h2>" in html
    assert "attention, experts, all-to-all, mystery wait." in html and html.count("<img") == 9
    # All experts resident: the engine records no accesses, so no file and no heatmap.
    data = {k: v for k, v in copy.deepcopy(SWEEP).items() if k != "sweep"}
    data["hardware"]["expert_memory"] = {"all": True}
    data["policies"] = {"expert_cache": {"name": "all_resident"}}
    (tmp_path / "resident").mkdir()
    other = _simulate(tmp_path / "resident", data)
    assert not (other / "expert_load.csv").exists()
    assert "Expert load imbalance" not in render_report(other).read_text()


def test_a_validation_folder_renders_its_verdict_bounds_and_scatter(tmp_path):
    folder = tmp_path / "validate-x"
    folder.mkdir()
    summary = {"scenario": EVIL, "profile": "p.yaml", "quick": False, "passed": False,
               "bounds": {"median_e2e_ape": 0.05, "p95_e2e_ape": 0.15},
               "failures": ["P95 e2e APE 20.5% > 15%"], "metrics": {"e2e_ape_median": 0.025, "e2e_ape_p95": 0.205,
                                                                    "e2e_bias_median": -0.01, "num_requests": 40}}
    (folder / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame({"e2e_s_real": [1.0, 2.0, 3.0], "e2e_s_sim": [1.1, 1.9, 3.4], "ttft_s_real": [0.1, 0.2, 0.3],
                  "ttft_s_sim": [0.1, 0.25, 0.3]}).to_csv(folder / "comparison.csv", index=False)
    assert main(["report", str(folder), "-o", str(tmp_path / "v.html")]) == 0
    html = (tmp_path / "v.html").read_text()
    assert ESCAPED in html and "<script" not in html.lower()
    assert "FAIL</span>: P95 e2e APE 20.5% &gt; 15%" in html
    # The text `moesim validate` printed, from whatever metrics the folder has (an older folder has fewer).
    assert "40 requests" in html and "e2e                           2.5%     20.5%        -1.0%" in html
    assert "FAIL: P95 e2e APE 20.5% &gt; 15%</pre>" in html
    assert html.count("data:image/png;base64,") == 1
