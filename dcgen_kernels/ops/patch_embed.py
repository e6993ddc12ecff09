"""Ops `patch_embed` / `patch_unembed`: latent <-> token projections with the patch (un)packing fused in.

`patch_embed` is FLUX's `_pack_latents` followed by `x_embedder` (nn.Linear); `patch_unembed` is `proj_out`
(nn.Linear) followed by `_unpack_latents`. patch_size 2 is the FLUX f8c16 layout (feature = c*4 + i*2 + j);
patch_size 1 is the DC-Gen layout for DC-AE latents (feature = c, token = y*w + x). The Triton kernels gather the
GEMM's A operand straight from the NCHW latent, and scatter the unembed GEMM's result straight into NCHW, so the
packed tensor is never materialised.

Backward on the Triton path reuses the two kernels: d(latent) of patch_embed is patch_unembed(grad, weight.T) and
d(tokens) of patch_unembed is patch_embed(grad, weight.T). Both weight gradients are one gathering GEMM,
packed(latent)^T . dense over all B*N tokens (patch_embed: latent and grad, stored transposed; patch_unembed: grad
and tokens), split over the token range with fp32 partials summed on the host; the bias gradient is summed in the
same pass. On the reference backend (and where Triton cannot serve the backward) it is the vjp of the fp32
reference, recomputed under autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ._common import cdiv, check_tensor

__all__ = ["patch_embed", "patch_embed_reference", "patch_unembed", "patch_unembed_reference"]

PATCH_SIZES = (1, 2)
_INT32_LIMIT = 2**31


# ----------------------------------------------------------------------------------------------- reference
def _pack(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/p)(w/p), C*p*p); diffusers' FluxPipeline._pack_latents for p = 2."""
    B, C, h, w = latent.shape
    p = patch_size
    packed = latent.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(B, (h // p) * (w // p), C * p * p)


def _unpack(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, (h/p)(w/p), C*p*p) -> (B, C, h, w); diffusers' FluxPipeline._unpack_latents for p = 2."""
    B, _, F = tokens.shape
    p = patch_size
    C = F // (p * p)
    unpacked = tokens.reshape(B, height // p, width // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return unpacked.reshape(B, C, height, width)


def _linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """nn.Linear computed in fp32 (float64 stays float64, so gradcheck can run on the reference)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def patch_embed_reference(latent, weight, bias, patch_size: int) -> torch.Tensor:
    """_pack_latents + nn.Linear in fp32, cast to latent's dtype: (B, C, h, w) -> (B, (h/p)(w/p), D)."""
    return _linear_fp32(_pack(latent, patch_size), weight, bias).to(latent.dtype)


def patch_unembed_reference(tokens, weight, bias, patch_size: int, height: int, width: int) -> torch.Tensor:
    """nn.Linear + _unpack_latents in fp32, cast to tokens' dtype: (B, (h/p)(w/p), D) -> (B, C, h, w)."""
    return _unpack(_linear_fp32(tokens, weight, bias), patch_size, height, width).to(tokens.dtype)


# ----------------------------------------------------------------------------------------------- validation
def _check_patch_size(patch_size) -> None:
    if isinstance(patch_size, bool) or patch_size not in PATCH_SIZES:
        raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {patch_size!r}")


def _check_linear(x: torch.Tensor, weight, bias, in_features: int, weight_name_shape: str) -> None:
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.shape[1] != in_features:
        raise ValueError(f"weight must have shape {weight_name_shape}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have the input's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), device=x.device)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have the input's dtype {x.dtype}, got {bias.dtype}")


def _validate_embed(latent, weight, bias, patch_size) -> None:
    _check_patch_size(patch_size)
    check_tensor("latent", latent, ndim=4)
    _, C, h, w = latent.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent height and width must be divisible by patch_size={patch_size}, got {h}x{w}")
    K = C * patch_size * patch_size
    _check_linear(latent, weight, bias, K, f"(D, C*patch_size**2 = {K})")


def _validate_unembed(tokens, weight, bias, patch_size, height, width) -> None:
    _check_patch_size(patch_size)
    check_tensor("tokens", tokens, ndim=3)
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % patch_size:
            raise ValueError(f"{name} must be a positive int divisible by patch_size={patch_size}, got {size!r}")
    _, N, D = tokens.shape
    if N != (height // patch_size) * (width // patch_size):
        raise ValueError(f"tokens must have (height/p)*(width/p) = {(height // patch_size) * (width // patch_size)} "
                         f"tokens for height={height}, width={width}, patch_size={patch_size}, got {N}")
    _check_linear(tokens, weight, bias, D, f"(C*patch_size**2, D = {D})")
    if weight.shape[0] % (patch_size * patch_size):
        raise ValueError(f"weight.shape[0] (= C*patch_size**2) must be divisible by {patch_size * patch_size}, "
                         f"got {weight.shape[0]}")


# ----------------------------------------------------------------------------------------------- launchers
def _span(t: torch.Tensor, first_dim: int = 1) -> int:
    """Largest element offset inside one batch item: the kernels index within an item in int32."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[first_dim:], t.stride()[first_dim:])) + 1


def _triton_case_error(*tensors: torch.Tensor) -> Optional[str]:
    for t in tensors:
        if _span(t, first_dim=1 if t.dim() > 2 else 0) >= _INT32_LIMIT:
            return f"a tensor of shape {tuple(t.shape)} spans more than 2**31 elements per batch item"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _block_config(dtype: torch.dtype, n_rows: int, n_cols: int, reduce_dim: int, batch: int,
                  device: torch.device) -> dict:
    """Tiles for a (n_rows x n_cols) output per batch item, reducing over reduce_dim."""
    if _backend.triton_interpreter_enabled():
        # Small tiles: the test shapes then cover partial M, N and K blocks and a multi-step K loop.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    block_n = min(128, max(16, _next_pow2(n_cols)))
    block_k = min(32 if dtype == torch.float32 else 64, max(16, _next_pow2(reduce_dim)))
    # Narrow outputs (unembed: 32-128 features) give few programs: shrink BLOCK_M until the GPU is filled.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block_m = 64 if dtype == torch.float32 else 128  # fp32 128x128 tiles spill (ptxas, sm_90a)
    while block_m > 32 and cdiv(n_rows, block_m) * cdiv(n_cols, block_n) * batch < sms:
        block_m //= 2
    # fp32 dots run on CUDA cores with the accumulator in registers: 64x128 needs 8 warps (4 spill, ptxas sm_90a).
    num_warps = 8 if block_m * block_n >= (64 if dtype == torch.float32 else 128) * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=3)


def _dot_dtype(dtype: torch.dtype):
    import triton.language as tl

    if _backend.triton_interpreter_enabled():
        return tl.float32  # bf16 dots are wrong under the interpreter; fp32 checks the same kernel logic
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _launch_embed_triton(latent, weight, bias, patch_size, out) -> None:
    from ..triton_kernels.patch_embed import patch_embed_kernel

    B, _, _, w = latent.shape
    p = patch_size
    n_tokens, D, K = out.shape[1], weight.shape[0], weight.shape[1]
    cfg = _block_config(latent.dtype, n_tokens, D, K, B, latent.device)
    grid = (cdiv(n_tokens, cfg["BLOCK_M"]), cdiv(D, cfg["BLOCK_N"]), B)
    patch_embed_kernel[grid](
        latent, weight, bias.contiguous() if bias is not None else weight, out,  # the kernel reads bias with stride 1
        n_tokens, w // p, K, D,
        *latent.stride(),
        *weight.stride(),
        out.stride(0), out.stride(1),
        PATCH=p, HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(latent.dtype), **cfg,
    )


def _launch_unembed_triton(tokens, weight, bias, patch_size, out) -> None:
    from ..triton_kernels.patch_embed import patch_unembed_kernel

    B, n_tokens, D = tokens.shape
    F = weight.shape[0]
    cfg = _block_config(tokens.dtype, n_tokens, F, D, B, tokens.device)
    grid = (cdiv(n_tokens, cfg["BLOCK_M"]), cdiv(F, cfg["BLOCK_N"]), B)
    patch_unembed_kernel[grid](
        tokens, weight, bias.contiguous() if bias is not None else weight, out,  # the kernel reads bias with stride 1
        n_tokens, out.shape[3] // patch_size, F, D,
        *tokens.stride(),
        *weight.stride(),
        *out.stride(),
        PATCH=patch_size, HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(tokens.dtype), **cfg,
    )


def _weight_grad_config(n_features: int, dim: int, total_tokens: int, dtype: torch.dtype,
                        device: torch.device) -> dict:
    if _backend.triton_interpreter_enabled():
        # Small tiles and two splits: test shapes then cover partial blocks, a multi-step token loop per split and
        # token blocks that straddle two batch items.
        return dict(BLOCK_F=16, BLOCK_D=32, BLOCK_T=8, num_warps=4, num_stages=1, splits=min(2, total_tokens))
    block_f = min(128, max(16, _next_pow2(n_features)))
    block_d = 128 if block_f <= 64 else 64
    tiles = cdiv(n_features, block_f) * cdiv(dim, block_d)
    # The output is small (features x dim): split the token reduction until about two waves of programs.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(cdiv(2 * sms, tiles), cdiv(total_tokens, 256)))
    # fp32 operands: 64-token steps spill at 64x128 tiles (ptxas sm_90a, triton 3.6); 32 do not.
    return dict(BLOCK_F=block_f, BLOCK_D=block_d, BLOCK_T=32 if dtype == torch.float32 else 64,
                num_warps=8 if block_f * block_d >= 8192 else 4, num_stages=3, splits=splits)


def _launch_weight_grad_triton(latent, dense, patch_size: int, n_features: int, bias_from: int):
    """(fp32 (F, D) sum over tokens of packed(latent)^T . dense, fp32 column sums of dense (bias_from 1, length
    D) or of packed(latent) (bias_from 2, length F)). latent: (B, C, h, w) with F = C*p*p; dense: (B, N, D)."""
    from ..triton_kernels.patch_embed import patch_weight_grad_kernel

    B, n_tokens, dim = dense.shape
    total = B * n_tokens
    cfg = _weight_grad_config(n_features, dim, total, dense.dtype, dense.device)
    splits = cfg.pop("splits")
    per_split = cdiv(cdiv(total, splits), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    splits = cdiv(total, per_split)
    partial = torch.empty(splits, n_features, dim, dtype=torch.float32, device=dense.device)
    bias_partial = torch.empty(splits, dim if bias_from == 1 else n_features, dtype=torch.float32,
                               device=dense.device)
    grid = (cdiv(n_features, cfg["BLOCK_F"]), cdiv(dim, cfg["BLOCK_D"]), splits)
    patch_weight_grad_kernel[grid](
        latent, dense, partial, bias_partial,
        n_tokens, latent.shape[3] // patch_size, n_features, dim, total, per_split,
        *latent.stride(),
        *dense.stride(),
        PATCH=patch_size, BIAS_FROM=bias_from, DOT_DTYPE=_dot_dtype(dense.dtype), **cfg,
    )
    return partial.sum(0), bias_partial.sum(0)


def select_backend(op: str, backend: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """`op` is "patch_embed" or "patch_unembed"; x is its latent or tokens. There is no CUDA C++ backend."""
    return _backend.select(
        op,
        backend,
        platform_checks={"triton": lambda: _backend.triton_device_error(x.device)},
        case_checks={"triton": lambda: _triton_case_error(x, weight)},
    )


def patch_embed_into(latent, weight, bias, patch_size: int, out: torch.Tensor, backend: str) -> None:
    """Write patch_embed's tokens into `out` (B, N, D), last dim contiguous, with a chosen backend."""
    if backend == "triton":
        _launch_embed_triton(latent, weight, bias, patch_size, out)
    else:
        out.copy_(patch_embed_reference(latent, weight, bias, patch_size))


def patch_unembed_into(tokens, weight, bias, patch_size: int, out: torch.Tensor, backend: str) -> None:
    """Write patch_unembed's latent into `out` (B, C, h, w), any strides, with a chosen backend."""
    if backend == "triton":
        _launch_unembed_triton(tokens, weight, bias, patch_size, out)
    else:
        out.copy_(patch_unembed_reference(tokens, weight, bias, patch_size, out.shape[2], out.shape[3]))


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dcgen::patch_embed", mutates_args=())
def _patch_embed_op(
    latent: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], patch_size: int, backend: str,
) -> torch.Tensor:
    chosen = select_backend("patch_embed", backend, latent, weight)
    if chosen == "reference":
        return patch_embed_reference(latent, weight, bias, patch_size)
    B, _, h, w = latent.shape
    out = torch.empty(B, (h // patch_size) * (w // patch_size), weight.shape[0], dtype=latent.dtype,
                      device=latent.device)
    patch_embed_into(latent, weight, bias, patch_size, out, chosen)
    return out


@_patch_embed_op.register_fake
def _(latent, weight, bias, patch_size, backend):
    B, _, h, w = latent.shape
    return latent.new_empty(B, (h // patch_size) * (w // patch_size), weight.shape[0])


def _reference_vjp(reference, tensors, args, grad_out, wanted):
    """Gradients of `reference(*tensors, *args)` for the tensors flagged in `wanted`, recomputed under autograd."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(tensors, wanted)]
        out = reference(*leaves, *args)
        grads = iter(torch.autograd.grad(out, [t for t, w in zip(leaves, wanted) if w], grad_out, allow_unused=True))
    return [next(grads) if w else None for w in wanted]


def _save(ctx, tensors, rest) -> None:
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.rest = rest


def _saved(ctx):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    return tensors, [t is not None and ctx.needs_input_grad[i] for i, t in enumerate(tensors)]


@torch.library.custom_op("dcgen::patch_weight_grad", mutates_args=())
def _patch_weight_grad_op(
    latent: torch.Tensor, dense: torch.Tensor, patch_size: int, bias_from: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (packed(latent)^T . dense summed over batch and tokens, the column sums of dense (bias_from 1) or of
    packed(latent) (bias_from 2)): both weight gradients, with their bias gradient, in one pass. Backward only."""
    n_features = latent.shape[1] * patch_size * patch_size
    if backend == "triton":
        return _launch_weight_grad_triton(latent, dense, patch_size, n_features, bias_from)
    packed = _pack(latent, patch_size).float()
    dense = dense.float()
    weight_grad = torch.einsum("bnf,bnd->fd", packed, dense)
    return weight_grad, (dense if bias_from == 1 else packed).sum((0, 1))


@_patch_weight_grad_op.register_fake
def _(latent, dense, patch_size, bias_from, backend):
    n_features = latent.shape[1] * patch_size * patch_size
    return (dense.new_empty(n_features, dense.shape[2], dtype=torch.float32),
            dense.new_empty(dense.shape[2] if bias_from == 1 else n_features, dtype=torch.float32))


def _fused_backward_backend(op: str, backend: str, x, weight, grad) -> str:
    chosen = select_backend(op, backend, x, weight)
    if chosen == "triton" and _triton_case_error(grad) is not None:
        return "reference"
    return chosen


def _bias_grad(grad: torch.Tensor, dims, dtype) -> torch.Tensor:
    return grad.sum(dims, dtype=torch.float32).to(dtype)


def _embed_setup_context(ctx, inputs, output):
    latent, weight, bias, patch_size, backend = inputs
    _save(ctx, (latent, weight, bias), (patch_size, backend))


def _embed_backward(ctx, grad):
    (latent, weight, bias), wanted = _saved(ctx)
    patch_size, backend = ctx.rest
    grad = grad.to(latent.dtype)
    if _fused_backward_backend("patch_embed", backend, latent, weight, grad) != "triton":
        grads = _reference_vjp(patch_embed_reference, (latent, weight, bias), (patch_size,), grad, wanted)
        return (*grads, None, None)
    # Custom ops, not raw launches, so that torch.compile can trace this backward.
    d_latent = d_weight = d_bias = None
    if wanted[0]:  # packed grad = grad . weight, scattered back to NCHW: patch_unembed with weight^T, no bias
        d_latent = _patch_unembed_op(grad, weight.t(), None, patch_size, latent.shape[2], latent.shape[3], "triton")
    if wanted[1]:  # (D, K) = grad^T . packed(latent): the op gives its transpose, (K, D)
        weight_t, bias_grad = _patch_weight_grad_op(latent, grad, patch_size, 1, "triton")
        d_weight = weight_t.t().to(weight.dtype, memory_format=torch.contiguous_format)  # cast + transpose, one pass
        d_bias = bias_grad.to(bias.dtype) if wanted[2] else None
    elif wanted[2]:
        d_bias = _bias_grad(grad, (0, 1), bias.dtype)
    return d_latent, d_weight, d_bias, None, None


_patch_embed_op.register_autograd(_embed_backward, setup_context=_embed_setup_context)


@torch.library.custom_op("dcgen::patch_unembed", mutates_args=())
def _patch_unembed_op(
    tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], patch_size: int, height: int,
    width: int, backend: str,
) -> torch.Tensor:
    chosen = select_backend("patch_unembed", backend, tokens, weight)
    if chosen == "reference":
        return patch_unembed_reference(tokens, weight, bias, patch_size, height, width)
    channels = weight.shape[0] // (patch_size * patch_size)
    out = torch.empty(tokens.shape[0], channels, height, width, dtype=tokens.dtype, device=tokens.device)
    patch_unembed_into(tokens, weight, bias, patch_size, out, chosen)
    return out


@_patch_unembed_op.register_fake
def _(tokens, weight, bias, patch_size, height, width, backend):
    return tokens.new_empty(tokens.shape[0], weight.shape[0] // (patch_size * patch_size), height, width)


def _unembed_setup_context(ctx, inputs, output):
    tokens, weight, bias, patch_size, height, width, backend = inputs
    _save(ctx, (tokens, weight, bias), (patch_size, height, width, backend))


def _unembed_backward(ctx, grad):
    (tokens, weight, bias), wanted = _saved(ctx)
    patch_size, height, width, backend = ctx.rest
    grad = grad.to(tokens.dtype)
    if _fused_backward_backend("patch_unembed", backend, tokens, weight, grad) != "triton":
        grads = _reference_vjp(patch_unembed_reference, (tokens, weight, bias), (patch_size, height, width), grad,
                               wanted)
        return (*grads, None, None, None, None)
    d_tokens = d_weight = d_bias = None
    if wanted[0]:  # packed(grad) . weight, gathered from NCHW: patch_embed with weight^T, no bias
        d_tokens = _patch_embed_op(grad, weight.t(), None, patch_size, "triton")
    if wanted[1]:  # (F, D) = packed(grad)^T . tokens
        weight_grad, bias_grad = _patch_weight_grad_op(grad, tokens, patch_size, 2, "triton")
        d_weight = weight_grad.to(weight.dtype)
        d_bias = bias_grad.to(bias.dtype) if wanted[2] else None
    elif wanted[2]:
        p = patch_size
        d_bias = _bias_grad(grad.unflatten(2, (height // p, p)).unflatten(4, (width // p, p)), (0, 2, 4),
                            bias.dtype).flatten()  # (C, p, p) -> feature c*p*p + i*p + j
    return d_tokens, d_weight, d_bias, None, None, None, None


_patch_unembed_op.register_autograd(_unembed_backward, setup_context=_unembed_setup_context)


# ----------------------------------------------------------------------------------------------- public API
def patch_embed(
    latent: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    patch_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Patchify + linear embed: (B, C, h, w) latent -> (B, (h/p)(w/p), D) tokens in latent's dtype.

    Equals `nn.Linear(C*p*p, D)(FluxPipeline._pack_latents(latent))` for p = 2, and the 1x1 layout
    (feature = channel, tokens row-major over (y, x)) for p = 1. weight: (D, C*p*p) as nn.Linear stores it;
    bias: (D,) or None; same dtype (fp32/bf16/fp16) and device as latent. Any latent strides; fp32 accumulate.
    """
    _backend.check_backend_name(backend)
    _validate_embed(latent, weight, bias, patch_size)
    return _patch_embed_op(latent, weight, bias, patch_size, backend)


def patch_unembed(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    patch_size: int,
    height: int,
    width: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Linear + unpatchify: (B, (h/p)(w/p), D) tokens -> contiguous (B, C, height, width) in tokens' dtype.

    Equals `FluxPipeline._unpack_latents(nn.Linear(D, C*p*p)(tokens))` for p = 2 (height/width here are latent
    sizes, not pixels), a plain token->NCHW transpose for p = 1. weight: (C*p*p, D); bias: (C*p*p,) or None.
    """
    _backend.check_backend_name(backend)
    _validate_unembed(tokens, weight, bias, patch_size, height, width)
    return _patch_unembed_op(tokens, weight, bias, patch_size, height, width, backend)
