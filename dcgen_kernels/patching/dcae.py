"""DC-AE family (`AutoencoderDC`): ResBlock's channel RMSNorm + residual -> one `channel_rms_norm` pass.

Its EfficientViT blocks are SANA-family modules (GLUMBConv, SanaMultiscaleLinearAttention): see sana.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import warn_once
from ..ops.channel_rms_norm import channel_rms_norm, layout
from ._instance import backend_of, qualified_type, replace_forward, restore_forward, stock_when_unfusable

FAMILY = "dcae"
SUPPORTED = "AutoencoderDC: ResBlock with rms_norm"


def _res_block_class():
    try:
        from diffusers.models.autoencoders.autoencoder_dc import ResBlock
    except ImportError:
        return None
    return ResBlock


def _skip_reason(block) -> Optional[str]:
    from diffusers.models.normalization import RMSNorm

    if block.norm_type != "rms_norm":
        return f"norm_type {block.norm_type!r} (only rms_norm is fused)"
    norm = block._modules["norm"]  # read per call: the dict is ~15x faster than the attribute lookup
    if type(norm) is not RMSNorm:
        return f"its norm is {qualified_type(norm)}, not diffusers' RMSNorm"
    return None


@stock_when_unfusable(calls=("conv1", "conv2", "nonlinearity"), unfusable=_skip_reason, tokens=False)
def _res_block_forward(self, hidden_states):
    x = self.conv2(self.nonlinearity(self.conv1(hidden_states)))
    reason = _fused_tail_error(x, hidden_states, self.norm)
    if reason:
        warn_once(f"dcae-tail:{reason}", f"dcgen_kernels: DC-AE ResBlock runs diffusers' norm + residual because "
                                         f"{reason}")
        return self.norm(x.movedim(1, -1)).movedim(-1, 1) + hidden_states
    return channel_rms_norm(x, self.norm.weight, self.norm.bias, hidden_states, eps=float(self.norm.eps),
                            backend=backend_of(self))


def _fused_tail_error(x: torch.Tensor, residual: torch.Tensor, norm) -> Optional[str]:
    """Why the fused norm + residual cannot stand in for stock's tail here, or None."""
    memory_format = layout(x)
    if memory_format is None or not residual.is_contiguous(memory_format=memory_format):
        return "its conv output and residual are not both contiguous NCHW or both channels-last"
    dtypes = {x.dtype, residual.dtype} | {p.dtype for p in (norm.weight, norm.bias) if p is not None}
    if len(dtypes) > 1:  # stock promotes (e.g. bf16 convs and fp32 weights under autocast)
        return f"its conv output, residual and norm weight have different dtypes {sorted(map(str, dtypes))}"
    return None


def patch_module(module: torch.nn.Module, backend: str):
    """(replaced class name, reason it was skipped or None) for a module this family handles, else None."""
    cls = _res_block_class()
    if cls is None or type(module) is not cls:
        return None
    reason = _skip_reason(module)
    if reason is None:
        replace_forward(module, _res_block_forward, backend)
    return cls.__name__, reason


def unpatch_module(module: torch.nn.Module) -> bool:
    return restore_forward(module)
