import warnings

import pytest
import torch
import torch.nn.functional as F

from dcgen_kernels import _backend
from dcgen_kernels.ops.ada_layer_norm import (
    TRITON_MAX_CHANNELS, ada_layer_norm_modulate, ada_layer_norm_modulate_into, ada_layer_norm_modulate_reference,
    gated_residual, gated_residual_ada_layer_norm_modulate, gated_residual_ada_layer_norm_modulate_fp8,
    gated_residual_ada_layer_norm_modulate_reference, gated_residual_into, gated_residual_reference,
)
from tests.helpers import TOLERANCE, rel_l2


def activations(B=2, N=37, C=200, dtype=torch.bfloat16, device="cpu"):
    """A (B, N, C) view with a row stride > C, like one half of a fused projection's output."""
    return torch.randn(B, N, 2 * C, device=device).to(dtype)[..., C:]


def modulation(layout, B=2, C=200, dtype=torch.bfloat16, device="cpu"):
    """(shift, scale, gate) views as the models chunk them: strided, never copied."""
    if layout == "sana":  # (scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1): (B, 1, C)
        return (torch.randn(6, C, device=device) / 4 + torch.randn(B, 6, C, device=device) / 4).to(dtype).chunk(6, 1)[:3]
    if layout == "flux":  # AdaLayerNormZero: emb.chunk(6, dim=1): (B, C)
        return torch.randn(B, 6 * C, device=device).div(4).to(dtype).chunk(6, dim=1)[:3]
    return tuple(torch.randn(1, 1, C, device=device).div(4).to(dtype) for _ in range(3))  # broadcast over batch


def diffusers_modulate(x, scale, shift, weight=None, bias=None, eps=1e-6):
    scale, shift = (t[:, None] if t.dim() == 2 else t for t in (scale, shift))
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps) * (1 + scale) + shift


# --------------------------------------------------------------------------------------------- reference
def test_reference_equals_flux_ada_layer_norm_zero_modules():
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

    x, emb = torch.randn(2, 13, 64), torch.randn(2, 64)
    for module in (AdaLayerNormZero(64), AdaLayerNormZeroSingle(64)):
        with torch.no_grad():
            expected, gate = module(x, emb=emb)[:2]
            shift, scale, _ = module.linear(F.silu(emb)).chunk(6 if isinstance(module, AdaLayerNormZero) else 3,
                                                               dim=1)[:3]
            assert rel_l2(ada_layer_norm_modulate_reference(x, scale, shift), expected) < 1e-6
            residual, branch = torch.randn(2, 13, 64), torch.randn(2, 13, 64)
            assert rel_l2(gated_residual_reference(residual, gate, branch),
                          residual + gate.unsqueeze(1) * branch) < 1e-6


