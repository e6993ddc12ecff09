"""One FLUX transformer step (FluxTransformer2DModel.forward): stock diffusers eager vs dcgen_kernels.patch.

Real mode: the FLUX.1-dev 12B config with random bf16 weights built directly on the GPU (latency does not
depend on weight values; nothing is downloaded). Tiny mode: a 1+1-block fp32 model on the CPU.
Both variants run on the same model object and the same inputs in the same process: stock first, then
patch(model) -> time -> unpatch(model).
"""

from __future__ import annotations

import dataclasses

import torch


from .common import (ANCHOR_LABEL, REL_L2_TOL, build_module, error_record, flux_ids, noise_floor_tolerance,
                     STEP_VARIANTS, record_patched_variants, reference_noise_floor)
from .timing import time_ms

FLUX_DEV_12B = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(16, 24, 24))


@dataclasses.dataclass(frozen=True)
class Config:
    model: dict
    dtype: torch.dtype
    text_tokens: int
    sizes: tuple  # (image tokens, warm-up calls, timed calls); < 38 s on an H100 (2026-11-27, with attention)
    weights: str


REAL = Config(FLUX_DEV_12B, torch.bfloat16, 512, ((4096, 2, 5), (16384, 1, 3)),
              "random (diffusers' default init, built on the GPU in bf16); latency does not depend on weight values")
TINY = Config(FLUX_TINY, torch.float32, 16, ((64, 1, 3),), "random (diffusers' default init), fp32 on the CPU")


def build_model(cfg: Config, device: torch.device):
    """Seeded parameters created on `device` in cfg.dtype: 12B fp32 parameters on the host would take minutes."""
    from diffusers import FluxTransformer2DModel

    return build_module(lambda: FluxTransformer2DModel(**cfg.model), device, cfg.dtype)


def make_inputs(cfg: Config, image_tokens: int, device: torch.device) -> dict:
    m, dtype = cfg.model, cfg.dtype
    g = torch.Generator(device="cpu").manual_seed(image_tokens)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    txt_ids, img_ids = flux_ids(cfg.text_tokens, image_tokens, device)
    return dict(
        hidden_states=randn(1, image_tokens, m["in_channels"]),
        encoder_hidden_states=randn(1, cfg.text_tokens, m["joint_attention_dim"]),
        pooled_projections=randn(1, m["pooled_projection_dim"]),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )


def run(device: torch.device, tiny: bool, anchors: dict, progress=None) -> dict:
    """anchors: the anchor file's "flux12b_step_ms_by_image_tokens" block (or None). progress(partial) after every
    size."""
    cfg = TINY if tiny else REAL
    result = {"config": {"model": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model.items()},
                         "dtype": str(cfg.dtype).removeprefix("torch."), "device": str(device), "batch": 1,
                         "text_tokens": cfg.text_tokens, "weights": cfg.weights},
              "sizes": {}}
    model = build_model(cfg, device)
    try:
        for image_tokens, warmup, iters in cfg.sizes:
            rec = result["sizes"][str(image_tokens)] = {"warmup": warmup, "iters": iters}
            try:
                x = make_inputs(cfg, image_tokens, device)
                step = lambda: model(**x)[0]  # noqa: E731
                with torch.no_grad():
                    stock_out = step()
                    rec["stock"] = {"ms": time_ms(step, device, warmup, iters)}
                    anchor = (anchors or {}).get(str(image_tokens))
                    if anchor:
                        rec["stock"][ANCHOR_LABEL] = anchor
                    if "noise_floor" not in result:  # first size only: the fp32 reference attention is costly
                        result["noise_floor"] = {"image_tokens": image_tokens,
                                                 **reference_noise_floor(model, step, stock_out)}
                    tolerance = noise_floor_tolerance(result["noise_floor"], REL_L2_TOL)
                    record_patched_variants(rec, model, step, device, warmup, iters, stock_out, tolerance,
                                            STEP_VARIANTS)
            except Exception as err:  # noqa: BLE001
                rec.update(error_record(err))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if progress:
                progress(result)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result
