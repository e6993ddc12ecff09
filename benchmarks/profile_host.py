"""Where the host time of an eager SANA-1.6B step goes: cProfile of stock and of `dcgen_kernels.patch(model)`.

    python -m benchmarks.profile_host [--size c128_64x64] [--steps 5] [--top 30]

A step whose GPU work is short (the 64x64 DC-Gen-SANA latent: ~22 ms of kernels patched) is paced by Python and the
launches; this shows by how much and where (Triton's launch path, cuBLAS calls, diffusers' and our Python). Sizes are
those of benchmarks/bench_sana_step.py, random bf16 weights built on the GPU; after three warm-up steps, `--steps`
steps under cProfile (which itself slows Python-heavy code: compare stock and patched, not absolute times). CPU (no
GPU): the tiny config, reference ops. A diagnostic, not a gated benchmark; a run's output is kept in
`benchmarks/results/host_profile-*.txt`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from . import bench_sana_step

WARMUP_STEPS = 3


def _profile(model, inputs, device: torch.device, steps: int, top: int) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(WARMUP_STEPS):
            model(**inputs)
        sync()
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(steps):
            model(**inputs)
        profiler.disable()
        sync()
        ms = (time.perf_counter() - start) * 1e3 / steps
    stats = pstats.Stats(profiler)
    listing = io.StringIO()
    stats.stream = listing
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return {"ms_per_step": ms, "calls_per_step": stats.total_calls / steps, "listing": listing.getvalue()}


def run(device: torch.device, tiny: bool, size: str, steps: int, top: int) -> dict:
    import dcgen_kernels

    model, inputs = bench_sana_step.model_and_inputs(device, tiny, size)
    result = {"size": size, "steps": steps, "stock": _profile(model, inputs, device, steps, top)}
    dcgen_kernels.patch(model)
    result["patched"] = _profile(model, inputs, device, steps, top)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="a bench_sana_step size (default: c128_64x64; tiny: c8_8x8)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30, help="functions listed per ordering")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        parser.error("--steps and --top must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device.type != "cuda"
    size = args.size or ("c8_8x8" if tiny else "c128_64x64")
    result = run(device, tiny, size, args.steps, args.top)
    for variant in ("stock", "patched"):
        rec = result[variant]
        print(f"===== {variant}: {rec['ms_per_step']:.1f} ms and {rec['calls_per_step']:.0f} Python calls per step "
              f"under cProfile ({size}) =====")
        print(rec["listing"])


if __name__ == "__main__":
    main()
