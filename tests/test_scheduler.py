"""Scheduler policies: ordering, victims, and eMoE's SLO admission (Algorithm 1, Eq. 3) by hand."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import TypeAdapter, ValidationError

from sim.policies.scheduler import (
    EmoeSloScheduler,
    FcfsScheduler,
    ShortestPredictedJobFirstScheduler,
    ShortestPromptFirstScheduler,
    make_scheduler,
)
from sim.policies.specs import SchedulerSpec


@dataclass
class View:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    task: str | None
    generated: int = 0
    output_tokens: int = 10_000  # the truth; predicting policies must not use it


def spec(**kw):
    return TypeAdapter(SchedulerSpec).validate_python(kw)


def test_make_scheduler_from_specs_and_names():
    assert isinstance(make_scheduler(spec(name="fcfs")), FcfsScheduler)
    assert isinstance(make_scheduler("shortest_prompt_first"), ShortestPromptFirstScheduler)
    s = make_scheduler(spec(name="shortest_predicted_job_first", expected_output_tokens={"code": 300}))
    assert isinstance(s, ShortestPredictedJobFirstScheduler) and s.expected_output_tokens == {"code": 300}
    e = make_scheduler(spec(name="emoe_slo", slo_s={"math": 5}, per_token_s=0.01, max_batch_tokens=4096))
    assert isinstance(e, EmoeSloScheduler) and e.slo_s == {"math": 5} and e.max_batch_tokens == 4096
    assert e.default_slo_s == float("inf")
    with pytest.raises(ValidationError):
        spec(name="emoe_slo", per_token_s=-1)
    with pytest.raises(ValidationError):
        spec(name="shortest_predicted_job_first", expected_tokens={})  # extra keys are refused


def test_shortest_predicted_job_first_orders_by_task_not_by_true_length():
    s = ShortestPredictedJobFirstScheduler({"math": 100, "code": 300}, default_output_tokens=200)
    reqs = [View(0, 0.0, 10, "code", output_tokens=1), View(1, 1.0, 999, "math"), View(2, 0.5, 1, None)]
    assert [r.request_id for r in sorted(reqs, key=s.priority)] == [1, 2, 0]
    # Victim: most expected work left. code has 300 - 250 = 50 left, math 100 - 0, unknown 200 - 0.
    running = [View(0, 0.0, 10, "code", generated=250), View(1, 1.0, 10, "math"), View(2, 0.5, 1, None)]
    assert s.choose_victim(running) == 2


def emoe() -> EmoeSloScheduler:
    return EmoeSloScheduler(
        expected_output_tokens={"math": 100, "code": 50}, slo_s={"math": 5.0, "code": 3.0},
        expert_load_s={"code": 0.5}, per_token_s=0.01,
    )


def test_emoe_latency_estimate_by_hand():
    # Running: math arrived at 0, 40 of ~100 tokens done -> G = 60; now 2.0 -> r = 2.0.
    # Candidate: code (not running: dE = 0.5), W = 50, G = 50. n for the math request: G >= 60 -> 1.
    # t = 0.5 + (50 + 1 * 60) * 0.01 + 2.0 = 3.6
    running = [View(0, 0.0, 100, "math", generated=40)]
    assert emoe().expected_latency_s(View(1, 1.5, 50, "code"), running, now_s=2.0) == [pytest.approx(3.6)]
    # A second math request costs no expert loading and has G = 100 >= 60: n = 2.
    # t = 0 + (50 + 2 * 60) * 0.01 + 2.0 = 3.7
    assert emoe().expected_latency_s(View(1, 1.5, 50, "math"), running, now_s=2.0) == [pytest.approx(3.7)]


def test_emoe_g_resets_to_five_percent_when_the_estimate_runs_out():
    assert emoe().remaining_tokens(View(0, 0.0, 1, "code", generated=80)) == pytest.approx(2.5)


def test_emoe_admits_or_holds_by_the_running_requests_slo():
    s = emoe()
    running = [View(0, 0.0, 100, "math", generated=40)]
    assert s.admit(View(1, 1.5, 50, "code"), running, now_s=2.0)  # 3.6 < 5
    # W = 300: t = 0.5 + (300 + 60) * 0.01 + 2.0 = 6.1 >= 5 -> the candidate waits
    assert not s.admit(View(1, 1.5, 300, "code"), running, now_s=2.0)
    # ...unless the running request has already missed its SLO (r = 6 > 5): it is no longer protected
    assert s.admit(View(1, 1.5, 300, "code"), running, now_s=6.0)
    # An empty batch admits anything
    assert s.admit(View(1, 1.5, 10_000, "code"), [], now_s=0.0)


def test_emoe_token_limit():
    s = EmoeSloScheduler(max_batch_tokens=200)
    running = [View(0, 0.0, 100, "math")]
    assert s.admit(View(1, 0.0, 99, "math"), running, now_s=0.0)
    assert not s.admit(View(1, 0.0, 100, "math"), running, now_s=0.0)  # 100 + 100 is not < 200


def test_emoe_select_is_greedy_in_slo_order():
    s = emoe()
    running = [View(0, 0.0, 100, "math", generated=40)]
    # code's SLO (3 s) falls due at 4.5, math's (5 s) at 6.0: code is tried first even though it came later.
    waiting = [View(1, 1.0, 60, "math"), View(2, 1.5, 50, "code")]
    assert sorted(waiting, key=s.priority)[0].request_id == 2
    # code: t_0 = 0.5 + (50 + 60) * 0.01 + 2 = 3.6 < 5 -> admitted.
    # math next, checked against {0, 2} with code's experts resident now (dE = 0):
    #   G = [60, 50], candidate 100. t_0 = (60 + 2*60)*0.01 + 2 = 3.8 < 5;
    #   t_2 = (60 + 3*50)*0.01 + r_2 (2.0 - 1.5) = 2.6 < 3 -> admitted.
    assert s.select(waiting, running, now_s=2.0) == [1, 0]
    # With a tighter code SLO the second check fails: t_2 = 2.6 >= 2.5, so math waits.
    tight = EmoeSloScheduler(expected_output_tokens={"math": 100, "code": 50}, slo_s={"math": 5.0, "code": 2.5},
                             expert_load_s={"code": 0.5}, per_token_s=0.01)
    assert tight.select(waiting, running, now_s=2.0) == [1]


def test_emoe_victim_is_the_request_with_most_slack():
    s = emoe()
    running = [View(0, 0.0, 10, "math"), View(1, 1.0, 10, "code"), View(2, 0.5, 10, "math")]
    # deadlines: 5.0, 4.0, 5.5
    assert s.choose_victim(running) == 2


def test_fcfs_and_shortest_prompt_first_unchanged():
    reqs = [View(0, 1.0, 50, None), View(1, 0.0, 100, None), View(2, 2.0, 10, None)]
    assert [r.request_id for r in sorted(reqs, key=FcfsScheduler().priority)] == [1, 0, 2]
    assert [r.request_id for r in sorted(reqs, key=ShortestPromptFirstScheduler().priority)] == [2, 0, 1]
    assert FcfsScheduler().choose_victim(reqs) == 2
