"""What work happens: a MoE model's architecture (ModelSpec) and everything derived from it.

A ModelSpec holds the published architecture numbers of one model, the same fields whether it comes from the
shipped catalog (``sim/data/models.yaml``) or inline from a scenario. Every derived quantity the simulator needs
(shapes of experts, router, attention and head; which layers are MoE; parameter counts; weight and KV-cache bytes;
FLOPs) lives here, computed through ``sim.work`` so that the formulas exist once.

Parameter counting, stated once:
  * every weight matrix and bias of embedding, attention, router, experts (routed and shared), dense FFNs, norms
    and LM head is counted; a tied embedding/head is counted once. Left out: relative-position tables (T5) and
    per-head q/k norms (Qwen3, OLMoE), each under 0.01% of the total, and DeepSeek-V3's multi-token-prediction
    layer, which is not used to generate tokens.
  * ``active_params``: what one token touches: all non-routed-expert parameters plus ``top_k`` routed experts
    in every MoE layer, embeddings and LM head included (tied: once).
  * ``active_params_excluding_embedding``: the same less the input-embedding table, which a token only looks up
    (OpenAI's definition for gpt-oss). With tied embeddings the table is also the head, so nothing is removed.
  * an encoder-decoder (Switch) counts both stacks; the per-layer attention/MoE helpers describe the decoder.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.errors import CatalogError
from sim.work import DTYPE_BYTES, AttentionShape, ExpertShape, GemmShape, dtype_bytes

CATALOG_RESOURCE = "models.yaml"


class ModelSpec(BaseModel):
    """The architecture of one MoE model, as published in its config.json.

    Layers are numbered from 0 within the decoder stack. Decoder layer ``i`` is MoE when
    ``i >= first_k_dense_replace`` and ``(i + 1) % moe_layer_step == 0`` (the DeepSeek, Qwen2-MoE, Llama-4 and
    Switch conventions); every other layer has a dense FFN of ``dense_ffn_size``. An encoder-decoder
    (``num_encoder_layers > 0``) applies the same rule to its encoder and adds cross-attention to each
    decoder layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    source: str = ""  # provenance, e.g. "HF config.json of mistralai/Mixtral-8x7B-v0.1"

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)  # decoder layers
    num_encoder_layers: int = Field(default=0, ge=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False

    # Attention. mha/gqa use num_kv_heads and head_dim; mla uses the DeepSeek low-rank fields.
    attention_type: Literal["mha", "gqa", "mla"]
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    kv_lora_rank: int | None = Field(default=None, gt=0)
    q_lora_rank: int | None = Field(default=None, gt=0)  # None: q is projected directly (DeepSeek-V2-Lite)
    qk_nope_head_dim: int | None = Field(default=None, gt=0)
    qk_rope_head_dim: int | None = Field(default=None, gt=0)
    v_head_dim: int | None = Field(default=None, gt=0)
    attention_bias: Literal["none", "qkv", "qkvo"] = "none"  # which projections carry a bias
    attention_sinks: bool = False  # one learned sink logit per head (gpt-oss)
    sliding_window_tokens: int | None = Field(default=None, gt=0)
    # Repeated over the decoder layers: ("sliding", "full") makes layers 0, 2, 4, ... sliding-window layers.
    layer_attention_pattern: tuple[Literal["full", "sliding"], ...] = Field(default=("full",), min_length=1)

    # Feed-forward. swiglu experts have 3 matrices (gate, up, down), relu experts 2 (wi, wo).
    ffn_activation: Literal["swiglu", "relu"] = "swiglu"
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    expert_ffn_size: int = Field(gt=0)
    expert_bias: bool = False  # gpt-oss: gate_up (2 x ffn) and down (hidden) biases per expert
    router_bias: bool = False  # one value per expert (gpt-oss bias, DeepSeek-V3 e_score_correction_bias)
    num_shared_experts: int = Field(default=0, ge=0)
    shared_expert_ffn_size: int | None = Field(default=None, gt=0)  # width of ONE shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: a hidden -> 1 sigmoid gate on the shared expert
    first_k_dense_replace: int = Field(default=0, ge=0)
    moe_layer_step: int = Field(default=1, gt=0)
    dense_ffn_size: int | None = Field(default=None, gt=0)

    # Dtypes are keys of sim.work.DTYPE_BYTES. Routed experts may be stored differently (gpt-oss: mxfp4).
    weight_dtype: str = "bf16"
    expert_weight_dtype: str | None = None  # None: same as weight_dtype
    kv_dtype: str = "bf16"

    @field_validator("weight_dtype", "expert_weight_dtype", "kv_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(DTYPE_BYTES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        # Messages start with the offending key: a model-level error has no location of its own.
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} is more than num_experts ({self.num_experts})")
        if self.attention_type == "mla":
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key}: required when attention_type is 'mla'")
            for key in ("num_kv_heads", "head_dim"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: not used when attention_type is 'mla'; remove it")
            if self.attention_bias != "none":
                raise ValueError("attention_bias: must be 'none' when attention_type is 'mla'")
            if self.num_encoder_layers:
                raise ValueError("num_encoder_layers: an encoder-decoder with mla attention is not supported")
        else:
            for key in ("num_kv_heads", "head_dim"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key}: required when attention_type is {self.attention_type!r}")
            for key in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only used when attention_type is 'mla'; remove it")
            assert self.num_kv_heads is not None
            if self.attention_type == "mha" and self.num_kv_heads != self.num_attention_heads:
                raise ValueError(
                    f"num_kv_heads: {self.num_kv_heads} differs from num_attention_heads "
                    f"({self.num_attention_heads}); use attention_type 'gqa'"
                )
            if self.num_attention_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads: {self.num_kv_heads} does not divide num_attention_heads "
                    f"({self.num_attention_heads})"
                )
        if "sliding" in self.layer_attention_pattern and self.sliding_window_tokens is None:
            raise ValueError("sliding_window_tokens: required when layer_attention_pattern has 'sliding' layers")
        if self.num_shared_experts and self.shared_expert_ffn_size is None:
            raise ValueError("shared_expert_ffn_size: required when num_shared_experts > 0")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("shared_expert_gate: needs num_shared_experts > 0")
        if not self.moe_layer_indices:
            raise ValueError(
                f"first_k_dense_replace: with moe_layer_step {self.moe_layer_step}, "
                f"no decoder layer of {self.num_layers} is MoE"
            )
        if (self.dense_layer_indices or self.encoder_dense_layer_indices) and self.dense_ffn_size is None:
            raise ValueError("dense_ffn_size: required when some layers are dense (not MoE)")
        return self

    # ---- dtypes --------------------------------------------------------------------------------------------

    @property
    def effective_expert_weight_dtype(self) -> str:
        """The dtype routed experts are stored in."""
        return self.expert_weight_dtype or self.weight_dtype

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0

    # ---- layer layout --------------------------------------------------------------------------------------

    def _is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and (layer + 1) % self.moe_layer_step == 0

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """Decoder layers whose FFN is a routed MoE."""
        return tuple(i for i in range(self.num_layers) if self._is_moe_layer(i))

    @property
    def num_moe_layers(self) -> int:
        """MoE layers in the decoder stack (the ones every generated token passes)."""
        return len(self.moe_layer_indices)

    @property
    def dense_layer_indices(self) -> tuple[int, ...]:
        """Decoder layers with a dense FFN (DeepSeek's first_k_dense_replace, Switch's every other layer)."""
        return tuple(i for i in range(self.num_layers) if not self._is_moe_layer(i))

    @property
    def encoder_moe_layer_indices(self) -> tuple[int, ...]:
        """Encoder layers whose FFN is a routed MoE (empty for decoder-only models)."""
        return tuple(i for i in range(self.num_encoder_layers) if self._is_moe_layer(i))

    @property
    def encoder_dense_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_encoder_layers) if not self._is_moe_layer(i))

    @property
    def sliding_layer_indices(self) -> tuple[int, ...]:
        """Decoder layers that attend over only the last ``sliding_window_tokens`` tokens."""
        pattern = self.layer_attention_pattern
        return tuple(i for i in range(self.num_layers) if pattern[i % len(pattern)] == "sliding")

    @property
    def _num_moe_layers_all(self) -> int:
        return self.num_moe_layers + len(self.encoder_moe_layer_indices)

    @property
    def _num_dense_layers_all(self) -> int:
        return len(self.dense_layer_indices) + len(self.encoder_dense_layer_indices)

    # ---- shapes --------------------------------------------------------------------------------------------

    @property
    def _ffn_num_matrices(self) -> int:
        return 3 if self.ffn_activation == "swiglu" else 2

    @property
    def expert_shape(self) -> ExpertShape:
        """One routed expert."""
        return ExpertShape(
            hidden=self.hidden_size,
            ffn=self.expert_ffn_size,
            num_matrices=self._ffn_num_matrices,
            weight_dtype=self.effective_expert_weight_dtype,
        )

    @property
    def shared_expert_shape(self) -> ExpertShape | None:
        """One shared (always active) expert; None when the model has none."""
        if not self.num_shared_experts:
            return None
        assert self.shared_expert_ffn_size is not None
        return ExpertShape(self.hidden_size, self.shared_expert_ffn_size, self._ffn_num_matrices, self.weight_dtype)

    @property
    def dense_ffn_shape(self) -> ExpertShape | None:
        """The FFN of a dense (non-MoE) layer; None when every layer is MoE."""
        if self.dense_ffn_size is None or not (self.dense_layer_indices or self.encoder_dense_layer_indices):
            return None
        return ExpertShape(self.hidden_size, self.dense_ffn_size, self._ffn_num_matrices, self.weight_dtype)

    @property
    def router_shape(self) -> GemmShape:
        """The gate: hidden -> one logit per routed expert."""
        return GemmShape(self.hidden_size, self.num_experts, self.weight_dtype)

    @property
    def lm_head_shape(self) -> GemmShape:
        return GemmShape(self.hidden_size, self.vocab_size, self.weight_dtype)

    @property
    def _kv_bytes_per_token_per_layer(self) -> float:
        kv = dtype_bytes(self.kv_dtype)
        if self.attention_type == "mla":
            # MLA caches the compressed latent plus the shared rope key, not per-head K and V.
            assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
            return (self.kv_lora_rank + self.qk_rope_head_dim) * kv
        assert self.num_kv_heads is not None and self.head_dim is not None
        return 2 * self.num_kv_heads * self.head_dim * kv

    @property
    def attention_shape(self) -> AttentionShape:
        """The attention core of one decoder layer (softmax(QK^T)V, without projections).

        For MLA this is the naive (non-absorbed) form: qk_head_dim = qk_nope + qk_rope, v_head_dim as given."""
        if self.attention_type == "mla":
            assert self.qk_nope_head_dim is not None and self.qk_rope_head_dim is not None
            assert self.v_head_dim is not None
            qk_dim, v_dim = self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        else:
            assert self.head_dim is not None
            qk_dim = v_dim = self.head_dim
        return AttentionShape(
            num_heads=self.num_attention_heads,
            qk_head_dim=qk_dim,
            v_head_dim=v_dim,
            kv_bytes_per_token=self._kv_bytes_per_token_per_layer,
        )

    @property
    def attention_projection_shapes(self) -> tuple[GemmShape, ...]:
        """The projections of one decoder layer's self-attention.

        GQA/MHA: q, k, v, o. MLA: (q_a, q_b) or q, then kv_a (to latent + rope key), kv_b (latent to per-head
        k_nope and v), o."""
        h, heads, w = self.hidden_size, self.num_attention_heads, self.weight_dtype
        if self.attention_type != "mla":
            assert self.num_kv_heads is not None and self.head_dim is not None
            q_out, kv_out = heads * self.head_dim, self.num_kv_heads * self.head_dim
            return (GemmShape(h, q_out, w), GemmShape(h, kv_out, w), GemmShape(h, kv_out, w), GemmShape(q_out, h, w))
        assert self.kv_lora_rank is not None and self.qk_nope_head_dim is not None
        assert self.qk_rope_head_dim is not None and self.v_head_dim is not None
        q_out = heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        if self.q_lora_rank is None:
            q_proj: tuple[GemmShape, ...] = (GemmShape(h, q_out, w),)
        else:
            q_proj = (GemmShape(h, self.q_lora_rank, w), GemmShape(self.q_lora_rank, q_out, w))
        return q_proj + (
            GemmShape(h, self.kv_lora_rank + self.qk_rope_head_dim, w),
            GemmShape(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), w),
            GemmShape(heads * self.v_head_dim, h, w),
        )

    # ---- parameters ----------------------------------------------------------------------------------------

    @property
    def expert_bias_params(self) -> int:
        """Bias values of one routed expert: every matrix's output except the gate/up pair's shared width."""
        if not self.expert_bias:
            return 0
        return (self._ffn_num_matrices - 1) * self.expert_ffn_size + self.hidden_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert, biases included."""
        return self.expert_shape.params + self.expert_bias_params

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert: weights in the expert dtype (with its scales), biases in weight_dtype."""
        return self.expert_shape.weight_bytes + self.expert_bias_params * dtype_bytes(self.weight_dtype)

    @property
    def attention_params_per_layer(self) -> int:
        """Self-attention parameters of one decoder layer: projections, biases, sinks, MLA's latent norms."""
        params = sum(g.params for g in self.attention_projection_shapes)
        if self.attention_type == "mla":
            assert self.kv_lora_rank is not None
            params += self.kv_lora_rank + (self.q_lora_rank or 0)
        else:
            q, k, v, o = self.attention_projection_shapes
            if self.attention_bias in ("qkv", "qkvo"):
                params += q.out_features + k.out_features + v.out_features
            if self.attention_bias == "qkvo":
                params += o.out_features
        if self.attention_sinks:
            params += self.num_attention_heads
        return params

    @property
    def router_params_per_layer(self) -> int:
        return self.router_shape.params + (self.num_experts if self.router_bias else 0)

    @property
    def shared_expert_params_per_layer(self) -> int:
        """All shared experts of one MoE layer, with their gate."""
        shape = self.shared_expert_shape
        if shape is None:
            return 0
        return self.num_shared_experts * shape.params + (self.hidden_size if self.shared_expert_gate else 0)

    @property
    def routed_expert_params_total(self) -> int:
        return self._num_moe_layers_all * self.num_experts * self.expert_params

    @property
    def embedding_params(self) -> int:
        """The input-embedding table (which is also the LM head when tied)."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """The LM head's own parameters: 0 when tied to the embedding table."""
        return 0 if self.tie_word_embeddings else self.lm_head_shape.params

    @property
    def norm_params(self) -> int:
        """RMS/LayerNorm scales: two per layer plus a final norm per stack; a third per layer for cross-attention."""
        h = self.hidden_size
        params = h * (2 * self.num_layers + 1)
        if self.is_encoder_decoder:
            params += h * (2 * self.num_encoder_layers + 1) + h * self.num_layers
        return params

    @property
    def non_expert_params(self) -> int:
        """Everything except routed experts: embeddings, head, attention, routers, shared experts, dense FFNs, norms."""
        dense = self.dense_ffn_shape
        attention_layers = self.num_layers + self.num_encoder_layers
        if self.is_encoder_decoder:
            attention_layers += self.num_layers  # cross-attention, same projections as self-attention
        return (
            self.embedding_params
            + self.lm_head_params
            + self.norm_params
            + attention_layers * self.attention_params_per_layer
            + self._num_moe_layers_all * (self.router_params_per_layer + self.shared_expert_params_per_layer)
            + self._num_dense_layers_all * (dense.params if dense is not None else 0)
        )

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.routed_expert_params_total

    @property
    def active_params(self) -> int:
        """Parameters one token touches: non-expert (embeddings and head included) plus top_k routed experts
        per MoE layer."""
        return self.non_expert_params + self._num_moe_layers_all * self.top_k * self.expert_params

    @property
    def active_params_excluding_embedding(self) -> int:
        """``active_params`` less the input-embedding lookup (OpenAI's gpt-oss definition); a tied table stays."""
        return self.active_params - (0 if self.tie_word_embeddings else self.embedding_params)

    # ---- bytes ---------------------------------------------------------------------------------------------

    @property
    def routed_expert_bytes_total(self) -> float:
        return self._num_moe_layers_all * self.num_experts * self.expert_bytes

    @property
    def non_expert_weight_bytes(self) -> float:
        return self.non_expert_params * dtype_bytes(self.weight_dtype)

    @property
    def total_weight_bytes(self) -> float:
        return self.non_expert_weight_bytes + self.routed_expert_bytes_total

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token adds over all decoder layers (sliding-window layers counted in full;
        ``kv_bytes`` applies the window)."""
        return self.num_layers * self._kv_bytes_per_token_per_layer

    def kv_bytes(self, context_tokens: np.ndarray | float) -> np.ndarray:
        """KV-cache bytes of one sequence of ``context_tokens``; sliding layers keep only their window."""
        c = np.asarray(context_tokens, dtype=np.float64)
        num_sliding = len(self.sliding_layer_indices)
        window = float(self.sliding_window_tokens or 0)
        tokens = (self.num_layers - num_sliding) * c + num_sliding * np.minimum(c, window)
        return tokens * self._kv_bytes_per_token_per_layer

    # ---- FLOPs and bytes moved -----------------------------------------------------------------------------

    def expert_flops(self, tokens: np.ndarray | float) -> np.ndarray:
        """FLOPs of one routed expert processing ``tokens`` tokens."""
        return self.expert_shape.flops(tokens)

    def decode_attention_flops(self, context_tokens: np.ndarray | float) -> np.ndarray:
        """Attention-core FLOPs of one new token over all decoder layers (sliding layers see their window)."""
        shape, num_sliding = self.attention_shape, len(self.sliding_layer_indices)
        full = (self.num_layers - num_sliding) * shape.decode_flops(context_tokens)
        if not num_sliding:
            return full
        capped = np.minimum(np.asarray(context_tokens, dtype=np.float64), self._window - 1)
        return full + num_sliding * shape.decode_flops(capped)

    def decode_attention_bytes(self, context_tokens: np.ndarray | float) -> np.ndarray:
        """Attention-core bytes moved (mostly KV reads) for one new token over all decoder layers."""
        shape, num_sliding = self.attention_shape, len(self.sliding_layer_indices)
        full = (self.num_layers - num_sliding) * shape.decode_bytes(context_tokens)
        if not num_sliding:
            return full
        capped = np.minimum(np.asarray(context_tokens, dtype=np.float64), self._window - 1)
        return full + num_sliding * shape.decode_bytes(capped)

    def prefill_attention_flops(
        self, new_tokens: np.ndarray | float, context_tokens: np.ndarray | float
    ) -> np.ndarray:
        """Attention-core FLOPs of ``new_tokens`` prompt tokens after ``context_tokens`` cached ones, all layers."""
        shape, num_sliding = self.attention_shape, len(self.sliding_layer_indices)
        full = (self.num_layers - num_sliding) * shape.prefill_flops(new_tokens, context_tokens)
        if not num_sliding:
            return full
        n = np.asarray(new_tokens, dtype=np.float64)
        c = np.asarray(context_tokens, dtype=np.float64)
        # The first `within` queries still see their whole causal prefix; the rest see exactly the window.
        within = np.clip(self._window - c, 0.0, n)
        sliding = shape.prefill_flops(within, c) + (n - within) * shape.decode_flops(self._window - 1)
        return full + num_sliding * sliding

    def prefill_attention_bytes(
        self, new_tokens: np.ndarray | float, context_tokens: np.ndarray | float
    ) -> np.ndarray:
        """Attention-core bytes moved for a prefill chunk, all decoder layers (sliding layers read their window)."""
        shape, num_sliding = self.attention_shape, len(self.sliding_layer_indices)
        full = (self.num_layers - num_sliding) * shape.prefill_bytes(new_tokens, context_tokens)
        if not num_sliding:
            return full
        capped = np.minimum(np.asarray(context_tokens, dtype=np.float64), self._window)
        return full + num_sliding * shape.prefill_bytes(new_tokens, capped)

    @property
    def _window(self) -> float:
        assert self.sliding_window_tokens is not None
        return float(self.sliding_window_tokens)


# ---- building specs and reporting errors -------------------------------------------------------------------


def _validation_message(exc: ValidationError) -> str:
    """One line naming the key: an unknown key beats the "missing" errors a typo also causes."""
    err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    key = ".".join(str(part) for part in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def parse_model_spec(data: Any, where: str) -> ModelSpec:
    """Validate a mapping as a ModelSpec; errors become CatalogError("<where>: <key>: <problem>")."""
    if not isinstance(data, dict):
        raise CatalogError(f"{where}: expected a mapping of model fields, got {type(data).__name__}")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(f"{where}: {_validation_message(exc)}") from None


def load_catalog_file(path: str | Path) -> dict[str, ModelSpec]:
    """Read a catalog YAML (a top-level ``models:`` list); keys are the lowercased model names."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the model catalog: {exc.strerror}") from None
    return _parse_catalog(text, str(path))


