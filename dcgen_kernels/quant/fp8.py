"""`FP8Linear`: an nn.Linear with FP8 E4M3 weights (per-output-channel fp32 scales) and FP8 activations.

The forward takes either a tensor, quantized per token on the way in (one `quantize_fp8` pass), or an
`FP8Activation` a producer kernel already quantized (adaLN-modulate, the GELU/concat quantize pass), and runs
`fp8_linear` (torch._scaled_mm's row-wise scaled FP8 GEMM on sm_90+, the Triton fp8 kernel elsewhere). Weights,
scales and bias are buffers, so `state_dict` / safetensors round-trip them; the module is for inference (no gradients).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .. import _backend
from ..ops._common import FLOAT_DTYPES, autocast_dtype, check_tensor
from ..ops.fp8_linear import FP8_DTYPE, FP8Activation, dequantize_fp8, fp8_linear, quantize_weight_fp8
from ._storage import KeepsQuantizedDtypes, check_quantizable_weight

__all__ = ["FP8Linear", "FP8Activation"]


class FP8Linear(KeepsQuantizedDtypes):
    """y = residual + gate * act(x W^T + b) with W and x in FP8 E4M3; activation/gate/residual are optional
    keyword arguments fused into the GEMM epilogue (plain `module(x)` is a drop-in for nn.Linear). `model.to(dtype)`
    casts the bias only."""

    QUANTIZED_STATE = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: torch.dtype = torch.bfloat16,
                 device=None, backend: str = "auto"):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype (of the bias) must be one of {FLOAT_DTYPES}, got {dtype}")
        _backend.check_backend_name(backend)
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, backend: str = "auto") -> "FP8Linear":
        """Quantize `linear`'s weight per output channel (amax / 448); the bias keeps the linear's dtype."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_quantizable_weight(linear)
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=weight.dtype,
                     device=weight.device, backend=backend)
        with torch.no_grad():
            module.weight, module.weight_scale = quantize_weight_fp8(weight)
            if linear.bias is not None:
                module.bias = linear.bias.detach().clone()
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module multiplies by, in fp32 (N, K)."""
        return dequantize_fp8(self.weight, self.weight_scale)

    def forward(self, x: Union[torch.Tensor, FP8Activation], *, activation: Optional[str] = None,
                gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = x if isinstance(x, torch.Tensor) else x.data if isinstance(x, FP8Activation) else None
        width = rows.shape[-1] if rows is not None and rows.dim() else None
        if width != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features} (a tensor or FP8Activation), "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        # The output dtype stock's code would get: nn.Linear's (the autocast dtype under autocast), promoted by
        # `residual + gate * y`. fp8_linear returns x's dtype: x is cast, or relabelled when already quantized.
        out_dtype = autocast_dtype(x) or x.dtype
        for name, extra in (("gate", gate), ("residual", residual)):
            if extra is not None:  # checked here, by name: the promotion below would cast x to a bad dtype
                out_dtype = torch.promote_types(out_dtype, check_tensor(name, extra).dtype)
        if out_dtype != x.dtype:
            x = x.to(out_dtype) if isinstance(x, torch.Tensor) else dataclasses.replace(x, dtype=out_dtype)
        if isinstance(x, torch.Tensor) and x.stride(-1) != 1:
            x = x.contiguous()  # e.g. diffusers' transposed patch-embedding tokens: the quantizer needs stride 1
        if isinstance(x, torch.Tensor) and x.dim() not in (2, 3) and gate is None and residual is None:
            # any leading shape, as nn.Linear: the op takes (M, K) or (B, S, K)
            lead = x.shape[:-1]
            out = fp8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale, self.bias,
                             activation=activation, backend=self.backend)
            return out.reshape(*lead, out.shape[-1])
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, activation=activation, gate=gate,
                          residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=float8_e4m3fn per-channel, activations=float8_e4m3fn per-token, backend={self.backend!r}")
