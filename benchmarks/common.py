"""Helpers shared by the benchmark modules: error records, correctness checks, op loading, models built on the
device, FLUX positions and RoPE."""

from __future__ import annotations

import gc
import importlib
import inspect
import math
import traceback
import warnings
from typing import Callable, Optional

import torch

# bf16 outputs against the stock bf16 path (both round to bf16; the fused op keeps fp32 softmax statistics).
REL_L2_TOL = 1e-2

ANCHOR_LABEL = "anchor (H100, 2026-11-27)"


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def worst_error(errors) -> float:
    """The largest of several rel-L2 errors; NaN when any is (max() keeps its first value against a later NaN)."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def checked_ms(rec) -> float | None:
    """A variant's ms when its correctness check passed, else None."""
    return rec.get("ms") if isinstance(rec, dict) and rec.get("check") == "ok" else None


def check_record(err: float, tol: float) -> dict:
    """`check` is "FAILED" for NaN as well, since NaN <= tol is false."""
    return {"rel_l2_vs_stock": err, "tolerance": tol, "check": "ok" if err <= tol else "FAILED"}


def error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-8)}


def first_call(fn: Callable[[], object]):
    """Run `fn` once; return (result or None, the RuntimeError it raised or None, warning messages).

    Used on the first call of each variant: SDPA backends explain unavailability in warnings before raising,
    and dcgen_kernels warns when it falls back to another backend. dcgen_kernels warns once per
    (op, backend, reason) per process, so only the first call for a given case says so.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, exc = fn(), None
        except RuntimeError as err:
            out, exc = None, err
    return out, exc, [str(w.message) for w in caught]


def reset_dcgen_warnings() -> None:
    """Forget which dcgen_kernels fallback warnings were already shown. They are shown once per (op, backend,
    reason) per process, and ops may share a name there (the two SANA linear attentions do), so a benchmark
    that must see whether *this* call falls back clears the record before its first call."""
    from dcgen_kernels import _backend

    warned = getattr(_backend, "_warned", None)
    if isinstance(warned, set):
        warned.clear()


def dcgen_fallbacks(messages: list) -> list:
    return [m for m in messages if m.startswith("dcgen_kernels")]


# dcgen_kernels.ops names -> the ops submodule that defines them (tried when the package does not re-export them).
OP_MODULES = {"sana_linear_attention": "sana_linear_attention",
              "sana_multiscale_linear_attention": "sana_linear_attention",
              "glumbconv": "glumbconv",
              "ada_layer_norm_modulate": "ada_layer_norm",
              "gated_residual": "ada_layer_norm",
              "gated_residual_ada_layer_norm_modulate": "ada_layer_norm",
              "key_padding_attention": "key_padding_attention"}


def load_op(name: str):
    """(the callable dcgen_kernels.ops.<name>, None) or (None, why it is not importable)."""
    ops = importlib.import_module("dcgen_kernels.ops")
    fn = getattr(ops, name, None)
    if fn is not None:
        return fn, None
    module = OP_MODULES.get(name)
    if module is None:
        return None, f"dcgen_kernels.ops has no {name}"
    try:
        fn = getattr(importlib.import_module(f"dcgen_kernels.ops.{module}"), name, None)
    except Exception as err:  # noqa: BLE001 - an op being written may not import yet
        return None, f"dcgen_kernels.ops.{module} does not import: {type(err).__name__}: {err}"
    return (fn, None) if fn is not None else (None, f"dcgen_kernels.ops.{module} has no {name}")


def accepts_backend(fn) -> bool:
    try:
        return "backend" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # e.g. a torch.library op without a Python signature
        return True


def build_module(factory: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """`factory()` with parameters created directly on `device` in `dtype` (a 1.6B model in fp32 on the host
    would take minutes), seeded so that every section building the same model gets the same weights. Eval
    mode, no grad. Buffers the model creates in an explicit dtype (SANA's fp32 sincos table) keep it."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def free_device_memory(device: torch.device) -> None:
    """Collect unreachable models first (a module graph with reference cycles outlives `del`), then hand the
    cached blocks back: a 24 GB FLUX-12B that lingers would make the next model OOM."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def image_grid(image_tokens: int) -> int:
    grid = math.isqrt(image_tokens)
    if grid * grid != image_tokens:
        raise ValueError(f"image tokens must fill a square grid, got {image_tokens}")
    return grid


def flux_ids(text_tokens: int, image_tokens: int, device: torch.device):
    """(txt_ids, img_ids) as FluxPipeline makes them: text all zeros, image (0, row, col) on a square grid."""
    grid = image_grid(image_tokens)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return torch.zeros(text_tokens, 3, device=device), img_ids.to(device)


def rope_tables(text_tokens: int, image_tokens: int, axes_dim: tuple, device: torch.device):
    """fp32 (cos, sin) of shape [text + image, sum(axes_dim)] and a note on how they were made.

    With diffusers: FluxPosEmbed(theta=10000) on the [text, image] ids, exactly as the transformer does.
    Without: random angles in the same interleaved-pair layout (attention cost does not depend on them).
    """
    txt_ids, img_ids = flux_ids(text_tokens, image_tokens, device)
    try:
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    except ImportError:
        angles = torch.rand(text_tokens + image_tokens, sum(axes_dim) // 2, device=device) * (2 * math.pi)
        cos, sin = (f(angles).repeat_interleave(2, dim=-1) for f in (torch.cos, torch.sin))
        return cos, sin, "random angles (diffusers not importable)"
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(axes_dim))(torch.cat([txt_ids, img_ids]))
    return cos.float(), sin.float(), f"diffusers FluxPosEmbed(theta=10000, axes_dim={tuple(axes_dim)})"


def measure_patched(model, fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int,
                    stock_out: torch.Tensor, tolerance: float, backend: str = "auto", cuda_graph: bool = False,
                    quant: Optional[str] = None) -> dict:
    """Patch `model` (with CUDA graphs if asked: the first call captures, the timed calls replay; with `quant` its
    block linears quantized, originals kept for unpatch), check fn()'s output against stock, time it, unpatch. A
    model dcgen_kernels cannot patch is recorded as unavailable; a fallback to another backend (or to eager instead
    of a graph) is listed under "fallbacks". With CUDA graphs the capturing call returns its eager warm-up's
    output, so a replay is checked as well (`rel_l2_vs_stock` is the larger of the two)."""
    import dcgen_kernels

    from .timing import time_ms

    try:
        dcgen_kernels.patch(model, backend=backend, cuda_graph=cuda_graph, quant=quant,
                            keep_original=quant is not None)
    except ValueError as err:  # no supported module in this model
        return {"unavailable": f"{type(err).__name__}: {err}"}
    try:
        report = dcgen_kernels.patch_report(model)
        rec, messages = checked_first_calls(model, fn, device, stock_out, tolerance, cuda_graph)
        rec["ms"] = time_ms(fn, device, warmup, iters)
        rec.update(modules_replaced=len(report.replaced), modules_skipped=len(report.skipped), report=str(report),
                   fallbacks=dcgen_fallbacks(messages))
        return rec
    finally:
        dcgen_kernels.unpatch(model)


def checked_first_calls(model, fn: Callable[[], torch.Tensor], device: torch.device, stock_out: torch.Tensor,
                        tolerance: float, cuda_graph: bool):
    """(check record, warning messages) of a variant's first call of fn and, with CUDA graphs on a GPU, of a replay
    too: the capturing call returns its eager warm-up's output. Raises unless a graph was captured then (the model
    may run eagerly instead, saying why in a fallback warning). The fallback warnings are reset first, so the
    messages list this variant's even where an earlier variant or section warned."""
    from dcgen_kernels.patching.cuda_graph import graphed

    reset_dcgen_warnings()
    out, exc, messages = first_call(fn)
    if exc is not None:
        raise exc
    errors = {"rel_l2_first_call": rel_l2(out, stock_out)}
    del out
    if cuda_graph and device.type == "cuda":
        wrapper = graphed(model)
        if wrapper is None or not any(entry is not None for entry in wrapper.graphs.values()):
            raise RuntimeError(f"no CUDA graph was captured (the step runs eagerly): {dcgen_fallbacks(messages)}")
        errors["rel_l2_replay"] = rel_l2(fn(), stock_out)
    rec = check_record(worst_error(errors.values()), tolerance)
    if len(errors) > 1:
        rec.update(errors)
    return rec, messages


