"""Helpers for the engine tests: a toy profile with round numbers, a tiny MoE model, scenarios.

The toy profile: 1 TFLOP/s (bf16), 1 TB/s HBM, every efficiency 1 and no fixed cost per call, so an
operation takes exactly ``max(flops, bytes) / 1e12`` seconds; the host->device link moves 10 GB/s
after 1 ms of latency. The tiny model has 2 MoE layers of 2 experts and top_k 2, so every token uses
every expert and the routing cannot change a timing."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from sim.profile import HardwareProfile, parse_profile
from sim.scenario import LoadedScenario, parse_scenario, resolve
from sim.spec import ModelSpec

PEAK_FLOPS_PER_S = 1e12
HBM_BYTES_PER_S = 1e12
H2D_BYTES_PER_S = 10e9
H2D_LATENCY_S = 1e-3

_ROOFLINE = "{kind: roofline, fixed_s: 0.0, compute_efficiency: 1.0, memory_efficiency: 1.0, fit_error: null}"

TOY_PROFILE_YAML = f"""\
name: toy-round
source: datasheet
provenance: {{summary: round numbers for engine tests}}
gpu: {{name: toy, memory_bytes: 1.0e9, peak_tflops: {{bf16: 1.0}}, memory_bandwidth_gbps: 1000.0}}
links:
  host_to_device: {{bandwidth_gbps: 10.0, latency_s: 1.0e-3, pageable_bandwidth_factor: 0.5, num_copy_engines: 1}}
  device_to_host: {{bandwidth_gbps: 10.0, latency_s: 1.0e-3, pageable_bandwidth_factor: 0.5, num_copy_engines: 1}}
  gpu_to_gpu: {{bandwidth_gbps: 100.0, latency_s: 1.0e-5}}
  node_to_node: {{bandwidth_gbps: 10.0, latency_s: 1.0e-4}}
cpu: {{name: toy cpu, cores: 8, peak_gflops: 100.0, memory_bandwidth_gbps: 10.0}}
operations:
  expert_ffn: {_ROOFLINE}
  dense_gemm: {_ROOFLINE}
  attention_prefill: {_ROOFLINE}
  attention_decode: {_ROOFLINE}
  gate: {_ROOFLINE}
"""

TINY_MODEL: dict[str, Any] = {
    "name": "tiny-moe",
    "hidden_size": 64,
    "num_layers": 2,
    "vocab_size": 128,
    "attention_type": "mha",
    "num_attention_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 32,
    "num_experts": 2,
    "top_k": 2,
    "expert_ffn_size": 128,
}


def toy_profile() -> HardwareProfile:
    return parse_profile(TOY_PROFILE_YAML, origin="toy-round.yaml")


def write_toy_profile(folder: Path) -> Path:
    path = folder / "toy-round.yaml"
    path.write_text(TOY_PROFILE_YAML, encoding="utf-8")
    return path


def tiny_model(**overrides: Any) -> ModelSpec:
    return ModelSpec.model_validate({**TINY_MODEL, **overrides})


def roofline_s(flops: float, nbytes: float) -> float:
    """What the toy profile charges for an operation."""
    return max(float(flops) / PEAK_FLOPS_PER_S, float(nbytes) / HBM_BYTES_PER_S)


def h2d_s(nbytes: float) -> float:
    return H2D_LATENCY_S + nbytes / H2D_BYTES_PER_S


def scenario_data(
    profile_path: Path,
    *,
    model: dict[str, Any] | None = None,
    prompt_tokens: int = 8,
    output_tokens: int = 3,
    max_requests: int = 1,
    rate_per_s: float = 1.0,
    seed: int = 0,
    hardware: dict[str, Any] | None = None,
    policies: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A scenario mapping, as a YAML file would give it, on the toy profile and (by default) the tiny model."""
    return {
        "name": "engine-test",
        "model": {"spec": copy.deepcopy(model if model is not None else TINY_MODEL)},
        "hardware": {"profile": str(profile_path), "expert_memory": {"all": True}, **(hardware or {})},
        "workload": {
            "arrivals": {
                "kind": "poisson",
                "rate_per_s": rate_per_s,
                "prompt_tokens": {"dist": "fixed", "tokens": prompt_tokens},
                "output_tokens": {"dist": "fixed", "tokens": output_tokens},
            },
            "max_requests": max_requests,
            "seed": seed,
        },
        "policies": policies if policies is not None else {"expert_cache": {"name": "all_resident"}},
    }


def load(data: dict[str, Any], base_dir: Path) -> LoadedScenario:
    """Validate and resolve a scenario mapping the way ``load_scenario`` does for a file."""
    source = str(base_dir / "engine-test.yaml")
    return resolve(parse_scenario(yaml.safe_load(yaml.safe_dump(data)), source), source, base_dir)
