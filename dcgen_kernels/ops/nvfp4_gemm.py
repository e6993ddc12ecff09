"""NVFP4 GEMMs with SVDQuant's fused epilogue: `nvfp4_gemm` (W4A4) and `nvfp4_w4a16_gemm` (W4A16).

    out = dequant(A) @ dequant(W)^T + lora_act @ lora_up + bias        (W4A4; A from quantize_nvfp4_activations)
    out = (x / smooth) @ dequant(W)^T + (x @ lora_down) @ lora_up + bias   (W4A16; x bf16/fp16/fp32)

W: packed uint8 [N, K_pad/2] + float8_e4m3fn scales [N, K_pad/16] + fp32 tensor scale, as `quantize_nvfp4`
returns them for an nn.Linear weight [N, K]; lora_act: [M, R] (fp32 from the fused activation quantizer);
lora_down: [K, R]; lora_up: [R, N]; bias: [N].

Backends:
- `cuda` (W4A4 only): `csrc/nvfp4_gemm_sm120.cu`, the native block-scaled FP4 MMA
  (`mma.sync ... kind::mxf4nvf4.block_scale.scale_vec::4X`), used on an sm_120 GPU when `_C` was compiled for
  sm_120a. Compiled, not yet run on such a GPU.
- `triton`: dequantizes both operands in registers (exact in fp16/bf16), tensor-core dot with fp32 accumulation,
  scales + low-rank up-projection + bias in the epilogue. W4A16 at M >= W4A16_DEQUANT_MIN_M on a GPU instead
  materialises the layer's effective 16-bit weight dequant(W) / smooth + (lora_down @ lora_up)^T in one Triton
  pass into a scratch matrix (reads 0.56 B, writes 2 B per weight) and runs one cuBLAS GEMM with the bias: at
  large M the GEMM is compute-bound and cuBLAS' Hopper kernel is the ceiling; the extra pass is ~30 us against
  ~0.5 ms for a 4608 x 3072 x 12288 GEMM on an H100 (estimate from bandwidth; unmeasured).
- `reference`: fp32 dequantize + matmul.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _backend, _cext
from ._common import (FLOAT_DTYPES, HALF_DTYPES, call_op, cdiv, check_tensor, custom_op, register_inference_only,
                      tma_alignment_error)
from .nvfp4_quantize import GROUP_SIZE, _as_global_scale, _check_packed, dequantize_nvfp4_reference

__all__ = ["nvfp4_gemm", "nvfp4_gemm_reference", "nvfp4_w4a16_gemm", "nvfp4_w4a16_gemm_reference",
           "W4A16_DEQUANT_MIN_M"]

# W4A16 on a GPU: at and above this many rows, dequantize-to-scratch + cuBLAS; below, the fused kernel
# (memory-bound regime, where reading 4-bit instead of 16-bit weights is the gain).
W4A16_DEQUANT_MIN_M = 1024


# ----------------------------------------------------------------------------------------------- reference
def _epilogue_fp32(acc, lora_act, lora_up, bias):
    if lora_act is not None and lora_act.shape[-1]:
        acc = acc + lora_act.float() @ lora_up.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc


def nvfp4_gemm_reference(a_packed, a_scales, a_global_scale, w_packed, w_scales, w_global_scale, lora_act=None,
                         lora_up=None, bias=None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp32: dequant(A) [.., K_pad] @ dequant(W)^T + lora_act @ lora_up + bias, cast to out_dtype."""
    a = dequantize_nvfp4_reference(a_packed, a_scales, a_global_scale)
    w = dequantize_nvfp4_reference(w_packed, w_scales, w_global_scale)
    return _epilogue_fp32(a @ w.t(), lora_act, lora_up, bias).to(out_dtype)


def nvfp4_w4a16_gemm_reference(x, w_packed, w_scales, w_global_scale, smooth=None, lora_down=None, lora_up=None,
                               bias=None) -> torch.Tensor:
    """fp32: (x [.., K] / smooth) @ dequant(W)[:, :K]^T + (x @ lora_down) @ lora_up + bias, cast to x's dtype."""
    w = dequantize_nvfp4_reference(w_packed, w_scales, w_global_scale, k=x.shape[-1])
    xf = x.float() / smooth.float() if smooth is not None else x.float()
    lora_act = x.float() @ lora_down.float() if lora_down is not None else None
    return _epilogue_fp32(xf @ w.t(), lora_act, lora_up, bias).to(x.dtype)


