"""Triton kernels for per-head RMSNorm + FLUX RoPE of query/key rows."""

import triton
import triton.language as tl


@triton.jit
def rms_norm_rope_rows(x, w, cos, sin, eps, HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr):
    """RMSNorm each row of the fp32 tile `x` [R, D], scale by `w` [D], then rotate interleaved pairs.

    Matches diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1):
    x_rot = (-x_odd, x_even) interleaved, out = x * cos + x_rot * sin. cos/sin are [R, D] fp32 and are not
    assumed pair-equal, so any RoPE table gives the exact result.
    """
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    y = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        even, odd = tl.split(tl.reshape(y, [y.shape[0], HEAD_DIM // 2, 2]))
        y_rot = tl.reshape(tl.join(-odd, even), [y.shape[0], HEAD_DIM])
        y = y * cos + y_rot * sin
    return y


@triton.jit
def qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    n_rows, S, H,
    x_stride_b, x_stride_s, x_stride_h,
    out_stride_b, out_stride_s, out_stride_h,
    rope_offset, eps,
    HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    """Rows are (b, s, h) flattened; each program normalises BLOCK_ROWS of them."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    d = tl.arange(0, HEAD_DIM)
    x_off = b.to(tl.int64) * x_stride_b + s.to(tl.int64) * x_stride_s + h.to(tl.int64) * x_stride_h
    # Upcast at once: bf16 arithmetic is also wrong under the Triton interpreter.
    x = tl.load(x_ptr + x_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d).to(tl.float32)
    cos = x  # placeholders when HAS_ROPE is off (no multiple assignment in Triton)
    sin = x
    if HAS_ROPE:
        rope_off = (rope_offset + s).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
        cos = tl.load(cos_ptr + rope_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rope_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    y = rms_norm_rope_rows(x, w, cos, sin, eps, HEAD_DIM, HAS_ROPE)
    out_off = b.to(tl.int64) * out_stride_b + s.to(tl.int64) * out_stride_s + h.to(tl.int64) * out_stride_h
    tl.store(out_ptr + out_off[:, None] + d[None, :], y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
