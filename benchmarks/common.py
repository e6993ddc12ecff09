"""Helpers shared by the benchmark modules: error records, correctness checks, FLUX positions and RoPE."""

from __future__ import annotations

import math
import traceback
import warnings
from typing import Callable

import torch

# bf16 outputs against the stock bf16 path (both round to bf16; the fused op keeps fp32 softmax statistics).
REL_L2_TOL = 1e-2

ANCHOR_LABEL = "anchor (H100, 2026-11-27)"


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


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


def dcgen_fallbacks(messages: list) -> list:
    return [m for m in messages if m.startswith("dcgen_kernels")]


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
