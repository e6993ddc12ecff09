import sys

import pytest
import torch
import torch.nn.functional as F

from dcgen_kernels.ops.fp8_linear import (FP8_DTYPE, FP8Activation, dequantize_fp8, fp8_linear,
                                          fp8_linear_reference, quantize_fp8, quantize_fp8_reference,
                                          quantize_weight_fp8)
from tests.helpers import compile_launchers_for_sm90, rel_l2

fp8_module = sys.modules["dcgen_kernels.ops.fp8_linear"]

# Tolerances. Quantization codes: bit-exact between the Triton kernel and the reference (same fp32 arithmetic),
# except with GELU (exp-based tanh vs torch's differ by ulps, so a few codes sit one step apart). GEMM on the same
# quantized operands: the fp32 epilogue rounds once to the output dtype, so rel-L2 vs the reference is within one
# rounding of that dtype (bf16 1e-2 budget as elsewhere, fp32 1e-5, fp16 2e-3). End to end against the
# unquantized fp32 linear: E4M3 keeps 3 mantissa bits, ~2.5% per operand -> budget 6%.
GEMM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
QUANT_TOL = 0.06


def strided_rows(B=2, S=37, K=100, dtype=torch.bfloat16):
    """(B, S, K) view with a row stride > K: the image half of an attention output."""
    return torch.randn(B, S + 5, K).to(dtype)[:, 5:]


def codes(t):
    return t.view(torch.uint8)


# --------------------------------------------------------------------------------------------- reference
def test_reference_quantization_round_trip_and_format():
    x = torch.randn(5, 64) * torch.logspace(-3, 2, 5)[:, None]
    x[2] = 0  # an all-zero row keeps a finite scale and quantizes to zeros
    q, scale = quantize_fp8_reference(x)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (5,)
    assert torch.isfinite(scale).all() and (q[2].float() == 0).all()
    assert torch.equal(q.float().abs().amax(-1)[[0, 1, 3, 4]], torch.full((4,), 448.0))  # amax maps to 448
    assert rel_l2(dequantize_fp8(q, scale), x) < 0.04


