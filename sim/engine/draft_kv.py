"""The draft model's KV cache split between GPU and host memory (SpecMoEOff, PAPERS.md section 2.2).

SpecMoEOff keeps the draft model's weights on the GPU but splits its KV cache *by batch*: the sequences of
the GPU part attend on the GPU, those of the CPU part keep their draft KV in host memory and their draft
attention runs on the CPU (the hidden states cross PCIe, the KV never does), and the two parts run at the
same time. ``policies.speculative.draft_kv_gpu_fraction`` is the share of the draft's KV held on the GPU;
the memory budget (``sim.engine.offload``) gives each cached token ``fraction x`` its draft KV bytes on the
GPU and the rest on the host.

Which sequences are on the host (``split_by_batch``): in batch order, the longest prefix whose cached tokens
add up to at most ``fraction x`` the batch's cached tokens stays on the GPU, the rest are on the host, so the
GPU part never holds more than its budgeted share. The paper moves sequences between the parts as their KV
grows (a dynamic ratio); here the share is fixed per run and the split recomputed each step.

Timing of one draft pass (``HostDraftAttention``): per layer, the host part's queries/keys/values cross to the
host (activation D2H), the host profile times its attention (``verify_attention_s``: a chunk of ``q`` queries
over the cached prefix, or a decode step; ``policies.offload.cpu_attention_kernel`` as for the target), the
output crosses back (activation H2D); this chain overlaps the GPU's attention core of the GPU part, and the
layer's FFN waits for both. The draft's prompt prefill runs wholly on the GPU (as in the paper); copying a
host-part sequence's prompt KV down to host memory is not timed."""

from __future__ import annotations

import numpy as np

from sim.engine.speculative import verify_attention_s
from sim.profile import HardwareProfile
from sim.spec import ModelSpec
from sim.work import dtype_bytes


def split_by_batch(context_tokens: np.ndarray, gpu_fraction: float) -> np.ndarray:
    """True for the sequences whose draft KV lives on the host (see the module docstring for the rule)."""
    ctx = np.asarray(context_tokens, dtype=np.int64)
    host = np.zeros(len(ctx), dtype=bool)
    if gpu_fraction >= 1.0 or not len(ctx):
        return host
    cum = np.cumsum(ctx)
    on_gpu = int(np.searchsorted(cum, gpu_fraction * float(cum[-1]), side="right"))
    host[on_gpu:] = True
    return host


class HostDraftAttention:
    """Seconds of the draft's attention over its host part, per layer, and how much it adds to a pass."""

    def __init__(self, model: ModelSpec, gpu: HardwareProfile, host: HardwareProfile, *, chunked: bool) -> None:
        self.gpu = gpu
        self.host = host
        self.chunked = chunked
        self.shape = model.attention_shape
        self.window = model.sliding_window_tokens
        sliding = set(model.sliding_layer_indices)
        self.num_sliding = len(sliding)
        self.num_full = model.num_layers - self.num_sliding
        act = dtype_bytes(self.shape.act_dtype)
        q_out = self.shape.num_heads * self.shape.qk_head_dim
        kv_out = int(self.shape.kv_bytes_per_token // dtype_bytes(model.kv_dtype))  # K and V widths together
        self.qkv_bytes_per_token = (q_out + kv_out) * act
        self.out_bytes_per_token = self.shape.num_heads * self.shape.v_head_dim * act

    def layer_s(self, context_tokens: np.ndarray, query_tokens: np.ndarray, *, sliding: bool = False) -> float:
        """QKV down, CPU attention, output up: one layer of the host part (0 when it is empty)."""
        ctx = np.asarray(context_tokens, dtype=np.int64)
        q = np.asarray(query_tokens, dtype=np.int64)
        if not len(q):
            return 0.0
        if sliding and self.window:
            ctx = np.minimum(ctx, self.window)
        tokens = float(q.sum())
        return (float(self.gpu.d2h_copy_s(nbytes=tokens * self.qkv_bytes_per_token))
                + verify_attention_s(self.host, context_tokens=ctx, query_tokens=q, shape=self.shape, chunked=self.chunked)
                + float(self.gpu.h2d_copy_s(nbytes=tokens * self.out_bytes_per_token)))

    def extra_s(self, gpu_core_s: dict[bool, float], context_tokens: np.ndarray, query_tokens: np.ndarray) -> float:
        """Seconds the host part adds to a pass: per layer, what its chain takes beyond the GPU part's attention
        core (``gpu_core_s[sliding]``, the GPU's work in the same window)."""
        extra = 0.0
        for sliding, layers in ((False, self.num_full), (True, self.num_sliding)):
            if layers:
                host_s = self.layer_s(context_tokens, query_tokens, sliding=sliding)
                extra += layers * max(0.0, host_s - gpu_core_s[sliding])
        return extra


__all__ = ["HostDraftAttention", "split_by_batch"]
