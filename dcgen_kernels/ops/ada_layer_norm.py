"""Ops `ada_layer_norm_modulate` and `gated_residual`: the adaLN elementwise work around every DiT block.

diffusers spends several kernels (and several full reads/writes of the activations) on
`norm(x) * (1 + scale) + shift` and on `residual + gate * x`; each op here is one pass over the activations.
The modulation vectors are per (batch, channel): (B, C) as FLUX's `emb.chunk(6, dim=1)` gives them, or
(B, 1, C) as SANA's `(scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)` does, or with a
batch size of 1 to broadcast. Strided chunk views are read in place (only the channel stride must be 1).

`ada_layer_norm_modulate_fp8` is the same op emitting FP8 E4M3 rows and one fp32 scale per row (the format of
ops/fp8_linear.py), quantized from the fp32 result in the same pass: the producer side of the FP8 linears.

`gated_residual_ada_layer_norm_modulate` (and its `_fp8` form) is a residual add (gated or not) followed by the
modulated norm of the sum, as a DiT block does after its attention (FLUX: `norm2` after the gated attention
residual; SANA: `norm2` after the cross-attention residual): one pass that writes the sum without reading it back.
The same arithmetic as the two ops in sequence: bit-equal in the interpreter; compiled, the row statistics may be
summed in another order (an H100 showed 69 of 9.1M bf16 outputs one rounding apart at C = 2232, equally accurate).

Rounding: the math runs in fp32 and is rounded once to the output dtype. diffusers rounds after every
operation in bf16/fp16 (norm, 1 + scale, product, sum), so results differ by about one rounding of the output.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend
from ._common import (call_op, cdiv, check_positive_eps, check_tensor, custom_op, register_inference_only,
                      register_reference_autograd)

__all__ = [
    "ada_layer_norm_modulate", "ada_layer_norm_modulate_reference",
    "ada_layer_norm_modulate_fp8", "ada_layer_norm_modulate_fp8_reference",
    "gated_residual", "gated_residual_reference",
    "gated_residual_ada_layer_norm_modulate", "gated_residual_ada_layer_norm_modulate_reference",
    "gated_residual_ada_layer_norm_modulate_fp8",
]

# The LayerNorm kernel holds a whole row in registers; wider rows would spill.
TRITON_MAX_CHANNELS = 8192


# ----------------------------------------------------------------------------------------------- reference
def _per_batch(t: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, 1, C) so it broadcasts over the rows of a (B, N, C) tensor; (B, 1, C) unchanged."""
    return t[:, None, :] if t.dim() == 2 else t


def ada_layer_norm_modulate_reference(x, scale, shift, norm_weight=None, norm_bias=None, eps: float = 1e-6):
    """LayerNorm(x) (affine if weights are given) * (1 + scale) + shift, in fp32, returned in x's dtype."""
    weight = norm_weight.float() if norm_weight is not None else None
    bias = norm_bias.float() if norm_bias is not None else None
    y = F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    return (y * (1 + _per_batch(scale).float()) + _per_batch(shift).float()).to(x.dtype)


def ada_layer_norm_modulate_fp8_reference(x, scale, shift, norm_weight=None, norm_bias=None, eps: float = 1e-6):
    """The fp32 modulated LayerNorm quantized per row: (fp8 E4M3 (B, N, C), fp32 (B, N) scales)."""
    from .fp8_linear import quantize_fp8_reference

    weight = norm_weight.float() if norm_weight is not None else None
    bias = norm_bias.float() if norm_bias is not None else None
    y = F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    return quantize_fp8_reference(y * (1 + _per_batch(scale).float()) + _per_batch(shift).float())


def gated_residual_reference(residual, gate, x):
    """residual + gate * x in fp32, returned in residual's dtype."""
    return (residual.float() + _per_batch(gate).float() * x.float()).to(residual.dtype)


def _residual_sum_reference(residual, gate, x):
    """residual + gate * x (gate None: residual + x) in fp32, rounded to residual's dtype."""
    if gate is None:
        return (residual.float() + x.float()).to(residual.dtype)
    return gated_residual_reference(residual, gate, x)


