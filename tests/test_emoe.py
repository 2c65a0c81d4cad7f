"""eMoE's rules, each pinned to a case small enough to check by hand, and the learned predictor
measured on the real Mixtral-8x7B per-token routing (read from ../shared, never copied here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sim.errors import PolicyError
from sim.policies.emoe import (
    EmoePlanner,
    ParametricPredictor,
    TransitionPredictor,
    evaluate_predictor,
    expected_token_load,
    keys_of,
    reroute_counts,
    reroute_tokens,
    split_sequences,
    top_experts_per_layer,
)
from sim.workload.routing_trace import TraceSequence, import_speculative_moe_jsonl

MIXTRAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "expert_routing" / "mixtral_8x7b_per_token_speculative_moe"


# ---------------------------------------------------------------- Eq. 2


def two_task_example():
    # math: two running requests of 10 and 20 input tokens, W_o = 30 -> 10 + 20 + 2*30 = 90 tokens.
    # code: one request of 40 input tokens, W_o = 60 -> 40 + 60 = 100 tokens.
    running = [("math", 10), ("code", 40), ("math", 20)]
    out = {"math": 30, "code": 60}
    freq = {
        "math": np.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]),
        "code": np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]),
    }
    sens = {"math": np.array([1, 0]), "code": np.array([1, 1])}  # math is insensitive at layer 1
    return running, out, freq, sens


def test_eq2_expected_token_load_by_hand():
    running, out, freq, sens = two_task_example()
    n = expected_token_load(running, expected_output_tokens=out, sensitivity=sens, frequency=freq)
    # layer 0: math 90*[.5,.3,.1,.1] = [45,27,9,9] + code 100*[.1,.2,.3,.4] = [10,20,30,40]
    # layer 1: math contributes 0 (s = 0), code [10,20,30,40]
    np.testing.assert_allclose(n, [[55, 47, 39, 49], [10, 20, 30, 40]])
    top = top_experts_per_layer(n, 2)
    assert [t.tolist() for t in top] == [[0, 3], [3, 2]]
    assert keys_of(top, 4) == {0, 3, 4 + 3, 4 + 2}
    # L may differ per layer
    assert [t.tolist() for t in top_experts_per_layer(n, [3, 1])] == [[0, 3, 1], [3]]


def test_eq2_insensitive_everywhere_keeps_one_expert_to_reroute_to():
    running, out, freq, _ = two_task_example()
    sens = {"math": np.array([1, 0]), "code": np.array([1, 0])}
    n = expected_token_load(running, expected_output_tokens=out, sensitivity=sens, frequency=freq)
    assert n[1].sum() == 0
    top = top_experts_per_layer(n, 2, tie_break=np.array([[0, 0, 0, 0], [0.1, 0.6, 0.2, 0.1]]))
    assert top[1].tolist() == [1]  # no load: only the tie-break favourite stays, not L of them
    assert top[0].tolist() == [0, 3]


def test_eq2_unknown_task_is_an_error():
    with pytest.raises(PolicyError, match="frequency"):
        expected_token_load([("chat", 5)], expected_output_tokens={"chat": 1}, sensitivity=None, frequency={})


# ---------------------------------------------------------------- periodic invocation


class CountingPredictor:
    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.calls: list[tuple[str | None, object]] = []
        self.shape = (num_layers, num_experts)

    def predict_all(self, task, previous, *, actual=None):
        self.calls.append((task, previous))
        f = np.zeros(self.shape)
        f[:, 1] = 1.0  # always expert 1
        return f


def test_periodic_invocation_calls_the_predictor_once_per_period():
    pred = CountingPredictor(2, 4)
    planner = EmoePlanner(num_layers=2, num_experts=4, predictor=pred, experts_per_layer=2,
                          expected_output_tokens={"math": 10}, period=4)
    plans = [planner.on_prompt("math", [("math", 8)]) for _ in range(13)]
    assert [p.prompt_index for p in plans if p.predictor_called] == [4, 8, 12]
    assert len(pred.calls) == planner.num_predictor_calls == 3
    # Prompt 0 loads every expert, and everything stays until the first prediction.
    assert all(p.load_all and p.keep == frozenset(range(8)) for p in plans[:4])
    # From then on only what Eq. 2 keeps: expert 1 of each layer (zero load elsewhere, min one per layer).
    assert all(not p.load_all and p.keep == {1, 5} for p in plans[4:])


def test_planner_passes_the_previous_prompt_of_the_same_task():
    pred = CountingPredictor(2, 4)
    planner = EmoePlanner(num_layers=2, num_experts=4, predictor=pred, experts_per_layer=1,
                          expected_output_tokens={}, period=1)
    planner.on_prompt("math", [("math", 8)])  # prompt 0: no prediction
    prev = np.array([[0, 1], [2, 3]])
    planner.observe("math", prev)
    planner.on_prompt("code", [("math", 8), ("code", 4)])
    assert [t for t, _ in pred.calls] == ["code", "math"]
    assert pred.calls[0][1] is None and pred.calls[1][1] is prev


def test_default_period_is_40():
    planner = EmoePlanner(num_layers=1, num_experts=2, predictor=CountingPredictor(1, 2), experts_per_layer=1,
                          expected_output_tokens={})
    called = [planner.on_prompt(None, [(None, 1)]).predictor_called for _ in range(81)]
    assert [i for i, c in enumerate(called) if c] == [40, 80]


# ---------------------------------------------------------------- miss handling


def test_reroute_to_next_ranked_resident_expert_by_hand():
    ranking = np.array([[0, 1, 2, 3], [2, 3, 0, 1], [1, 3, 2, 0]])  # full rankings, top-2 selected
    resident = np.array([True, False, True, False])
    r = reroute_tokens(ranking, resident, top_k=2)
    # token 0 keeps 0, 1 -> 2; token 1 keeps 2, 3 -> 0; token 2 loses both: 1 -> 2, 3 -> 0
    assert r.served.tolist() == [[0, 2], [2, 0], [2, 0]]
    assert (r.num_assignments, r.num_kept) == (6, 2)
    assert r.fidelity == pytest.approx(1 / 3)


def test_reroute_with_no_spare_leaves_the_slot_empty():
    r = reroute_tokens(np.array([[0, 1, 2]]), np.array([True, False, False]), top_k=2)
    assert r.served.tolist() == [[0, -1]] and r.fidelity == 0.5


def test_reroute_counts_fidelity_arithmetic():
    counts = np.array([[3, 1, 2, 0], [0, 4, 0, 0]])
    resident = np.array([[True, False, True, False], [False, False, False, False]])
    pref = np.array([[0.1, 0.5, 0.4, 0.2], [0.2, 0.2, 0.2, 0.4]])
    served, total, kept = reroute_counts(counts, resident, pref)
    # layer 0: expert 1's one assignment goes to the preferred resident expert 2; layer 1 has nothing
    # resident, so its 4 stay (the engine loads on demand there) and count as not kept.
    assert served.tolist() == [[3, 0, 3, 0], [0, 4, 0, 0]]
    assert (total, kept) == (10, 5)
    assert served.sum() == counts.sum()


# ---------------------------------------------------------------- parametric predictor


@pytest.mark.parametrize("accuracy", [0.0, 0.3, 0.7, 1.0])
def test_parametric_predictor_hits_its_accuracy(accuracy):
    rng = np.random.default_rng(1)
    pred = ParametricPredictor(num_experts=8, accuracy=accuracy, seed=7)
    hits = total = 0
    for _ in range(500):
        truth = np.stack([rng.choice(8, size=2, replace=False) for _ in range(32)])
        guess = pred.predict(truth)
        assert guess.shape == truth.shape
        assert all(len(set(row)) == 2 for row in guess.tolist())  # no duplicates within a layer
        hits += sum(len(set(g) & set(t)) for g, t in zip(guess.tolist(), truth.tolist()))
        total += truth.size
    assert hits / total == pytest.approx(accuracy, abs=0.01)  # 32,000 draws: sd <= 0.003


def test_parametric_predictor_is_seeded():
    truth = np.array([[0, 1], [2, 3], [4, 5]])
    a = ParametricPredictor(num_experts=8, accuracy=0.5, seed=3).predict(truth)
    b = ParametricPredictor(num_experts=8, accuracy=0.5, seed=3).predict(truth)
    assert a.tolist() == b.tolist()


def test_parametric_predictor_needs_the_actual_routing_in_the_planner():
    with pytest.raises(PolicyError):
        ParametricPredictor(num_experts=4, accuracy=0.5).predict_all("t", None)
    f = ParametricPredictor(num_experts=4, accuracy=1.0).predict_all("t", None, actual=np.array([[0, 1], [2, 3]]))
    np.testing.assert_allclose(f, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


# ---------------------------------------------------------------- learned predictor, synthetic


def test_emoe_l_learns_a_deterministic_layer_transition():
    # Layer 1 always uses (e + 4) % 8 of layer 0's experts; layer 0 is random.
    rng = np.random.default_rng(0)
    l0 = np.stack([rng.choice(8, 2, replace=False) for _ in range(400)])
    ex = np.stack([l0, (l0 + 4) % 8], axis=1)
    seq = TraceSequence(0, ex, np.arange(len(ex)), task="t")
    train, test = split_sequences([seq], 0.75)
    pred = TransitionPredictor(num_layers=2, num_experts=8, top_k=2).fit(train)
    acc_l = evaluate_predictor(pred, test, "L")
    assert acc_l.num_steps == 100
    # layer 1 is always right, layer 0 is no better than chance (~0.25)
    assert 0.55 < acc_l.precision < 0.7


def test_split_is_per_task_and_by_tokens():
    a = TraceSequence(0, np.zeros((6, 1, 2), dtype=np.int16), np.arange(6), task="a")
    b = TraceSequence(1, np.zeros((4, 1, 2), dtype=np.int16), np.arange(4), task="a")
    c = TraceSequence(2, np.zeros((10, 1, 2), dtype=np.int16), np.arange(10), task="b")
    train, test = split_sequences([a, b, c], 0.8)
    assert [(s.request_id, len(s.experts)) for s in train] == [(0, 6), (1, 2), (2, 8)]
    assert [(s.request_id, len(s.experts), s.positions[0]) for s in test] == [(1, 2, 2), (2, 2, 8)]


def test_untrained_predictor_says_so():
    with pytest.raises(PolicyError, match="trained"):
        TransitionPredictor(num_layers=1, num_experts=2, top_k=1).frequency("x")


# ---------------------------------------------------------------- learned predictor, real Mixtral routing


@pytest.fixture(scope="module")
def mixtral_split():
    files = sorted(MIXTRAL.glob("*.jsonl"))
    if not files:
        pytest.skip(f"no Mixtral routing under {MIXTRAL}")
    seqs = [s for f in files for s in import_speculative_moe_jsonl(f).sequences]
    return split_sequences(seqs, 0.8)


def test_predictors_on_mixtral_beat_random_and_frequency(mixtral_split):
    train, test = mixtral_split
    pred = TransitionPredictor(num_layers=32, num_experts=8, top_k=2).fit(train)
    assert pred.tasks == ["gsm8k", "humaneval"]
    report = {}
    for task in ("gsm8k", "humaneval"):
        for variant in ("A", "L", "freq"):
            acc = evaluate_predictor(pred, test, variant, task=task)
            assert acc.precision == pytest.approx(acc.recall)  # k predicted vs k real
            report[task, variant] = acc.precision
    print({f"{t}/{v}": round(p, 3) for (t, v), p in report.items()})
    for task in ("gsm8k", "humaneval"):
        # uniform random top-2 of 8 has expected precision 2/8 = 0.25; a held-out task is ~2,000
        # (token, layer) decisions, so sd ~0.01 and this margin of 8 points is real.
        assert report[task, "L"] > 0.25 + 0.08
        assert report[task, "A"] > 0.25 + 0.08
    # eMoE-L's layer transitions also beat plain per-task frequency, pooled over both tasks.
    pooled_l = evaluate_predictor(pred, test, "L").precision
    pooled_f = evaluate_predictor(pred, test, "freq").precision
    assert pooled_l > pooled_f + 0.03
