"""Low-precision linears at FLUX shapes, and the FLUX-12B step with quantized block linears.

Section "layers": y = x W^T + b with x (M, K) bf16, W (N, K), M = 4608 tokens (4096 image + 512 text), (K, N) the
FLUX-12B linears: (3072, 3072) attention projections, (3072, 9216) fused QKV, (3072, 12288) FFN up, (12288, 3072)
FFN down, (15360, 3072) single-block proj_out. Variants on the same inputs and weights (nn.Linear default init):
  bf16_cublas            stock: F.linear in bf16 (cuBLAS).
  fp8_with_quantize      ours, from the bf16 activations: quantize_fp8 (one Triton pass) + fp8_linear.
  fp8_prequantized       ours, activations already FP8 (what a fused producer - adaLN-modulate, the GELU/concat
                         quantize pass - hands the layer): the GEMM alone (backend auto: torch._scaled_mm's
                         row-wise scaled FP8 GEMM on sm_90+).
  fp8_prequantized_triton  the same with the Triton fp8 kernel (GPU only).
  scaled_mm_core[_fast_accum]  diagnostic (GPU only): torch._scaled_mm alone on the same operands, without / with
                         use_fast_accum (fp8_linear uses the latter).
  quantize_only          quantize_fp8 alone (for the record), checked by dequantizing against x.
  fp8_producer_only      the FP8 producer below alone (adaLN-modulate / GELU / cat + GELU emitting FP8 rows), checked
                         by dequantizing against the bf16 producer's output; with quantize_only, GB/s of the bytes
                         read and written (a pass the FP8 target pays; the GEMM's share is fp8_prequantized).
  bf16_with_producer / fp8_fused_producer  the layer together with the kernel that produces its input in a FLUX
                         block, bf16 (what patch(model) runs in bf16) vs FP8 (the producer emits the quantized rows):
                         K = 3072 adaLN-modulate (to_q/k/v, the fused QKV, the FFN up), K = 12288 tanh-GELU (FFN
                         down; in bf16 the GELU is in the up-projection's GEMM epilogue, so that side is the bare
                         GEMM), K = 15360 cat([attention, GELU(mlp)]) (single-block proj_out; in bf16 the cat alone,
                         its GELU again in the GEMM epilogue).
                         `speedup_vs_bf16_with_producer` is what the FP8 target counts: the quantization is paid
                         where the model pays it. (to_out's input, the attention output, is quantized by its own
                         pass: fp8_with_quantize.)
  w4a16                  SVDQuantLinear(activations="bf16", rank 32): NVFP4 weights, bf16 activations.
  w4a4_triton            SVDQuantLinear(activations="nvfp4", rank 32, backend="triton").
Metrics: ms (median GPU time per call after warm-up with the host's launch overhead hidden, timing.time_kernel_ms;
`host_ms` is the host's own cost per call), TFLOP/s = 2 M K N / t, speedup_vs_bf16, weight bytes, rel-L2 against
the fp32 linear on the same bf16 inputs (fp8 checked against 6%, bf16 against 1e-2); the producer variants against
stock fp32 math of the producer (F.layer_norm, F.gelu, torch.cat) on its bf16 inputs, then the fp32 linear. NVFP4's
error against the fp32 linear is the format's, recorded only; its kernels are checked against the same layer on the
fp32 reference backend (same quantized operands, `rel_l2_vs_reference_backend` <= 1e-2), so they are skipped where
their kernels cannot run or fall back; so is a *_triton variant whose kernel falls back. Other variants that fall
back are timed with their `fallbacks` listed; the speed-ups are over baselines whose own check passed.

Section "flux_step": FluxTransformer2DModel.forward, FLUX.1-dev 12B config, random bf16 weights built on the GPU,
4096 image + 512 text tokens: stock eager, stock replayed as a CUDA graph (`stock_graph`: the launch savings
alone, a reference row), patch(model) (bf16 fused ops), patch(model, quant="fp8"),
patch(model, quant="nvfp4") (W4A16 on Hopper), each also with cuda_graph=True (*_graph: the first call captures,
the timed calls replay; a step that ran eagerly instead is an error; the eager FP8 and NVFP4 steps are paced by the
host, the graphs show their GPU time; the NVFP4 graph re-patches the quantized model rather than quantizing
again, which takes a minute); model weight memory of each,
rel-L2 vs stock (fp8/nvfp4: quantization error through 57 random-weight blocks, recorded with a loose sanity
bound, not a quality claim). Quantized variants use
keep_original=True so the same model is restored between variants.

Tiny mode: the same code paths at toy sizes in bf16 on the CPU (the layers' Triton kernels in the interpreter, the
step's patched blocks on the reference backend); seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import (
    QUANT_STEP_TOL, checked_first_calls, checked_ms, dcgen_fallbacks, error_record, first_call, free_device_memory,
    measure_stock_graph, rel_l2, reset_dcgen_warnings,
)
from .timing import time_kernel_ms, time_ms

FP8_LAYER_TOL = 0.06  # E4M3 operands, ~2.5% each (tests/test_fp8_linear.py)
BF16_LAYER_TOL = 1e-2
# Variants that are a producer pass alone (FP8 rows out): name -> the key of their rel-L2, dequantized against the
# pass's input (quantize_only) or stock fp32 math of the producer.
PASS_VARIANTS = {"quantize_only": "rel_l2_dequantized_vs_x", "fp8_producer_only": "rel_l2_dequantized_vs_fp32"}
NVFP4_VARIANTS = ("w4a16", "w4a4_triton")
STEP_SANITY_TOL = {"patched": 1e-2, "patched_graph": 1e-2, "patched_fp8": QUANT_STEP_TOL["fp8"],
                   "patched_fp8_graph": QUANT_STEP_TOL["fp8"], "patched_nvfp4": QUANT_STEP_TOL["nvfp4"],
                   "patched_nvfp4_graph": QUANT_STEP_TOL["nvfp4"]}


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int
    shapes: tuple  # (K, N)
    producers: tuple  # per shape, the kernel producing the layer's input in a FLUX block (see _producer_variants)
    dtype: torch.dtype
    warmup: int
    iters: int
    step_image_tokens: int
    svdquant_rank: int


_PRODUCERS = ("adaln", "adaln", "adaln", "gelu", "concat_gelu")
REAL = Config(4608, ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)), _PRODUCERS,
              torch.bfloat16, warmup=5, iters=20, step_image_tokens=4096, svdquant_rank=32)
TINY = Config(48, ((64, 64), (64, 96), (64, 128), (128, 64), (160, 64)), _PRODUCERS, torch.bfloat16, warmup=0,
              iters=1, step_image_tokens=64, svdquant_rank=8)


def layer_key(M: int, K: int, N: int) -> str:
    return f"M={M},K={K},N={N}"


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _module_bytes(module: torch.nn.Module) -> int:
    return _tensor_bytes(*module.parameters(), *module.buffers())


def _scaled_mm_core(x: torch.Tensor, linear: torch.nn.Linear, fast_accum: bool):
    """Diagnostic: torch._scaled_mm alone on our quantized operands, with and without fast accumulation (fp8_linear
    uses use_fast_accum=True: no fp32 promotion of the tensor-core partial sums)."""
    def build():
        from dcgen_kernels.ops.fp8_linear import quantize_fp8, quantize_weight_fp8

        xq = quantize_fp8(x)
        wq, ws = quantize_weight_fp8(linear.weight)
        fn = lambda: torch._scaled_mm(xq.data, wq.T, scale_a=xq.scale[:, None], scale_b=ws[None, :],  # noqa: E731
                                      bias=linear.bias, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        return fn, _tensor_bytes(wq, ws, linear.bias), FP8_LAYER_TOL
    return build


def _producer_variants(x: torch.Tensor, linear: torch.nn.Linear, producer: str, width: int) -> dict:
    """bf16_with_producer / fp8_fused_producer: (producer + layer) in bf16 vs with the producer emitting FP8 rows.
    producer: "adaln" (modulated LayerNorm of a block input), "gelu" (tanh-GELU of the FFN up-projection) or
    "concat_gelu" (cat([attention output of `width` channels, GELU(mlp)]))."""
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate, ada_layer_norm_modulate_fp8
    from dcgen_kernels.ops.fp8_linear import quantize_fp8
    from dcgen_kernels.quant import FP8Linear

    M, K = x.shape[0], linear.in_features
    gen = torch.Generator(device=x.device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=x.device, dtype=x.dtype)  # noqa: E731
    # The bf16 side runs what patch(model) runs in bf16 before this layer: the GELU rides in the up-projection's
    # cuBLASLt epilogue there (patching/flux.py, _gelu_tanh_linear), so only the join of the single blocks is left.
    if producer == "concat_gelu":
        attn, mlp = rand(M, width), rand(M, K - width)
        mlp_gelu = F.gelu(mlp, approximate="tanh")
        produce_bf16 = lambda: torch.cat([attn, mlp_gelu], dim=-1)  # noqa: E731
        produce_fp8 = lambda: quantize_fp8(mlp, prefix=attn, gelu=True)  # noqa: E731
        produce_fp32 = lambda: torch.cat(  # noqa: E731
            [attn.float(), F.gelu(mlp.float(), approximate="tanh")], dim=-1)
        inputs = (attn, mlp)
    elif producer == "gelu":
        pre = rand(M, K)
        pre_gelu = F.gelu(pre, approximate="tanh")
        produce_bf16 = lambda: pre_gelu  # noqa: E731
        produce_fp8 = lambda: quantize_fp8(pre, gelu=True)  # noqa: E731
        produce_fp32 = lambda: F.gelu(pre.float(), approximate="tanh")  # noqa: E731
        inputs = (pre,)
    else:
        hidden, scale, shift = rand(1, M, K), rand(1, K) * 0.1, rand(1, K) * 0.1
        produce_bf16 = lambda: ada_layer_norm_modulate(hidden, scale, shift)  # noqa: E731
        produce_fp8 = lambda: ada_layer_norm_modulate_fp8(hidden, scale, shift)  # noqa: E731
        produce_fp32 = lambda: (F.layer_norm(hidden.float(), (K,), eps=1e-6)  # noqa: E731
                                * (1 + scale.float()) + shift.float())
        inputs = (hidden, scale, shift)

    # Both sides are checked against stock fp32 math from the producer's inputs: the bf16 adaLN-modulate is our own
    # kernel too, the one its FP8 form shares.
    def expected():
        return F.linear(produce_fp32(), linear.weight.float(), linear.bias.float())

    def bf16():
        run = lambda: F.linear(produce_bf16(), linear.weight, linear.bias)  # noqa: E731
        return run, _module_bytes(linear), (expected(), BF16_LAYER_TOL)

    def fp8():
        layer = FP8Linear.from_linear(linear)
        return (lambda: layer(produce_fp8())), _module_bytes(layer), (expected(), FP8_LAYER_TOL)

    def producer_only():
        return produce_fp8, _tensor_bytes(*inputs) + _fp8_rows_bytes(M, K), (produce_fp32(), FP8_LAYER_TOL)
    return {"bf16_with_producer": bf16, "fp8_fused_producer": fp8, "fp8_producer_only": producer_only}


def _fp8_rows_bytes(M: int, K: int) -> int:
    """What a producer writes for (M, K) FP8 rows: the E4M3 data and one fp32 scale per row."""
    return M * K + 4 * M


def _layer_variants(cfg: Config, device: torch.device, x: torch.Tensor, linear: torch.nn.Linear,
                    producer: str) -> dict:
    """name -> build() returning (callable, weight bytes, check): check is the tolerance against the fp32 linear, or
    (NVFP4) the output of the same layer on the reference backend. Built lazily: a failing variant is recorded alone.
    Variants named *_triton force the Triton backend: one that falls back is skipped, not timed."""
    from dcgen_kernels.ops.fp8_linear import quantize_fp8
    from dcgen_kernels.quant import FP8Linear

    variants: dict = {"bf16_cublas": lambda: (lambda: F.linear(x, linear.weight, linear.bias),
                                               _module_bytes(linear), BF16_LAYER_TOL)}

    def fp8(prequantized: bool, backend: str):
        def build():
            layer = FP8Linear.from_linear(linear, backend=backend)
            if prequantized:
                xq = quantize_fp8(x)
                return (lambda: layer(xq)), _module_bytes(layer), FP8_LAYER_TOL
            return (lambda: layer(x)), _module_bytes(layer), FP8_LAYER_TOL
        return build

    variants["fp8_with_quantize"] = fp8(False, "auto")
    variants["fp8_prequantized"] = fp8(True, "auto")
    if device.type == "cuda":
        variants["fp8_prequantized_triton"] = fp8(True, "triton")
        for fast in (False, True):
            variants[f"scaled_mm_core{'_fast_accum' if fast else ''}"] = _scaled_mm_core(x, linear, fast)
    variants["quantize_only"] = lambda: ((lambda: quantize_fp8(x)), _tensor_bytes(x) + _fp8_rows_bytes(*x.shape),
                                         (x, FP8_LAYER_TOL))

    def svdquant(activations: str, backend: str):
        def build():
            from dcgen_kernels.quant.svdquant import SVDQuantLinear

            rank = min(cfg.svdquant_rank, linear.in_features, linear.out_features)
            layer = SVDQuantLinear.from_linear(linear, rank=rank, activations=activations, backend=backend)
            layer.backend = "reference"  # the same quantized operands in fp32: what the kernels must reproduce
            reference = layer(x)
            layer.backend = backend
            return (lambda: layer(x)), _module_bytes(layer), reference
        return build

    variants.update(_producer_variants(x, linear, producer, cfg.shapes[0][0]))
    variants["w4a16"] = svdquant("bf16", "auto")
    variants["w4a4_triton"] = svdquant("nvfp4", "triton")
    return variants


def _bench_layer(cfg: Config, device: torch.device, K: int, N: int, producer: str, gemm_tflops, fp8_tflops) -> dict:
    from dcgen_kernels import _backend

    M = cfg.tokens
    torch.manual_seed(0)
    with torch.device(device):
        linear = torch.nn.Linear(K, N, dtype=cfg.dtype).requires_grad_(False)
        x = torch.randn(M, K, dtype=cfg.dtype)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    flop = 2 * M * K * N
    rec: dict = {"M": M, "K": K, "N": N, "producer": producer}
    for name, build in _layer_variants(cfg, device, x, linear, producer).items():
        try:
            with torch.no_grad():
                # NVFP4 layers are checked against the reference backend: run on it, they would pass by definition.
                unavailable = _backend.triton_device_error(device) if name in NVFP4_VARIANTS else None
                if unavailable:
                    rec[name] = {"skipped": f"its kernels cannot run here: {unavailable}"}
                    continue
                fn, weight_bytes, check = build()
                reset_dcgen_warnings()
                out, exc, messages = first_call(fn)
                if exc is not None:
                    raise exc
                fallbacks = dcgen_fallbacks(messages)
                if fallbacks and (name.endswith("_triton") or name in NVFP4_VARIANTS):  # time no stand-in
                    rec[name] = {"skipped": "; ".join(fallbacks)}
                    continue
                if name in PASS_VARIANTS:  # FP8 rows: checked dequantized; the bytes read and written
                    err = rel_l2(out.dequantize(), check[0])
                    entry = {PASS_VARIANTS[name]: err, "tolerance": check[1], "bytes": weight_bytes}
                elif isinstance(check, tuple):  # (its own fp32 expectation, tolerance): the producer variants
                    entry = {"rel_l2_vs_fp32": rel_l2(out, check[0]), "tolerance": check[1],
                             "weight_bytes": weight_bytes}
                    err = entry["rel_l2_vs_fp32"]
                else:
                    entry = {"rel_l2_vs_fp32_linear": rel_l2(out, expected), "weight_bytes": weight_bytes}
                    if isinstance(check, torch.Tensor):
                        entry["rel_l2_vs_reference_backend"] = err = rel_l2(out, check)
                        entry["tolerance"] = BF16_LAYER_TOL
                    else:
                        err, entry["tolerance"] = entry["rel_l2_vs_fp32_linear"], check
                entry["check"] = "ok" if err <= entry["tolerance"] else "FAILED"  # NaN fails too
                if fallbacks:
                    entry["fallbacks"] = fallbacks
                del out, check
                entry["ms"], entry["host_ms"] = time_kernel_ms(fn, device, cfg.warmup, cfg.iters)
            if name in PASS_VARIANTS:
                entry["GBps"] = entry["bytes"] / entry["ms"] / 1e6
            else:
                entry["tflops"] = flop / entry["ms"] / 1e9
                ceiling = fp8_tflops if name.startswith(("fp8", "scaled_mm")) else gemm_tflops  # FP8 operands
                if ceiling:
                    entry["fraction_of_ceiling"] = entry["tflops"] / ceiling
            rec[name] = entry
        except Exception as err:  # noqa: BLE001 - recorded; the other variants still run
            rec[name] = error_record(err)
        free_device_memory(device)

    base = checked_ms(rec.get("bf16_cublas"))
    for name, entry in rec.items():
        if (isinstance(entry, dict) and base and "ms" in entry
                and name not in ("bf16_cublas", "bf16_with_producer", "fp8_fused_producer", *PASS_VARIANTS)):
            entry["speedup_vs_bf16"] = base / entry["ms"]
    with_producer = checked_ms(rec.get("bf16_with_producer"))
    if with_producer and "ms" in rec.get("fp8_fused_producer", {}):
        rec["fp8_fused_producer"]["speedup_vs_bf16_with_producer"] = with_producer / rec["fp8_fused_producer"]["ms"]
    return rec


# ----------------------------------------------------------------------------------------------- FLUX step
# fp8 first (the Hopper target), nvfp4 last: its offline SVDs of 418 weights take the longest to set up.
# (name, quant, cuda_graph): the *_graph variants replay the step as a CUDA graph (patch(cuda_graph=True)).
STEP_VARIANTS = (("patched_fp8", "fp8", False), ("patched_fp8_graph", "fp8", True), ("patched", None, False),
                 ("patched_graph", None, True), ("patched_nvfp4", "nvfp4", False),
                 ("patched_nvfp4_graph", "nvfp4", True))
# Seconds a step variant needs at least on an H100 (quantize or patch, Triton JIT, 8 steps); with less left of the
# run's budget it is recorded as skipped rather than killed with the suite.
STEP_VARIANT_MIN_S = {"stock": 30, "stock_graph": 15, "patched_fp8": 25, "patched_fp8_graph": 25, "patched": 20,
                      "patched_graph": 20, "patched_nvfp4": 60, "patched_nvfp4_graph": 20}


def _bench_step(cfg: Config, device: torch.device, tiny: bool, rec: dict, saved=None, time_left=None) -> dict:
    """Fills `rec` (calling saved() after every variant); time_left(): seconds left of the run's budget or None."""
    import dcgen_kernels
    from dcgen_kernels.patching.quant import current_quant, weight_bytes

    from . import bench_flux_step

    step_cfg = bench_flux_step.TINY if tiny else bench_flux_step.REAL
    step_cfg = dataclasses.replace(step_cfg, dtype=cfg.dtype)
    warmup, iters = (0, 1) if tiny else (2, 5)
    # Tiny: the patched blocks run on the fp32 reference ops (the layers above run the Triton kernels), so the
    # interpreter does not dominate the CPU suite.
    backend = "reference" if tiny else "auto"
    rec.update(backend=backend, image_tokens=cfg.step_image_tokens, text_tokens=step_cfg.text_tokens, warmup=warmup,
               iters=iters,
               dtype=str(cfg.dtype).removeprefix("torch."),
               weights="random (diffusers' default init, built on the device); latency does not depend on values")

    def short_of_time(name: str):
        left = None if tiny or time_left is None else time_left()
        if left is not None and left < STEP_VARIANT_MIN_S[name]:
            return {"skipped": f"{left:.0f} s left of the run's budget, this variant needs about "
                               f"{STEP_VARIANT_MIN_S[name]} s"}
        return None

    skipped = short_of_time("stock")
    if skipped:
        rec["stock"] = skipped
        return rec
    model = bench_flux_step.build_model(step_cfg, device)
    try:
        x = bench_flux_step.make_inputs(step_cfg, cfg.step_image_tokens, device)
        step: Callable[[], torch.Tensor] = lambda: model(**x)[0]  # noqa: E731
        with torch.no_grad():
            stock_out = step()
            rec["stock"] = {"ms": time_ms(step, device, warmup, iters), "weight_bytes": weight_bytes(model)}
            if saved:
                saved()
            rec["stock_graph"] = short_of_time("stock_graph") or measure_stock_graph(
                model, step, device, warmup, iters, stock_out, STEP_SANITY_TOL["patched"], rec["stock"]["ms"])
            for index, (name, quant, cuda_graph) in enumerate(STEP_VARIANTS):
                # an NVFP4 model stays quantized for the next variant with the same quant (re-patching is cheap)
                keep = quant == "nvfp4" and index + 1 < len(STEP_VARIANTS) and STEP_VARIANTS[index + 1][1] == quant
                quantizing = quant == "nvfp4" and current_quant(model) != quant  # the slow part, if still to do
                skipped = short_of_time("patched_nvfp4" if quantizing else name)
                if skipped:
                    rec[name] = skipped
                    continue
                try:
                    # Quantized variants keep the originals (off the module tree) so unpatch restores the model;
                    # their reported weight_bytes exclude them, as a user with keep_original=False would see.
                    dcgen_kernels.patch(model, backend=backend, quant=quant, keep_original=quant is not None,
                                        cuda_graph=cuda_graph)
                    try:
                        entry, messages = checked_first_calls(model, step, device, stock_out,
                                                              STEP_SANITY_TOL[name], cuda_graph)
                        entry["fallbacks"] = dcgen_fallbacks(messages)
                        entry["ms"] = time_ms(step, device, warmup, iters)
                        entry["weight_bytes"] = weight_bytes(model)
                        entry["fraction_of_stock"] = entry["ms"] / rec["stock"]["ms"]
                        if cuda_graph:  # compare.py gates it where the eager stock step is not host-paced
                            entry["speedup_vs_stock"] = rec["stock"]["ms"] / entry["ms"]
                        report = dcgen_kernels.patch_report(model)
                        if report.quantization is not None:
                            entry["quantized_layers"] = len(report.quantization.layers)
                            entry["report"] = str(report.quantization)
                        rec[name] = entry
                    finally:
                        if not keep:
                            dcgen_kernels.unpatch(model)
                except Exception as err:  # noqa: BLE001
                    rec[name] = error_record(err)
                free_device_memory(device)
                if saved:
                    saved()
    finally:
        del model
        free_device_memory(device)
    return rec


