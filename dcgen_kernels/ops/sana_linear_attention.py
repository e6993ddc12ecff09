"""Op `sana_linear_attention`: SANA's ReLU linear attention, from the projections to the output projection.

Per (batch, head), with N tokens of head dim D, all in fp32:
    out[n] = ReLU(Q[n]) · (ReLU(K)ᵀ V) / (ReLU(Q[n]) · Σ_m ReLU(K[m]) + eps)
which is what diffusers computes by padding V with a row of ones: in `SanaLinearAttnProcessor2_0` (SANA
transformer self-attention, eps 1e-15) and `SanaMultiscaleLinearAttention.apply_linear_attention` (DC-AE,
eps = the module's `eps`). Two public entry points, one set of kernels:
- `sana_linear_attention(q, k, v, heads)`: token-major (B, N, heads*D), as `attn.to_q(...)` etc. return them.
- `sana_multiscale_linear_attention(q, k, v)`: channel-first (B, heads, D, N) views, as DC-AE's
  `reshape(B, -1, 3*D, H*W).chunk(3, dim=2)` leaves them.

Backends (auto order triton -> reference; there is no CUDA backend):
- triton: reads Q, K and V once in their own dtype and layout and writes the output once; no fp32 copies,
  no padding with ones, no permutes. KᵀV and ΣK are reduced in fp32 per token slice into a small workspace and
  summed in a fixed order by the output pass (deterministic: no atomic sums). fp32, bf16, fp16; head_dim <= 128.
  Memory-bound: at B=1, 70 heads × 32, 16384 tokens, bf16 it moves 4 × 73 MB; the target is >= 80% of the
  copy rate (benchmarks/bench_sana_ops.py measures it). Two forms: two launches (K pass, output pass) or one
  (`linear_attention_fused_kernel`, its programs ordered by atomic counters, no boundary between the passes).
  On its first call per shape and layout each form tunes its tiles and grid, then the faster form is kept
  (`_common.TIMED_CHOICES` holds the choice and both times; a few seconds with compilation): warm a model up
  before capturing it in a CUDA graph (patch(cuda_graph=True) does).
- reference: fp32 torch (always available; also the backward of both ops).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend
from ._common import (
    arrival_counters, call_op, cdiv, check_tensor, custom_op, register_reference_autograd, timed_choice,
)

__all__ = [
    "sana_linear_attention", "sana_linear_attention_reference",
    "sana_multiscale_linear_attention", "sana_multiscale_linear_attention_reference",
]

TRITON_MAX_HEAD_DIM = 128  # the output pass holds the padded D×D fp32 KᵀV in registers
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
    if not isinstance(eps, float) or not 0 <= eps < math.inf:  # comparisons only: Dynamo traces SymFloats
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


def _device_index(device: torch.device):
    return None if device.type != "cuda" else (device.index if device.index is not None
                                               else torch.cuda.current_device())


def _grid(n_tokens: int, batch: int, heads: int, device: torch.device, block: str):
    """The autotuned passes' grid: (B * head groups, slices) for a config's tile, programs per SM and heads per
    program (K pass; the output pass takes one); under the interpreter (PROGRAMS_PER_SM 0) two slices per group."""
    from ..triton_kernels.sana_linear_attention import token_slices

    index = _device_index(device)
    sm_count = _sm_count(index) if index is not None else 0

    def grid(meta):
        groups = batch * cdiv(heads, meta.get("HEADS_PER_PROGRAM", 1))
        return groups, token_slices(n_tokens, meta[block], groups, meta["PROGRAMS_PER_SM"], sm_count)

    return grid


def _launch_triton(q, k, v, eps: float, out, configs=None, strategy: Optional[str] = None) -> None:
    """q, k, v, out: (B, H, N, D)-indexed views, any strides. strategy: "two_pass" (a K-pass launch, then an
    output-pass launch), "fused" (both in one launch) or None: on a GPU, up to a padded head dim of 64, the faster
    of the two for this shape and layout, timed once on its first call (each form autotuned first; like the
    autotuners, not inside a CUDA-graph capture: warm up first), else two_pass. configs: for tests, the form's
    configs run without tuning: a (K pass, output pass) pair of triton.Configs for two_pass (the default form with
    configs), one Config for fused."""
    import triton.language as tl

    interpret = _backend.triton_interpreter_enabled()
    # bf16 dots are wrong under the interpreter: there the same bf16-valued operands go through fp32 dots.
    dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(q.dtype, tl.float32)
    padded = _padded_dim(q.shape[-1])
    meta = dict(HEAD_DIM=q.shape[-1], PADDED_DIM=padded, DOT_DTYPE=tl.float32 if interpret else dot_dtype,
                FP32_PRECISION="ieee" if interpret else _FP32_DOT_PRECISION, PART_STAGES=_part_stages(padded),
                SPLIT_KV=q.dtype in (torch.bfloat16, torch.float16), SPLIT_Q=q.dtype == torch.float16,
                PART_DTYPE=tl.float32 if interpret else tl.bfloat16)
    if strategy is None:
        from ..triton_kernels.sana_linear_attention import FUSED_MAX_PADDED_DIM

        timed = configs is None and q.device.type == "cuda" and not interpret and padded <= FUSED_MAX_PADDED_DIM
        strategy = _pick_strategy(q, k, v, eps, out, meta) if timed else "two_pass"
    if strategy == "two_pass":
        _launch_two_pass(q, k, v, eps, out, meta, configs)
    elif strategy == "fused":
        _launch_fused(q, k, v, eps, out, meta, configs)
    else:
        raise ValueError(f"strategy must be 'two_pass', 'fused' or None, got {strategy!r}")


def _pick_strategy(q, k, v, eps, out, meta) -> str:
    key = (tuple(q.shape), str(q.dtype), q.stride(), k.stride(), v.stride(), out.stride())
    return timed_choice("sana_linear_attention", key,
                        {"two_pass": lambda: _launch_two_pass(q, k, v, eps, out, meta, None),
                         "fused": lambda: _launch_fused(q, k, v, eps, out, meta, None)})


def _workspace(q, most_slices: int, padded: int):
    B, H = q.shape[:2]
    return (torch.empty(B * H, most_slices, padded, padded, dtype=torch.float32, device=q.device),
            torch.empty(B * H, most_slices, padded, dtype=torch.float32, device=q.device))


def _launch_two_pass(q, k, v, eps, out, meta, configs) -> None:
    from ..triton_kernels.sana_linear_attention import linear_attention_kv_kernel, linear_attention_out_kernel

    B, H, N, _ = q.shape
    kv_grid, out_grid = _grid(N, B, H, q.device, "BLOCK_N"), _grid(N, B, H, q.device, "BLOCK_M")
    kv_configs = linear_attention_kv_kernel.configs if configs is None else configs[:1]
    kv_parts, ksum_parts = _workspace(q, max(kv_grid(config.all_kwargs())[1] for config in kv_configs),
                                      meta["PADDED_DIM"])
    kv_args = (k, v, kv_parts, ksum_parts, N, H, *k.stride(), *v.stride())
    kv_meta = {name: meta[name] for name in ("HEAD_DIM", "PADDED_DIM", "DOT_DTYPE", "FP32_PRECISION")}
    if configs is None:
        linear_attention_kv_kernel[kv_grid](*kv_args, **kv_meta)
        kv_config = linear_attention_kv_kernel.best_config  # tuned on the first call per key, then cached
    else:
        kv_config = configs[0]
        linear_attention_kv_kernel.fn[kv_grid(kv_config.all_kwargs())](*kv_args, **kv_meta, **_run_kwargs(kv_config))
    out_args = (q, kv_parts, ksum_parts, out, N, H, kv_grid(kv_config.all_kwargs())[1], eps,
                *q.stride(), *out.stride())
    out_meta = {name: value for name, value in meta.items() if name != "DOT_DTYPE"}
    if configs is None:
        linear_attention_out_kernel[out_grid](*out_args, **out_meta)
    else:
        linear_attention_out_kernel.fn[out_grid(configs[1].all_kwargs())](*out_args, **out_meta,
                                                                          **_run_kwargs(configs[1]))


def _launch_fused(q, k, v, eps, out, meta, config) -> None:
    from ..triton_kernels.sana_linear_attention import fused_kv_slices, linear_attention_fused_kernel

    B, H, N, _ = q.shape
    index = _device_index(q.device)
    sm_count = _sm_count(index) if index is not None else 0
    configs = linear_attention_fused_kernel.configs if config is None else [config]
    most_slices = max(fused_kv_slices(dict(c.kwargs, B=B, H=H, N=N, sm_count=sm_count)) for c in configs)
    kv_parts, ksum_parts = _workspace(q, most_slices, meta["PADDED_DIM"])
    counters = arrival_counters(q.device, 1 + B * H)
    args = (q, k, v, out, kv_parts, ksum_parts, counters, B, N, H, eps, sm_count,
            *q.stride(), *k.stride(), *v.stride(), *out.stride())

    def grid(kwargs):
        return (B * cdiv(H, kwargs["HEADS_PER_PROGRAM"]) * kwargs["KV_SLICES"] + B * H * kwargs["OUT_SLICES"],)

    if config is None:
        linear_attention_fused_kernel[grid](*args, **meta)
    else:
        linear_attention_fused_kernel.fn[grid](*args, **meta, **_run_kwargs(config))


def _part_stages(padded_dim: int) -> int:
    """Pipeline depth of the output pass's loads of the KᵀV partials: up to 4 in flight within 16 KB of shared
    memory (a D x D fp32 partial is 4 KB at D = 32, 64 KB at 128: none in flight there, as before)."""
    return max(1, min(5, 1 + (16 << 10) // (4 * padded_dim * padded_dim)))


def _run_kwargs(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def select_backend(q: torch.Tensor, head_dim: int, backend: str) -> str:
    return _backend.select(
        "sana_linear_attention",
        backend,
        platform_checks={"triton": lambda: _backend.triton_device_error(q.device)},
        case_checks={"triton": lambda: _triton_case_error(head_dim)},
    )


def sana_linear_attention_into(q, k, v, heads: int, eps: float, out) -> None:
    """Write the token-major op into `out` (B, N, heads*D), any strides with the last dim contiguous (Triton)."""
    _launch_triton(_by_head(q, heads), _by_head(k, heads), _by_head(v, heads), eps, _by_head(out, heads))


def sana_multiscale_linear_attention_into(q, k, v, eps: float, out) -> None:
    """Write the channel-first op into `out` (B, heads, D, N), any strides (Triton)."""
    _launch_triton(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), eps, out.transpose(2, 3))


# ----------------------------------------------------------------------------------------------- custom ops
@custom_op("dcgen::sana_linear_attention")
def _sana_linear_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float, backend: str,
) -> torch.Tensor:
    chosen = select_backend(q, q.shape[-1] // heads, backend)
    if chosen == "reference":
        return sana_linear_attention_reference(q, k, v, heads, eps)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sana_linear_attention_into(q, k, v, heads, eps, out)
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
    sana_multiscale_linear_attention_into(q, k, v, eps, out)
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
