"""Triton kernel for FLUX joint attention with the query RMSNorm + RoPE fused in.

The program for one (query block, batch, head) normalises and rotates its query tile once, then streams the
keys (already normalised and rotated by the qk_norm_rope prologue) and the values of the text segment and of
the image segment straight from the projections' strided outputs: no concatenation, no transposes.
All tiles move through host-side tensor descriptors (TMA on Hopper), which zero-fill rows past a segment's end.
"""

import triton
import triton.language as tl

from .qk_norm_rope import rms_norm_rope_rows


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, k_desc, v_desc, b, h, start_n, seg_len,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr, MASK_KEYS: tl.constexpr,
):
    k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM).to(DOT_DTYPE)
    # Scores are already in log2 units: the softmax scale times log2(e) is folded into q.
    qk = tl.dot(q, tl.trans(k))
    if MASK_KEYS:
        key_ok = (start_n + tl.arange(0, BLOCK_N)) < seg_len
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = v_desc.load([b, start_n, h, 0]).reshape(BLOCK_N, HEAD_DIM).to(DOT_DTYPE)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
    return acc, m_new, l_i


@triton.jit
def _attend_segment(
    q, acc, m_i, l_i, k_desc, v_desc, b, h, seg_len,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    full = seg_len - seg_len % BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_desc, v_desc, b, h, start_n, seg_len,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, DOT_DTYPE, False)
    if full < seg_len:
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_desc, v_desc, b, h, full, seg_len,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, DOT_DTYPE, True)
    return acc, m_i, l_i


@triton.jit
def flux_attention_fwd_kernel(
    q_txt_desc, q_img_desc, k_txt_desc, k_img_desc, v_txt_desc, v_img_desc, o_txt_desc, o_img_desc,
    wq_txt_ptr, wq_img_ptr, cos_ptr, sin_ptr,
    S_txt, S_img, H, eps, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Grid: (query blocks of the text segment + query blocks of the image segment, B * H)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    n_txt_blocks = tl.cdiv(S_txt, BLOCK_M)
    is_txt = pid_m < n_txt_blocks
    if is_txt:
        start_m = pid_m * BLOCK_M
        q = q_txt_desc.load([b, start_m, h, 0])
        w = tl.load(wq_txt_ptr + tl.arange(0, HEAD_DIM))
        rope_row = start_m
    else:
        start_m = (pid_m - n_txt_blocks) * BLOCK_M
        q = q_img_desc.load([b, start_m, h, 0])
        w = tl.load(wq_img_ptr + tl.arange(0, HEAD_DIM))
        rope_row = S_txt + start_m

    out_dtype = q.dtype
    # Upcast right away: the RMSNorm and RoPE run in fp32 (and bf16 math is wrong in the interpreter).
    q = q.reshape(BLOCK_M, HEAD_DIM).to(tl.float32)
    cos = q  # placeholders when HAS_ROPE is off
    sin = q
    if HAS_ROPE:
        rows = rope_row + tl.arange(0, BLOCK_M)
        rope_off = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        rows_ok = rows < S_txt + S_img
        cos = tl.load(cos_ptr + rope_off, mask=rows_ok[:, None], other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rope_off, mask=rows_ok[:, None], other=0.0).to(tl.float32)
    q = rms_norm_rope_rows(q, w.to(tl.float32), cos, sin, eps, HEAD_DIM, HAS_ROPE)
    q = (q * qk_scale).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _attend_segment(q, acc, m_i, l_i, k_txt_desc, v_txt_desc, b, h, S_txt,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, DOT_DTYPE)
    acc, m_i, l_i = _attend_segment(q, acc, m_i, l_i, k_img_desc, v_img_desc, b, h, S_img,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, DOT_DTYPE)
    out = (acc / l_i[:, None]).to(out_dtype).reshape(1, BLOCK_M, 1, HEAD_DIM)
    if is_txt:
        o_txt_desc.store([b, start_m, h, 0], out)
    else:
        o_img_desc.store([b, start_m, h, 0], out)
