"""The canonical expert-routing trace: for each request, token position and MoE layer, the top-k expert
ids and their gate scores, in one Parquet file.

Columns (one row per request x token x MoE layer, written sorted by those three):

    request_id      int32     one recorded sequence (a prompt plus its output)
    token_position  int32     0-based position of the token in the request
    layer           int16     0-based MoE layer
    expert_0..k-1   int16     the top-k expert ids, highest gate score first
    gate_0..k-1     float16   their (renormalised) gate scores
    task            string    optional, dictionary-encoded (e.g. the dataset the prompt came from)

The file's key-value metadata holds ``moesim.routing_format`` (version), ``model``, ``num_layers``,
``num_experts`` and ``top_k``. Experts are k int16 columns rather than a list column so Parquet's
dictionary/RLE encoding bit-packs them (3 bits for 8 experts) and zstd removes the rest; the sorted
request/token/layer columns are nearly free. The Mixtral-8x7B top-2 trace in ../shared (18,464
token-layers) takes 3.9 bytes per token x layer with float16 gates and 0.9 bytes without them
(``gates=False``), footer included. A day of traffic at 1,000 tokens/s through 32 MoE layers is
2.8e9 token-layers: ~11 GB with gates, ~2.5 GB without; a sampled day (1 request in 10) is a few
hundred MB, which is what the simulator needs to replay.

Lifecycle of a file: ``RoutingTraceWriter`` opens it, ``append`` adds one row group per call (the
real runtime calls it once per finished request or batch of requests), ``close`` writes the footer.
``read_routing_trace`` returns per-request arrays ``experts[tokens, layers, top_k]``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from sim.errors import TraceError

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class RoutingTraceMeta:
    """What a routing trace was recorded from."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int

    def to_metadata(self) -> dict[bytes, bytes]:
        return {
            b"moesim.routing_format": FORMAT_VERSION.encode(),
            b"model": self.model.encode(),
            b"num_layers": str(self.num_layers).encode(),
            b"num_experts": str(self.num_experts).encode(),
            b"top_k": str(self.top_k).encode(),
        }


@dataclass(frozen=True)
class TraceSequence:
    """Routing of one request: expert ids ``[tokens, layers, top_k]`` (int16), gate scores of the same
    shape (float32, or None when not recorded), the token positions ``[tokens]`` and an optional task."""

    request_id: int
    experts: np.ndarray
    positions: np.ndarray
    gates: np.ndarray | None = None
    task: str | None = None


@dataclass
class RoutingTrace:
    """A whole routing trace in memory: the metadata and one ``TraceSequence`` per request."""

    meta: RoutingTraceMeta
    sequences: list[TraceSequence] = field(default_factory=list)

    @property
    def num_token_layers(self) -> int:
        return sum(s.experts.shape[0] for s in self.sequences) * self.meta.num_layers


def _schema(meta: RoutingTraceMeta, with_gates: bool, with_task: bool):
    import pyarrow as pa

    fields = [pa.field("request_id", pa.int32()), pa.field("token_position", pa.int32()), pa.field("layer", pa.int16())]
    fields += [pa.field(f"expert_{i}", pa.int16()) for i in range(meta.top_k)]
    if with_gates:
        fields += [pa.field(f"gate_{i}", pa.float16()) for i in range(meta.top_k)]
    if with_task:
        fields.append(pa.field("task", pa.dictionary(pa.int32(), pa.string())))
    return pa.schema(fields, metadata=meta.to_metadata())