def test_reference_linear_equals_dequantized_matmul():
    w = torch.randn(24, 40)
    wq, ws = quantize_weight_fp8(w)
    assert wq.shape == (24, 40) and ws.shape == (24,)
    xq, xs = quantize_fp8_reference(torch.randn(3, 7, 40))
    bias, gate, residual = torch.randn(24), torch.randn(3, 24), torch.randn(3, 7, 24)
    got = fp8_linear_reference(xq, xs, wq, ws, bias, gate, residual, True, torch.float32)
    y = F.gelu(dequantize_fp8(xq, xs) @ dequantize_fp8(wq, ws).T + bias, approximate="tanh")
    torch.testing.assert_close(got, residual + gate[:, None] * y, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- quantize kernel
@pytest.mark.parametrize("K", [100, 300])  # one read of the row / two sweeps (the interpreter's one-pass limit: 128)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_triton_bit_exact_on_strided_rows(dtype, K):
    x = strided_rows(K=K, dtype=dtype) * 3
    got = quantize_fp8(x, backend="triton")
    q, scale = quantize_fp8_reference(x)
    assert got.data.is_contiguous() and got.data.shape == x.shape and got.dtype == dtype
    assert torch.equal(got.scale, scale)
    assert torch.equal(codes(got.data), codes(q))


@pytest.mark.parametrize("K1,K2,n_chunks", [(0, 1, 1), (0, 2, 2), (1, 2, 3), (5, 19, 3), (0, 72, 3), (30, 98, 4)])
def test_quantize_triton_one_pass_chunks_write_every_column(K1, K2, n_chunks):
    """The one-pass kernel holds a row as 1-4 power-of-two chunks: every column of every chunk count is written
    (into poisoned NaN codes) and bit-exact, the chunk boundaries falling inside the prefix, x and the tail."""
    assert fp8_module._one_pass_config(K1 + K2)["N_CHUNKS"] == n_chunks
    x = strided_rows(K=K2) * 3
    prefix = torch.randn(2, 37, K1) * 3 if K1 else None
    q = torch.full((2, 37, K1 + K2), 0x7F, dtype=torch.uint8).view(FP8_DTYPE)
    scale = torch.full((2, 37), float("nan"))
    fp8_module._launch_quantize(x, prefix, False, q, scale)
    ref_q, ref_scale = quantize_fp8_reference(x, prefix)
    assert torch.equal(scale, ref_scale) and torch.equal(codes(q), codes(ref_q))


@pytest.mark.parametrize("K", [100, 300])
def test_quantize_triton_keeps_non_finite_rows_non_finite(K):
    """NaN / inf inputs (an fp16 overflow upstream) give the reference's NaN / inf scales and NaN data, never a
    finite scale with plausible values (tl.max and clamp drop NaN unless told not to); other rows stay exact."""
    x = torch.randn(4, K)
    x[0, 3], x[1, 2], x[2, K - 1] = float("nan"), float("inf"), -float("inf")
    got = quantize_fp8(x, backend="triton")
    q, scale = quantize_fp8_reference(x)
    assert scale[:3].isfinite().logical_not().all()
    torch.testing.assert_close(got.scale, scale, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.data.float().isnan(), q.float().isnan())
    assert torch.equal(codes(got.data)[3], codes(q)[3])


def test_quantize_triton_subnormals_and_ties():
    x = torch.randn(3, 300) * torch.logspace(-9, 0, 300)  # most values land in E4M3's subnormal range
    x[:, 0] = 448.0  # amax 448: scale 1, every value quantized as is, including exact ties
    x[0, 1:9] = torch.tensor([240.0 + 8, 256.0 + 16, 0.5 + 1 / 32, 1.0 + 1 / 16, -248.0, 2.0**-7 + 2.0**-10,
                              3 * 2.0**-10, 464.0 - 1e-3])
    x[1, 1:4] = torch.tensor([-0.0, -1e-30, -2.0**-11])  # signed zeros stay -0 (triton 3.6 compiles -x as 0 - x)
    got = quantize_fp8(x, backend="triton")
    q, _ = quantize_fp8_reference(x)
    assert torch.equal(codes(got.data), codes(q))


@pytest.mark.parametrize("K1", [20, 70])  # one read / two sweeps (the interpreter's one-pass limit: 128 = K1 + 100)
def test_quantize_triton_gelu_with_prefix(K1):
    x, prefix = strided_rows() * 3, torch.randn(2, 37, K1)
    got = quantize_fp8(x, prefix=prefix, gelu=True, backend="triton")
    q, scale = quantize_fp8_reference(x, prefix, gelu=True)
    assert got.data.shape == (2, 37, K1 + 100)
    torch.testing.assert_close(got.scale, scale, rtol=1e-6, atol=0)
    differ = codes(got.data) != codes(q)
    assert differ.float().mean() < 5e-3  # GELU ulps flip a rounding now and then, never further than one step
    assert ((got.data.float() - q.float()).abs() <= q.float().abs() / 8 + 2.0**-9).all()
    assert torch.equal(codes(got.data[..., :K1]), codes(q[..., :K1]))  # the prefix has no GELU: exact


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's -inf / inf
@pytest.mark.parametrize("K", [100, 300])
def test_quantize_triton_gelu_tails(K):
    """GELU far from zero: x below ~ -10 (2^w taken as inf, a +-0 result as on the GPU) gives the reference's -0
    codes, -inf its NaN (0.5 x (1 + tanh(u)) = -inf * 0), large x itself; a row of such values alone falls to the
    amax floor."""
    x = torch.randn(3, K) * 4
    tails = torch.tensor([-1e4, -30.0, -10.5, -9.5, -6.0, -0.0, 1e-3, 9.5, 30.0, 300.0])
    x[0, :10], x[1, :10] = tails, tails
    x[1, 10] = -float("inf")
    x[2] = -torch.linspace(10.5, 50.0, K)
    got = quantize_fp8(x, gelu=True, backend="triton")
    q, scale = quantize_fp8_reference(x, gelu=True)
    assert scale[1].isnan() and got.scale[1].isnan()
    torch.testing.assert_close(got.scale[[0, 2]], scale[[0, 2]], rtol=1e-6, atol=0)
    assert torch.equal(codes(got.data[0, :10]), codes(q[0, :10]))
    assert torch.equal(codes(got.data[2]), codes(q[2])) and (codes(q[2]) == 0x80).all()  # -0 everywhere
    assert got.data[1, 10].float().isnan()
    differ = codes(got.data[0]) != codes(q[0])
    assert differ.float().mean() < 0.02 and ((got.data[0].float() - q[0].float()).abs() <= q[0].float().abs() / 8
                                              + 2.0**-9).all()


def test_reference_gelu_keeps_the_negative_tail():
    """The float64 reference GELU is accurate where F.gelu's 1 + tanh(u) cancels even in float64 (x < ~ -6):
    values from 50-digit arithmetic (mpmath)."""
    got = fp8_module._gelu_tanh_reference(torch.tensor([-6.2, -7.2, -8.0, -9.0], dtype=torch.float64))
    expected = torch.tensor([-1.288354868057013e-11, -1.9994304684870026e-16, -3.1077829375011112e-21,
                             -1.3364595947348725e-28])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("K", [100, 300])
def test_quantize_triton_gelu_of_a_far_negative_row(K):
    """A row whose GELU values are all tiny (x in [-7.5, -6.3]: amax ~1e-11) is scaled by its own amax, so the
    tail's accuracy shows in every code: kernel and reference agree as anywhere else (the scale within fp32's
    rounding of the kernel's exponent, |w| ~ 40 here: ~|w| 2^-24 relative)."""
    x = -torch.linspace(6.3, 7.5, K)[None, :].repeat(3, 1)
    got = quantize_fp8(x, gelu=True, backend="triton")
    q, scale = quantize_fp8_reference(x, gelu=True)
    torch.testing.assert_close(got.scale, scale, rtol=1e-5, atol=0)
    assert (codes(got.data) != codes(q)).float().mean() < 0.02
    assert ((got.data.float() - q.float()).abs() <= q.float().abs() / 8 + 2.0**-9).all()


@pytest.mark.parametrize("K", [100, 300])
def test_quantize_triton_zero_and_tiny_rows_bit_exact(K):
    """An all-zero row (padding tokens) keeps a finite scale and zero codes (a zero amax would give 448 / 0 and NaN
    codes), and a row of amax ~1e-6 its own scale: both kernels, bit for bit with the reference."""
    x = torch.randn(4, K)
    x[1] = 0
    x[2] *= 1e-6
    got = quantize_fp8(x, backend="triton")
    q, scale = quantize_fp8_reference(x)
    assert torch.equal(got.scale, scale) and torch.equal(codes(got.data), codes(q))
    assert torch.isfinite(got.scale).all() and not got.data[1].float().any()


@pytest.mark.parametrize("K1", [20, 70])
def test_quantize_triton_prefix_sets_the_row_amax(K1):
    """FLUX single blocks: the attention half of [attention | GELU(mlp)] can hold the row's largest values; the
    scale must cover it (else it would be clamped at 448)."""
    x, prefix = strided_rows() * 0.1, torch.randn(2, 37, K1) * 10
    got = quantize_fp8(x, prefix=prefix, gelu=True, backend="triton")
    q, scale = quantize_fp8_reference(x, prefix, gelu=True)
    torch.testing.assert_close(got.scale, scale, rtol=1e-6, atol=0)
    assert torch.equal(codes(got.data[..., :K1]), codes(q[..., :K1]))


# --------------------------------------------------------------------------------------------- GEMM kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_triton_matches_reference(dtype):
    # M = 2 * 37, K = 100, N = 50: no dimension is a multiple of the 32-wide interpreter tiles.
    x = quantize_fp8(strided_rows(dtype=dtype), backend="reference")
    wq, ws = quantize_weight_fp8(torch.randn(50, 100))
    bias = torch.randn(50).to(dtype)
    got = fp8_linear(x, wq, ws, bias, backend="triton")
    expected = fp8_linear_reference(x.data, x.scale, wq, ws, bias, out_dtype=torch.float32)
    assert got.dtype == dtype and got.shape == (2, 37, 50)
    assert rel_l2(got, expected) <= GEMM_TOL[dtype]


@pytest.mark.parametrize("gate_shape", [(2, 50), (2, 1, 50), (1, 50)])
def test_linear_triton_fused_epilogue(gate_shape):
    x = quantize_fp8(strided_rows(), backend="reference")
    wq, ws = quantize_weight_fp8(torch.randn(50, 100) / 10)
    bias, gate = torch.randn(50).bfloat16(), torch.randn(*gate_shape).bfloat16()
    residual = torch.randn(2, 40, 50).bfloat16()[:, 3:]  # strided like a block's hidden states
    got = fp8_linear(x, wq, ws, bias, activation="gelu_tanh", gate=gate, residual=residual, backend="triton")
    expected = fp8_linear_reference(x.data, x.scale, wq, ws, bias, gate, residual, True, torch.float32)
    assert rel_l2(got, expected) <= GEMM_TOL[torch.bfloat16]


def test_linear_triton_strided_scales_and_bias():
    # The validation accepts any strides for the (M,) / (N,) vectors; the kernel indexes them with stride 1.
    x = quantize_fp8(torch.randn(45, 100), backend="reference")
    wq, ws = quantize_weight_fp8(torch.randn(60, 100))
    bias = torch.randn(120)[::2]
    strided = FP8Activation(x.data, torch.stack([x.scale, x.scale], 1)[:, 0], x.dtype)
    got = fp8_linear(strided, wq, torch.stack([ws, ws], 1)[:, 0], bias, backend="triton")
    expected = fp8_linear_reference(x.data, x.scale, wq, ws, bias, out_dtype=torch.float32)
    assert rel_l2(got, expected) <= GEMM_TOL[torch.float32]


def _cpu_scaled_mm_rowwise() -> bool:
    try:
        a = torch.zeros(16, 16).to(FP8_DTYPE)
        torch._scaled_mm(a, a.T, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_scaled_mm_rowwise(), reason="this torch has no row-wise torch._scaled_mm on CPU")
@pytest.mark.parametrize("gate_shape,with_residual,gelu", [(None, False, False), (None, True, True),
                                                          ((2, 48), False, True), ((2, 1, 48), True, False),
                                                          ((1, 48), True, True)])
@pytest.mark.parametrize("epilogue_dtype", [torch.bfloat16, torch.float32])
def test_cuda_backend_epilogue_through_cpu_scaled_mm(gate_shape, with_residual, gelu, epilogue_dtype):
    """The `cuda` backend's code (torch._scaled_mm with row-wise scales + the unfused epilogue), run on torch's
    CPU implementation of the same op: the GPU-only composition is checked here, the GEMM itself on the GPU.
    A gate or residual in fp32 still gives the bf16 output asked for."""
    x = quantize_fp8(strided_rows(K=64), backend="reference")
    wq, ws = quantize_weight_fp8(torch.randn(48, 64))
    bias = torch.randn(48).bfloat16()
    gate = torch.randn(*gate_shape).to(epilogue_dtype) if gate_shape else None
    residual = torch.randn(2, 40, 48).to(epilogue_dtype)[:, 3:] if with_residual else None
    got = fp8_module._linear_cublas(x.data, torch.stack([x.scale, x.scale], -1)[..., 0], wq, ws, bias, gate,
                                    residual, gelu, torch.bfloat16)
    expected = fp8_linear_reference(x.data, x.scale, wq, ws, bias, gate, residual, gelu, torch.float32)
    assert got.shape == (2, 37, 48) and got.dtype == torch.bfloat16
    assert rel_l2(got, expected) <= GEMM_TOL[torch.bfloat16]


def test_linear_triton_2d_residual():
    x = quantize_fp8(torch.randn(45, 100), backend="reference")
    wq, ws = quantize_weight_fp8(torch.randn(60, 100))
    residual = torch.randn(45, 70)[:, 5:65]  # row stride 70
    got = fp8_linear(x, wq, ws, residual=residual, backend="triton")
    expected = fp8_linear_reference(x.data, x.scale, wq, ws, residual=residual, out_dtype=torch.float32)
    assert rel_l2(got, expected) <= GEMM_TOL[torch.float32]


def test_linear_2d_and_quantize_on_the_fly_close_to_unquantized():
    x, w, bias = torch.randn(45, 100), torch.randn(60, 100), torch.randn(60)
    wq, ws = quantize_weight_fp8(w)
    got = fp8_linear(x, wq, ws, bias, backend="triton")
    assert got.shape == (45, 60) and got.dtype == torch.float32
    err = rel_l2(got, F.linear(x, w, bias))
    assert 1e-3 < err < QUANT_TOL  # quantized (not accidentally exact) yet close


def test_linear_auto_on_cpu_serves_and_empty_input():
    w, x = torch.randn(16, 32), torch.randn(4, 32).bfloat16()
    wq, ws = quantize_weight_fp8(w)
    got = fp8_linear(x, wq, ws)
    assert got.shape == (4, 16) and got.dtype == torch.bfloat16
    assert rel_l2(got, F.linear(x.float(), w)) < QUANT_TOL
    assert fp8_linear(torch.randn(2, 0, 32), wq, ws, backend="triton").shape == (2, 0, 16)


# --------------------------------------------------------------------------------------------- errors, fake
def test_bad_inputs_name_the_argument():
    wq, ws = quantize_weight_fp8(torch.randn(16, 32))
    x = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="weight must have shape"):
        fp8_linear(torch.randn(2, 3, 31), wq, ws)
    with pytest.raises(TypeError, match="weight must have dtype"):
        fp8_linear(x, wq.float(), ws)
    with pytest.raises(ValueError, match="gate must have shape"):
        fp8_linear(x, wq, ws, gate=torch.randn(2, 15))
    with pytest.raises(ValueError, match="gate needs"):
        fp8_linear(torch.randn(3, 32), wq, ws, gate=torch.randn(1, 16))
    with pytest.raises(ValueError, match="residual must have shape"):  # the kernel would read out of bounds
        fp8_linear(x, wq, ws, residual=torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match="bias must have shape"):
        fp8_linear(x, wq, ws, bias=torch.randn(15))
    with pytest.raises(ValueError, match="activation must be one of"):
        fp8_linear(x, wq, ws, activation="relu")
    with pytest.raises(ValueError, match="prefix must have"):
        quantize_fp8(x, prefix=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_fp8(x, backend="cutlass")
    act = quantize_fp8(x)
    with pytest.raises(ValueError, match=r"x.data must be a contiguous \(M, K\) or \(B, S, K\) tensor, got shape"):
        fp8_linear(FP8Activation(act.data[None], act.scale[None], act.dtype), wq, ws)
    with pytest.raises(TypeError, match=r"x.dtype \(the output dtype\) must be one of .*got torch.int32"):
        fp8_linear(FP8Activation(act.data, act.scale, torch.int32), wq, ws)
    with pytest.raises(ValueError, match=r"weight must be contiguous \(N, K\)"):
        fp8_linear(x, wq.t().contiguous().t(), ws)
    empty = FP8Activation(torch.empty(2, 0, dtype=FP8_DTYPE), torch.ones(2), torch.bfloat16)
    with pytest.raises(ValueError, match="K >= 1"):  # not zeros without the bias and residual
        fp8_linear(empty, torch.empty(4, 0, dtype=FP8_DTYPE), torch.ones(4), bias=torch.ones(4))


def test_fake_tensors_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    wq, ws = quantize_weight_fp8(torch.randn(16, 32))
    with FakeTensorMode() as mode:
        x = torch.empty(2, 3, 32, dtype=torch.bfloat16)
        fwq, fws = mode.from_tensor(wq), mode.from_tensor(ws)
        a = quantize_fp8(x, prefix=torch.empty(2, 3, 8), gelu=True)
        assert a.data.shape == (2, 3, 40) and a.data.dtype == FP8_DTYPE and a.scale.shape == (2, 3)
        out = fp8_linear(x, fwq, fws)
        assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("S,N,K", [(300, 384, 512), (333, 400, 528)])  # the second no multiple of the tiles
def test_linear_gpu_backends_match_reference(backend, S, N, K):
    x = quantize_fp8(torch.randn(2, S, K, device="cuda").bfloat16())
    wq, ws = quantize_weight_fp8(torch.randn(N, K, device="cuda"))
    bias, gate = torch.randn(N, device="cuda").bfloat16(), torch.randn(2, N, device="cuda").bfloat16()
    residual = torch.randn(2, S, N, device="cuda").bfloat16()
    got = fp8_linear(x, wq, ws, bias, gate=gate, residual=residual, backend=backend)
    expected = fp8_linear_reference(x.data, x.scale, wq, ws, bias, gate, residual, False, torch.float32)
    assert rel_l2(got, expected) <= GEMM_TOL[torch.bfloat16]


@pytest.mark.gpu
def test_quantize_gpu_bit_exact():
    x = torch.randn(3, 999, 3072, device="cuda").bfloat16()
    got = quantize_fp8(x, backend="triton")
    q, scale = quantize_fp8_reference(x)
    assert torch.equal(got.scale, scale) and torch.equal(codes(got.data), codes(q))


@pytest.mark.gpu
def test_quantize_gpu_non_finite_rows():
    x = torch.randn(3, 999, 3072, device="cuda").bfloat16()
    x[0, 1, 2], x[1, 3, 4] = float("nan"), float("inf")
    got = quantize_fp8(x, backend="triton")
    q, scale = quantize_fp8_reference(x)
    torch.testing.assert_close(got.scale, scale, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.data.float().isnan(), q.float().isnan())


@pytest.mark.gpu
def test_quantize_gpu_single_block_cat_and_gelu():
    # FLUX's single block: rows of cat([attention output, GELU(mlp)]) quantized in one pass (K 3072 + 12288).
    x = torch.randn(1, 999, 12288, device="cuda").bfloat16()
    prefix = torch.randn(1, 999, 3072, device="cuda").bfloat16()
    got = quantize_fp8(x, prefix=prefix, gelu=True, backend="triton")
    q, scale = quantize_fp8_reference(x, prefix, gelu=True)
    torch.testing.assert_close(got.scale, scale, rtol=1e-5, atol=0)  # GELU in fp32 vs the fp64 reference
    assert (codes(got.data) != codes(q)).float().mean() < 2e-3


@pytest.mark.gpu
def test_quantize_gpu_gelu_tails():
    """The GPU's approximate 2^w and division (ex2.approx.ftz, __fdividef) keep the reference's tails: -0 below
    x ~ -10, NaN for -inf, x for large x; elsewhere codes one rounding step apart at most, rarely."""
    x = (torch.randn(3, 999, 12288, device="cuda") * 6).bfloat16()
    x[0, :, :9] = torch.tensor([-1e4, -30.0, -10.5, -9.5, -6.0, -0.0, 9.5, 30.0, 300.0]).bfloat16().cuda()
    x[1, 0, 10] = -float("inf")
    x[2, 5] = -torch.linspace(10.5, 50.0, 12288, device="cuda").bfloat16()
    got = quantize_fp8(x, gelu=True, backend="triton")
    q, scale = quantize_fp8_reference(x, gelu=True)
    torch.testing.assert_close(got.scale, scale, rtol=1e-5, atol=0, equal_nan=True)
    assert scale[1, 0].isnan() and got.data[1, 0, 10].float().isnan()
    assert (codes(got.data[2, 5]) == 0x80).all() and torch.equal(codes(got.data[0, :, :9]), codes(q[0, :, :9]))
    finite = torch.ones_like(scale, dtype=torch.bool)
    finite[1, 0] = False
    assert (codes(got.data[finite]) != codes(q[finite])).float().mean() < 2e-3
    assert ((got.data[finite].float() - q[finite].float()).abs() <= q[finite].float().abs() / 8 + 2.0**-9).all()


def test_torch_compile_fullgraph_through_producer_and_fp8linear():
    """FP8Activation is a plain dataclass: dynamo carries it between the custom ops without graph breaks."""
    from dcgen_kernels.ops.ada_layer_norm import ada_layer_norm_modulate_fp8
    from dcgen_kernels.quant import FP8Linear

    layer = FP8Linear.from_linear(torch.nn.Linear(64, 32), backend="reference")

    def block(x, scale, shift, residual, gate):
        return layer(ada_layer_norm_modulate_fp8(x, scale, shift, backend="reference"), gate=gate,
                     residual=residual) + layer(x)

    args = (torch.randn(2, 5, 64), torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 5, 32), torch.randn(2, 32))
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), block(*args))


