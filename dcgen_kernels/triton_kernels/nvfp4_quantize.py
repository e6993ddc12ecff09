"""Triton NVFP4 quantize / dequantize kernels, bit-exact to `dcgen_kernels.ops.nvfp4_quantize`'s reference.

Every rounding step is one IEEE fp32 operation in the same order as the reference (`tl.div_rn` for the
divisions, the fp8 cast rounds to nearest even), so the bytes match. The E2M1 rounding is a sum of threshold
comparisons whose strict / non-strict choice sends every tie to the even code.
"""

import triton
import triton.language as tl

GROUP = tl.constexpr(16)


@triton.jit
def e2m1_codes(x, denom):
    """4-bit E2M1 codes of x / denom (denom > 0, or 0 for an all-zero code); the sign bit is x's sign bit."""
    mag = tl.where(denom > 0, tl.div_rn(tl.abs(x), tl.where(denom > 0, denom, 1.0)), 0.0)
    # Grid 0, .5, 1, 1.5, 2, 3, 4, 6: ties at .25 1.25 2.5 5 go down (to codes 0 2 4 6), at .75 1.75 3.5 go up.
    code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
            + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
            + (mag > 5.0).to(tl.int32))
    negative = x.to(tl.int32, bitcast=True) < 0
    return code | tl.where(negative, 8, 0)


@triton.jit
def e2m1_values_over_2_14(code):
    """fp32 values of 4-bit E2M1 codes (int32) times 2**-14, exactly: the 3 magnitude bits placed into an fp16 word
    (e = 0 lands on fp16 subnormals, as E2M1's 0 and 0.5 need). Decoders fold the 2**14 into their group scale."""
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e2m1_values(code):
    """fp32 values of 4-bit E2M1 codes (int32)."""
    return e2m1_values_over_2_14(code) * 16384.0


@triton.jit
def e4m3_round(s):
    """(fp32 value, uint8 bits) of s in [0, 448] rounded to nearest-even E4M3. Spelled out in integer and exact
    fp32 steps instead of a fp8 cast: the interpreter's cast drops the carry when rounding up a binade, and
    pre-Ada GPUs have no fp8 conversion."""
    exponent = ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # below 2**-6: subnormals, fixed quantum 2**-9
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - (exponent - 3)) << 23).to(tl.float32, bitcast=True)
    steps = (s * inv_quantum + 8388608.0) - 8388608.0  # exact scaling by a power of two; + 2**23 rounds to even
    value = steps * quantum
    vbits = value.to(tl.int32, bitcast=True)
    normal_bits = ((((vbits >> 23) & 0xFF) - 127 + 7) << 3) | ((vbits >> 20) & 7)
    bits = tl.where(value >= 0.015625, normal_bits, (value * 512.0).to(tl.int32))
    return value, bits.to(tl.uint8)


@triton.jit
def e4m3_values(bits):
    """fp32 values of unsigned E4M3 scale bytes (sign bit ignored, as by the reference): the 7 low bits shifted
    into an fp16 word give the value times 2**-8 exactly (E4M3 subnormals land on fp16 subnormals); 0x7F / 0xFF
    are NaN."""
    half_bits = (bits.to(tl.int32) & 0x7F) << 7
    value = half_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((bits & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def nvfp4_quantize_kernel(
    x_ptr, smooth_ptr, down_ptr, gscale_ptr, packed_ptr, scales_ptr, lora_ptr,
    M, K, K_PAD, R,
    stride_xm, stride_pm, stride_sm, stride_dk, stride_lm,
    HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows [BLOCK_M] of x [M, K]: packed E2M1 [M, K_PAD/2], E4M3 group scales (as bytes) [M, K_PAD/16] and,
    with HAS_LORA, lora = x @ down [M, R] (fp32) from the same read of x (before smoothing)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    gscale = tl.load(gscale_ptr)
    n_groups: tl.constexpr = BLOCK_K // GROUP
    ranks = tl.arange(0, BLOCK_R)
    lora = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_LORA:
            down = tl.load(down_ptr + cols[:, None] * stride_dk + ranks[None, :],
                           mask=col_ok[:, None] & (ranks[None, :] < R), other=0.0)
            lora = tl.dot(x.to(DOT_DTYPE), down.to(DOT_DTYPE), lora, input_precision="ieee")
        if HAS_SMOOTH:
            x = tl.div_rn(x, tl.load(smooth_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :])
        groups = tl.reshape(x, [BLOCK_M, n_groups, GROUP])
        finite = (groups == groups) & (tl.abs(groups) < float("inf"))
        all_finite = tl.min(finite.to(tl.int32), axis=2) > 0
        amax = tl.max(tl.where(finite, tl.abs(groups), 0.0), axis=2)
        scale, scale_bits = e4m3_round(tl.minimum(tl.div_rn(tl.div_rn(amax, 6.0), gscale), 448.0))
        scale_bits = tl.where(all_finite, scale_bits, 0x7F)  # 0x7F: E4M3 NaN
        denom = tl.where(all_finite, scale * gscale, 0.0)
        codes = e2m1_codes(groups, denom[:, :, None])
        codes = tl.where(all_finite[:, :, None], codes, 0)
        lo, hi = tl.split(tl.reshape(codes, [BLOCK_M, BLOCK_K // 2, 2]))
        bytes_ = (lo | (hi << 4)).to(tl.uint8)
        pcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(packed_ptr + rows64[:, None] * stride_pm + pcols[None, :], bytes_,
                 mask=row_ok[:, None] & (pcols[None, :] < K_PAD // 2))
        gcols = k0 // GROUP + tl.arange(0, n_groups)
        tl.store(scales_ptr + rows64[:, None] * stride_sm + gcols[None, :], scale_bits,
                 mask=row_ok[:, None] & (gcols[None, :] < K_PAD // GROUP))
    if HAS_LORA:
        tl.store(lora_ptr + rows64[:, None] * stride_lm + ranks[None, :], lora,
                 mask=row_ok[:, None] & (ranks[None, :] < R))


@triton.jit
def nvfp4_dequantize_kernel(
    packed_ptr, scales_ptr, gscale_ptr, out_ptr,
    M, K_OUT,
    stride_pm, stride_sm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, k] = e2m1[m, k] * scale[m, k // 16] * global for k < K_OUT (out is [M, K_OUT])."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    pcols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    bytes_ = tl.load(packed_ptr + rows64[:, None] * stride_pm + pcols[None, :],
                     mask=row_ok[:, None] & (pcols[None, :] * 2 < K_OUT), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(bytes_ & 0xF, bytes_ >> 4), [BLOCK_M, BLOCK_K])
    scale = tl.load(scales_ptr + rows64[:, None] * stride_sm + cols[None, :] // GROUP,
                    mask=row_ok[:, None] & (cols[None, :] < K_OUT), other=0)
    scale = e4m3_values(scale)
    values = e2m1_values(codes) * scale * tl.load(gscale_ptr)
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], values.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < K_OUT))
