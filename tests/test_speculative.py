"""Speculative decoding, CPU attention / experts and ``moesim tune``, end to end on the toy profile.

The toy profile (``engine_fixtures``) makes every op ``max(FLOPs, bytes) / 1e12`` s and every copy 1 ms +
bytes / 10 GB/s. The same toy profile serves as the "host CPU" profile where one is needed, except where a
test needs a slow CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.engine.host_compute import MicroBatch, PipelinedIteration
from sim.engine.iteration import BatchShape, IterationPlanner, time_plan
from sim.engine.offload import plan_offload_memory
from sim.engine.simulation import simulate
from sim.engine.speculative import AcceptanceModel, VerifyBatchShape, VerifyIterationPlanner
from sim.errors import ScenarioError
from sim.policies.cache import make_cache
from sim.policies.offload_specs import EmpiricalAcceptance, FixedAcceptance, OffloadSpec, PerTaskAcceptance
from sim.profile import parse_profile

from engine_fixtures import TOY_PROFILE_YAML, load, scenario_data, tiny_model, toy_profile, write_toy_profile

TOY = toy_profile()
DRAFT = {"name": "draft", "hidden_size": 32, "num_layers": 1, "vocab_size": 128, "attention_type": "mha",
         "num_attention_heads": 1, "num_kv_heads": 1, "head_dim": 32, "num_experts": 1, "top_k": 1,
         "expert_ffn_size": 64}
MODEL = {"name": "tiny4", "hidden_size": 64, "num_layers": 2, "vocab_size": 128, "attention_type": "mha",
         "num_attention_heads": 2, "num_kv_heads": 2, "head_dim": 32, "num_experts": 4, "top_k": 2,
         "expert_ffn_size": 128}
BASE_COLUMNS = ["replica", "started_at_s", "duration_s", "num_prefill_seqs", "num_decode_seqs", "num_tokens",
                "expert_hits", "expert_misses", "prefetch_hits", "expert_loads", "stall_s", "compute_busy_s",
                "copy_busy_s", "kv_blocks_used", "experts_resident", "preemptions"]


def spec_block(k: int, acceptance: dict | None = None, placement: str = "gpu") -> dict:
    return {"draft_model": {"spec": copy.deepcopy(DRAFT)}, "draft_length": k, "draft_placement": placement,
            "acceptance": acceptance or {"kind": "fixed", "rate": 0.6}}


def offload_data(tmp_path: Path, *, speculative: dict | None = None, offload: dict | None = None, host: bool = True,
                 **kw) -> dict:
    profile = write_toy_profile(tmp_path)
    policies = {"expert_cache": {"name": "lru"}, "batching": {"max_num_seqs": 4, "max_batch_tokens": 64}}
    if speculative is not None:
        policies["speculative"] = speculative
    if offload is not None:
        policies["offload"] = offload
    hardware = {"expert_memory": {"experts": 5}, "host_memory_bytes": 1.0e8}
    if host:
        hardware["host_profile"] = str(profile)
    data = scenario_data(profile, model=MODEL, policies=policies, hardware=hardware, **kw)
    data["workload"]["routing"] = {"kind": "zipf", "exponent": 0.9}
    return data


# ---------------------------------------------------------------- k = 0 and acceptance 0


def test_draft_length_zero_simulates_exactly_like_the_plain_engine(tmp_path):
    kw = dict(prompt_tokens=12, output_tokens=7, max_requests=8, rate_per_s=3.0)
    plain = simulate(load(offload_data(tmp_path, **kw), tmp_path))
    spec = simulate(load(offload_data(tmp_path, speculative=spec_block(0), **kw), tmp_path))
    assert len(plain.iterations) > 8 and plain.iterations["expert_misses"].sum() > 0  # loads matter here
    pd_equal = plain.requests.equals(spec.requests)
    assert pd_equal
    assert plain.iterations[BASE_COLUMNS].equals(spec.iterations[BASE_COLUMNS])
    assert np.array_equal(plain.tbt_samples_s, spec.tbt_samples_s)
    assert (spec.iterations["draft_s"] == 0).all() and (spec.iterations["drafted_tokens"] == 0).all()


def test_acceptance_zero_emits_one_token_per_step_like_the_plain_engine(tmp_path):
    """All requests arrive at once, so both engines form the same batches; every step emits one token per
    sequence; the verify work (k + 1 tokens) and the draft make each decode step longer."""
    kw = dict(prompt_tokens=12, output_tokens=6, max_requests=3, rate_per_s=1e6)
    runs = []
    for speculative in (None, spec_block(3, {"kind": "fixed", "rate": 0.0})):
        data = offload_data(tmp_path, speculative=speculative, **kw)
        data["policies"]["expert_cache"] = {"name": "all_resident"}  # no loads: durations follow the work
        data["hardware"]["expert_memory"] = {"all": True}
        data["model"]["spec"]["top_k"] = 4  # every token uses every expert: routing cannot change a timing
        runs.append(simulate(load(data, tmp_path)))
    plain, spec = runs
    cols = ["num_prefill_seqs", "num_decode_seqs"]
    assert plain.iterations[cols].equals(spec.iterations[cols])
    assert (spec.iterations["accepted_tokens"] == 0).all()
    decode = spec.iterations["num_prefill_seqs"] == 0
    assert (spec.iterations.loc[decode, "emitted_tokens"] == spec.iterations.loc[decode, "num_decode_seqs"]).all()
    longer = spec.iterations.loc[decode, "duration_s"].to_numpy() - plain.iterations.loc[decode, "duration_s"].to_numpy()
    drafting = spec.iterations.loc[decode, "drafted_tokens"].to_numpy() > 0
    assert (longer[drafting] > 0).all() and longer[~drafting] == pytest.approx(0.0, abs=1e-18)
    assert (spec.requests["generated_tokens"] == 6).all()


# ---------------------------------------------------------------- verification accounting


def test_full_acceptance_emits_k_plus_one_tokens_per_step_by_hand(tmp_path):
    """Prompt 8, output 9, k = 3, everything accepted: prefill emits token 1; step 1 verifies 4 tokens
    (k_i = min(3, 9 - 1 - 1)) and emits 4; step 2 verifies 4 (k_i = min(3, 3)) and emits 4: 9 tokens in 3
    iterations. TBT: the first token of a step has the step's gap, the 3 delivered with it 0."""
    data = offload_data(tmp_path, speculative=spec_block(3, {"kind": "fixed", "rate": 1.0}), prompt_tokens=8,
                        output_tokens=9, max_requests=1)
    result = simulate(load(data, tmp_path))
    it = result.iterations
    assert it["num_tokens"].tolist() == [8, 4, 4]
    assert it["drafted_tokens"].tolist() == [0, 3, 3]
    assert it["accepted_tokens"].tolist() == [0, 3, 3]
    assert it["emitted_tokens"].tolist() == [1, 4, 4]
    req = result.requests.iloc[0]
    assert req["generated_tokens"] == 9 and req["status"] == "completed"
    gaps = it["duration_s"].tolist()
    assert result.tbt_samples_s.tolist() == pytest.approx([gaps[1], 0, 0, 0, gaps[2], 0, 0, 0])
    assert req["tpot_s"] == pytest.approx((gaps[1] + gaps[2]) / 8)
    assert req["ttft_s"] == pytest.approx(gaps[0])
    # The draft prefills with the target and drafts after step 1; after the last step nothing is left to draft.
    assert it["draft_s"].gt(0).tolist() == [True, True, False]


