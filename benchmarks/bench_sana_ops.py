"""SANA / DC-AE ops: each dcgen_kernels op against the stock diffusers math it replaces, at SANA-1.6B shapes.

Real mode: bf16, B=1, latents 64x64 and 128x128 (N = 4096, 16384 image tokens), hidden 2240, 70 heads x 32,
GLUMBConv hidden 5600 (mlp_ratio 2.5), cross-attention 20 heads x 112 over 300 text tokens; the DC-AE multiscale
linear attention at the shapes of the f32c32 decoder's EfficientViT stages for a 4096^2 image. Tiny mode: the
same code paths at toy sizes, fp32 on the CPU.

Per op and size, variants on the same inputs:
  stock         diffusers' eager math (below), timed exactly as the model runs it, layout changes included.
  dcgen         the dcgen_kernels op with backend="auto" (what patch() uses).
  dcgen_triton  / dcgen_cuda: the op with that backend forced; skipped when the library would fall back.
Stock paths (diffusers 0.42.1):
  sana_linear_attention  SanaLinearAttnProcessor2_0 between the projections and to_out: transpose/unflatten to
                         (B, H, d, N), ReLU(q), ReLU(k), .float(), V padded with a row of ones, (V_pad K^T) Q,
                         divide by the last row + 1e-15, flatten, cast back. Inputs: three (B, N, H*d) tensors.
  sana_multiscale_linear_attention
                         SanaMultiscaleAttnProcessor2_0's linear branch: the multi-scale qkv map upcast to fp32,
                         reshaped to (B, H, 3d, N) and chunked, then the same math; dcgen gets the bf16 chunks.
  glumbconv              GLUMBConv(C, C, 2.5, norm_type=None, residual_connection=False) on the NCHW view of the
                         tokens, exactly as SanaTransformerBlock calls it (unflatten/permute in, flatten/permute out).
  depthwise_glu          GLUMBConv's middle on the NCHW view of (1, N, 2h) pre-activations ~ N(0, 2^2): SiLU,
                         conv_depth, chunk, value * SiLU(gate), back to tokens (the kernel of glumbconv alone).
  ada_layer_norm_modulate  LayerNorm(C, eps 1e-6, no affine)(x) * (1 + scale) + shift, then .to(x.dtype).
  gated_residual         x + gate * y.
  gated_residual_ada_layer_norm_modulate
                         SanaTransformerBlock's cross-attention residual and norm2: total = attn_output + x, then
                         the ada_layer_norm_modulate math on total; both outputs checked.
  key_padding_attention  SanaAttnProcessor2_0: prepare_attention_mask on the (B, 1, S_txt) float bias that
                         SanaTransformer2DModel builds from the text mask, view as (B, H, 1, S_txt), SDPA with it.
                         The text mask marks `valid_text_tokens` of the 300 tokens valid (padding exercised).
                         The op plans per mask object (one host sync, cached): every timed call reuses the
                         plan, as the 20 blocks of a step do; the step benchmark includes that sync.
Metrics: ms, the median GPU time per call after warm-up, timed back to back behind a spin kernel
(timing.time_kernel_ms: the host's launch cost is host_ms beside it, not in ms), the same for every variant; GB/s
for the memory-bound ops, counting each input read once and the output written once at the op's dtype, and its
fraction of this run's device-copy ceiling; TFLOP/s for glumbconv (2·N·C·2h + 2·N·h·C + 2·9·N·2h, h = 5600) and
key_padding_attention (4·B·H·N·S_valid·D: the useful work over the valid text tokens, which stock computes over
all 300); `kernels` beside the dcgen variant: its kernels' GPU ms per call from torch.profiler (kernel_ms_per_call
against ms shows the gaps between an op's launches); rel-L2 vs the fp32 reference (the stock math on fp32 copies of
the inputs), for stock too: a dcgen variant's check fails above max(DTYPE_TOL (bf16 1e-2), 1.5x stock's own error
up to 3e-2); rel-L2 vs stock beside it. No L2 flush between calls: at N = 4096 the adaLN and residual working sets
(37-55 MB) are about the H100's 50 MB L2, so their GB/s may exceed DRAM bandwidth; the N = 16384 rows (4x larger)
measure it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import (accepts_backend, dcgen_fallbacks, error_record, first_call,
                     free_device_memory, load_op, rel_l2, reset_dcgen_warnings, stock_error_tolerance, worst_error)
from .timing import profile_kernels, time_kernel_ms

DCGEN_VARIANTS = {"dcgen": "auto", "dcgen_triton": "triton", "dcgen_cuda": "cuda"}
# rel-L2 against the fp32 reference allowed per dtype, or more where stock's own error is larger
# (common.stock_error_tolerance).
DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LINEAR_ATTENTION_EPS = 1e-15
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int
    heads: int
    head_dim: int
    mlp_ratio: float
    cross_heads: int
    cross_head_dim: int
    text_tokens: int
    valid_text_tokens: int
    grids: tuple  # latent side lengths: N = grid^2 image tokens
    dcae_attention: tuple  # (heads incl. the multi-scale branch, grid) of the DC-AE decoder's linear attention
    dtype: torch.dtype
    warmup: int
    iters: int


# DC-AE f32c32 decoder, 4096^2 image: stages at 128^2 / 256^2 (1024 ch) and 512^2 (512 ch); heads = ch / 32,
# doubled by the 5x5 multi-scale branch. ~30-60 s on an H100 in all, most of it first-call JIT/autotuning.
REAL = Config(2240, 70, 32, 2.5, 20, 112, 300, 200, (64, 128), ((64, 128), (64, 256), (32, 512)),
              torch.bfloat16, warmup=3, iters=10)
TINY = Config(64, 2, 32, 2.5, 2, 112, 8, 5, (4, 8), ((4, 8),), torch.float32, warmup=0, iters=1)


@dataclasses.dataclass
class Case:
    key: str
    stock: Callable[[], torch.Tensor]
    dcgen: Callable[..., torch.Tensor]  # dcgen(backend=...) or dcgen() when the op takes no backend
    reference: Callable[[], torch.Tensor]  # the stock math on fp32 copies of the inputs (made when called)
    bytes: Optional[int] = None
    flops: Optional[int] = None
    info: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- stock paths
def stock_linear_attention(q, k, v, heads: int, eps: float = LINEAR_ATTENTION_EPS) -> torch.Tensor:
    dtype = q.dtype
    query = F.relu(q.transpose(1, 2).unflatten(1, (heads, -1)))  # (B, H, d, N)
    key = F.relu(k.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3))  # (B, H, N, d)
    value = v.transpose(1, 2).unflatten(1, (heads, -1))  # (B, H, d, N)
    query, key, value = query.float(), key.float(), value.float()
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)  # (B, H, d + 1, N)
    out = torch.matmul(torch.matmul(value, key), query)  # (B, H, d + 1, N)
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)
    return out.flatten(1, 2).transpose(1, 2).to(dtype)


def stock_multiscale_linear_attention(qkv_map, head_dim: int, eps: float = LINEAR_ATTENTION_EPS) -> torch.Tensor:
    """qkv_map: the (B, H*3d, height, width) multi-scale qkv map; returns (B, H, d, N) in its dtype."""
    batch, _, height, width = qkv_map.shape
    qkv = qkv_map.to(torch.float32).reshape(batch, -1, 3 * head_dim, height * width)
    query, key, value = qkv.chunk(3, dim=2)
    query, key = F.relu(query), F.relu(key)
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1)
    out = torch.matmul(torch.matmul(value, key.transpose(-1, -2)), query).to(torch.float32)
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)
    return out.to(qkv_map.dtype)


def stock_glumbconv_tokens(ff, tokens, height: int, width: int) -> torch.Tensor:
    x = tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)
    return ff(x).flatten(2, 3).permute(0, 2, 1)


def stock_ada_layer_norm_modulate(norm, x, scale, shift) -> torch.Tensor:
    return (norm(x) * (1 + scale) + shift).to(x.dtype)


def stock_gated_residual(residual, gate, x) -> torch.Tensor:
    return residual + gate * x


def stock_residual_ada_layer_norm_modulate(norm, residual, x, scale, shift):
    total = x + residual
    return total, stock_ada_layer_norm_modulate(norm, total, scale, shift)


def stock_key_padding_attention(attn, q, k, v, bias) -> torch.Tensor:
    batch, heads = q.shape[0], q.shape[1]
    mask = attn.prepare_attention_mask(bias, k.shape[2], batch).view(batch, heads, -1, bias.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


# ----------------------------------------------------------------------------------------------- cases
def _randn(*shape, cfg, device, scale=1.0):
    return torch.randn(*shape, device=device, dtype=cfg.dtype) * scale


def _modulation(cfg, device):
    """The six (B, 1, C) chunks SanaTransformerBlock takes from scale_shift_table[None] + timestep."""
    table = torch.randn(6, cfg.hidden, device=device, dtype=cfg.dtype) / cfg.hidden**0.5
    timestep = torch.randn(1, 6 * cfg.hidden, device=device, dtype=cfg.dtype) * 0.1
    return (table[None] + timestep.reshape(1, 6, -1)).chunk(6, dim=1)


def linear_attention_cases(cfg, device, op):
    for grid in cfg.grids:
        n, c = grid * grid, cfg.heads * cfg.head_dim
        q, k, v = (_randn(1, n, c, cfg=cfg, device=device) for _ in range(3))
        yield Case(f"N={n}", functools.partial(stock_linear_attention, q, k, v, cfg.heads),
                   functools.partial(op, q, k, v, cfg.heads, eps=LINEAR_ATTENTION_EPS),
                   lambda q=q, k=k, v=v: stock_linear_attention(q.float(), k.float(), v.float(), cfg.heads),
                   bytes=4 * n * c * q.element_size(), info={"heads": cfg.heads, "head_dim": cfg.head_dim})


def multiscale_cases(cfg, device, op):
    for heads, grid in cfg.dcae_attention:
        n, d = grid * grid, cfg.head_dim
        qkv_map = _randn(1, heads * 3 * d, grid, grid, cfg=cfg, device=device)
        q, k, v = qkv_map.reshape(1, heads, 3 * d, n).chunk(3, dim=2)  # what the patched processor passes
        yield Case(f"H{heads} N={n}", functools.partial(stock_multiscale_linear_attention, qkv_map, d),
                   functools.partial(op, q, k, v, eps=LINEAR_ATTENTION_EPS),
                   lambda qkv_map=qkv_map: stock_multiscale_linear_attention(qkv_map.float(), d),
                   bytes=4 * heads * d * n * qkv_map.element_size(), info={"heads": heads, "head_dim": d})


def glumbconv_cases(cfg, device, op):
    from diffusers.models.transformers.sana_transformer import GLUMBConv

    c, h = cfg.hidden, int(cfg.mlp_ratio * cfg.hidden)
    with torch.device(device):
        ff = GLUMBConv(c, c, cfg.mlp_ratio, norm_type=None, residual_connection=False)
    ff = ff.to(cfg.dtype).eval().requires_grad_(False)
    for grid in cfg.grids:
        n = grid * grid
        x = _randn(1, n, c, cfg=cfg, device=device)
        yield Case(f"N={n}", functools.partial(stock_glumbconv_tokens, ff, x, grid, grid),
                   functools.partial(op, x, grid, grid, ff.conv_inverted.weight, ff.conv_inverted.bias,
                                     ff.conv_depth.weight, ff.conv_depth.bias, ff.conv_point.weight),
                   lambda x=x, grid=grid: stock_glumbconv_tokens(copy.deepcopy(ff).float(), x.float(), grid, grid),
                   flops=2 * n * c * 2 * h + 2 * n * h * c + 2 * 9 * n * 2 * h,
                   info={"channels": c, "hidden": h})


def stock_depthwise_glu(ff, pre, height: int, width: int) -> torch.Tensor:
    """GLUMBConv's middle as stock runs it (SiLU, depthwise conv, chunk, value * SiLU(gate)) on the NCHW view of
    (B, N, 2*hid) tokens, returned as (B, N, hid) tokens like the op."""
    value, gate = ff.conv_depth(ff.nonlinearity(pre.unflatten(1, (height, width)).permute(0, 3, 1, 2))).chunk(2, dim=1)
    return (value * ff.nonlinearity(gate)).flatten(2).transpose(1, 2)


def depthwise_glu_cases(cfg, device, op):
    """The glumbconv op's depthwise + GLU kernel alone (what the quantized Mix-FFN runs between its GEMMs)."""
    from diffusers.models.transformers.sana_transformer import GLUMBConv

    c, h = cfg.hidden, int(cfg.mlp_ratio * cfg.hidden)
    with torch.device(device):
        ff = GLUMBConv(c, c, cfg.mlp_ratio, norm_type=None, residual_connection=False)
    ff = ff.to(cfg.dtype).eval().requires_grad_(False)
    weight, bias = ff.conv_depth.weight, ff.conv_depth.bias
    for grid in cfg.grids:
        n = grid * grid
        pre = _randn(1, n, 2 * h, cfg=cfg, device=device, scale=2.0)  # SiLU's input: both signs, tails to ~-8
        yield Case(f"N={n}", functools.partial(stock_depthwise_glu, ff, pre, grid, grid),
                   functools.partial(op, pre, grid, grid, weight, bias),
                   lambda pre=pre, grid=grid: stock_depthwise_glu(copy.deepcopy(ff).float(), pre.float(), grid, grid),
                   bytes=(n * 2 * h + n * h) * pre.element_size(), info={"hidden": h})


