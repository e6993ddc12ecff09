"""Triton kernels for FP8 (E4M3) W8A8 linears: row-wise activation quantization and the scaled GEMM.

Format: activations carry one fp32 scale per token (row), weights one fp32 scale per output channel, both
amax / 448 (the E4M3 maximum); q = round_to_nearest_even(clamp(v * (448 / amax), -448, 448)).
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._tiling import grouped_tile

# Globals read inside @triton.jit functions must be constexpr (compiled Triton rejects plain globals).
FP8_MAX = tl.constexpr(448.0)
# Smallest row amax used for the scale: an all-zero row then quantizes to zeros with a finite scale.
AMAX_FLOOR = tl.constexpr(1e-12)
GELU_LINEAR = tl.constexpr(-2 * 1.4426950408889634 * 0.7978845608028654)  # -2 log2(e) sqrt(2 / pi)
GELU_CUBIC = tl.constexpr(-2 * 1.4426950408889634 * 0.7978845608028654 * 0.044715)
# The interpreter has no libdevice: there GELU keeps the exactly rounded operations (same formula).
FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), as x / (1 + 2^w), w = -2 log2(e) u: no cancellation
    (1 + tanh(u) cancels for negative u), and 2^w = inf (x below ~ -10) gives the -0 that GELU rounds to.
    On a GPU the power and the division are single approximate MUFU operations (`ex2.approx.ftz`, `__fdividef`: a
    few fp32 ulp, far below the E4M3 or 16-bit rounding that follows), 7 sm_90a instructions per element where
    `tl.exp` / `/` and an overflow-free select took 20 with their range fixups: the GELU + quantize pass was
    issue-bound (H100: 0.097 ms for the FFN's 4608 x 12288 rows, 0.061 ms without GELU). The interpreter evaluates
    the same formula exactly, 2^w taken as inf past w = 126 (without numpy's overflow warning): there the GPU's
    result is +-0 too (ex2 overflows at w >= 128, and __fdividef returns 0 for divisors past 2^126)."""
    w = x * (x * x * GELU_CUBIC + GELU_LINEAR)
    if FAST_MATH:
        power = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [w], dtype=tl.float32,
                                          is_pure=True, pack=1)
        return libdevice.fast_dividef(x, 1.0 + power)
    power = tl.where(w > 126.0, float("inf"), tl.exp2(tl.minimum(w, 126.0)))
    return x / (1.0 + power)


