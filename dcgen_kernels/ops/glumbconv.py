"""Op `glumbconv`: SANA's Mix-FFN (diffusers `GLUMBConv` without its optional RMSNorm and residual) on tokens.

Stock runs 1x1 conv -> SiLU -> 3x3 depthwise conv -> chunk -> x * SiLU(gate) -> 1x1 conv on an NCHW view,
with separate passes over the (B, 2*hid, H, W) activations for the SiLU, the conv, the chunk and the gating.
Here the 1x1 convs are cuBLAS GEMMs on the tokens (the first with its bias fused in the cuBLASLt epilogue),
and one Triton kernel reads the GEMM's channels-last output once, applies the SiLU on load, the depthwise
conv with its bias and the gating, and writes the (B, N, hid) input of the second GEMM. That kernel's block
config is autotuned: the first call per (H, W, hid, dtype) times six configs (about a second, plus their one-time
compilation), so warm a model up before capturing it in a CUDA graph (patch(cuda_graph=True) does).

Backends (auto order triton -> reference; there is no cuda backend):
- triton: torch GEMMs around the fused depthwise + GLU kernel; fp32, bf16 and fp16.
- reference: fp32 torch convs in diffusers' order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ._common import call_op, cdiv, check_tensor, custom_op, register_reference_autograd

__all__ = ["depthwise_glu", "depthwise_glu_reference", "glumbconv", "glumbconv_reference"]


# ----------------------------------------------------------------------------------------------- reference
def glumbconv_reference(x, height: int, width: int, inverted_weight, inverted_bias, depth_weight, depth_bias,
                        point_weight):
    """fp32 diffusers GLUMBConv (norm_type=None, residual_connection=False) on (B, N, C) tokens."""
    h = x.float().unflatten(1, (height, width)).permute(0, 3, 1, 2)
    h = F.silu(F.conv2d(h, inverted_weight.float(), inverted_bias.float()))
    h = F.conv2d(h, depth_weight.float(), depth_bias.float(), padding=1, groups=h.shape[1])
    value, gate = h.chunk(2, dim=1)
    h = F.conv2d(value * F.silu(gate), point_weight.float())
    # conv2d may keep a token view of an NCHW map channels-first: the result is contiguous (B, N, C) either way
    return h.flatten(2).transpose(1, 2).to(x.dtype).contiguous()


def depthwise_glu_reference(pre, height: int, width: int, depth_weight, depth_bias):
    """fp32 middle of GLUMBConv on (B, N, 2*hid) tokens: value * SiLU(gate), [value, gate] =
    depthwise3x3(SiLU(pre)) + bias; returns (B, N, hid) in pre's dtype."""
    h = F.silu(pre.float().unflatten(1, (height, width)).permute(0, 3, 1, 2))
    value, gate = F.conv2d(h, depth_weight.float(), depth_bias.float(), padding=1, groups=h.shape[1]).chunk(2, dim=1)
    return (value * F.silu(gate)).flatten(2).transpose(1, 2).to(pre.dtype).contiguous()


def _depthwise_glu_reference_tensors_first(pre, depth_weight, depth_bias, height, width):
    return depthwise_glu_reference(pre, height, width, depth_weight, depth_bias)


def _reference_tensors_first(x, inverted_weight, inverted_bias, depth_weight, depth_bias, point_weight,
                             height, width):
    return glumbconv_reference(x, height, width, inverted_weight, inverted_bias, depth_weight, depth_bias,
                               point_weight)


