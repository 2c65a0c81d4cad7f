"""eMoE (arXiv 2503.06823): expert prediction, task-aware expert loading and miss rerouting.

What this module holds, each a small pure object or function that never sees ``env`` (the engine and
the real runtime call them with plain arrays):

* ``TransitionPredictor`` - the learned predictor, trained on routing traces per task. Two variants,
  as in the paper: **eMoE-A** (``predict_all``) predicts every layer's experts of the next prompt from
  the previous prompt's experts (same-layer, prompt-to-prompt transition statistics); **eMoE-L**
  (``predict_layer``) predicts layer l from the experts the current prompt used at layer l-1
  (layer-transition statistics), layer 0 from the previous prompt's layer 0. The paper trains an
  XLNet on the same sequences; a count model is its statistical stand-in, and ``evaluate_predictor``
  measures how well it does on held-out routing.
* ``ParametricPredictor`` - a predictor of a chosen accuracy for what-if questions: the true set
  with each expert swapped for a wrong one with probability ``1 - accuracy``.
* ``expected_token_load`` / ``top_experts_per_layer`` - Eq. 2: expected tokens per (layer, expert)
  summed over the running requests' tasks, and the top-L experts per layer within a budget.
* ``EmoePlanner`` - periodic invocation: the first prompt loads all experts, the predictor is called
  every ``period`` prompts, and every prompt re-plans residency with Eq. 2 from the latest forecast.
* ``reroute_tokens`` / ``reroute_counts`` - miss handling: a token whose expert is not resident goes
  to its next-ranked resident expert instead (no on-demand load), and the fraction of assignments
  still served by the original expert is the routing fidelity.

Experts are named as in ``sim.policies.cache``: key = ``moe_layer * num_experts + expert``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from sim.errors import PolicyError
from sim.workload.routing_trace import TraceSequence

ALL_TASKS = None  # the pooled statistics are stored under this key; used for unseen tasks


# ---------------------------------------------------------------- learned predictor (eMoE-A, eMoE-L)


def _histogram(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-layer share of assignments per expert, ``[layers, E]``, from ids ``[layers, k]`` or
    ``[tokens, layers, k]``."""
    ex = np.asarray(experts)
    if ex.ndim == 2:
        ex = ex[None]
    tokens, layers, _ = ex.shape
    h = np.zeros((layers, num_experts))
    for layer in range(layers):
        h[layer] = np.bincount(ex[:, layer, :].ravel(), minlength=num_experts)[:num_experts]
    total = h.sum(axis=1, keepdims=True)
    return np.divide(h, total, out=np.full_like(h, 1.0 / num_experts), where=total > 0)


