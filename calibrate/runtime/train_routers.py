"""Train the runtime's routers on text, every other weight frozen at its seeded value.

    python -m calibrate.runtime.train_routers --spec tiny-mixtral --out calibrate/runtime/data/tiny-mixtral-routers.npz

Why only the routers: the attention, expert and LM-head weights of ``TinyMoE`` are 100M+ parameters and
cannot be shipped, but they are reproduced exactly from their seed; the routers (layers x hidden x experts)
are tens of KB. Training them against the frozen seeded weights with the language-model loss makes each
layer's gate pick experts by what the hidden state holds (token content and context), as a trained MoE
does, instead of a random projection.

The text is the Python standard library's own ``*.py`` sources (on every machine; PSF licence): the
top-level files of ``sysconfig.get_paths()["stdlib"]`` in sorted order, concatenated, one byte per token
(ids 0-255, within the vocab). Training windows are drawn with a seeded generator; a fixed set of other
windows measures the loss before and after. The forward is the runtime's (``TinyMoE``: RMSNorm, GQA SDPA
without rotary, softmax top-k renormalised gate, SwiGLU experts, LM head) in fp32, plus the usual
load-balancing term (Switch Transformer: experts x sum of token share x mean probability) so no layer
collapses onto a few experts. Everything is seeded and runs on one thread: same seed, same routers."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibrate.errors import CalibrationError
from calibrate.runtime.model import TinyMoE, dims_of
from calibrate.runtime.routers import provenance_path, routers_path, save_routers, shape_meta

LICENCE = ("Derived from the CPython standard library sources (Python Software Foundation License Version 2, "
           "https://docs.python.org/3/license.html), used as training text; the file holds router weights "
           "trained on it, no text. The seeded weights they go with are generated, not derived from any data.")


def stdlib_files() -> list[Path]:
    """The top-level ``*.py`` files of this Python's standard library, sorted by name (a fixed list)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise CalibrationError(f"{root}: no standard-library *.py sources found to train on")
    return files


HELD_OUT_PACKAGES = ("json", "email", "http", "logging", "html", "urllib")


def held_out_files() -> list[Path]:
    """Standard-library sources training never reads (it reads only the top-level files): the ``*.py`` files
    of a few packages, sorted. Runtime prompts (``prompts="text"``) and the structure benchmark use them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for pkg in HELD_OUT_PACKAGES for p in (root / pkg).glob("*.py"))
    if not files:
        raise CalibrationError(f"{root}: none of the packages {', '.join(HELD_OUT_PACKAGES)} found for text prompts")
    return files


BYTE_TOKENS = 256  # text is tokenised one byte per token: ids 0-255 of the model's vocab


def byte_tokens(files: list[Path]) -> np.ndarray:
    """The files' bytes, concatenated in order with a newline after each, as token ids 0-255."""
    return np.frombuffer(b"".join(p.read_bytes() + b"\n" for p in files), dtype=np.uint8)


