"""`patch(model)`: swap a diffusers model's hot modules for dcgen_kernels ops, per model family.

Only instances are touched (processors are per module); parameters, buffers and state_dict keep their objects,
keys and values, unless `quant=` also quantizes the block linears (patching/quant.py), which replaces those nn.Linear
modules. The Q/K/V projections of an attention are moved side by side into one buffer (each parameter a view of its
rows) so that one GEMM serves them (patching/_fused_projections.py); `unpatch` gives them their own storage back.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from .. import _backend
from . import cuda_graph as _cuda_graph, dcae, flux, latents, quant as _quant, sana
from .quant import QuantReport

logger = logging.getLogger("dcgen_kernels")

_FAMILIES = (flux, sana, dcae, latents)
_REPORT_ATTR = "_dcgen_patch_report"


@dataclasses.dataclass
class PatchReport:
    model: str
    backend: str
    replaced: list = dataclasses.field(default_factory=list)  # (module name, family, replaced class)
    skipped: list = dataclasses.field(default_factory=list)  # (module name, family, reason)
    quantization: Optional[QuantReport] = None  # which linears were quantized, weight memory before/after
    cuda_graph: bool = False  # forward captured in CUDA graphs (patching/cuda_graph.py)

    def module_label(self, name: str) -> str:
        return name or f"{self.model} (the model)"

    def __str__(self) -> str:
        lines = [f"dcgen_kernels.patch({self.model}, backend={self.backend!r}): "
                 f"{len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        counts: dict = {}
        for _, family, cls in self.replaced:
            counts[(family, cls)] = counts.get((family, cls), 0) + 1
        lines += [f"  replaced {n} x {cls} ({family})" for (family, cls), n in counts.items()]
        lines += [f"  skipped {self.module_label(name)}: {reason}" for name, _, reason in self.skipped]
        if self.quantization is not None:
            lines.append(f"  {self.quantization}")
        if self.cuda_graph:
            lines.append("  forward in CUDA graphs: captured per input signature on its first call, replayed under "
                         "torch.no_grad() / inference_mode")
        return "\n".join(lines)


def _supported_text() -> str:
    return "; ".join(family.SUPPORTED for family in _FAMILIES)


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        hint = ""
        if hasattr(model, "components"):  # a diffusers pipeline
            parts = [name for name in ("transformer", "vae") if isinstance(getattr(model, name, None), torch.nn.Module)]
            hint = f": patch its models, e.g. {', '.join(f'pipe.{name}' for name in parts) or 'pipe.transformer'}"
        raise TypeError(f"model must be a torch.nn.Module (a diffusers model), got {type(model).__name__}{hint}")


def patch(model: torch.nn.Module, *, backend: str = "auto", quant: Optional[str] = None,
          keep_original: Optional[bool] = None, rank: Optional[int] = None, nvfp4_activations: Optional[str] = None,
          cuda_graph: bool = False) -> torch.nn.Module:
    """Replace supported modules of `model` in place and return it. Idempotent; `unpatch` reverts it.

    backend: 'auto' (default), 'cuda', 'triton' or 'reference' for every replaced op.
    quant: None (leave the linears as they are), 'fp8' or 'nvfp4': also quantize the transformer blocks' linears
    (see `dcgen_kernels.quantize`); the patched FLUX / SANA blocks then feed FP8 linears activations quantized by
    the kernels that produce them. keep_original: keep the 16-bit linears so `unpatch` can restore them (default
    False: then `unpatch` of a quantized model raises). rank (default 32), nvfp4_activations: for 'nvfp4' only (see
    `dcgen_kernels.quantize`; ValueError otherwise). Re-patching a model already quantized to `quant` keeps its
    layers: a rank or keep_original other than theirs raises ValueError. Re-patching applies this call's arguments:
    cuda_graph is off unless given again.
    cuda_graph: run a FLUX / SANA transformer's forward as CUDA graphs, one per input signature (shapes, dtypes,
    arguments), captured on its first call and replayed after it; for inference (torch.no_grad) on one GPU, eager
    otherwise with a one-time warning (see patching/cuda_graph.py). Removes the host's launch overhead, which sets
    the pace of small-token steps in eager mode.
    Raises ValueError when the model has no supported module or `quant` is unknown.
    """
    _check_model(model)
    _backend.check_backend_name(backend)
    _quant.check_quant_name(quant)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if cuda_graph and not hasattr(model, "transformer_blocks"):
        raise ValueError(f"cuda_graph=True captures a FLUX / SANA transformer's forward; {type(model).__name__} has "
                         f"no transformer blocks (an autoencoder's decode is not a forward call)")
    _quant.check_nvfp4_activations(nvfp4_activations)
    _quant.check_nvfp4_only_settings(quant, rank, nvfp4_activations)
    _quant.check_keep_original(keep_original)  # also without quant, where it changes nothing (callers pass it on)
    if quant is not None:
        _quant.check_quant_settings(model, quant, rank, keep_original)
    if quant is not None and _quant.current_quant(model) != quant:
        linears = _quant.block_linears(model)
        if not linears and _quant.current_quant(model) is None:
            raise ValueError(f"dcgen_kernels.patch(quant={quant!r}) found no transformer-block nn.Linear in "
                             f"{type(model).__name__}; quantization supports FLUX and SANA transformers")
        _quant.check_no_adapters(model)
        _quant.check_quantizable_weights(linears)  # before any forward is replaced (a patched model keeps its patch)
    earlier = getattr(model, _REPORT_ATTR, None)
    _cuda_graph.disable(model)  # graphs captured before may launch modules replaced below
    report = PatchReport(model=type(model).__name__, backend=backend, cuda_graph=cuda_graph)
    try:
        _patch_modules(model, backend, report)
        if quant is not None:
            _quant.quantize(model, quant, keep_original=keep_original, backend=backend, rank=rank,
                            nvfp4_activations=nvfp4_activations)
    except BaseException:  # e.g. out of memory (quantize puts its own layers back): the forwards go back too
        if earlier is None:
            _unpatch_modules(model)
        else:  # to the earlier patch's backend and graphs
            _patch_modules(model, earlier.backend, PatchReport(model=earlier.model, backend=earlier.backend))
            _enable_cuda_graph(model, earlier.cuda_graph)
        raise
    report.quantization = _quant.quant_report(model)
    _enable_cuda_graph(model, cuda_graph)
    setattr(model, _REPORT_ATTR, report)
    logger.info("%s", report)
    return model


def _enable_cuda_graph(model: torch.nn.Module, cuda_graph: bool) -> None:
    if cuda_graph:
        _cuda_graph.enable(model, plan_inputs=sana.cuda_graph_plan_inputs(model))


def _patch_modules(model: torch.nn.Module, backend: str, report: PatchReport) -> None:
    for name, module in model.named_modules():
        for family in _FAMILIES:
            result = family.patch_module(module, backend)
            if result is None:
                continue
            cls, reason = result
            if reason is None:
                report.replaced.append((name, family.FAMILY, cls))
            else:
                report.skipped.append((name, family.FAMILY, reason))
            break
    if not report.replaced:
        skipped = "; ".join(f"{report.module_label(name)}: {reason}" for name, _, reason in report.skipped)
        detail = f" (skipped: {skipped})" if skipped else ""
        raise ValueError(f"dcgen_kernels.patch found no supported module in {type(model).__name__}{detail}. "
                         f"Supported: {_supported_text()}")


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore every module `patch` replaced; a model that was never patched is returned unchanged.

    Quantized linears are restored when `keep_original=True` was given; otherwise this raises RuntimeError and
    leaves the model as it is (the 16-bit weights are gone).
    """
    _check_model(model)
    _quant.restore(model)
    _cuda_graph.disable(model)
    _unpatch_modules(model)
    if hasattr(model, _REPORT_ATTR):
        delattr(model, _REPORT_ATTR)
    return model


def _unpatch_modules(model: torch.nn.Module) -> None:
    for module in model.modules():
        for family in _FAMILIES:
            if family.unpatch_module(module):
                break


def is_patched(model: torch.nn.Module) -> bool:
    _check_model(model)
    return getattr(model, _REPORT_ATTR, None) is not None


def patch_report(model: torch.nn.Module) -> PatchReport:
    """The report of the last `patch(model)`; raises ValueError when the model is not patched."""
    _check_model(model)
    report = getattr(model, _REPORT_ATTR, None)
    if report is None:
        raise ValueError(f"{type(model).__name__} is not patched by dcgen_kernels")
    return report
