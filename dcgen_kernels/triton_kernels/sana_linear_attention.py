"""Triton kernels for SANA's ReLU linear attention: out = ReLU(Q)·KᵀV / (ReLU(Q)·ΣK + eps), per (batch, head).

Two passes, both indexed by (B, H, N, D) strides so the token-major (B, N, H*D) layout of SANA and the
channel-first (B, H, D, N) layout of DC-AE share them:
1. `linear_attention_kv_kernel`: each program reduces one slice of the tokens of one (b, h) to a partial fp32
   D×D matrix ReLU(K)ᵀV and a partial D-vector ΣReLU(K), written to its own workspace slot.
2. `linear_attention_out_kernel`: each program sums the partials of its (b, h) in a fixed order (so results are
   bitwise run-to-run deterministic, unlike atomics into one accumulator), then streams its slice of Q.
The head dim is padded to a power of two (>= 16, the tl.dot minimum) with masks; padded lanes load as zeros.
A K-pass program may take HEADS_PER_PROGRAM adjacent heads as one tile of HEADS_PER_PROGRAM * PADDED_DIM columns
(in SANA's token-major layout a 128-byte row segment instead of 64 at head dim 32): its dot then runs over the whole
tile and only the per-head diagonal blocks of KᵀV are kept.
Each pass is autotuned on its first call per shape and layout over the token tile and the number of programs (the
grid), the K pass also over the heads per program; the output pass reads how many partials the K pass wrote from
its launch. `linear_attention_fused_kernel` runs the same two steps (`_kv_partial`, `_attend`) in one launch,
ordered by atomic counters rather than by a kernel boundary; the partial sums stay atomic-free either way.
"""

import os

import triton
import triton.language as tl


def _configs(block: str, tiles):
    """(token tile, programs per SM: the grid, warps[, heads per program]) to time per (N, H, D, token stride). The
    interpreter takes one config with small tiles (PROGRAMS_PER_SM 0: two slices per head group, see the launcher)
    and one head per program, so the test shapes cover several slices, several tiles per slice and partial tiles."""
    def meta(size, per_sm, *heads):
        return {block: size, "PROGRAMS_PER_SM": per_sm, **({"HEADS_PER_PROGRAM": heads[0]} if heads else {})}

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        _, _, _, *heads = tiles[0]
        return [triton.Config(meta(16, 0, *heads), num_warps=4, num_stages=1)]
    return [triton.Config(meta(size, per_sm, *heads), num_warps=warps, num_stages=3)
            for size, per_sm, warps, *heads in tiles]


def token_slices(n_tokens: int, block: int, groups: int, programs_per_sm: int, sm_count: int) -> int:
    """Token slices per head group for a grid of about programs_per_sm * sm_count programs in all (0 programs per
    SM: two slices per group, the interpreter's), each slice a whole number of tiles, none empty (the kernels
    invert this in `_slice_bounds`)."""
    programs = programs_per_sm * sm_count if programs_per_sm else 2 * groups
    blocks = triton.cdiv(n_tokens, block)
    per_program = triton.cdiv(blocks, min(blocks, max(1, triton.cdiv(programs, groups))))
    return triton.cdiv(blocks, per_program)


# Head groups wider than this many fp32 columns would hold a (group x group) dot accumulator of more than 32
# registers per thread at 4 warps; the kernels are correct for any group, the autotuner just never times those.
MAX_GROUP_COLUMNS = 64


def prune_head_groups(configs, named_args, **kwargs):
    """Autotune prune: drop the multi-head configs whose head group exceeds MAX_GROUP_COLUMNS or the head count."""
    return [config for config in configs
            if config.kwargs["HEADS_PER_PROGRAM"] == 1
            or (config.kwargs["HEADS_PER_PROGRAM"] * kwargs["PADDED_DIM"] <= MAX_GROUP_COLUMNS
                and config.kwargs["HEADS_PER_PROGRAM"] <= named_args["H"])]


