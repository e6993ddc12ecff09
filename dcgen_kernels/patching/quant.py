"""Quantize the block linears of FLUX / SANA transformers: FP8 W8A8 (`FP8Linear`) or NVFP4 SVDQuant W4A4
(`SVDQuantLinear`).

Which layers: every nn.Linear inside a transformer block (FluxTransformerBlock, FluxSingleTransformerBlock,
SanaTransformerBlock) except the adaLN modulation linears (under the blocks' `norm*` modules): attention
projections and MLPs; and every 1x1 nn.Conv2d of a block (SANA's Mix-FFN `GLUMBConv`: conv_inverted and
conv_point), which is a linear over channels, wrapped in `QuantizedPointwiseConv`. Embedders, norms, adaLN,
time/text embeddings, the output head, SANA's 3x3 depthwise conv and everything outside the transformer blocks
(e.g. a DC-AE's GLUMBConvs) stay 16-bit.

Reversibility: with keep_original=True the replaced modules are kept (off the module tree, so they are neither in
state_dict nor in the reported memory) and `restore` puts them back exactly. Without it the 16-bit weights are
gone, and `restore` raises instead of silently leaving a quantized model behind.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _backend
from ..ops._common import FLOAT_DTYPES
from ..quant._storage import check_quantizable_weight

QUANT_CHOICES = ("fp8", "nvfp4")
_ORIGINALS_ATTR = "_dcgen_quant_originals"
_REPORT_ATTR = "_dcgen_quant_report"


@dataclasses.dataclass
class QuantReport:
    quant: str
    keep_original: bool
    rank: int = 0  # SVDQuant low-rank branch ("nvfp4") as asked, each layer capped at min(in, out); "fp8": 0
    activations: str = "fp8"  # what the GEMMs multiply the weights by: "fp8", "nvfp4" (W4A4) or "bf16" (W4A16)
    # (module name, in_features, out_features, class name of the quantized linear); 1x1 convs included
    layers: list = dataclasses.field(default_factory=list)
    pointwise_convs: int = 0  # how many of `layers` are 1x1 convs (SANA's Mix-FFN)
    weight_bytes_before: int = 0  # parameters + buffers of the model
    weight_bytes_after: int = 0

    def __str__(self) -> str:
        mib = 2.0**20
        ratio = self.weight_bytes_before / self.weight_bytes_after if self.weight_bytes_after else float("nan")
        classes = sorted({cls for *_, cls in self.layers})
        convs = f" ({self.pointwise_convs} of them 1x1 convs)" if self.pointwise_convs else ""
        mode = f", {'W4A4' if self.activations == 'nvfp4' else 'W4A16'}" if self.quant == "nvfp4" else ""
        return (f"quantized {len(self.layers)} linears{convs} to {self.quant} ({', '.join(classes)}{mode}); "
                f"model weights {self.weight_bytes_before / mib:.1f} MiB -> {self.weight_bytes_after / mib:.1f} MiB "
                f"(before/after {ratio:.2f}); originals "
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


def _is_pointwise_conv(module: torch.nn.Module) -> bool:
    """A Conv2d that is a linear over channels: 1x1 kernel, no grouping, stride 1, no padding."""
    return (type(module) is torch.nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1
            and module.stride == (1, 1) and module.padding in ((0, 0), "valid") and module.dilation == (1, 1))


class QuantizedPointwiseConv(torch.nn.Module):
    """A 1x1 Conv2d run as its quantized linear (`self.linear`: FP8Linear or SVDQuantLinear, weight [O, I]).

    Takes NCHW maps and unbatched (C, H, W) ones like the conv it replaces (so unpatched forwards still work);
    patched forwards hand tokens or an FP8Activation to `self.linear` directly (with its fused epilogue arguments)."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.linear = linear

    @property
    def backend(self) -> str:
        return self.linear.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.linear.backend = value

    def forward(self, x, **kwargs):
        if not isinstance(x, torch.Tensor):  # an FP8Activation
            return self.linear(x, **kwargs)
        if x.dim() == 3:
            return self.forward(x[None], **kwargs)[0]
        if x.dim() != 4:
            raise ValueError(f"x must be an NCHW map (B, C, H, W) or (C, H, W), as nn.Conv2d takes, got shape "
                             f"{tuple(x.shape)}")
        batch, channels, height, width = x.shape
        # a copy unless x is channels_last: the quantizers need channel stride 1
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels).contiguous()
        out = self.linear(tokens, **kwargs).unflatten(1, (height, width)).permute(0, 3, 1, 2)
        # the conv's output layout: channels-last for a channels-last input, else NCHW (a copy, as views may follow)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _conv_as_linear(conv: torch.nn.Conv2d) -> torch.nn.Linear:
    """An nn.Linear on the 1x1 conv's weight ([O, I, 1, 1] as [O, I], a view unless oddly strided) and bias."""
    linear = torch.nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, conv.in_channels),
                                       requires_grad=False)
    if conv.bias is not None:
        linear.bias = torch.nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def block_linears(model: torch.nn.Module) -> list:
    """[(qualified name, parent module, attribute, nn.Linear or 1x1 nn.Conv2d)] for the layers this module
    quantizes."""
    blocks = _block_classes()
    found = []
    for block_name, block in model.named_modules():
        if not blocks or not isinstance(block, blocks):
            continue
        for name, module in block.named_modules():
            quantizable = type(module) is torch.nn.Linear or _is_pointwise_conv(module)
            if not quantizable or any(part.startswith("norm") for part in name.split(".")):
                continue
            parent_name, _, attr = name.rpartition(".")
            found.append((f"{block_name}.{name}", block.get_submodule(parent_name) if parent_name else block, attr,
                          module))
    return found


