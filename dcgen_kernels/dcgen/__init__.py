"""DC-Gen post-training tools: move a pretrained diffusers transformer into a deeply compressed latent space.

    from dcgen_kernels import dcgen
    dcgen.convert(transformer, latent_channels=32, patch_size=1)   # fresh embedder + output head
    tokens = dcgen.pack_latents(latents, patch_size=1)              # FLUX: (B, C, h, w) -> (B, h*w/p^2, C*p^2)
    ids = dcgen.latent_image_ids(h, w, patch_size=1)                # FLUX RoPE ids on the (h/p, w/p) grid
"""

from .convert import SUPPORTED_MODELS, convert, latent_image_ids, pack_latents, unpack_latents

__all__ = ["convert", "pack_latents", "unpack_latents", "latent_image_ids", "SUPPORTED_MODELS"]