def ada_layer_norm_cases(cfg, device, op):
    norm = torch.nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=NORM_EPS, device=device, dtype=cfg.dtype)
    shift, scale = _modulation(cfg, device)[:2]
    for grid in cfg.grids:
        n = grid * grid
        x = _randn(1, n, cfg.hidden, cfg=cfg, device=device)
        yield Case(f"N={n}", functools.partial(stock_ada_layer_norm_modulate, norm, x, scale, shift),
                   functools.partial(op, x, scale, shift, eps=NORM_EPS),
                   lambda x=x: stock_ada_layer_norm_modulate(norm, x.float(), scale.float(), shift.float()),
                   bytes=2 * x.numel() * x.element_size())


def gated_residual_cases(cfg, device, op):
    gate = _modulation(cfg, device)[2]
    for grid in cfg.grids:
        n = grid * grid
        residual, y = (_randn(1, n, cfg.hidden, cfg=cfg, device=device) for _ in range(2))
        yield Case(f"N={n}", functools.partial(stock_gated_residual, residual, gate, y),
                   functools.partial(op, residual, gate, y),
                   lambda residual=residual, y=y: stock_gated_residual(residual.float(), gate.float(), y.float()),
                   bytes=3 * y.numel() * y.element_size())


def gated_residual_ada_layer_norm_cases(cfg, device, op):
    """SanaTransformerBlock's cross-attention residual add and norm2's modulation (one op, no gate)."""
    norm = torch.nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=NORM_EPS, device=device, dtype=cfg.dtype)
    shift, scale = _modulation(cfg, device)[3:5]
    for grid in cfg.grids:
        n = grid * grid
        residual, x = (_randn(1, n, cfg.hidden, cfg=cfg, device=device) for _ in range(2))
        yield Case(f"N={n}", functools.partial(stock_residual_ada_layer_norm_modulate, norm, residual, x, scale, shift),
                   functools.partial(op, residual, None, x, scale, shift, eps=NORM_EPS),
                   lambda residual=residual, x=x: stock_residual_ada_layer_norm_modulate(
                       norm, residual.float(), x.float(), scale.float(), shift.float()),
                   bytes=4 * x.numel() * x.element_size())


