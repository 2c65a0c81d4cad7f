"""Faults during a run: one SimPy process applies the schedule (sim/faults.py) to the replicas.

Per GPU, faults compose: the GPU is down while any failure covering it is active, its compute is
slowed by the product of the active slowdown factors, and its host-to-device link keeps the product
of the active bandwidth fractions. When the last failure covering a GPU ends, the GPU restores its
weights and experts (bytes / bandwidth of the recovery source) and only then serves again; a failure
during the restore starts it over once that failure ends.

Spares (``faults.spare_gpus``): idle GPUs of the same profile, numbered after the serving ones
(``num_gpus`` .. ``num_gpus + spare_gpus - 1``; spare k sits on node k mod num_nodes, which only
matters for a peer restore). Faults name the physical GPUs that serve at the start; each serving
position (a replica, or an EP member) is held by one physical GPU. When a GPU fails and a spare is
free, the spare takes its position at once and restores the position's weights (bytes / bandwidth
of the recovery source, starting at the failure, not after the repair); the failed GPU, once
repaired, joins the spare pool (and goes at once to a position still waiting for its own repair).
Without a free spare, the position waits for its GPU's repair as before. Simplifications: a spare,
in the pool or serving, never fails (no fault names it); ``gpu_slow`` and ``link_degrade`` act on
the serving position with that index.

The injector also routes requests (``dispatch``): to the live replica with the fewest outstanding
requests, as the fault-free engine does; with no replica live, a request waits for one to recover or
is rejected (``no_replica``); a request that no replica will ever serve again is rejected or failed,
so every request ends with a final status."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import simpy

from sim.engine.replica import Replica, RequestState
from sim.faults import Fault, FaultsSpec, node_of_gpu
from sim.profile import HardwareProfile


@dataclass
class RecoveryRecord:
    """One outage of one GPU: failed, restore started, back in service (None: never, in this run)."""

    gpu: int
    failed_at_s: float
    restore_started_at_s: float | None = None
    restored_at_s: float | None = None
    restore_s: float | None = None
    restore_bytes: float = 0.0
    source: str = ""
    spare_gpu: int | None = None  # the spare that took the position (None: the GPU restored itself)
    requeued: int = 0
    failed_requests: int = 0

    @property
    def time_to_recovery_s(self) -> float | None:
        return None if self.restored_at_s is None else self.restored_at_s - self.failed_at_s


class FaultInjector:
    """Applies a fault schedule to the replicas and routes requests around failed ones."""

    def __init__(
        self,
        *,
        env: simpy.Environment,
        replicas: list[Replica],
        schedule: list[Fault],
        spec: FaultsSpec,
        profile: HardwareProfile,
        num_nodes: int,
        restore_bytes: float,
        finish: Callable[[RequestState, str, str], None],
    ) -> None:
        self._init_state(env, replicas, schedule, spec, profile, num_nodes, restore_bytes, finish, len(replicas))
        self._base_load_s = [r.planner.expert_load_s for r in replicas]
        self._base_profile = [r.profile for r in replicas]
        env.process(self._run())

    def _init_state(
        self, env: simpy.Environment, replicas: list[Replica], schedule: list[Fault], spec: FaultsSpec,
        profile: HardwareProfile, num_nodes: int, restore_bytes: float,
        finish: Callable[[RequestState, str, str], None], num_positions: int,
    ) -> None:
        """The state every injector keeps, for ``num_positions`` GPUs (one per replica here; one per EP member
        in ``sim.engine.ep_faults``)."""
        self.env = env
        self.replicas = replicas
        self.schedule = schedule
        self.spec = spec
        self.profile = profile
        self.num_nodes = num_nodes
        self.restore_bytes = restore_bytes
        self.finish = finish  # (request, status, reason): ends a request the engine will not serve
        self.pending: list[RequestState] = []  # waiting for any replica to come back
        self.events: list[dict[str, Any]] = []
        self.recoveries: list[RecoveryRecord] = []
        n = num_positions
        self._slow: list[list[float]] = [[] for _ in range(n)]  # active slowdown factors per GPU
        self._link: list[list[float]] = [[] for _ in range(n)]  # active bandwidth fractions per GPU
        self._epoch = [0] * n  # per position, bumped by every failure: a restore from an older epoch is stale
        self._open: dict[int, RecoveryRecord] = {}
        self._init_spares(n)

    # ---------------------------------------------------------------- routing

    def dispatch(self, req: RequestState) -> None:
        live = [r for r in self.replicas if r.alive]
        if live:
            min(live, key=lambda r: (r.outstanding, r.index)).submit(req)
        elif not self._may_recover():
            self._give_up(req)
        elif self.spec.no_replica == "reject" and req.generated == 0 and req.admitted_at_s != req.admitted_at_s:
            self.finish(req, "rejected", "no_replica_alive")
        elif self.spec.no_replica == "reject":
            self.finish(req, "failed", "gpu_failed")
        else:
            req.replica = -1
            self.pending.append(req)

    def _may_recover(self) -> bool:
        return any(not self._position_gone(pos) for pos in range(len(self._phys)))

    # ---------------------------------------------------------------- spares

    def _init_spares(self, positions: int) -> None:
        """Physical GPUs 0..positions-1 hold the positions; spares follow them, idle in the pool."""
        total = positions + self.spec.spare_gpus
        self._num_positions = positions
        self._down = [0] * total  # active failures per physical GPU
        self._unending = [False] * total  # a failure that never ends covers this physical GPU
        self._phys = list(range(positions))  # position -> the physical GPU holding it
        self._position_of: dict[int, int] = {p: p for p in range(positions)}
        self._pool: list[int] = list(range(positions, total))

    def _node(self, phys: int) -> int:
        if phys < self._num_positions:
            return node_of_gpu(phys, self._num_positions, self.num_nodes)
        return (phys - self._num_positions) % self.num_nodes

    def _spare_coming(self) -> bool:
        """A spare is free now or a GPU outside every position will be repaired into the pool."""
        return bool(self._pool) or any(
            not self._unending[p] for p in range(len(self._down)) if p not in self._position_of)

    def _position_gone(self, pos: int) -> bool:
        """The position will never serve again: its GPU never returns and no spare will come."""
        return self._unending[self._phys[pos]] and not self._spare_coming()

    def _fail_unplaced(self, fault: Fault) -> bool:
        """A failure of a GPU that holds no position (in the pool, or replaced and under repair): it only
        leaves the pool. Returns True when handled."""
        if fault.gpu in self._position_of:
            return False
        if fault.gpu in self._pool:
            self._pool.remove(fault.gpu)
        self._log(fault, "start", requests_held=0, position=None)
        return True

    def _take_spare(self, pos: int) -> None:
        """A free spare takes a position whose GPU is down, and starts restoring it now."""
        old = self._phys[pos]
        if not self._pool or self._down[old] == 0:
            return
        spare = self._pool.pop(0)
        del self._position_of[old]
        self._phys[pos] = spare
        self._position_of[spare] = pos
        self._epoch[pos] += 1
        self._open[pos].spare_gpu = spare
        self.events.append({"at_s": self.env.now, "gpu": pos, "fault": "fail", "event": "spare_in", "value": spare,
                            "origin": f"GPU {old} replaced by spare GPU {spare}"})
        self.env.process(self._restore(pos, self._epoch[pos]))

    def _repaired(self, phys: int) -> bool:
        """The last failure of a physical GPU ended. One outside every position joins the spare pool (and
        goes at once to the first position still waiting for its own GPU); returns False when the GPU
        holds a position, which it then restores itself."""
        if phys in self._position_of:
            return False
        self._pool.append(phys)
        self.events.append({"at_s": self.env.now, "gpu": phys, "fault": "fail", "event": "to_spare_pool",
                            "value": len(self._pool), "origin": "repaired"})
        for pos in list(self._open):
            if self._down[self._phys[pos]] > 0:
                self._take_spare(pos)
                break
        return True

    def _give_up(self, req: RequestState) -> None:
        started = req.generated > 0 or req.admitted_at_s == req.admitted_at_s
        self.finish(req, "failed" if started else "rejected", "gpu_failed" if started else "no_replica_alive")

    # ---------------------------------------------------------------- the schedule

    def _run(self):
        env = self.env
        for fault in self.schedule:
            if fault.at_s > env.now:
                yield env.timeout(fault.at_s - env.now)
            self._start(fault)
            if fault.duration_s is not None:
                env.process(self._end_after(fault))

    def _end_after(self, fault: Fault):
        yield self.env.timeout(fault.duration_s)
        self._end(fault)

    def _log(self, fault: Fault, what: str, **extra: Any) -> None:
        self.events.append({"at_s": self.env.now, "gpu": fault.gpu, "fault": fault.kind, "event": what,
                            "value": fault.value, "origin": fault.origin, **extra})

    def _start(self, fault: Fault) -> None:
        gpu = fault.gpu
        replica = self.replicas[gpu]
        if fault.kind == "slow":
            self._slow[gpu].append(fault.value)
            replica.slowdown = _product(self._slow[gpu])
            self._log(fault, "start")
        elif fault.kind == "link":
            self._link[gpu].append(fault.value)
            self._apply_link(gpu)
            self._log(fault, "start")
        else:
            self._down[gpu] += 1
            if fault.duration_s is None:
                self._unending[gpu] = True
            if self._fail_unplaced(fault):
                return
            gpu = self._position_of[gpu]
            replica = self.replicas[gpu]
            record = self._open_record(gpu)
            held = replica.fail()
            self._log(fault, "start", requests_held=len(held))
            self._after_failure(gpu, record, held)

    def _open_record(self, gpu: int) -> RecoveryRecord:
        """The recovery record of a position that has just failed (a new epoch: older restores are stale)."""
        self._epoch[gpu] += 1
        record = self._open.get(gpu)
        if record is None:
            record = RecoveryRecord(gpu=gpu, failed_at_s=self.env.now)
            self._open[gpu] = record
            self.recoveries.append(record)
        else:  # failed again while restoring: the restore starts over when this failure ends
            record.restore_started_at_s = None
        return record

    def _after_failure(self, gpu: int, record: RecoveryRecord, held: list[RequestState]) -> None:
        """The requests a failure took off a GPU are failed or re-queued by policy; a spare takes the position
        if one is free; and when nothing can ever serve again, the waiting requests end."""
        for req in held:
            if self.spec.in_flight == "fail":
                record.failed_requests += 1
                self.finish(req, "failed", "gpu_failed")
            else:
                record.requeued += 1
                self.dispatch(req)
        self._take_spare(gpu)
        if not self._may_recover():  # every GPU is gone for good: nothing will serve the waiting
            waiting, self.pending = self.pending, []
            for req in waiting:
                self._give_up(req)

    def _end(self, fault: Fault) -> None:
        gpu = fault.gpu
        replica = self.replicas[gpu]
        if fault.kind == "slow":
            self._slow[gpu].remove(fault.value)
            replica.slowdown = _product(self._slow[gpu])
            self._log(fault, "end")
            return
        if fault.kind == "link":
            self._link[gpu].remove(fault.value)
            self._apply_link(gpu)
            self._log(fault, "end")
            return
        self._down[gpu] -= 1
        self._log(fault, "end")
        if self._down[gpu] == 0 and not self._repaired(gpu):
            pos = self._position_of[gpu]
            self.env.process(self._restore(pos, self._epoch[pos]))

    def _apply_link(self, gpu: int) -> None:
        """The host-to-device link at the product of the active fractions: expert loads and swaps slow."""
        replica = self.replicas[gpu]
        base = self._base_profile[gpu]
        fraction = _product(self._link[gpu])
        if fraction == 1.0:
            replica.profile = base
            replica.planner.expert_load_s = self._base_load_s[gpu]
            return
        degraded = base.with_links(host_to_device_gbps=base.links.host_to_device.bandwidth_gbps * fraction)
        replica.profile = degraded
        replica.planner.expert_load_s = float(degraded.h2d_copy_s(nbytes=replica.planner.expert_bytes, pinned=True))

    # ---------------------------------------------------------------- recovery

    def restore_time(self, gpu: int) -> tuple[float, str]:
        """Seconds to bring the GPU's weights and experts back, and the source used."""
        nbytes = self.restore_bytes
        source = self.spec.recovery.source
        if source == "storage":
            rec = self.spec.recovery
            return rec.storage_latency_s + nbytes / (rec.storage_gbps * 1e9), "storage"  # type: ignore[operator]
        if source == "peer":
            node = self._node(self._phys[gpu])
            peers = [r.index for r in self.replicas if r.alive and r.index != gpu]
            if any(self._node(self._phys[p]) == node for p in peers):
                return float(self.profile.gpu_to_gpu_s(nbytes=nbytes)), "peer (gpu_to_gpu)"
            if peers:
                return float(self.profile.node_to_node_s(nbytes=nbytes)), "peer (node_to_node)"
            return float(self.replicas[gpu].profile.h2d_copy_s(nbytes=nbytes)), "host (no live peer)"
        return float(self.replicas[gpu].profile.h2d_copy_s(nbytes=nbytes)), "host"

    def _restore(self, gpu: int, epoch: int):
        record = self._open[gpu]
        seconds, source = self.restore_time(gpu)
        record.restore_started_at_s = self.env.now
        record.restore_s = seconds
        record.source = source
        yield self.env.timeout(seconds)
        if self._epoch[gpu] != epoch:
            return  # failed again while restoring
        record.restored_at_s = self.env.now
        record.restore_bytes += self.restore_bytes
        del self._open[gpu]
        self._bring_back(gpu)
        self.events.append({"at_s": self.env.now, "gpu": gpu, "fault": "fail", "event": "restored", "value": seconds,
                            "origin": source})
        waiting, self.pending = self.pending, []
        for req in waiting:
            self.dispatch(req)

    def _bring_back(self, gpu: int) -> None:
        """A restored position serves again (the EP injector brings back a group member instead)."""
        self.replicas[gpu].restore()

    # ---------------------------------------------------------------- results

    def summary(self) -> dict[str, Any]:
        recoveries = []
        for r in self.recoveries:
            row = asdict(r)
            row["time_to_recovery_s"] = r.time_to_recovery_s
            recoveries.append(row)
        done = [r.time_to_recovery_s for r in self.recoveries if r.time_to_recovery_s is not None]
        return {
            "policy": {"in_flight": self.spec.in_flight, "no_replica": self.spec.no_replica,
                       "recovery_source": self.spec.recovery.source},
            "restore_bytes_per_gpu": self.restore_bytes,
            "spare_gpus": self.spec.spare_gpus,
            "spares_used": sum(1 for r in self.recoveries if r.spare_gpu is not None),
            "spare_pool_at_end": list(self._pool),
            "events": self.events,
            "recoveries": recoveries,
            "outages": len(self.recoveries),
            "unrecovered": sum(1 for r in self.recoveries if r.restored_at_s is None),
            "time_to_recovery_max_s": max(done) if done else None,
            "bytes_moved_for_recovery": float(sum(r.restore_bytes for r in self.recoveries)),
            "requeued": sum(r.requeued for r in self.recoveries),
            "failed_requests": sum(r.failed_requests for r in self.recoveries),
        }


def _product(values: list[float]) -> float:
    out = 1.0
    for v in values:
        out *= v
    return out


__all__ = ["FaultInjector", "RecoveryRecord"]
