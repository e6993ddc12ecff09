"""Safetensors checkpoints of quantized models: the whole state_dict (quantized buffers included) plus metadata
saying how to rebuild the quantized module structure on a stock model before loading it. Local files only."""

from __future__ import annotations

import collections
import json
import os

import torch

FORMAT = "dcgen_kernels.quantized/1"


def save_quantized(model: torch.nn.Module, path) -> None:
    """Write `model`'s state_dict and its quantization (format, rank, quantized layer names) to a .safetensors file.

    The model must have been quantized by `dcgen_kernels.quantize` or `patch(..., quant=...)`."""
    from safetensors.torch import save_file

    from ..patching.quant import quant_report

    _check_module(model)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent):
        raise ValueError(f"path {path!r} must name a file in an existing directory (a .safetensors file to write)")
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
    save_file(tensors, path, metadata=metadata)


def load_quantized(model: torch.nn.Module, path, *, backend: str = "auto", device=None) -> torch.nn.Module:
    """Quantize a stock model of the same architecture the way the checkpoint says, then load its tensors (strict).

    `model` supplies the architecture (its current weights are overwritten); the result equals the saved model
    bit for bit. Returns the model. The quantized layers are allocated, not computed (no SVD), and a checkpoint of
    another architecture is refused before the model changes.

    `model` may be a skeleton on the meta device (built under `torch.device("meta")`): then `device` (required)
    says where the checkpoint's tensors go, and they become the model's tensors as stored (their dtypes too), so
    the 16-bit block weights are never allocated. For a model with real weights `device` must be None or its own.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .. import _backend
    from ..patching.quant import (block_linears, check_no_adapters, check_quantizable_weights, current_quant,
                                  replace_block_linears, resolve_nvfp4_activations)

    _check_module(model)
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
    _backend.check_backend_name(backend)
    check_no_adapters(model)
    saved_layers, quant, rank = _read_metadata(path, metadata)
    layers = [name for name, *_ in block_linears(model)]
    if layers != saved_layers:
        raise ValueError(f"the checkpoint quantized {len(saved_layers)} layers, this {type(model).__name__} has "
                         f"{len(layers)} quantizable layers ({_layer_difference(saved_layers, layers)}): not the "
                         f"same architecture")
    skeleton = next(model.parameters()).device.type == "meta"
    device = _load_device(model, device, skeleton)
    if skeleton:
        _check_skeleton(model)
    # NVFP4's W4A4 / W4A16 mode as saved, not as the loading device would pick it (older files: the device's)
    activations = resolve_nvfp4_activations(metadata.get("activations", "auto"), device) if quant == "nvfp4" \
        else "fp8"
    _check_fits(model, path, quant, rank, activations)
    if skeleton:
        _cast_skeleton_to_file_dtype(model, path)
    # a float64 model (or skeleton of an fp32 file, which stays as built): refused before it changes
    check_quantizable_weights(block_linears(model), finite=False)
    replace_block_linears(model, quant, False, backend, rank, activations, empty=True)
    state = load_file(path, device=str(device))
    if skeleton and device.type == "cpu":
        # The file's CPU tensors map its pages: assigned as they are, a later write to the file would change the
        # model, and some would not be 16-byte aligned (CPU kernels then round differently). Owned copies instead.
        state = {name: tensor.clone() for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=skeleton)
    return model


def _read_metadata(path: str, metadata: dict) -> tuple:
    """(quantized layer names, quant, rank) of a file whose format says save_quantized wrote it; ValueError naming
    the file where its metadata is damaged."""
    from ..patching.quant import QUANT_CHOICES

    try:
        layers, quant, rank = json.loads(metadata["layers"]), metadata["quant"], int(metadata["rank"])
    except (KeyError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path!r}: damaged save_quantized metadata ({type(error).__name__}: {error})") from error
    if quant not in QUANT_CHOICES or not isinstance(layers, list) or rank < 0:
        raise ValueError(f"{path!r}: damaged save_quantized metadata (quant {quant!r}, rank {rank}, layers of type "
                         f"{type(layers).__name__})")
    return layers, quant, rank


def _check_module(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers FLUX / SANA transformer), got "
                        f"{type(model).__name__}")


def _load_device(model: torch.nn.Module, device, skeleton: bool) -> torch.device:
    """Where the checkpoint's tensors go: `device` for a meta skeleton (required), else the model's own device."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must be a torch.device or a device string such as 'cuda', got {device!r}") \
                from error
        if device.type == "meta":
            raise ValueError("device must be a real device to load the checkpoint onto, got 'meta'")
    if skeleton:
        if device is None:
            raise ValueError(f"this {type(model).__name__} is on the meta device: pass device= (e.g. 'cuda') to "
                             f"load the checkpoint's tensors there")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but this machine has no CUDA GPU: pass device='cpu' or load "
                             "where the GPU is")
        try:  # any other device this torch build or machine lacks: before the skeleton changes
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            reason = str(error).split(". ")[0]  # torch appends the list of every backend it has
            raise ValueError(f"device={str(device)!r} is not usable here: {reason}") from error
        return device
    own = next(model.parameters()).device
    if device is not None and (device.type, device.index or 0) != (own.type, own.index or 0):
        raise ValueError(f"device={str(device)!r} differs from the model's device {str(own)!r}: device is for meta "
                         f"skeletons; move the model first (model.to({str(device)!r})) or leave device=None")
    return own


