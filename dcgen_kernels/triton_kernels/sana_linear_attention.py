"""Triton kernels for SANA's ReLU linear attention: out = ReLU(Q)·KᵀV / (ReLU(Q)·ΣK + eps), per (batch, head).

Two passes, both indexed by (B, H, N, D) strides so the token-major (B, N, H*D) layout of SANA and the
channel-first (B, H, D, N) layout of DC-AE share them:
1. `linear_attention_kv_kernel`: each program reduces one slice of the tokens of one (b, h) to a partial fp32
   D×D matrix ReLU(K)ᵀV and a partial D-vector ΣReLU(K), written to its own workspace slot.
2. `linear_attention_out_kernel`: each program sums the partials of its (b, h) in a fixed order (so results are
   bitwise run-to-run deterministic, unlike atomics into one accumulator), then streams its slice of Q.
The head dim is padded to a power of two (>= 16, the tl.dot minimum) with masks; padded lanes load as zeros.
Each pass is autotuned on its first call per shape and layout over the token tile and the number of programs
(the grid); the output pass reads how many partials the K pass wrote from its launch.
"""

import os

import triton
import triton.language as tl


def _configs(block: str, tiles):
    """(token tile, programs per SM: the grid, warps) triples to time per (N, H, D, token stride). The interpreter
    takes one config with small tiles (PROGRAMS_PER_SM 0: two slices per (b, h), see the launcher), so the test
    shapes cover several slices, several tiles per slice and partial tiles."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({block: 16, "PROGRAMS_PER_SM": 0}, num_warps=4, num_stages=1)]
    return [triton.Config({block: size, "PROGRAMS_PER_SM": per_sm}, num_warps=warps, num_stages=3)
            for size, per_sm, warps in tiles]


# H100 run H (benchmarks/PERF_NOTES.md) tuned each pass over 8 pairs (tiles 32-128, 1-8 programs per SM, 4 warps);
# the first two of each list won at SANA's 16384 tokens (token-major) and DC-AE's 16384 and 65536 (channel-first);
# 4096 and 262144 tokens picked others ((64, 8), (128, 4) / (64, 8)). The old fixed (64, 4) for both: 75% of the
# copy rate at SANA's 16384 tokens; tuned: 77%. Run J's ncu of the winners: ~2 warps per scheduler, 0.4 of them
# eligible per cycle, DRAM 68-72% busy: latency-bound with too few warps, and more programs (more, shorter slices)
# did not help in run H. Runs L and N timed the winners' grids with 8 warps per program: the output pass took it at
# SANA's and DC-AE's 16384 tokens (run L) and DC-AE's 65536 (run N), the K pass nowhere (dropped).
# Few configs per pass keep the first call's tuning short (each config is one compile).
KV_TILES = ((64, 2, 4), (64, 4, 4))
OUT_TILES = ((64, 4, 4), (128, 2, 4), (128, 2, 8))


@triton.jit
def _tile_offsets(n, d, stride_n, stride_d):
    return n.to(tl.int64)[:, None] * stride_n + d[None, :] * stride_d


@triton.jit
def _tile_mask(n, end, d, HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr):
    """Rows before `end`; the head-dim mask only when D is padded, so an unpadded tile keeps a mask that is
    constant along D and its loads stay vectorised."""
    mask = (n < end)[:, None]
    if HEAD_DIM < PADDED_DIM:
        mask = mask & (d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def split_bf16(x, PART_DTYPE: tl.constexpr):
    """x (fp32) ≈ hi + lo with hi, lo bf16 values: 16 significant bits (~2^-17 relative), far below the
    bf16/fp16 output rounding, at the cost of one more tensor-core dot. PART_DTYPE is bfloat16 on a GPU; under the interpreter (whose
    bf16 dots are wrong) float32, holding the same bf16 values."""
    hi = x.to(tl.bfloat16).to(tl.float32)
    lo = (x - hi).to(tl.bfloat16)
    return hi.to(PART_DTYPE), lo.to(PART_DTYPE)


@triton.jit
def _tokens_per_program(N, BLOCK: tl.constexpr):
    """Tokens per slice of the grid's dim 1, whole tiles: the inverse of the launcher's `_slices`."""
    return tl.cdiv(tl.cdiv(N, BLOCK), tl.num_programs(1)) * BLOCK


@triton.autotune(configs=_configs("BLOCK_N", KV_TILES), key=["N", "H", "HEAD_DIM", "k_stride_n"])
@triton.jit
def linear_attention_kv_kernel(
    k_ptr, v_ptr, kv_part_ptr, ksum_part_ptr,
    N, H,
    k_stride_b, k_stride_h, k_stride_n, k_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    """Grid (B*H, slices). Writes kv_part[bh, s] = ReLU(K_s)ᵀ V_s and ksum_part[bh, s] = Σ ReLU(K_s).
    PROGRAMS_PER_SM only shapes the grid (the launcher reads it from the config).

    DOT_DTYPE is the input dtype for bf16/fp16 (products of 16-bit floats are exact in the fp32 tensor-core
    accumulator, so this equals the fp32 reference up to summation order) and float32 otherwise, with
    FP32_PRECISION "tf32x3" (three TF32 tensor-core products, ~fp32 accuracy) or "ieee" (FMA units).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, PADDED_DIM)
    k_base = k_ptr + b.to(tl.int64) * k_stride_b + h.to(tl.int64) * k_stride_h
    v_base = v_ptr + b.to(tl.int64) * v_stride_b + h.to(tl.int64) * v_stride_h
    tokens_per_program = _tokens_per_program(N, BLOCK_N)
    start = split * tokens_per_program
    end = tl.minimum(start + tokens_per_program, N)

    kv = tl.zeros([PADDED_DIM, PADDED_DIM], dtype=tl.float32)
    # Summed row-wise once after the loop: cheaper than a cross-thread reduction per tile.
    ksum_rows = tl.zeros([BLOCK_N, PADDED_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = _tile_mask(n, end, d, HEAD_DIM, PADDED_DIM)
        k = tl.load(k_base + _tile_offsets(n, d, k_stride_n, k_stride_d), mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + _tile_offsets(n, d, v_stride_n, v_stride_d), mask=mask, other=0.0).to(tl.float32)
        k = tl.maximum(k, 0.0)
        ksum_rows += k
        kv = tl.dot(tl.trans(k.to(DOT_DTYPE)), v.to(DOT_DTYPE), kv, input_precision=FP32_PRECISION)

    part = bh.to(tl.int64) * tl.num_programs(1) + split
    tl.store(kv_part_ptr + part * PADDED_DIM * PADDED_DIM + d[:, None] * PADDED_DIM + d[None, :], kv)
    tl.store(ksum_part_ptr + part * PADDED_DIM + d, tl.sum(ksum_rows, axis=0))


@triton.autotune(configs=_configs("BLOCK_M", OUT_TILES), key=["N", "H", "HEAD_DIM", "q_stride_n"])
@triton.jit
def linear_attention_out_kernel(
    q_ptr, kv_part_ptr, ksum_part_ptr, out_ptr,
    N, H, n_kv_parts, eps,
    q_stride_b, q_stride_h, q_stride_n, q_stride_d,
    o_stride_b, o_stride_h, o_stride_n, o_stride_d,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr,
    SPLIT_KV: tl.constexpr, SPLIT_Q: tl.constexpr, PART_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    """Grid (B*H, slices), its own slicing of the tokens. out = ReLU(Q)·KV / (ReLU(Q)·ksum + eps) for this
    program's slice, KV and ksum the sums of the K pass's n_kv_parts partials of (b, h).

    SPLIT_KV: run ReLU(Q)·KV on the tensor cores as ReLU(Q)·KV_hi + ReLU(Q)·KV_lo (bf16 parts, fp32
    accumulation), for bf16/fp16 inputs; else one fp32 dot with FP32_PRECISION (fp32 inputs).
    SPLIT_Q: Q is fp16, whose 11-bit significand needs two bf16 parts too (Q_lo·KV_lo, ~2^-20, is dropped).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, PADDED_DIM)

    # Fixed summation order over the partials: deterministic.
    kv = tl.zeros([PADDED_DIM, PADDED_DIM], dtype=tl.float32)
    ksum = tl.zeros([PADDED_DIM], dtype=tl.float32)
    for part in range(n_kv_parts):
        slot = bh.to(tl.int64) * n_kv_parts + part
        kv += tl.load(kv_part_ptr + slot * PADDED_DIM * PADDED_DIM + d[:, None] * PADDED_DIM + d[None, :])
        ksum += tl.load(ksum_part_ptr + slot * PADDED_DIM + d)
    if SPLIT_KV:
        kv_hi, kv_lo = split_bf16(kv, PART_DTYPE)

    q_base = q_ptr + b.to(tl.int64) * q_stride_b + h.to(tl.int64) * q_stride_h
    o_base = out_ptr + b.to(tl.int64) * o_stride_b + h.to(tl.int64) * o_stride_h
    tokens_per_program = _tokens_per_program(N, BLOCK_M)
    start = split * tokens_per_program
    end = tl.minimum(start + tokens_per_program, N)
    for m0 in range(start, end, BLOCK_M):
        n = m0 + tl.arange(0, BLOCK_M)
        mask = _tile_mask(n, end, d, HEAD_DIM, PADDED_DIM)
        q = tl.load(q_base + _tile_offsets(n, d, q_stride_n, q_stride_d), mask=mask, other=0.0).to(tl.float32)
        q = tl.maximum(q, 0.0)
        denominator = tl.sum(q * ksum[None, :], axis=1) + eps
        if SPLIT_KV:
            if SPLIT_Q:
                q_hi, q_lo = split_bf16(q, PART_DTYPE)
                numerator = tl.dot(q_hi, kv_hi, input_precision="ieee")
                numerator = tl.dot(q_hi, kv_lo, numerator, input_precision="ieee")
                numerator = tl.dot(q_lo, kv_hi, numerator, input_precision="ieee")
            else:
                q_part = q.to(PART_DTYPE)  # a bf16 value: exact
                numerator = tl.dot(q_part, kv_hi, input_precision="ieee")
                numerator = tl.dot(q_part, kv_lo, numerator, input_precision="ieee")
        else:
            numerator = tl.dot(q, kv, input_precision=FP32_PRECISION)
        out = numerator / denominator[:, None]
        tl.store(o_base + _tile_offsets(n, d, o_stride_n, o_stride_d), out.to(out_ptr.dtype.element_ty), mask=mask)
