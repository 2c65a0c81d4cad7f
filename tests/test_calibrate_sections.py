"""The calibrator's newer profile sections: grouped expert calls, CPU attention by thread count, the
attention fits (efficiency by length, roofline per head dim), collectives (lookups, the gloo test path,
the imported NCCL tables), ``moesim calibrate``'s overheads / collectives / --resume wiring, the HTML
pages of ``profile show|compare`` and the simulator's out-of-range warning.

Nothing asserts a timing threshold; measured values are checked against what the profile returns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from calibrate.cli import points_path_for, write_profile
from calibrate.errors import CalibrationError
from calibrate.measure import Task, read_points, run_tasks
from calibrate.timing import Budget
from sim.cli import main
from sim.profile import HardwareProfile, load_profile
from sim.work import AttentionShape, ExpertShape

torch = pytest.importorskip("torch")

TINY_BUDGET = Budget(warmup=1, min_repeats=2, max_repeats=2, time_s=0.0, rounds=2)
HEADS = dict(num_heads=2, num_kv_heads=1, head_dim=16)
SHAPE = dict(hidden=64, ffn=128, num_matrices=3)
ENV = {"device": "cpu", "cpu_model": "test cpu", "cpu_count": 2, "threads": 1, "host_memory_bytes": 1e9,
       "torch": "test", "load_average_at_start": [0.0, 0.0, 0.0]}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpu_profiling" / "aiconfigurator"


def base_tasks() -> list[Task]:
    t = [Task.of("peak_gemm", "fp32", 1, hidden=128), Task.of("mem_read", "fp32", 1, nbytes=4 * 2**20)]
    t += [Task.of("host_copy", "bf16", 1, nbytes=mb * 2**20) for mb in (1, 2)]
    t += [Task.of("expert_ffn", "fp32", 1, tokens=n, **SHAPE) for n in (1, 2, 4, 8)]
    t += [Task.of("dense_gemm", "fp32", 1, in_features=64, out_features=128, tokens=n) for n in (1, 2, 4)]
    t += [Task.of("gate", "fp32", 1, in_features=64, out_features=8, top_k=2, tokens=n) for n in (1, 2, 4)]
    t += [Task.of("attention_prefill", "bf16", 1, tokens=n, **HEADS) for n in (8, 16, 32)]
    return t


def section_tasks() -> list[Task]:
    t = [Task.of("grouped_expert_ffn", "fp32", 1, num_experts=e, tokens=n, **SHAPE) for e in (1, 2, 4)
         for n in (1, 2, 4, 8)]
    t += [Task.of("attention_decode", "bf16", n, batch=b, context=c, **HEADS) for n in (1, 2) for b in (1, 2)
          for c in (16, 64)]
    return t


@pytest.fixture(scope="module")
def cal(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("sections") / "sec.yaml"
    points_path = points_path_for(out)
    result = run_tasks([*base_tasks(), *section_tasks()], points_path, device="cpu", device_name="test cpu",
                       budget=TINY_BUDGET, progress=False)
    write_profile(result.rows, ENV, out=out, name="sec", threads=1, points_path=points_path, quiet=True)
    return out, read_points(points_path)


def expert(dtype: str = "fp32") -> ExpertShape:
    return ExpertShape(weight_dtype=dtype, act_dtype=dtype, **SHAPE)


# ---------------------------------------------------------------- grouped expert calls


def test_grouped_lookup_returns_the_measured_grid(cal):
    out, points = cal
    p = load_profile(out)
    grouped = [r for r in points if r["op"] == "grouped_expert_ffn"]
    assert len(grouped) == 12
    for r in grouped:
        got = p.grouped_expert_ffn_s(tokens=[int(r["tokens"])] * int(r["num_experts"]), shape=expert())
        assert got == pytest.approx(float(r["median_s"]), rel=1e-9)
    assert p.extrapolated_counts() == {}
    assert p.operations.grouped_expert_ffn.fit_error.num_points == 12  # leave-one-out along each row


def test_grouped_lookup_uses_active_experts_and_mean_tokens(cal):
    p = load_profile(cal[0])
    assert p.grouped_expert_ffn_s(tokens=[0, 1, 3, 0], shape=expert()) == p.grouped_expert_ffn_s(
        tokens=[2, 2], shape=expert())
    assert p.grouped_expert_ffn_s(tokens=[0, 0], shape=expert()) == 0.0
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        p.grouped_expert_ffn_s(tokens=[-1], shape=expert())


def test_grouped_lookup_outside_the_grid_follows_the_roofline_and_is_counted(cal):
    p = load_profile(cal[0])
    model = p.operations.grouped_expert_ffn
    edge = p.grouped_expert_ffn_s(tokens=[8] * 4, shape=expert())
    beyond = p.grouped_expert_ffn_s(tokens=[8] * 8, shape=expert())
    peak, bw = p.gpu.peak_tflops["fp32"] * 1e12, p.gpu.memory_bandwidth_gbps * 1e9
    s = expert()

    def roof(e: int, t: int) -> float:
        return float(model.extrapolation.roofline_s(e * s.flops(t), e * s.bytes_moved(t), peak, bw))

    assert beyond == pytest.approx(edge * roof(8, 8) / roof(4, 8), rel=1e-9)
    assert p.extrapolated_counts() == {"grouped_expert_ffn": 1}
    other = ExpertShape(hidden=32, ffn=64, num_matrices=3, weight_dtype="fp32", act_dtype="fp32")
    assert p.grouped_expert_ffn_s(tokens=[2, 2], shape=other) == pytest.approx(
        float(model.extrapolation.roofline_s(2 * other.flops(2), 2 * other.bytes_moved(2), peak, bw)))
    assert p.extrapolated_counts() == {"grouped_expert_ffn": 2}


def test_without_a_grouped_measurement_the_lookup_is_the_sum_of_single_calls():
    p = load_profile("h100-80gb")
    s = ExpertShape(hidden=2048, ffn=1024, num_matrices=3, weight_dtype="bf16", act_dtype="bf16")
    tokens = np.array([3, 0, 7, 1])
    assert p.grouped_expert_ffn_s(tokens=tokens, shape=s) == pytest.approx(
        float(np.sum(p.expert_ffn_s(tokens=tokens, shape=s))), rel=1e-12)


def test_grouped_summary_compares_with_the_sum_of_single_calls(cal):
    p = load_profile(cal[0])
    ratios = p.provenance["fits"]["grouped_expert_ffn"]["grouped_over_sum_of_single_calls"]
    points = {(r["op"], r.get("num_experts"), r["tokens"]): float(r["median_s"]) for r in cal[1]
              if r["op"] in ("grouped_expert_ffn", "expert_ffn")}
    grouped, single = points[("grouped_expert_ffn", "4", "8")], points[("expert_ffn", "", "8")]
    assert ratios["4x8"] == pytest.approx(grouped / (4 * single), abs=1e-3)


# ---------------------------------------------------------------- CPU attention by threads


def test_cpu_attention_is_stored_per_thread_count_and_read_back(cal):
    out, points = cal
    p = load_profile(out)
    assert p.cpu_attention_threads == [1, 2]
    shape = AttentionShape(num_heads=2, qk_head_dim=16, v_head_dim=16, kv_bytes_per_token=2 * 1 * 16 * 2.0)
    for r in points:
        if r["op"] != "attention_decode":
            continue
        n = int(r["threads"])
        row = next(x for x in p.operations.cpu_attention_decode.rows if x.threads == n)
        got = p.cpu_attention_decode_s(context_tokens=[int(r["context"])] * int(r["batch"]), shape=shape, threads=n)
        assert abs(got / float(r["median_s"]) - 1) <= row.fit_error.max_rel_error * 1.001 + 1e-4
    assert p.cpu_attention_decode_s(context_tokens=[16], shape=shape, threads=3) is None
    assert load_profile("h100-80gb").cpu_attention_decode_s(context_tokens=[16], shape=shape, threads=1) is None
    assert p.extrapolated_counts() == {}
    p.cpu_attention_decode_s(context_tokens=[4096], shape=shape, threads=1)
    assert p.extrapolated_counts() == {"cpu_attention_decode": 1}


# ---------------------------------------------------------------- attention fits


def _attention_rows(op: str, layouts: list[tuple[int, int, int]], sizes: list[dict[str, int]],
                    seconds) -> list[dict[str, str]]:
    from calibrate.measure import POINT_COLUMNS

    rows = []
    for hq, hkv, d in layouts:
        for size in sizes:
            r = {c: "" for c in POINT_COLUMNS}
            r.update({"op": op, "dtype": "bf16", "threads": "1", "num_heads": str(hq), "num_kv_heads": str(hkv),
                      "head_dim": str(d), **{k: str(v) for k, v in size.items()}})
            r["median_s"] = repr(seconds(hq, hkv, d, **size))
            rows.append(r)
    return rows


def test_prefill_efficiency_table_fits_a_length_dependent_rate_across_head_counts():
    """Synthetic prefill: 10 us + FLOPs at an efficiency that doubles from 32 to 1024 tokens, the same for
    MHA and GQA of one head dim: the efficiency table is exact where one roofline is not."""
    from calibrate.fit import attention_shape_of
    from calibrate.fit_sections import prefill_efficiency_table
    from sim.profile import EfficiencyTableModel

    peak, bw = 1e12, 1e11
    eff = {32: 0.1, 64: 0.12, 128: 0.14, 256: 0.16, 512: 0.18, 1024: 0.2}

    def seconds(hq, hkv, d, tokens):
        shape = AttentionShape(num_heads=hq, qk_head_dim=d, v_head_dim=d, kv_bytes_per_token=2 * hkv * d * 2.0)
        return 1e-5 + float(shape.prefill_flops(tokens, 0)) / (peak * eff[tokens])

    rows = _attention_rows("attention_prefill", [(16, 16, 128), (32, 4, 128)], [{"tokens": n} for n in eff], seconds)
    entry, summary = prefill_efficiency_table(rows, peak, bw)
    assert summary["efficiency_table"]["max_rel_error"] < 0.01  # efficiencies are stored to 4 digits
    assert summary["single_roofline"]["mean_rel_error"] > 0.02  # what the old single roofline could do
    model = EfficiencyTableModel(**entry)
    assert [r.qk_head_dim for r in model.rows] == [128]
    assert model.rows[0].compute_efficiency == pytest.approx(list(eff.values()), rel=0.02)
    r = rows[3]
    shape = attention_shape_of(r)
    s, outside = model.seconds_at(np.array([256.0]), shape.prefill_flops(256, 0), shape.prefill_bytes(256, 0),
                                  peak, bw, 128)
    assert s[0] == pytest.approx(float(r["median_s"]), rel=0.01) and outside == 0
    _, outside = model.seconds_at(np.array([2048.0]), shape.prefill_flops(2048, 0), shape.prefill_bytes(2048, 0),
                                  peak, bw, 128)
    assert outside == 1
    _, outside = model.seconds_at(np.array([256.0]), 1.0, 1.0, peak, bw, 64)  # unmeasured head dim
    assert outside == 1


def test_decode_gets_one_roofline_per_head_dim():
    from calibrate.fit_sections import decode_by_head_dim

    peak, bw = 1e12, 1e11

    def seconds(hq, hkv, d, batch, context):
        shape = AttentionShape(num_heads=hq, qk_head_dim=d, v_head_dim=d, kv_bytes_per_token=2 * hkv * d * 2.0)
        me = 0.5 if d == 128 else 0.05  # the small head dim reads its KV 10x less efficiently
        return 2e-5 + batch * float(shape.decode_bytes(context)) / (bw * me)

    sizes = [{"batch": b, "context": c} for b in (1, 4, 16) for c in (256, 1024, 4096)]
    rows = _attention_rows("attention_decode", [(16, 16, 128), (8, 2, 64)], sizes, seconds)
    entry, summary = decode_by_head_dim(rows, peak, bw)
    assert [r["qk_head_dim"] for r in entry["rows"]] == [64, 128]
    assert summary["roofline"]["max_rel_error"] < 0.02
    assert [r["memory_efficiency"] for r in entry["rows"]] == pytest.approx([0.05, 0.5], rel=0.02)


# ---------------------------------------------------------------- collectives


def _profile_with_collectives(rows: list[dict[str, Any]]) -> HardwareProfile:
    data = load_profile("h100-80gb").model_dump()
    data["collectives"] = {"backend": "nccl", "provenance": "test", "rows": rows}
    return HardwareProfile.model_validate(data)


def test_collective_lookup_interpolates_log_log_and_extrapolates_by_bandwidth():
    p = _profile_with_collectives([{"kind": "all_to_all", "num_gpus": 8, "nbytes": [1000, 4000],
                                    "latency_s": [1e-5, 4e-5]}])
    assert p.collective_s("all_to_all", 2000, 8) == pytest.approx(2e-5)  # log-log midpoint
    assert p.collective_s("all_to_all", 8000, 8) == pytest.approx(8e-5)  # the largest size's bandwidth
    assert p.collective_s("all_to_all", 500, 8) == pytest.approx(1e-5)  # latency floor
    assert p.collective_s("all_to_all", 0, 8) == 0.0
    assert p.extrapolated_counts() == {"collective:all_to_all": 2}
    assert list(p.collective_s("all_to_all", np.array([1000, 4000]), 8)) == pytest.approx([1e-5, 4e-5])
    assert p.collective_s("all_to_all", 2000, 4) is None  # no measurement on 4 GPUs: no guess
    assert p.collective_s("all_reduce", 2000, 8) is None
    assert load_profile("h100-80gb").collective_s("all_reduce", 2000, 8) is None
    with pytest.raises(ValueError, match="unknown collective 'broadcast'"):
        p.collective_s("broadcast", 2000, 8)


def test_collectives_section_needs_rows_or_a_reason(tmp_path):
    from sim.errors import ProfileError
    from sim.profile import parse_profile

    data = load_profile("h100-80gb").model_dump()
    data["collectives"] = {"backend": "none", "provenance": "not measured"}
    with pytest.raises(ProfileError, match="collectives: give rows, or say in 'skipped' why there are none"):
        parse_profile(yaml.safe_dump(data), origin="x.yaml")


def test_gloo_collectives_measure_and_load_into_a_profile():
    """The measuring code on the CPU: 2 processes, gloo, one size; the rows become a loadable section."""
    from calibrate.collectives import measure_collectives
    from calibrate.fit_sections import collectives_section

    rows = measure_collectives(backend="gloo", world_size=2, sizes_bytes=[4096], repeats=3, warmup=1,
                               device_name="test cpu")
    assert [(r["op"], r["num_ranks"], r["nbytes"]) for r in rows] == [("all_to_all", "2", "4096"),
                                                                      ("all_reduce", "2", "4096")]
    assert all(float(r["median_s"]) > 0 and int(r["num_samples"]) >= 1 for r in rows)
    section = collectives_section(rows, backend="gloo", provenance="test")
    p = _profile_with_collectives(section["rows"])
    for r in rows:
        assert p.collective_s(r["op"], 4096, 2) == pytest.approx(float(r["median_s"]))


def test_collectives_plan_says_why_they_are_skipped():
    from calibrate.collectives import plan_collectives

    backend, sizes, why = plan_collectives("auto", device="cpu", gpu_count=0)
    assert (backend, sizes) == (None, []) and why.startswith("skipped: no GPU")
    assert plan_collectives("auto", device="cuda", gpu_count=1)[2] == (
        "skipped: 1 GPU visible; all-to-all / all-reduce need more than one")
    assert plan_collectives("auto", device="cuda", gpu_count=8)[:2] == ("nccl", [2, 4, 8])
    assert plan_collectives("auto", device="cuda", gpu_count=6)[:2] == ("nccl", [2, 4, 6])
    assert plan_collectives("gloo", device="cpu", gpu_count=0)[:2] == ("gloo", [2])
    with pytest.raises(CalibrationError, match="--collectives nccl: needs --device cuda and 2\\+ GPUs"):
        plan_collectives("nccl", device="cpu", gpu_count=0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_collectives_on_two_gpus():  # pragma: no cover - needs GPUs
    from calibrate.collectives import measure_collectives

    rows = measure_collectives(backend="nccl", world_size=2, sizes_bytes=[1 << 20], repeats=3, warmup=1,
                               device_name="gpu")
    assert {r["op"] for r in rows} == {"all_to_all", "all_reduce"}
    assert all(float(r["median_s"]) > 0 for r in rows)


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/gpu_profiling")
def test_imported_nccl_rows_are_the_source_medians_in_seconds():
    import pandas as pd

    from calibrate.importers.aiconfigurator import GPUS, nccl_file

    nccl = pd.read_parquet(nccl_file(SHARED, GPUS["h100"]))
    src = nccl[(nccl.op_name == "alltoall") & (nccl.num_gpus == 8) & (nccl.nccl_dtype == "half")
               & (nccl.message_size == 1048576)]
    p = load_profile("h100-80gb-aiconfigurator")
    assert p.collectives.backend == "nccl" and "Apache-2.0" in p.collectives.provenance
    assert p.collective_s("all_to_all", 1048576 * 2, 8) == pytest.approx(float(src.latency.median()) * 1e-3,
                                                                         rel=1e-4)
    assert {(k, n) for k, n in p.collective_kinds if k in ("all_to_all", "all_reduce")} == {
        (k, n) for k in ("all_to_all", "all_reduce") for n in (2, 4, 8)}


# ---------------------------------------------------------------- moesim calibrate wiring


SMALL_PLAN = base_tasks() + section_tasks()[:2] + [t for t in section_tasks() if t.op == "attention_decode"
                                                    and t.threads == 1]


@pytest.fixture
def small_plan(monkeypatch):
    """``moesim calibrate`` with a tiny plan (the CLI, points file, fits and profile are real)."""
    import calibrate.measure
    import calibrate.validate

    monkeypatch.setattr(calibrate.measure, "build_plan", lambda *a, **k: SMALL_PLAN)
    monkeypatch.setattr(calibrate.validate, "calibration_tasks", lambda *a, **k: [])
    monkeypatch.setattr("calibrate.cli.Budget", lambda **k: TINY_BUDGET, raising=False)
    import calibrate.timing

    monkeypatch.setattr(calibrate.timing, "Budget", lambda **k: TINY_BUDGET)


FAKE_OVERHEADS = {"layer_overhead": {"fixed_s": 1e-4, "per_token_s": 1e-6, "per_sequence_s": 0.0},
                  "expert_overhead": {"fixed_s": 2e-5, "per_token_s": 0.0},
                  "iteration_overhead": {"fixed_s": 3e-4, "per_token_s": 0.0, "per_sequence_s": 0.0},
                  "load_interference": {"s_per_byte": 1e-12}}


def test_calibrate_measures_overheads_and_says_collectives_were_skipped(small_plan, monkeypatch, tmp_path, capsys):
    import calibrate.overhead

    calls = []

    def fake(spec, profile, **kw):
        assert not kw.get("fit_kernel_scale", False)  # a general profile keeps the whole expert table
        calls.append((spec.name, profile.has_overheads))
        return FAKE_OVERHEADS, {"method": "fake"}

    monkeypatch.setattr(calibrate.overhead, "measure_overheads", fake)
    out = tmp_path / "c.yaml"
    assert main(["calibrate", "--out", str(out), "--no-progress"]) == 0
    p = load_profile(out)
    assert calls == [("tiny-mixtral", False)]  # measured against the kernels-only profile
    assert p.operations.layer_overhead.fixed_s == 1e-4 and p.operations.load_interference.s_per_byte == 1e-12
    assert p.provenance["overheads"]["model"].startswith("tiny-mixtral")
    assert p.collectives.skipped.startswith("skipped: no GPU") and p.collective_kinds == []
    # a rerun that measures nothing new reuses the saved overheads instead of measuring again
    assert main(["calibrate", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert len(calls) == 1 and load_profile(out).operations.expert_overhead.fixed_s == 2e-5
    assert "overheads: reused from" in capsys.readouterr().err


def test_calibrate_gloo_collectives_land_in_the_profile(small_plan, tmp_path):
    out = tmp_path / "g.yaml"
    assert main(["calibrate", "--out", str(out), "--no-progress", "--no-overheads", "--collectives", "gloo"]) == 0
    p = load_profile(out)
    assert p.collectives.backend == "gloo" and "NOT a GPU interconnect" in p.collectives.provenance
    assert {(k, n) for k, n in p.collective_kinds} == {("all_to_all", 2), ("all_reduce", 2)}
    assert p.provenance["overheads"] == "skipped: --no-overheads"
    measured = [r for r in read_points(points_path_for(out)) if r["op"] == "all_reduce"]
    assert p.collective_s("all_reduce", int(measured[0]["nbytes"]), 2) == pytest.approx(float(measured[0]["median_s"]))


def test_interrupted_calibrate_keeps_points_and_resume_finishes(small_plan, monkeypatch, tmp_path, capsys):
    import calibrate.measure

    real = calibrate.measure.measure_group
    groups = []

    def interrupt_third(group, *a, **k):
        groups.append(len(group))
        if len(groups) == 3:
            raise KeyboardInterrupt
        return real(group, *a, **k)

    monkeypatch.setattr(calibrate.measure, "measure_group", interrupt_third)
    out = tmp_path / "r.yaml"
    assert main(["calibrate", "--out", str(out), "--no-progress", "--no-overheads"]) == 130
    err = capsys.readouterr().err
    kept = groups[0] + groups[1]  # the points of the two groups measured before the interrupt
    assert kept >= 2 and f"moesim: interrupted: {kept} points kept in" in err and "--resume" in err
    assert not out.exists() and len(read_points(points_path_for(out))) == kept
    monkeypatch.setattr(calibrate.measure, "measure_group", real)
    assert main(["calibrate", "--out", str(out), "--no-progress", "--no-overheads", "--resume"]) == 0
    rows = read_points(points_path_for(out))
    assert len(rows) == len(SMALL_PLAN)
    assert len({(r["op"], r["tokens"], r["nbytes"], r["threads"], r["num_experts"], r["batch"], r["context"])
                for r in rows}) == len(rows)  # nothing measured twice
    assert "resumed from" in capsys.readouterr().err
    assert len(json.loads(points_path_for(out).with_name("r.env.json").read_text())["runs"]) == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--resume"], "moesim: error: --resume: {points} does not exist, so there is nothing to resume; run without "
                   "--resume to start\n"),
    (["--resume", "--fresh"], "moesim: error: --resume and --fresh contradict each other: --fresh discards the "
                              "points --resume continues\n"),
])
def test_resume_errors_are_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "x.yaml"
    assert main(["calibrate", "--out", str(out), *argv]) == 2
    assert capsys.readouterr().err == message.format(points=points_path_for(out))


def test_an_older_points_file_is_read_and_upgraded_on_resume(tmp_path):
    import csv

    from calibrate.measure import LATER_COLUMNS, POINT_COLUMNS

    path = tmp_path / "old.points.csv"
    run_tasks(base_tasks()[:3], path, device="cpu", device_name="test cpu", budget=TINY_BUDGET, progress=False)
    rows = read_points(path)
    # The first shipped files lack every later column; files from before ``streams`` lack only that one.
    for older in ([c for c in POINT_COLUMNS if c not in LATER_COLUMNS], [c for c in POINT_COLUMNS if c != "streams"]):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=older)
            w.writeheader()
            w.writerows({c: r[c] for c in older} for r in rows)
        assert read_points(path) == rows
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=older)
        w.writeheader()
        w.writerows({c: r[c] for c in older} for r in rows)
    assert read_points(path) == rows
    result = run_tasks(base_tasks()[:4], path, device="cpu", device_name="test cpu", budget=TINY_BUDGET,
                       progress=False)
    assert (result.skipped, result.measured) == (3, 1)
    with path.open() as fh:
        assert next(csv.reader(fh)) == list(POINT_COLUMNS)
    assert len(read_points(path)) == 4


# ---------------------------------------------------------------- HTML pages and the range warning


def test_profile_show_and_compare_write_html_with_points_and_curves(cal, tmp_path, capsys):
    out, _ = cal
    page = tmp_path / "show.html"
    assert main(["profile", "show", str(out), "--html", str(page)]) == 0
    shown = capsys.readouterr().out
    assert "grouped_expert_ffn grouped table: 1 shape(s), experts 1..4 x tokens 1..8" in shown
    assert "cpu_attention      1 thread(s)" in shown and "cpu_attention      2 thread(s)" in shown
    assert "collectives        not measured (no collectives run recorded)" in shown
    text = page.read_text()
    for op in ("expert_ffn", "attention_prefill", "attention_decode", "grouped_expert_ffn", "cpu_attention_decode",
               "host_to_device"):
        assert f"<img alt='{op}' src='data:image/png;base64," in text
    page2 = tmp_path / "cmp.html"
    assert main(["profile", "compare", "h100-80gb-aiconfigurator", str(out), "--html", str(page2)]) == 0
    text2 = page2.read_text()
    assert "A: h100-80gb-aiconfigurator" in text2 and "B: sec" in text2 and "<img alt='collectives'" in text2


def test_simulation_summary_warns_once_when_outside_the_measured_range(write_scenario, tiny, capsys):
    from sim.cli import print_summary
    from sim.engine.simulation import simulate
    from sim.metrics import summarize
    from sim.scenario import load_scenario

    tiny["hardware"]["profile"] = "h100-80gb-aiconfigurator"  # OLMoE's LM head is not a measured GEMM shape
    summary = summarize(simulate(load_scenario(write_scenario(tiny))))
    outside = summary["profile_outside_measured"]
    assert "dense_gemm" in outside and all(n > 0 for n in outside.values())
    print_summary(summary)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning")]
    assert len(lines) == 1 and "outside its measured range for " in lines[0] and "dense_gemm (" in lines[0]
    tiny["hardware"]["profile"] = "h100-80gb"  # a datasheet roofline claims no measured range
    summary = summarize(simulate(load_scenario(write_scenario(tiny))))
    assert summary["profile_outside_measured"] == {}