def key_padding_cases(cfg, device, op):
    from diffusers.models.attention_processor import Attention

    c_cross = cfg.cross_heads * cfg.cross_head_dim
    with torch.device(device):  # only its prepare_attention_mask is used, as SanaAttnProcessor2_0 does
        attn = Attention(query_dim=c_cross, cross_attention_dim=c_cross, heads=cfg.cross_heads,
                         dim_head=cfg.cross_head_dim, bias=True)
    mask = torch.zeros(1, cfg.text_tokens, device=device, dtype=torch.int64)
    mask[:, :cfg.valid_text_tokens] = 1
    # SanaTransformer2DModel.forward: (1 - mask) * -10000, unsqueeze(1) -> (B, 1, S_txt) in the hidden dtype.
    bias = ((1 - mask.to(cfg.dtype)) * -10000.0).unsqueeze(1)
    heads = lambda t: t.view(1, -1, cfg.cross_heads, cfg.cross_head_dim).transpose(1, 2)  # noqa: E731
    k, v = (heads(_randn(1, cfg.text_tokens, c_cross, cfg=cfg, device=device)) for _ in range(2))
    for grid in cfg.grids:
        n = grid * grid
        q = heads(_randn(1, n, c_cross, cfg=cfg, device=device))
        yield Case(f"N={n}", functools.partial(stock_key_padding_attention, attn, q, k, v, bias),
                   functools.partial(op, q, k, v, bias),
                   lambda q=q: stock_key_padding_attention(attn, q.float(), k.float(), v.float(), bias.float()),
                   flops=4 * cfg.cross_heads * n * cfg.valid_text_tokens * cfg.cross_head_dim,
                   info={"heads": cfg.cross_heads, "head_dim": cfg.cross_head_dim, "text_tokens": cfg.text_tokens,
                         "valid_text_tokens": cfg.valid_text_tokens,
                         "mask": "(B, 1, S_txt) float bias, -10000 on padding"})