@pytest.mark.parametrize("flux_norm_out", [True, False], ids=["flux_norm_out", "class_defaults"])
def test_reference_equals_ada_layer_norm_continuous(flux_norm_out):
    from diffusers.models.normalization import AdaLayerNormContinuous

    kwargs = dict(elementwise_affine=False, eps=1e-6) if flux_norm_out else {}  # defaults: affine + bias, eps 1e-5
    module = AdaLayerNormContinuous(64, 32, **kwargs)
    for p in module.norm.parameters():
        torch.nn.init.uniform_(p, 0.5, 1.5)
    x, cond = torch.randn(2, 13, 64), torch.randn(2, 32)
    with torch.no_grad():
        scale, shift = module.linear(F.silu(cond)).chunk(2, dim=1)  # (scale, shift): this order
        ours = ada_layer_norm_modulate_reference(x, scale, shift, module.norm.weight, module.norm.bias,
                                                 module.norm.eps)
        assert rel_l2(ours, module(x, cond)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_no_less_accurate_than_diffusers(dtype):
    """diffusers rounds after each half-precision op (norm, 1 + scale, product, sum); the op rounds once."""
    x = activations(C=256, dtype=torch.float32)
    shift, scale, _ = modulation("flux", C=256, dtype=torch.float32)
    truth = diffusers_modulate(x, scale, shift)
    half = [t.to(dtype) for t in (x, scale, shift)]
    # The interpreter truncates bf16 stores where the GPU rounds to nearest: check the bf16 rounding on the reference.
    backend = "reference" if dtype == torch.bfloat16 else "triton"
    assert rel_l2(ada_layer_norm_modulate(*half, backend=backend), truth) < rel_l2(diffusers_modulate(*half), truth)


@pytest.mark.gpu
def test_gpu_bf16_kernel_is_no_less_accurate_than_diffusers():
    """The bf16 half of the test above on the compiled kernel, whose stores round to nearest."""
    x = activations(N=300, C=2240, dtype=torch.float32, device="cuda")
    shift, scale, _ = modulation("sana", C=2240, dtype=torch.float32, device="cuda")
    truth = diffusers_modulate(x, scale, shift)
    half = [t.bfloat16() for t in (x, scale, shift)]
    assert rel_l2(ada_layer_norm_modulate(*half, backend="triton"), truth) < rel_l2(diffusers_modulate(*half), truth)


# --------------------------------------------------------------------------------------------- triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["sana", "flux", "broadcast"])
def test_triton_modulate_matches_reference(dtype, layout):
    x = activations(dtype=dtype)
    shift, scale, _ = modulation(layout, dtype=dtype)
    out = torch.full((2, 37, 200), float("nan"), dtype=dtype)
    ada_layer_norm_modulate_into(x, scale, shift, None, None, 1e-6, out)
    assert rel_l2(out, ada_layer_norm_modulate_reference(x, scale, shift)) <= max(TOLERANCE[dtype] / 2, 1e-6)


@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.bfloat16], ids=["fp32_mod", "bf16_mod"])
def test_triton_modulate_affine_norm_and_mixed_dtypes(mod_dtype):
    x = activations(C=96, dtype=torch.bfloat16)
    shift, scale, _ = modulation("flux", C=96, dtype=mod_dtype)
    weight, bias = torch.rand(96).add(0.5), torch.randn(96)
    out = ada_layer_norm_modulate(x, scale, shift, norm_weight=weight, norm_bias=bias, eps=1e-5, backend="triton")
    expected = ada_layer_norm_modulate_reference(x, scale, shift, weight, bias, 1e-5)
    assert out.dtype == torch.bfloat16 and rel_l2(out, expected) <= TOLERANCE[torch.bfloat16] / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["sana", "flux", "broadcast"])
def test_triton_gated_residual_matches_reference(dtype, layout):
    residual, x = activations(C=300, dtype=dtype), activations(C=300, dtype=dtype)
    _, _, gate = modulation(layout, C=300, dtype=dtype)
    out = torch.full((2, 37, 300), float("nan"), dtype=dtype)
    gated_residual_into(residual, gate, x, out)
    assert rel_l2(out, gated_residual_reference(residual, gate, x)) <= max(TOLERANCE[dtype] / 2, 1e-6)


def test_gated_residual_output_dtype_follows_residual():
    residual, x = activations(dtype=torch.float32), activations(dtype=torch.bfloat16)
    gate = modulation("flux", dtype=torch.bfloat16)[2]
    out = gated_residual(residual, gate, x, backend="triton")
    assert out.dtype == torch.float32 and rel_l2(out, gated_residual_reference(residual, gate, x)) < 1e-6


def test_empty_sequence():
    x = torch.randn(2, 0, 64)
    shift, scale, gate = modulation("flux", C=64, dtype=torch.float32)
    assert ada_layer_norm_modulate(x, scale, shift, backend="triton").shape == (2, 0, 64)
    assert gated_residual(x, gate, x, backend="triton").shape == (2, 0, 64)


# --------------------------------------------------------------------------------------------- validation
def _mod_args():
    x = activations()
    shift, scale, gate = modulation("sana")
    return x, scale, shift, gate


