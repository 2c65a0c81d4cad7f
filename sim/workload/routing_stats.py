"""Statistics of an expert-routing trace: what a routing generator must reproduce.

Every function takes per-request expert ids ``experts[tokens, layers, top_k]`` (a list, one array per
request, in recording order) and returns plain numbers or arrays, per MoE layer and overall (the mean
over layers):

  popularity        normalised entropy, max/mean share and Gini of the per-layer expert counts
  load imbalance    max/mean tokens per expert within batches of B consecutive tokens
  persistence       P(a token selects the same expert set as the previous token), mean overlap
  reuse distance    tokens between two uses of an expert in a layer, as a histogram
  transitions       how much the expert chosen in layer l tells about layer l+1 (normalised MI)
  task differences  Jensen-Shannon divergence between the tasks' popularity
  prompt overlap    Jaccard of expert sets between consecutive requests (all tokens, first 16)
  hit-rate curves   per-layer LRU / LFU / static cache replayed one request at a time, as moe-lrc did:
                    each (request, layer) stream of expert accesses, top-k per token in gate order,
                    goes through a cache that starts empty (static: pins the layer's globally most
                    frequent experts from the start); the hit rate is the mean over requests and layers.

``routing_stats`` gathers everything into one JSON-ready dict; ``plot_hit_rate_curves`` draws the curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

Experts = Sequence[np.ndarray]  # each [tokens, layers, top_k]


def _counts(experts: Experts, num_experts: int) -> np.ndarray:
    """Tokens per [layer, expert] over the whole trace."""
    L = experts[0].shape[1]
    total = np.zeros(L * num_experts, dtype=np.int64)
    offs = (np.arange(L) * num_experts)[None, :, None]
    for seq in experts:
        total += np.bincount((seq.astype(np.int64) + offs).ravel(), minlength=L * num_experts)
    return total.reshape(L, num_experts)


def gini(x: np.ndarray) -> float:
    """0 for equal shares, (n-1)/n when one holds everything."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    cum = np.cumsum(x)
    return float((n + 1 - 2 * (cum / cum[-1]).sum()) / n)


def popularity_stats(experts: Experts, num_experts: int) -> dict:
    counts = _counts(experts, num_experts).astype(np.float64)
    share = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(share > 0, share * np.log(share), 0.0), axis=1) / np.log(num_experts)
    max_mean = counts.max(axis=1) / counts.mean(axis=1)
    g = np.array([gini(c) for c in counts])
    return {
        "per_layer": {"entropy": ent.tolist(), "max_over_mean": max_mean.tolist(), "gini": g.tolist()},
        "overall": {"entropy": float(ent.mean()), "max_over_mean": float(max_mean.mean()), "gini": float(g.mean())},
        "share": share.tolist(),
    }


def load_imbalance(experts: Experts, num_experts: int, batch_tokens: int) -> dict:
    """Max/mean tokens per expert in each layer for batches of ``batch_tokens`` consecutive tokens
    (requests concatenated in order); mean over batches."""
    allt = np.concatenate(list(experts)).astype(np.int64)  # [T, L, k]
    T, L, k = allt.shape
    nb = T // batch_tokens
    if nb == 0:
        return {"batch_tokens": batch_tokens, "per_layer": [], "overall": None}
    b = allt[: nb * batch_tokens].reshape(nb, batch_tokens, L, k)
    offs = (np.arange(nb)[:, None, None, None] * L + np.arange(L)[None, None, :, None]) * num_experts
    c = np.bincount((b + offs).ravel(), minlength=nb * L * num_experts).reshape(nb, L, num_experts)
    ratio = c.max(axis=2) / (batch_tokens * k / num_experts)
    per_layer = ratio.mean(axis=0)
    return {"batch_tokens": batch_tokens, "per_layer": per_layer.tolist(), "overall": float(per_layer.mean())}


