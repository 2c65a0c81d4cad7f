"""Measuring collectives (all-to-all, all-reduce) with torch.distributed by per-rank message size.

``moesim calibrate --collectives auto`` (the default) measures them with NCCL when more than one GPU is
visible, on 2, 4, ... up to every visible GPU; otherwise it measures nothing and the profile's
``collectives.skipped`` says why. ``--collectives gloo`` runs the same code on the CPU with the gloo backend
across 2 local processes and a small size grid: a test path for the measuring code (it times loopback
communication between processes of one machine, NOT a GPU interconnect, and the profile says so).

Each size: ``warmup`` untimed calls, then ``repeats`` timed calls, each between barriers; a call's time is
the slowest rank's (a collective ends when its last rank does), on CUDA from CUDA events. Rows come back
as points-file rows (``op`` = all_to_all / all_reduce, ``nbytes`` = per-rank buffer, ``num_ranks``)."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from calibrate.errors import CalibrationError

KINDS = ("all_to_all", "all_reduce")
NCCL_SIZES_BYTES = tuple(2**k for k in range(10, 29, 2))  # 1 KiB .. 256 MiB
GLOO_SIZES_BYTES = (4096, 65536, 1 << 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, backend: str, port: int, sizes: Sequence[int], repeats: int, warmup: int,
            out_dir: str) -> None:  # pragma: no cover - runs in child processes (coverage does not follow)
    import json
    import time

    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = f"cuda:{rank}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # gloo reduces float32 (bf16 support varies)
    elem = torch.tensor([], dtype=dtype).element_size()
    rows = []
    try:
        for kind in KINDS:
            for nbytes in sizes:
                numel = max(world, nbytes // elem // world * world)
                x = torch.ones(numel, dtype=dtype, device=device)
                y = torch.empty_like(x)

                def call() -> None:
                    if kind == "all_to_all":
                        dist.all_to_all_single(y, x)
                    else:
                        dist.all_reduce(x)

                for _ in range(warmup):
                    call()
                if cuda:
                    torch.cuda.synchronize()
                samples = []
                for _ in range(repeats):
                    dist.barrier()
                    if cuda:
                        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        begin.record()
                        call()
                        end.record()
                        end.synchronize()
                        s = begin.elapsed_time(end) * 1e-3
                    else:
                        t0 = time.perf_counter_ns()
                        call()
                        s = (time.perf_counter_ns() - t0) * 1e-9
                    slowest = torch.tensor([s], dtype=torch.float64, device=device)
                    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                    samples.append(float(slowest.item()))
                if rank == 0:
                    rows.append({"op": kind, "nbytes": numel * elem, "num_ranks": world, "samples": samples})
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_dir, "rows.json").write_text(json.dumps(rows), encoding="utf-8")


def measure_collectives(*, backend: str, world_size: int, sizes_bytes: Sequence[int], repeats: int = 10,
                        warmup: int = 3, device_name: str = "", threads: int = 1) -> list[dict[str, str]]:
    """Points rows of every (kind, size) on ``world_size`` ranks, each rank its own process."""
    import torch.multiprocessing as mp

    from calibrate.environment import load_average
    from calibrate.measure import POINT_COLUMNS
    from calibrate.timing import summarize

    if backend not in ("nccl", "gloo"):
        raise CalibrationError(f"--collectives {backend!r}: expected auto, nccl, gloo or none")
    if world_size < 2:
        raise CalibrationError(f"collectives need at least 2 ranks; got {world_size}")
    import json

    with tempfile.TemporaryDirectory(prefix="moesim-coll-") as tmp:
        mp.spawn(_worker, args=(world_size, backend, _free_port(), list(sizes_bytes), repeats, warmup, tmp),
                 nprocs=world_size, join=True)
        measured = json.loads(Path(tmp, "rows.json").read_text(encoding="utf-8"))
    rows = []
    for m in measured:
        s = summarize(m["samples"])
        row = {c: "" for c in POINT_COLUMNS}
        row.update({"op": m["op"], "dtype": "bf16" if backend == "nccl" else "fp32", "threads": str(threads),
                    "device_name": device_name, "nbytes": str(m["nbytes"]), "num_ranks": str(m["num_ranks"]),
                    "median_s": repr(s.median_s), "p10_s": repr(s.p10_s), "p90_s": repr(s.p90_s),
                    "cv": f"{s.cv:.4f}", "num_samples": str(s.num_samples), "num_dropped": str(s.num_dropped),
                    "load_avg_1m": f"{load_average()[0]:.2f}",
                    "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        rows.append(row)
    return rows


def plan_collectives(mode: str, *, device: str, gpu_count: int) -> tuple[str | None, list[int], str]:
    """(backend or None, world sizes, why) for ``--collectives MODE`` on this machine."""
    if mode == "none":
        return None, [], "skipped: --collectives none"
    if mode == "gloo":
        return "gloo", [2], ("gloo backend on the CPU across 2 local processes (test path of the measuring code): "
                             "loopback communication between processes, NOT a GPU interconnect")
    if mode not in ("auto", "nccl"):
        raise CalibrationError(f"--collectives {mode!r}: expected auto, nccl, gloo or none")
    if device != "cuda" or gpu_count < 2:
        why = ("skipped: no GPU (CPU calibration); all-to-all / all-reduce need more than one GPU" if device != "cuda"
               else f"skipped: {gpu_count} GPU visible; all-to-all / all-reduce need more than one")
        if mode == "nccl":
            raise CalibrationError(f"--collectives nccl: needs --device cuda and 2+ GPUs ({why.removeprefix('skipped: ')})")
        return None, [], why
    sizes = []
    n = 2
    while n <= gpu_count:
        sizes.append(n)
        n *= 2
    if sizes[-1] != gpu_count:
        sizes.append(gpu_count)
    return "nccl", sizes, f"NCCL on {gpu_count} visible GPUs (torch.distributed), ranks {sizes}"
