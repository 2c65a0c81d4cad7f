"""The AIConfigurator importer: per-expert arithmetic, shipped profiles in sync, lookups, provenance.

Tests that read the source tables need ../shared/data (CI lays a copy beside the checkout); the rest use only the
shipped profiles."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibrate.importers.aiconfigurator import (
    DEFAULT_DATA_DIR, GPUS, LICENCE_FILE, SOURCE_COMMIT, build_profile, per_expert_points, profile_yaml, subsample,
)
from sim.cli import main
from sim.profile import TableModel, load_profile, shipped_profiles
from sim.work import ExpertShape, GemmShape

IMPORTED = [n for n in shipped_profiles() if n.endswith("-aiconfigurator")]
NAME_OF = {key: src.name for key, src in GPUS.items()}
# The source tables live in ../shared/data beside the checkout (CI lays a copy there): a missing copy
# is a failure, not a skip.
def needs_data(test):
    """Marks a test that reads the source tables (kept for readability; never skips)."""
    return test
MIXTRAL_BF16 = ExpertShape(hidden=4096, ffn=14336, num_matrices=3, weight_dtype="bf16", act_dtype="bf16")


def _shipped_text(name: str) -> str:
    return resources.files("sim.data.profiles").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def test_every_gpu_has_a_shipped_profile():
    assert sorted(IMPORTED) == sorted(NAME_OF.values())


# ---------------------------------------------------------------- arithmetic


def test_per_expert_points_by_hand():
    """Mixtral routing (8 experts, top-2): 1, 2, 4 tokens give 1 token/expert on 2, 4, 8 experts (the first kept:
    1 ms / 2); 6 tokens -> 12 / 8 = 1.5, dropped; 8 tokens -> 2/expert, 4 ms / 8; 64 -> 16/expert, 8 ms / 8."""
    pts = per_expert_points([1, 2, 4, 6, 8, 64], [1.0, 2.0, 3.0, 3.5, 4.0, 8.0], topk=2, num_experts=8)
    assert pts == [(1, 0.5, 1), (2, 0.5, 8), (16, 1.0, 64)]


def test_per_expert_points_many_experts():
    """Qwen3-30B (128 experts, top-8): 1 token -> 8 experts at 1 token; 48 tokens -> 384 / 128 = 3/expert."""
    pts = per_expert_points([1, 16, 48], [0.08, 0.2, 0.3], topk=8, num_experts=128)
    assert pts == [(1, 0.01, 1), (3, pytest.approx(0.3 / 128), 48)]


def test_subsample_keeps_ends_and_is_log_spaced():
    tokens = list(range(1, 1001))
    keep = subsample(tokens, 16)
    assert keep[0] == 0 and keep[-1] == 999 and len(keep) <= 16
    assert [tokens[i] for i in keep][:3] == [1, 2, 3]  # dense at the small end: log spacing
    assert subsample([1, 2, 4], 16) == [0, 1, 2]


@needs_data
def test_shipped_rows_reproduce_source_rows_exactly():
    """H100 vLLM bf16 Mixtral-8x7B layer latencies (ms) from moe_perf.parquet, divided by active experts."""
    import pandas as pd

    moe = pd.read_parquet(DEFAULT_DATA_DIR / "data/h100_sxm/moe/vllm/0.24.0/moe_perf.parquet")
    sel = moe[(moe.distribution == "balanced") & (moe.moe_tp_size == 1) & (moe.moe_ep_size == 1)
              & (moe.hidden_size == 4096) & (moe.inter_size == 14336) & (moe.num_experts == 8) & (moe.topk == 2)
              & (moe.moe_dtype == "bfloat16")]
    layer_ms = dict(zip(sel.num_tokens, sel.latency))
    model = load_profile("h100-80gb-aiconfigurator").operations.expert_ffn
    row = next(r for r in model.rows if r.shape == {"hidden": 4096, "ffn": 14336, "num_matrices": 3,
                                                     "weight_dtype": "bf16", "act_dtype": "bf16"})
    got = dict(zip(row.tokens, row.latency_s))
    # tokens/expert 1 <- 1 token on 2 experts; 16 <- 64 tokens (128 assignments) on 8; 256 <- 1024 tokens on 8
    assert got[1] == pytest.approx(layer_ms[1] * 1e-3 / 2, rel=1e-4)
    assert got[16] == pytest.approx(layer_ms[64] * 1e-3 / 8, rel=1e-4)
    assert got[256] == pytest.approx(layer_ms[1024] * 1e-3 / 8, rel=1e-4)
    assert layer_ms[1] == pytest.approx(0.258741, rel=1e-5)  # the number the docstring arithmetic used


@needs_data
def test_dense_gemm_row_is_the_gemm_table():
    import pandas as pd

    gemm = pd.read_parquet(DEFAULT_DATA_DIR / "data/h100_sxm/gemm/vllm/0.24.0/gemm_perf.parquet")
    d = gemm[(gemm.gemm_dtype == "bfloat16") & (gemm.n == 1024) & (gemm.k == 4096)]
    profile = load_profile("h100-80gb-aiconfigurator")
    row = next(r for r in profile.operations.dense_gemm.rows if r.shape["in_features"] == 4096
               and r.shape["out_features"] == 1024)
    for m, s in zip(row.tokens, row.latency_s):
        assert s == pytest.approx(float(d[d.m == m].latency.median()) * 1e-3, rel=1e-4)


# ---------------------------------------------------------------- shipped files


@needs_data
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_shipped_profile_is_what_the_importer_writes(gpu):
    assert profile_yaml(build_profile(gpu)) == _shipped_text(NAME_OF[gpu])


@needs_data
def test_cli_import_writes_the_shipped_file(tmp_path, capsys):
    out = tmp_path / "h200.yaml"
    assert main(["profile", "import", "aiconfigurator", "--gpu", "h200", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == _shipped_text("h200-aiconfigurator")
    assert f"wrote {out}" in capsys.readouterr().err


def test_cli_import_rejects_a_non_yaml_out(tmp_path, capsys):
    assert main(["profile", "import", "aiconfigurator", "--gpu", "h100", "--out", str(tmp_path / "p.txt")]) == 2
    assert capsys.readouterr().err.strip().endswith("a profile is a .yaml file")


@pytest.mark.parametrize("name", IMPORTED)
def test_imported_profile_loads_small_and_says_where_it_came_from(name):
    text = _shipped_text(name)
    assert len(text.encode()) < 300_000
    p = load_profile(name)
    assert p.source == "public-measurements"
    prov = p.provenance
    assert prov["source"]["commit"] == SOURCE_COMMIT
    assert "Apache-2.0" in prov["licence"] and LICENCE_FILE in prov["licence"]
    assert "NOT measured" in prov["links"]
    assert "layer seconds / active" in prov["expert_ffn"]["derivation"]
    licence = resources.files("sim.data.profiles").joinpath(LICENCE_FILE).read_text(encoding="utf-8")
    assert "Apache License" in licence[:300] and "Version 2.0" in licence[:300]
    for op in ("expert_ffn", "dense_gemm", "gate", "attention_prefill", "attention_decode"):
        assert getattr(p.operations, op).fit_error is not None, op


@pytest.mark.parametrize("name", IMPORTED)
def test_lookups_between_grid_points_lie_between_neighbours(name):
    p = load_profile(name)
    for op in ("expert_ffn", "dense_gemm", "gate"):
        model = getattr(p.operations, op)
        assert isinstance(model, TableModel)
        for row in model.rows:
            shape = (ExpertShape if op == "expert_ffn" else GemmShape)(**row.shape)
            t = np.asarray(row.tokens, dtype=float)
            s = np.asarray(row.latency_s)
            at_grid = getattr(p, f"{op}_s")(tokens=t, shape=shape)
            assert at_grid == pytest.approx(s, rel=1e-9)
            mid = np.sqrt(t[:-1] * t[1:])
            got = getattr(p, f"{op}_s")(tokens=mid, shape=shape)
            lo, hi = np.minimum(s[:-1], s[1:]), np.maximum(s[:-1], s[1:])
            assert np.all((got >= lo * (1 - 1e-12)) & (got <= hi * (1 + 1e-12))), (op, row.shape)
    assert p.extrapolated_counts() == {}


def test_imported_h100_simulates(write_scenario, tiny):
    from sim.engine.simulation import simulate
    from sim.scenario import load_scenario

    tiny["model"] = "qwen3-30b-a3b"  # its expert, projection and router shapes are all in the tables
    tiny["hardware"]["profile"] = "h100-80gb-aiconfigurator"
    loaded = load_scenario(write_scenario(tiny))
    result = simulate(loaded)
    assert not result.partial and len(result.requests) == 5
    assert loaded.profile.source == "public-measurements"
    # expert_ffn, dense_gemm (q, k, v, o) and gate are measured shapes; only the LM head (vocab 151936) is not
    assert set(loaded.profile.extrapolated_counts()) <= {"dense_gemm"}


def test_mixtral_expert_is_slower_per_token_at_256_than_at_16_tokens():
    """Measured grouped-GEMM behaviour the datasheet roofline lacks: 16 tokens/expert is weight-read bound
    (about the 1-token time), 256 tokens/expert is compute bound (clearly more)."""
    p = load_profile("h100-80gb-aiconfigurator")
    t1, t16, t256 = (float(p.expert_ffn_s(tokens=t, shape=MIXTRAL_BF16)) for t in (1, 16, 256))
    assert 0.5 < t16 / t1 < 1.5
    assert t256 > 1.5 * t16
