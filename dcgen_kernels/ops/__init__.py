"""Ops: each module holds the fp32 reference, the kernel launchers and the torch.library custom op."""

from .ada_layer_norm import ada_layer_norm_modulate, ada_layer_norm_modulate_fp8, \
    ada_layer_norm_modulate_fp8_reference, ada_layer_norm_modulate_reference, gated_residual, \
    gated_residual_ada_layer_norm_modulate, gated_residual_ada_layer_norm_modulate_fp8, \
    gated_residual_ada_layer_norm_modulate_reference, gated_residual_reference
from .channel_rms_norm import channel_rms_norm, channel_rms_norm_reference
from .flux_attention import flux_attention, flux_attention_reference
from .fp8_linear import FP8Activation, dequantize_fp8, fp8_linear, fp8_linear_reference, quantize_fp8, \
    quantize_fp8_reference, quantize_weight_fp8
from .glumbconv import depthwise_glu, depthwise_glu_reference, glumbconv, glumbconv_reference
from .key_padding_attention import key_padding_attention, key_padding_attention_reference
from .nvfp4_gemm import nvfp4_gemm, nvfp4_gemm_reference, nvfp4_w4a16_gemm, nvfp4_w4a16_gemm_reference
from .nvfp4_quantize import dequantize_nvfp4, dequantize_nvfp4_reference, quantize_nvfp4, \
    quantize_nvfp4_activations, quantize_nvfp4_activations_reference, quantize_nvfp4_reference
from .patch_embed import patch_embed, patch_embed_reference, patch_unembed, patch_unembed_reference
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from .sana_linear_attention import sana_linear_attention, sana_linear_attention_reference, \
    sana_multiscale_linear_attention, sana_multiscale_linear_attention_reference

__all__ = [
    "ada_layer_norm_modulate", "ada_layer_norm_modulate_reference", "ada_layer_norm_modulate_fp8",
    "ada_layer_norm_modulate_fp8_reference", "gated_residual", "gated_residual_reference",
    "gated_residual_ada_layer_norm_modulate", "gated_residual_ada_layer_norm_modulate_fp8",
    "gated_residual_ada_layer_norm_modulate_reference",
    "FP8Activation", "dequantize_fp8", "fp8_linear", "fp8_linear_reference", "quantize_fp8", "quantize_fp8_reference",
    "quantize_weight_fp8",
    "channel_rms_norm", "channel_rms_norm_reference", "flux_attention", "flux_attention_reference", "depthwise_glu", "depthwise_glu_reference", "glumbconv",
    "glumbconv_reference", "key_padding_attention", "key_padding_attention_reference",
    "nvfp4_gemm", "nvfp4_gemm_reference", "nvfp4_w4a16_gemm", "nvfp4_w4a16_gemm_reference", "dequantize_nvfp4",
    "dequantize_nvfp4_reference", "quantize_nvfp4", "quantize_nvfp4_activations", "quantize_nvfp4_activations_reference",
    "quantize_nvfp4_reference", "patch_embed",
    "patch_embed_reference", "patch_unembed", "patch_unembed_reference", "qk_norm_rope",
    "qk_norm_rope_reference", "sana_linear_attention", "sana_linear_attention_reference",
    "sana_multiscale_linear_attention", "sana_multiscale_linear_attention_reference",
]