def _check_skeleton(model: torch.nn.Module) -> None:
    """A meta skeleton gets its tensors from the file alone: refuse, before it changes, tensors no file holds
    (non-persistent buffers) or ties the file cannot restore (one tensor under two names)."""
    persistent = model.state_dict(keep_vars=True)
    missing = [name for name, _ in model.named_buffers() if name not in persistent]
    names_per_tensor = collections.Counter(id(t) for t in persistent.values())
    tied = [name for name, t in persistent.items() if names_per_tensor[id(t)] > 1]
    if missing or tied:
        what = f"buffers outside its state_dict ({', '.join(missing[:3])})" if missing \
            else f"parameters shared under several names ({', '.join(tied[:3])})"
        raise ValueError(f"load_quantized cannot fill this meta {type(model).__name__}: it has {what}, which a "
                         f"checkpoint does not restore; build it on a device instead")


def _cast_skeleton_to_file_dtype(model: torch.nn.Module, path: str) -> None:
    """Give a meta skeleton (built in the default float32) the file's 16-bit dtype before its layers are replaced,
    so the report's memory before quantization is the model's (free: nothing is allocated on meta)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        floats = {f.get_slice(key).get_dtype() for key in f.keys()} & {"BF16", "F16", "F32"}
    named = {"BF16": torch.bfloat16, "F16": torch.float16}
    sixteen_bit = [named[d] for d in floats if d in named]
    if len(sixteen_bit) == 1:  # fp32 entries are the quantized layers' scales, or the model is fp32
        torch.nn.Module.to(model, sixteen_bit[0])  # diffusers' .to() warns about fp32-kept modules it does not have


def _layer_difference(saved: list, here: list) -> str:
    """The first layers that only the checkpoint or only the model has, or that the order differs."""

    def first(names: list) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    saved_set, here_set = set(saved), set(here)
    only_saved = [name for name in saved if name not in here_set]
    only_here = [name for name in here if name not in saved_set]
    parts = ([f"only in the file: {first(only_saved)}"] if only_saved else []) + \
        ([f"only here: {first(only_here)}"] if only_here else [])
    return "; ".join(parts) or "the same layers in another order"


def _check_fits(model: torch.nn.Module, path: str, quant: str, rank: int, activations: str) -> None:
    """Refuse, before the model changes, a checkpoint whose tensors would not load strictly into it once quantized
    (names, shapes, and dtypes: quantized codes as stored, other tensors any float dtype): the quantized layers'
    tensors come from stand-ins on the meta device (nothing allocated)."""
    from safetensors import safe_open

    from ..patching.quant import _quantized_module, block_linears

    expected, quantized = {}, []
    for name, _, _, layer in block_linears(model):
        # float32 stand-ins: a float tensor's dtype does not enter its kind, and a float64 model is refused later,
        # by name, not here by the quantized layer's constructor
        has_bias, meta = layer.bias is not None, dict(device="meta", dtype=torch.float32)
        if isinstance(layer, torch.nn.Conv2d):
            stand_in = torch.nn.Conv2d(layer.in_channels, layer.out_channels, 1, bias=has_bias, **meta)
        else:
            stand_in = torch.nn.Linear(layer.in_features, layer.out_features, bias=has_bias, **meta)
        module = _quantized_module(stand_in, quant, "reference", rank, activations, empty=True)
        expected.update({f"{name}.{key}": _kind(t) for key, t in module.state_dict().items()})
        quantized.append(name + ".")
    expected.update({key: _kind(t) for key, t in model.state_dict().items() if not key.startswith(tuple(quantized))})
    with safe_open(path, framework="pt") as f:
        slices = {key: f.get_slice(key) for key in f.keys()}
        saved = {key: (tuple(part.get_shape()), _FILE_KINDS.get(part.get_dtype(), part.get_dtype()))
                 for key, part in slices.items()}
    if saved != expected:
        differ = sorted(set(saved) ^ set(expected)) or sorted(k for k in saved if saved[k] != expected[k])
        detail = ", ".join(f"{k}: {_describe(saved.get(k))} in the file, {_describe(expected.get(k))} here"
                           for k in differ[:3])
        raise ValueError(f"{path!r} does not fit this {type(model).__name__} ({len(differ)} tensors differ: "
                         f"{detail}): not the same architecture")


# A checkpoint's 16/32-bit tensors load into the model's float dtype (cast); quantized codes (FP8, packed NVFP4
# bytes) and any integer tensor only as stored.
_FILE_KINDS = {"F16": "float", "BF16": "float", "F32": "float", "F64": "float", "F8_E4M3": "float8_e4m3fn",
               "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _kind(t: torch.Tensor) -> tuple:
    """(shape, what a file's tensor must hold to load into t)."""
    exact = not t.is_floating_point() or t.dtype == torch.float8_e4m3fn
    return tuple(t.shape), str(t.dtype).removeprefix("torch.") if exact else "float"


def _describe(kind) -> str:
    return "missing" if kind is None else f"{kind[0]} {kind[1]}"