def check_no_adapters(model: torch.nn.Module) -> None:
    """Quantization replaces block layers by type: inside a peft adapter layer it would quantize the base layer and
    the adapter's own small linears apart and hand them each other's activations. Raise instead."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there are no peft adapters
        return
    blocks = _block_classes()
    adapted = [f"{block_name}.{name}" for block_name, block in model.named_modules()
               if blocks and isinstance(block, blocks)
               for name, module in block.named_modules() if isinstance(module, BaseTunerLayer)]
    if adapted:
        more = f" and {len(adapted) - 3} more" if len(adapted) > 3 else ""
        raise ValueError(f"dcgen_kernels cannot quantize {type(model).__name__}: {', '.join(adapted[:3])}{more} carry "
                         f"peft adapters (LoRA). Merge them into the base weights first "
                         f"(dcgen_kernels.dcgen.merge_lora(transformer), or peft's merge_and_unload())")


def current_quant(model: torch.nn.Module) -> Optional[str]:
    report = getattr(model, _REPORT_ATTR, None)
    return report.quant if report is not None else None


def quant_report(model: torch.nn.Module) -> Optional[QuantReport]:
    return getattr(model, _REPORT_ATTR, None)


NVFP4_ACTIVATIONS = ("auto", "nvfp4", "bf16")


def resolve_nvfp4_activations(choice: Optional[str], device: torch.device) -> str:
    """None or 'auto': 4-bit activations (W4A4) only on sm_120 GPUs, where the native FP4 MMA kernel (csrc/) runs;
    elsewhere (Hopper, sm_100, CPU) W4A16, which a Hopper GPU runs near cuBLAS bf16 speed while the Triton W4A4
    kernel, dequantizing both operands in registers, ran 5-7x slower than cuBLAS bf16 on an H100 (2026-11-27)."""
    check_nvfp4_activations(choice)
    if choice not in (None, "auto"):
        return choice
    native = device.type == "cuda" and torch.cuda.get_device_capability(device) == (12, 0)
    return "nvfp4" if native else "bf16"


def check_nvfp4_activations(choice: Optional[str]) -> None:
    if choice is not None and choice not in NVFP4_ACTIVATIONS:
        raise ValueError(f"nvfp4_activations must be None or one of {NVFP4_ACTIVATIONS}, got {choice!r}")


def check_nvfp4_only_settings(quant: Optional[str], rank: Optional[int], nvfp4_activations: Optional[str]) -> None:
    """rank and nvfp4_activations shape NVFP4 layers: refused with another quant (or none) rather than ignored."""
    for name, value in (("rank", rank), ("nvfp4_activations", nvfp4_activations)):
        if value is not None and quant != "nvfp4":
            raise ValueError(f"{name} applies to quant='nvfp4' only, got {name}={value!r} with quant={quant!r}")


def check_keep_original(keep_original: Optional[bool]) -> None:
    if keep_original is not None and not isinstance(keep_original, bool):
        raise TypeError(f"keep_original must be a bool, got {keep_original!r}")


def _quantized_module(layer: torch.nn.Module, quant: str, backend: str, rank: int, activations: str,
                      empty: bool = False):
    """The quantized stand-in for an nn.Linear or 1x1 conv; `empty`: its buffers allocated, not computed (for
    load_quantized, whose checkpoint fills them: no SVD per layer)."""
    if isinstance(layer, torch.nn.Conv2d):
        return QuantizedPointwiseConv(_quantized_module(_conv_as_linear(layer), quant, backend, rank, activations,
                                                        empty))
    linear = layer
    weight, has_bias = linear.weight, linear.bias is not None
    if quant == "fp8":
        from ..quant.fp8 import FP8Linear

        if empty:
            return FP8Linear(linear.in_features, linear.out_features, has_bias, dtype=weight.dtype,
                             device=weight.device, backend=backend)
        return FP8Linear.from_linear(linear, backend=backend)
    from ..quant.svdquant import SVDQuantLinear

    rank = min(rank, linear.in_features, linear.out_features)  # narrow layers (tiny models) cap the rank
    if empty:
        dtype = weight.dtype if weight.dtype in FLOAT_DTYPES else torch.float32  # as from_linear picks it
        return SVDQuantLinear(linear.in_features, linear.out_features, rank, has_bias, activations, dtype,
                              weight.device, backend)
    return SVDQuantLinear.from_linear(linear, rank=rank, activations=activations, backend=backend)


def quantize(model: torch.nn.Module, quant: str = "fp8", *, keep_original: Optional[bool] = None,
             backend: str = "auto", rank: Optional[int] = None,
             nvfp4_activations: Optional[str] = None) -> torch.nn.Module:
    """Replace the block linears (and SANA's 1x1 Mix-FFN convs) of a FLUX / SANA transformer by quantized ones, in
    place; returns the model.

    quant: "fp8" (FP8Linear: E4M3 weights per output channel, activations per token; fastest on Hopper) or
    "nvfp4" (SVDQuantLinear: NVFP4 weights with a rank-`rank` low-rank branch, default 32; smallest).
    nvfp4_activations: "nvfp4" (W4A4), "bf16" (W4A16) or "auto" (W4A4 on sm_120 GPUs, where our native FP4 MMA
    kernel runs; else W4A16); the weights are the same either way. None (default): "auto" for a new quantization,
    the layers' own mode for a model already in NVFP4 (e.g. as load_quantized left it). rank and nvfp4_activations
    apply to "nvfp4" only (ValueError with "fp8"). keep_original: keep the 16-bit linears so `restore` /
    `dcgen_kernels.unpatch` can undo it (costs their memory; default False).
    Quantizing an already quantized model to the same format only switches the backend (and nvfp4_activations
    where given);
    a rank or keep_original given then must be the one it was quantized with (ValueError otherwise). To another
    format it needs the kept originals, and keeps them again unless keep_original=False is given. Raises ValueError
    for an unknown format, a model without block linears or block layers that carry peft adapters (merge them
    first).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers model), got {type(model).__name__}")
    if quant is None:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got None (use unpatch/restore to undo quantization)")
    check_quant_name(quant)
    _backend.check_backend_name(backend)
    check_nvfp4_activations(nvfp4_activations)
    check_nvfp4_only_settings(quant, rank, nvfp4_activations)
    check_quant_settings(model, quant, rank, keep_original)
    if current_quant(model) is None and not block_linears(model):  # checked first: a model may have no parameters
        raise ValueError(f"dcgen_kernels.quantize found no transformer-block nn.Linear in {type(model).__name__}; "
                         f"supported: FluxTransformer2DModel and SanaTransformer2DModel blocks")
    activations = resolve_nvfp4_activations(nvfp4_activations, next(model.parameters()).device)
    existing = current_quant(model)
    if existing == quant:
        report = quant_report(model)
        for name, *_ in report.layers:
            module = model.get_submodule(name)
            module = getattr(module, "linear", module)  # a 1x1 conv's quantized linear
            module.backend = backend
            if quant == "nvfp4" and nvfp4_activations is not None:
                module.activations = report.activations = activations
        return model
    check_no_adapters(model)
    switched = None
    if existing is not None:
        if keep_original is None:  # the originals were kept (checked above): a format switch keeps them again
            keep_original = quant_report(model).keep_original
        # the layers of the current format, and what the model keeps about them, for a switch that fails part way
        switched = ({name: model.get_submodule(name) for name, *_ in quant_report(model).layers},
                    {key: model.__dict__[key] for key in (_ORIGINALS_ATTR, _REPORT_ATTR)})
        _put_back_originals(model)  # kept and current: checked by check_quant_settings above
    try:
        replace_block_linears(model, quant, bool(keep_original), backend, 32 if rank is None else rank, activations)
    except BaseException:
        if switched is not None:
            layers, state = switched
            for name, layer in layers.items():
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
            model.__dict__.update(state)
        raise
    return model


