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
from typing import Any

import numpy as np
import torch

from sim.policies.cache import ExpertCache


@dataclass(slots=True)
class CopyJob:
    """One expert copy: issued by the compute thread, run in FIFO order by the copy thread (CPU) or on the
    copy stream (CUDA, ``CudaCopyEngine``: ``end`` is its event; its times are known once it has finished)."""

    key: int
    dst: torch.Tensor
    src: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    queued_at_s: float = 0.0
    started_at_s: float = 0.0
    finished_at_s: float = 0.0
    start: Any = None  # CUDA events around the copy on the copy stream
    end: Any = None

    def wait(self) -> None:
        """Block the compute thread until the copy has finished."""
        if self.end is None:
            self.done.wait()
            return
        self.end.synchronize()  # pragma: no cover - needs a GPU
        if not self.done.is_set():  # pragma: no cover
            # The copy's own duration from its events; it started when queued (the GPU's copy engine has no
            # thread to wake, so the runtime's dispatch time is 0 on CUDA).
            self.started_at_s = self.queued_at_s
            self.finished_at_s = self.queued_at_s + self.start.elapsed_time(self.end) * 1e-3
            self.done.set()


class CopyEngine:
    """One thread copying experts one at a time in FIFO order (the copy engine of the simulator)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[CopyJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="expert-copy", daemon=True)
        self._thread.start()

    def submit(self, job: CopyJob) -> CopyJob:
        job.queued_at_s = time.perf_counter()
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        # One thread per copy, as the calibrated host_copy was measured (threads=1): a copy must not take
        # the compute thread's core for a second OpenMP worker.
        torch.set_num_threads(1)
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


class CudaCopyEngine:  # pragma: no cover - needs a GPU
    """The copy engine on CUDA: every copy is queued on one dedicated stream (FIFO, as the simulator's copy
    engine) from pinned host memory, with an event the compute thread waits on (``CopyJob.wait``)."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()

    def submit(self, job: CopyJob) -> CopyJob:
        job.queued_at_s = time.perf_counter()
        job.start, job.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            job.start.record(self.stream)
            job.dst.copy_(job.src, non_blocking=True)
            job.end.record(self.stream)
        return job

    def close(self) -> None:
        self.stream.synchronize()


@dataclass(slots=True)
class LayerAccess:
    """What one MoE layer of one iteration found: experts ready now, prefetched experts (hits whose load
    this iteration issued, maybe still in flight) and misses, each with its copy job."""

    hits: list[int]  # expert ids, resident and loaded before this iteration: run back to back
    misses: list[tuple[int, CopyJob]]  # expert id and its load, in copy (FIFO) order
    bypassed: int = 0
    prefetched: list[tuple[int, CopyJob]] = field(default_factory=list)  # in copy (FIFO) order

    @property
    def num_hits(self) -> int:
        return len(self.hits) + len(self.prefetched)


