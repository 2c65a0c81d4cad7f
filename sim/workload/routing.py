"""Expert routing: which experts the tokens of an iteration select, per MoE layer.

The engine asks a routing source for a token-count matrix ``[moe_layer, expert]`` for the tokens of
one iteration, given as segments (request id, first token position, number of tokens). Sources:

  uniform, zipf   memoryless generators: top-k per token (Plackett-Luce over per-layer popularities,
                  i.e. Gumbel top-k)
  markov          a generator with per-request state (sim.workload.routing_markov): per-layer
                  popularity, token-to-token persistence, a per-request working set (locality),
                  layer-to-layer transitions and per-task popularity; defaults per model family
                  fitted to moe-lrc's real hit-rate curves and the Mixtral per-token trace (FAMILY_DEFAULTS)
  fitted          the markov generator with parameters fitted to a recorded trace (fit_routing)
  replay          the choices a real model made, from a canonical Parquet routing trace
                  (sim.workload.routing_trace) or a JSONL table, per sequence, token and layer"""

from __future__ import annotations

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
    probability ``locality``, else from the popularity), layer-to-layer transitions (a slot follows the expert
    the same slot chose one layer up with probability ``layer_coupling``) and a task mixture (each task of
    ``tasks`` has its own popularity, ``task_specificity`` apart from the shared one; a request's task is its
    own label when it has one, else drawn from the ``tasks`` weights). ``family`` fills in what is not given
    from defaults fitted to real routing statistics (see FAMILY_DEFAULTS)."""

    kind: Literal["markov"]
    family: str | None = Field(None, description="Model family whose fitted defaults to use, e.g. mixtral, deepseek.")
    zipf_exponent: float | None = Field(None, ge=0, description="Popularity skew per layer (0 is uniform).")
    persistence: float | None = Field(None, ge=0, le=1, description="P(a top-k slot keeps the previous token's expert).")
    locality: float | None = Field(
        None, ge=0, le=1, description="P(a new expert comes from the request's own working set rather than the popularity)."
    )
    hot_experts: int | None = Field(None, gt=0, description="Working-set size per layer; default 2 x top_k.")
    working_set_skew: float | None = Field(
        None, ge=0, le=5, description="The j-th expert of a request's working set is picked with weight "
        "(j + 1)^-skew; 0: all equally likely."
    )
    refractory: float | None = Field(
        None, ge=0, le=1, description="P(a new expert the request used in its last refractory_tokens tokens is redrawn "
        "once); 0: off."
    )
    refractory_tokens: int | None = Field(None, ge=0, le=64, description="How many past tokens refractory looks at.")
    layer_coupling: float | None = Field(
        None, ge=0, le=1, description="P(a new expert follows the expert its slot chose in the layer above)."
    )
    tasks: dict[str, float] | None = Field(
        None, description="Tasks {name: weight}: each gets its own popularity; the weights pick a task for requests "
        "without a label."
    )
    task_specificity: float | None = Field(
        None, ge=0, le=5, description="Standard deviation of ln(a task's expert weight / the shared weight); "
        "0: every task routes alike."
    )


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
        self._inclusion_cache: np.ndarray | None = None

    @property
    def _inclusion(self) -> np.ndarray:
        """Marginal probability that a token picks each expert (sums to top_k per layer), estimated on first use
        (only many-token segments and statistics need it)."""
        if self._inclusion_cache is None:
            self._inclusion_cache = self._inclusion_probabilities(np.exp(self._log_p))
        return self._inclusion_cache

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


def __getattr__(name: str):
    # The Markov generator lives in routing_markov (it subclasses GeneratedRouting, so it imports this module).
    if name == "MarkovGeneratedRouting":
        from sim.workload.routing_markov import MarkovGeneratedRouting

        return MarkovGeneratedRouting
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Defaults per model family. zipf_exponent (and zipf_offset, where plain Zipf cannot follow the static curve),
# persistence, locality, the working-set size (hot_experts_per_top_k x top_k), its skew (hot_skew) and, where
# needed, the refractory redraw were fitted to moe-lrc's real per-layer LRU / LFU / static hit-rate curves at
# 1-4 x top_k slots (MIT, Liang et al. 2025) by benchmarks/fit_family_defaults.py: popularity to the static
# curve, then for each locality, working-set size and skew persistence to the mean LRU error, keeping the
# smallest worst LRU/LFU error over two samples. tests/test_routing_stats.py checks every point of every model
# within 0.05 (on another seed). Those curves are per layer, so they say
# nothing about layer-to-layer transitions or tasks: layer_coupling and task_specificity come from the only
# per-token trace in ../shared (Mixtral-8x7B, GSM8K + HumanEval, fitted by fit_routing) and are the same for
# every family. Keys are moe-lrc's model keys; catalog names map to them by prefix (FAMILY_OF_MODEL), and
# FAMILY_ALIASES names the families that have no real statistics here and reuse the nearest fitted one.
MIXTRAL_COUPLING = 0.2
MIXTRAL_TASK_SPECIFICITY = 0.33
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "deepseek": {"zipf_exponent": 0.3, "persistence": 0.133, "locality": 0.3, "hot_experts_per_top_k": 3, "hot_skew": 1.5},
    "grin": {"zipf_exponent": 0.8, "persistence": 0.25, "locality": 0.3, "hot_experts_per_top_k": 2, "hot_skew": 4.0},
    "jamba": {"zipf_exponent": 0.35, "persistence": 0.149, "locality": 0.15, "hot_experts_per_top_k": 2, "hot_skew": 3.0},
    "jetmoe": {"zipf_exponent": 0.15, "persistence": 0.059, "locality": 0.15, "hot_experts_per_top_k": 3, "hot_skew": 3.0},
    "llamamoe": {"zipf_exponent": 0.1, "persistence": 0.059, "locality": 0.15, "hot_experts_per_top_k": 2, "hot_skew": 2.0,
                 "refractory": 0.5, "refractory_tokens": 4},
    "minicpm": {"zipf_exponent": 0.2, "persistence": 0.124, "locality": 0.15, "hot_experts_per_top_k": 3, "hot_skew": 4.0},
    "mixtral": {"zipf_exponent": 0.2, "persistence": 0.107, "locality": 0.3, "hot_experts_per_top_k": 1.5},
    "nllb-decoder": {"zipf_exponent": 0.75, "persistence": 0.097, "locality": 0.3, "hot_experts_per_top_k": 3, "hot_skew": 1.0},
    "nllb-encoder": {"zipf_exponent": 0.65, "persistence": 0.101, "locality": 0.15, "hot_experts_per_top_k": 1.5},
    "olmoe": {"zipf_exponent": 0.7, "persistence": 0.217, "locality": 0.45, "hot_experts_per_top_k": 2, "hot_skew": 1.0},
    "openmoe": {"zipf_exponent": 0.35, "persistence": 0.061, "locality": 0.15, "hot_experts_per_top_k": 1.5},
    "powermoe": {"zipf_exponent": 2.8, "zipf_offset": 24.0, "persistence": 0.191, "locality": 0.45, "hot_experts_per_top_k": 1.5},
    "switch-decoder": {"zipf_exponent": 0.6, "persistence": 0.047, "locality": 0.0, "hot_experts_per_top_k": 2},
    "switch-encoder": {"zipf_exponent": 0.55, "persistence": 0.033, "locality": 0.15, "hot_experts_per_top_k": 3},
    "xverse": {"zipf_exponent": 0.4, "persistence": 0.131, "locality": 0.3, "hot_experts_per_top_k": 2, "hot_skew": 1.5},
    "yuan": {"zipf_exponent": 1.6, "persistence": 0.0, "locality": 0.6, "hot_experts_per_top_k": 3, "hot_skew": 4.0},
}
for _par in FAMILY_DEFAULTS.values():
    _par.setdefault("layer_coupling", MIXTRAL_COUPLING)
    _par.setdefault("task_specificity", MIXTRAL_TASK_SPECIFICITY)
# Families with no real routing statistics in ../shared (moe-lrc's Qwen and DeepSeek-V2-Lite curves were kept
# out of this copy; gpt-oss was never measured), mapped to the nearest fitted family by architecture:
# fine-grained experts plus shared experts -> DeepSeekMoE-16B; fine-grained top-8 (or top-4) without shared
# experts -> OLMoE.
FAMILY_ALIASES: dict[str, str] = {
    "qwen1.5": "deepseek", "qwen2": "deepseek", "qwen3": "olmoe", "qwen": "olmoe",
    "deepseek-v2": "deepseek", "deepseek-v3": "deepseek", "gpt-oss": "olmoe", "phi": "grin",
}
FAMILY_OF_MODEL: dict[str, str] = {
    "mixtral": "mixtral", "deepseek-v2-lite": "deepseek-v2", "deepseek-v3": "deepseek-v3", "deepseek-moe": "deepseek",
    "qwen1.5-moe": "qwen1.5", "qwen2-": "qwen2", "qwen3-": "qwen3", "olmoe": "olmoe", "gpt-oss": "gpt-oss",
    "phi-3.5-moe": "grin", "switch": "switch-decoder",
}


def family_of(model_name: str) -> str | None:
    for prefix, family in FAMILY_OF_MODEL.items():
        if model_name.startswith(prefix):
            return family
    return None


def family_defaults(family: str) -> dict[str, float]:
    """The fitted defaults of a family (or of the family an alias reuses); TraceError lists the known names."""
    key = FAMILY_ALIASES.get(family, family)
    if key not in FAMILY_DEFAULTS:
        known = sorted(set(FAMILY_DEFAULTS) | set(FAMILY_ALIASES))
        raise TraceError(f"workload.routing.family: unknown family {family!r}; expected one of {', '.join(known)}")
    return FAMILY_DEFAULTS[key]


def task_popularity(base: np.ndarray, tasks: Sequence[str], specificity: float, seed: int) -> dict[str, np.ndarray]:
    """Per task: the shared popularity tilted by exp(specificity x z), z standard normal per (layer, expert) and
    task (seeded by the run's seed and the task's position): specificity is the standard deviation of
    ln(task weight / shared weight); 0 means every task routes alike."""
    shared = base / base.sum(axis=1, keepdims=True)
    out = {}
    for i, name in enumerate(tasks):
        tilt = np.exp(specificity * np.random.default_rng([seed, i]).standard_normal(shared.shape))
        t = shared * tilt
        out[name] = t / t.sum(axis=1, keepdims=True)
    return out


@dataclass(frozen=True)
class FittedParams:
    """Fitted generator parameters: per-layer popularity [layers, experts], persistence [layers], locality,
    layer coupling [layers - 1] with its affinity maps [layers - 1, experts], and per-task popularity."""

    model: str
    top_k: int
    popularity: np.ndarray
    persistence: np.ndarray
    locality: float = 0.0
    hot_experts: int | None = None
    coupling: np.ndarray | None = None
    affinity: np.ndarray | None = None
    task_popularity: dict[str, np.ndarray] | None = None

    def generator(self, rng: np.random.Generator, task_mix: dict[str, float] | None = None) -> "MarkovGeneratedRouting":
        from sim.workload.routing_markov import MarkovGeneratedRouting

        return MarkovGeneratedRouting(
            self.popularity, self.top_k, self.persistence, rng, locality=self.locality, hot_experts=self.hot_experts,
            coupling=0.0 if self.coupling is None else self.coupling, affinity=self.affinity,
            task_weights=self.task_popularity, task_mix=task_mix,
        )

    def to_yaml(self) -> str:
        import yaml

        data: dict = {
            "kind": "fitted_routing", "model": self.model, "num_layers": int(self.popularity.shape[0]),
            "num_experts": int(self.popularity.shape[1]), "top_k": self.top_k,
            "locality": self.locality, "hot_experts": self.hot_experts,
            "persistence": [round(float(x), 4) for x in self.persistence],
            "popularity": [[round(float(x), 5) for x in row] for row in self.popularity],
        }
        if self.coupling is not None:
            data["layer_coupling"] = [round(float(x), 4) for x in self.coupling]
        if self.affinity is not None:
            data["affinity"] = [[int(x) for x in row] for row in self.affinity]
        if self.task_popularity:
            data["task_popularity"] = {
                name: [[round(float(x), 5) for x in row] for row in pop] for name, pop in self.task_popularity.items()
            }
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=200)

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
            coupling = np.asarray(data["layer_coupling"], dtype=np.float64) if data.get("layer_coupling") is not None else None
            affinity = np.asarray(data["affinity"], dtype=np.int64) if data.get("affinity") is not None else None
            tasks = {str(k): np.asarray(v, dtype=np.float64) for k, v in (data.get("task_popularity") or {}).items()}
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise TraceError(f"{path}: expected keys popularity [layers][experts], persistence [layers], top_k ({exc})") from None
        if pop.ndim != 2 or pers.shape != (pop.shape[0],) or (pop < 0).any() or ((pers < 0) | (pers > 1)).any():
            raise TraceError(f"{path}: popularity must be [layers][experts] >= 0 and persistence [layers] in 0..1")
        if not 0 <= locality <= 1:
            raise TraceError(f"{path}: locality {locality} is outside 0..1")
        L, E = pop.shape
        if coupling is not None and (coupling.shape != (L - 1,) or ((coupling < 0) | (coupling > 1)).any()):
            raise TraceError(f"{path}: layer_coupling must be {L - 1} numbers in 0..1 (one per pair of layers)")
        if affinity is not None and (affinity.shape != (L - 1, E) or any(sorted(r) != list(range(E)) for r in affinity.tolist())):
            raise TraceError(f"{path}: affinity must be {L - 1} permutations of the expert ids 0..{E - 1}")
        for name, t in tasks.items():
            if t.shape != (L, E) or (t < 0).any():
                raise TraceError(f"{path}: task_popularity.{name} must be [{L}][{E}] numbers >= 0")
        return FittedParams(str(data.get("model", "unknown")), top_k, pop, pers, locality, hot, coupling, affinity,
                            tasks or None)


def _overlap_per_layer(experts: Sequence[np.ndarray]) -> np.ndarray:
    """Mean share of a token's experts that the previous token of the request also chose, per layer."""
    L, k = experts[0].shape[1], experts[0].shape[2]
    total, pairs = np.zeros(L), 0
    for seq in experts:
        if len(seq) > 1:
            total += ((seq[1:, :, :, None] == seq[:-1, :, None, :]).any(axis=3).sum(axis=2) / k).sum(axis=0)
            pairs += len(seq) - 1
    return total / max(pairs, 1)


