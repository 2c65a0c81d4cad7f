"""How much work an operation is: FLOPs and bytes moved, as vectorised pure functions.

The one place for these formulas: ``sim.spec`` uses them to describe a model and
``sim.profile`` uses them to turn a roofline into a latency. Arguments are arrays or scalars
(numpy broadcasting); results are float64 arrays. Nothing here knows about hardware."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    # MXFP4: 4-bit values plus one 8-bit scale per 32 values.
    "mxfp4": 0.5 + 1.0 / 32.0,
}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a named dtype; unknown names raise KeyError listing the choices."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise KeyError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


@dataclass(frozen=True, slots=True)
class ExpertShape:
    """One expert FFN: ``num_matrices`` weight matrices of hidden x ffn (3 for gated SwiGLU, 2 for a plain MLP)."""

    hidden: int
    ffn: int
    num_matrices: int
    weight_dtype: str
    act_dtype: str = "bf16"

    @property
    def params(self) -> int:
        return self.num_matrices * self.hidden * self.ffn

    @property
    def weight_bytes(self) -> float:
        return self.params * dtype_bytes(self.weight_dtype)

    def flops(self, tokens: np.ndarray | float) -> np.ndarray:
        return 2.0 * np.asarray(tokens, dtype=np.float64) * self.params

    def bytes_moved(self, tokens: np.ndarray | float) -> np.ndarray:
        """Weights are read once if any token uses the expert; activations in and out per token."""
        t = np.asarray(tokens, dtype=np.float64)
        act = t * (2 * self.hidden + (self.num_matrices - 1) * self.ffn) * dtype_bytes(self.act_dtype)
        return np.where(t > 0, self.weight_bytes, 0.0) + act


@dataclass(frozen=True, slots=True)
class GemmShape:
    """A dense projection of ``in_features`` -> ``out_features`` applied to every token."""

    in_features: int
    out_features: int
    weight_dtype: str
    act_dtype: str = "bf16"

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def flops(self, tokens: np.ndarray | float) -> np.ndarray:
        return 2.0 * np.asarray(tokens, dtype=np.float64) * self.params

    def bytes_moved(self, tokens: np.ndarray | float) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.float64)
        act = t * (self.in_features + self.out_features) * dtype_bytes(self.act_dtype)
        return np.where(t > 0, self.params * dtype_bytes(self.weight_dtype), 0.0) + act


@dataclass(frozen=True, slots=True)
class AttentionShape:
    """The attention core of one layer (softmax(QK^T)V), excluding the projections.

    ``qk_head_dim``/``v_head_dim`` cover MHA, GQA and MLA alike; ``kv_bytes_per_token`` is what one
    cached token costs in this layer (GQA: 2 x kv_heads x head_dim x kv dtype; MLA: the latent)."""

    num_heads: int
    qk_head_dim: int
    v_head_dim: int
    kv_bytes_per_token: float
    act_dtype: str = "bf16"

    @property
    def flops_per_pair(self) -> float:
        """FLOPs for one (query token, key token) pair over all heads."""
        return 2.0 * self.num_heads * (self.qk_head_dim + self.v_head_dim)

    def prefill_flops(self, new_tokens: np.ndarray | float, context_tokens: np.ndarray | float) -> np.ndarray:
        """Causal attention of ``new_tokens`` queries over ``context_tokens`` earlier tokens plus themselves."""
        n = np.asarray(new_tokens, dtype=np.float64)
        c = np.asarray(context_tokens, dtype=np.float64)
        return self.flops_per_pair * (n * c + n * (n + 1) / 2.0)

    def prefill_bytes(self, new_tokens: np.ndarray | float, context_tokens: np.ndarray | float) -> np.ndarray:
        n = np.asarray(new_tokens, dtype=np.float64)
        c = np.asarray(context_tokens, dtype=np.float64)
        act = n * self.num_heads * (self.qk_head_dim + self.v_head_dim) * dtype_bytes(self.act_dtype)
        return (n + c) * self.kv_bytes_per_token + act

    def decode_flops(self, context_tokens: np.ndarray | float) -> np.ndarray:
        """One new token per sequence attending over its context (including itself)."""
        return self.flops_per_pair * (np.asarray(context_tokens, dtype=np.float64) + 1.0)

    def decode_bytes(self, context_tokens: np.ndarray | float) -> np.ndarray:
        c = np.asarray(context_tokens, dtype=np.float64)
        act = self.num_heads * (self.qk_head_dim + self.v_head_dim) * dtype_bytes(self.act_dtype)
        return (c + 1.0) * self.kv_bytes_per_token + act
