"""`info()`: what this installation has: versions, GPU, compiled extension, usable backends."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, _backend, _cext


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> dict:
    """GPU name and compute capability, from torch when it has CUDA, else from cuda-python's runtime."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return {"name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "source": "torch"}
    try:
        from cuda.bindings import runtime
    except ImportError:
        return {"name": None, "capability": None, "source": "none (torch has no CUDA; cuda-python not installed)"}
    err, count = runtime.cudaGetDeviceCount()
    if err != runtime.cudaError_t.cudaSuccess or count == 0:
        return {"name": None, "capability": None, "source": f"cuda-python ({err.name if err else 'no device'})"}
    err, props = runtime.cudaGetDeviceProperties(0)
    name = props.name.decode(errors="replace").rstrip("\x00")
    return {"name": name, "capability": f"{props.major}.{props.minor}", "source": "cuda-python"}


def info() -> dict:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    triton_error = _backend.triton_device_error(device)
    cuda_error = _cext.cuda_device_error(device)
    return {
        "dcgen_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "cuda_python": _version("cuda-python") or _version("cuda-bindings"),
        "gpu": _gpu(),
        "extension": {"built": _cext._C is not None, "archs": _cext.compiled_archs(),
                      "error": _cext.C_IMPORT_ERROR},
        "backends": {
            "reference": {"available": True, "reason": None},
            "triton": {"available": triton_error is None, "reason": triton_error},
            "cuda": {"available": cuda_error is None, "reason": cuda_error},
        },
        "default_backend_env": _backend.requested("auto"),
    }
