"""Expert routing: which experts the tokens of an iteration select, per MoE layer.

The engine asks a routing source for a token-count matrix ``[moe_layer, expert]`` for the tokens of
one iteration, given as segments (request id, first token position, number of tokens). Sources:

  uniform, zipf   memoryless generators: top-k per token (Plackett-Luce over per-layer popularities,
                  i.e. Gumbel top-k)
  markov          a generator with per-request state: per-layer popularity, token-to-token
                  persistence and a per-request working set (locality); defaults per model family
                  fitted to moe-lrc's real hit-rate curves (FAMILY_DEFAULTS)
  fitted          the markov generator with parameters fitted to a recorded trace (fit_routing)
  replay          the choices a real model made, from a canonical Parquet routing trace
                  (sim.workload.routing_trace) or a JSONL table, per sequence, token and layer"""

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
    """Replay recorded routing: a canonical Parquet routing trace (sim.workload.routing_trace), or a
    JSONL table with one object per (sequence, layer, token) and its top-k expert ids.

    Request i replays recorded sequence i mod S; token positions past a sequence's end wrap around."""

    kind: Literal["replay"]
    path: str = Field(description="Parquet or JSONL file, relative to the scenario's folder.")
    format: Literal["parquet", "jsonl"] | None = Field(
        None, description="Default: parquet for a .parquet file, jsonl otherwise. The *_field keys apply to jsonl."
    )
    sequence_field: str = "problem_id"
    token_field: str = "token_idx"
    layer_field: str = "layer"
    experts_field: str = "experts"
    group_field: str | None = Field("dataset", description="Optional field that, with sequence_field, names a sequence.")


class MarkovRouting(_Spec):
    """A generator for models without recorded routing: Zipf popularity per layer, token-to-token
    persistence (each of a token's top-k slots keeps the previous token's expert with probability
    ``persistence``) and per-request locality (other slots come from the request's working set with
    probability ``locality``, else from the popularity). ``family`` fills in what is not given from
    defaults fitted to moe-lrc's real hit-rate curves (see FAMILY_DEFAULTS)."""

    kind: Literal["markov"]
    family: str | None = Field(None, description="Model family whose fitted defaults to use, e.g. mixtral, deepseek.")
    zipf_exponent: float | None = Field(None, ge=0, description="Popularity skew per layer (0 is uniform).")
    persistence: float | None = Field(None, ge=0, le=1, description="P(a top-k slot keeps the previous token's expert).")
    locality: float | None = Field(
        None, ge=0, le=1, description="P(a new expert comes from the request's own working set rather than the popularity)."
    )
    hot_experts: int | None = Field(None, gt=0, description="Working-set size per layer; default 2 x top_k.")


class FittedRouting(_Spec):
    """A generator fitted to a recorded routing trace (``moesim trace fit-routing``): per-layer
    popularity and per-layer persistence, stored as YAML."""

    kind: Literal["fitted"]
    path: str = Field(description="Fitted routing parameters (YAML), relative to the scenario's folder.")


RoutingSpec = Annotated[
    UniformRouting | ZipfRouting | ReplayRouting | MarkovRouting | FittedRouting, Field(discriminator="kind")
]


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
        if self.top_k == E:  # every token picks every expert
            return np.full((L, E), n, dtype=np.int64)
        if n <= EXACT_TOKENS_MAX:
            picks = self._top_k(self._rng, n)
            flat = picks + (np.arange(L) * E)[None, :, None]
            return np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)
        # Many tokens: counts follow a multinomial of n*k draws over the inclusion marginals,
        # clipped at n (a token picks an expert at most once).
        pvals = self._inclusion / self.top_k
        drawn = self._rng.multinomial(n * self.top_k, pvals)
        return np.minimum(drawn, n)

    def counts_by_group(self, segments: Sequence[Segment], groups: Sequence[int], num_groups: int) -> np.ndarray:
        """Counts [group, layer, expert] when segment i belongs to ``groups[i]`` (expert parallelism:
        the rank holding the sequence); one draw for all groups where ``counts`` would draw once."""
        L, E = self.num_layers, self.num_experts
        sizes = np.zeros(num_groups, dtype=np.int64)
        for seg, g in zip(segments, groups):
            sizes[g] += seg[2]
        n = int(sizes.sum())
        if n <= EXACT_TOKENS_MAX and self.top_k < E and n:
            picks = self._top_k(self._rng, n)
            token_group = np.repeat(np.arange(num_groups), sizes)
            flat = picks + (np.arange(L) * E)[None, :, None] + (token_group * L * E)[:, None, None]
            return np.bincount(flat.ravel(), minlength=num_groups * L * E).reshape(num_groups, L, E)
        return np.stack([self.counts([(0, 0, int(m))]) for m in sizes])


