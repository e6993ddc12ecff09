"""Safetensors checkpoints of quantized models: the whole state_dict (quantized buffers included) plus metadata
saying how to rebuild the quantized module structure on a stock model before loading it. Local files only."""

from __future__ import annotations

import json
import os

import torch

FORMAT = "dcgen_kernels.quantized/1"


def save_quantized(model: torch.nn.Module, path) -> None:
    """Write `model`'s state_dict and its quantization (format, rank, quantized layer names) to a .safetensors file.

    The model must have been quantized by `dcgen_kernels.quantize` or `patch(..., quant=...)`."""
    from safetensors.torch import save_file

    from ..patching.quant import quant_report

    report = quant_report(model)
    if report is None:
        raise ValueError(f"{type(model).__name__} is not quantized: call dcgen_kernels.quantize(model, quant=...) "
                         f"or dcgen_kernels.patch(model, quant=...) first")
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.clone().contiguous() if key in seen else t.contiguous()  # safetensors rejects aliasing
        seen.add(key)
    metadata = {"format": FORMAT, "quant": report.quant, "rank": str(report.rank), "model": type(model).__name__,
                "activations": report.activations, "layers": json.dumps([name for name, *_ in report.layers])}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_quantized(model: torch.nn.Module, path, *, backend: str = "auto") -> torch.nn.Module:
    """Quantize a stock model of the same architecture the way the checkpoint says, then load its tensors (strict).

    `model` supplies the architecture (its current weights are overwritten); the result equals the saved model
    bit for bit. Returns the model.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..patching.quant import current_quant, quantize, quant_report

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} is not a file (a .safetensors file written by save_quantized)")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path!r} was not written by dcgen_kernels.save_quantized (format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    if current_quant(model) is not None:
        raise ValueError(f"load_quantized needs an unquantized {type(model).__name__}; this one is already "
                         f"quantized to {current_quant(model)}")
    # NVFP4's W4A4 / W4A16 mode as saved, not as the loading device would pick it (older files: the device's)
    activations = metadata.get("activations", "auto") if metadata["quant"] == "nvfp4" else "auto"
    quantize(model, metadata["quant"], backend=backend, rank=int(metadata["rank"]), nvfp4_activations=activations)
    saved_layers = json.loads(metadata["layers"])
    layers = [name for name, *_ in quant_report(model).layers]
    if layers != saved_layers:
        raise ValueError(f"the checkpoint quantized {len(saved_layers)} layers, this {type(model).__name__} has "
                         f"{len(layers)} quantizable layers: not the same architecture")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(path, device=str(device)), strict=True)
    return model
