"""Trained router weights shipped with the runtime, and the choice between them and the seeded routers.

The runtime's attention, expert and LM-head weights are seeded random (``TinyMoE``); they are 100M+
parameters and cannot be shipped. The routers (``layers x hidden x experts``, tens of KB) can: they were
trained (``calibrate.runtime.train_routers``) on text with every other weight frozen at its seeded value,
so they pick experts by token content. A trained file only makes sense for the exact frozen weights it
was trained against, so it is used only when the model's name, shapes and weight seed match the file's.

File format (``data/<name>-routers.npz``): ``router_bf16`` (uint16, the bf16 bits of
``[layers, hidden, experts]``) and ``meta`` (a JSON string: name, hidden, num_layers, num_experts, top_k,
vocab, seed). Provenance and licence: ``data/<name>-routers.provenance.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.errors import CalibrationError

DATA_DIR = Path(__file__).resolve().parent / "data"
ROUTER_CHOICES = ("auto", "trained", "seeded")


def routers_path(name: str) -> Path:
    return DATA_DIR / f"{name}-routers.npz"


def provenance_path(name: str) -> Path:
    return DATA_DIR / f"{name}-routers.provenance.json"


def shape_meta(dims: Any, name: str, seed: int) -> dict[str, Any]:
    """What a trained file must match: the model's name, shapes and the seed of its frozen weights."""
    meta = {"name": name, "hidden": dims.hidden, "num_layers": dims.num_layers, "num_experts": dims.num_experts,
            "top_k": dims.top_k, "vocab": dims.vocab, "seed": seed}
    if dims.num_shared:  # shared experts are frozen weights too (only then: older files have no such keys)
        meta.update(num_shared=dims.num_shared, shared_ffn=dims.shared_ffn)
    return meta


def save_routers(path: Path, routers: list[torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``routers`` (one ``[hidden, experts]`` tensor per layer) as bf16 bits, compressed."""
    stacked = torch.stack([r.detach().to(torch.bfloat16) for r in routers])
    bits = stacked.view(torch.int16).numpy().view(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # a file object: np.savez_compressed would add ".npz" to a str path
        np.savez_compressed(fh, router_bf16=bits, meta=np.array(json.dumps(meta, sort_keys=True)))
    return path


def read_routers(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``[layers, hidden, experts]`` bf16 routers of ``path`` and its meta."""
    try:
        with np.load(path, allow_pickle=False) as data:
            bits = data["router_bf16"]
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a trained-routers file (router_bf16 + meta expected): {exc}") from exc
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16), meta


def choose_routers(dims: Any, name: str, seed: int, routers: str) -> tuple[torch.Tensor | None, str]:
    """The trained routers to use (or None for the seeded ones) and a one-line description of the choice.

    ``seeded``: always the seeded routers. ``trained``: the shipped file for this model, or a
    ``CalibrationError`` when there is none or it does not match. ``auto``: trained when a shipped file
    matches the model's name, shapes and weight seed, seeded otherwise (the description says why)."""
    if routers not in ROUTER_CHOICES:
        raise CalibrationError(f"routers: expected one of {', '.join(ROUTER_CHOICES)}, got {routers!r}")
    if routers == "seeded":
        return None, "seeded"
    path = routers_path(name)
    want = shape_meta(dims, name, seed)
    if not path.exists():
        why = f"no trained routers shipped for model {name!r}"
    else:
        weights, meta = read_routers(path)
        differ = [f"{k} {meta.get(k)!r} != {v!r}" for k, v in want.items() if meta.get(k) != v]
        if not differ:
            return weights, f"trained ({path.name})"
        why = f"{path.name} was trained for other weights: " + ", ".join(differ)
    if routers == "trained":
        raise CalibrationError(f"routers: trained: {why}")
    return None, f"seeded ({why})"
