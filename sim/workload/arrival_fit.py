"""Fit an arrival generator to a real request trace (``moesim trace fit``) and draw traffic from the fit.

What is fitted, and why this way:

  rate profile     requests per ``window_s`` window (default 60 s) relative to the mean rate; real traces are
                   not stationary (the Azure 2023 code trace has a per-minute count dispersion of ~160), so a
                   renewal process alone cannot give both the right CV and the right bursts.
  inter-arrivals   four families (exponential, gamma, Weibull, lognormal) fitted by the method of moments
                   (mean and CV matched exactly, so the generated rate and CV match by construction) and ranked
                   by the Kolmogorov-Smirnov distance D to the empirical gaps; the smallest D is used.
                   Fitted twice: to the raw gaps (stationary replay: ``profile: false``) and to the gaps
                   multiplied by their window's relative rate (used with the rate profile, ``profile: true``).
  MMPP-2           a 2-state Markov-modulated Poisson process fitted by EM (``arrival_mmpp_fit``), ranked with
                   the four families by KS D on the stationary gaps; when it wins, ``profile: false`` generates
                   from it (bursts and lulls with memory across gaps, which a renewal process lacks).
  lengths          prompt and output tokens as empirical quantiles of ln(tokens) (QUANTILES points), joined by
                   a Gaussian copula with the trace's Spearman rank correlation (rho_normal = 2 sin(pi rho_s / 6)).
  burstiness       reported, not generated directly: Goh-Barabasi B = (sd - mean) / (sd + mean) of the gaps and
                   the index of dispersion (variance / mean) of counts per window.

The fit is a plain dict (``FittedArrivalModel.to_dict``) written as YAML; ``kind: fitted`` in a scenario reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.errors import TraceError
from sim.workload.arrival_mmpp_fit import MmppFit, fit_mmpp2

FAMILIES = ("exponential", "gamma", "weibull", "lognormal")
QUANTILES = np.concatenate([np.linspace(0.0, 0.9, 19), np.linspace(0.91, 0.99, 9), [0.995, 0.999, 1.0]])
MIN_GAP_S = 1e-7  # the Azure 2023 timestamps' resolution; shorter gaps are treated as this long
FORMAT = "moesim.fitted_arrivals/1"


# ---------------------------------------------------------------- distributions (no scipy)


def _lower_gamma_regularized(a: float, x: np.ndarray) -> np.ndarray:
    """P(a, x), the gamma CDF with shape a and scale 1: series below a + 1, continued fraction above."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    lg = math.lgamma(a)
    small = (x > 0) & (x < a + 1)
    if small.any():
        xs = x[small]
        term = np.full_like(xs, 1.0 / a)
        total = term.copy()
        for n in range(1, 500):
            term = term * xs / (a + n)
            total += term
            if np.all(np.abs(term) < np.abs(total) * 1e-14):
                break
        out[small] = total * np.exp(-xs + a * np.log(xs) - lg)
    big = x >= a + 1
    if big.any():
        xb = x[big]
        tiny = 1e-300
        b = xb + 1 - a
        c = np.full_like(xb, 1 / tiny)
        d = 1 / b
        h = d.copy()
        for i in range(1, 500):
            an = -i * (i - a)
            b = b + 2
            d = an * d + b
            d = np.where(np.abs(d) < tiny, tiny, d)
            c = b + an / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            d = 1 / d
            delta = d * c
            h *= delta
            if np.all(np.abs(delta - 1) < 1e-14):
                break
        out[big] = 1 - np.exp(-xb + a * np.log(xb) - lg) * h
    return np.clip(out, 0.0, 1.0)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf, otypes=[float])(np.asarray(z) / math.sqrt(2)))


def _weibull_shape_for_cv(cv: float) -> float:
    """The Weibull shape k whose CV is ``cv``: CV^2 + 1 = Gamma(1 + 2/k) / Gamma(1 + 1/k)^2 (decreasing in k)."""
    target = math.log(1 + cv**2)

    def f(k: float) -> float:
        return math.lgamma(1 + 2 / k) - 2 * math.lgamma(1 + 1 / k) - target

    lo, hi = 0.02, 50.0
    if f(lo) < 0:
        return lo
    if f(hi) > 0:
        return hi
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return math.sqrt(lo * hi)


