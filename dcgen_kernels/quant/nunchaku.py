"""Import SVDQuant NVFP4 checkpoints in nunchaku's layout (mit-han-lab/nunchaku) into `SVDQuantLinear`.

nunchaku (the SVDQuant engine; not the unrelated PyPI package of the same name) stores per linear layer:

| nunchaku tensor (module name / raw checkpoint name) | shape, dtype             | maps to SVDQuantLinear           |
| --------------------------------------------------- | ------------------------ | -------------------------------- |
| qweight                                             | [N, K/2] int8, MMA tiled | qweight [N, K/2] uint8 (untiled) |
| wscales                                             | [K/16, N] e4m3, tiled    | wscales [N, K/16] (untiled)      |
| wtscale (optional, default 1)                       | [1] bf16/fp16/fp32       | wtscale (fp32)                   |
| wcscales (optional per-channel, default 1)          | [N], tiled               | folded into wscales (see below)  |
| smooth_factor / smooth                              | [K], tiled               | smooth (fp32)                    |
| proj_down / lora_down                               | [K, R], tiled            | lora_down [K, R]                 |
| proj_up / lora_up                                   | [N, R], tiled            | lora_up [R, N] (transposed)      |
| bias                                                | [N], tiled               | bias                             |
| smooth_factor_orig / smooth_orig                    | [K], tiled               | not used by the forward pass     |

Semantics match: nunchaku computes y = alpha * wcscales * (Q(x / smooth) Q(W)^T) + bias + (x @ proj_down) @ proj_up^T
with the down-projection on the unsmoothed input (read from its fused quantize kernel), E2M1 codes in the standard
encoding (sign bit 3), E4M3 group scales over 16 input channels, and activations quantized with a tensor scale
of 1 (scale = amax / 6 per group): our input_scale is set to 1.0.

Layouts (from nunchaku's `NunchakuWeightPacker`, bits=4, warp_n=128; re-implemented here from its documented
index order, checked in tests against the store order tables in its comments):
- qweight: rows in tiles of 128 (8 packs x 2 x 8 lanes), K in tiles of 64 (2 packs x 4 lanes x 8 nibbles);
  each 32-bit word holds 8 consecutive K nibbles, element i in bits 4i..4i+3: within 4 bytes that is exactly our
  low-nibble-first byte order, so (un)tiling permutes 4-byte words, not nibbles.
- wscales: per 128-row tile and 64-K block, word (4 E4M3 scales of 4 consecutive K groups) n = s*32 + a*8 + b is
  stored at position (b*4 + a)*4 + s (lane b*4 + a loads words s = 0..3).
- proj_down / proj_up: 16 x 16 bf16 packs (2 x 8 lanes along the "n" side, 2 x 4 lanes x 2 values along "k").
- bias, smooth_factor, wcscales (vectors; `pack_scale(..., group_size=-1)`): within each tile of 128 values, value
  a*16 + b*8 + c*2 + d (a < 8, b < 2, c < 4, d < 2) is stored at a*16 + c*4 + b*2 + d.
Layers stored otherwise (nunchaku's AWQ W4A16 adaLN linears: int32 qweight with wzeros) are not NVFP4 SVDQuant
layers: `import_nunchaku_state_dict` leaves them to the caller.

Assumptions that remain: K and N multiples of 128 and R a multiple of 16, as nunchaku pads them (a padded
checkpoint imports with its padded sizes); nunchaku quantizes activations with the reciprocal of the unrounded
group scale where we use the rounded one (differences of one E2M1 step in rare elements); a non-unit
`wcscales` is folded in, max(wcscales) into the fp32 tensor scale and wcscales / max (<= 1, so nothing saturates)
into the E4M3 group scales, which costs one more E4M3 rounding per group scale and underflow for channels whose
wcscales is far below the max (a one-time warning says so).

`nunchaku_backend_error(device)` detects the real nunchaku (`nunchaku._C` importable, NVFP4 needs sm_120/121);
`to_nunchaku_module(tensors)` then builds nunchaku's own `SVDQW4A4Linear` on its kernels, and the importer
attaches it to the imported layer as its `external_kernel` (nunchaku_kernels="auto"). Its `wtscale` was a
Parameter until nunchaku 092e01e (2025-08-28) and is a plain float since (set by hand by nunchaku's own loader):
both are handled.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Mapping, Optional

import torch

from .._backend import warn_once
from ..ops.nvfp4_quantize import GROUP_SIZE, unsigned_e4m3_values
from .svdquant import SVDQuantLinear

__all__ = [
    "svdquant_linear_from_nunchaku", "svdquant_linear_to_nunchaku", "import_nunchaku_state_dict",
    "nunchaku_backend_error", "to_nunchaku_module", "pack_nunchaku_qweight", "unpack_nunchaku_qweight",
    "pack_nunchaku_wscales", "unpack_nunchaku_wscales", "pack_nunchaku_lowrank", "unpack_nunchaku_lowrank",
    "pack_nunchaku_vector", "unpack_nunchaku_vector",
]

WARP_N = 128  # rows per weight tile
MEM_K = 64  # K per weight tile (one m16n8k64 MMA)
LOWRANK_PACK = 16

# qweight bytes [N, K/2] viewed by (tile, pack, lane, register) dims; the stored order permutes them.
_QW_TILED_ORDER = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
_WS_TILED_ORDER = (0, 5, 1, 4, 3, 2, 6)
_LR_TILED_ORDER = (0, 1, 3, 6, 2, 5, 4, 7)

_ALIASES = {
    "smooth_factor": ("smooth_factor", "smooth"),
    "smooth_factor_orig": ("smooth_factor_orig", "smooth_orig"),
    "proj_down": ("proj_down", "lora_down"),
    "proj_up": ("proj_up", "lora_up"),
}


def _inverse(order):
    inv = [0] * len(order)
    for new, old in enumerate(order):
        inv[old] = new
    return tuple(inv)


def _check_tiles(N: int, K: int) -> None:
    if N % WARP_N or K % (2 * MEM_K):
        raise ValueError(f"nunchaku layout needs out_features % {WARP_N} == 0 and in_features % {2 * MEM_K} == 0 "
                         f"(it pads to these), got N={N}, K={K}")


# ----------------------------------------------------------------------------------------------- vectors
def _check_vector(v: torch.Tensor) -> None:
    if v.dim() != 1 or v.numel() % WARP_N:
        raise ValueError(f"nunchaku packs per-channel vectors in tiles of {WARP_N}: expected a 1-D tensor whose "
                         f"length is a multiple of {WARP_N}, got shape {tuple(v.shape)}")


def pack_nunchaku_vector(v: torch.Tensor) -> torch.Tensor:
    """bias / smooth / wcscales [L] -> nunchaku's order (per 128-tile: (a, b, c, d) of 8x2x4x2 -> (a, c, b, d))."""
    _check_vector(v)
    return v.reshape(-1, 8, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1)


