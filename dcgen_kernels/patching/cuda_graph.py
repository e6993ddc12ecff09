"""CUDA graphs for a patched model's forward (`patch(model, cuda_graph=True)`): captured once per input
signature, replayed afterwards.

Why: eager PyTorch launches each of a step's thousands of kernels from Python. On an H100 (2026-11-27,
benchmarks/profile_step.py) a FLUX-12B step at 1024 image tokens ran 39 ms of kernels (patched) in ~82 ms of
wall time, and the FP8 step at 4096 tokens 98 ms of kernels in ~259 ms: the host, not the GPU, set the pace. A
replayed graph issues all of a step's launches at once.

Rules:
- signature = the call's structure (args/kwargs pytree), every non-tensor value (`_value_key`), and each tensor's
  shape, dtype, device and strides. A new signature runs the forward eagerly once (warm-up: Triton JIT, library handles,
  one-time warnings), then captures it with the call's tensors copied into static input buffers.
- a known signature copies the tensors into its buffers, replays, and returns clones of the graph's outputs (the
  next replay overwrites them).
- a model family may add a key made from the content of an input (`plan_inputs`): SANA's caption mask, whose
  key-padding plan (which keys SDPA needs, whether it needs the mask) a graph bakes in; one graph per plan key,
  exact for every mask with that key (ops/key_padding_attention.graph_plan).
- eager, with a one-time warning naming why: gradients enabled (graphs here are for inference: run under
  torch.no_grad() or torch.inference_mode(), as diffusers pipelines do), a tensor off the GPU or on several GPUs,
  a capture that fails (an op that synchronises with the host), more than MAX_GRAPHS signatures, an argument no
  signature can hold (an object hashed by identity, a set), forward hooks on a submodule or global module hooks.
- the graphs read the parameters where they live: in-place weight updates (load_state_dict) are seen. What else a graph
  bakes in is checked on every call (`_model_state`: each parameter's and buffer's address, dtype and shape, the
  attention processors, peft adapters' selection and scaling, train / eval modes): after `model.to(...)`,
  `load_state_dict(assign=True)`, a LoRA fuse, a processor swap, `set_adapters` / `disable_adapters` or
  `train()` / `eval()` the graphs are dropped and captured again; a submodule with forward hooks (which a replay
  would not run) runs eagerly; parameters off the inputs' GPU (CPU offloading) run eagerly. Autocast's state is part
  of the signature. patch() called again or unpatch() drop the graphs, since modules may have been replaced. Each
  graph keeps its own memory pool (activations of one step) until then.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch.utils import _pytree as pytree

from .. import _backend
from ._instance import OwnForward

MAX_GRAPHS = 8  # signatures per model (e.g. resolutions x batch sizes); each holds one step's activation memory
_ATTR = "_dcgen_cuda_graph"


# Values hashed by identity that cannot change: keyed as they are. Any other value hashed by identity (an object whose
# attributes a later call may have changed) or not hashable at all (a set, an array whose repr summarises it) is
# nothing a key can compare, so its call runs eagerly.
_IMMUTABLE_SINGLETONS = (type(None), type(Ellipsis), torch.dtype, torch.layout, torch.memory_format)


def _value_key(value) -> Optional[tuple]:
    """A non-tensor argument's part of the signature, or None when it has none (see _IMMUTABLE_SINGLETONS). Floats
    by their bits: NaN equals itself (a NaN key would never be found again), -0.0 differs from 0.0."""
    if isinstance(value, float):
        return (type(value), value.hex())
    hash_of = type(value).__hash__
    if isinstance(value, _IMMUTABLE_SINGLETONS) or hash_of not in (None, object.__hash__):
        return (type(value), value)
    return None


def _signature(spec, leaves, device: torch.device):
    """(signature, None), or (None, why the call has none)."""
    parts = [str(spec), ("autocast", torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
            continue
        key = _value_key(leaf)
        if key is None:
            return None, (f"an argument of type {type(leaf).__name__} is neither a tensor nor a value hashed by its "
                          "content, so a graph could not tell whether a later call passes the same")
        parts.append(key)
    return tuple(parts), None


def graph_unsupported_reason(tensors: list) -> Optional[str]:
    """Why this call cannot be captured, or None."""
    if torch.is_grad_enabled():
        return "gradients are enabled (CUDA graphs are used under torch.no_grad() or torch.inference_mode())"
    devices = {t.device for t in tensors}
    if not tensors or any(d.type != "cuda" for d in devices):
        return f"its tensors are on {sorted(str(d) for d in devices) or 'no device'}, not one CUDA device"
    if len(devices) > 1:
        return f"its tensors are on several devices ({sorted(str(d) for d in devices)})"
    return None


def _tensors(modules: list):
    return (t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)


def _model_state(modules: list) -> tuple:
    """What a captured graph holds besides its inputs: the address, dtype and shape of every parameter and buffer, the
    submodules and the attention processors (diffusers keeps them in a module's __dict__; the state holds the
    objects, not their ids, which a new object may take once the old one is freed), and `_python_state`. model.to(...),
    load_state_dict(assign=True), a LoRA fuse, a module or processor swap, set_adapters / disable_adapters, train() /
    eval() and forward hooks on a submodule each change it. ~1.26 ms per call for FLUX-12B's 1279 modules on the CI
    CPU (0.23 ms of it `_python_state`; 1.10 ms before dtypes and shapes joined the addresses), while the previous
    step's graph still runs on the GPU."""
    return (tuple((t.data_ptr(), t.dtype, t.shape) for t in _tensors(modules)),
            tuple(c for m in modules for c in m._modules.values()),
            tuple(m.__dict__.get("processor") for m in modules), _python_state(modules))


