"""NVFP4 (E2M1 values, E4M3 group scales, fp32 tensor scale): quantize, dequantize, and SVDQuant's fused
activation quantizer.

Format (as NVIDIA's NVFP4 and nunchaku's NVFP4 SVDQuant store it):
- values: E2M1 (sign, 2 exponent bits, 1 mantissa bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives;
  two per byte along K, the even element in the low nibble (`byte = code[2i] | code[2i + 1] << 4`).
- group scales: one unsigned E4M3 (`torch.float8_e4m3fn`) per 16 consecutive elements along K,
  `scale = min(amax(group) / 6 / global_scale, 448)` rounded to nearest even. Decoders ignore the sign bit
  (never written here; an imported byte 0xB8 reads as 1.0 in every backend).
- global (per-tensor) scale: fp32, `x ~= e2m1 * scale * global_scale`. `quantize_nvfp4` picks
  `amax(|x|) / (6 * 448)` when not given (1.0 for an all-zero tensor, or when that quotient underflows to 0),
  so the largest group scale is 448.
- element rounding: `x / (scale * global_scale)` to the nearest E2M1 value, ties to the even code, |v| > 6
  saturates to 6. Elements of a group whose scale rounds to 0 become (signed) zeros.

Edge cases (identical in the reference and the kernels, tests compare bytes):
- K not a multiple of 16: the last group is zero-padded. Outputs have ceil(K/16) scales and ceil(K/16)*8
  bytes per row; `dequantize_nvfp4(..., k=K)` drops the padding.
- the sign bit of every code is the input's sign bit: -0.0 and small negatives that round to zero give code
  0x8 (-0.0 after dequantization).
- a group containing NaN or +-inf gets the E4M3 NaN scale (0x7F) and all-zero codes: it dequantizes to 16 NaNs,
  the other groups are unaffected. The automatic global scale ignores non-finite values.

`quantize_nvfp4_activations` is SVDQuant's input side in one read of x: the NVFP4 codes and scales of
`x / smooth`, plus `x @ lora_down` (fp32) for the low-rank branch. As in nunchaku, the down-projection acts on
the unsmoothed input (the smoothing is folded into `lora_down`), and the activation global scale is a given
tensor (nunchaku uses 1.0) so that no extra pass over x is needed.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _backend
from ._common import FLOAT_DTYPES, call_op, cdiv, check_tensor, custom_op, register_inference_only

__all__ = [
    "quantize_nvfp4", "quantize_nvfp4_reference", "dequantize_nvfp4", "dequantize_nvfp4_reference",
    "quantize_nvfp4_activations", "quantize_nvfp4_activations_reference", "nvfp4_global_scale",
    "unsigned_e4m3_values", "E2M1_VALUES", "GROUP_SIZE",
]

GROUP_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_NAN_BITS = 0x7F
# Value of each 4-bit code; code 8 is -0.0.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
# Rounding thresholds: |v| > t (strict) or |v| >= t adds one to the magnitude code; ties go to even codes.
_STRICT_THRESHOLDS = (0.25, 1.25, 2.5, 5.0)
_CLOSED_THRESHOLDS = (0.75, 1.75, 3.5)


def padded_k(k: int) -> int:
    return cdiv(k, GROUP_SIZE) * GROUP_SIZE


# ----------------------------------------------------------------------------------------------- reference
def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim tensor amax(|x|) / (6 * 448) over the finite values of x; 1.0 if that is 0 (amax 0, or below
    ~2e-42 so that the quotient underflows: such values quantize to zeros either way, and 0 is no valid scale)."""
    finite_abs = torch.where(torch.isfinite(x), x.abs(), 0).float()
    amax = finite_abs.amax() if x.numel() else finite_abs.new_zeros(())
    # amax / tensor: torch on CUDA turns a division by a Python number into a multiplication by its reciprocal.
    scale = amax / torch.full_like(amax, E2M1_MAX * E4M3_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def unsigned_e4m3_values(scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of NVFP4 group scales: unsigned E4M3, so the sign bit of each byte is ignored, as by the Triton
    and CUDA decoders and the MMA's ue4m3 (an imported checkpoint may set it); 0x7F / 0xFF are NaN."""
    return (scales.view(torch.uint8) & 0x7F).view(torch.float8_e4m3fn).float()


def _quantize_rows_fp32(x: torch.Tensor, global_scale: torch.Tensor):
    """x: fp32 [..., K] -> (packed uint8 [..., Kp/2], scales float8_e4m3fn [..., Kp/16])."""
    K = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, padded_k(K) - K))
    groups = x.unflatten(-1, (-1, GROUP_SIZE))
    finite = torch.isfinite(groups)
    all_finite = finite.all(-1)
    amax = torch.where(finite, groups.abs(), 0).amax(-1)
    # Correctly rounded divisions, as the kernels' div_rn (amax / 6.0 would be amax * (1 / 6) on CUDA).
    scale = (amax / torch.full_like(amax, E2M1_MAX) / global_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    scale_bits = torch.where(all_finite, scale.view(torch.uint8), E4M3_NAN_BITS).to(torch.uint8)
    denom = torch.where(all_finite, scale.float() * global_scale, 0)[..., None]
    mag = torch.where(denom > 0, groups.abs() / torch.where(denom > 0, denom, 1), 0)
    code = sum((mag > t).to(torch.uint8) for t in _STRICT_THRESHOLDS)
    code = code + sum((mag >= t).to(torch.uint8) for t in _CLOSED_THRESHOLDS)
    code = code | (torch.signbit(groups).to(torch.uint8) << 3)
    code = torch.where(all_finite[..., None], code, 0).flatten(-2)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, scale_bits.view(torch.float8_e4m3fn)


def quantize_nvfp4_reference(x: torch.Tensor, global_scale: Optional[torch.Tensor] = None):
    """(packed uint8 [..., ceil(K/16)*8], scales float8_e4m3fn [..., ceil(K/16)], global_scale fp32 0-dim)."""
    xf = x.float()
    gs = nvfp4_global_scale(xf) if global_scale is None else global_scale.float().reshape(())
    packed, scales = _quantize_rows_fp32(xf, gs)
    return packed, scales, gs


def dequantize_nvfp4_reference(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                               k: Optional[int] = None) -> torch.Tensor:
    """fp32 [..., k] (k defaults to the padded length 2 * packed.shape[-1])."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    values = E2M1_VALUES.to(packed.device)[codes]
    scale_values = unsigned_e4m3_values(scales).repeat_interleave(GROUP_SIZE, dim=-1)
    values = values * scale_values * global_scale.float().reshape(())
    return values if k is None else values[..., :k]


def quantize_nvfp4_activations_reference(x, smooth, lora_down, global_scale):
    """(packed, scales, lora_act fp32 [..., R]) = NVFP4(x / smooth), x @ lora_down (fp32 math)."""
    xf = x.float()
    lora_act = xf @ lora_down.float()
    smoothed = xf / smooth.float() if smooth is not None else xf
    packed, scales = _quantize_rows_fp32(smoothed, global_scale.float().reshape(()))
    return packed, scales, lora_act


# ----------------------------------------------------------------------------------------------- validation
def _as_global_scale(global_scale, device: torch.device) -> torch.Tensor:
    """A float or 1-element real (not bool) tensor -> fp32 0-dim tensor on `device`; value checked if on the host."""
    if isinstance(global_scale, (int, float)) and not isinstance(global_scale, bool):
        global_scale = torch.tensor(float(global_scale))
    if (not isinstance(global_scale, torch.Tensor) or global_scale.numel() != 1 or global_scale.dtype == torch.bool
            or global_scale.is_complex()):
        raise TypeError(f"global_scale must be a positive float or a 1-element real tensor, got {global_scale!r}")
    # Checked only where reading it costs nothing: a CUDA tensor is not read back (no host sync), nor is any
    # tensor while torch.compile traces (its value is unknown then).
    if global_scale.device.type == "cpu" and not torch.compiler.is_compiling():
        value = float(global_scale)
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"global_scale must be positive and finite, got {value}")
    return global_scale.to(device=device, dtype=torch.float32).reshape(())


def _check_packed(packed, scales) -> None:
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    check_tensor("scales", scales, dtypes=(torch.float8_e4m3fn,), device=packed.device)
    if packed.dim() < 1 or packed.shape[-1] % (GROUP_SIZE // 2):
        raise ValueError(f"packed must be [..., K_pad/2] with K_pad a multiple of 16, got {tuple(packed.shape)}")
    expected = packed.shape[:-1] + (packed.shape[-1] * 2 // GROUP_SIZE,)
    if tuple(scales.shape) != tuple(expected):
        raise ValueError(f"scales must have shape {tuple(expected)} for packed {tuple(packed.shape)}, "
                         f"got {tuple(scales.shape)}")


# ----------------------------------------------------------------------------------------------- launchers
def _dot_dtype(dtype: torch.dtype):
    import triton.language as tl

    if _backend.triton_interpreter_enabled():
        return tl.float32
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [M, C] with unit last stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _launch_quantize(x, smooth, lora_down, global_scale, packed, scales, lora_act) -> None:
    from ..triton_kernels.nvfp4_quantize import nvfp4_quantize_kernel

    x2 = _rows(x)
    M, K = x2.shape
    R = lora_down.shape[1] if lora_down is not None else 0
    interp = _backend.triton_interpreter_enabled()
    # sm_90a (ptxas -v, triton 3.8): 64x64 with 8 warps (the down-projection dot wants >= 64 rows) and 32x64 with
    # 4 warps run without register spills; 128-wide K chunks spill (the E2M1 rounding keeps many fp32 temporaries).
    block_k = 64
    block_m = 32 if interp or not R else 64
    num_warps = 8 if block_m == 64 else 4
    block_r = max(16, 1 << max(0, R - 1).bit_length())
    down = lora_down.contiguous() if lora_down is not None else x2
    grid = (cdiv(M, block_m),)
    nvfp4_quantize_kernel[grid](
        x2, smooth if smooth is not None else x2, down, global_scale,
        packed.view(M, -1), scales.view(torch.uint8).view(M, -1), lora_act.view(M, -1) if R else packed,
        M, K, padded_k(K), R,
        x2.stride(0), packed.shape[-1], scales.shape[-1], down.stride(0) if R else 0, R,
        # the dot in the wider of the two dtypes: a 16-bit one would round an fp32 lora_down (the reference's is fp32)
        HAS_SMOOTH=smooth is not None, HAS_LORA=R > 0,
        DOT_DTYPE=_dot_dtype(torch.promote_types(x.dtype, lora_down.dtype) if R else x.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=num_warps,
    )


def _launch_dequantize(packed, scales, global_scale, out) -> None:
    from ..triton_kernels.nvfp4_quantize import nvfp4_dequantize_kernel

    p2, s2 = _rows(packed), _rows(scales.view(torch.uint8))
    M, K_out = p2.shape[0], out.shape[-1]
    block_m, block_k = (32, 64) if _backend.triton_interpreter_enabled() else (32, 256)
    grid = (cdiv(M, block_m), cdiv(K_out, block_k))
    nvfp4_dequantize_kernel[grid](p2, s2, global_scale, out.view(M, K_out), M, K_out, p2.stride(0), s2.stride(0),
                                  K_out, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)


def _select(op: str, backend: str, device: torch.device) -> str:
    return _backend.select(op, backend, platform_checks={"triton": lambda: _backend.triton_device_error(device)},
                           case_checks={})


# ----------------------------------------------------------------------------------------------- custom ops
@custom_op("dcgen::nvfp4_quantize")
def _quantize_op(
    x: torch.Tensor, smooth: Optional[torch.Tensor], lora_down: Optional[torch.Tensor], global_scale: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    R = lora_down.shape[1] if lora_down is not None else 0
    if _select("nvfp4_quantize", backend, x.device) == "reference":
        down = lora_down if lora_down is not None else x.new_zeros(x.shape[-1], 0)
        return quantize_nvfp4_activations_reference(x, smooth, down, global_scale)
    lead, Kp = x.shape[:-1], padded_k(x.shape[-1])
    packed = torch.empty(*lead, Kp // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*lead, Kp // GROUP_SIZE, dtype=torch.float8_e4m3fn, device=x.device)
    lora_act = torch.empty(*lead, R, dtype=torch.float32, device=x.device)
    if x.numel():
        _launch_quantize(x, smooth, lora_down, global_scale, packed, scales, lora_act)
    return packed, scales, lora_act


@_quantize_op.register_fake
def _(x, smooth, lora_down, global_scale, backend):
    lead, Kp = x.shape[:-1], padded_k(x.shape[-1])
    R = lora_down.shape[1] if lora_down is not None else 0
    return (x.new_empty(*lead, Kp // 2, dtype=torch.uint8),
            x.new_empty(*lead, Kp // GROUP_SIZE, dtype=torch.float8_e4m3fn),
            x.new_empty(*lead, R, dtype=torch.float32))


register_inference_only(_quantize_op, "quantize_nvfp4 / quantize_nvfp4_activations")


@custom_op("dcgen::nvfp4_dequantize")
def _dequantize_op(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, k: int,
                   dtype: torch.dtype, backend: str) -> torch.Tensor:
    if _select("nvfp4_dequantize", backend, packed.device) == "reference":
        return dequantize_nvfp4_reference(packed, scales, global_scale, k).to(dtype).contiguous()  # k < padded
    out = torch.empty(*packed.shape[:-1], k, dtype=dtype, device=packed.device)
    if out.numel():
        _launch_dequantize(packed, scales, global_scale, out)
    return out


@_dequantize_op.register_fake
def _(packed, scales, global_scale, k, dtype, backend):
    return packed.new_empty(*packed.shape[:-1], k, dtype=dtype)


# ----------------------------------------------------------------------------------------------- public API
def quantize_nvfp4(x: torch.Tensor, global_scale: Union[None, float, torch.Tensor] = None, *,
                   backend: str = "auto"):
    """NVFP4-quantize x [..., K] along its last dim.

    Returns (packed uint8 [..., ceil(K/16)*8], scales float8_e4m3fn [..., ceil(K/16)], global_scale fp32
    0-dim). global_scale defaults to amax(|x|)/(6*448) over finite values (one extra reduction over x).
    """
    _backend.check_backend_name(backend)
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (K)")
    gs = nvfp4_global_scale(x) if global_scale is None else _as_global_scale(global_scale, x.device)
    packed, scales, _ = call_op(_quantize_op, x, None, None, gs, backend)
    return packed, scales, gs


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: Union[float, torch.Tensor], *,
                     k: Optional[int] = None, dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """Values e2m1 * scale * global_scale as `dtype` [..., k]; k defaults to the padded K = 2 * packed.shape[-1]."""
    _backend.check_backend_name(backend)
    _check_packed(packed, scales)
    k_pad = packed.shape[-1] * 2
    if k is None:
        k = k_pad
    if isinstance(k, bool) or not isinstance(k, int) or not (k_pad - GROUP_SIZE < k <= k_pad):
        raise ValueError(f"k must be an int in ({k_pad - GROUP_SIZE}, {k_pad}] for packed {tuple(packed.shape)}, "
                         f"got {k!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    gs = _as_global_scale(global_scale, packed.device)
    return call_op(_dequantize_op, packed, scales, gs, k, dtype, backend)


def quantize_nvfp4_activations(x: torch.Tensor, smooth: Optional[torch.Tensor], lora_down: Optional[torch.Tensor],
                               global_scale: Union[float, torch.Tensor] = 1.0, *, backend: str = "auto"):
    """SVDQuant input side, one read of x [..., K]: (packed, scales) = NVFP4(x / smooth) with the given global
    scale, and lora_act = x @ lora_down as fp32 [..., R] (R = 0 when lora_down is None).

    smooth: [K] or None (no smoothing); lora_down: [K, R] or None; both on x's device.
    """
    _backend.check_backend_name(backend)
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (K)")
    K = x.shape[-1]
    if smooth is not None:
        check_tensor("smooth", smooth, shape=(K,), device=x.device)
        smooth = smooth if smooth.stride(0) == 1 else smooth.contiguous()
    if lora_down is not None:
        check_tensor("lora_down", lora_down, ndim=2, device=x.device)
        if lora_down.shape[0] != K:
            raise ValueError(f"lora_down must have shape (K={K}, R), got {tuple(lora_down.shape)}")
        if lora_down.shape[1] == 0:
            lora_down = None
    gs = _as_global_scale(global_scale, x.device)
    return call_op(_quantize_op, x, smooth, lora_down, gs, backend)
