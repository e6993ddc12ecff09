"""FLUX family: `FluxAttnProcessor` -> the fused `flux_attention` op; adaLN norms -> `ada_layer_norm_modulate`;
the blocks' gated residuals and their inline MLP norm -> `gated_residual` / `ada_layer_norm_modulate` (the attention
residual with norm2: `gated_residual_ada_layer_norm_modulate`); on a GPU the MLPs' tanh GELU runs in the epilogue of
the GEMM before it (cuBLASLt through torch._addmm_activation).

When the block linears are FP8Linear (patch(model, quant="fp8")), the patched blocks hand them activations
quantized by the kernel that produces them: adaLN-modulate emits FP8 rows once for Q/K/V (and the single blocks'
MLP), the FFN's GELU runs inside the pass that quantizes the second linear's input (the single blocks' concat of
attention and MLP output too), and the last linear of each branch fuses `residual + gate * y` into its epilogue.
The attention output is quantized by one standalone pass before `to_out` / `to_add_out`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend
from ..ops._common import FLOAT_DTYPES
from ..ops.ada_layer_norm import (ada_layer_norm_modulate, ada_layer_norm_modulate_fp8, gated_residual,
                                  gated_residual_ada_layer_norm_modulate, gated_residual_ada_layer_norm_modulate_fp8)
from ..ops.flux_attention import flux_attention
from ..ops.fp8_linear import quantize_fp8
from ..quant.fp8 import FP8Linear
from ._fused_projections import place_side_by_side, project, separate
from ._instance import (backend_of, class_rule, hooked_submodule, not_plain, once, overridden_forward,
                        precomputed_call_signature, replace_unless_skipped, restore_forward,
                        stock_processor_for_other_dtypes, stock_when_unfusable, with_unit_channel_stride)

FAMILY = "flux"
SUPPORTED = ("FluxTransformer2DModel: FluxAttention with FluxAttnProcessor, AdaLayerNormZero/ZeroSingle/Continuous, "
             "FluxTransformerBlock, FluxSingleTransformerBlock (diffusers >= 0.35)")


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


def _forwarded_to_original(name: str) -> property:
    return property(lambda self: getattr(self.original, name, None),
                    lambda self, value: setattr(self.original, name, value))


# attention children the processor calls as modules (the projections through `project`, which checks them)
_CALLED_BY_PROCESSOR = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_qkv", "to_added_qkv",
                        "to_out", "to_add_out")


@precomputed_call_signature
class DCGenFluxAttnProcessor:
    """Drop-in for FluxAttnProcessor: projections, then one fused norm + RoPE + attention op.

    Keeps the processor it replaced, both to restore it on `unpatch` and to serve the calls the fused op does
    not cover (an attention mask, context parallelism), with a one-time warning.
    """

    def __init__(self, original, backend: str):
        self.original = original
        self.backend = backend

    # diffusers' enable_parallelism / set_attention_backend configure every processor that has these attributes:
    # forwarded to the kept processor, so a context-parallel setup made after patch() reaches _unsupported (and the
    # fallback call honours it) instead of the fused op attending over one rank's shard
    _parallel_config = _forwarded_to_original("_parallel_config")
    _attention_backend = _forwarded_to_original("_attention_backend")

    def _unsupported(self, attn, encoder_hidden_states, attention_mask, image_rotary_emb) -> Optional[str]:
        if attention_mask is not None:
            return "an attention_mask was passed"
        if image_rotary_emb is not None and image_rotary_emb[0].dtype not in FLOAT_DTYPES:
            return f"its rotary tables are {image_rotary_emb[0].dtype} (stock's RoPE then computes in that dtype)"
        if getattr(self.original, "_parallel_config", None) is not None:
            return "context parallelism is configured"
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is None:
            return "encoder_hidden_states given to an attention without added KV projections"
        # its Q/K RMSNorms are computed in the fused op: hooks on them, or a norm replaced since patch()
        return hooked_submodule(attn, _CALLED_BY_PROCESSOR) or _skip_reason(attn)

    @stock_processor_for_other_dtypes
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        reason = self._unsupported(attn, encoder_hidden_states, attention_mask, image_rotary_emb)
        if reason:
            _backend.warn_once(f"flux-processor:{reason}", f"dcgen_kernels: FLUX attention falls back to diffusers' "
                               f"processor because {reason}")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        d = attn.head_dim
        if attn.fused_projections:
            q, k, v = _heads(attn.to_qkv(hidden_states), d).chunk(3, dim=-2)
        else:
            q, k, v = (_heads(t, d) for t in project(hidden_states, _projection_groups(attn)[0]))
        text = {}
        if encoder_hidden_states is not None:
            if attn.fused_projections:
                tq, tk, tv = _heads(attn.to_added_qkv(encoder_hidden_states), d).chunk(3, dim=-2)
            else:
                tq, tk, tv = (_heads(t, d) for t in project(encoder_hidden_states, _projection_groups(attn)[1]))
            text = dict(txt_q=tq, txt_k=tk, txt_v=tv, norm_txt_q_weight=attn.norm_added_q.weight,
                        norm_txt_k_weight=attn.norm_added_k.weight)
        cos, sin = (None, None) if image_rotary_emb is None else (t.contiguous() for t in image_rotary_emb)
        out = flux_attention(q, k, v, cos, sin, norm_q_weight=attn.norm_q.weight, norm_k_weight=attn.norm_k.weight,
                             eps=_rms_norm_eps(attn.norm_q, q.dtype), backend=self.backend, **text)
        if encoder_hidden_states is None:
            return out
        s_txt = encoder_hidden_states.shape[1]
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, s_txt:]))
        return hidden_states, attn.to_add_out(out[:, :s_txt])


def _projection_groups(attn) -> list:
    """The image Q/K/V projections and, in joint blocks, the text ones: each group reads one input, one GEMM where
    patch() placed it side by side (patching/_fused_projections.py; diffusers' own `fuse_qkv_projections` keeps
    a second, joined copy of the weights instead)."""
    groups = [{"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v}]
    if attn.added_kv_proj_dim is not None:
        groups.append({"add_q_proj": attn.add_q_proj, "add_k_proj": attn.add_k_proj, "add_v_proj": attn.add_v_proj})
    return groups


def _place_projections(attn) -> None:
    if not attn.fused_projections:
        for group in _projection_groups(attn):
            if not_plain(group, torch.nn.Linear) is None:
                place_side_by_side(list(group.values()))


def _skip_reason(attn) -> Optional[str]:
    # read per call: a diffusers attention module's attribute lookup of a submodule costs ~1.7 us on the CI CPU,
    # its _modules dict's ~0.1 us
    children = attn._modules
    names = ("norm_q", "norm_k", "norm_added_q", "norm_added_k") if attn.added_kv_proj_dim else ("norm_q", "norm_k")
    norms = [children.get(name) for name in names]
    if not all(type(n) is torch.nn.RMSNorm for n in norms):
        return "its q/k norms are not torch.nn.RMSNorm"
    if len({n.eps for n in norms}) != 1:
        return "its q/k norms use different eps"
    if attn.head_dim % 2:
        return f"odd head_dim {attn.head_dim} (RoPE rotates pairs)"
    return None


# ----------------------------------------------------------------------------------------------- adaLN norms
def _modulate(module, x, scale, shift):
    """module.norm(x) * (1 + scale) + shift with (B, C) modulation, in one pass."""
    # Stock promotes the result to the modulation's dtype and broadcasts a batch-1 x against a larger modulation (one
    # latent, two timesteps), or an unbatched x: keep its exact semantics. A batch-1 modulation the op broadcasts.
    if scale.dtype != x.dtype or x.dim() != 3 or scale.shape[0] not in (1, x.shape[0]):
        return module.norm(x) * (1 + scale[:, None]) + shift[:, None]
    norm = module.norm
    return ada_layer_norm_modulate(x, scale, shift, norm_weight=norm.weight, norm_bias=norm.bias, eps=norm.eps,
                                   backend=backend_of(module))


def _norm_skip_reason(module, takes_affine: bool) -> Optional[str]:
    norm = module._modules.get("norm")  # per call: see _skip_reason
    if type(norm) is not torch.nn.LayerNorm:
        return f"its norm is {type(norm).__name__}, not torch.nn.LayerNorm"
    if norm.elementwise_affine and not takes_affine:
        return "its LayerNorm has an affine weight"
    return None


def _norm_without_affine_reason(module) -> Optional[str]:
    return _norm_skip_reason(module, takes_affine=False)


def _norm_with_affine_reason(module) -> Optional[str]:
    return _norm_skip_reason(module, takes_affine=True)


@stock_when_unfusable(calls=("emb", "linear", "silu"), unfusable=_norm_without_affine_reason)
def _ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return _modulate(self, x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


@stock_when_unfusable(calls=("linear", "silu"), unfusable=_norm_without_affine_reason)
def _ada_zero_single_forward(self, x, emb=None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    return _modulate(self, x, scale_msa, shift_msa), gate_msa


@stock_when_unfusable(calls=("linear", "silu"), unfusable=_norm_with_affine_reason)
def _ada_continuous_forward(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)  # AdaLayerNormContinuous orders its chunks (scale, shift)
    return _modulate(self, x, scale, shift)


# ----------------------------------------------------------------------------------------------- blocks
def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def _fp8(*modules) -> bool:
    return all(isinstance(m, FP8Linear) for m in modules)


def _qkv(attn, text: bool) -> tuple:
    if attn.fused_projections:
        return (attn.to_added_qkv,) if text else (attn.to_qkv,)
    return (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if text else (attn.to_q, attn.to_k, attn.to_v)


@once
def _feed_forward_classes() -> tuple:
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    return FeedForward, GELU


def _gelu_tanh_ffn(ff) -> bool:
    """diffusers FeedForward(activation_fn="gelu-approximate"): [GELU(tanh) with proj, Dropout (inactive), Linear].
    Exactly these classes: the fused code computes them itself, so a subclass's own forward would not run."""
    feed_forward, gelu = _feed_forward_classes()
    if type(ff) is not feed_forward:
        return False
    net = ff._modules["net"]._modules  # per call: see _skip_reason
    if len(net) != 3 or type(net["0"]) is not gelu or net["0"].approximate != "tanh":
        return False
    return type(net["1"]) is torch.nn.Dropout and (net["1"].p == 0 or not ff.training)


