"""ops/_common.call_op: plain eager inference skips the custom-op dispatcher; everything else still goes through it."""

import contextlib
import importlib
import pkgutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dcgen_kernels.ops import ada_layer_norm
from dcgen_kernels.ops.ada_layer_norm import gated_residual, gated_residual_reference


@pytest.fixture
def direct_calls(monkeypatch):
    """Counts the calls that bypass the dispatcher (the dispatcher runs the registered function, not eager_impl)."""
    op = ada_layer_norm._gated_residual_op
    calls = []
    impl = op.eager_impl

    def counting(*args):
        calls.append(args)
        return impl(*args)

    monkeypatch.setattr(op, "eager_impl", counting)
    return calls


def inputs(requires_grad=False):
    residual = torch.randn(2, 5, 8, requires_grad=requires_grad)
    return residual, torch.randn(2, 8), torch.randn(2, 5, 8)


def test_eager_inference_calls_the_implementation_directly(direct_calls):
    residual, gate, x = inputs()
    out = gated_residual(residual, gate, x)  # grad mode on, but nothing requires grad
    with torch.no_grad():
        gated_residual(inputs(requires_grad=True)[0], gate, x)
    with torch.inference_mode():
        gated_residual(residual, gate, x)
    assert len(direct_calls) == 3
    torch.testing.assert_close(out, gated_residual_reference(residual, gate, x), rtol=0, atol=0)


def test_parameters_count_as_plain_tensors(direct_calls):
    residual, gate, x = inputs()
    with torch.no_grad():
        gated_residual(residual, torch.nn.Parameter(gate), x)
    assert len(direct_calls) == 1


def test_autograd_goes_through_the_op(direct_calls):
    residual, gate, x = inputs(requires_grad=True)
    out = gated_residual(residual, gate, x)
    out.sum().backward()
    assert not direct_calls
    assert out.grad_fn is not None and residual.grad is not None


def test_fake_and_meta_tensors_go_through_the_op(direct_calls):
    with FakeTensorMode():
        out = gated_residual(*inputs())
    assert out.shape == (2, 5, 8)
    meta = [t.to("meta") for t in inputs()]
    assert gated_residual(*meta).device.type == "meta"
    assert not direct_calls


def test_torch_function_modes_and_functorch_go_through_the_op(direct_calls):
    residual, gate, x = inputs()
    with torch.device("cpu"):  # a TorchFunctionMode
        gated_residual(residual, gate, x)
    batched = torch.func.vmap(lambda r: gated_residual(r, gate, x))(residual[None].expand(3, -1, -1, -1))
    assert not direct_calls
    torch.testing.assert_close(batched[1], gated_residual_reference(residual, gate, x), rtol=0, atol=0)


def test_torch_compile_traces_the_op(direct_calls):
    residual, gate, x = inputs()
    compiled = torch.compile(lambda r, g, v: gated_residual(r, g, v), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(residual, gate, x), gated_residual_reference(residual, gate, x))
    assert not direct_calls


def test_direct_and_dispatched_calls_agree_under_autocast(direct_calls):
    """Autocast falls through a custom op to its implementation, so both paths see the same autocast state."""
    residual, gate, x = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = gated_residual(residual, gate, x)
        with torch.device("cpu"):
            dispatched = gated_residual(residual, gate, x)
    assert len(direct_calls) == 1
    torch.testing.assert_close(direct, dispatched, rtol=0, atol=0)


def test_ops_run_on_their_inputs_gpu(monkeypatch):
    """Triton launches on the current device: an op whose inputs are on cuda:1 while cuda:0 is current makes cuda:1
    current around its implementation (fake CUDA tensors stand in for a second GPU)."""
    from dcgen_kernels.ops._common import on_inputs_device

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    run = on_inputs_device(lambda *args: "ran")
    with FakeTensorMode():
        on_1, on_0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    assert run(None, 3, on_1, on_0) == "ran" and entered == [torch.device("cuda:1")]
    assert run(on_0, on_1) == "ran" and run(torch.empty(2), 3) == "ran" and len(entered) == 1
    modules = [importlib.import_module(f"dcgen_kernels.ops.{info.name}")
               for info in pkgutil.iter_modules(importlib.import_module("dcgen_kernels.ops").__path__)]
    registered = {op._qualname: op for module in modules for op in vars(module).values() if hasattr(op, "eager_impl")}
    assert len(registered) >= 20, sorted(registered)
    assert all(getattr(op.eager_impl, "__wrapped__", None) for op in registered.values())


