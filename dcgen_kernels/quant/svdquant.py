"""SVDQuant NVFP4 linear layers (Li et al., 2024, arXiv 2411.05007), in nunchaku's conventions.

Offline, for an nn.Linear y = x W^T + b with W [N, K]:
1. smoothing factors s [K] (SmoothQuant, alpha = 0.5): s_k = amax|x_k|^a / amax|W_:,k|^(1-a) from calibration
   activations, or weight-only s_k = amax|W_:,k|^-(1-a) without them; normalised to geometric mean 1.
   x W^T = (x / s)(W diag(s))^T moves activation outliers into the weight.
2. low-rank branch from the SVD of the smoothed weight: (W diag(s))^T [K, N] ~ L1 [K, R] L2 [R, N] (the top R
   singular directions, in 16 bits), so the outliers now in the weight leave the part that gets quantized.
   Exact SVD when min(K, N) <= 1024, else a seeded randomized SVD (R + 16 columns, 4 power iterations).
3. residual W diag(s) - (L1 L2)^T quantized to NVFP4 (`quantize_nvfp4`, one fp32 tensor scale).

Forward: y = Q(x / s) Q(residual)^T + (x @ lora_down) @ lora_up + b, where lora_down = diag(1/s) L1 acts on the
unsmoothed x (as nunchaku stores `proj_down`), so one read of x by the fused quantizer gives the 4-bit
activations, their scales and the down-projection; the GEMM's epilogue adds the up-projection and the bias.

activations="bf16" (W4A16): the same decomposition (smoothing still matters: outlier input channels amplify the
weight's quantization error, as in AWQ); activations stay 16-bit. Small M: the Triton GEMM divides them by s
in registers and dequantizes the NVFP4 residual in-kernel; M >= 1024 on a GPU: one pass builds the effective
16-bit weight residual / s + (lora_down lora_up)^T in a scratch buffer for one cuBLAS GEMM (see ops/nvfp4_gemm).

Inference only: the ops have no autograd formula (backward raises).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _backend
from ..ops._common import FLOAT_DTYPES, autocast_dtype
from ..ops.nvfp4_gemm import nvfp4_gemm, nvfp4_w4a16_gemm
from ..ops.nvfp4_quantize import E2M1_MAX, E4M3_MAX, GROUP_SIZE, quantize_nvfp4, quantize_nvfp4_activations
from ._storage import KeepsQuantizedDtypes, check_quantizable_weight

__all__ = ["SVDQuantLinear", "svdquant_decompose", "smoothing_factors", "svdquant_error_report"]

ACTIVATION_MODES = ("nvfp4", "bf16")
SMOOTH_ALPHA = 0.5
# Calibrated activation tensor scale = HEADROOM * amax / (6 * 448): inputs up to 8x the calibration amax still
# fit the E4M3 group scales (a static scale saturates beyond that); E4M3's 17 binades leave room below.
INPUT_SCALE_HEADROOM = 8.0
_SMOOTH_CLAMP = (1e-4, 1e4)
EXACT_SVD_MAX_DIM = 1024
SVD_OVERSAMPLING = 16
SVD_POWER_ITERS = 4


# ----------------------------------------------------------------------------------------------- offline math
def smoothing_factors(weight: torch.Tensor, calibration: Optional[torch.Tensor] = None,
                      alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """Per-input-channel smoothing s [K] (fp32, geometric mean 1) for weight [N, K]; see the module docstring."""
    w_amax = weight.detach().float().abs().amax(0).clamp(min=1e-8)
    log_s = -(1 - alpha) * w_amax.log()
    if calibration is not None:
        x_amax = calibration.detach().float().abs().reshape(-1, weight.shape[1]).amax(0).clamp(min=1e-8)
        log_s = log_s + alpha * x_amax.log()
    return (log_s - log_s.mean()).exp().clamp(*_SMOOTH_CLAMP)


def _top_singular(matrix: torch.Tensor, rank: int):
    """(U [K, r], S [r], Vh [r, N]) of the top `rank` singular triplets. Exact SVD up to 1024 on the short side;
    above, a randomized range finder with oversampling and power iterations (a FLUX-12B weight takes seconds
    with a full SVD on a GPU, 400+ of them minutes), seeded and run on a forked RNG so that quantizing a model
    is reproducible and leaves the caller's random state alone."""
    if min(matrix.shape) <= EXACT_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(matrix, q=min(rank + SVD_OVERSAMPLING, min(matrix.shape)), niter=SVD_POWER_ITERS)
    return U[:, :rank], S[:rank], V[:, :rank].t()