def _fp8_ffn(ff) -> bool:
    """A FLUX FeedForward with both linears in FP8."""
    return _gelu_tanh_ffn(ff) and _fp8(*_ffn_linears(ff))


def _ffn_linears(ff) -> tuple:
    """The up- (GELU's proj) and down-projection of a FeedForward _gelu_tanh_ffn accepted, read per call through the
    modules' dicts (see _skip_reason)."""
    net = ff._modules["net"]._modules
    return net["0"]._modules["proj"], net["2"]


def _gelu_tanh_linear(linear, x):
    """gelu_tanh(linear(x)). For a plain nn.Linear (no adapter, no hooks) with bias on a GPU, in 16 bits and without
    gradients: one cuBLASLt GEMM with the bias and the GELU in its epilogue (torch._addmm_activation, whose GELU on
    CUDA is the tanh form, applied to the fp32 accumulator: rounded once where stock rounds twice), instead of a
    separate GELU pass over FLUX's 12288-wide MLP activations. Otherwise stock's two ops (on the CPU
    _addmm_activation's GELU is erf)."""
    fused = (not_plain({"ff.net.0.proj": linear}, torch.nn.Linear) is None and linear.bias is not None and x.is_cuda
             and x.dtype in (torch.bfloat16, torch.float16) and linear.weight.dtype == linear.bias.dtype == x.dtype
             and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad
                                                   or linear.bias.requires_grad)))
    if not fused:
        return F.gelu(linear(x), approximate="tanh")
    out = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], out.shape[-1])


