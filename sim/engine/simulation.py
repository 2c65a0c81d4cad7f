"""Run one scenario: build the replicas, feed them the arrivals, collect what happened.

``simulate(loaded)`` is deterministic for a scenario's seed: the arrivals and the routing each draw
from their own stream spawned from that seed. A run can be stopped (Ctrl-C, or ``stop_at_s``); the
result then says ``partial`` and lists the requests still in flight, so none vanish."""

from __future__ import annotations

import operator
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import simpy

from sim.engine.expert_parallel import build_group, group_shape, plan_memory_ep
from sim.engine.faults import FaultInjector
from sim.engine.iteration import IterationPlanner
from sim.engine.memory import MemoryBudget, max_request_tokens, plan_memory
from sim.engine.offload_policies import build_emoe_scheduler, build_offload_planner, uses_offload_planner
from sim.engine.replica import Replica, RequestState
from sim.errors import CapacityError, ScenarioError
from sim.faults import expand_schedule
from sim.policies.cache import make_cache
from sim.policies.scheduler import make_scheduler
from sim.scenario import LoadedScenario
from sim.workload.arrivals import RequestTable, build_requests
from sim.workload.closed_loop import ClosedLoopIssuer
from sim.workload.routing import build_routing


@dataclass
class SimulationResult:
    """Everything a run produced: tables, the raw samples behind the summary, and whether it finished."""

    loaded: LoadedScenario
    budget: MemoryBudget
    requests: pd.DataFrame
    iterations: pd.DataFrame
    tbt_samples_s: np.ndarray
    replicas: list[Replica]
    partial: bool
    simulated_s: float
    events: int
    extra: dict[str, Any] = field(default_factory=dict)


def build_request_table(loaded: LoadedScenario, rng: np.random.Generator) -> RequestTable:
    wl = loaded.scenario.workload
    try:
        return build_requests(
            wl.arrivals, rng=rng, base_dir=loaded.base_dir, max_requests=wl.max_requests,
            max_duration_s=wl.max_duration_s, task_mix=wl.tasks,
        )
    except ValueError as exc:
        raise ScenarioError(f"{loaded.source}: workload: {exc}") from None