def gated_residual_ada_layer_norm_modulate_reference(residual, gate, x, scale, shift, norm_weight=None,
                                                     norm_bias=None, eps: float = 1e-6):
    """(total, out): total = residual + gate * x rounded to residual's dtype (gate None: 1), out its modulated norm."""
    total = _residual_sum_reference(residual, gate, x)
    return total, ada_layer_norm_modulate_reference(total, scale, shift, norm_weight, norm_bias, eps)


# ----------------------------------------------------------------------------------------------- validation
def _check_modulation(name: str, t, x: torch.Tensor) -> None:
    B, _, C = x.shape
    check_tensor(name, t, device=x.device, last_dim_contiguous=True)
    per_batch = t.dim() in (2, 3) and t.shape[0] in (1, B) and t.shape[-1] == C and (t.dim() == 2 or t.shape[1] == 1)
    if not per_batch:
        raise ValueError(f"{name} must have shape (B, C), (B, 1, C), (1, C) or (1, 1, C) with B = {B}, C = {C}, "
                         f"got {tuple(t.shape)}")


def _check_activations(name: str, t, like: Optional[torch.Tensor] = None) -> None:
    check_tensor(name, t, ndim=3, device=None if like is None else like.device, last_dim_contiguous=True)
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} must have the same shape as residual {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one channel, got shape {tuple(t.shape)}")


def _validate_modulate(x, scale, shift, norm_weight, norm_bias, eps, name: str = "x") -> None:
    _check_activations(name, x)
    _check_modulation("scale", scale, x)
    _check_modulation("shift", shift, x)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(name, t, shape=(x.shape[-1],), device=x.device, last_dim_contiguous=True)
    check_positive_eps(eps)


def _validate_gated(residual, gate, x) -> None:
    _check_activations("residual", residual)
    _check_activations("x", x, like=residual)
    _check_modulation("gate", gate, residual)


def _validate_gated_modulate(residual, gate, x, scale, shift, norm_weight, norm_bias, eps) -> None:
    _validate_modulate(residual, scale, shift, norm_weight, norm_bias, eps, name="residual")
    _check_activations("x", x, like=residual)
    if gate is not None:
        _check_modulation("gate", gate, residual)


# ----------------------------------------------------------------------------------------------- launchers
def _batch_stride(t: torch.Tensor) -> int:
    """Stride between batch elements of a modulation vector; 0 when it broadcasts over the batch."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _modulate_config(channels: int) -> dict:
    block_c = 1 << (channels - 1).bit_length()
    if _backend.triton_interpreter_enabled():  # few, large programs: the interpreter's cost is per program
        return dict(BLOCK_ROWS=16, BLOCK_C=block_c, num_warps=4)
    # H100, bf16: one 4096-wide row per 4-warp program reached 94-95% of the copy bandwidth at FLUX/SANA shapes.
    return dict(BLOCK_ROWS=max(1, 4096 // block_c), BLOCK_C=block_c, num_warps=4)


def _gated_config() -> dict:
    if _backend.triton_interpreter_enabled():  # narrow channel blocks so small tests cover partial blocks
        return dict(BLOCK_ROWS=16, BLOCK_C=128, num_warps=4)
    return dict(BLOCK_ROWS=4, BLOCK_C=1024, num_warps=4)  # best of 6 tiles measured on an H100 (bf16)


def _launch_modulate_triton(x, scale, shift, norm_weight, norm_bias, eps, out, row_scale=None, update=None,
                            gate=None, total=None) -> None:
    """row_scale given: out is fp8 and gets the quantized rows, row_scale (B, N) fp32 their scales.
    update given: the rows normalised are total = x + gate * update (gate None: 1), also written to `total`."""
    from ..triton_kernels.ada_layer_norm import ada_layer_norm_modulate_kernel

    B, N, C = x.shape
    cfg = _modulate_config(C)
    has_update, has_gate = update is not None, gate is not None
    ada_layer_norm_modulate_kernel[(cdiv(N, cfg["BLOCK_ROWS"]), B)](
        # x stands in for the pointers whose flag is off: never read or written
        x, update if has_update else x, gate if has_gate else x, total if has_update else x, scale, shift,
        norm_weight if norm_weight is not None else x, norm_bias if norm_bias is not None else x,
        out, row_scale if row_scale is not None else x,
        N, C,
        x.stride(0), x.stride(1), update.stride(0) if has_update else 0, update.stride(1) if has_update else 0,
        _batch_stride(gate) if has_gate else 0, total.stride(0) if has_update else 0,
        total.stride(1) if has_update else 0, _batch_stride(scale), _batch_stride(shift), out.stride(0), out.stride(1),
        eps,
        HAS_WEIGHT=norm_weight is not None, HAS_BIAS=norm_bias is not None, HAS_UPDATE=has_update, HAS_GATE=has_gate,
        QUANT_FP8=row_scale is not None, NATIVE_CAST=not _backend.triton_interpreter_enabled(), **cfg,
    )


def _launch_gated_triton(residual, gate, x, out) -> None:
    from ..triton_kernels.ada_layer_norm import gated_residual_kernel

    B, N, C = residual.shape
    cfg = _gated_config()
    gated_residual_kernel[(cdiv(N, cfg["BLOCK_ROWS"]), cdiv(C, cfg["BLOCK_C"]), B)](
        residual, gate, x, out,
        N, C,
        residual.stride(0), residual.stride(1), _batch_stride(gate), x.stride(0), x.stride(1),
        out.stride(0), out.stride(1),
        **cfg,
    )


def _triton_case_error(x: torch.Tensor) -> Optional[str]:
    if x.shape[-1] > TRITON_MAX_CHANNELS:
        return f"{x.shape[-1]} channels > {TRITON_MAX_CHANNELS} (a row must fit in registers)"
    return None


def select_modulate_backend(x: torch.Tensor, backend: str, op: str = "ada_layer_norm_modulate") -> str:
    return _backend.select(
        op,
        backend,
        platform_checks={"triton": lambda: _backend.triton_device_error(x.device)},
        case_checks={"triton": lambda: _triton_case_error(x)},
    )


def select_gated_backend(residual: torch.Tensor, backend: str) -> str:
    return _backend.select(
        "gated_residual",
        backend,
        platform_checks={"triton": lambda: _backend.triton_device_error(residual.device)},
        case_checks={},
    )


def ada_layer_norm_modulate_into(x, scale, shift, norm_weight, norm_bias, eps, out) -> None:
    """Write the modulated LayerNorm of `x` into `out` ((B, N, C), channel stride 1) with the Triton kernel."""
    if x.numel():
        _launch_modulate_triton(x, scale, shift, norm_weight, norm_bias, eps, out)


def gated_residual_into(residual, gate, x, out) -> None:
    """Write residual + gate * x into `out` ((B, N, C), channel stride 1) with the Triton kernel."""
    if residual.numel():
        _launch_gated_triton(residual, gate, x, out)


# ----------------------------------------------------------------------------------------------- custom ops
@custom_op("dcgen::ada_layer_norm_modulate")
def _ada_layer_norm_modulate_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float, backend: str,
) -> torch.Tensor:
    chosen = select_modulate_backend(x, backend)
    if chosen == "reference":
        return ada_layer_norm_modulate_reference(x, scale, shift, norm_weight, norm_bias, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ada_layer_norm_modulate_into(x, scale, shift, norm_weight, norm_bias, eps, out)
    return out


@_ada_layer_norm_modulate_op.register_fake
def _(x, scale, shift, norm_weight, norm_bias, eps, backend):
    return x.new_empty(x.shape)


register_reference_autograd(_ada_layer_norm_modulate_op, ada_layer_norm_modulate_reference, n_tensor_inputs=5)


@custom_op("dcgen::ada_layer_norm_modulate_fp8")
def _ada_layer_norm_modulate_fp8_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = select_modulate_backend(x, backend)
    if chosen == "reference":
        q, row_scale = ada_layer_norm_modulate_fp8_reference(x, scale, shift, norm_weight, norm_bias, eps)
        return q.contiguous(), row_scale.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel():
        _launch_modulate_triton(x, scale, shift, norm_weight, norm_bias, eps, q, row_scale)
    return q, row_scale


@_ada_layer_norm_modulate_fp8_op.register_fake
def _(x, scale, shift, norm_weight, norm_bias, eps, backend):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1], dtype=torch.float32)


register_inference_only(_ada_layer_norm_modulate_fp8_op, "ada_layer_norm_modulate_fp8")


@custom_op("dcgen::gated_residual")
def _gated_residual_op(residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
    chosen = select_gated_backend(residual, backend)
    if chosen == "reference":  # contiguous like the kernel's output and the fake (inputs may be permuted)
        return gated_residual_reference(residual, gate, x).contiguous()
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    gated_residual_into(residual, gate, x, out)
    return out


@_gated_residual_op.register_fake
def _(residual, gate, x, backend):
    return residual.new_empty(residual.shape)


register_reference_autograd(_gated_residual_op, gated_residual_reference, n_tensor_inputs=3)


@custom_op("dcgen::gated_residual_ada_layer_norm_modulate")
def _gated_residual_modulate_op(
    residual: torch.Tensor, gate: Optional[torch.Tensor], x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = select_modulate_backend(residual, backend, "gated_residual_ada_layer_norm_modulate")
    if chosen == "reference":
        total, out = gated_residual_ada_layer_norm_modulate_reference(residual, gate, x, scale, shift, norm_weight,
                                                                      norm_bias, eps)
        return total.contiguous(), out.contiguous()
    total = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    out = torch.empty_like(total)
    if residual.numel():
        _launch_modulate_triton(residual, scale, shift, norm_weight, norm_bias, eps, out, update=x, gate=gate,
                                total=total)
    return total, out


@_gated_residual_modulate_op.register_fake
def _(residual, gate, x, scale, shift, norm_weight, norm_bias, eps, backend):
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


register_reference_autograd(_gated_residual_modulate_op, gated_residual_ada_layer_norm_modulate_reference,
                            n_tensor_inputs=7)


@custom_op("dcgen::gated_residual_ada_layer_norm_modulate_fp8")
def _gated_residual_modulate_fp8_op(
    residual: torch.Tensor, gate: Optional[torch.Tensor], x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = select_modulate_backend(residual, backend, "gated_residual_ada_layer_norm_modulate_fp8")
    if chosen == "reference":
        total = _residual_sum_reference(residual, gate, x)
        q, row_scale = ada_layer_norm_modulate_fp8_reference(total, scale, shift, norm_weight, norm_bias, eps)
        return total.contiguous(), q.contiguous(), row_scale.contiguous()
    total = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    q = torch.empty(residual.shape, dtype=torch.float8_e4m3fn, device=residual.device)
    row_scale = torch.empty(residual.shape[:-1], dtype=torch.float32, device=residual.device)
    if residual.numel():
        _launch_modulate_triton(residual, scale, shift, norm_weight, norm_bias, eps, q, row_scale, update=x,
                                gate=gate, total=total)
    return total, q, row_scale


@_gated_residual_modulate_fp8_op.register_fake
def _(residual, gate, x, scale, shift, norm_weight, norm_bias, eps, backend):
    return (residual.new_empty(residual.shape), residual.new_empty(residual.shape, dtype=torch.float8_e4m3fn),
            residual.new_empty(residual.shape[:-1], dtype=torch.float32))


register_inference_only(_gated_residual_modulate_fp8_op, "gated_residual_ada_layer_norm_modulate_fp8")


# ----------------------------------------------------------------------------------------------- public API
def ada_layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dim (affine only if `norm_weight`/`norm_bias` are given), then `* (1 + scale) + shift`.

    x: (B, N, C) fp32/bf16/fp16, channel stride 1, any row/batch strides.
    scale, shift: (B, C), (B, 1, C), (1, C) or (1, 1, C), any float dtype, channel stride 1 (chunk views are fine).
    norm_weight, norm_bias: (C,) or None, for a LayerNorm with `elementwise_affine=True`.
    Returns a contiguous (B, N, C) tensor in x's dtype; the statistics and the modulation run in fp32.
    """
    _backend.check_backend_name(backend)
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    _validate_modulate(x, scale, shift, norm_weight, norm_bias, eps)
    return call_op(_ada_layer_norm_modulate_op, x, scale, shift, norm_weight, norm_bias, eps, backend)


def ada_layer_norm_modulate_fp8(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    backend: str = "auto",
):
    """`ada_layer_norm_modulate` quantized to FP8 E4M3 in the same pass, for the FP8 linears that consume it.

    Same arguments. Returns an FP8Activation (ops/fp8_linear.py): data (B, N, C) float8_e4m3fn, scale (B, N) fp32
    = row amax / 448 of the fp32 result, dtype = x's dtype (what the consuming linears output).
    """
    from .fp8_linear import FP8Activation

    _backend.check_backend_name(backend)
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    _validate_modulate(x, scale, shift, norm_weight, norm_bias, eps)
    data, row_scale = call_op(_ada_layer_norm_modulate_fp8_op, x, scale, shift, norm_weight, norm_bias, eps,
                              backend)
    return FP8Activation(data, row_scale, x.dtype)


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """residual + gate * x in one pass.

    residual, x: (B, N, C) fp32/bf16/fp16 (dtypes may differ), channel stride 1, any row/batch strides.
    gate: (B, C), (B, 1, C), (1, C) or (1, 1, C), any float dtype, channel stride 1.
    Returns a contiguous (B, N, C) tensor in residual's dtype, computed in fp32 and rounded once.
    """
    _backend.check_backend_name(backend)
    _validate_gated(residual, gate, x)
    return call_op(_gated_residual_op, residual, gate, x, backend)


def _checked_eps(residual, gate, x, scale, shift, norm_weight, norm_bias, eps, backend) -> float:
    """Validate a gated_residual_ada_layer_norm_modulate(_fp8) call; returns eps as a float."""
    _backend.check_backend_name(backend)
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    _validate_gated_modulate(residual, gate, x, scale, shift, norm_weight, norm_bias, eps)
    return eps


def gated_residual_ada_layer_norm_modulate(
    residual: torch.Tensor, gate: Optional[torch.Tensor], x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    *, norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`total = gated_residual(residual, gate, x)` (gate None: residual + x) and `ada_layer_norm_modulate(total,
    scale, shift, ...)` in one pass; returns (total, out), both contiguous (B, N, C) in residual's dtype: total equal
    to gated_residual's, out to the norm of it up to the order of the row sums (module docstring). Arguments as
    those two ops take them.
    """
    eps = _checked_eps(residual, gate, x, scale, shift, norm_weight, norm_bias, eps, backend)
    return call_op(_gated_residual_modulate_op, residual, gate, x, scale, shift, norm_weight, norm_bias, eps, backend)


def gated_residual_ada_layer_norm_modulate_fp8(
    residual: torch.Tensor, gate: Optional[torch.Tensor], x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    *, norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
    backend: str = "auto",
):
    """`gated_residual_ada_layer_norm_modulate` whose normalised output is quantized to FP8 in the same pass, as
    `ada_layer_norm_modulate_fp8` does: returns (total, FP8Activation)."""
    from .fp8_linear import FP8Activation

    eps = _checked_eps(residual, gate, x, scale, shift, norm_weight, norm_bias, eps, backend)
    total, data, row_scale = call_op(_gated_residual_modulate_fp8_op, residual, gate, x, scale, shift, norm_weight,
                                     norm_bias, eps, backend)
    return total, FP8Activation(data, row_scale, residual.dtype)
