import itertools

import pytest
import torch

from dcgen_kernels.quant.svdquant import SVDQuantLinear, smoothing_factors, svdquant_error_report
from tests.helpers import rel_l2

K, N, M = 256, 192, 64


def linear(k=K, n=N, dtype=torch.float32):
    return torch.nn.Linear(k, n).to(dtype)


def outlier_inputs(m=M, k=K, channels=(3, 50, 101, 200), factor=30.0):
    x = torch.randn(m, k)
    x[:, list(channels)] *= factor  # a few activation channels far above the rest, as in DiT blocks
    return x


def error(layer, lin, x):
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    return rel_l2(layer(x), ref)


def assert_decreasing(report, ratio=0.95):
    ranks = sorted(report)
    errs = [report[r]["with_lowrank"] for r in ranks]
    for (r_lo, e_lo), (r_hi, e_hi) in itertools.pairwise(zip(ranks, errs, strict=True)):
        assert e_hi < ratio * e_lo, f"rank {r_hi} error {e_hi:.4f} not below {ratio} x rank {r_lo} error {e_lo:.4f}"
    # Dropping a rank-r layer's branch loses the top r directions of the smoothed weight: the more, the worse.
    assert report[0]["without_lowrank"] == report[0]["with_lowrank"]  # no branch to drop
    without = [report[r]["without_lowrank"] for r in ranks]
    assert all(lo < hi for lo, hi in itertools.pairwise(without)), without
    for r in ranks[1:]:
        assert report[r]["with_lowrank"] < 0.5 * report[r]["without_lowrank"], (r, report[r])


def test_error_decreases_with_rank_on_random_inputs():
    lin, x = linear(), torch.randn(M, K)
    report = svdquant_error_report(lin, x, backend="reference")
    assert sorted(report) == [0, 16, 32, 64]
    assert_decreasing(report)
    # Rank 0 is plain NVFP4 W4A4 (~0.1-0.2 rel-L2 on Gaussian data); rank 64 of 192 removes a large share.
    assert 0.08 < report[0]["with_lowrank"] < 0.25
    assert report[64]["with_lowrank"] < 0.7 * report[0]["with_lowrank"]


def test_error_decreases_with_rank_on_outlier_inputs():
    lin, x = linear(), outlier_inputs()
    report = svdquant_error_report(lin, x, backend="reference")
    assert_decreasing(report)
    # Smoothing moves the outliers into the weight, the low-rank branch takes them out of the quantized part.
    assert report[32]["with_lowrank"] < 0.7 * report[0]["with_lowrank"]
    assert report[32]["with_lowrank"] < 0.1 * report[32]["without_lowrank"]  # measured 0.031 vs 0.98


def test_smoothing_helps_on_outlier_channels():
    lin, x = linear(), outlier_inputs()
    for rank in (0, 32):
        smoothed = SVDQuantLinear.from_linear(lin, rank=rank, calibration=x, backend="reference")
        plain = SVDQuantLinear.from_linear(lin, rank=rank, calibration=x, backend="reference")
        plain._load_decomposition(lin.weight, lin.bias, torch.ones(K), calibration=x)  # same layer, s = 1
        e_smoothed, e_plain = error(smoothed, lin, x), error(plain, lin, x)
        assert e_smoothed < 0.6 * e_plain, (rank, e_smoothed, e_plain)
    s = smoothing_factors(lin.weight, x)
    assert s[[3, 50, 101, 200]].min() > 3 * s.median()  # the outlier channels are divided down


def test_calibrated_input_scale_covers_inputs_beyond_the_calibration():
    """The activation tensor scale comes from the smoothed calibration inputs (x / s, what is quantized), with 8x
    headroom: inputs 8x larger than any seen in calibration quantize as well as those (measured 0.031 both; with 1x
    headroom 0.046 at 8x, 2x headroom 0.034)."""
    from dcgen_kernels.quant.svdquant import E2M1_MAX, E4M3_MAX, INPUT_SCALE_HEADROOM

    lin, x = linear(), outlier_inputs()
    layer = SVDQuantLinear.from_linear(lin, rank=32, calibration=x, backend="reference")
    amax = (x / layer.smooth).abs().amax()
    torch.testing.assert_close(layer.input_scale, INPUT_SCALE_HEADROOM * amax / (E2M1_MAX * E4M3_MAX))
    assert error(layer, lin, 8 * x) < 1.05 * error(layer, lin, x)


