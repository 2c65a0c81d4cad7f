"""The scenario language: one YAML file describes one what-if.

A scenario is validated once, here, into typed frozen objects; everything inward receives those.
Errors name the file, the key path and what was expected (``ScenarioError``), never a traceback.

Sections: ``model`` (catalog name or inline spec), ``hardware`` (profile, GPUs, memory split),
``workload`` (arrivals, routing, limits, seed), ``policies`` (scheduler, batching, expert cache,
prefetch, preemption), ``slo`` (latency targets), ``sweep`` (axes for what-if grids), ``plan``,
``faults`` (failures and slowdowns, sim/faults.py) and ``checkpoint`` (training-side what-if, sim/checkpoint.py)."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.errors import CatalogError, MoesimError, ProfileError, ScenarioError
from sim.policies.offload_specs import OffloadSpec, SpeculativeSpec, TuneSpec
from sim.checkpoint import CheckpointSpec
from sim.faults import FaultsSpec, check_faults
from sim.policies.ep_specs import ExpertParallelSpec, ParallelismSpec, TopologySpec
from sim.policies.specs import (
    BatchingSpec,
    ExpertCacheSpec,
    LruCacheSpec,
    PrefetchSpec,
    NoPrefetchSpec,
    PreemptionSpec,
    SchedulerSpec,
    FcfsSchedulerSpec,
)
from sim.policies.offload_policy_specs import TaskProfileSpec
from sim.spec import ModelSpec, get_model, with_dtypes
from sim.work import DTYPE_BYTES
from sim.workload.arrivals import ArrivalSpec
from sim.workload.routing import RoutingSpec, UniformRouting


class Spec(BaseModel):
    """Base of every scenario section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- model


class ModelChoice(Spec):
    """A catalog model by name, or an inline spec, with optional dtype overrides."""

    name: str | None = Field(None, description="Catalog name, e.g. 'mixtral-8x7b' (see `moesim models`).")
    spec: ModelSpec | None = Field(None, description="An inline model spec with the same fields as the catalog.")
    weight_dtype: str | None = Field(None, description="Override the weight dtype (bf16, fp16, fp8, int4, mxfp4).")
    kv_dtype: str | None = Field(None, description="Override the KV-cache dtype.")

    @field_validator("weight_dtype", "kv_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(DTYPE_BYTES)}")
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ModelChoice":
        if (self.name is None) == (self.spec is None):
            raise ValueError("give exactly one of 'name' (a catalog model) or 'spec' (an inline spec)")
        return self


# ---------------------------------------------------------------- hardware


