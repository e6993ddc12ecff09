import sys

import pytest
import torch

from dcgen_kernels.ops.nvfp4_gemm import nvfp4_gemm, nvfp4_gemm_reference, nvfp4_w4a16_gemm, \
    nvfp4_w4a16_gemm_reference
from dcgen_kernels.ops.nvfp4_quantize import dequantize_nvfp4_reference, quantize_nvfp4, \
    quantize_nvfp4_activations
from tests.helpers import TOLERANCE, compile_launchers_for_sm90, rel_l2

gemm_module = sys.modules["dcgen_kernels.ops.nvfp4_gemm"]

# (M, K, N, R): no block multiples, K not a multiple of 16 in the second, rank 0 in the third.
SHAPES = [(37, 80, 45, 8), (19, 72, 33, 20), (40, 64, 50, 0)]


def operands(M, K, N, R, dtype=torch.float32, device="cpu"):
    x = torch.randn(M, K, device=device).to(dtype)
    w = torch.randn(N, K, device=device) / K ** 0.5
    wq = quantize_nvfp4(w, backend="reference")
    lora_down = (torch.randn(K, R, device=device) / K ** 0.5).to(dtype)
    lora_up = (torch.randn(R, N, device=device) * 0.1).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    return x, wq, lora_down, lora_up, bias


@pytest.mark.parametrize("M,K,N,R", SHAPES)
def test_w4a4_triton_matches_dequantized_reference(M, K, N, R):
    x, wq, lora_down, lora_up, bias = operands(M, K, N, R)
    a_packed, a_scales, lora_act = quantize_nvfp4_activations(x, None, lora_down, 0.01, backend="reference")
    args = (a_packed, a_scales, torch.tensor(0.01), *wq)
    expected = nvfp4_gemm_reference(*args, lora_act, lora_up, bias, torch.float32)
    # Independent check of the reference: dequantize both operands by hand.
    a = dequantize_nvfp4_reference(a_packed, a_scales, torch.tensor(0.01))
    w = dequantize_nvfp4_reference(*wq)
    assert rel_l2(expected, a @ w.t() + lora_act @ lora_up + bias) < 1e-6
    out = nvfp4_gemm(*args, lora_act=lora_act, lora_up=lora_up, bias=bias, out_dtype=torch.float32,
                     backend="triton")
    assert out.shape == (M, N) and not out.isnan().any()
    assert rel_l2(out, expected) < 1e-5
    # And the whole point: it approximates the unquantized linear (4-bit both sides: ~10-20 % rel-L2).
    exact = x @ dequantize_nvfp4_reference(*wq, k=K).t() + lora_act @ lora_up + bias
    assert rel_l2(out, exact) < 0.2


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_w4a4_half_outputs_and_leading_dims(out_dtype):
    x, wq, lora_down, lora_up, bias = operands(2 * 13, 48, 40, 16)
    x = x.reshape(2, 13, 48)
    a_packed, a_scales, lora_act = quantize_nvfp4_activations(x, None, lora_down, 0.02, backend="triton")
    kw = dict(lora_act=lora_act, lora_up=lora_up.to(out_dtype), bias=bias.to(out_dtype), out_dtype=out_dtype)
    out = nvfp4_gemm(a_packed, a_scales, 0.02, *wq, backend="triton", **kw)
    ref = nvfp4_gemm(a_packed, a_scales, 0.02, *wq, backend="reference", **kw)
    assert out.shape == (2, 13, 40) and out.dtype == out_dtype
    assert rel_l2(out, ref.float()) <= TOLERANCE[out_dtype]  # both round the same fp32 result once


