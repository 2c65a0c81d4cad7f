"""Trained routers (calibrate.runtime.routers, train_routers): the shipped file, the choice between trained and
seeded routers, and the training itself on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibrate.errors import CalibrationError  # noqa: E402
from calibrate.overhead import runtime_spec  # noqa: E402
from calibrate.runtime.model import TinyMoE, dims_of  # noqa: E402
from calibrate.runtime.routers import (  # noqa: E402
    choose_routers, provenance_path, read_routers, routers_path, save_routers, shape_meta,
)
from calibrate.runtime.train_routers import train  # noqa: E402
from sim.spec import ModelSpec  # noqa: E402

TINY = {"name": "test-tiny-moe", "hidden_size": 64, "num_layers": 2, "vocab_size": 256, "attention_type": "gqa",
        "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16, "num_experts": 4, "top_k": 2,
        "expert_ffn_size": 64}
TEXT = (b"def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n\n"
        b"# a comment about points and sums\nfor i in range(10):\n    print(add(i, i))\n") * 8


@pytest.fixture(scope="module")
def models() -> tuple[TinyMoE, TinyMoE]:
    """The validation model (tiny-mixtral, seed 0 as the validation scenarios) with each kind of routers."""
    spec = runtime_spec()
    return TinyMoE(spec, 0), TinyMoE(spec, 0, routers="seeded")


def test_shipped_routers_match_the_validation_model() -> None:
    spec = runtime_spec()
    path = routers_path(spec.name)
    weights, meta = read_routers(path)
    d = dims_of(spec)
    assert weights.dtype == torch.bfloat16 and tuple(weights.shape) == (d.num_layers, d.hidden, d.num_experts)
    assert meta == shape_meta(d, spec.name, 0)
    assert torch.isfinite(weights.float()).all()
    assert path.stat().st_size < 100_000  # small enough to ship
    prov = json.loads(provenance_path(spec.name).read_text())
    assert "Python Software Foundation" in prov["licence"]
    assert prov["text"]["num_files"] > 0 and prov["text"]["bytes"] > 0
    assert prov["training"]["loss_after"] < prov["training"]["loss_before"]
    assert prov["matches"] == meta


def test_trained_routers_replace_only_the_routers(models) -> None:
    trained, seeded = models
    assert trained.router_source.startswith("trained") and seeded.router_source == "seeded"
    assert torch.equal(trained.embed, seeded.embed) and torch.equal(trained.host_experts, seeded.host_experts)
    assert torch.equal(trained.lm_head, seeded.lm_head)
    for a, b in zip(trained.layers, seeded.layers):
        assert torch.equal(a["wq"], b["wq"]) and torch.equal(a["wo"], b["wo"])
        assert not torch.equal(a["router"], b["router"])
    shipped, _ = read_routers(routers_path("tiny-mixtral"))
    assert torch.equal(trained.layers[3]["router"], shipped[3])


def test_trained_routing_is_deterministic_and_differs_from_seeded(models) -> None:
    trained, seeded = models
    # Hidden states of real token ids (the embedding of bytes of text), as the gate sees them.
    ids = torch.tensor(list(TEXT[:64]), dtype=torch.long)
    h = trained.rms_norm(trained.embed[ids], trained.layers[0]["norm2"])
    with torch.inference_mode():
        a, wa = trained.route(0, h)
        b, wb = trained.route(0, h)
        s, _ = seeded.route(0, h)
    assert torch.equal(a, b) and torch.equal(wa, wb)
    assert (torch.sort(a, dim=-1).values != torch.sort(s, dim=-1).values).any(dim=-1).sum() > 0


def test_other_models_and_seeds_fall_back_to_seeded_or_fail_when_trained_is_forced() -> None:
    d = dims_of(runtime_spec())
    weights, why = choose_routers(d, "tiny-mixtral", 1, "auto")
    assert weights is None and why.startswith("seeded (") and "seed 0 != 1" in why
    with pytest.raises(CalibrationError, match="seed 0 != 1"):
        choose_routers(d, "tiny-mixtral", 1, "trained")
    tiny = ModelSpec.model_validate(TINY)
    model = TinyMoE(tiny, 0)
    assert model.router_source == "seeded (no trained routers shipped for model 'test-tiny-moe')"
    with pytest.raises(CalibrationError, match="no trained routers shipped for model 'test-tiny-moe'"):
        TinyMoE(tiny, 0, routers="trained")
    with pytest.raises(CalibrationError, match="expected one of auto, trained, seeded"):
        TinyMoE(tiny, 0, routers="learned")


def test_shape_mismatch_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file for the same name but other shapes (here: another hidden size) is not used."""
    import calibrate.runtime.routers as routers

    d = dims_of(ModelSpec.model_validate(TINY))
    save_routers(tmp_path / "test-tiny-moe-routers.npz", [torch.zeros(32, 4)] * 2,
                 {**shape_meta(d, "test-tiny-moe", 0), "hidden": 32})
    monkeypatch.setattr(routers, "DATA_DIR", tmp_path)
    weights, why = choose_routers(d, "test-tiny-moe", 0, "auto")
    assert weights is None and "hidden 32 != 64" in why