def test_draft_stops_at_the_end_of_the_output(tmp_path):
    """Output 3, k = 4: step 1 drafts min(4, 3 - 1 - 1) = 1 token and emits 2; nothing is drafted past the end."""
    data = offload_data(tmp_path, speculative=spec_block(4, {"kind": "fixed", "rate": 1.0}), output_tokens=3)
    it = simulate(load(data, tmp_path)).iterations
    assert it["drafted_tokens"].tolist() == [0, 1]
    assert it["num_tokens"].tolist()[1] == 2


def test_verifying_k_plus_one_tokens_costs_a_chunk_of_k_plus_one():
    """The verify pass of a sequence with c cached tokens and k + 1 queries is timed like a prefill chunk of
    k + 1 tokens at context c (the target computes exactly that), LM head over all k + 1 positions."""
    model = tiny_model(num_experts=4, top_k=2)
    counts = np.array([[3, 2, 2, 1], [4, 0, 2, 2]], dtype=np.int64)
    cache = lambda: make_cache("all_resident", num_layers=2, num_experts=4, capacity_experts=8, per_layer=False)  # noqa: E731
    e = np.zeros(0, dtype=np.int64)
    verify = VerifyBatchShape(e, e, e, 4, verify_context_tokens=np.array([9]), verify_query_tokens=np.array([4]))
    chunk = BatchShape(np.array([4]), np.array([9]), e, 4)
    t_verify = time_plan(VerifyIterationPlanner(model=model, profile=TOY, cache=cache()).plan(verify, counts))
    t_chunk = time_plan(IterationPlanner(model=model, profile=TOY, cache=cache()).plan(chunk, counts))
    assert verify.num_tokens == 4
    assert t_verify.duration_s == pytest.approx(t_chunk.duration_s, rel=1e-12)


