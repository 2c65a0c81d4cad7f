"""Fit a 2-state Markov-modulated Poisson process (MMPP-2) to a trace's arrival times, by EM.

Method (a Poisson hidden Markov model on binned counts, the discrete-time form of the MMPP): time is cut into
bins of ``bin_s`` seconds; in each bin the hidden state is one of two and the count is Poisson with that state's
rate x bin_s; the state follows a Markov chain from bin to bin. Baum-Welch (EM) estimates the two rates and the
per-bin switching probabilities; the continuous-time switching rates follow exactly from the 2-state chain,
P(switch within one bin) = q_i / (q_01 + q_10) x (1 - exp(-(q_01 + q_10) bin_s)), and mean dwell = 1 / q_i.
Switches inside a bin are not seen, so dwell times much shorter than ``bin_s`` are not resolved; the default bin
holds about 4 requests at the mean rate (at most 30,000 bins).

The forward-backward passes are products of 2x2 matrices; they are computed as prefix products with a
log-depth (Hillis-Steele) scan, normalised at every step, so one EM iteration is a few numpy calls however long
the trace is.

To rank the fit with the renewal families (``arrival_fit``) the MMPP's stationary inter-arrival distribution is
used, S(x) = phi exp(D0 x) 1 with D0 = Q - Lambda and phi = pi Lambda / (pi lambda) (the state just after an
arrival), for the Kolmogorov-Smirnov distance; the log-likelihood reported is that of the gap *sequence*
(a Markovian arrival process: phi prod_i exp(D0 x_i) Lambda 1), which a renewal family cannot have."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.errors import TraceError

MAX_BINS = 30_000
REQUESTS_PER_BIN = 4.0


# ---------------------------------------------------------------- 2x2 matrix products


def _mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched 2x2 products a @ b for arrays [n, 2, 2]."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    out[:, 0, 0] = a[:, 0, 0] * b[:, 0, 0] + a[:, 0, 1] * b[:, 1, 0]
    out[:, 0, 1] = a[:, 0, 0] * b[:, 0, 1] + a[:, 0, 1] * b[:, 1, 1]
    out[:, 1, 0] = a[:, 1, 0] * b[:, 0, 0] + a[:, 1, 1] * b[:, 1, 0]
    out[:, 1, 1] = a[:, 1, 0] * b[:, 0, 1] + a[:, 1, 1] * b[:, 1, 1]
    return out


def _scan(mats: np.ndarray, *, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Prefix products mats[0] @ ... @ mats[t] (reverse: suffix products mats[t] @ ... @ mats[-1]) of
    non-negative 2x2 matrices, each scaled to a largest entry of 1, and the log of the scale taken out."""
    p = mats[::-1].copy() if reverse else mats.copy()
    scale = np.maximum(p.max(axis=(1, 2)), 1e-300)
    p /= scale[:, None, None]
    log_s = np.log(scale)
    d = 1
    while d < len(p):
        new = _mul(p[d:], p[:-d]) if reverse else _mul(p[:-d], p[d:])
        scale = np.maximum(new.max(axis=(1, 2)), 1e-300)
        log_s[d:] = log_s[:-d] + log_s[d:] + np.log(scale)
        p[d:] = new / scale[:, None, None]
        d *= 2
    return (p[::-1], log_s[::-1]) if reverse else (p, log_s)


# ---------------------------------------------------------------- the fitted process


