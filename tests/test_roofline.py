"""The roofline arithmetic of ``sim.roofline`` pinned to hand-computed cases (SpecMoEOff Sec. 3 numbers)."""

from __future__ import annotations

import pytest

from sim.engine.speculative import expected_emitted_tokens, mean_emitted_tokens
from sim.policies.offload_specs import EmpiricalAcceptance, FixedAcceptance, PerTaskAcceptance
from sim.profile import parse_profile
from sim.roofline import (
    estimate_decode,
    expected_distinct_experts,
    gpu_utilisation_streaming,
    kv_bytes_per_request,
    layer_transfer_s,
    max_batch_in_memory,
)
from sim.spec import get_model, with_dtypes

from engine_fixtures import TOY_PROFILE_YAML, tiny_model, toy_profile

GIB = 2**30
MIXTRAL_FP16 = with_dtypes(get_model("mixtral-8x7b"), weight_dtype="fp16", kv_dtype="fp16")


def test_kv_bytes_of_one_mixtral_request():
    """2 (K, V) x 32 layers x 8 KV heads x 128 x 2 B = 128 KiB per token; 566 + 1024 tokens."""
    assert MIXTRAL_FP16.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_request(MIXTRAL_FP16, 566, 1024) == 1590 * 131_072 == 208_404_480


@pytest.mark.parametrize(("dram_gib", "batch"), [(160, 824), (100, 515)])
def test_max_batch_that_fits_host_memory_matches_specmoeoff(dram_gib, batch):
    """SpecMoEOff Sec. 3: 160 GiB (A30 box) and 100 GiB (4090D box) of DRAM hold 824 and 515 requests."""
    assert max_batch_in_memory(MIXTRAL_FP16, dram_gib * GIB, 566, 1024) == batch


def test_per_layer_transfer_time_of_mixtral_over_25_gbps():
    """8 experts x 3 x 4096 x 14336 x 2 B = 8 x 352,321,536 B; each copy 10 us + bytes / 25 GB/s."""
    profile = parse_profile(TOY_PROFILE_YAML, origin="toy").with_links(host_to_device_gbps=25.0)
    expert_bytes = 3 * 4096 * 14336 * 2
    assert MIXTRAL_FP16.expert_bytes == expert_bytes == 352_321_536
    one = 1e-3 + expert_bytes / 25e9  # the toy link's latency is 1 ms
    assert layer_transfer_s(MIXTRAL_FP16, profile, 8) == pytest.approx(8 * one, rel=1e-12)
    assert layer_transfer_s(MIXTRAL_FP16, profile, 8) == pytest.approx(0.12074, abs=1e-5)


def test_gpu_utilisation_when_streaming_every_expert_matches_specmoeoff():
    """(top_k x b / E) x B_h2d / P_gpu = (2 x 824 / 8) x 25e9 / 165e12 = 3.12% (the paper rounds to 3.13%)."""
    text = TOY_PROFILE_YAML.replace("peak_tflops: {bf16: 1.0}", "peak_tflops: {bf16: 165.0}")
    profile = parse_profile(text, origin="a30-like").with_links(host_to_device_gbps=25.0)
    util = gpu_utilisation_streaming(MIXTRAL_FP16, profile, 824, dtype="bf16")
    assert util == pytest.approx(206 * 25e9 / 165e12, rel=1e-12)
    assert round(util * 100, 1) == 3.1


def test_expected_tokens_per_verification():
    """a = 0.7, k = 3: 1 + 0.7 + 0.49 + 0.343 = 2.533 tokens; k = 0 is one token; a = 1 is k + 1."""
    assert expected_emitted_tokens(0.7, 3) == pytest.approx(2.533)
    assert expected_emitted_tokens(0.7, 0) == 1.0
    assert expected_emitted_tokens(1.0, 4) == 5.0
    assert mean_emitted_tokens(FixedAcceptance(rate=0.5), 2) == pytest.approx(1.75)
    rates = PerTaskAcceptance(kind="per_task", rates={"code": 1.0}, default_rate=0.0)
    assert mean_emitted_tokens(rates, 3, {"code": 1.0, "chat": 3.0}) == pytest.approx(0.25 * 4 + 0.75 * 1)
    # Run lengths 0, 1, 5 truncated at k = 2: accepted 0, 1, 2 -> mean 1, plus the target's token.
    assert mean_emitted_tokens(EmpiricalAcceptance(kind="empirical", run_lengths=[0, 1, 5]), 2) == pytest.approx(2.0)


def test_expected_distinct_experts():
    """8 experts, top-2: one token uses 2; many tokens use all 8."""
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2.0)
    assert expected_distinct_experts(8, 2, 1000) == pytest.approx(8.0)


def test_streaming_estimate_is_bound_by_the_link_when_compute_is_small():
    """Tiny model, nothing resident, every expert streamed: weights take L x E x load_s per iteration,
    and with two micro-batches the iteration is the slowest resource."""
    model = tiny_model()
    profile = toy_profile()
    est = estimate_decode(model=model, profile=profile, host=profile, batch=4, context_tokens=10, draft_length=0,
                          emitted_per_step=1.0, micro_batches=2, attention_decode="cpu", cpu_experts=False,
                          resident_experts=0, stream_all=True)
    load_s = 1e-3 + model.expert_bytes / 10e9
    assert est.weights_s == pytest.approx(model.num_moe_layers * model.num_experts * load_s)
    assert est.iteration_s == pytest.approx(max(est.weights_s, est.gpu_s, est.cpu_s))
    assert est.bound == "PCIe weights"
    assert est.tokens_per_iteration == 4


def test_draft_kv_split_moves_the_host_part_of_the_draft_attention_to_the_cpu_in_the_estimate():
    """Fraction 1.0 is the estimate without a split; 0.5 on a 1000x slower host puts half the batch's draft
    attention (k = 2: a catch-up pass and one decode pass) on that host: the draft takes longer, the rest is unchanged."""
    model = tiny_model()
    profile = toy_profile()
    slow = parse_profile(TOY_PROFILE_YAML.replace("peak_tflops: {bf16: 1.0}, memory_bandwidth_gbps: 1000.0",
                                                  "peak_tflops: {bf16: 0.001}, memory_bandwidth_gbps: 1.0"),
                         origin="slow.yaml")
    kw = dict(model=model, profile=profile, host=slow, batch=4, context_tokens=10, draft_length=2,
              emitted_per_step=2.0, micro_batches=2, attention_decode="cpu", cpu_experts=False, resident_experts=0,
              stream_all=True, draft=model)
    plain = estimate_decode(**kw)
    one = estimate_decode(**kw, draft_kv_gpu_fraction=1.0)
    half = estimate_decode(**kw, draft_kv_gpu_fraction=0.5)
    assert one == plain and plain.draft_s > 0
    assert half.draft_s > 10 * plain.draft_s
    assert (half.weights_s, half.gpu_s, half.cpu_s) == (plain.weights_s, plain.gpu_s, plain.cpu_s)
    assert half.iteration_s == pytest.approx(plain.iteration_s - plain.draft_s + half.draft_s)