def persistence_stats(experts: Experts) -> dict:
    """Per layer: P(same expert set as the previous token of the request) and mean |S_t & S_t-1| / k."""
    same, overlap, n = 0.0, 0.0, 0
    for seq in experts:
        if len(seq) < 2:
            continue
        a = np.sort(seq[1:], axis=2)
        b = np.sort(seq[:-1], axis=2)
        same = same + (a == b).all(axis=2).sum(axis=0)
        ov = (seq[1:, :, :, None] == seq[:-1, :, None, :]).any(axis=3).sum(axis=2) / seq.shape[2]
        overlap = overlap + ov.sum(axis=0)
        n += len(seq) - 1
    same_l = np.asarray(same, dtype=np.float64) / max(n, 1)
    ov_l = np.asarray(overlap, dtype=np.float64) / max(n, 1)
    return {
        "per_layer": {"same_set": same_l.tolist(), "overlap": ov_l.tolist()},
        "overall": {"same_set": float(same_l.mean()), "overlap": float(ov_l.mean())},
    }


REUSE_BINS = [1, 2, 3, 4, 5, 9, 17, 33, 65]  # left edges in tokens; the last bin is open


def reuse_distance(experts: Experts, num_experts: int) -> dict:
    """Tokens since the same expert was last used in the same layer of the same request; first uses
    are counted apart. Returns the histogram (fractions) over REUSE_BINS and the median."""
    dists = []
    first = 0
    for seq in experts:
        T, L, k = seq.shape
        present = np.zeros((L, num_experts, T), dtype=bool)
        t_idx = np.broadcast_to(np.arange(T)[:, None, None], seq.shape)
        l_idx = np.broadcast_to(np.arange(L)[None, :, None], seq.shape)
        present[l_idx.ravel(), seq.ravel().astype(np.int64), t_idx.ravel()] = True
        le, t = np.nonzero(present.reshape(L * num_experts, T))
        same = le[1:] == le[:-1]
        dists.append((t[1:] - t[:-1])[same])
        first += int(len(le) - same.sum())
    d = np.concatenate(dists) if dists else np.zeros(0, dtype=np.int64)
    edges = np.array(REUSE_BINS + [np.iinfo(np.int64).max])
    hist = np.histogram(d, bins=edges)[0].astype(np.float64)
    total = hist.sum() + first
    return {
        "bins_tokens": [f"{a}-{b - 1}" if b - 1 > a else str(a) for a, b in zip(REUSE_BINS[:-1], REUSE_BINS[1:])]
        + [f"{REUSE_BINS[-1]}+"],
        "fraction": (hist / max(total, 1)).tolist(),
        "first_use_fraction": first / max(total, 1),
        "median_tokens": float(np.median(d)) if len(d) else None,
    }


def transition_counts(experts: Experts, num_experts: int) -> np.ndarray:
    """[L-1, E, E]: how often a token chose expert a in layer l together with expert b in layer l+1 (k x k pairs)."""
    E = num_experts
    L = experts[0].shape[1]
    joint = np.zeros((max(L - 1, 0), E, E), dtype=np.float64)
    for seq in experts:
        a = seq[:, :-1, :, None].astype(np.int64)
        b = seq[:, 1:, None, :].astype(np.int64)
        flat = (np.arange(L - 1)[None, :, None, None] * E + a) * E + b
        joint += np.bincount(flat.ravel(), minlength=(L - 1) * E * E).reshape(L - 1, E, E)
    return joint


def layer_transitions(experts: Experts, num_experts: int) -> dict:
    """For each pair of consecutive layers, the joint counts of (expert in l, expert in l+1) over a
    token's k x k choices; concentration as normalised mutual information I / H(l+1) and as the
    mean over source experts of the top next-expert probability."""
    joint = transition_counts(experts, num_experts)
    p = joint / joint.sum(axis=(1, 2), keepdims=True)
    pa = p.sum(axis=2, keepdims=True)
    pb = p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.nansum(np.where(p > 0, p * np.log(p / (pa * pb)), 0.0), axis=(1, 2))
        hb = -np.nansum(np.where(pb > 0, pb * np.log(pb), 0.0), axis=(1, 2))
        cond = p / pa
        top1 = np.nansum(np.nanmax(cond, axis=2) * pa[:, :, 0], axis=1)
    nmi = mi / np.where(hb > 0, hb, 1)
    return {
        "per_layer_pair": {"normalized_mi": nmi.tolist(), "top1_next_probability": top1.tolist()},
        "overall": {"normalized_mi": float(nmi.mean()), "top1_next_probability": float(top1.mean())},
    }


