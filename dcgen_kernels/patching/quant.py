"""Quantize the block linears of FLUX / SANA transformers: FP8 W8A8 (`FP8Linear`) or NVFP4 SVDQuant W4A4
(`SVDQuantLinear`).

Which layers: every nn.Linear inside a transformer block (FluxTransformerBlock, FluxSingleTransformerBlock,
SanaTransformerBlock) except the adaLN modulation linears (under the blocks' `norm*` modules): attention
projections and MLPs. Embedders, norms, adaLN, time/text embeddings and the output head stay 16-bit. SANA's
Mix-FFN is made of 1x1 convolutions run by the `glumbconv` op, not nn.Linear: it stays 16-bit.

Reversibility: with keep_original=True the replaced nn.Linear modules are kept (off the module tree, so they are
neither in state_dict nor in the reported memory) and `restore` puts them back exactly. Without it the 16-bit
weights are gone, and `restore` raises instead of silently leaving a quantized model behind.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _backend

QUANT_CHOICES = ("fp8", "nvfp4")
_ORIGINALS_ATTR = "_dcgen_quant_originals"
_REPORT_ATTR = "_dcgen_quant_report"


@dataclasses.dataclass
class QuantReport:
    quant: str
    keep_original: bool
    rank: int = 0  # SVDQuant low-rank branch ("nvfp4"); unused by "fp8"
    layers: list = dataclasses.field(default_factory=list)  # (module name, in_features, out_features, class name)
    weight_bytes_before: int = 0  # parameters + buffers of the model
    weight_bytes_after: int = 0

    def __str__(self) -> str:
        mib = 2.0**20
        ratio = self.weight_bytes_before / self.weight_bytes_after if self.weight_bytes_after else float("nan")
        classes = sorted({cls for *_, cls in self.layers})
        return (f"quantized {len(self.layers)} linears to {self.quant} ({', '.join(classes)}); model weights "
                f"{self.weight_bytes_before / mib:.1f} MiB -> {self.weight_bytes_after / mib:.1f} MiB (before/after "
                f"{ratio:.2f}); originals "
                f"{'kept (unpatch restores them)' if self.keep_original else 'dropped (unpatch raises)'}")


def check_quant_name(quant) -> None:
    if quant is not None and quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES} or None, got {quant!r}")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.dtype) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _block_classes() -> tuple:
    classes = []
    try:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        classes += [FluxTransformerBlock, FluxSingleTransformerBlock]
    except ImportError:
        pass
    try:
        from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

        classes.append(SanaTransformerBlock)
    except ImportError:
        pass
    return tuple(classes)


def block_linears(model: torch.nn.Module) -> list:
    """[(qualified name, parent module, attribute, nn.Linear)] for the linears this module quantizes."""
    blocks = _block_classes()
    found = []
    for block_name, block in model.named_modules():
        if not blocks or not isinstance(block, blocks):
            continue
        for name, module in block.named_modules():
            if type(module) is not torch.nn.Linear or any(part.startswith("norm") for part in name.split(".")):
                continue
            parent_name, _, attr = name.rpartition(".")
            found.append((f"{block_name}.{name}", block.get_submodule(parent_name) if parent_name else block, attr,
                          module))
    return found


def current_quant(model: torch.nn.Module) -> Optional[str]:
    report = getattr(model, _REPORT_ATTR, None)
    return report.quant if report is not None else None


def quant_report(model: torch.nn.Module) -> Optional[QuantReport]:
    return getattr(model, _REPORT_ATTR, None)


def _quantized_module(linear: torch.nn.Linear, quant: str, backend: str, rank: int):
    if quant == "fp8":
        from ..quant.fp8 import FP8Linear

        return FP8Linear.from_linear(linear, backend=backend)
    from ..quant.svdquant import SVDQuantLinear

    rank = min(rank, linear.in_features, linear.out_features)  # narrow layers (tiny models) cap the rank
    return SVDQuantLinear.from_linear(linear, rank=rank, activations="nvfp4", backend=backend)


def quantize(model: torch.nn.Module, quant: str = "fp8", *, keep_original: bool = False, backend: str = "auto",
             rank: int = 32) -> torch.nn.Module:
    """Replace the block linears of a FLUX / SANA transformer by quantized ones, in place; returns the model.

    quant: "fp8" (FP8Linear: E4M3 weights per output channel, activations per token; fastest on Hopper) or
    "nvfp4" (SVDQuantLinear: NVFP4 W4A4 with a rank-`rank` low-rank branch; smallest). keep_original: keep the
    16-bit linears so `restore` / `dcgen_kernels.unpatch` can undo it (costs their memory).
    Quantizing an already quantized model to the same format only switches the backend; to another format it
    needs the kept originals. Raises ValueError for an unknown format or a model without block linears.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers model), got {type(model).__name__}")
    if quant is None:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got None (use unpatch/restore to undo quantization)")
    check_quant_name(quant)
    _backend.check_backend_name(backend)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    existing = current_quant(model)
    if existing == quant:
        for name, *_ in quant_report(model).layers:
            module = model.get_submodule(name)
            if hasattr(module, "backend"):
                module.backend = backend
        return model
    if existing is not None:
        restore(model)  # raises when the originals were not kept
    linears = block_linears(model)
    if not linears:
        raise ValueError(f"dcgen_kernels.quantize found no transformer-block nn.Linear in {type(model).__name__}; "
                         f"supported: FluxTransformer2DModel and SanaTransformer2DModel blocks")
    report = QuantReport(quant=quant, keep_original=keep_original, rank=rank if quant == "nvfp4" else 0,
                         weight_bytes_before=weight_bytes(model))
    originals = {}
    for name, parent, attr, linear in linears:
        quantized = _quantized_module(linear, quant, backend, rank)
        setattr(parent, attr, quantized)
        originals[name] = linear
        report.layers.append((name, linear.in_features, linear.out_features, type(quantized).__name__))
    report.weight_bytes_after = weight_bytes(model)
    if keep_original:
        model.__dict__[_ORIGINALS_ATTR] = originals  # off the module tree: not in state_dict, .to() or memory
    model.__dict__[_REPORT_ATTR] = report
    return model


def can_restore(model: torch.nn.Module) -> bool:
    return current_quant(model) is None or _ORIGINALS_ATTR in model.__dict__


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Put the original 16-bit linears back (exact). RuntimeError when they were not kept."""
    if current_quant(model) is None:
        return model
    if not can_restore(model):
        raise RuntimeError(f"{type(model).__name__} was quantized to {current_quant(model)} without "
                           f"keep_original=True: its 16-bit weights are gone and the quantization cannot be undone. "
                           f"Reload the model, or quantize with keep_original=True to make it reversible.")
    for name, linear in model.__dict__.pop(_ORIGINALS_ATTR).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
    del model.__dict__[_REPORT_ATTR]
    return model
