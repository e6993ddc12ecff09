"""DC-Gen training stages as library functions: embedding alignment, output-head alignment, LoRA.

Stage 1, `align_embedding`: the frozen base embedder on base-AE latents (teacher) and the new embedder on
DC-AE latents of the same images (student) are compared with `embedding_alignment_loss` (teacher average-pooled
to the student's token grid, or the student nearest-upsampled to the teacher's).

Stage 2, `align_head`: backbone frozen, only the embedder (``x_embedder`` / ``patch_embed``) and ``proj_out``
trained with the flow-matching loss. FLUX (`align_head_loss`): for guidance-distilled FLUX the guided prediction
v_g = f(x_t, c, t, w) (with grad) and the unguided v_u = f(x_t, null, t, 1) (no grad) are combined into the
CFG-equivalent velocity v_hat = (v_g - (1 - w) v_u) / w, regressed onto noise - x0 (rectified flow, x_t =
(1 - t) x0 + t noise); w ~ U[1, 14]. SANA (`sana_flow_matching_loss`): the plain objective, the prediction
f(x_t, c, t) regressed onto noise - x0. Either way each sample's text is replaced by the null-prompt embeddings
with probability 0.1. A model patched by ``dcgen_kernels.patch`` trains through the fused ``patch_embed`` /
``patch_unembed`` ops (FLUX then gets unpacked latents; the loss is the same).

Stage 3, `add_lora` / `merge_lora`: peft LoRA on every attention and MLP linear of the blocks (not on the
model-level head), embedder and head trained fully; `align_head(..., train_head_only=False)` trains whatever
is trainable, then `merge_lora` folds the adapters into the base weights.

FLUX input conventions (as FluxPipeline calls the model): ``timestep`` is the flow time t in [0, 1] (the
pipeline passes ``timestep / 1000``, the model multiplies by 1000 again); ``guidance`` is the raw guidance
scale w (the model also multiplies it by 1000 internally). Models without a guidance embedding
(``config.guidance_embeds`` False) get ``guidance=None``. SANA (as SanaPipeline calls it): ``timestep`` is
1000 t times ``config.timestep_scale``; the latents stay (B, C, h, w); ``encoder_attention_mask`` marks the
prompt's real tokens.

All training runs share one loop (`_train`): AdamW over the trainable parameters, a seeded torch.Generator
for every random draw, periodic checkpoints (trainable parameters in safetensors + optimizer / RNG / history
in ``state.pt``) and exact resume. bf16 autocast is used only on CUDA; on CPU everything runs in fp32.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import all_finite
from .convert import _check_positive_int, _family, latent_image_ids, pack_latents, unpack_latents

__all__ = [
    "embedding_alignment_loss", "align_embedding", "flow_matching_pair", "guidance_distilled_velocity",
    "sample_guidance", "drop_text", "align_head_loss", "sana_flow_matching_loss", "align_head", "add_lora",
    "merge_lora", "lora_target_modules", "latest_checkpoint",
]

GUIDANCE_RANGE = (1.0, 14.0)
# Timestep shift of training, matched to what the pipelines sample at inference. Guidance-distilled FLUX (dev, Krea):
# FluxPipeline's resolution-dependent shift exp(mu), mu linear in the image token count through (256, 0.5) and
# (4096, 1.15) (FLUX.1-dev's scheduler config; extrapolated beyond, as the pipeline does); FLUX without a guidance
# embedding (schnell, whose scheduler does not shift): none. SANA: the fixed flow shift 3.0 of its scheduler.
FLUX_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))
SANA_FLOW_SHIFT = 3.0


# ----------------------------------------------------------------------------------------------- validation
def _check_tensor(name: str, t: object, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _check_grid_arg(name: str, grid: object) -> Tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"{name} must be an (h, w) pair of positive ints, got {grid!r}")
    return _check_positive_int(f"{name}[0]", grid[0]), _check_positive_int(f"{name}[1]", grid[1])


def _check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------- stage 1
def _tokens_to_map(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    b, _, d = tokens.shape
    return tokens.reshape(b, grid[0], grid[1], d).permute(0, 3, 1, 2)


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    b, d, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, d)


def embedding_alignment_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                             student_grid: Sequence[int], teacher_grid: Sequence[int],
                             mode: str = "pool") -> torch.Tensor:
    """MSE between student and teacher embedder outputs living on different token grids.

    Tokens are (B, N, D), row-major over their (h, w) grid (as `pack_latents` lays them out). ``mode="pool"``:
    the teacher is average-pooled to the student grid, MSE(student, pool(teacher)). ``mode="upsample"``: the
    student is nearest-upsampled to the teacher grid, MSE(upsample(student), teacher). The teacher grid must be
    an integer multiple of the student grid in both directions.
    """
    _check_tensor("student_tokens", student_tokens, 3)
    _check_tensor("teacher_tokens", teacher_tokens, 3)
    sh, sw = _check_grid_arg("student_grid", student_grid)
    th, tw = _check_grid_arg("teacher_grid", teacher_grid)
    if mode not in ("pool", "upsample"):
        raise ValueError(f"mode must be 'pool' or 'upsample', got {mode!r}")
    if student_tokens.shape[0] != teacher_tokens.shape[0] or student_tokens.shape[2] != teacher_tokens.shape[2]:
        raise ValueError(f"student_tokens {tuple(student_tokens.shape)} and teacher_tokens "
                         f"{tuple(teacher_tokens.shape)} must agree in batch size and hidden size")
    if student_tokens.shape[1] != sh * sw:
        raise ValueError(f"student_tokens has {student_tokens.shape[1]} tokens, student_grid {sh}x{sw} has {sh * sw}")
    if teacher_tokens.shape[1] != th * tw:
        raise ValueError(f"teacher_tokens has {teacher_tokens.shape[1]} tokens, teacher_grid {th}x{tw} has {th * tw}")
    if th % sh or tw % sw:
        raise ValueError(f"teacher_grid {th}x{tw} must be an integer multiple of student_grid {sh}x{sw}")
    kh, kw = th // sh, tw // sw
    if mode == "pool":
        pooled = F.avg_pool2d(_tokens_to_map(teacher_tokens, (th, tw)).float(), kernel_size=(kh, kw))
        return F.mse_loss(student_tokens.float(), _map_to_tokens(pooled))
    up = _tokens_to_map(student_tokens, (sh, sw)).float().repeat_interleave(kh, 2).repeat_interleave(kw, 3)
    return F.mse_loss(_map_to_tokens(up), teacher_tokens.float())


def _is_patch_embed(module: nn.Module) -> bool:
    from diffusers.models.embeddings import PatchEmbed

    return isinstance(module, PatchEmbed)


def _check_latent_channels(latents: torch.Tensor, patch_size: int, embedder: nn.Module, latents_name: str,
                           embedder_name: str) -> None:
    """Raise a ValueError naming `latents_name` when the latents' channels do not fit the embedder: a PatchEmbed
    takes its conv's in_channels, a Linear (FLUX x_embedder, patched, adapter-wrapped or not) ``channels *
    patch_size**2`` features. Other modules are left to their own forward."""
    c = latents.shape[1]
    features = getattr(embedder, "in_features", None)
    if _is_patch_embed(embedder):
        if c != embedder.proj.in_channels:
            raise ValueError(f"{latents_name} have {c} channels, {embedder_name} takes {embedder.proj.in_channels}")
    elif isinstance(features, int) and c * patch_size ** 2 != features:
        f, pp = features, patch_size ** 2
        expected = f" (expected {f // pp} channels)" if f % pp == 0 else ""
        raise ValueError(f"{latents_name} with {c} channels and patch size {patch_size} give {c * pp} features, "
                         f"{embedder_name} takes {f}{expected}")


def _embed(embedder: nn.Module, latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Tokens (B, N, D) of an embedder: SANA's PatchEmbed and a patched FLUX x_embedder take the (B, C, h, w)
    latents (the patched one gathers the packing in its GEMM), a plain Linear the packed latents."""
    from ..patching.latents import takes_unpacked_latents

    if _is_patch_embed(embedder) or takes_unpacked_latents(embedder):
        return embedder(latents)
    return embedder(pack_latents(latents, patch_size))