class RoutingTraceWriter:
    """Streams a routing trace to Parquet, one row group per ``append``.

    Whether gate scores and a task column are present is fixed by the constructor, so every row
    group has the same schema."""

    def __init__(self, path: Path | str, meta: RoutingTraceMeta, *, gates: bool = True, task: bool = False) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.meta = meta
        self.with_gates = gates
        self.with_task = task
        self._schema = _schema(meta, gates, task)
        self._writer = pq.ParquetWriter(
            self.path, self._schema, compression="zstd", compression_level=9, use_dictionary=True,
            write_statistics=["request_id"],
        )
        self.num_rows = 0

    def append(
        self,
        request_id: int,
        experts: np.ndarray,
        gates: np.ndarray | None = None,
        *,
        positions: np.ndarray | None = None,
        task: str | None = None,
    ) -> None:
        """Add one request's routing: ``experts[tokens, layers, top_k]`` (and gates of the same shape)."""
        self.append_many([TraceSequence(request_id, experts, positions if positions is not None
                                        else np.arange(len(experts)), gates, task)])

    def append_many(self, sequences: Iterable[TraceSequence]) -> None:
        """Add several requests as one row group."""
        import pyarrow as pa

        m = self.meta
        cols: dict[str, list[np.ndarray]] = {}
        tasks: list[str] = []
        for seq in sequences:
            experts = np.asarray(seq.experts)
            if experts.ndim != 3 or experts.shape[1:] != (m.num_layers, m.top_k):
                raise TraceError(
                    f"{self.path}: request {seq.request_id}: expected experts [tokens, {m.num_layers}, {m.top_k}], "
                    f"got {list(experts.shape)}"
                )
            if experts.size and (experts.min() < 0 or experts.max() >= m.num_experts):
                raise TraceError(f"{self.path}: request {seq.request_id}: expert ids outside 0..{m.num_experts - 1}")
            t = experts.shape[0]
            pos = np.asarray(seq.positions, dtype=np.int32)
            if pos.shape != (t,):
                raise TraceError(f"{self.path}: request {seq.request_id}: {len(pos)} positions for {t} tokens")
            cols.setdefault("request_id", []).append(np.full(t * m.num_layers, seq.request_id, dtype=np.int32))
            cols.setdefault("token_position", []).append(np.repeat(pos, m.num_layers))
            cols.setdefault("layer", []).append(np.tile(np.arange(m.num_layers, dtype=np.int16), t))
            flat = experts.reshape(t * m.num_layers, m.top_k).astype(np.int16)
            for i in range(m.top_k):
                cols.setdefault(f"expert_{i}", []).append(flat[:, i])
            if self.with_gates:
                if seq.gates is None or np.shape(seq.gates) != experts.shape:
                    raise TraceError(f"{self.path}: request {seq.request_id}: gate scores must match the experts' shape")
                g = np.asarray(seq.gates, dtype=np.float16).reshape(t * m.num_layers, m.top_k)
                for i in range(m.top_k):
                    cols.setdefault(f"gate_{i}", []).append(g[:, i])
            if self.with_task:
                tasks.extend([seq.task or ""] * (t * m.num_layers))
        if not cols:
            return
        arrays = [pa.array(np.concatenate(cols[f.name])) for f in self._schema if f.name != "task"]
        if self.with_task:
            arrays.append(pa.array(tasks).dictionary_encode().cast(pa.dictionary(pa.int32(), pa.string())))
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        self._writer.write_table(table)
        self.num_rows += table.num_rows

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "RoutingTraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_routing_trace(path: Path | str, trace: RoutingTrace, *, row_group_requests: int = 256) -> None:
    """Write a whole trace (gates and task columns only if every sequence has them)."""
    with_gates = bool(trace.sequences) and all(s.gates is not None for s in trace.sequences)
    with_task = any(s.task for s in trace.sequences)
    with RoutingTraceWriter(path, trace.meta, gates=with_gates, task=with_task) as writer:
        for start in range(0, len(trace.sequences), row_group_requests):
            writer.append_many(trace.sequences[start : start + row_group_requests])


def read_routing_meta(path: Path | str) -> RoutingTraceMeta:
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: cannot read as a Parquet routing trace ({exc})") from None
    if b"moesim.routing_format" not in md:
        raise TraceError(f"{path}: not a moesim routing trace (no 'moesim.routing_format' metadata)")
    try:
        return RoutingTraceMeta(
            model=md[b"model"].decode(), num_layers=int(md[b"num_layers"]), num_experts=int(md[b"num_experts"]),
            top_k=int(md[b"top_k"]),
        )
    except (KeyError, ValueError) as exc:
        raise TraceError(f"{path}: routing trace metadata is incomplete ({exc})") from None