@pytest.mark.parametrize("call,error,match", [
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x[0], sc, sh), ValueError, "x must have 3 dimensions"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x.int(), sc, sh), TypeError, "x must have dtype"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x.transpose(1, 2), sc, sh), ValueError, "x must be contiguous"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x[..., :0], sc[..., :0], sh[..., :0]), ValueError,
     "x must have at least one channel"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, "s", sh), TypeError, "scale must be a torch.Tensor"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc[..., :-1], sh), ValueError, r"scale must have shape \(B, C\)"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, sh.expand(2, 3, 200)), ValueError, "shift must have shape"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, sh[0, 0]), ValueError, "shift must have shape"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc.repeat(3, 1, 1), sh), ValueError, "scale must have shape"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc.to("meta"), sh), ValueError, "scale must be on device"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, torch.randn(2, 1, 400)[..., ::2]), ValueError,
     "shift must be contiguous in its last dimension"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, sh, norm_weight=torch.ones(3)), ValueError,
     r"norm_weight must have shape \(200,\)"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, sh, norm_bias=torch.ones(200).long()), TypeError,
     "norm_bias must have dtype"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, sh, eps=0.0), ValueError, "eps must be a positive float"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, sh, eps=float("inf")), ValueError, "eps must be a posit"),
    (lambda x, sc, sh, g: gated_residual(x, g[0, 0, 0], x), ValueError, "gate must have shape"),
    (lambda x, sc, sh, g: ada_layer_norm_modulate(x, sc, sh, backend="gpu"), ValueError, "backend must be one of"),
    (lambda x, sc, sh, g: gated_residual(x, g, x[:, :-1]), ValueError, "x must have the same shape as residual"),
    (lambda x, sc, sh, g: gated_residual(x, g, x.to("meta")), ValueError, "x must be on device"),
    (lambda x, sc, sh, g: gated_residual(x.half().int(), g, x), TypeError, "residual must have dtype"),
    (lambda x, sc, sh, g: gated_residual(x, g[:, :, :5], x), ValueError, "gate must have shape"),
    (lambda x, sc, sh, g: gated_residual(x, g, x, backend=None), TypeError, "backend must be one of"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*_mod_args())


# --------------------------------------------------------------------------------------------- backends
def test_explicit_backend_falls_back_with_one_warning():
    C = TRITON_MAX_CHANNELS + 8
    x, scale, shift = torch.randn(1, 3, C), torch.randn(1, C), torch.randn(1, C)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="triton backend cannot serve.*channels"):
        out = ada_layer_norm_modulate(x, scale, shift, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ada_layer_norm_modulate(x, scale, shift, backend="triton")  # second call: silent
    assert rel_l2(out, ada_layer_norm_modulate_reference(x, scale, shift)) < 1e-6


def test_gated_residual_has_no_cuda_backend_and_says_so_once():
    x, _, _, gate = _mod_args()
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="no cuda backend.*falling back to triton"):
        out = gated_residual(x, gate, x, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gated_residual(x, gate, x, backend="cuda")
    assert rel_l2(out, gated_residual_reference(x, gate, x)) <= TOLERANCE[torch.bfloat16] / 2


# --------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("layout", ["sana", "flux"])
def test_gradients_match_diffusers_math(layout):
    x = activations(C=64, dtype=torch.float32)
    shift, scale, gate = modulation(layout, C=64, dtype=torch.float32)
    weight, bias = torch.rand(64).add(0.5), torch.randn(64)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, scale, shift, gate, weight, bias)]
    branch = torch.randn(2, 37, 64, requires_grad=True)
    grad = torch.randn(2, 37, 64)

    def run(modulate, gated):
        lx, lsc, lsh, lg, lw, lb = leaves
        y = gated(lx, lg, modulate(lx, lsc, lsh, lw, lb) * branch)
        return torch.autograd.grad(y, leaves + [branch], grad)

    ours = run(lambda *a: ada_layer_norm_modulate(*a[:3], norm_weight=a[3], norm_bias=a[4], backend="triton"),
               lambda r, g, b: gated_residual(r, g, b, backend="triton"))
    theirs = run(diffusers_modulate, lambda r, g, b: r + (g[:, None] if g.dim() == 2 else g) * b)
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(ours, theirs))


