"""Faults in an expert-parallel replica: a failed GPU takes its rank's experts away until restored.

A replica of ``ep`` ranks x ``tp`` GPUs keeps serving when one of its GPUs fails (the fault-free
single-GPU injector, ``sim.engine.faults``, takes the whole replica down instead):

* the failed GPU's rank is down while any of its ``tp`` GPUs is down (an expert needs all its slices);
  its experts are unavailable (``sim.policies.failover.available_experts``: a replicated expert stays
  available while a live rank holds a copy) and no sequence is pinned to it (data-parallel attention
  moves to the live ranks; the group's KV cache is pooled in this engine, so the failed GPU's KV blocks
  are not tracked and not recomputed: stated simplification);
* each iteration's routing goes through ``route_around`` with ``faults.expert_failover``:
  ``reroute`` (to the layer's most requested available expert of the iteration), ``spread`` (over the
  available experts in proportion to the iteration's requests), or ``wait``. An iteration with any
  token-expert pair that must wait (``wait``, or a layer whose experts are all down) does not run
  until every rank of the group is back; it then computes the routing as drawn, so no token is lost or
  changed (the iteration stalls: simpler than holding sequences back, and correct). A ``wait`` group
  whose member never comes back (a failure without an end) is failed as a whole, so its requests are
  re-queued or failed by ``faults.in_flight`` rather than stalled forever;
* a fault takes effect from the group's next iteration (the one in flight completes);
* ``gpu_slow`` multiplies its rank's expert compute (the rank's slowest GPU; times any static
  ``degraded_ranks`` factor); ``link_degrade`` is logged only (every expert is resident: no host loads);
* restoring a GPU moves only its shard: the per-GPU bytes of the EP memory plan (its share of the
  non-expert weights, non-expert / tp, and its rank's experts / tp), from the recovery source (host over
  its host link; a live peer holding the same shard, i.e. the same member of another replica, over
  gpu_to_gpu on the same node or node_to_node, else the host; or storage);
* the group fails as a whole (``Replica.fail``) only when every rank is down; it serves again when one
  comes back;
* spares (``faults.spare_gpus``, see ``sim.engine.faults``): a spare that takes a failed member's place
  restores only that member's shard, then serves as that member.

Routing fidelity = pairs computed by the expert the router chose / all pairs routed (eMoE's definition);
under ``wait`` it stays 1 and the cost is the stall, reported as ``wait_s`` and ``waiting_fraction``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import simpy

from sim.engine.faults import FaultInjector, _product
from sim.engine.replica import Replica, RequestState
from sim.faults import Fault, FaultsSpec
from sim.policies.failover import route_around
from sim.profile import HardwareProfile


@dataclass
class FailoverStats:
    assignments: int = 0  # token-expert pairs routed (after the capacity policy)
    kept: int = 0  # computed by the expert the router chose
    rerouted: int = 0
    waiting: int = 0  # pairs of iterations that stalled for a restore
    blocked_iterations: int = 0
    wait_s: float = 0.0
    faulted_iterations: int = 0  # iterations planned with a rank down
    faulted_assignments: int = 0  # pairs of those iterations

    def as_dict(self) -> dict[str, Any]:
        n = self.assignments
        return {
            "routing_fidelity": self.kept / n if n else 1.0,
            "rerouted_fraction": self.rerouted / n if n else 0.0,
            "waiting_fraction": self.waiting / n if n else 0.0,
            "blocked_iterations": self.blocked_iterations, "faulted_iterations": self.faulted_iterations,
            "wait_s": self.wait_s, "assignments": self.assignments,
            # The same cost over the iterations that ran with a rank down only.
            "rerouted_while_down_fraction": self.rerouted / self.faulted_assignments if self.faulted_assignments else 0.0,
        }


@dataclass
class Failover:
    """Per EP group: which ranks are up, and what the failover policy does to one micro-batch's pairs."""

    env: simpy.Environment
    num_ranks: int
    policy: str
    alive: np.ndarray = field(init=False)
    stats: FailoverStats = field(default_factory=FailoverStats)
    _blocked: bool = False
    _back: simpy.Event | None = None

    def __post_init__(self) -> None:
        self.alive = np.ones(self.num_ranks, dtype=bool)

    def set_alive(self, rank: int, up: bool) -> None:
        self.alive[rank] = up
        if not up and self._back is None:
            self._back = self.env.event()
        if up and self.alive.all() and self._back is not None:
            self._back.succeed()
            self._back = None

    def apply(self, kept: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``kept[rank, layer, expert]`` pairs and ``share[layer, expert, rank]`` placement -> what is
        computed now and where. With every rank up: unchanged."""
        st = self.stats
        total = int(kept.sum())
        st.assignments += total
        if self.alive.all():
            st.kept += total
            return kept, share
        st.faulted_iterations += 1
        st.faulted_assignments += total
        live_share = share * self.alive[None, None, :]
        held = live_share.sum(axis=2)  # [L, E]
        available = held > 0
        if not (kept.sum(axis=0)[~available]).any():  # nothing routed to a missing expert
            st.kept += total
            return kept, _renormalised(live_share, held)
        preference = kept.sum(axis=0).astype(float)  # the iteration's own demand per expert
        decisions = [route_around(kept[r], available, self.policy, preference) for r in range(kept.shape[0])]
        waiting = sum(int(d.waiting.sum()) for d in decisions)
        if waiting:
            # Some pair must wait: the iteration runs once every rank is back, on the routing as drawn.
            self._blocked = True
            st.waiting += total
            st.kept += total
            st.blocked_iterations += 1
            return kept, share
        st.kept += sum(d.kept for d in decisions)
        st.rerouted += sum(d.rerouted for d in decisions)
        return np.stack([d.served for d in decisions]), _renormalised(live_share, held)

    def block(self) -> simpy.Event | None:
        """The event a blocked iteration waits for (every rank back), once per blocked iteration."""
        if not self._blocked:
            return None
        self._blocked = False
        return self._back


def _renormalised(live_share: np.ndarray, held: np.ndarray) -> np.ndarray:
    """A replicated expert's tokens split over its live copies only."""
    return np.divide(live_share, held[:, :, None], out=np.zeros_like(live_share), where=held[:, :, None] > 0)


class ExpertParallelFaultInjector(FaultInjector):
    """The fault schedule on GPUs that are members of expert-parallel replicas of ``group`` GPUs each."""

    def __init__(
        self, *, env: simpy.Environment, replicas: list[Replica], schedule: list[Fault], spec: FaultsSpec,
        profile: HardwareProfile, num_nodes: int, restore_bytes: float, group: int, tp: int,
        finish: Callable[[RequestState, str, str], None],
    ) -> None:
        self.group, self.tp = group, tp
        self.num_gpus = n = group * len(replicas)
        # restore_bytes is one GPU's shard.
        self._init_state(env, replicas, schedule, spec, profile, num_nodes, restore_bytes, finish, n)
        self._gpu_alive = np.ones(n, dtype=bool)
        self.failovers = []
        self._base_slowdown = []
        for rep in replicas:
            fo = Failover(env, rep.planner.ep, spec.expert_failover)
            rep.planner.failover = fo
            rep.routing.alive_ranks = fo.alive
            self.failovers.append(fo)
            self._base_slowdown.append(rep.planner.slowdown.copy())
        env.process(self._run())

    def _where(self, gpu: int) -> tuple[Replica, Failover, int]:
        rep = gpu // self.group
        return self.replicas[rep], self.failovers[rep], (gpu % self.group) // self.tp

    def _rank_gpus(self, gpu: int) -> range:
        first = gpu - gpu % self.tp
        return range(first, first + self.tp)

    def _may_recover(self) -> bool:
        for rep in range(len(self.replicas)):
            gpus = range(rep * self.group, (rep + 1) * self.group)
            if self._never_back(gpus) is False:
                return True
        return False

    def _never_back(self, gpus: range) -> bool:
        """Whether a group with these member positions will never serve again."""
        gone = [self._position_gone(g) for g in gpus]
        return all(gone) or (self.spec.expert_failover == "wait" and any(gone))

    def _set_slowdown(self, gpu: int) -> None:
        rep, _, rank = self._where(gpu)
        factor = max(_product(self._slow[g]) for g in self._rank_gpus(gpu))
        rep.planner.slowdown[rank] = self._base_slowdown[gpu // self.group][rank] * factor

    def _start(self, fault: Fault) -> None:
        gpu = fault.gpu
        if fault.kind == "slow":
            self._slow[gpu].append(fault.value)
            self._set_slowdown(gpu)
            self._log(fault, "start")
            return
        if fault.kind == "link":
            self._link[gpu].append(fault.value)
            self._log(fault, "start", effect="none: expert-parallel experts are resident (no host loads)")
            return
        self._down[gpu] += 1
        if fault.duration_s is None:
            self._unending[gpu] = True
        if self._fail_unplaced(fault):
            return
        gpu = self._position_of[gpu]
        rep, fo, rank = self._where(gpu)
        record = self._open_record(gpu)
        self._gpu_alive[gpu] = False
        fo.set_alive(rank, False)
        first = (gpu // self.group) * self.group
        held: list[RequestState] = []
        if not fo.alive.any() or self._never_back(range(first, first + self.group)):
            held = rep.fail()
        self._log(fault, "start", requests_held=len(held), rank=rank)
        self._after_failure(gpu, record, held)

    def _end(self, fault: Fault) -> None:
        gpu = fault.gpu
        if fault.kind == "slow":
            self._slow[gpu].remove(fault.value)
            self._set_slowdown(gpu)
            self._log(fault, "end")
            return
        if fault.kind == "link":
            self._link[gpu].remove(fault.value)
            self._log(fault, "end")
            return
        self._down[gpu] -= 1
        self._log(fault, "end")
        if self._down[gpu] == 0 and not self._repaired(gpu):
            pos = self._position_of[gpu]
            self.env.process(self._restore(pos, self._epoch[pos]))

    def restore_time(self, gpu: int) -> tuple[float, str]:
        """Seconds to bring back one GPU's shard, and the source used. ``peer``: a live GPU holding the same
        shard, i.e. the same member of another replica (the group's other members hold other experts), on
        the same node (gpu_to_gpu) or another (node_to_node); without one, the host. Or host / storage."""
        nbytes = self.restore_bytes
        source = self.spec.recovery.source
        if source == "storage":
            rec = self.spec.recovery
            return rec.storage_latency_s + nbytes / (rec.storage_gbps * 1e9), "storage"  # type: ignore[operator]
        host_s = float(self.profile.h2d_copy_s(nbytes=nbytes))
        if source == "peer":
            node = self._node(self._phys[gpu])
            peers = [g for g in range(gpu % self.group, self.num_gpus, self.group) if self._gpu_alive[g] and g != gpu]
            if any(self._node(self._phys[p]) == node for p in peers):
                return float(self.profile.gpu_to_gpu_s(nbytes=nbytes)), "peer (gpu_to_gpu)"
            if peers:
                return float(self.profile.node_to_node_s(nbytes=nbytes)), "peer (node_to_node)"
            return host_s, "host (no live peer holds the shard)"
        return host_s, "host"

    def _bring_back(self, gpu: int) -> None:
        """A restored member's experts are available again; its group serves again once it can."""
        self._gpu_alive[gpu] = True
        rep, fo, rank = self._where(gpu)
        if all(self._gpu_alive[g] for g in self._rank_gpus(gpu)):
            fo.set_alive(rank, True)
        first = (gpu // self.group) * self.group
        if not rep.alive and fo.alive.any() and not self._never_back(range(first, first + self.group)):
            rep.restore()

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        total = FailoverStats()
        for fo in self.failovers:
            for name in ("assignments", "kept", "rerouted", "waiting", "blocked_iterations", "wait_s",
                         "faulted_iterations", "faulted_assignments"):
                setattr(total, name, getattr(total, name) + getattr(fo.stats, name))
        out["expert_failover"] = {"policy": self.spec.expert_failover, **total.as_dict()}
        return out


__all__ = ["ExpertParallelFaultInjector", "Failover", "FailoverStats"]
