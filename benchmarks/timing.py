"""Timing shared by the benchmarks: medians after warm-up, and the device ceilings of this very run."""

from __future__ import annotations

import re
import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` over `iters` calls after `warmup` calls (`time_samples`)."""
    return statistics.median(time_samples(fn, device, warmup, iters))


def time_samples(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list:
    """Milliseconds of each of `iters` calls of `fn()`, run back to back after `warmup` calls.

    CUDA: one pair of events per call, synchronised once at the end, so the host may run ahead and launch
    gaps are only counted when the host cannot keep up (which is real eager overhead). CPU: perf_counter.
    `fn` must recompute from its inputs every call; inputs are allocated once by the caller. No L2 flush: model
    steps move gigabytes (24 GB of FLUX weights), attention's Q/K/V are 85 MB at N=4608, above the H100's 50 MB
    L2; the smaller single ops (patch_embed at 4096 tokens, quant_linear's 3072 x 3072 layer) partly stay in it,
    as the README's "Timing" paragraph says: their ratios are fair, their absolute rates warm-cache numbers.
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
    return samples


# Upper bound of a GPU's SM clock for torch.cuda._sleep (cycles -> seconds); a slower clock only sleeps longer.
_SLEEP_CYCLES_PER_S = 2.0e9


def time_kernel_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int):
    """(median GPU milliseconds per call, host milliseconds per call) for ops of tens of microseconds.

    time_ms counts the launch gaps of a host slower than the GPU, which for a single small op is the Python and
    dispatch overhead, not the kernel. Here a spin kernel (torch.cuda._sleep) holds the GPU until the host has
    queued every timed call, so the CUDA events bracket back-to-back GPU work; the host's own cost per call
    (measured over the warm-up calls) is returned beside it. Same for every variant compared. CPU: (time_ms, None).
    """
    if device.type != "cuda":
        return time_ms(fn, device, warmup, iters), None
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    host_s = (time.perf_counter() - t0) / max(warmup, 1)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    # Twice the host's queueing time for all timed calls (at least 1 ms): the GPU starts only once they are queued.
    torch.cuda._sleep(int(max(1e-3, 2 * iters * host_s) * _SLEEP_CYCLES_PER_S))
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events), host_s * 1e3


def measure_ceilings(device: torch.device) -> dict:
    """Device copy bandwidth (read + write bytes), dense GEMM and attention throughput, measured now.

    CUDA: 1 GiB device-to-device copy, a bf16 8192³ GEMM, SDPA at B1 H24 N4608 D128 and an FP8 8192³ GEMM
    (where the GPU has FP8). CPU (tiny mode): small fp32 stand-ins so the code path runs; those numbers say
    nothing about a GPU.
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

    # Attention at FLUX's 1K shape (B1 H24 D128, 4608 tokens; CPU: 256), SDPA's default backend: the attention
    # efficiency of the RTX 5090 projection.
    tokens, heads = (4608, 24) if cuda else (256, 2)
    q, k, v = (torch.randn(1, heads, tokens, 128, dtype=dtype, device=device) for _ in range(3))
    attention_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, warmup, iters)
    del q, k, v
    rec = {
        "device": str(device),
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_GBps": 2 * copy_bytes / copy_ms / 1e6,
        "gemm_n": n,
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "gemm_ms": gemm_ms,
        "gemm_tflops": 2 * n**3 / gemm_ms / 1e9,
        "attention_shape": f"B1 H{heads} N{tokens} D128 {str(dtype).removeprefix('torch.')}, SDPA default backend",
        "attention_ms": attention_ms,
        "attention_tflops": 4 * heads * tokens**2 * 128 / attention_ms / 1e9,
    }
    rec.update(_fp8_gemm(device, n, warmup, iters))
    if cuda:
        torch.cuda.empty_cache()
    return rec


def _fp8_gemm(device: torch.device, n: int, warmup: int, iters: int) -> dict:
    """FP8 e4m3 GEMM TFLOP/s (torch._scaled_mm, per-tensor scales) on GPUs with FP8 tensor cores (sm_89+), with
    use_fast_accum as fp8_linear runs it: the ceiling of the accumulation mode ours uses."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return {"fp8_gemm_tflops": None, "fp8_gemm_note": "no FP8 tensor cores on this device"}
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)
        ms = time_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                              use_fast_accum=True), device, warmup, iters)
    except (RuntimeError, AttributeError) as err:
        return {"fp8_gemm_tflops": None, "fp8_gemm_note": f"{type(err).__name__}: {err}"}
    return {"fp8_gemm_ms": ms, "fp8_gemm_tflops": 2 * n**3 / ms / 1e9, "fp8_gemm_fast_accum": True}


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


# Kernel-name patterns per class, first match wins (cuBLAS/CUTLASS GEMMs, our Triton GEMMs, attention kernels).
CLASSES = (
    ("conv", re.compile(r"conv|depthwise|fprop_implicit", re.I)),  # SANA's GLUMBConv and DC-AE (cuDNN or ours)
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|wgmma|matmul|_mm_|linear_kernel|nvfp4_gemm|fp8_linear|"
                        r"patch_(un)?embed|aten::(addmm|mm|bmm)$", re.I)),  # patch (un)embedding: a GEMM, packing fused
    ("copy", re.compile(r"memcpy|memset|copy|cat|fill|patch_(un)?pack", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|norm|gelu|silu|softmax|rope|modulate|residual|"
                               r"quantize|effective_weight|triton", re.I)),  # effective_weight: W4A16's dequant
)


def classify(name: str) -> str:
    return next((label for label, pattern in CLASSES if pattern.search(name)), "other")


def profile_kernels(step: Callable[[], object], device: torch.device, steps: int, top: int) -> dict:
    """torch.profiler over `steps` calls of step() after one warm-up: kernel ms per call, by class (CLASSES) and the
    `top` costliest; on CUDA also the wall ms per call (events) and the GPU-busy fraction. CPU: CPU ops."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: Triton JIT, cuBLAS handles, allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize(device)
                walls.append(start.elapsed_time(end))
            else:
                step()
    kernels: dict = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            # Device-side kernels only (CPU ops carry their children's device time too).
            if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = float(event.device_time_total)
        else:
            us = float(event.self_cpu_time_total)
        if us > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + us
    per_step = {name: us / steps / 1e3 for name, us in kernels.items()}  # ms per step
    by_class: dict = {}
    for name, ms in per_step.items():
        by_class[classify(name)] = by_class.get(classify(name), 0.0) + ms
    kernel_ms = sum(per_step.values())
    rec = {"kernel_ms_per_step": kernel_ms, "by_class_ms": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
           "top_kernels_ms": [[name[:120], ms] for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:top]]}
    if walls:
        rec["wall_ms_per_step"] = statistics.median(walls)
        rec["gpu_busy"] = kernel_ms / rec["wall_ms_per_step"]
    return rec


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def profile_gemm_shapes(step: Callable[[], object], device: torch.device, top: int) -> list:
    """[[op, input shapes, ms per step, calls per step], ...] of the `top` costliest GEMM ops (GEMM_OPS) of one
    step(), grouped by input shapes: which projection takes how long (CUDA: the GPU time of the kernels each op
    launched; CPU: its CPU time). A run of its own after a warm-up, since recording shapes slows the host (and so
    would move profile_kernels' wall time)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in GEMM_OPS:
            us = float(event.device_time_total if device.type == "cuda" else event.cpu_time_total)
            rows.append([event.key, str(event.input_shapes), us / 1e3, event.count])
    return sorted(rows, key=lambda row: -row[2])[:top]

