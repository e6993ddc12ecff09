"""patch_embed / patch_unembed (the DC-Gen embedder and head) against the bare GEMM they fuse the (un)packing into.

Real mode: bf16, B=1, at the issue's shapes: FLUX f8c16 with 2x2 packing (64 -> 3072) at 4096 and 16384 tokens,
DC-AE f32c32 1x1 (32 -> 3072) at 4096 / 16384 tokens, DC-AE-1.5 f64c128 1x1 (128 -> 3072) at 4096 tokens, and
SANA's width 2240 for f32c32 (4096 / 16384 tokens) and f64c128 (4096 tokens). Tiny mode: two toy shapes, fp32 on
the CPU (Triton only under TRITON_INTERPRET=1; otherwise that variant is skipped, since the op would fall back).

Per shape, direction (embed: latent -> tokens; unembed: tokens -> latent) and pass (fwd; fwd_bwd = forward plus
the gradients of every input, weight and bias), variants on the same inputs:
  gemm          torch.nn.functional.linear on an already packed, contiguous input (embed) or producing the packed
                output (unembed): the bound the fused op is held to (the packing hidden).
  stock         what the models do today: FluxPipeline's pack (permute + copy) then the Linear; the Linear then
                the unpack (permute + copy).
  stock_conv    (embed, SANA width only) diffusers' PatchEmbed math: conv2d with a p x p, stride-p kernel,
                flatten, transpose.
  dcgen         the op as patch() calls it (backend="auto"; `backend` records what ran the forward: on a GPU where
                both serve the call, the faster of cuBLAS and Triton, timed on the call's first run; the
                backward's input gradient is the other op's auto choice).
  dcgen_triton  / dcgen_cuda: the op with that backend forced, forward and backward; skipped when it would fall
                back (cuda = cuBLAS: no CPU).
Metrics: ms (median GPU time per call after warm-up, with the host's launch overhead hidden: timing.time_kernel_ms;
`host_ms` is the host's own cost per call), TFLOP/s (2·tokens·K·D forward, 3x that forward + backward), `vs_gemm` =
gemm ms / variant ms (the issue's target: dcgen >= 0.9 for fwd and fwd_bwd, counting only cases whose
check passed), `vs_stock`, and the rel-L2 error of the output (fwd) or of every gradient (fwd_bwd, the largest)
against the fp32 reference; the bare GEMM's packed output / input gradient is compared in the packed layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import (dcgen_fallbacks, error_record, first_call, free_device_memory, rel_l2, reset_dcgen_warnings,
                     worst_error)
from .timing import time_kernel_ms

TARGET_VS_GEMM = 0.9
REL_L2_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    channels: int
    patch: int
    dim: int
    grid: int  # tokens = grid^2; latent side = grid * patch


@dataclasses.dataclass(frozen=True)
class Config:
    shapes: tuple
    dtype: torch.dtype
    warmup: int
    iters: int


REAL = Config((
    Shape("f8c16_p2_D3072_N4096", 16, 2, 3072, 64),
    Shape("f8c16_p2_D3072_N16384", 16, 2, 3072, 128),
    Shape("f32c32_p1_D3072_N4096", 32, 1, 3072, 64),
    Shape("f32c32_p1_D3072_N16384", 32, 1, 3072, 128),
    Shape("f64c128_p1_D3072_N4096", 128, 1, 3072, 64),
    Shape("f32c32_p1_D2240_N4096", 32, 1, 2240, 64),
    Shape("f32c32_p1_D2240_N16384", 32, 1, 2240, 128),
    Shape("f64c128_p1_D2240_N4096", 128, 1, 2240, 64),
), torch.bfloat16, warmup=5, iters=30)
TINY = Config((Shape("c4_p2_D32_N16", 4, 2, 32, 4), Shape("c8_p1_D40_N16", 8, 1, 40, 4)), torch.float32,
              warmup=0, iters=1)
SANA_WIDTH = 2240


def _ops():
    from dcgen_kernels.ops.patch_embed import (_pack, _unpack, patch_embed, patch_embed_reference, patch_unembed,
                                               patch_unembed_reference)

    return dict(pack=_pack, unpack=_unpack, embed=patch_embed, embed_reference=patch_embed_reference,
                unembed=patch_unembed, unembed_reference=patch_unembed_reference)


def _auto_backend(op: str, x, weight, bias, *sizes: int) -> str:
    """The backend `auto` ran for this call, read after it: its timed pick where it timed cuBLAS against Triton."""
    from dcgen_kernels.ops._common import TIMED_CHOICES
    from dcgen_kernels.ops.patch_embed import _call_key, select_backend

    timed = TIMED_CHOICES.get(op, {}).get(_call_key(x, weight, bias, *sizes))
    return timed["picked"] if timed else select_backend(op, "auto", x, weight)


# ----------------------------------------------------------------------------------------------- variants
def _variants(shape: Shape, direction: str, ops: dict) -> dict:
    """name -> fn(*inputs) returning the output; inputs: _inputs(...)["gemm"] for "gemm", else its "main"."""
    p, h = shape.patch, shape.grid * shape.patch
    if direction == "embed":
        variants = {
            "gemm": lambda packed, w, b: F.linear(packed, w, b),
            "stock": lambda latent, w, b: F.linear(ops["pack"](latent, p), w, b),
            "dcgen": lambda latent, w, b: ops["embed"](latent, w, b, patch_size=p),
            "dcgen_triton": lambda latent, w, b: ops["embed"](latent, w, b, patch_size=p, backend="triton"),
            "dcgen_cuda": lambda latent, w, b: ops["embed"](latent, w, b, patch_size=p, backend="cuda"),
        }
        if shape.dim == SANA_WIDTH:
            variants["stock_conv"] = lambda latent, w, b: F.conv2d(
                latent, w.view(w.shape[0], -1, p, p), b, stride=p).flatten(2).transpose(1, 2)
        return variants
    return {
        "gemm": lambda tokens, w, b: F.linear(tokens, w, b),
        "stock": lambda tokens, w, b: ops["unpack"](F.linear(tokens, w, b), p, h, h),
        "dcgen": lambda tokens, w, b: ops["unembed"](tokens, w, b, patch_size=p, height=h, width=h),
        "dcgen_triton": lambda tokens, w, b: ops["unembed"](tokens, w, b, patch_size=p, height=h, width=h,
                                                            backend="triton"),
        "dcgen_cuda": lambda tokens, w, b: ops["unembed"](tokens, w, b, patch_size=p, height=h, width=h,
                                                          backend="cuda"),
    }


def _inputs(shape: Shape, direction: str, dtype, device, ops) -> dict:
    p, h, k = shape.patch, shape.grid * shape.patch, shape.channels * shape.patch ** 2
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)  # noqa
    if direction == "embed":
        latent, weight, bias = rand(1, shape.channels, h, h), rand(shape.dim, k, scale=k ** -0.5), rand(shape.dim)
        packed = ops["pack"](latent, p).contiguous()
        reference = lambda x, w, b: ops["embed_reference"](x, w, b, p)  # noqa: E731
        return dict(main=(latent, weight, bias), gemm=(packed, weight, bias), reference=reference,
                    auto_backend=lambda: _auto_backend("patch_embed", latent, weight, bias, p))
    tokens, weight, bias = rand(1, shape.grid ** 2, shape.dim), rand(k, shape.dim, scale=shape.dim ** -0.5), rand(k)
    reference = lambda x, w, b: ops["unembed_reference"](x, w, b, p, h, h)  # noqa: E731
    return dict(main=(tokens, weight, bias), gemm=(tokens, weight, bias), reference=reference,
                auto_backend=lambda: _auto_backend("patch_unembed", tokens, weight, bias, p, h, h))


def _fwd_bwd(fn: Callable, inputs, grad_for: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A callable running fn forward and the gradients of all its inputs (autograd.grad: nothing accumulates)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.no_grad():
        grad = grad_for(fn(*leaves))
    return lambda: torch.autograd.grad(fn(*leaves), leaves, grad)


def _check(out, expected, tol) -> dict:
    """rel-L2 against the fp32 reference: of the output, or the largest over the gradients (all listed)."""
    if isinstance(out, torch.Tensor):
        err, rec = rel_l2(out.reshape(expected.shape), expected), {}
    else:
        errors = [rel_l2(a, b) for a, b in zip(out, expected)]
        err, rec = worst_error(errors), {"rel_l2_per_grad": errors}
    return {"rel_l2_vs_reference": err, "tolerance": tol, "check": "ok" if err <= tol else "FAILED", **rec}


def _bench_pass(shape, direction, pass_name, tensors, variants, cfg, device, skip) -> dict:
    tol = REL_L2_TOL[cfg.dtype]
    reference = tensors["reference"]
    main = tensors["main"]
    records = {}
    expected = grad = None
    if pass_name == "fwd_bwd":
        gen = torch.Generator(device="cpu").manual_seed(1)
        out_shape = reference(*main).shape
        grad = torch.randn(out_shape, generator=gen).to(device=device, dtype=cfg.dtype)
        leaves = [t.detach().float().requires_grad_() for t in main]
        expected = torch.autograd.grad(reference(*leaves), leaves, grad.float())
    else:
        expected = reference(*[t.float() for t in main])
    for name, fn in variants.items():
        if name in skip:
            records[name] = {"skipped": skip[name]}
            continue
        inputs = tensors["gemm"] if name == "gemm" else main
        try:
            if pass_name == "fwd":
                call = functools.partial(fn, *inputs)
                with torch.no_grad():
                    reset_dcgen_warnings()
                    out, exc, messages = first_call(call)
            else:
                # the bare unembed GEMM leaves its output packed: it gets the same grad, packed
                grad_of = (functools.partial(_packed_grad, grad, shape) if name == "gemm" and direction == "unembed"
                           else lambda o: grad.reshape(o.shape))
                call = _fwd_bwd(fn, inputs, grad_of)
                reset_dcgen_warnings()
                out, exc, messages = first_call(call)
            if exc is not None:
                raise exc
            fallbacks = dcgen_fallbacks(messages)
            if name != "dcgen" and name.startswith("dcgen") and fallbacks:  # a forced backend that did not run
                skip[name] = "; ".join(fallbacks)
                records[name] = {"skipped": skip[name]}
                continue
            rec = _check(out, _packed_expected(expected, shape, direction) if name == "gemm" else expected, tol)
            if name == "dcgen":
                rec["backend"] = tensors["auto_backend"]()
            del out
            with torch.no_grad() if pass_name == "fwd" else contextlib.nullcontext():
                rec["ms"], rec["host_ms"] = time_kernel_ms(call, device, cfg.warmup, cfg.iters)
            records[name] = rec
        except Exception as err:  # noqa: BLE001 - recorded; the other variants still run
            records[name] = error_record(err)
    flops = 2 * shape.grid ** 2 * shape.channels * shape.patch ** 2 * shape.dim * (3 if pass_name == "fwd_bwd" else 1)
    gemm_ms = records.get("gemm", {}).get("ms")
    stock_ms = records.get("stock", {}).get("ms")
    for rec in records.values():
        if "ms" not in rec:
            continue
        rec["tflops"] = flops / rec["ms"] / 1e9
        if gemm_ms:
            rec["vs_gemm"] = gemm_ms / rec["ms"]
        if stock_ms:
            rec["vs_stock"] = stock_ms / rec["ms"]
    return {"gflop": flops / 1e9, "variants": records}


def _packed_expected(expected, shape: Shape, direction: str):
    """The reference in the bare GEMM's layout: unembed's output packed to tokens (fwd); embed's latent gradient
    packed like its input (fwd_bwd; the weight and bias gradients are the same)."""
    from dcgen_kernels.ops.patch_embed import _pack

    if isinstance(expected, torch.Tensor):
        return _pack(expected, shape.patch) if direction == "unembed" else expected
    if direction == "embed":
        return (_pack(expected[0], shape.patch), *expected[1:])
    return expected


def _packed_grad(grad: torch.Tensor, shape: Shape, out: torch.Tensor) -> torch.Tensor:
    """The latent-layout grad of unembed, packed to the token layout the bare GEMM produces."""
    from dcgen_kernels.ops.patch_embed import _pack

    return _pack(grad, shape.patch).contiguous().reshape(out.shape)


def _summary(cases: dict) -> dict:
    """The issue's target per pass: the slowest dcgen / gemm ratio over every shape and direction."""
    out = {"target_vs_gemm": TARGET_VS_GEMM}
    for pass_name in ("fwd", "fwd_bwd"):
        ratios, failed, unmeasured = {}, [], []
        for case, directions in cases.items():
            for direction, passes in directions.items():
                rec = passes.get(pass_name, {}).get("variants", {}).get("dcgen", {})
                if rec.get("check") == "FAILED":
                    failed.append(f"{case}/{direction}")
                elif "vs_gemm" in rec:
                    ratios[f"{case}/{direction}"] = rec["vs_gemm"]
                else:  # errored, or its GEMM baseline did not run: the target is not shown for this case
                    unmeasured.append(f"{case}/{direction}")
        worst = min(ratios, key=ratios.get) if ratios else None
        out[pass_name] = {"min_vs_gemm": ratios[worst] if worst else None, "worst_case": worst,
                          "measured": len(ratios), "failed_check": failed, "unmeasured": unmeasured,
                          "met": bool(ratios) and not failed and not unmeasured and ratios[worst] >= TARGET_VS_GEMM}
    return out


