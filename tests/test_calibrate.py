"""The calibrator: timing statistics, fits on synthetic data, a tiny real calibration, resume, CLI errors.

The tiny calibration measures one small shape per op at a few sizes with two repeats (a few seconds on
2 cores); nothing here asserts a timing threshold, only that what is measured is what the profile returns."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from calibrate.cli import compare_profiles, points_path_for, write_profile
from calibrate.errors import CalibrationError
from calibrate.fit import fit_link, fit_roofline, leave_one_out_errors
from calibrate.measure import Task, build_plan, cpu_attention_thread_counts, read_points, run_tasks
from calibrate.timing import Budget, summarize
from sim.cli import main
from sim.profile import load_profile
from sim.spec import get_model
from sim.work import AttentionShape, ExpertShape, GemmShape

torch = pytest.importorskip("torch")

TINY_BUDGET = Budget(warmup=1, min_repeats=2, max_repeats=2, time_s=0.0, rounds=2)
HEADS = dict(num_heads=2, num_kv_heads=1, head_dim=16)  # GQA, 2 query heads per KV head


def tiny_tasks(threads: int = 1) -> list[Task]:
    t = []
    t.append(Task.of("peak_gemm", "fp32", threads, hidden=128))
    t.append(Task.of("mem_read", "fp32", threads, nbytes=4 * 2**20))
    t += [Task.of("host_copy", "bf16", threads, nbytes=mb * 2**20) for mb in (1, 2, 4)]
    t += [Task.of("expert_ffn", "fp32", threads, hidden=64, ffn=128, num_matrices=3, tokens=n) for n in (1, 2, 4, 8)]
    t += [Task.of("dense_gemm", "fp32", threads, in_features=64, out_features=128, tokens=n) for n in (1, 2, 4, 8)]
    t += [Task.of("gate", "fp32", threads, in_features=64, out_features=8, top_k=2, tokens=n) for n in (1, 2, 4, 8)]
    t += [Task.of("attention_decode", "bf16", threads, batch=b, context=c, **HEADS) for b in (1, 2) for c in (16, 64)]
    t += [Task.of("attention_prefill", "bf16", threads, tokens=n, **HEADS) for n in (8, 16, 32)]
    return t


ENV = {"device": "cpu", "cpu_model": "test cpu", "cpu_count": 2, "threads": 1, "host_memory_bytes": 1e9,
       "torch": "test", "load_average_at_start": [0.0, 0.0, 0.0]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """A tiny calibration's profile path and its points."""
    out = tmp_path_factory.mktemp("cal") / "tiny.yaml"
    points_path = points_path_for(out)
    result = run_tasks(tiny_tasks(), points_path, device="cpu", device_name="test cpu", budget=TINY_BUDGET,
                       progress=False)
    write_profile(result.rows, ENV, out=out, name="tiny", threads=1, points_path=points_path, quiet=True)
    return out, read_points(points_path)


# ---------------------------------------------------------------- timing statistics


def test_summary_drops_a_preempted_sample_and_keeps_the_median():
    s = summarize([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 5.0])
    assert (s.num_samples, s.num_dropped) == (7, 1)
    assert s.median_s == pytest.approx(1.0)
    assert s.cv < 0.02


def test_short_calls_get_more_repeats_long_calls_keep_the_cap():
    """A call under ``short_call_s`` may take ``short_call_repeat_factor`` x the repeats; any other keeps
    ``max_repeats``. An instant call with a generous time budget makes both limits the only stop."""
    from calibrate.timing import sample

    def instant(i: int) -> None:
        return None

    common = dict(warmup=0, min_repeats=2, max_repeats=5, time_s=60.0, short_call_repeat_factor=4)
    assert len(sample(instant, short_call_s=1.0, **common)) == 20
    assert len(sample(instant, short_call_s=0.0, **common)) == 5
    assert len(sample(instant, short_call_s=1.0, **{**common, "short_call_repeat_factor": 1})) == 5


def test_identical_samples_keep_everything():
    s = summarize([2.0, 2.0, 2.0])
    assert (s.median_s, s.num_samples, s.num_dropped, s.cv) == (2.0, 3, 0, 0.0)


# ---------------------------------------------------------------- fits on synthetic data


