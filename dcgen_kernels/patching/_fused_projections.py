"""One GEMM for the linears that read the same input (the Q/K/V projections of FLUX's, SANA's and DC-AE's
attentions, SANA's cross-attention K/V), without a second copy of their weights.

patch() puts such a group's weights (and biases) side by side in one new buffer and rebinds each parameter's `.data`
to a view of its rows: the parameter objects, their values and the state_dict keys stay as they were, and the views
do not overlap (safetensors saves them; torch.save keeps one storage). A call then reads the group as one
(sum of out_features, in_features) matrix. One GEMM is faster than three narrow ones: on an H100 the 16384 x 2240
x 2240 projections of SANA-1.6B at a 128x128 latent ran at ~690 TFLOP/s (run J's kernel profile), its GEMMs of
2*5600 outputs at ~740.

Something that gives a parameter its own tensor again (`module.to(...)`, assigning `.data`) is seen on the next call,
which puts the group side by side again (one copy) where each weight and bias still owns its whole storage: weights
tied to other modules, made views of other tensors or sharing their storage with other tensors (warned once) are
never moved. Until then, and with grad enabled, under torch.compile or during a CUDA-graph capture, the linears run
one by one as modules. `unpatch` gives each parameter its own storage back. On a GPU the storages a placement
frees stay in torch's caching allocator (reused by later allocations, released to the device before an allocation
would fail).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _backend
from ._instance import not_plain

__all__ = ["place_side_by_side", "project", "project_concatenated", "separate"]


def _strided(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and not t.is_meta


def _owns_storage(t: torch.Tensor) -> bool:
    if not (_strided(t) and t.is_contiguous()):
        return False
    storage = t.untyped_storage()
    return t.data_ptr() == storage.data_ptr() and t.numel() * t.element_size() == storage.nbytes()


def _shares_storage(t: torch.Tensor) -> bool:
    """Whether another tensor holds t's storage too: a state_dict kept elsewhere, another model's parameter loaded
    with assign=True. Moving t would cut it off from those (stock keeps the aliasing: in-place updates to one show
    in the other)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    storage = t.untyped_storage()
    return use_count is not None and use_count(storage._cdata) > 2  # t's tensor and `storage` itself


def _parameter_groups(linears: Sequence[torch.nn.Linear]) -> Optional[list]:
    """[weights] or [weights, biases] of linears that could share one buffer (same input size, dtype, device; all
    with a bias or none), else None."""
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    first = weights[0]
    if not all(w.dim() == 2 and w.shape[1] == first.shape[1] and w.dtype == first.dtype and w.device == first.device
               for w in weights):
        return None
    if all(b is None for b in biases):
        return [weights]
    if any(b is None or b.dtype != first.dtype or b.device != first.device for b in biases):
        return None
    return [weights, biases]


def _side_by_side(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensors as one (rows of all, ...) view when they are contiguous, of one dtype and width, and consecutive
    in one storage (hence on one device); else None. Runs on every projection call: a few cheap checks."""
    first = tensors[0]
    if not _strided(first) or first.dim() > 2:
        return None
    strides = (first.shape[1], 1) if first.dim() == 2 else (1,)  # contiguous, and the width with it
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for t in tensors:
        if (t.data_ptr() != end or t.stride() != strides or t.dtype != first.dtype or t.dim() != first.dim()
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, first.shape[1]) if first.dim() == 2 else (rows,), strides)


def as_one_linear(linears: Sequence[torch.nn.Linear]) -> Optional[tuple]:
    """(weight, bias) of the group as one linear when its parameters lie side by side (patch() placed them so),
    else None."""
    weight = _side_by_side([linear.weight for linear in linears])
    if weight is None:
        return None
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return weight, None
    if any(b is None for b in biases):
        return None
    bias = _side_by_side(biases)
    return None if bias is None or bias.dtype != weight.dtype else (weight, bias)


def place_side_by_side(linears: Sequence[torch.nn.Linear]) -> bool:
    """Move the group's weights (and biases) into one buffer, each parameter a view of its rows; False (nothing
    changed) unless each of them owns its whole storage and they match (see _parameter_groups)."""
    groups = _parameter_groups(linears)
    if groups is None or not all(_owns_storage(t) for group in groups for t in group):
        return False
    if any(_shares_storage(t) for group in groups for t in group):
        _backend.warn_once("fused-projections:shared", "dcgen_kernels: Q/K/V projections whose weights share their "
                           "storage with other tensors (a state_dict kept, another model's parameters loaded with "
                           "assign=True) run as separate GEMMs: one GEMM would need them moved into one buffer")
        return False
    if len({t.untyped_storage().data_ptr() for group in groups for t in group}) != sum(map(len, groups)):
        return False  # one tensor twice (tied within the group)
    # Never inside a graph capture (the copies would be captured) or under inference_mode (the buffer would be an
    # inference tensor, unusable by autograd later).
    if groups[0][0].is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    with torch.inference_mode(False), torch.no_grad():
        for group in groups:
            buffer = torch.cat([t.detach() for t in group])
            start = 0
            for t in group:
                t.data = buffer[start:start + t.shape[0]]
                start += t.shape[0]
    return True


def separate(linears: Sequence[torch.nn.Linear]) -> None:
    """Give each parameter of a group placed side by side its own storage again (unpatch)."""
    if as_one_linear(linears) is None:
        return
    with torch.inference_mode(False), torch.no_grad():
        for group in _parameter_groups(linears):
            for t in group:
                t.data = t.detach().clone()


def _one_gemm(x: torch.Tensor, linears: dict) -> Optional[torch.Tensor]:
    """The group's outputs concatenated along the last dim by one GEMM, or None where it must run module by module
    (adapters, hooks, grad, compilation: see the module docstring)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not_plain(linears, torch.nn.Linear) is not None:
        return None
    modules = list(linears.values())
    joined = as_one_linear(modules)
    if joined is None and place_side_by_side(modules):
        joined = as_one_linear(modules)
    return None if joined is None else F.linear(x, *joined)


def project(x: torch.Tensor, linears: dict) -> tuple:
    """The outputs of {name: nn.Linear} on x, in order (views of one GEMM's output where the group lies side by
    side)."""
    out = _one_gemm(x, linears)
    if out is None:
        return tuple(m(x) for m in linears.values())
    return out.split([m.out_features for m in linears.values()], dim=-1)


def project_concatenated(x: torch.Tensor, linears: dict) -> torch.Tensor:
    """torch.cat of the outputs of {name: nn.Linear} on x along the last dim (one GEMM's output, no copy, where the
    group lies side by side)."""
    out = _one_gemm(x, linears)
    return torch.cat([m(x) for m in linears.values()], dim=-1) if out is None else out