@dataclass(frozen=True)
class MmppFit:
    """Two states, the busier first: Poisson rates (req/s) and mean dwell times (s); EM details for the report."""

    rates_per_s: np.ndarray
    mean_dwell_s: np.ndarray
    bin_s: float = 0.0
    iterations: int = 0
    count_log_likelihood: float = float("nan")
    zero_fraction: float = 0.0  # no atom at 0, so ks_distance can take it like a GapDistribution

    @property
    def switch_rates_per_s(self) -> np.ndarray:
        return 1.0 / self.mean_dwell_s

    @property
    def time_shares(self) -> np.ndarray:
        q = self.switch_rates_per_s
        return np.array([q[1], q[0]]) / q.sum()

    @property
    def mean_rate_per_s(self) -> float:
        return float(self.time_shares @ self.rates_per_s)

    def _d0_eigen(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eigenvalues w, eigenvectors V and V^-1 of D0 = Q - Lambda (real: a 2x2 Metzler matrix)."""
        q = self.switch_rates_per_s
        d0 = np.array([[-q[0] - self.rates_per_s[0], q[0]], [q[1], -q[1] - self.rates_per_s[1]]])
        w, v = np.linalg.eig(d0)
        return w.real, v.real, np.linalg.inv(v.real)

    def _phi(self) -> np.ndarray:
        weights = self.time_shares * self.rates_per_s
        return weights / weights.sum()

    def cdf(self, x_s: np.ndarray) -> np.ndarray:
        """CDF of the stationary inter-arrival time (between consecutive arrivals)."""
        x = np.maximum(np.asarray(x_s, dtype=np.float64), 0.0)
        w, v, vinv = self._d0_eigen()
        coef = (self._phi() @ v) * (vinv @ np.ones(2))  # S(x) = sum_k coef_k exp(w_k x)
        survival = np.exp(np.outer(x, w)) @ coef
        return np.clip(1.0 - survival, 0.0, 1.0)

    def log_likelihood(self, gaps_s: np.ndarray) -> float:
        """Log-likelihood of the gap sequence as a Markovian arrival process (its state carried across gaps)."""
        x = np.maximum(np.asarray(gaps_s, dtype=np.float64), 0.0)
        if len(x) == 0:
            return 0.0
        w, v, vinv = self._d0_eigen()
        lam = np.diag(self.rates_per_s)
        parts = [np.outer(v[:, k], vinv[k]) @ lam for k in range(2)]  # exp(D0 x) Lambda = sum_k e^{w_k x} parts[k]
        mats = np.exp(x * w[0])[:, None, None] * parts[0] + np.exp(x * w[1])[:, None, None] * parts[1]
        prod, log_s = _scan(np.maximum(mats, 0.0))
        total = float(self._phi() @ prod[-1] @ np.ones(2))
        return float(np.log(max(total, 1e-300)) + log_s[-1])

    def states(self) -> list[dict[str, float]]:
        """The ``states`` list of a ``kind: mmpp`` arrivals spec."""
        return [{"rate_per_s": round(float(r), 6), "mean_dwell_s": round(float(d), 4)}
                for r, d in zip(self.rates_per_s, self.mean_dwell_s)]


# ---------------------------------------------------------------- EM


def fit_mmpp2(arrival_s: np.ndarray, *, bin_s: float | None = None, max_iterations: int = 300,
              tolerance: float = 1e-8) -> MmppFit:
    """EM fit of an MMPP-2 to sorted arrival times (seconds); see the module docstring."""
    t = np.asarray(arrival_s, dtype=np.float64)
    if len(t) < 11:
        raise TraceError(f"fitting an MMPP needs at least 11 requests, got {len(t)}")
    t = t - t[0]
    duration = float(t[-1])
    if duration <= 0:
        raise TraceError("every request arrives at the same time; no MMPP to fit")
    if bin_s is None:
        bins = int(min(MAX_BINS, max(10, math.ceil(len(t) / REQUESTS_PER_BIN))))
        bin_s = duration / bins
    elif not bin_s > 0:
        raise TraceError(f"MMPP bin width must be > 0 s, got {bin_s}")
    num_bins = max(2, int(math.ceil(duration / bin_s)))
    k = np.bincount(np.minimum((t / bin_s).astype(np.int64), num_bins - 1), minlength=num_bins).astype(np.float64)
    log_fact = float(sum(math.lgamma(c + 1) for c in k))  # the same for every parameter value

    mean = k.mean()
    busy = k > mean
    lam = np.array([k[busy].mean() if busy.any() else 1.2 * mean, k[~busy].mean() if (~busy).any() else 0.8 * mean])
    if lam[0] <= lam[1] * 1.01:
        lam = np.array([1.2 * mean, 0.8 * mean])
    lam = np.maximum(lam, 1e-9)  # per bin
    trans = np.array([[0.95, 0.05], [0.05, 0.95]])
    pi0 = np.array([0.5, 0.5])
    previous = -np.inf
    iterations = 0
    loglik = -np.inf
    for iterations in range(1, max_iterations + 1):
        log_e = k[:, None] * np.log(lam)[None, :] - lam[None, :]  # [T, 2], without log k!
        m = log_e.max(axis=1)
        e = np.exp(log_e - m[:, None])
        mats = trans[None, :, :] * e[1:, None, :]  # M_t = P diag(e_t), t >= 1
        alpha0 = pi0 * e[0]
        fwd, fwd_log = _scan(mats)
        alpha = np.vstack([alpha0, np.einsum("i,tij->tj", alpha0, fwd)])
        alpha /= np.maximum(alpha.sum(axis=1, keepdims=True), 1e-300)
        bwd, _ = _scan(mats, reverse=True)
        beta = np.vstack([bwd @ np.ones(2), np.ones((1, 2))])  # beta_t = M_{t+1} ... M_T 1
        beta /= np.maximum(beta.sum(axis=1, keepdims=True), 1e-300)
        loglik = float(np.log(max(float(alpha0 @ fwd[-1] @ np.ones(2)), 1e-300)) + fwd_log[-1] + m.sum() - log_fact)

        gamma = alpha * beta
        gamma /= np.maximum(gamma.sum(axis=1, keepdims=True), 1e-300)
        xi = alpha[:-1, :, None] * trans[None] * (e[1:] * beta[1:])[:, None, :]
        xi /= np.maximum(xi.sum(axis=(1, 2), keepdims=True), 1e-300)
        pi0 = gamma[0]
        counts = xi.sum(axis=0)
        trans = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-300)
        trans = np.clip(trans, 1e-9, 1.0)
        trans /= trans.sum(axis=1, keepdims=True)
        lam = np.maximum((gamma * k[:, None]).sum(axis=0) / np.maximum(gamma.sum(axis=0), 1e-300), 1e-9)
        if abs(loglik - previous) <= tolerance * abs(loglik):
            break
        previous = loglik

    order = np.argsort(-lam)
    lam, trans = lam[order], trans[np.ix_(order, order)]
    p01, p10 = float(trans[0, 1]), float(trans[1, 0])
    total = min(p01 + p10, 0.999)
    s = -math.log(1.0 - total) / bin_s
    q = np.array([s * p01 / (p01 + p10), s * p10 / (p01 + p10)])
    return MmppFit(rates_per_s=lam / bin_s, mean_dwell_s=1.0 / np.maximum(q, 1e-12), bin_s=float(bin_s),
                   iterations=iterations, count_log_likelihood=loglik)