class _TaskStats:
    """Counts of one task (or of all tasks pooled)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.freq = np.zeros((num_layers, num_experts))
        # across[l, a, b]: a step used expert a at layer l and the next step used b at layer l (eMoE-A)
        self.across = np.zeros((num_layers, num_experts, num_experts))
        # down[l, a, b]: a token used a at layer l-1 and b at layer l (eMoE-L); down[0] is unused
        self.down = np.zeros((num_layers, num_experts, num_experts))

    def add(self, experts: np.ndarray) -> None:
        tokens, layers, k = experts.shape
        for layer in range(layers):
            cur = experts[:, layer, :]
            np.add.at(self.freq[layer], cur.ravel(), 1.0)
            if tokens > 1:
                a = np.repeat(cur[:-1], k, axis=1).ravel()
                b = np.tile(cur[1:], (1, k)).ravel()
                np.add.at(self.across[layer], (a, b), 1.0)
            if layer > 0:
                prev = experts[:, layer - 1, :]
                a = np.repeat(prev, k, axis=1).ravel()
                b = np.tile(cur, (1, k)).ravel()
                np.add.at(self.down[layer], (a, b), 1.0)


class TransitionPredictor:
    """Per-task routing frequency and transition statistics, trained on routing traces.

    Lifecycle: build with the model's sizes, ``fit`` on the training part of a trace (may be called
    again to add data), then ``predict_all`` (eMoE-A) / ``predict_layer`` (eMoE-L). A prediction is a
    per-layer probability over experts (the relative routing frequency f_i of Eq. 2); its top-k is
    the predicted set. A task never seen in training uses the statistics of all tasks pooled.
    ``smoothing`` is the weight (in pseudo-counts) of the task's frequency prior in each transition
    row, so a rarely seen expert falls back to frequency rather than to zero."""

    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, smoothing: float = 1.0) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.smoothing = smoothing
        self._stats: dict[str | None, _TaskStats] = {}

    def fit(self, sequences: Iterable[TraceSequence]) -> "TransitionPredictor":
        for seq in sequences:
            ex = np.asarray(seq.experts, dtype=np.int64)
            if ex.ndim != 3 or ex.shape[1] != self.num_layers:
                raise PolicyError(f"request {seq.request_id}: expected experts [tokens, {self.num_layers}, k]")
            for key in {seq.task, ALL_TASKS}:
                self._stats.setdefault(key, _TaskStats(self.num_layers, self.num_experts)).add(ex)
        return self

    @property
    def tasks(self) -> list[str]:
        return sorted(t for t in self._stats if t is not None)

    def _of(self, task: str | None) -> _TaskStats:
        stats = self._stats.get(task) or self._stats.get(ALL_TASKS)
        if stats is None:
            raise PolicyError("the expert predictor has not been trained (fit it on a routing trace first)")
        return stats

    def frequency(self, task: str | None) -> np.ndarray:
        """f: the task's routing frequency per layer, ``[layers, E]`` (rows sum to 1)."""
        f = self._of(task).freq + 1e-9
        return f / f.sum(axis=1, keepdims=True)

    def _rows(self, counts: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """Transition rows ``[E, E]`` normalised, with the frequency prior mixed in."""
        rows = counts + self.smoothing * prior[None, :]
        return rows / rows.sum(axis=1, keepdims=True)

    def predict_all(self, task: str | None, previous: np.ndarray | None, *, actual: np.ndarray | None = None) -> np.ndarray:
        """eMoE-A: every layer's expert distribution of the next prompt, ``[layers, E]``, from the
        previous prompt's experts (ids ``[layers, k]`` or ``[tokens, layers, k]``); with no previous
        prompt, the task's frequency. ``actual`` is ignored (a learned predictor does not see it)."""
        stats, f = self._of(task), self.frequency(task)
        if previous is None:
            return f
        h = _histogram(previous, self.num_experts)
        return np.stack([h[layer] @ self._rows(stats.across[layer], f[layer]) for layer in range(self.num_layers)])

    def predict_layer(self, task: str | None, layer: int, previous_layer: np.ndarray | None,
                      previous_prompt_layer0: np.ndarray | None = None) -> np.ndarray:
        """eMoE-L: the distribution ``[E]`` of layer ``layer`` from the experts the same prompt/token
        used at ``layer - 1`` (ids ``[k]`` or ``[tokens, k]``). Layer 0 is predicted from the previous
        prompt's layer-0 experts (same-layer transition), or the frequency when there is none."""
        stats, f = self._of(task), self.frequency(task)
        cond, table = (previous_prompt_layer0, stats.across[0]) if layer == 0 else (previous_layer, stats.down[layer])
        if cond is None:
            return f[layer]
        h = np.bincount(np.asarray(cond, dtype=np.int64).ravel(), minlength=self.num_experts).astype(float)
        h /= max(h.sum(), 1.0)
        return h @ self._rows(table, f[layer])


def top_set(scores: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` highest-scored experts (ties: lower id first), best first."""
    return np.argsort(-np.asarray(scores), kind="stable")[:n]


@dataclass(frozen=True, slots=True)
class PredictorAccuracy:
    """Precision/recall of predicted expert sets against the real ones, over all (step, layer) pairs.

    A step is one token of the held-out routing; at each MoE layer the predicted set is the top
    ``predicted_per_layer`` experts and the real set the token's top-k."""

    variant: str
    task: str | None
    num_steps: int
    num_layers: int
    predicted_per_layer: int
    precision: float
    recall: float
    random_precision: float  # expected precision of a uniformly random set of the same size

    @property
    def f1(self) -> float:
        s = self.precision + self.recall
        return 0.0 if s == 0 else 2 * self.precision * self.recall / s


def split_sequences(sequences: Sequence[TraceSequence], train_fraction: float = 0.8) -> tuple[list[TraceSequence], list[TraceSequence]]:
    """Per task, the first ``train_fraction`` of its tokens (requests in trace order, then token
    order) for training and the rest for evaluation; a request on the boundary is cut in two."""
    if not 0.0 < train_fraction < 1.0:
        raise PolicyError(f"train_fraction must be in (0, 1), got {train_fraction}")
    train: list[TraceSequence] = []
    test: list[TraceSequence] = []
    for task in dict.fromkeys(s.task for s in sequences):
        seqs = [s for s in sequences if s.task == task]
        cut = int(round(train_fraction * sum(len(s.experts) for s in seqs)))
        seen = 0
        for s in seqs:
            n = len(s.experts)
            at = min(max(cut - seen, 0), n)
            if at > 0:
                train.append(_slice(s, 0, at))
            if at < n:
                test.append(_slice(s, at, n))
            seen += n
    return train, test


def _slice(s: TraceSequence, lo: int, hi: int) -> TraceSequence:
    return TraceSequence(s.request_id, s.experts[lo:hi], s.positions[lo:hi],
                         None if s.gates is None else s.gates[lo:hi], s.task)


def evaluate_predictor(predictor: TransitionPredictor, sequences: Sequence[TraceSequence], variant: str,
                       *, task: str | None = None, predicted_per_layer: int | None = None) -> PredictorAccuracy:
    """Measure eMoE-A (``variant="A"``), eMoE-L (``"L"``) or the per-task frequency (``"freq"``)
    on held-out sequences (one task, or all when ``task`` is None). The previous prompt of a token is
    the token before it in the same request (the first token of a request has none)."""
    if variant not in ("A", "L", "freq"):
        raise PolicyError(f"unknown predictor variant {variant!r}: expected 'A', 'L' or 'freq'")
    E, L = predictor.num_experts, predictor.num_layers
    n = predicted_per_layer or predictor.top_k
    hits = real = steps = 0
    for seq in sequences:
        if task is not None and seq.task != task:
            continue
        ex = np.asarray(seq.experts, dtype=np.int64)
        for t in range(len(ex)):
            prev = ex[t - 1] if t > 0 else None
            if variant == "A":
                probs = predictor.predict_all(seq.task, prev)
            elif variant == "freq":
                probs = predictor.frequency(seq.task)
            else:
                probs = np.stack([
                    predictor.predict_layer(seq.task, layer, ex[t, layer - 1] if layer else None,
                                            None if prev is None else prev[0])
                    for layer in range(L)
                ])
            for layer in range(L):
                truth = set(ex[t, layer].tolist())
                hits += len(truth & set(top_set(probs[layer], n).tolist()))
                real += len(truth)
            steps += 1
    pairs = steps * L
    return PredictorAccuracy(
        variant=variant, task=task, num_steps=steps, num_layers=L, predicted_per_layer=n,
        precision=hits / (pairs * n) if pairs else float("nan"), recall=hits / real if real else float("nan"),
        random_precision=predictor.top_k / E,
    )


# ---------------------------------------------------------------- parametric predictor (what-if)


class ParametricPredictor:
    """A predictor of a given accuracy: the true expert set of each layer, with every expert replaced
    by a wrong one (an expert outside the true set, not already predicted) with probability
    ``1 - accuracy``. Its expected precision is therefore exactly ``accuracy``."""

    def __init__(self, *, num_experts: int, accuracy: float, seed: int = 0) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise PolicyError(f"predictor accuracy must be in [0, 1], got {accuracy}")
        self.num_experts = num_experts
        self.accuracy = accuracy
        self.rng = np.random.default_rng(seed)

    def predict_set(self, true_experts: Sequence[int]) -> np.ndarray:
        """One layer: the predicted ids, same length and order as ``true_experts``."""
        true = np.asarray(true_experts, dtype=np.int64)
        wrong = self.rng.random(len(true)) >= self.accuracy
        if not wrong.any():
            return true.copy()
        pool = np.setdiff1d(np.arange(self.num_experts), true)
        out = true.copy()
        out[wrong] = self.rng.choice(pool, size=int(wrong.sum()), replace=False)
        return out

    def predict(self, true_experts: np.ndarray) -> np.ndarray:
        """Every layer: ids ``[layers, k]`` in, noisy ids ``[layers, k]`` out."""
        return np.stack([self.predict_set(row) for row in np.asarray(true_experts)])

    def predict_all(self, task: str | None, previous: np.ndarray | None, *, actual: np.ndarray | None = None) -> np.ndarray:
        """The forecaster interface of ``EmoePlanner``: the per-layer frequency ``[layers, E]`` of
        the noisy version of ``actual`` (ids ``[layers, k]`` or ``[tokens, layers, k]``), which a
        trace-driven engine knows."""
        if actual is None:
            raise PolicyError("a parametric predictor needs the actual routing of the prompt it predicts")
        a = np.asarray(actual)
        a = a[None] if a.ndim == 2 else a
        return _histogram(np.stack([self.predict(tok) for tok in a]), self.num_experts)


# ---------------------------------------------------------------- Eq. 2: expected token load, top-L


def expected_token_load(
    running: Sequence[tuple[str | None, int]],
    *,
    expected_output_tokens: Mapping[str | None, float],
    sensitivity: Mapping[str | None, np.ndarray] | None,
    frequency: Mapping[str | None, np.ndarray],
) -> np.ndarray:
    """Eq. 2 summed over tasks: ``N[l, i] = sum_task (sum_j W_j + T * W_o) * s[l] * f[l, i]``.

    ``running``: (task, input tokens) of every running request, the new one included (W_j; T is the
    number of them per task). ``expected_output_tokens[task]``: W_o. ``sensitivity[task]``: s per
    layer (bool/0-1 ``[layers]``; a task missing from it, or ``sensitivity=None``, is sensitive
    everywhere). ``frequency[task]``: f ``[layers, E]``. Returns N ``[layers, E]``."""
    by_task: dict[str | None, list[int]] = {}
    for task, tokens in running:
        by_task.setdefault(task, []).append(tokens)
    total: np.ndarray | None = None
    for task, inputs in by_task.items():
        if task not in frequency:
            raise PolicyError(f"no predicted routing frequency for task {task!r}")
        f = np.asarray(frequency[task], dtype=float)
        if task not in expected_output_tokens:
            raise PolicyError(f"no expected output length for task {task!r}")
        tokens = sum(inputs) + len(inputs) * float(expected_output_tokens[task])
        s = np.ones(f.shape[0]) if sensitivity is None or task not in sensitivity else np.asarray(sensitivity[task], dtype=float)
        n = tokens * s[:, None] * f
        total = n if total is None else total + n
    if total is None:
        raise PolicyError("expected_token_load needs at least one running request")
    return total


def top_experts_per_layer(load: np.ndarray, experts_per_layer: int | Sequence[int], *,
                          min_per_layer: int = 1, tie_break: np.ndarray | None = None) -> list[np.ndarray]:
    """The top-L experts of each layer by expected load (descending; ties by ``tie_break`` score,
    then lower id). Experts with zero load are not chosen, except that each layer keeps at least
    ``min_per_layer`` (so a token always has a resident expert to be rerouted to). ``experts_per_layer``
    is L, one number or one per layer (the user sets it from the memory budget)."""
    load = np.asarray(load, dtype=float)
    layers, E = load.shape
    budget = np.broadcast_to(np.asarray(experts_per_layer, dtype=np.int64), (layers,))
    tb = np.zeros_like(load) if tie_break is None else np.asarray(tie_break, dtype=float)
    chosen = []
    for layer in range(layers):
        order = np.lexsort((np.arange(E), -tb[layer], -load[layer]))
        positive = int((load[layer] > 0).sum())
        take = min(int(budget[layer]), max(positive, min(min_per_layer, int(budget[layer]))))
        chosen.append(order[:take])
    return chosen


def keys_of(chosen: Sequence[np.ndarray], num_experts: int) -> frozenset[int]:
    return frozenset(int(layer * num_experts + e) for layer, ids in enumerate(chosen) for e in ids)


# ---------------------------------------------------------------- periodic invocation


class Forecaster(Protocol):
    def predict_all(self, task: str | None, previous: np.ndarray | None, *, actual: np.ndarray | None = None) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class ResidencyPlan:
    """What the engine should hold in GPU memory after a prompt is scheduled: load ``keep - resident``
    at the next dispatch (layer by layer), and move ``resident - keep`` to host memory."""

    keep: frozenset[int]
    load_all: bool  # the first prompt (and all prompts before the first prediction)
    predictor_called: bool  # this prompt invoked the predictor
    prompt_index: int


class EmoePlanner:
    """Periodic expert invocation plus task-aware loading (eMoE sections 3.3-3.4).

    Lifecycle: the engine calls ``on_prompt`` each time a new request is scheduled, with the
    (task, input tokens) of all running requests including the new one, and ``observe`` when a
    prompt's routing is known (its expert ids), which becomes the "previous prompt" of its task.
    Prompt 0 keeps every expert resident; prompts ``period, 2*period, ...`` call the predictor for
    every task then running; every prompt from the first prediction on re-plans residency with Eq. 2
    from the latest forecasts (prompts before it keep everything). The planner holds counters and
    forecasts only; it never touches memory itself."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        predictor: Forecaster,
        experts_per_layer: int | Sequence[int],
        expected_output_tokens: Mapping[str | None, float],
        sensitivity: Mapping[str | None, np.ndarray] | None = None,
        period: int = 40,
        default_output_tokens: float = 128.0,
    ) -> None:
        if period < 1:
            raise PolicyError(f"eMoE invocation period must be >= 1 prompt, got {period}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.predictor = predictor
        self.experts_per_layer = experts_per_layer
        self.expected_output_tokens = dict(expected_output_tokens)
        self.default_output_tokens = default_output_tokens
        self.sensitivity = sensitivity
        self.period = period
        self.num_prompts = 0
        self.num_predictor_calls = 0
        self._previous: dict[str | None, np.ndarray] = {}
        self._forecast: dict[str | None, np.ndarray] = {}
        self._all = frozenset(range(num_layers * num_experts))

    def observe(self, task: str | None, experts: np.ndarray) -> None:
        """Record a prompt's routing (ids ``[layers, k]`` or ``[tokens, layers, k]``)."""
        self._previous[task] = np.asarray(experts)

    def on_prompt(self, task: str | None, running: Sequence[tuple[str | None, int]], *,
                  actual: np.ndarray | None = None) -> ResidencyPlan:
        """A new prompt of ``task`` is scheduled; ``running`` includes it. ``actual`` is its routing,
        passed only to a parametric (oracle + noise) predictor."""
        index = self.num_prompts
        self.num_prompts += 1
        called = index > 0 and index % self.period == 0
        if called:
            self.num_predictor_calls += 1
            for t in dict.fromkeys([task, *(r[0] for r in running)]):
                act = actual if t == task else None
                if act is None and isinstance(self.predictor, ParametricPredictor):
                    continue  # an oracle-plus-noise forecast exists only for the prompt whose routing is known
                self._forecast[t] = self.predictor.predict_all(t, self._previous.get(t), actual=act)
        if not self._forecast:
            return ResidencyPlan(self._all, True, called, index)
        # A task first seen since the last prediction uses the pooled forecast of the others.
        pooled = np.mean(list(self._forecast.values()), axis=0)
        freq = {t: self._forecast.get(t, pooled) for t, _ in running}
        out = {t: self.expected_output_tokens.get(t, self.default_output_tokens) for t, _ in running}
        load = expected_token_load(running, expected_output_tokens=out, sensitivity=self.sensitivity, frequency=freq)
        chosen = top_experts_per_layer(load, self.experts_per_layer, tie_break=pooled)
        return ResidencyPlan(keys_of(chosen, self.num_experts), False, called, index)


# ---------------------------------------------------------------- miss handling


@dataclass(frozen=True, slots=True)
class RerouteResult:
    """Experts that serve each token (``served[tokens, k]``, -1 where no resident expert was left)
    and the fidelity counts."""

    served: np.ndarray
    num_assignments: int
    num_kept: int  # assignments served by the expert the gate selected

    @property
    def fidelity(self) -> float:
        return 1.0 if self.num_assignments == 0 else self.num_kept / self.num_assignments


def reroute_tokens(ranking: np.ndarray, resident: np.ndarray, top_k: int) -> RerouteResult:
    """One MoE layer. ``ranking[tokens, r]``: each token's experts by gate score, best first (r >= k;
    the first k are the selected ones; r = E for a full ranking). ``resident[E]``: bool mask.
    A selected expert that is resident serves the token; each one that is not is replaced by the
    next-ranked expert (after the first k) that is resident and not already serving the token."""
    ranking = np.asarray(ranking, dtype=np.int64)
    resident = np.asarray(resident, dtype=bool)
    tokens = ranking.shape[0]
    served = np.full((tokens, top_k), -1, dtype=np.int64)
    kept = 0
    for t in range(tokens):
        row = ranking[t]
        sel = row[:top_k]
        ok = resident[sel]
        served[t, ok] = sel[ok]
        kept += int(ok.sum())
        spares = iter(e for e in row[top_k:] if resident[e] and e not in sel)
        for j in np.flatnonzero(~ok):
            served[t, j] = next(spares, -1)
    return RerouteResult(served, tokens * top_k, kept)


def reroute_counts(counts: np.ndarray, resident: np.ndarray, preference: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The count-level form for an engine that only knows tokens per expert: ``counts[layers, E]``
    assignments, ``resident[layers, E]`` mask, ``preference[layers, E]`` score of each expert as a
    substitute (e.g. the predicted frequency, or mean gate score). Assignments to a non-resident
    expert move to the best-preferred resident expert of the layer (a layer with none resident keeps
    them where they are: the engine must load on demand there). Returns
    ``(served_counts[layers, E], num_assignments, num_kept)``; fidelity = kept / assignments."""
    counts = np.asarray(counts, dtype=np.int64)
    resident = np.asarray(resident, dtype=bool)
    pref = np.asarray(preference, dtype=float)
    served = np.where(resident, counts, 0)
    for layer in range(counts.shape[0]):
        missed = int(counts[layer][~resident[layer]].sum())
        if missed == 0:
            continue
        if not resident[layer].any():
            served[layer] = counts[layer]
            continue
        best = int(np.argmax(np.where(resident[layer], pref[layer], -np.inf)))
        served[layer, best] += missed
    return served, int(counts.sum()), int(np.where(resident, counts, 0).sum())