def test_shared_experts_are_part_of_what_a_trained_file_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared experts are frozen weights the routers were trained against: a file for one shared width is not used
    with another. A model without shared experts has no such keys, so files written before them still match."""
    import calibrate.runtime.routers as routers

    assert "num_shared" not in shape_meta(dims_of(ModelSpec.model_validate(TINY)), "test-tiny-moe", 0)
    fine = dims_of(ModelSpec.model_validate({**TINY, "num_shared_experts": 1, "shared_expert_ffn_size": 64}))
    save_routers(tmp_path / "test-tiny-moe-routers.npz", [torch.zeros(64, 4)] * 2,
                 {**shape_meta(fine, "test-tiny-moe", 0), "shared_ffn": 32})
    monkeypatch.setattr(routers, "DATA_DIR", tmp_path)
    weights, why = choose_routers(fine, "test-tiny-moe", 0, "auto")
    assert weights is None and "shared_ffn 32 != 64" in why


def test_shipped_fine_grained_routers_match_the_fine_grained_scenario() -> None:
    from sim.scenario import load_scenario

    spec = load_scenario(Path(__file__).resolve().parent.parent / "scenarios" / "validate-fine-grained-shared.yaml").model
    model = TinyMoE(spec, 0)
    assert model.router_source == "trained (tiny-deepseek-routers.npz)"
    prov = json.loads(provenance_path(spec.name).read_text())
    assert prov["training"]["loss_after"] < prov["training"]["loss_before"]
    assert prov["matches"]["num_shared"] == 2 and routers_path(spec.name).stat().st_size < 150_000


def test_tiny_training_lowers_the_loss_and_is_deterministic(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate(TINY)
    tokens = np.frombuffer(TEXT, dtype=np.uint8)
    kwargs = dict(steps=8, batch=4, seq_len=12, lr=3e-2, eval_batches=2)
    a = train(spec, tokens, seed=0, **kwargs)
    b = train(spec, tokens, seed=0, **kwargs)
    c = train(spec, tokens, seed=1, **kwargs)
    assert a.loss_after < a.loss_before
    assert a.history == b.history and all(torch.equal(x, y) for x, y in zip(a.routers, b.routers))
    assert not all(torch.equal(x, y) for x, y in zip(a.routers, c.routers))
    # What training starts from is the seeded router; the result is saved and read back as bf16.
    seeded = TinyMoE(spec, 0, routers="seeded")
    assert not torch.equal(a.routers[0].to(torch.bfloat16), seeded.layers[0]["router"])
    path = save_routers(tmp_path / "r.npz", a.routers, shape_meta(seeded.dims, spec.name, 0))
    back, meta = read_routers(path)
    assert torch.equal(back, torch.stack(a.routers).to(torch.bfloat16)) and meta["seed"] == 0


def test_training_refuses_a_vocab_smaller_than_the_bytes() -> None:
    spec = ModelSpec.model_validate({**TINY, "vocab_size": 128})
    with pytest.raises(CalibrationError, match="vocab 128"):
        train(spec, np.frombuffer(TEXT + "café".encode(), dtype=np.uint8), steps=1, batch=2, seq_len=8)


def _tiny_scenario(tmp_path: Path, vocab: int = 256):
    import yaml

    from sim.scenario import load_scenario

    data = {
        "name": "test-text-prompts", "model": {"spec": {**TINY, "vocab_size": vocab}},
        "hardware": {"profile": "cpu-this-machine", "expert_memory": {"all": True}},
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 100.0,
                                  "prompt_tokens": {"dist": "uniform", "low": 4, "high": 24},
                                  "output_tokens": {"dist": "uniform", "low": 2, "high": 4}},
                     "max_requests": 4, "seed": 3},
        "policies": {"expert_cache": {"name": "all_resident"}},
    }
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_scenario(path)


def test_text_prompts_are_seeded_windows_of_the_held_out_text(tmp_path: Path) -> None:
    from calibrate.runtime.server import Runtime
    from calibrate.runtime.train_routers import BYTE_TOKENS, byte_tokens, held_out_files
    from sim.engine.simulation import build_request_table

    loaded = _tiny_scenario(tmp_path, vocab=512)
    table = build_request_table(loaded, np.random.default_rng(0))
    text = byte_tokens(held_out_files()).tobytes()
    runs = []
    for _ in range(2):
        rt = Runtime(loaded, seed=3, prompts="text")
        rec = rt.serve(table, time_scale=0.0)
        assert len(rec.requests) == len(table)
        prompts = [rt._prompt(i, int(table.prompt_tokens[i])) for i in range(len(table))]
        runs.append((prompts, [rec.routing_of(i) for i in range(len(table))]))
    for prompt in runs[0][0]:
        assert bytes(prompt) in text
    # generated tokens stay within the byte tokens of the text (the vocab is larger)
    assert loaded.model.vocab_size > BYTE_TOKENS
    assert all(0 <= t < BYTE_TOKENS for toks in rt.tokens.values() for t in toks)
    assert runs[0][0] == runs[1][0] and all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(CalibrationError, match="prompts: expected random or text"):
        Runtime(loaded, seed=3, prompts="words")
    with pytest.raises(CalibrationError, match="vocab of at least 256"):
        Runtime(_tiny_scenario(tmp_path, vocab=128), seed=3, prompts="text")