def measure_stock_graph(model, fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int,
                        stock_out: torch.Tensor, tolerance: float, stock_ms: float) -> dict:
    """The unpatched step replayed as one CUDA graph: launch savings alone, so the patched graph variants' gain over
    it is the kernels' own. A reference row, not a target (the issues' baseline is stock eager)."""
    from dcgen_kernels.patching import cuda_graph

    from .timing import time_ms

    cuda_graph.enable(model)
    try:
        rec, messages = checked_first_calls(model, fn, device, stock_out, tolerance, True)
        rec.update(fallbacks=dcgen_fallbacks(messages), ms=time_ms(fn, device, warmup, iters))
        rec["fraction_of_stock"] = rec["ms"] / stock_ms
        return rec
    except Exception as err:  # noqa: BLE001 - recorded; the patched variants still run
        return error_record(err)
    finally:
        cuda_graph.disable(model)


PATCHED_VARIANTS = (("patched", "auto"), ("patched_triton", "triton"))  # what users get; Triton forced
# Model steps: also patch(model, cuda_graph=True), the step replayed as one CUDA graph
STEP_VARIANTS = PATCHED_VARIANTS + (("patched_graph", "auto", True),)
# rel-L2 vs the stock bf16 step a quantized step may show (its weights and activations are 8- or 4-bit)
QUANT_STEP_TOL = {"fp8": 0.15, "nvfp4": 0.3}


