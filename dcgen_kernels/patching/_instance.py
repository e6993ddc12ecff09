"""Per-instance forward replacement: the diffusers classes themselves are never modified."""

from __future__ import annotations

import types
from typing import Optional

import torch

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


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a Linear or conv on x in, or None outside autocast (float64 is left alone)."""
    if x.dtype in FLOAT_DTYPES and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None
