"""Synthetic open-loop arrivals and request lengths, as plain numpy arrays.

Every function takes the ``numpy.random.Generator`` it draws from, so a run is reproducible from its seed
and nothing touches global random state. Arrival times are seconds from the start of the run; the first
request arrives one inter-arrival gap after 0."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from sim.errors import TraceError

# A guard against a typo such as rate_per_s: 1e6 with a one-day limit filling memory.
MAX_GENERATED_REQUESTS = 100_000_000


def poisson_arrivals_s(
    rate_per_s: float,
    rng: np.random.Generator,
    *,
    max_requests: int | None = None,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """Poisson process: exponential gaps with mean 1/rate. Stops at whichever limit comes first."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    mean_gap_s = 1.0 / rate_per_s
    return _renewal_arrivals_s(lambda n: rng.exponential(mean_gap_s, size=n), mean_gap_s, max_requests, max_duration_s)


def gamma_arrivals_s(
    rate_per_s: float,
    cv: float,
    rng: np.random.Generator,
    *,
    max_requests: int | None = None,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """Gamma-distributed gaps with mean 1/rate and coefficient of variation ``cv`` (cv > 1 is burstier
    than Poisson, cv = 1 is Poisson, cv < 1 is more regular): shape 1/cv^2, scale cv^2/rate."""
    if rate_per_s <= 0 or cv <= 0:
        raise ValueError(f"rate_per_s and cv must be > 0, got {rate_per_s} and {cv}")
    shape = 1.0 / cv**2
    scale_s = cv**2 / rate_per_s
    return _renewal_arrivals_s(lambda n: rng.gamma(shape, scale_s, size=n), 1.0 / rate_per_s, max_requests, max_duration_s)


def _renewal_arrivals_s(
    draw_gaps_s: Callable[[int], np.ndarray],
    mean_gap_s: float,
    max_requests: int | None,
    max_duration_s: float | None,
) -> np.ndarray:
    """Cumulative sums of independent gaps, drawn in blocks until a limit is reached."""
    if max_requests is None and max_duration_s is None:
        raise TraceError("a generated workload needs a limit: set max_requests or max_duration_s")
    expected = math.inf if max_duration_s is None else max_duration_s / mean_gap_s
    if max_requests is not None:
        expected = min(expected, max_requests)
    if expected > MAX_GENERATED_REQUESTS:
        raise TraceError(
            f"the limits would generate about {expected:.3g} requests (more than {MAX_GENERATED_REQUESTS:,}); "
            "lower max_duration_s, max_requests or the rate"
        )
    if max_duration_s is None:
        assert max_requests is not None
        return np.cumsum(draw_gaps_s(max_requests))

    # A block a few standard deviations above the expected count usually finishes in one draw.
    block = int(expected + 6.0 * math.sqrt(expected) + 16)
    blocks: list[np.ndarray] = []
    count, last_s = 0, 0.0
    while last_s < max_duration_s and (max_requests is None or count < max_requests):
        times_s = last_s + np.cumsum(draw_gaps_s(block))
        blocks.append(times_s)
        count += block
        last_s = float(times_s[-1])
    arrival_s = np.concatenate(blocks)
    arrival_s = arrival_s[arrival_s < max_duration_s]
    return arrival_s if max_requests is None else arrival_s[:max_requests]


def fixed_lengths(tokens: int, n: int) -> np.ndarray:
    return np.full(n, tokens, dtype=np.int64)


def uniform_lengths(low: int, high: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Whole numbers of tokens, each of low..high (both included) equally likely."""
    return rng.integers(low, high, size=n, endpoint=True, dtype=np.int64)


def lognormal_mu(mean_tokens: float, sigma: float) -> float:
    """The log-space location that gives a lognormal the asked mean: mu = ln(mean) - sigma^2/2."""
    return math.log(mean_tokens) - sigma**2 / 2.0


def fit_lognormal(tokens: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood (mu, sigma) of ln(tokens)."""
    if len(tokens) < 2:
        raise TraceError(f"fitting a lognormal needs at least 2 requests, got {len(tokens)}")
    logs = np.log(np.asarray(tokens, dtype=np.float64))
    return float(logs.mean()), float(logs.std())


def lognormal_lengths(
    mu: float, sigma: float, n: int, rng: np.random.Generator, *, max_tokens: int | None = None
) -> np.ndarray:
    """Lognormal draws rounded to whole tokens, at least 1 and at most ``max_tokens``."""
    tokens = np.rint(rng.lognormal(mu, sigma, size=n))
    upper = np.inf if max_tokens is None else max_tokens
    return np.clip(tokens, 1, upper).astype(np.int64)


def resample_rows(num_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices drawn uniformly with replacement: an empirical distribution's samples."""
    if num_rows == 0:
        raise TraceError("cannot resample lengths from a trace with no requests")
    return rng.integers(0, num_rows, size=n)


def task_labels(task_mix: Mapping[str, float], n: int, rng: np.random.Generator) -> np.ndarray:
    """One task name per request, drawn independently with probability proportional to its weight."""
    names = list(task_mix)
    weights = np.array([task_mix[name] for name in names], dtype=np.float64)
    if not names or any(not isinstance(name, str) or not name for name in names):
        raise TraceError(f"task_mix needs one or more non-empty task names, got {names}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise TraceError(f"task_mix weights must be >= 0 and not all 0, got {dict(task_mix)}")
    picks = rng.choice(len(names), size=n, p=weights / weights.sum())
    return np.array(names, dtype=object)[picks]