def _feed_forward(ff, x):
    """ff(x), the GELU of a FLUX FeedForward inside its first GEMM (_gelu_tanh_linear); another FeedForward as is."""
    if _gelu_tanh_ffn(ff):
        up, down = _ffn_linears(ff)
        return down(_gelu_tanh_linear(up, x))
    return ff(x)


def _fp8_ffn_residual(ff, x, residual, gate, backend):
    """residual + gate * ff(x): first linear (+ bias) in FP8, GELU fused into quantizing its output, second linear
    with the gated residual in its epilogue."""
    up, down = _ffn_linears(ff)
    return down(quantize_fp8(up(x), gelu=True, backend=_quantize_backend(backend)), gate=gate, residual=residual)


def _quantize_backend(backend: str) -> str:
    return "triton" if backend == "cuda" else backend  # the quantize kernels are Triton only


def _ada_zero_chunks(norm, temb):
    emb = norm.linear(norm.silu(temb))
    return emb.chunk(6, dim=1)


def _modulate_fp8(x, scale, shift, eps, backend):
    return ada_layer_norm_modulate_fp8(x, scale, shift, eps=eps, backend=_quantize_backend(backend))


def _gated_residual_modulate_for(consumers_fp8: bool, residual, gate, x, scale, shift, eps, backend):
    """(residual + gate * x, the modulated norm of that sum for its consumers) in one pass."""
    if consumers_fp8:
        return gated_residual_ada_layer_norm_modulate_fp8(residual, gate, x, scale, shift, eps=eps,
                                                          backend=_quantize_backend(backend))
    return gated_residual_ada_layer_norm_modulate(residual, gate, x, scale, shift, eps=eps, backend=backend)