def _follow_rate(experts: Sequence[np.ndarray], affinity: np.ndarray) -> np.ndarray:
    """Per layer pair: share of slots whose layer-l expert, mapped by the affinity, is among layer l+1's experts."""
    L = experts[0].shape[1]
    hits, n = np.zeros(L - 1), 0
    for seq in experts:
        s = seq.astype(np.int64)
        mapped = affinity[np.arange(L - 1)[None, :, None], s[:, :-1, :]]  # [T, L-1, k]
        hits += (mapped[:, :, :, None] == s[:, 1:, None, :]).any(axis=3).mean(axis=2).sum(axis=0)
        n += len(s)
    return hits / max(n, 1)


def _best_affinity(experts: Sequence[np.ndarray], num_experts: int) -> np.ndarray:
    """Per layer pair, the one-to-one map e -> e' that covers the most (layer l, layer l+1) co-choices
    (greedy on the joint counts, largest first)."""
    from sim.workload.routing_stats import transition_counts

    joint = transition_counts(experts, num_experts)  # [L-1, E, E]
    aff = np.empty(joint.shape[:2], dtype=np.int64)
    for layer, j in enumerate(joint):
        order = np.argsort(-j, axis=None, kind="stable")
        used_src, used_dst = set(), set()
        for flat in order:
            a, b = divmod(int(flat), num_experts)
            if a not in used_src and b not in used_dst:
                aff[layer, a] = b
                used_src.add(a)
                used_dst.add(b)
                if len(used_src) == num_experts:
                    break
    return aff


