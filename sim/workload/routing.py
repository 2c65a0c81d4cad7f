"""Expert routing: which experts the tokens of an iteration select, per MoE layer.

The engine asks a routing source for a token-count matrix ``[moe_layer, expert]`` for the tokens of
one iteration, given as segments (request id, first token position, number of tokens). Generators
draw top-k choices per token (Plackett-Luce over per-layer popularities, i.e. Gumbel top-k); replay
reads the choices a real model made, recorded per sequence, token and layer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sim.errors import TraceError

Segment = tuple[int, int, int]  # (request_id, first_token_position, num_tokens)

# Up to this many tokens an iteration's choices are drawn token by token (exact top-k without
# replacement); above it, per-layer counts are drawn from a multinomial over the same marginals
# (the number of distinct experts then differs from exact sampling by about 1-2%).
EXACT_TOKENS_MAX = 16
_MARGINAL_SAMPLES = 20_000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UniformRouting(_Spec):
    """Every expert equally likely, independently per token and layer (a balanced router)."""

    kind: Literal["uniform"] = "uniform"


class ZipfRouting(_Spec):
    """Skewed popularity: in each layer the expert of rank r has weight 1/r^exponent, ranks shuffled per layer."""

    kind: Literal["zipf"]
    exponent: float = Field(1.0, ge=0, description="0 is uniform; larger is more skewed.")


class ReplayRouting(_Spec):
    """Replay recorded routing: one JSON object per (sequence, layer, token) with its top-k expert ids.

    Request i replays recorded sequence i mod S; token positions past a sequence's end wrap around."""

    kind: Literal["replay"]
    path: str = Field(description="JSONL file, relative to the scenario's folder.")
    sequence_field: str = "problem_id"
    token_field: str = "token_idx"
    layer_field: str = "layer"
    experts_field: str = "experts"
    group_field: str | None = Field("dataset", description="Optional field that, with sequence_field, names a sequence.")


RoutingSpec = Annotated[UniformRouting | ZipfRouting | ReplayRouting, Field(discriminator="kind")]


class RoutingSource(Protocol):
    """Gives the token count per (MoE layer, expert) for the tokens of one iteration."""

    num_layers: int
    num_experts: int

    def counts(self, segments: Sequence[Segment]) -> np.ndarray: ...


class GeneratedRouting:
    """Top-k choices drawn per token from per-layer expert weights, with a seeded Generator."""

    def __init__(self, weights: np.ndarray, top_k: int, rng: np.random.Generator) -> None:
        if weights.ndim != 2 or top_k > weights.shape[1]:
            raise ValueError(f"need weights [layers, experts] with at least top_k={top_k} experts")
        self.num_layers, self.num_experts = weights.shape
        self.top_k = top_k
        self._rng = rng
        p = weights / weights.sum(axis=1, keepdims=True)
        self._log_p = np.log(p)
        self._uniform = bool(np.allclose(p, p[:, :1]))
        # Marginal probability that a token picks each expert (sums to top_k per layer).
        self._inclusion = self._inclusion_probabilities(p)

    def _inclusion_probabilities(self, p: np.ndarray) -> np.ndarray:
        if self._uniform:
            return np.full_like(p, self.top_k / self.num_experts)
        # Plackett-Luce inclusion probabilities have no closed form: estimate them once with a
        # fixed private stream, so the run's own stream is not consumed by this set-up step.
        est_rng = np.random.default_rng(12345)
        L, E = self.num_layers, self.num_experts
        counts = np.zeros(L * E, dtype=np.int64)
        chunk = max(1, 2_000_000 // (L * E))  # bounded memory for models with many experts
        for start in range(0, _MARGINAL_SAMPLES, chunk):
            picks = self._top_k(est_rng, min(chunk, _MARGINAL_SAMPLES - start))
            flat = picks + (np.arange(L) * E)[None, :, None]
            counts += np.bincount(flat.ravel(), minlength=L * E)
        return counts.reshape(L, E) / _MARGINAL_SAMPLES

    def _top_k(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n, layers, top_k] expert ids: Gumbel top-k = sampling k experts without replacement."""
        keys = self._log_p[None, :, :] + rng.gumbel(size=(n, self.num_layers, self.num_experts))
        return np.argpartition(-keys, self.top_k - 1, axis=2)[:, :, : self.top_k]

    def counts(self, segments: Sequence[Segment]) -> np.ndarray:
        n = int(sum(seg[2] for seg in segments))
        L, E = self.num_layers, self.num_experts
        if n == 0:
            return np.zeros((L, E), dtype=np.int64)
        if n <= EXACT_TOKENS_MAX:
            picks = self._top_k(self._rng, n)
            flat = picks + (np.arange(L) * E)[None, :, None]
            return np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)
        # Many tokens: counts follow a multinomial of n*k draws over the inclusion marginals,
        # clipped at n (a token picks an expert at most once).
        pvals = self._inclusion / self.top_k
        drawn = self._rng.multinomial(n * self.top_k, pvals)
        return np.minimum(drawn, n)


def zipf_weights(num_layers: int, num_experts: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Per layer, weight 1/rank^exponent with the ranks shuffled, so each layer has its own hot experts."""
    base = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** exponent
    return np.stack([rng.permutation(base) for _ in range(num_layers)])


@dataclass(frozen=True)
class RecordedSequence:
    """Routing of one recorded sequence: expert ids [tokens, layers, top_k]."""

    name: str
    experts: np.ndarray


class ReplayedRouting:
    """Routing replayed from recorded sequences; request i follows sequence i mod S."""

    def __init__(self, sequences: list[RecordedSequence], num_experts: int) -> None:
        if not sequences:
            raise ValueError("no recorded sequences")
        self.sequences = sequences
        self.num_layers = sequences[0].experts.shape[1]
        self.num_experts = num_experts

    def counts(self, segments: Sequence[Segment]) -> np.ndarray:
        L, E = self.num_layers, self.num_experts
        chunks = []
        for request_id, start, n in segments:
            if n <= 0:
                continue
            seq = self.sequences[request_id % len(self.sequences)].experts
            positions = (start + np.arange(n)) % seq.shape[0]
            chunks.append(seq[positions])
        if not chunks:
            return np.zeros((L, E), dtype=np.int64)
        picks = np.concatenate(chunks)
        flat = picks + (np.arange(L) * E)[None, :, None]
        return np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)