@pytest.mark.parametrize("M,K,N,R", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_triton_matches_reference(M, K, N, R, dtype):
    x, wq, lora_down, lora_up, bias = operands(M, K, N, R, dtype)
    kw = dict(lora_down=lora_down, lora_up=lora_up, bias=bias)
    expected = nvfp4_w4a16_gemm_reference(x, *wq, **kw)
    w = dequantize_nvfp4_reference(*wq, k=K)
    manual = x.float() @ w.t() + (x.float() @ lora_down.float()) @ lora_up.float() + bias.float()
    assert rel_l2(expected, manual) < (1e-6 if dtype == torch.float32 else 1e-2)
    out = nvfp4_w4a16_gemm(x, *wq, backend="triton", **kw)
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_l2(out, manual) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_w4a16_smooth_divides_the_activations():
    x, wq, _, _, bias = operands(21, 48, 24, 0)
    smooth = torch.rand(48) + 0.5
    out = nvfp4_w4a16_gemm(x, *wq, smooth=smooth, bias=bias, backend="triton")
    expected = nvfp4_w4a16_gemm(x / smooth, *wq, bias=bias, backend="reference")
    assert rel_l2(out, expected) < 1e-5


@pytest.mark.parametrize("R", [0, 8])
def test_w4a16_effective_weight_strategy_matches_reference(R):
    # The large-M GPU strategy (one Triton pass builds dequant(W) / smooth + (lora_down @ lora_up)^T, then one
    # GEMM), run here on CPU: the weight equals the layer's math, so the outputs match the reference.
    x, wq, lora_down, lora_up, bias = operands(33, 80, 40, R)
    smooth = torch.rand(80) + 0.5
    kw = dict(smooth=smooth, lora_down=lora_down, lora_up=lora_up, bias=bias) if R else dict(smooth=smooth)
    expected = nvfp4_w4a16_gemm_reference(x, *wq, **kw)
    weight = torch.full((40, 80), float("nan"))
    gemm_module._launch_effective_weight(*wq, smooth, lora_down if R else None, lora_up if R else None, weight)
    manual = dequantize_nvfp4_reference(*wq, k=80) / smooth + ((lora_down @ lora_up).t() if R else 0)
    assert rel_l2(weight, manual) < 1e-6
    split = gemm_module._w4a16_effective_weight_cublas(x, *wq, smooth, lora_down if R else None,
                                                       lora_up if R else None, bias if R else None)
    assert rel_l2(split, expected) < 1e-5


@pytest.mark.parametrize("tma_store", [False, True], ids=["pointer-store", "tma-store"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_effective_weight_partial_tiles_and_store_paths(tma_store, dtype):
    """Both store paths of the effective-weight pass at a shape off every tile (N = 40 of 32-row blocks, K = 80 of
    32-column tiles, two tiles per program: the second program's second tile starts past K): every element of the
    weight is written and nothing beside it (the weight is a column slice of a NaN-poisoned wider buffer)."""
    import triton

    _, wq, lora_down, lora_up, _ = operands(1, 80, 40, 8)
    smooth = torch.rand(80) + 0.5
    wide = torch.full((40, 96), float("nan"), dtype=dtype)
    weight = wide[:, :80]  # row stride 96 elements: 16-byte aligned for TMA in fp32 and bf16
    config = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "K_TILES": 2, "TMA_STORE": tma_store}, num_warps=4)
    gemm_module._launch_effective_weight(*wq, smooth, lora_down, lora_up, weight, config)
    manual = dequantize_nvfp4_reference(*wq, k=80) / smooth + (lora_down @ lora_up).t()
    assert rel_l2(weight.float(), manual) < (1e-6 if dtype == torch.float32 else 4e-3)
    assert wide[:, 80:].isnan().all()


def test_effective_weight_tma_store_needs_an_addressable_output():
    import triton

    _, wq, lora_down, lora_up, _ = operands(1, 80, 40, 8)
    weight = torch.empty(40, 81, dtype=torch.bfloat16)[:, :80]  # rows of 162 bytes: no TMA
    assert gemm_module._tma_descriptor(weight) is None
    config = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "K_TILES": 2, "TMA_STORE": True}, num_warps=4)
    with pytest.raises(ValueError, match="TMA_STORE config needs an output TMA can address"):
        gemm_module._launch_effective_weight(*wq, None, lora_down, lora_up, weight, config)