def _second_order_cases():
    from dcgen_kernels import ops

    r = lambda *shape: torch.randn(*shape)  # noqa: E731
    return {
        "gated_residual": (lambda a, b, c, **k: ops.gated_residual(a, b, c, **k), ops.gated_residual_reference,
                           (r(2, 5, 8), r(2, 8), r(2, 5, 8)), {}),
        "ada_layer_norm_modulate": (lambda a, b, c, **k: ops.ada_layer_norm_modulate(a, b, c, **k),
                                    ops.ada_layer_norm_modulate_reference, (r(2, 5, 8), r(2, 8), r(2, 8)), {}),
        "qk_norm_rope": (lambda a, b, **k: ops.qk_norm_rope(a, b, **k), ops.qk_norm_rope_reference,
                         (r(1, 6, 2, 64), r(64).add(1)), {}),
        "sana_linear_attention": (lambda q, k_, v, **k: ops.sana_linear_attention(q, k_, v, 2, **k),
                                  lambda q, k_, v: ops.sana_linear_attention_reference(q, k_, v, 2),
                                  (r(1, 9, 64).abs(), r(1, 9, 64).abs(), r(1, 9, 64)), {}),
        "patch_embed": (lambda a, b, c, **k: ops.patch_embed(a, b, c, patch_size=2, **k),
                        lambda a, b, c: ops.patch_embed_reference(a, b, c, 2), (r(1, 4, 6, 4), r(16, 16), r(16)),
                        {"backend": "reference"}),
        # the Triton backend, whose first-order backward is fused (it packs through ops without autograd: the width
        # 128 takes the bias gradient's ones-column pack, two images a packing copy)
        "patch_embed_triton": (lambda a, b, c, **k: ops.patch_embed(a, b, c, patch_size=2, **k),
                               lambda a, b, c: ops.patch_embed_reference(a, b, c, 2),
                               (r(2, 4, 6, 4), r(128, 16) * 0.1, r(128)), {"backend": "triton"}),
        "patch_unembed_triton": (lambda a, b, c, **k: ops.patch_unembed(a, b, c, patch_size=2, height=6, width=4, **k),
                                 lambda a, b, c: ops.patch_unembed_reference(a, b, c, 2, 6, 4),
                                 (r(2, 6, 128), r(16, 128) * 0.1, r(16)), {"backend": "triton"}),
    }


@pytest.mark.parametrize("name", list(_second_order_cases()))
def test_second_order_gradients_match_the_reference(name):
    """create_graph=True (gradient penalties): the reference-recomputed backward must itself be differentiable, with
    respect to every input (a detached recomputation dropped these terms silently), and give the partial
    derivatives where one input depends on another (as a block's gated branch on its residual: differentiating the
    recomputation through the saved inputs themselves counted that path twice)."""
    torch.manual_seed(0)
    op, reference, tensors, kwargs = _second_order_cases()[name]
    results = []
    for fn, extra in ((op, kwargs), (reference, {})):
        leaves = [t.clone().requires_grad_() for t in tensors]
        inputs = [leaves[0]] + [t + 0.5 * leaves[0].mean() for t in leaves[1:]]  # every input depends on the first
        out = fn(*inputs, **extra)
        first = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
        assert all(g.requires_grad for g in first)
        penalty = sum(g.pow(2).sum() for g in first)
        results.append((first, torch.autograd.grad(penalty, leaves)))
    (first, second), (first_expected, second_expected) = results
    for got, expected in zip(first + second, first_expected + second_expected):
        assert (got - expected).norm() <= 1e-4 * expected.norm()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_func_grad_transforms_are_refused_by_name(backend):
    """torch.func.grad / vjp / jacrev cannot run a custom op's registered autograd (torch's own error spoke of
    autograd.Function's setup_context): the op says what to use instead."""
    residual, gate, x = inputs()
    op = lambda x: gated_residual(residual, gate, x, backend=backend)  # noqa: E731
    for transform in (lambda: torch.func.grad(lambda x: op(x).sum())(x), lambda: torch.func.vjp(op, x),
                      lambda: torch.func.jacrev(lambda x: op(x).sum())(x)):
        with pytest.raises(NotImplementedError, match="dcgen::gated_residual cannot be differentiated by torch.func"):
            transform()
    # the op on constants inside a grad transform (a frozen teacher, a text branch) runs as usual
    scale = torch.randn_like(x)
    got = torch.func.grad(lambda s: (op(x) * s).sum())(scale)
    assert torch.equal(got, gated_residual_reference(residual, gate, x))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_mode_ad_is_refused_instead_of_dropping_the_tangent(backend):
    """The ops have no JVP rule: the kernels dropped tangents (None) and the dispatched op returned zero ones."""
    import torch.autograd.forward_ad as forward_ad

    residual, gate, x = inputs()
    tangent = torch.randn_like(x)
    with pytest.raises(NotImplementedError, match="dcgen::gated_residual has no forward-mode AD rule"):
        torch.func.jvp(lambda x: gated_residual(residual, gate, x, backend=backend), (x,), (tangent,))
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match="no forward-mode AD rule"):
            gated_residual(residual, gate, forward_ad.make_dual(x, tangent), backend=backend)
        plain = gated_residual(residual, gate, x, backend=backend)  # no tangent among the inputs: fine
    assert torch.equal(plain, gated_residual_reference(residual, gate, x))
    batched = torch.func.vmap(lambda x: gated_residual(residual, gate, x, backend=backend))(torch.stack([x, -x]))
    assert torch.equal(batched[1], gated_residual_reference(residual, gate, -x))  # other transforms still run