def simulate(
    loaded: LoadedScenario,
    *,
    progress: bool = False,
    stop_at_s: float | None = None,
    record_accesses: bool | None = None,
) -> SimulationResult:
    """Simulate the scenario until every request has finished (or the run is stopped)."""
    scenario = loaded.scenario
    model = loaded.model
    if model.is_encoder_decoder:
        raise ScenarioError(
            f"{loaded.source}: model: {model.name} is an encoder-decoder model; the serving engine "
            f"simulates decoder-only models (the catalog still gives its sizes)"
        )
    profile = loaded.profile
    links = scenario.hardware.links
    if links.host_to_device_gbps or links.gpu_to_gpu_gbps or links.node_to_node_gbps:
        profile = profile.with_links(
            host_to_device_gbps=links.host_to_device_gbps,
            gpu_to_gpu_gbps=links.gpu_to_gpu_gbps,
            node_to_node_gbps=links.node_to_node_gbps,
        )
    # Speculative decoding / CPU offloading (policies.speculative, policies.offload): None for plain scenarios.
    from sim.engine.offload import build_offload_setup

    setup = build_offload_setup(loaded, profile)
    dp, ep, tp = group_shape(loaded)
    expert_parallel = ep * tp > 1  # a replica spans several GPUs: sim.engine.expert_parallel plans it
    if expert_parallel and (setup is not None or uses_offload_planner(scenario.policies)):
        raise ScenarioError(
            f"{loaded.source}: hardware.parallelism: expert/tensor parallelism (ep {ep} x tp {tp}) is not combined "
            f"with expert offloading policies or speculative decoding / CPU offloading yet; "
            f"use one of them per scenario"
        )
    if expert_parallel:
        budget = plan_memory_ep(loaded)
    else:
        budget = setup.budget if setup is not None else plan_memory(loaded)
    outside_before = profile.extrapolated_counts()  # lookups beyond measured data (warned once in the summary)
    seeds = np.random.SeedSequence(scenario.workload.seed).spawn(2)
    arrivals_rng, routing_rng = (np.random.default_rng(s) for s in seeds)
    table = build_request_table(loaded, arrivals_rng)
    routing = build_routing(
        scenario.workload.routing, num_layers=model.num_moe_layers, num_experts=model.num_experts,
        top_k=model.top_k, rng=routing_rng, base_dir=loaded.base_dir,
        request_tasks=table.task,  # a task-aware generator routes each request by its own task
    )
    policies = scenario.policies
    cache_spec = policies.expert_cache
    if record_accesses is None:
        record_accesses = cache_spec.name != "all_resident"

    env = simpy.Environment()
    finished = _FinishedRequests()
    tbt_samples = array("d")
    replicas = []
    offload = uses_offload_planner(policies)
    for index in range(dp):
        if expert_parallel:
            ep_planner, ep_routing = build_group(loaded, profile, routing, index)
            replicas.append(
                Replica(
                    index=index, env=env, budget=budget, planner=ep_planner, routing=ep_routing,
                    scheduler=make_scheduler(policies.scheduler), profile=profile,
                    max_num_seqs=policies.batching.max_num_seqs, max_batch_tokens=policies.batching.max_batch_tokens,
                    chunked_prefill=policies.batching.chunked_prefill, preemption=policies.preemption.mode,
                    queue_timeout_s=policies.batching.queue_timeout_s, on_finish=finished.append,
                    tbt_samples=tbt_samples,
                )
            )
            continue
        if offload:  # eMoE and the other offloading policies (sim.engine.offload_policies)
            planner = build_offload_planner(loaded, profile, budget.expert_slots, record_accesses, index)
        else:
            planner = None
        cache = planner.cache if planner is not None else make_cache(
            cache_spec.name, num_layers=model.num_moe_layers, num_experts=model.num_experts,
            capacity_experts=budget.expert_slots, per_layer=getattr(cache_spec, "scope", "global") == "per_layer",
        )
        planner = planner or (setup.planner_class if setup is not None else IterationPlanner)(
            model=model, profile=profile, cache=cache, prefetch=policies.prefetch.name,
            prefetch_predictor=getattr(policies.prefetch, "predictor", "oracle"),
            prefetch_max_experts=getattr(policies.prefetch, "max_experts", None),
            record_accesses=record_accesses,
        )
        replica_class, replica_extra = (
            (setup.replica_class, setup.replica_kwargs(profile, cache)) if setup is not None else (Replica, {})
        )
        scheduler = (build_emoe_scheduler(loaded, profile) if policies.scheduler.name == "emoe_slo"
                     else make_scheduler(policies.scheduler))
        replicas.append(
            replica_class(
                **replica_extra,
                index=index, env=env, budget=budget, planner=planner, routing=routing,
                scheduler=scheduler, profile=profile,
                max_num_seqs=policies.batching.max_num_seqs, max_batch_tokens=policies.batching.max_batch_tokens,
                chunked_prefill=policies.batching.chunked_prefill, preemption=policies.preemption.mode,
                queue_timeout_s=policies.batching.queue_timeout_s, on_finish=finished.append,
                tbt_samples=tbt_samples,
            )
        )
    all_requests: list[RequestState] = []
    kv_limit_tokens = max_request_tokens(budget)
    if len(table):
        smallest = int((table.prompt_tokens + table.output_tokens).min())
        if smallest > kv_limit_tokens:
            raise CapacityError(
                f"{loaded.source}: hardware: the KV cache holds {kv_limit_tokens:,} tokens "
                f"({budget.kv_bytes / 1e9:.2f} GB), fewer than the smallest request of the workload "
                f"({smallest:,} tokens): no request could be served; give the KV cache more memory"
            )
    batch_limit = policies.batching.max_batch_tokens
    chunked = policies.batching.chunked_prefill
    injector = _start_faults(loaded, env, replicas, profile, budget, table, finished)
    dispatch = injector.dispatch if injector is not None else None

    def admit(i: int, at: float) -> None:
        tasks = table.task
        req = RequestState(
            i, at, int(table.prompt_tokens[i]), int(table.output_tokens[i]),
            None if tasks is None else str(tasks[i]),
        )
        all_requests.append(req)
        if req.prompt_tokens + req.output_tokens > kv_limit_tokens:
            _reject(req, "exceeds_kv_capacity", env.now, finished)
        elif not chunked and req.prompt_tokens > batch_limit:
            _reject(req, "prompt_exceeds_batch_tokens", env.now, finished)
        elif dispatch is not None:
            dispatch(req)
        else:
            target = min(replicas, key=lambda r: (r.outstanding, r.index))
            target.submit(req)

    def send_at(i: int, at: float):
        if at > env.now:
            yield env.timeout(at - env.now)
        admit(i, at)

    def open_loop_arrivals():
        for i in range(len(table)):
            at = float(table.arrival_s[i])
            if at > env.now:
                yield env.timeout(at - env.now)
            admit(i, at)

    if table.closed_loop is None:
        env.process(open_loop_arrivals())
    else:  # each answer sends that client's next request (sim.workload.closed_loop)
        issuer = ClosedLoopIssuer(table.closed_loop, len(table))
        due_now: deque[int] = deque()

        def next_request(_req: RequestState) -> None:
            nxt = issuer.after_finish(env.now)
            if nxt is None:
                return
            i, at = nxt
            if at > env.now:
                env.process(send_at(i, at))
                return
            # No think time: admitted before the finishing replica forms its next batch (as the runtime
            # does), and through a worklist, since a rejection finishes at once and sends again.
            due_now.append(i)
            if len(due_now) == 1:
                while due_now:
                    admit(due_now[0], env.now)
                    due_now.popleft()

        finished.then = next_request
        for i, at in issuer.initial():
            env.process(send_at(i, at))
    partial = _run(env, table, finished, progress=progress, stop_at_s=stop_at_s)
    requests = _requests_frame(all_requests)
    as_row = operator.attrgetter(*_ITERATION_COLUMNS)  # far faster than pandas' dataclass path
    iterations = pd.DataFrame(
        [as_row(rec) for rep in replicas for rec in rep.iterations],
        columns=list(_ITERATION_COLUMNS),
    )
    extra: dict[str, Any] = {}
    if setup is not None:
        from sim.engine.speculative import STEP_COLUMNS

        steps = pd.DataFrame([rec for rep in replicas for rec in rep.step_records], columns=list(STEP_COLUMNS))
        iterations = pd.concat([iterations, steps], axis=1)
        extra["offload"] = setup.summary()
    return SimulationResult(
        loaded=loaded, budget=budget, requests=requests, iterations=iterations,
        tbt_samples_s=np.frombuffer(tbt_samples, dtype=np.float64).copy(), replicas=replicas,
        partial=partial, simulated_s=env.now, events=_event_count(env),
        extra={"table_skipped_rows": table.skipped_rows, "num_arrivals": len(table), **extra,
               **({"faults": injector.summary()} if injector is not None else {}),
               "profile_outside_measured": {k: v - outside_before.get(k, 0) for k, v in
                                            profile.extrapolated_counts().items() if v > outside_before.get(k, 0)}},
    )