# --------------------------------------------------------------------------------------------- compile
def test_ops_trace_in_torch_compile_without_graph_breaks():
    x = activations(C=64, dtype=torch.float32)
    shift, scale, gate = modulation("sana", C=64, dtype=torch.float32)

    def block(x, scale, shift, gate):
        return gated_residual(x, gate, ada_layer_norm_modulate(x, scale, shift, backend="triton") * 2)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected = gated_residual_reference(x, gate, 2 * ada_layer_norm_modulate_reference(x, scale, shift))
    assert rel_l2(compiled(x, scale, shift, gate), expected) < 1e-6


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = activations(dtype=torch.bfloat16)
        shift, scale, gate = modulation("flux", dtype=torch.float32)
        out = gated_residual(x, gate, ada_layer_norm_modulate(x, scale, shift))
    assert out.shape == (2, 37, 200) and out.dtype == torch.bfloat16 and out.is_contiguous()


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("model,B,N,C", [("flux", 1, 4608, 3072), ("sana", 2, 4096, 2240), ("sana", 1, 4099, 2232)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_triton_at_model_shapes(model, B, N, C, dtype):
    x = activations(B, N, C, dtype=dtype, device="cuda")
    shift, scale, gate = modulation(model, B=B, C=C, dtype=dtype, device="cuda")
    out = torch.full((B, N, C), float("nan"), dtype=dtype, device="cuda")
    ada_layer_norm_modulate_into(x, scale, shift, None, None, 1e-6, out)
    assert rel_l2(out, ada_layer_norm_modulate_reference(x, scale, shift)) <= TOLERANCE[dtype] / 2
    branch = torch.randn(B, N, C, device="cuda").to(dtype)
    out.fill_(float("nan"))
    gated_residual_into(x, gate, branch, out)
    assert rel_l2(out, gated_residual_reference(x, gate, branch)) <= TOLERANCE[dtype] / 2


# --------------------------------------------------------------------------------------------- fp8 output
@pytest.mark.parametrize("layout", ["flux", "sana", "broadcast"])
@pytest.mark.parametrize("affine", [False, True])
def test_modulate_fp8_triton_matches_reference(layout, affine):
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8, ada_layer_norm_modulate_fp8_reference

    x = activations()
    shift, scale, _ = modulation(layout)
    weight, bias = (torch.rand(200) + 0.5, torch.randn(200) / 4) if affine else (None, None)
    got = ada_layer_norm_modulate_fp8(x, scale, shift, norm_weight=weight, norm_bias=bias, backend="triton")
    q, row_scale = ada_layer_norm_modulate_fp8_reference(x, scale, shift, weight, bias)
    assert got.data.dtype == torch.float8_e4m3fn and got.data.shape == x.shape and got.dtype == x.dtype
    assert got.scale.shape == x.shape[:2]
    # The kernel's fp32 statistics equal F.layer_norm's up to summation order: scales agree to fp32 rounding and
    # a value sitting on a rounding boundary may land one E4M3 step away, rarely.
    torch.testing.assert_close(got.scale, row_scale, rtol=1e-6, atol=0)
    differ = got.data.view(torch.uint8) != q.view(torch.uint8)
    assert differ.float().mean() < 2e-3
    assert ((got.data.float() - q.float()).abs() <= q.float().abs() / 8 + 2.0**-9).all()


def test_modulate_fp8_triton_keeps_a_nan_row_nan():
    """A NaN in a row (an fp16 overflow upstream) gives that row a NaN scale and NaN data, as the reference: not a
    finite scale with plausible values (tl.max drops NaN)."""
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8, ada_layer_norm_modulate_fp8_reference

    x = activations()
    x[0, 3, 7] = float("nan")
    shift, scale, _ = modulation("flux")
    got = ada_layer_norm_modulate_fp8(x, scale, shift, backend="triton")
    q, row_scale = ada_layer_norm_modulate_fp8_reference(x, scale, shift)
    assert got.scale[0, 3].isnan() and row_scale[0, 3].isnan()
    assert torch.equal(got.data.float().isnan(), q.float().isnan()) and q.float().isnan()[0, 3].all()
    torch.testing.assert_close(got.scale, row_scale, rtol=1e-6, atol=0, equal_nan=True)


def test_modulate_fp8_dequantizes_close_to_bf16_op():
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8

    x = activations()
    shift, scale, _ = modulation("flux")
    got = ada_layer_norm_modulate_fp8(x, scale, shift, backend="triton").dequantize()
    expected = ada_layer_norm_modulate_reference(x, scale, shift)
    assert rel_l2(got, expected) < 0.04  # E4M3 keeps 3 mantissa bits: ~2.5% rel-L2 on Gaussian rows


def test_modulate_fp8_leaves_bf16_op_unchanged():
    x = activations()
    shift, scale, _ = modulation("flux")
    got = ada_layer_norm_modulate(x, scale, shift, backend="triton")
    assert got.dtype == x.dtype
    assert rel_l2(got, ada_layer_norm_modulate_reference(x, scale, shift)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_modulate_fp8_gpu_matches_reference():
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8, ada_layer_norm_modulate_fp8_reference

    x = activations(N=300, C=3072, device="cuda")
    shift, scale, _ = modulation("flux", C=3072, device="cuda")
    got = ada_layer_norm_modulate_fp8(x, scale, shift, backend="triton")
    q, row_scale = ada_layer_norm_modulate_fp8_reference(x, scale, shift)
    torch.testing.assert_close(got.scale, row_scale, rtol=1e-5, atol=0)
    assert ((got.data.float() - q.float()).abs() <= q.float().abs() / 8 + 2.0**-9).all()
    assert (got.data.view(torch.uint8) != q.view(torch.uint8)).float().mean() < 2e-3


def test_gated_residual_reference_output_is_contiguous_like_the_fake():
    residual, x = (torch.randn(5, 2, 64).transpose(0, 1) for _ in range(2))  # (B, N, C) views, batch-minor
    gate = torch.randn(2, 1, 64)
    torch.library.opcheck(torch.ops.dcgen.gated_residual.default, (residual, gate, x, "reference"),
                          test_utils=("test_faketensor",))


# --------------------------------------------------------------------------------------------- residual + adaLN
def _gated_modulate_args(layout="sana", dtype=torch.bfloat16, C=200, gated=True):
    residual, x = activations(C=C, dtype=dtype), activations(C=C, dtype=dtype)
    shift, scale, gate = modulation(layout, C=C, dtype=dtype)
    return residual, gate if gated else None, x, scale, shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["sana", "flux", "broadcast"])
def test_gated_modulate_triton_equals_the_two_ops(dtype, layout):
    """The fused kernel normalises the rounded sum it stores: the same bits as gated_residual then the modulation."""
    residual, gate, x, scale, shift = _gated_modulate_args(layout, dtype)
    total, out = gated_residual_ada_layer_norm_modulate(residual, gate, x, scale, shift, backend="triton")
    expected_total = gated_residual(residual, gate, x, backend="triton")
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    torch.testing.assert_close(out, ada_layer_norm_modulate(expected_total, scale, shift, backend="triton"),
                               rtol=0, atol=0)
    ref_total, ref_out = gated_residual_ada_layer_norm_modulate_reference(residual, gate, x, scale, shift)
    assert rel_l2(total, ref_total) <= max(TOLERANCE[dtype] / 2, 1e-6)
    assert rel_l2(out, ref_out) <= max(TOLERANCE[dtype] / 2, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ungated_modulate_triton_matches_reference(dtype):
    residual, _, x, scale, shift = _gated_modulate_args("sana", dtype, gated=False)
    weight, bias = torch.rand(200) + 0.5, torch.randn(200) / 4
    total, out = gated_residual_ada_layer_norm_modulate(residual, None, x, scale, shift, norm_weight=weight,
                                                        norm_bias=bias, eps=1e-5, backend="triton")
    ref_total, ref_out = gated_residual_ada_layer_norm_modulate_reference(residual, None, x, scale, shift, weight,
                                                                          bias, 1e-5)
    assert total.dtype == out.dtype == dtype and total.is_contiguous() and out.is_contiguous()
    assert rel_l2(total, ref_total) <= max(TOLERANCE[dtype] / 2, 1e-6)
    assert rel_l2(out, ref_out) <= max(TOLERANCE[dtype] / 2, 1e-6)


def test_gated_modulate_launcher_writes_every_element():
    """Poisoned outputs at a shape off the row and channel blocks (37 rows, 200 channels)."""
    from dcgen_kernels.ops.ada_layer_norm import _launch_modulate_triton

    residual, gate, x, scale, shift = _gated_modulate_args("flux", torch.float32)
    total, out = torch.full_like(residual, float("nan")), torch.full_like(residual, float("nan"))
    _launch_modulate_triton(residual, scale, shift, None, None, 1e-6, out, update=x, gate=gate, total=total)
    ref_total, ref_out = gated_residual_ada_layer_norm_modulate_reference(residual, gate, x, scale, shift)
    assert rel_l2(total, ref_total) < 1e-6 and rel_l2(out, ref_out) < 1e-6


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_gated_modulate_fp8_equals_the_two_ops(gated):
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8

    residual, gate, x, scale, shift = _gated_modulate_args("flux", gated=gated)
    total, act = gated_residual_ada_layer_norm_modulate_fp8(residual, gate, x, scale, shift, backend="triton")
    expected_total, _ = gated_residual_ada_layer_norm_modulate(residual, gate, x, scale, shift, backend="triton")
    expected = ada_layer_norm_modulate_fp8(expected_total, scale, shift, backend="triton")
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    assert act.dtype == residual.dtype and torch.equal(act.data.view(torch.uint8), expected.data.view(torch.uint8))
    torch.testing.assert_close(act.scale, expected.scale, rtol=0, atol=0)


def test_gated_modulate_gradients_match_the_two_ops():
    residual, gate, x, scale, shift = (t.float().detach().requires_grad_(True)
                                       for t in _gated_modulate_args("sana", C=64))
    leaves = [residual, gate, x, scale, shift]
    weights = torch.randn(2, 37, 64), torch.randn(2, 37, 64)

    def grads(fn):
        total, out = fn()
        return torch.autograd.grad((total * weights[0]).sum() + (out * weights[1]).sum(), leaves)

    fused = grads(lambda: gated_residual_ada_layer_norm_modulate(residual, gate, x, scale, shift, backend="triton"))
    total = gated_residual(residual, gate, x, backend="triton")
    two = grads(lambda: (total, ada_layer_norm_modulate(total, scale, shift, backend="triton")))
    assert all(rel_l2(a, b) < 1e-6 for a, b in zip(fused, two))


@pytest.mark.parametrize("call,error,match", [
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r[0], g, x, sc, sh), ValueError,
     "residual must have 3 dimensions"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r, g, x[:, :-1], sc, sh), ValueError,
     "x must have the same shape as residual"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r, g[..., :5], x, sc, sh), ValueError,
     "gate must have shape"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r, g, x, sc[..., :-1], sh), ValueError,
     "scale must have shape"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate_fp8(r, g, x, sc, sh, eps=-1.0), ValueError,
     "eps must be a positive float"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r.int(), g, x, sc, sh), TypeError,
     "residual must have dtype"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r, g, x.to("meta"), sc, sh), ValueError,
     "x must be on device"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate_fp8(r, g.to("meta"), x, sc, sh), ValueError,
     "gate must be on device"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r, g, x.transpose(1, 2), sc, sh), ValueError,
     "x must be contiguous in its last dimension"),
    (lambda r, g, x, sc, sh: gated_residual_ada_layer_norm_modulate(r, g, x, sc, sh, backend="gpu"), ValueError,
     "backend must be one of"),
])
def test_gated_modulate_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*_gated_modulate_args())


