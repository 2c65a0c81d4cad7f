"""Routing statistics, the Markov routing generator, and their validation against real routing.

Two validations: (1) the generator fitted on the real Mixtral-8x7B per-token routing (read from
../shared, no licence, never copied) reproduces its per-layer LRU and static hit-rate curves;
(2) the per-family defaults reproduce moe-lrc's published LRU curves (MIT) within 5 points at
2x and 4x top_k slots per layer."""

from __future__ import annotations

import csv
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.engine.simulation import simulate
from sim.metrics import summarize
from sim.scenario import parse_scenario, resolve
from sim.workload.routing import (
    EXACT_TOKENS_MAX,
    FAMILY_DEFAULTS,
    MarkovGeneratedRouting,
    fit_routing,
    zipf_weights,
)
from sim.workload.routing_stats import (
    _lanes,
    _lfu_hits,
    _lru_hits,
    generated_hit_rates,
    gini,
    hit_rate_curves,
    layer_transitions,
    load_imbalance,
    persistence_stats,
    popularity_stats,
    prompt_overlap,
    reuse_distance,
)
from sim.workload.routing_trace import RoutingTraceMeta, import_speculative_moe_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "expert_routing"
MIXTRAL_DIR = SHARED / "mixtral_8x7b_per_token_speculative_moe"
LRC_CURVES = SHARED / "moe_lrc_cache_hit_rates" / "expert_cache_hit_rate_curves.csv"


# ---------------------------------------------------------------- statistics by arithmetic


def test_gini_and_popularity_of_hand_made_counts():
    assert gini(np.array([1, 1, 1, 1])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)
    # One layer, 4 experts, top-1: expert 0 three times, expert 1 once.
    seq = np.array([[[0]], [[0]], [[0]], [[1]]])
    pop = popularity_stats([seq], 4)
    assert pop["per_layer"]["max_over_mean"] == [3.0]
    expected_entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(4)
    assert pop["overall"]["entropy"] == pytest.approx(expected_entropy)


def test_load_imbalance_per_batch():
    # Batch of 2 tokens, top-1 of 2 experts: [0, 0] -> max 2 / mean 1; [0, 1] -> 1.
    seq = np.array([[[0]], [[0]], [[0]], [[1]]])
    assert load_imbalance([seq], 2, 2)["overall"] == pytest.approx(1.5)


def test_persistence_reuse_distance_and_overlap():
    a = np.array([[[0, 1]], [[1, 0]], [[2, 3]], [[0, 1]]])  # one layer, top-2 of 4
    p = persistence_stats([a])["overall"]
    assert p["same_set"] == pytest.approx(1 / 3)  # token 1 repeats token 0's set
    assert p["overlap"] == pytest.approx(1 / 3)
    rd = reuse_distance([a], 4)
    # Experts 0 and 1: used at tokens 0, 1, 3 -> distances 1, 2 each; experts 2, 3 only first uses.
    assert rd["fraction"][0] == pytest.approx(2 / 8) and rd["fraction"][1] == pytest.approx(2 / 8)
    assert rd["first_use_fraction"] == pytest.approx(4 / 8)
    b = np.array([[[0, 2]]])
    assert prompt_overlap([a, b], 4)["jaccard"] == pytest.approx(2 / 4)  # {0,1,2,3} vs {0,2}


def test_layer_transitions_detect_a_deterministic_mapping():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 8, size=(500, 1, 1))
    coupled = np.concatenate([first, (first + 3) % 8], axis=1)  # layer 1 = layer 0 + 3
    independent = np.concatenate([first, rng.integers(0, 8, size=(500, 1, 1))], axis=1)
    assert layer_transitions([coupled], 8)["overall"]["normalized_mi"] == pytest.approx(1.0, abs=1e-9)
    assert layer_transitions([independent], 8)["overall"]["normalized_mi"] < 0.05


def _reference_lru(stream, capacity):
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for key in stream:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[key] = None
    return hits


