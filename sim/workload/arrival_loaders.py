"""Read request traces (Azure 2023 CSV, Mooncake JSONL, generic CSV / JSONL / parquet) into plain arrays.

Files are streamed row by row with the ``csv`` / ``json`` modules, so every broken row can be named by its
1-based line number (a record's last line, should a quoted field span lines). The values are converted and
checked per chunk of rows with pandas/numpy, which keeps a 20k-row trace well under a second.

A row is broken when a field is missing, is not a number (or date-time), has a token count below 1 or not a
whole number, or its time is earlier than an earlier row's. ``on_bad_row="error"`` raises a TraceError for the
first one; ``"skip"`` drops each and counts it. Blank lines are ignored. ``.gz`` files are recognised by their
magic bytes, whatever their name."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd

from sim.errors import TraceError

TimeUnit = Literal["s", "ms", "us", "datetime"]
TimeOrigin = Literal["trace", "first_row"]
FileKind = Literal["csv", "jsonl", "parquet"]
OnBadRow = Literal["error", "skip"]

SECONDS_PER_UNIT: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds"}
_CHUNK_ROWS = 65_536
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class TraceLayout:
    """Which columns hold a request's fields, and how to turn the arrival column into seconds.

    ``time_origin="trace"``: numbers are already offsets from the trace start (Mooncake).
    ``time_origin="first_row"``: subtract the first good row's time (date-times, epoch stamps).
    ``prefix_blocks``: the column with the prompt's prefix-block ids (a list in JSON / parquet, ids separated by
    spaces or semicolons in CSV), or None."""

    arrival: str
    prompt_tokens: str
    output_tokens: str
    task: str | None
    time_unit: TimeUnit
    time_origin: TimeOrigin
    prefix_blocks: str | None = None

    @property
    def columns(self) -> list[str]:
        names = [self.arrival, self.prompt_tokens, self.output_tokens]
        names += [self.task] if self.task is not None else []
        return names + ([self.prefix_blocks] if self.prefix_blocks is not None else [])


AZURE_2023 = TraceLayout("TIMESTAMP", "ContextTokens", "GeneratedTokens", None, "datetime", "first_row")
MOONCAKE = TraceLayout("timestamp", "input_length", "output_length", None, "ms", "trace", "hash_ids")


@dataclass(frozen=True, slots=True)
class ParsedTrace:
    """The good rows of a trace file, in file order, and how many broken rows were skipped. Prefix blocks are
    flat: row i's ids are ``prefix_blocks[prefix_offsets[i]:prefix_offsets[i + 1]]`` (None without the column)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    task: np.ndarray | None
    skipped_rows: int
    prefix_blocks: np.ndarray | None = None
    prefix_offsets: np.ndarray | None = None


TraceSource = Path | Traversable


def read_trace(
    source: TraceSource,
    *,
    file_kind: FileKind,
    layout: TraceLayout,
    on_bad_row: OnBadRow = "error",
    name: str | None = None,
) -> ParsedTrace:
    """Read one trace file; ``name`` (default ``str(source)``) is how error messages call the file."""
    display = name if name is not None else str(source)
    if layout.time_unit == "datetime" and layout.time_origin == "trace":
        raise TraceError(f"{display}: date-time arrivals need time_origin 'first_row'")
    checker = _ChunkChecker(display, layout, on_bad_row, "row" if file_kind == "parquet" else "line")
    try:
        if file_kind == "parquet":
            chunks = _parquet_chunks(source, display, layout)
            for chunk in chunks:
                checker.add(chunk)
        else:
            with _open_text(source) as text:
                chunks = _csv_chunks(text, display, layout) if file_kind == "csv" else _jsonl_chunks(text, layout)
                for chunk in chunks:
                    checker.add(chunk)
    except TraceError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{display}: cannot read the file: {exc}") from exc
    return checker.result()


@dataclass(slots=True)
class _RawChunk:
    """Up to _CHUNK_ROWS rows as raw values, with their line (or row) numbers.

    ``broken`` maps a position in the chunk to why the row could not even be split into fields."""

    locs: list[int]
    arrival: list[Any]
    prompt: list[Any]
    output: list[Any]
    task: list[Any] | None
    broken: dict[int, str]
    prefix: list[Any] | None = None


def _new_chunk(with_task: bool, with_prefix: bool = False) -> _RawChunk:
    return _RawChunk([], [], [], [], [] if with_task else None, {}, [] if with_prefix else None)


