"""Per-instance forward replacement: the diffusers classes themselves are never modified.

Hooks also wrap an instance's forward: diffusers' (`enable_cache`, group offloading, layerwise casting) and
accelerate's (CPU offload, device maps) keep the forward they wrap in an attribute and put a wrapper in
`module.forward`. A patched forward takes the place of that innermost forward, whether the hooks came before or
after patch(), so the hooks keep wrapping it, and unpatch() or removing the hooks leaves the other intact."""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, Optional, Sequence

import torch

from .. import _backend
from ..ops._common import FLOAT_DTYPES

_BACKEND_ATTR = "_dcgen_backend"


class OwnForward(functools.partial):
    """A patched forward bound to its module. A partial, so a patched model pickles (torch.save of the model): a bound
    method of a module-level function pickles as getattr(module, its name), which the module's class lacks."""


def _is_own_forward(held, module: torch.nn.Module) -> bool:
    """A forward of the module itself (the class's, bound, or ours), where hook wrappers are other partials."""
    if isinstance(held, types.MethodType):
        return held.__self__ is module
    return isinstance(held, OwnForward) and held.args[0] is module


def _own_forward_slot(module: torch.nn.Module):
    """(holder, attribute name) of the module's own forward: the one hook wrappers end in, else the module's
    `forward`."""
    slots = [(module, "_old_forward")]  # accelerate's add_hook_to_module
    references = getattr(module.__dict__.get("_diffusers_hook"), "_fn_refs", None)  # diffusers' HookRegistry
    if references:
        innermost = references[0]  # a hook with its own new_forward calls original_forward
        slots.append((innermost, "forward" if getattr(innermost, "original_forward", None) is None
                      else "original_forward"))
    for holder, name in slots:
        if _is_own_forward(vars(holder).get(name), module):
            return holder, name
    return module, "forward"


def set_own_forward(module: torch.nn.Module, forward) -> None:
    """Make `forward` (an unbound function of the module) this instance's own forward."""
    setattr(*_own_forward_slot(module), OwnForward(forward, module))


def reset_own_forward(module: torch.nn.Module) -> None:
    """The class's forward again, where set_own_forward put another."""
    holder, name = _own_forward_slot(module)
    if holder is module and name == "forward":
        module.__dict__.pop("forward", None)
    else:
        setattr(holder, name, types.MethodType(type(module).forward, module))


def runs_own_forward(module: torch.nn.Module, forward) -> bool:
    """Whether calling the module runs `forward` directly (installed by set_own_forward, no hook around it)."""
    held = module.__dict__.get("forward")
    return isinstance(held, OwnForward) and held.func is forward


def once(build: Callable) -> Callable:
    """A function returning build()'s result, built on the first call (diffusers' classes, imported lazily). A plain
    closure where patched forwards call it: torch.compile warns about every `functools.cache`-wrapped call it traces."""
    built = []

    @functools.wraps(build)
    def get():
        if not built:
            built.append(build())
        return built[0]
    return get


def replace_forward(module: torch.nn.Module, forward, backend: str) -> None:
    """Shadow the class's forward with `forward` bound to this instance (idempotent: re-patching updates the
    backend only)."""
    if _BACKEND_ATTR not in module.__dict__:
        set_own_forward(module, forward)
    setattr(module, _BACKEND_ATTR, backend)


def restore_forward(module: torch.nn.Module) -> bool:
    if _BACKEND_ATTR not in module.__dict__:
        return False
    reset_own_forward(module)
    delattr(module, _BACKEND_ATTR)
    return True


def backend_of(module: torch.nn.Module) -> str:
    return getattr(module, _BACKEND_ATTR)


def not_plain(modules: dict, cls: type) -> Optional[str]:
    """Why fused code cannot read these modules' weights itself instead of calling them: the first of {name: module}
    that is not exactly `cls` (a peft LoRA layer adds to what its weights give) or has hooks (diffusers'
    layerwise casting and group offloading, accelerate's offloading: they ready the weights as the module is called;
    a user's hooks would not run), else None. Patched forwards check per call: both can come after patch()."""
    for name, module in modules.items():
        if type(module) is not cls:
            return f"{name} is {qualified_type(module)}, not a plain {cls.__qualname__}{adapter_hint(module)}"
        hooks = _hooks(module)
        if hooks is not None:
            return f"{name} has {hooks}"
    return None


def overridden_forward(module: torch.nn.Module, cls: type) -> Optional[str]:
    """Why a module of a subclass of `cls` is not replaced: a forward of its own (replacing it would drop that
    code), else None."""
    if type(module).forward is not cls.forward:
        return f"{type(module).__name__} overrides {cls.__name__}.forward"
    return None


def replace_unless_skipped(module: torch.nn.Module, forward, reason: Optional[str], backend: str) -> tuple:
    """(class name, reason) for the patch report; the forward is replaced when there is no reason to skip."""
    if reason is None:
        replace_forward(module, forward, backend)
    return type(module).__name__, reason


def class_rule(module: torch.nn.Module, rules: dict):
    """(cls, rule) of the first class in `rules` ({diffusers class: rule}) that `module` is an instance of, else
    None: a subclass is handled as its class (unless it overrides forward: `overridden_forward`)."""
    for cls, rule in rules.items():
        if isinstance(module, cls):
            return cls, rule
    return None


