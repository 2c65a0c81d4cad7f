"""A fast analytical (roofline) estimate of offloaded MoE decoding, after SpecMoEOff Sec. 3 / MoE-Lightning's HRM.

Used by ``moesim tune`` to prune configurations before simulating them, and pinned by tests to the
papers' hand-checkable numbers. Everything comes from the ModelSpec (sizes) and the profiles (latencies);
nothing is fitted here. Steady-state decode of ``b`` sequences at mean context ``c``, verifying ``k + 1``
tokens each, per MoE layer:

* weights: the non-resident experts the layer needs, copied over PCIe (``h2d_copy_s`` each);
* GPU: projections, gate and the experts' FFNs of ``b (k + 1)`` tokens;
* attention: ``verify_attention_s`` on the GPU or the host CPU profile, plus activations crossing PCIe.

With ``micro_batches >= 2`` the three resources overlap (MoE-Lightning's ``max``); with one micro-batch the
GPU and CPU work of a layer is serial and only the weight copies overlap it (double buffering)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.engine.draft_kv import HostDraftAttention
from sim.engine.speculative import DraftCost, verify_attention_s
from sim.profile import HardwareProfile
from sim.spec import ModelSpec
from sim.work import dtype_bytes


def kv_bytes_per_request(model: ModelSpec, prompt_tokens: float, output_tokens: float) -> float:
    """KV-cache bytes of one request at its longest (prompt + output tokens, every layer)."""
    return float(model.kv_bytes_per_token) * (prompt_tokens + output_tokens)


def max_batch_in_memory(model: ModelSpec, kv_memory_bytes: float, prompt_tokens: float, output_tokens: float) -> int:
    """Largest batch whose KV caches fit ``kv_memory_bytes`` at full length (SpecMoEOff's step 1)."""
    return int(kv_memory_bytes // kv_bytes_per_request(model, prompt_tokens, output_tokens))


def layer_transfer_s(model: ModelSpec, profile: HardwareProfile, num_experts: int) -> float:
    """Seconds to copy ``num_experts`` experts of one layer over the host-to-device link (one copy each)."""
    return num_experts * float(profile.h2d_copy_s(nbytes=model.expert_bytes, pinned=True))


def gpu_utilisation_streaming(model: ModelSpec, profile: HardwareProfile, batch: int, dtype: str = "bf16") -> float:
    """Fraction of GPU peak used when every expert streams over PCIe and serves ``batch`` tokens
    (SpecMoEOff Sec. 3: (top_k * b / E) * B_h2d / P_gpu, 2 FLOP per weight per token, weights of ``dtype``)."""
    flops_per_byte = 2.0 * model.top_k * batch / model.num_experts / dtype_bytes(dtype)
    return flops_per_byte * profile.links.host_to_device.bandwidth_gbps * 1e9 / (profile.gpu.peak_tflops[dtype] * 1e12)


def expected_distinct_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Mean number of experts used at least once by ``tokens`` tokens choosing ``top_k`` of ``num_experts`` uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass(frozen=True, slots=True)
class RooflineEstimate:
    iteration_s: float
    tokens_per_iteration: float
    weights_s: float  # per iteration
    gpu_s: float
    cpu_s: float
    draft_s: float

    @property
    def throughput_tokens_per_s(self) -> float:
        return self.tokens_per_iteration / self.iteration_s if self.iteration_s > 0 else 0.0

    @property
    def bound(self) -> str:
        parts = {"PCIe weights": self.weights_s, "GPU": self.gpu_s, "CPU": self.cpu_s}
        return max(parts, key=parts.get)


def estimate_decode(
    *, model: ModelSpec, profile: HardwareProfile, host: HardwareProfile | None, batch: int, context_tokens: float,
    draft_length: int, emitted_per_step: float, micro_batches: int, attention_decode: str, cpu_experts: bool,
    resident_experts: int, stream_all: bool, draft: ModelSpec | None = None, draft_profile: HardwareProfile | None = None,
    cpu_chunked: bool = True, draft_kv_gpu_fraction: float = 1.0,
) -> RooflineEstimate:
    """One steady-state decode iteration of ``batch`` sequences (see the module docstring).
    ``draft_kv_gpu_fraction`` < 1 (needs ``host``): the draft's KV is split by batch (``sim.engine.draft_kv``)."""
    E, L, k = model.num_experts, model.num_moe_layers, draft_length
    tokens = batch * (k + 1)
    resident_per_layer = min(E, resident_experts // L)
    used = expected_distinct_experts(E, model.top_k, tokens)
    per_expert = tokens * model.top_k / max(used, 1e-9)
    non_resident_used = used * (E - resident_per_layer) / E
    fetch = (E - resident_per_layer) if stream_all else non_resident_used
    load_s = float(profile.h2d_copy_s(nbytes=model.expert_bytes))
    gpu_ffn_s = float(profile.expert_ffn_s(tokens=max(1, round(per_expert)), shape=model.expert_shape))
    cpu_layer_s = 0.0
    if cpu_experts and host is not None:
        hidden_bytes = per_expert * model.hidden_size * dtype_bytes("bf16")
        cpu_one = (float(host.expert_ffn_s(tokens=max(1, round(per_expert)), shape=model.expert_shape))
                   + float(profile.d2h_copy_s(nbytes=hidden_bytes)) + float(profile.h2d_copy_s(nbytes=hidden_bytes)))
        if cpu_one < load_s + gpu_ffn_s:  # Fiddler's rule, per non-resident expert
            cpu_layer_s += non_resident_used * cpu_one
            fetch = max(0.0, fetch - non_resident_used)
            used_gpu = used - non_resident_used
        else:
            used_gpu = used
    else:
        used_gpu = used
    weights_layer_s = fetch * load_s
    proj_s = sum(float(profile.dense_gemm_s(tokens=tokens, shape=s)) for s in model.attention_projection_shapes)
    gpu_layer_s = proj_s + float(profile.gate_s(tokens=tokens, shape=model.router_shape)) + used_gpu * gpu_ffn_s
    ctx = np.full(batch, int(round(context_tokens)), dtype=np.int64)
    q = np.full(batch, k + 1, dtype=np.int64)
    if attention_decode == "cpu":
        assert host is not None
        cpu_layer_s += verify_attention_s(host, context_tokens=ctx, query_tokens=q, shape=model.attention_shape,
                                          chunked=cpu_chunked)
        act = tokens * 3 * model.hidden_size * dtype_bytes("bf16")
        cpu_layer_s += float(profile.h2d_copy_s(nbytes=act))  # activations both ways, same link model
    else:
        gpu_layer_s += verify_attention_s(profile, context_tokens=ctx, query_tokens=q, shape=model.attention_shape)
    if micro_batches >= 2:
        layer_s = max(weights_layer_s, gpu_layer_s, cpu_layer_s)
    else:
        layer_s = max(weights_layer_s, gpu_layer_s + cpu_layer_s)
    draft_s = 0.0
    if draft is not None and k > 0:
        host_attention = None
        if draft_kv_gpu_fraction < 1.0 and host is not None:
            host_attention = HostDraftAttention(draft, profile, host, chunked=cpu_chunked)
        cost = DraftCost(draft, draft_profile or profile, host_attention, draft_kv_gpu_fraction)
        ks = np.full(batch, k, dtype=np.int64)
        emitted_each = np.full(batch, max(1, round(emitted_per_step)), dtype=np.int64)
        on_host = cost.split(ctx + emitted_each)
        draft_s = cost.step_s(prefill_new=np.zeros(0, np.int64), prefill_ctx=np.zeros(0, np.int64),
                              catchup_ctx=ctx, catchup_tokens=emitted_each, next_ctx=ctx + emitted_each, next_drafts=ks,
                              catchup_host=on_host, next_host=on_host)
    emitted = batch * emitted_per_step
    iteration_s = L * layer_s + draft_s
    return RooflineEstimate(iteration_s, emitted, L * weights_layer_s, L * gpu_layer_s, L * cpu_layer_s, draft_s)


__all__ = [
    "RooflineEstimate", "estimate_decode", "expected_distinct_experts", "gpu_utilisation_streaming",
    "kv_bytes_per_request", "layer_transfer_s", "max_batch_in_memory",
]
