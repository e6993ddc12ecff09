"""SANA family, for `SanaTransformer2DModel` and the EfficientViT blocks of `AutoencoderDC` (DC-AE), which reuse
`GLUMBConv` and the multiscale linear attention.

- SanaTransformerBlock: forward replaced by one using `ada_layer_norm_modulate`, `gated_residual` and
  `glumbconv` on tokens (no NCHW round trip for the Mix-FFN); SanaModulatedNorm (norm_out) likewise. In inference a
  block whose successor in `transformer_blocks` is patched too ends with the successor's `norm1` fused into its
  Mix-FFN residual (`gated_residual_ada_layer_norm_modulate`) and hands the normalised rows over (see
  `_hand_over_norm1`).
- Attention with SanaLinearAttnProcessor2_0 (self-attention): `sana_linear_attention`.
- Attention with SanaAttnProcessor2_0 (cross-attention): `key_padding_attention`, which keeps SDPA on its
  flash/cuDNN kernels instead of the float-mask path.
- SanaMultiscaleLinearAttention: `sana_multiscale_linear_attention` for its linear branch.
- GLUMBConv: forward replaced by `glumbconv` (+ its RMSNorm and residual when configured). The fused Mix-FFN reads
  the convs' weights, so on a call where one is not a plain nn.Conv2d (peft wraps it for a LoRA adapter, e.g. the
  DC-Gen `lora` stage's) or has forward hooks (layerwise casting, offloading) it runs diffusers' code instead, with a
  one-time warning.

Quantized blocks (patch(model, quant="fp8" | "nvfp4")): GLUMBConv's 1x1 convs become `QuantizedPointwiseConv`
(patching/quant.py) and the Mix-FFN runs quantized GEMM -> glumbconv's depthwise + GLU Triton kernel (16-bit, the
SiLU applied as it loads the GEMM output) -> quantized GEMM. With FP8 the block's adaLN-modulates emit FP8 rows
(shared by the self-attention's Q/K/V; the input of conv_inverted) and conv_point's epilogue adds the gated
residual; the GLU output and the other linears' inputs are quantized on the way in.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from .. import _backend
from ..ops._common import autocast_dtype
from ..ops.ada_layer_norm import (ada_layer_norm_modulate, ada_layer_norm_modulate_fp8, gated_residual,
                                  gated_residual_ada_layer_norm_modulate, gated_residual_ada_layer_norm_modulate_fp8)
from ..ops.glumbconv import depthwise_glu, glumbconv
from ..ops.key_padding_attention import (SANA_MASK_BIAS, captured_with, graph_plan, is_key_padding_shape,
                                         key_padding_attention)
from ..ops.sana_linear_attention import sana_linear_attention, sana_multiscale_linear_attention
from ..quant.fp8 import FP8Linear
from ._fused_projections import place_side_by_side, project, project_concatenated, separate
from ._instance import (backend_of, not_plain, once, overridden_forward, precomputed_call_signature, qualified_type,
                        replace_unless_skipped, restore_forward, runs_own_forward, stock_processor_for_other_dtypes,
                        stock_when_unfusable, warn_unfused, with_unit_channel_stride)
from .quant import QuantizedPointwiseConv

FAMILY = "sana"
SUPPORTED = ("SanaTransformer2DModel and AutoencoderDC: SanaTransformerBlock, SanaModulatedNorm, Attention with "
             "SanaLinearAttnProcessor2_0 / SanaAttnProcessor2_0, SanaMultiscaleLinearAttention, GLUMBConv")


@once
def _classes() -> Optional[dict]:
    try:
        from diffusers.models.attention_processor import (Attention, SanaLinearAttnProcessor2_0,
                                                          SanaMultiscaleAttnProcessor2_0,
                                                          SanaMultiscaleLinearAttention)
        from diffusers.models.transformers.sana_transformer import (GLUMBConv, SanaAttnProcessor2_0,
                                                                    SanaModulatedNorm, SanaTransformerBlock)
    except ImportError:
        return None
    return dict(Attention=Attention, SanaLinearAttnProcessor2_0=SanaLinearAttnProcessor2_0,
                SanaModulatedNorm=SanaModulatedNorm,
                SanaAttnProcessor2_0=SanaAttnProcessor2_0,
                SanaMultiscaleAttnProcessor2_0=SanaMultiscaleAttnProcessor2_0,
                SanaMultiscaleLinearAttention=SanaMultiscaleLinearAttention, GLUMBConv=GLUMBConv,
                SanaTransformerBlock=SanaTransformerBlock)


def _fallback(reason: str, original, *args):
    _backend.warn_once(f"sana-processor:{reason}", f"dcgen_kernels: SANA attention falls back to diffusers' "
                       f"processor because {reason}")
    return original(*args)


def _clip_fp16(x: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    # diffusers' SanaLinearAttnProcessor2_0 clips to the fp16 range when its input is fp16; keep that behaviour.
    return x.clip(-65504, 65504) if input_dtype == torch.float16 else x


# ----------------------------------------------------------------------------------------------- processors
def _qkv(attn) -> dict:
    """The self-attention projections that read the same input: one GEMM where patch() placed them side by side
    (patching/_fused_projections.py)."""
    return {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v}


def _kv(attn) -> dict:
    """The cross-attention's key and value projections of the text (one GEMM, as _qkv)."""
    return {"to_k": attn.to_k, "to_v": attn.to_v}


