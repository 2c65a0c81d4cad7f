"""The expert-load link as the runtime's copy thread sees it, for the CPU profile's ``host_to_device``.

``moesim calibrate`` times a host copy alone on the calling thread. The runtime copies on its own thread
while the compute thread runs GEMMs on the same two cores: each copy is slower (shared memory bandwidth,
cache, a core that is not free), and a queued load first waits for the copy thread to wake up, take the
GIL and be scheduled. On this shared box those waits were as long as the copies (``moesim validate``'s
"copy engine" line: 6,227 loads, 5.8 s copying, 6.9 s queued with the copy thread free). The simulator's
copy engine is one FIFO server of ``latency_s + nbytes / bandwidth`` per load, so the link is measured as
that server on the runtime: the same grid of batches as ``calibrate.overhead`` with an LRU cache of half the
experts (so loads happen beside compute), every copy job's busy time (-> ``bandwidth_gbps``) and its wait for
a free copy thread (-> ``latency_s``). Means, not medians: the simulator's totals must match the runtime's."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def measure_copy_link(spec: Any, *, seed: int = 0, threads: int = 1, rounds: int = 3) -> dict[str, Any]:
    """Run the overhead grid on the runtime with half the experts cached; return the link's
    ``bandwidth_gbps`` and ``latency_s`` and what they came from."""
    import torch

    from calibrate.overhead import overhead_batches
    from calibrate.runtime.expert_store import ExpertStore
    from calibrate.runtime.server import Runtime
    from sim.policies.cache import make_cache

    n_layers, n_experts = spec.num_moe_layers, spec.num_experts
    cache = make_cache("lru", num_layers=n_layers, num_experts=n_experts,
                       capacity_experts=max(1, n_layers * n_experts // 2), per_layer=False)
    runtime = Runtime.for_measurement(spec, seed=seed, threads=threads)
    runtime.store.close()
    store = runtime.store = ExpertStore(runtime.model.host_experts, cache, num_experts=n_experts)
    busy: list[float] = []
    dispatch: list[float] = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            runtime._warm_up()
            for r in range(rounds + 1):  # round 0 untimed: first touches of the slots stay out
                for batch in overhead_batches(seed):
                    runtime.run_batch(batch)
                    if r == 0:
                        continue
                    free_at = 0.0
                    for job in store._jobs:  # this iteration's loads, FIFO
                        busy.append(job.finished_at_s - job.started_at_s)
                        dispatch.append(max(0.0, job.started_at_s - max(job.queued_at_s, free_at)))
                        free_at = job.finished_at_s
    finally:
        runtime.close()
        torch.set_num_threads(previous_threads)
    if not busy:
        raise RuntimeError("the copy-link grid loaded no expert")
    nbytes = float(spec.expert_bytes)
    busy_mean = float(np.mean(busy))
    return {
        "bandwidth_gbps": round(nbytes / busy_mean / 1e9, 4),
        "latency_s": float(f"{float(np.mean(dispatch)):.4g}"),
        "provenance": {
            "method": ("copy jobs of the runtime's copy thread beside compute (calibrate/runtime/copy_link.py): the "
                       "overhead grid with an LRU cache of half the experts; bandwidth = expert bytes / mean copy time, "
                       "latency = mean wait of a queued load for a free copy thread"),
            "copies": len(busy), "expert_bytes": int(nbytes), "rounds": rounds,
            "copy_s": {"mean": float(f"{busy_mean:.4g}"), "median": float(f"{np.median(busy):.4g}"),
                       "p95": float(f"{np.quantile(busy, 0.95):.4g}")},
            "dispatch_s": {"mean": float(f"{np.mean(dispatch):.4g}"), "median": float(f"{np.median(dispatch):.4g}"),
                           "p95": float(f"{np.quantile(dispatch, 0.95):.4g}")},
            "measure_s": round(time.perf_counter() - started, 1),
        },
    }
