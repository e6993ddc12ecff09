"""Triton NVFP4 GEMMs: W4A4 (both operands NVFP4) and W4A16 (NVFP4 weights, 16-bit activations).

out[m, n] = sum_k A[m, k] * W[n, k] * global scales + lora_act[m, :] @ lora_up[:, n] + bias[n]

Operands are dequantized in registers: an E2M1 value times its E4M3 group scale has at most 5 significant bits
and lies in [2**-10, 2688], so it is exact in fp16 and in bf16: the tensor-core dot then sees exactly the
dequantized values (fp32 accumulation), and the fp32 tensor scales are applied once in the epilogue together
with the low-rank up-projection and the bias. W is [N, K/2] bytes (nn.Linear's row layout), dequantized as a
[BLOCK_N, BLOCK_K] tile and transposed for the dot.
"""

import os

import triton
import triton.language as tl

from ._tiling import grouped_tile
from .nvfp4_quantize import e2m1_values_over_2_14, e4m3_values

GROUP = tl.constexpr(16)


@triton.jit
def _load_tile_bytes(packed_ptr, scales_ptr, rows64, row_ok, k0, k_end, stride_p, stride_s, BLOCK_K: tl.constexpr):
    """The raw bytes of a [rows, BLOCK_K] tile of NVFP4 rows at column k0: packed E2M1 pairs [rows, BLOCK_K/2] and
    E4M3 group scales [rows, BLOCK_K/16]; columns at or past k_end (a multiple of 16) load as zeros."""
    pcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(packed_ptr + rows64[:, None] * stride_p + pcols[None, :],
                     mask=row_ok[:, None] & (pcols[None, :] < k_end // 2), other=0)
    gcols = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    sbytes = tl.load(scales_ptr + rows64[:, None] * stride_s + gcols[None, :],
                     mask=row_ok[:, None] & (gcols[None, :] < k_end // GROUP), other=0)
    return packed, sbytes


@triton.jit
def _decode_tile(packed, sbytes, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_K] fp32 = e2m1 * group scale of the bytes _load_tile_bytes returned (exact: at most 6 significant
    bits). The codes' 2**14 decoding factor rides on the group scale: one multiply per element, not two."""
    bytes_ = packed.to(tl.int32)
    codes = tl.reshape(tl.join(bytes_ & 0xF, bytes_ >> 4), [ROWS, BLOCK_K])
    scale = e4m3_values(sbytes) * 16384.0
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [ROWS, BLOCK_K // GROUP, GROUP]), [ROWS, BLOCK_K])
    return e2m1_values_over_2_14(codes) * scale


@triton.jit
def _dequant_tile(packed_ptr, scales_ptr, rows64, row_ok, k0, K_PAD, stride_p, stride_s,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_K] fp32 = e2m1 * group scale of NVFP4 rows (bytes [.., K_PAD/2], scale bytes [.., K_PAD/16])."""
    packed, sbytes = _load_tile_bytes(packed_ptr, scales_ptr, rows64, row_ok, k0, K_PAD, stride_p, stride_s, BLOCK_K)
    return _decode_tile(packed, sbytes, ROWS, BLOCK_K)


@triton.jit
def nvfp4_gemm_kernel(
    a_ptr, a_scales_ptr, a_gscale_ptr,
    w_ptr, w_scales_ptr, w_gscale_ptr,
    smooth_ptr, lora_act_ptr, lora_up_ptr, bias_ptr, out_ptr,
    M, N, K, K_PAD, R,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_lm, stride_ur, stride_om,
    A_FP4: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """A_FP4: A is NVFP4 (bytes [M, K_PAD/2], scale bytes [M, K_PAD/16], tensor scale) -> W4A4; else A is a
    16/32-bit [M, K] activation -> W4A16, divided by smooth [K] (fp32) when HAS_SMOOTH.
    lora_act: fp32 [M, R]; lora_up: [R, N]; out: [M, N]."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        w = _dequant_tile(w_ptr, w_scales_ptr, cols64, col_ok, k0, K_PAD, stride_wn, stride_wsn, BLOCK_N, BLOCK_K)
        if A_FP4:
            a = _dequant_tile(a_ptr, a_scales_ptr, rows64, row_ok, k0, K_PAD, stride_am, stride_asm, BLOCK_M,
                              BLOCK_K)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows64[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K),
                        other=0.0)
            if HAS_SMOOTH:
                inv_smooth = 1.0 / tl.load(smooth_ptr + ks, mask=ks < K, other=1.0)
                a = a.to(tl.float32) * inv_smooth[None, :]
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision="ieee")

    tensor_scale = tl.load(w_gscale_ptr)
    if A_FP4:
        tensor_scale = tensor_scale * tl.load(a_gscale_ptr)
    acc = acc * tensor_scale
    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)
        lora_act = tl.load(lora_act_ptr + rows64[:, None] * stride_lm + ranks[None, :],
                           mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0)
        lora_up = tl.load(lora_up_ptr + ranks[:, None] * stride_ur + cols64[None, :],
                          mask=(ranks[:, None] < R) & col_ok[None, :], other=0.0)
        acc = tl.dot(lora_act.to(LORA_DOT_DTYPE), lora_up.to(LORA_DOT_DTYPE), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _set_out_block(nargs):
    """Config pre-hook: the output descriptor's block is a TMA-store config's tile, else the launcher's minimal
    block. Every config sets it: a non-TMA winner launched after the tuning would otherwise carry the last TMA
    config's block, a signature of its own, and compile once more."""
    desc = nargs["out_desc"]
    if desc is not None:
        desc.block_shape = ([nargs["BLOCK_N"], nargs["BLOCK_K"]] if nargs["TMA_STORE"]
                            else [1, 16 // desc.base.element_size()])


def _effective_weight_configs():
    """(BLOCK_N, BLOCK_K, K_TILES, warps, TMA_STORE) to time on the first call per (N, K, R, dtypes). 64 x 128 with 4
    warps, one tile per program, was the hand-picked default (its pass ran at ~1.3-1.5 TB/s on an H100, 2026-11-27);
    larger tiles re-read the low-rank factors less often; K_TILES > 1 streams several tiles per program with the next
    one's bytes in flight. TMA_STORE (session 14, untimed): the winners of runs F-L again, storing each tile with one
    TMA copy from shared memory instead of converting it back to a blocked register layout for global stores (run
    L's ncu: the pass waits on shared memory, L1/TEX 67% busy, DRAM 13%). Under the interpreter: small tiles, two
    per program, so the tests cover partial blocks and the prefetch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "K_TILES": 2, "TMA_STORE": False}, num_warps=4)]
    # Run L also timed the winner's tile (64 x 128) with 8 warps: picked at none of the five FLUX shapes, dropped.
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "K_TILES": t, "TMA_STORE": tma}, num_warps=w,
                          pre_hook=_set_out_block)
            for n, k, t, w, tma in ((64, 128, 1, 4, False), (128, 128, 1, 8, False), (64, 256, 1, 8, False),
                                    (128, 256, 1, 8, False), (32, 256, 1, 4, False), (128, 64, 1, 4, False),
                                    (64, 128, 4, 4, False), (32, 128, 8, 4, False), (128, 128, 4, 8, False),
                                    (64, 128, 1, 4, True), (32, 128, 8, 4, True))]


def prune_tma_store(configs, named_args, **kwargs):
    """Autotune prune: the TMA-store configs only where the launcher could describe the output (`out_desc`)."""
    return [config for config in configs if not config.kwargs["TMA_STORE"] or named_args["out_desc"] is not None]


@triton.autotune(configs=_effective_weight_configs(), key=["N", "K", "R"],
                 prune_configs_by={"early_config_prune": prune_tma_store})
@triton.jit
def nvfp4_effective_weight_kernel(
    w_ptr, w_scales_ptr, w_gscale_ptr, smooth_ptr, down_ptr, up_ptr, out_ptr, out_desc,
    N, K, K_PAD, R,
    stride_wn, stride_wsn, stride_dk, stride_ur, stride_on,
    HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, K_TILES: tl.constexpr,
    TMA_STORE: tl.constexpr,
):
    """out [N, K] = dequant(W) / smooth[k] + (down [K, R] @ up [R, N])^T: an SVDQuant layer's effective weight,
    for a 16-bit GEMM (large-M W4A16). Grid (N blocks, K blocks of K_TILES tiles). TMA_STORE: tiles leave through
    out_desc (a host TensorDescriptor of `out`, its block set to [BLOCK_N, BLOCK_K]; the copy clips at N and K)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    k_first = tl.program_id(1) * (K_TILES * BLOCK_K)
    k_end = tl.minimum(k_first + K_TILES * BLOCK_K, K_PAD)  # this program's columns: no prefetch past them
    gscale = tl.load(w_gscale_ptr)
    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)
        up_t = tl.load(up_ptr + ranks[None, :] * stride_ur + rows64[:, None],
                       mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0)
    packed, sbytes = _load_tile_bytes(w_ptr, w_scales_ptr, rows64, row_ok, k_first, k_end, stride_wn, stride_wsn,
                                      BLOCK_K)
    for tile in range(K_TILES):
        k0 = k_first + tile * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        # The next tile's bytes are requested before this one is decoded and stored, so their latency overlaps it.
        next_packed, next_sbytes = _load_tile_bytes(w_ptr, w_scales_ptr, rows64, row_ok, k0 + BLOCK_K, k_end,
                                                    stride_wn, stride_wsn, BLOCK_K)
        w = _decode_tile(packed, sbytes, BLOCK_N, BLOCK_K)
        # One multiply per element by gscale / smooth[k], computed per column, not a per-element fp32 division
        # (div.rn, ~10 instructions). The result is rounded to 16 bits, so the reciprocal's extra fp32 rounding
        # does not show.
        col_factor = gscale + tl.zeros([BLOCK_K], dtype=tl.float32)
        if HAS_SMOOTH:
            col_factor = col_factor / tl.load(smooth_ptr + cols, mask=col_ok, other=1.0)
        w = w * col_factor[None, :]
        if HAS_LORA:
            down_t = tl.load(down_ptr + cols[None, :] * stride_dk + ranks[:, None],
                             mask=col_ok[None, :] & (ranks[:, None] < R), other=0.0)
            w = tl.dot(up_t.to(DOT_DTYPE), down_t.to(DOT_DTYPE), w, input_precision="ieee")
        w = w.to(out_ptr.dtype.element_ty)
        if TMA_STORE:
            out_desc.store([tl.program_id(0) * BLOCK_N, k0], w)
        else:
            tl.store(out_ptr + rows64[:, None] * stride_on + cols[None, :], w, mask=row_ok[:, None] & col_ok[None, :])
        packed, sbytes = next_packed, next_sbytes
