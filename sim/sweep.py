"""Run every point of a scenario's sweep grid, in parallel, with results cached per point.

Each point is keyed by a hash of its resolved scenario, its hardware profile and the code version (the
moesim version and a hash of the simulator's sources), and its run folder is written atomically under
``OUT/points/KEY``; a point whose folder exists is not simulated again, so an interrupted sweep resumes
where it stopped, a re-run is instant, and a change to the simulator's code simulates every point anew.

Points run on a local process pool, in this process (``jobs=1``) or on a Ray cluster (``sim.executors``);
each worker returns its run folder's files and this process writes them, so the same files result
wherever the work ran."""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sim import __version__
from sim.errors import CapacityError, ScenarioError
from sim.scenario import expand_sweep, find_scenario, read_yaml, resolve, resolved_dict


@dataclass(frozen=True)
class SweepPoint:
    index: int
    values: dict[str, Any]
    key: str
    scenario: dict[str, Any]  # the resolved scenario of this point, itself a valid scenario


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the points finished so far are kept on disk (``done`` of ``total``)."""

    def __init__(self, done: int, total: int, out: Path) -> None:
        super().__init__(f"{done} of {total} points done")
        self.done, self.total, self.out = done, total, out


# Sources that cannot change a simulated result (rendering, the command line) stay out of the hash.
_NOT_RESULTS = ("report/", "cli.py", "trace_cli.py", "executors.py")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The moesim version and a hash of the simulator's sources and data files, e.g. ``0.1.0+3f2a9c1d0b7e``.

    Computed from the files themselves, so it holds for a checkout, an editable install and a wheel alike."""
    return f"{__version__}+{source_hash(Path(__file__).resolve().parent)}"