def _reference_lfu(stream, capacity):
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    resident: set[int] = set()
    hits = 0
    for t, key in enumerate(stream):
        if key in resident:
            hits += 1
        else:
            if len(resident) >= capacity:
                victim = min(resident, key=lambda e: (count[e], last[e]))
                resident.remove(victim)
            resident.add(key)
        count[key] = count.get(key, 0) + 1
        last[key] = t
    return hits


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=40), min_size=1, max_size=4),
    capacity=st.integers(1, 6),
)
def test_vectorised_lru_and_lfu_match_plain_caches(seqs, capacity):
    """One lane per sequence (top-1, one layer): hits equal a textbook LRU / LFU replay."""
    experts = [np.array(s).reshape(-1, 1, 1) for s in seqs]
    lanes, _layer, _length = _lanes(experts)
    lru = _lru_hits(lanes, 6, [capacity])[:, 0]
    lfu = _lfu_hits(lanes, 6, capacity)
    assert lru.tolist() == [_reference_lru(s, capacity) for s in seqs]
    assert lfu.tolist() == [_reference_lfu(s, capacity) for s in seqs]


def test_static_cache_pins_the_globally_most_frequent_experts():
    a = np.array([[[0]], [[0]], [[1]], [[2]]])
    b = np.array([[[0]], [[3]]])
    curves = hit_rate_curves([a, b], 4, sizes=[1, 2], policies=("static",))
    # Expert 0 is pinned at size 1: a hits 2/4, b hits 1/2 -> mean 0.5.
    assert curves["static"]["overall"][0] == pytest.approx(0.5)


# ---------------------------------------------------------------- the Markov generator


def test_full_persistence_repeats_the_previous_token_and_zero_persistence_follows_popularity():
    w = zipf_weights(3, 16, 1.0, np.random.default_rng(0))
    sticky = MarkovGeneratedRouting(w, 2, np.ones(3), np.random.default_rng(1)).sequence(50)
    assert (np.sort(sticky[1:], axis=2) == np.sort(sticky[:-1], axis=2)).all()
    free = MarkovGeneratedRouting(w, 2, np.zeros(3), np.random.default_rng(2))
    seqs = free.sequences(200, 50)
    share = np.array(popularity_stats(seqs, 16)["share"])
    assert np.abs(share - free._inclusion / 2).max() < 0.01
    assert all((np.sort(s, axis=2)[:, :, 0] != np.sort(s, axis=2)[:, :, 1]).all() for s in seqs)  # distinct top-k


def test_counts_keep_per_request_state_across_engine_calls():
    w = np.ones((4, 8))
    gen = MarkovGeneratedRouting(w, 2, np.ones(4), np.random.default_rng(3))
    first = gen.counts([(7, 0, 1), (9, 0, 1)])
    assert (first.sum(axis=1) == 4).all()
    # Persistence 1: the next decode step of the same requests selects the very same experts.
    assert (gen.counts([(7, 1, 1), (9, 1, 1)]) == first).all()
    # A restart at position 0 (recompute) starts fresh; a prefill chunk longer than EXACT_TOKENS_MAX
    # takes the multinomial path and still gives each token top_k experts.
    big = gen.counts([(11, 0, 4 * EXACT_TOKENS_MAX)])
    assert (big.sum(axis=1) >= 2 * 4 * EXACT_TOKENS_MAX * 0.95).all() and big.max() <= 4 * EXACT_TOKENS_MAX


def test_same_seed_same_markov_routing():
    w = zipf_weights(2, 8, 1.0, np.random.default_rng(0))
    a = MarkovGeneratedRouting(w, 2, np.full(2, 0.5), np.random.default_rng(5))
    b = MarkovGeneratedRouting(w, 2, np.full(2, 0.5), np.random.default_rng(5))
    for step in range(5):
        segs = [(r, step, 1) for r in range(6)]
        assert (a.counts(segs) == b.counts(segs)).all()


def _mixtral_real() -> list[np.ndarray]:
    meta = RoutingTraceMeta("mixtral-8x7b", 32, 8, 2)
    seqs = []
    for name in ("gsm8k_2_routing.jsonl", "humaneval_2_routing.jsonl"):
        seqs += [s.experts for s in import_speculative_moe_jsonl(MIXTRAL_DIR / name, meta).sequences]
    return seqs