def test_low_rank_structure_is_captured():
    lin = linear()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, 8) @ torch.randn(8, K) / 8 + 0.01 * torch.randn(N, K))
    x = torch.randn(M, K)
    report = svdquant_error_report(lin, x, ranks=(0, 16), backend="reference")
    assert report[16]["with_lowrank"] < 0.05 * report[0]["with_lowrank"]


def test_randomized_svd_for_large_weights_matches_exact(monkeypatch):
    from dcgen_kernels.quant import svdquant

    weight = torch.randn(N, 8) @ torch.randn(8, K) + 0.05 * torch.randn(N, K)
    smooth = torch.rand(K) + 0.5
    exact = svdquant.svdquant_decompose(weight, 16, smooth)
    monkeypatch.setattr(svdquant, "EXACT_SVD_MAX_DIM", 64)  # force the randomized path at this size
    state = torch.get_rng_state()
    approx = svdquant.svdquant_decompose(weight, 16, smooth)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(1)  # reproducible whatever the caller's seed
    assert torch.equal(svdquant.svdquant_decompose(weight, 16, smooth)[2], approx[2])
    assert approx[2].norm() < 1.02 * exact[2].norm()  # residual as small as the exact one's, within 2 %
    assert rel_l2(approx[0] @ approx[1], exact[0] @ exact[1]) < 1e-2


@pytest.mark.parametrize("activations", ["nvfp4", "bf16"])
def test_triton_layer_matches_reference_layer(activations):
    lin = linear(64, 40)
    x = torch.randn(2, 9, 64)
    layer = SVDQuantLinear.from_linear(lin, rank=16, calibration=x, activations=activations, backend="triton")
    out = layer(x)
    layer.backend = "reference"
    expected = layer(x)
    assert out.shape == (2, 9, 40) and out.dtype == torch.float32
    assert rel_l2(out, expected) < 1e-5
    assert error(layer, lin, x) < 0.2


def test_w4a16_is_more_accurate_than_w4a4():
    lin, x = linear(), outlier_inputs()
    w4a4 = SVDQuantLinear.from_linear(lin, rank=32, calibration=x, backend="reference")
    w4a16 = SVDQuantLinear.from_linear(lin, rank=32, calibration=x, activations="bf16", backend="reference")
    assert error(w4a16, lin, x) < 0.85 * error(w4a4, lin, x)  # measured ratio ~0.7
    assert rel_l2(w4a16.dequantized_weight(), lin.weight) < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer(dtype):
    lin = linear(72, 33, dtype)  # K = 72: not a multiple of 16, padded in the format
    x = torch.randn(5, 72).to(dtype)
    layer = SVDQuantLinear.from_linear(lin, rank=8, backend="triton")
    assert layer.qweight.shape == (33, 40) and layer.lora_down.dtype == dtype
    out = layer(x)
    assert out.dtype == dtype and out.shape == (5, 33)
    layer.backend = "reference"
    assert rel_l2(out, layer(x).float()) < 1e-2
    assert error(layer, lin.float(), x.float()) < 0.25


def test_buffers_state_dict_round_trip_and_repr():
    lin = linear(64, 48)
    x = torch.randn(7, 64)
    layer = SVDQuantLinear.from_linear(lin, rank=8, calibration=x, backend="reference")
    assert list(layer.parameters()) == []
    state = layer.state_dict()
    assert {"qweight", "wscales", "wtscale", "input_scale", "smooth", "lora_down", "lora_up", "bias"} <= set(state)
    assert state["qweight"].dtype == torch.uint8 and state["wscales"].dtype == torch.float8_e4m3fn
    fresh = SVDQuantLinear(64, 48, rank=8, dtype=torch.float32, backend="reference")
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))
    assert (layer.in_features, layer.out_features, layer.rank, layer.activations) == (64, 48, 8, "nvfp4")
    assert "rank=8" in repr(layer) and "activations=nvfp4" in repr(layer)
    rank0 = SVDQuantLinear.from_linear(torch.nn.Linear(64, 48, bias=False), rank=0, backend="reference")
    assert rank0.bias is None and rank0.lora_down.shape == (64, 0) and rank0(x).shape == (7, 48)