def qualified_type(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def is_adapter_layer(module: torch.nn.Module) -> bool:
    """Whether `module` is a peft adapter layer (LoRA etc.), which wraps the layer it adapts."""
    return type(module).__module__.split(".")[0] == "peft"


def adapter_hint(module: torch.nn.Module) -> str:
    """How to get the fused op back when `module` is a peft adapter layer around a patched module, else ''."""
    if not is_adapter_layer(module):
        return ""
    return " (merging the adapters into the weights, e.g. with dcgen_kernels.dcgen.merge_lora, fuses it again)"


def _hooks(module: torch.nn.Module) -> Optional[str]:
    state = module.__dict__
    registry = state.get("_diffusers_hook")
    if getattr(registry, "hooks", None):
        return f"diffusers hooks ({', '.join(registry.hooks)})"
    if "_hf_hook" in state:
        return f"an accelerate hook ({type(state['_hf_hook']).__name__})"
    if state.get("_forward_pre_hooks") or state.get("_forward_hooks"):
        return "torch forward hooks"
    if state.get("_backward_pre_hooks") or state.get("_backward_hooks"):
        return "torch backward hooks"
    return None


def hooked_submodule(module: torch.nn.Module, calls: Sequence[str] = ()) -> Optional[str]:
    """'name has ...' for a submodule of `module` with hooks (see _hooks), else None; the children named in
    `calls` (and what they hold) are left out: the patched forward calls those as modules, so their hooks run."""
    # Runs on every patched call: the common case (no hook anywhere) is kept to a few dict reads per submodule
    # (torch keeps all four hook dicts in every module's __dict__), the name only looked up for a hit.
    stack = [child for name, child in module._modules.items() if name not in calls]
    while stack:
        child = stack.pop()
        if child is None:
            continue
        state = child.__dict__
        if (state["_forward_hooks"] or state["_forward_pre_hooks"] or state["_backward_hooks"]
                or state["_backward_pre_hooks"] or not _HOOK_KEYS.isdisjoint(state)):
            hooks = _hooks(child)
            if hooks is not None:
                return f"{next(name for name, m in module.named_modules() if m is child)} has {hooks}"
        stack.extend(state["_modules"].values())
    return None


_HOOK_KEYS = frozenset(("_diffusers_hook", "_hf_hook"))  # where diffusers and accelerate keep a module's hooks


def _unsupported_dtype(x) -> Optional[torch.dtype]:
    return x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype not in FLOAT_DTYPES else None


def _dtype_reason(dtype: torch.dtype) -> str:
    return f"its input is {str(dtype).removeprefix('torch.')} (the fused ops take float32, bfloat16 and float16)"


def stock_when_unfusable(calls: Sequence[str] = (), unfusable: Optional[Callable] = None, tokens: bool = True):
    """Decorator for a patched module forward: the class's own forward runs instead, with a one-time warning
    (slower, never an error), where the fused code cannot stand in for it: activations (its first argument) in a
    float dtype the fused ops do not take (float64), hooks on a submodule the fused code computes itself instead
    of calling (diffusers' layer skip of a FeedForward, group offloading, a user's capture hook) rather than one of
    the children named in `calls`, or `unfusable(module)` giving a reason: the checks patch() made of the submodules
    the fused code stands for (a norm's type and affine), made again per call, as one may be replaced after
    patch(). tokens: the activations are (..., C) rows, which reach the fused code with channel stride 1
    (with_unit_channel_stride); False for NCHW maps (DC-AE's ResBlock, GLUMBConv), whose forwards take any layout."""
    def decorate(forward):
        activations = list(inspect.signature(forward).parameters)[1]  # the parameter after self

        @functools.wraps(forward)
        def checked(self, *args, **kwargs):
            x = args[0] if args else kwargs.get(activations)
            dtype = _unsupported_dtype(x)
            reason = _dtype_reason(dtype) if dtype is not None else hooked_submodule(self, calls)
            if reason is None and unfusable is not None:
                reason = unfusable(self)
            if reason is not None:
                warn_unfused(type(self).__name__, reason)
                return type(self).forward(self, *args, **kwargs)
            if tokens and isinstance(x, torch.Tensor) and not x.is_contiguous():
                if args:
                    args = (with_unit_channel_stride(x), *args[1:])
                else:
                    kwargs = {**kwargs, activations: with_unit_channel_stride(x)}
            return forward(self, *args, **kwargs)
        return checked
    return decorate


def with_unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    """t with channel stride 1, which the fused ops read (a copy only where it is not): stock takes any layout, e.g.
    the flatten(2).transpose(1, 2) of a conv patch embedding, which feeds SANA's and HunyuanVideo's first block. A
    contiguous t costs one is_contiguous(): this runs on every patched call."""
    if t.is_contiguous() or t.dim() == 0 or t.shape[-1] == 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def stock_processor_for_other_dtypes(call):
    """stock_when_unfusable's dtype rule for an attention processor's __call__(attn, hidden_states, ...): the
    processor it replaced (`self.original`) serves such calls."""
    @functools.wraps(call)
    def checked(self, attn, hidden_states, *args, **kwargs):
        dtype = _unsupported_dtype(hidden_states)
        if dtype is not None:
            warn_unfused(type(self.original).__name__, _dtype_reason(dtype))
            return self.original(attn, hidden_states, *args, **kwargs)
        return call(self, attn, hidden_states, *args, **kwargs)
    return checked


def warn_unfused(where: str, reason: str) -> None:
    _backend.warn_once(f"unfused:{where}:{reason}", f"dcgen_kernels: {where} runs diffusers' code because {reason}")


def precomputed_call_signature(cls):
    """Class decorator for attention processors. diffusers' attention modules call
    `inspect.signature(processor.__call__)` on every forward (to filter keyword arguments); a signature stored on the
    function turns that into a lookup (16 -> 5 us per call on the CI CPU, ~40 calls per SANA step)."""
    cls.__call__.__signature__ = inspect.signature(cls.__call__)
    return cls
