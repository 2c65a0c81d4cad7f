"""Which waiting request is admitted next, and which running one is preempted when KV runs out.

A scheduler policy sees plain request views (no SimPy), so the real runtime can use the same object.
The engine owns the mechanics (token budget, sequence limit, KV blocks); the policy only orders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from sim.policies.specs import SchedulerSpec


class RequestView(Protocol):
    """What a scheduler may look at."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # the true length in a trace-driven run: a policy that predicts must not read it
    task: str | None
    generated: int  # output tokens produced so far


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


class ShortestPredictedJobFirstScheduler:
    """Admit the request whose task has the shortest expected output first (ties by arrival); preempt
    the running request with the most expected work left. The expected output length per task is
    profiled (eMoE's W_o); the request's true length is never read."""

    name = "shortest_predicted_job_first"

    def __init__(self, expected_output_tokens: Mapping[str, float] | None = None, default_output_tokens: float = 128.0) -> None:
        self.expected_output_tokens = dict(expected_output_tokens or {})
        self.default_output_tokens = default_output_tokens

    def expected_output(self, request: RequestView) -> float:
        return self.expected_output_tokens.get(request.task or "", self.default_output_tokens)

    def priority(self, request: RequestView) -> tuple:
        return (self.expected_output(request), request.arrival_s, request.request_id)

    def choose_victim(self, running: Sequence[RequestView]) -> int:
        return max(
            range(len(running)),
            key=lambda i: (self.expected_output(running[i]) - running[i].generated, running[i].arrival_s, running[i].request_id),
        )


class EmoeSloScheduler(ShortestPredictedJobFirstScheduler):
    """eMoE's task-aware SLO scheduler (Algorithm 1).

    Order: the waiting request whose SLO falls due first (arrival + the task's SLO) goes first.
    Admission (``admit``/``select``, called by the engine on every arrival and completion): a
    candidate with W input tokens is admitted when the batch's input tokens stay under
    ``max_batch_tokens`` and every running request that is still within its SLO keeps its expected
    latency (Eq. 3) under its SLO:

        t_i = dE + (W + n_i * G_i) * c + r_i

    dE: expert loading caused by the candidate (``expert_load_s`` of its task, 0 when a running
    request already has that task, whose experts are then resident), c: ``per_token_s``,
    G_i: expected tokens left (the task's expected output minus tokens generated; when that reaches 0
    before the request is done, 5% of the expected output), n_i: the requests of the new batch that
    will finish no earlier than i (G_j >= G_i, i itself included), r_i: time since i arrived.
    All inputs are plain numbers fixed at construction or passed in; the policy never sees ``env``."""

    name = "emoe_slo"

    def __init__(
        self,
        *,
        expected_output_tokens: Mapping[str, float] | None = None,
        default_output_tokens: float = 128.0,
        slo_s: Mapping[str, float] | None = None,
        default_slo_s: float = float("inf"),
        expert_load_s: Mapping[str, float] | None = None,
        default_expert_load_s: float = 0.0,
        per_token_s: float = 0.0,
        max_batch_tokens: int | None = None,
    ) -> None:
        super().__init__(expected_output_tokens, default_output_tokens)
        self.slo_s = dict(slo_s or {})
        self.default_slo_s = default_slo_s
        self.expert_load_s = dict(expert_load_s or {})
        self.default_expert_load_s = default_expert_load_s
        self.per_token_s = per_token_s
        self.max_batch_tokens = max_batch_tokens

    def slo(self, request: RequestView) -> float:
        return self.slo_s.get(request.task or "", self.default_slo_s)

    def priority(self, request: RequestView) -> tuple:
        return (request.arrival_s + self.slo(request), request.arrival_s, request.request_id)

    def choose_victim(self, running: Sequence[RequestView]) -> int:
        # The request with the most slack left loses least by waiting.
        return max(range(len(running)), key=lambda i: self.priority(running[i]))

    def remaining_tokens(self, request: RequestView) -> float:
        """G_i of Eq. 3."""
        expected = self.expected_output(request)
        left = expected - request.generated
        return left if left > 0 else 0.05 * expected

    def expected_latency_s(self, candidate: RequestView, running: Sequence[RequestView], now_s: float) -> list[float]:
        """t_i of Eq. 3 for each request in ``running`` if ``candidate`` joins the batch."""
        tasks = {r.task for r in running}
        d_e = 0.0 if candidate.task in tasks else self.expert_load_s.get(candidate.task or "", self.default_expert_load_s)
        remaining = [self.remaining_tokens(r) for r in running]
        all_g = remaining + [self.remaining_tokens(candidate)]
        out = []
        for r, g in zip(running, remaining):
            n = sum(1 for x in all_g if x >= g)
            out.append(d_e + (candidate.prompt_tokens + n * g) * self.per_token_s + (now_s - r.arrival_s))
        return out

    def admit(self, candidate: RequestView, running: Sequence[RequestView], now_s: float) -> bool:
        """Algorithm 1's test for one candidate against the requests already in the batch."""
        if self.max_batch_tokens is not None:
            tokens = sum(r.prompt_tokens for r in running)
            if candidate.prompt_tokens + tokens >= self.max_batch_tokens:
                return False
        for r, t in zip(running, self.expected_latency_s(candidate, running, now_s)):
            slo = self.slo(r)
            if now_s - r.arrival_s < slo and t >= slo:
                return False
        return True

    def select(self, waiting: Sequence[RequestView], running: Sequence[RequestView], now_s: float) -> list[int]:
        """Algorithm 1: indices into ``waiting`` to admit now, in admission order. Waiting requests
        are tried in SLO order; each admitted one joins the batch the next ones are checked against."""
        batch = list(running)
        chosen = []
        for i in sorted(range(len(waiting)), key=lambda i: self.priority(waiting[i])):
            if self.admit(waiting[i], batch, now_s):
                chosen.append(i)
                batch.append(waiting[i])
        return chosen


def make_scheduler(spec: "SchedulerSpec | str") -> SchedulerPolicy:
    """Build a scheduler from its scenario spec (a bare name builds one without parameters)."""
    from sim.policies import specs

    if isinstance(spec, str):
        spec = {
            "fcfs": specs.FcfsSchedulerSpec, "shortest_prompt_first": specs.ShortestPromptFirstSpec,
            "shortest_predicted_job_first": specs.ShortestPredictedJobFirstSpec, "emoe_slo": specs.EmoeSloSchedulerSpec,
        }[spec](name=spec)
    if isinstance(spec, specs.FcfsSchedulerSpec):
        return FcfsScheduler()
    if isinstance(spec, specs.ShortestPromptFirstSpec):
        return ShortestPromptFirstScheduler()
    if isinstance(spec, specs.ShortestPredictedJobFirstSpec):
        return ShortestPredictedJobFirstScheduler(spec.expected_output_tokens, spec.default_output_tokens)
    if isinstance(spec, specs.EmoeSloSchedulerSpec):
        return EmoeSloScheduler(
            expected_output_tokens=spec.expected_output_tokens, default_output_tokens=spec.default_output_tokens,
            slo_s=spec.slo_s, default_slo_s=spec.default_slo_s if spec.default_slo_s is not None else float("inf"),
            expert_load_s=spec.expert_load_s, default_expert_load_s=spec.default_expert_load_s or 0.0,
            per_token_s=spec.per_token_s or 0.0, max_batch_tokens=spec.max_batch_tokens,
        )
    raise TypeError(f"no scheduler for {spec!r}")