def test_acceptance_draws():
    rng = np.random.default_rng(1)
    fixed = AcceptanceModel(FixedAcceptance(rate=0.5), rng)
    drawn = fixed.draw([None] * 20000, np.full(20000, 3))
    assert drawn.min() >= 0 and drawn.max() <= 3
    assert drawn.mean() + 1 == pytest.approx(1 + 0.5 + 0.25 + 0.125, abs=0.03)  # 1.875 tokens per step
    assert fixed.draw([None, None], np.array([0, 0])).tolist() == [0, 0]
    per_task = AcceptanceModel(PerTaskAcceptance(kind="per_task", rates={"a": 1.0}, default_rate=0.0), rng)
    assert per_task.draw(["a", "b", None], np.array([2, 2, 2])).tolist() == [2, 0, 0]
    empirical = AcceptanceModel(EmpiricalAcceptance(kind="empirical", run_lengths=[5]), rng)
    assert empirical.draw([None, None], np.array([2, 7])).tolist() == [2, 5]


def test_same_seed_same_run(tmp_path):
    data = offload_data(tmp_path, speculative=spec_block(2), offload={"attention": {"decode": "cpu"}, "micro_batches": 2},
                        prompt_tokens=10, output_tokens=8, max_requests=5, rate_per_s=5.0)
    a, b = simulate(load(data, tmp_path)), simulate(load(data, tmp_path))
    assert a.requests.equals(b.requests) and a.iterations.equals(b.iterations)


# ---------------------------------------------------------------- memory: where the KV cache lives


