"""DC-Gen conversion: replace a pretrained transformer's latent embedder and output head, keep every block.

DC-Gen moves a pretrained text-to-image transformer into a deeply compressed latent space (e.g. DC-AE f32c32 or
DC-AE-1.5 f64c128) by swapping only the two modules that touch the latent channels: the embedder (latent patch
-> hidden) and the output head (hidden -> latent patch). Everything else (blocks, norms, time/text embeddings,
RoPE) is inherited and left bit-for-bit untouched. The new layers start Xavier-uniform with zero bias, as in the
DC-Gen reference code, and are then trained by embedding alignment, output-head alignment and LoRA.

Conventions per model family (what `convert` writes into the config, so `save_pretrained` / `from_pretrained`
rebuild the same architecture):

* ``FluxTransformer2DModel`` works on tokens: patchifying is the pipeline's job (base FLUX: 16 channels packed
  2x2 -> ``in_channels=64``, config ``patch_size=1``). `convert` keeps that convention: ``x_embedder =
  Linear(latent_channels * p**2, inner_dim)``, ``proj_out = Linear(inner_dim, latent_channels * p**2)``, config
  ``in_channels = out_channels = latent_channels * p**2`` and ``patch_size = 1``. Feed it
  ``pack_latents(latents, p)`` with ``img_ids = latent_image_ids(h, w, p)`` and undo with ``unpack_latents``.
* ``SanaTransformer2DModel`` patchifies itself: ``patch_embed`` becomes a new ``PatchEmbed`` (``Conv2d(
  latent_channels, inner_dim, kernel=p, stride=p)``, rebuilt with the model's own ``sample_size`` /
  ``interpolation_scale`` so its non-persistent sin-cos pos-embed, if any, matches what ``from_pretrained``
  builds) and ``proj_out = Linear(inner_dim, p**2 * latent_channels)``; config ``in_channels = out_channels =
  latent_channels``, ``patch_size = p``. ``sample_size`` is left as it was.

Xavier bound: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), fan_in / fan_out of the layer seen as a linear map
on flattened patches (for the SANA conv: fan_in = latent_channels * p**2, fan_out = inner_dim; the DiT/PixArt/
SANA convention). For p = 1 this is exactly ``nn.init.xavier_uniform_``.

Calling `convert` twice: every call installs freshly initialised layers, even when the model already has the
requested shape. That is deliberate: two latent spaces can have the same shape (FLUX's packed 16x2x2 = 64 and a
64-channel 1x1 autoencoder), so a shape match says nothing about whether the current embedder fits the new
latent space, and silently keeping it would be worse than re-drawing it. The result is otherwise idempotent:
the same config, the same untouched parameters, and (for the same torch RNG state) the same new weights as a
single call. To load an already converted, trained model use ``from_pretrained``, not `convert`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["convert", "pack_latents", "unpack_latents", "latent_image_ids", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = ("FluxTransformer2DModel", "SanaTransformer2DModel")


# ----------------------------------------------------------------------------------------------- validation
def _check_positive_int(name: str, value: object) -> int:
    # bool is an int subclass: convert(model, True) is a bug, not latent_channels=1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _check_latents(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _family(transformer: object) -> str:
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    if isinstance(transformer, SanaTransformer2DModel):
        return "sana"
    raise TypeError(f"dcgen.convert supports {', '.join(SUPPORTED_MODELS)} (diffusers), "
                    f"got {type(transformer).__module__}.{type(transformer).__qualname__}")


def _existing(transformer: nn.Module, name: str, cls: type) -> nn.Module:
    module = getattr(transformer, name, None)
    if not isinstance(module, cls):
        raise TypeError(f"{type(transformer).__name__}.{name} must be a plain {cls.__name__} to be replaced, got "
                        f"{type(module).__module__}.{type(module).__qualname__}; convert the base model before "
                        f"quantising it or adding adapters")
    return module


# ----------------------------------------------------------------------------------------------- init
def _xavier_uniform_zero_bias_(layer: nn.Module, fan_in: int, fan_out: int, dtype: torch.dtype) -> nn.Module:
    """Xavier-uniform weight (bound from the given fans), zero bias; drawn in fp32, then cast to `dtype`.

    Drawing in fp32 makes the values independent of the target dtype (the same seed gives the same weights,
    rounded, in bf16 / fp16 / fp32).
    """
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer.to(dtype=dtype)


def _new_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=like.bias is not None,
                      device=like.weight.device, dtype=torch.float32)
    return _xavier_uniform_zero_bias_(layer, in_features, out_features, like.weight.dtype)


# ----------------------------------------------------------------------------------------------- convert
def _update_config(transformer: nn.Module, **values: int) -> None:
    """Write `values` into the config and drop them from `_use_default_values`.

    diffusers records in `_use_default_values` the __init__ arguments that were never passed (e.g. FLUX's
    `out_channels=None`); `from_config(model.config)` then ignores those keys and falls back to the class default,
    which would silently rebuild the old head. The keys written here are explicit, so they must not stay there.
    """
    transformer.register_to_config(**values)
    defaults = transformer.config.get("_use_default_values")
    if defaults:
        transformer.register_to_config(_use_default_values=[k for k in defaults if k not in values])


def _convert_flux(transformer: nn.Module, latent_channels: int, patch_size: int) -> None:
    old_in = _existing(transformer, "x_embedder", nn.Linear)
    old_out = _existing(transformer, "proj_out", nn.Linear)
    features = latent_channels * patch_size * patch_size
    inner_dim = old_in.out_features
    embed, head = _new_linear(features, inner_dim, old_in), _new_linear(inner_dim, features, old_out)
    transformer.x_embedder, transformer.proj_out = embed, head  # both built first: a failure changes nothing
    transformer.out_channels = features  # the attribute __init__ derives from the config
    _update_config(transformer, in_channels=features, out_channels=features, patch_size=1)


def _convert_sana(transformer: nn.Module, latent_channels: int, patch_size: int) -> None:
    from diffusers.models.embeddings import PatchEmbed

    old_embed = _existing(transformer, "patch_embed", PatchEmbed)
    old_out = _existing(transformer, "proj_out", nn.Linear)
    old_conv = old_embed.proj
    inner_dim = old_conv.out_channels
    config = transformer.config
    sample_size = config.sample_size
    if sample_size < patch_size:
        raise ValueError(f"patch_size ({patch_size}) must not exceed the model's config.sample_size ({sample_size})")
    interpolation_scale = config.interpolation_scale
    # Same constructor call as SanaTransformer2DModel.__init__, so from_pretrained rebuilds this exact module
    # (including the non-persistent sin-cos pos_embed buffer when interpolation_scale is set).
    embed = PatchEmbed(
        height=sample_size, width=sample_size, patch_size=patch_size, in_channels=latent_channels,
        embed_dim=inner_dim, interpolation_scale=interpolation_scale,
        pos_embed_type="sincos" if interpolation_scale is not None else None,
    ).to(device=old_conv.weight.device)
    embed.proj.to(dtype=torch.float32)
    _xavier_uniform_zero_bias_(embed.proj, latent_channels * patch_size * patch_size, inner_dim,
                               old_conv.weight.dtype)
    if embed.pos_embed is not None and old_embed.pos_embed is not None:
        embed.pos_embed = embed.pos_embed.to(dtype=old_embed.pos_embed.dtype)
    head = _new_linear(inner_dim, patch_size * patch_size * latent_channels, old_out)
    transformer.patch_embed, transformer.proj_out = embed, head  # both built first: a failure changes nothing
    _update_config(transformer, in_channels=latent_channels, out_channels=latent_channels, patch_size=patch_size)


def convert(transformer: nn.Module, latent_channels: int, patch_size: int = 1) -> nn.Module:
    """Give `transformer` a fresh embedder and output head for a `latent_channels`-channel latent, in place.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` or ``SanaTransformer2DModel`` (not quantised, no
            adapters on the embedder / head).
        latent_channels: channels of the new autoencoder's latent (32 for DC-AE f32c32, 128 for f64c128).
        patch_size: side of the square latent patch that becomes one token (1 for DC-Gen).

    Returns the same module. The new layers are Xavier-uniform with zero bias, in the dtype and on the device of
    the layers they replace, and trainable; nothing else in the model changes. Every call re-initialises the
    new layers (see the module docstring). The config is updated so ``save_pretrained`` / ``from_pretrained``
    round-trip the converted architecture.
    """
    family = _family(transformer)
    latent_channels = _check_positive_int("latent_channels", latent_channels)
    patch_size = _check_positive_int("patch_size", patch_size)
    if family == "flux":
        _convert_flux(transformer, latent_channels, patch_size)
    else:
        _convert_sana(transformer, latent_channels, patch_size)
    return transformer


# ----------------------------------------------------------------------------------------------- pipeline side
def _check_grid(height: int, width: int, patch_size: int) -> None:
    if height % patch_size or width % patch_size:
        raise ValueError(f"latent height and width must be multiples of patch_size ({patch_size}), "
                         f"got height={height}, width={width}")


def pack_latents(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, (h/p)*(w/p), C*p*p) FLUX tokens.

    Tokens are row-major over the (h/p, w/p) grid; feature index = c*p*p + i*p + j for pixel (i, j) of the patch
    (for p = 2 exactly FluxPipeline._pack_latents).
    """
    _check_latents("latents", latents, 4)
    patch_size = _check_positive_int("patch_size", patch_size)
    b, c, h, w = latents.shape
    _check_grid(h, w, patch_size)
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, (h/p)*(w/p), C*p*p) -> (B, C, h, w); `height` / `width` are latent sizes."""
    _check_latents("tokens", tokens, 3)
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    patch_size = _check_positive_int("patch_size", patch_size)
    _check_grid(height, width, patch_size)
    p = patch_size
    b, n, features = tokens.shape
    if n != (height // p) * (width // p):
        raise ValueError(f"tokens has {n} tokens but a {height}x{width} latent with patch_size {p} has "
                         f"{(height // p) * (width // p)}")
    if features % (p * p):
        raise ValueError(f"tokens feature size ({features}) must be a multiple of patch_size**2 ({p * p})")
    x = tokens.reshape(b, height // p, width // p, features // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // (p * p), height, width)


def latent_image_ids(height: int, width: int, patch_size: int = 1, device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX RoPE position ids for the image tokens of a (height, width) latent: ((h/p)*(w/p), 3).

    Column 0 is 0 (image), column 1 the token row, column 2 the token column, row-major over the (h/p, w/p)
    token grid (as FluxPipeline._prepare_latent_image_ids on that grid). `height` / `width` are latent sizes.
    """
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    patch_size = _check_positive_int("patch_size", patch_size)
    _check_grid(height, width, patch_size)
    gh, gw = height // patch_size, width // patch_size
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.to(device=device, dtype=dtype)
