"""Latent I/O family: the transformer's embedder and output head run as `patch_embed` / `patch_unembed`.

FLUX (`FluxTransformer2DModel`) takes packed tokens; once patched it also takes UNPACKED latents (B, C, h, w) as
`hidden_states`: `x_embedder` gathers the p x p packing in its GEMM (p from in_channels = C * p**2, p in (1, 2))
and `proj_out` scatters its result straight back to (B, C_out, h, w), which is what the model then returns.
Packed (B, S, F) input runs the stock code unchanged.

SANA (`SanaTransformer2DModel`) always takes (B, C, h, w): its `PatchEmbed` (a p x p, stride-p conv, whose weight
is a linear weight over FLUX-ordered features once flattened) becomes `patch_embed` (+ its optional LayerNorm and
sin-cos pos-embed, as diffusers does them), and `proj_out` + the model's unpatchify become `patch_unembed`: the
patched `proj_out` returns a (B, h/p, w/p, p, p, C) view of the NCHW result, on which the stock unpatchify
reshape/permute/reshape are free views. SANA orders head features (i, j, c), FLUX (c, i, j): for p = 2 the head's
weight rows are permuted per call (a copy of C*4 x D elements).

The model's forward learns the latent grid and hands it to its `proj_out` for the duration of the call (the
Linear alone only sees tokens). When peft wraps the embedder or head (a LoRA adapter, added before or after
patch()), or SANA's embedder conv is wrapped or hooked, the call runs diffusers' code instead (FLUX: on the packed
latent, its output unpacked), with a one-time warning. Per instance; parameters and state_dict untouched; `unpatch`
restores all.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _backend
from ..ops._common import FLOAT_DTYPES, autocast_dtype
from ..ops.patch_embed import PATCH_SIZES, patch_embed, patch_unembed
from . import cuda_graph
from ._instance import (adapter_hint, is_adapter_layer, not_plain, qualified_type, reset_own_forward,
                        set_own_forward, warn_unfused)

FAMILY = "latents"
SUPPORTED = ("FluxTransformer2DModel (unpacked (B, C, h, w) latents) / SanaTransformer2DModel: x_embedder|"
             "patch_embed and proj_out")

_STATE_ATTR = "_dcgen_latents"  # per patched module: {"backend": ..., "role": ...}; own name so no other family
_SKIP_ATTR = "_dcgen_latents_skip"  # set by the model on a child that stays stock, popped when patch() reports it
_GRID_ATTR = "_dcgen_unembed_grid"  # on proj_out during one model call: (patch_size, height, width)
# an adapter layer found at patch() wraps a layer patch() did not fuse: merging alone does not fuse it
_MERGE_THEN_PATCH = (" (merge the adapters into the weights, e.g. with dcgen_kernels.dcgen.merge_lora, then "
                     "dcgen_kernels.patch(model) again to fuse it)")


# ----------------------------------------------------------------------------------------------- helpers
def _install(module: torch.nn.Module, forward, role: str, backend: str) -> None:
    if _STATE_ATTR not in module.__dict__:
        set_own_forward(module, forward)
    setattr(module, _STATE_ATTR, {"backend": backend, "role": role})


def _backend_of(module) -> str:
    return getattr(module, _STATE_ATTR)["backend"]


def _fusable_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """(x, weight, bias) as the op takes them (cast like nn.Linear under autocast), or None when it cannot."""
    cast = autocast_dtype(x)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    dtype_ok = x.dtype in FLOAT_DTYPES and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    if not dtype_ok:
        _backend.warn_once(f"latents:dtype:{x.dtype}:{weight.dtype}",
                           f"dcgen_kernels: the patched embedder/head runs the stock path for input dtype {x.dtype} "
                           f"with weight dtype {weight.dtype} (the fused op takes fp32/bf16/fp16 alike)")
        return None
    return x, weight, bias


def _flux_patch_size(in_features: int, channels: int) -> int:
    for p in PATCH_SIZES:
        if channels * p * p == in_features:
            return p
    raise ValueError(f"hidden_states has {channels} channels, but x_embedder takes {in_features} features: unpacked "
                     f"latents need in_channels = channels * p**2 with p in {PATCH_SIZES}")


# ----------------------------------------------------------------------------------------------- FLUX
def _flux_embed_forward(self, hidden_states):
    if hidden_states.dim() != 4:
        return torch.nn.Linear.forward(self, hidden_states)
    p = _flux_patch_size(self.in_features, hidden_states.shape[1])
    operands = _fusable_operands(hidden_states, self.weight, self.bias)
    if operands is None:
        from ..ops.patch_embed import _pack

        return torch.nn.Linear.forward(self, _pack(hidden_states, p))
    return patch_embed(*operands, patch_size=p, backend=_backend_of(self))


def _head_forward(self, hidden_states):
    """proj_out of either model: the plain Linear unless the model's forward handed it a latent grid."""
    grid = getattr(self, _GRID_ATTR, None)
    if grid is None:
        return torch.nn.Linear.forward(self, hidden_states)
    p, height, width = grid
    role = getattr(self, _STATE_ATTR)["role"]
    weight, bias = self.weight, self.bias
    if role == "sana_head" and p > 1:  # SANA's features are (i, j, c); the op's are (c, i, j)
        channels = weight.shape[0] // (p * p)
        weight = weight.unflatten(0, (p * p, channels)).transpose(0, 1).flatten(0, 1)
        bias = None if bias is None else bias.unflatten(0, (p * p, channels)).t().flatten()
    operands = _fusable_operands(hidden_states, weight, bias)
    if operands is None:
        if role == "sana_head":
            return torch.nn.Linear.forward(self, hidden_states)  # the model's own unpatchify follows
        from ..ops.patch_embed import _unpack

        return _unpack(torch.nn.Linear.forward(self, hidden_states), p, height, width)
    out = patch_unembed(*operands, patch_size=p, height=height, width=width, backend=_backend_of(self))
    if role == "sana_head":
        # The (B, h/p, w/p, p, p, C) view SANA's unpatchify reshapes, permutes and reshapes back into `out`.
        b, c = out.shape[:2]
        out = out.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
    return out