def test_gated_modulate_traces_in_torch_compile_and_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = [t.float() for t in _gated_modulate_args("flux")]
    compiled = torch.compile(lambda *a: gated_residual_ada_layer_norm_modulate(*a, backend="triton"),
                             fullgraph=True, backend="aot_eager")
    expected = gated_residual_ada_layer_norm_modulate_reference(*args)
    assert all(rel_l2(a, b) < 1e-6 for a, b in zip(compiled(*args), expected))
    with FakeTensorMode():
        total, act = gated_residual_ada_layer_norm_modulate_fp8(*_gated_modulate_args("flux"))
    assert total.shape == act.data.shape == (2, 37, 200) and act.scale.shape == (2, 37)
    assert total.dtype == torch.bfloat16 and act.data.dtype == torch.float8_e4m3fn


@pytest.mark.gpu
@pytest.mark.parametrize("model,B,N,C", [("flux", 1, 4608, 3072), ("sana", 2, 4096, 2240), ("sana", 1, 4099, 2232)])
def test_gpu_gated_modulate_equals_the_two_ops(model, B, N, C):
    """The sum bit for bit; the normalised rows as accurate as the two ops'. Not bit for bit on a GPU: in H100 run
    F, 69 of 9.1M bf16 outputs differed from the two ops' at C = 2232 (the interpreter is bit-equal)."""
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8

    residual, x = (activations(B, N, C, device="cuda") for _ in range(2))
    shift, scale, gate = modulation(model, B=B, C=C, device="cuda")
    gate = gate if model == "flux" else None  # SANA's cross-attention residual is ungated
    total, out = gated_residual_ada_layer_norm_modulate(residual, gate, x, scale, shift, backend="triton")
    expected_total = (gated_residual(residual, gate, x, backend="triton") if gate is not None
                      else (residual + x))  # a bf16 add rounds its fp32 sum once, as the kernel does
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    two_ops = ada_layer_norm_modulate(total, scale, shift, backend="triton")
    exact = ada_layer_norm_modulate_reference(total.float(), scale.float(), shift.float())
    assert (out != two_ops).float().mean() < 1e-4
    assert rel_l2(out, exact) <= 1.01 * rel_l2(two_ops, exact)
    _, act = gated_residual_ada_layer_norm_modulate_fp8(residual, gate, x, scale, shift, backend="triton")
    two_ops_fp8 = ada_layer_norm_modulate_fp8(total, scale, shift, backend="triton")
    assert (act.data.view(torch.uint8) != two_ops_fp8.data.view(torch.uint8)).float().mean() < 1e-4
    assert torch.equal(act.scale, two_ops_fp8.scale) or rel_l2(act.scale, two_ops_fp8.scale) < 1e-6


