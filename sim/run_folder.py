"""Write a run folder: the resolved scenario, the profile's provenance, the tables and summary.json.

Files are written into a temporary sibling folder that is renamed into place at the end, so a
folder that exists is complete (an interrupted run leaves none, or the previous one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sim.engine.simulation import SimulationResult
from sim.metrics import expert_parallel_tables, resources_frame
from sim.scenario import resolved_dict, resolved_facts


def _write_table(frame: pd.DataFrame, path_stem: Path, fmt: str) -> str:
    if fmt == "parquet":
        path = path_stem.with_suffix(".parquet")
        frame.to_parquet(path, index=False)
    else:
        path = path_stem.with_suffix(".csv")
        frame.to_csv(path, index=False)
    return path.name


def write_run_folder(result: SimulationResult, summary: dict[str, Any], out_dir: Path, fmt: str = "csv") -> Path:
    """Write everything a later report or comparison needs; returns the folder."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "scenario.resolved.yaml").write_text(
        yaml.safe_dump(resolved_dict(result.loaded), sort_keys=False), encoding="utf-8"
    )
    profile = result.loaded.profile
    (tmp / "profile.provenance.yaml").write_text(
        yaml.safe_dump(
            {"name": profile.name, "source": profile.source, "provenance": profile.provenance,
             "resolved": resolved_facts(result.loaded)},
            sort_keys=False,
        ),
        encoding="utf-8",
    )
    files = {
        "requests": _write_table(result.requests, tmp / "requests", fmt),
        "iterations": _write_table(result.iterations, tmp / "iterations", fmt),
        "resources": _write_table(resources_frame(summary), tmp / "resources", fmt),
    }
    if "faults" in summary:  # the latency / SLO timeline around the faults (sim/fault_metrics.py)
        files["timeline"] = _write_table(pd.DataFrame(summary["faults"]["timeline"]), tmp / "timeline", fmt)
    ep_tables = expert_parallel_tables(result)
    if ep_tables is not None:
        files["ep_layers"] = _write_table(ep_tables[0], tmp / "ep_layers", fmt)
        files["ep_device_tokens"] = _write_table(ep_tables[1], tmp / "ep_device_tokens", fmt)
    from sim.report.tables import expert_load  # optional tables the report draws when present

    load = expert_load(result)
    if load is not None:
        files["expert_load"] = _write_table(load, tmp / "expert_load", fmt)
    from sim.engine.layer_stats import layers_table  # per-MoE-layer hits and time split (single GPU)

    layers = layers_table(result)
    if layers is not None:
        files["layers"] = _write_table(layers, tmp / "layers", fmt)
    (tmp / "summary.json").write_text(json.dumps({**summary, "files": files}, indent=2, default=_json_default) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