def read_routing_trace(path: Path | str, *, gates: bool = True) -> RoutingTrace:
    """Read a canonical trace into per-request arrays. Tokens that lack some layer are dropped (a
    partial record at the end of a recording); a row with an impossible value is an error naming its row."""
    import pyarrow.parquet as pq

    path = Path(path)
    meta = read_routing_meta(path)
    L, k, E = meta.num_layers, meta.top_k, meta.num_experts
    table = pq.read_table(path, use_threads=False)
    names = set(table.column_names)
    need = {"request_id", "token_position", "layer", *(f"expert_{i}" for i in range(k))}
    if not need <= names:
        raise TraceError(f"{path}: missing columns {sorted(need - names)}")
    req = table.column("request_id").to_numpy().astype(np.int64)
    pos = table.column("token_position").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64)
    experts = np.stack([table.column(f"expert_{i}").to_numpy() for i in range(k)], axis=1).astype(np.int16)
    has_gates = gates and all(f"gate_{i}" in names for i in range(k))
    gate_arr = (
        np.stack([table.column(f"gate_{i}").to_numpy() for i in range(k)], axis=1).astype(np.float32) if has_gates else None
    )
    task_col = table.column("task").to_pylist() if "task" in names else None
    bad = np.flatnonzero((layer < 0) | (layer >= L) | (experts < 0).any(axis=1) | (experts >= E).any(axis=1) | (pos < 0))
    if len(bad):
        r = int(bad[0])
        raise TraceError(
            f"{path}, row {r}: layer {layer[r]} / experts {experts[r].tolist()} / position {pos[r]} do not fit "
            f"{L} layers x {E} experts"
        )
    order = np.lexsort((layer, pos, req))
    req, pos, layer, experts = req[order], pos[order], layer[order], experts[order]
    if gate_arr is not None:
        gate_arr = gate_arr[order]
    # A token is kept when it has exactly one row per layer 0..L-1, in order.
    tok_key_change = np.flatnonzero((np.diff(req) != 0) | (np.diff(pos) != 0)) + 1
    starts = np.concatenate([[0], tok_key_change])
    ends = np.concatenate([tok_key_change, [len(req)]])
    complete = (ends - starts) == L
    if complete.any():
        ok_starts = starts[complete]
        idx = ok_starts[:, None] + np.arange(L)[None, :]
        complete[complete] = (layer[idx] == np.arange(L)[None, :]).all(axis=1)
    starts = starts[complete]
    sequences: list[TraceSequence] = []
    if len(starts):
        rows = starts[:, None] + np.arange(L)[None, :]  # [tokens, L]
        tok_req = req[starts]
        boundaries = np.flatnonzero(np.diff(tok_req) != 0) + 1
        for chunk in np.split(np.arange(len(starts)), boundaries):
            r = rows[chunk]
            rid = int(tok_req[chunk[0]])
            sequences.append(
                TraceSequence(
                    request_id=rid, experts=experts[r], positions=pos[starts[chunk]].astype(np.int32),
                    gates=None if gate_arr is None else gate_arr[r],
                    task=None if task_col is None else task_col[int(order[starts[chunk[0]]])],
                )
            )
    return RoutingTrace(meta=meta, sequences=sequences)


@dataclass(frozen=True)
class JsonlFields:
    """Field names of a JSONL routing table (defaults: the speculative-moe layout)."""

    sequence: str = "problem_id"
    token: str = "token_idx"
    layer: str = "layer"
    experts: str = "experts"
    gates: str = "gating_probs"
    group: str | None = "dataset"