OPS = {"sana_linear_attention": linear_attention_cases,
       "sana_multiscale_linear_attention": multiscale_cases,
       "glumbconv": glumbconv_cases,
       "depthwise_glu": depthwise_glu_cases,
       "ada_layer_norm_modulate": ada_layer_norm_cases,
       "gated_residual": gated_residual_cases,
       "gated_residual_ada_layer_norm_modulate": gated_residual_ada_layer_norm_cases,
       "key_padding_attention": key_padding_cases}


# ----------------------------------------------------------------------------------------------- runner
def _unavailable_op(*_args, **_kwargs):
    raise AssertionError("not called")


def _worst_rel_l2(out, truth) -> float:
    """rel-L2 of an op's output, or the largest over the tensors of a tuple output."""
    if isinstance(out, tuple):
        return worst_error(rel_l2(o, t) for o, t in zip(out, truth))
    return rel_l2(out, truth)


def _check(out, truth, tolerance: float, stock_out) -> dict:
    err = _worst_rel_l2(out, truth)
    rec = {"rel_l2_vs_fp32": err, "tolerance": tolerance, "check": "ok" if err <= tolerance else "FAILED"}
    if stock_out is not None:
        rec["rel_l2_vs_stock"] = _worst_rel_l2(out, stock_out)
    return rec