# H100 run H (benchmarks/PERF_NOTES.md) tuned each pass over 8 pairs (tiles 32-128, 1-8 programs per SM, 4 warps);
# the first two of each list won at SANA's 16384 tokens (token-major) and DC-AE's 16384 and 65536 (channel-first);
# 4096 and 262144 tokens picked others ((64, 8), (128, 4) / (64, 8)). The old fixed (64, 4) for both: 75% of the
# copy rate at SANA's 16384 tokens; tuned: 77%. Run J's ncu of the winners: ~2 warps per scheduler, 0.4 of them
# eligible per cycle, DRAM 68-72% busy: latency-bound with too few warps, and more programs (more, shorter slices)
# did not help in run H. Runs L and N timed the winners' grids with 8 warps per program: the output pass took it at
# SANA's and DC-AE's 16384 tokens (run L) and DC-AE's 65536 (run N), the K pass nowhere (dropped).
# Few configs per pass keep the first call's tuning short (each config is one compile).
# Run O (session 14) added two-head groups of each pass's winners: the K pass took (64, 2, 4, 2) at every SANA and
# DC-AE shape (SANA 16384 tokens 0.129 -> 0.127 ms, DC-AE 262144 0.884 -> 0.836 ms), the output pass never
# (dropped); the one-head K configs stay for head dims above 32 and single heads, which the prune leaves them.
KV_TILES = ((64, 2, 4, 1), (64, 4, 4, 1), (64, 2, 4, 2), (64, 4, 4, 2))
OUT_TILES = ((64, 4, 4), (128, 2, 4), (128, 2, 8))


@triton.jit
def _group_columns(group, H, HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr):
    """The tile's columns: head, dim within the head, and which of them exist (head < H, dim < HEAD_DIM)."""
    c = tl.arange(0, HEADS_PER_PROGRAM * PADDED_DIM)
    head = group * HEADS_PER_PROGRAM + c // PADDED_DIM
    dim = c % PADDED_DIM
    return head, dim, (head < H) & (dim < HEAD_DIM)


@triton.jit
def _column_offsets(head, dim, stride_h, stride_d):
    return (head.to(tl.int64) * stride_h + dim * stride_d)[None, :]


@triton.jit
def _tile_mask(n, end, column_ok, HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr,
               HEADS_PER_PROGRAM: tl.constexpr):
    """Rows before `end`; the column mask only where columns can be missing (a padded D or a head group), so a
    one-head unpadded tile keeps a mask that is constant along D and its loads stay vectorised."""
    mask = (n < end)[:, None]
    if HEAD_DIM < PADDED_DIM or HEADS_PER_PROGRAM > 1:
        mask = mask & column_ok[None, :]
    return mask


@triton.jit
def _part_offsets(b, H, split, n_parts, head, dim, PADDED_DIM: tl.constexpr):
    """Workspace offsets of the [group columns] x [group columns] KᵀV partial of one token slice: each head's
    D x D block at its own (b, head, split) slot, rows and columns of other heads (off the diagonal) masked."""
    slot = (b.to(tl.int64) * H + head) * n_parts + split
    offsets = (slot * PADDED_DIM * PADDED_DIM + dim * PADDED_DIM)[:, None] + dim[None, :]
    diagonal = (head[:, None] == head[None, :]) & (head < H)[:, None]
    return offsets, diagonal


@triton.jit
def split_bf16(x, PART_DTYPE: tl.constexpr):
    """x (fp32) ≈ hi + lo with hi, lo bf16 values: 16 significant bits (~2^-17 relative), far below the
    bf16/fp16 output rounding, at the cost of one more tensor-core dot. PART_DTYPE is bfloat16 on a GPU; under the
    interpreter (whose bf16 dots are wrong) float32, holding the same bf16 values."""
    hi = x.to(tl.bfloat16).to(tl.float32)
    lo = (x - hi).to(tl.bfloat16)
    return hi.to(PART_DTYPE), lo.to(PART_DTYPE)


