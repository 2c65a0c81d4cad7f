"""Hardware profiles: roofline arithmetic by hand, the YAML format's errors, the shipped profiles.

The toy profile has round numbers: 1 TFLOP/s bf16 (2 fp8), 100 GB/s HBM, efficiencies 1, 1 µs per call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sim.errors import ProfileError
from sim.profile import OPERATIONS, HardwareProfile, load_profile, parse_profile, shipped_profiles
from sim.work import AttentionShape, ExpertShape, GemmShape

GEMM = GemmShape(in_features=1000, out_features=1000, weight_dtype="bf16")  # 2e6 FLOP/token, 2 MB weights, 4 kB/token
EXPERT = ExpertShape(hidden=1000, ffn=1000, num_matrices=2, weight_dtype="bf16")  # 4e6 FLOP/token, 4 MB, 6 kB/token
ATTN = AttentionShape(num_heads=1, qk_head_dim=50, v_head_dim=50, kv_bytes_per_token=1000)  # 200 FLOP/pair


def roofline(fixed_s: float = 1e-6, compute_efficiency: float = 1.0) -> dict[str, Any]:
    return {"kind": "roofline", "fixed_s": fixed_s, "compute_efficiency": compute_efficiency,
            "memory_efficiency": 1.0, "fit_error": None}


def toy_profile_dict() -> dict[str, Any]:
    return {
        "name": "toy",
        "source": "datasheet",
        "provenance": {"summary": "round numbers for tests"},
        "gpu": {"name": "toy", "memory_bytes": 1e10, "peak_tflops": {"bf16": 1.0, "fp8": 2.0},
                "memory_bandwidth_gbps": 100.0},
        "links": {
            "host_to_device": {"bandwidth_gbps": 10.0, "latency_s": 1e-3, "pageable_bandwidth_factor": 0.5,
                               "num_copy_engines": 1},
            "device_to_host": {"bandwidth_gbps": 5.0, "latency_s": 1e-3, "pageable_bandwidth_factor": 0.25,
                               "num_copy_engines": 1},
            "gpu_to_gpu": {"bandwidth_gbps": 100.0, "latency_s": 1e-5},
            "node_to_node": {"bandwidth_gbps": 10.0, "latency_s": 1e-4},
        },
        "cpu": {"name": "toy cpu", "cores": 8, "peak_gflops": 100.0, "memory_bandwidth_gbps": 10.0},
        "operations": {
            "expert_ffn": roofline(),
            "dense_gemm": roofline(),
            "attention_prefill": roofline(),
            "attention_decode": roofline(),
            "gate": roofline(fixed_s=5e-6),
        },
    }


@pytest.fixture
def toy_profile() -> HardwareProfile:
    return HardwareProfile.model_validate(toy_profile_dict())


def write_yaml(tmp_path: Path, data: dict[str, Any], name: str = "toy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- roofline arithmetic


def test_gemm_one_token_is_memory_bound(toy_profile):
    """2e6 FLOP -> 2 µs; 2.004 MB at 100 GB/s -> 20.04 µs; + 1 µs fixed."""
    assert toy_profile.dense_gemm_s(tokens=1, shape=GEMM) == pytest.approx(21.04e-6)


def test_gemm_many_tokens_is_compute_bound(toy_profile):
    """1000 tokens: 2e9 FLOP -> 2 ms beats 6 MB -> 60 µs; + 1 µs fixed."""
    assert toy_profile.dense_gemm_s(tokens=1000, shape=GEMM) == pytest.approx(2.001e-3)


def test_gemm_crossover_between_10_and_11_tokens(toy_profile):
    """10 tokens: memory 20.4 µs > compute 20 µs. 11 tokens: compute 22 µs > memory 20.44 µs."""
    assert toy_profile.dense_gemm_s(tokens=10, shape=GEMM) == pytest.approx(21.4e-6)
    assert toy_profile.dense_gemm_s(tokens=11, shape=GEMM) == pytest.approx(23.0e-6)


def test_compute_efficiency_scales_only_the_compute_side():
    data = toy_profile_dict()
    data["operations"]["dense_gemm"] = roofline(compute_efficiency=0.5)
    profile = HardwareProfile.model_validate(data)
    assert profile.dense_gemm_s(tokens=1000, shape=GEMM) == pytest.approx(4.001e-3)
    assert profile.dense_gemm_s(tokens=1, shape=GEMM) == pytest.approx(21.04e-6)  # still memory-bound


def test_expert_ffn_hand_computed(toy_profile):
    """1 token: 4 MB weights + 6 kB activations at 100 GB/s = 40.06 µs, + 1 µs."""
    assert toy_profile.expert_ffn_s(tokens=1, shape=EXPERT) == pytest.approx(41.06e-6)


def test_expert_with_no_tokens_costs_exactly_zero(toy_profile):
    assert toy_profile.expert_ffn_s(tokens=0, shape=EXPERT) == 0.0
    assert toy_profile.expert_ffn_s(tokens=np.array([0, 3, 0]), shape=EXPERT)[[0, 2]].tolist() == [0.0, 0.0]


def test_lookups_are_vectorised_and_keep_the_shape(toy_profile):
    tokens = np.array([[0, 1], [10, 1000]])
    got = toy_profile.dense_gemm_s(tokens=tokens, shape=GEMM)
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, [[0.0, 21.04e-6], [21.4e-6, 2.001e-3]])


def test_scalar_in_gives_a_float_out(toy_profile):
    got = toy_profile.dense_gemm_s(tokens=1, shape=GEMM)
    assert isinstance(got, float) and np.ndim(got) == 0


def test_fp8_weights_and_activations_use_the_fp8_peak(toy_profile):
    """2e9 FLOP at 2 TFLOP/s = 1 ms (bytes: 1 MB + 2 MB = 30 µs)."""
    fp8 = GemmShape(in_features=1000, out_features=1000, weight_dtype="fp8", act_dtype="fp8")
    assert toy_profile.dense_gemm_s(tokens=1000, shape=fp8) == pytest.approx(1.001e-3)


def test_fp8_weights_with_bf16_activations_multiply_in_bf16(toy_profile):
    w8a16 = GemmShape(in_features=1000, out_features=1000, weight_dtype="fp8", act_dtype="bf16")
    assert toy_profile.dense_gemm_s(tokens=1000, shape=w8a16) == pytest.approx(2.001e-3)


def test_gate_uses_its_own_fixed_cost(toy_profile):
    """Router 1000 -> 8 over 100 tokens: 1.6 MFLOP = 1.6 µs; 16 kB + 201.6 kB = 2.176 µs; + 5 µs."""
    router = GemmShape(in_features=1000, out_features=8, weight_dtype="bf16")
    assert toy_profile.gate_s(tokens=100, shape=router) == pytest.approx(7.176e-6)
    assert toy_profile.gate_s(tokens=0, shape=router) == 0.0


def test_attention_prefill_per_sequence_broadcasts(toy_profile):
    """100 new, no context: 200 x 5050 FLOP = 1.01 µs < 120 kB = 1.2 µs -> 2.2 µs.
    100 new over 1000 context: 200 x 105050 = 21.01 µs > 1.12 MB = 11.2 µs -> 22.01 µs."""
    got = toy_profile.attention_prefill_s(new_tokens=100, context_tokens=np.array([0, 1000]), shape=ATTN)
    np.testing.assert_allclose(got, [2.2e-6, 22.01e-6])
    assert toy_profile.attention_prefill_s(new_tokens=0, context_tokens=500, shape=ATTN) == 0.0


def test_attention_decode_is_one_call_for_the_batch(toy_profile):
    """Contexts 99 and 199: 60 kFLOP = 0.06 µs; 100.2 kB + 200.2 kB = 3.004 µs; one 1 µs fixed cost, not two."""
    got = toy_profile.attention_decode_s(context_tokens=np.array([99, 199]), shape=ATTN)
    assert isinstance(got, float)
    assert got == pytest.approx(4.004e-6)
    assert toy_profile.attention_decode_s(context_tokens=np.array([], dtype=int), shape=ATTN) == 0.0


def test_negative_sizes_are_a_bug(toy_profile):
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        toy_profile.expert_ffn_s(tokens=np.array([1, -1]), shape=EXPERT)


@given(a=st.integers(0, 100_000), b=st.integers(0, 100_000))
def test_more_tokens_never_take_less_time(a, b):
    profile = load_profile("h100-80gb")
    lo, hi = sorted((a, b))
    assert profile.expert_ffn_s(tokens=lo, shape=EXPERT) <= profile.expert_ffn_s(tokens=hi, shape=EXPERT)
    if hi > 0:
        assert profile.expert_ffn_s(tokens=hi, shape=EXPERT) > profile.operations.expert_ffn.fixed_s


# ---------------------------------------------------------------- copies and links


def test_h2d_pinned_and_pageable(toy_profile):
    """1 GB at 10 GB/s + 1 ms = 0.101 s; pageable at half the bandwidth = 0.201 s."""
    assert toy_profile.h2d_copy_s(nbytes=1e9) == pytest.approx(0.101)
    assert toy_profile.h2d_copy_s(nbytes=1e9, pinned=False) == pytest.approx(0.201)
    np.testing.assert_allclose(toy_profile.h2d_copy_s(nbytes=np.array([0.0, 1e9, 2e9])), [0.0, 0.101, 0.201])


def test_d2h_gpu_to_gpu_and_node_to_node(toy_profile):
    assert toy_profile.d2h_copy_s(nbytes=1e9) == pytest.approx(0.201)
    assert toy_profile.d2h_copy_s(nbytes=1e9, pinned=False) == pytest.approx(0.801)
    assert toy_profile.gpu_to_gpu_s(nbytes=1e9) == pytest.approx(0.01001)
    assert toy_profile.node_to_node_s(nbytes=1e9) == pytest.approx(0.1001)
    assert toy_profile.node_to_node_s(nbytes=0) == 0.0


def test_with_links_overrides_one_bandwidth_and_leaves_the_original(toy_profile):
    faster = toy_profile.with_links(host_to_device_gbps=20.0)
    assert faster.h2d_copy_s(nbytes=1e9) == pytest.approx(0.051)
    assert toy_profile.h2d_copy_s(nbytes=1e9) == pytest.approx(0.101)
    assert faster.gpu_to_gpu_s(nbytes=1e9) == toy_profile.gpu_to_gpu_s(nbytes=1e9)


# ---------------------------------------------------------------- table kind


def table_profile(rows: list[dict[str, Any]]) -> HardwareProfile:
    data = toy_profile_dict()
    data["source"] = "measured"
    data["operations"]["dense_gemm"] = {
        "kind": "table",
        "fit_error": {"median_rel_error": 0.02, "p95_rel_error": 0.05, "max_rel_error": 0.08, "num_points": 3},
        "extrapolation": {"fixed_s": 1e-6, "compute_efficiency": 1.0, "memory_efficiency": 1.0},
        "rows": rows,
    }
    return HardwareProfile.model_validate(data)


GEMM_KEY = {"in_features": 1000, "out_features": 1000, "weight_dtype": "bf16", "act_dtype": "bf16"}


def test_table_interpolates_log_log_and_extrapolates_along_the_roofline():
    """Grid 1/10/100 tokens -> 10/20/100 µs. sqrt(10) tokens: geometric mean of 10 and 20 µs.
    1000 tokens: 100 µs x roofline(1000)/roofline(100) = 100 µs x 2001 µs / 201 µs."""
    profile = table_profile([{"shape": GEMM_KEY, "tokens": [1, 10, 100], "latency_s": [1e-5, 2e-5, 1e-4]}])
    got = profile.dense_gemm_s(tokens=np.array([0, 10, np.sqrt(10), 1000]), shape=GEMM)
    np.testing.assert_allclose(got, [0.0, 2e-5, np.sqrt(2e-10), 1e-4 * 2001 / 201])
    assert profile.extrapolated_counts() == {"dense_gemm": 1}


def test_table_below_the_grid_scales_the_first_point_by_the_roofline():
    """Grid starts at 10 tokens (20 µs); 1 token: 20 µs x roofline(1)/roofline(10) = 20 µs x 21.04/21.4."""
    profile = table_profile([{"shape": GEMM_KEY, "tokens": [10, 100], "latency_s": [2e-5, 1e-4]}])
    assert profile.dense_gemm_s(tokens=1, shape=GEMM) == pytest.approx(2e-5 * 21.04 / 21.4)
    assert profile.extrapolated_counts() == {"dense_gemm": 1}


def test_table_without_the_shape_falls_back_to_the_roofline_and_counts_it():
    profile = table_profile([{"shape": GEMM_KEY, "tokens": [1, 10], "latency_s": [1e-5, 2e-5]}])
    other = GemmShape(in_features=1000, out_features=1000, weight_dtype="fp8", act_dtype="bf16")
    # 2e9 FLOP at the bf16 peak = 2 ms; + 1 µs
    assert profile.dense_gemm_s(tokens=np.array([1000, 0]), shape=other)[0] == pytest.approx(2.001e-3)
    assert profile.extrapolated_counts() == {"dense_gemm": 1}


def test_table_shape_with_a_missing_field_is_a_profile_error(tmp_path):
    data = table_profile([{"shape": GEMM_KEY, "tokens": [1], "latency_s": [1e-5]}]).model_dump()
    del data["operations"]["dense_gemm"]["rows"][0]["shape"]["act_dtype"]
    with pytest.raises(ProfileError, match=r"operations: dense_gemm.rows\[0\].shape has keys"):
        load_profile(write_yaml(tmp_path, data))


def test_table_tokens_must_increase(tmp_path):
    data = table_profile([{"shape": GEMM_KEY, "tokens": [1], "latency_s": [1e-5]}]).model_dump()
    data["operations"]["dense_gemm"]["rows"][0].update(tokens=[10, 1], latency_s=[1e-5, 2e-5])
    with pytest.raises(ProfileError, match=r"operations.dense_gemm.rows\[0\]: tokens must be positive and strictly"):
        load_profile(write_yaml(tmp_path, data))


def test_attention_has_no_token_table_kind(tmp_path):
    data = toy_profile_dict()
    data["operations"]["attention_decode"]["kind"] = "table"
    with pytest.raises(ProfileError, match="operations.attention_decode.kind: unknown kind 'table'; expected one of: "
                                           "'roofline', 'efficiency_table', 'roofline_by_head_dim'$"):
        load_profile(write_yaml(tmp_path, data))


# ---------------------------------------------------------------- errors


def test_typo_key_names_file_key_path_and_choices(tmp_path):
    data = toy_profile_dict()
    data["operations"]["expert_ffn"]["fixd_s"] = data["operations"]["expert_ffn"].pop("fixed_s")
    path = write_yaml(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value) == (
        f"{path}: operations.expert_ffn.fixd_s: unknown key; "
        "expected one of: fixed_s, compute_efficiency, memory_efficiency, kind, fit_error"
    )


def test_typo_top_level_key(tmp_path):
    data = toy_profile_dict()
    data["opertions"] = data.pop("operations")
    with pytest.raises(ProfileError, match=r"toy.yaml: opertions: unknown key; expected one of: name, source"):
        load_profile(write_yaml(tmp_path, data))


def test_wrong_type_names_key_and_value(tmp_path):
    data = toy_profile_dict()
    data["cpu"]["cores"] = "many"
    with pytest.raises(ProfileError, match=r"toy.yaml: cpu.cores: Input should be a valid integer.*\(got 'many'\)"):
        load_profile(write_yaml(tmp_path, data))


def test_missing_operation(tmp_path):
    data = toy_profile_dict()
    del data["operations"]["gate"]
    with pytest.raises(ProfileError, match=r"toy.yaml: operations.gate: missing required key$"):
        load_profile(write_yaml(tmp_path, data))


def test_fit_error_key_is_required(tmp_path):
    data = toy_profile_dict()
    del data["operations"]["gate"]["fit_error"]
    with pytest.raises(ProfileError, match=r"operations.gate.fit_error: missing required key$"):
        load_profile(write_yaml(tmp_path, data))


def test_datasheet_profile_cannot_claim_a_fit(tmp_path):
    data = toy_profile_dict()
    data["operations"]["gate"]["fit_error"] = {
        "median_rel_error": 0.1, "p95_rel_error": 0.2, "max_rel_error": 0.3, "num_points": 5}
    with pytest.raises(ProfileError, match=r"fit_error must be null; it is set for \['gate'\]"):
        load_profile(write_yaml(tmp_path, data))


def test_efficiency_above_one_is_rejected(tmp_path):
    data = toy_profile_dict()
    data["operations"]["dense_gemm"]["compute_efficiency"] = 1.5
    with pytest.raises(ProfileError, match=r"operations.dense_gemm.compute_efficiency: .*less than or equal to 1"):
        load_profile(write_yaml(tmp_path, data))


def test_peak_for_an_unknown_dtype_name_is_rejected(tmp_path):
    data = toy_profile_dict()
    data["gpu"]["peak_tflops"]["bf61"] = 1.0
    with pytest.raises(ProfileError, match=r"gpu.peak_tflops: unknown dtype\(s\) \['bf61'\]"):
        load_profile(write_yaml(tmp_path, data))


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ngpu: [1\n")
    with pytest.raises(ProfileError, match=r"broken.yaml: invalid YAML at line 3"):
        load_profile(path)


def test_dtype_without_a_peak_lists_the_peaks(toy_profile):
    fp16 = GemmShape(in_features=10, out_features=10, weight_dtype="fp16", act_dtype="fp16")
    with pytest.raises(ProfileError, match=r"^profile 'toy': operations.dense_gemm has no peak for dtype 'fp16'; has: bf16, fp8$"):
        toy_profile.dense_gemm_s(tokens=1, shape=fp16)


def test_fp8_expert_on_a100_names_the_file():
    fp8 = ExpertShape(hidden=4096, ffn=14336, num_matrices=3, weight_dtype="fp8", act_dtype="fp8")
    with pytest.raises(ProfileError) as info:
        load_profile("a100-80gb").expert_ffn_s(tokens=4, shape=fp8)
    assert str(info.value) == (
        "a100-80gb.yaml: operations.expert_ffn has no peak for dtype 'fp8'; has: bf16, fp16, fp32, int8"
    )


def test_dtype_unknown_to_sim_work_is_a_profile_error(toy_profile):
    fp4 = GemmShape(in_features=10, out_features=10, weight_dtype="fp4")
    with pytest.raises(ProfileError, match=r"operations.dense_gemm: unknown dtype 'fp4'"):
        toy_profile.dense_gemm_s(tokens=1, shape=fp4)


def test_unknown_profile_name_lists_shipped_names():
    with pytest.raises(ProfileError) as info:
        load_profile("h100")
    assert str(info.value) == f"unknown profile 'h100'; shipped profiles: {', '.join(shipped_profiles())}"


def test_missing_file_lists_shipped_names(tmp_path):
    with pytest.raises(ProfileError, match=r"nope.yaml: cannot read profile .*shipped profiles: a100-40gb"):
        load_profile(tmp_path / "nope.yaml")


def test_load_by_path_as_str_or_path(tmp_path):
    path = write_yaml(tmp_path, toy_profile_dict())
    assert load_profile(path).name == load_profile(str(path)).name == "toy"


# ---------------------------------------------------------------- shipped profiles

# figure: (bf16 TFLOPS, HBM GB/s, memory GiB, NVLink GB/s one direction, pinned H2D GB/s)
DATASHEET = {
    "a100-40gb": (312.0, 1555.0, 40.0, 300.0, 25.6),
    "a100-80gb": (312.0, 2039.0, 80.0, 300.0, 25.6),
    "h100-80gb": (989.0, 3350.0, 80.0, 450.0, 51.2),
    "h200": (989.0, 4800.0, 141.0, 450.0, 51.2),
}


def test_shipped_names():
    assert set(DATASHEET) <= set(shipped_profiles())
    assert shipped_profiles() == sorted(shipped_profiles())


@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_shipped_profile_loads_with_every_operation(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.source == "datasheet"
    assert {"summary", "documents", "assumptions"} <= set(profile.provenance)
    for op in OPERATIONS:
        model = getattr(profile.operations, op)
        assert model.kind == "roofline" and model.fit_error is None
    bf16, hbm, gib, nvlink, h2d = DATASHEET[name]
    assert profile.describe() == {
        "name": name, "source": "datasheet", "gpu": profile.gpu.name, "memory_gib": gib,
        "peak_bf16_tflops": bf16, "hbm_gbps": hbm, "h2d_gbps": h2d,
    }
    assert profile.links.gpu_to_gpu.bandwidth_gbps == nvlink


def test_shipped_name_is_case_insensitive():
    assert load_profile("H100-80GB").name == "h100-80gb"


def test_h200_decodes_faster_than_h100_by_its_bandwidth():
    """A memory-bound decode step (big KV) scales with HBM bandwidth: 3350 / 4800, apart from the fixed cost."""
    shape = AttentionShape(num_heads=32, qk_head_dim=128, v_head_dim=128, kv_bytes_per_token=2 * 8 * 128 * 2)
    ctx = np.full(64, 4096)
    h100, h200 = load_profile("h100-80gb"), load_profile("h200")
    fixed = h100.operations.attention_decode.fixed_s
    ratio = (h200.attention_decode_s(context_tokens=ctx, shape=shape) - fixed) / (
        h100.attention_decode_s(context_tokens=ctx, shape=shape) - fixed)
    assert ratio == pytest.approx(3350 / 4800)


def test_importing_profile_does_not_import_torch():
    code = "import sys, sim.profile; sim.profile.load_profile('h100-80gb'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- overhead terms


def _with_overheads(**operations: Any) -> HardwareProfile:
    data = toy_profile_dict()
    data["source"] = "measured"
    data["operations"].update(operations)
    return HardwareProfile.model_validate(data)


def test_overheads_are_optional_and_zero_when_absent(toy_profile):
    assert not toy_profile.has_overheads
    assert toy_profile.layer_overhead_s(tokens=5, sequences=2) == 0.0
    assert toy_profile.iteration_overhead_s(tokens=np.array([0, 7])).tolist() == [0.0, 0.0]
    assert toy_profile.expert_overhead_s(tokens=np.array([[1, 0], [3, 4]])).shape == (2, 2)


def test_overheads_are_affine_vectorised_and_zero_without_tokens():
    p = _with_overheads(layer_overhead={"fixed_s": 1e-4, "per_token_s": 1e-6, "per_sequence_s": 1e-5},
                        expert_overhead={"fixed_s": 2e-4, "per_token_s": 3e-6},
                        iteration_overhead={"fixed_s": 5e-4})
    assert p.has_overheads
    assert p.layer_overhead_s(tokens=10, sequences=4) == pytest.approx(1e-4 + 10e-6 + 4e-5)
    assert p.layer_overhead_s(tokens=np.array([0, 10]), sequences=np.array([0, 4])).tolist() == pytest.approx(
        [0.0, 1.5e-4])
    assert p.expert_overhead_s(tokens=np.array([[0, 1], [2, 0]])).ravel().tolist() == pytest.approx(
        [0.0, 2.03e-4, 2.06e-4, 0.0])
    assert isinstance(p.expert_overhead_s(tokens=3), float)
    assert p.iteration_overhead_s(tokens=3, sequences=1) == pytest.approx(5e-4)
    assert p.iteration_overhead_s(tokens=0) == 0.0


def test_routed_expert_call_pays_the_scaled_table_plus_its_overhead(toy_profile):
    """``routed_expert_s`` = kernel_scale x expert_ffn table + fixed + per-token (0 for an expert without
    tokens); without an overhead term it is the table itself."""
    tokens = np.array([[0, 1], [4, 16]])
    table = toy_profile.expert_ffn_s(tokens=tokens, shape=EXPERT)
    assert toy_profile.routed_expert_s(tokens=tokens, shape=EXPERT).tolist() == table.tolist()
    p = _with_overheads(expert_overhead={"fixed_s": 2e-4, "per_token_s": 3e-6, "kernel_scale": 0.25})
    expected = 0.25 * p.expert_ffn_s(tokens=tokens, shape=EXPERT) + np.where(tokens > 0, 2e-4 + 3e-6 * tokens, 0.0)
    assert p.routed_expert_s(tokens=tokens, shape=EXPERT).ravel().tolist() == pytest.approx(expected.ravel().tolist())
    assert p.routed_expert_s(tokens=0, shape=EXPERT) == 0.0
    whole = _with_overheads(expert_overhead={"fixed_s": 2e-4})  # kernel_scale defaults to the whole table
    assert whole.routed_expert_s(tokens=4, shape=EXPERT) == pytest.approx(
        float(whole.expert_ffn_s(tokens=4, shape=EXPERT)) + 2e-4)


def test_a_negative_slope_never_gives_a_negative_overhead():
    p = _with_overheads(expert_overhead={"fixed_s": 1e-4, "per_token_s": -1e-6})
    assert p.expert_overhead_s(tokens=np.array([50, 200])).tolist() == pytest.approx([5e-5, 0.0])


def test_datasheet_profile_cannot_claim_a_fitted_overhead(tmp_path):
    data = toy_profile_dict()
    data["operations"]["layer_overhead"] = {"fixed_s": 1e-4, "fit_error": {
        "median_rel_error": 0.1, "p95_rel_error": 0.2, "max_rel_error": 0.3, "num_points": 3}}
    with pytest.raises(ProfileError, match="layer_overhead"):
        load_profile(write_yaml(tmp_path, data))


def test_typo_in_an_overhead_names_the_key_path_and_choices(tmp_path):
    data = toy_profile_dict()
    data["operations"]["expert_overhead"] = {"fixed_s": 1e-4, "per_tokens_s": 1e-6}
    with pytest.raises(ProfileError, match=r"operations\.expert_overhead\.per_tokens_s: unknown key.*per_token_s"):
        load_profile(write_yaml(tmp_path, data))


def test_load_interference_is_per_byte_optional_and_never_negative(toy_profile, tmp_path):
    assert toy_profile.load_interference_s(nbytes=3e6) == 0.0  # absent: GPU profiles are unchanged
    p = _with_overheads(load_interference={"s_per_byte": 2e-11})
    assert p.has_overheads
    assert p.load_interference_s(nbytes=3e6) == pytest.approx(6e-5)
    assert p.load_interference_s(nbytes=np.array([0.0, 1e6])).tolist() == pytest.approx([0.0, 2e-5])
    data = toy_profile_dict()
    data["operations"]["load_interference"] = {"s_per_byte": -1e-11}
    with pytest.raises(ProfileError, match=r"operations\.load_interference\.s_per_byte"):
        load_profile(write_yaml(tmp_path, data))