def source_hash(root: Path) -> str:
    """Hash of the files under ``root`` that can change a simulated result (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".csv", ".txt")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(_NOT_RESULTS) or "__pycache__" in rel:
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def point_key(scenario: dict[str, Any], profile: dict[str, Any]) -> str:
    """Hash of what determines a point's result: scenario, profile and code version."""
    blob = json.dumps({"scenario": scenario, "profile": profile, "version": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_points(path: str | Path) -> tuple[list[SweepPoint], Path]:
    """Expand and resolve every point (errors name the point) before anything runs."""
    file = find_scenario(path)
    data = read_yaml(file)
    if not (data or {}).get("sweep", {}).get("axes"):
        raise ScenarioError(
            f"{path}: sweep.axes: no sweep axes, so there is nothing to sweep; run one point with "
            f"`moesim simulate {path}`, or add e.g. sweep: {{axes: {{hardware.num_gpus: [1, 2]}}}}"
        )
    points = []
    for index, (values, scenario) in enumerate(expand_sweep(data, str(path))):
        loaded = resolve(scenario, str(path), file.parent)
        resolved = resolved_dict(loaded)
        key = point_key(resolved, loaded.profile.model_dump(mode="json"))
        points.append(SweepPoint(index=index, values=values, key=key, scenario=resolved))
    return points, file.parent


def run_point(scenario: dict[str, Any], base_dir: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Simulate one point (in a worker); returns its summary and its run folder's files by name."""
    from sim.engine.simulation import simulate
    from sim.metrics import summarize
    from sim.run_folder import write_run_folder
    from sim.scenario import parse_scenario

    with tempfile.TemporaryDirectory(prefix="moesim-point-") as tmp:
        folder = Path(tmp) / "point"
        source = str(folder / "scenario.resolved.yaml")
        loaded = resolve(parse_scenario(scenario, source), source, Path(base_dir))
        try:
            result = simulate(loaded)
        except CapacityError as exc:
            # An infeasible point is a result of the sweep, not a failure of it: record why.
            summary = {"infeasible": str(exc).split(": hardware: ", 1)[-1]}
            return summary, {"summary.json": (json.dumps(summary, indent=2) + "\n").encode()}
        summary = summarize(result)
        write_run_folder(result, summary, folder)
        return summary, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def write_point(folder: Path, files: dict[str, bytes]) -> None:
    """Write a point's files into a sibling temporary folder renamed into place: a folder that exists is complete."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, blob in files.items():
        (tmp / name).write_bytes(blob)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def metrics_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a sweep table compares (only the reason, for an infeasible point)."""
    if "infeasible" in summary:
        return {"infeasible": summary["infeasible"]}
    lat = summary["latency"]
    return {
        "completed": summary["requests"]["completed"],
        "rejected": summary["requests"]["rejected"],
        "requests_per_s": summary["throughput"]["requests_per_s"],
        "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
        "ttft_p99_s": lat["ttft_p99_s"],
        "tbt_p99_s": lat["tbt_p99_s"],
        "e2e_p90_s": lat["e2e_p90_s"],
        "e2e_p99_s": lat["e2e_p99_s"],
        "hit_rate": summary["expert_cache"]["hit_rate"],
        "routing_fidelity": summary["expert_cache"].get("routing_fidelity", 1.0),
        "belady_hit_rate": summary["expert_cache"].get("belady_hit_rate"),
        "ttft_p50_s": lat["ttft_p50_s"],
        "e2e_p50_s": lat["e2e_p50_s"],
        "expert_fraction": summary["expert_cache"]["capacity_experts"] / max(summary["expert_cache"]["total_experts"], 1),
        "expert_memory_gb": summary["memory"]["expert_slots_bytes"] / 1e9,
        "gpu_memory_peak_gb": summary["memory"]["peak_total_bytes"] / 1e9,
        "h2d_gb": sum(r["h2d_bytes"] for r in summary["resources"]) / 1e9,
        "slo_attainment": summary["slo"]["attainment"],
        "slo_met": summary["slo"]["met"],
        "preemptions": summary["preemptions"],
        **_expert_parallel_row(summary),
    }


def _expert_parallel_row(summary: dict[str, Any]) -> dict[str, Any]:
    """Expert-parallel columns (absent for single-GPU replicas)."""
    ep = summary.get("expert_parallel")
    if not ep:
        return {}
    tot = ep["totals_s"]
    moe_s = tot["expert_compute_s"] + tot["dispatch_s"] + tot["combine_s"]
    return {
        "ep_moe_s_per_kpair": 1e3 * moe_s / ep["routed_pairs"] if ep["routed_pairs"] else None,
        "ep_dropped_fraction": ep["dropped_fraction"],
        "ep_rerouted_fraction": ep["rerouted_fraction"],
        "ep_straggler_wait_s": tot["straggler_wait_s"],
        "ep_exposed_comm_s": ep["exposed_comm_s"],
        "ep_imbalance": ep["mean_imbalance"],
        "ep_collective_model": ep.get("collective_model"),
        **({"ep_failover_fidelity": fo["routing_fidelity"], "ep_failover_waiting_fraction": fo["waiting_fraction"],
            "ep_failover_wait_s": fo["wait_s"]} if (fo := ep.get("failover")) else {}),
    }


def run_sweep(
    path: str | Path, out: Path, *, jobs: int | None = None, progress: bool = True,
    executor: str = "local", address: str | None = None,
) -> pd.DataFrame:
    """Run (or reuse) every point; returns one row per point with its axis values and metrics.

    Ctrl-C raises ``SweepInterrupted`` after cancelling what has not started; finished points stay."""
    from sim.executors import make_executor

    points, base_dir = plan_points(path)
    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    summaries: dict[int, dict[str, Any]] = {}
    todo = []
    for point in points:
        cached = out / "points" / point.key / "summary.json"
        if cached.exists():
            summaries[point.index] = json.loads(cached.read_text())
        else:
            todo.append(point)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        # The ETA counts only the points simulated in this run (resumed ones are shown as done already).
        bar = tqdm(total=len(points), initial=len(points) - len(todo), unit="point", desc="sweep",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}]")
    pool = None
    try:
        if todo:
            pool = make_executor(executor, jobs, address)
            pending: dict[Future, SweepPoint] = {}
            queue = list(reversed(todo))
            limit = getattr(pool, "max_in_flight", len(todo))  # in-process: one at a time, each written at once
            while queue or pending:
                while queue and len(pending) < limit:
                    p = queue.pop()
                    pending[pool.submit(run_point, p.scenario, str(base_dir))] = p
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: pending[f].index):
                    point = pending.pop(future)
                    summary, files = future.result()
                    write_point(out / "points" / point.key, files)
                    summaries[point.index] = summary
                    if bar:
                        bar.update()
    except KeyboardInterrupt:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        raise SweepInterrupted(len(summaries), len(points), out) from None
    finally:
        if bar:
            bar.close()
        if pool is not None:
            pool.shutdown()
    rows = []
    for point in points:
        row = {"point": point.index, **point.values, "key": point.key, **metrics_row(summaries[point.index])}
        rows.append(row)
    table = pd.DataFrame(rows)
    tmp = out / "sweep.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "sweep.csv")
    return table