def import_speculative_moe_jsonl(
    path: Path | str, meta: RoutingTraceMeta | None = None, *, model: str = "unknown",
    fields: JsonlFields = JsonlFields(),
) -> RoutingTrace:
    """Read a JSONL routing table: one object per (sequence, layer, token) with its expert ids and,
    optionally, gate scores (by default the speculative-moe layout: dataset/problem_id/layer/token_idx,
    ``experts``, ``gating_probs``). Request ids are given in order of first appearance of each
    (group, sequence); the group becomes the task. Sizes come from ``meta`` or from the data."""
    path = Path(path)
    f = fields
    recs: list[tuple[int, int, int, list[int], list[float]]] = []
    seq_ids: dict[tuple[str, str], int] = {}
    tasks: dict[int, str] = {}
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError:
        raise TraceError(f"{path}: cannot open routing trace") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (str(rec.get(f.group, "")) if f.group else "", str(rec[f.sequence]))
                experts = [int(e) for e in rec[f.experts]]
                probs = [float(g) for g in rec[f.gates]] if f.gates in rec else [float("nan")] * len(experts)
                row = (int(rec[f.token]), int(rec[f.layer]), experts, probs)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise TraceError(
                    f"{path}:{line_no}: expected a JSON object with '{f.sequence}', '{f.layer}', '{f.token}', "
                    f"'{f.experts}' and optionally '{f.gates}' ({type(exc).__name__}: {exc})"
                ) from None
            if len(probs) != len(experts) or (recs and len(experts) != len(recs[0][3])):
                raise TraceError(f"{path}:{line_no}: expected the same number of experts and gate scores on every line")
            if row[0] < 0 or row[1] < 0 or min(experts) < 0:
                raise TraceError(f"{path}:{line_no}: negative token_idx, layer or expert id")
            if meta is not None and (row[1] >= meta.num_layers or max(experts) >= meta.num_experts or len(experts) != meta.top_k):
                raise TraceError(
                    f"{path}:{line_no}: layer {row[1]}, experts {experts} do not fit {meta.model} "
                    f"({meta.num_layers} MoE layers, {meta.num_experts} experts, top-{meta.top_k})"
                )
            rid = seq_ids.setdefault(key, len(seq_ids))
            tasks[rid] = key[0]
            recs.append((rid, *row))
    if not recs:
        raise TraceError(f"{path}: no routing records")
    if meta is None:
        meta = RoutingTraceMeta(
            model=model, num_layers=max(r[2] for r in recs) + 1, num_experts=max(max(r[3]) for r in recs) + 1,
            top_k=len(recs[0][3]),
        )
    L, k = meta.num_layers, meta.top_k
    by_req: dict[int, dict[int, dict[int, tuple[list[int], list[float]]]]] = {}
    for rid, tok, layer, experts, probs in recs:
        by_req.setdefault(rid, {}).setdefault(tok, {})[layer] = (experts, probs)
    sequences = []
    for rid, tokens in by_req.items():
        complete = [t for t in sorted(tokens) if len(tokens[t]) == L]
        if not complete:
            continue
        ex = np.array([[tokens[t][layer][0] for layer in range(L)] for t in complete], dtype=np.int16).reshape(-1, L, k)
        gs = np.array([[tokens[t][layer][1] for layer in range(L)] for t in complete], dtype=np.float32).reshape(-1, L, k)
        sequences.append(TraceSequence(rid, ex, np.array(complete, dtype=np.int32), gs, tasks[rid] or None))
    if not sequences:
        raise TraceError(f"{path}: no token has routing for all {L} layers")
    return RoutingTrace(meta=meta, sequences=sequences)


def load_any_routing(path: Path | str, *, model: str = "unknown", meta: RoutingTraceMeta | None = None) -> RoutingTrace:
    """A canonical Parquet trace, or a speculative-moe JSONL table (chosen by suffix)."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such routing trace")
    if path.suffix == ".parquet":
        return read_routing_trace(path)
    return import_speculative_moe_jsonl(path, meta, model=model)