def _kernel_breakdown(fn, device, calls: int) -> dict:
    """Where an op's GPU time goes, per call (torch.profiler): e.g. the two passes of the linear attention."""
    try:
        prof = profile_kernels(fn, device, steps=calls, top=4)
    except Exception as err:  # noqa: BLE001 - a diagnostic: the timing stays
        return error_record(err)
    return {"kernel_ms_per_call": prof["kernel_ms_per_step"], "top_kernels_ms": prof["top_kernels_ms"]}


def _bench_case(case: Case, variants: dict, device, cfg, copy_gbps, skip: dict, unavailable: Optional[str]) -> dict:
    records, expected = {}, None
    with torch.no_grad():
        truth = case.reference()
        tolerance = DTYPE_TOL[cfg.dtype]
        try:
            expected = case.stock()
            stock_ms, stock_host_ms = time_kernel_ms(case.stock, device, cfg.warmup, cfg.iters)
            stock_err = _worst_rel_l2(expected, truth)
            records["stock"] = {"ms": stock_ms, "host_ms": stock_host_ms, "rel_l2_vs_fp32": stock_err}
            tolerance = stock_error_tolerance(tolerance, stock_err)
        except Exception as err:  # noqa: BLE001 - the dcgen variants still run, checked against fp32
            records["stock"] = error_record(err)
        calls = {name: (case.dcgen if backend is None else functools.partial(case.dcgen, backend=backend),
                        backend not in (None, "auto")) for name, backend in variants.items()}
        for name, (fn, forced) in calls.items():
            if unavailable:
                records[name] = {"unavailable": unavailable}
                continue
            if name in skip:
                records[name] = {"skipped": skip[name]}
                continue
            try:
                reset_dcgen_warnings()
                out, exc, messages = first_call(fn)
                if exc is not None:
                    raise exc
                fallbacks = dcgen_fallbacks(messages)
                if forced and fallbacks:  # the forced kernel did not run: time no stand-in
                    skip[name] = "; ".join(fallbacks)  # and not at the next sizes either
                    records[name] = {"skipped": skip[name]}
                    continue
                rec = _check(out, truth, tolerance, expected)
                del out
                if fallbacks:
                    rec["fallbacks"] = fallbacks
                rec["ms"], rec["host_ms"] = time_kernel_ms(fn, device, cfg.warmup, cfg.iters)
                if name == "dcgen":
                    rec["kernels"] = _kernel_breakdown(fn, device, cfg.iters)
                records[name] = rec
            except Exception as err:  # noqa: BLE001
                records[name] = error_record(err)
    del expected, truth
    stock_ms = records["stock"].get("ms")
    for rec in records.values():
        if "ms" not in rec:
            continue
        if case.bytes:
            rec["GBps"] = case.bytes / rec["ms"] / 1e6
            rec["frac_of_copy"] = rec["GBps"] / copy_gbps if copy_gbps else None
        if case.flops:
            rec["tflops"] = case.flops / rec["ms"] / 1e9
        if stock_ms:
            rec["speedup_vs_stock"] = stock_ms / rec["ms"]
    out = {"variants": records, **case.info}
    if case.bytes:
        out["bytes"] = case.bytes
    if case.flops:
        out["gflop"] = case.flops / 1e9
    return out


