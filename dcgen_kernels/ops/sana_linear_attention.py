"""Op `sana_linear_attention`: SANA's ReLU linear attention, from the projections to the output projection.

Per (batch, head), with N tokens of head dim D, all in fp32:
    out[n] = ReLU(Q[n]) · (ReLU(K)ᵀ V) / (ReLU(Q[n]) · Σ_m ReLU(K[m]) + eps)
which is what diffusers computes by padding V with a row of ones: in `SanaLinearAttnProcessor2_0` (SANA
transformer self-attention, eps 1e-15) and `SanaMultiscaleLinearAttention.apply_linear_attention` (DC-AE,
eps = the module's `eps`). Two public entry points, one pair of kernels:
- `sana_linear_attention(q, k, v, heads)`: token-major (B, N, heads*D), as `attn.to_q(...)` etc. return them.
- `sana_multiscale_linear_attention(q, k, v)`: channel-first (B, heads, D, N) views, as DC-AE's
  `reshape(B, -1, 3*D, H*W).chunk(3, dim=2)` leaves them.

Backends (auto order triton -> reference; there is no CUDA backend):
- triton: reads Q, K and V once in their own dtype and layout and writes the output once; no fp32 copies,
  no padding with ones, no permutes. KᵀV and ΣK are reduced in fp32 per token slice into a small workspace and
  summed in a fixed order by the output pass (deterministic; no atomics). fp32, bf16, fp16; head_dim <= 128.
  Memory-bound: at B=1, 70 heads × 32, 16384 tokens, bf16 it moves 4 × 73 MB; the target is >= 80% of the
  copy rate (benchmarks/bench_sana_ops.py measures it; the tile defaults are from an H100 sweep of each pass).
- reference: fp32 torch (always available; also the backward of both ops).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend
from ._common import call_op, cdiv, check_tensor, custom_op, register_reference_autograd

__all__ = [
    "sana_linear_attention", "sana_linear_attention_reference",
    "sana_multiscale_linear_attention", "sana_multiscale_linear_attention_reference",
]

TRITON_MAX_HEAD_DIM = 128  # the output pass holds the padded D×D fp32 KᵀV in registers
_PROGRAMS_PER_SM = 4
# fp32 inputs: IEEE dots on the FMA units (the K pass measured FMA-bound, ~4x off the copy rate, at DC-AE's
# 64 heads × 32 × 16384 tokens). "tf32x3" would move them to the tensor cores at ~fp32 accuracy; not yet
# measured on a GPU, so not the default.
_FP32_DOT_PRECISION = "ieee"


# ----------------------------------------------------------------------------------------------- reference
def relu_linear_attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., N, D) -> (..., N, D) fp32: ReLU(Q)·(ReLU(K)ᵀV) / (ReLU(Q)·ΣReLU(K) + eps), eps on the denominator."""
    q, k, v = F.relu(q.float()), F.relu(k.float()), v.float()
    numerator = q @ (k.transpose(-1, -2) @ v)
    denominator = q @ k.sum(dim=-2).unsqueeze(-1) + eps
    return numerator / denominator


def _by_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, H*D) -> (B, H, N, D) view


def sana_linear_attention_reference(q, k, v, heads: int, eps: float = 1e-15):
    """fp32 reference on (B, N, heads*D) inputs; returns (B, N, heads*D) in q's dtype."""
    out = relu_linear_attention_fp32(_by_head(q, heads), _by_head(k, heads), _by_head(v, heads), eps)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def sana_multiscale_linear_attention_reference(q, k, v, eps: float = 1e-15):
    """fp32 reference on (B, heads, D, N) inputs; returns a contiguous (B, heads, D, N) in q's dtype."""
    out = relu_linear_attention_fp32(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), eps)
    return out.transpose(-1, -2).contiguous().to(q.dtype)


# ----------------------------------------------------------------------------------------------- validation
def _as_eps(eps):
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps


def _validate_qkv(q, k, v, eps, ndim: int, layout: str, last_dim_contiguous: bool) -> None:
    check_tensor("q", q, ndim=ndim, last_dim_contiguous=last_dim_contiguous)
    if q.numel() == 0:
        raise ValueError(f"q must have non-empty dimensions {layout}, got {tuple(q.shape)}")
    same = dict(shape=q.shape, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=last_dim_contiguous)
    check_tensor("k", k, **same)
    check_tensor("v", v, **same)
    if not isinstance(eps, float) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a non-negative finite float, got {eps!r}")


