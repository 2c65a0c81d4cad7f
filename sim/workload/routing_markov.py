"""The Markov routing generator: per-layer popularity, token-to-token persistence, a per-request working set,
layer-to-layer transitions and a task mixture.

For each token and MoE layer the generator fills the token's ``top_k`` slots in order. Slot j of layer l:

  1. keeps the previous token's slot-j expert of the same layer with probability ``persistence[l]``
     (temporal locality; a request's first token has nothing to keep);
  2. otherwise, for l > 0, follows the layer above with probability ``coupling[l-1]``: the expert is
     ``affinity[l-1][e]`` where e is the slot-j expert just chosen in layer l-1 (layer-to-layer transitions);
  3. otherwise comes from the request's working set (``hot_experts`` experts per layer, drawn once per request
     from the popularity) with probability ``locality``, else from the layer's popularity; within the working set
     the j-th expert drawn (j = 0, 1, ...) is picked with weight (j + 1)^-``hot_skew`` (0: equally likely), so a
     request can lean on a few experts of its own (what a cache of exactly top_k slots under LFU sees);
  4. an expert already in an earlier slot is redrawn (3 rounds of rejection, then an exact draw without them).

A proposal of step 3 that the request used in its previous ``refractory_tokens`` tokens is redrawn once with
probability ``refractory`` (a rest after use: spreads a request's experts over time, which lowers LRU at 2-3 x
top_k below what independent draws give, as LLaMA-MoE's real curves are; 0 = off).

Popularity, and so the working sets, belong to the request's *task*: each task has its own per-layer popularity
[layers, experts] (index 0 is the base one, used for requests without a known task). The task of request i is
given by ``set_request_tasks`` (the request table's task column) or drawn once from ``task_mix``.

Layer transitions stay vectorised over layers: every layer has a relabelling phi_l with
phi_{l+1}(affinity_l(e)) = phi_l(e), so following a chain of coupled layers is a forward fill of labels along the
layer axis. The default affinity maps the rank-r expert of layer l to the rank-r expert of layer l+1, which keeps
each layer's popularity when layers share one Zipf shape."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from sim.workload.routing import EXACT_TOKENS_MAX, GeneratedRouting, Segment, _alias_tables

_MARGINAL_SAMPLES = 20_000


def rank_affinity(popularity: np.ndarray) -> np.ndarray:
    """[L-1, E]: the rank-r expert of layer l maps to the rank-r expert of layer l+1."""
    order = np.argsort(-popularity, axis=1, kind="stable")
    L, E = popularity.shape
    aff = np.empty((max(L - 1, 0), E), dtype=np.int64)
    for layer in range(L - 1):
        aff[layer, order[layer]] = order[layer + 1]
    return aff


def _labels(affinity: np.ndarray, num_layers: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """phi [L, E] (expert -> label) and its inverse, with phi_{l+1}[affinity_l[e]] = phi_l[e]."""
    phi = np.empty((num_layers, num_experts), dtype=np.int64)
    phi[0] = np.arange(num_experts)
    for layer in range(num_layers - 1):
        phi[layer + 1, affinity[layer]] = phi[layer]
    inv = np.empty_like(phi)
    rows = np.arange(num_layers)[:, None]
    inv[rows, phi] = np.arange(num_experts)[None, :]
    return phi, inv


def inclusion_probabilities(p: np.ndarray, top_k: int) -> np.ndarray:
    """P(a token picks expert e) under Plackett-Luce top-k of p [L, E], estimated with a fixed private stream."""
    L, E = p.shape
    if np.allclose(p, p[:, :1]):
        return np.full_like(p, top_k / E)
    est_rng = np.random.default_rng(12345)
    log_p = np.log(p)
    counts = np.zeros(L * E, dtype=np.int64)
    chunk = max(1, 2_000_000 // (L * E))
    for start in range(0, _MARGINAL_SAMPLES, chunk):
        n = min(chunk, _MARGINAL_SAMPLES - start)
        keys = log_p[None] + est_rng.gumbel(size=(n, L, E))
        picks = np.argpartition(-keys, top_k - 1, axis=2)[:, :, :top_k]
        counts += np.bincount((picks + (np.arange(L) * E)[None, :, None]).ravel(), minlength=L * E)
    return counts.reshape(L, E) / _MARGINAL_SAMPLES


class MarkovGeneratedRouting(GeneratedRouting):
    """Generated routing with persistence, working sets, layer transitions and tasks (see the module docstring).

    State is kept for every request seen: the position it expects next, its last token's experts [L, k], its
    working set [L, hot] (or None) and its task index -- about L x (k + hot) x 8 bytes per request. Segments longer
    than EXACT_TOKENS_MAX (prefill chunks) draw their counts from a multinomial over the task's inclusion
    probabilities and leave the request at a fresh draw for its last token."""

    def __init__(
        self, weights: np.ndarray, top_k: int, persistence: np.ndarray, rng: np.random.Generator, *,
        locality: float = 0.0, hot_experts: int | None = None, hot_skew: float = 0.0,
        refractory: float = 0.0, refractory_tokens: int = 0,
        coupling: float | np.ndarray = 0.0, affinity: np.ndarray | None = None,
        task_weights: Mapping[str, np.ndarray] | None = None, task_mix: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(weights, top_k, rng)
        L, E = self.num_layers, self.num_experts
        self.persistence = np.broadcast_to(np.asarray(persistence, dtype=np.float64), (L,)).copy()
        self.locality = float(locality)
        self.hot_experts = min(E, hot_experts or 2 * top_k)
        if hot_skew < 0:
            raise ValueError(f"hot_skew must be >= 0, got {hot_skew}")
        self.hot_skew = float(hot_skew)
        hot_w = (np.arange(self.hot_experts) + 1.0) ** -self.hot_skew
        self._hot_w = hot_w / hot_w.sum()  # weight of the j-th working-set member, in draw order
        self._hot_cum = np.cumsum(self._hot_w)
        if not 0 <= refractory <= 1 or refractory_tokens < 0:
            raise ValueError(f"refractory must be in [0, 1] and refractory_tokens >= 0, got {refractory}, {refractory_tokens}")
        self.refractory = float(refractory)
        self.refractory_tokens = int(refractory_tokens) if refractory > 0 else 0
        base = np.exp(self._log_p)
        base /= base.sum(axis=1, keepdims=True)
        # Tasks: index 0 is the base popularity, then one per named task.
        self.task_names: list[str] = list(task_weights or {})
        tables = [base] + [np.asarray(task_weights[t], dtype=np.float64) for t in self.task_names]  # type: ignore[index]
        for name, t in zip(["base"] + self.task_names, tables):
            if t.shape != (L, E) or np.any(t < 0) or np.any(t.sum(axis=1) <= 0):
                raise ValueError(f"task {name!r}: popularity must be [{L}, {E}] with a positive sum per layer")
        p = np.stack([t / t.sum(axis=1, keepdims=True) for t in tables])  # [T, L, E]
        self._p = p.reshape(-1, E)  # row = task * L + layer
        self._log_pt = np.log(np.maximum(p, 1e-300))
        self._alias_prob, self._alias = _alias_tables(self._p)
        self._inclusion_t: dict[int, np.ndarray] = {}  # per task, computed when first needed
        self._task_index = {name: i + 1 for i, name in enumerate(self.task_names)}
        mix = dict(task_mix or {})
        unknown = [t for t in mix if t not in self._task_index]
        if unknown:
            raise ValueError(f"task_mix names {unknown[0]!r}, which has no popularity; known: {self.task_names}")
        self._mix_names = list(mix)
        self._mix_p = np.array([mix[t] for t in self._mix_names], dtype=np.float64)
        if len(self._mix_p) and (np.any(self._mix_p < 0) or self._mix_p.sum() <= 0):
            raise ValueError(f"task_mix weights must be >= 0 and not all 0, got {mix}")
        self._request_tasks: np.ndarray | None = None
        # Layer transitions.
        coup = np.broadcast_to(np.asarray(coupling, dtype=np.float64), (max(L - 1, 0),))
        self.coupling = np.concatenate([[0.0], coup])  # [L]: P(follow the layer above), 0 for layer 0
        self.affinity = rank_affinity(base) if affinity is None else np.asarray(affinity, dtype=np.int64)
        if self.affinity.shape != (max(L - 1, 0), E) or any(
            sorted(row.tolist()) != list(range(E)) for row in self.affinity
        ):
            raise ValueError(f"affinity must be [{L - 1}, {E}] permutations of the expert ids")
        self._phi, self._phi_inv = _labels(self.affinity, L, E)
        self._coupled = bool(self.coupling.any())
        self._state: dict[int, tuple[int, np.ndarray, np.ndarray | None, int]] = {}
        self._recent: dict[int, np.ndarray] = {}  # request -> [L, refractory_tokens * k], newest first (-1 = none)

    # -------------------------------------------------------------- tasks

    def set_request_tasks(self, tasks: Sequence[str | None] | np.ndarray | None) -> None:
        """Task label per request id (the request table's task column); unknown labels use the base popularity."""
        if tasks is None:
            self._request_tasks = None
            return
        self._request_tasks = np.array([self._task_index.get(str(t), 0) if t is not None else -1 for t in tasks])

    def _task_of(self, request_id: int) -> int:
        if self._request_tasks is not None and 0 <= request_id < len(self._request_tasks):
            bound = int(self._request_tasks[request_id])
            if bound >= 0:
                return bound
        if len(self._mix_p):
            pick = int(self._rng.choice(len(self._mix_p), p=self._mix_p / self._mix_p.sum()))
            return self._task_index[self._mix_names[pick]]
        return 0

    # -------------------------------------------------------------- drawing

    def _hot_sets(self, rng: np.random.Generator, tasks: np.ndarray) -> np.ndarray | None:
        """[n, L, hot_experts] working sets, Plackett-Luce draws from each request's task popularity."""
        if self.locality <= 0:
            return None
        keys = self._log_pt[tasks] + rng.gumbel(size=(len(tasks), self.num_layers, self.num_experts))
        hot = np.argpartition(-keys, self.hot_experts - 1, axis=2)[:, :, : self.hot_experts]
        if self.hot_skew > 0:  # draw order (largest key first), which the skew weights refer to
            order = np.argsort(-np.take_along_axis(keys, hot, axis=2), axis=2, kind="stable")
            hot = np.take_along_axis(hot, order, axis=2)
        return hot

    def _propose(
        self, rng: np.random.Generator, rows: np.ndarray, table_row: np.ndarray, hot_flat: np.ndarray | None,
        recent_flat: np.ndarray | None = None,
    ) -> np.ndarray:
        """One expert per flat row (request * L + layer): the working set w.p. locality, else the popularity;
        one used in the recent tokens (``recent_flat`` [rows, window * k], -1 = none) is redrawn w.p. refractory."""
        e = self._propose_once(rng, rows, table_row, hot_flat)
        if recent_flat is not None:
            redo = (recent_flat[rows] == e[:, None]).any(axis=1) & (rng.random(len(rows)) < self.refractory)
            if redo.any():
                e[redo] = self._propose_once(rng, rows[redo], table_row, hot_flat)
        return e

    def _propose_once(self, rng: np.random.Generator, rows: np.ndarray, table_row: np.ndarray, hot_flat: np.ndarray | None) -> np.ndarray:
        E = self.num_experts
        tr = table_row[rows]
        col = np.minimum((rng.random(len(rows)) * E).astype(np.int64), E - 1)
        e = np.where(rng.random(len(rows)) < self._alias_prob[tr, col], col, self._alias[tr, col])
        if hot_flat is not None:
            use_hot = rng.random(len(rows)) < self.locality
            if self.hot_skew > 0:
                pick = np.minimum(np.searchsorted(self._hot_cum, rng.random(len(rows)), side="right"), hot_flat.shape[1] - 1)
            else:
                pick = rng.integers(0, hot_flat.shape[1], size=len(rows))
            e = np.where(use_hot, hot_flat[rows, pick], e)
        return e

    def _draw(
        self, rng: np.random.Generator, prev: np.ndarray | None, has_prev: np.ndarray, hot: np.ndarray | None = None,
        tasks: np.ndarray | None = None, recent: np.ndarray | None = None,
    ) -> np.ndarray:
        """One token for each of R requests: [R, L, k] expert ids; ``recent`` [R, L, window * k] (-1 = none) are
        the experts of each request's last tokens, for the refractory redraw."""
        R = len(has_prev)
        L, E, k = self.num_layers, self.num_experts, self.top_k
        tasks = np.zeros(R, dtype=np.int64) if tasks is None else tasks
        table_row = (tasks[:, None] * L + np.arange(L)[None, :]).ravel()  # [R * L]
        flat = np.full((R * L, k), -1, dtype=np.int64)  # row r * L + l
        if prev is not None and has_prev.any():
            keep = ((rng.random((R, L, k)) < self.persistence[None, :, None]) & has_prev[:, None, None]).reshape(R * L, k)
            flat[keep] = prev.reshape(R * L, k)[keep]
        hot_flat = None if hot is None else hot.reshape(R * L, -1)
        recent_flat = None if recent is None or not self.refractory_tokens else recent.reshape(R * L, -1)
        need = flat < 0  # [R * L, k]
        # First proposals for every empty slot at once (then slot by slot, rejecting clashes).
        prop = np.full((R * L, k), -1, dtype=np.int64)
        rows, slots = np.nonzero(need)
        prop[rows, slots] = self._propose(rng, rows, table_row, hot_flat, recent_flat)
        if self._coupled:
            # Follow the layer above: forward-fill relabelled ids along the layer axis over the coupled cells.
            layers = np.arange(L)[None, :, None]
            v = np.where(need, prop, flat).reshape(R, L, k)
            coupled = (rng.random((R, L, k)) < self.coupling[None, :, None]) & need.reshape(R, L, k)
            src = np.maximum.accumulate(np.where(coupled, 0, layers), axis=1)
            label = np.take_along_axis(self._phi[layers, v], src, axis=1)
            prop = self._phi_inv[layers, label].reshape(R * L, k)
        for slot in range(k):
            todo = np.flatnonzero(need[:, slot])
            if len(todo) == 0:
                continue
            e = prop[todo, slot]
            for round_ in range(3):
                clash = (flat[todo] == e[:, None]).any(axis=1)
                flat[todo[~clash], slot] = e[~clash]
                todo = todo[clash]
                if len(todo) == 0 or round_ == 2:
                    break
                e = self._propose(rng, todo, table_row, hot_flat, recent_flat)
            if len(todo):
                p = self._p[table_row[todo]]
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
                    u = rng.random(h.shape)
                    # Efraimidis-Spirakis: the largest u^(1/w) is a free member drawn with probability ~ its weight.
                    keys = np.where(free, u if self.hot_skew == 0 else u ** (1.0 / self._hot_w[None, :]), -1.0)
                    col = keys.argmax(axis=1)
                    use_hot = (rng.random(len(todo)) < self.locality) & free.any(axis=1)
                    e = np.where(use_hot, h[np.arange(len(todo)), col], e)
                flat[todo, slot] = e
        return flat.reshape(R, L, k)

    def _new_request(self, request_id: int) -> tuple[np.ndarray | None, int]:
        st = self._state.get(request_id)
        if st is not None:
            return st[2], st[3]
        task = self._task_of(request_id)
        hot = self._hot_sets(self._rng, np.array([task]))
        return (None if hot is None else hot[0]), task

    def counts(self, segments: Sequence[Segment]) -> np.ndarray:
        return self.counts_by_group(segments, [0] * len(segments), 1)[0]

    def counts_by_group(self, segments: Sequence[Segment], groups: Sequence[int], num_groups: int) -> np.ndarray:
        """Counts [group, layer, expert], segment i in group ``groups[i]`` (expert parallelism: the rank
        holding the sequence; see GeneratedRouting.counts_by_group)."""
        L, E = self.num_layers, self.num_experts
        total = np.zeros(num_groups * L * E, dtype=np.int64)
        group_of = {seg[0]: g for seg, g in zip(segments, groups)}
        small = [seg for seg in segments if 0 < seg[2] <= EXACT_TOKENS_MAX]
        for request_id, start, n in segments:
            if n > EXACT_TOKENS_MAX:
                hot, task = self._new_request(request_id)
                if task not in self._inclusion_t:
                    self._inclusion_t[task] = self._inclusion if task == 0 else inclusion_probabilities(
                        self._p.reshape(-1, L, E)[task], self.top_k)
                drawn = self._rng.multinomial(n * self.top_k, (self._inclusion_t[task] / self.top_k))
                base = group_of[request_id] * L * E
                total[base : base + L * E] += np.minimum(drawn, n).ravel()
                last = self._draw(self._rng, None, np.zeros(1, dtype=bool), None if hot is None else hot[None],
                                  np.array([task]))[0]
                self._state[request_id] = (start + n, last, hot, task)
                if self.refractory_tokens:
                    self._recent[request_id] = self._push_recent(None, last)
        if small:
            offs = (np.arange(L) * E)[None, :, None]
            steps = max(seg[2] for seg in small)
            for j in range(steps):
                active = [seg for seg in small if seg[2] > j]
                prev = np.zeros((len(active), L, self.top_k), dtype=np.int64)
                has_prev = np.zeros(len(active), dtype=bool)
                tasks = np.zeros(len(active), dtype=np.int64)
                hots = [] if self.locality > 0 else None
                for i, (request_id, start, _n) in enumerate(active):
                    st = self._state.get(request_id)
                    if st is not None:
                        hot, tasks[i] = st[2], st[3]
                        if st[0] == start + j:
                            prev[i] = st[1]
                            has_prev[i] = True
                    else:
                        hot, tasks[i] = self._new_request(request_id)
                        self._state[request_id] = (-1, prev[i], hot, int(tasks[i]))
                    if hots is not None:
                        hots.append(hot)
                hot_arr = None if hots is None else np.stack(hots)
                recent = None
                if self.refractory_tokens:
                    recent = np.full((len(active), L, self.refractory_tokens * self.top_k), -1, dtype=np.int64)
                    for i, (request_id, _start, _n) in enumerate(active):
                        if has_prev[i] and request_id in self._recent:
                            recent[i] = self._recent[request_id]
                picks = self._draw(self._rng, prev, has_prev, hot_arr, tasks, recent)
                if num_groups == 1:
                    total += np.bincount((picks + offs).ravel(), minlength=L * E)
                else:
                    goffs = np.array([group_of[seg[0]] * L * E for seg in active])[:, None, None]
                    total += np.bincount((picks + offs + goffs).ravel(), minlength=num_groups * L * E)
                for i, (request_id, start, _n) in enumerate(active):
                    self._state[request_id] = (start + j + 1, picks[i], None if hot_arr is None else hot_arr[i], int(tasks[i]))
                    if recent is not None:
                        self._recent[request_id] = self._push_recent(recent[i], picks[i])
        return total.reshape(num_groups, L, E)

    def _push_recent(self, recent: np.ndarray | None, picks: np.ndarray) -> np.ndarray:
        """The refractory window after a token: its picks [.., L, k] first, the oldest token dropped."""
        width = self.refractory_tokens * self.top_k
        if recent is None:
            recent = np.full(picks.shape[:-1] + (width,), -1, dtype=np.int64)
        return np.concatenate([picks, recent[..., : width - self.top_k]], axis=-1)

    # -------------------------------------------------------------- whole sequences (statistics, fitting)

    def sequence(self, num_tokens: int) -> np.ndarray:
        """Expert ids [tokens, layers, top_k] for one request, token by token (for statistics)."""
        return self.sequences(1, num_tokens)[0]

    def like(self, lengths: Sequence[int], tasks: Sequence[str | None] | None = None) -> list[np.ndarray]:
        """One generated request per length (generated together, then cut to length), with the given tasks."""
        full = self.sequences(len(lengths), max(lengths), tasks)
        return [seq[:n] for seq, n in zip(full, lengths)]

    def sequences(self, num_requests: int, num_tokens: int, tasks: Sequence[str | None] | None = None) -> list[np.ndarray]:
        """Expert ids for many requests at once, vectorised over requests: a list of [tokens, layers, top_k]."""
        if tasks is None:
            task_idx = np.array([self._task_of(-1) for _ in range(num_requests)], dtype=np.int64) if len(self._mix_p) \
                else np.zeros(num_requests, dtype=np.int64)
        else:
            task_idx = np.array([self._task_index.get(str(t), 0) if t is not None else 0 for t in tasks], dtype=np.int64)
        out = np.empty((num_requests, num_tokens, self.num_layers, self.top_k), dtype=np.int64)
        hot = self._hot_sets(self._rng, task_idx)
        prev = None
        recent = None
        for t in range(num_tokens):
            picks = self._draw(self._rng, prev, np.full(num_requests, prev is not None), hot, task_idx, recent)
            out[:, t] = picks
            prev = picks
            if self.refractory_tokens:
                recent = self._push_recent(recent, picks)
        return list(out)
