"""Low-precision linears: FP8 W8A8 (`FP8Linear`, Hopper) and NVFP4 SVDQuant (`SVDQuantLinear`, quant/svdquant.py),
whole-model quantization (`dcgen_kernels.quantize`, patching/quant.py) and safetensors checkpoints of quantized models
(`save_quantized` / `load_quantized`)."""

from .fp8 import FP8Activation, FP8Linear
from .save import load_quantized, save_quantized
from .svdquant import SVDQuantLinear

__all__ = ["FP8Activation", "FP8Linear", "load_quantized", "save_quantized", "SVDQuantLinear"]
