"""Expert routing: generators draw top-k without replacement; replay follows a real model's choices.

The replay check reads real Mixtral-8x7B routing (no licence, so it stays in ../shared and is read
here, never copied) and compares per-layer LRU hit rates with the curves Liang et al. (moe-lrc)
measured for the same model on other text."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sim.errors import TraceError
from sim.scenario import parse_scenario, resolve
from sim.engine.simulation import simulate
from sim.metrics import summarize
from sim.workload.routing import (
    EXACT_TOKENS_MAX,
    GeneratedRouting,
    ReplayRouting,
    load_routing_jsonl,
    zipf_weights,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "expert_routing"
MIXTRAL_ROUTING = SHARED / "mixtral_8x7b_per_token_speculative_moe" / "humaneval_2_routing.jsonl"
LRC_CURVES = SHARED / "moe_lrc_cache_hit_rates" / "expert_cache_hit_rate_curves.csv"


def test_few_tokens_pick_exactly_top_k_distinct_experts_each():
    rng = np.random.default_rng(1)
    routing = GeneratedRouting(np.ones((4, 8)), top_k=2, rng=rng)
    for n in (1, 3, EXACT_TOKENS_MAX):
        counts = routing.counts([(0, 0, n)])
        assert counts.shape == (4, 8)
        assert (counts.sum(axis=1) == 2 * n).all()
        assert counts.max() <= n
    # One token: exactly two different experts per layer.
    single = routing.counts([(0, 0, 1)])
    assert ((single > 0).sum(axis=1) == 2).all()


def test_many_tokens_keep_the_expected_assignment_count():
    routing = GeneratedRouting(zipf_weights(3, 16, 1.2, np.random.default_rng(0)), top_k=4, rng=np.random.default_rng(2))
    n = 5000
    counts = routing.counts([(0, 0, n)])
    assert counts.max() <= n
    # Clipping at n can only remove draws; with these weights almost none are removed.
    assert abs(counts.sum(axis=1) - 4 * n).max() <= 0.01 * 4 * n


def test_zipf_routing_is_skewed_and_uniform_is_not():
    rng = np.random.default_rng(3)
    skewed = GeneratedRouting(zipf_weights(2, 32, 1.5, rng), top_k=2, rng=rng).counts([(0, 0, 20000)])
    flat = GeneratedRouting(np.ones((2, 32)), top_k=2, rng=rng).counts([(0, 0, 20000)])
    assert skewed.max() / skewed.mean() > 5 * flat.max() / flat.mean() / 2
    assert flat.max() / flat.mean() < 1.2


def test_same_seed_same_routing():
    a = GeneratedRouting(np.ones((2, 8)), 2, np.random.default_rng(7))
    b = GeneratedRouting(np.ones((2, 8)), 2, np.random.default_rng(7))
    for n in (1, 5, 300):
        assert (a.counts([(0, 0, n)]) == b.counts([(0, 0, n)])).all()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_replay_follows_the_recorded_choices_and_wraps(tmp_path):
    rows = [
        {"dataset": "d", "problem_id": 0, "layer": layer, "token_idx": t, "experts": [t % 4, (t + 1) % 4]}
        for t in range(3)
        for layer in range(2)
    ]
    path = _write_jsonl(tmp_path / "r.jsonl", rows)
    replay = load_routing_jsonl(path, ReplayRouting(kind="replay", path=str(path)), num_layers=2, num_experts=4, top_k=2)
    counts = replay.counts([(0, 1, 1)])  # token 1 chose experts 1 and 2 in both layers
    assert counts.tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]
    wrapped = replay.counts([(0, 3, 1)])  # position 3 wraps to token 0
    assert wrapped.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_replay_rejects_a_broken_row_naming_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [0, 1]}])
    with path.open("a") as fh:
        fh.write('{"dataset": "d", "problem_id": 0, "layer": 1, "token_idx": 0}\n')
    spec = ReplayRouting(kind="replay", path=str(path))
    with pytest.raises(TraceError, match=r"r\.jsonl:2: expected a JSON object"):
        load_routing_jsonl(path, spec, num_layers=2, num_experts=4, top_k=2)


def test_replay_that_does_not_fit_the_model_says_why(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [0, 9]}])
    spec = ReplayRouting(kind="replay", path=str(path))
    with pytest.raises(TraceError, match=r"r\.jsonl:1: layer 0, experts \[0, 9\] do not fit .*8 experts, top-2"):
        load_routing_jsonl(path, spec, num_layers=1, num_experts=8, top_k=2)


def _lrc_hit_rate(slots_per_layer: int) -> float:
    with LRC_CURVES.open() as fh:
        for row in csv.DictReader(fh):
            if row["model_key"] == "mixtral" and row["policy"] == "LRU" and float(row["cache_experts_per_layer"]) == slots_per_layer:
                return float(row["hit_rate"])
    raise AssertionError(f"no moe-lrc LRU row for {slots_per_layer} slots per layer")


@pytest.mark.parametrize("slots_per_layer", [2, 4, 6])
def test_replayed_mixtral_routing_reproduces_published_lru_hit_rates(tmp_path, slots_per_layer):
    """One sequence at a time through a per-layer LRU cache, as moe-lrc measured: the simulated hit
    rate on real Mixtral routing lands within 0.1 of the published curve (different text, so not equal)."""
    data = {
        "model": "mixtral-8x7b",
        "hardware": {"profile": "h100-80gb", "expert_memory": {"experts": 32 * slots_per_layer}},
        "workload": {
            "arrivals": {
                "kind": "poisson", "rate_per_s": 0.0001,
                "prompt_tokens": {"dist": "fixed", "tokens": 1}, "output_tokens": {"dist": "fixed", "tokens": 250},
            },
            "routing": {"kind": "replay", "path": str(MIXTRAL_ROUTING)},
            "max_requests": 2,
        },
        "policies": {"expert_cache": {"name": "lru", "scope": "per_layer"}},
    }
    loaded = resolve(parse_scenario(data, "replay.yaml"), "replay.yaml", tmp_path)
    summary = summarize(simulate(loaded))
    assert summary["requests"]["completed"] == 2
    assert summary["expert_cache"]["hit_rate"] == pytest.approx(_lrc_hit_rate(slots_per_layer), abs=0.1)