def _start_faults(
    loaded: LoadedScenario, env: simpy.Environment, replicas: list[Replica], profile: Any,
    budget: MemoryBudget, table: RequestTable, finished: list[RequestState],
) -> FaultInjector | None:
    """The fault process (sim/engine/faults.py) when the scenario has faults; it then routes requests."""
    faults = loaded.scenario.faults
    if not faults.active:
        return None
    hw = loaded.scenario.hardware
    if table.closed_loop is not None:
        for i, rnd in enumerate(faults.random):
            if rnd.horizon_s is None:
                raise ScenarioError(f"{loaded.source}: faults.random[{i}]: horizon_s is needed with a closed-loop "
                                    f"workload, whose arrival times are not known in advance")
    horizon_s = float(table.arrival_s[-1]) if len(table) else 0.0
    schedule = expand_schedule(faults, hw.num_gpus, hw.num_nodes, horizon_s)

    def finish(req: RequestState, status: str, reason: str) -> None:
        _reject(req, reason, env.now, finished)
        req.status = status

    # A recovering GPU brings back what it held at start: the non-expert weights and its expert slots
    # (for an expert-parallel member, the per-GPU budget already is its shard).
    _, ep, tp = group_shape(loaded)
    if ep * tp > 1:
        from sim.engine.ep_faults import ExpertParallelFaultInjector

        return ExpertParallelFaultInjector(
            env=env, replicas=replicas, schedule=schedule, spec=faults, profile=profile, num_nodes=hw.num_nodes,
            restore_bytes=budget.non_expert_bytes + budget.expert_bytes, group=ep * tp, tp=tp, finish=finish,
        )
    return FaultInjector(
        env=env, replicas=replicas, schedule=schedule, spec=faults, profile=profile, num_nodes=hw.num_nodes,
        restore_bytes=budget.non_expert_bytes + budget.expert_bytes, finish=finish,
    )