def test_effective_weight_configs_each_set_the_output_block(monkeypatch):
    """Every config's pre-hook sets the descriptor's block (a TMA config its tile, the others the launcher's
    minimal one), so a non-TMA winner launched after tuning keeps the signature it was timed with."""
    from dcgen_kernels.ops.nvfp4_gemm import _tma_descriptor
    from dcgen_kernels.triton_kernels.nvfp4_gemm import _effective_weight_configs, _set_out_block

    desc = _tma_descriptor(torch.empty(64, 256, dtype=torch.bfloat16))
    minimal = list(desc.block_shape)
    assert minimal == [1, 8]
    _set_out_block({"out_desc": desc, "BLOCK_N": 32, "BLOCK_K": 128, "TMA_STORE": True})
    assert list(desc.block_shape) == [32, 128]
    _set_out_block({"out_desc": desc, "BLOCK_N": 64, "BLOCK_K": 128, "TMA_STORE": False})
    assert list(desc.block_shape) == minimal
    _set_out_block({"out_desc": None, "BLOCK_N": 64, "BLOCK_K": 128, "TMA_STORE": True})  # no descriptor: nothing
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's config list
    assert all(config.pre_hook is _set_out_block for config in _effective_weight_configs())


def test_effective_weight_autotune_prunes_tma_store_without_a_descriptor():
    from dcgen_kernels.triton_kernels.nvfp4_gemm import prune_tma_store
    import triton

    configs = [triton.Config({"TMA_STORE": tma}) for tma in (False, True)]
    assert [c.kwargs["TMA_STORE"] for c in prune_tma_store(configs, {"out_desc": None})] == [False]
    assert len(prune_tma_store(configs, {"out_desc": object()})) == 2


def test_w4a16_effective_weight_strategy_takes_a_bias_of_another_dtype():
    x, wq, lora_down, lora_up, bias = operands(33, 80, 40, 8)
    expected = nvfp4_w4a16_gemm_reference(x.bfloat16(), *wq, lora_down=lora_down, lora_up=lora_up, bias=bias)
    out = gemm_module._w4a16_effective_weight_cublas(x.bfloat16(), *wq, None, lora_down, lora_up, bias)  # fp32 bias
    assert out.dtype == torch.bfloat16 and rel_l2(out, expected) < TOLERANCE[torch.bfloat16]