_MODULATE_LAUNCHES = r'''
a = importlib.import_module("dcgen_kernels.ops.ada_layer_norm")
E = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype)
for B, N, C in ((1, 4608, 3072), (2, 4096, 2240)):  # FLUX image stream, SANA-1.6B
    x, mod = E(B, N, C), E(B, 1, C)
    a._launch_modulate_triton(x, mod, mod, None, None, 1e-6, E(B, N, C))
    a._launch_modulate_triton(x, mod, mod, None, None, 1e-6, E(B, N, C), update=E(B, N, C), gate=mod, total=E(B, N, C))
    a._launch_modulate_triton(x, mod, mod, None, None, 1e-6, E(B, N, C, dtype=torch.float8_e4m3fn),
                              E(B, N, dtype=torch.float32), update=E(B, N, C), total=E(B, N, C))
print(json.dumps(stats))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_modulate_launches_compile_for_sm90_without_spills():
    """The plain, fused-residual and fused-residual FP8 modulation at FLUX and SANA widths compile for sm_90a
    (Triton's bundled ptxas) with no register spills: a whole row stays in registers."""
    from tests.helpers import compile_launchers_for_sm90

    stats = compile_launchers_for_sm90(_MODULATE_LAUNCHES)
    assert len(stats) == 6 and all(s["kernel"] == "ada_layer_norm_modulate_kernel" for s in stats), stats
    assert all(s["spills"] == 0 for s in stats), stats


def test_triton_uses_the_given_eps():
    """eps matters where the variance is of its order: activations ~1e-2 (variance 1e-4) with eps 1e-3."""
    x = activations(dtype=torch.float32) * 1e-2
    shift, scale, gate = modulation("flux", dtype=torch.float32)
    out = ada_layer_norm_modulate(x, scale, shift, eps=1e-3, backend="triton")
    assert rel_l2(out, ada_layer_norm_modulate_reference(x, scale, shift, eps=1e-3)) < 1e-5
    assert rel_l2(out, ada_layer_norm_modulate_reference(x, scale, shift, eps=1e-6)) > 0.1
    out = gated_residual_ada_layer_norm_modulate(x, gate, x, scale, shift, eps=1e-3, backend="triton")[1]
    expected = gated_residual_ada_layer_norm_modulate_reference(x, gate, x, scale, shift, eps=1e-3)[1]
    assert rel_l2(out, expected) < 1e-5


# --------------------------------------------------------------------------------------------- from a mutation review
def test_scale_and_shift_of_different_batch_layouts():
    """scale broadcast over the batch (stride 0) beside a per-batch shift, and the other way round."""
    x = torch.randn(2, 5, 24)
    scale, shift = torch.randn(1, 24) / 4, torch.randn(2, 1, 24) / 4
    for s, t in ((scale, shift), (shift, scale)):
        out = ada_layer_norm_modulate(x, s, t, backend="triton")
        assert rel_l2(out, ada_layer_norm_modulate_reference(x, s, t)) < 1e-6


def test_weight_only_and_bias_only_norms():
    x = torch.randn(2, 5, 24)
    scale, shift = torch.randn(2, 24) / 4, torch.randn(2, 24) / 4
    weight, bias = torch.rand(24) + 0.5, torch.randn(24)
    for affine in (dict(norm_weight=weight), dict(norm_bias=bias)):
        out = ada_layer_norm_modulate(x, scale, shift, backend="triton", **affine)
        expected = ada_layer_norm_modulate_reference(x, scale, shift, affine.get("norm_weight"),
                                                     affine.get("norm_bias"))
        assert rel_l2(out, expected) < 1e-6


def test_fp8_row_that_modulates_to_zero_gets_the_floor_scale():
    """scale = -1, shift = 0: every modulated row is 0; its scale is the amax floor's, finite, as the reference."""
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8, ada_layer_norm_modulate_fp8_reference

    x = torch.randn(1, 3, 32)
    scale, shift = -torch.ones(1, 32), torch.zeros(1, 32)
    act = ada_layer_norm_modulate_fp8(x, scale, shift, backend="triton")
    codes, row_scale = ada_layer_norm_modulate_fp8_reference(x, scale, shift)
    assert torch.isfinite(act.scale).all() and torch.equal(act.scale, row_scale)
    assert torch.equal(act.data.float(), codes.float())


def test_fake_outputs_shapes_and_dtypes():
    """What torch.compile traces: the FP8 producer's (B, N) fp32 row scales, and a gated residual (and the FP8
    activation after it) in the residual's dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8

    with FakeTensorMode():
        act = ada_layer_norm_modulate_fp8(torch.randn(2, 7, 32, dtype=torch.bfloat16), torch.zeros(2, 32),
                                          torch.zeros(2, 32))
        summed = gated_residual(torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 5, 8).bfloat16())
    assert act.data.shape == (2, 7, 32) and act.scale.shape == (2, 7) and act.scale.dtype == torch.float32
    assert summed.dtype == torch.float32
    residual, x = torch.randn(2, 5, 32), torch.randn(2, 5, 32).bfloat16()
    total, act = gated_residual_ada_layer_norm_modulate_fp8(residual, torch.randn(2, 32), x, torch.zeros(2, 32),
                                                            torch.zeros(2, 32), backend="triton")
    assert total.dtype == torch.float32 and act.dtype == torch.float32


def test_channel_limit_eps_types_and_one_warning_per_reason(monkeypatch):
    from dcgen_kernels.ops.ada_layer_norm import select_modulate_backend

    assert select_modulate_backend(torch.empty(1, 1, TRITON_MAX_CHANNELS), "auto") == "triton"
    x = torch.randn(1, 3, 8)
    ada_layer_norm_modulate(x, torch.zeros(1, 8), torch.zeros(1, 8), eps=1)  # an int eps is a number
    with pytest.raises(ValueError, match="eps must be a positive float"):
        ada_layer_norm_modulate(x, torch.zeros(1, 8), torch.zeros(1, 8), eps=True)
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning):
        select_modulate_backend(torch.empty(1, 1, TRITON_MAX_CHANNELS + 1), "triton")
    with warnings.catch_warnings():  # the same reason at another width: no second warning
        warnings.simplefilter("error")
        select_modulate_backend(torch.empty(1, 1, TRITON_MAX_CHANNELS + 808), "triton")
