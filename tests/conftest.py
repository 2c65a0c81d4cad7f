"""Shared fixtures: a tiny valid scenario as a dict, and a writer for scenario files under tmp_path.

The tiny scenario is OLMoE (64 experts x 16 MoE layers of 12.6 MB each, 12.9 GB in all) on one H100 with
every expert resident, five fixed-length Poisson requests: it validates, resolves and simulates in well
under a second."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

TINY_SCENARIO: dict[str, Any] = {
    "model": "olmoe-1b-7b",
    "hardware": {"profile": "h100-80gb", "expert_memory": {"all": True}},
    "workload": {
        "arrivals": {
            "kind": "poisson",
            "rate_per_s": 1.0,
            "prompt_tokens": {"dist": "fixed", "tokens": 16},
            "output_tokens": {"dist": "fixed", "tokens": 4},
        },
        "max_requests": 5,
    },
    "policies": {"expert_cache": {"name": "all_resident"}},
}


@pytest.fixture
def tiny() -> dict[str, Any]:
    """A fresh, mutable copy of the tiny scenario."""
    return copy.deepcopy(TINY_SCENARIO)


@pytest.fixture
def write_scenario(tmp_path: Path) -> Callable[[dict[str, Any] | str], Path]:
    """Write a dict (as YAML) or raw text to a new file under tmp_path and return its path."""
    count = iter(range(1_000_000))

    def write(content: dict[str, Any] | str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"scenario{next(count)}.yaml")
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write
