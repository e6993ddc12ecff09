"""Helpers shared by the op modules: argument validation, custom-op registration and calls, autograd through the
fp32 reference."""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype autocast would run a Linear or conv on x (a tensor, or anything with its dtype and device) in, or
    None outside autocast (float64 is left alone)."""
    if x.dtype in FLOAT_DTYPES and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[int]] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming `name` and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device} like the first input, got {t.device}")
    if last_dim_contiguous and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """No inf / NaN in `t` (a real tensor with data). Its extremes carry any: one reduction, ~15x cheaper than
    isfinite(t).all() on the CPU for a 3072 x 3072 fp32 tensor."""
    return not t.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all())


def check_positive_eps(eps: object) -> None:
    """A norm's eps: NaN or inf would pass `eps <= 0` and turn every output NaN or zero."""
    if not isinstance(eps, float) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive float (finite), got {eps!r}")


def tma_alignment_error(name: str, t: torch.Tensor) -> Optional[str]:
    """TMA descriptors need a contiguous last dim, a 16-byte aligned base and positive 16-byte multiples for the
    other strides."""
    if t.stride(-1) != 1:
        return f"{name} is not contiguous in its last dimension (strides {t.stride()})"
    size = t.element_size()
    if t.data_ptr() % 16:
        return f"{name} data pointer is not 16-byte aligned"
    for stride, extent in zip(t.stride()[:-1], t.shape[:-1]):
        if (stride * size) % 16:
            return f"{name} strides {t.stride()} are not multiples of 16 bytes"
        if stride == 0 and extent > 1:  # a descriptor's strides are positive: no broadcast (expanded) dimension
            return f"{name} has a zero stride (an expanded view; strides {t.stride()})"
    return None


# Per (device, stream): int32 counters that every kernel using them leaves at zero (see arrival_counters).
_ARRIVAL_COUNTERS: Dict[tuple, torch.Tensor] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """`count` int32 zeros for a kernel whose programs count their arrivals and whose last arriver resets its
    counter, so the buffer is zero again after every launch: one buffer per device and stream, kept, so a call costs
    no zeroing launch (a memset is ~2 us beside a ~12 us kernel). Work on one stream runs in order, so calls never
    share counters concurrently. While a CUDA graph is captured the counters are a fresh zeroed tensor, owned by the
    graph (its replays then zero them themselves)."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(count, dtype=torch.int32, device=device)
        key = (str(device), torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (str(device), None)
    counters = _ARRIVAL_COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 256), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[key] = counters
    return counters[:count]


# Per op, per call key: the implementation `timed_choice` kept, with every candidate's time (ms). Read by the
# benchmarks (their JSON's `autotuned`).
TIMED_CHOICES: dict = {}
# triton.testing.do_bench's warm-up and measuring windows (ms) per candidate: its defaults; the GPU tests shorten
# them (tests/conftest.py), whose dozens of call keys would otherwise spend minutes timing.
TIMED_CHOICE_BENCH = {"warmup": 25, "rep": 100}


def timed_choice(op: str, key: tuple, candidates: Dict[str, Callable[[], object]]) -> str:
    """The faster of `candidates` (name -> a call that runs the whole op) for this call key, timed once on its
    first call on a GPU (median of triton.testing.do_bench, each candidate run, and so tuned, first), then cached
    in TIMED_CHOICES. Inside a CUDA-graph capture nothing can be timed: an untimed key takes the first candidate."""
    choices = TIMED_CHOICES.setdefault(op, {})
    if key not in choices:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return next(iter(candidates))
        from triton.testing import do_bench

        ms = {name: do_bench(run, return_mode="median", **TIMED_CHOICE_BENCH) for name, run in candidates.items()}
        choices[key] = {"picked": min(ms, key=ms.get), **{f"{name}_ms": t for name, t in ms.items()}}
    return choices[key]["picked"]


def on_inputs_device(fn: Callable) -> Callable:
    """fn run with its first CUDA tensor argument's GPU current: Triton launches on the current device and its
    stream, whatever device the pointers are on (a model on cuda:1 while cuda:0 is current would fail or run out of
    order with the work that made its inputs)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
        if device is None or device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run


def without_autocast(fn: Callable) -> Callable:
    """fn run with autocast off: an op sets its own precision (fp32 math rounded once, the reference included, whose
    matmuls autocast would run in 16 bits), as the Triton and CUDA kernels do whatever the autocast state."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return run


def custom_op(name: str):
    """Decorator: `torch.library.custom_op(name, mutates_args=())` that keeps the Python implementation for call_op;
    both run on their inputs' GPU (on_inputs_device) with autocast off (without_autocast)."""

    def register(fn: Callable):
        fn = without_autocast(on_inputs_device(fn))
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.eager_impl = fn
        return op

    return register


# Parameters are plain tensors with a flag; any other subclass (FakeTensor, FunctionalTensor, DTensor, ...) has
# its own semantics and goes through the dispatcher.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _needs_dispatcher(args: Sequence[object]) -> bool:
    """Whether the dispatcher would do more than call the implementation, outside torch.compile / TorchScript
    tracing and functorch transforms (call_op checks those): autograd (a grad-requiring input with grad mode on),
    Python modes (fake tensors, functionalization, torch function modes such as `with torch.device(...)`), tensor
    subclasses or meta tensors (the fake implementation)."""
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return True
    grad = torch.is_grad_enabled()
    return any(isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSOR_TYPES or a.is_meta
                                                or (grad and a.requires_grad))
               for a in args)