class ExpertMemory(Spec):
    """GPU memory reserved for routed experts, per GPU: a fraction of GPU memory, bytes, a number of
    experts, or room for all of them. The expert cache's capacity is this, in whole experts."""

    fraction: float | None = Field(None, gt=0, le=1, description="Fraction of GPU memory for experts.")
    bytes: float | None = Field(None, gt=0, description="Bytes of GPU memory for experts.")
    experts: int | None = Field(None, gt=0, description="Room for this many routed experts.")
    all: bool = Field(False, description="Reserve room for every routed expert of the model.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ExpertMemory":
        given = sum([self.fraction is not None, self.bytes is not None, self.experts is not None, self.all])
        if given != 1:
            raise ValueError("give exactly one of 'fraction', 'bytes', 'experts' or 'all: true'")
        return self


class LinkOverrides(Spec):
    """Link bandwidths that replace the profile's (GB/s = 1e9 bytes/s)."""

    host_to_device_gbps: float | None = Field(None, gt=0)
    gpu_to_gpu_gbps: float | None = Field(None, gt=0)
    node_to_node_gbps: float | None = Field(None, gt=0)


class HardwareSpec(Spec):
    profile: str = Field("h100-80gb", description="A shipped profile name (`moesim profiles`) or a YAML path.")
    num_gpus: int = Field(1, ge=1, description="GPUs in total; each data-parallel replica has parallelism.ep x parallelism.tp of them (default 1).")
    num_nodes: int = Field(1, ge=1)
    gpu_memory_bytes: float | None = Field(None, gt=0, description="Usable GPU memory; default: the profile's.")
    expert_memory: ExpertMemory = Field(default_factory=lambda: ExpertMemory(all=True))
    reserve_fraction: float = Field(
        0.05, ge=0, lt=1, description="GPU memory kept free for activations, workspace and fragmentation."
    )
    host_memory_bytes: float = Field(1.0e12, gt=0, description="Host memory holding offloaded experts.")
    host_profile: str | None = Field(
        None, description="Profile of the host CPU (shipped name or YAML path, e.g. cpu-this-machine, or one written by "
                          "`moesim calibrate --device cpu`): its attention_decode and expert_ffn give CPU latencies. "
                          "Required when attention, experts or the draft model run on the CPU.")
    links: LinkOverrides = Field(default_factory=LinkOverrides)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    topology: TopologySpec = Field(default_factory=TopologySpec)

    @model_validator(mode="after")
    def _gpus_divide(self) -> "HardwareSpec":
        if self.num_gpus % self.num_nodes:
            raise ValueError(f"num_gpus ({self.num_gpus}) must be a multiple of num_nodes ({self.num_nodes})")
        par = self.parallelism
        group = par.ep * par.tp
        if par.dp is not None and par.dp * group != self.num_gpus:
            raise ValueError(
                f"parallelism: dp x ep x tp = {par.dp} x {par.ep} x {par.tp} = {par.dp * group} "
                f"must equal num_gpus ({self.num_gpus})"
            )
        if self.num_gpus % group:
            raise ValueError(
                f"parallelism: ep x tp = {par.ep} x {par.tp} = {group} GPUs per replica does not divide "
                f"num_gpus ({self.num_gpus})"
            )
        return self


# ---------------------------------------------------------------- workload


class WorkloadSpec(Spec):
    arrivals: ArrivalSpec = Field(description="Where requests come from: a trace or a generator.")
    routing: RoutingSpec = Field(default_factory=UniformRouting, description="Which experts each token selects.")
    tasks: dict[str, float] | None = Field(
        None, description="Task mix {task: weight} assigned to requests that carry no task label."
    )
    max_requests: int | None = Field(None, gt=0)
    max_duration_s: float | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)


# ---------------------------------------------------------------- policies and SLO


