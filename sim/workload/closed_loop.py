"""Closed-loop clients: N concurrent clients, each sending its next request when its previous one has finished.

This is how serving benchmarks measure latency at a *concurrency* rather than at an arrival rate: the load
follows the server's speed, so the system is always full but never overloaded. The request table of a
closed-loop workload has every arrival time at 0 (none is known in advance); ``ClosedLoop`` carries what
decides them while serving, and ``ClosedLoopIssuer`` is the one rule that the simulator's arrival process and
the real runtime (``calibrate.runtime.server``) both follow:

- the first ``clients`` requests (ids 0 .. clients-1) are sent at time 0;
- each time any request finishes (completed, rejected or dropped: its client got an answer), the next request
  id is sent ``think_s[id]`` seconds later.

Requests are sent in id order, so a run is deterministic for a seed whatever the server's speed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True, eq=False)
class ClosedLoop:
    """``clients`` concurrent clients; ``think_s[i]`` is the pause before request ``i`` is sent after its
    client's previous answer (ignored for the first ``clients`` requests, which are sent at 0)."""

    clients: int
    think_s: np.ndarray

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        think = np.asarray(self.think_s, dtype=np.float64)
        if think.ndim != 1 or (len(think) and (not np.all(np.isfinite(think)) or think.min() < 0)):
            raise ValueError("ClosedLoop.think_s must be finite seconds >= 0, one per request")
        think.setflags(write=False)
        object.__setattr__(self, "think_s", think)


class ClosedLoopIssuer:
    """Which request is sent next and when, as requests finish (see the module docstring)."""

    def __init__(self, loop: ClosedLoop, num_requests: int) -> None:
        if len(loop.think_s) != num_requests:
            raise ValueError(f"ClosedLoop has {len(loop.think_s)} think times for {num_requests} requests")
        self.loop = loop
        self.num_requests = num_requests
        self.next_id = min(loop.clients, num_requests)

    def initial(self) -> list[tuple[int, float]]:
        """(request id, send time) of the requests sent at the start."""
        return [(i, 0.0) for i in range(self.next_id)]

    def after_finish(self, now_s: float, think_scale: float = 1.0) -> tuple[int, float] | None:
        """A request finished at ``now_s``: (id, send time) of its client's next request, or None when all are
        sent. ``think_scale`` scales the think time (the runtime's ``time_scale``; 0 sends at once)."""
        if self.next_id >= self.num_requests:
            return None
        i = self.next_id
        self.next_id += 1
        return i, now_s + float(self.loop.think_s[i]) * think_scale


def draw_think_times(mean_s: float, distribution: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` think times: all ``mean_s`` (fixed) or exponential with that mean."""
    if distribution == "fixed" or mean_s == 0:
        return np.full(n, float(mean_s))
    if distribution == "exponential":
        return rng.exponential(mean_s, n)
    raise ValueError(f"think_time: expected fixed or exponential, got {distribution!r}")