@precomputed_call_signature
class DCGenSanaLinearAttnProcessor:
    """SanaLinearAttnProcessor2_0 with the linear attention in one fused op."""

    def __init__(self, original, backend: str):
        self.original = original
        self.backend = backend

    @stock_processor_for_other_dtypes
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if encoder_hidden_states is not None:
            return _fallback("linear attention was given encoder_hidden_states", self.original, attn,
                             hidden_states, encoder_hidden_states, attention_mask)
        query, key, value = project(hidden_states, _qkv(attn))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # Stock upcasts whatever dtypes it gets (under autocast an fp32-weight qk RMSNorm returns fp32 next to a
        # bf16 value; its matmuls then run in the autocast dtype, ours stay fp32): one common dtype for the op,
        # the output in the input's dtype as stock.
        if not query.dtype == key.dtype == value.dtype:
            common = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
            query, key, value = query.to(common), key.to(common), value.to(common)
        out = sana_linear_attention(query, key, value, attn.heads, backend=self.backend).to(hidden_states.dtype)
        return _clip_fp16(attn.to_out[1](attn.to_out[0](out)), hidden_states.dtype)


@precomputed_call_signature
class DCGenSanaCrossAttnProcessor:
    """SanaAttnProcessor2_0 with the float key-padding mask turned into a form SDPA's fast kernels accept."""

    def __init__(self, original, backend: str):
        self.original = original
        self.backend = backend

    @stock_processor_for_other_dtypes
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch = hidden_states.shape[0]
        reason = _not_key_padding(batch, encoder_hidden_states, attention_mask)
        if reason is not None:
            return _fallback(reason, self.original, attn, hidden_states, encoder_hidden_states, attention_mask)
        query = attn.to_q(hidden_states)
        key, value = project(encoder_hidden_states, _kv(attn))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        cast = autocast_dtype(query)  # stock's SDPA runs in the autocast dtype
        if cast is not None:
            query, key, value = query.to(cast), key.to(cast), value.to(cast)
        head_dim = key.shape[-1] // attn.heads
        heads = lambda t: t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        out = key_padding_attention(heads(query), heads(key), heads(value), attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.rescale_output_factor != 1.0:  # as SanaAttnProcessor2_0; x / 1.0 is exact, yet a pass over x
            out = out / attn.rescale_output_factor
        return out


def _not_key_padding(batch, encoder_hidden_states, attention_mask) -> Optional[str]:
    """Why this cross-attention call is not one that `key_padding_attention` reproduces exactly, or None: the
    caption batch must be the image batch, and the mask SANA's additive float bias over the caption, (B or 1, 1,
    S_kv) or (B or 1, 1, 1, S_kv). diffusers' processor takes others (a 2-D float mask as a bias over the heads'
    rows, a bool mask with SDPA's meaning, where a caption without kept tokens gives zeros)."""
    if encoder_hidden_states.shape[0] != batch:
        return f"its caption batch {encoder_hidden_states.shape[0]} is not the image batch {batch}"
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool or attention_mask.dim() == 2 \
            or not is_key_padding_shape(attention_mask, batch, encoder_hidden_states.shape[1]):
        return (f"its attention mask ({str(attention_mask.dtype).removeprefix('torch.')}, shape "
                f"{tuple(attention_mask.shape)}) is not SANA's key-padding bias")
    return None


@precomputed_call_signature
class DCGenSanaMultiscaleAttnProcessor:
    """SanaMultiscaleAttnProcessor2_0 whose linear branch runs `sana_multiscale_linear_attention`: ReLU, the
    fp32 math and the cast back happen in the kernel instead of on an fp32 copy of the whole qkv tensor."""

    def __init__(self, original, backend: str):
        self.original = original
        self.backend = backend

    @stock_processor_for_other_dtypes
    def __call__(self, attn, hidden_states):
        batch, _, height, width = hidden_states.shape
        if height * width <= attn.attention_head_dim:  # diffusers uses quadratic attention there
            return self.original(attn, hidden_states)
        reason = not_plain({"nonlinearity": attn._modules["nonlinearity"]}, torch.nn.ReLU)  # the op applies ReLU
        if reason is not None:
            return _fallback(reason, self.original, attn, hidden_states)
        residual = hidden_states
        x = hidden_states.movedim(1, -1)
        qkv = project_concatenated(x, _qkv(attn)).movedim(-1, 1)
        qkv = torch.cat([qkv] + [block(qkv) for block in attn.to_qkv_multiscale], dim=1)
        query, key, value = qkv.reshape(batch, -1, 3 * attn.attention_head_dim, height * width).chunk(3, dim=2)
        out = sana_multiscale_linear_attention(query, key, value, eps=attn.eps, backend=self.backend)
        out = attn.to_out(out.reshape(batch, -1, height, width).movedim(1, -1)).movedim(-1, 1)
        if attn.norm_type == "rms_norm":
            out = attn.norm_out(out.movedim(1, -1)).movedim(-1, 1)
        else:
            out = attn.norm_out(out)
        return out + residual if attn.residual_connection else out


_PROCESSORS = {"SanaLinearAttnProcessor2_0": DCGenSanaLinearAttnProcessor,
               "SanaAttnProcessor2_0": DCGenSanaCrossAttnProcessor,
               "SanaMultiscaleAttnProcessor2_0": DCGenSanaMultiscaleAttnProcessor}
_OURS = tuple(_PROCESSORS.values())


# ----------------------------------------------------------------------------------------------- forwards
def _glumbconv_tokens(ff, tokens, height, width, backend):
    if _quantized_mix_ffn(ff):
        return ff.conv_point.linear(_depthwise_glu(ff, ff.conv_inverted.linear(tokens), height, width, backend))
    weights = (ff.conv_inverted.weight, ff.conv_inverted.bias, ff.conv_depth.weight, ff.conv_depth.bias,
               ff.conv_point.weight)
    cast = autocast_dtype(tokens)  # the convs it stands for run in the autocast dtype
    if cast is not None:
        tokens, weights = tokens.to(cast), tuple(w.to(cast) for w in weights)
    return glumbconv(tokens, height, width, *weights, backend=backend)


def _mix_ffn_unfused_reason(ff) -> Optional[str]:
    """Why the fused Mix-FFN cannot read its convs' weights or stand for its SiLU on this call (see `not_plain`), or
    stand for its forward (a subclass's own), or None."""
    reason = overridden_forward(ff, _classes()["GLUMBConv"])
    if reason is not None:
        return reason
    children = ff._modules  # per call: the dict is ~15x faster than attribute lookups of submodules
    convs = {"conv_depth": children["conv_depth"]}
    if not _quantized_mix_ffn(ff):  # quantized 1x1 convs are called as modules
        convs.update(conv_inverted=children["conv_inverted"], conv_point=children["conv_point"])
    reason = not_plain(convs, torch.nn.Conv2d)
    activation = children["nonlinearity"]  # hooks on it send the whole module to stock_when_unfusable's fallback
    if reason is None and type(activation) is not torch.nn.SiLU:
        reason = f"nonlinearity is {qualified_type(activation)}, not torch.nn.SiLU"
    return reason


def _quantized_mix_ffn(ff) -> bool:
    children = ff._modules
    return (isinstance(children["conv_inverted"], QuantizedPointwiseConv)
            and isinstance(children["conv_point"], QuantizedPointwiseConv))


def _fp8_mix_ffn(ff) -> bool:
    return _quantized_mix_ffn(ff) and all(isinstance(c.linear, FP8Linear) for c in (ff.conv_inverted, ff.conv_point))


def _depthwise_glu(ff, pre, height, width, backend):
    weight, bias = ff.conv_depth.weight, ff.conv_depth.bias
    return depthwise_glu(pre, height, width, weight.to(pre.dtype), bias.to(pre.dtype), backend=backend)


def _quantize_backend(backend: str) -> str:
    return "triton" if backend == "cuda" else backend  # the FP8 quantize kernels are Triton only


def _fp8_self_attention_inputs(attn) -> bool:
    """Our linear-attention processor only projects its input, so it may be handed FP8 activations."""
    return (isinstance(attn.processor, DCGenSanaLinearAttnProcessor)
            and all(isinstance(p, FP8Linear) for p in (attn.to_q, attn.to_k, attn.to_v)))


def _block_skip_reason(block) -> Optional[str]:
    children = block._modules  # read per call: its dict is ~15x faster than attribute lookups of submodules
    for name in ("norm1", "norm2"):
        norm = children.get(name)  # diffusers builds blocks without cross-attention with neither norm2 nor attn2
        if type(norm) is not torch.nn.LayerNorm or norm.elementwise_affine:
            return f"{name} is not a LayerNorm without affine"
    ff = children["ff"]
    if ff.norm_type is not None or ff.residual_connection:
        return "its GLUMBConv has a norm or residual (SANA blocks have neither)"
    return None


@stock_when_unfusable(calls=("attn1", "attn2"), unfusable=_block_skip_reason)
def _sana_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, timestep=None, height=None, width=None):
    backend = backend_of(self)
    batch = hidden_states.shape[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _block_modulation(self, timestep, batch)

    norm = _handed_over_norm1(self, hidden_states, timestep)
    if norm is None:
        norm = _norm1(self, hidden_states, scale_msa, shift_msa, backend)
    attn_output = self.attn1(norm)
    hidden_states = gated_residual(_as_stock_sum_dtype(hidden_states, gate_msa, attn_output), gate_msa, attn_output,
                                   backend=backend)
    unfused_ff = _mix_ffn_unfused_reason(self.ff)
    fp8_ff = unfused_ff is None and _fp8_mix_ffn(self.ff)
    norm_backend = _quantize_backend(backend) if fp8_ff else backend
    cross = None if self.attn2 is None else self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                                       attention_mask=encoder_attention_mask)
    if cross is not None and cross.dtype == hidden_states.dtype:  # the residual add and norm2 in one pass
        fused = gated_residual_ada_layer_norm_modulate_fp8 if fp8_ff else gated_residual_ada_layer_norm_modulate
        hidden_states, norm = fused(hidden_states, None, cross, scale_mlp, shift_mlp, eps=self.norm2.eps,
                                    backend=norm_backend)
    else:
        if cross is not None:  # stock's add promotes mixed dtypes: keep its exact semantics
            hidden_states = cross + hidden_states
        modulate = ada_layer_norm_modulate_fp8 if fp8_ff else ada_layer_norm_modulate
        norm = modulate(hidden_states, scale_mlp, shift_mlp, eps=self.norm2.eps, backend=norm_backend)
    if fp8_ff:
        gated = _depthwise_glu(self.ff, self.ff.conv_inverted.linear(norm), height, width, backend)
        return self.ff.conv_point.linear(gated, gate=gate_mlp, residual=hidden_states)
    if unfused_ff is None:
        ff = _glumbconv_tokens(self.ff, norm, height, width, backend)
    else:  # stock's Mix-FFN call, on the NCHW view of the tokens
        warn_unfused("SANA's Mix-FFN (GLUMBConv)", unfused_ff)
        ff = type(self.ff).forward(self.ff, norm.unflatten(1, (height, width)).permute(0, 3, 1, 2))
        ff = ff.flatten(2, 3).permute(0, 2, 1)
    successor = _successor_taking_norm1(self, hidden_states, ff, timestep)
    if successor is None:
        return gated_residual(hidden_states, gate_mlp, ff, backend=backend)
    return _hand_over_norm1(successor, hidden_states, gate_mlp, ff, timestep, backend)