def test_roofline_fit_recovers_its_parameters():
    """Points from fixed 20 us + max(flops / (1 TFLOP/s x 0.6), bytes / (100 GB/s x 0.8)), both regimes sampled."""
    shape = ExpertShape(hidden=1024, ffn=2048, num_matrices=3, weight_dtype="bf16")
    tokens = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048], dtype=float)
    flops, nbytes = shape.flops(tokens), shape.bytes_moved(tokens)
    t = 20e-6 + np.maximum(flops / 0.6e12, nbytes / 80e9)
    params, err = fit_roofline(flops, nbytes, t, 1e12, 100e9)
    assert params["fixed_s"] == pytest.approx(20e-6, rel=0.05)
    assert params["compute_efficiency"] == pytest.approx(0.6, rel=0.02)
    assert params["memory_efficiency"] == pytest.approx(0.8, rel=0.02)
    assert np.max(np.abs(err)) < 0.01


def test_link_fit_recovers_latency_and_bandwidth():
    nbytes = np.array([1, 4, 16, 64, 256], dtype=float) * 2**20
    t = 5e-6 + nbytes / 12e9
    params, err = fit_link(nbytes, t)
    assert params["latency_s"] == pytest.approx(5e-6, rel=1e-3)
    assert params["bandwidth_gbps"] == pytest.approx(12.0, rel=1e-6)
    assert np.max(np.abs(err)) < 1e-9


def test_leave_one_out_of_a_power_law_table_is_exact_inside_the_grid():
    """Log-log interpolation reproduces t = a x tokens^0.5 exactly at interior points."""
    row = {"shape": {"in_features": 8, "out_features": 8, "weight_dtype": "fp32", "act_dtype": "fp32"},
           "tokens": [1, 2, 4, 8, 16], "latency_s": [1e-3 * n**0.5 for n in (1, 2, 4, 8, 16)]}
    err = leave_one_out_errors("dense_gemm", [row], {"fixed_s": 0.0, "compute_efficiency": 1.0,
                                                     "memory_efficiency": 1.0}, 1e12, 1e11)
    assert len(err) == 5
    assert np.allclose(err[1:-1], 0.0, atol=1e-9)


# ---------------------------------------------------------------- a tiny real calibration


def test_tiny_calibration_writes_a_profile_that_loads(tiny):
    out, points = tiny
    profile = load_profile(out)
    assert profile.source == "measured"
    assert profile.gpu.name.startswith("CPU (no GPU): test cpu")
    assert "NOT a PCIe transfer" in profile.provenance["host_to_device"]
    assert profile.provenance["points_file"] == "tiny.points.csv"
    assert {r["op"] for r in points} >= {"expert_ffn", "dense_gemm", "gate", "host_copy", "attention_decode",
                                         "attention_prefill", "peak_gemm", "mem_read"}
    assert all(float(r["median_s"]) > 0 for r in points)


def test_table_lookups_return_the_measured_medians(tiny):
    out, points = tiny
    profile = load_profile(out)
    for r in points:
        if r["op"] == "expert_ffn":
            shape = ExpertShape(hidden=64, ffn=128, num_matrices=3, weight_dtype="fp32", act_dtype="fp32")
            got = profile.expert_ffn_s(tokens=int(r["tokens"]), shape=shape)
        elif r["op"] in ("dense_gemm", "gate"):
            shape = GemmShape(int(r["in_features"]), int(r["out_features"]), "fp32", "fp32")
            got = getattr(profile, f"{r['op']}_s")(tokens=int(r["tokens"]), shape=shape)
        else:
            continue
        assert got == pytest.approx(float(r["median_s"]), rel=1e-9)
    assert profile.extrapolated_counts() == {}


