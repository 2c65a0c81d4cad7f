"""Request arrivals: trace loaders, generators, transformations and the workload.arrivals specs."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from sim.errors import TraceError
from sim.workload.arrivals import (
    ArrivalSpec,
    GammaArrivals,
    PoissonArrivals,
    RequestTable,
    TraceArrivals,
    build_requests,
    load_trace,
    shipped_trace_path,
    shipped_traces,
)

ARRIVALS = TypeAdapter(ArrivalSpec)
# ../shared/data beside the checkout (CI lays a copy there); the Mooncake trace is read from it, not shipped.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOONCAKE_CONV = SHARED_DATA / "arrival_traces" / "mooncake_fast25" / "conversation_trace.jsonl"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def spec(**fields: Any) -> TraceArrivals | PoissonArrivals | GammaArrivals:
    return ARRIVALS.validate_python(fields)


def build(arrivals: dict[str, Any], *, seed: int = 0, base_dir: Path = Path("."), **kwargs: Any) -> RequestTable:
    return build_requests(spec(**arrivals), rng=np.random.default_rng(seed), base_dir=base_dir, **kwargs)


@pytest.fixture(scope="module")
def conv() -> RequestTable:
    return build({"kind": "trace", "path": "azure-2023-conv"})


def azure_rows(n: int) -> list[str]:
    """n good rows one second apart, prompt 100+i, output 10+i."""
    return [f"2023-11-16 18:00:{i:02d}.5000000,{100 + i},{10 + i}\n" for i in range(n)]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path


# --------------------------------------------------------------------------------------------------
# Shipped traces


def test_shipped_conv_trace_matches_published_summary(conv: RequestTable) -> None:
    """Published: 19,366 requests, 18:15-19:14 (about 58 min), mean prompt 1155, mean output 211 tokens."""
    s = conv.summary()
    assert s["count"] == 19_366
    assert s["duration_s"] / 60 == pytest.approx(58, rel=0.01)
    assert s["prompt_tokens_mean"] == pytest.approx(1155, rel=0.01)
    assert s["output_tokens_mean"] == pytest.approx(211, rel=0.01)
    assert s["rate_per_s"] == pytest.approx(19_366 / s["duration_s"])
    assert conv.arrival_s[0] == 0.0  # the first row is the trace start
    assert np.all(np.diff(conv.arrival_s) >= 0)
    assert conv.task is None and conv.skipped_rows == 0


def test_shipped_code_trace_matches_published_summary() -> None:
    s = build({"kind": "trace", "path": "azure-2023-code"}).summary()
    assert s["count"] == 8_819
    assert s["duration_s"] / 60 == pytest.approx(57, rel=0.01)
    assert s["prompt_tokens_mean"] == pytest.approx(2048, rel=0.01)
    assert s["output_tokens_mean"] == pytest.approx(28, rel=0.01)


def test_shipped_trace_is_the_upstream_file_gzipped() -> None:
    upstream = SHARED_DATA / "arrival_traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
    with shipped_trace_path("azure-2023-conv").open("rb") as f:
        assert gzip.decompress(f.read()) == upstream.read_bytes()


def test_shipped_traces_are_listed_and_found() -> None:
    assert set(shipped_traces()) == {"azure-2023-conv", "azure-2023-code"}
    for name in shipped_traces():
        assert shipped_trace_path(name).is_file()
    with pytest.raises(TraceError, match="unknown shipped trace 'nope'"):
        shipped_trace_path("nope")


def test_mooncake_conversation_trace() -> None:
    """Published: 12,031 requests over about 59 min, mean prompt 12,035 and output 343 tokens."""
    s = build({"kind": "trace", "path": str(MOONCAKE_CONV), "format": "mooncake"}).summary()
    assert s["count"] == 12_031
    assert s["duration_s"] / 60 == pytest.approx(59, rel=0.01)
    assert s["prompt_tokens_mean"] == pytest.approx(12_035, rel=0.01)
    assert s["output_tokens_mean"] == pytest.approx(343, rel=0.01)


# --------------------------------------------------------------------------------------------------
# Broken rows


BROKEN_AZURE_ROWS = [
    ("2023-11-16 18:00:09.0,abc,5\n", "ContextTokens is 'abc'; expected a whole number of tokens >= 1"),
    ("2023-11-16 18:00:09.0,0,5\n", "ContextTokens is '0'; expected a whole number of tokens >= 1"),
    ("2023-11-16 18:00:09.0,7,-3\n", "GeneratedTokens is '-3'; expected a whole number of tokens >= 1"),
    ("2023-11-16 18:00:09.0,7.5,3\n", "ContextTokens is '7.5'; expected a whole number of tokens >= 1"),
    ("2023-11-16 18:00:09.0,,3\n", "ContextTokens is empty"),
    ("2023-11-16 18:00:09.0,7\n", "has 2 fields; expected 3 fields"),
    ("yesterday,7,3\n", "TIMESTAMP is 'yesterday'; expected a date-time"),
    ("2023-11-16 17:59:00.0,7,3\n", "is earlier than an earlier row's (2.000000 s into the trace); expected rows in time order"),
]


@pytest.mark.parametrize(("bad_row", "why"), BROKEN_AZURE_ROWS)
def test_broken_row_names_file_line_and_expectation(tmp_path: Path, bad_row: str, why: str) -> None:
    """Header is line 1, good rows are lines 2-4, the broken row is line 5."""
    path = write(tmp_path / "broken.csv", [AZURE_HEADER, *azure_rows(3), bad_row, *azure_rows(6)[3:]])
    with pytest.raises(TraceError) as err:
        build({"kind": "trace", "path": "broken.csv", "format": "azure2023"}, base_dir=tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 5: ")
    assert why in message


def test_skip_mode_drops_and_counts_broken_rows(tmp_path: Path) -> None:
    lines = [AZURE_HEADER, *azure_rows(3), BROKEN_AZURE_ROWS[0][0], BROKEN_AZURE_ROWS[7][0], *azure_rows(6)[3:]]
    write(tmp_path / "broken.csv", lines)
    table = build({"kind": "trace", "path": "broken.csv", "format": "azure2023", "on_bad_row": "skip"}, base_dir=tmp_path)
    assert table.skipped_rows == 2
    assert table.summary()["skipped_rows"] == 2
    assert table.prompt_tokens.tolist() == [100, 101, 102, 103, 104, 105]
    assert table.arrival_s.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_skip_mode_times_from_the_first_good_row(tmp_path: Path) -> None:
    write(tmp_path / "t.csv", [AZURE_HEADER, "2023-11-16 18:00:00.0,0,1\n", *azure_rows(3)[1:]])
    table = build({"kind": "trace", "path": "t.csv", "format": "azure2023", "on_bad_row": "skip"}, base_dir=tmp_path)
    assert table.arrival_s.tolist() == [0.0, 1.0]


def test_blank_lines_are_ignored_but_still_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "blank.csv", [AZURE_HEADER, *azure_rows(2), "\n", "\n", "2023-11-16 18:00:09.0,x,1\n"])
    with pytest.raises(TraceError, match=r"blank\.csv, line 6: ContextTokens is 'x'"):
        build({"kind": "trace", "path": str(path), "format": "azure2023"})


def test_gzipped_trace_reports_line_numbers_too(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv.gz"
    path.write_bytes(gzip.compress("".join([AZURE_HEADER, *azure_rows(2), "2023-11-16 18:00:09.0,5\n"]).encode()))
    with pytest.raises(TraceError, match=r"broken\.csv\.gz, line 4: has 2 fields"):
        build({"kind": "trace", "path": str(path), "format": "azure2023"})


def test_broken_rows_beyond_the_first_chunk_keep_their_line_number(tmp_path: Path) -> None:
    base = pd.Timestamp("2023-11-16 18:00:00")
    rows = [f"{base + pd.Timedelta(milliseconds=i)},{1 + i % 7},{1 + i % 5}\n" for i in range(70_000)]
    rows[69_000] = rows[69_000].replace(",", ",-", 1)
    write(tmp_path / "big.csv", [AZURE_HEADER, *rows])
    with pytest.raises(TraceError, match=r"big\.csv, line 69002: ContextTokens is '-"):
        build({"kind": "trace", "path": "big.csv", "format": "azure2023"}, base_dir=tmp_path)


def test_missing_header_column_and_missing_file(tmp_path: Path) -> None:
    write(tmp_path / "h.csv", ["TIMESTAMP,Context,GeneratedTokens\n", "2023-11-16 18:00:00,1,1\n"])
    with pytest.raises(TraceError, match=r"h\.csv, line 1: the header has no column 'ContextTokens'"):
        build({"kind": "trace", "path": "h.csv", "format": "azure2023"}, base_dir=tmp_path)
    with pytest.raises(TraceError, match=r"absent\.csv: no such trace file"):
        build({"kind": "trace", "path": "absent.csv", "format": "azure2023"}, base_dir=tmp_path)


def test_mooncake_broken_lines(tmp_path: Path) -> None:
    good = '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}\n'
    cases = [
        ("{not json\n", "is not valid JSON"),
        ('{"timestamp": 5, "input_length": 10}\n', "output_length is missing; expected a whole number of tokens >= 1"),
        ('{"timestamp": -5, "input_length": 10, "output_length": 2}\n', "timestamp is -5; expected a number of milliseconds >= 0"),
        ('{"timestamp": 5, "input_length": true, "output_length": 2}\n', "input_length is True"),
        ("[1, 2]\n", "holds a JSON list"),
    ]
    for bad, why in cases:
        path = write(tmp_path / "m.jsonl", [good, good, bad])
        with pytest.raises(TraceError) as err:
            build({"kind": "trace", "path": str(path), "format": "mooncake"})
        assert str(err.value).startswith(f"{path}, line 3: ") and why in str(err.value)


# --------------------------------------------------------------------------------------------------
# Generic formats


def test_generic_csv_with_task_column_and_ms_times(tmp_path: Path) -> None:
    write(tmp_path / "g.csv", ["t_ms,task,in,out\n", "1500,chat,10,2\n", "2500,code,20,3\n"])
    columns = {"arrival": "t_ms", "prompt_tokens": "in", "output_tokens": "out", "task": "task"}
    table = build({"kind": "trace", "path": "g.csv", "format": "csv", "columns": columns, "time_unit": "ms"}, base_dir=tmp_path)
    assert table.arrival_s.tolist() == [1.5, 2.5]  # an offset from the trace start is kept, not moved to 0
    assert table.task is not None and table.task.tolist() == ["chat", "code"]
    assert list(table.to_frame().columns) == ["arrival_s", "prompt_tokens", "output_tokens", "task"]
    with pytest.raises(TraceError, match="has its own task column"):
        build({"kind": "trace", "path": "g.csv", "format": "csv", "columns": columns, "time_unit": "ms"},
              base_dir=tmp_path, task_mix={"chat": 1.0})


def test_generic_epoch_seconds_with_first_row_origin(tmp_path: Path) -> None:
    write(tmp_path / "e.csv", ["t,p,o\n", "1700000000.25,1,1\n", "1700000003.75,1,1\n"])
    columns = {"arrival": "t", "prompt_tokens": "p", "output_tokens": "o"}
    table = build({"kind": "trace", "path": "e.csv", "format": "csv", "columns": columns, "time_unit": "s",
                   "time_origin": "first_row"}, base_dir=tmp_path)
    assert table.arrival_s.tolist() == [0.0, 3.5]


def test_generic_jsonl_microseconds(tmp_path: Path) -> None:
    write(tmp_path / "g.jsonl", ['{"at": 2000000, "p": 5, "o": 6}\n', '{"at": 3500000, "p": 7, "o": 8}\n'])
    columns = {"arrival": "at", "prompt_tokens": "p", "output_tokens": "o"}
    table = build({"kind": "trace", "path": "g.jsonl", "format": "jsonl", "columns": columns, "time_unit": "us"},
                  base_dir=tmp_path)
    assert table.arrival_s.tolist() == [2.0, 3.5]
    assert table.output_tokens.tolist() == [6, 8]


def test_generic_parquet_datetime_and_broken_row(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "when": pd.to_datetime(["2024-01-01 00:00:00", "2024-01-01 00:00:02.5", "2024-01-01 00:00:04"], format="ISO8601"),
        "p": [10, 20, 30],
        "o": [1, 2, 0],
    })
    frame.to_parquet(tmp_path / "g.parquet")
    arrivals = {"kind": "trace", "path": "g.parquet", "format": "parquet", "time_unit": "datetime",
                "columns": {"arrival": "when", "prompt_tokens": "p", "output_tokens": "o"}}
    with pytest.raises(TraceError, match=r"g\.parquet, row 3: o is 0; expected a whole number"):
        build(arrivals, base_dir=tmp_path)
    table = build({**arrivals, "on_bad_row": "skip"}, base_dir=tmp_path)
    assert table.arrival_s.tolist() == [0.0, 2.5] and table.skipped_rows == 1


# --------------------------------------------------------------------------------------------------
# Transformations


def test_rate_scale_two_halves_the_span(conv: RequestTable) -> None:
    fast = build({"kind": "trace", "path": "azure-2023-conv", "rate_scale": 2.0})
    assert len(fast) == len(conv)
    assert fast.duration_s == pytest.approx(conv.duration_s / 2)
    np.testing.assert_allclose(fast.arrival_s, conv.arrival_s / 2)
    assert fast.summary()["rate_per_s"] == pytest.approx(2 * conv.summary()["rate_per_s"])


def test_window_keeps_the_requests_inside_and_times_them_from_its_start(conv: RequestTable) -> None:
    inside = (conv.arrival_s >= 600) & (conv.arrival_s < 1200)
    table = build({"kind": "trace", "path": "azure-2023-conv", "window_start_s": 600, "window_end_s": 1200})
    assert len(table) == inside.sum() > 0
    assert table.arrival_s.min() >= 0 and table.arrival_s.max() < 600
    np.testing.assert_allclose(table.arrival_s, conv.arrival_s[inside] - 600)
    np.testing.assert_array_equal(table.prompt_tokens, conv.prompt_tokens[inside])
    assert table.arrival_s[0] > 0  # the first request keeps its offset from the window start


def test_window_applies_before_rate_scale(conv: RequestTable) -> None:
    table = build({"kind": "trace", "path": "azure-2023-conv", "window_end_s": 600, "rate_scale": 4.0})
    assert len(table) == (conv.arrival_s < 600).sum()
    assert table.arrival_s.max() < 150


def test_sample_fraction_is_a_seeded_subset(conv: RequestTable) -> None:
    arrivals = {"kind": "trace", "path": "azure-2023-conv", "sample_fraction": 0.25}
    a, b, c = build(arrivals, seed=1), build(arrivals, seed=1), build(arrivals, seed=2)
    assert len(a) == round(0.25 * len(conv))
    assert np.isin(a.arrival_s, conv.arrival_s).all()
    assert a.equals(b) and not a.equals(c)


def test_limits_cut_a_trace(conv: RequestTable) -> None:
    assert len(build({"kind": "trace", "path": "azure-2023-conv"}, max_requests=100)) == 100
    table = build({"kind": "trace", "path": "azure-2023-conv", "rate_scale": 2.0}, max_duration_s=300)
    assert len(table) == (conv.arrival_s / 2 < 300).sum()  # the limit is in replayed (scaled) time
    assert table.arrival_s.max() < 300


def test_table_columns_are_read_only(conv: RequestTable) -> None:
    with pytest.raises(ValueError):
        conv.arrival_s[0] = 5.0


# --------------------------------------------------------------------------------------------------
# Generators


FIXED = {"dist": "fixed", "tokens": 100}
POISSON = {"kind": "poisson", "rate_per_s": 10.0, "prompt_tokens": FIXED, "output_tokens": FIXED}


def test_poisson_mean_rate_and_exponential_gaps() -> None:
    """20,000 arrivals at 10/s: the rate's standard error is 0.7 %, so 3 % is a loose bound."""
    table = build(POISSON, seed=7, max_requests=20_000)
    assert len(table) == 20_000
    assert len(table) / table.duration_s == pytest.approx(10.0, rel=0.03)
    gaps = np.diff(table.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert table.arrival_s[0] > 0


def test_same_seed_same_table_and_different_seed_different() -> None:
    a, b, c = (build(POISSON, seed=s, max_duration_s=100, task_mix={"x": 1, "y": 1}) for s in (3, 3, 4))
    assert a.equals(b)
    assert not a.equals(c)


def test_generator_duration_limit() -> None:
    table = build(POISSON, seed=1, max_duration_s=1000)
    assert table.arrival_s.max() < 1000
    assert len(table) == pytest.approx(10_000, rel=0.05)
    assert len(build(POISSON, seed=1, max_duration_s=1000, max_requests=50)) == 50


def test_generator_without_a_limit_is_refused() -> None:
    with pytest.raises(TraceError, match="needs a limit: set max_requests or max_duration_s"):
        build(POISSON)


@pytest.mark.parametrize("cv", [0.5, 2.5])
def test_gamma_gaps_have_the_asked_cv(cv: float) -> None:
    table = build({**POISSON, "kind": "gamma", "cv": cv}, seed=11, max_requests=50_000)
    gaps = np.diff(table.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert len(table) / table.duration_s == pytest.approx(10.0, rel=0.05)


def test_empirical_pairs_come_from_the_trace(conv: RequestTable) -> None:
    empirical = {"dist": "empirical", "path": "azure-2023-conv"}
    table = build({**POISSON, "prompt_tokens": empirical, "output_tokens": empirical}, max_requests=5_000)
    trace_pairs = set(zip(conv.prompt_tokens.tolist(), conv.output_tokens.tolist()))
    assert set(zip(table.prompt_tokens.tolist(), table.output_tokens.tolist())) <= trace_pairs
    assert table.prompt_tokens.mean() == pytest.approx(conv.prompt_tokens.mean(), rel=0.05)
    assert len(np.unique(table.prompt_tokens)) > 500


def test_empirical_prompt_with_fixed_output(conv: RequestTable) -> None:
    empirical = {"dist": "empirical", "path": "azure-2023-conv"}
    table = build({**POISSON, "prompt_tokens": empirical}, max_requests=2_000)
    assert np.isin(table.prompt_tokens, conv.prompt_tokens).all()
    assert (table.output_tokens == 100).all()


def test_uniform_and_lognormal_lengths() -> None:
    uniform = {"dist": "uniform", "low": 5, "high": 8}
    lognormal = {"dist": "lognormal", "mean": 1000.0, "sigma": 0.5, "max_tokens": 3000}
    table = build({**POISSON, "prompt_tokens": uniform, "output_tokens": lognormal}, max_requests=20_000)
    assert set(table.prompt_tokens.tolist()) == {5, 6, 7, 8}
    assert table.output_tokens.max() <= 3000
    assert table.output_tokens.mean() == pytest.approx(1000, rel=0.03)


def test_lognormal_fitted_to_a_trace(conv: RequestTable) -> None:
    fitted = {"dist": "lognormal", "fit_from": {"path": "azure-2023-conv"}}
    table = build({**POISSON, "prompt_tokens": fitted}, max_requests=20_000)
    assert np.median(table.prompt_tokens) == pytest.approx(np.exp(np.log(conv.prompt_tokens).mean()), rel=0.05)


def test_task_mix_labels_by_weight() -> None:
    table = build(POISSON, max_requests=20_000, task_mix={"chat": 3.0, "code": 1.0})
    assert table.task is not None
    assert set(table.task.tolist()) == {"chat", "code"}
    assert (table.task == "chat").mean() == pytest.approx(0.75, abs=0.02)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rate_per_s=st.floats(0.01, 1000),
    cv=st.floats(0.1, 5),
    max_requests=st.none() | st.integers(1, 500),
    max_duration_s=st.none() | st.floats(0.1, 100),
)
def test_generated_tables_respect_limits(seed, rate_per_s, cv, max_requests, max_duration_s) -> None:
    if max_requests is None and max_duration_s is None:
        max_requests = 10
    arrivals = {**POISSON, "kind": "gamma", "rate_per_s": rate_per_s, "cv": cv}
    table = build(arrivals, seed=seed, max_requests=max_requests, max_duration_s=max_duration_s)
    assert np.all(np.diff(table.arrival_s) >= 0) and np.all(table.arrival_s > 0)
    if max_requests is not None:
        assert len(table) <= max_requests
    if max_duration_s is not None:
        assert np.all(table.arrival_s < max_duration_s)


# --------------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"kind": "trace", "path": "x.csv"}, "format is required"),
        ({"kind": "trace", "path": "x.csv", "format": "csv"}, "needs columns"),
        ({"kind": "trace", "path": "azure-2023-conv", "time_unit": "ms"}, "fixed columns"),
        ({"kind": "trace", "path": "azure-2023-conv", "rate_scale": 0}, "greater than 0"),
        ({"kind": "trace", "path": "azure-2023-conv", "sample_fraction": 1.5}, "less than or equal to 1"),
        ({"kind": "trace", "path": "azure-2023-conv", "window_start_s": 9, "window_end_s": 3}, "must be after"),
        ({"kind": "trace", "path": "azure-2023-conv", "rate": 2}, "Extra inputs are not permitted"),
        ({**POISSON, "rate_per_s": -1}, "greater than 0"),
        ({**POISSON, "kind": "gamma"}, "cv"),
        ({**POISSON, "prompt_tokens": {"dist": "lognormal", "mean": 5}}, "either both mean and sigma"),
        ({**POISSON, "prompt_tokens": {"dist": "uniform", "low": 9, "high": 2}}, "must be >= low"),
        ({**POISSON, "prompt_tokens": {"dist": "fixed", "tokens": 0}}, "greater than or equal to 1"),
        ({**POISSON, "prompt_tokens": {"dist": "zipf"}}, "does not match any of the expected tags"),
    ],
)
def test_impossible_specs_are_rejected(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        ARRIVALS.validate_python(fields)


def test_specs_are_frozen_and_documented() -> None:
    trace = spec(kind="trace", path="azure-2023-conv")
    with pytest.raises(ValidationError):
        trace.rate_scale = 2.0  # type: ignore[misc]
    schema = ARRIVALS.json_schema()
    undocumented = [
        f"{model}.{name}"
        for model, definition in schema["$defs"].items()
        for name, prop in definition.get("properties", {}).items()
        if "description" not in prop
    ]
    assert undocumented == []
