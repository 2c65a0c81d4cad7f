"""Measuring kernels and copies with torch: the plan of points, the timed calls, the points file.

A calibration is a list of ``Task`` (one op at one size, dtype and thread count). Each task is timed
(``calibrate.timing``) and appended at once as one row of the points CSV, so an interrupted run keeps
everything it measured and a rerun skips the rows already there (resume).

Ops measured (``op`` column):

- ``expert_ffn``: one gated expert ``(silu(x @ W_gate) * (x @ W_up)) @ W_down`` (``relu(x @ W_up) @ W_down``
  for 2-matrix experts), tokens x hidden activations, weights rotated over enough copies to exceed the
  last-level cache (an expert cache streams cold weights).
- ``dense_gemm``: ``x @ W`` for the attention projections (cold rotating weights).
- ``gate``: router GEMM + softmax + top-k + renormalise (router weights stay hot: they are small).
- ``host_copy`` (CPU): ``dst.copy_(src)`` into a preallocated host buffer from a cold source: the memory copy
  the CPU runtime does to fill its expert cache. It is NOT a PCIe transfer. ``h2d_copy`` on CUDA, pinned
  and pageable; ``d2h_copy`` device -> host on CUDA. A ``streams`` column > 1 marks several copies at once (CUDA
  streams; CPU copy threads), timed until all are done. Copies and ``mem_read`` are sampled in rounds spread over
  the whole run (``SpreadSampler``), not in one stretch.
- ``attention_decode``: ``scaled_dot_product_attention`` of one query token per sequence over ``context`` cached
  tokens, ``batch`` sequences in one call (GQA via ``enable_gqa``); on the CPU this is the CPU attention.
- ``attention_prefill``: causal SDPA over a prompt of ``tokens`` tokens (one sequence).
- ``peak_gemm`` (hot square GEMM) and ``mem_read`` (sum over a large buffer): the attainable compute and
  memory rates that the profile's roofline uses as its "peak" for a CPU.

Only ``torch.cuda.is_available()`` switches on the CUDA paths; they are written but untested on a CPU box."""

from __future__ import annotations

import csv
import math
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from calibrate.environment import load_average
from calibrate.errors import CalibrationError
from calibrate.timing import Budget, Summary, sample, summarize
from sim.spec import ModelSpec

PARAM_COLUMNS: tuple[str, ...] = (
    "hidden", "ffn", "num_matrices", "in_features", "out_features", "top_k", "tokens", "batch", "context",
    "num_heads", "num_kv_heads", "head_dim", "nbytes", "pinned", "num_experts", "num_ranks", "streams",
)
# Columns added after the first shipped points files: an older file lacks some of them (read as empty) and is
# rewritten with every column before a resumed run appends to it.
LATER_COLUMNS: tuple[str, ...] = ("num_experts", "num_ranks", "streams")
RESULT_COLUMNS: tuple[str, ...] = (
    "median_s", "p10_s", "p90_s", "cv", "num_samples", "num_dropped", "load_avg_1m", "measured_at",
)
POINT_COLUMNS: tuple[str, ...] = ("op", "dtype", "threads", "device_name", *PARAM_COLUMNS, *RESULT_COLUMNS)

TORCH_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
COLD_BYTES = 128 * 2**20  # 4x this machine's 32 MiB L3 (and > an H100's 50 MB L2): rotating copies stay cold