def align_embedding(teacher_embedder: nn.Module, student_embedder: nn.Module, teacher_latents: torch.Tensor,
                    student_latents: torch.Tensor, *, teacher_patch_size: int, student_patch_size: int,
                    steps: int, lr: float, batch_size: int, seed: int, mode: str = "pool",
                    checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0, resume: bool = True,
                    progress: bool = True) -> dict:
    """Stage 1: train `student_embedder` so its tokens match the frozen `teacher_embedder`'s.

    ``teacher_latents`` (N, Ct, ht, wt) and ``student_latents`` (N, Cs, hs, ws) are encodings of the same N
    images by the base AE and the DC-AE. Tokens: ``embedder(pack_latents(latents, patch_size))`` for a FLUX
    ``x_embedder`` (a Linear on packed patches), ``embedder(latents)`` for SANA's ``patch_embed`` (a diffusers
    PatchEmbed, whose patch size must equal the given one) and for an x_embedder patched by dcgen_kernels; the
    latents' channels must fit their embedder (C * patch_size**2 = a Linear's in_features, C = a PatchEmbed's
    in_channels), checked before training. Each step draws `batch_size` image indices (with replacement) from a
    generator seeded with `seed`; AdamW with learning rate `lr`. The teacher is frozen (requires_grad False,
    eval). Returns ``dict(history=[loss per step])``; the student is trained in place.

    Checkpoints (shared with `align_head`): with a ``checkpoint_dir``, every ``checkpoint_every`` steps and at
    the last step ``checkpoint_dir/step-XXXXXXXX/`` gets ``trainable.safetensors`` (the trained parameters) and
    ``state.pt`` (step, loss history, AdamW state, data-generator and torch RNG states, run settings). With
    ``resume=True`` a call continues from the latest one and reproduces the uninterrupted run bit for bit; a
    checkpoint written with other settings (lr, seed, batch_size, mode, patch sizes, parameter names, the data's
    shapes and sums) is refused.
    """
    _check_tensor("teacher_latents", teacher_latents, 4)
    _check_tensor("student_latents", student_latents, 4)
    if teacher_latents.shape[0] != student_latents.shape[0]:
        raise ValueError(f"teacher_latents and student_latents must hold the same images, got "
                         f"{teacher_latents.shape[0]} and {student_latents.shape[0]}")
    tp = _check_positive_int("teacher_patch_size", teacher_patch_size)
    sp = _check_positive_int("student_patch_size", student_patch_size)
    for name, embedder, lat, p in (("teacher", teacher_embedder, teacher_latents, tp),
                                   ("student", student_embedder, student_latents, sp)):
        if lat.shape[2] % p or lat.shape[3] % p:
            raise ValueError(f"{name}_latents spatial size {tuple(lat.shape[2:])} must be a multiple of "
                             f"{name}_patch_size ({p})")
        if _is_patch_embed(embedder) and embedder.patch_size != p:
            raise ValueError(f"{name}_embedder is a PatchEmbed with patch size {embedder.patch_size}, got "
                             f"{name}_patch_size {p}")
        _check_latent_channels(lat, p, embedder, f"{name}_latents", f"{name}_embedder")
    teacher_grid = (teacher_latents.shape[2] // tp, teacher_latents.shape[3] // tp)
    student_grid = (student_latents.shape[2] // sp, student_latents.shape[3] // sp)
    if teacher_grid[0] % student_grid[0] or teacher_grid[1] % student_grid[1]:
        raise ValueError(f"teacher token grid {teacher_grid} must be an integer multiple of the student's "
                         f"{student_grid}")
    if mode not in ("pool", "upsample"):
        raise ValueError(f"mode must be 'pool' or 'upsample', got {mode!r}")
    params = {n: p for n, p in student_embedder.named_parameters()}
    if not params:
        raise ValueError("student_embedder has no parameters to train")
    device = next(iter(params.values())).device
    n = teacher_latents.shape[0]

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (batch_size,), generator=generator)
        t_lat = teacher_latents[idx].to(device)
        s_lat = student_latents[idx].to(device)
        with _autocast(device):
            with torch.no_grad():
                teacher = _embed(teacher_embedder, t_lat.to(_dtype_of(teacher_embedder, t_lat)), tp)
            student = _embed(student_embedder, s_lat.to(_dtype_of(student_embedder, s_lat)), sp)
        return embedding_alignment_loss(student, teacher, student_grid, teacher_grid, mode)

    with _modes_restored_on_error(teacher_embedder, student_embedder):
        teacher_embedder.requires_grad_(False).eval()
        student_embedder.train()
        for p in params.values():
            p.requires_grad_(True)
        return _train(params, loss_fn, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
                      progress=progress, desc="align embedding",
                      meta=dict(stage="align_embedding", mode=mode, patch_sizes=[tp, sp],
                                data=data_fingerprint(teacher_latents, student_latents)))


def _dtype_of(module: nn.Module, fallback: torch.Tensor) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else fallback.dtype


# ----------------------------------------------------------------------------------------------- stage 2
def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow as FLUX uses it: x_t = (1 - t) x0 + t noise, target velocity = noise - x0.

    `t` is a scalar tensor or one value per sample (B,), broadcast over the remaining dimensions.
    """
    _check_tensor("x0", x0)
    _check_tensor("noise", noise)
    _check_tensor("t", t)
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x0.shape[0]):
        raise ValueError(f"t must be a scalar or have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    t = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1))) if t.dim() == 1 else t.to(x0.dtype)
    return (1 - t) * x0 + t * noise, noise - x0


def guidance_distilled_velocity(v_guided: torch.Tensor, v_unguided: torch.Tensor, w) -> torch.Tensor:
    """CFG-equivalent velocity recovered from a guidance-distilled model: (v_g - (1 - w) v_u) / w.

    `w` is a number or a per-sample tensor (B,) broadcast over the remaining dimensions; w must be non-zero.
    """
    _check_tensor("v_guided", v_guided)
    _check_tensor("v_unguided", v_unguided)
    if v_guided.shape != v_unguided.shape:
        raise ValueError(f"v_guided {tuple(v_guided.shape)} and v_unguided {tuple(v_unguided.shape)} differ in shape")
    if isinstance(w, torch.Tensor):
        if w.dim() > 1 or (w.dim() == 1 and w.shape[0] != v_guided.shape[0]):
            raise ValueError(f"w must be a scalar or have shape ({v_guided.shape[0]},), got {tuple(w.shape)}")
        if (w == 0).any():
            raise ValueError("w must be non-zero")
        if w.dim() == 1:
            w = w.reshape(-1, *([1] * (v_guided.dim() - 1)))
        w = w.to(v_guided.dtype)
    elif isinstance(w, bool) or not isinstance(w, (int, float)) or w == 0:
        raise ValueError(f"w must be a non-zero number or tensor, got {w!r}")
    return (v_guided - (1 - w) * v_unguided) / w


def sample_guidance(batch: int, generator: Optional[torch.Generator] = None,
                    low: float = GUIDANCE_RANGE[0], high: float = GUIDANCE_RANGE[1]) -> torch.Tensor:
    """Guidance scales w ~ U[low, high] (default U[1, 14]), shape (batch,), fp32 on the generator's device."""
    batch = _check_positive_int("batch", batch)
    if not low < high:
        raise ValueError(f"need low < high, got {low}, {high}")
    device = generator.device if generator is not None else "cpu"
    return low + (high - low) * torch.rand(batch, generator=generator, device=device)


def _one_sample(name: str, t: object, shape: torch.Size) -> torch.Tensor:
    """`t` of `shape` or (1, *shape), as (1, *shape)."""
    _check_tensor(name, t)
    if t.shape not in (shape, (1, *shape)):
        raise ValueError(f"{name} must have shape {tuple(shape)} (or with a leading 1), got {tuple(t.shape)}")
    return t.reshape(1, *shape)


def drop_text(text_embeds: torch.Tensor, pooled: torch.Tensor, null_text: torch.Tensor, null_pooled: torch.Tensor,
              p: float = 0.1, generator: Optional[torch.Generator] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace whole samples' text conditioning by the null-prompt embeddings with probability `p`.

    ``text_embeds`` (B, L, D), ``pooled`` (B, P); ``null_text`` (L, D) or (1, L, D), ``null_pooled`` (P,) or
    (1, P). Returns ``(text_embeds, pooled, dropped)`` with `dropped` the (B,) bool mask of replaced samples;
    the inputs are not modified. Draws on `generator`'s device (CPU by default).
    """
    _check_tensor("text_embeds", text_embeds, 3)
    _check_tensor("pooled", pooled, 2)
    p = _check_probability("p", p)
    b = text_embeds.shape[0]
    if pooled.shape[0] != b:
        raise ValueError(f"text_embeds and pooled must have the same batch size, got {b} and {pooled.shape[0]}")
    null_text = _one_sample("null_text", null_text, text_embeds.shape[1:])
    null_pooled = _one_sample("null_pooled", null_pooled, pooled.shape[1:])
    device = generator.device if generator is not None else "cpu"
    dropped = (torch.rand(b, generator=generator, device=device) < p).to(text_embeds.device)
    text = torch.where(dropped[:, None, None], null_text.to(text_embeds), text_embeds)
    pooled = torch.where(dropped[:, None], null_pooled.to(pooled), pooled)
    return text, pooled, dropped


def _flux_velocity(transformer: nn.Module, x_t, text, pooled, t, guidance, img_ids, txt_ids) -> torch.Tensor:
    return transformer(hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                       img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def align_head_loss(transformer: nn.Module, x0_tokens: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    pooled_projections: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, w: torch.Tensor, null_encoder_hidden_states: torch.Tensor,
                    null_pooled_projections: torch.Tensor) -> torch.Tensor:
    """Guidance-distilled flow-matching loss of a diffusers ``FluxTransformer2DModel``.

    x_t = (1 - t) x0 + t noise; v_g = f(x_t, c, t, w) with grad; v_u = f(x_t, null, t, 1) under no_grad;
    v_hat = (v_g - (1 - w) v_u) / w; loss = mean((v_hat - (noise - x0))^2). ``x0_tokens`` / ``noise`` are packed
    latents (B, N, C p^2), or, for a model patched by dcgen_kernels (fused embedder and head), the unpacked
    (B, C, h, w) latents; ``t`` (B,) in [0, 1] is passed as the model's ``timestep`` (FluxPipeline's
    ``timestep / 1000``); ``w`` (B,) as ``guidance`` (raw scale, as the pipeline passes it). A model without a
    guidance embedding (FLUX.1-schnell) is not guidance-distilled: its loss is plain flow matching,
    mean((f(x_t, c, t) - (noise - x0))^2), and ``w`` and the null embeddings are unused. The null embeddings are
    (L, D) / (P,) or batched. SANA has no guidance distillation: use `sana_flow_matching_loss`.
    """
    from ..patching.latents import takes_unpacked_latents

    if _family(transformer) != "flux":
        raise TypeError("align_head_loss supports FluxTransformer2DModel (guidance-distilled FLUX); for "
                        "SanaTransformer2DModel use sana_flow_matching_loss")
    unpacked = _check_tensor("x0_tokens", x0_tokens).dim() == 4 and takes_unpacked_latents(transformer)
    _check_tensor("x0_tokens", x0_tokens, 4 if unpacked else 3)
    _check_tensor("w", w, 1)
    b = x0_tokens.shape[0]
    if w.shape[0] != b or _check_tensor("t", t, 1).shape[0] != b:
        raise ValueError(f"t and w must have shape ({b},), got {tuple(t.shape)} and {tuple(w.shape)}")
    x_t, target = flow_matching_pair(x0_tokens, noise, t)
    dtype = next(transformer.parameters()).dtype
    null_text = null_encoder_hidden_states.reshape(-1, *encoder_hidden_states.shape[1:])
    null_text = null_text.expand(b, -1, -1) if null_text.shape[0] == 1 else null_text
    null_pooled = null_pooled_projections.reshape(-1, pooled_projections.shape[1])
    null_pooled = null_pooled.expand(b, -1) if null_pooled.shape[0] == 1 else null_pooled
    distilled = bool(getattr(transformer.config, "guidance_embeds", False))
    xin, tin = x_t.to(dtype), t.to(dtype)
    with _autocast(x0_tokens.device):
        v_g = _flux_velocity(transformer, xin, encoder_hidden_states.to(dtype), pooled_projections.to(dtype), tin,
                             w.to(dtype) if distilled else None, img_ids, txt_ids)
        if not distilled:
            return F.mse_loss(v_g.float(), target.float())
        with torch.no_grad():
            v_u = _flux_velocity(transformer, xin, null_text.to(dtype), null_pooled.to(dtype), tin,
                                 torch.ones_like(w, dtype=dtype), img_ids, txt_ids)
    v_hat = guidance_distilled_velocity(v_g.float(), v_u.float(), w.float())
    return F.mse_loss(v_hat, target.float())


def sana_flow_matching_loss(transformer: nn.Module, x0: torch.Tensor, encoder_hidden_states: torch.Tensor,
                            t: torch.Tensor, noise: torch.Tensor,
                            encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flow-matching loss of a diffusers ``SanaTransformer2DModel``: mean((f(x_t, c, t) - (noise - x0))^2).

    x_t = (1 - t) x0 + t noise with ``x0`` / ``noise`` (B, C, h, w) latents and ``t`` (B,) in [0, 1]; the model
    gets ``timestep = 1000 t * config.timestep_scale`` and the prompt's ``encoder_hidden_states`` (B, L, D) with
    its ``encoder_attention_mask`` (B, L) (1 = real token), as SanaPipeline calls it. A learned-sigma head
    (2C output channels) is cut to its first C channels, as the pipeline does.
    """
    if _family(transformer) != "sana":
        raise TypeError("sana_flow_matching_loss supports SanaTransformer2DModel; for FLUX use align_head_loss")
    _check_tensor("x0", x0, 4)
    _check_tensor("encoder_hidden_states", encoder_hidden_states, 3)
    b = x0.shape[0]
    if _check_tensor("t", t, 1).shape[0] != b or encoder_hidden_states.shape[0] != b:
        raise ValueError(f"t must have shape ({b},) and encoder_hidden_states {b} rows, got {tuple(t.shape)} and "
                         f"{tuple(encoder_hidden_states.shape)}")
    if encoder_attention_mask is not None and tuple(_check_tensor("encoder_attention_mask", encoder_attention_mask,
                                                                  2).shape) != encoder_hidden_states.shape[:2]:
        raise ValueError(f"encoder_attention_mask must have shape {tuple(encoder_hidden_states.shape[:2])}, got "
                         f"{tuple(encoder_attention_mask.shape)}")
    x_t, target = flow_matching_pair(x0, noise, t)
    dtype = next(transformer.parameters()).dtype
    timestep = t.float() * 1000 * transformer.config.timestep_scale
    with _autocast(x0.device):
        v = transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=encoder_hidden_states.to(dtype),
                        timestep=timestep.to(dtype), encoder_attention_mask=encoder_attention_mask,
                        return_dict=False)[0]
    if v.shape[1] == 2 * x0.shape[1]:
        v = v[:, :x0.shape[1]]
    return F.mse_loss(v.float(), target.float())


