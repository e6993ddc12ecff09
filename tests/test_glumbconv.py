import warnings

import pytest
import torch
import torch.nn.functional as F

from dcgen_kernels import _backend
from dcgen_kernels.ops.glumbconv import _launch_depthwise_glu, depthwise_glu, depthwise_glu_reference, glumbconv, \
    glumbconv_reference
from tests.helpers import TOLERANCE, compile_launchers_for_sm90, rel_l2


def make_weights(C=20, hidden=40, C_out=None, dtype=torch.float32, device="cpu"):
    """Random GLUMBConv weights scaled like a trained layer (unit-variance activations throughout)."""
    C_out = C_out or C
    shapes = [(2 * hidden, C, 1, 1), (2 * hidden,), (2 * hidden, 1, 3, 3), (2 * hidden,), (C_out, hidden, 1, 1)]
    fan_in = [C, 1, 3, 1, hidden]
    return [(torch.randn(s, device=device) / f**0.5).to(dtype) for s, f in zip(shapes, fan_in)]


def make_tokens(B=2, H=7, W=9, C=20, dtype=torch.float32, device="cpu"):
    return torch.randn(B, H * W, C, device=device).to(dtype)


def diffusers_module(weights):
    from diffusers.models.transformers.sana_transformer import GLUMBConv

    C, hidden, C_out = weights[0].shape[1], weights[4].shape[1], weights[4].shape[0]
    module = GLUMBConv(C, C_out, hidden / C, norm_type=None, residual_connection=False)
    assert module.conv_point.in_channels == hidden
    params = [module.conv_inverted.weight, module.conv_inverted.bias, module.conv_depth.weight,
              module.conv_depth.bias, module.conv_point.weight]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    return module, params


def on_tokens(module, x, H, W):
    """How SanaTransformerBlock calls its feed-forward."""
    return module(x.unflatten(1, (H, W)).permute(0, 3, 1, 2)).flatten(2, 3).permute(0, 2, 1)


def depthwise_glu_fp32(pre, H, W, depth_weight, depth_bias):
    h = F.silu(pre.float()).unflatten(0, (-1, H, W)).permute(0, 3, 1, 2)
    h = F.conv2d(h, depth_weight.float(), depth_bias.float(), padding=1, groups=h.shape[1])
    value, gate = h.chunk(2, dim=1)
    return (value * F.silu(gate)).flatten(2).transpose(1, 2).flatten(0, 1)