@dataclass(frozen=True)
class GapDistribution:
    """An inter-arrival family with its parameters, matched to a mean gap and CV.

    ``zero_fraction`` of the gaps are exactly 0 (requests stamped with the same time: the Mooncake trace stamps
    in whole ms and 90 % of its gaps are 0); ``mean_s`` and ``cv`` then describe the other gaps, so the mixture
    keeps the trace's mean and second moment."""

    family: str
    mean_s: float
    cv: float
    zero_fraction: float = 0.0

    @property
    def overall_mean_s(self) -> float:
        return (1 - self.zero_fraction) * self.mean_s

    @property
    def params(self) -> dict[str, float]:
        """The family's own parameters (shape/scale in seconds, or mu/sigma of ln seconds)."""
        m, cv = self.mean_s, self.cv
        if self.family == "exponential":
            return {"scale_s": m}
        if self.family == "gamma":
            return {"shape": 1 / cv**2, "scale_s": m * cv**2}
        if self.family == "weibull":
            k = _weibull_shape_for_cv(cv)
            return {"shape": k, "scale_s": m / math.gamma(1 + 1 / k)}
        if self.family == "lognormal":
            s2 = math.log(1 + cv**2)
            return {"mu": math.log(m) - s2 / 2, "sigma": math.sqrt(s2)}
        raise TraceError(f"unknown inter-arrival family {self.family!r}; expected one of {', '.join(FAMILIES)}")

    def cdf(self, x_s: np.ndarray) -> np.ndarray:
        x = np.maximum(np.asarray(x_s, dtype=np.float64), 0.0)
        return self.zero_fraction + (1 - self.zero_fraction) * self._positive_cdf(x)

    def _positive_cdf(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        if self.family == "exponential":
            return 1 - np.exp(-x / p["scale_s"])
        if self.family == "gamma":
            return _lower_gamma_regularized(p["shape"], x / p["scale_s"])
        if self.family == "weibull":
            return 1 - np.exp(-((x / p["scale_s"]) ** p["shape"]))
        with np.errstate(divide="ignore"):
            z = (np.log(x) - p["mu"]) / p["sigma"]
        return _normal_cdf(z)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        gaps = self._positive_sample(rng, n)
        if self.zero_fraction > 0:
            gaps[rng.random(n) < self.zero_fraction] = 0.0
        return gaps

    def _positive_sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = self.params
        if self.family == "exponential":
            return rng.exponential(p["scale_s"], size=n)
        if self.family == "gamma":
            return rng.gamma(p["shape"], p["scale_s"], size=n)
        if self.family == "weibull":
            return p["scale_s"] * rng.weibull(p["shape"], size=n)
        return rng.lognormal(p["mu"], p["sigma"], size=n)

    def log_likelihood(self, gaps_s: np.ndarray) -> float:
        """Of the positive gaps (the zeros' share is the same for every family)."""
        p = self.params
        x = np.maximum(gaps_s[gaps_s > 0], MIN_GAP_S)
        if self.family == "exponential":
            ll = -np.log(p["scale_s"]) - x / p["scale_s"]
        elif self.family == "gamma":
            a, th = p["shape"], p["scale_s"]
            ll = (a - 1) * np.log(x) - x / th - math.lgamma(a) - a * math.log(th)
        elif self.family == "weibull":
            k, lam = p["shape"], p["scale_s"]
            ll = math.log(k / lam) + (k - 1) * np.log(x / lam) - (x / lam) ** k
        else:
            mu, s = p["mu"], p["sigma"]
            ll = -np.log(x * s * math.sqrt(2 * math.pi)) - (np.log(x) - mu) ** 2 / (2 * s**2)
        return float(ll.sum())


def ks_distance(gaps_s: np.ndarray, dist: GapDistribution) -> float:
    """Kolmogorov-Smirnov D between the empirical gaps and the distribution, tie-aware: both CDFs are compared
    just before and at every distinct gap (the distribution's only atom is its zero_fraction at 0)."""
    values, counts = np.unique(np.maximum(np.asarray(gaps_s, dtype=np.float64), 0.0), return_counts=True)
    ecdf = np.cumsum(counts) / counts.sum()
    f = dist.cdf(values)
    f_before = f - np.where(values == 0, dist.zero_fraction, 0.0)
    return float(max(np.max(np.abs(ecdf - f)), np.max(np.abs(ecdf - counts / counts.sum() - f_before))))


def fit_gaps(gaps_s: np.ndarray) -> tuple[GapDistribution, dict[str, dict]]:
    """Every family matched to the gaps' mean and CV, with its KS D and log-likelihood; the smallest D wins."""
    gaps = np.maximum(np.asarray(gaps_s, dtype=np.float64), 0.0)
    if len(gaps) < 10:
        raise TraceError(f"fitting inter-arrival times needs at least 10 gaps, got {len(gaps)}")
    positive = gaps[gaps > 0]
    if len(positive) < 2:
        raise TraceError("fewer than 2 gaps between arrivals are > 0; nothing to fit")
    zero = 1 - len(positive) / len(gaps)
    mean = float(positive.mean())
    cv = max(float(positive.std() / mean), 1e-3)  # evenly spaced arrivals: nearly deterministic gaps
    report: dict[str, dict] = {}
    best: GapDistribution | None = None
    for family in FAMILIES:
        dist = GapDistribution(family, mean, 1.0 if family == "exponential" else cv, zero)
        d = ks_distance(gaps, dist)
        report[family] = {
            "params": {k: round(v, 6) for k, v in dist.params.items()}, "ks_d": round(d, 5),
            "log_likelihood": round(dist.log_likelihood(gaps), 1),
        }
        if best is None or d < report[best.family]["ks_d"]:
            best = dist
    assert best is not None
    return best, report


# ---------------------------------------------------------------- lengths


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _draw_from_quantiles(log_q: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Tokens at probability levels u by linear interpolation of ln(tokens) between the stored quantiles."""
    return np.maximum(1, np.rint(np.exp(np.interp(u, QUANTILES, log_q)))).astype(np.int64)


# ---------------------------------------------------------------- the fitted model


@dataclass(frozen=True)
class FittedArrivalModel:
    """A generator fitted to one trace: gaps (stationary and under the rate profile), lengths, their correlation."""

    source: str
    num_requests: int
    duration_s: float
    rate_per_s: float
    window_s: float
    relative_rate: np.ndarray  # per window: its rate over the trace's mean rate
    stationary: GapDistribution
    profiled: GapDistribution
    prompt_log_quantiles: np.ndarray
    output_log_quantiles: np.ndarray
    length_rank_correlation: float
    report: dict = field(default_factory=dict)
    mmpp: MmppFit | None = None
    stationary_model: str = "renewal"  # "mmpp" when the MMPP-2 has the smallest KS D on the whole trace

    @property
    def stationary_family(self) -> str:
        return "mmpp" if self.stationary_model == "mmpp" else self.stationary.family

    # -------------------------------------------------------------- generation

    def arrivals_s(
        self, rng: np.random.Generator, *, profile: bool, rate_scale: float = 1.0,
        max_requests: int | None = None, max_duration_s: float | None = None,
    ) -> np.ndarray:
        """Arrival times: a renewal process, run through the rate profile (repeated cyclically) when asked."""
        from sim.workload.arrival_generators import _renewal_arrivals_s

        dist = self.profiled if profile else self.stationary
        mean_gap_s = dist.overall_mean_s / rate_scale
        if not profile and self.stationary_model == "mmpp" and self.mmpp is not None:
            from sim.workload.arrival_bursty import mmpp_arrivals_s

            return mmpp_arrivals_s(self.mmpp.rates_per_s * rate_scale, self.mmpp.mean_dwell_s, None, rng,
                                   max_requests=max_requests, max_duration_s=max_duration_s)
        if not profile:
            return _renewal_arrivals_s(
                lambda n: dist.sample(rng, n) / rate_scale, mean_gap_s, max_requests, max_duration_s
            )
        # Operational time: gaps at rate 1/mean_gap; wall time = inverse of the cumulative relative rate.
        period_s = self.window_s * len(self.relative_rate)
        cum = np.concatenate([[0.0], np.cumsum(self.relative_rate * self.window_s)])  # operational s per wall s
        horizon_op = None if max_duration_s is None else _op_time(max_duration_s, cum, self.window_s, period_s)
        op = _renewal_arrivals_s(
            lambda n: dist.sample(rng, n) / rate_scale, mean_gap_s, max_requests, horizon_op
        )
        wall = _wall_time(op, cum, self.window_s, period_s)
        return wall if max_duration_s is None else wall[wall < max_duration_s]

    def lengths(self, rng: np.random.Generator, n: int, *, correlated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, output) tokens; with ``correlated`` the pair keeps the trace's rank correlation."""
        rho = 2 * math.sin(math.pi * self.length_rank_correlation / 6) if correlated else 0.0
        z1 = rng.standard_normal(n)
        z2 = rho * z1 + math.sqrt(max(0.0, 1 - rho**2)) * rng.standard_normal(n)
        u1, u2 = _normal_cdf(z1), _normal_cdf(z2)
        return _draw_from_quantiles(self.prompt_log_quantiles, u1), _draw_from_quantiles(self.output_log_quantiles, u2)

    # -------------------------------------------------------------- YAML

    def to_dict(self) -> dict:
        def dist(d: GapDistribution) -> dict:
            return {"family": d.family, "mean_s": round(d.mean_s, 9), "cv": round(d.cv, 6),
                    "zero_fraction": round(d.zero_fraction, 6),
                    **{k: round(v, 6) for k, v in d.params.items()}}

        return {
            "format": FORMAT,
            "source": self.source,
            "num_requests": self.num_requests,
            "duration_s": round(self.duration_s, 3),
            "rate_per_s": round(self.rate_per_s, 6),
            "inter_arrival": dist(self.stationary),
            "rate_profile": {
                "window_s": self.window_s,
                "relative_rate": [round(float(x), 4) for x in self.relative_rate],
                "inter_arrival": dist(self.profiled),
            },
            "lengths": {
                "quantiles": [round(float(q), 4) for q in QUANTILES],
                "prompt_log_tokens": [round(float(x), 5) for x in self.prompt_log_quantiles],
                "output_log_tokens": [round(float(x), 5) for x in self.output_log_quantiles],
                "rank_correlation": round(self.length_rank_correlation, 5),
            },
            **({"mmpp": {"states": self.mmpp.states(), "bin_s": round(self.mmpp.bin_s, 6)},
                "stationary_model": self.stationary_model} if self.mmpp is not None else {}),
            "fit_report": self.report,
        }

    def mmpp_arrivals_spec(self) -> dict:
        """A ``kind: mmpp`` workload.arrivals mapping: the fitted states, with lognormal lengths of the trace's mean
        tokens and standard deviation of ln(tokens) (from the stored quantiles), clipped at its longest request."""
        if self.mmpp is None:
            raise TraceError(f"{self.source}: no MMPP was fitted")

        def lengths(log_q: np.ndarray, name: str) -> dict:
            levels = np.diff(QUANTILES)
            mids = (log_q[1:] + log_q[:-1]) / 2
            mu = float((levels * mids).sum())
            sigma = float(np.sqrt(max((levels * (mids - mu) ** 2).sum(), 1e-6)))
            mean = self.report.get(name, {}).get("mean") or math.exp(mu + sigma**2 / 2)
            return {"dist": "lognormal", "mean": round(float(mean), 3), "sigma": round(sigma, 5),
                    "max_tokens": int(round(math.exp(log_q[-1])))}

        return {"kind": "mmpp", "states": self.mmpp.states(),
                "prompt_tokens": lengths(self.prompt_log_quantiles, "prompt_tokens"),
                "output_tokens": lengths(self.output_log_quantiles, "output_tokens")}

    @staticmethod
    def from_dict(data: dict, where: str) -> FittedArrivalModel:
        try:
            if data.get("format") != FORMAT:
                raise KeyError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            ia, prof, lens = data["inter_arrival"], data["rate_profile"], data["lengths"]

            def dist(d: dict) -> GapDistribution:
                if d["family"] not in FAMILIES:
                    raise KeyError(f"family {d['family']!r}, expected one of {', '.join(FAMILIES)}")
                g = GapDistribution(str(d["family"]), float(d["mean_s"]), float(d["cv"]), float(d.get("zero_fraction", 0.0)))
                if not (g.mean_s > 0 and g.cv > 0 and 0 <= g.zero_fraction < 1):
                    raise ValueError("mean_s and cv must be > 0 and zero_fraction in [0, 1)")
                return g

            rel = np.asarray(prof["relative_rate"], dtype=np.float64)
            pq = np.asarray(lens["prompt_log_tokens"], dtype=np.float64)
            oq = np.asarray(lens["output_log_tokens"], dtype=np.float64)
            if np.asarray(lens["quantiles"]).shape != QUANTILES.shape or not np.allclose(lens["quantiles"], QUANTILES, atol=1e-4):
                raise ValueError(f"lengths.quantiles must be the {len(QUANTILES)} levels moesim writes")
            if pq.shape != QUANTILES.shape or oq.shape != QUANTILES.shape or np.any(np.diff(pq) < 0) or np.any(np.diff(oq) < 0):
                raise ValueError(f"length quantiles must be {len(QUANTILES)} non-decreasing numbers each")
            if rel.ndim != 1 or len(rel) == 0 or np.any(rel < 0) or rel.sum() <= 0:
                raise ValueError("rate_profile.relative_rate must be a non-empty list of numbers >= 0")
            return FittedArrivalModel(
                source=str(data.get("source", "?")), num_requests=int(data.get("num_requests", 0)),
                duration_s=float(data.get("duration_s", 0.0)), rate_per_s=float(data["rate_per_s"]),
                window_s=float(prof["window_s"]), relative_rate=rel,
                stationary=dist(ia), profiled=dist(prof["inter_arrival"]),
                prompt_log_quantiles=pq, output_log_quantiles=oq,
                length_rank_correlation=float(lens.get("rank_correlation", 0.0)),
                report=data.get("fit_report") or {},
                mmpp=_mmpp_from(data.get("mmpp")),
                stationary_model=str(data.get("stationary_model", "renewal")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{where}: not a fitted arrival generator written by `moesim trace fit` ({exc})") from None

    @staticmethod
    def from_yaml(path: Path) -> FittedArrivalModel:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError:
            raise TraceError(f"{path}: cannot open the fitted arrival generator") from None
        except yaml.YAMLError as exc:
            raise TraceError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise TraceError(f"{path}: expected a mapping written by `moesim trace fit`")
        return FittedArrivalModel.from_dict(data, str(path))


def _mmpp_from(data: dict | None) -> MmppFit | None:
    if data is None:
        return None
    states = data["states"]
    rates = np.array([float(st["rate_per_s"]) for st in states])
    dwell = np.array([float(st["mean_dwell_s"]) for st in states])
    if len(states) != 2 or np.any(rates < 0) or rates.sum() <= 0 or np.any(dwell <= 0):
        raise ValueError("mmpp.states must be 2 states with rate_per_s >= 0 (not both 0) and mean_dwell_s > 0")
    return MmppFit(rates, dwell, bin_s=float(data.get("bin_s", 0.0)))


def _op_time(wall_s: float, cum: np.ndarray, window_s: float, period_s: float) -> float:
    cycles, rest = divmod(wall_s, period_s)
    i = min(int(rest // window_s), len(cum) - 2)
    frac = (rest - i * window_s) / window_s
    return float(cycles * cum[-1] + cum[i] + frac * (cum[i + 1] - cum[i]))


def _wall_time(op_s: np.ndarray, cum: np.ndarray, window_s: float, period_s: float) -> np.ndarray:
    """Inverse of the piecewise-linear cumulative operational time (windows with rate 0 are skipped)."""
    cycles, rest = np.divmod(op_s, cum[-1])
    grid_s = np.arange(len(cum)) * window_s
    # np.interp on a non-decreasing cum maps flat stretches (rate 0) to their end, which is what we want.
    return cycles * period_s + np.interp(rest, cum, grid_s)


def burstiness(arrival_s: np.ndarray, window_s: float) -> dict[str, float]:
    """B = (sd - mean) / (sd + mean) of the gaps (-1 regular, 0 Poisson, 1 bursty) and var/mean of window counts."""
    gaps = np.diff(arrival_s)
    m, s = float(gaps.mean()), float(gaps.std())
    counts = np.bincount((arrival_s // window_s).astype(np.int64))
    return {
        "goh_barabasi_b": round((s - m) / (s + m), 4),
        "count_dispersion": round(float(counts.var() / counts.mean()), 3),
        "cv": round(s / m, 4),
    }


def fit_arrivals(
    arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray, *, source: str, window_s: float = 60.0,
) -> FittedArrivalModel:
    """Fit every part of the generator to one trace (times in seconds, sorted)."""
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    if len(arrival_s) < 11:
        raise TraceError(f"{source}: fitting needs at least 11 requests, got {len(arrival_s)}")
    start = float(arrival_s[0])
    t = arrival_s - start
    duration = float(t[-1])
    if duration <= 0:
        raise TraceError(f"{source}: every request arrives at the same time; nothing to fit")
    gaps = np.diff(t)
    stationary, report = fit_gaps(gaps)
    mmpp = fit_mmpp2(t)
    mmpp_d = ks_distance(gaps, mmpp)  # type: ignore[arg-type]
    report["mmpp"] = {
        "params": {"rate_busy_per_s": round(float(mmpp.rates_per_s[0]), 6), "dwell_busy_s": round(float(mmpp.mean_dwell_s[0]), 3),
                   "rate_quiet_per_s": round(float(mmpp.rates_per_s[1]), 6), "dwell_quiet_s": round(float(mmpp.mean_dwell_s[1]), 3)},
        "ks_d": round(mmpp_d, 5), "log_likelihood": round(mmpp.log_likelihood(gaps), 1),
    }
    stationary_model = "mmpp" if mmpp_d < report[stationary.family]["ks_d"] else "renewal"
    num_windows = max(1, int(math.ceil(duration / window_s)))
    counts = np.bincount(np.minimum((t // window_s).astype(np.int64), num_windows - 1), minlength=num_windows)
    # The last window is partly covered: count it at its covered length.
    covered = np.full(num_windows, window_s)
    covered[-1] = max(duration - window_s * (num_windows - 1), 1e-9)
    rel = (counts / covered) / (len(t) / duration)  # sum(rel * covered) == duration
    # Gaps in operational time: the relative rate integrated over each gap.
    grid_s = np.concatenate([[0.0], np.cumsum(covered)])
    cum = np.concatenate([[0.0], np.cumsum(rel * covered)])
    profiled, report_profiled = fit_gaps(np.diff(np.interp(t, grid_s, cum)))
    logs_p = np.log(np.asarray(prompt_tokens, dtype=np.float64))
    logs_o = np.log(np.asarray(output_tokens, dtype=np.float64))
    model = FittedArrivalModel(
        source=source, num_requests=len(t), duration_s=duration, rate_per_s=len(t) / duration, window_s=window_s,
        relative_rate=rel, stationary=stationary, profiled=profiled,
        prompt_log_quantiles=np.quantile(logs_p, QUANTILES), output_log_quantiles=np.quantile(logs_o, QUANTILES),
        length_rank_correlation=_spearman(logs_p, logs_o),
        mmpp=mmpp, stationary_model=stationary_model,
        report={
            "inter_arrival_families": report,
            "inter_arrival_families_under_rate_profile": report_profiled,
            "chosen_by": "smallest Kolmogorov-Smirnov D; renewal families matched to the gaps' mean and CV, "
                         "MMPP-2 by EM on binned counts (its log-likelihood is of the gap sequence)",
            "burstiness": burstiness(t, window_s),
            "prompt_tokens": _length_summary(prompt_tokens),
            "output_tokens": _length_summary(output_tokens),
        },
    )
    return model


def _length_summary(tokens: np.ndarray) -> dict[str, float]:
    x = np.asarray(tokens, dtype=np.float64)
    q = np.percentile(x, [10, 50, 90, 99])
    return {"mean": round(float(x.mean()), 2), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]), "p99": float(q[3])}