def check_quant_settings(model: torch.nn.Module, quant: str, rank: Optional[int],
                         keep_original: Optional[bool]) -> None:
    """quantize()'s rank and keep_original, checked before anything changes (also by patch(), before it replaces
    modules): their types; for a model already in `quant`, that they are the ones its layers have; for one in another
    format, that its 16-bit originals were kept and still match its quantized layers; that weights to keep exist
    (not on the meta device)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    check_keep_original(keep_original)
    current = current_quant(model)
    keep = keep_original if keep_original is not None else current is not None and quant_report(model).keep_original
    if current != quant and keep and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(f"keep_original=True keeps the 16-bit weights for unpatch; {type(model).__name__} is on the "
                         f"meta device, with no weights to keep. Load its weights first, or quantize with "
                         f"keep_original=False (dcgen_kernels.load_quantized fills a meta skeleton from a file)")
    if current == quant:
        _check_requantize_settings(model, quant_report(model), rank, keep_original)
    elif current is not None:
        if not can_restore(model):
            raise ValueError(f"{type(model).__name__} is already quantized to {current} without keep_original=True; "
                             f"it cannot be re-quantized to {quant!r}. Reload the model.")
        _check_originals_match(model)


def _check_requantize_settings(model: torch.nn.Module, report: QuantReport, rank: Optional[int],
                               keep_original: Optional[bool]) -> None:
    """Quantizing to the model's format again keeps its layers: refuse a rank / keep_original they do not have
    rather than ignore it."""
    if report.quant == "nvfp4" and rank is not None and rank != report.rank:
        name, given, kept = "rank", rank, report.rank
    elif keep_original is not None and keep_original != report.keep_original:
        name, given, kept = "keep_original", keep_original, report.keep_original
    else:
        return
    how = ("restore the 16-bit layers first (dcgen_kernels.unpatch(model)), then quantize again" if can_restore(model)
           else "reload the model (its 16-bit weights are gone) and quantize it again")
    raise ValueError(f"{type(model).__name__} is already quantized to {report.quant} with {name}={kept}; quantizing "
                     f"it to {report.quant} again only switches the backend and cannot apply {name}={given}. "
                     f"To change {name}, {how}")


def check_quantizable_weights(linears: list, finite: bool = True) -> None:
    """Every layer of `block_linears` checked before any is replaced, the first unquantizable weight named
    (`finite=False`: dtypes only, for layers whose quantized values come from a file)."""
    for name, *_, layer in linears:
        check_quantizable_weight(layer, name, finite)


def replace_block_linears(model: torch.nn.Module, quant: str, keep_original: bool, backend: str, rank: int,
                          activations: str, empty: bool = False) -> None:
    """quantize()'s replacement of the block linears (at least one) of an unquantized model, its arguments checked;
    `empty`: allocate the quantized buffers without computing them (see _quantized_module)."""
    linears = block_linears(model)
    report = QuantReport(quant=quant, keep_original=keep_original, rank=rank if quant == "nvfp4" else 0,
                         activations=activations if quant == "nvfp4" else "fp8",
                         weight_bytes_before=weight_bytes(model))
    if not empty:
        check_quantizable_weights(linears)
    originals = {}
    try:
        for name, parent, attr, layer in linears:
            quantized = _quantized_module(layer, quant, backend, rank, activations, empty)
            setattr(parent, attr, quantized)
            if keep_original:
                originals[name] = (layer, _codes_checksum(quantized))
            if isinstance(quantized, QuantizedPointwiseConv):
                report.pointwise_convs += 1
                quantized = quantized.linear
            report.layers.append((name, quantized.in_features, quantized.out_features, type(quantized).__name__))
    except BaseException:  # e.g. out of memory: the layers replaced so far go back (`linears` still holds them)
        for _, parent, attr, layer in linears:
            setattr(parent, attr, layer)
        raise
    report.weight_bytes_after = weight_bytes(model)
    if keep_original:
        model.__dict__[_ORIGINALS_ATTR] = originals  # off the module tree: not in state_dict, .to() or memory
    model.__dict__[_REPORT_ATTR] = report


def can_restore(model: torch.nn.Module) -> bool:
    return current_quant(model) is None or _ORIGINALS_ATTR in model.__dict__


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Put the original 16-bit linears and 1x1 convs back (exact). RuntimeError when they were not kept."""
    if current_quant(model) is None:
        return model
    if not can_restore(model):
        raise RuntimeError(f"{type(model).__name__} was quantized to {current_quant(model)} without "
                           f"keep_original=True: its 16-bit weights are gone and the quantization cannot be undone. "
                           f"Reload the model, or quantize with keep_original=True to make it reversible.")
    _check_originals_match(model)
    _put_back_originals(model)
    return model