def test_generator_fitted_on_real_mixtral_routing_reproduces_its_hit_rate_curves():
    """Tolerance: overall (mean over layers) LRU, LFU and static curves within 0.04 at every size 1..8
    (achieved: 0.031, 0.031, 0.005); the mean over layers of the per-layer LRU error within 0.04 at
    every size (achieved 0.032; the real trace has only 4 requests, so one layer's curve is noisy);
    overlap with the previous token within 0.02."""
    real = _mixtral_real()
    params = fit_routing(real, 8)
    fake = params.generator(np.random.default_rng(0)).like([len(s) for s in real] * 6)
    r, g = hit_rate_curves(real, 8), hit_rate_curves(fake, 8)
    for policy in ("LRU", "LFU", "static"):
        assert np.abs(np.subtract(r[policy]["overall"], g[policy]["overall"])).max() < 0.04, policy
    per_layer_err = np.abs(np.subtract(r["LRU"]["per_layer"], g["LRU"]["per_layer"])).mean(axis=0)
    assert per_layer_err.max() < 0.04
    assert persistence_stats(fake)["overall"]["overlap"] == pytest.approx(persistence_stats(real)["overall"]["overlap"], abs=0.02)
    # Without persistence and locality the LRU curve is clearly lower at 2 slots: the fit does work.
    flat = MarkovGeneratedRouting(params.popularity, 2, np.zeros(32), np.random.default_rng(0))
    g0 = hit_rate_curves(flat.like([len(s) for s in real] * 6), 8, sizes=[2], policies=("LRU",))
    assert r["LRU"]["overall"][1] - g0["LRU"]["overall"][0] > 0.05


def _lrc_rows() -> dict[str, dict]:
    out: dict[str, dict] = {}
    with LRC_CURVES.open() as fh:
        for row in csv.DictReader(fh):
            family = row["model_key"] if row["component"] == "causal_decoder" else f"{row['model_key']}-{row['component']}"
            d = out.setdefault(family, {"E": int(row["num_routed_experts"]), "k": int(row["top_k"])})
            m = float(row["cache_m"])
            if m in (1.0, 2.0, 3.0, 4.0):
                d.setdefault(row["policy"], {})[int(m)] = float(row["hit_rate"])
    return out


LRC_FAMILIES = sorted(_lrc_rows()) if LRC_CURVES.exists() else []


@pytest.mark.parametrize("family", LRC_FAMILIES)
def test_family_defaults_reproduce_moe_lrc_curves_within_5_points(family):
    """Each model in the moe-lrc copy: its family's defaults (layer coupling included) give the published LRU,
    LFU and static hit rates at 1, 2, 3 and 4 x top_k slots per layer within 0.05, every point, on a seed and a
    size (4 layers, 32 requests x 512 tokens) other than the fit's (2 layers, 16 requests, seed 3; validated on
    4 layers, 32 requests, seed 11). The points at exactly top_k slots need the working-set skew and, for
    LLaMA-MoE, the refractory redraw (see benchmarks/fit_family_defaults.py)."""
    d = _lrc_rows()[family]
    par = FAMILY_DEFAULTS[family]
    ms = [m for m in (1, 2, 3, 4) if m * d["k"] <= d["E"]]
    hot = max(d["k"] + 1, int(round(par["hot_experts_per_top_k"] * d["k"]))) if "hot_experts_per_top_k" in par else None
    got = generated_hit_rates(
        d["E"], d["k"], par["zipf_exponent"], par["persistence"], [m * d["k"] for m in ms], num_requests=32, seed=7,
        locality=par["locality"], hot_experts=hot, coupling=par["layer_coupling"], policies=("LRU", "LFU", "static"),
        zipf_offset=par.get("zipf_offset", 0.0), hot_skew=par.get("hot_skew", 0.0),
        refractory=par.get("refractory", 0.0), refractory_tokens=int(par.get("refractory_tokens", 0)),
    )
    for policy in ("LRU", "LFU", "static"):
        for m, g in zip(ms, got[policy]["overall"]):
            assert abs(g - d[policy][m]) <= 0.05, f"{family} {policy} at {m}x top_k: generated {g:.3f}, published {d[policy][m]:.3f}"


