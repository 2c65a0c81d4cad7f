"""Bursty open-loop arrivals: a Markov-modulated Poisson process and ServeGen's per-client traffic.

MMPP: a continuous-time Markov chain over states, each with its own Poisson rate. The chain stays in state i
for an exponential time with mean ``mean_dwell_s[i]`` and then jumps to state j with probability
``switch[i][j]`` (default: any other state, equally likely); while in state i requests arrive at ``rate[i]``.

ServeGen (Xiang et al., "ServeGen: Workload characterization of large language model serving in production",
arXiv:2505.09999; data: alibaba/ServeGen, Apache-2.0): per *client* and per 10-minute window, the mean rate, the
CV of the inter-arrival times and the fitted inter-arrival family (Gamma or Weibull, shape and scale). Like
ServeGen's own generator, each window draws ``rate x window`` gaps from the family and rescales them so they fill
the window exactly; clients are generated independently and merged, which gives multi-client traffic with the
diurnal shape of the data. The fractional part of ``rate x window`` becomes one more request with that
probability, so low-rate clients keep their mean."""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.errors import TraceError
from sim.workload.arrival_generators import MAX_GENERATED_REQUESTS


def mmpp_arrivals_s(
    rates_per_s: np.ndarray,
    mean_dwell_s: np.ndarray,
    switch: np.ndarray | None,
    rng: np.random.Generator,
    *,
    initial_state: int | None = None,
    max_requests: int | None = None,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """Arrival times of an MMPP, until a limit. The first state is drawn from the stationary distribution
    (time share of each state) unless ``initial_state`` is given."""
    rates = np.asarray(rates_per_s, dtype=np.float64)
    dwell = np.asarray(mean_dwell_s, dtype=np.float64)
    s = len(rates)
    if max_requests is None and max_duration_s is None:
        raise TraceError("a generated workload needs a limit: set max_requests or max_duration_s")
    if s < 1 or dwell.shape != (s,) or np.any(rates < 0) or np.any(dwell <= 0) or rates.sum() <= 0:
        raise TraceError("mmpp needs one rate >= 0 and one mean dwell time > 0 per state, not all rates 0")
    p = _switch_matrix(switch, s)
    share = _time_shares(p, dwell)
    mean_rate = float((share * rates).sum())
    expected = min(max_requests or np.inf, (max_duration_s or np.inf) * mean_rate)
    if expected > MAX_GENERATED_REQUESTS:
        raise TraceError(f"the limits would generate about {expected:.3g} requests (more than {MAX_GENERATED_REQUESTS:,})")
    state = int(rng.choice(s, p=share)) if initial_state is None else int(initial_state)
    now, out, count = 0.0, [], 0
    while (max_duration_s is None or now < max_duration_s) and (max_requests is None or count < max_requests):
        stay = rng.exponential(dwell[state])
        n = rng.poisson(rates[state] * stay)
        if n:
            times = now + np.sort(rng.random(n)) * stay
            out.append(times)
            count += n
        now += stay
        state = int(rng.choice(s, p=p[state])) if s > 1 else 0
    arrival_s = np.concatenate(out) if out else np.zeros(0)
    if max_duration_s is not None:
        arrival_s = arrival_s[arrival_s < max_duration_s]
    return arrival_s if max_requests is None else arrival_s[:max_requests]


def _switch_matrix(switch: np.ndarray | None, s: int) -> np.ndarray:
    if switch is None:
        p = np.full((s, s), 1.0 / max(s - 1, 1))
        np.fill_diagonal(p, 0.0 if s > 1 else 1.0)
        return p
    p = np.asarray(switch, dtype=np.float64)
    if p.shape != (s, s) or np.any(p < 0) or np.any(np.abs(p.sum(axis=1) - 1) > 1e-6) or (s > 1 and np.any(np.diag(p) > 0)):
        raise TraceError(f"mmpp switch must be a {s}x{s} matrix of probabilities, rows summing to 1, zero diagonal")
    return p


def _time_shares(p: np.ndarray, dwell: np.ndarray) -> np.ndarray:
    """Long-run share of time in each state: the jump chain's stationary distribution weighted by dwell."""
    s = len(dwell)
    if s == 1:
        return np.ones(1)
    a = np.vstack([p.T - np.eye(s), np.ones(s)])
    b = np.concatenate([np.zeros(s), [1.0]])
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    w = np.maximum(pi, 0) * dwell
    return w / w.sum()


def mmpp_mean_rate(rates_per_s: np.ndarray, mean_dwell_s: np.ndarray, switch: np.ndarray | None) -> float:
    p = _switch_matrix(switch, len(rates_per_s))
    return float((_time_shares(p, np.asarray(mean_dwell_s, dtype=np.float64)) * np.asarray(rates_per_s)).sum())


# ---------------------------------------------------------------- ServeGen per-client statistics


@dataclass(frozen=True)
class ClientWindows:
    """ServeGen statistics: one row per (client, 600-s window)."""

    client_id: np.ndarray
    window_start_s: np.ndarray
    rate_per_s: np.ndarray
    cv: np.ndarray
    family: np.ndarray  # "Gamma", "Weibull" or "" (no traffic)
    shape: np.ndarray
    scale: np.ndarray
    window_s: float = 600.0

    def top_clients(self, n: int) -> np.ndarray:
        """The n clients with the most requests over the whole file, busiest first."""
        ids, inv = np.unique(self.client_id, return_inverse=True)
        volume = np.bincount(inv, weights=self.rate_per_s)
        return ids[np.argsort(-volume, kind="stable")[:n]]

    def rate_per_window(self) -> tuple[np.ndarray, np.ndarray]:
        """(window starts, total rate of all clients)."""
        starts, inv = np.unique(self.window_start_s, return_inverse=True)
        return starts, np.bincount(inv, weights=self.rate_per_s)


_COLUMNS = ("client_id", "window_start_s", "rate_rps", "cv", "iat_dist", "iat_param1", "iat_param2")


def read_client_windows(path: Path, name: str | None = None) -> ClientWindows:
    """Read a ServeGen client-trace CSV (gzipped or not) with the columns of ../shared's reformatted copy."""
    import pandas as pd

    display = name or str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TraceError(f"{display}: cannot open the ServeGen client statistics ({exc.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        df = pd.read_csv(io.BytesIO(raw), keep_default_na=False, dtype={"iat_dist": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise TraceError(f"{display}: not a CSV file ({exc})") from None
    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(f"{display}, line 1: no column {', '.join(map(repr, missing))}; expected {', '.join(_COLUMNS)}")
    numeric = {}
    for col in ("client_id", "window_start_s", "rate_rps", "cv", "iat_param1", "iat_param2"):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise TraceError(f"{display}, line {i + 2}: {col} is {df[col].iloc[i]!r}; expected a number >= 0")
        numeric[col] = values
    family = df["iat_dist"].astype(str).str.strip().to_numpy()
    bad = ~np.isin(family, ["Gamma", "Weibull", ""]) | ((family == "") & (numeric["rate_rps"] > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{display}, line {i + 2}: iat_dist is {family[i]!r}; expected Gamma or Weibull "
                         "(empty only where rate_rps is 0)")
    return ClientWindows(
        numeric["client_id"].astype(np.int64), numeric["window_start_s"], numeric["rate_rps"], numeric["cv"],
        family, numeric["iat_param1"], numeric["iat_param2"],
    )


def servegen_arrivals(
    windows: ClientWindows,
    rng: np.random.Generator,
    *,
    clients: np.ndarray | None = None,
    start_s: float = 0.0,
    rate_scale: float = 1.0,
    max_requests: int | None = None,
    max_duration_s: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(arrival_s, client_id) for the chosen clients (default: all), from ``start_s`` into the data, times counted
    from ``start_s``; ``rate_scale`` multiplies every client's rate (the shape of the gaps is kept)."""
    if max_requests is None and max_duration_s is None:
        raise TraceError("a generated workload needs a limit: set max_requests or max_duration_s")
    w = windows.window_s
    end_s = np.inf if max_duration_s is None else start_s + max_duration_s
    keep = (windows.rate_per_s > 0) & (windows.window_start_s + w > start_s) & (windows.window_start_s < end_s)
    if clients is not None:
        keep &= np.isin(windows.client_id, clients)
    idx = np.flatnonzero(keep)
    # Window order, then client, so a max_requests cut only needs the windows it reaches.
    idx = idx[np.lexsort((windows.client_id[idx], windows.window_start_s[idx]))]
    expected = float((windows.rate_per_s[idx] * w * rate_scale).sum())
    if max_requests is None and expected > MAX_GENERATED_REQUESTS:
        raise TraceError(f"the limits would generate about {expected:.3g} requests (more than {MAX_GENERATED_REQUESTS:,})")
    times, owners, count = [], [], 0
    starts = windows.window_start_s[idx]
    for pos, i in enumerate(idx):
        if max_requests is not None and count >= max_requests and starts[pos] > starts[pos - 1]:
            break  # a new window: every later arrival comes after the max_requests already drawn
        mean_n = windows.rate_per_s[i] * w * rate_scale
        n = int(mean_n) + int(rng.random() < mean_n - int(mean_n))
        if n == 0:
            continue
        shape, scale = windows.shape[i], max(windows.scale[i], 1e-12)
        if windows.family[i] == "Gamma":
            gaps = rng.gamma(max(shape, 1e-3), scale, size=n)
        else:
            gaps = scale * rng.weibull(max(shape, 1e-2), size=n)
        total = gaps.sum()
        # Rescaled to fill the window (ServeGen's convention): the first request at its start, the last gap ends it.
        offsets = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) / total * w if total > 0 else np.sort(rng.random(n)) * w
        at = windows.window_start_s[i] + np.minimum(offsets, np.nextafter(w, 0))
        times.append(at)
        owners.append(np.full(n, windows.client_id[i]))
        count += int((at >= start_s).sum())
    if not times:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    at = np.concatenate(times)
    owner = np.concatenate(owners)
    order = np.argsort(at, kind="stable")
    at, owner = at[order] - start_s, owner[order]
    keep = (at >= 0) & (at < (np.inf if max_duration_s is None else max_duration_s))
    at, owner = at[keep], owner[keep]
    if max_requests is not None:
        at, owner = at[:max_requests], owner[:max_requests]
    return at, owner


def read_client_lengths(path: Path, name: str | None = None) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per-client length quantiles {field: {client: (levels, tokens)}} from a CSV with columns client_id, field
    (input_tokens / output_tokens) and q<level> columns (as traces/tools/derive_servegen.py writes)."""
    import pandas as pd

    display = name or str(path)
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise TraceError(f"{display}: cannot read the per-client length table ({exc})") from None
    qcols = [c for c in df.columns if c.startswith("q")]
    if "client_id" not in df.columns or "field" not in df.columns or len(qcols) < 2:
        raise TraceError(f"{display}, line 1: expected columns client_id, field, q0 ... q1")
    levels = np.array([float(c[1:]) for c in qcols])
    values = df[qcols].to_numpy(dtype=np.float64)
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {"input_tokens": {}, "output_tokens": {}}
    for i, (client, field_name) in enumerate(zip(df["client_id"], df["field"])):
        row = values[i]
        if field_name not in out or not np.all(np.isfinite(row)) or row.min() < 1 or np.any(np.diff(row) < 0):
            raise TraceError(f"{display}, line {i + 2}: expected field input_tokens or output_tokens and "
                             "non-decreasing token counts >= 1")
        out[field_name][int(client)] = (levels, np.log(row))
    return out


def client_lengths(
    table: dict[int, tuple[np.ndarray, np.ndarray]], client: np.ndarray, rng: np.random.Generator, where: str
) -> np.ndarray:
    """One length per request from its client's quantiles (ln tokens interpolated between levels)."""
    out = np.empty(len(client), dtype=np.int64)
    u = rng.random(len(client))
    for c in np.unique(client):
        if int(c) not in table:
            raise TraceError(f"{where}: no length quantiles for client {int(c)}")
        levels, log_tokens = table[int(c)]
        rows = client == c
        out[rows] = np.maximum(1, np.rint(np.exp(np.interp(u[rows], levels, log_tokens))))
    return out
