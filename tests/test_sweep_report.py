"""Sweeps (grid, cache, resume, infeasible points) and the self-contained HTML report."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.report.render import render_run_report
from sim.sweep import run_sweep

SWEEP = {
    "name": "tiny-sweep <b>&",
    "model": "olmoe-1b-7b",
    "hardware": {"profile": "h100-80gb", "expert_memory": {"experts": 512}},
    "workload": {
        "arrivals": {"kind": "poisson", "rate_per_s": 4.0, "prompt_tokens": {"dist": "fixed", "tokens": 64},
                     "output_tokens": {"dist": "fixed", "tokens": 8}},
        "max_requests": 12,
        "seed": 1,
    },
    "slo": {"ttft_p99_s": 1.0},
    "sweep": {"axes": {"hardware.expert_memory.experts": [512, 1024], "policies.expert_cache.name": ["lru", "lfu"]}},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sweep_runs_every_point_and_reuses_them(tmp_path):
    path = _write(tmp_path, SWEEP)
    table = run_sweep(path, tmp_path / "out", jobs=1, progress=False)
    assert len(table) == 4
    assert list(table["policies.expert_cache.name"]) == ["lru", "lfu", "lru", "lfu"]
    assert (table["completed"] == 12).all()
    # All 1024 experts resident: no misses at all; half of them: some.
    full = table[table["hardware.expert_memory.experts"] == 1024]
    assert (full["hit_rate"] == 1.0).all()
    assert (table[table["hardware.expert_memory.experts"] == 512]["hit_rate"] < 1.0).all()
    # A second run simulates nothing: each point's folder is reused as it is.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "points").glob("*/summary.json")}
    again = run_sweep(path, tmp_path / "out", jobs=1, progress=False)
    assert again.equals(table)
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "points").glob("*/summary.json")}


def test_sweep_resumes_after_a_lost_point_and_pool_matches_in_process(tmp_path):
    path = _write(tmp_path, SWEEP)
    first = run_sweep(path, tmp_path / "a", jobs=1, progress=False)
    lost = next((tmp_path / "a" / "points").iterdir())
    for f in lost.iterdir():
        f.unlink()
    lost.rmdir()
    resumed = run_sweep(path, tmp_path / "a", jobs=1, progress=False)
    assert resumed.equals(first)
    pooled = run_sweep(path, tmp_path / "b", jobs=2, progress=False)
    assert pooled.drop(columns=["key"]).equals(first.drop(columns=["key"]))


def test_an_infeasible_point_is_a_row_with_its_reason(tmp_path):
    data = json.loads(json.dumps(SWEEP))
    data["model"] = "mixtral-8x7b"
    data["hardware"]["expert_memory"] = {"experts": 16}
    data["sweep"] = {"axes": {"hardware.expert_memory.experts": [16, 240]}}
    table = run_sweep(_write(tmp_path, data), tmp_path / "out", jobs=1, progress=False)
    assert table.loc[0, "completed"] == 12
    assert "does not fit" in table.loc[1, "infeasible"]
    on_disk = pd.read_csv(tmp_path / "out" / "sweep.csv")
    assert len(on_disk) == 2


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value.startswith(("http://", "https://", "//")):
                self.external.append(value)


def test_report_is_self_contained_and_escapes_user_text(tmp_path, capsys):
    data = {k: v for k, v in SWEEP.items() if k != "sweep"}
    path = _write(tmp_path, data)
    assert main(["simulate", str(path), "--no-progress", "--out", str(tmp_path / "run"), "--report"]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    parser = _Images()
    parser.feed(html)
    assert parser.external == []
    # latency CDFs, throughput, latency vs load, memory, utilisation, breakdown, expert load heatmap,
    # hit rate by layer and the per-layer time breakdown (layers.csv)
    assert len(parser.sources) == 9
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # The scenario's name is user text: escaped, never raw markup.
    assert "tiny-sweep &lt;b&gt;&amp;" in html
    assert "tiny-sweep <b>&" not in html
    assert re.search(r"12 arrived, 12 completed", html)


def test_report_command_and_a_folder_that_is_not_a_run(tmp_path, capsys):
    data = {k: v for k, v in SWEEP.items() if k != "sweep"}
    assert main(["simulate", str(_write(tmp_path, data)), "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_render_run_report_default_location(tmp_path):
    data = {k: v for k, v in SWEEP.items() if k != "sweep"}
    assert main(["simulate", str(_write(tmp_path, data)), "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert render_run_report(tmp_path / "run") == tmp_path / "run" / "report.html"


def test_sweep_report_has_the_table_and_a_figure_per_metric(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = json.loads(json.dumps(SWEEP))
    data["name"] = "tiny-sweep"
    path = _write(tmp_path, data)
    assert main(["sweep", str(path), "--jobs", "1", "--no-progress", "--out", str(tmp_path / "out"), "--report"]) == 0
    report = tmp_path / "reports" / "sweep-sweep.html"
    assert capsys.readouterr().err.endswith(f"report: {Path('reports') / 'sweep-sweep.html'}\n")
    html = report.read_text()
    parser = _Images()
    parser.feed(html)
    assert parser.external == [] and len(parser.sources) == 1
    assert html.count("<tr>") == 1 + 4  # header + one row per point
    assert "Metrics against hardware.expert_memory.experts" in html
    # `moesim report` recognises a sweep folder.
    assert main(["report", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").read_text().count("<tr>") == 5


def test_report_of_an_infeasible_only_sweep_still_renders(tmp_path):
    from sim.report.render import render_sweep_report

    data = json.loads(json.dumps(SWEEP))
    data["model"] = "mixtral-8x7b"
    data["hardware"]["expert_memory"] = {"experts": 16}
    data["sweep"] = {"axes": {"hardware.expert_memory.experts": [230, 240]}}
    run_sweep(_write(tmp_path, data), tmp_path / "out", jobs=1, progress=False)
    html = render_sweep_report(tmp_path / "out").read_text()
    assert "does not fit" in html and "data:image/png" not in html


def test_a_policy_comparison_sweep_gets_the_memory_latency_fidelity_tradeoff(tmp_path):
    """Variants x expert memory: the rows carry routing fidelity (1 for on-demand LRU, below 1 for a
    rerouting static set), bytes over the host link, and the report adds the trade-off figure."""
    from sim.report.render import render_sweep_report

    data = json.loads(json.dumps(SWEEP))
    data["sweep"] = {"axes": {"hardware.expert_memory.experts": [512]},
                     "variants": {"lru": {"policies.expert_cache": {"name": "lru"}},
                                  "static-reroute": {"policies.expert_cache": {"name": "static_hot", "miss": "reroute"}}}}
    table = run_sweep(_write(tmp_path, data), tmp_path / "out", jobs=1, progress=False)
    assert list(table["variant"]) == ["lru", "static-reroute"]
    lru, static = table.itertuples()
    assert lru.routing_fidelity == 1.0 and 0.0 < static.routing_fidelity < 1.0
    assert lru.h2d_gb > static.h2d_gb  # rerouting loads only the pinned set once
    assert lru.expert_fraction == pytest.approx(512 / 1024)
    html = render_sweep_report(tmp_path / "out").read_text()
    assert "Memory / latency / fidelity trade-off" in html
    parser = _Images()
    parser.feed(html)
    assert len(parser.sources) == 2  # the trade-off and the per-metric figure
