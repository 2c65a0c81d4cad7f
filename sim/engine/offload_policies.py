"""The expert-offloading policy family inside the engine: eMoE and the alternatives it is compared with.

``OffloadPlanner`` is an ``IterationPlanner`` (same per-layer costs, same flow-shop timing) whose
``_plan_layers`` also knows:

* a **residency controller** that sets which experts should be resident before the iteration:
  ``EmoeResidency`` (eMoE, arXiv 2503.06823: Eq. 2 top-L per layer from the running requests' tasks,
  predictor every ``period`` prompts, everything served until the first invocation) or
  ``StaticHotResidency`` (Fiddler-style: each layer's most popular experts, pinned for the run). Its
  loads are queued on the copy engine at the iteration start in layer order, so layer l's loads run
  behind layer l-1's while the stream computes attention; an expert op waits only for its own load;
* **miss handling**: ``fetch`` (load on demand: into the cache for LRU/LFU/MoE-Infinity, through a
  staging buffer for eMoE/static, whose resident set is the policy's) or ``reroute`` (the assignments
  of an absent expert go to the layer's resident expert with the highest predicted frequency, no
  load), with routing fidelity = assignments served by the selected expert / all assignments;
* **prefetch** kinds beyond ``next_layer``: ``pre_gated`` (layer l+1's experts known at layer l's gate,
  mispredictions used as they are), ``all_next_layer``, and MoE-Infinity's activation-matrix matching.

The routing engine only gives token counts per (layer, expert) for a whole iteration, so "a prompt's
routing" is the routing of the iteration that prefilled it and an activation matrix is a batch's,
not a single request's (both documented approximations)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sim.engine.iteration import IterationPlan, IterationPlanner, add_moe_layer_head
from sim.errors import ScenarioError
from sim.policies.cache import ExpertCache, LruPolicy
from sim.policies.emoe import (
    EmoePlanner,
    ParametricPredictor,
    TransitionPredictor,
    evaluate_predictor,
    split_sequences,
)
from sim.policies.offload_policy_specs import (
    DEFAULT_TASK_PROFILES,
    EmoeCacheSpec,
    LearnedPredictorSpec,
    MoeInfinityCacheSpec,
    PredictorModelSpec,
    StaticHotCacheSpec,
    TaskProfileSpec,
)
from sim.profile import HardwareProfile
from sim.spec import ModelSpec
from sim.work import GemmShape, dtype_bytes

OFFLOAD_CACHES = ("emoe", "static_hot", "moe_infinity")
OFFLOAD_PREFETCH = ("pre_gated", "all_next_layer")


def uses_offload_planner(policies: Any) -> bool:
    """Whether a scenario's policies need ``OffloadPlanner`` (the plain planner keeps its fast path)."""
    return policies.expert_cache.name in OFFLOAD_CACHES or policies.prefetch.name in OFFLOAD_PREFETCH


# ---------------------------------------------------------------- tasks


def task_profiles(policies: Any) -> dict[str, TaskProfileSpec]:
    """The paper's default task profiles, with the scenario's ``policies.tasks`` added on top."""
    return {**DEFAULT_TASK_PROFILES, **dict(policies.tasks)}


def sensitivity(profiles: Mapping[str, TaskProfileSpec], num_layers: int) -> dict[str | None, np.ndarray]:
    """s per (task, MoE layer): 0 for the first ``round(insensitive_fraction * layers)`` layers."""
    out: dict[str | None, np.ndarray] = {}
    for task, prof in profiles.items():
        s = np.ones(num_layers)
        s[: int(round(prof.insensitive_fraction * num_layers))] = 0.0
        out[task] = s
    return out


# ---------------------------------------------------------------- the predictor's own cost


def predictor_bytes(model: PredictorModelSpec) -> float:
    """GPU memory the predictor network occupies: parameters x bytes per parameter."""
    return float(model.params) * dtype_bytes(model.dtype)