def windows(tokens: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens (inputs and their next tokens)."""
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


class FrozenMoE:
    """fp32 copies of ``TinyMoE``'s seeded weights (frozen) and its routers as the only parameters."""

    def __init__(self, model: TinyMoE) -> None:
        self.dims = d = model.dims
        self.embed = model.embed.float()
        self.layers = [{k: v.float() for k, v in w.items() if k not in ("router", "shared")} for w in model.layers]
        self.shared = [[tuple(m.float() for m in expert) for expert in w["shared"]] for w in model.layers]
        self.final_norm = model.final_norm.float()
        self.lm_head = model.lm_head.float()
        hf = d.hidden * d.ffn
        self.experts = [(f[:hf].view(d.hidden, d.ffn), f[hf : 2 * hf].view(d.hidden, d.ffn), f[2 * hf :].view(d.ffn, d.hidden))
                        for f in model.host_experts.float()]
        self.routers = [w["router"].float().clone().requires_grad_(True) for w in model.layers]

    @staticmethod
    def _norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def losses(self, ids: torch.Tensor, routing: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token loss, load-balancing loss (mean over layers) and tokens per expert ``[layers, experts]``
        of the windows ``ids`` ``[B, L + 1]``; each layer's top-k experts ``[B, L, k]`` go to ``routing``."""
        d = self.dims
        inp, target = ids[:, :-1], ids[:, 1:]
        B, L = inp.shape
        x = self.embed[inp]
        aux = x.new_zeros(())
        load = torch.zeros(d.num_layers, d.num_experts)
        for layer, w in enumerate(self.layers):
            h = self._norm(x, w["norm1"])
            q = (h @ w["wq"]).view(B, L, d.num_heads, d.head_dim).transpose(1, 2)
            k = (h @ w["wk"]).view(B, L, d.num_kv_heads, d.head_dim).transpose(1, 2)
            v = (h @ w["wv"]).view(B, L, d.num_kv_heads, d.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=d.num_heads != d.num_kv_heads)
            x = x + o.transpose(1, 2).reshape(B, L, -1) @ w["wo"]
            h2 = self._norm(x, w["norm2"]).reshape(B * L, d.hidden)
            probs = torch.softmax(h2 @ self.routers[layer], dim=-1)
            top, idx = torch.topk(probs, d.top_k, dim=-1)
            gate = top / top.sum(dim=-1, keepdim=True)
            if routing is not None:
                routing.append(idx.view(B, L, d.top_k))
            y = torch.zeros_like(h2)
            for wg, wu, wd in self.shared[layer]:  # shared experts: every token, as the runtime runs them
                y = y + (F.silu(h2 @ wg) * (h2 @ wu)) @ wd
            base = layer * d.num_experts
            for e in range(d.num_experts):
                rows, slot = torch.nonzero(idx == e, as_tuple=True)
                if len(rows):
                    wg, wu, wd = self.experts[base + e]
                    hr = h2[rows]
                    y = y.index_add(0, rows, ((F.silu(hr @ wg) * (hr @ wu)) @ wd) * gate[rows, slot, None])
                load[layer, e] = len(rows)
            share = load[layer] / load[layer].sum()
            aux = aux + d.num_experts * (share * probs.mean(dim=0)).sum()
            x = x + y.view(B, L, d.hidden)
        logits = self._norm(x, self.final_norm) @ self.lm_head
        lm = F.cross_entropy(logits.reshape(-1, d.vocab), target.reshape(-1))
        return lm, aux / d.num_layers, load


@dataclass
class TrainResult:
    routers: list[torch.Tensor]
    loss_before: float
    loss_after: float
    aux_before: float
    aux_after: float
    load_before: list[list[float]]
    load_after: list[list[float]]
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _evaluate(model: FrozenMoE, eval_set: list[torch.Tensor]) -> tuple[float, float, list[list[float]]]:
    with torch.no_grad():
        parts = [model.losses(ids) for ids in eval_set]
    load = sum(p[2] for p in parts)
    share = (load / load.sum(dim=1, keepdim=True)).tolist()
    return (float(np.mean([float(p[0]) for p in parts])), float(np.mean([float(p[1]) for p in parts])),
            [[round(s, 4) for s in row] for row in share])


def train(spec: Any, tokens: np.ndarray, *, seed: int = 0, steps: int = 60, batch: int = 4, seq_len: int = 64,
          lr: float = 3e-3, aux_coef: float = 0.01, eval_batches: int = 2) -> TrainResult:
    """Train ``spec``'s routers (weights seeded with ``seed``) on ``tokens`` for ``steps`` Adam steps.

    Windows come from ``np.random.default_rng([seed, 1])``; the evaluation windows from ``[seed, 2]``."""
    if len(tokens) < seq_len + 2:
        raise CalibrationError(f"training text: {len(tokens)} tokens, need more than {seq_len + 1}")
    torch.manual_seed(seed)
    model = FrozenMoE(TinyMoE(spec, seed, routers="seeded"))
    if int(tokens.max()) >= model.dims.vocab:
        raise CalibrationError(f"model {spec.name}: vocab {model.dims.vocab} is smaller than the byte tokens")
    eval_rng = np.random.default_rng([seed, 2])
    eval_set = [windows(tokens, eval_rng, batch, seq_len) for _ in range(eval_batches)]
    started = time.perf_counter()
    loss_before, aux_before, load_before = _evaluate(model, eval_set)
    opt = torch.optim.Adam(model.routers, lr=lr)
    rng = np.random.default_rng([seed, 1])
    history = []
    for _ in range(steps):
        lm, aux, _ = model.losses(windows(tokens, rng, batch, seq_len))
        opt.zero_grad()
        (lm + aux_coef * aux).backward()
        opt.step()
        history.append(round(float(lm.detach()), 4))
    loss_after, aux_after, load_after = _evaluate(model, eval_set)
    return TrainResult(routers=[r.detach().clone() for r in model.routers], loss_before=loss_before,
                       loss_after=loss_after, aux_before=aux_before, aux_after=aux_after, load_before=load_before,
                       load_after=load_after, history=history, seconds=time.perf_counter() - started)


def _spec_of(name_or_path: str) -> Any:
    """``tiny-mixtral`` (the validation scenarios' model, ``calibrate.overhead.RUNTIME_SPEC``) or a scenario YAML."""
    from calibrate.overhead import RUNTIME_SPEC, runtime_spec

    if name_or_path == RUNTIME_SPEC["name"]:
        return runtime_spec()
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        from sim.scenario import load_scenario

        return load_scenario(name_or_path).model
    raise CalibrationError(f"--spec: expected {RUNTIME_SPEC['name']!r} or a scenario YAML, got {name_or_path!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrate.runtime.train_routers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="tiny-mixtral", help="tiny-mixtral or a scenario YAML whose model to train")
    parser.add_argument("--out", help="npz to write (default: the shipped calibrate/runtime/data/NAME-routers.npz)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frozen weights and of the windows (the "
                        "validation scenarios' workload seed)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from calibrate.environment import load_average

    try:
        spec = _spec_of(args.spec)
        torch.set_num_threads(args.threads)
        files = stdlib_files()
        tokens = byte_tokens(files)
        load_start = list(load_average())
        result = train(spec, tokens, seed=args.seed, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                       lr=args.lr, aux_coef=args.aux_coef)
    except CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else routers_path(spec.name)
    meta = shape_meta(dims_of(spec), spec.name, args.seed)
    save_routers(out, result.routers, meta)
    root = Path(sysconfig.get_paths()["stdlib"])
    provenance = {
        "what": f"trained routers of {spec.name} (layers x hidden x experts, bf16), every other weight frozen at "
                f"its seeded value (seed {args.seed})",
        "command": "python -m calibrate.runtime.train_routers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "matches": meta,
        "text": {"source": "CPython standard library, top-level *.py sources, sorted by name, one byte per token",
                 "stdlib": str(root), "python": platform.python_version(), "num_files": len(files),
                 "bytes": int(len(tokens)), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                 "files": [p.name for p in files]},
        "training": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                     "tokens_seen": args.steps * args.batch * args.seq_len, "optimizer": "Adam", "lr": args.lr,
                     "aux_coef": args.aux_coef, "seed": args.seed, "threads": args.threads,
                     "loss_before": round(result.loss_before, 4), "loss_after": round(result.loss_after, 4),
                     "uniform_loss": round(math.log(spec.vocab_size), 4),
                     "aux_before": round(result.aux_before, 4), "aux_after": round(result.aux_after, 4),
                     "expert_share_before": result.load_before, "expert_share_after": result.load_after,
                     "loss_history": result.history, "seconds": round(result.seconds, 1),
                     "load_average_start": load_start, "load_average_end": list(load_average())},
        "torch": torch.__version__,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "licence": LICENCE,
    }
    prov = out.with_name(out.name.removesuffix(".npz") + ".provenance.json") if args.out else provenance_path(spec.name)
    prov.write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    print(f"loss {result.loss_before:.4f} -> {result.loss_after:.4f} in {args.steps} steps ({result.seconds:.0f} s); "
          f"wrote {out} ({out.stat().st_size} bytes) and {prov}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