@triton.jit
def round_to_e4m3(v):
    """fp32 v in [-448, 448] -> the nearest E4M3 value (ties to even), still as fp32, so that the cast to fp8 that
    follows is exact. Done by hand for the Triton interpreter, whose fp32 -> fp8 cast rounds wrongly at binade
    boundaries (124.3 -> 64); the GPU kernels use the hardware cast (to_e4m3).
    Normal range (|v| >= 2^-6): round the 23-bit mantissa to 3 bits on the bit pattern. Subnormals: multiples of
    2^-9, by adding and subtracting 1.5 * 2^14 (whose fp32 spacing is 2^-9)."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # v's sign bit OR-ed in, so values that round to zero keep it (-0, as cvt.rn and torch give). Not `-x`: triton
    # 3.6 compiles a float negation as 0 - x, which turns -0 into +0.
    subnormal = tl.abs((v + 24576.0) - 24576.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
    return tl.where(tl.abs(v) < 0.015625, subnormal.to(tl.float32, bitcast=True), normal)


@triton.jit
def to_e4m3(v, NATIVE_CAST: tl.constexpr):
    """fp32 v (any value or NaN) -> float8e4nv: clamped to +-448, rounded to nearest even, NaN kept (the
    reference's clamp, and its inf / inf staying NaN). On the GPU the hardware cast (cvt.rn.satfinite: the clamp
    included, one instruction per two values) instead of the ~15 integer ops of round_to_e4m3 per element: the GELU
    + quantize pass ran at 1.1 TB/s on an H100 (2026-11-27), by estimate compute-bound.
    NATIVE_CAST=False (the interpreter, whose cast is wrong at binade boundaries and at NaN): clamp and
    round_to_e4m3 first, so the cast is exact."""
    if NATIVE_CAST:
        return v.to(tl.float8e4nv)
    v = tl.clamp(v, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    # the interpreter's cast turns NaN into a finite value: E4M3's NaN (0x7f) is written as bits
    nan = tl.full(v.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
    return tl.where(v != v, nan, round_to_e4m3(v).to(tl.float8e4nv))


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_amax(v, floor):
    """max(|v| over each row, floor), NaN where the row has one (tl.max and a plain maximum drop NaN: such a row
    would get a finite scale and a plausible output), as the reference's amax."""
    return tl.maximum(tl.reduce(tl.abs(v), 1, _max_keeping_nan), floor, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_rows(ptr, row_off, cols, tile_ok, GELU: tl.constexpr):
    v = tl.load(ptr + row_off[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if GELU:
        v = gelu_tanh(v)
    return v


@triton.jit
def quantize_fp8_rows_kernel(
    prefix_ptr, x_ptr, q_ptr, scale_ptr,
    n_rows, rows_per_batch, K1, K2,
    prefix_stride_b, prefix_stride_n, x_stride_b, x_stride_n,
    HAS_PREFIX: tl.constexpr, GELU: tl.constexpr, NATIVE_CAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """q[r] = fp8(row r of cat([prefix, act(x)]) * 448 / amax), scale[r] = amax / 448; act = tanh-GELU if GELU.

    Rows r = b * rows_per_batch + n address (batch, token) with their own strides, so strided 3-D views (the
    attention output's image part) need no copy. Two sweeps over the row: amax, then quantize; the second
    re-reads the row from L1/L2 (a program's rows are a few tens of KB).
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    b = rows64 // rows_per_batch
    n = rows64 % rows_per_batch
    x_row = b * x_stride_b + n * x_stride_n
    p_row = b * prefix_stride_b + n * prefix_stride_n
    K = K1 + K2
    q_row = rows64 * K

    amax = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    if HAS_PREFIX:
        for c0 in range(0, K1, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < K1)[None, :]
            amax = row_amax(_load_rows(prefix_ptr, p_row, cols, ok, False), amax)
    for c0 in range(0, K2, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < K2)[None, :]
        amax = row_amax(_load_rows(x_ptr, x_row, cols, ok, GELU), amax)

    amax = tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    inv = tl.div_rn(tl.full([BLOCK_ROWS], FP8_MAX, tl.float32), amax)[:, None]
    tl.store(scale_ptr + rows64, tl.div_rn(amax, tl.full([BLOCK_ROWS], FP8_MAX, tl.float32)), mask=row_ok)

    if HAS_PREFIX:
        for c0 in range(0, K1, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < K1)[None, :]
            v = to_e4m3(_load_rows(prefix_ptr, p_row, cols, ok, False) * inv, NATIVE_CAST)
            tl.store(q_ptr + q_row[:, None] + cols[None, :], v, mask=ok)
    for c0 in range(0, K2, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < K2)[None, :]
        v = to_e4m3(_load_rows(x_ptr, x_row, cols, ok, GELU) * inv, NATIVE_CAST)
        tl.store(q_ptr + q_row[:, None] + K1 + cols[None, :], v, mask=ok)


@triton.jit
def _load_one_pass_chunk(prefix_ptr, x_ptr, p_row, x_row, row_ok, cols, K1, K2, HAS_PREFIX: tl.constexpr,
                         GELU: tl.constexpr):
    """Columns `cols` of the rows [prefix | act(x)], each lane loading from the part it covers (0 past the end)."""
    x_cols = cols - K1
    x_ok = row_ok[:, None] & ((x_cols >= 0) & (x_cols < K2))[None, :]
    v = _load_rows(x_ptr, x_row, x_cols, x_ok, GELU)
    if HAS_PREFIX:
        in_prefix = row_ok[:, None] & (cols < K1)[None, :]
        v = tl.where(in_prefix, _load_rows(prefix_ptr, p_row, cols, in_prefix, False), v)
    return v


@triton.jit
def _store_one_pass_chunk(q_ptr, q_row, row_ok, cols, v, inv, K, NATIVE_CAST: tl.constexpr):
    tl.store(q_ptr + q_row[:, None] + cols[None, :], to_e4m3(v * inv, NATIVE_CAST),
             mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def quantize_fp8_rows_one_pass_kernel(
    prefix_ptr, x_ptr, q_ptr, scale_ptr,
    n_rows, rows_per_batch, K1, K2,
    prefix_stride_b, prefix_stride_n, x_stride_b, x_stride_n,
    HAS_PREFIX: tl.constexpr, GELU: tl.constexpr, NATIVE_CAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """quantize_fp8_rows_kernel for rows that fit in registers (BLOCK_ROWS rows per program: 1 on a GPU, more in
    the interpreter, where each program costs host time): each element is read and (GELU) computed once, where the
    two sweeps over a wide row read it twice (the 12288-wide FFN row: 24 KB).
    A row is held as N_CHUNKS (1-4) power-of-two chunks rather than one power-of-two block, so a 12288-wide row
    takes 3 x 4096 lanes, not 16384 (a quarter of the GELU work was spent on masked lanes)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    b = rows64 // rows_per_batch
    n = rows64 % rows_per_batch
    x_row = b * x_stride_b + n * x_stride_n
    p_row = b * prefix_stride_b + n * prefix_stride_n
    cols = tl.arange(0, CHUNK)
    v0 = _load_one_pass_chunk(prefix_ptr, x_ptr, p_row, x_row, row_ok, cols, K1, K2, HAS_PREFIX, GELU)
    magnitude = tl.abs(v0)  # elementwise max over the chunks, then one reduction per row
    if N_CHUNKS > 1:
        v1 = _load_one_pass_chunk(prefix_ptr, x_ptr, p_row, x_row, row_ok, CHUNK + cols, K1, K2, HAS_PREFIX,
                                  GELU)
        magnitude = _max_keeping_nan(magnitude, tl.abs(v1))
    if N_CHUNKS > 2:
        v2 = _load_one_pass_chunk(prefix_ptr, x_ptr, p_row, x_row, row_ok, 2 * CHUNK + cols, K1, K2, HAS_PREFIX,
                                  GELU)
        magnitude = _max_keeping_nan(magnitude, tl.abs(v2))
    if N_CHUNKS > 3:
        v3 = _load_one_pass_chunk(prefix_ptr, x_ptr, p_row, x_row, row_ok, 3 * CHUNK + cols, K1, K2, HAS_PREFIX,
                                  GELU)
        magnitude = _max_keeping_nan(magnitude, tl.abs(v3))
    amax = row_amax(magnitude, AMAX_FLOOR)
    inv = tl.div_rn(tl.full([BLOCK_ROWS], FP8_MAX, tl.float32), amax)[:, None]
    tl.store(scale_ptr + rows64, tl.div_rn(amax, tl.full([BLOCK_ROWS], FP8_MAX, tl.float32)), mask=row_ok)
    K = K1 + K2
    q_row = rows64 * K
    _store_one_pass_chunk(q_ptr, q_row, row_ok, cols, v0, inv, K, NATIVE_CAST)
    if N_CHUNKS > 1:
        _store_one_pass_chunk(q_ptr, q_row, row_ok, CHUNK + cols, v1, inv, K, NATIVE_CAST)
    if N_CHUNKS > 2:
        _store_one_pass_chunk(q_ptr, q_row, row_ok, 2 * CHUNK + cols, v2, inv, K, NATIVE_CAST)
    if N_CHUNKS > 3:
        _store_one_pass_chunk(q_ptr, q_row, row_ok, 3 * CHUNK + cols, v3, inv, K, NATIVE_CAST)


@triton.jit
def fp8_linear_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, gate_ptr, residual_ptr, out_ptr,
    M, N, K, rows_per_batch,
    stride_am, stride_wn, gate_stride_b, residual_stride_b, residual_stride_n, stride_om,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = residual + gate * act((a_q @ w_q^T) * a_scale * w_scale + bias), each term optional.

    a_q: (M, K) fp8 rows, a_scale (M,) fp32; w_q: (N, K) fp8 as nn.Linear stores it, w_scale (N,) fp32.
    fp8 tensor-core dot with fp32 accumulation; the whole epilogue runs in fp32 and rounds once. Row m belongs to
    batch m // rows_per_batch (gate is per (batch, channel), residual addressed by (batch, token) strides).
    Programs are grouped GROUP_M tiles down M so neighbouring programs share weight tiles in L2.
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    a_rows = a_ptr + rows64[:, None] * stride_am
    w_cols = w_ptr + cols64[None, :] * stride_wn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a, w, acc)

    a_scale = tl.load(a_scale_ptr + rows64, mask=row_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols64, mask=col_ok, other=0.0)
    y = acc * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = gelu_tanh(y)
    batch = rows64 // rows_per_batch
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_GATE:
        gate_off = batch[:, None] * gate_stride_b + cols64[None, :]
        y *= tl.load(gate_ptr + gate_off, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        token = rows64 % rows_per_batch
        res_off = batch[:, None] * residual_stride_b + token[:, None] * residual_stride_n + cols64[None, :]
        y += tl.load(residual_ptr + res_off, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :], y.to(out_ptr.dtype.element_ty), mask=tile_ok)