@pytest.mark.parametrize("C,hidden,C_out", [(20, 40, 20), (24, 72, 16)])
def test_reference_equals_diffusers_glumbconv(C, hidden, C_out):
    weights = make_weights(C, hidden, C_out)
    x = make_tokens(C=C)
    module, _ = diffusers_module(weights)
    with torch.no_grad():
        assert rel_l2(glumbconv_reference(x, 7, 9, *weights), on_tokens(module, x, 7, 9)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,W,hidden", [(1, 7, 9, 40), (1, 5, 13, 72), (2, 8, 5, 40), (2, 4, 6, 24)])
def test_depthwise_glu_kernel_matches_reference(dtype, B, H, W, hidden):
    """Heights off and on the 4-row strips (SANA / DC-AE grids are multiples of 4: the last strip ends at the image's
    bottom edge), two images (a strip must not read or write its neighbour's rows), NaN-poisoned output."""
    pre = torch.randn(B * H * W, 2 * hidden).to(dtype)
    _, _, depth_weight, depth_bias, _ = make_weights(hidden=hidden, dtype=dtype)
    out = torch.full((B * H * W, hidden), float("nan"), dtype=dtype)
    _launch_depthwise_glu(pre, H, W, depth_weight, depth_bias, out)
    expected = depthwise_glu_fp32(pre, H, W, depth_weight, depth_bias)
    assert rel_l2(out, expected) <= max(TOLERANCE[dtype] / 2, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,W,C,hidden,C_out", [(2, 7, 9, 20, 40, 20), (1, 5, 13, 24, 72, 16)])
def test_triton_matches_reference(dtype, B, H, W, C, hidden, C_out):
    weights = make_weights(C, hidden, C_out, dtype=dtype)
    x = make_tokens(B=B, H=H, W=W, C=C, dtype=dtype)
    out = glumbconv(x, H, W, *weights, backend="triton")
    assert out.shape == (B, H * W, C_out) and out.dtype == dtype
    assert rel_l2(out, glumbconv_reference(x, H, W, *weights)) <= TOLERANCE[dtype]


def test_strided_tokens_from_nchw():
    """DC-AE's feature maps are NCHW: their token view is strided, and the op takes it as it is."""
    weights = make_weights()
    x_nchw = torch.randn(2, 20, 7, 9)
    tokens = x_nchw.permute(0, 2, 3, 1).flatten(1, 2)
    out = glumbconv(tokens, 7, 9, *weights, backend="triton")
    assert rel_l2(out, glumbconv_reference(tokens.contiguous(), 7, 9, *weights)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["tokens", "nchw_view"])
def test_custom_ops_pass_opcheck_and_return_contiguous_tokens(backend, layout):
    """The fakes say contiguous (B, N, C); every backend returns that, also for the token view of an NCHW map
    (conv2d may keep the reference's result channels-first)."""
    weights = make_weights()
    pre_weights = make_weights(C=20, hidden=10)[2:4]  # depthwise + bias over 2 * 10 channels
    x = make_tokens() if layout == "tokens" else torch.randn(2, 20, 7, 9).flatten(2).transpose(1, 2)
    # aot_dispatch's traced reruns of the interpreted kernels cost ~10 s each: the reference backend covers them
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    utils += () if backend == "triton" else ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.dcgen.glumbconv.default, (x, *weights, 7, 9, backend), test_utils=utils)
    torch.library.opcheck(torch.ops.dcgen.depthwise_glu.default, (x, *pre_weights, 7, 9, backend), test_utils=utils)
    assert glumbconv(x, 7, 9, *weights, backend=backend).is_contiguous()
    assert depthwise_glu(x, 7, 9, *pre_weights, backend=backend).is_contiguous()


def test_depthwise_glu_reads_strided_inputs_as_their_values():
    """pre as a channel slice of a wider buffer (row stride > 2 * hidden: the kernel assumes its own width) and
    depthwise weights as strided views give the contiguous copies' result."""
    pre_weights = make_weights(C=20, hidden=10)[2:4]
    wide = torch.randn(2, 63, 28)
    pre = wide[..., :20]
    depth_weight = torch.cat([pre_weights[0], pre_weights[0]], 1)[:, :1]  # (20, 1, 3, 3), channel stride 18
    depth_bias = torch.stack([pre_weights[1], pre_weights[1]], -1)[..., 0]  # stride 2
    got = depthwise_glu(pre, 7, 9, depth_weight, depth_bias, backend="triton")
    expected = depthwise_glu_reference(pre.contiguous(), 7, 9, *pre_weights)
    assert rel_l2(got, expected) < 1e-5


def test_empty_batch():
    weights = make_weights(C_out=12)
    assert glumbconv(make_tokens(B=0), 7, 9, *weights).shape == (0, 63, 12)


def _swap(weights, index, value):
    return weights[:index] + [value] + weights[index + 1:]


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: glumbconv(x.numpy(), 7, 9, *w), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: glumbconv(x[0], 7, 9, *w), ValueError, "x must have 3 dimensions"),
    (lambda x, w: glumbconv(x.int(), 7, 9, *w), TypeError, "x must have dtype"),
    (lambda x, w: glumbconv(x, 0, 9, *w), ValueError, "height must be a positive int"),
    (lambda x, w: glumbconv(x, 7, True, *w), ValueError, "width must be a positive int"),
    (lambda x, w: glumbconv(x, 9, 9, *w), ValueError, "x must hold height"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 0, w[0][:, :5])), ValueError, r"inverted_weight must have shape"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 0, w[0][:-1])), ValueError, r"inverted_weight must have shape"),
    (lambda x, w: glumbconv(x, 7, 9, w[0][:0], w[1][:0], w[2][:0], w[3][:0], w[4][:, :0]), ValueError,
     r"inverted_weight must have shape \(2\*hidden, C=20, 1, 1\) with hidden >= 1, got \(0, 20, 1, 1\)"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 0, w[0].half())), TypeError, "inverted_weight must have dtype"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 1, w[1][:-2])), ValueError, r"inverted_bias must have shape"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 2, w[2][..., :2])), ValueError, r"depth_weight must have shape"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 3, w[3].to("meta"))), ValueError, "depth_bias must be on device"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 4, w[4][:, :-1])), ValueError, r"point_weight must have shape"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 4, w[4][..., 0])), ValueError, "point_weight must have 4 dim"),
    (lambda x, w: glumbconv(x, 7, 9, *_swap(w, 4, w[4][:0])), ValueError,  # nn.Conv2d refuses it too
     r"point_weight must have shape \(C_out >= 1, hidden=\d+, 1, 1\), got \(0, "),
    (lambda x, w: glumbconv(x, 7, 9, *w, backend="gpu"), ValueError, "backend must be one of"),
    (lambda x, w: depthwise_glu(x[..., :15], 7, 9, torch.ones(15, 1, 3, 3), torch.ones(15)), ValueError,
     "pre must have an even channel count"),
    (lambda x, w: depthwise_glu(x[..., :16], 7, 9.0, torch.ones(16, 1, 3, 3), torch.ones(16)), ValueError,
     "width must be a positive int, got 9.0"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(make_tokens(), make_weights())


def test_explicit_backend_falls_back_with_one_warning():
    weights = make_weights()
    x = make_tokens(B=1, H=3, W=4)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="cuda backend cannot serve.*no cuda backend.*falling back to triton"):
        out = glumbconv(x, 3, 4, *weights, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # triton 3.6's interpreter raises numpy deprecation warnings
        glumbconv(x, 3, 4, *weights, backend="cuda")  # second call: silent
    assert rel_l2(out, glumbconv_reference(x, 3, 4, *weights)) <= TOLERANCE[torch.float32]


def test_gradients_match_diffusers_glumbconv():
    weights = make_weights(24, 72, 16)
    x = make_tokens(H=5, W=3, C=24).requires_grad_(True)
    module, params = diffusers_module(weights)
    leaves = [w.clone().requires_grad_(True) for w in weights]
    grad = torch.randn(2, 15, 16)
    ours = torch.autograd.grad(glumbconv(x, 5, 3, *leaves), [x, *leaves], grad)
    theirs = torch.autograd.grad(on_tokens(module, x, 5, 3), [x, *params], grad)
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(ours, theirs))