def _validate(q, k, v, heads, eps) -> None:
    _validate_qkv(q, k, v, eps, 3, "(B, N, heads*D)", last_dim_contiguous=True)
    if not isinstance(heads, int) or isinstance(heads, bool):
        raise TypeError(f"heads must be an int, got {type(heads).__name__}")
    if heads <= 0 or q.shape[-1] % heads:
        raise ValueError(f"heads must be a positive divisor of q.shape[-1] = {q.shape[-1]}, got {heads}")


# ----------------------------------------------------------------------------------------------- triton
def _padded_dim(head_dim: int) -> int:
    """The next power of two, at least 16 (the smallest tl.dot dimension)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _triton_case_error(head_dim: int) -> Optional[str]:
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {TRITON_MAX_HEAD_DIM}"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _token_slices(n_tokens: int, block: int, batch_heads: int, programs: int) -> tuple[int, int]:
    """(tokens per program, programs per (b, h)): enough programs in all, each a whole number of blocks."""
    blocks = cdiv(n_tokens, block)
    splits = min(blocks, max(1, cdiv(programs, batch_heads)))
    tokens = cdiv(blocks, splits) * block
    return tokens, cdiv(n_tokens, tokens)


def _launch_config(batch_heads: int, device: torch.device) -> dict:
    """Tile sizes and the number of programs to aim for per pass. Measured on an H100 (70 heads × 32, 16384
    tokens, bf16): 64-token tiles, 4 warps, 3 stages and ~4 programs per SM were best or within noise of the
    best for both passes, also for DC-AE's channel-first layout and head dim 112. Under the interpreter:
    2 slices per (b, h) of 16-token tiles, so small test shapes cover several slices, several tiles per slice
    and partial tiles."""
    if _backend.triton_interpreter_enabled():
        return dict(block=16, programs=2 * batch_heads, num_warps=4, num_stages=1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(block=64, programs=_PROGRAMS_PER_SM * _sm_count(index), num_warps=4, num_stages=3)


def _launch_triton(q, k, v, eps: float, out) -> None:
    """q, k, v, out: (B, H, N, D)-indexed views, any strides."""
    import triton.language as tl

    from ..triton_kernels.sana_linear_attention import linear_attention_kv_kernel, linear_attention_out_kernel

    B, H, N, D = q.shape
    padded = _padded_dim(D)
    cfg = _launch_config(B * H, q.device)
    tokens, splits = _token_slices(N, cfg["block"], B * H, cfg["programs"])

    half = q.dtype in (torch.bfloat16, torch.float16)
    interpret = _backend.triton_interpreter_enabled()
    # bf16 dots are wrong under the interpreter: there the same bf16-valued operands go through fp32 dots.
    dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(q.dtype, tl.float32)
    dot_dtype = tl.float32 if interpret else dot_dtype
    part_dtype = tl.float32 if interpret else tl.bfloat16
    fp32_precision = "ieee" if interpret else _FP32_DOT_PRECISION

    kv_parts = torch.empty(B * H, splits, padded, padded, dtype=torch.float32, device=q.device)
    ksum_parts = torch.empty(B * H, splits, padded, dtype=torch.float32, device=q.device)
    linear_attention_kv_kernel[(B * H, splits)](
        k, v, kv_parts, ksum_parts,
        N, H, tokens,
        *k.stride(), *v.stride(),
        HEAD_DIM=D, PADDED_DIM=padded, BLOCK_N=cfg["block"], DOT_DTYPE=dot_dtype, FP32_PRECISION=fp32_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    linear_attention_out_kernel[(B * H, splits)](
        q, kv_parts, ksum_parts, out,
        N, H, splits, tokens, eps,
        *q.stride(), *out.stride(),
        HEAD_DIM=D, PADDED_DIM=padded, BLOCK_M=cfg["block"],
        SPLIT_KV=half, SPLIT_Q=q.dtype == torch.float16, PART_DTYPE=part_dtype, FP32_PRECISION=fp32_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def select_backend(q: torch.Tensor, head_dim: int, backend: str) -> str:
    return _backend.select(
        "sana_linear_attention",
        backend,
        platform_checks={"triton": lambda: _backend.triton_device_error(q.device)},
        case_checks={"triton": lambda: _triton_case_error(head_dim)},
    )


def sana_linear_attention_into(q, k, v, heads: int, eps: float, out, backend: str) -> None:
    """Write the token-major op into `out` (B, N, heads*D), any strides with the last dim contiguous."""
    if backend == "triton":
        _launch_triton(_by_head(q, heads), _by_head(k, heads), _by_head(v, heads), eps, _by_head(out, heads))
    else:
        out.copy_(sana_linear_attention_reference(q, k, v, heads, eps))


def sana_multiscale_linear_attention_into(q, k, v, eps: float, out, backend: str) -> None:
    """Write the channel-first op into `out` (B, heads, D, N), any strides."""
    if backend == "triton":
        _launch_triton(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), eps, out.transpose(2, 3))
    else:
        out.copy_(sana_multiscale_linear_attention_reference(q, k, v, eps))


# ----------------------------------------------------------------------------------------------- custom ops
@custom_op("dcgen::sana_linear_attention")
def _sana_linear_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float, backend: str,
) -> torch.Tensor:
    chosen = select_backend(q, q.shape[-1] // heads, backend)
    if chosen == "reference":
        return sana_linear_attention_reference(q, k, v, heads, eps)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sana_linear_attention_into(q, k, v, heads, eps, out, chosen)
    return out


@_sana_linear_attention_op.register_fake
def _(q, k, v, heads, eps, backend):
    return q.new_empty(q.shape)


register_reference_autograd(_sana_linear_attention_op, sana_linear_attention_reference, n_tensor_inputs=3)


@custom_op("dcgen::sana_multiscale_linear_attention")
def _sana_multiscale_linear_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, backend: str,
) -> torch.Tensor:
    chosen = select_backend(q, q.shape[2], backend)
    if chosen == "reference":
        return sana_multiscale_linear_attention_reference(q, k, v, eps)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sana_multiscale_linear_attention_into(q, k, v, eps, out, chosen)
    return out


@_sana_multiscale_linear_attention_op.register_fake
def _(q, k, v, eps, backend):
    return q.new_empty(q.shape)


register_reference_autograd(_sana_multiscale_linear_attention_op, sana_multiscale_linear_attention_reference,
                            n_tensor_inputs=3)


# ----------------------------------------------------------------------------------------------- public API
def sana_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, eps: float = 1e-15, backend: str = "auto",
) -> torch.Tensor:
    """ReLU linear attention of `SanaLinearAttnProcessor2_0`, between `attn.to_q/to_k/to_v` and `attn.to_out`.

    q, k, v: (B, N, heads*D) in fp32/bf16/fp16, the same shape and dtype; last dim contiguous (strided views
    of a fused QKV projection are fine). ReLU is applied here. Returns a contiguous (B, N, heads*D) tensor in
    q's dtype; the math runs in fp32.
    """
    _backend.check_backend_name(backend)
    eps = _as_eps(eps)
    _validate(q, k, v, heads, eps)
    return call_op(_sana_linear_attention_op, q, k, v, heads, eps, backend)


def sana_multiscale_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-15, backend: str = "auto",
) -> torch.Tensor:
    """DC-AE's `SanaMultiscaleLinearAttention.apply_linear_attention(q, k, v).to(q.dtype)`, fp32 inside.

    q, k, v: (B, heads, D, N) in fp32/bf16/fp16, any strides (the chunks of the multiscale QKV reshape, before
    the processor's fp32 upcast). ReLU is applied here; diffusers applies it before `apply_linear_attention`,
    and ReLU is idempotent, so already-ReLU'd inputs give the same result. Returns a contiguous
    (B, heads, D, N) tensor in q's dtype.
    """
    _backend.check_backend_name(backend)
    eps = _as_eps(eps)
    _validate_qkv(q, k, v, eps, 4, "(B, heads, D, N)", last_dim_contiguous=False)
    return call_op(_sana_multiscale_linear_attention_op, q, k, v, eps, backend)
