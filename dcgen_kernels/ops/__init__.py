"""Ops: each module holds the fp32 reference, the kernel launchers and the torch.library custom op."""

from .flux_attention import flux_attention, flux_attention_reference
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

__all__ = ["flux_attention", "flux_attention_reference", "qk_norm_rope", "qk_norm_rope_reference"]
