"""Where a FLUX-12B or SANA-1.6B step spends its GPU time: torch.profiler over a few steps per variant, kernels grouped.

    python -m benchmarks.profile_step [--model flux|sana] [--image-tokens 4096,1024] [--sizes c32_128x128,...]
                                      [--variants stock,patched,fp8,nvfp4] [--steps 2] [--top 12] [--out p.json]

FLUX: per image-token count (--image-tokens, square grids; 512 text tokens, the FLUX.1-dev 12B config); SANA: per
size of benchmarks/bench_sana_step.py (--sizes: c32_128x128 = SANA 4K, c128_64x64 = DC-Gen-SANA 4K; 300 text
tokens, the SANA-1.6B config); random bf16 weights built on the GPU. Each variant (stock diffusers;
dcgen_kernels.patch; patch(quant="fp8"); patch(quant="nvfp4")), after one warm-up step: the wall time per step
(CUDA events), the summed kernel time per step, their ratio (GPU busy: well under 1 means the host's launches, not
the kernels, set the pace), kernel time per class (convolution, attention, GEMM, copies, elementwise/reduction,
other) and the kernels that cost most. A diagnostic, not a gated benchmark: it explains the step and e2e numbers.
CPU (no GPU): the tiny configs, CPU ops only.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from . import bench_flux_step, bench_sana_step
from .common import free_device_memory
from .timing import profile_kernels

VARIANTS = {"stock": None, "patched": "bf16", "fp8": "fp8", "nvfp4": "nvfp4"}
def _flux_steps(device: torch.device, tiny: bool, image_tokens):
    """(config record, model, [(size key, inputs)]) of the FLUX step."""
    cfg = bench_flux_step.TINY if tiny else bench_flux_step.REAL
    record = {"model": "FLUX tiny" if tiny else "FLUX.1-dev 12B", "text_tokens": cfg.text_tokens,
              "dtype": str(cfg.dtype).removeprefix("torch.")}
    model = bench_flux_step.build_model(cfg, device)
    return record, model, [(str(tokens), bench_flux_step.make_inputs(cfg, 64 if tiny else tokens, device))
                           for tokens in image_tokens]


def _sana_steps(device: torch.device, tiny: bool, sizes):
    """(config record, model, [(size key, inputs)]) of the SANA step: one model per in_channels, so one size."""
    cfg = bench_sana_step.TINY if tiny else bench_sana_step.REAL
    shape = cfg.shapes[[s.key for s in bench_sana_step.REAL.shapes].index(sizes[0])]  # tiny: its toy stand-in
    record = {"model": "SANA tiny" if tiny else "SANA-1.6B", "text_tokens": cfg.text_tokens,
              "dtype": str(cfg.dtype).removeprefix("torch.")}
    return record, bench_sana_step.build_model(cfg, shape, device), [
        (sizes[0], bench_sana_step.make_inputs(cfg, shape, device))]


def run(device: torch.device, tiny: bool, image_tokens=(4096,), variants=("stock", "patched", "fp8"), steps: int = 2,
        top: int = 12, model_name: str = "flux", sizes=("c32_128x128",)) -> dict:
    """model_name "flux": one step per image-token count; "sana": per size key (each builds its own model)."""
    import dcgen_kernels

    result = {"config": {"steps_profiled": steps,
                         "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
              "profiles": {}}
    backend = "reference" if tiny else "auto"
    groups = ([lambda: _flux_steps(device, tiny, image_tokens)] if model_name == "flux" else
              [lambda size=size: _sana_steps(device, tiny, [size]) for size in sizes])
    for build in groups:
        record, model, inputs = build()
        result["config"].update(record)
        try:
            for size, x in inputs:
                step = lambda: model(**x)[0]  # noqa: E731
                for name in variants:
                    key = f"{size}/{name}"
                    try:
                        if VARIANTS[name] is not None:
                            quant = None if VARIANTS[name] == "bf16" else VARIANTS[name]
                            dcgen_kernels.patch(model, backend=backend, quant=quant, keep_original=quant is not None)
                        try:
                            with torch.no_grad():
                                result["profiles"][key] = profile_kernels(step, device, steps, top)
                        finally:
                            if VARIANTS[name] is not None:
                                dcgen_kernels.unpatch(model)
                    except Exception as err:  # noqa: BLE001 - one variant failing still leaves the others
                        result["profiles"][key] = {"error": f"{type(err).__name__}: {err}"}
                    free_device_memory(device)
                    print(format_profile(key, result["profiles"][key]), flush=True)
        finally:
            del model
            free_device_memory(device)
    return result


def format_profile(key: str, rec: dict) -> str:
    if "error" in rec:
        return f"{key}: {rec['error']}"
    wall = rec.get("wall_ms_per_step")
    head = f"{key}: kernels {rec['kernel_ms_per_step']:.1f} ms/step"
    if wall:
        head += f", wall {wall:.1f} ms/step, GPU busy {rec['gpu_busy']:.0%}"
    lines = [head, "  by class: " + ", ".join(f"{k} {v:.1f}" for k, v in rec["by_class_ms"].items())]
    lines += [f"  {ms:8.2f} ms  {name}" for name, ms in rec["top_kernels_ms"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux", choices=("flux", "sana"))
    parser.add_argument("--image-tokens", default="4096",
                        help="FLUX: comma-separated image-token counts (square grids)")
    sana_sizes = [s.key for s in bench_sana_step.REAL.shapes]
    parser.add_argument("--sizes", default=sana_sizes[0], help=f"SANA: comma-separated, from {', '.join(sana_sizes)}")
    parser.add_argument("--variants", default="stock,patched,fp8",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per variant (after one warm-up)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; expected from {', '.join(VARIANTS)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        tokens = [int(t) for t in args.image_tokens.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--image-tokens: expected comma-separated integers, got {args.image_tokens!r}")
    bad = [t for t in tokens if t <= 0 or math.isqrt(t) ** 2 != t]
    if not tokens or bad:
        parser.error(f"--image-tokens: expected positive square token counts (a square latent grid), got "
                     f"{bad or args.image_tokens!r}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in sana_sizes]
    if not sizes or unknown:
        given = ", ".join(unknown) if unknown else repr(args.sizes)
        parser.error(f"--sizes: unknown {given}; expected from {', '.join(sana_sizes)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run(device, device.type == "cpu", tokens, variants, args.steps, args.top, args.model, sizes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
