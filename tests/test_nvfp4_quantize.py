import math
import sys

import pytest
import torch

from dcgen_kernels.ops.nvfp4_quantize import (
    E2M1_VALUES, dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4,
    quantize_nvfp4_activations, quantize_nvfp4_activations_reference, quantize_nvfp4_reference,
)
from tests.helpers import rel_l2

BACKENDS = ["reference", "triton"]


def codes_of(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def assert_same_bytes(a: torch.Tensor, b: torch.Tensor) -> None:
    a8 = a.view(torch.uint8) if a.dtype != torch.uint8 else a
    b8 = b.view(torch.uint8) if b.dtype != torch.uint8 else b
    assert torch.equal(a8, b8), f"{(a8 != b8).sum().item()} of {a8.numel()} bytes differ"


# Group layout for exact rounding checks: global scale 1 and a 6 in every group make the group scale exactly 1,
# so each element is rounded as itself. (value, expected 4-bit code) pairs; ties must go to the even code.
ROUNDING_CASES = [
    (0.0, 0), (0.5, 1), (1.0, 2), (1.5, 3), (2.0, 4), (3.0, 5), (4.0, 6), (6.0, 7),
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),  # ties
    (0.2500001, 1), (0.7499999, 1), (1.2500001, 3), (1.7499999, 3), (2.5000002, 5), (3.4999998, 5),
    (5.0000005, 7), (0.1, 0), (5.9, 7), (1e-30, 0),
]


def rounding_input():
    values = [v for v, _ in ROUNDING_CASES]
    values += [-v for v in values]
    expected = [c for _, c in ROUNDING_CASES] + [c | 8 for _, c in ROUNDING_CASES]
    rows, codes = [], []
    for i in range(0, len(values), 15):  # 15 test values + one 6.0 per group
        chunk, chunk_codes = values[i:i + 15], expected[i:i + 15]
        pad = 15 - len(chunk)
        rows += chunk + [0.0] * pad + [6.0]
        codes += chunk_codes + [0] * pad + [7]
    return torch.tensor(rows).reshape(1, -1), torch.tensor(codes, dtype=torch.uint8).reshape(1, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_e2m1_rounding_all_values_and_ties(backend):
    x, expected_codes = rounding_input()
    packed, scales, gs = quantize_nvfp4(x, 1.0, backend=backend)
    assert float(gs) == 1.0
    assert torch.equal(scales.float(), torch.ones_like(scales.float()))
    assert torch.equal(codes_of(packed), expected_codes)
    # Low nibble first: the first byte holds element 0 in bits 0-3 and element 1 in bits 4-7.
    assert packed[0, 0].item() == expected_codes[0, 0].item() | (expected_codes[0, 1].item() << 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_gives_the_e2m1_grid(backend):
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # 32 codes: two groups
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 16)
    scales = torch.tensor([[1.0, 2.0]]).to(torch.float8_e4m3fn)
    out = dequantize_nvfp4(packed, scales, 0.5, backend=backend)
    expected = torch.cat([E2M1_VALUES * 0.5, E2M1_VALUES * 1.0]).reshape(1, 32)
    assert torch.equal(out, expected)
    assert torch.equal(torch.signbit(out), torch.signbit(expected))  # code 8 is -0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_scale_saturates_at_448(backend):
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 6.0e4, 3.0e4  # amax/6 = 1e4 >> 448 with global scale 1
    x[0, 16] = 6.0 * 500  # just above 448 * 6
    packed, scales, _ = quantize_nvfp4(x, 1.0, backend=backend)
    assert scales.float().tolist() == [[448.0, 448.0]]
    codes = codes_of(packed)[0]
    assert codes[0].item() == 7 and codes[1].item() == 7 and codes[16].item() == 7  # saturate to 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_negative_zero_and_underflow(backend):
    x = torch.zeros(2, 32)
    x[0, 3] = -0.0
    x[1, :16] = 1e-6  # group scale 1e-6/6 underflows E4M3 (min 2**-9) with global scale 1: zeros
    x[1, 16:] = -1e-6
    packed, scales, _ = quantize_nvfp4(x, 1.0, backend=backend)
    codes = codes_of(packed)
    assert scales.float().abs().max().item() == 0.0
    assert codes[0, 3].item() == 8 and codes[0].sum().item() == 8  # only the -0.0 has the sign bit
    assert torch.equal(codes[1, :16], torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(codes[1, 16:], torch.full((16,), 8, dtype=torch.uint8))
    out = dequantize_nvfp4(packed, scales, 1.0, backend=backend)
    assert out.abs().max().item() == 0.0 and torch.signbit(out[0, 3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_group_becomes_nan_others_intact(backend, bad):
    x = torch.randn(2, 48)
    clean = x.clone()
    x[1, 20] = bad
    gs = nvfp4_global_scale(x)
    assert math.isfinite(float(gs))  # the non-finite value is ignored by the automatic tensor scale
    assert float(gs) == float(nvfp4_global_scale(clean.index_fill(1, torch.tensor([20]), 0)))
    packed, scales, _ = quantize_nvfp4(x, gs, backend=backend)
    _, ref_scales, _ = quantize_nvfp4(clean, gs, backend="reference")
    assert scales.view(torch.uint8)[1, 1].item() == 0x7F
    assert torch.equal(codes_of(packed)[1, 16:32], torch.zeros(16, dtype=torch.uint8))
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 1] = False
    assert torch.equal(scales.view(torch.uint8)[keep], ref_scales.view(torch.uint8)[keep])
    out = dequantize_nvfp4(packed, scales, gs, backend=backend)
    assert out[1, 16:32].isnan().all() and not out[0].isnan().any() and not out[1, :16].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 80), (37, 100), (1, 16), (7, 9)])
