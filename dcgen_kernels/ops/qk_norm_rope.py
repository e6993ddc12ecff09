"""Op `qk_norm_rope`: per-head RMSNorm of query/key rows followed by FLUX RoPE.

Layout (B, S, H, D) as the attention projections produce it. This is also the key-side prologue of
`flux_attention`: normalising and rotating each key once here is cheaper than redoing it (and re-reading the
RoPE table) in every query block of the attention kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _cext
from ._common import call_op, cdiv, check_positive_eps, check_tensor, custom_op, register_reference_autograd

__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "rms_norm_fp32", "apply_rope_fp32"]

TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
CUDA_HEAD_DIMS = (64, 128, 256)
_ROWS_PER_PROGRAM = 16


# ----------------------------------------------------------------------------------------------- reference
def rms_norm_fp32(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """torch.nn.RMSNorm over the last dim, in fp32."""
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.float() if weight is not None else y


def apply_rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1), in fp32.

    x: (B, S, H, D); cos, sin: (S, D).
    """
    x = x.float()
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return x * cos.float()[None, :, None, :] + x_rot * sin.float()[None, :, None, :]


def qk_norm_rope_reference(x, weight=None, cos=None, sin=None, eps: float = 1e-6, rope_offset: int = 0):
    y = rms_norm_fp32(x, weight, eps)
    if cos is not None:
        rows = slice(rope_offset, rope_offset + x.shape[1])
        y = apply_rope_fp32(y, cos[rows], sin[rows])
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------- validation
def _validate(x, weight, cos, sin, eps, rope_offset) -> None:
    check_tensor("x", x, ndim=4, last_dim_contiguous=True)
    _, S, _, D = x.shape
    if weight is not None:
        check_tensor("weight", weight, shape=(D,), device=x.device)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or both None for no RoPE)")
    if cos is not None:
        if D % 2:
            raise ValueError(f"RoPE rotates pairs: head_dim (x.shape[-1]) must be even, got {D}")
        if isinstance(rope_offset, bool) or not isinstance(rope_offset, int) or rope_offset < 0:
            raise ValueError(f"rope_offset must be a non-negative int, got {rope_offset!r}")
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(name, t, ndim=2, device=x.device, last_dim_contiguous=True)
            if t.shape[1] != D or t.shape[0] < rope_offset + S:
                raise ValueError(f"{name} must have shape (>= rope_offset + S = {rope_offset + S}, head_dim = {D}), "
                                 f"got {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    check_positive_eps(eps)


# ----------------------------------------------------------------------------------------------- launchers
def _triton_case_error(x: torch.Tensor) -> Optional[str]:
    if x.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head_dim {x.shape[-1]} not in {TRITON_HEAD_DIMS}"
    return None


def _cuda_case_error(x: torch.Tensor) -> Optional[str]:
    if x.shape[-1] not in CUDA_HEAD_DIMS:
        return f"head_dim {x.shape[-1]} not in {CUDA_HEAD_DIMS}"
    return None


def _launch_triton(x, weight, cos, sin, eps, rope_offset, out) -> None:
    from ..triton_kernels.qk_norm_rope import qk_norm_rope_kernel

    B, S, H, D = x.shape
    # The kernel reads the (D,) weight with stride 1.
    weight = torch.ones(D, dtype=x.dtype, device=x.device) if weight is None else weight.contiguous()
    n_rows = B * S * H
    qk_norm_rope_kernel[(cdiv(n_rows, _ROWS_PER_PROGRAM),)](
        x, weight, cos, sin, out,
        n_rows, S, H,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        rope_offset, eps,
        HEAD_DIM=D, BLOCK_ROWS=_ROWS_PER_PROGRAM, HAS_ROPE=cos is not None,
    )


def _launch_cuda(x, weight, cos, sin, eps, rope_offset, out) -> None:
    B, S, H, D = x.shape
    if weight is not None:  # the kernel reads it in fp32 (as the reference multiplies), with stride 1
        weight = weight.float().contiguous()
    if cos is not None:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    _cext._C.qk_norm_rope(
        x.data_ptr(), ptr(weight), ptr(cos), ptr(sin), out.data_ptr(),
        B, S, H, D,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        rope_offset, eps, _cext.DTYPE_CODES[x.dtype], _cext.stream_handle(x.device),
    )



def select_backend(x: torch.Tensor, backend: str) -> str:
    return _backend.select(
        "qk_norm_rope",
        backend,
        platform_checks={"cuda": lambda: _cext.cuda_device_error(x.device),
                         "triton": lambda: _backend.triton_device_error(x.device)},
        case_checks={"cuda": lambda: _cuda_case_error(x), "triton": lambda: _triton_case_error(x)},
    )


def qk_norm_rope_into(x, weight, cos, sin, eps, rope_offset, out, backend: str) -> None:
    """Write the normalised, rotated `x` into `out` (any strides, last dim contiguous) with a kernel backend:
    "cuda" or "triton"."""
    launch = _launch_cuda if backend == "cuda" else _launch_triton
    launch(x, weight, cos, sin, eps, rope_offset, out)


# ----------------------------------------------------------------------------------------------- custom op
@custom_op("dcgen::qk_norm_rope")
def _qk_norm_rope_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    eps: float, rope_offset: int, backend: str,
) -> torch.Tensor:
    chosen = select_backend(x, backend)
    if chosen == "reference":  # contiguous like the kernels' output and the fake (x may be a permuted view)
        return qk_norm_rope_reference(x, weight, cos, sin, eps, rope_offset).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    qk_norm_rope_into(x, weight, cos, sin, eps, rope_offset, out, chosen)
    return out


@_qk_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps, rope_offset, backend):
    return x.new_empty(x.shape)


register_reference_autograd(_qk_norm_rope_op, qk_norm_rope_reference, n_tensor_inputs=4)


def qk_norm_rope(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    rope_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm over head_dim (times `weight`), then RoPE with rows `rope_offset:rope_offset+S` of cos/sin.

    x: (B, S, H, D) in fp32/bf16/fp16, last dim contiguous (strided views of a fused projection are fine).
    weight: (D,) or None (no affine). cos, sin: (rows, D) or both None (no RoPE).
    Returns a contiguous (B, S, H, D) tensor in x's dtype; the math runs in fp32.
    """
    _backend.check_backend_name(backend)
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    _validate(x, weight, cos, sin, eps, rope_offset)
    return call_op(_qk_norm_rope_op, x, weight, cos, sin, eps, rope_offset, backend)