def run(device: torch.device, tiny: bool, copy_gbps=None, progress=None) -> dict:
    """copy_gbps: this run's device-copy ceiling (GB/s, read + write). progress(partial) is called after every op."""
    cfg = TINY if tiny else REAL
    result = {"config": {"dtype": str(cfg.dtype).removeprefix("torch."), "device": str(device), "batch": 1,
                         "hidden": cfg.hidden, "heads": cfg.heads, "head_dim": cfg.head_dim,
                         "ffn_hidden": int(cfg.mlp_ratio * cfg.hidden), "cross_heads": cfg.cross_heads,
                         "cross_head_dim": cfg.cross_head_dim, "text_tokens": cfg.text_tokens,
                         "image_tokens": [g * g for g in cfg.grids], "warmup": cfg.warmup, "iters": cfg.iters,
                         "copy_GBps": copy_gbps,
                         "bytes": "inputs read once + output written once, at the op's dtype"},
              "ops": {}}
    for op_name, make_cases in OPS.items():
        op, reason = load_op(op_name)
        variants = dict(DCGEN_VARIANTS) if op is None or accepts_backend(op) else {"dcgen": None}
        skip: dict = {}
        rec = result["ops"][op_name] = {"sizes": {}}
        if reason:
            rec["unavailable"] = reason
        try:
            for case in make_cases(cfg, device, op or _unavailable_op):
                try:
                    rec["sizes"][case.key] = _bench_case(case, variants, device, cfg, copy_gbps, skip, reason)
                except Exception as err:  # noqa: BLE001
                    rec["sizes"][case.key] = error_record(err)
                del case
                free_device_memory(device)
        except Exception as err:  # noqa: BLE001 - building this op's inputs failed
            rec.update(error_record(err))
        free_device_memory(device)
        if progress:
            progress(result)
    return result
