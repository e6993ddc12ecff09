"""FLUX joint attention: the stock diffusers eager path vs SDPA alone vs dcgen_kernels' fused op.

Variants, all on the same inputs, in one run:
  stock         diffusers FluxAttnProcessor's math: RMSNorm q/k (image and text) -> cat [text, image] ->
                apply_rotary_emb -> SDPA (default backend) on (B, H, S, D) transposes -> flatten.
  sdpa_cudnn    SDPA alone on pre-normalised, pre-rotated, contiguous (B, H, S, D) inputs, cuDNN backend.
  sdpa_flash    the same, flash backend. Both are lower bounds for attention *without* the norm/RoPE work.
  dcgen_triton  dcgen_kernels.ops.flux_attention(backend="triton") on the raw projection views.
  dcgen_cuda    the same with backend="cuda", when the library serves this op with CUDA (else skipped).
TFLOP/s counts the attention matmuls only, 4·B·H·N²·D, for every variant. rel-L2 is against the reference: the
stock math on fp32 copies of the inputs and norm weights; a variant's check allows max(1e-2, 1.5x stock's own
error capped at 3e-2).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dcgen_kernels
from dcgen_kernels.ops import flux_attention

from .common import (ANCHOR_LABEL, REL_L2_TOL, dcgen_fallbacks, error_record, first_call, rel_l2, rope_tables,
                     stock_error_tolerance)
from .timing import time_ms

EPS = 1e-6
SDPA_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}
DCGEN_BACKENDS = {"dcgen_triton": "triton", "dcgen_cuda": "cuda"}
ANCHOR_KEYS = {"sdpa_cudnn": "cudnn", "sdpa_flash": "flash"}  # anchor file names of the same SDPA backends


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    heads: int
    head_dim: int
    axes_dim: tuple
    text_tokens: int
    image_tokens: tuple
    dtype: torch.dtype
    warmup: int
    iters: int


REAL = Config(1, 24, 128, (16, 56, 56), 512, (4096, 16384), torch.bfloat16, warmup=10, iters=50)
# Tiny: bf16 still, so the Triton path (interpreted on CPU) serves it; 144 image tokens leave a partial tile.
TINY = Config(1, 2, 64, (16, 24, 24), 16, (64, 144), torch.bfloat16, warmup=1, iters=3)


def _apply_rotary_emb_copy(x, freqs_cis, sequence_dim=1):
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1), for when diffusers
    is not importable: interleaved (real, imag) pairs, fp32 math, cast back."""
    assert sequence_dim == 1
    cos, sin = (t[None, :, None, :].to(x.device) for t in freqs_cis)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _stock_rope():
    try:
        from diffusers.models.embeddings import apply_rotary_emb
    except ImportError:
        return _apply_rotary_emb_copy, "inline copy of diffusers' apply_rotary_emb (diffusers not importable)"
    return apply_rotary_emb, "diffusers.models.embeddings.apply_rotary_emb"


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    txt_q: torch.Tensor
    txt_k: torch.Tensor
    txt_v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    norms: dict  # torch.nn.RMSNorm modules, as FluxAttention holds them


def make_inputs(cfg: Config, image_tokens: int, device: torch.device) -> tuple[Inputs, str]:
    """Q/K/V as strided views of one fused projection output per stream, like the real model's."""
    B, H, D = cfg.batch, cfg.heads, cfg.head_dim

    def projection(seq):
        return torch.randn(B, seq, 3 * H * D, device=device, dtype=cfg.dtype).unflatten(-1, (3, H, D)).unbind(2)

    q, k, v = projection(image_tokens)
    txt_q, txt_k, txt_v = projection(cfg.text_tokens)
    norms = {}
    for name in ("q", "k", "txt_q", "txt_k"):
        norms[name] = torch.nn.RMSNorm(D, eps=EPS, device=device, dtype=cfg.dtype).requires_grad_(False)
        with torch.no_grad():  # non-trivial affine weights, so both paths must apply them
            norms[name].weight.uniform_(0.5, 1.5)
    cos, sin, rope_note = rope_tables(cfg.text_tokens, image_tokens, cfg.axes_dim, device)
    return Inputs(q, k, v, txt_q, txt_k, txt_v, cos, sin, norms), rope_note


def _stock_qkv(x: Inputs, rope):
    """FluxAttnProcessor up to the attention call: norm -> cat [text, image] -> RoPE; (B, S, H, D)."""
    q = torch.cat([x.norms["txt_q"](x.txt_q), x.norms["q"](x.q)], dim=1)
    k = torch.cat([x.norms["txt_k"](x.txt_k), x.norms["k"](x.k)], dim=1)
    v = torch.cat([x.txt_v, x.v], dim=1)
    return rope(q, (x.cos, x.sin), sequence_dim=1), rope(k, (x.cos, x.sin), sequence_dim=1), v


def stock(x: Inputs, rope) -> torch.Tensor:
    q, k, v = _stock_qkv(x, rope)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3)


def _fp32_copy(x: Inputs) -> Inputs:
    """The same inputs and norm weights in fp32: stock's math on them is the reference the variants are checked on."""
    tensors = (t.float() for t in (x.q, x.k, x.v, x.txt_q, x.txt_k, x.txt_v, x.cos, x.sin))
    return Inputs(*tensors, {name: copy.deepcopy(norm).float() for name, norm in x.norms.items()})