def flux_time_shift(image_tokens: int) -> float:
    """FluxPipeline's shift at `image_tokens` tokens: exp(mu), mu on the line through FLUX_SHIFT_POINTS."""
    image_tokens = _check_positive_int("image_tokens", image_tokens)
    (x1, y1), (x2, y2) = FLUX_SHIFT_POINTS
    return math.exp(y1 + (image_tokens - x1) * (y2 - y1) / (x2 - x1))


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): the flow-matching schedulers' shift, toward noise for s > 1 (s = 1: unchanged)."""
    shift = _check_positive_float("shift", shift)
    return shift * t / (1 + (shift - 1) * t)


def _resolve_t_shift(t_shift, default: float) -> float:
    return default if isinstance(t_shift, str) and t_shift == "auto" else _check_positive_float("t_shift", t_shift)


def _sample_t(batch: int, generator: torch.Generator, sampling: str, shift: float = 1.0) -> torch.Tensor:
    if sampling == "uniform":
        t = torch.rand(batch, generator=generator)
    else:
        t = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal(0, 1), as SD3 / FLUX training
    return shift_timesteps(t, shift)


def align_head(transformer: nn.Module, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
               pooled_projections: Optional[torch.Tensor], null_encoder_hidden_states: torch.Tensor,
               null_pooled_projections: Optional[torch.Tensor], *, patch_size: Optional[int] = None, steps: int,
               lr: float, batch_size: int, seed: int, p_drop: float = 0.1,
               guidance_range: Tuple[float, float] = GUIDANCE_RANGE, t_sampling: str = "logit_normal",
               t_shift: Union[str, float] = "auto",
               train_head_only: bool = True, encoder_attention_mask: Optional[torch.Tensor] = None,
               null_encoder_attention_mask: Optional[torch.Tensor] = None, checkpoint_dir: Optional[str] = None,
               checkpoint_every: int = 0, resume: bool = True, progress: bool = True) -> dict:
    """Stage 2 (and, with ``train_head_only=False``, stage 3): train a converted FLUX or SANA's embedder and head.

    ``latents`` (N, C, h, w) are DC-AE latents (already scaled), ``encoder_hidden_states`` (N, L, D) their
    prompts' embeddings, the null ones those of the empty prompt. Each step draws `batch_size` samples (with
    replacement), t (logit-normal or uniform, then shifted by ``t_shift``), noise, and drops text with probability
    `p_drop`, all from a generator seeded with `seed`. ``t_shift="auto"`` trains where the pipeline samples:
    guidance-distilled FLUX at FluxPipeline's shift for the latents' token count (`flux_time_shift`), schnell-like
    FLUX unshifted, SANA at its flow shift 3.0; a number fixes the shift (1 = none).

    FLUX: the guidance-distilled `align_head_loss`; ``pooled_projections`` (N, P) and ``null_pooled_projections``
    (P,) are required, w ~ U[guidance_range]; ``patch_size`` (default 1) packs the latents. SANA: the plain
    `sana_flow_matching_loss`; pooled projections must be None, ``encoder_attention_mask`` (N, L) and
    ``null_encoder_attention_mask`` (L,) default to all ones (with a warning: SanaPipeline masks
    padding), ``patch_size`` must be None or the model's.

    ``train_head_only=True`` freezes every parameter except the embedder (``x_embedder`` / ``patch_embed``) and
    ``proj_out``; ``False`` trains whatever currently has requires_grad (e.g. after `add_lora`). Returns
    ``dict(history=[loss per step])``.
    """
    if _family(transformer) == "sana":
        align, family_args = _align_head_sana, dict(encoder_attention_mask=encoder_attention_mask,
                                                    null_encoder_attention_mask=null_encoder_attention_mask)
    else:
        align, family_args = _align_head_flux, dict(guidance_range=guidance_range)
    with _modes_restored_on_error(transformer):
        return align(transformer, latents, encoder_hidden_states, pooled_projections, null_encoder_hidden_states,
                     null_pooled_projections, patch_size=patch_size, steps=steps, lr=lr, batch_size=batch_size,
                     seed=seed, p_drop=p_drop, t_sampling=t_sampling, t_shift=t_shift,
                     train_head_only=train_head_only, checkpoint_dir=checkpoint_dir,
                     checkpoint_every=checkpoint_every, resume=resume, progress=progress, **family_args)


