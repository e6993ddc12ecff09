"""Per-instance forward replacement: the diffusers classes themselves are never modified."""

from __future__ import annotations

import types
from typing import Optional

import torch

from .. import _backend
from ..ops._common import FLOAT_DTYPES

_BACKEND_ATTR = "_dcgen_backend"


def replace_forward(module: torch.nn.Module, forward, backend: str) -> None:
    """Shadow the class's forward with `forward` bound to this instance (idempotent: re-patching updates the
    backend only)."""
    if _BACKEND_ATTR not in module.__dict__:
        module.forward = types.MethodType(forward, module)
    setattr(module, _BACKEND_ATTR, backend)


def restore_forward(module: torch.nn.Module) -> bool:
    if _BACKEND_ATTR not in module.__dict__:
        return False
    del module.forward
    delattr(module, _BACKEND_ATTR)
    return True


def backend_of(module: torch.nn.Module) -> str:
    return getattr(module, _BACKEND_ATTR)


def not_plain(modules: dict, cls: type) -> Optional[str]:
    """Why fused code cannot read these modules' weights itself: the first of {name: module} whose type is not
    exactly `cls` (a peft LoRA layer, say, whose forward adds to what its weights give), else None. Patched
    forwards check per call: adapters can be added after patch()."""
    for name, module in modules.items():
        if type(module) is not cls:
            kind = type(module)
            return f"{name} is {kind.__module__}.{kind.__qualname__}, not a plain {cls.__qualname__}"
    return None


def warn_unfused(where: str, reason: str) -> None:
    _backend.warn_once(f"unfused:{where}:{reason}",
                       f"dcgen_kernels: {where} runs diffusers' code because {reason}; merging adapters into the "
                       f"weights (peft merge_and_unload, dcgen_kernels.dcgen.merge_lora) brings the fused ops back")


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a Linear or conv on x in, or None outside autocast (float64 is left alone)."""
    if x.dtype in FLOAT_DTYPES and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None