def _js(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda x: float(np.nansum(np.where(x > 0, x * np.log2(x / m), 0.0)))  # noqa: E731
    return (kl(p) + kl(q)) / 2


def task_differences(experts: Experts, tasks: Sequence[str | None], num_experts: int) -> dict:
    """Per task: requests, tokens, popularity entropy; and the mean over layers of the Jensen-Shannon
    divergence (bits, 0..1) between each pair of tasks' per-layer expert shares."""
    names = sorted({t for t in tasks if t})
    if len(names) < 1:
        return {"tasks": {}, "js_divergence": {}}
    shares = {}
    out: dict = {"tasks": {}, "js_divergence": {}}
    for name in names:
        seqs = [e for e, t in zip(experts, tasks) if t == name]
        c = _counts(seqs, num_experts).astype(np.float64)
        shares[name] = c / c.sum(axis=1, keepdims=True)
        pop = popularity_stats(seqs, num_experts)["overall"]
        out["tasks"][name] = {
            "requests": len(seqs), "tokens": int(sum(len(s) for s in seqs)), "entropy": pop["entropy"],
            "same_set": persistence_stats(seqs)["overall"]["same_set"],
        }
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            js = np.mean([_js(shares[a][layer], shares[b][layer]) for layer in range(shares[a].shape[0])])
            out["js_divergence"][f"{a}|{b}"] = float(js)
    return out


def prompt_overlap(experts: Experts, num_experts: int, first_tokens: int | None = None) -> dict:
    """Jaccard of the per-layer expert sets of consecutive requests (mean over layers and pairs)."""
    if len(experts) < 2:
        return {"first_tokens": first_tokens, "jaccard": None}
    sets = []
    for seq in experts:
        s = seq if first_tokens is None else seq[:first_tokens]
        m = np.zeros((s.shape[1], num_experts), dtype=bool)
        m[np.broadcast_to(np.arange(s.shape[1])[None, :, None], s.shape).ravel(), s.ravel().astype(np.int64)] = True
        sets.append(m)
    j = [((a & b).sum(axis=1) / np.maximum((a | b).sum(axis=1), 1)).mean() for a, b in zip(sets[:-1], sets[1:])]
    return {"first_tokens": first_tokens, "jaccard": float(np.mean(j))}


# ---------------------------------------------------------------- cache hit-rate curves


def default_cache_sizes(num_experts: int, top_k: int) -> list[int]:
    """Experts per layer: every size up to 16 experts, then multiples of top_k on a coarse grid."""
    if num_experts <= 16:
        return list(range(1, num_experts + 1))
    mults = [0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128]
    sizes = sorted({max(1, int(round(m * top_k))) for m in mults} | {num_experts})
    return [s for s in sizes if s <= num_experts]


def _lanes(experts: Experts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Access streams, one lane per (request, layer): keys [lanes, steps] padded with -1, the lane's
    layer, and its length. Within a token the k experts are accessed in gate order."""
    L, k = experts[0].shape[1], experts[0].shape[2]
    steps = max(len(s) for s in experts) * k
    lanes = np.full((len(experts) * L, steps), -1, dtype=np.int64)
    for i, seq in enumerate(experts):
        stream = seq.transpose(1, 0, 2).reshape(L, -1)  # [L, T*k]
        lanes[i * L : (i + 1) * L, : stream.shape[1]] = stream
    layer = np.tile(np.arange(L), len(experts))
    length = (lanes >= 0).sum(axis=1)
    return lanes, layer, length


def _lru_hits(lanes: np.ndarray, num_experts: int, sizes: Sequence[int]) -> np.ndarray:
    """Hits per lane and size, from LRU stack distances: an access hits a cache of C slots exactly when
    fewer than C other experts were used since its previous use (one pass serves every size)."""
    n, steps = lanes.shape
    last = np.full((n, num_experts), -1, dtype=np.int64)
    rows = np.arange(n)
    sizes_a = np.asarray(sizes)
    hits = np.zeros((n, len(sizes)), dtype=np.int64)
    for j in range(steps):
        key = lanes[:, j]
        valid = key >= 0
        k = np.where(valid, key, 0)
        prev = last[rows, k]
        seen = valid & (prev >= 0)
        dist = (last > prev[:, None]).sum(axis=1)
        hits += (seen[:, None] & (dist[:, None] < sizes_a[None, :]))
        last[rows[valid], k[valid]] = j
    return hits


def _lfu_hits(lanes: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
    """Hits per lane for an LFU cache of ``capacity`` slots (frequency over the lane's history; ties
    broken by least recent use), starting empty."""
    n, steps = lanes.shape
    rows = np.arange(n)
    count = np.zeros((n, num_experts), dtype=np.int64)
    last = np.zeros((n, num_experts), dtype=np.int64)
    resident = np.zeros((n, num_experts), dtype=bool)
    filled = np.zeros(n, dtype=np.int64)
    hits = np.zeros(n, dtype=np.int64)
    big = np.iinfo(np.int64).max
    for j in range(steps):
        key = lanes[:, j]
        valid = key >= 0
        k = np.where(valid, key, 0)
        hit = valid & resident[rows, k]
        hits += hit
        miss = valid & ~hit
        evict = miss & (filled >= capacity)
        if evict.any():
            r = rows[evict]
            score = np.where(resident[r], (count[r] << 32) + last[r], big)
            resident[r, score.argmin(axis=1)] = False
            filled[r] -= 1
        resident[rows[miss], k[miss]] = True
        filled += miss
        count[rows[valid], k[valid]] += 1
        last[rows[valid], k[valid]] = j
    return hits


def hit_rate_curves(
    experts: Experts, num_experts: int, sizes: Sequence[int] | None = None, policies: Sequence[str] = ("LRU", "LFU", "static")
) -> dict:
    """Per-layer cache hit rate vs slots per layer, per policy: {"sizes", policy: {"per_layer" [L][S],
    "overall" [S]}}. A lane's rate is hits / accesses; rates are averaged over requests, then layers."""
    top_k = experts[0].shape[2]
    L = experts[0].shape[1]
    sizes = list(sizes or default_cache_sizes(num_experts, top_k))
    lanes, layer, length = _lanes(experts)
    out: dict = {"sizes": sizes, "top_k": top_k}

    def summarise(hits: np.ndarray) -> dict:
        rate = hits / np.maximum(length, 1)[:, None]  # [lanes, S]
        per_layer = np.stack([rate[layer == lyr].mean(axis=0) for lyr in range(L)])
        return {"per_layer": per_layer.tolist(), "overall": per_layer.mean(axis=0).tolist()}

    if "LRU" in policies:
        out["LRU"] = summarise(_lru_hits(lanes, num_experts, sizes))
    if "LFU" in policies:
        out["LFU"] = summarise(np.stack([_lfu_hits(lanes, num_experts, c) for c in sizes], axis=1))
    if "static" in policies:
        counts = _counts(experts, num_experts)
        rank = np.argsort(np.argsort(-counts, axis=1, kind="stable"), axis=1)  # 0 = most frequent
        safe = np.where(lanes >= 0, lanes, 0)
        r = rank[layer[:, None], safe]
        hits = np.stack([((r < c) & (lanes >= 0)).sum(axis=1) for c in sizes], axis=1)
        out["static"] = summarise(hits)
    return out


def routing_stats(
    experts: Experts, num_experts: int, *, tasks: Sequence[str | None] | None = None,
    batch_tokens: Sequence[int] = (16, 64, 256), cache_sizes: Sequence[int] | None = None,
) -> dict:
    """Every statistic above, JSON-ready."""
    tasks = list(tasks) if tasks is not None else [None] * len(experts)
    return {
        "requests": len(experts),
        "tokens": int(sum(len(s) for s in experts)),
        "num_layers": int(experts[0].shape[1]),
        "num_experts": num_experts,
        "top_k": int(experts[0].shape[2]),
        "popularity": popularity_stats(experts, num_experts),
        "load_imbalance": [load_imbalance(experts, num_experts, b) for b in batch_tokens],
        "persistence": persistence_stats(experts),
        "reuse_distance": reuse_distance(experts, num_experts),
        "layer_transitions": layer_transitions(experts, num_experts),
        "tasks": task_differences(experts, tasks, num_experts),
        "prompt_overlap": [prompt_overlap(experts, num_experts), prompt_overlap(experts, num_experts, 16)],
        "hit_rate": hit_rate_curves(experts, num_experts, cache_sizes),
    }


def plot_hit_rate_curves(curves: dict, path: Path, title: str, reference: dict | None = None) -> Path:
    """PNG of hit rate vs slots per layer for each policy; ``reference`` ({policy: (sizes, rates)})
    is drawn dashed, e.g. a published curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"LRU": "C0", "LFU": "C1", "static": "C2"}
    for policy in ("LRU", "LFU", "static"):
        if policy in curves:
            ax.plot(curves["sizes"], curves[policy]["overall"], marker="o", color=colors[policy], label=policy)
        if reference and policy in reference:
            xs, ys = reference[policy]
            ax.plot(xs, ys, linestyle="--", color=colors[policy], label=f"{policy} (reference)")
    ax.set_xlabel("cache slots per MoE layer (experts)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- matching published hit-rate curves


def generated_hit_rates(
    num_experts: int, top_k: int, exponent: float, persistence: float, sizes: Sequence[int], *,
    num_layers: int = 4, num_requests: int = 48, num_tokens: int = 512, seed: int = 0,
    policies: Sequence[str] = ("LRU",), locality: float = 0.0, hot_experts: int | None = None, coupling: float = 0.0,
    zipf_offset: float = 0.0, hot_skew: float = 0.0, refractory: float = 0.0, refractory_tokens: int = 0,
) -> dict:
    """Hit-rate curves of the Markov generator (Zipf popularity, one persistence), replayed like moe-lrc."""
    from sim.workload.routing import MarkovGeneratedRouting, zipf_weights

    rng = np.random.default_rng(seed)
    gen = MarkovGeneratedRouting(
        zipf_weights(num_layers, num_experts, exponent, rng, zipf_offset), top_k, np.full(num_layers, persistence), rng,
        locality=locality, hot_experts=hot_experts, coupling=coupling, hot_skew=hot_skew,
        refractory=refractory, refractory_tokens=refractory_tokens,
    )
    return hit_rate_curves(gen.sequences(num_requests, num_tokens), num_experts, sizes, policies)


def static_hit_rates(num_experts: int, top_k: int, exponent: float, sizes: Sequence[int], offset: float = 0.0) -> np.ndarray:
    """Static-cache hit rate of Zipf popularity (Plackett-Luce top-k) for each size: the top-C inclusion
    probabilities over top_k, with a fixed private sampling stream."""
    from sim.workload.routing import GeneratedRouting, zipf_weights

    w = zipf_weights(1, num_experts, exponent, np.random.default_rng(0), offset)
    incl = np.sort(GeneratedRouting(w, top_k, np.random.default_rng(0))._inclusion[0])[::-1]
    cum = np.cumsum(incl) / top_k
    return np.array([cum[min(c, num_experts) - 1] for c in sizes])


def fit_to_published_curves(
    num_experts: int, top_k: int, static: dict[int, float], lru: dict[int, float], lfu: dict[int, float] | None = None,
    *, localities: Sequence[float] = (0.0,), **sim_kwargs,
) -> tuple[float, float, float]:
    """(zipf_exponent, persistence, locality) for published curves {slots per layer: hit rate}.

    The Zipf exponent matches the static curve (least squares over a grid). For each candidate
    locality, persistence is the bisection root of the mean signed LRU error (LRU hit rate grows
    with persistence); the locality kept is the one with the smallest squared LRU + LFU error."""
    sizes_s = sorted(static)
    target_s = np.array([static[c] for c in sizes_s])
    grid = np.round(np.arange(0.0, 2.51, 0.05), 2)
    errs = [float(((static_hit_rates(num_experts, top_k, s, sizes_s) - target_s) ** 2).sum()) for s in grid]
    exponent = float(grid[int(np.argmin(errs))])
    sizes = sorted(set(lru) | set(lfu or {}))
    policies = ("LRU", "LFU") if lfu else ("LRU",)

    def run(p: float, loc: float) -> dict:
        return generated_hit_rates(num_experts, top_k, exponent, p, sizes, policies=policies, locality=loc, **sim_kwargs)

    def err(curves: dict, policy: str, target: dict[int, float]) -> np.ndarray:
        return np.array([curves[policy]["overall"][sizes.index(c)] - v for c, v in sorted(target.items())])

    best: tuple[float, float, float] | None = None
    for loc in localities:
        lo, hi = 0.0, 0.98
        if err(run(lo, loc), "LRU", lru).mean() >= 0:
            hi = 0.0
        else:
            for _ in range(7):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if err(run(mid, loc), "LRU", lru).mean() < 0 else (lo, mid)
        p = round((lo + hi) / 2, 3)
        curves = run(p, loc)
        score = float((err(curves, "LRU", lru) ** 2).sum() + ((err(curves, "LFU", lfu) ** 2).sum() if lfu else 0.0))
        if best is None or score < best[0]:
            best = (score, p, float(loc))
    assert best is not None
    return exponent, best[1], best[2]


def plot_routing_stats(stats: dict, path: Path, title: str) -> Path:
    """PNG with four panels: per-layer expert share (heatmap, experts sorted by share within each layer),
    per-layer popularity entropy and token-to-token persistence, the reuse-distance histogram, and the
    layer l -> l+1 transition structure (normalised MI and top-1 next-expert probability)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    share = np.sort(np.asarray(stats["popularity"]["share"]), axis=1)[:, ::-1]
    ax = axes[0, 0]
    im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert rank within the layer")
    ax.set_title("expert share per layer")
    fig.colorbar(im, ax=ax, fraction=0.046)

    ax = axes[0, 1]
    layers = np.arange(len(share))
    ax.plot(layers, stats["popularity"]["per_layer"]["entropy"], marker=".", label="popularity entropy (1 = uniform)")
    ax.plot(layers, stats["persistence"]["per_layer"]["overlap"], marker=".", label="overlap with previous token")
    ax.plot(layers, stats["persistence"]["per_layer"]["same_set"], marker=".", label="same set as previous token")
    ax.set_xlabel("MoE layer")
    ax.set_ylim(0, 1.02)
    ax.set_title("skew and temporal locality per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    rd = stats["reuse_distance"]
    labels = ["first use"] + rd["bins_tokens"]
    ax.bar(range(len(labels)), [rd["first_use_fraction"]] + rd["fraction"], color="C2")
    ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
    ax.set_xlabel("tokens since the expert was last used (same request and layer)")
    ax.set_ylabel("share of expert uses")
    ax.set_title(f"reuse distance (median {rd['median_tokens']} tokens)")

    ax = axes[1, 1]
    tr = stats["layer_transitions"]["per_layer_pair"]
    pairs = np.arange(len(tr["normalized_mi"]))
    ax.plot(pairs, tr["normalized_mi"], marker=".", label="normalised mutual information")
    ax.plot(pairs, tr["top1_next_probability"], marker=".", label="P(top next expert | expert)")
    ax.plot(pairs, share[1:, 0], color="grey", linestyle=":", label="top share of layer l+1 (independent layers)")
    ax.set_xlabel("layer pair (l, l+1)")
    ax.set_title("layer-to-layer transitions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
