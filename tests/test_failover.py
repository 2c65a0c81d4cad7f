"""Tokens routed to unavailable experts (a failed expert-parallel GPU): wait, reroute or spread."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.errors import PolicyError
from sim.policies.failover import route_around

COUNTS = np.array([[5, 3, 2, 0], [1, 1, 1, 1]])
AVAILABLE = np.array([[True, False, True, False], [False, False, False, False]])


def test_wait_holds_the_unavailable_experts_tokens() -> None:
    d = route_around(COUNTS, AVAILABLE, "wait")
    assert d.served.tolist() == [[5, 0, 2, 0], [0, 0, 0, 0]]
    assert d.waiting.tolist() == [[0, 3, 0, 0], [1, 1, 1, 1]]
    assert (d.assignments, d.kept, d.rerouted) == (14, 7, 0)
    assert d.fidelity == pytest.approx(0.5)


def test_reroute_moves_them_to_the_preferred_available_expert() -> None:
    """Layer 0: expert 1's 3 assignments go to expert 2 (preferred over 0); layer 1 has nothing available: wait."""
    pref = np.array([[1.0, 9.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    d = route_around(COUNTS, AVAILABLE, "reroute", pref)
    assert d.served.tolist() == [[5, 0, 5, 0], [0, 0, 0, 0]]
    assert d.waiting.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert (d.kept, d.rerouted) == (7, 3)


def test_spread_shares_them_by_preference() -> None:
    """7 assignments of unavailable experts over experts 0 and 2 weighted 3:4 -> exactly 3 and 4."""
    counts = np.array([[0, 7, 0, 0]])
    available = np.array([[True, False, True, False]])
    d = route_around(counts, available, "spread", np.array([[3.0, 100.0, 4.0, 100.0]]))
    assert d.served.tolist() == [[3, 0, 4, 0]]
    # Uniform preference: 7 over two experts -> 4 and 3, the remainder to the lowest id.
    assert route_around(counts, available, "spread").served.tolist() == [[4, 0, 3, 0]]


def test_everything_available_changes_nothing() -> None:
    for policy in ("wait", "reroute", "spread"):
        d = route_around(COUNTS, np.ones_like(COUNTS, dtype=bool), policy)
        assert np.array_equal(d.served, COUNTS) and d.fidelity == 1.0 and not d.waiting.any()


def test_bad_input_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="unknown failover policy 'drop'"):
        route_around(COUNTS, AVAILABLE, "drop")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="differ in shape"):
        route_around(COUNTS, AVAILABLE[:1], "wait")


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    policy=st.sampled_from(["wait", "reroute", "spread"]),
)
def test_no_assignment_vanishes(seed: int, policy: str) -> None:
    """served + waiting holds every assignment; only available experts compute; kept + rerouted + waiting = all."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 20, size=(3, 6))
    available = rng.random((3, 6)) < 0.6
    d = route_around(counts, available, policy, rng.random((3, 6)))  # type: ignore[arg-type]
    assert d.served.sum() + d.waiting.sum() == counts.sum()
    assert not d.served[~available].any()
    assert d.kept + d.rerouted + d.waiting.sum() == d.assignments


def test_availability_follows_placement_and_replicas() -> None:
    """4 experts on 2 GPUs (0,1 on GPU 0; 2,3 on GPU 1), expert 3 also replicated on GPU 0: GPU 1 fails."""
    from sim.policies.failover import available_experts

    holders = np.zeros((2, 1, 4), dtype=bool)
    holders[0, 0, [0, 1, 3]] = True
    holders[1, 0, [2, 3]] = True
    assert available_experts(holders, np.array([True, False])).tolist() == [[True, True, False, True]]
    assert available_experts(holders, np.array([False, False])).tolist() == [[False] * 4]
    with pytest.raises(PolicyError, match="must be"):
        available_experts(holders[0], np.array([True]))
