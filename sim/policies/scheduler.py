"""Which waiting request is admitted next, and which running one is preempted when KV runs out.

A scheduler policy sees plain request views (no SimPy), so the real runtime can use the same object.
The engine owns the mechanics (token budget, sequence limit, KV blocks); the policy only orders."""

from __future__ import annotations

from typing import Protocol, Sequence


class RequestView(Protocol):
    """What a scheduler may look at."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    task: str | None


class SchedulerPolicy(Protocol):
    name: str

    def priority(self, request: RequestView) -> tuple:
        """Sort key of a waiting request: the smallest is admitted first."""
        ...

    def choose_victim(self, running: Sequence[RequestView]) -> int:
        """Index in ``running`` of the request to preempt when the KV cache is full."""
        ...


class FcfsScheduler:
    """First come, first served; preempt the latest arrival (vLLM's behaviour)."""

    name = "fcfs"

    def priority(self, request: RequestView) -> tuple:
        return (request.arrival_s, request.request_id)

    def choose_victim(self, running: Sequence[RequestView]) -> int:
        return max(range(len(running)), key=lambda i: (running[i].arrival_s, running[i].request_id))


class ShortestPromptFirstScheduler(FcfsScheduler):
    """Admit short prompts first; they finish prefill soonest and free the queue."""

    name = "shortest_prompt_first"

    def priority(self, request: RequestView) -> tuple:
        return (request.prompt_tokens, request.arrival_s, request.request_id)


def make_scheduler(name: str) -> SchedulerPolicy:
    schedulers: dict[str, type[FcfsScheduler]] = {
        "fcfs": FcfsScheduler,
        "shortest_prompt_first": ShortestPromptFirstScheduler,
    }
    return schedulers[name]()