def test_cpu_attention_moves_the_kv_cache_to_host_memory(tmp_path):
    gpu_data = offload_data(tmp_path)
    gpu_data["policies"]["offload"] = {"micro_batches": 2}
    on_gpu = plan_offload_memory(load(gpu_data, tmp_path), None, pipelined=True)
    cpu_data = offload_data(tmp_path, offload={"attention": {"decode": "cpu"}})
    loaded = load(cpu_data, tmp_path)
    on_host = plan_offload_memory(loaded, None, pipelined=True)
    model = loaded.model
    block = 16 * model.kv_bytes_per_token
    assert on_gpu.kv_block_bytes == block and on_gpu.host_kv_block_bytes == 0 and not on_gpu.kv_on_host
    assert on_host.kv_block_bytes == 0 and on_host.host_kv_block_bytes == block and on_host.kv_on_host
    # The host holds every routed expert; the rest of hardware.host_memory_bytes is KV blocks.
    assert on_host.kv_blocks == int((1.0e8 - model.routed_expert_bytes_total) // block)
    # A GPU draft keeps its KV on the GPU: the GPU's share of a block is the draft's.
    from sim.spec import ModelSpec

    draft = ModelSpec.model_validate(DRAFT)
    with_draft = plan_offload_memory(loaded, draft, pipelined=True)
    assert with_draft.kv_block_bytes == 16 * draft.kv_bytes_per_token
    assert with_draft.host_kv_block_bytes == block


def test_cpu_work_without_a_host_profile_is_a_clear_error(tmp_path):
    data = offload_data(tmp_path, offload={"attention": {"decode": "cpu"}}, host=False)
    with pytest.raises(ScenarioError, match=r"hardware\.host_profile: policies\.offload\.attention runs on the CPU"):
        simulate(load(data, tmp_path))


def test_prefill_on_cpu_with_decode_on_gpu_is_rejected(tmp_path):
    data = offload_data(tmp_path, offload={"attention": {"prefill": "cpu", "decode": "gpu"}})
    with pytest.raises(ScenarioError, match=r"policies\.offload\.attention: prefill on cpu with decode on gpu"):
        load(data, tmp_path)


# ---------------------------------------------------------------- the pipelined engine


def test_cpu_attention_run_records_cpu_work_and_host_kv(tmp_path):
    data = offload_data(tmp_path, speculative=spec_block(2), prompt_tokens=10, output_tokens=8, max_requests=4,
                        offload={"attention": {"decode": "cpu"}, "micro_batches": 2, "stream_experts": "all"})
    result = simulate(load(data, tmp_path))
    assert (result.requests["status"] == "completed").all()
    decode = result.iterations[result.iterations["num_prefill_seqs"] == 0]
    assert (decode["cpu_attention_s"] > 0).all() and (decode["act_transfer_s"] > 0).all()
    assert (decode["h2d_weights_s"] > 0).all()
    assert result.extra["offload"]["kv_on_host"] and result.extra["offload"]["host_kv_capacity_bytes"] > 0


def _fiddler(host_yaml: str) -> dict:
    model = tiny_model(hidden_size=1024, expert_ffn_size=4096, num_experts=4, top_k=1, num_layers=1)
    cache = make_cache("lru", num_layers=1, num_experts=4, capacity_experts=1, per_layer=False)
    host = parse_profile(host_yaml, origin="host.yaml")
    it = PipelinedIteration(model=model, profile=TOY, host=host, cache=cache, offload=OffloadSpec(cpu_experts=True))
    e = np.zeros(0, dtype=np.int64)
    mb = MicroBatch(e, e, np.array([5, 5]), np.array([1, 1]), 2)
    _, stats = it.plan([mb], [np.array([[1, 1, 0, 0]])])
    return stats


def test_fiddler_runs_a_non_resident_expert_on_the_cpu_only_when_that_is_faster():
    """Expert of 3 x 1024 x 4096 x 2 B = 25.2 MB: a fetch costs 1 ms + 2.5 ms; on the toy CPU it computes in
    25 us and its activations cross in 2 x ~1 ms, so expert 1 (not resident) runs on the CPU; on a CPU
    1000x slower it costs 25 ms, so it is fetched."""
    assert _fiddler(TOY_PROFILE_YAML)["cpu_experts"] == 1
    slow = TOY_PROFILE_YAML.replace("peak_tflops: {bf16: 1.0}, memory_bandwidth_gbps: 1000.0",
                                    "peak_tflops: {bf16: 0.001}, memory_bandwidth_gbps: 1.0")
    stats = _fiddler(slow)
    assert stats["cpu_experts"] == 0 and stats["loads"] == 1


# ---------------------------------------------------------------- moesim tune


def test_tune_cli_writes_table_best_configuration_and_report(tmp_path, capsys):
    data = offload_data(tmp_path, speculative=spec_block(2), prompt_tokens=10, output_tokens=8, max_requests=4,
                        rate_per_s=1e6)
    data["hardware"]["host_memory_bytes"] = 1.0e9
    data["tune"] = {"strategies": ["offload", "moe_lightning", "fiddler", "specmoeoff"], "draft_lengths": [1, 3],
                    "batch_sizes": [2], "micro_batches": [1, 2], "max_requests": 4}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    html = tmp_path / "tune.html"
    assert main(["tune", str(path), "--out", str(tmp_path / "out"), "--report", str(html), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best: " in out
    result = yaml.safe_load((tmp_path / "out" / "tune.json").read_text())
    assert result["configurations"] == 1 + 2 + 1 + 2 * 2  # moe_lightning: x2 micro-batches; specmoeoff: x2 k too
    ks = {r["k"] for r in result["table"] if r["strategy"] == "specmoeoff" and r.get("sim_tokens_per_s")}
    assert ks == {1, 3}  # the curve over k is simulated at every k
    best = result["best"]
    assert best["sim_tokens_per_s"] == max(r["sim_tokens_per_s"] or 0 for r in result["table"])
    text = html.read_text()
    assert "Throughput against the draft length k" in text and "Per-iteration breakdown" in text


def test_empirical_acceptance_from_a_file(tmp_path):
    """Run lengths 3 and 3 (a comment and a blank line ignored), k = 2: every step accepts both drafts."""
    (tmp_path / "runs.txt").write_text("# accepted run lengths\n3\n\n3\n")
    data = offload_data(tmp_path, speculative=spec_block(2, {"kind": "empirical", "path": "runs.txt"}),
                        output_tokens=7, max_requests=1)
    it = simulate(load(data, tmp_path)).iterations
    assert it["accepted_tokens"].tolist() == [0, 2, 2] and it["emitted_tokens"].tolist() == [1, 3, 3]
    (tmp_path / "runs.txt").write_text("3\nmany\n")
    with pytest.raises(ScenarioError, match=r"runs\.txt:2: expected a whole number >= 0"):
        simulate(load(data, tmp_path))


def test_a_cpu_draft_is_timed_by_the_host_profile_and_keeps_its_kv_on_the_host(tmp_path):
    """A host 1000x slower than the toy GPU makes every draft pass slower; its KV leaves the GPU."""
    slow = TOY_PROFILE_YAML.replace("peak_tflops: {bf16: 1.0}, memory_bandwidth_gbps: 1000.0",
                                    "peak_tflops: {bf16: 0.001}, memory_bandwidth_gbps: 1.0").replace("toy-round", "slow-host")
    (tmp_path / "slow-host.yaml").write_text(slow)
    runs = {}
    for placement in ("gpu", "cpu"):
        data = offload_data(tmp_path, speculative=spec_block(2, {"kind": "fixed", "rate": 1.0}, placement=placement),
                            output_tokens=7)
        data["hardware"]["host_profile"] = str(tmp_path / "slow-host.yaml")
        runs[placement] = simulate(load(data, tmp_path))
    gpu_draft, cpu_draft = runs["gpu"].iterations["draft_s"], runs["cpu"].iterations["draft_s"]
    assert (cpu_draft[gpu_draft > 0] > 100 * gpu_draft[gpu_draft > 0]).all()
    assert runs["cpu"].budget.kv_block_bytes == 16 * runs["cpu"].loaded.model.kv_bytes_per_token  # target only
    assert runs["cpu"].budget.host_kv_block_bytes > 0 and not runs["cpu"].budget.draft_on_gpu
    data = offload_data(tmp_path, speculative=spec_block(2, placement="cpu"), host=False)
    with pytest.raises(ScenarioError, match="draft_placement: cpu runs on the CPU"):
        simulate(load(data, tmp_path))


@settings(max_examples=12, deadline=None)
@given(k=st.integers(0, 4), rate=st.sampled_from([0.0, 0.5, 1.0]), output=st.integers(1, 9),
       pipelined=st.booleans(), seed=st.integers(0, 1000))
def test_every_request_gets_exactly_its_tokens_in_order(tmp_path_factory, k, rate, output, pipelined, seed):
    """Invariants for any k and acceptance: every request completes with exactly its output tokens; the first
    token comes after arrival, the last at its finish; one TBT sample per token after the first; a step never
    emits more than k + 1 tokens per sequence."""
    tmp_path = tmp_path_factory.mktemp("inv")
    offload = {"attention": {"decode": "cpu"}, "micro_batches": 2} if pipelined else None
    data = offload_data(tmp_path, speculative=spec_block(k, {"kind": "fixed", "rate": rate}), offload=offload,
                        prompt_tokens=6, output_tokens=output, max_requests=4, rate_per_s=50.0, seed=seed)
    result = simulate(load(data, tmp_path))
    req = result.requests
    assert (req["status"] == "completed").all() and (req["generated_tokens"] == output).all()
    assert (req["first_token_at_s"] > req["arrived_at_s"]).all()
    assert (req["finished_at_s"] >= req["first_token_at_s"]).all()
    assert len(result.tbt_samples_s) == len(req) * (output - 1)
    decode = result.iterations[result.iterations["num_prefill_seqs"] == 0]
    assert (decode["emitted_tokens"] <= (k + 1) * decode["num_decode_seqs"]).all()
    assert (result.iterations["accepted_tokens"] <= result.iterations["drafted_tokens"]).all()


# ---------------------------------------------------------------- the batch token budget counts k_i + 1


def test_the_token_budget_counts_every_verified_position_by_hand(tmp_path):
    """4 requests (prompt 2, output 9, arriving just after one another), k = 3, everything accepted,
    max_batch_tokens 10, max_num_seqs 4. A decode gets min(k_i, budget left - 1 - decodes still to come) drafts.
    1: req 1 prefills (2 tokens). 2: req 1 verifies 1 + min(3, 10 - 1 - 0) = 4 tokens, reqs 2-4 prefill 2 each
    (10); req 1 has 5 tokens. 3: req 1 4 tokens (6 left), req 2 1 + min(3, 6 - 1 - 2) = 4 (2 left), req 3
    1 + min(3, 2 - 1 - 1) = 1, req 4 1 + 0 = 1: 10 tokens where counting 1 per decode would verify 16; req 1 is
    done (9), req 2 has 5, reqs 3-4 have 2. 4: req 2 4 (6 left), req 3 1 + min(3, 6 - 1 - 1) = 4 (2 left), req 4
    1 + min(3, 2 - 1) = 2: 10. 5: req 3 (6 tokens) 1 + min(9 - 6 - 1, ...) = 3, req 4 (4) 4: 7. 6: req 4 (8) 1."""
    data = offload_data(tmp_path, speculative=spec_block(3, {"kind": "fixed", "rate": 1.0}), prompt_tokens=2,
                        output_tokens=9, max_requests=4, rate_per_s=1e9)
    data["policies"]["batching"] = {"max_num_seqs": 4, "max_batch_tokens": 10}
    result = simulate(load(data, tmp_path))
    it = result.iterations
    assert it["num_prefill_seqs"].tolist() == [1, 3, 0, 0, 0, 0]
    assert it["num_decode_seqs"].tolist() == [0, 1, 4, 3, 2, 1]
    assert it["num_tokens"].tolist() == [2, 10, 10, 10, 7, 1]
    assert it["drafted_tokens"].tolist() == [0, 3, 6, 7, 5, 0]
    assert it["emitted_tokens"].tolist() == [1, 7, 10, 10, 7, 1]
    assert (result.requests["generated_tokens"] == 9).all()


# ---------------------------------------------------------------- the draft's KV split between GPU and host


SLOW_HOST = TOY_PROFILE_YAML.replace("peak_tflops: {bf16: 1.0}, memory_bandwidth_gbps: 1000.0",
                                     "peak_tflops: {bf16: 0.001}, memory_bandwidth_gbps: 1.0").replace("toy-round", "slow-host")


def _split_spec(k: int, fraction: float | None, rate: float = 0.6) -> dict:
    block = spec_block(k, {"kind": "fixed", "rate": rate})
    if fraction is not None:
        block["draft_kv_gpu_fraction"] = fraction
    return block


def test_draft_kv_fraction_one_is_todays_engine_exactly(tmp_path):
    """1.0 is the default: the same run with the key given or not, and no host profile needed for it."""
    kw = dict(prompt_tokens=12, output_tokens=7, max_requests=8, rate_per_s=3.0)
    default = simulate(load(offload_data(tmp_path, speculative=_split_spec(2, None), host=False, **kw), tmp_path))
    one = simulate(load(offload_data(tmp_path, speculative=_split_spec(2, 1.0), host=False, **kw), tmp_path))
    assert default.iterations["draft_s"].gt(0).any()
    assert default.requests.equals(one.requests) and default.iterations.equals(one.iterations)
    assert np.array_equal(default.tbt_samples_s, one.tbt_samples_s)
    assert one.budget.host_kv_block_bytes == 0 and one.budget.draft_kv_gpu_fraction == 1.0


def test_draft_kv_split_memory_by_hand(tmp_path):
    """Target KV 2 layers x 2 (K, V) x 2 heads x 32 x 2 B = 512 B/token, draft KV 1 x 2 x 1 x 32 x 2 = 128 B.
    Fraction 0.25: a 16-token block holds 16 x (512 + 32) = 8704 B on the GPU and 16 x 96 = 1536 B on the
    host; with CPU decode attention the target's 512 B/token joins the draft's 96 B on the host."""
    from sim.spec import ModelSpec

    draft = ModelSpec.model_validate(DRAFT)
    loaded_all = load(offload_data(tmp_path, speculative=_split_spec(2, 1.0)), tmp_path)
    loaded = load(offload_data(tmp_path, speculative=_split_spec(2, 0.25)), tmp_path)
    assert loaded.model.kv_bytes_per_token == 512 and draft.kv_bytes_per_token == 128
    all_gpu = plan_offload_memory(loaded_all, draft, pipelined=False)
    split = plan_offload_memory(loaded, draft, pipelined=False)
    assert all_gpu.kv_block_bytes == 16 * 640 and all_gpu.host_kv_block_bytes == 0
    assert split.kv_block_bytes == 8704 and split.host_kv_block_bytes == 1536
    gpu_free = split.gpu_bytes - split.non_expert_bytes - split.expert_slots * split.expert_slot_bytes \
        - split.reserve_bytes - split.draft_weight_bytes
    host_free = 1.0e8 - loaded.model.routed_expert_bytes_total
    assert all_gpu.kv_blocks == int(gpu_free // (16 * 640))
    assert split.kv_blocks == min(int(gpu_free // 8704), int(host_free // 1536))
    assert int(gpu_free // 8704) > all_gpu.kv_blocks  # the GPU got the moved draft KV back (the host binds here)
    cpu_attn = load(offload_data(tmp_path, speculative=_split_spec(2, 0.25), offload={"attention": {"decode": "cpu"}}),
                    tmp_path)
    both = plan_offload_memory(cpu_attn, draft, pipelined=True)
    assert both.kv_block_bytes == 16 * 32 and both.host_kv_block_bytes == 16 * (512 + 96)
    assert both.kv_blocks == min(int((gpu_free - both.staging_bytes) // (16 * 32)), int(host_free // (16 * 608)))


def test_draft_attention_over_the_host_part_is_timed_by_the_host_profile():
    """Two sequences catch up one token each at contexts 10 and 30; fraction 0.5 keeps the first on the GPU
    (10 <= 0.5 x 40) and the second on the host. The one-layer draft's pass = the all-GPU pass without the
    host sequence's GPU attention, plus what its chain (QKV down: (32 + 64) x 2 B, the host's attention of 1
    query over 30 tokens, output up: 32 x 2 B) takes beyond the GPU part's attention core."""
    from sim.engine.draft_kv import HostDraftAttention, split_by_batch
    from sim.engine.speculative import DraftCost
    from sim.spec import ModelSpec

    draft = ModelSpec.model_validate(DRAFT)
    host = parse_profile(SLOW_HOST, origin="slow-host.yaml")
    shape = draft.attention_shape
    ctx, tokens = np.array([10, 30]), np.array([1, 1])
    assert split_by_batch(ctx, 0.5).tolist() == [False, True]
    assert split_by_batch(ctx, 0.2).tolist() == [True, True] and split_by_batch(ctx, 1.0).tolist() == [False, False]
    kw = dict(prefill_new=np.zeros(0, np.int64), prefill_ctx=np.zeros(0, np.int64), catchup_ctx=ctx,
              catchup_tokens=tokens, next_ctx=ctx + 1, next_drafts=np.array([1, 1]))
    all_gpu = DraftCost(draft, TOY).step_s(**kw)
    split_cost = DraftCost(draft, TOY, HostDraftAttention(draft, TOY, host, chunked=True), 0.5)
    host_flags = split_cost.split(kw["next_ctx"])
    split = split_cost.step_s(**kw, catchup_host=host_flags, next_host=host_flags)
    core = lambda c: float(TOY.attention_prefill_s(new_tokens=np.array([1]), context_tokens=np.array([c]), shape=shape).sum())  # noqa: E731
    chain = (float(TOY.d2h_copy_s(nbytes=192.0)) + float(host.attention_prefill_s(
        new_tokens=np.array([1]), context_tokens=np.array([30]), shape=shape).sum()) + float(TOY.h2d_copy_s(nbytes=64.0)))
    assert chain > 100 * core(30)  # the slow host dominates
    assert split == pytest.approx(all_gpu - core(30) + (chain - core(10)), rel=1e-12)
    # Decode passes (k = 3: two more single-query passes) put the same sequence on the host.
    kw3 = {**kw, "next_drafts": np.array([3, 3])}
    assert split_cost.step_s(**kw3, catchup_host=host_flags, next_host=host_flags) > DraftCost(draft, TOY).step_s(**kw3) + 2 * chain


def test_draft_kv_split_runs_end_to_end_and_needs_a_host_profile(tmp_path):
    (tmp_path / "slow-host.yaml").write_text(SLOW_HOST)
    runs = {}
    for fraction in (1.0, 0.5):
        data = offload_data(tmp_path, speculative=_split_spec(2, fraction, rate=1.0), output_tokens=7, max_requests=3,
                            rate_per_s=1e9)
        data["hardware"]["host_profile"] = str(tmp_path / "slow-host.yaml")
        runs[fraction] = simulate(load(data, tmp_path))
    one, half = runs[1.0], runs[0.5]
    assert one.iterations["num_tokens"].tolist() == half.iterations["num_tokens"].tolist()
    assert (half.iterations["draft_s"] >= one.iterations["draft_s"]).all()
    assert (half.iterations["draft_s"] > one.iterations["draft_s"]).any()
    assert half.budget.host_kv_block_bytes == 16 * 64 and half.budget.draft_kv_gpu_fraction == 0.5
    data = offload_data(tmp_path, speculative=_split_spec(2, 0.5), host=False)
    with pytest.raises(ScenarioError, match=r"hardware\.host_profile: policies\.speculative\.draft_kv_gpu_fraction < 1"):
        simulate(load(data, tmp_path))
    bad = offload_data(tmp_path, speculative={**_split_spec(2, 0.5), "draft_placement": "cpu"})
    with pytest.raises(ScenarioError, match="draft_kv_gpu_fraction < 1 needs draft_placement: gpu"):
        load(bad, tmp_path)
