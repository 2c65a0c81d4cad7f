"""Optional sections of a run report: each is drawn only when the run folder holds its data.

A section function takes the run's data and returns a ``Section`` (or None when its data is absent);
``@run_section`` adds it to the report in registration order. This is the extension point for new
engine metrics (all-to-all, stragglers, per-GPU imbalance under expert parallelism): write the table
into the run folder, register a section here or in a module imported by ``sim.report.render``, and the
report shows it; the template needs no change. Every string is escaped by the template."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from sim.report import plots


@dataclass
class RunData:
    folder: Path
    summary: dict[str, Any]
    requests: pd.DataFrame
    iterations: pd.DataFrame

    def table(self, stem: str) -> pd.DataFrame | None:
        """An optional table of the run folder (CSV or Parquet), or None when the run did not write it."""
        for suffix, reader in ((".parquet", pd.read_parquet), (".csv", pd.read_csv)):
            path = self.folder / f"{stem}{suffix}"
            if path.exists():
                return reader(path)
        return None


@dataclass
class Section:
    title: str
    note: str = ""
    figures: list[tuple[str, str]] = field(default_factory=list)  # (alt text, base64 PNG)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


RUN_SECTIONS: list[Callable[[RunData], Section | None]] = []


def run_section(func: Callable[[RunData], Section | None]) -> Callable[[RunData], Section | None]:
    RUN_SECTIONS.append(func)
    return func


def run_sections(run: RunData) -> list[Section]:
    return [s for s in (f(run) for f in RUN_SECTIONS) if s is not None]


# Columns of an optional ``layers`` table (one row per MoE layer, summed over the run), as the engine
# writes it (sim.engine.layer_stats): expert hits and misses, and seconds spent per kind of work. Any other
# ``*_s`` column is drawn too, named after itself; columns of other resources than the compute stream
# (the copy engine's busy time overlaps the stream's) are given in the note instead of stacked.
LAYER_TIME_LABELS = {
    "attention_s": "attention", "gate_shared_s": "gate + shared experts", "experts_s": "experts",
    "stall_s": "waiting for expert loads", "loads_s": "expert loads (stall)",
    "all_to_all_s": "all-to-all", "straggler_wait_s": "straggler wait",
}
LAYER_OFF_STREAM = {"loads_busy_s": "copy engine busy loading the layer's experts"}


@run_section
def layer_hit_rate(run: RunData) -> Section | None:
    layers = run.table("layers")
    if layers is None or not {"layer", "hits", "misses"} <= set(layers.columns):
        return None
    return Section(
        "Expert-cache hit rate by layer",
        "Hits / (hits + misses) of each MoE layer's expert accesses over the run.",
        figures=[("expert-cache hit rate by layer", plots.hit_rate_by_layer(layers))],
    )


@run_section
def layer_time(run: RunData) -> Section | None:
    layers = run.table("layers")
    columns = [] if layers is None else [c for c in layers.columns if c.endswith("_s") and c not in LAYER_OFF_STREAM]
    if layers is None or "layer" not in layers or not columns:
        return None
    labels = {c: LAYER_TIME_LABELS.get(c, c.removesuffix("_s").replace("_", " ")) for c in columns}
    off_stream = "".join(f" Not stacked: {label}, {layers[c].sum():.3g} s over all layers (it overlaps the stream)."
                         for c, label in LAYER_OFF_STREAM.items() if c in layers)
    return Section(
        "Per-layer time breakdown",
        "Seconds spent in each layer over the run, by kind of work: " + ", ".join(labels.values()) + "." + off_stream,
        figures=[("per-layer time breakdown", plots.layer_time_breakdown(layers, labels))],
    )


@run_section
def expert_imbalance(run: RunData) -> Section | None:
    load = run.table("expert_load")
    if load is None or load.empty or load["iterations"].sum() == 0:
        return None
    per_layer = load.groupby("layer")["iterations"]
    ratio = (per_layer.max() / per_layer.mean().where(per_layer.mean() > 0)).dropna()
    return Section(
        "Expert load imbalance",
        "How many iterations routed tokens to each expert of each MoE layer (from the engine's expert-access "
        f"stream). The busiest expert of a layer is used {ratio.median():.2f}x as often as the layer's mean "
        f"expert (median over layers; worst layer {ratio.max():.2f}x).",
        figures=[("expert load heatmap, layers by experts", plots.expert_load_heatmap(load))],
    )