QUICK_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)
FULL_TOKENS = (*range(1, 17), 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
QUICK_GEMM_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FULL_GEMM_TOKENS = (*QUICK_GEMM_TOKENS, 1024, 2048)  # projections and routers are smooth: a log-2 grid suffices
QUICK_DECODE = {"batch": (1, 4, 16), "context": (256, 1024, 4096)}
FULL_DECODE = {"batch": (1, 2, 4, 8, 16, 32), "context": (128, 512, 2048, 8192)}
QUICK_CPU_DECODE = {"batch": (1, 16), "context": (256, 4096)}  # the other thread counts' corners (quick)
MAX_DECODE_KV_TOKENS = 65536  # batch x context: keeps the KV tensors of one point below ~1 GB
QUICK_PREFILL = (32, 64, 128, 256, 512, 1024)
FULL_PREFILL = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
QUICK_GROUPED = {"num_experts": (1, 2, 4, 8), "tokens": (1, 4, 16, 64)}
FULL_GROUPED = {"num_experts": (1, 2, 4, 8, 16, 32), "tokens": (1, 2, 4, 8, 16, 32, 64, 128)}
MAX_GROUPED_WEIGHT_BYTES = 512 * 2**20  # one grouped point's weights (x2 rotating copies) stay below ~1 GB
QUICK_COPY_MB = (1, 4, 16, 64, 256)
FULL_COPY_MB = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Several copies at once (CUDA streams; CPU copy threads): does a second copy engine / thread move more bytes per
# second, or do they share one link? Each point is ``streams`` copies of ``nbytes`` each, timed until all are done.
CONCURRENT_STREAMS = (2, 4)
CONCURRENT_COPY_MB = {True: (4, 64), False: (4, 16, 64, 256)}  # quick / full


@dataclass(frozen=True, slots=True)
class Task:
    """One point to measure: an op at one size. ``params`` holds the shape and size columns that apply."""

    op: str
    dtype: str
    threads: int
    params: tuple[tuple[str, int], ...] = field(default=())

    @classmethod
    def of(cls, op: str, dtype: str, threads: int, **params: int) -> "Task":
        unknown = set(params) - set(PARAM_COLUMNS)
        if unknown:
            raise ValueError(f"unknown task parameter(s) {sorted(unknown)}")
        return cls(op, dtype, threads, tuple(sorted((k, int(v)) for k, v in params.items())))

    @property
    def p(self) -> dict[str, int]:
        return dict(self.params)

    def key(self) -> tuple:
        return (self.op, self.dtype, self.threads, self.params)

    def setup_key(self) -> tuple:
        """Tasks that share buffers (same op, dtype and shape; only the size column differs)."""
        size_cols = {"tokens", "batch", "context", "nbytes"}
        return (self.op, self.dtype, tuple(kv for kv in self.params if kv[0] not in size_cols))


def row_key(row: dict[str, str]) -> tuple:
    params = tuple(sorted((k, int(row[k])) for k in PARAM_COLUMNS if row.get(k, "") != ""))
    return (row["op"], row["dtype"], int(row["threads"]), params)


# ---------------------------------------------------------------- the plan


def _dedup(tasks: Iterable[Task]) -> list[Task]:
    seen: set[tuple] = set()
    out = []
    for t in tasks:
        if t.key() not in seen:
            seen.add(t.key())
            out.append(t)
    return out


def build_plan(
    models: Sequence[ModelSpec], *, quick: bool, device: str, threads: int, dtypes: Sequence[str] = ("bf16",),
) -> list[Task]:
    """Every point a calibration measures, grouped by shape so buffers are built once per shape."""
    tokens = QUICK_TOKENS if quick else FULL_TOKENS
    gemm_tokens = QUICK_GEMM_TOKENS if quick else FULL_GEMM_TOKENS
    tasks: list[Task] = []
    for dtype in dtypes:
        tasks.append(Task.of("peak_gemm", dtype, threads, hidden=2048))
    tasks.append(Task.of("mem_read", "fp32", threads, nbytes=512 * 2**20))
    copy_op = "h2d_copy" if device == "cuda" else "host_copy"
    for mb in QUICK_COPY_MB if quick else FULL_COPY_MB:
        if device == "cuda":
            for pinned in (1, 0):
                tasks.append(Task.of("h2d_copy", "bf16", threads, nbytes=mb * 2**20, pinned=pinned))
            tasks.append(Task.of("d2h_copy", "bf16", threads, nbytes=mb * 2**20, pinned=1))
        else:
            tasks.append(Task.of("host_copy", "bf16", threads, nbytes=mb * 2**20))
    for streams in CONCURRENT_STREAMS:
        for mb in CONCURRENT_COPY_MB[quick]:
            tasks.append(Task.of(copy_op, "bf16", threads, nbytes=mb * 2**20, streams=streams,
                                 **({"pinned": 1} if device == "cuda" else {})))
    for dtype in dtypes:
        for spec in models:
            experts = [spec.expert_shape] + ([spec.shared_expert_shape] if spec.shared_expert_shape else [])
            for shape in experts:
                for t in tokens:
                    tasks.append(Task.of("expert_ffn", dtype, threads, hidden=shape.hidden, ffn=shape.ffn,
                                         num_matrices=shape.num_matrices, tokens=t))
            router = spec.router_shape
            for t in gemm_tokens:
                tasks.append(Task.of("gate", dtype, threads, in_features=router.in_features,
                                     out_features=router.out_features, top_k=spec.top_k, tokens=t))
            projections = spec.attention_projection_shapes if not quick else spec.attention_projection_shapes[:1]
            for g in projections:
                for t in gemm_tokens:
                    tasks.append(Task.of("dense_gemm", dtype, threads, in_features=g.in_features,
                                         out_features=g.out_features, tokens=t))
    # Grouped expert calls (several experts in one batched GEMM, as engines run a layer's experts):
    # the first model's routed expert shape, by number of experts and tokens per expert.
    grouped = QUICK_GROUPED if quick else FULL_GROUPED
    for dtype in dtypes[:1]:
        for spec in models[:1] if quick else models[:2]:
            shape = spec.expert_shape
            for e in grouped["num_experts"]:
                if e * shape.hidden * shape.ffn * shape.num_matrices * 2 > MAX_GROUPED_WEIGHT_BYTES:
                    continue
                for t in grouped["tokens"]:
                    tasks.append(Task.of("grouped_expert_ffn", dtype, threads, hidden=shape.hidden, ffn=shape.ffn,
                                         num_matrices=shape.num_matrices, num_experts=e, tokens=t))
    # Attention: bf16 only (what serving runs); MLA is not an SDPA call, so MHA/GQA models only.
    attention_models = [s for s in models if s.attention_type in ("mha", "gqa")]
    decode = QUICK_DECODE if quick else FULL_DECODE
    for spec in attention_models:
        heads = dict(num_heads=spec.num_attention_heads, num_kv_heads=spec.num_kv_heads or spec.num_attention_heads,
                     head_dim=spec.head_dim)
        for b in decode["batch"]:
            for c in decode["context"]:
                if b * c <= MAX_DECODE_KV_TOKENS:
                    tasks.append(Task.of("attention_decode", "bf16", threads, batch=b, context=c, **heads))
        for t in QUICK_PREFILL if quick else FULL_PREFILL:
            tasks.append(Task.of("attention_prefill", "bf16", threads, tokens=t, **heads))
    tasks += cpu_attention_tasks(attention_models, quick=quick, device=device, threads=threads)
    return _dedup(tasks)


def cpu_attention_thread_counts(threads: int, cpu_count: int | None = None) -> list[int]:
    """Thread counts CPU attention is measured at: 1, the calibration's, and every core (at most 3 counts)."""
    import os

    cores = max(1, cpu_count or os.cpu_count() or 1)
    return sorted({1, min(threads, cores), cores})


def cpu_attention_tasks(attention_models: Sequence[ModelSpec], *, quick: bool, device: str, threads: int,
                        cpu_count: int | None = None) -> list[Task]:
    """Decode attention on the HOST CPU by batch, context and thread count (SpecMoEOff / MoE-Lightning run
    it there). On a CPU calibration these are ``attention_decode`` points at the other thread counts (the
    main count is already planned); on CUDA, ``cpu_attention_decode`` points, run on the host."""
    decode = QUICK_CPU_DECODE if quick else FULL_DECODE
    tasks = []
    for spec in attention_models:
        heads = dict(num_heads=spec.num_attention_heads, num_kv_heads=spec.num_kv_heads or spec.num_attention_heads,
                     head_dim=spec.head_dim)
        for n in cpu_attention_thread_counts(threads, cpu_count):
            if device == "cpu" and n == threads:
                continue
            op = "attention_decode" if device == "cpu" else "cpu_attention_decode"
            for b in decode["batch"]:
                for c in decode["context"]:
                    if b * c <= MAX_DECODE_KV_TOKENS:
                        tasks.append(Task.of(op, "bf16", n, batch=b, context=c, **heads))
    return tasks


# ---------------------------------------------------------------- the timed calls


class _Buffers:
    """Tensors for the tasks of one setup key; rebuilt when the key changes (one shape's buffers alive at a time)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.key: tuple | None = None
        self.items: dict[str, Any] = {}

    def for_task(self, task: Task) -> dict[str, Any]:
        if task.setup_key() != self.key:
            self.items = {}  # free the previous shape's tensors before allocating
            self.key = task.setup_key()
        return self.items


def _generator(task: Task, device: str):
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(repr(task.setup_key()).encode()))  # deterministic per shape
    return g


def _rand(shape: tuple[int, ...], dtype: str, device: str, gen, scale: float = 0.05):
    import torch

    t = torch.randn(shape, generator=gen, device=device, dtype=getattr(torch, TORCH_DTYPES[dtype]))
    return t.mul_(scale)


def _num_copies(nbytes: float) -> int:
    return int(min(64, max(2, math.ceil(COLD_BYTES / max(nbytes, 1)))))


def _make_call(task: Task, bufs: dict[str, Any], device: str) -> Callable[[int], object]:
    """The function the timer calls with a repeat index (to rotate buffers)."""
    import torch
    import torch.nn.functional as F

    p = task.p
    gen = _generator(task, device)
    bpe = 4 if task.dtype == "fp32" else 2
    if task.op == "expert_ffn":
        h, f, m = p["hidden"], p["ffn"], p["num_matrices"]
        if "w" not in bufs:
            n = _num_copies(h * f * m * bpe)
            bufs["w"] = [tuple(_rand((h, f) if j < m - 1 else (f, h), task.dtype, device, gen) for j in range(m))
                         for _ in range(n)]
        w = bufs["w"]
        x = _rand((p["tokens"], h), task.dtype, device, gen, scale=1.0)
        if m == 3:
            def call(i: int) -> object:
                wg, wu, wd = w[i % len(w)]
                return (F.silu(x @ wg) * (x @ wu)) @ wd
        else:
            def call(i: int) -> object:
                wu, wd = w[i % len(w)]
                return F.relu(x @ wu) @ wd
        return call
    if task.op == "grouped_expert_ffn":
        h, f, m, e = p["hidden"], p["ffn"], p["num_matrices"], p["num_experts"]
        if "w" not in bufs:
            n = _num_copies(e * h * f * m * bpe)
            bufs["w"] = [tuple(_rand((e, h, f) if j < m - 1 else (e, f, h), task.dtype, device, gen) for j in range(m))
                         for _ in range(n)]
        w = bufs["w"]
        x = _rand((e, p["tokens"], h), task.dtype, device, gen, scale=1.0)
        if m == 3:  # one batched GEMM per matrix over all experts: what a grouped-GEMM engine launches
            def call(i: int) -> object:
                wg, wu, wd = w[i % len(w)]
                return torch.bmm(F.silu(torch.bmm(x, wg)) * torch.bmm(x, wu), wd)
        else:
            def call(i: int) -> object:
                wu, wd = w[i % len(w)]
                return torch.bmm(F.relu(torch.bmm(x, wu)), wd)
        return call
    if task.op == "dense_gemm":
        if "w" not in bufs:
            n = _num_copies(p["in_features"] * p["out_features"] * bpe)
            bufs["w"] = [_rand((p["in_features"], p["out_features"]), task.dtype, device, gen) for _ in range(n)]
        w = bufs["w"]
        x = _rand((p["tokens"], p["in_features"]), task.dtype, device, gen, scale=1.0)
        return lambda i: x @ w[i % len(w)]
    if task.op == "gate":
        if "w" not in bufs:
            bufs["w"] = _rand((p["in_features"], p["out_features"]), task.dtype, device, gen)
        w, k = bufs["w"], p["top_k"]
        x = _rand((p["tokens"], p["in_features"]), task.dtype, device, gen, scale=1.0)

        def call(i: int) -> object:
            probs = torch.softmax((x @ w).float(), dim=-1)
            top, idx = torch.topk(probs, k, dim=-1)
            return top / top.sum(dim=-1, keepdim=True), idx
        return call
    if task.op in ("host_copy", "h2d_copy", "d2h_copy") and is_concurrent(task):
        return _concurrent_copy_call(task, bufs)
    if task.op in ("host_copy", "h2d_copy", "d2h_copy"):
        nbytes = p["nbytes"]
        numel = nbytes // 2
        if task.op == "host_copy":
            n = _num_copies(nbytes)
            # Source and destination both rotate: an expert cache copies a cold expert into a cold slot.
            src, dst = _host_copy_buffers(bufs, n, numel)
            return lambda i: dst[(i + 1) % n].copy_(src[i % n])
        pinned = bool(p.get("pinned", 1))  # pragma: no cover - needs a GPU
        host = [torch.empty(numel, dtype=torch.bfloat16, pin_memory=pinned).fill_(j) for j in range(2)]
        gpu = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
        if task.op == "d2h_copy":  # device -> host (e.g. a KV swap out)
            return lambda i: host[i % 2].copy_(gpu, non_blocking=pinned)
        return lambda i: gpu.copy_(host[i % 2], non_blocking=pinned)
    if task.op in ("attention_decode", "cpu_attention_decode"):
        b, c, hq, hkv, d = p["batch"], p["context"], p["num_heads"], p["num_kv_heads"], p["head_dim"]
        kv_bytes = 2 * b * c * hkv * d * 2
        n = _num_copies(kv_bytes) if kv_bytes < COLD_BYTES else 1  # a large KV cache is cold by itself
        q = _rand((b, hq, 1, d), "bf16", device, gen, scale=1.0)
        kv = [(_rand((b, hkv, c, d), "bf16", device, gen, 1.0), _rand((b, hkv, c, d), "bf16", device, gen, 1.0))
              for _ in range(n)]
        gqa = hq != hkv

        def call(i: int) -> object:
            k, v = kv[i % len(kv)]
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        return call
    if task.op == "attention_prefill":
        t, hq, hkv, d = p["tokens"], p["num_heads"], p["num_kv_heads"], p["head_dim"]
        q = _rand((1, hq, t, d), "bf16", device, gen, 1.0)
        k = _rand((1, hkv, t, d), "bf16", device, gen, 1.0)
        v = _rand((1, hkv, t, d), "bf16", device, gen, 1.0)
        gqa = hq != hkv
        return lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if task.op == "peak_gemm":
        n = p["hidden"]
        a = _rand((n, n), task.dtype, device, gen, 1.0)
        bm = _rand((n, n), task.dtype, device, gen, 1.0)
        return lambda i: a @ bm
    if task.op == "mem_read":
        buf = torch.ones(p["nbytes"] // 4, dtype=torch.float32, device=device)
        return lambda i: buf.sum()
    raise ValueError(f"unknown op {task.op!r}")


def _host_copy_buffers(bufs: dict[str, Any], count: int, numel: int) -> tuple[list[Any], list[Any]]:
    """``count`` source and ``count`` destination host buffers of ``numel`` bf16 elements: views into two arenas
    kept in ``bufs`` and grown only when a task needs more. The spread rounds (``SpreadSampler``) rebuild every
    copy point's buffers each round; fresh multi-GiB allocations cost their page faults every time (a full
    calibration spent minutes of system time on them), while reused arenas fault once."""
    import torch

    need = count * numel
    if bufs.get("copy_src") is None or bufs["copy_src"].numel() < need:
        bufs["copy_src"] = bufs["copy_dst"] = None  # free the smaller arenas first
        bufs["copy_src"] = torch.ones(need, dtype=torch.bfloat16)
        bufs["copy_dst"] = torch.zeros(need, dtype=torch.bfloat16)
    src, dst = bufs["copy_src"], bufs["copy_dst"]
    return ([src[j * numel : (j + 1) * numel] for j in range(count)],
            [dst[j * numel : (j + 1) * numel] for j in range(count)])


def _concurrent_copy_call(task: Task, bufs: dict[str, Any]) -> Callable[[int], object]:
    """``streams`` copies of ``nbytes`` at once, returning when all are done. CUDA: one host->device copy per
    stream from its own pinned buffer, then a device synchronize (timed on the wall clock). CPU: the host copy
    on ``streams`` threads (the calling one and a pool), each from its own cold source into its own slot."""
    import torch

    p = task.p
    streams, numel = p["streams"], p["nbytes"] // 2
    if task.op == "h2d_copy":  # pragma: no cover - needs a GPU
        cuda_streams = [torch.cuda.Stream() for _ in range(streams)]
        src = [torch.empty(numel, dtype=torch.bfloat16, pin_memory=True).fill_(j) for j in range(streams)]
        dst = [torch.empty(numel, dtype=torch.bfloat16, device="cuda") for _ in range(streams)]

        def call_cuda(i: int) -> object:
            for stream, a, b in zip(cuda_streams, dst, src):
                with torch.cuda.stream(stream):
                    a.copy_(b, non_blocking=True)
            torch.cuda.synchronize()
            return None
        return call_cuda
    from concurrent.futures import ThreadPoolExecutor

    n = _num_copies(p["nbytes"] * streams)
    flat_src, flat_dst = _host_copy_buffers(bufs, streams * n, numel)
    src = [flat_src[k * n : (k + 1) * n] for k in range(streams)]
    dst = [flat_dst[k * n : (k + 1) * n] for k in range(streams)]
    pool = ThreadPoolExecutor(max_workers=streams - 1, thread_name_prefix="calibrate-copy")

    def copy(a: Any, b: Any) -> None:
        with torch.inference_mode():  # inference mode is per thread; the buffers were made in it
            a.copy_(b)

    def call_cpu(i: int) -> object:
        others = [pool.submit(copy, dst[k][(i + 1) % n], src[k][i % n]) for k in range(1, streams)]
        dst[0][(i + 1) % n].copy_(src[0][i % n])
        for f in others:
            f.result()
        return None
    call_cpu.pool = pool  # type: ignore[attr-defined]  # kept alive with the call; its threads end with it
    return call_cpu


def is_concurrent(task: Task) -> bool:
    """A point of several copies at once: timed on the wall clock (other threads / streams do part of the work)."""
    return task.p.get("streams", 1) > 1


def task_device(task: Task, device: str) -> str:
    """Where a task runs: ``cpu_*`` ops (the host CPU's attention) on the CPU even in a CUDA calibration."""
    return "cpu" if task.op.startswith("cpu_") else device


def measure_group(tasks: Sequence[Task], bufs: _Buffers, device: str, budget: Budget) -> list[Summary]:
    """Time tasks that share buffers (one shape, several sizes) in ``budget.rounds`` interleaved rounds.

    On a shared machine a burst of foreign load lasts long enough to cover every sample of one point;
    taking each point's samples in several rounds spread over the group spreads a burst over many
    points' minority of samples, which the median then ignores."""
    import torch

    device = task_device(tasks[0], device)
    rounds = max(1, budget.rounds)
    samples: list[list[float]] = [[] for _ in tasks]
    with torch.inference_mode():
        calls = []
        for task in tasks:
            calls.append(_make_call(task, bufs.for_task(task), device))
        for r in range(rounds):
            _sample_round(tasks, calls, samples, device, budget, rounds=rounds, round_index=r,
                          warmup=budget.warmup if r == 0 else 0)
    return [summarize(s) for s in samples]


def _sample_round(tasks: Sequence[Task], calls: Sequence[Callable[[int], object]], samples: list[list[float]],
                  device: str, budget: Budget, *, rounds: int, round_index: int, warmup: int) -> None:
    """One round over ``tasks``, each appending to its ``samples``: a ``1/rounds`` share of the repeats and time."""
    import torch

    per_round_min = max(1, math.ceil(budget.min_repeats / rounds))
    per_round_max = max(1, math.ceil(budget.max_repeats / rounds))
    for task, call, s in zip(tasks, calls, samples):
        if device == "cpu" and torch.get_num_threads() != task.threads:
            torch.set_num_threads(task.threads)
        concurrent = is_concurrent(task)
        s += sample(call, warmup=warmup, min_repeats=per_round_min, max_repeats=per_round_max,
                    time_s=budget.time_s / rounds, start=len(s) + round_index, cuda=device == "cuda" and not concurrent,
                    clock=budget.clock if (device == "cpu" and task.threads == 1 and not concurrent) else "wall",
                    short_call_s=budget.short_call_s, short_call_repeat_factor=budget.short_call_repeat_factor)


# Ops whose samples are spread over the whole calibration (``SpreadSampler``): pure memory / link bandwidth,
# which on a shared machine drifts over seconds with the neighbours' traffic. ``mem_read`` is the profile's
# memory-bandwidth peak: measured in one stretch it came out 23-24% apart in two back-to-back calibrations.
SPREAD_OPS: frozenset[str] = frozenset({"host_copy", "h2d_copy", "d2h_copy", "mem_read"})


class SpreadSampler:
    """Samples groups of ``SPREAD_OPS`` tasks in ``budget.spread_rounds`` rounds, one round at a time, so the
    caller can interleave the rounds with the other groups and a point's median covers the whole run.

    Each round builds its calls afresh. The host-copy buffers behind them are views into one pair of arenas
    (``_host_copy_buffers``) kept for the whole run and freed by ``finish``; other buffers (``mem_read``'s,
    CUDA's pinned ones) are dropped after each round. Within a round the group's points are interleaved as
    ``measure_group`` does."""

    def __init__(self, groups: Sequence[Sequence[Task]], device: str, budget: Budget) -> None:
        self.groups = [list(g) for g in groups]
        self.device = device
        self.budget = budget
        self.rounds = max(1, budget.spread_rounds)
        self.samples: list[list[list[float]]] = [[[] for _ in g] for g in self.groups]
        self.done_rounds = 0
        self.arena: dict[str, Any] = {}  # host-copy buffers reused by every round (``_host_copy_buffers``)

    def run_round(self) -> None:
        """One round of every group (a no-op once every round has run)."""
        import torch

        if self.done_rounds >= self.rounds or not self.groups:
            return
        with torch.inference_mode():
            for group, samples in zip(self.groups, self.samples):
                device = task_device(group[0], self.device)
                calls = [_make_call(task, self.arena, device) for task in group]
                _sample_round(group, calls, samples, device, self.budget, rounds=self.rounds,
                              round_index=self.done_rounds, warmup=1)
                for call in calls:  # concurrent CPU copies: their worker threads end with the round
                    pool = getattr(call, "pool", None)
                    if pool is not None:
                        pool.shutdown()
                del calls
        self.done_rounds += 1

    def finish(self) -> list[tuple[Task, Summary]]:
        """Run the rounds still due, then each task's summary over all its rounds."""
        while self.done_rounds < self.rounds:
            self.run_round()
        self.arena.clear()
        return [(task, summarize(s)) for group, samples in zip(self.groups, self.samples)
                for task, s in zip(group, samples)]


def spread_schedule(num_groups: int, rounds: int) -> list[int]:
    """After how many of the ``num_groups`` other groups each spread round runs: evenly over the run, the
    first before any other group (an interrupted run has copy samples from its start)."""
    if num_groups == 0:
        return [0] * rounds
    return [round(r * num_groups / rounds) for r in range(rounds)]


# ---------------------------------------------------------------- the points file


def read_points(path: Path) -> list[dict[str, str]]:
    """Rows of a points CSV (all values as strings); [] when the file does not exist."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        # POINT_COLUMNS in order, of which only later columns (LATER_COLUMNS) may be missing.
        in_order = header == [c for c in POINT_COLUMNS if c in header]
        if not header or not in_order or not set(POINT_COLUMNS) - set(header) <= set(LATER_COLUMNS):
            raise CalibrationError(f"{path}: not a moesim points file (columns {reader.fieldnames}); "
                                   f"remove it, use --fresh, or choose another --out")
        return [{c: row.get(c) or "" for c in POINT_COLUMNS} for row in reader if row.get("median_s")]


def _upgrade_points_file(path: Path) -> None:
    """Rewrite an older points file (without ``LATER_COLUMNS``) with every column, so rows can be appended."""
    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), None)
    if header is None or list(header) == list(POINT_COLUMNS):
        return
    rows = read_points(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=POINT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def append_points(path: Path, rows: Sequence[dict[str, str]]) -> None:
    """Append finished rows (e.g. collectives measured in other processes) to a points file."""
    new_file = not path.exists()
    if not new_file:
        _upgrade_points_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=POINT_COLUMNS)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in POINT_COLUMNS})
        fh.flush()


@dataclass
class RunResult:
    measured: int = 0  # new points this run
    skipped: int = 0  # already in the points file (resumed)
    rows: list[dict[str, str]] = field(default_factory=list)


def run_tasks(
    tasks: Sequence[Task],
    points_path: Path,
    *,
    device: str,
    device_name: str,
    budget: Budget,
    progress: bool = True,
    fresh: bool = False,
    after_point: Callable[[int], None] | None = None,
) -> RunResult:
    """Measure every task not already in ``points_path``, appending (and flushing) one row per point.

    ``after_point(n)`` runs after the n-th new point is written (tests use it to interrupt a run)."""
    from tqdm import tqdm

    if fresh and points_path.exists():
        points_path.unlink()
    existing = read_points(points_path)
    others = sorted({r["device_name"] for r in existing} - {device_name})
    if others:
        raise CalibrationError(f"{points_path}: points were measured on {others[0]!r}, not {device_name!r}; "
                               f"use --fresh to start over or choose another --out")
    done = {row_key(r) for r in existing}
    todo = [t for t in tasks if t.key() not in done]
    result = RunResult(skipped=len(tasks) - len(todo), rows=list(existing))
    points_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not points_path.exists()
    if not new_file:
        _upgrade_points_file(points_path)
    bufs = _Buffers(device)
    with points_path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=POINT_COLUMNS)
        if new_file:
            writer.writeheader()
            fh.flush()
        bar = tqdm(total=len(todo), desc="calibrate", unit="pt", disable=not progress, dynamic_ncols=True)
        groups: dict[tuple, list[Task]] = {}
        for task in todo:
            groups.setdefault((task.threads, task.setup_key()), []).append(task)
        ordinary = [g for g in groups.values() if g[0].op not in SPREAD_OPS]
        spread = SpreadSampler([g for g in groups.values() if g[0].op in SPREAD_OPS], device, budget)
        due = spread_schedule(len(ordinary), spread.rounds) if spread.groups else []

        def measured() -> Iterable[tuple[Task, Summary]]:
            for i, group in enumerate(ordinary):
                while due and due[0] <= i:
                    due.pop(0)
                    spread.run_round()
                first = group[0]
                bar.set_postfix_str(f"{first.op} {' '.join(f'{k}={v}' for k, v in first.params)}"[:60])
                yield from zip(group, measure_group(group, bufs, device, budget))
            if spread.groups:
                bar.set_postfix_str("copies (rounds spread over the run)")
                yield from spread.finish()

        for task, s in measured():
            row = {c: "" for c in POINT_COLUMNS}
            row.update({"op": task.op, "dtype": task.dtype, "threads": str(task.threads),
                        "device_name": device_name})
            row.update({k: str(v) for k, v in task.params})
            row.update({
                "median_s": repr(s.median_s), "p10_s": repr(s.p10_s), "p90_s": repr(s.p90_s),
                "cv": f"{s.cv:.4f}", "num_samples": str(s.num_samples), "num_dropped": str(s.num_dropped),
                "load_avg_1m": f"{load_average()[0]:.2f}",
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            writer.writerow(row)
            fh.flush()
            result.rows.append(row)
            result.measured += 1
            bar.update(1)
            if after_point is not None:
                after_point(result.measured)
        bar.close()
    return result