# ----------------------------------------------------------------------------------------------- validation
def _validate(x, height, width, inverted_weight, inverted_bias, depth_weight, depth_bias, point_weight) -> None:
    check_tensor("x", x, ndim=3)
    B, N, C = x.shape
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if height * width != N:
        raise ValueError(f"x must hold height * width = {height} * {width} = {height * width} tokens "
                         f"(x.shape[1]), got {N}")
    same = dict(dtypes=(x.dtype,), device=x.device)
    check_tensor("inverted_weight", inverted_weight, ndim=4, **same)
    hid2 = inverted_weight.shape[0]
    if tuple(inverted_weight.shape[1:]) != (C, 1, 1) or hid2 % 2 or not hid2:
        raise ValueError(f"inverted_weight must have shape (2*hidden, C={C}, 1, 1) with hidden >= 1, "
                         f"got {tuple(inverted_weight.shape)}")
    check_tensor("inverted_bias", inverted_bias, shape=(hid2,), **same)
    check_tensor("depth_weight", depth_weight, shape=(hid2, 1, 3, 3), **same)
    check_tensor("depth_bias", depth_bias, shape=(hid2,), **same)
    check_tensor("point_weight", point_weight, ndim=4, **same)
    if tuple(point_weight.shape[1:]) != (hid2 // 2, 1, 1) or not point_weight.shape[0]:
        raise ValueError(f"point_weight must have shape (C_out >= 1, hidden={hid2 // 2}, 1, 1), "
                         f"got {tuple(point_weight.shape)}")


def _validate_depthwise_glu(pre, height, width, depth_weight, depth_bias) -> None:
    check_tensor("pre", pre, ndim=3)
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if height * width != pre.shape[1]:
        raise ValueError(f"pre must hold height * width = {height * width} tokens (pre.shape[1]), got {pre.shape[1]}")
    hid2 = pre.shape[2]
    if hid2 % 2:
        raise ValueError(f"pre must have an even channel count (2*hidden), got {hid2}")
    same = dict(dtypes=(pre.dtype,), device=pre.device)
    check_tensor("depth_weight", depth_weight, shape=(hid2, 1, 3, 3), **same)
    check_tensor("depth_bias", depth_bias, shape=(hid2,), **same)


# ----------------------------------------------------------------------------------------------- triton
def _launch_depthwise_glu(pre, height, width, depth_weight, depth_bias, out, config=None):
    """out (B*N, hid) = value * SiLU(gate) of depthwise3x3(SiLU(pre)) + bias, pre (B*N, 2*hid) channels-last.
    The block config is autotuned on the first call per shape and dtype (triton_kernels/glumbconv.py); `config`
    (a triton.Config of that list) runs one without tuning, for tests. 16-bit outputs take the kernel's tanh.approx
    SiLU (its error is under their rounding; fp32 keeps the exponential form)."""
    from ..triton_kernels.glumbconv import STRIP_ROWS, depthwise_glu_kernel

    hidden = pre.shape[1] // 2
    batch = pre.shape[0] // (height * width)
    args = (pre, depth_weight.contiguous(), depth_bias.contiguous(), out, height, width, hidden)
    tanh_silu = out.dtype in (torch.bfloat16, torch.float16)
    if config is None:
        grid = lambda meta: (cdiv(hidden, meta["BLOCK_C"]), cdiv(height, STRIP_ROWS.value), batch)  # noqa: E731
        depthwise_glu_kernel[grid](*args, TANH_SILU=tanh_silu)
    else:
        grid = (cdiv(hidden, config.kwargs["BLOCK_C"]), cdiv(height, STRIP_ROWS.value), batch)
        depthwise_glu_kernel.fn[grid](*args, **config.kwargs, num_warps=config.num_warps, TANH_SILU=tanh_silu)


def _triton_forward(x, height, width, inverted_weight, inverted_bias, depth_weight, depth_bias, point_weight):
    B, N, C = x.shape
    hidden = inverted_weight.shape[0] // 2
    # cuBLASLt fuses the bias; the SiLU is applied by the depthwise kernel as it loads.
    pre = torch.addmm(inverted_bias, x.reshape(B * N, C), inverted_weight.reshape(2 * hidden, C).t())
    gated = torch.empty(B * N, hidden, dtype=x.dtype, device=x.device)
    _launch_depthwise_glu(pre, height, width, depth_weight, depth_bias, gated)
    return torch.mm(gated, point_weight.reshape(-1, hidden).t()).view(B, N, -1)


def select_backend(x: torch.Tensor, backend: str) -> str:
    return _backend.select(
        "glumbconv",
        backend,
        platform_checks={"triton": lambda: _backend.triton_device_error(x.device)},
        case_checks={},
    )


# ----------------------------------------------------------------------------------------------- custom op
@custom_op("dcgen::glumbconv")
def _glumbconv_op(
    x: torch.Tensor, inverted_weight: torch.Tensor, inverted_bias: torch.Tensor, depth_weight: torch.Tensor,
    depth_bias: torch.Tensor, point_weight: torch.Tensor, height: int, width: int, backend: str,
) -> torch.Tensor:
    args = (x, height, width, inverted_weight, inverted_bias, depth_weight, depth_bias, point_weight)
    if x.shape[0] == 0:
        return x.new_empty(0, x.shape[1], point_weight.shape[0])
    if select_backend(x, backend) == "triton":
        return _triton_forward(*args)
    return glumbconv_reference(*args)


@_glumbconv_op.register_fake
def _(x, inverted_weight, inverted_bias, depth_weight, depth_bias, point_weight, height, width, backend):
    return x.new_empty(x.shape[0], x.shape[1], point_weight.shape[0])


register_reference_autograd(_glumbconv_op, _reference_tensors_first, n_tensor_inputs=6)


@custom_op("dcgen::depthwise_glu")
def _depthwise_glu_op(pre: torch.Tensor, depth_weight: torch.Tensor, depth_bias: torch.Tensor, height: int,
                      width: int, backend: str) -> torch.Tensor:
    batch, tokens, hid2 = pre.shape
    if pre.numel() and select_backend(pre, backend) == "triton":
        flat = pre.reshape(batch * tokens, hid2).contiguous()  # a no-op for a GEMM's output
        out = flat.new_empty(batch * tokens, hid2 // 2)
        _launch_depthwise_glu(flat, height, width, depth_weight, depth_bias, out)
        return out.view(batch, tokens, hid2 // 2)
    return depthwise_glu_reference(pre, height, width, depth_weight, depth_bias)


@_depthwise_glu_op.register_fake
def _(pre, depth_weight, depth_bias, height, width, backend):
    return pre.new_empty(pre.shape[0], pre.shape[1], pre.shape[2] // 2)


register_reference_autograd(_depthwise_glu_op, _depthwise_glu_reference_tensors_first, n_tensor_inputs=3)


def depthwise_glu(pre: torch.Tensor, height: int, width: int, depth_weight: torch.Tensor, depth_bias: torch.Tensor,
                  *, backend: str = "auto") -> torch.Tensor:
    """GLUMBConv's middle between its two 1x1 convs (used when those are quantized GEMMs): value * SiLU(gate),
    [value, gate] = conv_depth(SiLU(pre)), on (B, N = height*width, 2*hid) tokens in fp32/bf16/fp16 with the
    depthwise weight (2*hid, 1, 3, 3) and bias (2*hid,) in pre's dtype. Returns (B, N, hid) in pre's dtype, computed
    in fp32 (the Triton kernel of `glumbconv`, else the reference)."""
    _backend.check_backend_name(backend)
    _validate_depthwise_glu(pre, height, width, depth_weight, depth_bias)
    return call_op(_depthwise_glu_op, pre, depth_weight, depth_bias, height, width, backend)


def glumbconv(
    x: torch.Tensor,
    height: int,
    width: int,
    inverted_weight: torch.Tensor,
    inverted_bias: torch.Tensor,
    depth_weight: torch.Tensor,
    depth_bias: torch.Tensor,
    point_weight: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """GLUMBConv on tokens: conv_point(value * SiLU(gate)), [value, gate] = conv_depth(SiLU(conv_inverted(x))).

    x: (B, N = height*width, C) tokens, row-major over (h, w) like SANA's `unflatten(1, (height, width))`;
    any strides (a non-viewable x is copied once for the GEMM). Weights as diffusers' Conv2d stores them, all in
    x's dtype and on x's device: inverted_weight (2*hid, C, 1, 1), inverted_bias (2*hid,), depth_weight
    (2*hid, 1, 3, 3), depth_bias (2*hid,), point_weight (C_out, hid, 1, 1).
    Returns contiguous (B, N, C_out) in x's dtype. The GEMMs accumulate in fp32 and round their outputs to x's
    dtype; the depthwise conv and gating run in fp32. Gradients flow through the fp32 reference.
    """
    _backend.check_backend_name(backend)
    _validate(x, height, width, inverted_weight, inverted_bias, depth_weight, depth_bias, point_weight)
    return call_op(_glumbconv_op, x, inverted_weight, inverted_bias, depth_weight, depth_bias, point_weight,
                   height, width, backend)
