"""Routing structure of the runtime's trained vs seeded routers on text they were not trained on.

    PYTHONPATH=. python benchmarks/router_structure.py --out /tmp/router-structure
    moesim trace stats /tmp/router-structure/trained-text.parquet   # and the other three

Writes four canonical routing traces of tiny-mixtral (seed 0, the validation scenarios' model): trained or
seeded routers, on held-out text (the standard library's json, email, http, logging, html and urllib
packages; training used only its top-level *.py files) or on random token ids (what the runtime's prompts
are). Each window of ``--tokens`` byte tokens is one request. The forward is the training one
(``train_routers.FrozenMoE``, fp32, the model's bf16 weights), so routing depends on token content and
context only, not on batching."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from calibrate.overhead import runtime_spec
from calibrate.runtime.model import TinyMoE
from calibrate.runtime.train_routers import FrozenMoE, byte_tokens, held_out_files, windows
from sim.workload.routing_trace import RoutingTraceMeta, RoutingTraceWriter, TraceSequence

def trace(model: FrozenMoE, ids: torch.Tensor, path: Path, name: str) -> Path:
    routing: list[torch.Tensor] = []
    with torch.no_grad():
        model.losses(ids, routing)
    experts = torch.stack(routing, dim=2).numpy().astype(np.int16)  # [requests, tokens, layers, k]
    d = model.dims
    meta = RoutingTraceMeta(model=name, num_layers=d.num_layers, num_experts=d.num_experts, top_k=d.top_k)
    with RoutingTraceWriter(path, meta, gates=False) as writer:
        writer.append_many([TraceSequence(i, e, np.arange(len(e), dtype=np.int32)) for i, e in enumerate(experts)])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = runtime_spec()
    text = byte_tokens(held_out_files())
    inputs = {
        "text": windows(text, np.random.default_rng(7), args.requests, args.tokens),
        "random": torch.from_numpy(np.random.default_rng(7).integers(0, spec.vocab_size, (args.requests, args.tokens + 1))),
    }
    for routers in ("trained", "seeded"):
        model = FrozenMoE(TinyMoE(spec, 0, routers=routers))
        for kind, ids in inputs.items():
            path = trace(model, ids, args.out / f"{routers}-{kind}.parquet", spec.name)
            print(f"wrote {path}")
        del model


if __name__ == "__main__":
    main()