def predictor_shape(model: PredictorModelSpec) -> GemmShape:
    """The predictor's forward pass as one GEMM with its parameter count: hidden -> params / hidden."""
    return GemmShape(model.hidden, max(1, int(model.params // model.hidden)), model.dtype)


def predictor_call_s(profile: HardwareProfile, model: PredictorModelSpec, spec: ModelSpec) -> float:
    """GPU time of one invocation: the GEMM over its input, the expert-id sequence (MoE layers x top_k)."""
    return float(profile.dense_gemm_s(tokens=spec.num_moe_layers * spec.top_k, shape=predictor_shape(model)))


def reserved_expert_memory_bytes(policies: Any) -> float:
    """Expert memory taken by the policy itself (eMoE's predictor network), before expert slots."""
    cache = policies.expert_cache
    return predictor_bytes(cache.predictor.model) if isinstance(cache, EmoeCacheSpec) else 0.0


# ---------------------------------------------------------------- forecasters used by EmoePlanner


def _normalise(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=float)
    total = c.sum(axis=1, keepdims=True)
    return np.divide(c, total, out=np.full_like(c, 1.0 / c.shape[1]), where=total > 0)


class CountsParametricForecaster(ParametricPredictor):
    """eMoE's parametric predictor on the engine's count matrices: the actual routing of the iteration
    that schedules the prompt (``actual``, counts ``[layers, E]``), with each selected expert replaced by
    a wrong one (not selected in that layer) with probability 1 - accuracy, carrying its share."""

    def predict_all(self, task: str | None, previous: np.ndarray | None, *, actual: np.ndarray | None = None) -> np.ndarray:
        if actual is None:
            raise ValueError("a parametric forecast needs the actual routing")
        counts = np.asarray(actual, dtype=float)
        out = counts.copy()
        for layer in range(counts.shape[0]):
            chosen = np.flatnonzero(counts[layer] > 0)
            wrong = chosen[self.rng.random(len(chosen)) >= self.accuracy]
            pool = np.setdiff1d(np.arange(self.num_experts), chosen)
            if len(wrong) and len(pool):
                swap_to = self.rng.choice(pool, size=min(len(wrong), len(pool)), replace=False)
                for src, dst in zip(wrong, swap_to):
                    out[layer, dst] += out[layer, src]
                    out[layer, src] = 0.0
        return _normalise(out)


class CountsLearnedForecaster:
    """The learned ``TransitionPredictor`` fed with the engine's count matrices. eMoE-A: each layer's
    distribution = previous prompt's histogram at that layer x the task's same-layer transition rows.
    eMoE-L: layer 0 as eMoE-A, then layer l = predicted layer l-1 x the layer-transition rows (the
    prompt's own layer l-1 experts are not known before it runs, so predictions are chained)."""

    def __init__(self, predictor: TransitionPredictor, variant: str) -> None:
        self.predictor = predictor
        self.variant = variant

    def predict_all(self, task: str | None, previous: np.ndarray | None, *, actual: np.ndarray | None = None) -> np.ndarray:
        p = self.predictor
        stats, f = p._of(task), p.frequency(task)
        if previous is None:
            return f
        h = _normalise(previous)
        if self.variant == "A":
            return np.stack([h[layer] @ p._rows(stats.across[layer], f[layer]) for layer in range(p.num_layers)])
        out = np.empty_like(f)
        out[0] = h[0] @ p._rows(stats.across[0], f[0])
        for layer in range(1, p.num_layers):
            out[layer] = out[layer - 1] @ p._rows(stats.down[layer], f[layer])
        return out


# ---------------------------------------------------------------- residency controllers


@dataclass(frozen=True, slots=True)
class ResidencyDecision:
    """What the controller wants before an iteration: predictor invocations to charge, the resident set
    (None: unchanged), and whether every selected expert is served (eMoE's first prompts)."""

    predictor_calls: int
    target: np.ndarray | None
    serve_all: bool


class StaticHotResidency:
    """Fiddler-style: the ``slots // layers`` most popular experts of each layer (the remainder to the
    first layers), from a profiling sample of the routing; set once, never changed."""

    def __init__(self, popularity: np.ndarray, capacity: int) -> None:
        L, E = popularity.shape
        per_layer, extra = divmod(capacity, L)
        keys = []
        for layer in range(L):
            n = min(E, per_layer + (1 if layer < extra else 0))
            keys.extend(layer * E + np.argsort(-popularity[layer], kind="stable")[:n])
        self.keys = np.sort(np.asarray(keys, dtype=np.int64))
        self.preference = popularity
        self._done = False

    def on_batch(self, batch: Sequence[tuple[Any, int]], running: Sequence[Any], counts: np.ndarray) -> None:
        pass

    def begin_iteration(self) -> ResidencyDecision:
        if self._done:
            return ResidencyDecision(0, None, False)
        self._done = True
        return ResidencyDecision(0, self.keys, False)

    def summary(self) -> dict[str, Any]:
        return {"pinned_experts": int(len(self.keys))}


class EmoeResidency:
    """eMoE's periodic invocation and task-aware loading around ``EmoePlanner``. Each new prompt
    (a request's first scheduled chunk) calls ``on_prompt`` with the running requests' (task, input
    tokens); the last plan of the iteration is applied; the prompt's routing (its iteration's counts)
    becomes the previous prompt of its task."""

    def __init__(self, planner: EmoePlanner, accuracy: dict[str, Any] | None) -> None:
        self.planner = planner
        self.accuracy = accuracy
        self._seen: set[int] = set()
        self._pending: list[tuple[str | None, list[tuple[str | None, int]], np.ndarray]] = []
        self._serve_all = True
        self.replans = 0

    @property
    def preference(self) -> np.ndarray | None:
        forecasts = list(self.planner._forecast.values())
        return np.mean(forecasts, axis=0) if forecasts else None

    def on_batch(self, batch: Sequence[tuple[Any, int]], running: Sequence[Any], counts: np.ndarray) -> None:
        new = [req for req, _ in batch if req.request_id not in self._seen]
        if not new:
            return
        live = [(r.task, int(r.prompt_tokens)) for r in running]
        for req in new:
            self._seen.add(req.request_id)
            self._pending.append((req.task, live, counts))

    def begin_iteration(self) -> ResidencyDecision:
        if not self._pending:
            return ResidencyDecision(0, None, self._serve_all)
        calls = 0
        plan = None
        for task, live, counts in self._pending:
            plan = self.planner.on_prompt(task, live, actual=counts)
            calls += int(plan.predictor_called)
            self.planner.observe(task, counts)
        self._pending.clear()
        assert plan is not None
        self._serve_all = plan.load_all
        if plan.load_all:
            return ResidencyDecision(calls, None, True)
        self.replans += 1
        return ResidencyDecision(calls, np.fromiter(sorted(plan.keep), dtype=np.int64), False)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompts": self.planner.num_prompts, "predictor_calls": self.planner.num_predictor_calls,
            "period": self.planner.period, "replans": self.replans,
        }
        if self.accuracy is not None:
            out["predictor_accuracy"] = self.accuracy
        return out


class ActivationPolicy:
    """MoE-Infinity's cache replacement as an eviction policy: the score of an expert is its activation
    count over the collection of past activation matrices (evicted lowest first); on ties the deeper
    layer goes first (a shallow layer's prefetch window is short)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self._score = np.zeros(num_layers * num_experts, dtype=np.float64)
        self._depth_bonus = np.repeat((num_layers - np.arange(num_layers)) / (num_layers + 1.0), num_experts)

    def on_access(self, keys: np.ndarray, tick: int) -> None:
        pass

    def set_activation(self, activation: np.ndarray) -> None:
        self._score = np.floor(activation.ravel()) + self._depth_bonus

    def scores(self) -> np.ndarray:
        return self._score


class ActivationMatcher:
    """The collection of past expert activation matrices (counts ``[layers, E]``, FIFO) and the
    matching of a partial matrix against them: cosine similarity over the layers seen so far."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int) -> None:
        self.capacity = capacity
        self.store = np.zeros((capacity, num_layers, num_experts))
        self.size = 0
        self._next = 0

    def add(self, counts: np.ndarray) -> None:
        self.store[self._next] = counts
        self._next = (self._next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def activation(self) -> np.ndarray:
        return self.store[: self.size].sum(axis=0)

    def best_match(self, partial: np.ndarray) -> int:
        """Index of the stored matrix most similar to ``partial`` (``[layers seen, E]``); -1 when empty."""
        if self.size == 0:
            return -1
        seen = partial.shape[0]
        stored = self.store[: self.size, :seen].reshape(self.size, -1)
        cur = partial.ravel().astype(float)
        norms = np.linalg.norm(stored, axis=1) * max(np.linalg.norm(cur), 1e-12)
        sims = (stored @ cur) / np.maximum(norms, 1e-12)
        return int(np.argmax(sims))


# ---------------------------------------------------------------- the planner


class OffloadPlanner(IterationPlanner):
    """An ``IterationPlanner`` for the offloading policy family (see the module docstring)."""

    observes_batches = True

    def __init__(
        self,
        *,
        residency: StaticHotResidency | EmoeResidency | None = None,
        miss: str = "fetch",
        offload_prefetch: str = "none",
        pregate_accuracy: float = 1.0,
        matcher: ActivationMatcher | None = None,
        predictor_s: float = 0.0,
        rng: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.layer_stats = None  # its own layer loop keeps no per-layer totals: the run writes no layers table
        self.residency = residency
        self.miss = miss
        self.offload_prefetch = offload_prefetch
        self.pregate_accuracy = pregate_accuracy
        self.matcher = matcher
        self.predictor_s = predictor_s
        self.rng = rng or np.random.default_rng(0)
        self.num_assignments = 0
        self.num_kept = 0
        self.num_rerouted = 0
        self.staged_loads = 0
        self.predictor_calls = 0
        self.residency_loads = 0

    # ------------------------------------------------------------ hooks

    def observe_batch(self, batch: Sequence[tuple[Any, int]], running: Sequence[Any], counts: np.ndarray) -> None:
        """The replica's view of the iteration about to be planned (new prompts, running requests)."""
        if self.residency is not None:
            self.residency.on_batch(batch, running, counts)

    @property
    def routing_fidelity(self) -> float:
        return 1.0 if self.num_assignments == 0 else self.num_kept / self.num_assignments

    def plan(self, batch, counts: np.ndarray, start_offset_s: float = 0.0) -> IterationPlan:
        total = int(counts.sum())
        self.num_assignments += total
        self._moved = 0
        if self.offload_prefetch == "pre_gated" and self.pregate_accuracy < 1.0:
            counts = self._pregate(counts)
        self._demand = counts
        plan = super().plan(batch, counts, start_offset_s)
        self.num_kept += total - self._moved
        self.num_rerouted += self._moved
        if self.matcher is not None:
            self.matcher.add(counts)
            policy = self.cache.policy
            if isinstance(policy, ActivationPolicy):
                policy.set_activation(self.matcher.activation())
        return plan

    def _pregate(self, counts: np.ndarray) -> np.ndarray:
        """Layers after the first use what the previous layer's pre-gate chose: each assignment is right
        with probability ``accuracy``, else it goes to another expert of the layer, uniformly."""
        out = counts.copy()
        E = self.num_experts
        for layer in range(1, counts.shape[0]):
            wrong = self.rng.binomial(counts[layer], 1.0 - self.pregate_accuracy)
            moved = int(wrong.sum())
            if not moved:
                continue
            out[layer] -= wrong
            for src in np.flatnonzero(wrong):
                others = np.delete(np.arange(E), src)
                out[layer] += np.bincount(self.rng.choice(others, size=int(wrong[src])), minlength=E)
            self._moved += moved
        return out

    # ------------------------------------------------------------ per layer

    def _apply_target(self, plan: IterationPlan, target: np.ndarray, inflight: dict[int, int]) -> None:
        """Make ``target`` the resident set: evict the rest, queue loads of what is missing at the
        iteration start in layer order (the copy engine runs them one layer after the other)."""
        cache = self.cache
        want = np.zeros_like(cache.resident)
        want[target] = True
        leave = cache.resident & ~want
        if leave.any():
            n = int(leave.sum())
            cache.resident[leave] = False
            cache.num_resident -= n
            cache.evictions += n
        missing = np.flatnonzero(want & ~cache.resident)
        room = cache.capacity_experts - cache.num_resident
        missing = missing[:room]
        cache.resident[missing] = True
        cache.num_resident += len(missing)
        for key in missing.tolist():
            inflight[key] = plan.add_load(self.expert_load_s, -1, prefetch=True)
        self.residency_loads += len(missing)

    def _reroute_all(self, counts: np.ndarray, preference: np.ndarray | None) -> np.ndarray:
        """Every layer at once (the resident set does not change while rerouting policies run an
        iteration): the assignments of absent experts go to the layer's resident expert with the
        highest preference; a layer with no resident expert keeps them (they are fetched)."""
        L, E = counts.shape
        resident = self.cache.resident.reshape(L, E)
        missing = (counts > 0) & ~resident
        if not missing.any():
            return counts
        moved = np.where(missing, counts, 0).sum(axis=1)
        movable = resident.any(axis=1) & (moved > 0)
        pref = preference if preference is not None else self.use_counts.astype(float)
        best = np.argmax(np.where(resident, pref, -np.inf), axis=1)
        out = np.where(resident | ~movable[:, None], counts, 0)
        rows = np.flatnonzero(movable)
        out[rows, best[rows]] += moved[rows]
        self._moved += int(moved[rows].sum())
        return out

    def _plan_layers(
        self, plan: IterationPlan, counts: np.ndarray, used: np.ndarray, expert_s: np.ndarray,
        attention_full_s: float, attention_sliding_s: float, gate_s: float, shared_s: float, dense_s: float,
    ) -> None:
        cache = self.cache
        resident = cache.resident
        E = self.num_experts
        pinned = self._pinned
        interference_s = self.load_interference_s
        inflight: dict[int, int] = {}
        serve_all = False
        preference = None
        if self.residency is not None:
            decision = self.residency.begin_iteration()
            for _ in range(decision.predictor_calls):
                plan.add_op(self.predictor_s, "predictor")
            self.predictor_calls += decision.predictor_calls
            if decision.target is not None:
                self._apply_target(plan, decision.target, inflight)
            serve_all = decision.serve_all
            preference = self.residency.preference
        served = counts
        if self.miss == "reroute" and not serve_all:
            served = self._reroute_all(counts, preference)
            if served is not counts:
                expert_s = self.profile.routed_expert_s(tokens=served, shape=self.expert_shape)
        # eMoE's and the static policy's resident sets are theirs: a fetched miss streams through a
        # staging buffer; before eMoE's first prediction every expert is served (fetched into the cache).
        insert_misses = self.residency is None or serve_all
        prefetch = self.offload_prefetch if self.offload_prefetch != "none" else (
            "next_layer" if self.prefetch == "next_layer" else "none")
        record = self.record_accesses
        accessed: list[int] = []
        L = self.num_moe_layers
        # Without insertions or prefetches the resident set cannot change during the iteration: hits,
        # residency and the access record are then computed once for all layers (the common eMoE case).
        static = not insert_misses and prefetch == "none"
        # Demand (what the gate selected) per layer, and what is served (after rerouting), as lists.
        served_used = served > 0
        s_layers, s_experts = np.nonzero(served_used)
        served_all = s_experts.tolist()
        times_all = expert_s[s_layers, s_experts].tolist()
        served_bounds = np.concatenate(([0], np.cumsum(served_used.sum(axis=1)))).tolist()
        if static:
            resident2d = resident.reshape(L, E)
            n_here = int((used & resident2d).sum())
            plan.hits += n_here
            plan.misses += int(used.sum()) - n_here
            here_all = resident2d[s_layers, s_experts].tolist()
            if record:
                accessed = np.flatnonzero(used).tolist()
            self._tick += L
            touched = (s_layers * E + s_experts)
            if len(touched):
                cache.touch(touched, self._tick)
        else:
            layer_ids, expert_ids = np.nonzero(used)
            demand_all = expert_ids.tolist()
            demand_bounds = np.concatenate(([0], np.cumsum(used.sum(axis=1)))).tolist()
        op_s, op_kind, op_load = plan.op_s, plan.op_kind, plan.op_load
        moe_layer = 0
        for layer, is_moe in enumerate(self.layer_is_moe):
            attention_s = attention_sliding_s if self.layer_is_sliding[layer] else attention_full_s
            if not is_moe:
                op_s.extend((attention_s, dense_s))
                op_kind.extend(("attention", "dense_ffn"))
                op_load.extend((-1, -1))
                continue
            if moe_layer == 0 and prefetch in ("next_layer", "all_next_layer"):
                self._prefetch_keys(plan, self._next_keys(prefetch, 0, counts), inflight, len(op_s) - 1)
            gate_op = add_moe_layer_head(plan, attention_s, gate_s, shared_s)
            base = moe_layer * E
            lo, hi = served_bounds[moe_layer], served_bounds[moe_layer + 1]
            keys = [base + e for e in served_all[lo:hi]]
            times = times_all[lo:hi]
            if static:
                here = here_all[lo:hi]
            else:
                demand = [base + e for e in demand_all[demand_bounds[moe_layer]: demand_bounds[moe_layer + 1]]]
                self._tick += 1
                if record:
                    accessed.extend(demand)
                n_here = int(resident[demand].sum()) if demand else 0
                plan.hits += n_here
                plan.misses += len(demand) - n_here
                here = resident[keys].tolist()
            ready_s = 0.0
            waits: list[tuple[int, float]] = []
            miss_keys: list[int] = []
            miss_times: list[float] = []
            for key, is_here, seconds in zip(keys, here, times):
                if is_here:
                    load = inflight.get(key, -1) if inflight else -1
                    if load < 0:
                        ready_s += seconds
                    else:
                        waits.append((load, seconds))
                else:
                    miss_keys.append(key)
                    miss_times.append(seconds)
            if ready_s:
                op_s.append(ready_s)
                op_kind.append("experts")
                op_load.append(-1)
            if waits:
                plan.prefetch_hits += len(waits)
                for load, seconds in sorted(waits):
                    plan.add_op(seconds + interference_s, "expert", load)
            if not static:
                pinned[keys] = True
            if miss_keys:
                placed = cache.insert_many(np.asarray(miss_keys, dtype=np.int64), pinned) if insert_misses else 0
                plan.bypassed += len(miss_keys) - placed
                self.staged_loads += len(miss_keys) - placed
                for seconds in miss_times:
                    load = plan.add_load(self.expert_load_s, gate_op, prefetch=False)
                    plan.add_op(seconds + interference_s, "expert", load)
            if prefetch != "none" and moe_layer + 1 < self.num_moe_layers:
                self._prefetch_keys(plan, self._next_keys(prefetch, moe_layer + 1, counts), inflight, gate_op)
            if not static:
                if keys:
                    cache.touch(np.asarray(keys, dtype=np.int64), self._tick)
                pinned[base: base + E] = False
            moe_layer += 1
        if record and accessed:
            plan.accesses.append(np.asarray(accessed, dtype=np.int32))

    def _next_keys(self, prefetch: str, target: int, counts: np.ndarray) -> np.ndarray:
        """Keys to prefetch for MoE layer ``target``, most wanted first."""
        E = self.num_experts
        if prefetch == "all_next_layer":
            experts = np.arange(E)
        elif prefetch == "pre_gated":
            row = counts[target]  # the pre-gate's choice (already noisy when accuracy < 1)
            experts = np.flatnonzero(row)
            experts = experts[np.argsort(-row[experts], kind="stable")]
        elif prefetch == "moe_infinity":
            assert self.matcher is not None
            best = self.matcher.best_match(counts[:target])
            if best < 0:
                return np.zeros(0, dtype=np.int64)
            row = self.matcher.store[best, target]
            experts = np.flatnonzero(row)
            experts = experts[np.argsort(-row[experts], kind="stable")]
        else:
            experts = self._predict(target, counts)
        return target * E + np.asarray(experts, dtype=np.int64)

    def _prefetch_keys(self, plan: IterationPlan, keys: np.ndarray, inflight: dict[int, int], issue_after: int) -> None:
        if not len(keys):
            return
        self._pinned[keys] = True
        absent = keys[~self.cache.resident[keys]]
        if not len(absent):
            return
        placed = self.cache.insert_many(absent, self._pinned)
        self._pinned[absent[placed:]] = False
        for key in absent[:placed].tolist():
            inflight[key] = plan.add_load(self.expert_load_s, issue_after, prefetch=True)

    def offload_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "miss": self.miss, "assignments": self.num_assignments, "rerouted": self.num_rerouted,
            "staged_loads": self.staged_loads, "residency_loads": self.residency_loads,
            "predictor_calls": self.predictor_calls, "predictor_busy_s": self.predictor_calls * self.predictor_s,
        }
        if self.residency is not None:
            out.update(self.residency.summary())
        return out


# ---------------------------------------------------------------- building from a scenario


def _profiling_source(loaded: Any, seed_index: int):
    """A second routing source of the scenario's kind on its own seed stream (the run's streams are
    children 0 and 1 of the workload seed; profiling uses later children, so the run is unchanged)."""
    from sim.workload.routing import build_routing

    model = loaded.model
    seq = np.random.SeedSequence(loaded.scenario.workload.seed).spawn(seed_index + 1)[seed_index]
    return build_routing(
        loaded.scenario.workload.routing, num_layers=model.num_moe_layers, num_experts=model.num_experts,
        top_k=model.top_k, rng=np.random.default_rng(seq), base_dir=loaded.base_dir,
    )


def routing_popularity(loaded: Any, tokens: int) -> np.ndarray:
    """Counts ``[layers, E]`` of ``tokens`` tokens drawn from the scenario's routing (a profiling run)."""
    src = _profiling_source(loaded, 2)
    step = 16
    segments = [(10**9 + i, 0, min(step, tokens - i * step)) for i in range(-(-tokens // step))]
    return src.counts(segments).astype(float)


def training_sequences(loaded: Any, spec: LearnedPredictorSpec, tasks: Sequence[str]) -> list:
    """The routing trace the learned predictor is trained and measured on, each sequence labelled
    with a task (from the scenario's task mix, round robin, when the trace has none)."""
    from sim.workload.routing import GeneratedRouting, MarkovGeneratedRouting, ReplayedRouting
    from sim.workload.routing_trace import TraceSequence, load_any_routing

    model = loaded.model
    label = (lambda i: tasks[i % len(tasks)]) if tasks else (lambda i: None)
    if spec.trace is not None:
        path = Path(spec.trace)
        if not path.is_absolute():
            path = loaded.base_dir / path
        trace = load_any_routing(path, model=model.name)
        if (trace.meta.num_layers, trace.meta.num_experts) != (model.num_moe_layers, model.num_experts):
            raise ScenarioError(
                f"{loaded.source}: policies.expert_cache.predictor.trace: {path} has {trace.meta.num_layers} MoE layers x "
                f"{trace.meta.num_experts} experts; the model has {model.num_moe_layers} x {model.num_experts}"
            )
        return [s if s.task is not None else TraceSequence(s.request_id, s.experts, s.positions, s.gates, label(i))
                for i, s in enumerate(trace.sequences)]
    src = _profiling_source(loaded, 3)
    n, t = spec.generated_sequences, spec.generated_tokens
    if isinstance(src, MarkovGeneratedRouting):
        experts = src.sequences(n, t)
    elif isinstance(src, ReplayedRouting):
        experts = [s.experts for s in src.sequences]
    elif isinstance(src, GeneratedRouting):
        experts = [src._top_k(src._rng, t) for _ in range(n)]
    else:  # pragma: no cover - every routing kind is one of the above
        raise ScenarioError(f"{loaded.source}: cannot draw a training trace from {type(src).__name__}")
    return [TraceSequence(i, np.asarray(e, dtype=np.int64), np.arange(len(e)), None, label(i)) for i, e in enumerate(experts)]


def build_emoe_residency(loaded: Any, spec: EmoeCacheSpec, capacity: int, seed: int) -> tuple[EmoeResidency, float]:
    """eMoE's controller for a scenario, and the seconds of one predictor invocation."""
    model = loaded.model
    profiles = task_profiles(loaded.scenario.policies)
    L, E = model.num_moe_layers, model.num_experts
    pred = spec.predictor
    accuracy: dict[str, Any] | None = None
    if isinstance(pred, LearnedPredictorSpec):
        tasks = sorted(loaded.scenario.workload.tasks or {})
        sequences = training_sequences(loaded, pred, tasks)
        train, test = split_sequences(sequences, pred.train_fraction)
        learned = TransitionPredictor(num_layers=L, num_experts=E, top_k=model.top_k).fit(train)
        measured = evaluate_predictor(learned, test, pred.variant)
        accuracy = {
            "variant": f"eMoE-{pred.variant}", "trained_tokens": int(sum(len(s.experts) for s in train)),
            "test_tokens": measured.num_steps, "top_k_precision": measured.precision,
            "top_k_recall": measured.recall, "random_precision": measured.random_precision,
        }
        forecaster: Any = CountsLearnedForecaster(learned, pred.variant)
    else:
        forecaster = CountsParametricForecaster(num_experts=E, accuracy=pred.accuracy, seed=seed)
        accuracy = {"variant": "parametric", "top_k_precision": pred.accuracy}
    sens = sensitivity(profiles, L) if spec.task_aware else None
    planner = EmoePlanner(
        num_layers=L, num_experts=E, predictor=forecaster, experts_per_layer=max(1, capacity // L),
        expected_output_tokens={t: p.expected_output_tokens for t, p in profiles.items()},
        sensitivity=sens, period=spec.period,
    )
    return EmoeResidency(planner, accuracy), predictor_call_s(loaded.profile, pred.model, model)


def build_offload_planner(loaded: Any, profile: HardwareProfile, capacity: int, record_accesses: bool, index: int) -> OffloadPlanner:
    """The planner for a scenario whose policies ``uses_offload_planner``."""
    model = loaded.model
    policies = loaded.scenario.policies
    cache_spec, pf = policies.expert_cache, policies.prefetch
    L, E = model.num_moe_layers, model.num_experts
    total = L * E
    seed = int(np.random.SeedSequence(loaded.scenario.workload.seed).spawn(5)[4].generate_state(1)[0])
    residency = None
    matcher = None
    predictor_s = 0.0
    miss = getattr(cache_spec, "miss", "fetch")
    if isinstance(cache_spec, MoeInfinityCacheSpec):
        policy: Any = ActivationPolicy(L, E)
        matcher = ActivationMatcher(L, E, cache_spec.collection_size)
    else:
        from sim.policies.cache import LfuPolicy

        policy = LfuPolicy(total) if cache_spec.name == "lfu" else LruPolicy(total)
    cache = ExpertCache(num_layers=L, num_experts=E, capacity_experts=min(capacity, total),
                        per_layer=getattr(cache_spec, "scope", "global") == "per_layer", policy=policy)
    if isinstance(cache_spec, StaticHotCacheSpec):
        residency = StaticHotResidency(routing_popularity(loaded, cache_spec.profile_tokens), cache.capacity_experts)
    elif isinstance(cache_spec, EmoeCacheSpec):
        residency, predictor_s = build_emoe_residency(loaded, cache_spec, cache.capacity_experts, seed + index)
    offload_prefetch = "moe_infinity" if matcher is not None else (pf.name if pf.name in OFFLOAD_PREFETCH else "none")
    return OffloadPlanner(
        model=model, profile=profile, cache=cache, prefetch=pf.name if pf.name == "next_layer" else "none",
        prefetch_predictor=getattr(pf, "predictor", "oracle"), prefetch_max_experts=getattr(pf, "max_experts", None),
        record_accesses=record_accesses, residency=residency, miss=miss, offload_prefetch=offload_prefetch,
        pregate_accuracy=getattr(pf, "accuracy", 1.0), matcher=matcher, predictor_s=predictor_s,
        rng=np.random.default_rng(seed + 1000 + index),
    )


# ---------------------------------------------------------------- eMoE's scheduler costs from the profile


def emoe_scheduler_costs(loaded: Any, profile: HardwareProfile) -> dict[str, Any]:
    """dE per task and c of Algorithm 1 when the scenario does not give them, from the profile:
    dE = the task's sensitive MoE layers x top_k expert loads over the host link (what Eq. 2 makes
    resident on its behalf); c = per-token time of the experts (top_k per MoE layer) and the attention
    projections in a decode batch of ``max_num_seqs`` tokens."""
    model = loaded.model
    policies = loaded.scenario.policies
    profiles = task_profiles(policies)
    L = model.num_moe_layers
    load_s = float(profile.h2d_copy_s(nbytes=model.expert_bytes, pinned=True))
    sens = sensitivity(profiles, L)
    expert_load_s = {t: float(s.sum()) * model.top_k * load_s for t, s in sens.items()}
    batch = policies.batching.max_num_seqs
    per_expert = max(1, batch * model.top_k // model.num_experts)
    expert_tok_s = float(profile.expert_ffn_s(tokens=per_expert, shape=model.expert_shape)) / per_expert
    proj_tok_s = sum(float(profile.dense_gemm_s(tokens=batch, shape=s)) for s in model.attention_projection_shapes) / batch
    per_token_s = L * model.top_k * expert_tok_s + model.num_layers * proj_tok_s
    return {
        "expert_load_s": expert_load_s, "default_expert_load_s": L * model.top_k * load_s,
        "per_token_s": per_token_s,
        "expected_output_tokens": {t: p.expected_output_tokens for t, p in profiles.items()},
        "slo_s": {t: p.slo_s for t, p in profiles.items() if p.slo_s is not None},
    }


def build_emoe_scheduler(loaded: Any, profile: HardwareProfile):
    """The Algorithm-1 scheduler with the scenario's values, profile-derived dE and c where absent,
    and the task profiles' output lengths and SLOs under the scheduler's own per-task entries."""
    from sim.policies.scheduler import EmoeSloScheduler

    spec = loaded.scenario.policies.scheduler
    d = emoe_scheduler_costs(loaded, profile)
    return EmoeSloScheduler(
        expected_output_tokens={**d["expected_output_tokens"], **spec.expected_output_tokens},
        default_output_tokens=spec.default_output_tokens,
        slo_s={**d["slo_s"], **spec.slo_s},
        default_slo_s=spec.default_slo_s if spec.default_slo_s is not None else float("inf"),
        expert_load_s={**d["expert_load_s"], **spec.expert_load_s},
        default_expert_load_s=spec.default_expert_load_s if spec.default_expert_load_s is not None else d["default_expert_load_s"],
        per_token_s=spec.per_token_s if spec.per_token_s is not None else d["per_token_s"],
        max_batch_tokens=spec.max_batch_tokens if spec.max_batch_tokens is not None else loaded.scenario.policies.batching.max_batch_tokens,
    )