_SM90_COMPILE_SCRIPT = r'''
import inspect, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dcgen_kernels.triton_kernels.ada_layer_norm import ada_layer_norm_modulate_kernel
from dcgen_kernels.triton_kernels.fp8_linear import fp8_linear_kernel, quantize_fp8_rows_kernel

def compile_sm90(fn, types, const, div16, **options):
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in const else types.get(p, "i32") for p in params}
    # What the JIT specialises at launch for 16-aligned pointers and 16-divisible ints (FLUX shapes).
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

ptrs = dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", w_ptr="*fp8e4nv", w_scale_ptr="*fp32", bias_ptr="*bf16",
            gate_ptr="*bf16", residual_ptr="*bf16", out_ptr="*bf16")
gemm = compile_sm90(fp8_linear_kernel, ptrs,
                    dict(HAS_BIAS=True, GELU=True, HAS_GATE=True, HAS_RESIDUAL=True, BLOCK_M=128, BLOCK_N=128,
                         BLOCK_K=128, GROUP_M=8),
                    list(ptrs) + ["N", "K", "stride_am", "stride_wn", "residual_stride_b", "residual_stride_n",
                                  "stride_om"], num_warps=8, num_stages=4)
ttgir = gemm.asm["ttgir"]
quant = compile_sm90(quantize_fp8_rows_kernel, dict(prefix_ptr="*bf16", x_ptr="*bf16", q_ptr="*fp8e4nv",
                                                    scale_ptr="*fp32"),
                     dict(HAS_PREFIX=True, GELU=True, NATIVE_CAST=True, BLOCK_ROWS=4, BLOCK_C=1024), [],
                     num_warps=4)
norm = compile_sm90(ada_layer_norm_modulate_kernel,
                    dict(x_ptr="*bf16", update_ptr="*bf16", gate_ptr="*bf16", sum_ptr="*bf16", scale_ptr="*bf16",
                         shift_ptr="*bf16", weight_ptr="*bf16", bias_ptr="*bf16", out_ptr="*fp8e4nv",
                         row_scale_ptr="*fp32", eps="fp32"),
                    dict(BLOCK_ROWS=1, BLOCK_C=4096, HAS_WEIGHT=False, HAS_BIAS=False, HAS_UPDATE=False,
                         HAS_GATE=False, QUANT_FP8=True, NATIVE_CAST=True), [], num_warps=4)
cvt = "cvt.rn.satfinite.e4m3x2.f32"
print(json.dumps({"wgmma": ttgir.count("warp_group_dot"), "async_copies": ttgir.count("async_copy_global_to_local"),
                  "shared": gemm.metadata.shared, "quantize_cvt": quant.asm["ptx"].count(cvt),
                  "adaln_cvt": norm.asm["ptx"].count(cvt),
                  "gelu_ops": {op: quant.asm["ptx"].count(op) + gemm.asm["ptx"].count(op)
                               for op in ("ex2.approx.ftz.f32", "div.approx", "div.full", "ex2.approx.f32")}}))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_kernels_compile_for_sm90_offline():
    """Compile the FP8 kernels for sm_90 without a GPU (Triton's bundled ptxas), outside the interpreter: catches
    what the interpreter accepts but the compiler rejects, and checks the GEMM is a pipelined wgmma loop."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _SM90_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["wgmma"] >= 1 and stats["async_copies"] >= 2 * 3  # A and B tiles over >= 3 pipeline stages
    assert stats["shared"] >= 3 * 2 * 128 * 128  # >= 3 stages of two 128x128 fp8 tiles
    assert stats["quantize_cvt"] > 0 and stats["adaln_cvt"] > 0  # the producers use the hardware fp8 cast
    # GELU's power and division are single MUFU operations, without tl.exp's and `/`'s range fixups
    gelu = stats["gelu_ops"]
    assert gelu["ex2.approx.ftz.f32"] > 0 and gelu["div.approx"] > 0, gelu
    assert gelu["div.full"] == 0 and gelu["ex2.approx.f32"] == 0, gelu


_FP8_QUANTIZE_LAUNCHES = r'''
f = importlib.import_module("dcgen_kernels.ops.fp8_linear")
E = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype)
q = lambda *shape: (E(*shape, dtype=torch.float8_e4m3fn), E(*shape[:-1], dtype=torch.float32))
M = 4608
f._launch_quantize(E(M, 12288), None, True, *q(M, 12288))  # FFN down's input: GELU, one pass
f._launch_quantize(E(1, M, 12288), E(1, M, 3072), True, *q(1, M, 15360))  # single block: cat + GELU, one pass
f._launch_quantize(E(1, 4608, 3072)[:, 512:], None, False, *q(1, 4096, 3072))  # attention output, image half
f._launch_quantize(E(64, 40000), None, False, *q(64, 40000))  # wider than one pass: two sweeps
print(json.dumps(stats))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_quantize_launcher_configs_compile_for_sm90_without_spills():
    stats = compile_launchers_for_sm90(_FP8_QUANTIZE_LAUNCHES)
    assert [s["kernel"] for s in stats] == ["quantize_fp8_rows_one_pass_kernel"] * 3 + ["quantize_fp8_rows_kernel"]
    assert [s["warps"] for s in stats[:3]] == [16, 16, 4], stats
    assert all(s["spills"] == 0 for s in stats), stats


