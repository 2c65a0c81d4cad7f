"""`moesim trace fit`, kind: fitted / mmpp / servegen arrivals."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import TypeAdapter

from sim.cli import main
from sim.errors import TraceError
from sim.workload.arrival_bursty import mmpp_arrivals_s, mmpp_mean_rate, read_client_windows, servegen_arrivals
from sim.workload.arrival_fit import (
    FittedArrivalModel,
    GapDistribution,
    _lower_gamma_regularized,
    burstiness,
    fit_arrivals,
    fit_gaps,
)
from sim.workload.arrivals import ArrivalSpec, TraceFile, build_requests, load_trace

ARRIVALS = TypeAdapter(ArrivalSpec)
SERVEGEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "arrival_traces" / "servegen_alibaba"
QS = [10, 50, 90, 99]


def _trace(name: str):
    return load_trace(TraceFile(path=name), base_dir=Path("."))


def test_gamma_cdf_matches_hand_values() -> None:
    """P(1, x) = 1 - e^-x; P(2, x) = 1 - e^-x (1 + x); both branches (series below a+1, fraction above)."""
    x = np.array([0.1, 0.5, 1.0, 2.5, 4.0, 9.0])
    assert _lower_gamma_regularized(1.0, x) == pytest.approx(1 - np.exp(-x), abs=1e-10)
    assert _lower_gamma_regularized(2.0, x) == pytest.approx(1 - np.exp(-x) * (1 + x), abs=1e-10)


@pytest.mark.parametrize("family", ["exponential", "gamma", "weibull", "lognormal"])
def test_each_family_is_recognised_from_its_own_samples(family: str) -> None:
    truth = GapDistribution(family, 0.5, 1.0 if family == "exponential" else 2.0)
    gaps = truth.sample(np.random.default_rng(1), 20_000)
    chosen, report = fit_gaps(gaps)
    assert chosen.family == family
    assert report[family]["ks_d"] < 0.02
    assert chosen.mean_s == pytest.approx(gaps.mean())
    if family != "exponential":  # the exponential's CV is 1 by definition
        assert chosen.cv == pytest.approx(gaps.std() / gaps.mean())


def test_weibull_and_lognormal_parameters_give_the_asked_mean_and_cv() -> None:
    for family in ("weibull", "lognormal", "gamma"):
        d = GapDistribution(family, 2.0, 3.0)
        p = d.params
        if family == "weibull":
            k, lam = p["shape"], p["scale_s"]
            mean = lam * math.gamma(1 + 1 / k)
            cv = math.sqrt(math.gamma(1 + 2 / k) / math.gamma(1 + 1 / k) ** 2 - 1)
        elif family == "lognormal":
            mean = math.exp(p["mu"] + p["sigma"] ** 2 / 2)
            cv = math.sqrt(math.exp(p["sigma"] ** 2) - 1)
        else:
            mean, cv = p["shape"] * p["scale_s"], 1 / math.sqrt(p["shape"])
        assert (mean, cv) == pytest.approx((2.0, 3.0), rel=1e-6)


def _generated(model: FittedArrivalModel, duration_s: float, profile: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = model.arrivals_s(rng, profile=profile, max_duration_s=duration_s)
    p, o = model.lengths(rng, len(a))
    return a, p, o


@pytest.mark.parametrize("profile", [False, True])
def test_fit_of_the_azure_conversation_trace_regenerates_its_rate_cv_and_lengths(profile: bool) -> None:
    """Tolerances (one trace-length run, seed 0): rate within 3 %, gap CV within 5 %, prompt and output
    p10/p50/p90/p99 within 5 %; with the rate profile the per-minute count dispersion within 25 % too."""
    t = _trace("azure-2023-conv")
    model = fit_arrivals(t.arrival_s, t.prompt_tokens, t.output_tokens, source="conv")
    # The MMPP-2 wins the stationary choice on this trace (tests/test_arrival_mmpp_fit.py); this test is about
    # the renewal families, so it asks for the renewal generator.
    model = dataclasses.replace(model, stationary_model="renewal")
    a, p, o = _generated(model, t.duration_s, profile)
    assert len(a) / a[-1] == pytest.approx(len(t) / t.duration_s, rel=0.03)
    gaps, real_gaps = np.diff(a), np.diff(t.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(real_gaps.std() / real_gaps.mean(), rel=0.05)
    assert np.percentile(p, QS) == pytest.approx(np.percentile(t.prompt_tokens, QS), rel=0.05)
    assert np.percentile(o, QS) == pytest.approx(np.percentile(t.output_tokens, QS), rel=0.05)
    real_b = burstiness(t.arrival_s, 60.0)["count_dispersion"]
    got_b = burstiness(a, 60.0)["count_dispersion"]
    if profile:
        assert got_b == pytest.approx(real_b, rel=0.25)
    else:  # a stationary renewal process loses the trace's minute-scale bursts: the reason for the profile
        assert got_b < real_b / 3


def test_fit_of_the_bursty_azure_code_trace_keeps_rate_lengths_and_bursts() -> None:
    """The code trace's gaps have CV 13 (lognormal, sigma 2.3, is chosen): heavy tails make one hour's sample CV
    noisy, so the tolerances are wider and stated here: over 10 trace lengths, rate within 10 %, gap CV within
    35 %, count dispersion per minute within a factor 1.6 of the trace's (160); lengths within 5 % at p10..p99."""
    t = _trace("azure-2023-code")
    model = fit_arrivals(t.arrival_s, t.prompt_tokens, t.output_tokens, source="code")
    assert model.stationary.family == "lognormal"
    assert model.report["inter_arrival_families"]["lognormal"]["ks_d"] < model.report["inter_arrival_families"]["weibull"]["ks_d"]
    a, p, o = _generated(model, 10 * t.duration_s, profile=True)
    assert len(a) / a[-1] == pytest.approx(len(t) / t.duration_s, rel=0.10)
    gaps, real_gaps = np.diff(a), np.diff(t.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(real_gaps.std() / real_gaps.mean(), rel=0.35)
    real_b, got_b = burstiness(t.arrival_s, 60.0)["count_dispersion"], burstiness(a, 60.0)["count_dispersion"]
    assert real_b / 1.6 < got_b < real_b * 1.6
    assert np.percentile(p, QS) == pytest.approx(np.percentile(t.prompt_tokens, QS), rel=0.05)
    assert np.percentile(o, QS) == pytest.approx(np.percentile(t.output_tokens, QS), rel=0.05)


def test_length_correlation_is_kept_when_asked() -> None:
    rng = np.random.default_rng(0)
    prompt = np.exp(rng.normal(6, 1, 5000)).astype(int) + 1
    output = (prompt * np.exp(rng.normal(0, 0.3, 5000))).astype(int) + 1
    times = np.cumsum(rng.exponential(1.0, 5000))
    model = fit_arrivals(times, prompt, output, source="corr")
    p, o = model.lengths(np.random.default_rng(1), 5000)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    got = np.corrcoef(rank(p), rank(o))[0, 1]
    assert got == pytest.approx(model.length_rank_correlation, abs=0.03) and got > 0.9
    p, o = model.lengths(np.random.default_rng(1), 5000, correlated=False)
    assert abs(np.corrcoef(rank(p), rank(o))[0, 1]) < 0.05


def test_trace_fit_cli_writes_yaml_a_scenario_uses_directly(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen.yaml"
    assert main(["trace", "fit", "azure-2023-conv", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CV 1.094; chosen mmpp" in text and "KS D" in text and "burstiness" in text  # MMPP-2 beats Weibull
    spec = ARRIVALS.validate_python({"kind": "fitted", "path": "gen.yaml"})
    table = build_requests(spec, rng=np.random.default_rng(0), base_dir=tmp_path, max_duration_s=600)
    assert len(table) / 600 == pytest.approx(19_366 / 3484, rel=0.15)  # the first 10 minutes follow the profile
    again = build_requests(spec, rng=np.random.default_rng(0), base_dir=tmp_path, max_duration_s=600)
    assert table.equals(again)
    doubled = build_requests(ARRIVALS.validate_python({"kind": "fitted", "path": "gen.yaml", "rate_scale": 2}),
                             rng=np.random.default_rng(0), base_dir=tmp_path, max_duration_s=600)
    assert len(doubled) == pytest.approx(2 * len(table), rel=0.1)


def test_trace_fit_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("t,p,o\n0,1,1\n1,x,1\n")
    assert main(["trace", "fit", str(bad), "--columns", "t,p,o"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"moesim: error: {bad}, line 3: p is 'x'; expected a whole number of tokens >= 1"
    )
    (tmp_path / "g.yaml").write_text("format: nope\n")
    with pytest.raises(TraceError, match=r"g\.yaml: not a fitted arrival generator written by `moesim trace fit`"):
        FittedArrivalModel.from_yaml(tmp_path / "g.yaml")


def test_trace_fit_skips_and_counts_broken_rows(tmp_path: Path, capsys) -> None:
    rows = "\n".join(f"{i * 0.5 + (i % 7) * 0.05},{10 + i},{5 + i % 3}" for i in range(40))
    f = tmp_path / "t.csv"
    f.write_text("t,p,o\n" + rows + "\n3.3,bad,1\n")
    assert main(["trace", "fit", str(f), "--columns", "t,p,o", "--on-bad-row", "skip"]) == 0
    assert "40 requests over 20 s, 2.030 req/s, 1 broken rows skipped" in capsys.readouterr().out
    assert main(["trace", "fit", str(f), "--columns", "t,p,o"]) == 2
    assert "line 42: p is 'bad'" in capsys.readouterr().err


# ---------------------------------------------------------------- MMPP


def test_mmpp_mean_rate_and_bursts() -> None:
    """Two states, 20/s for 30 s and 2/s for 120 s on average: mean rate (20*30 + 2*120)/150 = 5.6/s; counts per
    10 s are far more dispersed than Poisson (var/mean 1)."""
    rates, dwell = np.array([20.0, 2.0]), np.array([30.0, 120.0])
    assert mmpp_mean_rate(rates, dwell, None) == pytest.approx(5.6)
    a = mmpp_arrivals_s(rates, dwell, None, np.random.default_rng(0), max_duration_s=200_000)
    assert len(a) / 200_000 == pytest.approx(5.6, rel=0.05)
    assert burstiness(a, 10.0)["count_dispersion"] > 10


def test_mmpp_one_state_is_poisson_and_switch_matrix_is_checked() -> None:
    a = mmpp_arrivals_s(np.array([3.0]), np.array([5.0]), None, np.random.default_rng(0), max_requests=30_000)
    gaps = np.diff(a)
    assert len(a) == 30_000 and gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match=r"switch must be a 2x2 matrix"):
        ARRIVALS.validate_python({"kind": "mmpp", "states": [{"rate_per_s": 1, "mean_dwell_s": 1}] * 2,
                                  "switch": [[0.5, 0.5], [1, 0]], "prompt_tokens": {"dist": "fixed", "tokens": 1},
                                  "output_tokens": {"dist": "fixed", "tokens": 1}})


# ---------------------------------------------------------------- ServeGen


def test_servegen_window_draws_fill_the_window_at_the_rate() -> None:
    """One client, one 600-s window at 0.5/s -> exactly 300 requests inside [0, 600)."""
    from sim.workload.arrival_bursty import ClientWindows

    w = ClientWindows(np.array([7, 7]), np.array([0.0, 600.0]), np.array([0.5, 0.0]), np.array([2.0, 0.0]),
                      np.array(["Gamma", ""]), np.array([0.25, 0.0]), np.array([8.0, 0.0]))
    at, client = servegen_arrivals(w, np.random.default_rng(0), max_duration_s=1200)
    assert len(at) == 300 and at.max() <= 600 and set(client.tolist()) == {7}


def test_shipped_servegen_day_keeps_the_data_rate_and_diurnal_shape() -> None:
    """The shipped DeepSeek-R1 statistics: generated requests per hour within 5 % of sum(rate x 600 s) per hour."""
    spec = ARRIVALS.validate_python({"kind": "servegen"})
    table = build_requests(spec, rng=np.random.default_rng(0), base_dir=Path("."), max_duration_s=86_400)
    from sim.workload.arrivals import shipped_file

    windows = read_client_windows(shipped_file("servegen_deepseek_r1_clients.csv.gz"))
    starts, rate = windows.rate_per_window()
    expected_per_hour = np.bincount((starts // 3600).astype(int), weights=rate * 600)
    got_per_hour = np.bincount((table.arrival_s // 3600).astype(int), minlength=24)
    assert got_per_hour == pytest.approx(expected_per_hour, rel=0.05)
    assert expected_per_hour.max() / expected_per_hour.min() > 3  # a real diurnal swing, not flat traffic
    assert table.client is not None and len(np.unique(table.client)) > 50
    assert table.prompt_tokens.min() >= 1 and np.median(table.output_tokens) > 100  # reasoning model: long outputs


def test_servegen_clients_start_and_limits() -> None:
    spec = ARRIVALS.validate_python({"kind": "servegen", "clients": 3, "start_s": 43_200})
    table = build_requests(spec, rng=np.random.default_rng(0), base_dir=Path("."), max_requests=500)
    assert len(table) == 500 and len(np.unique(table.client)) <= 3
    with pytest.raises(TraceError, match=r"no client 999 in the ServeGen statistics"):
        build_requests(ARRIVALS.validate_python({"kind": "servegen", "clients": [999]}), rng=np.random.default_rng(0),
                       base_dir=Path("."), max_requests=5)


@pytest.mark.skipif(not SERVEGEN.exists(), reason="needs ../shared/data/arrival_traces/servegen_alibaba")
def test_servegen_reads_the_full_m_small_statistics_from_shared() -> None:
    """Another model's 14-day file from ../shared (not shipped), lengths given in the scenario."""
    spec = ARRIVALS.validate_python({
        "kind": "servegen", "path": str(SERVEGEN / "language_m-small_client_traces.csv.gz"), "clients": 5,
        "prompt_tokens": {"dist": "fixed", "tokens": 100}, "output_tokens": {"dist": "fixed", "tokens": 10},
    })
    table = build_requests(spec, rng=np.random.default_rng(0), base_dir=Path("."), max_duration_s=3600)
    windows = read_client_windows(SERVEGEN / "language_m-small_client_traces.csv.gz")
    top = windows.top_clients(5)
    first_hour = (windows.window_start_s < 3600) & np.isin(windows.client_id, top)
    assert len(table) == pytest.approx((windows.rate_per_s[first_hour] * 600).sum(), rel=0.05)


def test_servegen_broken_file_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("client_id,window_start_s,rate_rps,cv,iat_dist,iat_param1,iat_param2\n0,0,1,1,Gamma,1,1\n0,600,2,1,Pareto,1,1\n")
    with pytest.raises(TraceError, match=r"c\.csv, line 3: iat_dist is 'Pareto'; expected Gamma or Weibull"):
        read_client_windows(f)


# ---------------------------------------------------------------- the transformations from a scenario


def _run(tmp_path: Path, arrivals: dict, **workload) -> dict:
    from sim.engine.simulation import simulate
    from sim.metrics import summarize
    from sim.scenario import parse_scenario, resolve

    data = {
        "model": "mixtral-8x7b",
        "hardware": {"profile": "h100-80gb", "expert_memory": {"experts": 128}},
        "workload": {"arrivals": arrivals, **workload},
    }
    loaded = resolve(parse_scenario(data, "s.yaml"), "s.yaml", tmp_path)
    result = simulate(loaded)
    return {"summary": summarize(result), "requests": result.requests}


def test_scenario_window_rate_scale_sampling_tasks_and_skipped_rows(tmp_path: Path) -> None:
    """A trace of 40 requests 1 s apart (one broken row): window [10, 30) keeps 20, sampling 0.5 keeps 10,
    rate_scale 2 halves their times, the task mix labels them, and the summary counts the skipped row."""
    lines = ["t,p,o"] + [f"{i},{20 + i},{4}" for i in range(40)]
    lines.insert(6, "5.5,oops,4")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    arrivals = {"kind": "trace", "path": "t.csv", "format": "csv", "columns": {"arrival": "t", "prompt_tokens": "p",
                "output_tokens": "o"}, "time_unit": "s", "on_bad_row": "skip", "window_start_s": 10, "window_end_s": 30,
                "sample_fraction": 0.5, "rate_scale": 2}
    out = _run(tmp_path, arrivals, tasks={"chat": 1.0})
    s, req = out["summary"], out["requests"]
    assert s["requests"]["completed"] == 10
    assert s["requests"]["trace_rows_skipped"] == 1
    assert set(req["task"]) == {"chat"}
    assert req["arrived_at_s"].max() < 10  # (30 - 10) / 2
    assert set((req["prompt_tokens"] - 20).tolist()) <= set(range(10, 30))
    arrivals["on_bad_row"] = "error"
    with pytest.raises(TraceError, match=r"t\.csv, line 7: p is 'oops'; expected a whole number of tokens >= 1"):
        _run(tmp_path, arrivals)


@pytest.mark.parametrize("arrivals", [
    {"kind": "servegen", "clients": 2, "start_s": 36_000},
    {"kind": "mmpp", "states": [{"rate_per_s": 5, "mean_dwell_s": 2}, {"rate_per_s": 0.5, "mean_dwell_s": 5}],
     "prompt_tokens": {"dist": "fixed", "tokens": 64}, "output_tokens": {"dist": "fixed", "tokens": 4}},
])
def test_bursty_generators_run_in_a_simulation(tmp_path: Path, arrivals: dict) -> None:
    out = _run(tmp_path, arrivals, max_requests=12)
    assert out["summary"]["requests"]["completed"] == 12


def test_tied_arrivals_are_fitted_as_a_share_of_zero_gaps() -> None:
    """Half of the gaps 0 (requests stamped at the same time), the others exponential with mean 2 s: the fit
    keeps zero_fraction 0.5, a tie-aware KS D near 0 for the exponential, and the generated gaps reproduce both
    (mean gap 1 s)."""
    rng = np.random.default_rng(0)
    gaps = np.where(rng.random(20_000) < 0.5, 0.0, rng.exponential(2.0, 20_000))
    chosen, report = fit_gaps(gaps)
    assert chosen.zero_fraction == pytest.approx(0.5, abs=0.01)
    assert chosen.mean_s == pytest.approx(2.0, rel=0.03) and chosen.overall_mean_s == pytest.approx(1.0, rel=0.03)
    assert report["exponential"]["ks_d"] < 0.02 and report["lognormal"]["ks_d"] > 0.05
    drawn = chosen.sample(np.random.default_rng(1), 20_000)
    assert (drawn == 0).mean() == pytest.approx(0.5, abs=0.02) and drawn.mean() == pytest.approx(1.0, rel=0.05)