def fit_routing(
    experts: Sequence[np.ndarray], num_experts: int, model: str = "unknown", *,
    localities: Sequence[float] = (0.0, 0.15, 0.3, 0.45), seed: int = 0, tasks: Sequence[str | None] | None = None,
) -> FittedParams:
    """Fit the Markov generator to recorded routing (per-request expert ids [tokens, layers, top_k]).

    Popularity is each layer's share of expert uses (floored so no expert is impossible); per-task popularity
    the same over each task's requests. The affinity of a layer pair is the one-to-one map covering the most
    co-choices; coupling starts from observed_follow = c + (1 - c) * chance (chance: the same rate with layer
    l+1 taken from the popularity). Persistence starts from observed_overlap = p + (1 - p) * chance. For each
    candidate locality both take two correction steps from generated copies of the trace; the locality kept is
    the one whose generated LRU and LFU hit-rate curves (mean over layers) are closest to the trace's."""
    from sim.workload.routing_stats import hit_rate_curves

    top_k = int(experts[0].shape[2])
    L = int(experts[0].shape[1])

    def shares(seqs: Sequence[np.ndarray]) -> np.ndarray:
        offs = (np.arange(L) * num_experts)[None, :, None]
        counts = np.zeros(L * num_experts, dtype=np.float64)
        for seq in seqs:
            counts += np.bincount((seq.astype(np.int64) + offs).ravel(), minlength=L * num_experts)
        share = np.maximum(counts.reshape(L, num_experts) / max(counts.sum() / L, 1), 1e-4 / num_experts)
        return share / share.sum(axis=1, keepdims=True)

    share = shares(experts)
    labels = list(tasks) if tasks is not None else [None] * len(experts)
    names = sorted({t for t in labels if t})
    task_pop = {n: shares([e for e, t in zip(experts, labels) if t == n]) for n in names} or None
    q = share * top_k  # inclusion probabilities
    chance = np.minimum((q**2).sum(axis=1) / top_k, 0.999)
    observed = _overlap_per_layer(experts)
    persistence0 = np.clip((observed - chance) / (1 - chance), 0.0, 1.0)
    affinity = _best_affinity(experts, num_experts) if L > 1 else np.zeros((0, num_experts), dtype=np.int64)
    follow = _follow_rate(experts, affinity) if L > 1 else np.zeros(0)
    follow_chance = np.array([(share[l] * q[l + 1][affinity[l]]).sum() for l in range(L - 1)])
    coupling0 = np.clip((follow - follow_chance) / np.maximum(1 - follow_chance, 1e-3), 0.0, 1.0)
    lengths = [len(s) for s in experts]
    # Enough generated tokens for stable curves, whatever the trace's size.
    copies = max(1, -(-4000 // max(sum(lengths), 1)))
    target = hit_rate_curves(experts, num_experts, policies=("LRU", "LFU"))
    best: tuple[float, FittedParams] | None = None
    for loc in localities:
        params = FittedParams(model, top_k, share, persistence0, float(loc), None, coupling0, affinity, task_pop)
        for _ in range(2):
            fake = params.generator(np.random.default_rng(seed)).like(lengths * copies, labels * copies)
            pers = np.clip(params.persistence + (observed - _overlap_per_layer(fake)) / (1 - chance), 0.0, 1.0)
            coup = params.coupling
            if L > 1:
                coup = np.clip(coup + (follow - _follow_rate(fake, affinity)) / np.maximum(1 - follow_chance, 1e-3), 0, 1)
            params = FittedParams(model, top_k, share, pers, float(loc), None, coup, affinity, task_pop)
        fake = params.generator(np.random.default_rng(seed + 1)).like(lengths * copies, labels * copies)
        curves = hit_rate_curves(fake, num_experts, target["sizes"], policies=("LRU", "LFU"))
        score = sum(float(np.sum((np.subtract(curves[p]["overall"], target[p]["overall"])) ** 2)) for p in ("LRU", "LFU"))
        if best is None or score < best[0]:
            best = (score, params)
    assert best is not None
    return best[1]


def zipf_weights(
    num_layers: int, num_experts: int, exponent: float, rng: np.random.Generator, offset: float = 0.0
) -> np.ndarray:
    """Per layer, weight 1/(rank + offset)^exponent (Zipf-Mandelbrot; offset 0 is Zipf) with the ranks shuffled, so
    each layer has its own hot experts. A positive offset flattens the head for the same tail."""
    base = 1.0 / (np.arange(1, num_experts + 1, dtype=np.float64) + offset) ** exponent
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
    request_tasks: Sequence[str | None] | np.ndarray | None = None,
) -> RoutingSource:
    """The routing source a scenario asks for, sized for the model. ``request_tasks`` (the request table's task
    column, by request id) gives the task-aware generators each request's task."""
    source = _build_routing(spec, num_layers=num_layers, num_experts=num_experts, top_k=top_k, rng=rng, base_dir=base_dir)
    if request_tasks is not None and hasattr(source, "set_request_tasks"):
        source.set_request_tasks(request_tasks)
    return source


def _build_routing(
    spec: UniformRouting | ZipfRouting | ReplayRouting | MarkovRouting | FittedRouting,
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    rng: np.random.Generator,
    base_dir: Path,
) -> RoutingSource:
    if isinstance(spec, UniformRouting):
        return GeneratedRouting(np.ones((num_layers, num_experts)), top_k, rng)
    if isinstance(spec, ZipfRouting):
        return GeneratedRouting(zipf_weights(num_layers, num_experts, spec.exponent, rng), top_k, rng)
    if isinstance(spec, MarkovRouting):
        from sim.workload.routing_markov import MarkovGeneratedRouting

        defaults = family_defaults(spec.family) if spec.family else {}

        def pick(name: str, value: float | None) -> float:
            return value if value is not None else defaults.get(name, 0.0)

        exponent = pick("zipf_exponent", spec.zipf_exponent)
        offset = defaults.get("zipf_offset", 0.0) if spec.zipf_exponent is None else 0.0  # it belongs to the default exponent
        weights = zipf_weights(num_layers, num_experts, exponent, rng, offset)
        tasks = None
        if spec.tasks:
            seed = int(rng.integers(2**31))
            tasks = task_popularity(weights, list(spec.tasks), pick("task_specificity", spec.task_specificity), seed)
        try:
            return MarkovGeneratedRouting(
                weights, top_k, np.full(num_layers, pick("persistence", spec.persistence)), rng,
                locality=pick("locality", spec.locality), hot_experts=spec.hot_experts or (
                    max(top_k + 1, int(round(defaults["hot_experts_per_top_k"] * top_k)))
                    if "hot_experts_per_top_k" in defaults else None),
                coupling=pick("layer_coupling", spec.layer_coupling), task_weights=tasks, task_mix=spec.tasks,
                hot_skew=pick("hot_skew", spec.working_set_skew), refractory=pick("refractory", spec.refractory),
                refractory_tokens=int(pick("refractory_tokens", spec.refractory_tokens)),
            )
        except ValueError as exc:
            raise TraceError(f"workload.routing: {exc}") from None
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
        return params.generator(rng)
    fmt = spec.format or ("parquet" if path.suffix == ".parquet" else "jsonl")
    if fmt == "parquet":
        return load_routing_parquet(path, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    return load_routing_jsonl(path, spec, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