def _block_modulation(block, timestep, batch):
    """The six (B, 1, C) chunks of the block's scale_shift_table + timestep: shift, scale, gate of the attention
    and of the Mix-FFN. Channel stride 1, as the fused ops read them, also for a timestep of another layout."""
    return with_unit_channel_stride(block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)


def _as_stock_sum_dtype(residual, gate, x):
    """residual in the dtype of stock's `residual + gate * x`, which promotes, where the fused ops return residual's
    dtype: under autocast an fp32 SANA's gates (fp32 scale_shift_table) make the residual stream fp32 from the
    first block on, after a bf16 patch embedding."""
    dtype = torch.promote_types(residual.dtype, torch.promote_types(gate.dtype, x.dtype))
    return residual if dtype == residual.dtype else residual.to(dtype)


def _norm1(block, hidden_states, scale, shift, backend):
    """The block's adaLN before self-attention: FP8 rows when its Q/K/V projections take them."""
    if _fp8_self_attention_inputs(block.attn1):
        return ada_layer_norm_modulate_fp8(hidden_states, scale, shift, eps=block.norm1.eps,
                                           backend=_quantize_backend(backend))
    return ada_layer_norm_modulate(hidden_states, scale, shift, eps=block.norm1.eps, backend=backend)


# ----------------------------------------------------------------------------------------------- block hand-over
# A block's last op, residual + gate_mlp * ff, and the next block's first, norm1 of that sum, are one pass over the
# activations when fused (gated_residual_ada_layer_norm_modulate: it writes the sum and the normalised rows without
# reading the sum back; ~0.033 ms per block pair at a 128x128 SANA-1.6B latent by run F's op timings). The model calls
# the blocks one by one, so the block hands the rows to its successor, which takes them only if it is called next on
# exactly that sum (same tensor object and version), the same timestep and its own modulation table unchanged; else it
# normalises its input itself. Only without grad and outside torch.compile (autograd and dynamo see the plain ops),
# and not under torch.inference_mode (its tensors carry no version counter; diffusers' pipelines run under
# torch.no_grad).
_SUCCESSOR_ATTR = "_dcgen_successor"  # the next SanaTransformerBlock of the same ModuleList (a plain attribute)
# successor block -> what it was handed: kept off the module (a forward that stops between blocks would leave
# weak references in its state, which torch.save cannot pickle)
_handed_over: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _successor_taking_norm1(block, hidden_states, ff, timestep):
    successor = block.__dict__.get(_SUCCESSOR_ATTR)
    if successor is None or not runs_own_forward(successor, _sana_block_forward):
        return None
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or ff.dtype != hidden_states.dtype:
        return None
    # Inference tensors have no version counter: an in-place change between the blocks would go unseen.
    if torch.is_inference_mode_enabled() or hidden_states.is_inference() or timestep.is_inference():
        return None
    return successor


