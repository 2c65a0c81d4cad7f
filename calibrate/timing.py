"""Timing one operation: warm-up, adaptive repeats, outlier rejection, median and spread.

CPU calls are timed with ``time.perf_counter_ns`` around the call (CPU kernels are synchronous);
CUDA calls with a pair of CUDA events recorded on the current stream, read after a synchronize."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True, slots=True)
class Budget:
    """How hard to try for one measured point."""

    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 15
    time_s: float = 0.3  # stop adding repeats past this much measuring time (after min_repeats)
    rounds: int = 3  # samples of one shape's points are taken in interleaved rounds (see calibrate.measure)
    clock: str = "wall"  # CPU only: "thread" times the calling thread's CPU time (see ``sample``)
    # Calls shorter than this get up to ``short_call_repeat_factor`` x the repeats (within ``time_s``): a
    # memory-bound call of a millisecond or less scatters by 10-30% from sample to sample on a shared VM, and
    # its extra samples cost almost nothing.
    short_call_s: float = 0.002
    short_call_repeat_factor: int = 4
    # Copies (``calibrate.measure.SPREAD_OPS``) are sampled in this many rounds spread over the whole calibration:
    # this VM's memory bandwidth swings by 10-25% over a few seconds (3 MiB copies: 11.6-14.9 GB/s in 2-s windows
    # within 40 s, idle machine), so samples taken in one short stretch measure that stretch.
    spread_rounds: int = 8


@dataclass(frozen=True, slots=True)
class Summary:
    """Robust statistics of one point's samples (seconds), after dropping outliers."""

    median_s: float
    p10_s: float
    p90_s: float
    cv: float  # std / mean of the kept samples
    num_samples: int  # kept
    num_dropped: int  # rejected as outliers


def summarize(samples_s: np.ndarray | list[float]) -> Summary:
    """Drop samples further than 3 scaled MADs above/below the median (a preempted call on a shared box), then summarize."""
    s = np.asarray(samples_s, dtype=np.float64)
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med))) * 1.4826
    keep = s if mad == 0 else s[np.abs(s - med) <= 3.0 * mad]
    if keep.size == 0:  # cannot happen (the median itself is kept) but stay total
        keep = s
    mean = float(np.mean(keep))
    return Summary(
        median_s=float(np.median(keep)),
        p10_s=float(np.percentile(keep, 10)),
        p90_s=float(np.percentile(keep, 90)),
        cv=float(np.std(keep) / mean) if mean > 0 else 0.0,
        num_samples=int(keep.size),
        num_dropped=int(s.size - keep.size),
    )


def sample(
    call: Callable[[int], object], *, warmup: int, min_repeats: int, max_repeats: int, time_s: float,
    start: int = 0, cuda: bool = False, clock: str = "wall", short_call_s: float = 0.0,
    short_call_repeat_factor: int = 1,
) -> list[float]:
    """Seconds of repeated ``call(i)`` (i counts on from ``start`` so callers rotate cold buffers).

    CPU: ``perf_counter_ns`` around the call (CPU kernels are synchronous). CUDA: events on the current
    stream, one synchronize per sample. Stops after ``max_repeats``, or past ``time_s`` once ``min_repeats`` are in;
    a call whose median so far is under ``short_call_s`` may take ``short_call_repeat_factor`` x ``max_repeats``.

    ``clock="thread"`` (CPU, one torch thread only) uses ``time.thread_time_ns``: the CPU time of the calling
    thread, where a single-threaded torch kernel runs. Time the thread spends descheduled by other processes
    is left out, so a loaded shared machine disturbs it far less than wall time (memory-bandwidth contention
    still shows). It is the latency the kernel would have on an idle core, not what a loaded box delivers."""
    if cuda:  # pragma: no cover - needs a GPU
        import torch

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    i = start
    for _ in range(warmup):
        t0 = time.perf_counter()
        call(i)
        i += 1
        if cuda:  # pragma: no cover
            torch.cuda.synchronize()
        if time.perf_counter() - t0 > time_s:  # a long call is warm after one run
            break
    samples: list[float] = []
    started = time.perf_counter()
    cap = max_repeats
    while len(samples) < cap:
        if cuda:  # pragma: no cover
            begin.record()
            call(i)
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) * 1e-3)  # elapsed_time is in milliseconds
        elif clock == "thread":
            t0 = time.thread_time_ns()
            call(i)
            samples.append((time.thread_time_ns() - t0) * 1e-9)
        else:
            t0 = time.perf_counter_ns()
            call(i)
            samples.append((time.perf_counter_ns() - t0) * 1e-9)
        i += 1
        if len(samples) == min_repeats and short_call_repeat_factor > 1 and float(np.median(samples)) < short_call_s:
            cap = max_repeats * short_call_repeat_factor
        if len(samples) >= min_repeats and time.perf_counter() - started > time_s:
            break
    return samples