_ITERATION_COLUMNS = (
    "replica", "started_at_s", "duration_s", "num_prefill_seqs", "num_decode_seqs", "num_tokens",
    "expert_hits", "expert_misses", "prefetch_hits", "expert_loads", "stall_s", "compute_busy_s",
    "copy_busy_s", "kv_blocks_used", "experts_resident", "preemptions",
)


class _FinishedRequests(list):
    """Every request that finished (completed, rejected, dropped, failed), in order; in a closed loop ``then``
    runs on each, to send that client's next request. Replicas, rejections and faults all append here."""

    def __init__(self) -> None:
        super().__init__()
        self.then: Callable[[RequestState], None] | None = None

    def append(self, req: RequestState) -> None:
        super().append(req)
        if self.then is not None:
            self.then(req)


def _reject(req: RequestState, reason: str, now: float, finished: list[RequestState]) -> None:
    req.status = "rejected"
    req.reason = reason
    req.finished_at_s = now
    finished.append(req)


def _run(
    env: simpy.Environment,
    table: RequestTable,
    finished: list[RequestState],
    *,
    progress: bool,
    stop_at_s: float | None,
) -> bool:
    """Advance the simulation in slices so a progress bar can follow and Ctrl-C stops cleanly. The bar counts
    simulated seconds up to the last arrival, or, in a closed loop (arrivals unknown in advance), requests.

    Returns True when the run stopped before every request finished."""
    closed = table.closed_loop is not None
    horizon = float(table.arrival_s[-1]) if len(table) else 0.0
    step = max(1.0, horizon / 200.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = (tqdm(total=len(table), unit="req", desc="simulating", leave=False, dynamic_ncols=True) if closed
               else tqdm(total=round(horizon), unit="sim-s", desc="simulating", leave=False, dynamic_ncols=True))
    try:
        while len(finished) < len(table):
            if env.peek() == float("inf"):
                raise RuntimeError("simulation ran out of events with requests unfinished")
            until = env.now + step
            if stop_at_s is not None:
                if env.now >= stop_at_s:
                    return True
                until = min(until, stop_at_s)
            env.run(until=until)
            if bar is not None:
                if closed:
                    bar.n = len(finished)
                else:
                    bar.n = min(round(env.now), bar.total) if env.now <= horizon else bar.total
                bar.set_postfix_str(f"t={env.now:,.0f}s")
                bar.refresh()
        return False
    except KeyboardInterrupt:
        return True
    finally:
        if bar is not None:
            bar.close()


def _requests_frame(requests: list[RequestState]) -> pd.DataFrame:
    rows = []
    for r in requests:
        status = r.status if r.status in ("completed", "rejected", "dropped", "failed") else f"unfinished_{r.status}"
        rows.append(
            (
                r.request_id, r.replica, r.task, r.arrival_s, r.prompt_tokens, r.output_tokens, r.generated,
                status, r.reason, r.admitted_at_s, r.first_token_at_s, r.finished_at_s, r.preemptions, r.max_tbt_s,
            )
        )
    frame = pd.DataFrame(
        rows,
        columns=[
            "request_id", "replica", "task", "arrived_at_s", "prompt_tokens", "output_tokens", "generated_tokens",
            "status", "reason", "admitted_at_s", "first_token_at_s", "finished_at_s", "preemptions", "max_tbt_s",
        ],
    )
    frame["ttft_s"] = frame["first_token_at_s"] - frame["arrived_at_s"]
    done = frame["status"] == "completed"
    frame["e2e_s"] = (frame["finished_at_s"] - frame["arrived_at_s"]).where(done)
    decode_tokens = (frame["output_tokens"] - 1).clip(lower=1)
    frame["tpot_s"] = ((frame["finished_at_s"] - frame["first_token_at_s"]) / decode_tokens).where(
        done & (frame["output_tokens"] > 1)
    )
    return frame


def _event_count(env: simpy.Environment) -> int:
    """Events scheduled so far (SimPy numbers them with a private counter)."""
    counter = getattr(env, "_eid", None)
    if counter is None:
        return 0
    # itertools.count's repr is 'count(N)': N is the next id, i.e. how many were handed out.
    return int(repr(counter)[6:-1])
