"""Experts in a host pool, a bounded device-side expert cache of fixed slots, and the copy thread.

The slots are one pre-allocated buffer ``[capacity, expert_numel]`` (on the CPU a separate host
buffer: a copy into it is a real memory copy, the CPU analogue of a host->device transfer). Which
experts are resident, which are evicted and when a miss bypasses the cache is decided by
``sim.policies.cache.ExpertCache``, called in exactly the order ``sim.engine.iteration.IterationPlanner``
calls it (pin the layer's chosen experts, ``insert_many`` the misses, ``touch`` the layer's keys, unpin),
so for the same routing the runtime and the simulator make the same decisions.

Lifecycle of a slot: empty -> loading (a copy job is queued or running on the copy thread) ->
resident. The compute thread waits on a job's event before it runs that expert."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sim.policies.cache import ExpertCache


@dataclass(slots=True)
class CopyJob:
    """One expert copy: issued by the compute thread, run in FIFO order by the copy thread."""

    key: int
    dst: torch.Tensor
    src: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    started_at_s: float = 0.0
    finished_at_s: float = 0.0


class CopyEngine:
    """One thread copying experts one at a time in FIFO order (the copy engine of the simulator)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[CopyJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="expert-copy", daemon=True)
        self._thread.start()

    def submit(self, job: CopyJob) -> CopyJob:
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.started_at_s = time.perf_counter()
            job.dst.copy_(job.src)  # torch releases the GIL here: the copy overlaps compute
            job.finished_at_s = time.perf_counter()
            job.done.set()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


@dataclass(slots=True)
class LayerAccess:
    """What one MoE layer of one iteration found: experts ready now, and misses with their copy jobs."""

    hits: list[int]  # expert ids, resident: run back to back
    misses: list[tuple[int, CopyJob]]  # expert id and its load, in copy (FIFO) order
    bypassed: int = 0


class ExpertStore:
    """Host pool + slots + ExpertCache decisions + the copy thread."""

    def __init__(self, host_experts: torch.Tensor, cache: ExpertCache, *, num_experts: int) -> None:
        self.host = host_experts
        self.cache = cache
        self.num_experts = num_experts
        numel = host_experts.shape[1]
        capacity = cache.capacity_experts
        self.slots = torch.empty(capacity, numel, dtype=host_experts.dtype)
        # A miss with no evictable slot streams through a staging buffer (one per expert of a layer).
        self.staging = torch.empty(num_experts, numel, dtype=host_experts.dtype)
        self.slot_of = np.full(len(cache.resident), -1, dtype=np.int64)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        # Model loading fills the slots the cache starts with (not timed, as in the simulator).
        for key in np.flatnonzero(cache.resident).tolist():
            slot = self._free.pop()
            self.slot_of[key] = slot
            self.slots[slot].copy_(host_experts[key])
        self._pinned = np.zeros(len(cache.resident), dtype=bool)
        self._tick = 0
        self.copies = CopyEngine()
        self.hits = 0
        self.misses = 0
        self.bypassed = 0

    def weights(self, key: int, job: CopyJob | None = None) -> torch.Tensor:
        if job is not None:
            return job.dst
        return self.slots[int(self.slot_of[key])]

    def access(self, layer: int, experts: list[int]) -> LayerAccess:
        """The cache decisions of one MoE layer whose gate chose ``experts`` (ascending ids).

        Mirrors ``IterationPlanner._plan_layers`` step for step; loads are issued at once (after the gate)."""
        cache = self.cache
        base = layer * self.num_experts
        keys = [base + e for e in experts]
        self._tick += 1
        resident = cache.resident
        hits = [e for e, k in zip(experts, keys) if resident[k]]
        miss_keys = [k for k in keys if not resident[k]]
        self.hits += len(hits)
        self._pinned[keys] = True
        misses: list[tuple[int, CopyJob]] = []
        bypassed = 0
        if miss_keys:
            self.misses += len(miss_keys)
            arr = np.asarray(miss_keys, dtype=np.int64)
            before = resident.copy()
            placed = cache.insert_many(arr, self._pinned)
            evicted = np.flatnonzero(before & ~cache.resident)
            for key in evicted.tolist():
                self._free.append(int(self.slot_of[key]))
                self.slot_of[key] = -1
            for i, key in enumerate(miss_keys):
                if i < placed:
                    slot = self._free.pop()
                    self.slot_of[key] = slot
                    dst = self.slots[slot]
                else:
                    bypassed += 1
                    dst = self.staging[i % self.num_experts]
                misses.append((key - base, self.copies.submit(CopyJob(key, dst, self.host[key]))))
        self.bypassed += bypassed
        cache.touch(np.asarray(keys, dtype=np.int64), self._tick)
        self._pinned[base : base + self.num_experts] = False
        return LayerAccess(hits=hits, misses=misses, bypassed=bypassed)

    def close(self) -> None:
        self.copies.close()