def _fp8_attention_inputs(block, *ada_norms) -> bool:
    """Whether the attention may be handed FP8 activations from `ada_norms`' modulation: our processor (which only
    projects them) and adaLN modules of exactly diffusers' classes (the fused code computes them: a subclass's own
    forward would not run) whose norm is a plain LayerNorm without affine and no embedding of their own."""
    classes = _norm_classes()
    for norm in ada_norms:
        children = norm._modules  # per call: see _skip_reason
        if type(norm) not in classes or children.get("emb") is not None:
            return False
        if type(children["norm"]) is not torch.nn.LayerNorm or children["norm"].elementwise_affine:
            return False
    return isinstance(block._modules["attn"].processor, DCGenFluxAttnProcessor)


def _stock_arithmetic(hidden_states, encoder_hidden_states, temb) -> bool:
    """Whether stock's arithmetic promotes dtypes (a stream or the modulation in another dtype) or broadcasts batches
    (a batch-1 image stream against a larger text stream or modulation, an unbatched stream) here, beyond what the
    fused code does (it expands a batch-1 text stream itself): such a call runs the block's stock forward, for its
    exact results."""
    batch = hidden_states.shape[0]
    return (temb.dtype != hidden_states.dtype or encoder_hidden_states.dtype != hidden_states.dtype
            or hidden_states.dim() != 3 or encoder_hidden_states.dim() != 3
            or temb.shape[0] not in (1, batch) or encoder_hidden_states.shape[0] not in (1, batch))


def _block_skip_reason(block) -> Optional[str]:
    for name in ("norm2", "norm2_context"):
        norm = block._modules.get(name)  # per call: see _skip_reason
        if norm is not None and (type(norm) is not torch.nn.LayerNorm or norm.elementwise_affine):
            return f"{name} is not a LayerNorm without affine"
    return None


