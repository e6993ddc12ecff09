"""dcgen_kernels: fused kernels for diffusion transformers in DC-Gen's deeply compressed latent space.

    import dcgen_kernels
    dcgen_kernels.patch(transformer)        # swap hot modules for fused ops
    dcgen_kernels.info()                    # versions, GPU, compiled extension, backends
    dcgen_kernels.dcgen.convert(transformer, latent_channels=32)   # DC-Gen: new embedder + head
    dcgen_kernels.patch(transformer, quant="fp8")                   # also FP8 W8A8 block linears (Hopper)
    dcgen_kernels.save_quantized(transformer, "flux-fp8.safetensors")
"""

__version__ = "0.1.0"

from . import dcgen, ops, quant  # noqa: E402
from .info import info  # noqa: E402
from .patching import PatchReport, is_patched, patch, patch_report, unpatch  # noqa: E402
from .patching.quant import QuantReport, quantize  # noqa: E402
from .quant import load_quantized, save_quantized  # noqa: E402

__all__ = ["dcgen", "ops", "quant", "info", "patch", "unpatch", "is_patched", "patch_report", "PatchReport",
           "quantize", "QuantReport", "save_quantized", "load_quantized", "__version__"]