# ----------------------------------------------------------------------------------------------- validation
def _check_epilogue(lead: tuple, N: int, lora_act, lora_up, bias, device) -> None:
    if (lora_act is None) != (lora_up is None):
        raise ValueError("lora_act and lora_up must be given together (or both None)")
    if lora_act is not None:
        check_tensor("lora_act", lora_act, device=device)
        check_tensor("lora_up", lora_up, ndim=2, device=device)
        R = lora_up.shape[0]
        if tuple(lora_act.shape) != tuple(lead) + (R,):
            raise ValueError(f"lora_act must have shape {tuple(lead) + (R,)} (rows of the input, R = "
                             f"lora_up.shape[0]), got {tuple(lora_act.shape)}")
        if lora_up.shape[1] != N:
            raise ValueError(f"lora_up must have shape (R, N={N}), got {tuple(lora_up.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(N,), device=device)


def _check_lora_down(K: int, N: int, lora_down, lora_up, bias, device) -> None:
    if (lora_down is None) != (lora_up is None):
        raise ValueError("lora_down and lora_up must be given together (or both None)")
    if lora_down is not None:
        check_tensor("lora_down", lora_down, ndim=2, device=device)
        check_tensor("lora_up", lora_up, ndim=2, device=device)
        if lora_down.shape[0] != K or lora_up.shape != (lora_down.shape[1], N):
            raise ValueError(f"lora_down must be (K={K}, R) and lora_up (R, N={N}), got {tuple(lora_down.shape)} "
                             f"and {tuple(lora_up.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(N,), device=device)


def _check_weight(w_packed, w_scales, device):
    _check_packed(w_packed, w_scales)
    if w_packed.dim() != 2:
        raise ValueError(f"w_packed must be 2-D [N, K_pad/2], got shape {tuple(w_packed.shape)}")
    if w_packed.device != device:
        raise ValueError(f"w_packed must be on device {device} like the input, got {w_packed.device}")


# ----------------------------------------------------------------------------------------------- launchers
def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _config(M: int, a_fp4: bool) -> dict:
    if _backend.triton_interpreter_enabled():
        # Small tiles: the test shapes then cover partial M, N and K blocks and several K steps.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    # Hopper (checked with ptxas -v for sm_90a, triton 3.8): 128x128 tiles, 8 warps = two wgmma warpgroups, no
    # register spills with BLOCK_K 64 (W4A4: 245 registers) and 32 (W4A16: 225); larger K or N tiles spill,
    # because the dequantized operand tiles live in registers. Small M (decode-like) uses narrower row blocks.
    block_m = 128 if M > 64 else max(16, 1 << max(0, M - 1).bit_length())
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64 if a_fp4 else 32, GROUP_M=8,
                num_warps=8 if block_m >= 128 else 4, num_stages=3 if a_fp4 else 4)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _launch_triton(a, a_scales, a_gs, w_packed, w_scales, w_gs, lora_act, lora_up, bias, out, K: int,
                   a_fp4: bool, smooth: Optional[torch.Tensor] = None) -> None:
    from ..triton_kernels.nvfp4_gemm import nvfp4_gemm_kernel

    a2 = _rows(a)
    as2 = _rows(a_scales.view(torch.uint8)) if a_fp4 else a2
    # The kernel reads weight rows and the bias with unit stride (no-op unless a caller passes strided views).
    w_packed, w_scales = _rows(w_packed), _rows(w_scales.view(torch.uint8))
    bias = bias.contiguous() if bias is not None else None
    out2 = out.view(-1, out.shape[-1])
    M, N = out2.shape
    K_pad = w_packed.shape[1] * 2
    R = lora_up.shape[0] if lora_up is not None else 0
    la = _rows(lora_act) if R else out2
    up = lora_up if (R == 0 or lora_up.stride(1) == 1) else lora_up.contiguous()
    cfg = _config(M, a_fp4)
    interp = _backend.triton_interpreter_enabled()
    dot = _tl_dtype(torch.float32) if interp else _tl_dtype(torch.float16 if a_fp4 else a.dtype)
    lora_dot = _tl_dtype(torch.float32) if interp or not R else _tl_dtype(
        up.dtype if up.dtype in HALF_DTYPES else torch.float32)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    nvfp4_gemm_kernel[grid](
        a2, as2, a_gs if a_fp4 else w_gs,
        w_packed, w_scales, w_gs,
        smooth.float().contiguous() if smooth is not None else out2,
        la, up if R else out2, bias if bias is not None else out2, out2,
        M, N, K, K_pad, R,
        a2.stride(0), as2.stride(0), w_packed.stride(0), w_scales.stride(0), la.stride(0),
        up.stride(0) if R else 0, out2.stride(0),
        A_FP4=a_fp4, HAS_SMOOTH=smooth is not None, HAS_LORA=R > 0, HAS_BIAS=bias is not None, DOT_DTYPE=dot,
        LORA_DOT_DTYPE=lora_dot,
        BLOCK_R=max(16, 1 << max(0, R - 1).bit_length()), **cfg,
    )


def _tma_descriptor(out: torch.Tensor):
    """A host TensorDescriptor of the 2-D `out` (block set per config), or None where TMA cannot address it: a
    base or row stride not a multiple of 16 bytes, or a last dim that is not contiguous."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if tma_alignment_error("out", out):
        return None
    return TensorDescriptor.from_tensor(out, [1, 16 // out.element_size()])  # _set_out_block's non-TMA block


def _launch_effective_weight(w_packed, w_scales, w_gs, smooth, lora_down, lora_up, out, config=None) -> None:
    """The tile config is autotuned on the first call per shape (triton_kernels/nvfp4_gemm.py); `config` (a
    triton.Config of that list) runs one without tuning, for tests."""
    from ..triton_kernels.nvfp4_gemm import _set_out_block, nvfp4_effective_weight_kernel

    N, K = out.shape
    R = lora_down.shape[1] if lora_down is not None else 0
    w_packed, w_scales = _rows(w_packed), _rows(w_scales.view(torch.uint8))
    interp = _backend.triton_interpreter_enabled()
    dot = _tl_dtype(torch.float32 if interp or not R or lora_up.dtype not in HALF_DTYPES else lora_up.dtype)
    down = lora_down.contiguous() if R else out
    up = lora_up.contiguous() if R else out
    out_desc = _tma_descriptor(out)
    args = (w_packed, w_scales, w_gs, smooth.float().contiguous() if smooth is not None else out,
            down, up, out, out_desc, N, K, w_packed.shape[1] * 2, R, w_packed.stride(0), w_scales.stride(0),
            down.stride(0) if R else 0, up.stride(0) if R else 0, out.stride(0))
    meta = dict(HAS_SMOOTH=smooth is not None, HAS_LORA=R > 0, DOT_DTYPE=dot,
                BLOCK_R=max(16, 1 << max(0, R - 1).bit_length()))
    if config is None:
        grid = lambda m: (cdiv(N, m["BLOCK_N"]), cdiv(K, m["BLOCK_K"] * m["K_TILES"]))  # noqa: E731
        nvfp4_effective_weight_kernel[grid](*args, **meta)
    else:
        if config.kwargs["TMA_STORE"] and out_desc is None:
            raise ValueError("a TMA_STORE config needs an output TMA can address (16-byte aligned rows)")
        _set_out_block({"out_desc": out_desc, **config.kwargs})
        grid = (cdiv(N, config.kwargs["BLOCK_N"]), cdiv(K, config.kwargs["BLOCK_K"] * config.kwargs["K_TILES"]))
        nvfp4_effective_weight_kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps)


def _w4a16_effective_weight_cublas(x, w_packed, w_scales, w_gs, smooth, lora_down, lora_up, bias) -> torch.Tensor:
    """Large-M W4A16: the effective weight dequant(W) / smooth + (lora_down @ lora_up)^T, rounded once to x's
    dtype by one Triton pass, then one cuBLAS GEMM with the bias."""
    weight = torch.empty(w_packed.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
    _launch_effective_weight(w_packed, w_scales, w_gs, smooth, lora_down, lora_up, weight)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _cuda_sm120_error(device: torch.device) -> Optional[str]:
    reason = _cext.cuda_device_error(device)
    if reason:
        return reason
    if torch.cuda.get_device_capability(device) != (12, 0):  # _C carries sm_120a code only (no sm_121a)
        return "the native FP4 MMA kernel is built for sm_120 (Blackwell RTX) GPUs only"
    compiled = getattr(_cext._C, "nvfp4_gemm_sm120_compiled", None)
    if compiled is None or not compiled():
        return "_C was not compiled for sm_120a (add 120a to DCGEN_CUDA_ARCHS)"
    return None


# csrc/nvfp4_gemm_sm120.cu launches one block per 128 rows (kBlockM) in the grid's y, at most 65535 of them.
_CUDA_BLOCK_M, _CUDA_GRID_Y_MAX = 128, 65535


def _cuda_case_error(a_packed, lora_up, bias, out_dtype) -> Optional[str]:
    from .._cext import DTYPE_CODES

    K_pad = a_packed.shape[-1] * 2
    if K_pad == 0 or K_pad % 64:
        return f"K_pad = {K_pad} is not a positive multiple of 64 (the MMA's K step)"
    rows = a_packed.numel() // a_packed.shape[-1] if a_packed.shape[-1] else 0
    if cdiv(rows, _CUDA_BLOCK_M) > _CUDA_GRID_Y_MAX:
        return f"M = {rows} rows need more than {_CUDA_GRID_Y_MAX} blocks of {_CUDA_BLOCK_M} in the grid's y"
    if out_dtype not in DTYPE_CODES:
        return f"out_dtype {out_dtype} is not supported"
    for name, t in (("lora_up", lora_up), ("bias", bias)):
        if t is not None and t.dtype != out_dtype:
            return f"{name} must have out_dtype {out_dtype}, got {t.dtype}"
    return None


def _launch_cuda(a_packed, a_scales, a_gs, w_packed, w_scales, w_gs, lora_act, lora_up, bias, out) -> None:
    from .._cext import DTYPE_CODES, _C, stream_handle

    # Every copy is bound to a name: a temporary freed before the launch could be reused by the next allocation.
    a2, as2 = _rows(a_packed).contiguous(), _rows(a_scales.view(torch.uint8)).contiguous()
    w2, ws2 = w_packed.contiguous(), w_scales.view(torch.uint8).contiguous()
    out2 = out.view(-1, out.shape[-1])
    M, N = out2.shape
    R = lora_up.shape[0] if lora_up is not None else 0
    la = _rows(lora_act).float().contiguous() if R else None
    up = lora_up.contiguous() if R else None
    bias = bias.contiguous() if bias is not None else None
    _C.nvfp4_gemm_sm120(
        a2.data_ptr(), as2.data_ptr(), w2.data_ptr(), ws2.data_ptr(), a_gs.data_ptr(), w_gs.data_ptr(),
        la.data_ptr() if R else 0, up.data_ptr() if R else 0, bias.data_ptr() if bias is not None else 0,
        out2.data_ptr(), M, N, a2.shape[1] * 2, R, DTYPE_CODES[out.dtype], stream_handle(out.device))


# ----------------------------------------------------------------------------------------------- custom ops
@custom_op("dcgen::nvfp4_gemm")
def _w4a4_op(
    a_packed: torch.Tensor, a_scales: torch.Tensor, a_global_scale: torch.Tensor, w_packed: torch.Tensor,
    w_scales: torch.Tensor, w_global_scale: torch.Tensor, lora_act: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor], out_dtype: torch.dtype, backend: str,
) -> torch.Tensor:
    chosen = _backend.select(
        "nvfp4_gemm", backend,
        platform_checks={"cuda": lambda: _cuda_sm120_error(a_packed.device),
                         "triton": lambda: _backend.triton_device_error(a_packed.device)},
        case_checks={"cuda": lambda: _cuda_case_error(a_packed, lora_up, bias, out_dtype)},
    )
    if chosen == "reference":
        return nvfp4_gemm_reference(a_packed, a_scales, a_global_scale, w_packed, w_scales, w_global_scale,
                                    lora_act, lora_up, bias, out_dtype)
    out = torch.empty(*a_packed.shape[:-1], w_packed.shape[0], dtype=out_dtype, device=a_packed.device)
    if out.numel():
        if chosen == "cuda":
            _launch_cuda(a_packed, a_scales, a_global_scale, w_packed, w_scales, w_global_scale, lora_act, lora_up,
                         bias, out)
        else:
            _launch_triton(a_packed, a_scales, a_global_scale, w_packed, w_scales, w_global_scale, lora_act,
                           lora_up, bias, out, a_packed.shape[-1] * 2, a_fp4=True)
    return out


@_w4a4_op.register_fake
def _(a_packed, a_scales, a_global_scale, w_packed, w_scales, w_global_scale, lora_act, lora_up, bias, out_dtype,
      backend):
    return a_packed.new_empty(*a_packed.shape[:-1], w_packed.shape[0], dtype=out_dtype)


@custom_op("dcgen::nvfp4_w4a16_gemm")
def _w4a16_op(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, w_global_scale: torch.Tensor,
    smooth: Optional[torch.Tensor], lora_down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], backend: str,
) -> torch.Tensor:
    chosen = _backend.select("nvfp4_w4a16_gemm", backend,
                             platform_checks={"triton": lambda: _backend.triton_device_error(x.device)},
                             case_checks={})
    if chosen == "reference":
        return nvfp4_w4a16_gemm_reference(x, w_packed, w_scales, w_global_scale, smooth, lora_down, lora_up, bias)
    M = x.numel() // max(1, x.shape[-1])
    if x.device.type == "cuda" and M >= W4A16_DEQUANT_MIN_M:
        return _w4a16_effective_weight_cublas(x, w_packed, w_scales, w_global_scale, smooth, lora_down, lora_up,
                                              bias)
    out = torch.empty(*x.shape[:-1], w_packed.shape[0], dtype=x.dtype, device=x.device)
    if out.numel():
        lora_act = (x @ lora_down.to(x.dtype)).float() if lora_down is not None and lora_down.shape[1] else None
        _launch_triton(x, None, None, w_packed, w_scales, w_global_scale, lora_act,
                       lora_up if lora_act is not None else None, bias, out, x.shape[-1], a_fp4=False,
                       smooth=smooth)
    return out


@_w4a16_op.register_fake
def _(x, w_packed, w_scales, w_global_scale, smooth, lora_down, lora_up, bias, backend):
    return x.new_empty(*x.shape[:-1], w_packed.shape[0])


register_inference_only(_w4a4_op, "nvfp4_gemm")
register_inference_only(_w4a16_op, "nvfp4_w4a16_gemm")


# ----------------------------------------------------------------------------------------------- public API
def nvfp4_gemm(a_packed: torch.Tensor, a_scales: torch.Tensor, a_global_scale: Union[float, torch.Tensor],
               w_packed: torch.Tensor, w_scales: torch.Tensor, w_global_scale: Union[float, torch.Tensor], *,
               lora_act: Optional[torch.Tensor] = None, lora_up: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
               backend: str = "auto") -> torch.Tensor:
    """W4A4: NVFP4 activations [..., K_pad/2] x NVFP4 weight [N, K_pad/2] -> [..., N] in out_dtype, fp32
    accumulation, with `lora_act @ lora_up + bias` fused into the epilogue."""
    _backend.check_backend_name(backend)
    _check_packed(a_packed, a_scales)
    _check_weight(w_packed, w_scales, a_packed.device)
    if w_packed.shape[1] != a_packed.shape[-1]:
        raise ValueError(f"w_packed must have {a_packed.shape[-1]} bytes per row (K_pad/2 of a_packed), "
                         f"got shape {tuple(w_packed.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    _check_epilogue(a_packed.shape[:-1], w_packed.shape[0], lora_act, lora_up, bias, a_packed.device)
    return call_op(_w4a4_op, a_packed, a_scales, _as_global_scale(a_global_scale, a_packed.device), w_packed, w_scales,
                   _as_global_scale(w_global_scale, a_packed.device), lora_act, lora_up, bias, out_dtype, backend)


def nvfp4_w4a16_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor,
                     w_global_scale: Union[float, torch.Tensor], *, smooth: Optional[torch.Tensor] = None,
                     lora_down: Optional[torch.Tensor] = None, lora_up: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """W4A16: (x [..., K] / smooth) @ dequant(W)^T + (x @ lora_down) @ lora_up + bias -> [..., N] in x's dtype
    (bf16/fp16/fp32). W: NVFP4 [N, ceil(K/16)*8]; smooth: [K] or None; lora_down [K, R] and lora_up [R, N]
    or None; bias [N] or None."""
    _backend.check_backend_name(backend)
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (K)")
    _check_weight(w_packed, w_scales, x.device)
    K = x.shape[-1]
    if w_packed.shape[1] != -(-K // GROUP_SIZE) * GROUP_SIZE // 2:
        raise ValueError(f"w_packed must have ceil(K/16)*8 = {-(-K // GROUP_SIZE) * GROUP_SIZE // 2} "
                         f"bytes per row for K = {K}, got shape {tuple(w_packed.shape)}")
    _check_lora_down(K, w_packed.shape[0], lora_down, lora_up, bias, x.device)
    if smooth is not None:
        check_tensor("smooth", smooth, shape=(K,), device=x.device)
    if lora_down is not None and lora_down.shape[1] == 0:
        lora_down = lora_up = None
    return call_op(_w4a16_op, x, w_packed, w_scales, _as_global_scale(w_global_scale, x.device), smooth, lora_down,
                   lora_up, bias, backend)