def _call_with_grid(model, grid, *args, **kwargs):
    head = model.proj_out
    setattr(head, _GRID_ATTR, grid)
    try:
        return type(model).forward(model, *args, **kwargs)
    finally:
        delattr(head, _GRID_ATTR)


def _flux_model_forward(self, hidden_states, *args, **kwargs):
    if not (isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    _, channels, height, width = hidden_states.shape
    reason = _flux_skip_reason(self)  # a child replaced since patch() by a module that is no (adapted) Linear
    if reason is not None:
        raise TypeError(f"hidden_states is an unpacked (B, C, h, w) latent, which needs FLUX's x_embedder and "
                        f"proj_out to be nn.Linear layers, but {reason}: pass packed tokens "
                        f"(dcgen_kernels.dcgen.pack_latents)")
    p = _flux_patch_size(_adapted_layer(self.x_embedder).in_features, channels)
    out_features = _adapted_layer(self.proj_out).out_features
    if out_features % (p * p):
        raise ValueError(f"proj_out has {out_features} features, not a multiple of patch_size**2 = "
                         f"{p * p}: it cannot be unpacked to a (B, C, h, w) latent")
    # img_ids is FluxTransformer2DModel.forward's 5th argument
    img_ids = kwargs["img_ids"] if "img_ids" in kwargs else (args[3] if len(args) > 3 else None)
    if height % p or width % p:
        raise ValueError(f"hidden_states height and width must be multiples of patch_size {p}, got {height}x{width}")
    tokens = (height // p) * (width // p)
    if not isinstance(img_ids, torch.Tensor) or img_ids.shape[-2] != tokens:
        got = tuple(img_ids.shape) if isinstance(img_ids, torch.Tensor) else type(img_ids).__name__
        raise ValueError(f"img_ids must have one row per image token: a {height}x{width} latent with patch_size {p} "
                         f"has {tokens} tokens, got img_ids {got} (build them with "
                         f"dcgen_kernels.dcgen.latent_image_ids({height}, {width}, {p}))")
    reason = _unpatched_child_reason(self, "x_embedder", "proj_out")
    if reason is not None:  # the stock model on packed tokens, its output unpacked as the patched path returns it
        from ..ops.patch_embed import _pack, _unpack

        warn_unfused("FLUX's x_embedder / proj_out", reason)
        output = type(self).forward(self, _pack(hidden_states, p), *args, **kwargs)
        if isinstance(output, tuple):
            return (_unpack(output[0], p, height, width), *output[1:])
        return dataclasses.replace(output, sample=_unpack(output.sample, p, height, width))
    return _call_with_grid(self, (p, height, width), hidden_states, *args, **kwargs)


def _unpatched_child_reason(model, *names: str) -> Optional[str]:
    """Why the model's patched forward cannot hand these children the latent (grid) on this call: one is not the
    module patch() fused (a peft adapter layer wraps it, added before or after patch(); or a new module), else None."""
    for name in names:
        module = getattr(model, name)
        if _STATE_ATTR not in module.__dict__:
            hint = _adapter_fuse_hint(module) or " (dcgen_kernels.patch(model) again fuses the new one)"
            return f"{name} is {qualified_type(module)}, not the module patch() fused{hint}"
    return None


def _adapted_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer a peft adapter layer wraps, else `module`."""
    return module.get_base_layer() if is_adapter_layer(module) and hasattr(module, "get_base_layer") else module


def _adapter_fuse_hint(module: torch.nn.Module) -> str:
    """How to fuse `module` when it is a peft adapter layer (merging, and patch() again unless it wraps a module
    patch() fused), else ''."""
    if not is_adapter_layer(module):
        return ""
    return adapter_hint(module) if _STATE_ATTR in _adapted_layer(module).__dict__ else _MERGE_THEN_PATCH


def _flux_skip_reason(model) -> Optional[str]:
    """Why the model cannot take unpacked latents: an embedder or head that is neither a plain nn.Linear nor a peft
    adapter layer around one (the model's patched forward runs diffusers' code on packed tokens for that)."""
    for name in ("x_embedder", "proj_out"):
        module = getattr(model, name, None)
        if type(_adapted_layer(module)) is not torch.nn.Linear:
            return f"{name} is {qualified_type(module)}, not a plain torch.nn.Linear"
    return None


# ----------------------------------------------------------------------------------------------- SANA
def _sana_pos_embed(embed, height: int, width: int, device) -> torch.Tensor:
    """The positional embedding diffusers' PatchEmbed adds for a (height, width) latent."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    if embed.pos_embed_max_size:
        return embed.cropped_pos_embed(height, width)
    grid_h, grid_w = height // embed.patch_size, width // embed.patch_size
    if (embed.height, embed.width) == (grid_h, grid_w):
        return embed.pos_embed
    pos = get_2d_sincos_pos_embed(embed_dim=embed.pos_embed.shape[-1], grid_size=(grid_h, grid_w),
                                  base_size=embed.base_size, interpolation_scale=embed.interpolation_scale,
                                  device=device, output_type="pt")
    return pos.float().unsqueeze(0)


def _sana_embed_forward(self, latent):
    conv = self.proj
    if latent.dim() != 4 or latent.shape[-2] % self.patch_size or latent.shape[-1] % self.patch_size:
        return type(self).forward(self, latent)  # stock crops a ragged latent: keep it
    reason = not_plain({"patch_embed.proj": conv}, torch.nn.Conv2d)
    if reason is not None:
        warn_unfused("SANA's patch_embed", reason)
        return type(self).forward(self, latent)
    operands = _fusable_operands(latent, conv.weight.flatten(1), conv.bias)  # (D, C, p, p) -> (D, C*p*p)
    if operands is None:
        return type(self).forward(self, latent)
    tokens = patch_embed(*operands, patch_size=self.patch_size, backend=_backend_of(self))
    if self.layer_norm:
        tokens = self.norm(tokens)
    if self.pos_embed is None:
        return tokens
    return (tokens + _sana_pos_embed(self, latent.shape[-2], latent.shape[-1], latent.device)).to(tokens.dtype)


def _sana_model_forward(self, hidden_states, *args, **kwargs):
    p = self.config.patch_size
    if not (isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4) or hidden_states.shape[-2] % p \
            or hidden_states.shape[-1] % p:  # stock crops a ragged latent: keep it
        return type(self).forward(self, hidden_states, *args, **kwargs)
    reason = _unpatched_child_reason(self, "proj_out")
    if reason is not None:  # stock's head and unpatchify
        warn_unfused("SANA's proj_out", reason)
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return _call_with_grid(self, (p, hidden_states.shape[-2], hidden_states.shape[-1]), hidden_states, *args,
                           **kwargs)


def _sana_embed_skip_reason(embed, model) -> Optional[str]:
    from diffusers.models.embeddings import PatchEmbed

    if type(embed) is not PatchEmbed:
        return f"patch_embed is {qualified_type(embed)}, not diffusers' PatchEmbed"
    conv = embed.proj
    p = embed.patch_size
    if p not in PATCH_SIZES:
        return f"patch size {p} (the fused op takes {PATCH_SIZES})"
    if type(conv) is not torch.nn.Conv2d:
        return f"its proj is {qualified_type(conv)}, not a plain torch.nn.Conv2d{_adapter_fuse_hint(conv)}"
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((p, p), (p, p), (0, 0), (1, 1), 1):
        return "its conv is not a p x p, stride p, unpadded, ungrouped patch projection"
    if not embed.flatten:
        return "it does not flatten to tokens"
    if p != model.config.patch_size:
        return f"its patch size {p} differs from config.patch_size {model.config.patch_size}"
    return None


def _sana_head_skip_reason(model) -> Optional[str]:
    head, p = model.proj_out, model.config.patch_size
    if type(head) is not torch.nn.Linear:
        return f"proj_out is {qualified_type(head)}, not a plain torch.nn.Linear{_adapter_fuse_hint(head)}"
    if p not in PATCH_SIZES:
        return f"config.patch_size {p} (the fused op takes {PATCH_SIZES})"
    if head.out_features % (p * p):
        return f"proj_out's {head.out_features} features are not a multiple of patch_size**2 = {p * p}"
    return None


# ----------------------------------------------------------------------------------------------- entry points
def _model_classes() -> dict:
    try:
        from diffusers import FluxTransformer2DModel, SanaTransformer2DModel
    except ImportError:
        return {}
    return {FluxTransformer2DModel: "flux", SanaTransformer2DModel: "sana"}


def _patch_flux(model, backend: str):
    reason = _flux_skip_reason(model)
    if reason is None:
        for name, forward, role in (("x_embedder", _flux_embed_forward, "flux_embed"),
                                    ("proj_out", _head_forward, "flux_head")):
            child = getattr(model, name)
            if not is_adapter_layer(child):
                _install(child, forward, role, backend)
            else:  # the model still takes unpacked latents: on packed tokens through diffusers' code, warned per call
                setattr(child, _SKIP_ATTR, f"{name} is {qualified_type(child)}, a peft adapter layer"
                                           f"{_adapter_fuse_hint(child)}")
        _install(model, _flux_model_forward, "flux_model", backend)
    return type(model).__name__, reason


def _patch_sana(model, backend: str):
    embed_reason = _sana_embed_skip_reason(model.patch_embed, model)
    head_reason = _sana_head_skip_reason(model)
    if embed_reason and head_reason:
        return type(model).__name__, f"patch_embed: {embed_reason}; proj_out: {head_reason}"
    for child, reason, forward, role in ((model.patch_embed, embed_reason, _sana_embed_forward, "sana_embed"),
                                         (model.proj_out, head_reason, _head_forward, "sana_head")):
        if reason is None:
            _install(child, forward, role, backend)
        elif _STATE_ATTR not in child.__dict__:
            setattr(child, _SKIP_ATTR, reason)  # reported (and dropped) when patch() reaches the child
    if head_reason is not None:
        return None  # the model's forward stays stock; its embedder reports itself
    _install(model, _sana_model_forward, "sana_model", backend)
    return type(model).__name__, None


def patch_module(module: torch.nn.Module, backend: str):
    """(replaced class name, reason it was skipped or None) for a module this family handles, else None.

    The model itself installs its embedder and head; those report themselves when patch() reaches them.
    """
    skip_reason = module.__dict__.pop(_SKIP_ATTR, None)
    if skip_reason is not None:
        return type(module).__name__, skip_reason
    state = module.__dict__.get(_STATE_ATTR)
    if state is not None and state["role"] not in ("flux_model", "sana_model"):
        state["backend"] = backend
        return type(module).__name__, None
    family = _model_classes().get(type(module))
    if family == "flux":
        return _patch_flux(module, backend)
    if family == "sana":
        return _patch_sana(module, backend)
    return None


def unpatch_module(module: torch.nn.Module) -> bool:
    if _STATE_ATTR not in module.__dict__:
        return False
    graphed = cuda_graph.disable(module)  # a CUDA-graph wrapper around our forward: unwrap it first,
    reset_own_forward(module)
    delattr(module, _STATE_ATTR)
    if graphed:  # then wrap the stock forward again (unpatch_latent_io on a patch(cuda_graph=True) model)
        cuda_graph.enable(module)
    return True


def patch_latent_io(model: torch.nn.Module, backend: str = "auto") -> list:
    """Patch only this family in `model` (the rest stays stock); returns the names of the modules replaced.

    For training through the fused embedder / head without touching the blocks (whose backward would otherwise
    be the reference vjp). `unpatch_latent_io` reverts it; `dcgen_kernels.unpatch` does too.
    """
    _backend.check_backend_name(backend)
    replaced = []
    for name, module in model.named_modules():
        result = patch_module(module, backend)
        if result is not None and result[1] is None:
            replaced.append(name)
    return replaced


def unpatch_latent_io(model: torch.nn.Module) -> None:
    for module in model.modules():
        unpatch_module(module)


def takes_unpacked_latents(module: torch.nn.Module) -> bool:
    """Whether `module` (a FLUX model or its x_embedder) is patched to take unpacked (B, C, h, w) latents."""
    state = module.__dict__.get(_STATE_ATTR)
    return state is not None and state["role"] in ("flux_model", "flux_embed")
