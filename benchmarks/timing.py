"""Timing shared by the benchmarks: medians after warm-up, and the device ceilings of this very run."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` over `iters` calls after `warmup` calls.

    CUDA: one pair of events per call, synchronised once at the end, so the host may run ahead and launch
    gaps are only counted when the host cannot keep up (which is real eager overhead). CPU: perf_counter.
    `fn` must recompute from its inputs every call; inputs are allocated once by the caller. No L2 flush:
    the working sets timed here (Q/K/V ≈ 85 MB at N=4608, 24 GB of weights per step) exceed the L2.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure_ceilings(device: torch.device) -> dict:
    """Device copy bandwidth (read + write bytes) and dense GEMM throughput, measured now.

    CUDA: 1 GiB device-to-device copy and a bf16 8192³ GEMM. CPU (tiny mode): small fp32 stand-ins so the
    code path runs; those numbers say nothing about a GPU.
    """
    cuda = device.type == "cuda"
    copy_bytes = 1 << 30 if cuda else 64 << 20
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    warmup, iters = (5, 20) if cuda else (1, 3)

    src = torch.randn(copy_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup, iters)
    del src, dst

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    gemm_ms = time_ms(lambda: torch.mm(a, b, out=c), device, warmup, iters)
    del a, b, c
    if cuda:
        torch.cuda.empty_cache()
    return {
        "device": str(device),
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_GBps": 2 * copy_bytes / copy_ms / 1e6,
        "gemm_n": n,
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "gemm_ms": gemm_ms,
        "gemm_tflops": 2 * n**3 / gemm_ms / 1e9,
    }


def wall_s(fn: Callable[[], object], device: torch.device):
    """(result, seconds) of one call of `fn`, synchronised on both sides: e.g. a torch.compile first call,
    whose time is compilation plus one execution."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0
