"""Quantized storage that model-wide dtype casts leave alone, and the weights it can be made from."""

import torch

from ..ops._common import FLOAT_DTYPES, all_finite

_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class KeepsQuantizedDtypes(torch.nn.Module):
    """`model.to(torch.bfloat16)`, `.half()`, `.float()` cast every floating tensor of a model: FP8 codes and fp32
    scales included, which would break the quantized layers (and round the scales). The buffers named in
    QUANTIZED_STATE go through such conversions as integer views of their bytes, which dtype casts skip (a cast
    that converts integers too, as `Module.type` does, is undone for them and for integer buffers) while device
    moves, pinning and `to_empty` still apply; the rest (bias, low-rank branch) follows the model's dtype."""

    QUANTIZED_STATE: tuple = ()

    def _apply(self, fn, recurse=True):
        quantized = {id(t) for t in (getattr(self, name) for name in self.QUANTIZED_STATE) if t is not None}

        def apply(t):
            bits = t.view(_INTEGER_OF_SIZE[t.element_size()]) if id(t) in quantized else t
            out = fn(bits)
            if out.dtype != bits.dtype and not bits.is_floating_point():
                out = bits.to(out.device)  # Module.type(dtype) casts integer tensors (packed codes) too: keep them
            return out.view(t.dtype) if bits is not t else out

        return super()._apply(apply, recurse)


def check_quantizable_weight(layer: torch.nn.Module, name: str = "linear", finite: bool = True) -> None:
    """Refuse a weight the quantized layers cannot stand in for: one of another dtype than float32 / bfloat16 /
    float16 (their activations and bias are of the weight's dtype), or, with `finite` (its values are quantized),
    holding inf / NaN (a corrupt checkpoint, an overflowed update: an SVD of it fails, an FP8 row scale of inf or NaN
    turns its whole row into NaN)."""
    weight = layer.weight
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.weight has dtype {weight.dtype}; quantization takes "
                        f"{', '.join(map(str, FLOAT_DTYPES))} weights: cast the model first (e.g. "
                        f"model.to(torch.bfloat16))")
    if finite and not weight.is_meta and not all_finite(weight):
        raise ValueError(f"{name}.weight holds non-finite values (inf / NaN) and cannot be quantized; check the "
                         f"checkpoint it was loaded from")
