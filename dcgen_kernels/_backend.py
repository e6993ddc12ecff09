"""Backend selection shared by every op.

``auto`` tries ``cuda`` -> ``triton`` -> ``reference``. Backends an op does not implement, or that cannot run
on this machine at all (no ``_C``, Triton on a CPU tensor without ``TRITON_INTERPRET=1``), are skipped quietly
in ``auto``; a backend that is there but rejects this particular call (dtype, head_dim, strides) is skipped with
a one-time warning naming the reason, because that is a performance cliff the user should hear about.
An explicitly requested backend that cannot serve the call always warns once and falls back down the chain.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Callable, Mapping, Optional

import torch

BACKENDS = ("cuda", "triton", "reference")
BACKEND_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "DCGEN_BACKEND"

# A support check returns None when the backend can serve the call, else the reason it cannot.
SupportCheck = Callable[[], Optional[str]]

_warned: set[str] = set()
# Numbers and addresses in a key (shapes, batch sizes, strides, pointers): a reason that names them would otherwise
# warn again, and grow _warned, at every new resolution; names with digits (float16, sm_90) stay apart.
_KEY_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|(?<![A-Za-z_])[0-9]+")
# key -> its kind: fallbacks call warn_once on every call, and the regex costs ~4-7 us a key where a lookup costs
# ~0.1; cleared when full, so it stays bounded too
_KINDS: dict = {}
_KINDS_MAX = 1024


def warn_once(key: str, message: str) -> None:
    """Warn `message` once per kind of `key` (its numbers masked)."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace warnings.warn (fullgraph=True would fail): warn while the call is traced instead.
        from torch._dynamo.comptime import comptime

        comptime(_warn_once_while_tracing)
    else:
        _warn_once(key, message)


def _warn_once(key: str, message: str) -> None:
    kind = _KINDS.get(key)  # here, not in warn_once: Dynamo would trace the regex
    if kind is None:
        if len(_KINDS) >= _KINDS_MAX:
            _KINDS.clear()
        kind = _KINDS[key] = _KEY_NUMBERS.sub("#", key)
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _warn_once_while_tracing(ctx) -> None:
    """comptime callback: Dynamo runs it with warn_once's frame as the traced one."""
    try:
        key, message = (ctx.get_local(name).as_python_constant() for name in ("key", "message"))
    except Exception:  # noqa: BLE001 - a message made of symbolic values: nothing to say at trace time
        return
    _warn_once(key, message)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
        return f"triton is not importable ({exc})"
    return None


def triton_device_error(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on `device` on this machine, or None."""
    reason = triton_import_error()
    if reason:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    return f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"


def check_backend_name(backend: str) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be one of {BACKEND_CHOICES} (a str), got {type(backend).__name__} {backend!r}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def requested(backend: str) -> str:
    """The backend asked for: the call's argument, or DCGEN_BACKEND when the call says 'auto'."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKEND_CHOICES:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKEND_CHOICES}, got {env!r}")
            return env
    return backend


def select(
    op: str,
    backend: str,
    platform_checks: Mapping[str, SupportCheck],
    case_checks: Mapping[str, SupportCheck],
) -> str:
    """Pick the backend for one call of `op`.

    platform_checks: per implemented backend, whether it can run on this machine/device at all.
    case_checks: per implemented backend, whether it supports this call's dtypes, shapes and strides.
    Backends missing from platform_checks are not implemented for `op`. 'reference' always serves.
    `auto` tries BACKENDS in order; an explicit choice falls back down BACKENDS from itself.
    """
    choice = requested(backend)
    explicit = choice != "auto"
    order = BACKENDS[BACKENDS.index(choice):] if explicit else BACKENDS
    declined = []  # (backend, reason) to warn about, naming the backend that serves the call
    for name in order:
        if name == "reference":
            break
        if name not in platform_checks:
            reason = f"{op} has no {name} backend"
            quiet = not (explicit and name == choice)
        else:
            reason = platform_checks[name]()
            quiet = reason is not None and not (explicit and name == choice)
            if reason is None:
                reason = case_checks[name]() if name in case_checks else None
                if reason is None:
                    break
        if not quiet:
            declined.append((name, reason))
    for declined_name, reason in declined:
        warn_once(f"{op}:{declined_name}:{reason}",
                  f"dcgen_kernels.{op}: {declined_name} backend cannot serve this call ({reason}); falling back to "
                  f"{name}")
    return name