def run(device: torch.device, tiny: bool, gemm_tflops: Optional[float] = None, fp8_tflops: Optional[float] = None,
        progress=None, time_left=None) -> dict:
    """gemm_tflops / fp8_tflops: this run's measured dense bf16 / fp8 GEMM ceilings (None: no fraction of them).
    progress(partial) after every layer shape and every step variant. time_left(): seconds left of the run's
    budget (or None); a step variant that would not fit is recorded as skipped.

    Target keys: layers[layer_key(M, K, N)]["fp8_fused_producer"]["speedup_vs_bf16_with_producer"] (goal >= 1.4:
    the quantization paid inside the producer kernel) and flux_step["patched_fp8" | "patched_fp8_graph"]
    ["fraction_of_stock"] (goal <= 0.6)."""
    cfg = TINY if tiny else REAL
    result: dict = {"config": {"dtype": str(cfg.dtype).removeprefix("torch."), "device": str(device),
                               "tokens": cfg.tokens, "shapes_KN": [list(s) for s in cfg.shapes],
                               "warmup": cfg.warmup, "iters": cfg.iters, "svdquant_rank": cfg.svdquant_rank,
                               "gemm_tflops": gemm_tflops, "fp8_tflops": fp8_tflops,
                               "fp8_format": "E4M3, per-token activation and per-output-channel weight scales"},
                    "layers": {}}
    for (K, N), producer in zip(cfg.shapes, cfg.producers):
        key = layer_key(cfg.tokens, K, N)
        try:
            result["layers"][key] = _bench_layer(cfg, device, K, N, producer, gemm_tflops, fp8_tflops)
        except Exception as err:  # noqa: BLE001
            result["layers"][key] = error_record(err)
        if progress:
            progress(result)
    result["flux_step"] = {}
    try:
        _bench_step(cfg, device, tiny, result["flux_step"], progress and (lambda: progress(result)), time_left)
    except Exception as err:  # noqa: BLE001 - e.g. the 12B model does not fit
        result["flux_step"].update(error_record(err))
    if progress:
        progress(result)
    return result


if __name__ == "__main__":
    import json
    import sys

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(run(dev, tiny="--tiny" in sys.argv or dev.type == "cpu"), indent=1, default=str))