def test_torch_compile_fullgraph():
    weights = make_weights()
    x = make_tokens(B=1, H=3, W=4)
    compiled = torch.compile(lambda t: glumbconv(t, 3, 4, *weights) * 2, backend="aot_eager", fullgraph=True)
    assert rel_l2(compiled(x), 2 * glumbconv_reference(x, 3, 4, *weights)) <= TOLERANCE[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_depthwise_glu_partial_tiles(dtype):
    """Odd sizes, every autotuned block config and the tuned launch: partial column, channel and row blocks."""
    from dcgen_kernels.triton_kernels.glumbconv import depthwise_glu_kernel

    H, W, hidden = 45, 37, 200
    pre = torch.randn(2 * H * W, 2 * hidden, device="cuda").to(dtype)
    _, _, depth_weight, depth_bias, _ = make_weights(hidden=hidden, dtype=dtype, device="cuda")
    expected = depthwise_glu_fp32(pre, H, W, depth_weight, depth_bias)
    for config in [*depthwise_glu_kernel.configs, None]:
        out = torch.full((2 * H * W, hidden), float("nan"), dtype=dtype, device="cuda")
        _launch_depthwise_glu(pre, H, W, depth_weight, depth_bias, out, config=config)
        assert rel_l2(out, expected) <= max(TOLERANCE[dtype] / 2, 1e-6), config


_DEPTHWISE_GLU_CONFIG_LAUNCHES = r'''
g = importlib.import_module("dcgen_kernels.ops.glumbconv")
kernel = importlib.import_module("dcgen_kernels.triton_kernels.glumbconv").depthwise_glu_kernel
for dtype in (torch.bfloat16, torch.float32):  # the tanh.approx SiLU (16-bit outputs) and the exponential one
    E = lambda *shape: torch.empty(*shape, dtype=dtype)
    for config in kernel.configs:  # SANA-1.6B's Mix-FFN at a 128x128 latent
        g._launch_depthwise_glu(E(128 * 128, 11200), 128, 128, E(11200, 1, 3, 3), E(11200), E(128 * 128, 5600), config)
print(json.dumps(stats))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_depthwise_glu_configs_compile_for_sm90_without_spills():
    stats = compile_launchers_for_sm90(_DEPTHWISE_GLU_CONFIG_LAUNCHES)
    assert len(stats) > 1, stats  # the GPU config list (the subprocess runs outside the interpreter)
    assert all(s["spills"] == 0 for s in stats), stats


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,side,C,hidden", [(2, 64, 2240, 5600), (1, 128, 512, 2048)])
def test_gpu_sana_and_dcae_shapes(dtype, B, side, C, hidden, monkeypatch):
    """SANA-1.6B's Mix-FFN on a 64x64 latent (CFG batch), and a DC-AE decoder stage (C=512, expand 4)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a true fp32 reference
    weights = make_weights(C, hidden, dtype=dtype, device="cuda")
    x = make_tokens(B=B, H=side, W=side, C=C, dtype=dtype, device="cuda")
    out = glumbconv(x, side, side, *weights, backend="triton")
    assert rel_l2(out, glumbconv_reference(x, side, side, *weights)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_depthwise_glu_matches_glumbconv_middle(dtype):
    """depthwise_glu (the middle of GLUMBConv, for quantized 1x1 convs) = glumbconv with identity 1x1 convs."""
    torch.manual_seed(0)
    B, H, W, hidden = 2, 5, 7, 72  # channel count not a multiple of the kernel's block
    _, _, depth_weight, depth_bias, _ = make_weights(C=2 * hidden, hidden=hidden, dtype=dtype)
    pre = make_tokens(B, H, W, 2 * hidden, dtype=dtype)
    expected = glumbconv_reference(pre, H, W, torch.eye(2 * hidden, dtype=dtype)[..., None, None],
                                   torch.zeros(2 * hidden, dtype=dtype), depth_weight, depth_bias,
                                   torch.eye(hidden, dtype=dtype)[..., None, None])
    reference = depthwise_glu_reference(pre, H, W, depth_weight, depth_bias)
    assert rel_l2(reference, expected) <= TOLERANCE[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the Triton kernel must run, not fall back
        out = depthwise_glu(pre, H, W, depth_weight, depth_bias, backend="triton")
    assert out.shape == (B, H * W, hidden) and out.dtype == dtype
    assert rel_l2(out, reference) <= TOLERANCE[dtype]


def test_depthwise_glu_traces_and_rejects_bad_input():
    H, W, hidden = 3, 4, 8
    _, _, depth_weight, depth_bias, _ = make_weights(C=2 * hidden, hidden=hidden)
    pre = make_tokens(1, H, W, 2 * hidden)
    compiled = torch.compile(lambda p: depthwise_glu(p, H, W, depth_weight, depth_bias, backend="reference"),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(pre), depthwise_glu_reference(pre, H, W, depth_weight, depth_bias))
    with pytest.raises(ValueError, match="height \\* width"):
        depthwise_glu(pre, H + 1, W, depth_weight, depth_bias)
    with pytest.raises(ValueError, match="depth_weight"):
        depthwise_glu(pre, H, W, depth_weight[:-1], depth_bias)


# --------------------------------------------------------------------------------------------- from a mutation review
def _mix_ffn_args(dtype=torch.float32, tokens=12, C=8, hidden=12, C_out=5):
    """glumbconv's arguments for a 3 x 4 map with C_out != C."""
    return [torch.randn(1, tokens, C, dtype=dtype), 3, 4, torch.randn(2 * hidden, C, 1, 1, dtype=dtype),
            torch.randn(2 * hidden, dtype=dtype), torch.randn(2 * hidden, 1, 3, 3, dtype=dtype),
            torch.randn(2 * hidden, dtype=dtype), torch.randn(C_out, hidden, 1, 1, dtype=dtype)]


def test_fake_output_has_the_point_convs_channels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = glumbconv(*_mix_ffn_args())
    assert out.shape == (1, 12, 5)


def test_bad_token_count_and_point_weight_raise():
    with pytest.raises(ValueError, match="height \\* width"):
        glumbconv(*_mix_ffn_args(tokens=13))
    args = _mix_ffn_args()
    args[7] = torch.randn(5, 12, 3, 3)
    with pytest.raises(ValueError, match="point_weight must have shape"):
        glumbconv(*args)
    args = _mix_ffn_args(dtype=torch.bfloat16)
    args[7] = args[7].float()
    with pytest.raises(TypeError, match="point_weight must have dtype"):
        glumbconv(*args)