def _parse_catalog(text: str, where: str) -> dict[str, ModelSpec]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise CatalogError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise CatalogError(f"{where}: expected a top-level 'models:' list")
    catalog: dict[str, ModelSpec] = {}
    for position, entry in enumerate(doc["models"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"model {name!r}" if isinstance(name, str) else f"model #{position + 1}"
        spec = parse_model_spec(entry, f"{where}: {label}")
        key = spec.name.lower()
        if key in catalog:
            raise CatalogError(f"{where}: {label}: name: duplicate model name")
        catalog[key] = spec
    return catalog


@functools.cache
def _shipped_catalog() -> dict[str, ModelSpec]:
    resource = importlib.resources.files("sim.data").joinpath(CATALOG_RESOURCE)
    return _parse_catalog(resource.read_text(encoding="utf-8"), f"sim/data/{CATALOG_RESOURCE}")


def load_catalog() -> dict[str, ModelSpec]:
    """The shipped catalog, read once per process; the returned dict is a fresh copy of frozen specs."""
    return dict(_shipped_catalog())


def get_model(name: str) -> ModelSpec:
    """A catalog model by name, case-insensitively; an unknown name suggests the closest one."""
    catalog = _shipped_catalog()
    key = name.lower()
    if key in catalog:
        return catalog[key]
    known = ", ".join(sorted(catalog))
    close = difflib.get_close_matches(key, catalog, n=1)
    hint = f"; did you mean {close[0]!r}? " if close else "; "
    raise CatalogError(f"unknown model {name!r}{hint}known: {known}")


def with_dtypes(
    spec: ModelSpec,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
    expert_weight_dtype: str | None = None,
) -> ModelSpec:
    """A validated copy with other dtypes; None keeps the current one (routed experts keep theirs unless given)."""
    update = {
        key: value
        for key, value in (
            ("weight_dtype", weight_dtype),
            ("kv_dtype", kv_dtype),
            ("expert_weight_dtype", expert_weight_dtype),
        )
        if value is not None
    }
    return parse_model_spec({**spec.model_dump(), **update}, f"model {spec.name!r}")


# ---- tables for the CLI ------------------------------------------------------------------------------------


def catalog_rows() -> list[dict[str, Any]]:
    """One row per catalog model for the `moesim models` table, in catalog order."""
    return [
        {
            "name": spec.name,
            "total_params": spec.total_params,
            "active_params": spec.active_params,
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "num_shared_experts": spec.num_shared_experts,
            "expert_bytes": spec.expert_bytes,
            "kv_bytes_per_token": spec.kv_bytes_per_token,
        }
        for spec in _shipped_catalog().values()
    ]


def _plain(value: Any) -> Any:
    """Shapes and tuples as plain dicts and lists, so the result prints and serialises as JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


_DERIVED = (
    "effective_expert_weight_dtype",
    "is_encoder_decoder",
    "moe_layer_indices",
    "num_moe_layers",
    "dense_layer_indices",
    "encoder_moe_layer_indices",
    "encoder_dense_layer_indices",
    "sliding_layer_indices",
    "expert_shape",
    "expert_params",
    "expert_bytes",
    "shared_expert_shape",
    "dense_ffn_shape",
    "router_shape",
    "attention_shape",
    "attention_projection_shapes",
    "lm_head_shape",
    "attention_params_per_layer",
    "router_params_per_layer",
    "shared_expert_params_per_layer",
    "embedding_params",
    "lm_head_params",
    "norm_params",
    "routed_expert_params_total",
    "non_expert_params",
    "total_params",
    "active_params",
    "active_params_excluding_embedding",
    "routed_expert_bytes_total",
    "non_expert_weight_bytes",
    "total_weight_bytes",
    "kv_bytes_per_token",
)


def describe(spec: ModelSpec) -> dict[str, Any]:
    """Every field and derived quantity of a spec, for `moesim models show NAME` (fields first)."""
    out: dict[str, Any] = {key: _plain(value) for key, value in spec.model_dump().items()}
    out.update({key: _plain(getattr(spec, key)) for key in _DERIVED})
    return out