def test_unavailable_quantize_backend_warns_once_and_falls_back():
    x = torch.randn(5, 64)
    with pytest.warns(RuntimeWarning, match="cuda backend cannot serve") as caught:
        outs = [quantize_fp8(x, backend="cuda") for _ in range(2)]
    assert len(caught) == 1  # one-time
    q, scale = quantize_fp8_reference(x)
    assert all(torch.equal(codes(o.data), codes(q)) and torch.equal(o.scale, scale) for o in outs)


def test_fp8_linear_module_takes_any_leading_shape_like_nn_linear():
    from dcgen_kernels.quant import FP8Linear

    linear = torch.nn.Linear(64, 32)
    layer = FP8Linear.from_linear(linear, backend="reference")
    for x in (torch.randn(64), torch.randn(128)[::2], torch.randn(2, 3, 4, 64)):  # a strided 1-D one too
        out = layer(x)
        assert out.shape == x.shape[:-1] + (32,)
        assert rel_l2(out, linear(x).detach()) < QUANT_TOL
    x = torch.randn(2, 3, 4, 64)  # the activation applies whatever the leading shape; a residual is never dropped
    torch.testing.assert_close(layer(x, activation="gelu_tanh"),
                               layer(x.reshape(-1, 64), activation="gelu_tanh").reshape(2, 3, 4, 32))
    with pytest.raises(ValueError, match="x must be .M, K. or .B, S, K."):
        layer(x, residual=torch.randn(2, 3, 4, 32))


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((-1, 4), {}, ValueError, "in_features must be a positive int"),
    ((4, 2.0), {}, ValueError, "out_features must be a positive int"),
    ((0, 4), {}, ValueError, "in_features must be a positive int"),
    ((True, 4), {}, ValueError, "in_features must be a positive int"),
    ((4, 4), dict(dtype=torch.int32), TypeError, "dtype \\(of the bias\\) must be one of"),
])
def test_fp8_linear_module_bad_arguments_raise_clear_errors(args, kwargs, error, match):
    from dcgen_kernels.quant import FP8Linear

    with pytest.raises(error, match=match):
        FP8Linear(*args, **kwargs)


