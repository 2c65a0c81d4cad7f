"""PEC partial expert checkpoints against hand arithmetic on the tiny model of ``engine_fixtures``.

Tiny model: 49,728 non-expert parameters, 2 MoE layers x 2 experts of 24,576 parameters; bf16 weights
(B_w = 2) and Adam state (B_o = 12) -> 14 bytes of state per parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.checkpoint import CheckpointSpec, checkpoint_cases, round_robin_ages
from sim.cli import main

from engine_fixtures import scenario_data, tiny_model, toy_profile, write_toy_profile

SPEC = CheckpointSpec(pec_experts_per_layer=1, interval_iterations=10, total_iterations=1000, iteration_s=1.0,
                      storage_gbps=1.0, snapshot_gbps=2.0, num_ranks=2)


def test_full_and_pec_sizes_by_hand() -> None:
    full, pec = checkpoint_cases(tiny_model(), toy_profile(), SPEC, num_gpus=2)
    assert full.total_bytes == (49_728 + 4 * 24_576) * 14 == 2_072_448
    assert pec.total_bytes == (49_728 + 2 * 24_576) * 14 == 1_384_320
    # Per rank: half the non-expert state, and ceil(experts saved / 2 ranks) experts' state.
    assert full.rank_bytes == 49_728 * 14 / 2 + 2 * 24_576 * 14 == 1_036_224
    assert pec.rank_bytes == 49_728 * 14 / 2 + 1 * 24_576 * 14 == 692_160
    assert pec.snapshot_s == pytest.approx(692_160 / 2e9)
    assert pec.persist_s == pytest.approx(692_160 / 1e9)
    assert pec.stall_per_checkpoint_s == 0.0 and pec.interval_ok


def test_plt_follows_round_robin_ages() -> None:
    """N=2, K=1: at any checkpoint one expert was saved now and the other one checkpoint ago, so a fault
    loses 10 iterations of one expert's updates of 2: PLT = 1 * 10 / (2 * 1000) = 0.5%; full loses none."""
    full, pec = checkpoint_cases(tiny_model(), toy_profile(), SPEC, num_gpus=2)
    assert full.plt_per_fault == 0.0
    assert pec.plt_per_fault == pytest.approx(0.005)
    assert pec.staleness_max_iterations == 10


def test_round_robin_ages_match_the_closed_form() -> None:
    """N divisible by K: groups saved 0..G-1 checkpoints ago, mean age (G - 1) / 2 (PEC's GPT-125M-8E, K=2: 1.5)."""
    assert sum(round_robin_ages(8, 2)) / 8 == pytest.approx(1.5)
    assert round_robin_ages(8, 8) == [0.0] * 8
    # N=3, K=2 does not divide: saves {0,1}, {2,0}, {1,2}, ...: at every checkpoint two experts are fresh
    # and one is one checkpoint old, so the mean age is 1/3.
    assert sum(round_robin_ages(3, 2)) / 3 == pytest.approx(1 / 3)


def test_snapshot_longer_than_an_iteration_stalls_training() -> None:
    slow = SPEC.model_copy(update={"snapshot_gbps": 1e-3})  # 1 MB/s: the full shard takes ~1,036 s
    full, _ = checkpoint_cases(tiny_model(), toy_profile(), slow, num_gpus=2)
    assert full.stall_per_checkpoint_s == pytest.approx(1_036_224 / 1e6 - 1.0)


def test_cli_prints_both_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    data = scenario_data(write_toy_profile(tmp_path), hardware={"num_gpus": 2})
    data["checkpoint"] = SPEC.model_dump(exclude_none=True)
    path = tmp_path / "ckpt.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "full" in out and "pec K=1" in out and "0.500%" in out
    del data["checkpoint"]
    path.write_text(yaml.safe_dump(data))
    assert main(["checkpoint", str(path)]) == 2
    assert "checkpoint: this command needs a checkpoint: section" in capsys.readouterr().err