@stock_when_unfusable(calls=("attn",), unfusable=_block_skip_reason)
def _flux_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                        joint_attention_kwargs=None):
    if _stock_arithmetic(hidden_states, encoder_hidden_states, temb):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    if encoder_hidden_states.shape[0] == 1 < hidden_states.shape[0]:
        # FluxPipeline hands given prompt_embeds over unrepeated for num_images_per_prompt > 1; stock broadcasts
        # them in the first block's norm and residual, whose outputs then have the image batch: the same values
        encoder_hidden_states = encoder_hidden_states.expand(hidden_states.shape[0], -1, -1)
    encoder_hidden_states = with_unit_channel_stride(encoder_hidden_states)  # the text stream's residual
    backend = backend_of(self)
    if _fp8_attention_inputs(self, self.norm1, self.norm1_context) and _fp8(*_qkv(self.attn, False),
                                                                            *_qkv(self.attn, True)):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_zero_chunks(self.norm1, temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _ada_zero_chunks(
            self.norm1_context, temb)
        norm_hidden = _modulate_fp8(hidden_states, scale_msa, shift_msa, self.norm1.norm.eps, backend)
        norm_context = _modulate_fp8(encoder_hidden_states, c_scale_msa, c_shift_msa, self.norm1_context.norm.eps,
                                     backend)
    else:
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                            emb=temb)
    outputs = self.attn(hidden_states=norm_hidden, encoder_hidden_states=norm_context,
                        image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = outputs[0], outputs[1]

    fp8_ff = _fp8_ffn(self.ff)
    hidden_states, norm_hidden = _gated_residual_modulate_for(fp8_ff, hidden_states, gate_msa, attn_output, scale_mlp,
                                                              shift_mlp, self.norm2.eps, backend)
    if fp8_ff:
        hidden_states = _fp8_ffn_residual(self.ff, norm_hidden, hidden_states, gate_mlp, backend)
    else:
        hidden_states = gated_residual(hidden_states, gate_mlp, _feed_forward(self.ff, norm_hidden), backend=backend)
    if len(outputs) == 3:  # IP-adapter output
        hidden_states = hidden_states + outputs[2]

    fp8_ff = _fp8_ffn(self.ff_context)
    encoder_hidden_states, norm_context = _gated_residual_modulate_for(
        fp8_ff, encoder_hidden_states, c_gate_msa, context_attn_output, c_scale_mlp, c_shift_mlp,
        self.norm2_context.eps, backend)
    if fp8_ff:
        encoder_hidden_states = _fp8_ffn_residual(self.ff_context, norm_context, encoder_hidden_states, c_gate_mlp,
                                                  backend)
    else:
        encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_mlp,
                                               _feed_forward(self.ff_context, norm_context), backend=backend)
    return _clip_fp16(encoder_hidden_states), hidden_states


def _fp8_single_block(block) -> bool:
    act = block.act_mlp
    return (_fp8_attention_inputs(block, block.norm) and _fp8(block.proj_mlp, block.proj_out, *_qkv(block.attn, False))
            and type(act) is torch.nn.GELU and act.approximate == "tanh")


def _joined(first, second):
    """torch.cat([first, second], dim=1) of (B, T, C) and (B, N, C), as a view when they are the two halves of one
    (B, T + N, C) tensor, which is how a patched single block returns its output to the next one (a 28 MB copy per
    single block at 4608 FLUX tokens otherwise). Only for plain tensors with real storage, outside torch.compile,
    dispatch modes (fake tensors) and autograd."""
    B, T, C = first.shape
    S = T + second.shape[1]
    halves = (type(first) is torch.Tensor and type(second) is torch.Tensor and not first.is_meta
              and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
              and not (torch.is_grad_enabled() and (first.requires_grad or second.requires_grad))
              and second.shape[0] == B and second.shape[2] == C and first.dtype == second.dtype
              and first.device == second.device and first.stride() == second.stride() == (S * C, C, 1)
              and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
              and second.storage_offset() == first.storage_offset() + T * C)
    if halves:
        return first.as_strided((B, S, C), (S * C, C, 1), first.storage_offset())
    return torch.cat([first, second], dim=1)