def call_op(op, *args):
    """`op(*args)`, with the implementation called directly where the dispatcher would add only host time.

    A custom op's dispatch (autograd wrapper, redispatch, dynamo-disable wrapper) costs ~12 us per call on the CI
    CPU (torch 2.13), about as much as our validation, backend choice and launch together, and an eager step issues
    hundreds of op calls. Autograd, torch.compile, tracing, modes, functorch transforms (vmap, grad) and subclasses
    still get the registered op (vmap works); forward-mode AD and torch.func's grad transforms are refused.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op(*args)
    transformed = torch._C._are_functorch_transforms_active()
    if transformed or forward_ad._current_level >= 0:
        _refuse_unsupported_autodiff(op, args)
    if transformed or _needs_dispatcher(args):
        return op(*args)
    return op.eager_impl(*args)


def _refuse_unsupported_autodiff(op, args: Sequence[object]) -> None:
    """The ops have no forward-mode derivative: a kernel would drop the tangents (and the dispatched op returns zero
    ones), so a JVP through them would be silently wrong. torch.func's grad / vjp / jacrev cannot run a custom op's
    registered autograd on the tensors they track (torch raises an error about autograd.Function's setup_context):
    named here; constants inside such a transform run as usual."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    transforms = {i.key() for i in retrieve_all_functorch_interpreters()}
    dual = forward_ad._current_level >= 0 and any(
        isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)
    if dual or TransformType.Jvp in transforms:
        raise NotImplementedError(
            f"{op._qualname} has no forward-mode AD rule (torch.func.jvp / torch.autograd.forward_ad): its tangent "
            f"would be wrong. Compute JVPs with the unpatched model (dcgen_kernels.unpatch) or the ops' *_reference "
            f"functions")
    if TransformType.Grad in transforms and any(
            isinstance(a, torch.Tensor) and torch._C._functorch.is_gradtrackingtensor(a) for a in args):
        raise NotImplementedError(
            f"{op._qualname} cannot be differentiated by torch.func.grad / vjp / jacrev (torch runs no custom op's "
            f"autograd under them). Use torch.autograd.grad or .backward() (supported, with create_graph=True too), "
            f"or the unpatched model (dcgen_kernels.unpatch)")


def register_inference_only(op, name: str) -> None:
    """Autograd for a quantized op, which has no backward: a backward through it raises saying so and what to do,
    instead of torch's "no autograd formula was registered". Eager forwards run under grad mode as before; torch.compile
    of a forward whose gradients are needed fails when it compiles, with this message."""

    def backward(ctx, *grad_outs):
        raise RuntimeError(f"dcgen_kernels: {name} has no backward: quantized layers (FP8, NVFP4) are inference only. "
                           f"Run them under torch.no_grad(), or quantize with keep_original=True and "
                           f"dcgen_kernels.unpatch(model) to train the 16-bit layers.")

    op.register_autograd(backward)


def register_reference_autograd(op, reference: Callable, n_tensor_inputs: int) -> None:
    """Backward of `op` = vjp of its fp32 reference, recomputed under autograd.

    The first `n_tensor_inputs` arguments of `op` are (optional) tensors; the rest are passed through. The op may
    return one tensor or a tuple (then so does the reference). Correct for every backend's forward; memory-lean
    because the reference uses SDPA-style primitives.
    """

    def setup_context(ctx, inputs, output):
        tensors = inputs[:n_tensor_inputs]
        ctx.present = [t is not None for t in tensors]
        ctx.save_for_backward(*[t for t in tensors if t is not None])
        ctx.rest = inputs[n_tensor_inputs:]

    def backward(ctx, *grad_outs):
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if present else None for present in ctx.present]
        wanted = [t is not None and ctx.needs_input_grad[i] for i, t in enumerate(tensors)]
        # the last non-tensor input is the backend name
        grads = reference_vjp(reference, tensors, ctx.rest[:-1], grad_outs, wanted)
        return tuple(grads) + (None,) * len(ctx.rest)

    op.register_autograd(backward, setup_context=setup_context)


def reference_vjp(reference: Callable, tensors: Sequence, args: Sequence, grad_outs: Sequence,
                  wanted: Sequence[bool]) -> list:
    """Gradients of `reference(*tensors, *args)` (one output or a tuple) for the tensors flagged in `wanted`,
    recomputed under autograd. Under create_graph=True (grad mode on in the backward) the recomputation runs on
    views of the saved inputs: differentiable back to them, so second-order gradients (gradient penalties) flow,
    while the gradients are partial ones (the saved inputs themselves would give total derivatives wherever one
    input depends on another, as a block's gated branch on its residual); else on detached copies (no graph kept)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [t if t is None else t.view_as(t) if create_graph else t.detach().requires_grad_(w)
                  for t, w in zip(tensors, wanted)]
        out = reference(*leaves, *args)
        used = [(o, g) for o, g in zip(out if isinstance(out, tuple) else (out,), grad_outs) if g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in used], [t for t, w in zip(leaves, wanted) if w],
                                         [g for _, g in used], allow_unused=True, create_graph=create_graph))
    return [next(grads) if w else None for w in wanted]