def _put_back_originals(model: torch.nn.Module) -> None:
    """restore() once its checks passed (quantize's format switch ran them in check_quant_settings)."""
    # a model.train()/.eval() or requires_grad_() since quantization did not reach the kept originals either: they
    # take the model's mode, and the requires_grad every other parameter has where they all agree
    flags = {p.requires_grad for p in model.parameters()}
    requires_grad = flags.pop() if len(flags) == 1 else None
    for name, (linear, _) in model.__dict__.pop(_ORIGINALS_ATTR).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = getattr(parent, attr)
        # The originals were kept off the module tree, so a model.to(device) or .to(dtype) since did not reach them:
        # follow the quantized layer's device, and the dtype its 16-bit tensors (or, without any, its block's) have.
        tensors = [*quantized.parameters(), *quantized.buffers()]
        dtype = _float_dtype(quantized) or _float_dtype(parent) or _float_dtype(model)
        linear = linear.to(device=tensors[0].device if tensors else None, dtype=dtype).train(quantized.training)
        setattr(parent, attr, linear if requires_grad is None else linear.requires_grad_(requires_grad))
    del model.__dict__[_REPORT_ATTR]


def _check_originals_match(model: torch.nn.Module) -> None:
    """RuntimeError where a quantized layer's codes or scales changed since quantization: its kept original is stale
    (tensors on the meta device, then or now, hold nothing to compare)."""
    changed = []
    for name, (_, checksum) in model.__dict__[_ORIGINALS_ATTR].items():
        current = _codes_checksum(model.get_submodule(name))
        if None not in (checksum, current) and current != checksum:
            changed.append(name)
    if changed:
        raise RuntimeError(f"{type(model).__name__}: the quantized weights of {len(changed)} layer(s) (e.g. "
                           f"{', '.join(changed[:3])}) changed since they were quantized (a load_state_dict or "
                           f"load_quantized of other weights?): the kept 16-bit originals no longer match them, and "
                           f"restoring them would silently mix two models. Reload the 16-bit model instead.")


def _codes_checksum(module: torch.nn.Module) -> Optional[tuple]:
    """Byte sums of a quantized layer's weight codes (FP8 bytes, or packed NVFP4 pairs) and of its scales: unchanged
    by device moves and dtype casts (both keep their bytes), changed by loading other weights into the layer (its
    bias and NVFP4 low-rank branch follow the model's dtype, so they are not compared). None for tensors not
    allocated yet (meta)."""
    layer = module.linear if isinstance(module, QuantizedPointwiseConv) else module
    names = (("qweight",) if hasattr(layer, "qweight") else ()) + layer.QUANTIZED_STATE  # FP8's names its weight
    tensors = [getattr(layer, name) for name in names]
    if any(t.is_meta for t in tensors):
        return None
    return tuple(int(t.reshape(-1).contiguous().view(torch.uint8).sum(dtype=torch.int64)) for t in tensors)


def _float_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter or buffer of `module` that follows model-wide dtype casts
    (not the FP8 / NVFP4 codes and fp32 scales of quantized layers), or None."""
    fixed = {id(t) for m in module.modules() for t in (getattr(m, n) for n in getattr(m, "QUANTIZED_STATE", ()))}
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point() and id(t) not in fixed:
            return t.dtype
    return None