@stock_when_unfusable(calls=("attn",))
def _flux_single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                               joint_attention_kwargs=None):
    if _stock_arithmetic(hidden_states, encoder_hidden_states, temb) \
            or encoder_hidden_states.shape[0] != hidden_states.shape[0]:  # stock's cat would not broadcast: its error
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    backend = backend_of(self)
    text_seq_len = encoder_hidden_states.shape[1]
    residual = _joined(encoder_hidden_states, hidden_states)
    if _fp8_single_block(self):
        # One FP8 quantization of the normed rows serves Q, K, V and the MLP; GELU and the [attention, MLP] concat
        # happen inside the pass that quantizes proj_out's input; proj_out adds residual + gate * y itself.
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
        norm_hidden = _modulate_fp8(residual, scale, shift, self.norm.norm.eps, backend)
        mlp_pre = self.proj_mlp(norm_hidden)
        attn_output = self.attn(hidden_states=norm_hidden, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        joint = quantize_fp8(mlp_pre, prefix=attn_output, gelu=True, backend=_quantize_backend(backend))
        hidden_states = _clip_fp16(self.proj_out(joint, gate=gate, residual=residual))
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    norm_hidden, gate = self.norm(residual, emb=temb)
    if type(self.act_mlp) is torch.nn.GELU and self.act_mlp.approximate == "tanh":
        mlp_hidden = _gelu_tanh_linear(self.proj_mlp, norm_hidden)
    else:
        mlp_hidden = self.act_mlp(self.proj_mlp(norm_hidden))
    attn_output = self.attn(hidden_states=norm_hidden, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    out = self.proj_out(torch.cat([attn_output, mlp_hidden], dim=2))
    hidden_states = _clip_fp16(gated_residual(residual, gate, out, backend=backend))
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _block_classes() -> dict:
    try:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    except ImportError:
        return {}
    return {FluxTransformerBlock: _flux_block_forward, FluxSingleTransformerBlock: _flux_single_block_forward}


@once
def _norm_classes() -> dict:
    try:
        from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    except ImportError:
        return {}
    # (forward, whether it passes the LayerNorm's own affine weights to the op)
    return {AdaLayerNormZero: (_ada_zero_forward, False), AdaLayerNormZeroSingle: (_ada_zero_single_forward, False),
            AdaLayerNormContinuous: (_ada_continuous_forward, True)}


# ----------------------------------------------------------------------------------------------- entry points
def patch_module(module: torch.nn.Module, backend: str):
    """(replaced class name, reason it was skipped or None) for a module this family handles, else None."""
    rule = class_rule(module, _norm_classes())
    if rule is not None:
        cls, (forward, takes_affine) = rule
        reason = overridden_forward(module, cls) or _norm_skip_reason(module, takes_affine)
        return replace_unless_skipped(module, forward, reason, backend)
    rule = class_rule(module, _block_classes())
    if rule is not None:
        cls, forward = rule
        return replace_unless_skipped(module, forward, overridden_forward(module, cls) or _block_skip_reason(module),
                                      backend)
    classes = _flux_classes()
    if classes is None or not isinstance(module, classes[0]):
        return None
    processor = module.processor
    if isinstance(processor, DCGenFluxAttnProcessor):
        processor.backend = backend
        _place_projections(module)
        return type(processor.original).__name__, None
    if type(processor) is not classes[1]:
        return type(processor).__name__, f"processor {type(processor).__name__} is not FluxAttnProcessor"
    reason = _skip_reason(module)
    if reason is None:
        module.set_processor(DCGenFluxAttnProcessor(processor, backend))
        _place_projections(module)
    return type(processor).__name__, reason


def unpatch_module(module: torch.nn.Module) -> bool:
    if restore_forward(module):
        return True
    processor = getattr(module, "processor", None)
    if isinstance(processor, DCGenFluxAttnProcessor):
        for group in _projection_groups(module):
            separate(list(group.values()))
        module.set_processor(processor.original)
        return True
    return False
