import sys
import warnings

import pytest
import torch

from dcgen_kernels.ops.channel_rms_norm import channel_rms_norm, channel_rms_norm_reference
from tests.helpers import TOLERANCE, rel_l2

channel_rms_norm_module = sys.modules["dcgen_kernels.ops.channel_rms_norm"]


def make_inputs(B=2, C=43, H=19, W=17, dtype=torch.float32, device="cpu"):
    x = torch.randn(B, C, H, W, device=device).to(dtype)
    weight = torch.rand(C, device=device).add(0.5).to(dtype)
    bias = torch.randn(C, device=device).to(dtype)
    residual = torch.randn(B, C, H, W, device=device).to(dtype)
    return x, weight, bias, residual


def diffusers_norm_residual(x, weight, bias, residual, eps=1e-5):
    """DC-AE ResBlock's tail: diffusers RMSNorm over channels via movedim, then + residual."""
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(x.shape[1], eps=eps, elementwise_affine=True, bias=True).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    return norm(x.movedim(1, -1)).movedim(-1, 1) + residual


def test_reference_equals_diffusers_rms_norm_with_residual():
    x, w, b, r = make_inputs()
    assert rel_l2(channel_rms_norm_reference(x, w, b, r), diffusers_norm_residual(x, w, b, r)) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_uses_the_given_eps(backend):
    """patch() hands a model's own RMSNorm eps to the op: at activations ~1e-2 an eps of 1e-3 moves the output by
    ~5%, so an op that kept the default 1e-5 would be far off diffusers' RMSNorm(eps=1e-3)."""
    x, w, b, r = make_inputs()
    x = x * 1e-2
    got = channel_rms_norm(x, w, b, r, eps=1e-3, backend=backend)
    assert rel_l2(got, diffusers_norm_residual(x, w, b, r, eps=1e-3)) < 1e-5
    assert rel_l2(got, diffusers_norm_residual(x, w, b, r, eps=1e-5)) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_affine,with_residual", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_triton_matches_reference(dtype, with_affine, with_residual, memory_format):
    x, w, b, r = make_inputs(dtype=dtype)  # 43 channels, 323 pixels: partial channel and pixel blocks
    x, r = x.to(memory_format=memory_format), r.to(memory_format=memory_format)
    w, b = (w, b) if with_affine else (None, None)
    r = r if with_residual else None
    out = torch.full_like(x, float("nan"))  # x's layout
    channel_rms_norm_module._launch_triton(x, w, b, r, 1e-5, out=out)
    assert rel_l2(out, channel_rms_norm_reference(x, w, b, r)) <= max(TOLERANCE[dtype] / 2, 1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_size_one_dims_with_any_stride(backend):
    # W == 1: torch calls (2, 4, 5, 1) with strides (20, 5, 1, 5) contiguous; its elements sit where NCHW puts them.
    x = torch.randn(2, 4, 1, 5).transpose(2, 3)
    assert x.is_contiguous() and x.stride() == (20, 5, 1, 5)
    w = torch.rand(4) + 0.5
    out = channel_rms_norm(x, w, None, x, backend=backend)
    assert rel_l2(out, channel_rms_norm_reference(x.contiguous(), w, None, x.contiguous())) <= 1e-6
    torch.library.opcheck(torch.ops.dcgen.channel_rms_norm.default, (x, w, None, x, 1e-5, backend),
                          test_utils=("test_faketensor",))


def test_triton_reads_strided_weight_and_bias():
    x, w, b, r = make_inputs()
    w2, b2 = torch.stack([w, -w], 1)[:, 0], torch.stack([b, -b], 1)[:, 0]  # stride-2 views of the same values
    assert w2.stride() == (2,)
    expected = channel_rms_norm_reference(x, w, b, r)
    assert rel_l2(channel_rms_norm(x, w2, b2, r, backend="triton"), expected) <= 1e-6


def _unsupported_layout(case: str, H: int = 19, W: int = 17):
    x, w, b, r = make_inputs(H=H, W=W)
    if case == "transposed_x":
        return x.transpose(2, 3), w, b, r.transpose(2, 3).contiguous()
    if case == "channel_slice":
        return x[:, :20], w[:20], b[:20], r[:, :20].contiguous()
    return x, w, b, r.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", ["transposed_x", "channel_slice", "residual_channels_last"])
def test_other_layouts_fall_back_to_the_reference_with_one_warning(case):
    """The kernel takes contiguous NCHW / channels-last x with a residual of x's layout; other strides run the
    reference (warned once, also at another resolution: other strides, same reason), in a contiguous result where
    x has no such layout, matching the fake."""
    x, w, b, r = _unsupported_layout(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = channel_rms_norm(x, w, b, r, backend="triton")
        channel_rms_norm(x, w, b, r, backend="triton")
        channel_rms_norm(*_unsupported_layout(case, H=9, W=12), backend="triton")
    assert len([m for m in caught if "cannot serve this call" in str(m.message)]) == 1
    assert torch.equal(out, channel_rms_norm_reference(x, w, b, r))
    torch.library.opcheck(torch.ops.dcgen.channel_rms_norm.default, (x, w, b, r, 1e-5, "triton"),
                          test_utils=("test_faketensor",))


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, b, r: channel_rms_norm(x[0], w, b, r), ValueError, "x must have 4 dimensions"),
    (lambda x, w, b, r: channel_rms_norm(x, w[:-1], b, r), ValueError, r"weight must have shape \(43,\)"),
    (lambda x, w, b, r: channel_rms_norm(x, w, b, r[:, :-1]), ValueError, "residual must have shape"),
    (lambda x, w, b, r: channel_rms_norm(x, w, b, r.half()), TypeError, "residual must have dtype"),
    (lambda x, w, b, r: channel_rms_norm(x.int(), None, None, None), TypeError, "x must have dtype"),
    (lambda x, w, b, r: channel_rms_norm(x, w, b.to("meta"), r), ValueError, "bias must be on device"),
    (lambda x, w, b, r: channel_rms_norm(x, w, b, r, eps=0.0), ValueError, "eps must be a positive float"),
    (lambda x, w, b, r: channel_rms_norm(x, w, b, r, eps=float("inf")), ValueError, "eps must be a positive"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*make_inputs())


def test_gradients_match_diffusers():
    x, w, b, r = [t.requires_grad_(True) for t in make_inputs(H=5, W=6)]
    grad = torch.randn(x.shape)
    ours = torch.autograd.grad(channel_rms_norm(x, w, b, r, backend="triton"), [x, w, b, r], grad)
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(43, eps=1e-5, elementwise_affine=True, bias=True)
    norm.weight, norm.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)  # share the leaves
    stock = norm(x.movedim(1, -1)).movedim(-1, 1) + r
    theirs = torch.autograd.grad(stock, [x, norm.weight, norm.bias, r], grad)
    assert all(rel_l2(a, t) < 1e-5 for a, t in zip(ours, theirs))