def test_roofline_and_link_lookups_are_within_their_fit_error(tiny):
    out, points = tiny
    profile = load_profile(out)
    shape = AttentionShape(num_heads=2, qk_head_dim=16, v_head_dim=16, kv_bytes_per_token=2 * 1 * 16 * 2.0)
    copy_fit = profile.provenance["fits"]["host_copy"]["link"]
    for r in points:
        measured = float(r["median_s"])
        if r["op"] == "attention_decode":
            got = profile.attention_decode_s(context_tokens=[int(r["context"])] * int(r["batch"]), shape=shape)
            bound = profile.operations.attention_decode.fit_error.max_rel_error
        elif r["op"] == "attention_prefill":
            got = profile.attention_prefill_s(new_tokens=int(r["tokens"]), context_tokens=0, shape=shape)
            bound = profile.operations.attention_prefill.fit_error.max_rel_error
        elif r["op"] == "host_copy":
            got = profile.h2d_copy_s(nbytes=int(r["nbytes"]))
            bound = copy_fit["max_rel_error"]
        else:
            continue
        assert abs(got / measured - 1.0) <= bound * 1.001 + 1e-4  # the stored max error is rounded to 5 digits


def test_comparing_a_profile_with_itself_finds_no_difference(tiny):
    out, _ = tiny
    p = load_profile(out)
    diffs = compare_profiles(p, p)
    assert set(diffs) >= {"expert_ffn", "attention_decode", "host_to_device"}
    assert all(d["max_abs_diff"] == 0.0 for d in diffs.values())