def _align_head_flux(transformer, latents, encoder_hidden_states, pooled_projections, null_encoder_hidden_states,
                     null_pooled_projections, *, patch_size, steps, lr, batch_size, seed, p_drop, guidance_range,
                     t_sampling, t_shift, train_head_only, checkpoint_dir, checkpoint_every, resume,
                     progress) -> dict:
    from ..patching.latents import takes_unpacked_latents

    patch_size = 1 if patch_size is None else patch_size
    for name, value in (("pooled_projections", pooled_projections),
                        ("null_pooled_projections", null_pooled_projections)):
        if value is None:
            raise ValueError(f"{name} is required for FLUX")
    _check_tensor("latents", latents, 4)
    _check_tensor("encoder_hidden_states", encoder_hidden_states, 3)
    _check_tensor("pooled_projections", pooled_projections, 2)
    n, _, h, w_ = latents.shape
    if encoder_hidden_states.shape[0] != n or pooled_projections.shape[0] != n:
        raise ValueError(f"latents, encoder_hidden_states and pooled_projections must have the same number of "
                         f"samples, got {n}, {encoder_hidden_states.shape[0]}, {pooled_projections.shape[0]}")
    patch_size = _check_positive_int("patch_size", patch_size)
    _check_latent_channels(latents, patch_size, transformer.x_embedder, "latents", "the model's x_embedder")
    p_drop = _check_probability("p_drop", p_drop)
    low, high = guidance_range
    if not 0 < low < high:
        raise ValueError(f"guidance_range must be (low, high) with 0 < low < high, got {guidance_range!r}")
    if t_sampling not in ("logit_normal", "uniform"):
        raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {t_sampling!r}")
    distilled = bool(getattr(transformer.config, "guidance_embeds", False))
    t_shift = _resolve_t_shift(t_shift, flux_time_shift((h // patch_size) * (w_ // patch_size)) if distilled else 1.0)
    params = _head_training_params(transformer, transformer.x_embedder, train_head_only)
    device = next(iter(params.values())).device
    img_ids = latent_image_ids(h, w_, patch_size, device=device)
    txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=device)

    unpacked = takes_unpacked_latents(transformer)  # patched: the fused embedder / head take (B, C, h, w)

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (batch_size,), generator=generator)
        x0 = pack_latents(latents[idx].float(), patch_size)
        noise = torch.randn(x0.shape, generator=generator)
        if unpacked:  # the same draws, unpacked: patched and stock runs see the same samples
            x0, noise = latents[idx].float(), unpack_latents(noise, h, w_, patch_size)
        t = _sample_t(batch_size, generator, t_sampling, t_shift)
        w = sample_guidance(batch_size, generator, low, high)
        text, pooled, _ = drop_text(encoder_hidden_states[idx], pooled_projections[idx],
                                    null_encoder_hidden_states, null_pooled_projections, p_drop, generator)
        return align_head_loss(transformer, x0.to(device), text.to(device), pooled.to(device), img_ids, txt_ids,
                               t.to(device), noise.to(device), w.to(device), null_encoder_hidden_states.to(device),
                               null_pooled_projections.to(device))

    meta = dict(stage="align_head", p_drop=p_drop, t_sampling=t_sampling, t_shift=t_shift,
                guidance_range=[float(low), float(high)],
                patch_size=patch_size, data=data_fingerprint(latents, encoder_hidden_states, pooled_projections,
                                                             null_encoder_hidden_states, null_pooled_projections))
    return _train(params, loss_fn, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
                  progress=progress, meta=meta, desc="align head")


def _align_head_sana(transformer, latents, encoder_hidden_states, pooled_projections, null_encoder_hidden_states,
                     null_pooled_projections, *, patch_size, steps, lr, batch_size, seed, p_drop, t_sampling,
                     t_shift, train_head_only, encoder_attention_mask, null_encoder_attention_mask, checkpoint_dir,
                     checkpoint_every, resume, progress) -> dict:
    config = transformer.config
    if pooled_projections is not None or null_pooled_projections is not None:
        raise ValueError("SanaTransformer2DModel takes no pooled projections: pass None")
    if getattr(config, "guidance_embeds", False):
        raise ValueError("guidance-embedded SANA (SANA-Sprint) is not supported by align_head")
    _check_tensor("latents", latents, 4)
    text = _check_tensor("encoder_hidden_states", encoder_hidden_states, 3)
    n, _, h, w_ = latents.shape
    p = config.patch_size
    if patch_size is not None and patch_size != p:
        raise ValueError(f"patch_size {patch_size} differs from the model's config.patch_size {p}")
    _check_latent_channels(latents, p, transformer.patch_embed, "latents", "the model's patch_embed")
    if h % p or w_ % p:
        raise ValueError(f"latents spatial size {(h, w_)} must be a multiple of the patch size {p}")
    if text.shape[0] != n:
        raise ValueError(f"latents and encoder_hidden_states must have the same number of samples, got {n} and "
                         f"{text.shape[0]}")
    absent = [name for name, m in (("encoder_attention_mask", encoder_attention_mask),
                                   ("null_encoder_attention_mask", null_encoder_attention_mask)) if m is None]
    if absent:
        warnings.warn(f"align_head: no {' / '.join(absent)}: every text token counts as real, padding included "
                      "(SanaPipeline masks the padding of its prompts: pass the tokenizer's attention masks)",
                      UserWarning, stacklevel=3)
    mask = torch.ones(text.shape[:2]) if encoder_attention_mask is None else encoder_attention_mask.float()
    if tuple(mask.shape) != tuple(text.shape[:2]):
        raise ValueError(f"encoder_attention_mask must have shape {tuple(text.shape[:2])}, got {tuple(mask.shape)}")
    null_text = _check_tensor("null_encoder_hidden_states", null_encoder_hidden_states)
    null_mask = (torch.ones(text.shape[1]) if null_encoder_attention_mask is None
                 else null_encoder_attention_mask.float().reshape(-1))
    p_drop = _check_probability("p_drop", p_drop)
    if t_sampling not in ("logit_normal", "uniform"):
        raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {t_sampling!r}")
    t_shift = _resolve_t_shift(t_shift, SANA_FLOW_SHIFT)
    params = _head_training_params(transformer, transformer.patch_embed, train_head_only)
    device = next(iter(params.values())).device

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (batch_size,), generator=generator)
        x0 = latents[idx].float()
        noise = torch.randn(x0.shape, generator=generator)
        t = _sample_t(batch_size, generator, t_sampling, t_shift)
        # the attention mask rides along as the per-sample 2-D conditioning: a dropped prompt takes the null mask
        cond, cond_mask, _ = drop_text(text[idx], mask[idx], null_text, null_mask, p_drop, generator)
        return sana_flow_matching_loss(transformer, x0.to(device), cond.to(device), t.to(device), noise.to(device),
                                       cond_mask.to(device))

    meta = dict(stage="align_head", objective="flow_matching", p_drop=p_drop, t_sampling=t_sampling, t_shift=t_shift,
                data=data_fingerprint(latents, text, mask, null_text, null_mask))
    return _train(params, loss_fn, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
                  progress=progress, meta=meta, desc="align head")


