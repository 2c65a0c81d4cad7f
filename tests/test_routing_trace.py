"""The canonical routing trace: Parquet round trip, streaming row groups, size per token-layer, the
speculative-moe importer, replay from Parquet in a simulation, and the `moesim trace` commands.

The real Mixtral routing (no licence) is read from ../shared, never copied into the repository."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sim.cli import main
from sim.engine.simulation import simulate
from sim.errors import TraceError
from sim.metrics import summarize
from sim.scenario import parse_scenario, resolve
from sim.workload.routing import ReplayRouting, build_routing
from sim.workload.routing_trace import (
    RoutingTrace,
    RoutingTraceMeta,
    RoutingTraceWriter,
    TraceSequence,
    import_speculative_moe_jsonl,
    read_routing_trace,
    write_routing_trace,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "expert_routing"
MIXTRAL_DIR = SHARED / "mixtral_8x7b_per_token_speculative_moe"
MIXTRAL_META = RoutingTraceMeta("mixtral-8x7b", num_layers=32, num_experts=8, top_k=2)


def _random_sequences(rng, meta: RoutingTraceMeta, lengths, tasks=None) -> list[TraceSequence]:
    out = []
    for i, n in enumerate(lengths):
        keys = rng.random((n, meta.num_layers, meta.num_experts))
        experts = np.argsort(-keys, axis=2)[:, :, : meta.top_k].astype(np.int16)
        g = rng.random((n, meta.num_layers, meta.top_k))
        gates = -np.sort(-g / g.sum(axis=2, keepdims=True), axis=2)
        out.append(TraceSequence(i, experts, np.arange(n, dtype=np.int32), gates, None if tasks is None else tasks[i]))
    return out


def test_round_trip_keeps_experts_positions_tasks_and_gates_to_float16(tmp_path):
    rng = np.random.default_rng(0)
    seqs = _random_sequences(rng, MIXTRAL_META, [5, 9, 1], tasks=["a", "b", "a"])
    write_routing_trace(tmp_path / "t.parquet", RoutingTrace(MIXTRAL_META, seqs))
    back = read_routing_trace(tmp_path / "t.parquet")
    assert back.meta == MIXTRAL_META
    assert [s.request_id for s in back.sequences] == [0, 1, 2]
    assert [s.task for s in back.sequences] == ["a", "b", "a"]
    for a, b in zip(seqs, back.sequences):
        assert (a.experts == b.experts).all()
        assert (a.positions == b.positions).all()
        assert np.abs(a.gates - b.gates).max() < 1e-3  # float16 keeps ~3 decimal digits


def test_writer_streams_one_row_group_per_append_and_reader_sorts_them(tmp_path):
    rng = np.random.default_rng(1)
    seqs = _random_sequences(rng, MIXTRAL_META, [4, 3, 6])
    path = tmp_path / "s.parquet"
    with RoutingTraceWriter(path, MIXTRAL_META, gates=False) as w:
        for s in reversed(seqs):  # appended out of order: the reader sorts by request
            w.append(s.request_id, s.experts)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    back = read_routing_trace(path)
    assert [s.request_id for s in back.sequences] == [0, 1, 2]
    assert all(s.gates is None for s in back.sequences)
    assert all((a.experts == b.experts).all() for a, b in zip(seqs, back.sequences))


def test_reader_drops_a_token_missing_a_layer(tmp_path):
    meta = RoutingTraceMeta("toy", num_layers=2, num_experts=4, top_k=1)
    path = tmp_path / "p.parquet"
    with RoutingTraceWriter(path, meta, gates=False) as w:
        w.append(0, np.array([[[1], [2]], [[3], [0]]]))
    pq.write_table(pq.read_table(path).slice(0, 3), path)  # token 1 keeps layer 0 only
    back = read_routing_trace(path)
    assert back.sequences[0].experts.tolist() == [[[1], [2]]]


def test_reader_names_the_row_with_an_impossible_expert(tmp_path):
    import pyarrow as pa

    meta = RoutingTraceMeta("toy", num_layers=1, num_experts=4, top_k=1)
    table = pa.table(
        {"request_id": pa.array([0, 0], pa.int32()), "token_position": pa.array([0, 1], pa.int32()),
         "layer": pa.array([0, 0], pa.int16()), "expert_0": pa.array([1, 7], pa.int16())}
    ).replace_schema_metadata(meta.to_metadata())
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(TraceError, match=r"bad\.parquet, row 1: .*experts \[7\].*4 experts"):
        read_routing_trace(tmp_path / "bad.parquet")


def test_writer_rejects_experts_of_the_wrong_shape(tmp_path):
    with RoutingTraceWriter(tmp_path / "w.parquet", MIXTRAL_META, gates=False) as w:
        with pytest.raises(TraceError, match=r"request 3: expected experts \[tokens, 32, 2\], got \[4, 32, 3\]"):
            w.append(3, np.zeros((4, 32, 3), dtype=np.int16))


def test_random_top2_of_8_takes_under_5_bytes_per_token_layer_with_gates_and_under_1_5_without(tmp_path):
    """Random routing is the worst case for compression (real routing is more regular)."""
    rng = np.random.default_rng(2)
    seqs = _random_sequences(rng, MIXTRAL_META, [400] * 5)
    n = 5 * 400 * 32
    write_routing_trace(tmp_path / "g.parquet", RoutingTrace(MIXTRAL_META, seqs))
    bare = [TraceSequence(s.request_id, s.experts, s.positions) for s in seqs]
    write_routing_trace(tmp_path / "n.parquet", RoutingTrace(MIXTRAL_META, bare))
    assert (tmp_path / "g.parquet").stat().st_size / n < 5.0
    assert (tmp_path / "n.parquet").stat().st_size / n < 1.5


def test_real_mixtral_routing_converts_exactly_and_stays_small(tmp_path):
    src = MIXTRAL_DIR / "humaneval_2_routing.jsonl"
    trace = import_speculative_moe_jsonl(src, MIXTRAL_META)
    assert [s.task for s in trace.sequences] == ["humaneval", "humaneval"]
    assert [len(s.experts) for s in trace.sequences] == [81, 252]
    write_routing_trace(tmp_path / "he.parquet", trace)
    assert (tmp_path / "he.parquet").stat().st_size / trace.num_token_layers < 4.5
    back = read_routing_trace(tmp_path / "he.parquet")
    # Spot-check against the JSONL rows themselves.
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    checked = 0
    for r in rows[::37]:
        seq = back.sequences[int(r["problem_id"])]
        (t,) = np.flatnonzero(seq.positions == r["token_idx"]) if r["token_idx"] in seq.positions else (None,)
        if t is None:  # a token recorded for only some layers is dropped
            continue
        assert seq.experts[t, r["layer"]].tolist() == r["experts"]
        assert seq.gates[t, r["layer"]] == pytest.approx(r["gating_probs"], abs=1e-3)
        checked += 1
    assert checked > 250


def test_importer_names_file_and_line_of_a_broken_record(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        '{"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [0, 1], "gating_probs": [0.6, 0.4]}\n'
        '{"dataset": "d", "problem_id": 0, "layer": 1, "token_idx": 0, "experts": [0, 1]}\n'
        '{"dataset": "d", "problem_id": 0, "layer": 1, "token_idx": 0, "experts": [0, 1, 2], "gating_probs": [1, 0, 0]}\n'
    )
    with pytest.raises(TraceError, match=r"r\.jsonl:3: expected the same number of experts"):
        import_speculative_moe_jsonl(p)


def _mixtral_parquet(tmp_path: Path) -> Path:
    out = tmp_path / "he.parquet"
    write_routing_trace(out, import_speculative_moe_jsonl(MIXTRAL_DIR / "humaneval_2_routing.jsonl", MIXTRAL_META))
    return out


def test_parquet_replay_follows_the_recorded_choices_and_checks_the_model(tmp_path):
    path = _mixtral_parquet(tmp_path)
    spec = ReplayRouting(kind="replay", path=str(path))
    rng = np.random.default_rng(0)
    replay = build_routing(spec, num_layers=32, num_experts=8, top_k=2, rng=rng, base_dir=tmp_path)
    back = read_routing_trace(path)
    counts = replay.counts([(1, 5, 1)])  # request 1 replays recorded request 1, token 5
    expected = np.zeros((32, 8), dtype=int)
    for layer in range(32):
        expected[layer, back.sequences[1].experts[5, layer]] = 1
    assert (counts == expected).all()
    with pytest.raises(TraceError, match=r"he\.parquet: recorded for mixtral-8x7b \(32 MoE layers, 8 experts, top-2\), "
                                         r"but the scenario's model has 16 MoE layers, 64 experts, top-8"):
        build_routing(spec, num_layers=16, num_experts=64, top_k=8, rng=rng, base_dir=tmp_path)


def test_a_simulation_replaying_parquet_matches_one_replaying_the_jsonl(tmp_path):
    """Same routing, two formats: identical expert-cache outcome."""
    parquet = _mixtral_parquet(tmp_path)

    def run(path: Path) -> dict:
        data = {
            "model": "mixtral-8x7b",
            "hardware": {"profile": "h100-80gb", "expert_memory": {"experts": 96}},
            "workload": {
                "arrivals": {"kind": "poisson", "rate_per_s": 0.0001, "prompt_tokens": {"dist": "fixed", "tokens": 1},
                             "output_tokens": {"dist": "fixed", "tokens": 60}},
                "routing": {"kind": "replay", "path": str(path)},
                "max_requests": 2,
            },
            "policies": {"expert_cache": {"name": "lru", "scope": "per_layer"}},
        }
        return summarize(simulate(resolve(parse_scenario(data, "r.yaml"), "r.yaml", tmp_path)))["expert_cache"]

    a, b = run(parquet), run(MIXTRAL_DIR / "humaneval_2_routing.jsonl")
    assert a["hit_rate"] == b["hit_rate"] and a["misses"] == b["misses"] > 0


# ---------------------------------------------------------------- CLI


def test_trace_convert_then_stats_then_fit_end_to_end(tmp_path, capsys):
    src = MIXTRAL_DIR / "gsm8k_2_routing.jsonl"
    out = tmp_path / "g.parquet"
    assert main(["trace", "convert", str(src), str(out), "--model", "mixtral-8x7b"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: 2 requests, 7,808 token-layers,")
    assert main(["trace", "stats", str(out), "--out", str(tmp_path / "st")]) == 0
    stats = json.loads((tmp_path / "st" / "routing_stats.json").read_text())
    assert stats["requests"] == 2 and stats["tokens"] == 244
    assert stats["hit_rate"]["sizes"] == list(range(1, 9))
    assert stats["hit_rate"]["static"]["overall"][-1] == 1.0  # every expert pinned
    assert (tmp_path / "st" / "hit_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "st" / "routing_stats.png").read_bytes()[:4] == b"\x89PNG"
    assert len(stats["layer_transitions"]["per_layer_pair"]["normalized_mi"]) == 31
    assert main(["trace", "fit-routing", str(out), "--out", str(tmp_path / "fit.yaml")]) == 0
    fitted = (tmp_path / "fit.yaml").read_text()
    assert "kind: fitted_routing" in fitted and "layer_coupling:" in fitted and "affinity:" in fitted
    assert "task_popularity:" in fitted  # the importer labels each sequence with its dataset


def test_trace_errors_are_one_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [0, 9], "gating_probs": [1, 0]}\n')
    assert main(["trace", "convert", str(bad), str(tmp_path / "o.parquet"), "--model", "mixtral-8x7b"]) == 2
    err = capsys.readouterr().err
    assert err == (f"moesim: error: {bad}:1: layer 0, experts [0, 9] do not fit mixtral-8x7b "
                   "(32 MoE layers, 8 experts, top-2)\n")
    assert main(["trace", "stats", str(tmp_path / "none.parquet")]) == 2
    assert capsys.readouterr().err == f"moesim: error: {tmp_path / 'none.parquet'}: no such routing trace\n"
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert main(["trace", "stats", str(tmp_path / "junk.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moesim: error: {tmp_path / 'junk.parquet'}: cannot read as a Parquet routing trace") and err.count("\n") == 1