def _hand_over_norm1(successor, hidden_states, gate, ff, timestep, backend):
    """hidden_states + gate * ff, with the successor's norm1 of it computed in the same pass and left for it."""
    shift, scale = _block_modulation(successor, timestep, hidden_states.shape[0])[:2]
    if _fp8_self_attention_inputs(successor.attn1):
        total, norm = gated_residual_ada_layer_norm_modulate_fp8(hidden_states, gate, ff, scale, shift,
                                                                 eps=successor.norm1.eps,
                                                                 backend=_quantize_backend(backend))
    else:
        total, norm = gated_residual_ada_layer_norm_modulate(hidden_states, gate, ff, scale, shift,
                                                             eps=successor.norm1.eps, backend=backend)
    table = successor.scale_shift_table
    _handed_over[successor] = (weakref.ref(total), total._version, weakref.ref(timestep), timestep._version, table,
                               table._version, norm)
    return total


def _handed_over_norm1(block, hidden_states, timestep):
    """The norm1 rows the previous block left, if this call is on exactly the tensors they were made from."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # never handed over then (nor traced by dynamo)
        return None
    handed = _handed_over.pop(block, None)
    if handed is None:
        return None
    total, total_version, step, step_version, table, table_version, norm = handed
    # the modulation table too: a hook or a weight load between the blocks may change or replace it
    if total() is hidden_states and hidden_states._version == total_version and step() is timestep \
            and timestep._version == step_version and block.scale_shift_table is table \
            and table._version == table_version:
        return norm
    return None


def _link_blocks(blocks: torch.nn.ModuleList, block_class) -> None:
    """Point each SanaTransformerBlock of `blocks` at the next one, in the instance dict: no submodule, so
    `modules()` and `state_dict` stay as they were."""
    if all(type(b) is block_class for b in blocks):
        for block, successor in zip(blocks, blocks[1:]):
            block.__dict__[_SUCCESSOR_ATTR] = successor


def _unlink_blocks(blocks: torch.nn.ModuleList) -> None:
    for block in blocks:
        block.__dict__.pop(_SUCCESSOR_ATTR, None)
        _handed_over.pop(block, None)


def _modulated_norm_skip_reason(module) -> Optional[str]:
    return None if type(module._modules["norm"]) is torch.nn.LayerNorm else "its norm is not torch.nn.LayerNorm"


@stock_when_unfusable(unfusable=_modulated_norm_skip_reason)
def _modulated_norm_forward(self, hidden_states, temb, scale_shift_table):
    shift, scale = with_unit_channel_stride(scale_shift_table[None] + temb[:, None].to(scale_shift_table.device)
                                            ).chunk(2, dim=1)
    # stock promotes to the modulation's dtype and broadcasts a batch-1 input against a larger modulation: keep its
    # exact semantics
    if scale.dtype != hidden_states.dtype or scale.shape[0] != hidden_states.shape[0]:
        return self.norm(hidden_states) * (1 + scale) + shift
    return ada_layer_norm_modulate(hidden_states, scale, shift, norm_weight=self.norm.weight,
                                   norm_bias=self.norm.bias, eps=self.norm.eps, backend=backend_of(self))


@stock_when_unfusable(calls=("norm",), tokens=False)
def _glumbconv_forward(self, hidden_states):
    """GLUMBConv on an NCHW map: tokens are its channels-last view (a copy unless already channels_last)."""
    reason = _mix_ffn_unfused_reason(self)
    if reason is not None:
        warn_unfused("GLUMBConv", reason)
        return type(self).forward(self, hidden_states)
    batch, channels, height, width = hidden_states.shape
    tokens = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    out = _glumbconv_tokens(self, tokens, height, width, backend_of(self))
    if self.norm_type == "rms_norm":
        out = self.norm(out)  # over channels, which tokens already have last
    out = out.unflatten(1, (height, width)).permute(0, 3, 1, 2)
    return out + hidden_states if self.residual_connection else out


def _glumbconv_skip_reason(module) -> Optional[str]:
    if module.norm_type not in (None, "rms_norm"):
        return f"norm_type {module.norm_type!r}"
    return None


# ----------------------------------------------------------------------------------------------- CUDA graphs
_caption_plan: dict = {}  # "last": (weakref to the mask, its version, activations' dtype, (key, plan, S_kv))


def cuda_graph_plan_inputs(model):
    """The `plan_inputs` of patch(cuda_graph=True) for a SanaTransformer2DModel (patching/cuda_graph.py), else None."""
    try:
        from diffusers import SanaTransformer2DModel
    except ImportError:
        return None
    return _caption_mask_plan if isinstance(model, SanaTransformer2DModel) else None


def _caption_mask_plan(args, kwargs):
    """(key, capture context) of the call's caption mask: the key-padding plan of the bias SanaTransformer2DModel
    builds from it ((1 - mask) * -10000 in the activations' dtype), which its cross-attentions follow while the
    graph is captured (ops/key_padding_attention.graph_plan); None without a mask given by keyword. Cached for the
    last mask object (pipelines pass the same one every step): one host sync per new or changed mask."""
    mask = kwargs.get("encoder_attention_mask")
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not torch.is_tensor(mask) or not torch.is_tensor(hidden) or mask.dim() not in (2, 3):
        return None
    ref, version, dtype, planned = _caption_plan.get("last", (None, None, None, None))
    if ref is None or ref() is not mask or version != mask._version or dtype != hidden.dtype or mask.is_inference():
        bias = (1 - mask.to(hidden.dtype)) * SANA_MASK_BIAS if mask.dim() == 2 else mask
        planned = (*graph_plan(bias), bias.shape[-1])
        if not mask.is_inference():
            _caption_plan["last"] = (weakref.ref(mask), mask._version, hidden.dtype, planned)
    key, plan, text_tokens = planned
    return key, captured_with(plan, text_tokens)


# ----------------------------------------------------------------------------------------------- entry points
def patch_module(module: torch.nn.Module, backend: str):
    """(replaced class name, reason it was skipped or None) for a module this family handles, else None."""
    classes = _classes()
    if classes is None:
        return None
    if isinstance(module, torch.nn.ModuleList):
        _link_blocks(module, classes["SanaTransformerBlock"])
        return None  # not a replacement: the blocks are reported themselves
    for name, forward, skip_reason in (("SanaTransformerBlock", _sana_block_forward, _block_skip_reason),
                                       ("SanaModulatedNorm", _modulated_norm_forward, _modulated_norm_skip_reason),
                                       ("GLUMBConv", _glumbconv_forward, _glumbconv_skip_reason)):
        if isinstance(module, classes[name]):
            return replace_unless_skipped(module, forward,
                                          overridden_forward(module, classes[name]) or skip_reason(module), backend)
    if isinstance(module, (classes["Attention"], classes["SanaMultiscaleLinearAttention"])):
        processor = getattr(module, "processor", None)
        if isinstance(processor, _OURS):
            processor.backend = backend
            _place_projections(module, processor)
            return type(processor.original).__name__, None
        ours = _PROCESSORS.get(type(processor).__name__)
        if ours is None or type(processor) is not classes[type(processor).__name__]:
            return None  # another model's attention: not ours to judge
        _set_processor(module, ours(processor, backend))
        _place_projections(module, module.processor)
        return type(processor).__name__, None
    return None


def _projection_groups(attn, processor) -> list:
    if isinstance(processor, DCGenSanaCrossAttnProcessor):
        return [_kv(attn)] if attn.is_cross_attention else []
    return [_qkv(attn)]


def _place_projections(attn, processor) -> None:
    """Put each group of projections that read one input side by side in memory (patching/_fused_projections.py),
    where they are plain nn.Linear (not adapters, no hooks)."""
    for group in _projection_groups(attn, processor):
        if not_plain(group, torch.nn.Linear) is None:
            place_side_by_side(list(group.values()))


def _set_processor(module, processor) -> None:
    # Attention has set_processor; SanaMultiscaleLinearAttention keeps a plain attribute.
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def unpatch_module(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.ModuleList):
        _unlink_blocks(module)
        return False
    if restore_forward(module):
        return True
    processor = getattr(module, "processor", None)
    if isinstance(processor, _OURS):
        for group in _projection_groups(module, processor):
            separate(list(group.values()))
        _set_processor(module, processor.original)
        return True
    return False