def test_profile_show_and_compare_commands(tiny, capsys):
    out, _ = tiny
    assert main(["profile", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("profile tiny [source: measured]")
    assert "host memory copy, not PCIe" in shown
    assert "expert_ffn         table: 1 shapes, tokens 1..8" in shown
    assert main(["profile", "compare", "h100-80gb", str(out)]) == 0
    assert "attention_decode" in capsys.readouterr().out


# ---------------------------------------------------------------- interrupt and resume


def test_an_interrupted_calibration_keeps_its_points_and_resumes(tmp_path):
    points_path = tmp_path / "p.points.csv"
    tasks = tiny_tasks()[:6]

    def stop_after_two(n: int) -> None:
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tasks(tasks, points_path, device="cpu", device_name="test cpu", budget=TINY_BUDGET, progress=False,
                  after_point=stop_after_two)
    first = read_points(points_path)
    assert len(first) == 2
    result = run_tasks(tasks, points_path, device="cpu", device_name="test cpu", budget=TINY_BUDGET, progress=False)
    assert (result.skipped, result.measured) == (2, 4)
    rows = read_points(points_path)
    assert rows[:2] == first  # the earlier points are kept as measured, not remeasured
    assert len(rows) == 6


def test_resuming_points_from_another_device_is_refused(tmp_path):
    points_path = tmp_path / "p.points.csv"
    run_tasks(tiny_tasks()[:1], points_path, device="cpu", device_name="cpu A", budget=TINY_BUDGET, progress=False)
    with pytest.raises(CalibrationError, match="measured on 'cpu A', not 'cpu B'; use --fresh"):
        run_tasks(tiny_tasks()[:2], points_path, device="cpu", device_name="cpu B", budget=TINY_BUDGET,
                  progress=False)


# ---------------------------------------------------------------- the plan and the CLI


def test_quick_plan_covers_every_op_and_labels_the_cpu_copy_honestly():
    tasks = build_plan([get_model("olmoe-1b-7b")], quick=True, device="cpu", threads=1)
    ops = {t.op for t in tasks}
    assert ops == {"peak_gemm", "mem_read", "host_copy", "expert_ffn", "gate", "dense_gemm", "attention_decode",
                   "attention_prefill", "grouped_expert_ffn"}
    # Several copies at once (copy threads on the CPU), beside the one-copy points the link is fitted on.
    concurrent = {(t.p["streams"], t.p["nbytes"] >> 20) for t in tasks if t.p.get("streams")}
    assert concurrent == {(s, mb) for s in (2, 4) for mb in (4, 64)}
    assert len({t.key() for t in tasks}) == len(tasks)
    # CPU attention by thread count: decode points at every core count, not only at the calibration's
    assert {t.threads for t in tasks if t.op == "attention_decode"} == set(cpu_attention_thread_counts(1))
    grouped = {(t.p["num_experts"], t.p["tokens"]) for t in tasks if t.op == "grouped_expert_ffn"}
    assert grouped == {(e, n) for e in (1, 2, 4, 8) for n in (1, 4, 16, 64)}


def test_cuda_plan_measures_device_to_host_and_concurrent_streams():
    tasks = build_plan([get_model("olmoe-1b-7b")], quick=True, device="cuda", threads=1)
    by = lambda op: {(t.p.get("pinned"), t.p.get("streams"), t.p["nbytes"] >> 20) for t in tasks if t.op == op}  # noqa: E731
    assert {mb for _, streams, mb in by("d2h_copy") if streams is None} == {1, 4, 16, 64, 256}
    assert {(s, mb) for pinned, s, mb in by("h2d_copy") if s} == {(s, mb) for s in (2, 4) for mb in (4, 64)}


def test_concurrent_copies_are_reported_against_the_one_copy_link(tmp_path):
    """Two and four host copies at once (threads), fitted beside the one-copy link: the profile's provenance
    gives their aggregate rate and its ratio to one copy's; the link itself is fitted on single copies only."""
    from calibrate.fit import concurrent_copies

    tasks = tiny_tasks() + [Task.of("host_copy", "bf16", 1, nbytes=mb * 2**20, streams=s) for s in (2, 4) for mb in (1, 4)]
    points_path = tmp_path / "c.points.csv"
    result = run_tasks(tasks, points_path, device="cpu", device_name="test cpu", budget=TINY_BUDGET, progress=False)
    profile = write_profile(result.rows, ENV, out=tmp_path / "c.yaml", name="c", threads=1, points_path=points_path,
                            quiet=True)
    c = profile["provenance"]["concurrent_copies"]
    assert set(c) == {"streams_2", "streams_4", "note"}
    assert c["streams_4"]["nbytes"] == [2**20, 4 * 2**20]
    assert all(g > 0 for g in c["streams_2"]["aggregate_gbps"] + c["streams_4"]["speedup_vs_one_copy"])
    # Hand-checked: 2 copies of 1 GB in 1 s on a link of 1 GB/s and no latency move 2 GB/s, twice one copy's rate.
    rows = [{"streams": "2", "nbytes": str(10**9), "median_s": "1.0"}]
    assert concurrent_copies(rows, {"bandwidth_gbps": 1.0, "latency_s": 0.0})["streams_2"] == {
        "nbytes": [10**9], "aggregate_gbps": [2.0], "speedup_vs_one_copy": [2.0]}


def test_cuda_plan_measures_the_host_cpu_attention_on_the_cpu():
    from calibrate.measure import task_device

    tasks = build_plan([get_model("olmoe-1b-7b")], quick=True, device="cuda", threads=4)
    cpu = [t for t in tasks if t.op == "cpu_attention_decode"]
    assert {t.threads for t in cpu} == set(cpu_attention_thread_counts(4))
    assert all(task_device(t, "cuda") == "cpu" for t in cpu)
    assert task_device(next(t for t in tasks if t.op == "attention_decode"), "cuda") == "cuda"


def test_mla_models_get_no_sdpa_attention_points():
    tasks = build_plan([get_model("deepseek-v2-lite")], quick=True, device="cpu", threads=1)
    assert not any(t.op.startswith("attention") for t in tasks)
    assert any(t.op == "expert_ffn" and t.p["ffn"] == 1408 for t in tasks)


def test_unknown_model_is_one_line_and_exit_2(capsys, tmp_path):
    code = main(["calibrate", "--out", str(tmp_path / "x.yaml"), "--model", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("moesim: error: unknown model 'nosuch'") and err.count("\n") == 1


def test_cuda_without_a_gpu_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["calibrate", "--out", str(tmp_path / "x.yaml"), "--device", "cuda", "--quick"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"moesim: error: --device cuda: no CUDA device is available (torch {torch.__version__}); use --device cpu\n")
    assert not (tmp_path / "x.points.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "moesim: error: --device 'tpu': expected cpu or cuda\n"),
    (["--dtype", "fp64"], "moesim: error: --dtype 'fp64': expected one of bf16, fp32, fp16\n"),
    (["--threads", "0"], "moesim: error: --threads 0: must be >= 1\n"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path, argv, message):
    assert main(["calibrate", "--out", str(tmp_path / "x.yaml"), *argv]) == 2
    assert capsys.readouterr().err == message


def test_fit_only_without_points_is_one_line(capsys, tmp_path):
    assert main(["calibrate", "--out", str(tmp_path / "x.yaml"), "--fit-only", "--quick"]) == 2
    assert capsys.readouterr().err == f"moesim: error: {tmp_path / 'x.points.csv'}: no measured points to fit\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_cuda_calibration_writes_a_profile_that_loads(tmp_path):  # pragma: no cover - needs a GPU
    tasks = [Task.of(t.op if t.op != "host_copy" else "h2d_copy", t.dtype, t.threads, **t.p) for t in tiny_tasks()]
    tasks = [Task.of(t.op, t.dtype, t.threads, **{**t.p, "pinned": 1}) if t.op == "h2d_copy" else t for t in tasks]
    out = tmp_path / "gpu.yaml"
    result = run_tasks(tasks, points_path_for(out), device="cuda", device_name="gpu", budget=TINY_BUDGET,
                       progress=False)
    env = {**ENV, "device": "cuda", "gpu_name": "test gpu", "gpu_memory_bytes": 1e10}
    write_profile(result.rows, env, out=out, name="gpu", threads=1, points_path=points_path_for(out), quiet=True)
    assert load_profile(out).gpu.name == "test gpu"


def test_overhead_least_squares_recovers_an_affine_residual_in_relative_terms():
    from calibrate.overhead import _lstsq, overhead_batches

    tok = np.array([1.0, 4, 8, 16, 64, 128])
    seq = np.array([1.0, 4, 8, 1, 2, 3])
    kernels = 1e-3 * tok + 2e-3
    real = kernels + 3e-4 + 2e-6 * tok + 5e-5 * seq
    fixed, per_tok, per_seq = _lstsq([np.ones_like(tok), tok, seq], real - kernels, real)
    assert (fixed, per_tok, per_seq) == pytest.approx((3e-4, 2e-6, 5e-5), rel=1e-6)
    batches = overhead_batches(0)
    assert batches == overhead_batches(0)  # seeded
    kinds = {(any(p for *_, p in b), any(not p for *_, p in b)) for b in batches}
    assert kinds == {(False, True), (True, False), (True, True)}  # decode-only, prefill-only, mixed


def test_interference_check_times_plans_as_the_planner_charges_the_term():
    """``calibrate.overhead._duration_with`` (the fit's iteration check) adds X to each op that waits for a
    load, exactly as a planner whose profile has that interference plans the same batch."""
    from calibrate.overhead import _duration_with
    from sim.engine.iteration import BatchShape, IterationPlanner, time_plan
    from sim.policies.cache import make_cache
    from sim.profile import HardwareProfile

    spec = get_model("mixtral-8x7b")
    base_profile = load_profile("h100-80gb")
    data = base_profile.model_dump()
    data["source"] = "measured"
    data["operations"]["load_interference"] = {"s_per_byte": 1e-13}
    profile = HardwareProfile.model_validate(data)
    counts = np.zeros((spec.num_moe_layers, spec.num_experts), dtype=np.int64)
    counts[:, [1, 6]] = 2
    batch = BatchShape(prefill_new_tokens=np.zeros(0, dtype=np.int64),
                       prefill_context_tokens=np.zeros(0, dtype=np.int64),
                       decode_context_tokens=np.array([100, 200]), num_emitting=2)

    def plan(p):
        cache = make_cache("lru", num_layers=spec.num_moe_layers, num_experts=spec.num_experts,
                           capacity_experts=spec.num_moe_layers, per_layer=False)
        return IterationPlanner(model=spec, profile=p, cache=cache).plan(batch, counts)

    base, over = plan(base_profile), plan(profile)
    x = 1e-13 * spec.expert_bytes
    assert base.misses == over.misses > 0
    assert _duration_with(base, x) == pytest.approx(time_plan(over).duration_s, rel=1e-12)
    assert time_plan(over).compute_busy_s - time_plan(base).compute_busy_s == pytest.approx(base.misses * x)


def test_expert_call_fit_recovers_the_table_share_and_stays_in_range():
    """Calls generated as 0.3 x table + 0.2 ms + 5 us/token are fitted back exactly; a general profile keeps
    the whole table; the share never leaves [0, 1] even when the table is collinear with the tokens."""
    from calibrate.overhead import fit_expert_calls

    rng = np.random.default_rng(3)
    calls = [rng.integers(1, 40, size=int(n)).astype(np.float64) for n in rng.integers(2, 30, size=25)]
    table = [1e-4 + 2e-5 * t ** 0.8 for t in calls]  # the isolated table's (concave) shape
    ffn = np.array([float(np.sum(t)) for t in table])
    real = np.array([0.3 * f + float(np.sum(2e-4 + 5e-6 * t)) for f, t in zip(ffn, calls)])
    scale, fixed, per_tok, pred = fit_expert_calls(ffn, calls, real, fit_kernel_scale=True)
    assert (scale, fixed, per_tok) == pytest.approx((0.3, 2e-4, 5e-6), rel=1e-6)
    assert pred == pytest.approx(real, rel=1e-9)
    assert fit_expert_calls(ffn, calls, real, fit_kernel_scale=False)[0] == 1.0
    linear_table = np.array([float(np.sum(1e-4 + 1e-5 * t)) for t in calls])  # collinear with calls and tokens
    noisy = real * (1.0 + 0.05 * rng.standard_normal(real.size))
    assert 0.0 <= fit_expert_calls(linear_table, calls, noisy, fit_kernel_scale=True)[0] <= 1.0


def test_stored_rates_are_rounded_up_so_efficiencies_stay_at_most_one():
    """Peaks and bandwidth are fitted as the profile stores them (4 significant digits), never rounded below
    the measured rate."""
    from calibrate.fit import _round_up

    assert _round_up(1.23441) == 1.235 and _round_up(1.234) == 1.234
    assert _round_up(9.99951) == 10.0 and _round_up(123456.0) == 123500.0
    for x in (3.14159e12, 2.000001e9, 7.77777e-5):
        assert _round_up(x) >= x and float(f"{_round_up(x):.4g}") == _round_up(x)


# ---------------------------------------------------------------- copies spread over the run


def test_spread_schedule_covers_the_run_evenly_from_its_start():
    from calibrate.measure import spread_schedule

    assert spread_schedule(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert spread_schedule(3, 4) == [0, 1, 2, 2]  # rounds never run after the last group has started
    assert spread_schedule(0, 3) == [0, 0, 0]  # nothing else to spread over: back to back


def test_copy_rounds_are_interleaved_with_the_other_groups(tmp_path, monkeypatch):
    """Copies (bandwidth, which drifts over seconds on a shared machine) are sampled in ``spread_rounds`` rounds
    between the other groups, and each copy point's median covers samples from every round."""
    import calibrate.measure as measure

    events: list[str] = []
    real_group, real_round = measure.measure_group, measure.SpreadSampler.run_round

    def logged_group(group, *args, **kwargs):
        events.append(f"group {group[0].op}")
        return real_group(group, *args, **kwargs)

    def logged_round(self):
        events.append("copy round")
        return real_round(self)

    monkeypatch.setattr(measure, "measure_group", logged_group)
    monkeypatch.setattr(measure.SpreadSampler, "run_round", logged_round)
    budget = Budget(warmup=1, min_repeats=4, max_repeats=4, time_s=0.0, rounds=2, spread_rounds=4)
    result = run_tasks(tiny_tasks(), tmp_path / "p.points.csv", device="cpu", device_name="test cpu", budget=budget,
                       progress=False)
    assert events.count("copy round") == 4
    assert events[0] == "copy round"  # an interrupted run has copy samples from its start
    rounds_at = [i for i, e in enumerate(events) if e == "copy round"]
    assert rounds_at[-1] < len(events) - 1  # not bunched at the end: other groups run after the last round
    assert all(b - a > 1 for a, b in zip(rounds_at, rounds_at[1:]))  # other groups between every two rounds
    copies = [r for r in result.rows if r["op"] == "host_copy"]
    assert len(copies) == 3
    assert all(int(r["num_samples"]) + int(r["num_dropped"]) == 4 for r in copies)  # one sample from each round
    others = [r for r in result.rows if r["op"] != "host_copy"]
    assert [r["op"] for r in result.rows[-3:]] == ["host_copy"] * 3 and len(others) == len(tiny_tasks()) - 3