class PoliciesSpec(Spec):
    scheduler: SchedulerSpec = Field(default_factory=FcfsSchedulerSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    preemption: PreemptionSpec = Field(default_factory=PreemptionSpec)
    expert_cache: ExpertCacheSpec = Field(default_factory=LruCacheSpec)
    prefetch: PrefetchSpec = Field(default_factory=NoPrefetchSpec)
    speculative: SpeculativeSpec | None = Field(None, description="Speculative decoding (draft model, k, acceptance).")
    offload: OffloadSpec = Field(default_factory=OffloadSpec, description="CPU attention / CPU experts / pipelining.")
    tasks: dict[str, TaskProfileSpec] = Field(
        default_factory=dict,
        description="Per-task profiles (output length, SLO, insensitive layers) used by eMoE's loading and "
        "scheduler; added to, and overriding, the defaults (classification, similarity, qa, conversation, summarization).",
    )

    @model_validator(mode="after")
    def _offload_cache_brings_its_own_loading(self) -> "PoliciesSpec":
        if self.expert_cache.name in ("emoe", "static_hot", "moe_infinity") and self.prefetch.name != "none":
            raise ValueError(
                f"expert_cache {self.expert_cache.name} brings its own loading; use prefetch: {{name: none}} "
                f"(got {self.prefetch.name})"
            )
        if (self.expert_cache.name in ("emoe", "static_hot", "moe_infinity")
                or self.prefetch.name in ("pre_gated", "all_next_layer")) and (
                self.speculative is not None or self.offload.active):
            raise ValueError(
                "the expert-offloading policies (expert_cache emoe/static_hot/moe_infinity, prefetch "
                "pre_gated/all_next_layer) are not combined with speculative decoding or CPU offloading "
                "(policies.speculative / policies.offload) yet; use one family per scenario"
            )
        return self
    expert_parallel: ExpertParallelSpec = Field(default_factory=ExpertParallelSpec)


class SloTargets(Spec):
    ttft_p99_s: float | None = Field(None, gt=0, description="P99 time to first token.")
    ttft_p50_s: float | None = Field(None, gt=0)
    tbt_p99_s: float | None = Field(None, gt=0, description="P99 time between consecutive output tokens.")
    e2e_p95_s: float | None = Field(None, gt=0, description="P95 end-to-end latency.")
    e2e_p99_s: float | None = Field(None, gt=0)


class SloSpec(SloTargets):
    attainment: float = Field(
        0.9, gt=0, le=1, description="Fraction of requests that must meet every per-request target."
    )
    per_task: dict[str, SloTargets] = Field(default_factory=dict)


class AxisRange(Spec):
    """A numeric axis written as a range instead of a list: ``{start, stop, step}`` (stop included when
    the steps land on it) or ``{min, max, num}`` (``num`` values, evenly or, with ``scale: log``,
    geometrically spaced). Integer ends give integer values where the values are whole numbers."""

    start: float | None = None
    stop: float | None = None
    step: float | None = Field(None, gt=0)
    min: float | None = None
    max: float | None = None
    num: int | None = Field(None, ge=1, le=1000)
    scale: Literal["linear", "log"] = "linear"

    @model_validator(mode="after")
    def _one_form(self) -> "AxisRange":
        stepped = (self.start, self.stop, self.step)
        counted = (self.min, self.max, self.num)
        if all(v is not None for v in stepped) and all(v is None for v in counted) and self.scale == "linear":
            if self.stop < self.start:
                raise ValueError("stop must be >= start")
        elif all(v is not None for v in counted) and all(v is None for v in stepped):
            if self.max < self.min or (self.scale == "log" and self.min <= 0):
                raise ValueError("need min <= max (and min > 0 with scale: log)")
        else:
            raise ValueError("give {start, stop, step} or {min, max, num} (optionally with scale: log)")
        return self

    def values(self) -> list[float | int]:
        import numpy as np

        if self.num is None:
            count = int(np.floor((self.stop - self.start) / self.step + 1e-9)) + 1
            raw = [self.start + i * self.step for i in range(count)]
            whole = all(float(v).is_integer() for v in (self.start, self.stop, self.step))
        else:
            space = np.geomspace if self.scale == "log" else np.linspace
            raw = [float(v) for v in space(self.min, self.max, self.num)]
            whole = float(self.min).is_integer() and float(self.max).is_integer()
        if whole and all(abs(v - round(v)) < 1e-9 * max(1.0, abs(v)) for v in raw):
            return [int(round(v)) for v in raw]
        return [round(v, 12) for v in raw]


def axis_values(axis: "list[Any] | AxisRange") -> list[Any]:
    """The values of a sweep axis or plan candidate axis, whichever form it was written in."""
    return axis.values() if isinstance(axis, AxisRange) else list(axis)


class SweepSpec(Spec):
    axes: dict[str, list[Any] | AxisRange] = Field(
        default_factory=dict,
        description="Key path (e.g. 'hardware.expert_memory.fraction') -> values, or a range "
        "{start, stop, step} / {min, max, num, scale}.",
    )
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named sets of overrides {label: {key path: value}} that vary together (e.g. an expert cache "
        "and its prefetch); crossed with the axes, and shown as the column 'variant'.",
    )


class RateSearchSpec(Spec):
    """Bisection on the arrival rate (as a multiple of the workload's own rate)."""

    low_scale: float = Field(0.05, gt=0, description="Lowest rate multiple probed; an SLO missed here prunes.")
    high_scale: float = Field(4.0, gt=0, description="Highest rate multiple probed.")
    iterations: int = Field(6, ge=1, le=20, description="Bisection steps (in log space) between the two.")


class PlanSpec(Spec):
    """Capacity planning: which candidate configuration is cheapest while meeting the SLO at a target rate."""

    candidates: dict[str, list[Any] | AxisRange] = Field(
        default_factory=dict,
        description="Key path -> values, or a range {start, stop, step} / {min, max, num, scale}; "
        "every combination is a candidate.",
    )
    target_rate_per_s: float | None = Field(
        None, gt=0, description="Requests/s to sustain; default: the workload's own mean rate."
    )
    objective: Literal["cost", "gpus"] = Field("cost", description="Rank by GPU cost per hour, or by GPU count.")
    prices: str | None = Field(None, description="Price table YAML (profile -> usd_per_gpu_hour); default shipped.")
    budget_usd_per_hour: float | None = Field(
        None, gt=0, description="Prune, unsimulated, candidates costing more per hour (CLI: --budget 40)."
    )
    max_gpus: int | None = Field(None, ge=1, description="Prune, unsimulated, candidates with more GPUs (CLI: --budget 8gpus).")
    rate_search: RateSearchSpec = Field(default_factory=RateSearchSpec)
    max_requests_per_probe: int = Field(300, gt=0, description="Requests simulated per rate probe.")
    tolerate_failures: int = Field(
        0, ge=0, description="GPUs (or nodes) that may be lost: every probe runs with this many failed from the start."
    )
    failure_unit: Literal["gpu", "node"] = Field("gpu", description="What tolerate_failures counts: GPUs or whole nodes.")


# ---------------------------------------------------------------- the scenario


class Scenario(Spec):
    """One what-if: model x hardware x workload x policies, judged against an SLO."""

    name: str = "scenario"
    description: str = ""
    model: str | ModelChoice = Field(description="Catalog name or {name|spec, weight_dtype, kv_dtype}.")
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    workload: WorkloadSpec
    policies: PoliciesSpec = Field(default_factory=PoliciesSpec)
    slo: SloSpec = Field(default_factory=SloSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    plan: PlanSpec = Field(default_factory=PlanSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    faults: FaultsSpec = Field(default_factory=FaultsSpec, description="Failures and slowdowns during the run.")
    checkpoint: CheckpointSpec | None = Field(None, description="Training-side checkpoint what-if (moesim checkpoint).")


@dataclass(frozen=True)
class LoadedScenario:
    """A validated scenario with its model spec and hardware profile resolved."""

    scenario: Scenario
    model: ModelSpec
    profile: Any  # sim.profile.HardwareProfile (imported lazily to keep this module light)
    source: str  # file the scenario came from, for messages
    base_dir: Path  # relative trace paths resolve against this folder
    host_profile: Any = None  # sim.profile.HardwareProfile of the host CPU (hardware.host_profile), or None


# ---------------------------------------------------------------- loading and errors


def _key_path(loc: tuple[Any, ...], data: Any, missing: bool = False) -> str:
    """Turn a pydantic error location into the user's key path, dropping union tags it never wrote.

    Walk the user's own data along the location: a key present in the data is part of the path,
    the last element of a ``missing`` error is kept though absent, anything else is a union tag."""
    parts: list[str] = []
    node = data
    last = len(loc) - 1
    for i, item in enumerate(loc):
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            parts.append(f"[{item}]")
            node = node[item]
        elif i == last and missing and isinstance(item, str):
            parts.append(item)
    return ".".join(parts).replace(".[", "[") or "<top level>"


def _wrong_branch(err: dict[str, Any], data: Any) -> bool:
    """A type error from a union member the user's value is not (``model: {...}`` against ``str``)."""
    if not str(err["type"]).endswith("_type") or not err["loc"]:
        return False
    node = data
    for item in err["loc"][:-1]:
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
    last = err["loc"][-1]
    return not (isinstance(node, dict) and last in node) and not (isinstance(node, list) and isinstance(last, int))


def _describe_error(err: dict[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling; `moesim scenario schema` lists the valid keys)"
    if err["type"] == "missing":
        return "required key is missing"
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown {ctx.get('discriminator', 'kind')} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if err["type"] == "union_tag_not_found":
        return f"needs the key {err.get('ctx', {}).get('discriminator', 'name')} to say which kind"
    value = err.get("input")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return f"{msg} (got {value!r})"
    return msg


def format_validation_error(source: str, exc: ValidationError, data: Any) -> str:
    """One line: ``file: key.path: what was expected``; a typo wins over the 'missing' it also causes."""
    errors = [e for e in exc.errors() if not _wrong_branch(e, data)] or exc.errors()
    rank = {"extra_forbidden": 0, "union_tag_invalid": 1}
    first = min(errors, key=lambda e: (rank.get(e["type"], 2), e["type"] == "missing", len(e["loc"])))
    path = _key_path(tuple(first["loc"]), data, missing=first["type"] == "missing")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {path}: {_describe_error(first)}{more}"


def read_yaml(path: Path) -> Any:
    """Parse YAML, turning syntax errors into one line with file:line:column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ScenarioError(f"{path}{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: invalid YAML: {exc}") from None


def parse_scenario(data: Any, source: str) -> Scenario:
    """Validate raw YAML data into a Scenario."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping with keys model, hardware, workload, ...")
    if "name" not in data:  # a scenario without a name is known by its file
        data = {"name": Path(source).stem, **data}
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(format_validation_error(source, exc, data)) from None


def resolve(scenario: Scenario, source: str, base_dir: Path) -> LoadedScenario:
    """Look up the model and the profile, and check what only both together can tell."""
    from sim.profile import load_profile  # local: the profile module is only needed once resolving

    model = _resolve_model(scenario, source)
    check_faults(scenario.faults, scenario.hardware.num_gpus, scenario.hardware.num_nodes, source)

    def load(key: str, ref: str):
        """A profile named by the scenario: a YAML path relative to the scenario, or a shipped name."""
        try:
            candidate = base_dir / ref
            return load_profile(candidate if candidate.suffix in (".yaml", ".yml") and candidate.exists() else ref)
        except ProfileError as exc:
            raise ScenarioError(f"{source}: hardware.{key}: {exc}") from None

    profile = load("profile", scenario.hardware.profile)
    host_ref = scenario.hardware.host_profile
    host_profile = None if host_ref is None else load("host_profile", host_ref)
    loaded = LoadedScenario(scenario=scenario, model=model, profile=profile, source=source, base_dir=base_dir,
                            host_profile=host_profile)
    check_memory_fits(loaded)
    from sim.engine.expert_parallel import check_expert_parallel  # local: engine module, needed only here

    check_expert_parallel(loaded)
    return loaded


def _resolve_model(scenario: Scenario, source: str) -> ModelSpec:
    choice = scenario.model
    try:
        if isinstance(choice, str):
            return get_model(choice)
        spec = choice.spec if choice.spec is not None else get_model(choice.name or "")
        if choice.weight_dtype or choice.kv_dtype:
            spec = with_dtypes(spec, weight_dtype=choice.weight_dtype, kv_dtype=choice.kv_dtype)
        return spec
    except CatalogError as exc:
        key = "model" if isinstance(choice, str) else "model.name"
        raise ScenarioError(f"{source}: {key}: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise ScenarioError(f"{source}: model: {exc}") from None


def gpu_memory_bytes(loaded: LoadedScenario) -> float:
    """Usable memory of one GPU: the scenario's override, else the profile's."""
    hw = loaded.scenario.hardware
    return float(hw.gpu_memory_bytes or loaded.profile.gpu.memory_bytes)


def expert_memory_bytes(loaded: LoadedScenario) -> float:
    """Bytes per GPU reserved for routed experts."""
    em = loaded.scenario.hardware.expert_memory
    if em.all:
        par = loaded.scenario.hardware.parallelism  # expert parallelism spreads them over ep x tp GPUs
        return float(loaded.model.routed_expert_bytes_total) / (par.ep * par.tp)
    if em.bytes is not None:
        return float(em.bytes)
    if em.experts is not None:
        return float(em.experts * loaded.model.expert_bytes)
    return float(em.fraction) * gpu_memory_bytes(loaded)  # type: ignore[arg-type]


def check_memory_fits(loaded: LoadedScenario) -> None:
    """Impossible memory splits are scenario errors, raised before any simulation."""
    src = loaded.source
    gpu_bytes = gpu_memory_bytes(loaded)
    if loaded.scenario.hardware.gpu_memory_bytes and gpu_bytes > loaded.profile.gpu.memory_bytes:
        raise ScenarioError(
            f"{src}: hardware.gpu_memory_bytes: {gpu_bytes / 1e9:.1f} GB is more than the "
            f"{loaded.profile.gpu.memory_bytes / 1e9:.1f} GB of profile '{loaded.profile.name}'"
        )
    experts = expert_memory_bytes(loaded)
    if experts > gpu_bytes:
        raise ScenarioError(
            f"{src}: hardware.expert_memory: {experts / 1e9:.1f} GB of experts is more than the GPU's "
            f"{gpu_bytes / 1e9:.1f} GB"
        )
    if experts < loaded.model.expert_bytes:
        raise ScenarioError(
            f"{src}: hardware.expert_memory: {experts / 1e9:.3f} GB cannot hold even one expert "
            f"of {loaded.model.expert_bytes / 1e9:.3f} GB"
        )
    host = loaded.scenario.hardware.host_memory_bytes
    if host < loaded.model.routed_expert_bytes_total:
        raise ScenarioError(
            f"{src}: hardware.host_memory_bytes: {host / 1e9:.1f} GB cannot hold the model's "
            f"{loaded.model.routed_expert_bytes_total / 1e9:.1f} GB of routed experts"
        )


def load_scenario(path: str | Path) -> LoadedScenario:
    """Read, validate and resolve one scenario file (a path or a shipped scenario name)."""
    file = find_scenario(path)
    data = read_yaml(file)
    scenario = parse_scenario(data, str(path))
    return resolve(scenario, str(path), file.parent)


# ---------------------------------------------------------------- shipped scenarios


def shipped_scenarios_dir() -> Path:
    """The installed scenarios (package data), or the checkout's scenarios/ folder."""
    from importlib import resources

    try:
        folder = Path(str(resources.files("sim.shipped.scenarios")))
        if folder.is_dir():
            return folder
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "scenarios"


DEFAULT_SCENARIO = "mixtral-offload-h100"


def shipped_scenarios() -> list[str]:
    return sorted(p.stem for p in shipped_scenarios_dir().glob("*.yaml"))


def find_scenario(path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped scenario."""
    file = Path(path)
    if file.exists():
        return file
    shipped = shipped_scenarios_dir() / f"{path}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(shipped_scenarios())
    raise ScenarioError(f"{path}: no such file, and not a shipped scenario (shipped: {names})")


# ---------------------------------------------------------------- sweeps


def set_key_path(data: dict[str, Any], key_path: str, value: Any, source: str, section: str = "sweep.axes") -> None:
    """Set ``a.b.c`` in nested scenario data, creating the mappings on the way."""
    node: Any = data
    keys = key_path.split(".")
    for key in keys[:-1]:
        if not isinstance(node, dict):
            raise ScenarioError(f"{source}: {section}.{key_path}: '{key}' is not a mapping")
        node = node.setdefault(key, {})
        if isinstance(node, str) and key == "model":  # model: NAME -> {name: NAME}
            raise ScenarioError(f"{source}: {section}.{key_path}: write 'model' as a mapping to vary inside it")
    if not isinstance(node, dict):
        raise ScenarioError(f"{source}: {section}.{key_path}: parent is not a mapping")
    node[keys[-1]] = value


def expand_sweep(data: dict[str, Any], source: str) -> list[tuple[dict[str, Any], Scenario]]:
    """Every point of the sweep grid as ({key path: value}, validated Scenario).

    Each point is validated as a whole scenario, so an axis with a misspelt key path fails here."""
    base = parse_scenario(data, source)
    axes = base.sweep.axes
    variants = base.sweep.variants
    if not axes and not variants:
        return [({}, base)]
    points: list[tuple[dict[str, Any], Scenario]] = []
    names = list(axes)
    for values, variant in itertools.product(itertools.product(*(axis_values(axes[n]) for n in names)), list(variants) or [None]):
        point = dict(zip(names, values))
        point_data = copy.deepcopy(data)
        point_data.pop("sweep", None)
        if variant is not None:
            point["variant"] = variant
            for key_path, value in variants[variant].items():
                set_key_path(point_data, key_path, value, source, section=f"sweep.variants.{variant}")
        for key_path, value in point.items():
            if key_path == "variant" and variant is not None:
                continue
            set_key_path(point_data, key_path, value, source)
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        try:
            points.append((point, Scenario.model_validate(point_data)))
        except ValidationError as exc:
            raise ScenarioError(f"{format_validation_error(source, exc, point_data)} [sweep point {label}]") from None
    return points


def resolved_dict(loaded: LoadedScenario) -> dict[str, Any]:
    """The scenario with every default filled in and the model expanded to its full spec.

    It is itself a valid scenario: it can be checked and simulated again."""
    out = loaded.scenario.model_dump(mode="json")
    out["model"] = {"spec": loaded.model.model_dump(mode="json")}
    return out


def resolved_facts(loaded: LoadedScenario) -> dict[str, Any]:
    """What resolving decided beyond the file: the profile found and the memory split it implies."""
    return {
        "profile_name": loaded.profile.name,
        "profile_source": loaded.profile.source,
        "gpu_memory_bytes": gpu_memory_bytes(loaded),
        "expert_memory_bytes": expert_memory_bytes(loaded),
        "expert_slots": int(expert_memory_bytes(loaded) // loaded.model.expert_bytes),
        "total_experts": loaded.model.num_moe_layers * loaded.model.num_experts,
    }


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the scenario language, for editor completion."""
    schema = Scenario.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "moesim scenario"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


__all__ = [
    "Scenario",
    "LoadedScenario",
    "load_scenario",
    "parse_scenario",
    "resolve",
    "expand_sweep",
    "axis_values",
    "AxisRange",
    "json_schema",
    "MoesimError",
]