def run(device: torch.device, tiny: bool, gemm_tflops: Optional[float] = None, progress=None) -> dict:
    """gemm_tflops: this run's dense bf16 GEMM ceiling (reported alongside). progress(partial) after every shape.

    Targets: result["summary"]["fwd"]["min_vs_gemm"] and result["summary"]["fwd_bwd"]["min_vs_gemm"] >= 0.9
    (`met` says so); per case: result["cases"][shape][embed|unembed][fwd|fwd_bwd]["variants"][variant].
    """
    cfg = TINY if tiny else REAL
    result = {"config": {"dtype": str(cfg.dtype).removeprefix("torch."), "device": str(device), "batch": 1,
                         "warmup": cfg.warmup, "iters": cfg.iters, "gemm_tflops_ceiling": gemm_tflops,
                         "shapes": [dataclasses.asdict(s) for s in cfg.shapes]},
              "cases": {}}
    try:
        ops = _ops()
    except Exception as err:  # noqa: BLE001 - the op module does not import
        result.update(error_record(err))
        return result
    for shape in cfg.shapes:
        case = result["cases"][shape.name] = {}
        for direction in ("embed", "unembed"):
            try:
                tensors = _inputs(shape, direction, cfg.dtype, device, ops)
                variants = _variants(shape, direction, ops)
                skip: dict = {}  # a variant that fell back in this case's fwd is not timed in its fwd_bwd either
                case[direction] = {pass_name: _bench_pass(shape, direction, pass_name, tensors, variants, cfg,
                                                          device, skip) for pass_name in ("fwd", "fwd_bwd")}
                del tensors
            except Exception as err:  # noqa: BLE001
                case[direction] = error_record(err)
            free_device_memory(device)
        result["summary"] = _summary(result["cases"])
        if progress:
            progress(result)
    return result
