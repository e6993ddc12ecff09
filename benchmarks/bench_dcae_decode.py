"""DC-AE decode (AutoencoderDC.decode) of a 4096^2 image from a 1x32x128x128 latent: stock vs dcgen_kernels.patch.

Two configs, random bf16 weights built directly on the GPU, B=1:
  sana_1.0           dc-ae-f32c32-sana-1.0 as diffusers' converter and the hub config define it: ResBlock stages
                     0-2, EfficientViT stages 3-5 (multi-scale linear attention with a 5x5 branch + GLUMBConv),
                     channels 128..1024, 3 decoder layers per stage, interpolate upsampling, RMSNorm + SiLU,
                     scaling factor 0.41407. This is the SANA 1.0 decoder; the target is evaluated on it.
  diffusers_default  AutoencoderDC() with its constructor defaults: f32c32 but ResBlock in every stage and
                     pixel-shuffle upsampling (no attention). The anchor decode time (727 ms) was measured on it.
Per config: stock decode, the noise floor (patch(model, backend="reference") vs stock), patched (backend auto).
The check allows max(2e-2, twice the noise floor). Tiny mode: a 4-stage fp32 decoder (head dim 32) on the CPU.
"""

from __future__ import annotations

import dataclasses

import torch


from .common import (ANCHOR_LABEL, build_module, error_record, free_device_memory,
                     noise_floor_tolerance, record_patched_variants, reference_noise_floor)
from .timing import time_ms

DECODE_TOL = 2e-2
_STAGES6 = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
DCAE_F32C32_SANA_1_0 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=_STAGES6, decoder_block_types=_STAGES6,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate", downsample_block_type="conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)
_STAGES4 = ("ResBlock",) * 2 + ("EfficientViTBlock",) * 2
DCAE_TINY = dict(
    in_channels=3, latent_channels=4, attention_head_dim=32,
    encoder_block_types=_STAGES4, decoder_block_types=_STAGES4,
    encoder_block_out_channels=(16, 32, 64, 64), decoder_block_out_channels=(16, 32, 64, 64),
    encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
    upsample_block_type="interpolate", downsample_block_type="conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)
DCAE_TINY_RESBLOCKS = dict(DCAE_TINY, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                           upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle")


@dataclasses.dataclass(frozen=True)
class Model:
    key: str
    kwargs: dict
    warmup: int
    iters: int
    anchor_key: str = ""  # in the anchor file's "autoencoder_decode_ms"


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple
    latent: tuple  # (B, C, h, w)
    dtype: torch.dtype
    weights: str


# ~1 s per SANA 1.0 decode and 0.73 s per default decode on an H100: ~20 s in all.
REAL = Config((Model("sana_1.0", DCAE_F32C32_SANA_1_0, 1, 3),
               Model("diffusers_default", {}, 1, 2, "dcae_f32c32_decode_4096px_ms")),
              (1, 32, 128, 128), torch.bfloat16,
              "random (diffusers' default init, built on the GPU in bf16); latency does not depend on them")
TINY = Config((Model("sana_1.0", DCAE_TINY, 0, 1), Model("diffusers_default", DCAE_TINY_RESBLOCKS, 0, 1)),
              (1, 4, 4, 4), torch.float32, "random (diffusers' default init), fp32 on the CPU")


def build_model(cfg: Config, model: Model, device: torch.device):
    from diffusers import AutoencoderDC

    return build_module(lambda: AutoencoderDC(**model.kwargs), device, cfg.dtype, seed=1)


def _config_value(value):
    return [_config_value(v) for v in value] if isinstance(value, (tuple, list)) else value


def run(device: torch.device, tiny: bool, anchors=None, progress=None) -> dict:
    """anchors: the anchor file's "autoencoder_decode_ms" block (or None)."""
    cfg = TINY if tiny else REAL
    b, c, h, w = cfg.latent
    models = {m.key: {k: _config_value(v) for k, v in m.kwargs.items()} or "AutoencoderDC() defaults"
              for m in cfg.models}
    result = {"config": {"latent": list(cfg.latent), "dtype": str(cfg.dtype).removeprefix("torch."),
                         "device": str(device), "weights": cfg.weights,
                         "tolerance": f"max({DECODE_TOL}, 2 x noise floor)", "models": models},
              "sizes": {}}
    for spec in cfg.models:
        rec = result["sizes"][spec.key] = {"warmup": spec.warmup, "iters": spec.iters}
        model = None
        try:
            model = build_model(cfg, spec, device)
            latent = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0)).to(device, cfg.dtype)
            rec["image"] = [h * model.spatial_compression_ratio, w * model.spatial_compression_ratio]
            decode = lambda: model.decode(latent, return_dict=False)[0]  # noqa: E731
            with torch.no_grad():
                stock_out = decode()
                rec["stock"] = {"ms": time_ms(decode, device, spec.warmup, spec.iters)}
                anchor = (anchors or {}).get(spec.anchor_key)
                if anchor:
                    rec["stock"][ANCHOR_LABEL] = anchor
                rec["noise_floor"] = reference_noise_floor(model, decode, stock_out)
                tolerance = noise_floor_tolerance(rec["noise_floor"], DECODE_TOL)
                record_patched_variants(rec, model, decode, device, spec.warmup, spec.iters, stock_out, tolerance,
                                        variants=(("patched", "auto"),))
        except Exception as err:  # noqa: BLE001
            rec.update(error_record(err))
        finally:
            del model
            free_device_memory(device)
        if progress:
            progress(result)
    return result