def test_triton_quantize_matches_reference_bytes(shape, dtype):
    x = (torch.randn(shape) * torch.rand(shape[-1]) * 3).to(dtype)  # per-channel spread: many scale values
    ref = quantize_nvfp4(x, backend="reference")
    tri = quantize_nvfp4(x, backend="triton")
    k_pad = -(-shape[-1] // 16) * 16
    assert ref[0].shape == shape[:-1] + (k_pad // 2,) and ref[1].shape == shape[:-1] + (k_pad // 16,)
    assert_same_bytes(tri[0], ref[0])
    assert_same_bytes(tri[1], ref[1])
    deq_ref = dequantize_nvfp4(*ref, k=shape[-1], backend="reference")
    deq_tri = dequantize_nvfp4(*tri, k=shape[-1], backend="triton")
    assert deq_ref.shape == x.shape and torch.equal(deq_ref, deq_tri)
    # 4-bit round trip: the per-element error is at most half a grid step (1/4 of the value's binade, 1/12 of
    # the group max); on Gaussian data the relative L2 error of NVFP4 is ~0.1.
    err = rel_l2(deq_ref, x.float())
    assert 0.02 < err < 0.15, err


@pytest.mark.parametrize("shape", [(37, 100), (2, 3, 40), (5, 7)])
def test_triton_quantize_writes_every_byte_of_poisoned_buffers(shape):
    # Padding bytes, zero and underflowed groups must be written as zeros, not left as they were.
    x = torch.randn(shape) * 3
    x[..., :16] = 0.0  # a zero group
    quant_module = sys.modules["dcgen_kernels.ops.nvfp4_quantize"]
    ref_packed, ref_scales, gs = quantize_nvfp4(x, backend="reference")
    packed = torch.full_like(ref_packed, 0xFF)
    scales = torch.full(ref_scales.shape, 0xFF, dtype=torch.uint8).view(torch.float8_e4m3fn)
    quant_module._launch_quantize(x, None, None, gs, packed, scales, x.new_empty(*shape[:-1], 0))
    assert_same_bytes(packed, ref_packed)
    assert_same_bytes(scales, ref_scales)


def test_global_scale_maps_amax_to_448():
    x = torch.randn(4, 64)
    _, scales, gs = quantize_nvfp4(x, backend="reference")
    assert float(gs) == pytest.approx(x.abs().max().item() / (6 * 448), rel=1e-7)
    assert scales.float().max().item() == 448.0
    assert float(nvfp4_global_scale(torch.zeros(3, 16))) == 1.0


def test_global_scale_that_underflows_falls_back_to_one():
    x = torch.zeros(2, 32)
    x[0, 0], x[1, 17] = 1e-42, -1e-43  # amax / 2688 rounds to 0.0 in fp32
    assert float(nvfp4_global_scale(x)) == 1.0
    assert float(nvfp4_global_scale(torch.full((1, 16), 1e-40))) == pytest.approx(1e-40 / 2688, rel=1e-3)
    ref = quantize_nvfp4(x, backend="reference")
    tri = quantize_nvfp4(x, backend="triton")
    assert float(ref[2]) == float(tri[2]) == 1.0
    assert_same_bytes(tri[0], ref[0])
    assert_same_bytes(tri[1], ref[1])
    for backend in BACKENDS:  # our own output dequantizes: to zeros, the sign kept
        out = dequantize_nvfp4(*ref, backend=backend)
        assert out.abs().max().item() == 0.0 and torch.signbit(out[1, 17])


def test_scale_sign_bit_is_ignored_by_every_decoder():
    # Group scales are unsigned E4M3: a byte with the sign bit set (never written by the quantizer, possible in an
    # imported checkpoint) decodes as its low 7 bits in both backends.
    packed = torch.full((4, 8), 0x22, dtype=torch.uint8)  # every element 1.0
    scale_bytes = torch.tensor([[0xB8], [0x80], [0xC1], [0xFF]], dtype=torch.uint8)
    scales = scale_bytes.view(torch.float8_e4m3fn)
    expected = (scale_bytes & 0x7F).view(torch.float8_e4m3fn).float().expand(4, 16)
    for backend in BACKENDS:
        out = dequantize_nvfp4(packed, scales, 1.0, backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        assert not torch.signbit(out[:3]).any()
    assert out[0, 0].item() == 1.0 and out[3].isnan().all()


def test_scales_round_to_nearest_even_e4m3():
    # amax/6 = 1.0625 lies halfway between E4M3 1.0 and 1.125 -> even mantissa 1.0; 1.1875 -> 1.25 (even).
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 16] = 6 * 1.0625, 6 * 1.1875
    _, scales, _ = quantize_nvfp4_reference(x, torch.tensor(1.0))
    assert scales.float().tolist() == [[1.0, 1.25]]
    _, scales_t, _ = quantize_nvfp4(x, 1.0, backend="triton")
    assert_same_bytes(scales_t, scales)


@pytest.mark.parametrize("rank", [0, 5, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_quantizer_matches_reference(rank, dtype):
    M, K = 45, 88
    x = (torch.randn(M, K) * 2).to(dtype)
    x[:, 3] *= 40  # an outlier channel, tamed by smooth
    smooth = torch.rand(K) + 0.5
    smooth[3] = 20.0
    down = (torch.randn(K, rank) / K ** 0.5).to(dtype)
    gs = torch.tensor(0.01)
    ref = quantize_nvfp4_activations_reference(x, smooth, down, gs)
    tri = quantize_nvfp4_activations(x, smooth, down, gs, backend="triton")
    assert_same_bytes(tri[0], ref[0])
    assert_same_bytes(tri[1], ref[1])
    assert tri[2].shape == (M, rank) and tri[2].dtype == torch.float32
    if rank:
        assert rel_l2(tri[2], ref[2]) < 1e-5
    # The codes are those of x / smooth: the same bytes as quantizing the smoothed tensor directly.
    direct = quantize_nvfp4_reference(x.float() / smooth, gs)
    assert_same_bytes(ref[0], direct[0])


def test_triton_quantizers_read_strided_inputs_as_their_values():
    """A transposed x (last-dim stride != 1, as a caller may hand SVDQuantLinear) and a strided smooth give the bytes
    of their contiguous copies."""
    x = torch.randn(40, 37).t()  # (37, 40), column-major
    smooth_buffer = torch.rand(80) + 0.5
    smooth = smooth_buffer[::2]  # (40,), stride 2
    gs = torch.tensor(0.02)
    for got, expected in ((quantize_nvfp4(x, gs, backend="triton"), quantize_nvfp4(x.contiguous(), gs,
                                                                                   backend="triton")),
                          (quantize_nvfp4_activations(x, smooth, None, gs, backend="triton"),
                           quantize_nvfp4_activations(x.contiguous(), smooth.contiguous(), None, gs,
                                                      backend="triton"))):
        assert_same_bytes(got[0], expected[0])
        assert_same_bytes(got[1], expected[1])
    assert_same_bytes(quantize_nvfp4(x, gs, backend="triton")[0], quantize_nvfp4_reference(x.contiguous(), gs)[0])


def test_fused_quantizer_without_smooth_or_lora_equals_quantize():
    x = torch.randn(2, 3, 40)
    packed, scales, lora = quantize_nvfp4_activations(x, None, None, 0.02, backend="triton")
    assert lora.shape == (2, 3, 0)
    ref = quantize_nvfp4(x, 0.02, backend="reference")
    assert_same_bytes(packed, ref[0])
    assert_same_bytes(scales, ref[1])


def test_custom_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 40)
        packed, scales, lora = torch.ops.dcgen.nvfp4_quantize(x, None, torch.empty(40, 8), torch.empty(()), "auto")
        out = torch.ops.dcgen.nvfp4_dequantize(packed, scales, torch.empty(()), 40, torch.bfloat16, "auto")
    assert packed.shape == (5, 24) and scales.shape == (5, 3) and lora.shape == (5, 8)
    assert out.shape == (5, 40) and out.dtype == torch.bfloat16


def test_triton_dequantize_to_fp16_rounds_like_torch():
    # fp16 only: the interpreter truncates bf16 stores where a GPU rounds (the bf16 cast runs in the GPU tests).
    packed, scales, gs = quantize_nvfp4(torch.randn(6, 40) * 3, backend="reference")
    out = dequantize_nvfp4(packed, scales, gs, k=40, dtype=torch.float16, backend="triton")
    expected = dequantize_nvfp4(packed, scales, gs, k=40, backend="reference").half()
    assert out.dtype == torch.float16 and torch.equal(out, expected)


def test_reference_dequantize_is_contiguous_like_the_fake():
    packed, scales, global_scale = quantize_nvfp4(torch.randn(6, 40), backend="reference")  # K padded to 48
    torch.library.opcheck(torch.ops.dcgen.nvfp4_dequantize.default,
                          (packed, scales, global_scale, 40, torch.float32, "reference"), test_utils=("test_faketensor",))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 32)
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_nvfp4(x.to(torch.int32))
    with pytest.raises(ValueError, match="global_scale must be positive"):
        quantize_nvfp4(x, 0.0)
    with pytest.raises(ValueError, match="global_scale must be positive"):
        quantize_nvfp4(x, float("nan"))
    packed, scales, gs = quantize_nvfp4(x)
    with pytest.raises(ValueError, match="scales must have shape"):
        dequantize_nvfp4(packed, scales[:, :1], gs)
    with pytest.raises(TypeError, match="packed must have dtype"):
        dequantize_nvfp4(packed.to(torch.int8), scales, gs)
    for k in (33, 16):  # past the padded width / a whole group short of it (it would drop real values)
        with pytest.raises(ValueError, match="k must be"):
            dequantize_nvfp4(packed, scales, gs, k=k)
    with pytest.raises(ValueError, match="smooth must have shape"):
        quantize_nvfp4_activations(x, torch.ones(31), None)
    with pytest.raises(ValueError, match="lora_down must have shape"):
        quantize_nvfp4_activations(x, None, torch.ones(31, 4))
    for scale in ("1.0", torch.ones(2), True, torch.tensor(True), torch.tensor(1 + 0j)):  # not read as 1.0
        with pytest.raises(TypeError, match="global_scale must be a positive float or a 1-element real tensor"):
            quantize_nvfp4(x, scale)
    with pytest.raises(TypeError, match="global_scale must be a positive float or a 1-element real tensor"):
        dequantize_nvfp4(packed, scales, torch.tensor(True))
    with pytest.raises(ValueError, match=r"packed must be \[..., K_pad/2\] with K_pad a multiple of 16, got \(4, 12\)"):
        dequantize_nvfp4(packed[:, :12], scales[:, :1], gs)
    with pytest.raises(TypeError, match="dtype must be one of .*got torch.int32"):
        dequantize_nvfp4(packed, scales, gs, dtype=torch.int32)
    for quantize in (quantize_nvfp4, lambda t: quantize_nvfp4_activations(t, None, None)):
        with pytest.raises(ValueError, match=r"x must have at least one dimension \(K\)"):
            quantize(x[0, 0])


def test_triton_scale_rounding_matches_torch_for_every_e4m3_value_and_midpoint():
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, all finite codes
    mids = (grid[:-1] + grid[1:]) / 2
    targets = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
    x = torch.zeros(targets.numel(), 16)
    x[:, 0] = targets * 6  # amax / 6 = target (exact for these binary fractions)
    ref = quantize_nvfp4(x, 1.0, backend="reference")
    tri = quantize_nvfp4(x, 1.0, backend="triton")
    assert torch.equal(ref[1].float()[:, 0], targets.to(torch.float8_e4m3fn).float())
    assert_same_bytes(tri[1], ref[1])
    assert_same_bytes(tri[0], ref[0])


def test_triton_backend_really_runs_here():
    # The triton-vs-reference comparisons above are only meaningful if "triton" is not silently replaced.
    from dcgen_kernels import _backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert _backend.triton_device_error(device) is None
    checks = {"triton": lambda: _backend.triton_device_error(device)}
    assert _backend.select("nvfp4_quantize", "triton", checks, {}) == "triton"


@pytest.mark.gpu
def test_gpu_triton_quantizers_bit_exact_at_flux_width():
    """On the GPU too (where torch divides by a Python number through its reciprocal): same bytes as the reference."""
    K = 3072
    x = (torch.randn(2, 999, K, device="cuda") * (torch.rand(K, device="cuda") * 3)).bfloat16()
    ref, tri = quantize_nvfp4(x, backend="reference"), quantize_nvfp4(x, backend="triton")
    assert_same_bytes(tri[0], ref[0])
    assert_same_bytes(tri[1], ref[1])
    smooth = torch.rand(K, device="cuda") + 0.5
    down = (torch.randn(K, 32, device="cuda") / K ** 0.5).bfloat16()
    ref = quantize_nvfp4_activations_reference(x, smooth, down, tri[2])
    fused = quantize_nvfp4_activations(x, smooth, down, tri[2], backend="triton")
    assert_same_bytes(fused[0], ref[0])
    assert_same_bytes(fused[1], ref[1])
    assert rel_l2(fused[2], ref[2]) < 1e-5
    down = torch.randn(K, 32, device="cuda") / K ** 0.5  # fp32 beside bf16 x: a bf16 dot would round it (~2e-3)
    ref = quantize_nvfp4_activations_reference(x, smooth, down, tri[2])
    assert rel_l2(quantize_nvfp4_activations(x, smooth, down, tri[2], backend="triton")[2], ref[2]) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):  # the dequantize kernel's cast rounds like torch's
        out = dequantize_nvfp4(*tri, k=K, dtype=dtype, backend="triton")
        assert torch.equal(out, dequantize_nvfp4(*tri, k=K, backend="reference").to(dtype))


def test_unavailable_backend_warns_once_and_falls_back():
    x = torch.randn(5, 40)
    with pytest.warns(RuntimeWarning, match="cuda backend cannot serve") as caught:
        outs = [quantize_nvfp4(x, backend="cuda") for _ in range(2)]
    assert len(caught) == 1  # one-time
    ref = quantize_nvfp4(x, backend="reference")
    assert all(torch.equal(o[0], ref[0]) for o in outs)