# ----------------------------------------------------------------------------------------------- shared loop
_CKPT = re.compile(r"^step-(\d{8})$")
_WEIGHTS, _STATE = "trainable.safetensors", "state.pt"


@contextlib.contextmanager
def _modes_restored_on_error(*modules: nn.Module):
    """Puts the modules' train/eval modes and requires_grad flags back as they were if the block raises (a refused
    setting or checkpoint, a non-finite loss); a run that ends normally leaves the modes it trained in."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        yield
    except BaseException:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _head_training_params(transformer: nn.Module, embedder: nn.Module, train_head_only: bool
                          ) -> Dict[str, nn.Parameter]:
    """The parameters align_head trains (embedder + head alone when train_head_only); puts the model in eval mode
    (dropout off; frozen norms/embeddings behave as at inference)."""
    if train_head_only:
        transformer.requires_grad_(False)
        embedder.requires_grad_(True)
        transformer.proj_out.requires_grad_(True)
    params = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("transformer has no trainable parameters")
    transformer.eval()
    return params


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """The complete checkpoint (``step-XXXXXXXX`` folder) with the highest step in `checkpoint_dir`, or None."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return None
    best = None
    for name in os.listdir(checkpoint_dir):
        m = _CKPT.match(name)
        path = os.path.join(checkpoint_dir, name)
        if m and os.path.isfile(os.path.join(path, _WEIGHTS)) and os.path.isfile(os.path.join(path, _STATE)):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), path)
    return best[1] if best else None