def test_fp8_linear_from_linear_takes_only_nn_linear():
    from dcgen_kernels.quant import FP8Linear

    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear, got Conv1d"):
        FP8Linear.from_linear(torch.nn.Conv1d(4, 4, 1))
    broken = torch.nn.Linear(4, 4)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"linear.weight holds non-finite values \(inf / NaN\)"):
        FP8Linear.from_linear(broken)
    with pytest.raises(TypeError, match=r"linear.weight has dtype torch.float64; quantization takes torch.float32"):
        FP8Linear.from_linear(torch.nn.Linear(4, 4).double())


@pytest.mark.parametrize("name", ["gate", "residual"])
@pytest.mark.parametrize("bad,error,match", [
    (torch.ones(2, 32, dtype=torch.float64), TypeError, "must have dtype in .*got torch.float64"),
    ([1.0], TypeError, "must be a torch.Tensor, got list"),
], ids=["float64", "list"])
def test_fp8_linear_module_names_a_bad_epilogue_operand(name, bad, error, match):
    """Named before the output dtype is promoted (a float64 residual was reported as x's dtype)."""
    from dcgen_kernels.quant import FP8Linear

    with pytest.raises(error, match=f"{name} {match}"):
        FP8Linear(64, 32)(torch.randn(2, 64), **{name: bad})