def record_patched_variants(rec: dict, model, fn: Callable[[], torch.Tensor], device: torch.device, warmup: int,
                            iters: int, stock_out: torch.Tensor, tolerance: float,
                            variants=PATCHED_VARIANTS) -> None:
    """rec[name] = measure_patched(...) with its speed-up over rec["stock"], per (name, backend[, cuda_graph[,
    quant]]); a quantized variant is checked against QUANT_STEP_TOL instead. An error in one variant is recorded
    and the others still run. Then records that the model was left unpatched."""
    import dcgen_kernels

    for name, backend, *options in variants:
        cuda_graph = bool(options[0]) if options else False
        quant = options[1] if len(options) > 1 else None
        try:
            rec[name] = measure_patched(model, fn, device, warmup, iters, stock_out,
                                        max(tolerance, QUANT_STEP_TOL[quant]) if quant else tolerance, backend,
                                        cuda_graph=cuda_graph, quant=quant)
            if "ms" in rec[name]:
                rec[name]["speedup_vs_stock"] = rec["stock"]["ms"] / rec[name]["ms"]
        except Exception as err:  # noqa: BLE001 - recorded; the stock numbers stay
            rec[name] = error_record(err)
    rec["unpatched_after"] = not dcgen_kernels.is_patched(model)


# The largest noise floor taken as bf16 noise (H100, 2026-11-27: 5.3e-3 to 1.4e-2 for FLUX, SANA and DC-AE). The
# floor comes from the patching under test, so a wiring error shared by every backend would raise it: above this
# it is a FAILED check itself and the tolerances derived from it stop growing.
NOISE_FLOOR_MAX = 3e-2


def reference_noise_floor(model, fn: Callable[[], torch.Tensor], stock_out: torch.Tensor) -> dict:
    """rel-L2 of the model patched with the fp32 reference backend vs stock: the bf16 noise of the stock path
    itself, grown through every block. A fused kernel may deviate about as much (2x allowed) without being wrong."""
    import dcgen_kernels

    try:
        dcgen_kernels.patch(model, backend="reference")
    except ValueError as err:
        return {"unavailable": f"{type(err).__name__}: {err}"}
    try:
        floor = rel_l2(fn(), stock_out)
    finally:
        dcgen_kernels.unpatch(model)
    return {"rel_l2_reference_backend_vs_stock": floor, "tolerance": NOISE_FLOOR_MAX,
            "check": "ok" if floor <= NOISE_FLOOR_MAX else "FAILED"}


def noise_floor_tolerance(floor: dict, minimum: float) -> float:
    return max(minimum, 2 * min(floor.get("rel_l2_reference_backend_vs_stock", 0.0), NOISE_FLOOR_MAX))


# An op's fused variant may be this many times as far from fp32 as the stock bf16 path it replaces.
STOCK_ERROR_MARGIN = 1.5


def stock_error_tolerance(minimum: float, stock_err: float) -> float:
    """An op check's tolerance: `minimum`, or STOCK_ERROR_MARGIN x stock's own rel-L2 to fp32 where larger, up to
    NOISE_FLOOR_MAX (a stock path far from fp32 does not loosen the check further; NaN leaves `minimum`)."""
    return max(minimum, min(STOCK_ERROR_MARGIN * stock_err, NOISE_FLOOR_MAX))


class ProgressBar:
    """tqdm on a terminal's stderr when it is installed (it comes with diffusers' huggingface_hub), else one plain
    stderr line per finished item."""

    def __init__(self, total: int, desc: str):
        import sys

        self._stream, self._desc, self._done, self._total, self._item = sys.stderr, desc, 0, total, ""
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is None or not sys.stderr.isatty():  # a log file gets one line per item, not redraws
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def describe(self, item: str) -> None:
        self._item = item
        if self._bar is not None:
            self._bar.set_postfix_str(item, refresh=True)

    def update(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            print(f"[{self._desc}] {self._done}/{self._total} {self._item}", file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
