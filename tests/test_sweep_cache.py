"""Sweep cache and resume: keys follow the code version, Ctrl-C keeps finished points and the re-run
simulates only the rest, a sweep without axes says so, and axes written as ranges."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

import sim
import sim.sweep
from sim.cli import main
from sim.errors import ScenarioError
from sim.scenario import AxisRange, parse_scenario
from sim.sweep import SweepInterrupted, plan_points, run_sweep, source_hash

from test_sweep_report import SWEEP


def _write(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _counting(monkeypatch, fail_at: int | None = None) -> list[dict]:
    """Replace the worker function by one that records each call (and raises Ctrl-C at call ``fail_at``)."""
    calls: list[dict] = []
    real = sim.sweep.run_point

    def run_point(scenario, base_dir):
        calls.append(scenario)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(scenario, base_dir)

    monkeypatch.setattr(sim.sweep, "run_point", run_point)
    return calls


def test_ctrl_c_keeps_finished_points_and_the_rerun_simulates_only_the_rest(tmp_path, monkeypatch):
    path = _write(tmp_path, SWEEP)  # 4 points
    calls = _counting(monkeypatch, fail_at=3)
    with pytest.raises(SweepInterrupted) as stop:
        run_sweep(path, tmp_path / "out", jobs=1, progress=False)
    assert (stop.value.done, stop.value.total) == (2, 4)
    kept = sorted(p.name for p in (tmp_path / "out" / "points").iterdir())
    assert len(kept) == 2 and not any(k.endswith(".tmp") for k in kept)
    calls = _counting(monkeypatch)
    resumed = run_sweep(path, tmp_path / "out", jobs=1, progress=False)
    assert len(calls) == 2  # only the two unfinished points
    calls = _counting(monkeypatch)
    again = run_sweep(path, tmp_path / "out", jobs=1, progress=False)
    assert calls == [] and again.equals(resumed)  # a re-run simulates nothing
    fresh = run_sweep(path, tmp_path / "fresh", jobs=1, progress=False)
    assert resumed.equals(fresh)


def test_cli_ctrl_c_says_what_was_kept(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, SWEEP)
    _counting(monkeypatch, fail_at=2)
    code = main(["sweep", str(path), "--jobs", "1", "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 130
    assert capsys.readouterr().err == (f"moesim: interrupted: 1 of 4 points done, kept in {tmp_path / 'o' / 'points'}; "
                                       "run the same command again to resume\n")


def test_a_code_change_changes_every_key(tmp_path, monkeypatch):
    path = _write(tmp_path, SWEEP)
    before = [p.key for p in plan_points(path)[0]]
    monkeypatch.setattr(sim.sweep, "code_version", lambda: "0.1.0+somethingelse")
    after = [p.key for p in plan_points(path)[0]]
    assert len(set(before)) == 4 and not set(before) & set(after)


def test_source_hash_follows_simulator_sources_but_not_the_report(tmp_path):
    root = tmp_path / "sim"
    shutil.copytree(Path(sim.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    base = source_hash(root)
    assert source_hash(root) == base
    (root / "report" / "render.py").write_text((root / "report" / "render.py").read_text() + "\n# a comment\n")
    assert source_hash(root) == base  # rendering cannot change a simulated result
    engine = next((root / "engine").glob("*.py"))
    engine.write_text(engine.read_text() + "\n# a comment\n")
    assert source_hash(root) != base
    assert sim.sweep.code_version().startswith(sim.__version__ + "+")


def test_a_sweep_without_axes_is_an_error_with_a_hint(tmp_path, capsys):
    data = {k: v for k, v in SWEEP.items() if k != "sweep"}
    path = _write(tmp_path, data)
    assert main(["sweep", str(path), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"moesim: error: {path}: sweep.axes: no sweep axes, so there is nothing to sweep; run one point with "
        f"`moesim simulate {path}`, or add e.g. sweep: {{axes: {{hardware.num_gpus: [1, 2]}}}}\n")


def test_range_axes_expand_like_the_lists_they_stand_for(tmp_path):
    assert AxisRange(min=1, max=8, num=4, scale="log").values() == [1, 2, 4, 8]
    assert AxisRange(start=1, stop=8, step=2).values() == [1, 3, 5, 7]
    assert AxisRange(start=0.5, stop=0.8, step=0.1).values() == [0.5, 0.6, 0.7, 0.8]
    assert AxisRange(min=0.5, max=1.0, num=3).values() == [0.5, 0.75, 1.0]
    data = copy.deepcopy(SWEEP)
    data["sweep"]["axes"]["hardware.expert_memory.experts"] = {"start": 512, "stop": 1024, "step": 512}
    ranged = run_sweep(_write(tmp_path, data, "ranged.yaml"), tmp_path / "r", jobs=1, progress=False)
    listed = run_sweep(_write(tmp_path, SWEEP), tmp_path / "l", jobs=1, progress=False)
    assert ranged.equals(listed)


def test_a_malformed_range_names_the_key_path(tmp_path):
    data = copy.deepcopy(SWEEP)
    data["sweep"]["axes"]["hardware.num_gpus"] = {"start": 1, "stop": 4}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(data, "s.yaml")
    assert "sweep.axes.hardware.num_gpus" in str(err.value) and "{start, stop, step} or {min, max, num}" in str(err.value)