@pytest.mark.parametrize("x", [torch.randn(3, 48), torch.tensor(1.0), "x"], ids=["other_K", "0-dim", "str"])
def test_fp8_linear_module_names_its_input_width(x):
    from dcgen_kernels.quant import FP8Linear

    with pytest.raises(ValueError, match="x must have last dimension in_features=64"):
        FP8Linear(64, 32)(x)


def test_fp8_linear_module_follows_autocast_and_promotes_its_epilogue_as_stock():
    """As nn.Linear under autocast: the input cast, the output in the autocast dtype, an already quantized input
    standing for it. With a gate and residual, the dtype of stock's `residual + gate * linear(x)`."""
    from dcgen_kernels.quant import FP8Linear

    linear = torch.nn.Linear(64, 32)
    layer = FP8Linear.from_linear(linear, backend="reference")
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x).dtype == torch.bfloat16
        out = layer(x)
        quantized = layer(quantize_fp8(x, backend="reference"))  # produced from float32 rows
    assert out.dtype == quantized.dtype == torch.bfloat16
    assert torch.equal(out, layer(x.to(torch.bfloat16)))
    exact = linear(x).detach()
    assert rel_l2(out.float(), exact) < QUANT_TOL and rel_l2(quantized.float(), exact) < QUANT_TOL
    gate, residual = torch.randn(2, 32), torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x, gate=gate, residual=residual)
        expected = residual + gate[:, None] * layer(x)
    assert fused.dtype == expected.dtype == torch.float32
    assert rel_l2(fused, expected) < 1e-2  # y rounded to bf16 in `expected` only
    assert layer(x.to(torch.bfloat16), residual=residual).dtype == torch.float32  # without autocast too
