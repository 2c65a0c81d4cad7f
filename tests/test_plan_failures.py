"""``plan: {tolerate_failures: N}``: every probe runs with N GPUs lost from the start, and the table prices
the headroom. The plan is OLMoE under fixed-length Poisson traffic, 40 requests per probe."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from sim.plan import run_plan, write_plan
from sim.report.render import render_plan_report
from test_plan import PLAN


def _plan(tmp_path: Path, tolerate: int, gpus: list[int], unit: str = "gpu", nodes: int = 1) -> Any:
    data: dict[str, Any] = copy.deepcopy(PLAN)
    data["plan"]["candidates"] = {"hardware.num_gpus": gpus}
    data["plan"]["tolerate_failures"] = tolerate
    data["plan"]["failure_unit"] = unit
    data["hardware"]["num_nodes"] = nodes
    data["hardware"]["num_gpus"] = gpus[-1]
    data["plan"]["target_rate_per_s"] = 8.0
    path = tmp_path / f"plan-{tolerate}-{unit}.yaml"
    path.write_text(yaml.safe_dump(data))
    table, results = run_plan(path, jobs=1, progress=False)
    report = render_plan_report(write_plan(tmp_path / f"out-{tolerate}-{unit}", path, table, results))
    assert ("of its price is that failure headroom" in report.read_text()) == bool(tolerate)
    return table.set_index("hardware.num_gpus")


def test_two_gpus_that_may_lose_one_sustain_what_one_gpu_does(tmp_path: Path) -> None:
    """With one of two GPUs failed at time 0, every request goes to the survivor: the same run as one GPU."""
    plain = _plan(tmp_path, 0, [1])
    tolerant = _plan(tmp_path, 1, [1, 2])
    assert tolerant.loc[2, "max_rate_per_s"] == plain.loc[1, "max_rate_per_s"]
    assert tolerant.loc[1, "status"] == "pruned"
    assert "cannot lose 1 of its 1 GPU(s)" in tolerant.loc[1, "reason"]
    # The headroom costs one H100-hour per hour: half the 2-GPU deployment's price.
    assert tolerant.loc[2, "failure_headroom_usd_per_hour"] == tolerant.loc[2, "usd_per_hour"] / 2
    assert "failure_headroom_usd_per_hour" not in plain.columns


def test_losing_one_of_two_nodes_leaves_their_other_gpus(tmp_path: Path) -> None:
    """4 GPUs on 2 nodes that may lose a node serve like 2 GPUs; the headroom is a node's 2 GPUs."""
    plain = _plan(tmp_path, 0, [2])
    tolerant = _plan(tmp_path, 1, [2, 4], unit="node", nodes=2)
    assert tolerant.loc[4, "max_rate_per_s"] == plain.loc[2, "max_rate_per_s"]
    assert tolerant.loc[4, "failure_headroom_usd_per_hour"] == tolerant.loc[4, "usd_per_hour"] / 2
    assert tolerant.loc[2, "failure_headroom_usd_per_hour"] == tolerant.loc[2, "usd_per_hour"] / 2
