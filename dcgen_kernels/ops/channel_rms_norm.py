"""Op `channel_rms_norm`: RMSNorm over the channels of an NCHW map, times weight, plus bias, plus a residual.

DC-AE's ResBlock (and GLUMBConv) normalise over channels by moving them last, which on an NCHW tensor makes
diffusers' RMSNorm run ~7 elementwise passes (several in fp32) over the largest activations of the decoder,
then adds the residual in another pass. This op reads the map and the residual once and writes once.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ._common import call_op, cdiv, check_positive_eps, check_tensor, custom_op, register_reference_autograd

__all__ = ["channel_rms_norm", "channel_rms_norm_reference"]

# (channels, pixels) per tile, by layout. NCHW: 8 x 256 (80 registers on sm_90, 16-byte loads per lane along the
# pixels). Channels-last: 64 x 32, so each pixel's channels are one 128-byte run (bf16); unmeasured on a GPU.
_TILE = {"nchw": (8, 256), "channels_last": (64, 32)}


def channel_rms_norm_reference(x, weight=None, bias=None, residual=None, eps: float = 1e-5):
    """fp32: RMSNorm over dim 1 of (B, C, H, W), affine, + residual; output in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()[None, :, None, None]
    if bias is not None:
        y = y + bias.float()[None, :, None, None]
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def layout(x: torch.Tensor) -> Optional[torch.memory_format]:
    """contiguous_format (NCHW first, when both hold), channels_last, or None for any other layout. Either way the
    elements sit where the canonical strides put them (a size-1 dim's stride is never used)."""
    for memory_format in (torch.contiguous_format, torch.channels_last):
        if x.is_contiguous(memory_format=memory_format):
            return memory_format
    return None


def _validate(x, weight, bias, residual, eps) -> None:
    check_tensor("x", x, ndim=4)
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, shape=(C,), device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=x.shape, dtypes=(x.dtype,), device=x.device)
    check_positive_eps(eps)


def _launch_triton(x, weight, bias, residual, eps, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    from ..triton_kernels.channel_rms_norm import channel_rms_norm_kernel

    B, C, H, W = x.shape
    memory_format = layout(x)
    if out is None:  # x's layout: x, residual and out are addressed with the same canonical strides
        out = torch.empty_like(x, memory_format=memory_format)
    # The kernel reads the (C,) weight and bias with stride 1.
    weight, bias = (t.contiguous() if t is not None else None for t in (weight, bias))
    if memory_format == torch.channels_last:
        block_c, block_hw = _TILE["channels_last"]
        strides = (H * W * C, 1, C)  # batch, channel, pixel
    else:
        block_c, block_hw = _TILE["nchw"]
        strides = (C * H * W, H * W, 1)
    channel_rms_norm_kernel[(cdiv(H * W, block_hw), B)](
        x, weight, bias, residual, out, C, H * W, eps, *strides,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4,
    )
    return out


def _triton_layout_error(x: torch.Tensor, residual: Optional[torch.Tensor]) -> Optional[str]:
    """The kernel addresses x, residual and its output with one set of canonical NCHW or channels-last strides."""
    if layout(x) is None:
        return f"x is neither contiguous NCHW nor channels-last (strides {x.stride()})"
    if residual is not None and not residual.is_contiguous(memory_format=layout(x)):
        return f"residual's strides {residual.stride()} are not x's layout ({layout(x)})"
    return None


@custom_op("dcgen::channel_rms_norm")
def _channel_rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor], eps: float, backend: str) -> torch.Tensor:
    chosen = _backend.select("channel_rms_norm", backend,
                             platform_checks={"triton": lambda: _backend.triton_device_error(x.device)},
                             case_checks={"triton": lambda: _triton_layout_error(x, residual)})
    if chosen == "triton":
        return _launch_triton(x, weight, bias, residual, eps)
    # in x's layout with canonical strides, like the kernel's output and the fake
    out = channel_rms_norm_reference(x, weight, bias, residual, eps)
    return out.contiguous(memory_format=layout(x) or torch.contiguous_format)


@_channel_rms_norm_op.register_fake
def _(x, weight, bias, residual, eps, backend):
    return torch.empty_like(x, memory_format=layout(x) or torch.contiguous_format)


register_reference_autograd(_channel_rms_norm_op, channel_rms_norm_reference, n_tensor_inputs=4)


def channel_rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm over channels of a (B, C, H, W) `x` (fp32 statistics), `* weight + bias` (each (C,) or None),
    `+ residual` (x's shape and dtype, or None). Returns x's dtype, in x's layout where x is contiguous NCHW or
    channels-last (else contiguous). The Triton kernel takes those two layouts, with a residual in x's; any other
    strides run the reference with a one-time warning."""
    _backend.check_backend_name(backend)
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    _validate(x, weight, bias, residual, eps)
    return call_op(_channel_rms_norm_op, x, weight, bias, residual, eps, backend)