def load_routing_jsonl(path: Path, spec: ReplayRouting, *, num_layers: int, num_experts: int, top_k: int) -> ReplayedRouting:
    """Read a JSONL routing table; every row error names the file and line."""
    rows: dict[str, dict[int, dict[int, list[int]]]] = {}
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
                seq = f"{rec[spec.group_field]}/{rec[spec.sequence_field]}" if spec.group_field else str(rec[spec.sequence_field])
                layer = int(rec[spec.layer_field])
                token = int(rec[spec.token_field])
                experts = [int(e) for e in rec[spec.experts_field]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise TraceError(
                    f"{path}:{line_no}: expected a JSON object with '{spec.sequence_field}', '{spec.layer_field}', "
                    f"'{spec.token_field}' and a list '{spec.experts_field}' ({type(exc).__name__}: {exc})"
                ) from None
            if not 0 <= layer < num_layers:
                raise TraceError(f"{path}:{line_no}: layer {layer} is outside the model's {num_layers} MoE layers")
            if len(experts) != top_k or min(experts) < 0 or max(experts) >= num_experts:
                raise TraceError(
                    f"{path}:{line_no}: expected {top_k} expert ids in 0..{num_experts - 1}, got {experts}"
                )
            rows.setdefault(seq, {}).setdefault(token, {})[layer] = experts
    sequences = []
    for name, tokens in rows.items():
        complete = [t for t in sorted(tokens) if len(tokens[t]) == num_layers]
        if not complete:
            continue
        arr = np.array([[tokens[t][layer] for layer in range(num_layers)] for t in complete], dtype=np.int64)
        sequences.append(RecordedSequence(name=name, experts=arr))
    if not sequences:
        raise TraceError(f"{path}: no token has routing for all {num_layers} layers")
    return ReplayedRouting(sequences, num_experts)


def build_routing(
    spec: UniformRouting | ZipfRouting | ReplayRouting,
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    rng: np.random.Generator,
    base_dir: Path,
) -> RoutingSource:
    """The routing source a scenario asks for, sized for the model."""
    if isinstance(spec, UniformRouting):
        return GeneratedRouting(np.ones((num_layers, num_experts)), top_k, rng)
    if isinstance(spec, ZipfRouting):
        return GeneratedRouting(zipf_weights(num_layers, num_experts, spec.exponent, rng), top_k, rng)
    path = Path(spec.path)
    if not path.is_absolute():
        path = base_dir / path
    return load_routing_jsonl(path, spec, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