def _python_state(modules: list) -> tuple:
    """(peft state, hooked, train/eval modes): Python state a capture bakes in that no tensor shows, a peft layer's
    active adapters, disabled flag, merged adapters and scalings (set_adapters with weights); whether a submodule
    (modules[0] is the model, whose hooks run around the graphed forward) has forward hooks, which a replay would not
    run; and each module's training flag (dropout, batch norm)."""
    peft, hooked, modes = [], False, []
    for m in modules:
        modes.append(m.training)
        attrs = m.__dict__
        if "_active_adapter" in attrs:  # peft's BaseTunerLayer
            scaling = attrs.get("scaling") or {}
            peft.append((str(attrs["_active_adapter"]), attrs.get("_disable_adapters"),
                         tuple(attrs.get("merged_adapters", ())),
                         tuple((k, v if isinstance(v, (int, float)) else (id(v), v)) for k, v in scaling.items())))
        hooked = hooked or (m is not modules[0] and bool(m._forward_hooks or m._forward_pre_hooks))
    return tuple(peft), hooked, tuple(modes)


def _global_module_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class CaptureError(RuntimeError):
    """A capture that failed after its warm-up run, whose output the caller still returns."""

    def __init__(self, cause: BaseException, output):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.output = output


def capture(run: Callable[[], object], device: torch.device):
    """(warm-up output, replay) for `run()`, which reads the static input buffers: one eager run on a side stream
    (lazy initialisations stay out of the graph, as torch.cuda.graph requires), then the capture. replay() ->
    the graph's static outputs. Raises CaptureError carrying the warm-up output when the capture fails. Capture and
    replays run with `device` current: both use the current device's streams, wherever the model lives."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm = run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = run()
        except Exception as err:  # noqa: BLE001 - e.g. an op that synchronises with the host
            raise CaptureError(err, warm) from err

    def replay():
        with torch.cuda.device(device):
            graph.replay()
        return static_out
    return warm, replay


class GraphedForward:
    """A model's forward, captured per signature (see the module docstring)."""

    def __init__(self, forward: Callable, model: torch.nn.Module, plan_inputs: Optional[Callable] = None):
        self.forward = forward  # the forward it wraps (the class's, or one another patch family installed)
        self.model = model
        self.model_name = type(model).__name__
        self.modules, self.state = [], None  # model.modules() and _model_state of them for the current graphs
        # (args, kwargs) -> None or (key, context manager the capture runs in): see the module docstring
        self.plan_inputs = plan_inputs
        self.graphs: dict = {}  # signature -> (static input tensors, replay), or None: that signature runs eagerly

    def __getstate__(self):  # torch.save of the model: graphs are per process, captured again after loading
        return {**self.__dict__, "graphs": {}, "modules": [], "state": None}

    def _eager(self, reason: str, args, kwargs):
        _backend.warn_once(f"cuda_graph:{self.model_name}:{reason}",
                           f"dcgen_kernels: {self.model_name} runs eagerly, without CUDA graphs: {reason}")
        return self.forward(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        reason = graph_unsupported_reason(tensors)
        if reason is not None:
            return self._eager(reason, args, kwargs)
        if self.state is None or _model_state(self.modules) != self.state:
            # weights moved or replaced, modules or processors swapped: the graphs captured before are stale
            self.graphs.clear()
            modules = list(self.model.modules())
            if any(t.device != tensors[0].device for t in _tensors(modules)):
                return self._eager("parameters or buffers are not on the inputs' GPU (offloaded?)", args, kwargs)
            self.modules, self.state = modules, _model_state(modules)
        if self.state[-1][1]:
            return self._eager("a submodule has forward hooks, which a graph replay would not run", args, kwargs)
        if _global_module_hooks():
            return self._eager("global module forward hooks are registered (torch.nn.modules.module."
                               "register_module_forward_hook), which a graph replay would not run", args, kwargs)
        key, reason = _signature(spec, leaves, tensors[0].device)
        if reason is not None:
            return self._eager(reason, args, kwargs)
        planned = None if self.plan_inputs is None else self.plan_inputs(args, kwargs)
        if planned is not None:
            key += (planned[0],)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                return self._eager(f"more than {MAX_GRAPHS} input signatures (shapes, dtypes, arguments)", args, kwargs)
            context = contextlib.nullcontext() if planned is None else planned[1]
            return self._capture(key, leaves, spec, tensors, context)
        if self.graphs[key] is None:
            return self.forward(*args, **kwargs)  # its capture failed (warned then)
        static_inputs, replay = self.graphs[key]
        for buffer, tensor in zip(static_inputs, tensors):
            buffer.copy_(tensor)
        return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, replay())

    def _capture(self, key: tuple, leaves: list, spec, tensors: list, planned):
        """First call of a signature: returns the warm-up run's output (computed from copies of the inputs)."""
        # normal tensors (not inference ones) a later call can copy into, under no_grad or inference_mode
        with torch.inference_mode(False), torch.no_grad():
            static_inputs = [t.clone() for t in tensors]
        buffers = iter(static_inputs)
        static_args, static_kwargs = pytree.tree_unflatten(
            [next(buffers) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)
        try:
            with planned:
                out, replay = capture(lambda: self.forward(*static_args, **static_kwargs), tensors[0].device)
        except CaptureError as err:
            self.graphs[key] = None
            _backend.warn_once(f"cuda_graph:{self.model_name}:capture:{err}",
                               f"dcgen_kernels: capturing {self.model_name}'s forward in a CUDA graph failed "
                               f"({err}); this input signature runs eagerly")
            return err.output
        self.graphs[key] = (static_inputs, replay)
        state = _model_state(self.modules)
        if state != self.state:  # the warm-up moved weights (fused projections placed after model.to): the graphs
            self.graphs, self.state = {key: self.graphs[key]}, state  # before hold old addresses, this one the new
        return out


def enable(model: torch.nn.Module, plan_inputs: Optional[Callable] = None) -> None:
    """Wrap `model.forward` (dropping graphs captured before); `disable` restores it. plan_inputs: see
    GraphedForward."""
    disable(model)
    own = model.__dict__.get("forward")  # a forward another family installed on the instance, if any
    graphed = GraphedForward(own if own is not None else OwnForward(type(model).forward, model), model, plan_inputs)
    model.__dict__[_ATTR] = own
    model.forward = graphed


def disable(model: torch.nn.Module) -> bool:
    """Restore the forward `enable` wrapped and free its graphs; False when there were none."""
    if _ATTR not in model.__dict__:
        return False
    own = model.__dict__.pop(_ATTR)
    if own is None:
        del model.forward
    else:
        model.forward = own
    return True


def graphed(model: torch.nn.Module) -> Optional[GraphedForward]:
    forward = model.__dict__.get("forward")
    return forward if isinstance(forward, GraphedForward) else None
