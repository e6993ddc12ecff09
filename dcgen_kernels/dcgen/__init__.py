"""DC-Gen post-training tools: move a pretrained diffusers transformer into a deeply compressed latent space.

    from dcgen_kernels import dcgen
    dcgen.convert(transformer, latent_channels=32, patch_size=1)   # fresh embedder + output head
    tokens = dcgen.pack_latents(latents, patch_size=1)              # FLUX: (B, C, h, w) -> (B, h*w/p^2, C*p^2)
    ids = dcgen.latent_image_ids(h, w, patch_size=1)                # FLUX RoPE ids on the (h/p, w/p) grid
    dcgen.align_embedding(...); dcgen.align_head(...)               # stages 1 and 2 (FLUX or SANA)
    dcgen.add_lora(transformer); ...; dcgen.merge_lora(transformer) # stage 3
"""

from .convert import SUPPORTED_MODELS, convert, latent_image_ids, pack_latents, unpack_latents
from .train import (add_lora, align_embedding, align_head, align_head_loss, drop_text, embedding_alignment_loss,
                    flow_matching_pair, guidance_distilled_velocity, latest_checkpoint, lora_target_modules, merge_lora,
                    sample_guidance, sana_flow_matching_loss)

__all__ = ["convert", "pack_latents", "unpack_latents", "latent_image_ids", "SUPPORTED_MODELS",
           "embedding_alignment_loss", "align_embedding", "flow_matching_pair", "guidance_distilled_velocity",
           "sample_guidance", "drop_text", "align_head_loss", "sana_flow_matching_loss", "align_head", "add_lora",
           "merge_lora", "lora_target_modules", "latest_checkpoint"]