def test_full_rank_and_a_dead_input_channel():
    """rank = min(K, N) is allowed (and reported); an all-zero weight column gets a bounded smoothing factor."""
    lin = linear(64, 48)
    layer = SVDQuantLinear.from_linear(lin, rank=48, backend="reference")
    assert layer.lora_down.shape == (64, 48)
    x = torch.randn(5, 64)
    assert set(svdquant_error_report(lin, x, ranks=(48, 49), backend="reference")) == {48}
    with torch.no_grad():  # unclamped, the dead channel's factor would be ~9e4 beside weights of ~100
        lin.weight.mul_(1000)[:, 7] = 0
    factors = smoothing_factors(lin.weight)
    assert torch.isfinite(factors).all() and factors.max() <= 1e4 and factors.min() >= 1e-4


def test_bad_arguments_raise_clear_errors():
    lin = linear(64, 48)
    with pytest.raises(ValueError, match="rank must be"):
        SVDQuantLinear.from_linear(lin, rank=49)
    with pytest.raises(ValueError, match="activations must be"):
        SVDQuantLinear.from_linear(lin, activations="int4")
    with pytest.raises(ValueError, match="calibration must be"):
        SVDQuantLinear.from_linear(lin, calibration=torch.randn(3, 63))
    with pytest.raises(ValueError, match="calibration must be"):
        SVDQuantLinear.from_linear(lin, calibration=torch.empty(0, 64))
    for rank in (0, 4):  # at rank 0 no SVD would have failed: a layer returning NaN
        with pytest.raises(ValueError, match="calibration contains non-finite values"):
            SVDQuantLinear.from_linear(lin, rank=rank, calibration=torch.randn(3, 64).index_fill(1, torch.tensor([5]),
                                                                                                  float("inf")))
    with pytest.raises(TypeError, match="linear must be"):
        SVDQuantLinear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="x must have last dimension"):
        SVDQuantLinear.from_linear(lin, rank=4, backend="reference")(torch.randn(2, 65))
    for features in ((0, 4), (4, True), (4.0, 4)):
        with pytest.raises(ValueError, match="(in|out)_features must be a positive int"):
            SVDQuantLinear(*features, rank=0)
    with pytest.raises(TypeError, match="dtype must be one of .*got torch.int8"):
        SVDQuantLinear(4, 4, rank=0, dtype=torch.int8)
    broken = linear(16, 8)
    with torch.no_grad():
        broken.weight[1, 2] = float("inf")
    for rank in (0, 4):  # at rank 4 the SVD itself would fail; at rank 0 the residual would carry the inf
        with pytest.raises(ValueError, match=r"linear.weight holds non-finite values \(inf / NaN\)"):
            SVDQuantLinear.from_linear(broken, rank=rank)
    with pytest.raises(TypeError, match=r"linear.weight has dtype torch.float64; quantization takes"):
        SVDQuantLinear.from_linear(linear(16, 8).double(), rank=4)  # was quantized, then refused its float64 inputs


@pytest.mark.parametrize("activations", ["nvfp4", "bf16"])
def test_layer_traces_with_torch_compile_fullgraph(activations):
    lin = linear(64, 32)
    layer = SVDQuantLinear.from_linear(lin, rank=8, activations=activations, backend="triton")
    x = torch.randn(3, 64)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # custom ops + fake impls: no graph break
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("activations", ["nvfp4", "bf16"])
def test_layer_follows_autocast_as_nn_linear(activations):
    lin = linear(64, 40)
    x = torch.randn(2, 9, 64)
    layer = SVDQuantLinear.from_linear(lin, rank=16, calibration=x, activations=activations, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, layer(x.to(torch.bfloat16)))  # autocast off in the ops
