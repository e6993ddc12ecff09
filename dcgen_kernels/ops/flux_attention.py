"""Op `flux_attention`: FLUX joint attention with per-head RMSNorm and RoPE fused in.

Takes Q/K/V exactly as `FluxAttnProcessor` has them after the projections, (B, S, H, D) per stream (strided
views of a fused QKV projection are fine), and returns (B, S_txt + S_img, H*D) in the input dtype, text rows
first, ready for `to_add_out` / `to_out`. Single-stream blocks pass no text tensors.

Backends (auto order cuda -> triton -> reference):
- cuda: the CUDA `qk_norm_rope` kernel writes normalised, rotated Q and K of both streams into [text, image]
  buffers, then PyTorch's SDPA (cuDNN/flash) does the attention: stock's norm, cat and RoPE passes collapse
  into one read and one write of Q and K.
- triton: one attention kernel that normalises and rotates its query tile itself and reads V and writes the
  output in place; only the keys go through the `qk_norm_rope` prologue (once, into a (B, H, S, D) buffer),
  because redoing them in every query block would re-read the RoPE table S/BLOCK_M times.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend, _cext
from ._common import (HALF_DTYPES, call_op, cdiv, check_positive_eps, check_tensor, custom_op,
                      register_reference_autograd, tma_alignment_error)
from .qk_norm_rope import CUDA_HEAD_DIMS, apply_rope_fp32, qk_norm_rope_into, rms_norm_fp32

__all__ = ["flux_attention", "flux_attention_reference"]

TRITON_HEAD_DIMS = (64, 128, 256)


# ----------------------------------------------------------------------------------------------- reference
def flux_attention_reference(
    q, k, v, cos=None, sin=None, txt_q=None, txt_k=None, txt_v=None,
    norm_q_weight=None, norm_k_weight=None, norm_txt_q_weight=None, norm_txt_k_weight=None, eps: float = 1e-6,
):
    """fp32 reference: norm -> concat [text, image] -> RoPE -> SDPA, the order of diffusers' FluxAttnProcessor."""
    dtype = q.dtype
    q, k = rms_norm_fp32(q, norm_q_weight, eps), rms_norm_fp32(k, norm_k_weight, eps)
    v = v.float()
    if txt_q is not None:
        q = torch.cat([rms_norm_fp32(txt_q, norm_txt_q_weight, eps), q], dim=1)
        k = torch.cat([rms_norm_fp32(txt_k, norm_txt_k_weight, eps), k], dim=1)
        v = torch.cat([txt_v.float(), v], dim=1)
    if cos is not None:
        q, k = apply_rope_fp32(q, cos, sin), apply_rope_fp32(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2).to(dtype)


# ----------------------------------------------------------------------------------------------- validation
def _validate(q, k, v, cos, sin, txt_q, txt_k, txt_v, norm_q_weight, norm_k_weight, norm_txt_q_weight,
              norm_txt_k_weight, eps) -> None:
    check_tensor("q", q, ndim=4, last_dim_contiguous=True)
    B, S, H, D = q.shape
    if min(q.shape) == 0:
        raise ValueError(f"q must have non-empty dimensions (B, S, H, D), got {tuple(q.shape)}")
    same = dict(dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    check_tensor("k", k, shape=q.shape, **same)
    check_tensor("v", v, shape=q.shape, **same)
    text = (txt_q, txt_k, txt_v)
    if any(t is not None for t in text) and any(t is None for t in text):
        raise ValueError("txt_q, txt_k and txt_v must be given together (or all None for a single-stream block)")
    S_txt = 0
    if txt_q is not None:
        check_tensor("txt_q", txt_q, ndim=4, **same)
        S_txt = txt_q.shape[1]
        if (txt_q.shape[0], txt_q.shape[2], txt_q.shape[3]) != (B, H, D) or S_txt == 0:
            raise ValueError(f"txt_q must have shape (B={B}, S_txt>0, H={H}, D={D}) to match q, "
                             f"got {tuple(txt_q.shape)}")
        check_tensor("txt_k", txt_k, shape=txt_q.shape, **same)
        check_tensor("txt_v", txt_v, shape=txt_q.shape, **same)
    elif norm_txt_q_weight is not None or norm_txt_k_weight is not None:
        raise ValueError("norm_txt_q_weight / norm_txt_k_weight were given without txt_q, txt_k, txt_v")
    for name, w in (("norm_q_weight", norm_q_weight), ("norm_k_weight", norm_k_weight),
                    ("norm_txt_q_weight", norm_txt_q_weight), ("norm_txt_k_weight", norm_txt_k_weight)):
        if w is not None:
            check_tensor(name, w, shape=(D,), device=q.device)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or both None for no RoPE)")
    if cos is not None:
        if D % 2:
            raise ValueError(f"RoPE rotates pairs: head_dim must be even, got {D}")
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(name, t, shape=(S_txt + S, D), device=q.device)
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    check_positive_eps(eps)