def strided_copy(t):
    """The same values as t in a view whose last dimension has stride 2 (a kernel assuming stride 1 misreads it)."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def test_strided_weight_scales_and_bias_views():
    # The kernels index weight rows and the bias with unit stride; strided views (allowed by the validation)
    # must give the same result as their contiguous copies, on every Triton path.
    x, (wp, ws, wg), lora_down, lora_up, bias = operands(19, 64, 33, 4)
    views = (strided_copy(wp), strided_copy(ws), wg)
    kw = dict(lora_down=lora_down, lora_up=lora_up)
    expected = nvfp4_w4a16_gemm_reference(x, wp, ws, wg, bias=bias, **kw)
    got = nvfp4_w4a16_gemm(x, *views, bias=strided_copy(bias), backend="triton", **kw)
    assert rel_l2(got, expected) < 1e-5
    split = gemm_module._w4a16_effective_weight_cublas(x, *views, None, lora_down, lora_up, strided_copy(bias))
    assert rel_l2(split, expected) < 1e-5
    ap, asc, _ = quantize_nvfp4_activations(x, None, None, 1.0, backend="reference")
    got = nvfp4_gemm(ap, asc, 1.0, *views, bias=strided_copy(bias), out_dtype=torch.float32, backend="triton")
    assert rel_l2(got, nvfp4_gemm_reference(ap, asc, torch.tensor(1.0), wp, ws, wg, bias=bias,
                                             out_dtype=torch.float32)) < 1e-5


def test_transposed_low_rank_factors():
    """lora_down [K, R] and lora_up [R, N] given as transposed views (column-major, as nunchaku's proj_up [N, R]
    transposed is): every Triton path reads their values, not their memory order."""
    x, (wp, ws, wg), lora_down, lora_up, bias = operands(19, 64, 33, 4)
    column_major = lambda t: t.t().contiguous().t()  # noqa: E731 - same values, strides (1, rows)
    down, up = column_major(lora_down), column_major(lora_up)
    expected = nvfp4_w4a16_gemm_reference(x, wp, ws, wg, lora_down=lora_down, lora_up=lora_up, bias=bias)
    got = nvfp4_w4a16_gemm(x, wp, ws, wg, lora_down=down, lora_up=up, bias=bias, backend="triton")
    assert rel_l2(got, expected) < 1e-5
    split = gemm_module._w4a16_effective_weight_cublas(x, wp, ws, wg, None, down, up, bias)
    assert rel_l2(split, expected) < 1e-5
    ap, asc, _ = quantize_nvfp4_activations(x, None, None, 1.0, backend="reference")
    lora_act = x @ lora_down
    got = nvfp4_gemm(ap, asc, 1.0, wp, ws, wg, lora_act=lora_act, lora_up=up, bias=bias, out_dtype=torch.float32,
                     backend="triton")
    assert rel_l2(got, nvfp4_gemm_reference(ap, asc, torch.tensor(1.0), wp, ws, wg, lora_act=lora_act,
                                             lora_up=lora_up, bias=bias, out_dtype=torch.float32)) < 1e-5


def test_scale_sign_bits_are_ignored_by_every_gemm_path():
    # Unsigned E4M3 group scales: bytes with the sign bit set (an imported checkpoint's) read as their low 7 bits
    # in the references as in the Triton kernels (and the sm_120 MMA's ue4m3), for weights and activations.
    x, (wp, ws, wg), lora_down, lora_up, bias = operands(19, 64, 33, 4)
    signed_ws = (ws.view(torch.uint8) | 0x80).view(torch.float8_e4m3fn)
    kw = dict(lora_down=lora_down, lora_up=lora_up, bias=bias)
    expected = nvfp4_w4a16_gemm_reference(x, wp, ws, wg, **kw)
    assert torch.equal(nvfp4_w4a16_gemm_reference(x, wp, signed_ws, wg, **kw), expected)
    assert rel_l2(nvfp4_w4a16_gemm(x, wp, signed_ws, wg, backend="triton", **kw), expected) < 1e-5
    ap, asc, _ = quantize_nvfp4_activations(x, None, None, 1.0, backend="reference")
    signed_asc = (asc.view(torch.uint8) | 0x80).view(torch.float8_e4m3fn)
    expected = nvfp4_gemm_reference(ap, asc, torch.tensor(1.0), wp, ws, wg, out_dtype=torch.float32)
    assert torch.equal(nvfp4_gemm_reference(ap, signed_asc, torch.tensor(1.0), wp, signed_ws, wg,
                                            out_dtype=torch.float32), expected)
    got = nvfp4_gemm(ap, signed_asc, 1.0, wp, signed_ws, wg, out_dtype=torch.float32, backend="triton")
    assert rel_l2(got, expected) < 1e-5


def test_custom_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(3, 7, 40, dtype=torch.uint8)
        s = torch.empty(3, 7, 5, dtype=torch.float8_e4m3fn)
        w = torch.empty(24, 40, dtype=torch.uint8)
        ws = torch.empty(24, 5, dtype=torch.float8_e4m3fn)
        g = torch.empty(())
        out = torch.ops.dcgen.nvfp4_gemm(a, s, g, w, ws, g, None, None, None, torch.float16, "auto")
        out16 = torch.ops.dcgen.nvfp4_w4a16_gemm(torch.empty(5, 80, dtype=torch.bfloat16), w, ws, g, None, None,
                                                 None, None, "auto")
    assert out.shape == (3, 7, 24) and out.dtype == torch.float16
    assert out16.shape == (5, 24) and out16.dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    x, wq, lora_down, lora_up, bias = operands(8, 64, 32, 4)
    a_packed, a_scales, lora_act = quantize_nvfp4_activations(x, None, lora_down, 0.01, backend="reference")
    with pytest.raises(ValueError, match="w_packed must have 32 bytes per row"):
        nvfp4_gemm(a_packed, a_scales, 0.01, wq[0][:, :16], wq[1][:, :2], wq[2])
    with pytest.raises(ValueError, match="lora_act and lora_up must be given together"):
        nvfp4_gemm(a_packed, a_scales, 0.01, *wq, lora_act=lora_act)
    with pytest.raises(ValueError, match="lora_up must have shape"):
        nvfp4_gemm(a_packed, a_scales, 0.01, *wq, lora_act=lora_act, lora_up=lora_up[:, :5])
    with pytest.raises(ValueError, match="bias must have shape"):
        nvfp4_w4a16_gemm(x, *wq, bias=bias[:3])
    with pytest.raises(ValueError, match="lora_down and lora_up must be given together"):
        nvfp4_w4a16_gemm(x, *wq, lora_down=lora_down)
    with pytest.raises(ValueError, match="lora_down must be"):
        nvfp4_w4a16_gemm(x, *wq, lora_down=lora_down[:5], lora_up=lora_up)
    with pytest.raises(ValueError, match="w_packed must have ceil"):
        nvfp4_w4a16_gemm(x[:, :40], *wq)
    with pytest.raises(ValueError, match=r"lora_act must have shape \(8, 4\) \(rows of the input"):
        nvfp4_gemm(a_packed, a_scales, 0.01, *wq, lora_act=lora_act[:, :3], lora_up=lora_up)
    with pytest.raises(ValueError, match=r"w_packed must be 2-D \[N, K_pad/2\], got shape \(1, 32, 32\)"):
        nvfp4_w4a16_gemm(x, wq[0][None], wq[1][None], wq[2])
    with pytest.raises(ValueError, match="w_packed must be on device cpu like the input, got meta"):
        nvfp4_w4a16_gemm(x, wq[0].to("meta"), wq[1].to("meta"), wq[2])
    with pytest.raises(TypeError, match="out_dtype must be one of .*got torch.int32"):
        nvfp4_gemm(a_packed, a_scales, 0.01, *wq, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x must have at least one dimension \(K\)"):
        nvfp4_w4a16_gemm(x[0, 0], *wq)


def run_sm120_host_emulation(C, a_packed, a_scales, a_gs, wq, lora_act, lora_up, bias, out_dtype):
    from dcgen_kernels._cext import DTYPE_CODES

    w_packed, w_scales, w_gs = wq
    M, N = a_packed.shape[0], w_packed.shape[0]
    out = torch.full((M, N), float("nan"), dtype=out_dtype)
    keep = [a_packed.contiguous(), a_scales.view(torch.uint8).contiguous(), w_packed.contiguous(),
            w_scales.view(torch.uint8).contiguous(), a_gs.float().reshape(1), w_gs.float().reshape(1),
            lora_act.float().contiguous(), lora_up.to(out_dtype).contiguous(), bias.to(out_dtype).contiguous()]
    C.nvfp4_gemm_sm120_host(*[t.data_ptr() for t in keep], out.data_ptr(), M, N, a_packed.shape[1] * 2,
                            lora_up.shape[0], DTYPE_CODES[out_dtype])
    return out


def test_sm120_kernel_declines_cases_its_binding_rejects():
    """One block per 128 rows in the grid's y (<= 65535): larger M goes to another backend, not a failed launch;
    likewise an empty K."""
    from dcgen_kernels.ops.nvfp4_gemm import _cuda_case_error

    rows = lambda m: torch.empty(1, 32, dtype=torch.uint8).expand(m, 32)  # noqa: E731  (no memory behind it)
    assert _cuda_case_error(rows(65535 * 128), None, None, torch.bfloat16) is None
    assert "grid's y" in _cuda_case_error(rows(65535 * 128 + 1), None, None, torch.bfloat16)
    # the binding rejects K = 0: the op falls back instead of raising
    assert "positive multiple of 64" in _cuda_case_error(torch.empty(4, 0, dtype=torch.uint8), None, None,
                                                         torch.bfloat16)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_sm120_kernel_fragments_on_host_emulation(out_dtype):
    # The sm_120a kernel's own per-lane loads and epilogue, with the MMA emulated from the PTX fragment tables:
    # checks the register and scale-factor layouts on any machine (the instruction itself needs an sm_120 GPU).
    from dcgen_kernels._cext import _C

    if _C is None or not hasattr(_C, "nvfp4_gemm_sm120_host"):
        pytest.skip("dcgen_kernels._C with nvfp4_gemm_sm120_host is not built")
    M, K, N, R = 150, 192, 72, 16  # partial 128 x 64 blocks in M and N, three 64-k steps
    x, wq, lora_down, lora_up, bias = operands(M, K, N, R)
    a_packed, a_scales, lora_act = quantize_nvfp4_activations(x, None, lora_down, 0.01, backend="reference")
    out = run_sm120_host_emulation(_C, a_packed, a_scales, torch.tensor(0.01), wq, lora_act, lora_up, bias,
                                   out_dtype)
    ref = nvfp4_gemm(a_packed, a_scales, 0.01, *wq, lora_act=lora_act, lora_up=lora_up.to(out_dtype),
                     bias=bias.to(out_dtype), out_dtype=torch.float32, backend="reference")
    assert not out.isnan().any()
    assert rel_l2(out, ref) < (1e-5 if out_dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N", [(16, 3072), (1000, 3000), (4608, 3072)])
def test_w4a16_gpu_flux_shape_accuracy(M, N):
    # FLUX shapes on the GPU: fused kernel (M < 1024, also off the tiles) and effective weight + cuBLAS (M=4608).
    K, R = 3072, 32
    x, wq, lora_down, lora_up, bias = operands(M, K, N, R, torch.bfloat16, "cuda")
    smooth = torch.rand(K, device="cuda") + 0.5
    kw = dict(smooth=smooth, lora_down=lora_down, lora_up=lora_up, bias=bias)
    out = nvfp4_w4a16_gemm(x, *wq, backend="triton", **kw)
    ref = nvfp4_w4a16_gemm_reference(x, *wq, **kw)
    assert rel_l2(out, ref.float()) < 1e-2


@pytest.mark.gpu
def test_w4a16_gpu_every_effective_weight_config():
    """Each autotuned tile config of the effective-weight pass, at a shape off every tile (N, K not multiples)."""
    from dcgen_kernels.triton_kernels.nvfp4_gemm import nvfp4_effective_weight_kernel

    K, N, R = 1000, 700, 32
    _, wq, lora_down, lora_up, _ = operands(1, K, N, R, torch.bfloat16, "cuda")
    smooth = torch.rand(K, device="cuda") + 0.5
    expected = dequantize_nvfp4_reference(*wq, k=K) / smooth + (lora_down.float() @ lora_up.float()).t()
    for config in nvfp4_effective_weight_kernel.configs:
        weight = torch.full((N, K), float("nan"), dtype=torch.bfloat16, device="cuda")
        gemm_module._launch_effective_weight(*wq, smooth, lora_down, lora_up, weight, config)
        assert rel_l2(weight, expected) < 1e-2, config


def assert_gpu_w4a4_matches_reference(M, N, backend):
    K, R = 3072, 32
    x, wq, lora_down, lora_up, bias = operands(M, K, N, R, torch.bfloat16, "cuda")
    a_packed, a_scales, lora_act = quantize_nvfp4_activations(x, None, lora_down, 0.01, backend="triton")
    kw = dict(lora_act=lora_act, lora_up=lora_up, bias=bias, out_dtype=torch.bfloat16)
    out = nvfp4_gemm(a_packed, a_scales, 0.01, *wq, backend=backend, **kw)
    ref = nvfp4_gemm(a_packed, a_scales, 0.01, *wq, backend="reference", **kw)
    assert rel_l2(out, ref.float()) < 1e-2


@pytest.mark.gpu
def test_w4a4_gpu_flux_shape_accuracy():
    assert_gpu_w4a4_matches_reference(512, 3072, "triton")


@pytest.mark.gpu
def test_w4a4_sm120_cuda_kernel_matches_reference():
    if torch.cuda.get_device_capability()[0] != 12:
        pytest.skip("the native FP4 MMA kernel needs an sm_120 GPU")
    reason = gemm_module._cuda_sm120_error(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    assert_gpu_w4a4_matches_reference(300, 520, "cuda")


def test_triton_backend_really_runs_here():
    # The triton-vs-reference comparisons above are only meaningful if "triton" is not silently replaced.
    from dcgen_kernels import _backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert _backend.triton_device_error(device) is None
    checks = {"triton": lambda: _backend.triton_device_error(device)}
    assert _backend.select("nvfp4_gemm", "triton", checks, {}) == "triton"


_NVFP4_LAUNCHES = r'''
q4, g4 = (importlib.import_module(f"dcgen_kernels.ops.nvfp4_{m}") for m in ("quantize", "gemm"))
E = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype)
u8, f8, f32, one = torch.uint8, torch.float8_e4m3fn, torch.float32, torch.ones((), dtype=torch.float32)
M, K, N, R = 4608, 3072, 12288, 32
q4._launch_quantize(E(M, K), E(K, dtype=f32), E(K, R), one, E(M, K // 2, dtype=u8), E(M, K // 16, dtype=f8),
                    E(M, R, dtype=f32))
for rows in (M, 16):  # W4A4 at FLUX tokens and decode-like M
    g4._launch_triton(E(rows, K // 2, dtype=u8), E(rows, K // 16, dtype=f8), one, E(N, K // 2, dtype=u8),
                      E(N, K // 16, dtype=f8), one, E(rows, R, dtype=f32), E(R, N), E(N), E(rows, N), K, a_fp4=True)
g4._launch_triton(E(512, K), None, None, E(N, K // 2, dtype=u8), E(N, K // 16, dtype=f8), one,
                  E(512, R, dtype=f32), E(R, N), E(N), E(512, N), K, a_fp4=False, smooth=E(K, dtype=f32))
effective_weight = importlib.import_module("dcgen_kernels.triton_kernels.nvfp4_gemm").nvfp4_effective_weight_kernel
for config in effective_weight.configs:  # every autotuned tile config
    g4._launch_effective_weight(E(N, K // 2, dtype=u8), E(N, K // 16, dtype=f8), one, E(K, dtype=f32), E(K, R),
                                E(R, N), E(N, K), config)
print(json.dumps(stats))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_launcher_configs_compile_for_sm90_without_spills():
    """Every NVFP4 kernel config the launchers pick at FLUX shapes compiles for sm_90a (Triton's bundled ptxas)
    without register spills, within the 227 KB of shared memory, and the 128-row GEMMs use wgmma."""
    stats = compile_launchers_for_sm90(_NVFP4_LAUNCHES)
    assert [s["kernel"] for s in stats[:4]] == ["nvfp4_quantize_kernel"] + ["nvfp4_gemm_kernel"] * 3
    assert len(stats) > 5 and all(s["kernel"] == "nvfp4_effective_weight_kernel" for s in stats[4:]), stats
    assert all(s["spills"] == 0 and s["shared"] <= 227 * 1024 for s in stats), stats
    quantize, w4a4_large_m, _, w4a16 = stats[:4]
    assert w4a4_large_m["warps"] == 8 and w4a4_large_m["wgmma"] > 0 and w4a16["wgmma"] > 0, stats
    assert quantize["wgmma"] > 0, stats  # the fused down-projection runs on tensor cores