def data_fingerprint(*tensors: torch.Tensor) -> list:
    """Shapes and fp64 sums of a run's training data: a resume with another latent cache or other text is refused."""
    return [[list(t.shape), round(float(t.detach().double().sum()), 6)] for t in tensors]


def _save_checkpoint(checkpoint_dir: str, step: int, params: Dict[str, nn.Parameter], optimizer, generator,
                     history, meta) -> None:
    from safetensors.torch import save_file

    final = os.path.join(checkpoint_dir, f"step-{step:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({n: p.detach().cpu().contiguous().clone() for n, p in params.items()}, os.path.join(tmp, _WEIGHTS))
    state = dict(step=step, history=list(history), meta=meta, optimizer=optimizer.state_dict(),
                 generator=generator.get_state(), torch_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(state, os.path.join(tmp, _STATE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a crash mid-save leaves only a .tmp folder, which latest_checkpoint ignores


def _load_checkpoint(path: str, params: Dict[str, nn.Parameter], optimizer, generator, meta) -> Tuple[int, list]:
    from safetensors.torch import load_file

    state = torch.load(os.path.join(path, _STATE), weights_only=True, map_location="cpu")  # GPU-written, too
    if "t_shift" in meta:  # runs from before the timestep shift trained unshifted
        state["meta"].setdefault("t_shift", 1.0)
    if state["meta"] != meta:
        differing = "; ".join(f"{key}: {state['meta'].get(key)!r} there, {meta.get(key)!r} here"
                              for key in sorted(set(state["meta"]) | set(meta), key=str)
                              if state["meta"].get(key) != meta.get(key))
        raise ValueError(f"checkpoint {path} was written by a run with other settings ({differing}): rerun with "
                         f"those, or use another checkpoint directory (--checkpoint-dir; in Python checkpoint_dir, "
                         f"or resume=False)")
    weights = load_file(os.path.join(path, _WEIGHTS))
    if set(weights) != set(params):
        raise ValueError(f"checkpoint {path} holds parameters {sorted(set(weights) ^ set(params))[:5]} that do not "
                         "match the trainable parameters of this run")
    for n, p in params.items():  # every shape before any copy: a refused checkpoint leaves the model as it was
        if weights[n].shape != p.shape:
            raise ValueError(f"checkpoint {path}: {n} has shape {tuple(weights[n].shape)}, the model "
                             f"{tuple(p.shape)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], list(state["history"])


_ADAMW_BETA1 = 0.9  # torch.optim.AdamW's default, used below


def _train(params: Dict[str, nn.Parameter], loss_fn: Callable[[torch.Generator], torch.Tensor], *, steps: int,
           lr: float, batch_size: int, seed: int, checkpoint_dir: Optional[str], checkpoint_every: int,
           resume: bool, progress: bool, meta: dict, desc: str) -> dict:
    """AdamW over `params` for `steps` steps of `loss_fn(generator)`, with checkpoint / exact resume."""
    steps = _check_positive_int("steps", steps)
    lr = _check_positive_float("lr", lr)
    if lr / (1 - _ADAMW_BETA1) > torch.finfo(torch.float32).max:  # torch's AdamW raises a bare RuntimeError then
        raise ValueError(f"lr={lr!r} is too large: AdamW's first step size lr / (1 - beta1) overflows float32")
    _check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    checkpoint_every = _check_non_negative_int("checkpoint_every", checkpoint_every)
    if checkpoint_every and not checkpoint_dir:
        raise ValueError("checkpoint_every > 0 needs a checkpoint_dir")
    low_precision = [n for n, p in params.items() if p.dtype != torch.float32]
    if low_precision:  # AdamW would lose most updates to the weights' rounding: a third of a bf16 Linear never moves
        raise ValueError(f"{desc}: the trained parameters must be float32 (bf16 autocast runs the math on a GPU), "
                         f"got {params[low_precision[0]].dtype} for {low_precision[:3]}: cast the trained modules "
                         "with .float() first")
    meta = dict(meta, lr=lr, batch_size=batch_size, seed=seed, params=sorted(params))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr)
    start, history = 0, []
    path = latest_checkpoint(checkpoint_dir) if (resume and checkpoint_dir) else None
    if path is not None:
        start, history = _load_checkpoint(path, params, optimizer, generator, meta)
        if start > steps:
            raise ValueError(f"checkpoint {path} is at step {start}, past steps={steps}")
    from tqdm.auto import tqdm

    with tqdm(total=steps, initial=start, desc=desc, disable=not progress) as bar:
        for step in range(start + 1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4g}")
            if checkpoint_dir and ((checkpoint_every and step % checkpoint_every == 0) or step == steps):
                _check_finite_params(params, desc, step)
                _save_checkpoint(checkpoint_dir, step, params, optimizer, generator, history, meta)
    if not checkpoint_dir:  # else the last step's checkpoint checked them
        _check_finite_params(params, desc, steps)
    return dict(history=history)


def _check_finite_params(params: Dict[str, nn.Parameter], desc: str, step: int) -> None:
    """Weights a step made non-finite show in the next step's loss: those of a saved or final step are checked."""
    bad = [name for name, p in params.items() if not all_finite(p)]
    if bad:
        raise FloatingPointError(f"{desc}: {len(bad)} trained parameter(s) not finite after step {step}, e.g. "
                                 f"{bad[:3]} (lr too large?)")


# ----------------------------------------------------------------------------------------------- stage 3
_FLUX_LORA = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
              r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
              r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))")
_SANA_LORA = (r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.(conv_inverted|conv_point))")


def lora_target_modules(transformer: nn.Module) -> str:
    """peft ``target_modules`` regex (full-match on module names) for the blocks' attention and MLP layers.

    FLUX: double blocks' to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, ff / ff_context linears; single blocks'
    to_q/k/v, proj_mlp, proj_out. SANA: self / cross attention projections and the GLUMBConv 1x1 convs. The
    model-level ``proj_out`` head and the embedder are never matched (they are trained fully).
    """
    return _FLUX_LORA if _family(transformer) == "flux" else _SANA_LORA


def add_lora(transformer: nn.Module, rank: int = 256, alpha: float = 256, adapter_name: str = "default"
             ) -> nn.Module:
    """Stage 3: add a peft LoRA (rank `rank`, lora_alpha `alpha`) to the blocks, in place; returns the model.

    Uses diffusers' ``PeftAdapterMixin.add_adapter``, so the model stays a plain diffusers model. Afterwards
    only the LoRA weights, the embedder (``x_embedder`` / ``patch_embed``) and the ``proj_out`` head are
    trainable. peft initialises LoRA B to zero, so the model's output is unchanged until trained.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..patching.quant import current_quant

    family = _family(transformer)
    rank = _check_positive_int("rank", rank)
    alpha = _check_positive_float("alpha", alpha)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
    # peft re-initialises an adapter of the same name (a trained LoRA B back to zero): refuse any adapter already in
    adapted = [name for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)]
    if adapted or getattr(transformer, "_hf_peft_config_loaded", False):
        raise ValueError(f"transformer already has adapters ({', '.join(adapted[:2]) or 'diffusers peft config'}); "
                         f"merge_lora it first")
    if current_quant(transformer) is not None:
        raise ValueError(f"transformer is quantized to {current_quant(transformer)}: peft cannot wrap its quantized "
                         f"linears; add the LoRA to the 16-bit model, before dcgen_kernels.quantize")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_target_modules(transformer),
                        init_lora_weights=True)
    with _modes_restored_on_error(transformer):
        transformer.requires_grad_(False)
        transformer.add_adapter(config, adapter_name=adapter_name)
    embedder = transformer.x_embedder if family == "flux" else transformer.patch_embed
    embedder.requires_grad_(True)
    transformer.proj_out.requires_grad_(True)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return transformer


def merge_lora(transformer: nn.Module) -> nn.Module:
    """Fold the LoRA adapters into the base weights and remove them (diffusers fuse_lora + unload_lora): those of
    `add_lora` / diffusers' `add_adapter` / `load_lora_adapter`, and those injected with peft directly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    _family(transformer)
    if not (getattr(transformer, "_hf_peft_config_loaded", False)
            or any(isinstance(module, BaseTunerLayer) for module in transformer.modules())):
        raise ValueError("transformer has no LoRA adapters to merge")
    transformer.fuse_lora(lora_scale=1.0)
    transformer.unload_lora()
    return transformer
