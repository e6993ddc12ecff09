"""Triton kernels for adaLN modulation and the gated residual add (memory-bound: one read, one write).

`ada_layer_norm_modulate_kernel` can also emit FP8 E4M3 rows with one fp32 scale per row (QUANT_FP8): the row is
already in registers, so the amax costs no extra memory traffic and the output is half the bytes. It can also form
its input as a gated residual sum first (HAS_UPDATE), storing that sum too: a DiT block's residual add followed by
its next adaLN in one pass, without reading the sum back.

Tensors are addressed as (batch, row, channel) with the channel stride 1; the per-(batch, channel) modulation
vectors (scale, shift, gate) have a batch stride that is 0 when they broadcast over the batch. Each program
covers BLOCK_ROWS rows of one batch element, so it loads the modulation vectors once for all of them.
"""

import triton
import triton.language as tl

from .fp8_linear import row_amax, to_e4m3


@triton.jit
def ada_layer_norm_modulate_kernel(
    x_ptr, update_ptr, gate_ptr, sum_ptr, scale_ptr, shift_ptr, weight_ptr, bias_ptr, out_ptr, row_scale_ptr,
    N, C,
    x_stride_b, x_stride_n, update_stride_b, update_stride_n, gate_stride_b, sum_stride_b, sum_stride_n,
    scale_stride_b, shift_stride_b, out_stride_b, out_stride_n,
    eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_UPDATE: tl.constexpr = False, HAS_GATE: tl.constexpr = False, QUANT_FP8: tl.constexpr = False,
    NATIVE_CAST: tl.constexpr = True,
):
    """out = LayerNorm(x) (optionally * weight + bias) * (1 + scale) + shift; statistics in fp32.

    The whole row sits in registers (BLOCK_C = next power of two >= C, masked), so the two-pass mean/variance
    costs no second read of memory. QUANT_FP8: out is fp8 E4M3 with y * (448 / amax) rounded to nearest even,
    and row_scale[b * N + row] = amax / 448 (fp32), the arithmetic of the quantize_fp8 op (NATIVE_CAST: see
    fp8_linear.to_e4m3). HAS_UPDATE: the row normalised is sum = x + gate * update (gate per (batch, channel) when
    HAS_GATE, else 1) in fp32, rounded to sum's dtype and stored; the statistics are taken of that rounded row, so
    the pair equals gated_residual_kernel followed by this kernel on its output (bit for bit in the interpreter;
    on an H100 a few outputs in 10^5 differed in rounding at C = 2232, see tests).
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    tile_ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x_off = b * x_stride_b + rows64[:, None] * x_stride_n + cols[None, :]
    x = tl.load(x_ptr + x_off, mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if HAS_UPDATE:
        update = tl.load(update_ptr + b * update_stride_b + rows64[:, None] * update_stride_n + cols[None, :],
                         mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if HAS_GATE:
            gate = tl.load(gate_ptr + b * gate_stride_b + cols, mask=col_ok, other=0.0).to(tl.float32)
            total = (x + gate[None, :] * update).to(sum_ptr.dtype.element_ty)
        else:
            total = (x + update).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + b * sum_stride_b + rows64[:, None] * sum_stride_n + cols[None, :], total, mask=tile_ok)
        x = total.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(tile_ok, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    y = centred * tl.rsqrt(var + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    scale = tl.load(scale_ptr + b * scale_stride_b + cols, mask=col_ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * shift_stride_b + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = y * (1.0 + scale)[None, :] + shift[None, :]

    out_off = b * out_stride_b + rows64[:, None] * out_stride_n + cols[None, :]
    if QUANT_FP8:
        amax = row_amax(tl.where(tile_ok, y, 0.0), 1e-12)
        fp8_max = tl.full([BLOCK_ROWS], 448.0, tl.float32)
        tl.store(row_scale_ptr + b * N + rows64, tl.div_rn(amax, fp8_max), mask=row_ok)
        y = to_e4m3(y * tl.div_rn(fp8_max, amax)[:, None], NATIVE_CAST)
        tl.store(out_ptr + out_off, y, mask=tile_ok)
    else:
        tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def gated_residual_kernel(
    residual_ptr, gate_ptr, x_ptr, out_ptr,
    N, C,
    residual_stride_b, residual_stride_n, gate_stride_b, x_stride_b, x_stride_n, out_stride_b, out_stride_n,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = residual + gate * x in fp32, one rounding to the output dtype. Grid: (row blocks, channel blocks, B)."""
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    tile_ok = (rows < N)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    gate = tl.load(gate_ptr + b * gate_stride_b + cols, mask=col_ok, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + b * residual_stride_b + rows64 * residual_stride_n + cols[None, :],
                       mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
    x = tl.load(x_ptr + b * x_stride_b + rows64 * x_stride_n + cols[None, :],
                mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
    out = residual + gate[None, :] * x
    tl.store(out_ptr + b * out_stride_b + rows64 * out_stride_n + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=tile_ok)