def _alias_tables(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias tables per row of p [rows, n]: draw column j uniformly, keep it with
    probability prob[j], else take alias[j] -- O(1) per draw."""
    rows, n = p.shape
    prob = np.ones((rows, n))
    alias = np.tile(np.arange(n), (rows, 1))
    for r in range(rows):
        scaled = p[r] * n
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:
            s_i, l_i = small.pop(), large.pop()
            prob[r, s_i] = scaled[s_i]
            alias[r, s_i] = l_i
            scaled[l_i] -= 1.0 - scaled[s_i]
            (small if scaled[l_i] < 1.0 else large).append(l_i)
    return prob, alias


class MarkovGeneratedRouting(GeneratedRouting):
    """Generated routing with token-to-token persistence and a per-request working set.

    For each request the source remembers the expert ids its last token chose ``[layers, top_k]``,
    the position that follows, and (when ``locality`` > 0) a working set of ``hot_experts`` experts per
    layer drawn from the popularity when the request is first seen. A token continuing the request
    keeps each of the previous token's experts with probability ``persistence[layer]``; every other
    slot is drawn from the working set (uniformly) with probability ``locality``, else from the
    layer's popularity, rejecting experts already chosen. A request's first token, or a token at a
    position the source did not expect (recompute after preemption), has nothing to keep. Segments
    longer than EXACT_TOKENS_MAX (prefill chunks) take the multinomial path of ``GeneratedRouting``
    and leave the request at a fresh draw for its last token.

    Per call the cost is a few vectorised O(1) (alias-table) draws over [requests, layers, top_k] per
    token step, up to EXACT_TOKENS_MAX steps. State is kept for every request seen: about
    layers x (top_k + hot_experts) x 8 bytes each."""

    def __init__(
        self, weights: np.ndarray, top_k: int, persistence: np.ndarray, rng: np.random.Generator, *,
        locality: float = 0.0, hot_experts: int | None = None,
    ) -> None:
        super().__init__(weights, top_k, rng)
        L, E = self.num_layers, self.num_experts
        self.persistence = np.broadcast_to(np.asarray(persistence, dtype=np.float64), (L,)).copy()
        self.locality = float(locality)
        self.hot_experts = min(E, hot_experts or 2 * top_k)
        p = np.exp(self._log_p)
        self._p = p / p.sum(axis=1, keepdims=True)
        self._alias_prob, self._alias = _alias_tables(self._p)
        self._state: dict[int, tuple[int, np.ndarray, np.ndarray | None]] = {}

    def _hot_sets(self, rng: np.random.Generator, n: int) -> np.ndarray | None:
        """[n, L, hot_experts] working sets, Plackett-Luce draws from the popularity."""
        if self.locality <= 0:
            return None
        keys = self._log_p[None, :, :] + rng.gumbel(size=(n, self.num_layers, self.num_experts))
        return np.argpartition(-keys, self.hot_experts - 1, axis=2)[:, :, : self.hot_experts]

    def _draw(
        self, rng: np.random.Generator, prev: np.ndarray | None, has_prev: np.ndarray, hot: np.ndarray | None = None
    ) -> np.ndarray:
        """One token for each of R requests: [R, L, k] expert ids."""
        R = len(has_prev)
        L, E, k = self.num_layers, self.num_experts, self.top_k
        flat = np.full((R * L, k), -1, dtype=np.int64)  # row r * L + l
        if prev is not None and has_prev.any():
            keep = ((rng.random((R, L, k)) < self.persistence[None, :, None]) & has_prev[:, None, None]).reshape(R * L, k)
            flat[keep] = prev.reshape(R * L, k)[keep]
        hot_flat = None if hot is None else hot.reshape(R * L, -1)
        for slot in range(k):
            todo = np.flatnonzero(flat[:, slot] < 0)
            # A few rounds of draw-and-reject (cheap when experts are many), then an exact draw from
            # the popularity without the experts already chosen for what is left.
            for _ in range(3):
                if len(todo) == 0:
                    break
                lay = todo % L
                col = np.minimum((rng.random(len(todo)) * E).astype(np.int64), E - 1)
                e = np.where(rng.random(len(todo)) < self._alias_prob[lay, col], col, self._alias[lay, col])
                if hot_flat is not None:
                    use_hot = rng.random(len(todo)) < self.locality
                    pick = rng.integers(0, hot_flat.shape[1], size=len(todo))
                    e = np.where(use_hot, hot_flat[todo, pick], e)
                clash = (flat[todo] == e[:, None]).any(axis=1)
                flat[todo[~clash], slot] = e[~clash]
                todo = todo[clash]
            if len(todo):
                p = self._p[todo % L]
                chosen = flat[todo]
                rows = np.repeat(np.arange(len(todo)), k)
                valid = chosen.ravel() >= 0
                p[rows[valid], chosen.ravel()[valid]] = 0.0
                c = np.cumsum(p, axis=1)
                u = rng.random(len(todo)) * c[:, -1]
                e = np.minimum((c <= u[:, None]).sum(axis=1), E - 1)
                if hot_flat is not None:  # keep the locality: an unchosen working-set expert, if any is left
                    h = hot_flat[todo]
                    free = ~(h[:, :, None] == chosen[:, None, :]).any(axis=2)
                    keys = np.where(free, rng.random(h.shape), -1.0)
                    col = keys.argmax(axis=1)
                    use_hot = (rng.random(len(todo)) < self.locality) & free.any(axis=1)
                    e = np.where(use_hot, h[np.arange(len(todo)), col], e)
                flat[todo, slot] = e
        return flat.reshape(R, L, k)

    def _hot_of(self, request_id: int) -> np.ndarray | None:
        st = self._state.get(request_id)
        if st is not None:
            return st[2]
        hot = self._hot_sets(self._rng, 1)
        return None if hot is None else hot[0]

    def counts(self, segments: Sequence[Segment]) -> np.ndarray:
        return self.counts_by_group(segments, [0] * len(segments), 1)[0]

    def counts_by_group(self, segments: Sequence[Segment], groups: Sequence[int], num_groups: int) -> np.ndarray:
        """Counts [group, layer, expert], segment i in group ``groups[i]`` (see GeneratedRouting)."""
        L, E = self.num_layers, self.num_experts
        total = np.zeros(num_groups * L * E, dtype=np.int64)
        group_of = {seg[0]: g for seg, g in zip(segments, groups)}
        small = [seg for seg in segments if 0 < seg[2] <= EXACT_TOKENS_MAX]
        for request_id, start, n in segments:
            if n > EXACT_TOKENS_MAX:
                drawn = self._rng.multinomial(n * self.top_k, (self._inclusion / self.top_k))
                base = group_of[request_id] * L * E
                total[base : base + L * E] += np.minimum(drawn, n).ravel()
                hot = self._hot_of(request_id)
                last = self._draw(self._rng, None, np.zeros(1, dtype=bool), None if hot is None else hot[None])[0]
                self._state[request_id] = (start + n, last, hot)
        if small:
            offs = (np.arange(L) * E)[None, :, None]
            steps = max(seg[2] for seg in small)
            for j in range(steps):
                active = [seg for seg in small if seg[2] > j]
                prev = np.zeros((len(active), L, self.top_k), dtype=np.int64)
                has_prev = np.zeros(len(active), dtype=bool)
                hots = [] if self.locality > 0 else None
                for i, (request_id, start, _n) in enumerate(active):
                    st = self._state.get(request_id)
                    if st is not None and st[0] == start + j:
                        prev[i] = st[1]
                        has_prev[i] = True
                    if hots is not None:
                        hots.append(st[2] if st is not None else self._hot_of(request_id))
                hot = None if hots is None else np.stack(hots)
                picks = self._draw(self._rng, prev, has_prev, hot)
                if num_groups == 1:
                    total += np.bincount((picks + offs).ravel(), minlength=L * E)
                else:
                    goffs = np.array([group_of[seg[0]] * L * E for seg in active])[:, None, None]
                    total += np.bincount((picks + offs + goffs).ravel(), minlength=num_groups * L * E)
                for i, (request_id, start, _n) in enumerate(active):
                    self._state[request_id] = (start + j + 1, picks[i], None if hot is None else hot[i])
        return total.reshape(num_groups, L, E)

    def sequence(self, num_tokens: int) -> np.ndarray:
        """Expert ids [tokens, layers, top_k] for one request, token by token (for statistics)."""
        return self.sequences(1, num_tokens)[0]

    def like(self, lengths: Sequence[int]) -> list[np.ndarray]:
        """One generated request per length (generated together, then cut to length)."""
        full = self.sequences(len(lengths), max(lengths))
        return [seq[:n] for seq, n in zip(full, lengths)]

    def sequences(self, num_requests: int, num_tokens: int) -> list[np.ndarray]:
        """Expert ids for many requests at once, vectorised over requests: a list of [tokens, layers, top_k]."""
        out = np.empty((num_requests, num_tokens, self.num_layers, self.top_k), dtype=np.int64)
        hot = self._hot_sets(self._rng, num_requests)
        prev = None
        for t in range(num_tokens):
            picks = self._draw(self._rng, prev, np.full(num_requests, prev is not None), hot)
            out[:, t] = picks
            prev = picks
        return list(out)


# Defaults per model family, fitted to moe-lrc's real per-layer hit-rate curves (MIT, Liang et al.
# 2025) with routing_stats.fit_to_published_curves: zipf_exponent to the static curve at 1-4x top_k,
# then for locality in {0, .15, .3, .45, .6} persistence to the LRU curve at 2x and 4x top_k, keeping
# the locality that best matches LRU and LFU together (tests/test_routing_stats.py checks LRU within
# 0.05). Keys are moe-lrc's model keys; catalog names map to them by prefix (FAMILY_OF_MODEL).
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "deepseek": {"zipf_exponent": 0.3, "persistence": 0.211, "locality": 0.3},
    "grin": {"zipf_exponent": 0.8, "persistence": 0.356, "locality": 0.3},
    "jamba": {"zipf_exponent": 0.35, "persistence": 0.203, "locality": 0.15},
    "jetmoe": {"zipf_exponent": 0.15, "persistence": 0.019, "locality": 0.3},
    "llamamoe": {"zipf_exponent": 0.1, "persistence": 0.0, "locality": 0.15},
    "minicpm": {"zipf_exponent": 0.2, "persistence": 0.088, "locality": 0.3},
    "mixtral": {"zipf_exponent": 0.2, "persistence": 0.103, "locality": 0.3},
    "nllb-decoder": {"zipf_exponent": 0.75, "persistence": 0.157, "locality": 0.15},
    "nllb-encoder": {"zipf_exponent": 0.65, "persistence": 0.111, "locality": 0.15},
    "olmoe": {"zipf_exponent": 0.7, "persistence": 0.295, "locality": 0.45},
    "openmoe": {"zipf_exponent": 0.35, "persistence": 0.08, "locality": 0.15},
    "powermoe": {"zipf_exponent": 0.8, "persistence": 0.249, "locality": 0.45},
    "switch-decoder": {"zipf_exponent": 0.6, "persistence": 0.065, "locality": 0.0},
    "switch-encoder": {"zipf_exponent": 0.55, "persistence": 0.05, "locality": 0.0},
    "xverse": {"zipf_exponent": 0.4, "persistence": 0.218, "locality": 0.3},
    "yuan": {"zipf_exponent": 1.6, "persistence": 0.341, "locality": 0.15},
}
FAMILY_OF_MODEL: dict[str, str] = {
    "mixtral": "mixtral", "deepseek-v2-lite": "deepseek", "deepseek-moe": "deepseek", "olmoe": "olmoe",
    "phi-3.5-moe": "grin", "switch": "switch-decoder",
}


def family_of(model_name: str) -> str | None:
    for prefix, family in FAMILY_OF_MODEL.items():
        if model_name.startswith(prefix):
            return family
    return None


@dataclass(frozen=True)
class FittedParams:
    """Fitted generator parameters: per-layer popularity [layers, experts] and persistence [layers]."""

    model: str
    top_k: int
    popularity: np.ndarray
    persistence: np.ndarray
    locality: float = 0.0
    hot_experts: int | None = None

    def generator(self, rng: np.random.Generator) -> "MarkovGeneratedRouting":
        return MarkovGeneratedRouting(
            self.popularity, self.top_k, self.persistence, rng, locality=self.locality, hot_experts=self.hot_experts
        )

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(
            {
                "kind": "fitted_routing", "model": self.model, "num_layers": int(self.popularity.shape[0]),
                "num_experts": int(self.popularity.shape[1]), "top_k": self.top_k,
                "locality": self.locality, "hot_experts": self.hot_experts,
                "persistence": [round(float(x), 4) for x in self.persistence],
                "popularity": [[round(float(x), 5) for x in row] for row in self.popularity],
            },
            sort_keys=False, default_flow_style=None, width=200,
        )

    @staticmethod
    def from_yaml(path: Path) -> "FittedParams":
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError:
            raise TraceError(f"{path}: cannot open fitted routing parameters") from None
        except yaml.YAMLError as exc:
            raise TraceError(f"{path}: not valid YAML ({exc})") from None
        try:
            pop = np.asarray(data["popularity"], dtype=np.float64)
            pers = np.asarray(data["persistence"], dtype=np.float64)
            top_k = int(data["top_k"])
            locality = float(data.get("locality") or 0.0)
            hot = int(data["hot_experts"]) if data.get("hot_experts") else None
        except (TypeError, KeyError, ValueError) as exc:
            raise TraceError(f"{path}: expected keys popularity [layers][experts], persistence [layers], top_k ({exc})") from None
        if pop.ndim != 2 or pers.shape != (pop.shape[0],) or (pop < 0).any() or ((pers < 0) | (pers > 1)).any():
            raise TraceError(f"{path}: popularity must be [layers][experts] >= 0 and persistence [layers] in 0..1")
        if not 0 <= locality <= 1:
            raise TraceError(f"{path}: locality {locality} is outside 0..1")
        return FittedParams(str(data.get("model", "unknown")), top_k, pop, pers, locality, hot)


def _overlap_per_layer(experts: Sequence[np.ndarray]) -> np.ndarray:
    """Mean share of a token's experts that the previous token of the request also chose, per layer."""
    L, k = experts[0].shape[1], experts[0].shape[2]
    total, pairs = np.zeros(L), 0
    for seq in experts:
        if len(seq) > 1:
            total += ((seq[1:, :, :, None] == seq[:-1, :, None, :]).any(axis=3).sum(axis=2) / k).sum(axis=0)
            pairs += len(seq) - 1
    return total / max(pairs, 1)


def fit_routing(
    experts: Sequence[np.ndarray], num_experts: int, model: str = "unknown", *,
    localities: Sequence[float] = (0.0, 0.15, 0.3, 0.45), seed: int = 0,
) -> FittedParams:
    """Fit the Markov generator to recorded routing (per-request expert ids [tokens, layers, top_k]).

    Popularity is each layer's share of expert uses (floored so no expert is impossible). For each
    candidate locality, persistence starts from solving observed_overlap = p + (1 - p) * chance per
    layer (chance = sum_e q_e^2 / k, what independent tokens with inclusion probabilities q share)
    and takes one correction step from a generated copy of the trace; the locality kept is the one
    whose generated LRU and LFU hit-rate curves (mean over layers) are closest to the trace's."""
    from sim.workload.routing_stats import hit_rate_curves

    top_k = int(experts[0].shape[2])
    L = int(experts[0].shape[1])
    offs = (np.arange(L) * num_experts)[None, :, None]
    counts = np.zeros(L * num_experts, dtype=np.float64)
    for seq in experts:
        counts += np.bincount((seq.astype(np.int64) + offs).ravel(), minlength=L * num_experts)
    counts = counts.reshape(L, num_experts)
    share = counts / counts.sum(axis=1, keepdims=True)
    share = np.maximum(share, 1e-4 / num_experts)
    share /= share.sum(axis=1, keepdims=True)
    q = share * top_k  # inclusion probabilities
    chance = np.minimum((q**2).sum(axis=1) / top_k, 0.999)
    observed = _overlap_per_layer(experts)
    persistence0 = np.clip((observed - chance) / (1 - chance), 0.0, 1.0)
    lengths = [len(s) for s in experts]
    # Enough generated tokens for stable curves, whatever the trace's size.
    copies = max(1, -(-4000 // max(sum(lengths), 1)))
    target = hit_rate_curves(experts, num_experts, policies=("LRU", "LFU"))
    best: tuple[float, FittedParams] | None = None
    for loc in localities:
        params = FittedParams(model, top_k, share, persistence0, float(loc))
        for _ in range(2):
            fake = params.generator(np.random.default_rng(seed)).like(lengths * copies)
            got = _overlap_per_layer(fake)
            pers = np.clip(params.persistence + (observed - got) / (1 - chance), 0.0, 1.0)
            params = FittedParams(model, top_k, share, pers, float(loc))
        fake = params.generator(np.random.default_rng(seed + 1)).like(lengths * copies)
        curves = hit_rate_curves(fake, num_experts, target["sizes"], policies=("LRU", "LFU"))
        score = sum(float(np.sum((np.subtract(curves[p]["overall"], target[p]["overall"])) ** 2)) for p in ("LRU", "LFU"))
        if best is None or score < best[0]:
            best = (score, params)
    assert best is not None
    return best[1]


def zipf_weights(num_layers: int, num_experts: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Per layer, weight 1/rank^exponent with the ranks shuffled, so each layer has its own hot experts."""
    base = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** exponent
    return np.stack([rng.permutation(base) for _ in range(num_layers)])


@dataclass(frozen=True)
class RecordedSequence:
    """Routing of one recorded sequence: expert ids [tokens, layers, top_k] and, when the trace has
    them, their gate scores of the same shape (capacity policies that drop by score use them)."""

    name: str
    experts: np.ndarray
    gates: np.ndarray | None = None


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

    def counts_by_group(self, segments: Sequence[Segment], groups: Sequence[int], num_groups: int) -> np.ndarray:
        """Counts [group, layer, expert], segment i in group ``groups[i]`` (see GeneratedRouting)."""
        return np.stack([self.counts([s for s, g in zip(segments, groups) if g == k]) for k in range(num_groups)])


def load_routing_jsonl(path: Path, spec: ReplayRouting, *, num_layers: int, num_experts: int, top_k: int) -> ReplayedRouting:
    """Read a JSONL routing table with the spec's field names; every row error names the file and line."""
    from sim.workload.routing_trace import JsonlFields, RoutingTraceMeta, import_speculative_moe_jsonl

    fields = JsonlFields(
        sequence=spec.sequence_field, token=spec.token_field, layer=spec.layer_field,
        experts=spec.experts_field, group=spec.group_field,
    )
    meta = RoutingTraceMeta(model="the scenario's model", num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    return _replayed(path, import_speculative_moe_jsonl(path, meta, fields=fields), num_layers, num_experts, top_k)


def load_routing_parquet(path: Path, *, num_layers: int, num_experts: int, top_k: int) -> ReplayedRouting:
    """Read a canonical routing trace; it must have been recorded for a model of this shape."""
    from sim.workload.routing_trace import read_routing_trace

    if not path.exists():
        raise TraceError(f"{path}: cannot open routing trace")
    return _replayed(path, read_routing_trace(path, gates=False), num_layers, num_experts, top_k)


def _replayed(path: Path, trace, num_layers: int, num_experts: int, top_k: int) -> ReplayedRouting:
    """A loaded routing trace as a replay source, checked against the scenario's model."""
    m = trace.meta
    if (m.num_layers, m.num_experts, m.top_k) != (num_layers, num_experts, top_k):
        raise TraceError(
            f"{path}: recorded for {m.model} ({m.num_layers} MoE layers, {m.num_experts} experts, top-{m.top_k}), "
            f"but the scenario's model has {num_layers} MoE layers, {num_experts} experts, top-{top_k}"
        )
    if not trace.sequences:
        raise TraceError(f"{path}: no token has routing for all {num_layers} layers")
    sequences = [
        RecordedSequence(
            name=str(s.request_id), experts=s.experts.astype(np.int64),
            gates=None if s.gates is None or np.isnan(s.gates).any() else s.gates.astype(np.float64),
        )
        for s in trace.sequences
    ]
    return ReplayedRouting(sequences, num_experts)


def build_routing(
    spec: UniformRouting | ZipfRouting | ReplayRouting | MarkovRouting | FittedRouting,
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
    if isinstance(spec, MarkovRouting):
        defaults = FAMILY_DEFAULTS.get(spec.family or "", {}) if spec.family else {}
        if spec.family and not defaults:
            raise TraceError(
                f"workload.routing.family: unknown family {spec.family!r}; expected one of {', '.join(sorted(FAMILY_DEFAULTS))}"
            )
        exponent = spec.zipf_exponent if spec.zipf_exponent is not None else defaults.get("zipf_exponent", 0.0)
        persistence = spec.persistence if spec.persistence is not None else defaults.get("persistence", 0.0)
        locality = spec.locality if spec.locality is not None else defaults.get("locality", 0.0)
        weights = zipf_weights(num_layers, num_experts, exponent, rng)
        return MarkovGeneratedRouting(
            weights, top_k, np.full(num_layers, persistence), rng, locality=locality, hot_experts=spec.hot_experts
        )
    path = Path(spec.path)
    if not path.is_absolute():
        path = base_dir / path
    if isinstance(spec, FittedRouting):
        params = FittedParams.from_yaml(path)
        if params.popularity.shape != (num_layers, num_experts) or params.top_k != top_k:
            raise TraceError(
                f"{path}: fitted for {params.popularity.shape[0]} MoE layers x {params.popularity.shape[1]} experts, "
                f"top-{params.top_k}; the scenario's model has {num_layers} x {num_experts}, top-{top_k}"
            )
        return MarkovGeneratedRouting(
            params.popularity, top_k, params.persistence, rng, locality=params.locality, hot_experts=params.hot_experts
        )
    fmt = spec.format or ("parquet" if path.suffix == ".parquet" else "jsonl")
    if fmt == "parquet":
        return load_routing_parquet(path, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    return load_routing_jsonl(path, spec, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
