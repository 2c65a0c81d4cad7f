"""One serving replica (one GPU): continuous batching, KV admission and preemption, iterations.

The replica is one SimPy process. Each loop it forms a batch (decodes first, then prefill chunks,
then new admissions, vLLM/Sarathi style), plans the iteration (``sim.engine.iteration``), waits for
its duration, and then advances every sequence in the batch. SimPy events are spent only on what
interacts: arrivals, iteration boundaries and the idle wait."""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simpy

from sim.engine.iteration import BatchShape, IterationPlanner, time_plan
from sim.engine.memory import MemoryBudget
from sim.policies.scheduler import SchedulerPolicy
from sim.profile import HardwareProfile
from sim.workload.routing import RoutingSource


class RequestState:
    """A request's life inside the engine.

    waiting -> running (prefill chunks, then one token per decode iteration) -> completed;
    a running request may be preempted back to waiting (its KV dropped or swapped out);
    a waiting request may be dropped (queue timeout) or rejected at arrival (never fits);
    a request on a GPU that fails returns to waiting on another (KV lost) or is failed (gpu_failed)."""

    __slots__ = (
        "request_id", "arrival_s", "prompt_tokens", "output_tokens", "task", "replica",
        "context", "generated", "prefill_target", "blocks", "swapped", "preemptions",
        "admitted_at_s", "first_token_at_s", "last_token_at_s", "finished_at_s", "status", "reason",
        "max_tbt_s",
    )

    def __init__(self, request_id: int, arrival_s: float, prompt: int, output: int, task: str | None) -> None:
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt
        self.output_tokens = output
        self.task = task
        self.replica = -1
        self.context = 0  # tokens whose KV is in the cache
        self.generated = 0  # output tokens produced so far
        self.prefill_target = prompt  # context to reach before the next token is sampled
        self.blocks = 0
        self.swapped = False
        self.preemptions = 0
        self.admitted_at_s = float("nan")
        self.first_token_at_s = float("nan")
        self.last_token_at_s = float("nan")
        self.finished_at_s = float("nan")
        self.status = "waiting"
        self.reason = ""
        self.max_tbt_s = 0.0

    @property
    def in_prefill(self) -> bool:
        return self.context < self.prefill_target


@dataclass(frozen=True, slots=True)
class IterationRecord:
    replica: int
    started_at_s: float
    duration_s: float
    num_prefill_seqs: int
    num_decode_seqs: int
    num_tokens: int
    expert_hits: int
    expert_misses: int
    prefetch_hits: int
    expert_loads: int
    stall_s: float
    compute_busy_s: float
    copy_busy_s: float
    kv_blocks_used: int
    experts_resident: int
    preemptions: int