def unpack_nunchaku_vector(v: torch.Tensor) -> torch.Tensor:
    _check_vector(v)
    return v.reshape(-1, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1)


# ----------------------------------------------------------------------------------------------- qweight
def _qweight_untiled_shape(N: int, K: int):
    # (n_tiles, n_packs 8, n_pack_size 2, n_lanes 8, reg_n 1, k_tiles, k_packs 1, k_pack_size 2, k_lanes 4, 4 bytes)
    return (N // WARP_N, 8, 2, 8, 1, K // MEM_K, 1, 2, 4, 4)


def pack_nunchaku_qweight(packed: torch.Tensor) -> torch.Tensor:
    """Our NVFP4 codes uint8 [N, K/2] -> nunchaku's tiled qweight int8 [N, K/2]."""
    N, K = packed.shape[0], packed.shape[1] * 2
    _check_tiles(N, K)
    tiled = packed.reshape(_qweight_untiled_shape(N, K)).permute(_QW_TILED_ORDER)
    return tiled.reshape(N, K // 2).view(torch.int8)


def unpack_nunchaku_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """nunchaku's tiled qweight int8 [N, K/2] -> our row-major codes uint8 [N, K/2]."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    _check_tiles(N, K)
    shape = _qweight_untiled_shape(N, K)
    tiled_shape = tuple(shape[i] for i in _QW_TILED_ORDER)
    untiled = qweight.contiguous().view(torch.uint8).reshape(tiled_shape).permute(_inverse(_QW_TILED_ORDER))
    return untiled.reshape(N, K // 2)


# ----------------------------------------------------------------------------------------------- wscales
def _wscales_untiled_shape(N: int, K: int):
    # N = (n_tiles, s_packs 1, s_pack_size 4, 4, 8); K/16 = (K/64, 4 groups in one 32-bit word)
    return (N // WARP_N, 1, 4, 4, 8, K // MEM_K, MEM_K // GROUP_SIZE)


def pack_nunchaku_wscales(scales: torch.Tensor) -> torch.Tensor:
    """Our scales float8_e4m3fn [N, K/16] -> nunchaku's tiled wscales [K/16, N]."""
    N, K = scales.shape[0], scales.shape[1] * GROUP_SIZE
    _check_tiles(N, K)
    tiled = scales.view(torch.uint8).reshape(_wscales_untiled_shape(N, K)).permute(_WS_TILED_ORDER)
    return tiled.reshape(K // GROUP_SIZE, N).view(torch.float8_e4m3fn)


def unpack_nunchaku_wscales(wscales: torch.Tensor) -> torch.Tensor:
    """nunchaku's tiled wscales float8_e4m3fn [K/16, N] -> our [N, K/16]."""
    N, K = wscales.shape[1], wscales.shape[0] * GROUP_SIZE
    _check_tiles(N, K)
    shape = _wscales_untiled_shape(N, K)
    tiled_shape = tuple(shape[i] for i in _WS_TILED_ORDER)
    untiled = wscales.contiguous().view(torch.uint8).reshape(tiled_shape).permute(_inverse(_WS_TILED_ORDER))
    return untiled.reshape(N, K // GROUP_SIZE).view(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------- low rank
def _lowrank_tiled_dims(c: int, r: int):
    # (c_packs, r_packs, n_pack_size 2, n_lanes 8, reg_n 1, k_pack_size 2, k_lanes 4, reg_k 2)
    return (c // LOWRANK_PACK, r // LOWRANK_PACK, 2, 8, 1, 2, 4, 2)


def pack_nunchaku_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """down: L1^T [R, K] -> proj_down [K, R]; up: [N, R] -> proj_up [N, R]; 16-bit, dims multiples of 16."""
    if weight.shape[0] % LOWRANK_PACK or weight.shape[1] % LOWRANK_PACK:
        raise ValueError(f"low-rank weights need both dims multiples of {LOWRANK_PACK}, got {tuple(weight.shape)}")
    if down:
        r, c = weight.shape
        packs = weight.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)
    else:
        c, r = weight.shape
        packs = weight.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    tiled = packs.reshape(_lowrank_tiled_dims(c, r)).permute(_LR_TILED_ORDER)
    return tiled.reshape(c, r)


def unpack_nunchaku_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """Inverse of pack_nunchaku_lowrank: proj_down [K, R] -> [R, K]; proj_up [N, R] -> [N, R]."""
    c, r = weight.shape
    if c % LOWRANK_PACK or r % LOWRANK_PACK:
        raise ValueError(f"low-rank weights need both dims multiples of {LOWRANK_PACK}, got {tuple(weight.shape)}")
    dims = _lowrank_tiled_dims(c, r)
    tiled_shape = tuple(dims[i] for i in _LR_TILED_ORDER)
    packs = weight.contiguous().reshape(tiled_shape).permute(_inverse(_LR_TILED_ORDER))
    packs = packs.reshape(c // 16, r // 16, 16, 16)
    if down:
        return packs.permute(1, 2, 0, 3).reshape(r, c)
    return packs.permute(0, 2, 1, 3).reshape(c, r)


# ----------------------------------------------------------------------------------------------- layers
def _get(tensors: Mapping[str, torch.Tensor], prefix: str, name: str, required: bool = True):
    for alias in _ALIASES.get(name, (name,)):
        if prefix + alias in tensors:
            return tensors[prefix + alias]
    if required:
        raise KeyError(f"nunchaku checkpoint has no {' or '.join(prefix + a for a in _ALIASES.get(name, (name,)))}")
    return None


@torch.no_grad()
def svdquant_linear_from_nunchaku(tensors: Mapping[str, torch.Tensor], prefix: str = "", *,
                                  dtype: Optional[torch.dtype] = None, backend: str = "auto",
                                  nunchaku_kernels: str = "auto") -> SVDQuantLinear:
    """One nunchaku NVFP4 SVDQuant layer (`{prefix}qweight`, `{prefix}wscales`, ...) -> SVDQuantLinear (W4A4).

    dtype: of lora_down / lora_up / bias (default: proj_up's dtype). Sizes come from the tensors (a padded
    checkpoint gives padded in/out features). nunchaku_kernels: "auto" attaches nunchaku's own module as the
    layer's `external_kernel` when `nunchaku_backend_error` finds the real nunchaku on a supported GPU (the
    layer then runs nunchaku's kernels on CUDA inputs), "never" does not, "require" raises if it cannot.
    """
    if nunchaku_kernels not in ("auto", "never", "require"):
        raise ValueError(f"nunchaku_kernels must be 'auto', 'never' or 'require', got {nunchaku_kernels!r}")
    qweight = _get(tensors, prefix, "qweight")
    wscales = _get(tensors, prefix, "wscales")
    if wscales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{prefix}wscales must be float8_e4m3fn (NVFP4; INT4 checkpoints are not supported), "
                        f"got {wscales.dtype}")
    proj_down, proj_up = _get(tensors, prefix, "proj_down"), _get(tensors, prefix, "proj_up")
    smooth, bias = _get(tensors, prefix, "smooth_factor"), _get(tensors, prefix, "bias", required=False)
    wtscale, wcscales = _get(tensors, prefix, "wtscale", False), _get(tensors, prefix, "wcscales", False)
    for name, t in (("qweight", qweight), ("proj_down", proj_down)):
        if t.dim() != 2:
            raise ValueError(f"{prefix}{name} must be 2-D ([N, K/2] / [K, rank]), got shape {tuple(t.shape)}")
    N, K, R = qweight.shape[0], qweight.shape[1] * 2, proj_down.shape[1]
    expected = {"wscales": (K // GROUP_SIZE, N), "proj_down": (K, R), "proj_up": (N, R), "smooth_factor": (K,),
                "wcscales": (N,), "bias": (N,)}
    for name, t in (("wscales", wscales), ("proj_down", proj_down), ("proj_up", proj_up), ("smooth_factor", smooth),
                    ("wcscales", wcscales), ("bias", bias)):
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"{prefix}{name} must have shape {expected[name]} for qweight {tuple(qweight.shape)}, "
                             f"got {tuple(t.shape)}")
    if wtscale is not None and wtscale.numel() != 1:
        raise ValueError(f"{prefix}wtscale must be one value (the per-tensor scale), got shape {tuple(wtscale.shape)}"
                         f" (per-channel scales are wcscales)")
    dtype = dtype or proj_up.dtype
    layer = SVDQuantLinear(K, N, rank=R, bias=bias is not None, activations="nvfp4", dtype=dtype,
                           device=qweight.device, backend=backend)
    scales = unpack_nunchaku_wscales(wscales)
    tensor_scale = wtscale.float().reshape(-1)[0] if wtscale is not None else torch.ones(())
    if wcscales is not None and not torch.all(wcscales == 1):
        channel = unpack_nunchaku_vector(wcscales).float()
        peak = channel.max()
        if not (torch.isfinite(channel).all() and channel.min() >= 0 and peak > 0):
            raise ValueError(f"{prefix}wcscales must be finite and non-negative with a positive maximum, got values "
                             f"in [{float(channel.min())}, {float(peak)}]")
        warn_once("nunchaku:wcscales", f"{prefix}wcscales (per-channel weight scales) folded into the layer: their "
                  "max into the fp32 tensor scale, wcscales / max into the E4M3 group scales, which are rounded to "
                  "E4M3 once more (up to 1/16 relative error per group) and lose precision or underflow to 0 in "
                  "channels whose wcscales is far below the max")
        # Scaled by <= 1, no group scale saturates; the per-tensor factor is exact up to one fp32 rounding.
        scales = (unsigned_e4m3_values(scales) * (channel / peak)[:, None]).to(torch.float8_e4m3fn)
        tensor_scale = tensor_scale.to(peak.device) * peak
    layer.qweight.copy_(unpack_nunchaku_qweight(qweight))
    layer.wscales.copy_(scales)
    layer.wtscale.copy_(tensor_scale)
    layer.input_scale.fill_(1.0)
    layer.smooth.copy_(unpack_nunchaku_vector(smooth).float())
    layer.lora_down.copy_(unpack_nunchaku_lowrank(proj_down, down=True).t())
    layer.lora_up.copy_(unpack_nunchaku_lowrank(proj_up, down=False).t())
    if bias is not None:
        layer.bias.copy_(unpack_nunchaku_vector(bias))
    if nunchaku_kernels != "never":
        reason = nunchaku_backend_error(qweight.device)
        if reason is None:
            layer.external_kernel = _NunchakuKernel(to_nunchaku_module(tensors, prefix))
        elif nunchaku_kernels == "require":
            raise RuntimeError(f"cannot use nunchaku's kernels: {reason}")
    return layer


class _NunchakuKernel:
    """nunchaku's SVDQW4A4Linear behind a plain callable on [..., K] inputs (it expects [B, S, K])."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.module(x.reshape(1, -1, x.shape[-1])).reshape(*lead, -1)


@torch.no_grad()
def svdquant_linear_to_nunchaku(layer: SVDQuantLinear, dtype: torch.dtype = torch.bfloat16) -> dict:
    """SVDQuantLinear (W4A4, input_scale 1) -> nunchaku's tensors (module names: proj_down, smooth_factor, ...).
    smooth, wtscale and the low-rank weights are rounded to `dtype`, as nunchaku's module stores them."""
    if layer.activations != "nvfp4":
        raise ValueError("only W4A4 layers (activations='nvfp4') have a nunchaku equivalent")
    if float(layer.input_scale) != 1.0:
        warn_once("nunchaku:input_scale", "nunchaku quantizes activations with tensor scale 1; this layer's "
                  f"calibrated input_scale {float(layer.input_scale):.3g} is dropped in the export")
    out = {
        "qweight": pack_nunchaku_qweight(layer.qweight),
        "wscales": pack_nunchaku_wscales(layer.wscales),
        "wtscale": layer.wtscale.reshape(1).to(dtype),
        "wcscales": torch.ones(layer.out_features, dtype=dtype, device=layer.qweight.device),
        "smooth_factor": pack_nunchaku_vector(layer.smooth.to(dtype)),
        "smooth_factor_orig": pack_nunchaku_vector(layer.smooth.to(dtype)),
        "proj_down": pack_nunchaku_lowrank(layer.lora_down.t().to(dtype), down=True),
        "proj_up": pack_nunchaku_lowrank(layer.lora_up.t().to(dtype), down=False),
    }
    if layer.bias is not None:
        out["bias"] = pack_nunchaku_vector(layer.bias.to(dtype))
    return out


def import_nunchaku_state_dict(state_dict: Mapping[str, torch.Tensor], *, dtype: Optional[torch.dtype] = None,
                               backend: str = "auto", nunchaku_kernels: str = "auto") -> dict:
    """Every NVFP4 SVDQuant layer of a nunchaku state dict (or safetensors file's tensors): {module name: layer}.
    Keys without a `.qweight` sibling (norms, embedders, ...) and other quantized layers (AWQ W4A16: wzeros, 16-bit
    wscales) are left to the caller."""
    def nvfp4(prefix: str) -> bool:
        scales = state_dict.get(f"{prefix}wscales")
        return f"{prefix}wzeros" not in state_dict and getattr(scales, "dtype", None) == torch.float8_e4m3fn

    prefixes = sorted(p for p in (k[: -len("qweight")] for k in state_dict if k.endswith("qweight")) if nvfp4(p))
    return {p.rstrip("."): svdquant_linear_from_nunchaku(state_dict, p, dtype=dtype, backend=backend,
                                                         nunchaku_kernels=nunchaku_kernels)
            for p in prefixes}


# ----------------------------------------------------------------------------------------------- nunchaku backend
def nunchaku_backend_error(device: torch.device) -> Optional[str]:
    """Why the real nunchaku kernels cannot run on `device`, or None. Never imports the unrelated PyPI package
    of the same name as if it were nunchaku: it must have the compiled `nunchaku._C` extension."""
    if device.type != "cuda":
        return f"nunchaku's kernels need a CUDA device, got {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 12:
        return f"nunchaku's NVFP4 kernels need an sm_120/121 GPU, this one is sm_{major}{minor}"
    if importlib.util.find_spec("nunchaku") is None:
        return "nunchaku is not installed"
    try:
        importlib.import_module("nunchaku._C")
        module = importlib.import_module("nunchaku.models.linear")
    except ImportError as exc:
        return f"the installed 'nunchaku' is not the SVDQuant engine (no nunchaku._C / models.linear: {exc})"
    if not hasattr(module, "SVDQW4A4Linear"):
        return "the installed nunchaku has no SVDQW4A4Linear"
    return None


def to_nunchaku_module(tensors: Mapping[str, torch.Tensor], prefix: str = ""):
    """nunchaku's own `SVDQW4A4Linear` (its CUDA kernels) loaded with a layer's nunchaku-layout tensors."""
    qweight = _get(tensors, prefix, "qweight")
    reason = nunchaku_backend_error(qweight.device)
    if reason:
        raise RuntimeError(f"cannot use nunchaku's kernels: {reason}")
    from nunchaku.models.linear import SVDQW4A4Linear  # noqa: PLC0415  (optional dependency)

    proj_up = _get(tensors, prefix, "proj_up")
    bias = _get(tensors, prefix, "bias", required=False)
    module = SVDQW4A4Linear(qweight.shape[1] * 2, qweight.shape[0], rank=proj_up.shape[1], bias=bias is not None,
                            precision="nvfp4", torch_dtype=proj_up.dtype, device=qweight.device)
    state = {"qweight": qweight, "wscales": _get(tensors, prefix, "wscales"),
             "proj_down": _get(tensors, prefix, "proj_down"), "proj_up": proj_up,
             "smooth_factor": _get(tensors, prefix, "smooth_factor")}
    state["smooth_factor_orig"] = _get(tensors, prefix, "smooth_factor_orig", required=False)
    if state["smooth_factor_orig"] is None:
        state["smooth_factor_orig"] = state["smooth_factor"]
    wtscale, wcscales = _get(tensors, prefix, "wtscale", False), _get(tensors, prefix, "wcscales", False)
    state["wcscales"] = wcscales if wcscales is not None else torch.ones_like(module.wcscales)
    # nunchaku before 092e01e (2025-08-28): wtscale is a Parameter [1]; since, a plain float outside the state dict
    # (strict loading would reject the key), which its own loader sets by hand.
    wtscale_is_tensor = isinstance(module.wtscale, torch.Tensor)
    if wtscale_is_tensor:
        state["wtscale"] = wtscale if wtscale is not None else torch.ones_like(module.wtscale)
    if bias is not None:
        state["bias"] = bias
    module.load_state_dict({k: v.to(getattr(module, k).dtype) for k, v in state.items()})
    if not wtscale_is_tensor:
        module.wtscale = float(wtscale.float().reshape(-1)[0]) if wtscale is not None else 1.0
    return module