@triton.jit
def _slice_bounds(N, split, slices, BLOCK: tl.constexpr):
    """[start, end) of token slice `split` of `slices`, each a whole number of tiles: the inverse of the
    launcher's `_slices`."""
    tokens = tl.cdiv(tl.cdiv(N, BLOCK), slices) * BLOCK
    start = split * tokens
    return start, tl.minimum(start + tokens, N)


@triton.jit
def _kv_partial(
    k_ptr, v_ptr, kv_part_ptr, ksum_part_ptr, b, group, split, n_parts, N, H,
    k_stride_b, k_stride_h, k_stride_n, k_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    """Writes kv_part[b, h, split] = ReLU(K_s)ᵀ V_s and ksum_part[b, h, split] = Σ ReLU(K_s) for each head h of
    the group, K_s the tokens of slice `split` of n_parts."""
    head, dim, column_ok = _group_columns(group, H, HEAD_DIM, PADDED_DIM, HEADS_PER_PROGRAM)
    k_base = k_ptr + b.to(tl.int64) * k_stride_b
    v_base = v_ptr + b.to(tl.int64) * v_stride_b
    k_columns = _column_offsets(head, dim, k_stride_h, k_stride_d)
    v_columns = _column_offsets(head, dim, v_stride_h, v_stride_d)
    start, end = _slice_bounds(N, split, n_parts, BLOCK_N)

    COLUMNS: tl.constexpr = HEADS_PER_PROGRAM * PADDED_DIM
    kv = tl.zeros([COLUMNS, COLUMNS], dtype=tl.float32)
    # Summed row-wise once after the loop: cheaper than a cross-thread reduction per tile.
    ksum_rows = tl.zeros([BLOCK_N, COLUMNS], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = _tile_mask(n, end, column_ok, HEAD_DIM, PADDED_DIM, HEADS_PER_PROGRAM)
        rows = n.to(tl.int64)[:, None]
        k = tl.load(k_base + rows * k_stride_n + k_columns, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows * v_stride_n + v_columns, mask=mask, other=0.0).to(tl.float32)
        k = tl.maximum(k, 0.0, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN, as torch.relu keeps it
        ksum_rows += k
        kv = tl.dot(tl.trans(k.to(DOT_DTYPE)), v.to(DOT_DTYPE), kv, input_precision=FP32_PRECISION)

    offsets, diagonal = _part_offsets(b, H, split, n_parts, head, dim, PADDED_DIM)
    if HEADS_PER_PROGRAM == 1:
        tl.store(kv_part_ptr + offsets, kv)
    else:
        tl.store(kv_part_ptr + offsets, kv, mask=diagonal)
    ksum_slot = (b.to(tl.int64) * H + head) * n_parts + split
    tl.store(ksum_part_ptr + ksum_slot * PADDED_DIM + dim, tl.sum(ksum_rows, axis=0), mask=head < H)


@triton.jit
def _attend(
    q_ptr, kv_part_ptr, ksum_part_ptr, out_ptr, b, h, split, slices, n_kv_parts, N, H, eps,
    q_stride_b, q_stride_h, q_stride_n, q_stride_d,
    o_stride_b, o_stride_h, o_stride_n, o_stride_d,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, PART_STAGES: tl.constexpr,
    SPLIT_KV: tl.constexpr, SPLIT_Q: tl.constexpr, PART_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out = ReLU(Q)·KV / (ReLU(Q)·ksum + eps) for token slice `split` of `slices` of head (b, h), KV and ksum
    the sums of the head's n_kv_parts partials, in a fixed order (deterministic).

    PART_STAGES: the partials' loads are pipelined PART_STAGES - 1 deep (the launcher sizes it to the shared
    memory a partial takes): one after another, their L2 round trips held every program's first Q tile back.
    SPLIT_KV: run ReLU(Q)·KV on the tensor cores as ReLU(Q)·KV_hi + ReLU(Q)·KV_lo (bf16 parts, fp32
    accumulation), for bf16/fp16 inputs; else one fp32 dot with FP32_PRECISION (fp32 inputs).
    SPLIT_Q: Q is fp16, whose 11-bit significand needs two bf16 parts too (Q_lo·KV_lo, ~2^-20, is dropped)."""
    head, dim, column_ok = _group_columns(h, H, HEAD_DIM, PADDED_DIM, 1)
    bh = b.to(tl.int64) * H + h
    kv = tl.zeros([PADDED_DIM, PADDED_DIM], dtype=tl.float32)
    ksum = tl.zeros([PADDED_DIM], dtype=tl.float32)
    for part in tl.range(0, n_kv_parts, num_stages=PART_STAGES):
        offsets, _ = _part_offsets(b, H, part, n_kv_parts, head, dim, PADDED_DIM)
        kv += tl.load(kv_part_ptr + offsets)
        ksum += tl.load(ksum_part_ptr + (bh * n_kv_parts + part) * PADDED_DIM + dim)
    if SPLIT_KV:
        kv_hi, kv_lo = split_bf16(kv, PART_DTYPE)

    q_base = q_ptr + b.to(tl.int64) * q_stride_b
    o_base = out_ptr + b.to(tl.int64) * o_stride_b
    q_columns = _column_offsets(head, dim, q_stride_h, q_stride_d)
    o_columns = _column_offsets(head, dim, o_stride_h, o_stride_d)
    start, end = _slice_bounds(N, split, slices, BLOCK_M)
    for m0 in range(start, end, BLOCK_M):
        n = m0 + tl.arange(0, BLOCK_M)
        mask = _tile_mask(n, end, column_ok, HEAD_DIM, PADDED_DIM, 1)
        rows = n.to(tl.int64)[:, None]
        q = tl.load(q_base + rows * q_stride_n + q_columns, mask=mask, other=0.0).to(tl.float32)
        q = tl.maximum(q, 0.0, propagate_nan=tl.PropagateNan.ALL)
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
        tl.store(o_base + rows * o_stride_n + o_columns, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs("BLOCK_N", KV_TILES), key=["N", "H", "HEAD_DIM", "k_stride_n"],
                 prune_configs_by={"early_config_prune": prune_head_groups})
@triton.jit
def linear_attention_kv_kernel(
    k_ptr, v_ptr, kv_part_ptr, ksum_part_ptr,
    N, H,
    k_stride_b, k_stride_h, k_stride_n, k_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    """Grid (B * head groups, slices): the partials of one (b, head group, token slice) per program (`_kv_partial`).
    PROGRAMS_PER_SM only shapes the grid (the launcher reads it from the config).

    DOT_DTYPE is the input dtype for bf16/fp16 (products of 16-bit floats are exact in the fp32 tensor-core
    accumulator, so this equals the fp32 reference up to summation order) and float32 otherwise, with
    FP32_PRECISION "tf32x3" (three TF32 tensor-core products, ~fp32 accuracy) or "ieee" (FMA units).
    """
    groups = tl.cdiv(H, HEADS_PER_PROGRAM)
    _kv_partial(k_ptr, v_ptr, kv_part_ptr, ksum_part_ptr, tl.program_id(0) // groups, tl.program_id(0) % groups,
                tl.program_id(1), tl.num_programs(1), N, H,
                k_stride_b, k_stride_h, k_stride_n, k_stride_d, v_stride_b, v_stride_h, v_stride_n, v_stride_d,
                HEAD_DIM, PADDED_DIM, DOT_DTYPE, FP32_PRECISION, BLOCK_N, HEADS_PER_PROGRAM)


@triton.autotune(configs=_configs("BLOCK_M", OUT_TILES), key=["N", "H", "HEAD_DIM", "q_stride_n"])
@triton.jit
def linear_attention_out_kernel(
    q_ptr, kv_part_ptr, ksum_part_ptr, out_ptr,
    N, H, n_kv_parts, eps,
    q_stride_b, q_stride_h, q_stride_n, q_stride_d,
    o_stride_b, o_stride_h, o_stride_n, o_stride_d,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, PART_STAGES: tl.constexpr,
    SPLIT_KV: tl.constexpr, SPLIT_Q: tl.constexpr, PART_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    """Grid (B*H, slices), its own slicing of the tokens: one (b, h, token slice) per program (`_attend`), from
    the n_kv_parts partials the K pass wrote."""
    _attend(q_ptr, kv_part_ptr, ksum_part_ptr, out_ptr, tl.program_id(0) // H, tl.program_id(0) % H,
            tl.program_id(1), tl.num_programs(1), n_kv_parts, N, H, eps,
            q_stride_b, q_stride_h, q_stride_n, q_stride_d, o_stride_b, o_stride_h, o_stride_n, o_stride_d,
            HEAD_DIM, PADDED_DIM, PART_STAGES, SPLIT_KV, SPLIT_Q, PART_DTYPE, FP32_PRECISION, BLOCK_M)


# A waiting output program traps (an illegal-instruction error for the launch) after this many polls (~seconds)
# rather than hang the GPU forever if the ordering were ever broken. The interpreter runs programs in ticket order
# and never polls twice; it has no inline assembly.
SPIN_LIMIT = tl.constexpr(0 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1 << 22)


@triton.jit
def _trap(x):
    return tl.inline_asm_elementwise("trap; mov.u32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


# The fused form holds both passes' registers: at a padded head dim of 128 it spills (offline, triton 3.6 sm_90a:
# 212-1008 bytes at D = 112 / 72), so the op times it only up to this one.
FUSED_MAX_PADDED_DIM = 64

# The fused form's (K tile, K programs per SM, heads per K program, output tile, output programs per SM, warps),
# session 14, untimed: run O's K-pass winner with output grids that fit beside it in one wave (the K path's 128
# registers at two heads allow 4 programs per SM, and an output program started late would run alone at the end),
# and the one-head K pass (72 registers for both paths: 7 per SM) with run O's output winner.
FUSED_TILES = ((64, 2, 2, 128, 2, 4), (64, 2, 2, 64, 2, 4), (64, 2, 1, 64, 4, 4))


def _fused_configs():
    keys = ("BLOCK_N", "KV_PROGRAMS_PER_SM", "HEADS_PER_PROGRAM", "BLOCK_M", "OUT_PROGRAMS_PER_SM")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config(dict(zip(keys, (16, 0, 1, 16, 0))), num_warps=4, num_stages=1)]
    return [triton.Config(dict(zip(keys, tile[:5])), num_warps=tile[5], num_stages=3) for tile in FUSED_TILES]


def _fused_slices(programs_per_sm: str, block: str, per_group: bool):
    """Heuristic for the fused kernel's slice counts (constexprs), as the two-pass launcher sizes its grids."""
    def slices(args):
        groups = args["B"] * (triton.cdiv(args["H"], args["HEADS_PER_PROGRAM"]) if per_group else args["H"])
        return token_slices(args["N"], args[block], groups, args[programs_per_sm], args["sm_count"])
    return slices


fused_kv_slices = _fused_slices("KV_PROGRAMS_PER_SM", "BLOCK_N", per_group=True)
fused_out_slices = _fused_slices("OUT_PROGRAMS_PER_SM", "BLOCK_M", per_group=False)


@triton.autotune(configs=_fused_configs(), key=["N", "H", "HEAD_DIM", "q_stride_n", "k_stride_n"],
                 prune_configs_by={"early_config_prune": prune_head_groups})
@triton.heuristics({"KV_SLICES": fused_kv_slices, "OUT_SLICES": fused_out_slices})
@triton.jit
def linear_attention_fused_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, kv_part_ptr, ksum_part_ptr, counters_ptr,
    B, N, H, eps, sm_count,
    q_stride_b, q_stride_h, q_stride_n, q_stride_d,
    k_stride_b, k_stride_h, k_stride_n, k_stride_d,
    v_stride_b, v_stride_h, v_stride_n, v_stride_d,
    o_stride_b, o_stride_h, o_stride_n, o_stride_d,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    PART_STAGES: tl.constexpr, SPLIT_KV: tl.constexpr, SPLIT_Q: tl.constexpr, PART_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_PROGRAMS_PER_SM: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr, OUT_PROGRAMS_PER_SM: tl.constexpr, KV_SLICES: tl.constexpr, OUT_SLICES: tl.constexpr,
):
    """Both passes in one launch: no boundary between them, and a head's output tiles start once that head's
    partials are written rather than when the whole K pass has drained.

    Grid: B * head groups * KV_SLICES K-pass programs plus B * H * OUT_SLICES output programs. Each program takes
    the next ticket from counters[0] (so tickets follow the order programs start, not their ids): the first tickets
    are K-pass work (`_kv_partial`), which, once its partials are stored (a CTA barrier, then a release increment),
    counts itself into its group's counters[1 + b * groups + group]; later tickets are output work (`_attend`),
    which first waits (acquire loads) until its head's group has all KV_SLICES partials. Only tickets handed out
    earlier, to programs already running that never wait, are waited on: no deadlock whatever the residency.
    `counters` (B * groups + 1 int32) must be zero at launch and are zero again after it, so the launcher keeps them
    rather than zeroing them per call: the last ticket resets the ticket counter, and the last of a group's output
    programs to pass its wait resets the group's counter (each output program counts itself in once past it).
    """
    groups = tl.cdiv(H, HEADS_PER_PROGRAM)
    kv_programs = B * groups * KV_SLICES
    ticket = tl.atomic_add(counters_ptr, 1, sem="relaxed")
    if ticket == kv_programs + B * H * OUT_SLICES - 1:  # the grid's last ticket: no program takes one again
        tl.atomic_xchg(counters_ptr, 0, sem="relaxed")
    if ticket < kv_programs:
        group_index = ticket % (B * groups)
        _kv_partial(k_ptr, v_ptr, kv_part_ptr, ksum_part_ptr, group_index // groups, group_index % groups,
                    ticket // (B * groups), KV_SLICES, N, H,
                    k_stride_b, k_stride_h, k_stride_n, k_stride_d, v_stride_b, v_stride_h, v_stride_n, v_stride_d,
                    HEAD_DIM, PADDED_DIM, DOT_DTYPE, FP32_PRECISION, BLOCK_N, HEADS_PER_PROGRAM)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        tl.atomic_add(counters_ptr + 1 + group_index, 1, sem="release")
    elif ticket < kv_programs + B * H * OUT_SLICES:
        work = ticket - kv_programs
        bh = work % (B * H)
        b = bh // H
        h = bh % H
        group = h // HEADS_PER_PROGRAM
        ready = counters_ptr + 1 + b * groups + group
        polls = 0
        while tl.atomic_add(ready, 0, sem="acquire") < KV_SLICES:
            polls += 1
            if SPIN_LIMIT > 0:
                if polls == SPIN_LIMIT:
                    _trap(polls)
        group_outputs = tl.minimum(HEADS_PER_PROGRAM, H - group * HEADS_PER_PROGRAM) * OUT_SLICES
        if tl.atomic_add(ready, 1, sem="relaxed") == KV_SLICES + group_outputs - 1:
            tl.atomic_xchg(ready, 0, sem="relaxed")
        _attend(q_ptr, kv_part_ptr, ksum_part_ptr, out_ptr, b, h, work // (B * H), OUT_SLICES, KV_SLICES, N, H, eps,
                q_stride_b, q_stride_h, q_stride_n, q_stride_d, o_stride_b, o_stride_h, o_stride_n, o_stride_d,
                HEAD_DIM, PADDED_DIM, PART_STAGES, SPLIT_KV, SPLIT_Q, PART_DTYPE, FP32_PRECISION, BLOCK_M)