def svdquant_decompose(weight: torch.Tensor, rank: int, smooth: torch.Tensor):
    """(L1 [K, R], L2 [R, N], residual [N, K]) in fp32 with (W diag(smooth))^T = L1 L2 + residual^T."""
    smoothed_t = (weight.detach().float() * smooth.float()).t()  # [K, N]
    if rank == 0:
        return smoothed_t.new_zeros(smoothed_t.shape[0], 0), smoothed_t.new_zeros(0, smoothed_t.shape[1]), \
            smoothed_t.t().contiguous()
    U, S, Vh = _top_singular(smoothed_t, rank)
    root = S.sqrt()  # split the singular values evenly: both factors stay in 16-bit range
    l1, l2 = U * root, root[:, None] * Vh
    return l1, l2, (smoothed_t - l1 @ l2).t().contiguous()


# ----------------------------------------------------------------------------------------------- module
class SVDQuantLinear(KeepsQuantizedDtypes):
    """NVFP4 SVDQuant linear: W4A4 (activations="nvfp4") or W4A16 (activations="bf16").

    Buffers (state_dict round-trips; no parameters): qweight uint8 [N, ceil(K/16)*8], wscales float8_e4m3fn
    [N, ceil(K/16)], wtscale fp32 [] (weight tensor scale), input_scale fp32 [] (activation tensor scale, W4A4),
    smooth fp32 [K], lora_down [K, R] and lora_up [R, N] in the layer dtype, bias [N] or None. `model.to(dtype)`
    casts the layer-dtype buffers only.
    Build one with `SVDQuantLinear.from_linear(linear, ...)`; the constructor makes empty buffers to load into.
    """

    QUANTIZED_STATE = ("wscales", "wtscale", "input_scale", "smooth")

    def __init__(self, in_features: int, out_features: int, rank: int = 32, bias: bool = True,
                 activations: str = "nvfp4", dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None, backend: str = "auto"):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be an int in [0, min(in_features, out_features) = "
                             f"{min(in_features, out_features)}], got {rank!r}")
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        _backend.check_backend_name(backend)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.activations, self.backend = activations, backend
        groups = math.ceil(in_features / GROUP_SIZE)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, groups * GROUP_SIZE // 2, dtype=torch.uint8, **kw))
        self.register_buffer("wscales", torch.zeros(out_features, groups, dtype=torch.float8_e4m3fn, **kw))
        self.register_buffer("wtscale", torch.ones((), dtype=torch.float32, **kw))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, **kw))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, **kw))
        self.register_buffer("lora_down", torch.zeros(in_features, rank, dtype=dtype, **kw))
        self.register_buffer("lora_up", torch.zeros(rank, out_features, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        # Optional external kernel for the same layer (nunchaku's, see quant/nunchaku.py): a callable x -> y used
        # for CUDA inputs under backend "auto"/"cuda". A plain attribute, so state_dict holds only our buffers.
        self.external_kernel = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 32, calibration: Optional[torch.Tensor] = None,
                    activations: str = "nvfp4", backend: str = "auto") -> "SVDQuantLinear":
        """Quantize `linear` (weights in fp32 math on its device). calibration: sample inputs [..., K] for the
        smoothing factors and the activation tensor scale (W4A4: 8x headroom over the calibration amax);
        without it smoothing is weight-only and the activation tensor scale is 1.0 (as nunchaku's)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_quantizable_weight(linear)
        weight = linear.weight
        N, K = weight.shape
        if calibration is not None:
            if not isinstance(calibration, torch.Tensor) or calibration.shape[-1:] != (K,) or not calibration.numel():
                raise ValueError(f"calibration must be a non-empty tensor [..., K={K}], got "
                                 f"{getattr(calibration, 'shape', type(calibration).__name__)}")
            if not torch.isfinite(calibration).all():  # an fp16 overflow upstream: NaN smoothing factors
                raise ValueError("calibration contains non-finite values (inf / NaN); pass finite sample inputs")
        layer = cls(K, N, rank, linear.bias is not None, activations, weight.dtype, weight.device, backend)
        layer._load_decomposition(weight, linear.bias, smoothing_factors(weight, calibration), calibration)
        return layer

    @torch.no_grad()
    def _load_decomposition(self, weight, bias, smooth, calibration=None) -> None:
        """Fill the buffers from an fp32 SVD of W diag(smooth) (also used by tests to ablate smoothing)."""
        l1, l2, residual = svdquant_decompose(weight, self.rank, smooth)
        packed, scales, tscale = quantize_nvfp4(residual, backend="reference")
        self.qweight.copy_(packed)
        self.wscales.copy_(scales)
        self.wtscale.copy_(tscale)
        self.smooth.copy_(smooth)
        self.lora_down.copy_(l1 / smooth[:, None])  # acts on the unsmoothed input
        self.lora_up.copy_(l2)
        if bias is not None:
            self.bias.copy_(bias.detach())
        if calibration is not None and self.activations == "nvfp4":
            amax = (calibration.detach().float().reshape(-1, self.in_features) / smooth).abs().amax()
            self.input_scale.fill_(INPUT_SCALE_HEADROOM * float(amax) / (E2M1_MAX * E4M3_MAX) if float(amax) > 0
                                   else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got {tuple(x.shape)}")
        cast = autocast_dtype(x)
        if cast is not None and cast != x.dtype:  # as nn.Linear under autocast: in and out in the autocast dtype
            x = x.to(cast)
        if self.external_kernel is not None and x.is_cuda and _backend.requested(self.backend) in ("auto", "cuda"):
            return self.external_kernel(x)
        dtype = x.dtype
        lora_up = self.lora_up.to(dtype) if self.rank else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        if self.activations == "nvfp4":
            packed, scales, lora_act = quantize_nvfp4_activations(
                x, self.smooth, self.lora_down.to(dtype) if self.rank else None, self.input_scale,
                backend=self.backend)
            return nvfp4_gemm(packed, scales, self.input_scale, self.qweight, self.wscales, self.wtscale,
                              lora_act=lora_act if self.rank else None, lora_up=lora_up, bias=bias, out_dtype=dtype,
                              backend=self.backend)
        return nvfp4_w4a16_gemm(x, self.qweight, self.wscales, self.wtscale, smooth=self.smooth,
                                lora_down=self.lora_down.to(dtype) if self.rank else None, lora_up=lora_up, bias=bias,
                                backend=self.backend)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer applies when its activations are not quantized."""
        from ..ops.nvfp4_quantize import dequantize_nvfp4_reference

        residual = dequantize_nvfp4_reference(self.qweight, self.wscales, self.wtscale, k=self.in_features)
        low_rank = (self.lora_down.float() @ self.lora_up.float()).t()
        return residual / self.smooth + low_rank

    def extra_repr(self) -> str:
        external = "" if self.external_kernel is None else f", external_kernel={type(self.external_kernel).__name__}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"activations={self.activations}, bias={self.bias is not None}, backend={self.backend}{external}")


# ----------------------------------------------------------------------------------------------- error report
@torch.no_grad()
def svdquant_error_report(linear: nn.Linear, x: torch.Tensor, ranks: Sequence[int] = (0, 16, 32, 64),
                          calibration: Optional[torch.Tensor] = None, activations: str = "nvfp4",
                          backend: str = "auto") -> dict:
    """Relative L2 error of SVDQuantLinear outputs on x against the fp32 linear, per rank.

    Returns {rank: {"with_lowrank": err, "without_lowrank": err}}: the layer built with that rank (residual
    quantized, branch in 16 bits), and the same layer with its low-rank branch dropped (only Q(x / s) Q(residual)^T
    + bias: what the branch contributes; equal at rank 0). calibration defaults to x itself. Ranks above
    min(K, N) are skipped.
    """
    reference = torch.nn.functional.linear(x.float(), linear.weight.float(),
                                           None if linear.bias is None else linear.bias.float())

    def error(layer: SVDQuantLinear) -> float:
        out = layer(x.to(linear.weight.dtype)).double()
        return ((out - reference.double()).norm() / reference.double().norm()).item()

    report = {}
    for rank in ranks:
        if rank > min(linear.in_features, linear.out_features):
            continue
        layer = SVDQuantLinear.from_linear(linear, rank=rank, calibration=x if calibration is None else calibration,
                                           activations=activations, backend=backend)
        with_lowrank = error(layer)
        layer.lora_up.zero_()
        report[rank] = {"with_lowrank": with_lowrank, "without_lowrank": error(layer)}
    return report
