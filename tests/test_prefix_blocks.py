"""Prefix-block ids in the request table: loaders (Mooncake hash_ids, generic csv / jsonl / parquet), every
transformation, broken cells, and the prefix-reuse figures of ``moesim trace fit``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter

from sim.cli import main
from sim.errors import TraceError
from sim.workload.arrivals import ArrivalSpec, RequestTable, TraceFile, build_requests, load_trace
from sim.workload.prefix_reuse import prefix_reuse, reuse_infinite, reuse_lru

MOONCAKE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "arrival_traces" / "mooncake_fast25" / "conversation_trace.jsonl"
)
BLOCKS = [[1, 2], [], [3], [1, 2, 4], [5, 6, 7]]


def _table() -> RequestTable:
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in BLOCKS])])
    return RequestTable(
        np.array([0.0, 1.0, 2.0, 3.0, 4.0]), np.array([10, 20, 30, 40, 50]), np.array([1, 2, 3, 4, 5]),
        prefix_blocks=np.concatenate([np.array(b, dtype=np.int64) for b in BLOCKS]), prefix_offsets=offsets,
    )


def _rows(table: RequestTable) -> list[list[int]]:
    return [table.blocks_of(i).tolist() for i in range(len(table))]


def test_every_transformation_keeps_each_requests_blocks() -> None:
    t = _table()
    assert _rows(t) == BLOCKS
    assert _rows(t.window(1.0, 4.0)) == BLOCKS[1:4]
    assert _rows(t.scale_rate(2.0)) == BLOCKS
    assert _rows(t.limit(max_requests=2)) == BLOCKS[:2]
    assert _rows(t.limit(max_duration_s=3.5)) == BLOCKS[:4]
    assert _rows(t.with_tasks(np.array(list("abcde")))) == BLOCKS
    picked = t.sample(0.6, np.random.default_rng(3))
    # The sample keeps whole rows: each request's blocks still match its prompt length's row in BLOCKS.
    assert _rows(picked) == [BLOCKS[int(p) // 10 - 1] for p in picked.prompt_tokens]
    assert t.window(5.0).prefix_offsets.tolist() == [0]
    assert t.to_frame()["num_prefix_blocks"].tolist() == [2, 0, 1, 3, 3]
    assert t.equals(t.scale_rate(1.0))
    other = RequestTable(t.arrival_s, t.prompt_tokens, t.output_tokens, prefix_blocks=t.prefix_blocks[::-1],
                         prefix_offsets=t.prefix_offsets)
    assert not t.equals(other)


def test_table_rejects_inconsistent_offsets() -> None:
    with pytest.raises(ValueError, match="prefix_offsets"):
        RequestTable(np.zeros(2), np.ones(2), np.ones(2), prefix_blocks=np.arange(3), prefix_offsets=np.array([0, 2, 2]))
    with pytest.raises(ValueError, match="both"):
        RequestTable(np.zeros(2), np.ones(2), np.ones(2), prefix_blocks=np.arange(3))


def _write_generic(tmp_path: Path) -> dict[str, Path]:
    rows = [(0.0, 10, 2, [1, 2]), (0.5, 11, 3, []), (1.0, 12, 4, [2, 9])]
    csv = tmp_path / "t.csv"
    csv.write_text("t,p,o,blocks\n0.0,10,2,1 2\n0.5,11,3,\n1.0,12,4,2;9\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"t": t, "p": p, "o": o, "blocks": b}) + "\n" for t, p, o, b in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"t": [r[0] for r in rows], "p": [r[1] for r in rows], "o": [r[2] for r in rows],
                             "blocks": pa.array([r[3] for r in rows], type=pa.list_(pa.int64()))}), parquet)
    return {"csv": csv, "jsonl": jsonl, "parquet": parquet}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_generic_loaders_read_the_mapped_prefix_column(tmp_path: Path, fmt: str) -> None:
    path = _write_generic(tmp_path)[fmt]
    spec = TraceFile(path=str(path), format=fmt, time_unit="s",
                     columns={"arrival": "t", "prompt_tokens": "p", "output_tokens": "o", "prefix_blocks": "blocks"})
    table = load_trace(spec, base_dir=tmp_path)
    assert _rows(table) == [[1, 2], [], [2, 9]]
    plain = TraceFile(path=str(path), format=fmt, time_unit="s", columns={"arrival": "t", "prompt_tokens": "p", "output_tokens": "o"})
    assert load_trace(plain, base_dir=tmp_path).prefix_blocks is None


@pytest.mark.parametrize("fmt,bad_line,cell", [
    ("csv", "t,p,o,blocks\n0,1,1,1 2\n1,1,1,3 x\n", "'3 x'"),
    ("csv", "t,p,o,blocks\n0,1,1,1 2\n1,1,1,2.5\n", "'2.5'"),
    ("jsonl", '{"t":0,"p":1,"o":1,"blocks":[1]}\n{"t":1,"p":1,"o":1,"blocks":[1, 2.5]}\n', "[1, 2.5]"),
    ("jsonl", '{"t":0,"p":1,"o":1,"blocks":[1]}\n{"t":1,"p":1,"o":1,"blocks":"1 2"}\n', None),
    ("jsonl", '{"t":0,"p":1,"o":1,"blocks":[1]}\n{"t":1,"p":1,"o":1}\n', "missing"),
    ("jsonl", '{"t":0,"p":1,"o":1,"blocks":[1]}\n{"t":1,"p":1,"o":1,"blocks":[true]}\n', "[True]"),
])
def test_a_broken_prefix_cell_names_file_and_line_or_is_skipped(tmp_path: Path, fmt: str, bad_line: str, cell) -> None:
    f = tmp_path / f"bad.{fmt}"
    f.write_text(bad_line)
    columns = {"arrival": "t", "prompt_tokens": "p", "output_tokens": "o", "prefix_blocks": "blocks"}
    if cell is None:  # a JSON string is a CSV-style list: accepted
        table = load_trace(TraceFile(path=str(f), format=fmt, time_unit="s", columns=columns), base_dir=tmp_path)
        assert _rows(table) == [[1], [1, 2]]
        return
    with pytest.raises(TraceError) as err:
        load_trace(TraceFile(path=str(f), format=fmt, time_unit="s", columns=columns), base_dir=tmp_path)
    msg = str(err.value)
    line = 3 if fmt == "csv" else 2  # the csv header is line 1
    assert msg.startswith(f"{f}, line {line}: blocks is {cell}; expected a list of whole-number block ids") and "\n" not in msg
    table = load_trace(TraceFile(path=str(f), format=fmt, time_unit="s", columns=columns, on_bad_row="skip"), base_dir=tmp_path)
    assert table.skipped_rows == 1 and _rows(table) == [[1, 2] if fmt == "csv" else [1]]


def test_mooncake_loader_reads_hash_ids_and_the_scenario_transformations_carry_them(tmp_path: Path) -> None:
    lines = [{"timestamp": 1000 * i, "input_length": 600 * (i + 1), "output_length": 5, "hash_ids": list(range(i + 2))}
             for i in range(6)]
    lines.insert(3, {"timestamp": 2500, "input_length": 1, "output_length": 1, "hash_ids": "broken"})
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = TypeAdapter(ArrivalSpec).validate_python({
        "kind": "trace", "path": "m.jsonl", "format": "mooncake", "on_bad_row": "skip",
        "window_start_s": 1.0, "window_end_s": 5.0, "rate_scale": 2.0, "sample_fraction": 1.0,
    })
    table = build_requests(spec, rng=np.random.default_rng(0), base_dir=tmp_path, max_requests=3, task_mix={"chat": 1.0})
    assert table.skipped_rows == 1
    assert table.arrival_s.tolist() == [0.0, 0.5, 1.0]
    assert _rows(table) == [list(range(3)), list(range(4)), list(range(5))]
    assert table.task.tolist() == ["chat"] * 3


@pytest.mark.skipif(not MOONCAKE.exists(), reason="needs ../shared/data/arrival_traces/mooncake_fast25")
def test_real_mooncake_trace_has_one_block_per_512_prompt_tokens_and_its_reuse() -> None:
    table = load_trace(TraceFile(path=str(MOONCAKE), format="mooncake"), base_dir=Path("."))
    assert len(table) == 12031
    assert np.array_equal(np.diff(table.prefix_offsets), np.ceil(table.prompt_tokens / 512).astype(np.int64))
    seen: set[int] = set()
    repeats = 0
    for b in table.prefix_blocks.tolist():
        repeats += b in seen
        seen.add(b)
    assert reuse_infinite(table.prefix_blocks) == pytest.approx(repeats / len(table.prefix_blocks))
    # An LRU as large as the number of distinct blocks never evicts, so it equals the infinite cache.
    assert reuse_lru(table.prefix_blocks, len(seen)) == pytest.approx(repeats / len(table.prefix_blocks))
    assert 0.3 < repeats / len(table.prefix_blocks) < 0.45  # Mooncake's shared system prompts and multi-turn chats


def test_lru_reuse_by_hand() -> None:
    blocks = np.array([1, 2, 3, 1, 4, 2, 1])
    # capacity 2: 1 2 3(evict 1) 1(miss, evict 2) 4(evict 3) 2(miss) 1(miss) -> 0 hits
    assert reuse_lru(blocks, 2) == 0.0
    # capacity 3: 1 2 3 | 1 hit | 4 evicts 2 | 2 miss evicts 3 | 1 hit -> 2 of 7
    assert reuse_lru(blocks, 3) == pytest.approx(2 / 7)
    assert reuse_infinite(blocks) == pytest.approx(3 / 7)
    out = prefix_reuse(blocks, np.array([0, 3, 5, 7]), [3])
    assert out["distinct_blocks"] == 4 and out["reuse_lru"] == {3: round(2 / 7, 5)}
    assert math.isnan(reuse_infinite(np.zeros(0, dtype=np.int64)))


def test_trace_fit_prints_prefix_reuse(tmp_path: Path, capsys) -> None:
    f = tmp_path / "t.csv"
    rows = ["t,p,o,blocks"] + [f"{i},{100 + i},{1 + i % 3},0;{i % 4 + 1}" for i in range(40)]
    f.write_text("\n".join(rows) + "\n")
    out_yaml = tmp_path / "g.yaml"
    assert main(["trace", "fit", str(f), "--columns", "t,p,o", "--prefix-column", "blocks",
                 "--prefix-lru-blocks", "2,5", "--out", str(out_yaml)]) == 0
    text = capsys.readouterr().out
    # 80 block references, 5 distinct ids (0..4): 75 already seen; LRU of 2 keeps only block 0 hitting (40 - 1 misses),
    # LRU of 5 holds them all.
    assert "prefix blocks: 80 in prompts (2.0 per request), 5 distinct; already seen earlier (infinite cache) 93.8%" in text
    assert "LRU of 2 blocks 48.8%, LRU of 5 blocks 93.8%" in text
    import yaml

    assert yaml.safe_load(out_yaml.read_text())["fit_report"]["prefix_reuse"]["reuse_infinite_cache"] == 0.9375
    assert main(["trace", "fit", "azure-2023-conv", "--prefix-column", "x"]) == 2
    assert "--prefix-column needs --columns" in capsys.readouterr().err
    for bad in ("2,x", "0"):  # not a whole number of blocks >= 1: one line, no traceback
        assert main(["trace", "fit", str(f), "--columns", "t,p,o", "--prefix-column", "blocks",
                     "--prefix-lru-blocks", bad]) == 2
        assert f"--prefix-lru-blocks '{bad}': expected whole numbers of blocks >= 1" in capsys.readouterr().err