# ----------------------------------------------------------------------------------------------- triton
def _triton_case_error(q, v, txt_q, txt_v) -> Optional[str]:
    if q.dtype not in HALF_DTYPES:
        return f"dtype {q.dtype}; the Triton kernel takes bfloat16 or float16"
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {TRITON_HEAD_DIMS}"
    for name, t in (("q", q), ("v", v), ("txt_q", txt_q), ("txt_v", txt_v)):
        reason = t is not None and tma_alignment_error(name, t)
        if reason:
            return reason
    return None


def _block_config(head_dim: int) -> dict:
    """Tile sizes. Under the interpreter small tiles let small test shapes cover full and partial blocks."""
    if _backend.triton_interpreter_enabled():
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


def _launch_triton(q, k, v, cos=None, sin=None, txt_q=None, txt_k=None, txt_v=None, norm_q_weight=None,
                   norm_k_weight=None, norm_txt_q_weight=None, norm_txt_k_weight=None, eps=1e-6,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Triton path; `out` (B, S_txt + S, H*D) may be passed in (tests poison it first)."""
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from ..triton_kernels.flux_attention import flux_attention_fwd_kernel

    B, S, H, D = q.shape
    S_txt = txt_q.shape[1] if txt_q is not None else 0
    S_all = S_txt + S
    if out is None:
        out = torch.empty(B, S_all, H * D, dtype=q.dtype, device=q.device)

    # Key prologue: normalise + rotate each key once, into (B, H, S_all, D) so key tiles are contiguous.
    keys = torch.empty(B, H, S_all, D, dtype=q.dtype, device=q.device)
    keys_bshd = keys.transpose(1, 2)
    if S_txt:
        qk_norm_rope_into(txt_k, norm_txt_k_weight, cos, sin, eps, 0, keys_bshd[:, :S_txt], "triton")
    qk_norm_rope_into(k, norm_k_weight, cos, sin, eps, S_txt, keys_bshd[:, S_txt:], "triton")

    cfg = _block_config(D)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    out_bshd = out.view(B, S_all, H, D)
    q_img = TensorDescriptor.from_tensor(q, [1, bm, 1, D])
    k_img = TensorDescriptor.from_tensor(keys[:, :, S_txt:], [1, 1, bn, D])
    v_img = TensorDescriptor.from_tensor(v, [1, bn, 1, D])
    o_img = TensorDescriptor.from_tensor(out_bshd[:, S_txt:], [1, bm, 1, D])
    if S_txt:
        q_txt = TensorDescriptor.from_tensor(txt_q, [1, bm, 1, D])
        k_txt = TensorDescriptor.from_tensor(keys[:, :, :S_txt], [1, 1, bn, D])
        v_txt = TensorDescriptor.from_tensor(txt_v, [1, bn, 1, D])
        o_txt = TensorDescriptor.from_tensor(out_bshd[:, :S_txt], [1, bm, 1, D])
    else:  # single stream: the text segment is empty, its descriptors are never read
        q_txt, k_txt, v_txt, o_txt = q_img, k_img, v_img, o_img

    ones = None
    if norm_q_weight is None or (S_txt and norm_txt_q_weight is None):
        ones = torch.ones(D, dtype=q.dtype, device=q.device)
    # The kernel reads the (D,) weights with stride 1.
    wq_img = norm_q_weight.contiguous() if norm_q_weight is not None else ones
    wq_txt = (norm_txt_q_weight.contiguous() if norm_txt_q_weight is not None else ones) if S_txt else wq_img

    if q.dtype == torch.bfloat16:
        # bf16 dots are wrong under the interpreter; fp32 dots there check the same kernel logic.
        dot_dtype = tl.float32 if _backend.triton_interpreter_enabled() else tl.bfloat16
    else:
        dot_dtype = tl.float16
    grid = (cdiv(S_txt, bm) + cdiv(S, bm), B * H)
    flux_attention_fwd_kernel[grid](
        q_txt, q_img, k_txt, k_img, v_txt, v_img, o_txt, o_img,
        wq_txt, wq_img, cos, sin,
        S_txt, S, H, eps, math.log2(math.e) / math.sqrt(D),
        HEAD_DIM=D, HAS_ROPE=cos is not None, DOT_DTYPE=dot_dtype, **cfg,
    )
    return out



# ----------------------------------------------------------------------------------------------- cuda
def _cuda_case_error(q) -> Optional[str]:
    if q.dtype not in HALF_DTYPES:
        return f"dtype {q.dtype}; the CUDA path takes bfloat16 or float16"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {CUDA_HEAD_DIMS}"
    return None


def _launch_cuda(q, k, v, cos=None, sin=None, txt_q=None, txt_k=None, txt_v=None, norm_q_weight=None,
                 norm_k_weight=None, norm_txt_q_weight=None, norm_txt_k_weight=None, eps=1e-6) -> torch.Tensor:
    """CUDA qk_norm_rope kernels write normalised, rotated Q and K of both streams straight into [text, image]
    (B, S, H, D) buffers (one read, one write each, replacing stock's norm/cat/RoPE passes); the attention
    core is PyTorch's SDPA (cuDNN or flash on Hopper), which takes that layout without copies."""
    B, S, H, D = q.shape
    S_txt = txt_q.shape[1] if txt_q is not None else 0
    qn = torch.empty(B, S_txt + S, H, D, dtype=q.dtype, device=q.device)
    kn = torch.empty_like(qn)
    streams = [(q, norm_q_weight, qn, S_txt), (k, norm_k_weight, kn, S_txt)]  # (input, weight, buffer, row)
    if S_txt:
        streams += [(txt_q, norm_txt_q_weight, qn, 0), (txt_k, norm_txt_k_weight, kn, 0)]
    for x, weight, dst, row in streams:
        qk_norm_rope_into(x, weight, cos, sin, eps, row, dst[:, row:row + x.shape[1]], "cuda")
    values = torch.cat([txt_v, v], dim=1) if S_txt else v
    out = F.scaled_dot_product_attention(qn.transpose(1, 2), kn.transpose(1, 2), values.transpose(1, 2))
    return out.transpose(1, 2).reshape(B, S_txt + S, H * D)


def select_backend(q, v, txt_q, txt_v, backend: str) -> str:
    return _backend.select(
        "flux_attention",
        backend,
        platform_checks={"cuda": lambda: _cext.cuda_device_error(q.device),
                         "triton": lambda: _backend.triton_device_error(q.device)},
        case_checks={"cuda": lambda: _cuda_case_error(q),
                     "triton": lambda: _triton_case_error(q, v, txt_q, txt_v)},
    )


# ----------------------------------------------------------------------------------------------- custom op
@custom_op("dcgen::flux_attention")
def _flux_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    txt_q: Optional[torch.Tensor], txt_k: Optional[torch.Tensor], txt_v: Optional[torch.Tensor],
    norm_q_weight: Optional[torch.Tensor], norm_k_weight: Optional[torch.Tensor],
    norm_txt_q_weight: Optional[torch.Tensor], norm_txt_k_weight: Optional[torch.Tensor],
    eps: float, backend: str,
) -> torch.Tensor:
    args = (q, k, v, cos, sin, txt_q, txt_k, txt_v, norm_q_weight, norm_k_weight, norm_txt_q_weight,
            norm_txt_k_weight, eps)
    chosen = select_backend(q, v, txt_q, txt_v, backend)
    if chosen == "cuda":
        return _launch_cuda(*args)
    if chosen == "triton":
        return _launch_triton(*args)
    return flux_attention_reference(*args).contiguous()  # like the kernels' output and the fake


@_flux_attention_op.register_fake
def _(q, k, v, cos, sin, txt_q, txt_k, txt_v, norm_q_weight, norm_k_weight, norm_txt_q_weight,
      norm_txt_k_weight, eps, backend):
    B, S, H, D = q.shape
    S_txt = txt_q.shape[1] if txt_q is not None else 0
    return q.new_empty(B, S_txt + S, H * D)


register_reference_autograd(_flux_attention_op, flux_attention_reference, n_tensor_inputs=12)


def flux_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    txt_q: Optional[torch.Tensor] = None,
    txt_k: Optional[torch.Tensor] = None,
    txt_v: Optional[torch.Tensor] = None,
    norm_q_weight: Optional[torch.Tensor] = None,
    norm_k_weight: Optional[torch.Tensor] = None,
    norm_txt_q_weight: Optional[torch.Tensor] = None,
    norm_txt_k_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm(q, k) per head -> RoPE -> softmax(q kᵀ / sqrt(D)) v over the [text, image] sequence.

    q, k, v: image (or single-stream) tensors (B, S, H, D); txt_q/k/v: text tensors (B, S_txt, H, D) or None.
    norm_*_weight: (D,) RMSNorm weights (None: no affine); the text stream uses norm_txt_*.
    cos, sin: FLUX RoPE tables (S_txt + S, D) as FluxPosEmbed returns them, or None for no RoPE.
    Returns (B, S_txt + S, H*D) in the input dtype, text rows first. Math in fp32 (norm, RoPE, softmax,
    accumulation). Gradients flow through the fp32 reference when inputs require grad.
    """
    _backend.check_backend_name(backend)
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    _validate(q, k, v, cos, sin, txt_q, txt_k, txt_v, norm_q_weight, norm_k_weight, norm_txt_q_weight,
              norm_txt_k_weight, eps)
    return call_op(_flux_attention_op, q, k, v, cos, sin, txt_q, txt_k, txt_v, norm_q_weight, norm_k_weight,
                   norm_txt_q_weight, norm_txt_k_weight, eps, backend)