def test_markov_and_fitted_routing_run_in_a_simulation(tmp_path):
    fit = fit_routing(_mixtral_real(), 8, "mixtral-8x7b")
    (tmp_path / "fit.yaml").write_text(fit.to_yaml())
    rates = {}
    for name, routing in {
        "markov": {"kind": "markov", "family": "mixtral"},
        "fitted": {"kind": "fitted", "path": "fit.yaml"},
        "uniform": {"kind": "uniform"},
    }.items():
        data = {
            "model": "mixtral-8x7b",
            "hardware": {"profile": "h100-80gb", "expert_memory": {"experts": 128}},
            "workload": {
                "arrivals": {"kind": "poisson", "rate_per_s": 0.0001, "prompt_tokens": {"dist": "fixed", "tokens": 1},
                             "output_tokens": {"dist": "fixed", "tokens": 200}},
                "routing": routing,
                "max_requests": 2,
            },
            "policies": {"expert_cache": {"name": "lru", "scope": "per_layer"}},
        }
        summary = summarize(simulate(resolve(parse_scenario(data, "m.yaml"), "m.yaml", tmp_path)))
        assert summary["requests"]["completed"] == 2
        rates[name] = summary["expert_cache"]["hit_rate"]
    # 4 slots of 8 per layer: persistence lifts LRU above the memoryless router.
    assert rates["markov"] > rates["uniform"] + 0.02
    assert rates["fitted"] > rates["uniform"] + 0.02


def test_locality_raises_lfu_more_than_static_and_is_kept_per_request():
    kw = dict(num_layers=2, num_requests=16, num_tokens=256, policies=("LFU", "static"))
    none = generated_hit_rates(64, 4, 0.5, 0.0, [8], locality=0.0, **kw)
    some = generated_hit_rates(64, 4, 0.5, 0.0, [8], locality=0.6, **kw)
    assert some["LFU"]["overall"][0] - none["LFU"]["overall"][0] > 0.15
    assert abs(some["static"]["overall"][0] - none["static"]["overall"][0]) < 0.05
    gen = MarkovGeneratedRouting(np.ones((2, 64)), 2, np.zeros(2), np.random.default_rng(0), locality=1.0, hot_experts=3)
    gen.counts([(5, 0, 1)])
    hot = gen._state[5][2]
    for pos in range(1, 20):  # locality 1: every expert of request 5 comes from its working set of 3
        counts = gen.counts([(5, pos, 1)])
        for layer in range(2):
            assert set(np.flatnonzero(counts[layer])) <= set(hot[layer].tolist())


def test_fitted_parameters_round_trip_through_yaml_and_bad_files_say_why(tmp_path):
    from sim.errors import TraceError
    from sim.workload.routing import FittedParams

    par = FittedParams("m", 2, np.full((3, 4), 0.25), np.array([0.1, 0.2, 0.3]), 0.3, 4)
    (tmp_path / "f.yaml").write_text(par.to_yaml())
    back = FittedParams.from_yaml(tmp_path / "f.yaml")
    assert back.top_k == 2 and back.locality == 0.3 and back.hot_experts == 4
    assert back.persistence.tolist() == [0.1, 0.2, 0.3] and back.popularity.shape == (3, 4)
    (tmp_path / "b.yaml").write_text("top_k: 2\npopularity: [[1, 1]]\npersistence: [1.5]\n")
    with pytest.raises(TraceError, match=r"b\.yaml: popularity must be \[layers\]\[experts\] >= 0 and persistence"):
        FittedParams.from_yaml(tmp_path / "b.yaml")


def test_an_unknown_family_lists_the_known_ones(tmp_path):
    from sim.errors import TraceError
    from sim.workload.routing import MarkovRouting, build_routing

    with pytest.raises(TraceError, match=r"unknown family 'gpt5'; expected one of deepseek, deepseek-v2, .*gpt-oss, .*qwen3, .*yuan"):
        build_routing(MarkovRouting(kind="markov", family="gpt5"), num_layers=2, num_experts=8, top_k=2,
                      rng=np.random.default_rng(0), base_dir=tmp_path)
