"""Ops `quantize_fp8` and `fp8_linear`: FP8 (E4M3) W8A8 linears with row-wise scales and fused epilogues.

Format (chosen for the GEMM core it feeds): one fp32 scale per token for activations and one per output channel
for weights, both amax / 448, values rounded to nearest even after clamping to +-448. These are exactly the
row-wise scales of torch's FP8 GEMM (`torch._scaled_mm` with (M, 1) and (1, N) scales), so the `cuda` backend of
`fp8_linear` is that GEMM, with fast accumulation (tensor-core partial sums not promoted to fp32 every few K
steps): on an H100 (2026-11-27) 1.76-1.89x cuBLAS bf16 at the FLUX shapes (M = 4608, K up to 15360) against
1.37-1.46x without, at the same rel-L2 against the fp32 linear (3.7e-2: the E4M3 rounding of both operands
dominates the accumulation error). Block
scales (1x128) would let a GEMM epilogue quantize its own output tile, but that epilogue would have to be our
Triton GEMM (cuBLAS has no such epilogue; torch's 1x128 `_scaled_mm` on sm_90 only consumes block scales), which
ran at ~1030 TFLOP/s against cuBLAS's ~1440 at these shapes: slower by about what the separate pass costs.
Row-wise scales need the whole row's amax, so quantization lives in the kernels that see whole rows:
- `quantize_fp8`: one read of (B, S, K) rows (strided views read in place; rows wider than 16384 are read twice:
  amax, then quantize), optionally with tanh-GELU applied on the fly (the FFN's second linear: GELU and
  quantization in the pass stock spends on GELU alone) and optionally preceded by a prefix tensor (FLUX single
  blocks' cat([attention, GELU(mlp)]) without the cat);
- `ada_layer_norm_modulate_fp8` (ops/ada_layer_norm.py): adaLN-modulate emitting fp8 rows + scales, so Q/K/V
  (and the single blocks' MLP) share one quantized input.
The attention output is quantized by `quantize_fp8` (a row spans all heads, which separate attention programs
write; fusing would need a cross-program amax).

`fp8_linear` backends: `cuda` = torch._scaled_mm's row-wise FP8 GEMM (sm_90+, bf16 output, K and N multiples of 16,
fast accumulation) with
bias in the GEMM and GELU / gate / residual as one extra elementwise pass; `triton` = an fp8 tl.dot kernel with
the whole epilogue fused (the portable path, exact under the interpreter); `reference` = fp32 dequantize-matmul.
Quantized tensors carry no autograd: these ops are for inference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import _backend
from ._common import FLOAT_DTYPES, call_op, cdiv, check_tensor, custom_op, register_inference_only
from .ada_layer_norm import _batch_stride, gated_residual

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "FP8Activation", "quantize_fp8", "quantize_fp8_reference", "quantize_weight_fp8",
    "fp8_linear", "fp8_linear_reference", "dequantize_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12  # as the Triton kernel: an all-zero row gets a finite scale
ACTIVATIONS = (None, "gelu_tanh")


@dataclasses.dataclass
class FP8Activation:
    """Activations already quantized by their producer: data (..., K) fp8 E4M3 (contiguous), scale (...) fp32 per
    row, and the 16-bit dtype they stand for (the dtype of the linear's output)."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.data, self.scale).to(self.dtype)


# ----------------------------------------------------------------------------------------------- reference
def _quantize_rows(v: torch.Tensor):
    """fp32 rows -> (fp8 rows, fp32 scale per row), the arithmetic of the kernels (448 / amax, then multiply)."""
    amax = v.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    # Tensor / tensor divisions: torch computes `448 / amax` as reciprocal(amax) * 448 and, on CUDA, `amax / 448` as
    # amax * (1 / 448); neither is the correctly rounded quotient the kernels compute.
    fp8_max = torch.full_like(amax, FP8_MAX)
    q = (v * (fp8_max / amax)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, amax / fp8_max


def _gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), in float64 as x * sigmoid(2u) (the same
    function): F.gelu's 1 + tanh(u) cancels for negative u even in float64 (relative error 6e-6 at x = -6.2, 1.0 at
    -7.2, 0 returned by -8), where the sigmoid has none (1e-15 there). Returns fp32."""
    v = x.double()
    return (v * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))).float()


def quantize_fp8_reference(x: torch.Tensor, prefix: Optional[torch.Tensor] = None, gelu: bool = False):
    """Rows of cat([prefix, gelu_tanh(x) if gelu else x], -1) -> (fp8 data, fp32 scale per row), in fp32."""
    v = _gelu_tanh_reference(x) if gelu else x.float()
    if prefix is not None:
        v = torch.cat([prefix.float(), v], dim=-1)
    return _quantize_rows(v)


def quantize_weight_fp8(weight: torch.Tensor):
    """(N, K) weight -> (fp8 (N, K) contiguous, fp32 (N,) scale per output channel). Offline, plain torch."""
    q, scale = _quantize_rows(weight.detach().float())
    return q.contiguous(), scale.contiguous()


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 rows times their per-row scale, in fp32."""
    return data.float() * scale.float()[..., None]


def fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias=None, gate=None, residual=None, gelu: bool = False,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """residual + gate * act(dequant(x) @ dequant(w)^T + bias) in fp32, rounded once to out_dtype."""
    y = dequantize_fp8(x_q, x_scale) @ dequantize_fp8(w_q, w_scale).T
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = _gelu_tanh_reference(y)
    if gate is not None:
        y = y * (gate[:, None, :] if gate.dim() == 2 else gate).float()
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------- validation
def _validate_quantize(x, prefix) -> None:
    check_tensor("x", x, last_dim_contiguous=True)
    if x.dim() not in (2, 3) or x.shape[-1] == 0:
        raise ValueError(f"x must be (M, K) or (B, S, K) with K > 0, got shape {tuple(x.shape)}")
    if prefix is not None:
        check_tensor("prefix", prefix, ndim=x.dim(), device=x.device, last_dim_contiguous=True)
        if prefix.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"prefix must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(prefix.shape)}")


def _validate_linear(x: FP8Activation, w_q, w_scale, bias, gate, residual) -> None:
    check_tensor("x.data", x.data, dtypes=(FP8_DTYPE,))
    if x.data.dim() not in (2, 3) or not x.data.is_contiguous():
        raise ValueError(f"x.data must be a contiguous (M, K) or (B, S, K) tensor, got shape {tuple(x.data.shape)}")
    check_tensor("x.scale", x.scale, shape=x.data.shape[:-1], dtypes=(torch.float32,), device=x.device)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x.dtype (the output dtype) must be one of {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
    check_tensor("weight", w_q, ndim=2, dtypes=(FP8_DTYPE,), device=x.device)
    if not w_q.is_contiguous():
        raise ValueError("weight must be contiguous (N, K)")
    N, K = w_q.shape
    if x.data.shape[-1] != K:
        raise ValueError(f"weight must have shape (N, K = {x.data.shape[-1]}), got {tuple(w_q.shape)}")
    if K == 0:
        raise ValueError("x.data and weight must have K >= 1 input features, got K = 0")
    check_tensor("weight_scale", w_scale, shape=(N,), dtypes=(torch.float32,), device=x.device)
    if bias is not None:
        check_tensor("bias", bias, shape=(N,), device=x.device)
    out_shape = x.data.shape[:-1] + (N,)
    if gate is not None:
        if x.data.dim() != 3:
            raise ValueError("gate needs (B, S, K) activations (it is per batch element and channel)")
        B, N = out_shape[0], out_shape[-1]
        check_tensor("gate", gate, device=x.device, last_dim_contiguous=True)
        if not (gate.dim() in (2, 3) and gate.shape[0] in (1, B) and gate.shape[-1] == N
                and (gate.dim() == 2 or gate.shape[1] == 1)):
            raise ValueError(f"gate must have shape (B, N), (B, 1, N), (1, N) or (1, 1, N) with B = {B}, N = {N}, "
                             f"got {tuple(gate.shape)}")
    if residual is not None:
        check_tensor("residual", residual, shape=out_shape, device=x.device, last_dim_contiguous=True)


# ----------------------------------------------------------------------------------------------- launchers
# Rows of up to this width (prefix + x) are quantized in one read, the row in registers (16 warps hold 16384 fp32
# values in 32 registers per thread); wider rows take two sweeps (amax, then quantize). The interpreter takes a
# narrow limit so the tests cover both kernels.
ONE_PASS_MAX_WIDTH = 16384
ONE_PASS_MAX_WIDTH_INTERPRETER = 128


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _one_pass_config(width: int) -> Optional[dict]:
    if width > (ONE_PASS_MAX_WIDTH_INTERPRETER if _backend.triton_interpreter_enabled() else ONE_PASS_MAX_WIDTH):
        return None
    # Up to 4 power-of-two chunks: 12288 = 3 x 4096 lanes, FLUX's 15360-wide [attention | GELU(MLP)] row 4 x 4096,
    # 3072 = 3 x 1024 (one block would be 16384 / 16384 / 4096 lanes). ~24-32 values per thread: 4 warps up to
    # 4096 lanes, 16 for the FFN rows.
    # The interpreter runs 16 rows per program (its cost is per program); a GPU one (tens of KB in flight per SM).
    chunk = _next_pow2(cdiv(width, 4))
    n_chunks = cdiv(width, chunk)
    return dict(BLOCK_ROWS=16 if _backend.triton_interpreter_enabled() else 1, CHUNK=chunk, N_CHUNKS=n_chunks,
                num_warps=max(4, min(16, _next_pow2(chunk * n_chunks) // 1024)))


def _quantize_config(width: int) -> dict:
    if _backend.triton_interpreter_enabled():  # few programs; narrow chunks so tests cover the column loop
        return dict(BLOCK_ROWS=16, BLOCK_C=64, num_warps=4)
    return dict(BLOCK_ROWS=4, BLOCK_C=min(1024, 1 << (width - 1).bit_length()), num_warps=4)


def _rows_view(t: torch.Tensor):
    """(rows per batch, batch stride, row stride) of a 2-D or 3-D tensor."""
    if t.dim() == 2:
        return t.shape[0], 0, t.stride(0)
    return t.shape[1], t.stride(0), t.stride(1)


def _launch_quantize(x, prefix, gelu, q, scale) -> None:
    from ..triton_kernels.fp8_linear import quantize_fp8_rows_kernel, quantize_fp8_rows_one_pass_kernel

    n_rows = q.numel() // q.shape[-1]
    rows_per_batch, x_sb, x_sn = _rows_view(x)
    _, p_sb, p_sn = _rows_view(prefix) if prefix is not None else (0, 0, 0)
    k1 = q.shape[-1] - x.shape[-1]
    one_pass = _one_pass_config(q.shape[-1])
    if one_pass is not None:
        quantize_fp8_rows_one_pass_kernel[(cdiv(n_rows, one_pass["BLOCK_ROWS"]),)](
            prefix if prefix is not None else x, x, q, scale,
            n_rows, max(rows_per_batch, 1), k1, x.shape[-1],
            p_sb, p_sn, x_sb, x_sn,
            HAS_PREFIX=prefix is not None, GELU=gelu, NATIVE_CAST=not _backend.triton_interpreter_enabled(),
            **one_pass,
        )
        return
    cfg = _quantize_config(q.shape[-1])
    quantize_fp8_rows_kernel[(cdiv(n_rows, cfg["BLOCK_ROWS"]),)](
        prefix if prefix is not None else x, x, q, scale,
        n_rows, max(rows_per_batch, 1), q.shape[-1] - x.shape[-1], x.shape[-1],
        p_sb, p_sn, x_sb, x_sn,
        HAS_PREFIX=prefix is not None, GELU=gelu, NATIVE_CAST=not _backend.triton_interpreter_enabled(), **cfg,
    )


def _gemm_config() -> dict:
    if _backend.triton_interpreter_enabled():  # small tiles: tests cover partial M/N/K blocks and grouping
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    # Unmeasured starting point for sm_90 (fp8 wgmma): 128x128 tiles, K steps of 128, 4-stage pipeline (128 KB smem).
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)


def _launch_linear_triton(x_q, x_scale, w_q, w_scale, bias, gate, residual, gelu, out) -> None:
    from ..triton_kernels.fp8_linear import fp8_linear_kernel

    N, K = w_q.shape
    M = x_q.numel() // K
    rows_per_batch = x_q.shape[1] if x_q.dim() == 3 else M
    _, res_sb, res_sn = _rows_view(residual) if residual is not None else (0, 0, 0)
    cfg = _gemm_config()
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    # The kernel indexes scales and bias with unit stride; the validation allows any strides (no-op copies usually).
    x_scale, w_scale = x_scale.contiguous(), w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    fp8_linear_kernel[grid](
        x_q, x_scale, w_q, w_scale,
        bias if bias is not None else w_scale, gate if gate is not None else w_scale,
        residual if residual is not None else out, out,
        M, N, K, max(rows_per_batch, 1),
        K, K, _batch_stride(gate) if gate is not None else 0, res_sb, res_sn, N,
        HAS_BIAS=bias is not None, GELU=gelu, HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, **cfg,
    )


def _linear_cublas(x_q, x_scale, w_q, w_scale, bias, gate, residual, gelu, out_dtype) -> torch.Tensor:
    """torch._scaled_mm's row-wise scaled FP8 GEMM with the bias inside; the rest of the epilogue as one more pass."""
    K = w_q.shape[1]
    # Row-wise scaling: scale_a (M, 1) and scale_b (1, N) fp32, both contiguous; mat2 column-major (w_q.T).
    y = torch._scaled_mm(x_q.reshape(-1, K), w_q.T, scale_a=x_scale.reshape(-1, 1).contiguous(),
                         scale_b=w_scale.reshape(1, -1).contiguous(),
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype, use_fast_accum=True)
    y = y.reshape(x_q.shape[:-1] + (w_q.shape[0],))
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if residual is not None and gate is not None:
        y = gated_residual(residual, gate, y)
    elif residual is not None:
        y = residual + y
    elif gate is not None:
        y = y * (gate[:, None, :] if gate.dim() == 2 else gate)
    return y.to(out_dtype)  # a residual or gate of another dtype promotes; the op returns out_dtype


def _triton_platform_error(device: torch.device) -> Optional[str]:
    reason = _backend.triton_device_error(device)
    if reason is None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "fp8 tl.dot needs compute capability >= 8.9"
    return reason


def _cublas_platform_error(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"torch._scaled_mm needs a CUDA tensor, got device {device}"
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "row-wise scaled torch._scaled_mm needs compute capability >= 9.0"
    return None


def _cublas_case_error(x_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> Optional[str]:
    N, K = w_q.shape
    if out_dtype != torch.bfloat16:
        return f"row-wise scaled torch._scaled_mm writes bf16 only, the output dtype is {out_dtype}"
    if K % 16 or N % 16:
        return f"torch._scaled_mm needs K and N multiples of 16, got K={K}, N={N}"
    if x_q.data_ptr() % 16 or w_q.data_ptr() % 16:
        return "torch._scaled_mm needs 16-byte aligned operands"
    return None


def select_quantize_backend(x: torch.Tensor, backend: str) -> str:
    return _backend.select("quantize_fp8", backend,
                           platform_checks={"triton": lambda: _triton_platform_error(x.device)}, case_checks={})


def select_linear_backend(x_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype, backend: str) -> str:
    return _backend.select(
        "fp8_linear", backend,
        platform_checks={"cuda": lambda: _cublas_platform_error(x_q.device),
                         "triton": lambda: _triton_platform_error(x_q.device)},
        case_checks={"cuda": lambda: _cublas_case_error(x_q, w_q, out_dtype)},
    )


# ----------------------------------------------------------------------------------------------- custom ops
@custom_op("dcgen::quantize_fp8")
def _quantize_fp8_op(x: torch.Tensor, prefix: Optional[torch.Tensor], gelu: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = select_quantize_backend(x, backend)
    if chosen == "reference":
        q, scale = quantize_fp8_reference(x, prefix, gelu)
        return q.contiguous(), scale.contiguous()
    width = x.shape[-1] + (prefix.shape[-1] if prefix is not None else 0)
    q = torch.empty(x.shape[:-1] + (width,), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel():
        _launch_quantize(x, prefix, gelu, q, scale)
    return q, scale


@_quantize_fp8_op.register_fake
def _(x, prefix, gelu, backend):
    width = x.shape[-1] + (prefix.shape[-1] if prefix is not None else 0)
    return (x.new_empty(x.shape[:-1] + (width,), dtype=FP8_DTYPE),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


register_inference_only(_quantize_fp8_op, "quantize_fp8")


@custom_op("dcgen::fp8_linear")
def _fp8_linear_op(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
    gate: Optional[torch.Tensor], residual: Optional[torch.Tensor], gelu: bool, out_dtype: torch.dtype, backend: str,
) -> torch.Tensor:
    chosen = select_linear_backend(x_q, w_q, out_dtype, backend)
    if not x_q.numel() or not w_q.shape[0]:
        return x_q.new_zeros(x_q.shape[:-1] + (w_q.shape[0],), dtype=out_dtype)  # M = 0 or N = 0: empty
    if chosen == "reference":
        return fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, gate, residual, gelu, out_dtype)
    if chosen == "cuda":
        return _linear_cublas(x_q, x_scale, w_q, w_scale, bias, gate, residual, gelu, out_dtype)
    out = torch.empty(x_q.shape[:-1] + (w_q.shape[0],), dtype=out_dtype, device=x_q.device)
    _launch_linear_triton(x_q, x_scale, w_q, w_scale, bias, gate, residual, gelu, out)
    return out


@_fp8_linear_op.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, gate, residual, gelu, out_dtype, backend):
    return x_q.new_empty(x_q.shape[:-1] + (w_q.shape[0],), dtype=out_dtype)


register_inference_only(_fp8_linear_op, "fp8_linear")


# ----------------------------------------------------------------------------------------------- public API
def quantize_fp8(x: torch.Tensor, *, prefix: Optional[torch.Tensor] = None, gelu: bool = False,
                 backend: str = "auto") -> FP8Activation:
    """Quantize rows to FP8 E4M3 with one fp32 scale per row, in one pass.

    x: (M, K) or (B, S, K) fp32/bf16/fp16, channel stride 1, any row/batch strides.
    gelu: apply tanh-GELU to x first (computed in fp32). prefix: optional (..., K1) tensor of x's leading shape
    placed before x, i.e. the rows of cat([prefix, act(x)], -1) are quantized without materialising the cat.
    Returns an FP8Activation with contiguous data (..., K1 + K) and scale (...), standing for x's dtype.
    """
    _backend.check_backend_name(backend)
    _validate_quantize(x, prefix)
    data, scale = call_op(_quantize_fp8_op, x, prefix, bool(gelu), backend)
    return FP8Activation(data, scale, x.dtype)


def fp8_linear(
    x: Union[torch.Tensor, FP8Activation],
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    gate: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """residual + gate * activation(x @ W^T + bias) with FP8 operands and an fp32 accumulator.

    x: a 16-bit/fp32 tensor (M, K) or (B, S, K), quantized here with `quantize_fp8`, or an FP8Activation from a
    producer. weight: (N, K) float8_e4m3fn contiguous; weight_scale: (N,) fp32 (see `quantize_weight_fp8`).
    bias: (N,) or None. activation: None or "gelu_tanh". gate: (B, N) or (B, 1, N) per batch element and channel
    (needs 3-D x). residual: (..., N) like the output, channel stride 1. Returns (..., N) in x's dtype.
    """
    _backend.check_backend_name(backend)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(x, FP8Activation):
        x = quantize_fp8(x, backend="triton" if backend == "cuda" else backend)
    _validate_linear(x, weight, weight_scale, bias, gate, residual)
    return call_op(_fp8_linear_op, x.data, x.scale, weight, weight_scale, bias, gate, residual,
                   activation == "gelu_tanh", x.dtype, backend)