class Replica:
    """A GPU serving requests with continuous batching."""

    def __init__(
        self,
        *,
        index: int,
        env: simpy.Environment,
        budget: MemoryBudget,
        planner: IterationPlanner,
        routing: RoutingSource,
        scheduler: SchedulerPolicy,
        profile: HardwareProfile,
        max_num_seqs: int,
        max_batch_tokens: int,
        chunked_prefill: bool,
        preemption: str,
        queue_timeout_s: float | None,
        on_finish: Callable[[RequestState], None],
        tbt_samples: array,
    ) -> None:
        self.index = index
        self.env = env
        self.budget = budget
        self.planner = planner
        self.routing = routing
        self.scheduler = scheduler
        self.profile = profile
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.chunked_prefill = chunked_prefill
        self.preemption = preemption
        self.queue_timeout_s = queue_timeout_s
        self.on_finish = on_finish
        self.tbt_samples = tbt_samples
        self.free_blocks = budget.kv_blocks
        self.waiting: list[tuple[tuple, RequestState]] = []
        self.running: list[RequestState] = []
        self.iterations: list[IterationRecord] = []
        self.accesses: list[np.ndarray] = []
        self.outstanding = 0
        self.preemptions = 0
        self.swap_bytes = 0.0
        self._wakeup: simpy.Event | None = None
        # Faults (sim/engine/faults.py): a failed replica serves nothing until restore(); a slowed one
        # multiplies its compute ops by ``slowdown``.
        self.alive = True
        self.slowdown = 1.0
        self._restored: simpy.Event | None = None
        # Algorithm-1 admission (eMoE's SLO scheduler): a policy with admit() may hold a new request back.
        self.admit = getattr(scheduler, "admit", None)
        self.held = 0  # admissions the scheduler refused (counted per refusal)
        # An expert-parallel planner with faults may hold an iteration until a failed rank is restored.
        self._failover_block = getattr(planner, "failover_block", None)
        self.process = env.process(self._lifecycle())

    # ---------------------------------------------------------------- arrivals

    def submit(self, req: RequestState) -> None:
        req.replica = self.index
        self.outstanding += 1
        heapq.heappush(self.waiting, (self.scheduler.priority(req), req))
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    # ---------------------------------------------------------------- batching

    def _grow(self, req: RequestState, tokens: int) -> bool:
        """Allocate the KV blocks ``req`` needs to hold ``tokens`` more tokens."""
        need = self.budget.blocks_for(req.context + tokens) - req.blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        req.blocks += need
        return True

    def _release(self, req: RequestState) -> None:
        self.free_blocks += req.blocks
        req.blocks = 0

    def preempt(self, victim: RequestState) -> float:
        """Take ``victim`` off the GPU; returns bytes swapped out (0 when recomputing)."""
        self.running.remove(victim)
        self.preemptions += 1
        victim.preemptions += 1
        swapped_bytes = 0.0
        if self.preemption == "swap":
            swapped_bytes = victim.blocks * self.budget.kv_block_bytes
            victim.swapped = True
        else:
            victim.context = 0
            victim.prefill_target = victim.prompt_tokens + victim.generated
        self._release(victim)
        victim.status = "waiting"
        heapq.heappush(self.waiting, (self.scheduler.priority(victim), victim))
        return swapped_bytes

    def drop_timed_out(self, now: float) -> None:
        if self.queue_timeout_s is None:
            return
        kept = []
        for key, req in self.waiting:
            if req.generated == 0 and now - req.arrival_s > self.queue_timeout_s:
                self._finish(req, "dropped", "queue_timeout", now)
            else:
                kept.append((key, req))
        if len(kept) != len(self.waiting):
            heapq.heapify(kept)
            self.waiting = kept

    def form_batch(self) -> tuple[list[tuple[RequestState, int]], float, float]:
        """Pick this iteration's work: [(request, new tokens)], swap-out bytes, swap-in bytes."""
        budget = self.max_batch_tokens
        batch: list[tuple[RequestState, int]] = []
        swap_out = 0.0
        swap_in = 0.0
        # 1. Running decodes, each needing one token and maybe one more KV block.
        preempted: set[int] = set()
        scheduled: set[int] = set()
        for req in list(self.running):
            if req.request_id in preempted or req.context < req.prefill_target:
                continue
            if budget < 1 or len(batch) >= self.max_num_seqs:
                break
            step_tokens = self._decode_step_tokens(req, budget)
            while not self._grow(req, step_tokens):
                # Out of KV blocks: preempt a request not yet in this batch (possibly this one).
                candidates = [r for r in self.running if r.request_id not in scheduled]
                victim = candidates[self.scheduler.choose_victim(candidates)]
                swap_out += self.preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            if req.request_id not in preempted:
                batch.append((req, 1))
                scheduled.add(req.request_id)
                budget -= step_tokens
        # 2. Running prefills (chunked), then 3. admissions in the scheduler's order.
        for req in [r for r in self.running if r.in_prefill]:
            if budget < 1 or len(batch) >= self.max_num_seqs:
                break
            chunk = self._chunk(req, budget)
            if chunk and self._grow(req, chunk):
                batch.append((req, chunk))
                budget -= chunk
        held: list[tuple[tuple, RequestState]] = []
        while self.waiting and budget >= 1 and len(batch) < self.max_num_seqs:
            req = self.waiting[0][1]
            if (self.admit is not None and self.running and not req.swapped and req.generated == 0
                    and not self.admit(req, self.running, self.env.now)):
                held.append(heapq.heappop(self.waiting))  # waits; later requests may still be admitted
                self.held += 1
                continue
            if req.swapped:
                if self.budget.blocks_for(req.context) > self.free_blocks:
                    break
                heapq.heappop(self.waiting)
                req.swapped = False
                need = self.budget.blocks_for(req.context)
                self.free_blocks -= need
                req.blocks = need
                swap_in += need * self.budget.kv_block_bytes
                self.running.append(req)
                req.status = "running"
                continue  # resumes decoding next iteration
            chunk = self._chunk(req, budget)
            if not chunk or not self._grow(req, chunk):
                break
            heapq.heappop(self.waiting)
            if req.admitted_at_s != req.admitted_at_s:  # NaN: first admission
                req.admitted_at_s = self.env.now
            req.status = "running"
            self.running.append(req)
            batch.append((req, chunk))
            budget -= chunk
        for item in held:
            heapq.heappush(self.waiting, item)
        return batch, swap_out, swap_in

    def _decode_step_tokens(self, req: RequestState, budget: int) -> int:
        """Tokens a decode step of ``req`` computes (and needs KV room for): 1 here; a speculative replica
        verifies k_i + 1 (``sim.engine.speculative``)."""
        return 1

    def _chunk(self, req: RequestState, budget: int) -> int:
        remaining = req.prefill_target - req.context
        if remaining <= budget:
            return remaining
        # Without chunked prefill a prompt must fit the budget whole (longer ones are rejected at
        # arrival), but a request recomputed after preemption (prompt + its output so far) may not:
        # it is recomputed in chunks rather than left blocking the queue forever.
        return budget if (self.chunked_prefill or req.generated) else 0

    # ---------------------------------------------------------------- faults

    def fail(self) -> list[RequestState]:
        """The GPU is lost: the iteration in flight is abandoned (its tokens are never emitted), every
        KV block is gone, and the requests it held (running first, then waiting in queue order) are
        handed back to the caller, reset to redo their prefill, to be re-queued elsewhere or failed."""
        if not self.alive:
            return []
        self.alive = False
        self._restored = self.env.event()
        self.process.interrupt("gpu_failed")
        held = list(self.running) + [req for _, req in sorted(self.waiting, key=lambda item: item[0])]
        for req in held:
            req.context = 0
            req.prefill_target = req.prompt_tokens + req.generated
            req.blocks = 0
            req.swapped = False  # a swapped-out KV copy belonged to this GPU's host buffers: dropped too
            req.status = "waiting"
        self.running = []
        self.waiting = []
        self.free_blocks = self.budget.kv_blocks
        self.outstanding = 0
        return held

    def restore(self) -> None:
        """Weights and experts are back: serve again (the cache keeps the experts it held)."""
        if self.alive or self._restored is None:
            return
        self.alive = True
        self._restored.succeed()

    def _lifecycle(self):
        """Serve; on a failure wait until restored, then serve again from an empty batch."""
        while True:
            try:
                yield from self._serve()
            except simpy.Interrupt:
                self._wakeup = None
                assert self._restored is not None
                yield self._restored
                self._restored = None

    # ---------------------------------------------------------------- the serving loop

    def _serve(self):
        env = self.env
        while True:
            self.drop_timed_out(env.now)
            if not self.running and not self.waiting:
                self._wakeup = env.event()
                yield self._wakeup
                self._wakeup = None
                continue
            preempted_before = self.preemptions
            batch, swap_out, swap_in = self.form_batch()
            if not batch:
                if swap_in or swap_out:
                    yield env.timeout(self._swap_s(swap_out, swap_in))
                    continue
                if not self.running:
                    # Arrivals that could never fit are rejected up front, so an empty GPU always
                    # admits the head of the queue; reaching here is a bug in the engine.
                    raise RuntimeError("replica idle with waiting requests that cannot be admitted")
                # Running prefills hold the KV cache and none can grow: preempt one to break the tie.
                victim = self.running[self.scheduler.choose_victim(self.running)]
                swap_out = self.preempt(victim)
                if swap_out:
                    yield env.timeout(self._swap_s(swap_out, 0.0))
                continue
            yield from self._run_iteration(batch, swap_out, swap_in, self.preemptions - preempted_before)

    def _swap_s(self, swap_out: float, swap_in: float) -> float:
        self.swap_bytes += swap_out + swap_in
        seconds = 0.0
        if swap_out:
            seconds += float(self.profile.d2h_copy_s(nbytes=swap_out))
        if swap_in:
            seconds += float(self.profile.h2d_copy_s(nbytes=swap_in))
        return seconds

    def _run_iteration(self, batch, swap_out: float, swap_in: float, preempted: int):
        env = self.env
        started = env.now
        prefill_new, prefill_ctx, decode_ctx, segments = [], [], [], []
        emitting = 0
        for req, n in batch:
            position = req.context
            segments.append((req.request_id, position, n))
            if req.in_prefill:
                prefill_new.append(n)
                prefill_ctx.append(req.context)
                if req.context + n >= req.prefill_target:
                    emitting += 1
            else:
                decode_ctx.append(req.context)
                emitting += 1
        shape = BatchShape(
            prefill_new_tokens=np.asarray(prefill_new, dtype=np.int64),
            prefill_context_tokens=np.asarray(prefill_ctx, dtype=np.int64),
            decode_context_tokens=np.asarray(decode_ctx, dtype=np.int64),
            num_emitting=emitting,
        )
        counts = self.routing.counts(segments)
        if getattr(self.planner, "observes_batches", False):
            self.planner.observe_batch(batch, self.running, counts)
        plan = self.planner.plan(shape, counts, start_offset_s=self._swap_s(swap_out, swap_in))
        if self.slowdown != 1.0:
            plan.op_s = [seconds * self.slowdown for seconds in plan.op_s]
            layer_stats = getattr(self.planner, "layer_stats", None)  # per-layer totals (sim.engine.layer_stats)
            if layer_stats is not None:
                layer_stats.scale_last(self.slowdown)
        timing = time_plan(plan)
        if plan.accesses:
            self.accesses.extend(plan.accesses)
        waited_s = 0.0
        if self._failover_block is not None:
            blocker = self._failover_block()
            if blocker is not None:
                yield blocker
                waited_s = env.now - started
                self.planner.failover.stats.wait_s += waited_s
        yield env.timeout(timing.duration_s)
        now = env.now
        self.iterations.append(
            IterationRecord(
                replica=self.index, started_at_s=started, duration_s=timing.duration_s + waited_s,
                num_prefill_seqs=len(prefill_new), num_decode_seqs=len(decode_ctx), num_tokens=shape.num_tokens,
                expert_hits=plan.hits, expert_misses=plan.misses, prefetch_hits=plan.prefetch_hits,
                expert_loads=timing.loads, stall_s=timing.stall_s, compute_busy_s=timing.compute_busy_s,
                copy_busy_s=timing.copy_busy_s, kv_blocks_used=self.budget.kv_blocks - self.free_blocks,
                experts_resident=self.planner.cache.num_resident, preemptions=preempted,
            )
        )
        self.advance(batch, now)

    def advance(
        self, batch: list[tuple[RequestState, int]], now: float, on_token: Callable[[RequestState], None] | None = None
    ) -> None:
        """Move every sequence of a finished iteration forward: KV grows, tokens are emitted at ``now``,
        finished requests leave. Shared with the real runtime (``calibrate.runtime``), which calls it
        after running the same batch for real; ``on_token`` sees each emitted token."""
        tbt = self.tbt_samples
        for req, n in batch:
            was_prefill = req.in_prefill
            req.context += n
            if was_prefill and req.context < req.prefill_target:
                continue  # mid-prompt chunk: no token yet
            # The iteration sampled one output token for this request.
            req.generated += 1
            if on_token is not None:
                on_token(req)
            if req.generated == 1:
                req.first_token_at_s = now
            else:
                gap = now - req.last_token_at_s
                tbt.append(gap)
                if gap > req.max_tbt_s:
                    req.max_tbt_s = gap
            req.last_token_at_s = now
            if was_prefill:
                req.prefill_target = req.context  # decoding from here: context = prompt + generated - 1
            if req.generated >= req.output_tokens:
                self.running.remove(req)
                self._release(req)
                self._finish(req, "completed", "", now)

    def _finish(self, req: RequestState, status: str, reason: str, now: float) -> None:
        req.status = status
        req.reason = reason
        req.finished_at_s = now
        self.outstanding -= 1
        self.on_finish(req)