@contextmanager
def _open_text(source: TraceSource) -> Iterator[IO[str]]:
    """The file as text, gunzipped when it starts with the gzip magic bytes."""
    with source.open("rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        if head == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield io.TextIOWrapper(unzipped, encoding="utf-8", newline="")
        else:
            yield io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _csv_chunks(text: IO[str], display: str, layout: TraceLayout) -> Iterator[_RawChunk]:
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        raise TraceError(f"{display}, line 1: the file is empty; expected a header line naming the columns")
    header = [h.strip() for h in header]
    if header and header[0].startswith("\ufeff"):
        header[0] = header[0][1:]
    missing = [c for c in layout.columns if c not in header]
    if missing:
        raise TraceError(f"{display}, line 1: the header has no column {', '.join(map(repr, missing))}; found {header}")
    num_fields = len(header)
    i_arr, i_pr, i_out = header.index(layout.arrival), header.index(layout.prompt_tokens), header.index(layout.output_tokens)
    i_task = header.index(layout.task) if layout.task is not None else None
    i_prefix = header.index(layout.prefix_blocks) if layout.prefix_blocks is not None else None
    expected = f"expected {num_fields} fields ({','.join(header)})"

    chunk = _new_chunk(i_task is not None, i_prefix is not None)
    for row in reader:
        if len(row) != num_fields:
            if not row:
                continue  # blank line
            chunk.broken[len(chunk.locs)] = f"has {len(row)} fields; {expected}"
            row = [None] * num_fields
        chunk.locs.append(reader.line_num)
        chunk.arrival.append(row[i_arr])
        chunk.prompt.append(row[i_pr])
        chunk.output.append(row[i_out])
        if chunk.task is not None:
            chunk.task.append(row[i_task])
        if chunk.prefix is not None:
            chunk.prefix.append(row[i_prefix])
        if len(chunk.locs) >= _CHUNK_ROWS:
            yield chunk
            chunk = _new_chunk(i_task is not None, i_prefix is not None)
    if chunk.locs:
        yield chunk


def _jsonl_chunks(text: IO[str], layout: TraceLayout) -> Iterator[_RawChunk]:
    with_prefix = layout.prefix_blocks is not None
    chunk = _new_chunk(layout.task is not None, with_prefix)
    for line_number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            chunk.broken[len(chunk.locs)] = f"is not valid JSON ({exc.msg}); expected one JSON object per line"
            obj = {}
        if not isinstance(obj, dict):
            chunk.broken[len(chunk.locs)] = f"holds a JSON {type(obj).__name__}; expected one JSON object per line"
            obj = {}
        chunk.locs.append(line_number)
        chunk.arrival.append(obj.get(layout.arrival))
        chunk.prompt.append(obj.get(layout.prompt_tokens))
        chunk.output.append(obj.get(layout.output_tokens))
        if chunk.task is not None:
            chunk.task.append(obj.get(layout.task))
        if chunk.prefix is not None:
            chunk.prefix.append(obj.get(layout.prefix_blocks))
        if len(chunk.locs) >= _CHUNK_ROWS:
            yield chunk
            chunk = _new_chunk(layout.task is not None, with_prefix)
    if chunk.locs:
        yield chunk


def _parquet_chunks(source: TraceSource, display: str, layout: TraceLayout) -> Iterator[_RawChunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TraceError(f"{display}: reading parquet needs pyarrow (pip install 'moesim[parquet]')") from None
    import pyarrow as pa

    with source.open("rb") as raw:
        try:
            parquet = pq.ParquetFile(raw)
            names = parquet.schema_arrow.names
            missing = [c for c in layout.columns if c not in names]
            if missing:
                raise TraceError(f"{display}: no column {', '.join(map(repr, missing))}; found {names}")
            first_row = 1
            for batch in parquet.iter_batches(batch_size=_CHUNK_ROWS, columns=layout.columns):
                cols = {c: batch.column(c) for c in layout.columns}
                n = batch.num_rows
                yield _RawChunk(
                    locs=list(range(first_row, first_row + n)),
                    arrival=cols[layout.arrival].to_numpy(zero_copy_only=False),
                    prompt=cols[layout.prompt_tokens].to_numpy(zero_copy_only=False),
                    output=cols[layout.output_tokens].to_numpy(zero_copy_only=False),
                    task=cols[layout.task].to_numpy(zero_copy_only=False) if layout.task is not None else None,
                    broken={},
                    prefix=cols[layout.prefix_blocks].to_pylist() if layout.prefix_blocks is not None else None,
                )
                first_row += n
        except pa.ArrowException as exc:
            raise TraceError(f"{display}: cannot read as parquet: {exc}") from exc


class _ChunkChecker:
    """Converts and checks chunks in file order, carrying the time order across chunks."""

    def __init__(self, display: str, layout: TraceLayout, on_bad_row: OnBadRow, loc_word: str) -> None:
        self.display = display
        self.layout = layout
        self.on_bad_row = on_bad_row
        self.loc_word = loc_word
        self.origin: float | int | None = None  # first good row's raw time (ns or unit value), for "first_row"
        self.latest_s = -np.inf
        self.skipped = 0
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.prefix_parts: list[tuple[np.ndarray, np.ndarray]] = []  # (flat ids, lengths) of the good rows

    def add(self, chunk: _RawChunk) -> None:
        n = len(chunk.locs)
        broken = np.zeros(n, dtype=bool)
        broken[list(chunk.broken)] = True
        raw_time, time_ok = self._time_values(chunk.arrival)
        prompt, prompt_ok = _token_values(chunk.prompt)
        output, output_ok = _token_values(chunk.output)
        if chunk.task is not None:
            task = np.array([None if v is None else str(v) for v in chunk.task], dtype=object)
            task_ok = np.array([bool(v) and not v.isspace() for v in task], dtype=bool)
        else:
            task, task_ok = None, np.ones(n, dtype=bool)
        if chunk.prefix is not None:
            prefix_ids, prefix_len, prefix_ok = _prefix_values(chunk.prefix)
        else:
            prefix_ids, prefix_len, prefix_ok = None, None, np.ones(n, dtype=bool)
        good = ~broken & time_ok & prompt_ok & output_ok & task_ok & prefix_ok

        if self.origin is None and self.layout.time_origin == "first_row" and good.any():
            self.origin = raw_time[np.argmax(good)]
        arrival_s = self._to_seconds(raw_time)

        # A row is out of order when it is earlier than any earlier good row (not just the one before it).
        good_s = np.where(good, arrival_s, -np.inf)
        earlier_max_s = np.maximum.accumulate(np.concatenate(([self.latest_s], good_s)))[:-1]
        backwards = good & (arrival_s < earlier_max_s)
        good &= ~backwards

        if not good.all():
            if self.on_bad_row == "error":
                i = int(np.argmin(good))
                why = chunk.broken.get(i) or self._why(
                    chunk, i, time_ok, prompt_ok, output_ok, task_ok, prefix_ok, earlier_max_s
                )
                raise TraceError(f"{self.display}, {self.loc_word} {chunk.locs[i]}: {why}")
            self.skipped += int(n - good.sum())
        if good.any():
            self.latest_s = max(self.latest_s, float(arrival_s[good].max()))
        self.parts.append(
            (arrival_s[good], prompt[good].astype(np.int64), output[good].astype(np.int64), None if task is None else task[good])
        )
        if prefix_ids is not None and prefix_len is not None:
            row_of_id = np.repeat(np.arange(n), prefix_len)
            self.prefix_parts.append((prefix_ids[good[row_of_id]], prefix_len[good]))

    def _time_values(self, values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Raw times (int64 ns for date-times, float in the file's unit otherwise) and which rows parsed."""
        array = values if isinstance(values, np.ndarray) else np.array(values, dtype=object)
        if self.layout.time_unit == "datetime":
            if np.issubdtype(array.dtype, np.datetime64):
                stamps = pd.DatetimeIndex(pd.to_datetime(array, utc=True))
            else:
                stamps = pd.DatetimeIndex(pd.to_datetime(array, format="ISO8601", errors="coerce", utc=True))
            return stamps.as_unit("ns").asi8, ~stamps.isna()
        number = _numbers(array)
        ok = np.isfinite(number)
        if self.layout.time_origin == "trace":
            ok &= number >= 0
        return number, ok

    def _to_seconds(self, raw_time: np.ndarray) -> np.ndarray:
        if self.layout.time_unit == "datetime":
            # Subtract in int64 first so nanosecond stamps keep their precision.
            origin = self.origin if self.origin is not None else 0
            return (raw_time - origin).astype(np.float64) / 1e9
        origin = self.origin if self.layout.time_origin == "first_row" and self.origin is not None else 0.0
        return (raw_time - origin) * SECONDS_PER_UNIT[self.layout.time_unit]

    def _why(self, chunk: _RawChunk, i: int, time_ok, prompt_ok, output_ok, task_ok, prefix_ok, earlier_max_s) -> str:
        layout = self.layout
        if not time_ok[i]:
            if layout.time_unit == "datetime":
                expected = "a date-time like 2023-11-16 18:15:46.6805900"
            elif layout.time_origin == "trace":
                expected = f"a number of {_UNIT_WORDS[layout.time_unit]} >= 0 from the trace start"
            else:
                expected = f"a number of {_UNIT_WORDS[layout.time_unit]}"
            return f"{layout.arrival} is {_show(chunk.arrival[i])}; expected {expected}"
        if not prompt_ok[i]:
            return f"{layout.prompt_tokens} is {_show(chunk.prompt[i])}; expected a whole number of tokens >= 1"
        if not output_ok[i]:
            return f"{layout.output_tokens} is {_show(chunk.output[i])}; expected a whole number of tokens >= 1"
        if not task_ok[i]:
            return f"{layout.task} is {_show(chunk.task[i] if chunk.task is not None else None)}; expected a task label"
        if not prefix_ok[i]:
            return f"{layout.prefix_blocks} is {_show(chunk.prefix[i])}; expected {_PREFIX_EXPECTED}"
        return (
            f"{layout.arrival} {_show(chunk.arrival[i])} is earlier than an earlier row's "
            f"({earlier_max_s[i]:.6f} s into the trace); expected rows in time order"
        )

    def result(self) -> ParsedTrace:
        with_prefix = self.layout.prefix_blocks is not None
        if with_prefix:
            ids = [p[0] for p in self.prefix_parts]
            lengths = np.concatenate([np.zeros(0, dtype=np.int64)] + [p[1] for p in self.prefix_parts])
            prefix_blocks = np.concatenate([np.zeros(0, dtype=np.int64)] + ids)
            prefix_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        else:
            prefix_blocks = prefix_offsets = None
        if not self.parts:
            empty = np.zeros(0, dtype=np.int64)
            task = np.zeros(0, dtype=object) if self.layout.task is not None else None
            return ParsedTrace(np.zeros(0), empty, empty.copy(), task, self.skipped, prefix_blocks, prefix_offsets)
        arrival, prompt, output, task = (list(p) for p in zip(*self.parts))
        return ParsedTrace(
            arrival_s=np.concatenate(arrival),
            prompt_tokens=np.concatenate(prompt),
            output_tokens=np.concatenate(output),
            task=None if self.layout.task is None else np.concatenate(task),
            skipped_rows=self.skipped,
            prefix_blocks=prefix_blocks,
            prefix_offsets=prefix_offsets,
        )


def _numbers(array: np.ndarray) -> np.ndarray:
    """float64 values; anything that is not a number (missing, text, true/false) becomes NaN."""
    if array.dtype.kind in "iuf":
        return array.astype(np.float64)
    if array.dtype == object:
        # JSON true/false would otherwise count as 1/0.
        array = np.array([None if isinstance(v, bool) else v for v in array], dtype=object)
    return np.asarray(pd.to_numeric(array, errors="coerce"), dtype=np.float64)


def _token_values(values: list[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array = values if isinstance(values, np.ndarray) else np.array(values, dtype=object)
    number = _numbers(array)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(number) & (number >= 1) & (number == np.floor(number))
    return np.where(ok, number, 1.0), ok


_PREFIX_EXPECTED = ("a list of whole-number block ids (JSON / parquet), or ids separated by spaces or semicolons (CSV)")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _prefix_values(values: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat int64 ids of all rows, ids per row, which rows parsed); a broken row contributes no ids.

    A cell is a list of integers (JSON, parquet; a numpy array from parquet too) or a string of integers separated
    by spaces or semicolons (CSV; empty = no blocks). Booleans, fractions and numbers beyond int64 are broken."""
    n = len(values)
    lengths = np.zeros(n, dtype=np.int64)
    ok = np.ones(n, dtype=bool)
    flat: list[int] = []
    for i, cell in enumerate(values):
        if isinstance(cell, str):
            try:
                ids = [int(tok) for tok in cell.replace(";", " ").split()]
            except ValueError:
                ok[i] = False
                continue
        elif isinstance(cell, (list, tuple, np.ndarray)):
            ids = cell.tolist() if isinstance(cell, np.ndarray) else list(cell)
            if not all(type(v) is int for v in ids):
                ok[i] = False
                continue
        else:
            ok[i] = False
            continue
        if ids and (min(ids) < _INT64_MIN or max(ids) > _INT64_MAX):
            ok[i] = False
            continue
        lengths[i] = len(ids)
        flat.extend(ids)
    return np.array(flat, dtype=np.int64), lengths, ok


def _show(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str) and value.strip() == "":
        return "empty"
    if isinstance(value, np.datetime64):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()  # numpy scalars from parquet: show 0, not np.int64(0)
    return repr(value)
