"""FLUX family: swap diffusers' `FluxAttnProcessor` for one that calls the fused `flux_attention` op."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..ops.flux_attention import flux_attention

FAMILY = "flux"
SUPPORTED = "FluxTransformer2DModel / FluxAttention with FluxAttnProcessor (diffusers >= 0.35)"


def _flux_classes():
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
    except ImportError:
        return None
    return FluxAttention, FluxAttnProcessor


def _rms_norm_eps(norm: torch.nn.RMSNorm, dtype: torch.dtype) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


class DCGenFluxAttnProcessor:
    """Drop-in for FluxAttnProcessor: projections, then one fused norm + RoPE + attention op.

    Keeps the processor it replaced, both to restore it on `unpatch` and to serve the calls the fused op does
    not cover (an attention mask, context parallelism), with a one-time warning.
    """

    def __init__(self, original, backend: str):
        self.original = original
        self.backend = backend

    def _unsupported(self, attn, encoder_hidden_states, attention_mask) -> Optional[str]:
        if attention_mask is not None:
            return "an attention_mask was passed"
        if getattr(self.original, "_parallel_config", None) is not None:
            return "context parallelism is configured"
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is None:
            return "encoder_hidden_states given to an attention without added KV projections"
        return None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        reason = self._unsupported(attn, encoder_hidden_states, attention_mask)
        if reason:
            _backend.warn_once(f"flux-processor:{reason}", f"dcgen_kernels: FLUX attention falls back to diffusers' "
                               f"processor because {reason}")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        d = attn.head_dim
        if attn.fused_projections:
            q, k, v = _heads(attn.to_qkv(hidden_states), d).chunk(3, dim=-2)
        else:
            q, k, v = _heads(attn.to_q(hidden_states), d), _heads(attn.to_k(hidden_states), d), \
                _heads(attn.to_v(hidden_states), d)
        text = {}
        if encoder_hidden_states is not None:
            if attn.fused_projections:
                tq, tk, tv = _heads(attn.to_added_qkv(encoder_hidden_states), d).chunk(3, dim=-2)
            else:
                tq, tk, tv = (_heads(proj(encoder_hidden_states), d)
                              for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            text = dict(txt_q=tq, txt_k=tk, txt_v=tv, norm_txt_q_weight=attn.norm_added_q.weight,
                        norm_txt_k_weight=attn.norm_added_k.weight)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        out = flux_attention(q, k, v, cos, sin, norm_q_weight=attn.norm_q.weight, norm_k_weight=attn.norm_k.weight,
                             eps=_rms_norm_eps(attn.norm_q, q.dtype), backend=self.backend, **text)
        if encoder_hidden_states is None:
            return out
        s_txt = encoder_hidden_states.shape[1]
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, s_txt:]))
        return hidden_states, attn.to_add_out(out[:, :s_txt])


def _skip_reason(attn) -> Optional[str]:
    norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if attn.added_kv_proj_dim else [])
    if not all(type(n) is torch.nn.RMSNorm for n in norms):
        return "its q/k norms are not torch.nn.RMSNorm"
    if len({n.eps for n in norms}) != 1:
        return "its q/k norms use different eps"
    if attn.head_dim % 2:
        return f"odd head_dim {attn.head_dim} (RoPE rotates pairs)"
    return None


def patch_module(module: torch.nn.Module, backend: str):
    """Returns (original processor class name, reason it was skipped or None) for a FluxAttention, else None."""
    classes = _flux_classes()
    if classes is None or not isinstance(module, classes[0]):
        return None
    processor = module.processor
    if isinstance(processor, DCGenFluxAttnProcessor):
        processor.backend = backend
        return type(processor.original).__name__, None
    if type(processor) is not classes[1]:
        return type(processor).__name__, f"processor {type(processor).__name__} is not FluxAttnProcessor"
    reason = _skip_reason(module)
    if reason is None:
        module.set_processor(DCGenFluxAttnProcessor(processor, backend))
    return type(processor).__name__, reason


def unpatch_module(module: torch.nn.Module) -> bool:
    processor = getattr(module, "processor", None)
    if isinstance(processor, DCGenFluxAttnProcessor):
        module.set_processor(processor.original)
        return True
    return False
