"""A scaled-down Mixtral-like MoE transformer with seeded weights, run with plain torch ops.

The architecture comes from a ``ModelSpec`` (GQA attention, SwiGLU routed experts, softmax top-k router,
RMSNorm, untied LM head, optional ungated shared experts as in fine-grained DeepSeek-style models); only
decoder-only GQA/MHA models with every layer MoE are supported. Weights are
drawn from a seeded ``torch.Generator``. The routers are either those seeded ones (routing is then the
random router's own top-k) or trained ones shipped with the package (``routers``, ``train_routers``):
trained on text against exactly these frozen seeded weights, so they route by token content. Rotary
embeddings are left out: they do not change what runs or how long it takes beyond a few elementwise ops,
and the validation compares timing, not text.

Routed experts are not held here: each expert is one flat bf16 tensor ``[gate | up | down]`` in the
host pool (``host_experts[key]``, key = layer * num_experts + expert) that ``expert_store`` copies into
device-side slots. The ops match what ``calibrate.measure`` times (SDPA for attention, ``x @ W`` GEMMs,
softmax + top-k + renormalise for the gate, ``(silu(x@Wg) * (x@Wu)) @ Wd`` per expert)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calibrate.errors import CalibrationError
from sim.spec import ModelSpec

DTYPE = torch.bfloat16


@dataclass(frozen=True, slots=True)
class Dims:
    hidden: int
    ffn: int
    num_layers: int
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_shared: int = 0  # shared experts per layer: always resident, run on every token
    shared_ffn: int = 0

    @property
    def expert_numel(self) -> int:
        return 3 * self.hidden * self.ffn


def dims_of(spec: ModelSpec) -> Dims:
    if spec.attention_type not in ("mha", "gqa") or spec.ffn_activation != "swiglu":
        raise CalibrationError(f"model {spec.name}: the runtime runs gqa/mha attention with swiglu experts only")
    if spec.num_moe_layers != spec.num_layers or spec.is_encoder_decoder:
        raise CalibrationError(f"model {spec.name}: the runtime needs every decoder layer MoE")
    if spec.shared_expert_gate:
        raise CalibrationError(f"model {spec.name}: the runtime runs ungated shared experts only (no shared_expert_gate)")
    if spec.sliding_window_tokens:
        raise CalibrationError(f"model {spec.name}: sliding-window attention is not supported by the runtime")
    assert spec.head_dim is not None
    return Dims(
        hidden=spec.hidden_size, ffn=spec.expert_ffn_size, num_layers=spec.num_layers, num_experts=spec.num_experts,
        top_k=spec.top_k, num_heads=spec.num_attention_heads, num_kv_heads=spec.num_kv_heads or spec.num_attention_heads,
        head_dim=spec.head_dim, vocab=spec.vocab_size, num_shared=spec.num_shared_experts,
        shared_ffn=spec.shared_expert_ffn_size or 0,
    )


class TinyMoE:
    """Weights of the model; the serving loop (``server``) calls its per-layer pieces."""

    def __init__(self, spec: ModelSpec, seed: int, routers: str = "auto", device: str = "cpu") -> None:
        """``routers``: "seeded", "trained" (the shipped file for this model; an error if it does not match)
        or "auto" (trained when a shipped file matches name, shapes and ``seed``; ``router_source`` says which).
        ``device``: where every weight but the routed experts lives ("cuda": the experts' host pool is pinned,
        the slots they are copied into are on the GPU, ``expert_store``). Weights are drawn on the CPU, so a
        seed gives the same model on either device."""
        from calibrate.runtime.routers import choose_routers

        d = self.dims = dims_of(spec)
        self.spec = spec
        g = torch.Generator().manual_seed(seed)

        def w(rows: int, cols: int, scale: float | None = None) -> torch.Tensor:
            s = scale if scale is not None else 1.0 / math.sqrt(rows)
            return (torch.randn(rows, cols, generator=g) * s).to(DTYPE)

        q_out, kv_out = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        self.embed = (torch.randn(d.vocab, d.hidden, generator=g)).to(DTYPE)
        self.layers = []
        for _ in range(d.num_layers):
            self.layers.append({
                "wq": w(d.hidden, q_out), "wk": w(d.hidden, kv_out), "wv": w(d.hidden, kv_out),
                "wo": w(q_out, d.hidden),
                # A larger router scale gives peaked (less uniform) routing, as trained routers have.
                "router": w(d.hidden, d.num_experts, 4.0 / math.sqrt(d.hidden)),
                "norm1": torch.ones(d.hidden, dtype=DTYPE), "norm2": torch.ones(d.hidden, dtype=DTYPE),
            })
        self.final_norm = torch.ones(d.hidden, dtype=DTYPE)
        self.lm_head = w(d.hidden, d.vocab)
        # The host pool: one contiguous [gate | up | down] tensor per expert (what one copy moves).
        n = d.num_layers * d.num_experts
        self.host_experts = torch.empty(n, d.expert_numel, dtype=DTYPE)
        for key in range(n):
            self.host_experts[key] = torch.randn(d.expert_numel, generator=g).mul_(1.0 / math.sqrt(d.hidden)).to(DTYPE)
        # Shared experts (fine-grained models): resident with the layer, drawn after every other weight so a
        # model without them has exactly the weights it always had (the trained routers were fitted to them).
        for weights in self.layers:
            weights["shared"] = [(w(d.hidden, d.shared_ffn), w(d.hidden, d.shared_ffn), w(d.shared_ffn, d.hidden))
                                 for _ in range(d.num_shared)]
        # Chosen after every seeded draw, so the other weights are the same whichever routers are used.
        trained, self.router_source = choose_routers(d, spec.name, seed, routers)
        if trained is not None:
            for weights, router in zip(self.layers, trained):
                weights["router"] = router.contiguous()
        self.device = device
        if device != "cpu":  # pragma: no cover - needs a GPU
            self.embed, self.final_norm, self.lm_head = (t.to(device) for t in (self.embed, self.final_norm, self.lm_head))
            for weights in self.layers:
                for k, v in weights.items():
                    weights[k] = [tuple(m.to(device) for m in e) for e in v] if k == "shared" else v.to(device)
            self.host_experts = self.host_experts.pin_memory()

    # ---------------------------------------------------------------- pieces of one layer

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DTYPE) * weight

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and renormalised weights [T, k] (the op ``gate`` measures)."""
        probs = torch.softmax((h @ self.layers[layer]["router"]).float(), dim=-1)
        top, idx = torch.topk(probs, self.dims.top_k, dim=-1)
        return idx, (top / top.sum(dim=-1, keepdim=True)).to(DTYPE)

    def route_forced(self, layer: int, h: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The gate run as ``route`` does, but with the experts ``idx`` [T, k] given (an oracle's routing):
        their renormalised gate weights [T, k], and how many tokens' own top-k set differs from ``idx``."""
        probs = torch.softmax((h @ self.layers[layer]["router"]).float(), dim=-1)
        own = torch.topk(probs, self.dims.top_k, dim=-1).indices
        differ = int((torch.sort(own, dim=-1).values != torch.sort(idx, dim=-1).values).any(dim=-1).sum())
        top = torch.gather(probs, 1, idx)
        return (top / top.sum(dim=-1, keepdim=True)).to(DTYPE), differ

    def expert_views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, f = self.dims.hidden, self.dims.ffn
        return flat[: h * f].view(h, f), flat[h * f : 2 * h * f].view(h, f), flat[2 * h * f :].view(f, h)

    @staticmethod
    def expert_ffn(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ wg) * (x @ wu)) @ wd