def sdpa_only(backend: SDPBackend, q, k, v) -> torch.Tensor:
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def dcgen(x: Inputs, backend: str) -> torch.Tensor:
    n = x.norms
    return flux_attention(x.q, x.k, x.v, x.cos, x.sin, txt_q=x.txt_q, txt_k=x.txt_k, txt_v=x.txt_v,
                          norm_q_weight=n["q"].weight, norm_k_weight=n["k"].weight,
                          norm_txt_q_weight=n["txt_q"].weight, norm_txt_k_weight=n["txt_k"].weight,
                          eps=EPS, backend=backend)


def _bench_size(cfg, image_tokens, device, rope, gemm_tflops, anchors, skip) -> dict:
    """One sequence length. `skip` carries per-variant skip reasons across sizes (fallback warnings are
    emitted once per process, so a variant found unusable at the first size stays skipped)."""
    n_tokens = cfg.text_tokens + image_tokens
    flops = 4 * cfg.batch * cfg.heads * n_tokens**2 * cfg.head_dim
    x, rope_note = make_inputs(cfg, image_tokens, device)
    with torch.no_grad():
        prepared = [t.transpose(1, 2).contiguous() for t in _stock_qkv(x, rope)]
    bhsd_to_bsf = lambda o: o.transpose(1, 2).flatten(2, 3)  # noqa: E731
    variants = {"stock": (functools.partial(stock, x, rope), None)}
    variants.update({name: (functools.partial(sdpa_only, b, *prepared), bhsd_to_bsf)
                     for name, b in SDPA_BACKENDS.items()})
    variants.update({name: (functools.partial(dcgen, x, b), None) for name, b in DCGEN_BACKENDS.items()})

    records = {}
    with torch.no_grad():
        truth = stock(_fp32_copy(x), rope)
    tolerance = REL_L2_TOL
    for name, (fn, to_bsf) in variants.items():
        if name in skip:
            records[name] = {"skipped": skip[name]}
            continue
        try:
            with torch.no_grad():
                out, exc, messages = first_call(fn)
                if exc is not None and name in SDPA_BACKENDS:
                    records[name] = {"unavailable": "; ".join([str(exc)] + messages)}
                    continue
                if exc is not None:
                    raise exc
                fallbacks = dcgen_fallbacks(messages)
                if name in DCGEN_BACKENDS and fallbacks:  # the requested kernel did not run: do not time a stand-in
                    skip[name] = "; ".join(fallbacks)
                    records[name] = {"skipped": skip[name]}
                    continue
                out = to_bsf(out) if to_bsf else out
                err = rel_l2(out, truth)
                if name == "stock":  # the bf16 path replaced: a fused variant may be 1.5x as far from fp32
                    rec, tolerance = {"rel_l2_vs_fp32": err}, stock_error_tolerance(REL_L2_TOL, err)
                else:
                    rec = {"rel_l2_vs_fp32": err, "tolerance": tolerance,
                           "check": "ok" if err <= tolerance else "FAILED"}
                del out
                rec["ms"] = time_ms(fn, device, cfg.warmup, cfg.iters)
        except Exception as err:  # noqa: BLE001 - recorded; the suite goes on
            records[name] = error_record(err)
            continue
        rec["tflops"] = flops / rec["ms"] / 1e9
        rec["frac_of_measured_gemm"] = rec["tflops"] / gemm_tflops if gemm_tflops else None
        anchor = (anchors or {}).get(f"N={n_tokens}", {}).get(ANCHOR_KEYS.get(name))
        if anchor:
            rec[ANCHOR_LABEL] = anchor
        records[name] = rec

    del truth
    stock_ms = records["stock"].get("ms")
    for rec in records.values():
        if stock_ms and "ms" in rec:
            rec["speedup_vs_stock"] = stock_ms / rec["ms"]
    return {"S_txt": cfg.text_tokens, "S_img": image_tokens, "N": n_tokens, "gflop": flops / 1e9,
            "rope_tables": rope_note, "variants": records}


def run(device: torch.device, tiny: bool, gemm_tflops, anchors: dict) -> dict:
    """anchors: the anchor file's "attention_B1_H24_D128_bf16" block (or None)."""
    cfg = TINY if tiny else REAL
    rope, rope_impl = _stock_rope()
    cuda_backend = dcgen_kernels.info()["backends"]["cuda"]
    skip = {} if cuda_backend["available"] else {"dcgen_cuda": f"no cuda backend: {cuda_backend['reason']}"}
    result = {
        "config": {"B": cfg.batch, "H": cfg.heads, "D": cfg.head_dim, "dtype": str(cfg.dtype).removeprefix("torch."),
                   "device": str(device), "warmup": cfg.warmup, "iters": cfg.iters, "stock_rope": rope_impl,
                   "qkv_layout": "strided views of a fused (B, S, 3*H*D) projection, text and image streams",
                   "flops": "4*B*H*N^2*D"},
        "sizes": {},
    }
    for image_tokens in cfg.image_tokens:
        key = f"N={cfg.text_tokens + image_tokens}"
        try:
            result["sizes"][key] = _bench_size(cfg, image_tokens, device, rope, gemm_tflops, anchors, skip)
        except Exception as err:  # noqa: BLE001
            result["sizes"][key] = error_record(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result