class ExpertStore:
    """Host pool + slots + ExpertCache decisions + the copy thread.

    With ``prefetch="next_layer"`` the store also makes the simulator's next-layer prefetch decisions
    (``sim.policies.next_layer``, the functions ``IterationPlanner`` calls): at the iteration start for
    the first MoE layer, then after each layer's gate for the next one, behind that layer's misses on
    the copy thread, so the prefetch copies run while the layer's experts compute."""

    def __init__(self, host_experts: torch.Tensor, cache: ExpertCache, *, num_experts: int,
                 prefetch: str = "none", prefetch_predictor: str = "oracle", prefetch_max_experts: int = 2,
                 device: str = "cpu") -> None:
        self.host = host_experts
        self.cache = cache
        self.num_experts = num_experts
        self.prefetching = prefetch == "next_layer"
        self.prefetch_predictor = prefetch_predictor
        self.prefetch_max_experts = prefetch_max_experts
        num_layers = len(cache.resident) // num_experts
        self.num_layers = num_layers
        # The 'frequency' predictor's statistics: iterations that used each (layer, expert), as the planner keeps them.
        self.use_counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._prefetched: dict[int, CopyJob] = {}  # expert key -> its prefetch load issued in this iteration
        self._jobs: list[CopyJob] = []  # every load of this iteration
        self.prefetches = 0
        self.prefetch_hits = 0
        numel = host_experts.shape[1]
        capacity = cache.capacity_experts
        self.slots = torch.empty(capacity, numel, dtype=host_experts.dtype, device=device)
        # A miss with no evictable slot streams through a staging buffer (one per expert of a layer).
        self.staging = torch.empty(num_experts, numel, dtype=host_experts.dtype, device=device)
        self.slot_of = np.full(len(cache.resident), -1, dtype=np.int64)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        # Model loading fills the slots the cache starts with (not timed, as in the simulator).
        for key in np.flatnonzero(cache.resident).tolist():
            slot = self._free.pop()
            self.slot_of[key] = slot
            self.slots[slot].copy_(host_experts[key])
        self._pinned = np.zeros(len(cache.resident), dtype=bool)
        self._tick = 0
        self._counts: np.ndarray | None = None
        self.copies: Any = CudaCopyEngine() if device != "cpu" else CopyEngine()
        self.hits = 0
        self.misses = 0
        self.bypassed = 0

    def weights(self, key: int, job: CopyJob | None = None) -> torch.Tensor:
        if job is not None:
            return job.dst
        return self.slots[int(self.slot_of[key])]

    def begin_iteration(self, counts: np.ndarray | None = None) -> None:
        """Start an iteration; ``counts[layer, expert]`` (tokens routed) is what the 'oracle' predictor
        knows in advance (the runtime has it only when its routing is given, see ``Runtime``)."""
        self._prefetched = {}
        self._jobs = []
        self._counts = counts
        if self.prefetching:
            # The first MoE layer has no predecessor to hide its loads behind: start at once.
            self._prefetch(0)

    def end_iteration(self, used: np.ndarray) -> float:
        """Wait for every load still in flight (a prefetch holds the iteration open, as in the simulator's
        ``time_plan``), record ``used[layer, expert]`` for the 'frequency' predictor; return the seconds waited."""
        t0 = time.perf_counter()
        for job in self._jobs:
            job.wait()
        waited = time.perf_counter() - t0
        self.use_counts += used
        return waited

    def copy_seconds(self) -> float:
        """Copy-thread busy time of this iteration's loads (call after ``end_iteration``)."""
        return sum(job.finished_at_s - job.started_at_s for job in self._jobs)

    def dispatch_seconds(self) -> float:
        """Time this iteration's loads sat queued while the copy thread was free (waking up, taking the GIL,
        being scheduled): copy-engine time the simulator's FIFO copy engine does not have (call after
        ``end_iteration``). The loads of earlier iterations all finished before this one's were queued."""
        seconds, free_at = 0.0, 0.0
        for job in self._jobs:
            seconds += max(0.0, job.started_at_s - max(job.queued_at_s, free_at))
            free_at = job.finished_at_s
        return seconds

    def _slot_for(self, key: int) -> torch.Tensor:
        slot = self._free.pop()
        self.slot_of[key] = slot
        return self.slots[slot]

    def _release_evicted(self, before: np.ndarray) -> None:
        for key in np.flatnonzero(before & ~self.cache.resident).tolist():
            self._free.append(int(self.slot_of[key]))
            self.slot_of[key] = -1

    def _load(self, key: int, dst: torch.Tensor) -> CopyJob:
        job = self.copies.submit(CopyJob(key, dst, self.host[key]))
        self._jobs.append(job)
        return job

    def _prefetch(self, target: int) -> None:
        """``IterationPlanner._prefetch``: reserve slots for layer ``target``'s predicted experts and queue their loads."""
        from sim.policies.next_layer import predict_next_layer, reserve_prefetch

        if self.prefetch_predictor == "oracle" and self._counts is None:
            raise RuntimeError("the oracle prefetch predictor needs the iteration's routing in advance")
        layer_counts = self._counts[target] if self._counts is not None else np.zeros(self.num_experts, np.int64)
        keys = target * self.num_experts + predict_next_layer(
            self.prefetch_predictor, layer_counts, self.use_counts[target], self.prefetch_max_experts)
        before = self.cache.resident.copy()
        load = reserve_prefetch(self.cache, self._pinned, keys)
        self._release_evicted(before)
        for key in load.tolist():
            self._prefetched[key] = self._load(key, self._slot_for(key))
        self.prefetches += len(load)

    def access(self, layer: int, experts: list[int]) -> LayerAccess:
        """The cache decisions of one MoE layer whose gate chose ``experts`` (ascending ids).

        Mirrors ``IterationPlanner._plan_layers`` step for step; loads are issued at once (after the gate),
        then the next layer's prefetches."""
        cache = self.cache
        base = layer * self.num_experts
        keys = [base + e for e in experts]
        self._tick += 1
        resident = cache.resident
        hits: list[int] = []
        prefetched: list[tuple[int, CopyJob]] = []
        for e, k in zip(experts, keys):
            if resident[k]:
                job = self._prefetched.get(k)
                if job is None:
                    hits.append(e)
                else:
                    prefetched.append((e, job))
        prefetched.sort(key=lambda item: self._jobs.index(item[1]))  # the order their loads finish (FIFO)
        miss_keys = [k for k in keys if not resident[k]]
        self.hits += len(hits) + len(prefetched)
        self.prefetch_hits += len(prefetched)
        self._pinned[keys] = True
        misses: list[tuple[int, CopyJob]] = []
        bypassed = 0
        if miss_keys:
            self.misses += len(miss_keys)
            arr = np.asarray(miss_keys, dtype=np.int64)
            before = resident.copy()
            placed = cache.insert_many(arr, self._pinned)
            self._release_evicted(before)
            for i, key in enumerate(miss_keys):
                if i < placed:
                    dst = self._slot_for(key)
                else:
                    bypassed += 1
                    dst = self.staging[i % self.num_experts]
                misses.append((key - base, self._load(key, dst)))
        self.bypassed += bypassed
        if self.prefetching and layer + 1 < self.num_layers:
            self._prefetch(layer + 1)
        cache.touch(np.asarray(keys, dtype=np.int64), self._tick)
        self._pinned[base : base + self.num_experts] = False
        return LayerAccess(hits=hits, misses=misses, bypassed=bypassed, prefetched=prefetched)

    def close(self) -> None:
        self.copies.close()
