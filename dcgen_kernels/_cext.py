"""Optional compiled extension `dcgen_kernels._C` (CUDA kernels behind raw-pointer pybind11 bindings)."""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

try:
    _C = importlib.import_module("dcgen_kernels._C")
    C_IMPORT_ERROR: Optional[str] = None
except ModuleNotFoundError:
    _C = None
    C_IMPORT_ERROR = ("no _C module for this Python: installed without nvcc, with DCGEN_BUILD_CUDA=0, after a failed "
                      "CUDA build, or built for another Python version (reinstall with this one)")
except ImportError as exc:  # built, but does not load (wrong Python/CUDA runtime)
    _C = None
    C_IMPORT_ERROR = f"_C does not load: {exc}"

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def compiled_archs() -> list[str]:
    return list(_C.compiled_archs()) if _C is not None else []


@functools.lru_cache(maxsize=None)
def _runtime_error() -> Optional[str]:
    """_C links its own CUDA runtime: with a driver older than that runtime it sees no device even where torch
    (built against another CUDA) does, and every launch would fail."""
    if _C.device_count() == 0:
        version = _C.cuda_runtime_version()
        return (f"_C's CUDA runtime {version // 1000}.{version % 1000 // 10} finds no usable GPU (driver older than "
                f"that runtime?): rebuild _C with an nvcc the driver supports")
    return None


def cuda_device_error(device: torch.device) -> Optional[str]:
    """Why the `_C` kernels cannot run on `device`, or None."""
    if _C is None:
        return f"dcgen_kernels._C is not built ({C_IMPORT_ERROR})"
    if device.type != "cuda":
        return f"CUDA kernels need a CUDA tensor, got device {device}"
    runtime_error = _runtime_error()
    if runtime_error:
        return runtime_error
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    if not any(a.rstrip("af") == arch for a in compiled_archs()):
        return f"_C was built for sm_{compiled_archs()} but this GPU is sm_{arch} (rebuild with DCGEN_CUDA_ARCHS)"
    return None


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