def test_compiles_without_graph_breaks():
    x, w, b, r = make_inputs()
    compiled = torch.compile(lambda *a: channel_rms_norm(*a, backend="reference"), backend="aot_eager",
                             fullgraph=True)
    assert rel_l2(compiled(x, w, b, r), channel_rms_norm_reference(x, w, b, r)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("C,H", [(128, 1024), (1024, 128), (200, 77)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_triton_on_gpu(C, H, memory_format):
    x, w, b, r = make_inputs(B=1, C=C, H=H, W=H, dtype=torch.bfloat16, device="cuda")
    x, r = x.to(memory_format=memory_format), r.to(memory_format=memory_format)
    out = torch.full_like(x, float("nan"))
    channel_rms_norm_module._launch_triton(x, w, b, r, 1e-5, out=out)
    assert rel_l2(out, channel_rms_norm_reference(x, w, b, r)) <= TOLERANCE[torch.bfloat16] / 2


_LAUNCHES = r'''
m = importlib.import_module("dcgen_kernels.ops.channel_rms_norm")
for memory_format in (torch.contiguous_format, torch.channels_last):  # a DC-AE decoder stage, 4K image
    x = torch.empty(1, 512, 256, 256, dtype=torch.bfloat16).to(memory_format=memory_format)
    w = torch.empty(512, dtype=torch.bfloat16)
    m._launch_triton(x, w, w, torch.empty_like(x), 1e-5)
print(json.dumps(stats))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_both_layouts_compile_for_sm90_without_spills_and_with_vector_stores():
    from tests.helpers import compile_launchers_for_sm90

    stats = compile_launchers_for_sm90(_LAUNCHES)
    assert [s["kernel"] for s in stats] == ["channel_rms_norm_kernel"] * 2
    assert all(s["spills"] == 0 and s["scalar_stores"] == 0 for s in stats), stats


def test_unavailable_backend_warns_once_and_falls_back():
    x, w, b, r = make_inputs()
    with pytest.warns(RuntimeWarning, match="cuda backend cannot serve") as caught:
        outs = [channel_rms_norm(x, w, b, r, backend="cuda") for _ in range(2)]
    assert len(caught) == 1  # one-time
    assert all(rel_l2(o, channel_rms_norm_reference(x, w, b, r)) <= 1e-6 for o in outs)