def test_fallback_warnings_are_once_per_op_and_reason(monkeypatch):
    """Two ops failing for the same reason each say so once: the one-time key includes the op."""
    from dcgen_kernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    checks = {"cuda": lambda: "no GPU here"}
    with pytest.warns(RuntimeWarning) as caught:
        for _ in range(2):
            assert _backend.select("first_op", "cuda", checks, {}) == "reference"
            assert _backend.select("second_op", "cuda", checks, {}) == "reference"
    assert sorted(str(w.message).split(":")[0] for w in caught) == ["dcgen_kernels.first_op", "dcgen_kernels.second_op"]


def test_one_time_warnings_are_keyed_by_kind_not_by_the_numbers_in_them(monkeypatch):
    """A fallback whose reason names a shape or batch size (SANA's caption batch, a mask's shape) warns once for
    every resolution, and the set of warned keys stays bounded in a server that sees many; names with digits (dtypes,
    archs) stay apart."""
    from dcgen_kernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_KINDS", {})
    monkeypatch.setattr(_backend, "_KINDS_MAX", 100)  # the key -> kind memo is cleared when full
    with pytest.warns(RuntimeWarning) as caught:
        for batch in range(2, 300):
            _backend.warn_once(f"sana-processor:its caption batch 1 is not the image batch {batch}",
                               f"batch {batch}")
        for address in ("0x7f00aa", "0x7f00bb"):
            _backend.warn_once(f"cuda_graph:capture:tensor at {address} of shape (2, 64)", address)
        for dtype in ("float16", "bfloat16", "float32"):
            _backend.warn_once(f"latents:dtype:torch.{dtype}", dtype)
    assert [str(w.message) for w in caught] == ["batch 2", "0x7f00aa", "float16", "bfloat16", "float32"]
    assert len(_backend._warned) == 5 and len(_backend._KINDS) <= 100


@pytest.mark.parametrize("triton_reason", [None, "Triton needs a CUDA tensor"])
def test_fallback_warning_names_the_backend_that_serves_the_call(monkeypatch, triton_reason):
    """backend="cuda" where _C cannot run: the warning names the backend the call gets, which is the reference where
    Triton cannot run either (it said "falling back to triton" there)."""
    from dcgen_kernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    checks = {"cuda": lambda: "no _C here", "triton": lambda: triton_reason}
    served = "triton" if triton_reason is None else "reference"
    with pytest.warns(RuntimeWarning) as caught:
        assert _backend.select("an_op", "cuda", checks, {}) == served
    [warning] = caught
    assert str(warning.message).endswith(f"(no _C here); falling back to {served}")


def test_tma_alignment_checks_every_stride():
    from dcgen_kernels.ops._common import tma_alignment_error

    t = torch.zeros(2 * 1176, dtype=torch.bfloat16).as_strided((2, 9, 2, 64), (1176, 130, 65, 1))  # inner stride
    assert "16 bytes" in tma_alignment_error("q", t)
    row = torch.zeros(1, 1, 2, 64, dtype=torch.bfloat16)
    assert "zero stride" in tma_alignment_error("q", row.expand(2, 9, 2, 64))  # a broadcast view
    assert tma_alignment_error("q", row) is None and tma_alignment_error("q", row.expand(1, 1, 2, 64)) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_custom_op():
    residual, gate, x = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 5, 8)
    traced = torch.jit.trace(lambda x: gated_residual(residual, gate, x, backend="reference"), (x,), check_trace=False)
    assert "dcgen::gated_residual" in str(traced.graph)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["direct", "dispatcher"])
def test_ops_keep_their_own_precision_under_autocast(requires_grad):
    """Autocast is off inside an op: the reference's fp32 matmuls are not run in bf16 (the Triton and CUDA kernels
    set their precision whatever the autocast state)."""
    from dcgen_kernels.ops.sana_linear_attention import sana_linear_attention

    q, k, v = (torch.randn(2, 40, 64, requires_grad=requires_grad) for _ in range(3))
    expected = sana_linear_attention(q, k, v, 2, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sana_linear_attention(q, k, v, 2, backend="reference")
    assert got.dtype == torch.float32 and torch.equal(got, expected)
