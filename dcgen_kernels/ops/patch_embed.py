"""Ops `patch_embed` / `patch_unembed`: latent <-> token projections with the patch (un)packing fused in.

`patch_embed` is FLUX's `_pack_latents` followed by `x_embedder` (nn.Linear); `patch_unembed` is `proj_out`
(nn.Linear) followed by `_unpack_latents`. patch_size 2 is the FLUX f8c16 layout (feature = c*4 + i*2 + j);
patch_size 1 is the DC-Gen layout for DC-AE latents (feature = c, token = y*w + x).

Backends:
- cuda (cuBLAS through torch; needs no `_C`): the GEMMs run on the packed token matrix of the latent. For p = 1 that
  matrix is a view (an NCHW latent with B = 1 is its transpose, a channels-last latent the matrix itself) and
  patch_unembed returns the GEMM output viewed as channels-last (B, C, h, w), as diffusers' 1x1 unpatchify does:
  nothing is copied. For p = 2 (and NCHW batches for p = 1) the latent side is packed or unpacked by one copy:
  C*p*p <= 128 features against the tokens' D = 2240-3072, so under 6% of the GEMM's bytes; on a GPU a Triton
  kernel moving whole pixel runs and token rows (patch_pack_kernel / patch_unpack_kernel, added 2026-11-28 after
  run L, not yet timed), elsewhere a torch copy.
- triton: GEMMs that gather their operand straight from the NCHW latent, or scatter their result straight into
  it, so no packed tensor exists (triton_kernels/patch_embed.py). The 16-bit embedding of latents of up to 128
  rows per token row (C * p: every FLUX / DC-AE layout) runs the narrow kernel, which gathers a token block once and
  streams its output tiles, by TMA where the output allows it and that is faster (timed per call key). A 16-bit
  unembedding whose grid would have under half as many programs as SMs splits D into up to 4 slices, the last
  program of each tile summing their fp32 partials (both added 2026-11-28 after the run quoted below, not yet timed
  on a GPU).
`auto` on a GPU where both serve a call times both on its first call per shape, layout and dtype and keeps the
faster (`_common.timed_choice`; the backward's input-gradient op is a call of its own): on an H100 (run L,
2026-11-27) each won some of the 32 benchmarked cases, Triton the f8c16 embed forward at 4096 tokens (15.9 vs 18.3
us), the f8c16 unembed forward at 16384 (42.4 vs 50.3 us) and the 4096-token p = 1 embed forwards (13.6 vs 17.2 us),
cuBLAS most others.
Backward: d(input) is the other op with the weight transposed and the same backend request (patch_unembed(grad,
weight.T) for patch_embed, patch_embed(grad, weight.T) for patch_unembed); d(weight) and d(bias) are one cuBLAS
GEMM over all B*N tokens and a column sum (fp32-accumulated), on the packed token matrices, or for patch_embed's
wide tokens one GEMM for both (a ones column appended to the packed latent: the token gradient read once). On the
reference backend it is the vjp of the fp32 reference, recomputed under autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ._common import (
    arrival_counters, call_op, cdiv, check_tensor, custom_op, reference_vjp, timed_choice, tma_alignment_error,
)

__all__ = ["patch_embed", "patch_embed_reference", "patch_unembed", "patch_unembed_reference"]

PATCH_SIZES = (1, 2)
_INT32_LIMIT = 2**31


# ----------------------------------------------------------------------------------------------- reference
def _pack(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/p)(w/p), C*p*p); diffusers' FluxPipeline._pack_latents for p = 2."""
    B, C, h, w = latent.shape
    p = patch_size
    return _patch_axes(latent, p).reshape(B, (h // p) * (w // p), C * p * p)


def _patch_axes(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) -> the view (B, h/p, w/p, C, p, p) that _pack flattens."""
    B, C, h, w = latent.shape
    p = patch_size
    return latent.view(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)


def _unpack(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, (h/p)(w/p), C*p*p) -> (B, C, h, w); diffusers' FluxPipeline._unpack_latents for p = 2."""
    B, _, F = tokens.shape
    p = patch_size
    if p == 1:  # a channels-last view: nothing moves (the strides of patch_unembed's output and of its fake)
        return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)
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
    if type(patch_size) is not int or patch_size not in PATCH_SIZES:  # not 2.0, numpy ints or True
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


# ----------------------------------------------------------------------------------------------- cuBLAS
def _token_matrix(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) -> its packed tokens as one (B*N, C*p*p) GEMM operand: a view where the strides allow it (p = 1
    with B = 1 or channels-last: cuBLAS takes the transposed layout as is), else one copy of the narrow latent (by
    patch_pack_kernel where Triton serves the device)."""
    B, C, h, w = x.shape
    p = patch_size
    axes = _patch_axes(x, p)
    if _merges(axes.shape[:3], axes.stride()[:3]) and _merges(axes.shape[3:], axes.stride()[3:]):
        return axes.view(B * (h // p) * (w // p), C * p * p)
    return call_op(_patch_pack_op, x, p)


def _merges(sizes, strides) -> bool:
    """Whether these dims flatten into one strided dim (what view needs), size-1 dims aside."""
    dims = [(size, stride) for size, stride in zip(sizes, strides) if size != 1]
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(dims, dims[1:]))


def _latent_of(tokens_2d: torch.Tensor, batch: int, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B*N, C*p*p) contiguous -> (B, C, h, w): for p = 1 a channels-last view (no copy), for p = 2 one copy (by
    patch_unpack_kernel where Triton serves the device)."""
    if patch_size == 2:
        return call_op(_patch_unpack_op, tokens_2d, batch, patch_size, height, width)
    return _unpack(tokens_2d.view(batch, height * width, tokens_2d.shape[1]), patch_size, height, width)


def _triton_packs(x: torch.Tensor, latent_span: int) -> bool:
    """The cuBLAS path's layout copies run as Triton kernels on GPUs where Triton runs (whole pixel runs and token
    rows: a permuted torch copy reads 2-4 useful bytes per 32-byte sector; H100 run L: the pack / unpack of FLUX's
    4096 / 16384 tokens took 4 / 6.5 and 4 / 8 us around the GEMM), else as torch copies. The kernels index within
    a latent item in int32."""
    return (x.is_cuda and _backend.triton_device_error(x.device) is None and x.numel() > 0
            and latent_span < _INT32_LIMIT)


def _ones_column_width(features: int) -> int:
    """Row width of a token matrix of `features` columns followed by a ones column and zeros: a multiple of 16
    elements, so its rows stay 16-byte aligned for cuBLAS and the pack kernel's vector stores."""
    return cdiv(features + 1, 16) * 16


@custom_op("dcgen::patch_pack")
def _patch_pack_op(latent: torch.Tensor, patch_size: int, ones_column: bool = False) -> torch.Tensor:
    """latent (B, C, h, w) -> its token matrix (B*N, C*p*p), contiguous: the cuBLAS path's copy where no view
    exists. With ones_column each row continues with 1, 0, ..., 0 to `_ones_column_width(C*p*p)` columns. A custom
    op, so the backward, which packs too, still traces under torch.compile."""
    B, C, h, w = latent.shape
    p = patch_size
    features = C * p * p
    packed = latent.new_empty(B * (h // p) * (w // p), _ones_column_width(features) if ones_column else features)
    tail_cols = packed.shape[1] - features
    if _triton_packs(latent, _span(latent)):
        _launch_pack(latent, packed, p, unpack=False, tail_cols=tail_cols)
        return packed
    packed[:, :features].view(B, h // p, w // p, C, p, p).copy_(_patch_axes(latent, p))
    if ones_column:
        packed[:, features:] = 0
        packed[:, features] = 1
    return packed


@_patch_pack_op.register_fake
def _(latent, patch_size, ones_column=False):
    B, C, h, w = latent.shape
    features = C * patch_size * patch_size
    return latent.new_empty(B * (h // patch_size) * (w // patch_size),
                            _ones_column_width(features) if ones_column else features)


@custom_op("dcgen::patch_unpack")
def _patch_unpack_op(tokens_2d: torch.Tensor, batch: int, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B*N, C*p*p) token matrix, last dim contiguous -> its latent (B, C, h, w), contiguous: _patch_pack_op's
    inverse."""
    p = patch_size
    channels = tokens_2d.shape[1] // (p * p)
    latent = tokens_2d.new_empty(batch, channels, height, width)
    if _triton_packs(tokens_2d, channels * height * width):
        _launch_pack(latent, tokens_2d, p, unpack=True)
    else:
        _patch_axes(latent, p).copy_(tokens_2d.view(batch, height // p, width // p, channels, p, p))
    return latent


@_patch_unpack_op.register_fake
def _(tokens_2d, batch, patch_size, height, width):
    return tokens_2d.new_empty(batch, tokens_2d.shape[1] // (patch_size * patch_size), height, width)


def _launch_pack(latent: torch.Tensor, packed: torch.Tensor, patch_size: int, unpack: bool,
                 tail_cols: int = 0) -> None:
    """patch_pack_kernel (latent -> packed) or, with unpack, patch_unpack_kernel (packed -> latent); packed is the
    (B*N, C*p*p) token matrix, its last dim contiguous; latent any strides. tail_cols (pack only): the rows go on
    with that many columns 1, 0, ..., 0 (packed is that much wider)."""
    from ..triton_kernels.patch_embed import patch_pack_kernel, patch_unpack_kernel

    B, C, h, w = latent.shape
    p = patch_size
    grid_h, grid_w, n_rows = h // p, w // p, C * p
    if _backend.triton_interpreter_enabled():
        block_m, block_r = _INTERPRETER_TILES["BLOCK_M"], _INTERPRETER_TILES["BLOCK_R"]
    else:  # 32 tokens x up to 64 feature rows: 4-8 KB per program, FLUX's 4096 tokens in 128 programs
        block_m, block_r = min(32, _next_pow2(grid_w)), min(64 // p, _next_pow2(n_rows))
    grid = (grid_h * cdiv(grid_w, block_m), cdiv(n_rows, block_r), B)
    tiles = dict(PATCH=p, BLOCK_M=block_m, BLOCK_R=block_r, num_warps=4)
    if unpack:
        patch_unpack_kernel[grid](packed, latent, grid_w, n_rows, grid_h * grid_w, packed.stride(0), *latent.stride(),
                                  **tiles)
    else:
        patch_pack_kernel[grid](latent, packed, grid_w, n_rows, grid_h * grid_w, *latent.stride(), packed.stride(0),
                                tail_cols, TAIL=_next_pow2(tail_cols) if tail_cols else 0, **tiles)


def _linear_2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _embed_cublas(latent, weight, bias, patch_size: int) -> torch.Tensor:
    out = _linear_2d(_token_matrix(latent, patch_size), weight, bias)
    B, _, h, w = latent.shape
    return out.view(B, (h // patch_size) * (w // patch_size), weight.shape[0])


def _unembed_cublas(tokens, weight, bias, patch_size: int, height: int, width: int) -> torch.Tensor:
    out = _linear_2d(tokens.reshape(tokens.shape[0] * tokens.shape[1], tokens.shape[2]), weight, bias)
    return _latent_of(out, tokens.shape[0], patch_size, height, width)


def _cublas_device_error(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else f"cuBLAS needs a CUDA tensor, got device {device}"


# ----------------------------------------------------------------------------------------------- Triton
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


def _token_block(grid_h: int, grid_w: int, programs_per_token_block: int, device: torch.device) -> int:
    """Tokens per program (all in one token row): the row, up to 128, halved (down to 32) while the grid has fewer
    programs than SMs; narrow outputs (unembed: 32-128 features) give few programs, but smaller token blocks would
    re-read the whole weight from L2 once per block."""
    block_m = min(128, max(16, _next_pow2(grid_w)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    while block_m > 32 and grid_h * cdiv(grid_w, block_m) * programs_per_token_block < sms:
        block_m //= 2
    return block_m


def _dot_dtype(dtype: torch.dtype):
    import triton.language as tl

    if _backend.triton_interpreter_enabled():
        return tl.float32  # bf16 dots are wrong under the interpreter; fp32 checks the same kernel logic
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


# Under the interpreter: small tiles, so the test shapes cover partial token, feature and row blocks, several token
# blocks per row and a multi-step reduction loop.
_INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=16, BLOCK_K=32, num_warps=4, num_stages=1)


# patch_embed_narrow_kernel takes latents of up to this many rows per token row (C * p: 32 for FLUX's f8c16 and
# DC-AE f32c32, 128 for f64c128); under the interpreter 16, so the test shapes run both embed kernels.
NARROW_MAX_ROWS = 128
_INTERPRETER_NARROW_MAX_ROWS = 16


def _launch_embed_triton(latent, weight, bias, patch_size, out) -> None:
    """Write patch_embed's tokens into `out` (B, N, D), last dim contiguous."""
    if not out.numel():  # e.g. a zero-width latent: no tokens to write (a TMA descriptor cannot have zero extents)
        return
    B, C, h, w = latent.shape
    p = patch_size
    interpret = _backend.triton_interpreter_enabled()
    narrow_max = _INTERPRETER_NARROW_MAX_ROWS if interpret else NARROW_MAX_ROWS
    # fp32 on a GPU keeps the general kernel: its FMA dot would hold the gathered fp32 rows in registers (spills)
    if _next_pow2(C * p) <= narrow_max and (interpret or latent.dtype != torch.float32):
        _launch_embed_narrow_triton(latent, weight, bias, patch_size, out)
        return
    from ..triton_kernels.patch_embed import patch_embed_kernel

    grid_h, grid_w, dim = h // p, w // p, weight.shape[0]
    if interpret:
        cfg = {k: v for k, v in _INTERPRETER_TILES.items() if k != "BLOCK_K"}
    else:
        block_n = min(128, max(16, _next_pow2(dim)))
        block_m = _token_block(grid_h, grid_w, B * cdiv(dim, block_n), latent.device)
        block_r = min(32 if latent.dtype == torch.float32 else 64, max(16, _next_pow2(C * p)))
        # fp32 dots run on CUDA cores with the accumulator in registers: 64x128 needs 8 warps (4 spill, ptxas sm_90a).
        wide = block_m * block_n >= (64 if latent.dtype == torch.float32 else 128) * 128
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=8 if wide else 4, num_stages=3)
    grid = (grid_h * cdiv(grid_w, cfg["BLOCK_M"]), cdiv(dim, cfg["BLOCK_N"]), B)
    patch_embed_kernel[grid](
        latent, weight, bias.contiguous() if bias is not None else weight, out,  # the kernel reads bias with stride 1
        grid_w, C * p, dim,
        *latent.stride(),
        *weight.stride(),
        out.stride(0), out.stride(1),
        PATCH=p, HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(latent.dtype), **cfg,
    )


def _launch_embed_narrow_triton(latent, weight, bias, patch_size, out, tma_store: Optional[bool] = None) -> None:
    """tma_store: store the output tiles by TMA (True) or per thread (False); None: TMA where it can address the
    output, and on a GPU only if it is the faster on the call key's first call (`timed_choice`)."""
    from ..triton_kernels.patch_embed import patch_embed_narrow_kernel

    B, C, h, w = latent.shape
    p = patch_size
    grid_h, grid_w, dim = h // p, w // p, weight.shape[0]
    block_r = max(16 // p, _next_pow2(C * p))  # the dot's K = p * block_r: at least 16
    if _backend.triton_interpreter_enabled():
        cfg = dict(BLOCK_M=_INTERPRETER_TILES["BLOCK_M"], BLOCK_N=_INTERPRETER_TILES["BLOCK_N"], num_warps=4,
                   num_stages=1)
        n_tiles = {False: 2, True: 2}  # two tiles per program: the tests cover the stream and partial tiles
    else:
        block_n = min(128, 8192 // (p * block_r), max(16, _next_pow2(dim)))  # 16 KB weight tiles, 3 in flight
        block_m = _token_block(grid_h, grid_w, B * cdiv(dim, block_n), latent.device)
        warps = 8 if block_m * block_n >= 128 * 128 else 4
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=3)
        sms = torch.cuda.get_device_properties(latent.device).multi_processor_count
        row_tiles = cdiv(dim, block_n)
        tiles = grid_h * cdiv(grid_w, block_m) * row_tiles * B

        def tiles_per_program(programs_per_sm: int, most: int) -> int:
            """An equal share of a token block's output tiles per program, for about programs_per_sm * SMs programs.
            Rounding the other way left a second, mostly idle wave (H100 run J: 512 programs for 396 slots at 4096
            tokens, SMs active 61% of the kernel's time)."""
            n = max(1, min(most, cdiv(tiles, programs_per_sm * sms)))
            return cdiv(row_tiles, cdiv(row_tiles, n))

        # Per-thread stores: about 3 programs per SM (what the 4-warp config's ~140 registers and 64 KB of shared
        # memory allow; 3 waves of the 8-warp one, 157 registers: one per SM). TMA stores at 8 warps: 120 registers,
        # two per SM (sm_90a, triton 3.6), so one wave of them (FLUX's 16384 tokens: 256 programs of 12 tiles rather
        # than 384 of 8, whose second wave would be under half full).
        n_tiles = {False: tiles_per_program(3, 8),
                   True: tiles_per_program(2, 16) if warps == 8 else tiles_per_program(3, 8)}

    def launch(tma_store: bool) -> None:
        out_desc = _embed_out_descriptor(out, cfg["BLOCK_M"], cfg["BLOCK_N"]) if tma_store else None
        grid = (grid_h * cdiv(grid_w, cfg["BLOCK_M"]), cdiv(dim, n_tiles[tma_store] * cfg["BLOCK_N"]), B)
        patch_embed_narrow_kernel[grid](
            latent, weight, bias.contiguous() if bias is not None else weight,  # the kernel reads bias with stride 1
            out, out_desc,
            grid_w, C * p, dim,
            *latent.stride(),
            *weight.stride(),
            out.stride(0), out.stride(1),
            PATCH=p, HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(latent.dtype), BLOCK_R=block_r,
            N_TILES=n_tiles[tma_store], TMA_STORE=tma_store, **cfg,
        )

    if tma_store is None:
        tma_store = _embed_tma_store_possible(out, grid_w, cfg["BLOCK_M"])
        if tma_store and latent.is_cuda:  # time both stores once per call key
            candidates = {"pointer_store": lambda: launch(False), "tma_store": lambda: launch(True)}
            key = _call_key(latent, weight, bias, patch_size, *out.stride())
            tma_store = timed_choice("patch_embed_narrow_store", key, candidates) == "tma_store"
    launch(tma_store)


def _embed_tma_store_possible(out: torch.Tensor, grid_w: int, block_m: int) -> bool:
    """Whether the narrow embedding can store its tiles by TMA: whole token blocks per token row (the copy clips
    at N, not at a row's end) and an output TMA can address (16-byte aligned base and strides, last dim dense)."""
    return grid_w % block_m == 0 and tma_alignment_error("out", out) is None


def _embed_out_descriptor(out: torch.Tensor, block_m: int, block_n: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(out, [1, block_m, block_n])


# The split-K form of the unembedding (16-bit tokens, grids of under half as many programs as SMs): tokens per
# program such that p * BLOCK_R * tokens <= 8192 fp32 accumulators (128 tokens for FLUX's f8c16, 64 for f64c128; a
# full 8192 runs at 8 warps: at 4, sm_90a spilled), up to 4 slices of D, each at least 512 deep.
_SPLIT_ACCUMULATORS = 8192
_MAX_SPLIT_K = 4
_MIN_SPLIT_DEPTH = 512


def _unembed_split_plan(B, grid_h, grid_w, n_rows, dim, block_r, p, sms):
    """(BLOCK_M, TOKEN_ROWS, SPLIT_K) of the split-K unembedding, or None where one-pass programs fill the GPU.

    FLUX f8c16 at 4096 tokens: one-pass programs of 32 tokens (128 of them, one per SM) re-read the 0.4 MB weight
    128 times, 50 MB of L2 reads beside the tokens' 25 MB (H100 run L: 20.6 us against cuBLAS's 11.5 us for the bare
    GEMM). Blocks of 2 x 64 tokens in 4 slices of D: 128 programs again, the weight read 12.6 MB in all."""
    tokens = min(128, _SPLIT_ACCUMULATORS // (p * block_r))
    block_m = min(tokens, _next_pow2(grid_w))
    token_rows = min(tokens // block_m, _next_pow2(grid_h))
    programs = B * cdiv(grid_h, token_rows) * cdiv(grid_w, block_m) * cdiv(n_rows, block_r)
    split = min(_MAX_SPLIT_K, sms // programs, dim // _MIN_SPLIT_DEPTH)
    return (block_m, token_rows, split) if split >= 2 else None


def _launch_unembed_triton(tokens, weight, bias, patch_size, out) -> None:
    """Write patch_unembed's latent into `out` (B, C, h, w), any strides."""
    from ..triton_kernels.patch_embed import patch_unembed_kernel

    if weight.stride(1) != 1:
        # A K-strided weight (patch_embed's backward passes weight.t()) compiles to another kernel: sm_90a, f8c16,
        # 4096 tokens: 231 registers and a third of the 16-byte copies instead of 96 (H100 run K, by subtraction:
        # the embed backward's input gradient ~0.13 ms against 0.02 for the forward unembedding). One copy of the
        # weight (C*p*p x D, <= 0.8 MB) is cheaper.
        weight = weight.contiguous()
    B, _, dim = tokens.shape
    p = patch_size
    C, h, w = out.shape[1:]
    grid_h, grid_w, n_rows = h // p, w // p, C * p
    if _backend.triton_interpreter_enabled():
        # Small tiles, and two token rows per program and slices of D where the test shapes have them: both forms.
        cfg = dict(BLOCK_M=_INTERPRETER_TILES["BLOCK_M"], BLOCK_R=_INTERPRETER_TILES["BLOCK_R"],
                   BLOCK_K=_INTERPRETER_TILES["BLOCK_K"], TOKEN_ROWS=2 if grid_h > 2 else 1,
                   SPLIT_K=max(1, min(3, cdiv(dim, _INTERPRETER_TILES["BLOCK_K"]))), num_warps=4, num_stages=1)
    else:
        block_r = min(128 // p, max(16, _next_pow2(n_rows)))
        sms = torch.cuda.get_device_properties(tokens.device).multi_processor_count
        plan = None if tokens.dtype == torch.float32 else _unembed_split_plan(B, grid_h, grid_w, n_rows, dim,
                                                                                block_r, p, sms)
        if plan is not None:
            block_m, token_rows, split = plan
            cfg = dict(BLOCK_M=block_m, TOKEN_ROWS=token_rows, BLOCK_R=block_r, BLOCK_K=64, SPLIT_K=split,
                       num_warps=8 if block_m * token_rows * p * block_r >= _SPLIT_ACCUMULATORS else 4, num_stages=5)
        else:
            block_m = _token_block(grid_h, grid_w, B * cdiv(n_rows, block_r), tokens.device)
            if tokens.dtype != torch.float32 and block_m <= 32:
                # Few tokens per program (a small grid spread over the SMs, ~1 program each): a program alone must
                # keep enough of its token stream in flight. 128-deep tiles, 4 ahead: 32 KB per SM instead of 12 KB
                # (64-deep, 3 ahead). H100, 4096 tokens (runs D -> I): the p=1 layouts 10-18% faster (f64c128 22 ->
                # 18 us), f8c16 unchanged (19-20 us).
                cfg = dict(BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=128, num_warps=4, num_stages=5)
            else:
                cfg = dict(BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=32 if tokens.dtype == torch.float32 else 64,
                           num_warps=4, num_stages=4)
            cfg.update(TOKEN_ROWS=1, SPLIT_K=1)
    split = cfg["SPLIT_K"]
    grid = (cdiv(grid_h, cfg["TOKEN_ROWS"]) * cdiv(grid_w, cfg["BLOCK_M"]), cdiv(n_rows, cfg["BLOCK_R"]), B * split)
    split_depth = cdiv(cdiv(dim, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    if split > 1:
        tiles = grid[0] * grid[1] * B
        partial = torch.empty(tiles * split * p * cfg["TOKEN_ROWS"] * cfg["BLOCK_M"] * cfg["BLOCK_R"],
                              dtype=torch.float32, device=tokens.device)
        arrivals = arrival_counters(tokens.device, tiles)
    else:
        partial = arrivals = out  # not read
    patch_unembed_kernel[grid](
        tokens, weight, bias.contiguous() if bias is not None else weight, out,  # the kernel reads bias with stride 1
        partial, arrivals,
        grid_h, grid_w, n_rows, dim, split_depth,
        *tokens.stride(),
        *weight.stride(),
        *out.stride(),
        PATCH=p, HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(tokens.dtype), **cfg,
    )


def select_backend(op: str, backend: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """`op` is "patch_embed" or "patch_unembed"; x is its latent or tokens. "cuda" is cuBLAS (no _C needed)."""
    return _backend.select(
        op,
        backend,
        platform_checks={"cuda": lambda: _cublas_device_error(x.device),
                         "triton": lambda: _backend.triton_device_error(x.device)},
        case_checks={"triton": lambda: _triton_case_error(x, weight)},
    )


def _unembed_output(tokens: torch.Tensor, channels: int, patch_size: int, height: int, width: int) -> torch.Tensor:
    """patch_unembed's output layout, every backend and the fake alike: channels-last for p = 1 (the GEMM output
    itself, as diffusers' unpatchify leaves it), contiguous NCHW for p = 2."""
    B = tokens.shape[0]
    if patch_size == 1:
        return tokens.new_empty(B, height, width, channels).permute(0, 3, 1, 2)
    return tokens.new_empty(B, channels, height, width)


# ----------------------------------------------------------------------------------------------- custom ops
@custom_op("dcgen::patch_embed")
def _patch_embed_op(
    latent: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], patch_size: int, backend: str,
) -> torch.Tensor:
    chosen = select_backend("patch_embed", backend, latent, weight)
    if chosen == "reference":
        return patch_embed_reference(latent, weight, bias, patch_size)
    implementations = {"cuda": lambda: _embed_cublas(latent, weight, bias, patch_size),
                       "triton": lambda: _embed_triton(latent, weight, bias, patch_size)}
    if _both_timed(chosen, backend, latent, weight):
        chosen = timed_choice("patch_embed", _call_key(latent, weight, bias, patch_size), implementations)
    return implementations[chosen]()


def _embed_triton(latent, weight, bias, patch_size: int) -> torch.Tensor:
    B, _, h, w = latent.shape
    out = torch.empty(B, (h // patch_size) * (w // patch_size), weight.shape[0], dtype=latent.dtype,
                      device=latent.device)
    _launch_embed_triton(latent, weight, bias, patch_size, out)
    return out


def _both_timed(chosen: str, backend: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`auto` on a GPU where both cuBLAS and the Triton kernels can serve the call: the first call per key times
    both and keeps the faster (`_common.timed_choice`)."""
    return (chosen == "cuda" and _backend.requested(backend) == "auto"
            and _backend.triton_device_error(x.device) is None and _triton_case_error(x, weight) is None)


def _call_key(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *sizes: int) -> tuple:
    return (tuple(x.shape), x.stride(), str(x.dtype), tuple(weight.shape), weight.stride(), bias is not None, *sizes)


@_patch_embed_op.register_fake
def _(latent, weight, bias, patch_size, backend):
    B, _, h, w = latent.shape
    return latent.new_empty(B, (h // patch_size) * (w // patch_size), weight.shape[0])


def _save(ctx, tensors, rest) -> None:
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.rest = rest


def _saved(ctx):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    return tensors, [t is not None and ctx.needs_input_grad[i] for i, t in enumerate(tensors)]


def _backward_on_reference(op: str, backend: str, x, weight, grad) -> bool:
    """Whether this backward is the reference vjp: the forward's backend was the reference, Triton would be asked
    for a gradient too large for its int32 indexing where cuBLAS is not there to take it, or the backward must
    itself be differentiable (create_graph=True: the fused one packs through ops without autograd)."""
    if torch.is_grad_enabled():
        return True
    chosen = select_backend(op, backend, x, weight)
    return chosen == "reference" or (chosen == "triton" and _triton_case_error(grad) is not None
                                     and _cublas_device_error(grad.device) is not None)


def _linear_param_grads(grad_2d, input_2d, wanted):
    """nn.Linear's weight grad grad^T . input (one cuBLAS GEMM over all B*N tokens) and its bias grad, the column
    sums of grad (torch accumulates 16-bit sums in fp32), as its own backward computes them; grad_2d / input_2d are
    the Linear's (B*N, out) / (B*N, in) operands."""
    d_weight = torch.mm(grad_2d.t(), input_2d) if wanted[1] else None
    d_bias = grad_2d.sum(0) if wanted[2] else None
    return d_weight, d_bias


def _embed_setup_context(ctx, inputs, output):
    latent, weight, bias, patch_size, backend = inputs
    _save(ctx, (latent, weight, bias), (patch_size, backend))


def _embed_backward(ctx, grad):
    (latent, weight, bias), wanted = _saved(ctx)
    patch_size, backend = ctx.rest
    grad = grad.to(latent.dtype)
    if _backward_on_reference("patch_embed", backend, latent, weight, grad):
        grads = reference_vjp(patch_embed_reference, (latent, weight, bias), (patch_size,), (grad,), wanted)
        return (*grads, None, None)
    d_latent = None
    if wanted[0]:  # unpack(grad . weight): patch_unembed with weight^T, no bias (a custom op: torch.compile traces it)
        d_latent = call_op(_patch_unembed_op, grad, weight.t(), None, patch_size, latent.shape[2], latent.shape[3],
                           backend)
    grad_2d = grad.reshape(-1, grad.shape[2])
    features = weight.shape[1]
    if wanted[1] and wanted[2] and grad.shape[2] >= 4 * _ones_column_width(features):
        # d(bias) = grad^T . ones rides in d(weight)'s GEMM as a ones column of the packed latent, so the wide grad
        # (D = 2240-3072 per token) is read once instead of again by a column sum; the column's extra traffic (under
        # 3 * its width per token, a pack where p = 1 had a view) stays below a quarter of what that saves
        both = torch.mm(grad_2d.t(), call_op(_patch_pack_op, latent, patch_size, True))
        return d_latent, both[:, :features], both[:, features], None, None
    packed = _token_matrix(latent, patch_size) if wanted[1] else None
    d_weight, d_bias = _linear_param_grads(grad_2d, packed, wanted)
    return d_latent, d_weight, d_bias, None, None


_patch_embed_op.register_autograd(_embed_backward, setup_context=_embed_setup_context)


@custom_op("dcgen::patch_unembed")
def _patch_unembed_op(
    tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], patch_size: int, height: int,
    width: int, backend: str,
) -> torch.Tensor:
    chosen = select_backend("patch_unembed", backend, tokens, weight)
    if chosen == "reference":
        return patch_unembed_reference(tokens, weight, bias, patch_size, height, width)
    implementations = {"cuda": lambda: _unembed_cublas(tokens, weight, bias, patch_size, height, width),
                       "triton": lambda: _unembed_triton(tokens, weight, bias, patch_size, height, width)}
    if _both_timed(chosen, backend, tokens, weight):
        key = _call_key(tokens, weight, bias, patch_size, height, width)
        chosen = timed_choice("patch_unembed", key, implementations)
    return implementations[chosen]()


def _unembed_triton(tokens, weight, bias, patch_size: int, height: int, width: int) -> torch.Tensor:
    out = _unembed_output(tokens, weight.shape[0] // (patch_size * patch_size), patch_size, height, width)
    _launch_unembed_triton(tokens, weight, bias, patch_size, out)
    return out


@_patch_unembed_op.register_fake
def _(tokens, weight, bias, patch_size, height, width, backend):
    return _unembed_output(tokens, weight.shape[0] // (patch_size * patch_size), patch_size, height, width)


def _unembed_setup_context(ctx, inputs, output):
    tokens, weight, bias, patch_size, height, width, backend = inputs
    _save(ctx, (tokens, weight, bias), (patch_size, height, width, backend))


def _unembed_backward(ctx, grad):
    (tokens, weight, bias), wanted = _saved(ctx)
    patch_size, height, width, backend = ctx.rest
    grad = grad.to(tokens.dtype)
    if _backward_on_reference("patch_unembed", backend, tokens, weight, grad):
        grads = reference_vjp(patch_unembed_reference, (tokens, weight, bias), (patch_size, height, width), (grad,),
                              wanted)
        return (*grads, None, None, None, None)
    d_tokens = None
    packed = _token_matrix(grad, patch_size) if wanted[1] or wanted[2] else None
    if wanted[0] and packed is not None and patch_size == 2 and select_backend(
            "patch_embed", backend, grad, weight) == "cuda":
        # the parameter gradients packed the gradient already: the cuBLAS form is its bare GEMM (faster than the
        # Triton one at p = 2: H100 run L, f8c16 embedding 14.3 / 45.6 us against 15.9 / 69.4 at 4096 / 16384 tokens)
        d_tokens = torch.mm(packed, weight).view(tokens.shape)
    elif wanted[0]:  # pack(grad) . weight: patch_embed with weight^T, no bias
        d_tokens = call_op(_patch_embed_op, grad, weight.t(), None, patch_size, backend)
    tokens_2d = tokens.reshape(-1, tokens.shape[2]) if wanted[1] else None
    d_weight, d_bias = _linear_param_grads(packed, tokens_2d, wanted)
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
    return call_op(_patch_embed_op, latent, weight, bias, patch_size, backend)


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
    """Linear + unpatchify: (B, (h/p)(w/p), D) tokens -> (B, C, height, width) in tokens' dtype.

    Equals `FluxPipeline._unpack_latents(nn.Linear(D, C*p*p)(tokens))` for p = 2 (height/width here are latent
    sizes, not pixels), a plain token->NCHW transpose for p = 1. weight: (C*p*p, D); bias: (C*p*p,) or None.
    The result is contiguous for p = 2 and channels-last for p = 1 (the GEMM's output itself, no copy), on every
    backend.
    """
    _backend.check_backend_name(backend)
    _validate_unembed(tokens, weight, bias, patch_size, height, width)
    return call_op(_patch_unembed_op, tokens, weight, bias, patch_size, height, width, backend)
