import warnings

import pytest
import torch

from dcgen_kernels import _backend
from dcgen_kernels.ops.sana_linear_attention import (
    _by_head,
    _launch_triton,
    relu_linear_attention_fp32,
    sana_linear_attention,
    sana_linear_attention_into,
    sana_linear_attention_reference,
    sana_multiscale_linear_attention,
    sana_multiscale_linear_attention_into,
    sana_multiscale_linear_attention_reference,
)
from tests.helpers import TOLERANCE, rel_l2


def make_inputs(B=2, N=37, H=3, D=32, dtype=torch.bfloat16, device="cpu"):
    """Token-major Q/K/V: strided (B, N, H*D) chunks of one fused projection."""
    return torch.randn(B, N, 3 * H * D, device=device).to(dtype).chunk(3, dim=-1)


def make_multiscale_inputs(B=2, heads=4, D=32, N=35, dtype=torch.bfloat16, device="cpu"):
    """Channel-first Q/K/V: the (B, heads, D, N) chunks of DC-AE's multiscale QKV reshape."""
    qkv = torch.randn(B, heads * 3 * D, N, device=device).to(dtype)
    return qkv.reshape(B, heads, 3 * D, N).chunk(3, dim=2)


def sana_attention_module(C=96, heads=3, qk_norm=None):
    """Self-attention built like SanaTransformerBlock.attn1."""
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    return Attention(query_dim=C, heads=heads, dim_head=C // heads, kv_heads=heads if qk_norm else None,
                     qk_norm=qk_norm, bias=True, cross_attention_dim=None,
                     processor=SanaLinearAttnProcessor2_0()).eval()


def multiscale_qkv(attn, x):
    """Q/K/V exactly as SanaMultiscaleAttnProcessor2_0 builds them, before its fp32 upcast and ReLU."""
    B, _, height, width = x.shape
    hidden = x.movedim(1, -1)
    hidden = torch.cat([attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)], dim=3).movedim(-1, 1)
    hidden = torch.cat([hidden] + [block(hidden) for block in attn.to_qkv_multiscale], dim=1)
    return hidden.reshape(B, -1, 3 * attn.attention_head_dim, height * width).chunk(3, dim=2)


def multiscale_module(C=64, D=32, dtype=torch.float32):
    from diffusers.models.attention_processor import SanaMultiscaleLinearAttention

    return SanaMultiscaleLinearAttention(C, C, attention_head_dim=D, norm_type="rms_norm", kernel_sizes=(5,),
                                         residual_connection=True).to(dtype).eval()


# --------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_reference_equals_sana_linear_attn_processor(qk_norm):
    attn = sana_attention_module(qk_norm=qk_norm)
    x = torch.randn(2, 29, 96)
    with torch.no_grad():
        expected = attn(x)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if qk_norm:
            q, k = attn.norm_q(q), attn.norm_k(k)
        ours = attn.to_out[1](attn.to_out[0](sana_linear_attention_reference(q, k, v, attn.heads)))
    assert rel_l2(ours, expected) < 1e-6


def test_multiscale_reference_equals_apply_linear_attention():
    attn = multiscale_module()
    with torch.no_grad():
        q, k, v = multiscale_qkv(attn, torch.randn(2, 64, 5, 7))
        relu = attn.nonlinearity
        expected = attn.apply_linear_attention(relu(q), relu(k), v)
        ours = sana_multiscale_linear_attention_reference(q, k, v, attn.eps)
    assert rel_l2(ours, expected) < 1e-6


def test_multiscale_triton_matches_stock_upcast_path():
    """bf16 module: stock upcasts the bf16 Q/K/V to fp32 and casts back; our op takes the bf16 chunks."""
    attn = multiscale_module(dtype=torch.bfloat16)
    with torch.no_grad():
        q, k, v = multiscale_qkv(attn, torch.randn(1, 64, 6, 7).bfloat16())
        relu = attn.nonlinearity
        expected = attn.apply_linear_attention(relu(q.float()), relu(k.float()), v.float()).to(torch.bfloat16)
        ours = sana_multiscale_linear_attention(q, k, v, eps=attn.eps, backend="triton")
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous()
    assert rel_l2(ours, expected) <= TOLERANCE[torch.bfloat16]


# --------------------------------------------------------------------------------------------- triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("D", [32, 72, 112])
def test_triton_matches_reference(dtype, D):
    q, k, v = make_inputs(D=D, dtype=dtype)
    wide = torch.full((2, 37, 2 * 3 * D), float("nan"), dtype=dtype)
    out = wide[..., :3 * D]  # a strided output: the kernel must write every element and nothing else
    sana_linear_attention_into(q, k, v, 3, 1e-15, out)
    assert rel_l2(out, sana_linear_attention_reference(q, k, v, 3)) <= max(TOLERANCE[dtype], 1e-6)
    assert wide[..., 3 * D:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("D", [32, 72])
def test_multiscale_triton_matches_reference(dtype, D):
    q, k, v = make_multiscale_inputs(D=D, dtype=dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    sana_multiscale_linear_attention_into(q, k, v, 1e-15, out)
    assert rel_l2(out, sana_multiscale_linear_attention_reference(q, k, v)) <= max(TOLERANCE[dtype], 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_math_is_fp32_accurate_before_the_output_cast(dtype):
    """An fp32 output isolates the kernel math (bf16 hi/lo splits of KᵀV, and of Q for fp16) from the final
    rounding to the input dtype; the interpreter truncates bf16 conversions, so a GPU does better."""
    q, k, v = torch.randn(3, 2, 3, 45, 32).to(dtype)
    out = torch.full(q.shape, float("nan"))
    _launch_triton(q, k, v, 1e-15, out)
    assert rel_l2(out, relu_linear_attention_fp32(q, k, v, 1e-15)) < 5e-5


def test_passes_with_different_slicings_of_the_tokens():
    """The output pass sums however many partials the K pass wrote, whatever its own slicing: here the K pass
    runs 2 slices of 16-token tiles per (b, h) and the output pass 1 slice of 64-token tiles."""
    import triton

    q, k, v = torch.randn(3, 2, 3, 40, 32)
    out = torch.full(q.shape, float("nan"))
    configs = (triton.Config({"BLOCK_N": 16, "PROGRAMS_PER_SM": 0, "HEADS_PER_PROGRAM": 1}, num_warps=4,
                             num_stages=1),
               triton.Config({"BLOCK_M": 64, "PROGRAMS_PER_SM": 0}, num_warps=4, num_stages=1))
    _launch_triton(q, k, v, 1e-15, out, configs)
    assert rel_l2(out, relu_linear_attention_fp32(q, k, v, 1e-15)) < 1e-6


def _head_group_configs(kv_heads: int):
    import triton

    return (triton.Config({"BLOCK_N": 16, "PROGRAMS_PER_SM": 0, "HEADS_PER_PROGRAM": kv_heads}, num_warps=4,
                          num_stages=1),
            triton.Config({"BLOCK_M": 16, "PROGRAMS_PER_SM": 0}, num_warps=4, num_stages=1))


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_head_groups_match_reference(kv_heads, dtype):
    """K-pass programs taking 2 or 4 heads of 3 (the last group short of heads): only each head's diagonal block
    of the group's KᵀV may reach its partials, and no column past the last head may be read or written."""
    q, k, v = make_inputs(B=2, N=37, H=3, D=16, dtype=dtype)
    wide = torch.full((2, 37, 2 * 3 * 16), float("nan"), dtype=dtype)
    out = wide[..., :3 * 16]
    _launch_triton(*(_by_head(x, 3) for x in (q, k, v)), 1e-15, _by_head(out, 3),
                   _head_group_configs(kv_heads))
    assert rel_l2(out, sana_linear_attention_reference(q, k, v, 3)) <= max(TOLERANCE[dtype], 1e-6)
    assert wide[..., 3 * 16:].isnan().all()


@pytest.mark.parametrize("D", [24, 32])
def test_head_groups_match_reference_channel_first_and_padded(D):
    """DC-AE's channel-first layout, and a head dim padded to a power of two inside a group."""
    q, k, v = make_multiscale_inputs(B=1, heads=3, D=D, N=35, dtype=torch.float32)
    out = torch.full(q.shape, float("nan"))
    _launch_triton(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), 1e-15, out.transpose(2, 3),
                   _head_group_configs(2))
    assert rel_l2(out, sana_multiscale_linear_attention_reference(q, k, v)) < 1e-6


def _fused_config(heads_per_program: int):
    import triton

    return triton.Config({"BLOCK_N": 16, "KV_PROGRAMS_PER_SM": 0, "HEADS_PER_PROGRAM": heads_per_program,
                          "BLOCK_M": 16, "OUT_PROGRAMS_PER_SM": 0}, num_warps=4, num_stages=1)


@pytest.mark.parametrize("heads_per_program", [None, 2], ids=["tuned", "2-head-K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fused_matches_reference(heads_per_program, dtype):
    """Both passes in one launch, token-major, into a strided NaN-poisoned output: 3 heads (the 2-head group short
    of one), 37 tokens (partial tiles, two slices per group / head under the interpreter). Twice, as the counters
    that order the launch's programs are kept between calls: each launch must leave them at zero."""
    from dcgen_kernels.ops import _common

    q, k, v = make_inputs(B=2, N=37, H=3, D=32, dtype=dtype)
    expected = sana_linear_attention_reference(q, k, v, 3)
    config = _fused_config(heads_per_program) if heads_per_program else None
    for _ in range(2):
        wide = torch.full((2, 37, 2 * 96), float("nan"), dtype=dtype)
        out = wide[..., :96]
        _launch_triton(*(_by_head(x, 3) for x in (q, k, v)), 1e-15, _by_head(out, 3), config, strategy="fused")
        assert rel_l2(out, expected) <= max(TOLERANCE[dtype], 1e-6)
        assert wide[..., 96:].isnan().all()
        assert not _common._ARRIVAL_COUNTERS[("cpu", None)].any()


@pytest.mark.parametrize("D", [24, 32])
def test_fused_matches_reference_channel_first_and_padded(D):
    q, k, v = make_multiscale_inputs(B=1, heads=3, D=D, N=35, dtype=torch.float32)
    out = torch.full(q.shape, float("nan"))
    _launch_triton(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), 1e-15, out.transpose(2, 3),
                   _fused_config(2), strategy="fused")
    assert rel_l2(out, sana_multiscale_linear_attention_reference(q, k, v)) < 1e-6


def test_unknown_strategy_raises():
    q, k, v = torch.randn(3, 1, 2, 8, 16)
    with pytest.raises(ValueError, match="strategy must be 'two_pass', 'fused' or None"):
        _launch_triton(q, k, v, 1e-15, torch.empty_like(q), strategy="one_pass")


def test_strategy_is_timed_once_per_shape_and_the_faster_kept(monkeypatch):
    import importlib

    import triton.testing

    from dcgen_kernels.ops import _common

    op = importlib.import_module("dcgen_kernels.ops.sana_linear_attention")  # the module, not the function
    ran, times = [], {"two_pass": 0.13, "fused": 0.12}
    monkeypatch.setattr(op, "_launch_two_pass", lambda *args: ran.append("two_pass"))
    monkeypatch.setattr(op, "_launch_fused", lambda *args: ran.append("fused"))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode, warmup, rep: (fn(), times[ran[-1]])[1])
    monkeypatch.setattr(_common, "TIMED_CHOICES", {})
    q, k, v = torch.randn(3, 1, 2, 8, 16)
    out = torch.empty_like(q)
    assert op._pick_strategy(q, k, v, 1e-15, out, {}) == "fused"
    times["fused"] = 0.5  # cached: not timed again
    assert op._pick_strategy(q, k, v, 1e-15, out, {}) == "fused" and ran == ["two_pass", "fused"]
    choices = _common.TIMED_CHOICES["sana_linear_attention"]
    assert list(choices.values()) == [{"picked": "fused", "two_pass_ms": 0.13, "fused_ms": 0.12}]
    v_other_layout = v.transpose(2, 3).contiguous().transpose(2, 3)  # another key: timed on its own, now slower
    assert op._pick_strategy(q, k, v_other_layout, 1e-15, out, {}) == "two_pass"
    assert len(choices) == 2 and ran[-2:] == ["two_pass", "fused"]


def test_autotune_prunes_head_groups_past_the_register_budget():
    from dcgen_kernels.triton_kernels.sana_linear_attention import prune_head_groups

    configs = [_head_group_configs(heads)[0] for heads in (1, 2, 4)]
    kept = lambda H, padded: [c.kwargs["HEADS_PER_PROGRAM"]  # noqa: E731
                              for c in prune_head_groups(configs, {"H": H}, PADDED_DIM=padded)]
    assert kept(70, 16) == [1, 2, 4]
    assert kept(70, 32) == [1, 2]
    assert kept(70, 64) == [1]
    assert kept(1, 32) == [1]


_CONFIG_LAUNCHES = r'''
a = importlib.import_module("dcgen_kernels.ops.sana_linear_attention")
kernels = importlib.import_module("dcgen_kernels.triton_kernels.sana_linear_attention")
q, k, v, out = torch.empty(4, 1, 16384, 2240, dtype=torch.bfloat16).unflatten(-1, (70, 32)).transpose(2, 3)
kv_configs, out_configs = kernels.linear_attention_kv_kernel.configs, kernels.linear_attention_out_kernel.configs
for i in range(max(len(kv_configs), len(out_configs))):  # every config of both lists, at SANA-1.6B's 128x128
    a._launch_triton(q, k, v, 1e-15, out, (kv_configs[i % len(kv_configs)], out_configs[i % len(out_configs)]))
print(json.dumps(stats))
'''


_FUSED_CONFIG_LAUNCHES = r'''
a = importlib.import_module("dcgen_kernels.ops.sana_linear_attention")
kernels = importlib.import_module("dcgen_kernels.triton_kernels.sana_linear_attention")
q, k, v, out = torch.empty(4, 1, 16384, 2240, dtype=torch.bfloat16).unflatten(-1, (70, 32)).transpose(2, 3)
for config in kernels.linear_attention_fused_kernel.configs:  # every fused config at SANA-1.6B's 128x128
    a._launch_triton(q, k, v, 1e-15, out, config, strategy="fused")
print(json.dumps(stats))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_fused_configs_compile_for_sm90_without_spills():
    from tests.helpers import compile_launchers_for_sm90

    stats = compile_launchers_for_sm90(_FUSED_CONFIG_LAUNCHES)
    assert len(stats) > 1 and all(s["kernel"] == "linear_attention_fused_kernel" for s in stats), stats
    assert all(s["spills"] == 0 for s in stats), stats


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_pass_configs_compile_for_sm90_without_spills():
    from tests.helpers import compile_launchers_for_sm90

    stats = compile_launchers_for_sm90(_CONFIG_LAUNCHES)
    assert len(stats) > 2, stats  # both passes, every config of the GPU list (the subprocess runs outside the
    assert all(s["spills"] == 0 for s in stats), stats  # interpreter)


def test_all_negative_query_row_gives_zeros():
    """ReLU(Q[n]) = 0 makes the quotient 0 / eps = 0, as in diffusers."""
    q, k, v = make_inputs(N=20, H=1, dtype=torch.float32)
    q = q.clone()
    q[:, 3] = -1.0
    out = sana_linear_attention(q, k, v, 1, backend="triton")
    assert out[:, 3].eq(0).all() and rel_l2(out, sana_linear_attention_reference(q, k, v, 1)) < 1e-6


@pytest.mark.parametrize("strategy", ["two_pass", "fused"])
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_in_q_or_k_stays_nan_as_in_the_reference(strategy, where):
    """ReLU must keep NaN (torch.relu does): a NaN key spoils its head's whole output, a NaN query its row; a max
    that drops NaN would hand back finite numbers for a diverged activation."""
    q, k, v = (x.clone() for x in make_inputs(B=1, N=20, H=2, dtype=torch.float32))
    (q if where == "q" else k)[0, 3, 5] = float("nan")
    expected = sana_linear_attention_reference(q, k, v, 2)
    out = torch.empty_like(expected)
    _launch_triton(*(_by_head(x, 2) for x in (q, k, v)), 1e-15, _by_head(out, 2), strategy=strategy)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    assert rel_l2(out.nan_to_num(), expected.nan_to_num()) < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # eps 0: the interpreter's masked rows
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eps_default_and_given(backend):
    """diffusers' eps 1e-15 by default (queries of ~1e-12 make it visible: with 1e-6 the output would shrink ~1000x),
    and a given eps, 0 included, reaches the kernels."""
    q, k, v = make_inputs(N=20, H=2, dtype=torch.float32)
    tiny_q = q.abs() * 1e-12
    assert rel_l2(sana_linear_attention(tiny_q, k, v, 2, backend=backend),
                  sana_linear_attention_reference(tiny_q, k, v, 2, eps=1e-15)) < 1e-5
    for eps in (0.0, 10.0):
        assert rel_l2(sana_linear_attention(q.abs(), k, v, 2, eps=eps, backend=backend),
                      sana_linear_attention_reference(q.abs(), k, v, 2, eps=eps)) < 1e-5
    mq, mk, mv = make_multiscale_inputs(N=20, dtype=torch.float32)
    tiny_mq = mq.abs() * 1e-12
    out = sana_multiscale_linear_attention(tiny_mq, mk, mv, backend=backend)
    assert out.is_contiguous()  # as the fake promises, also where no cast copies
    assert rel_l2(out, sana_multiscale_linear_attention_reference(tiny_mq, mk, mv, eps=1e-15)) < 1e-5


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: sana_linear_attention(q[0], k, v, 3), ValueError, "q must have 3 dimensions"),
    (lambda q, k, v: sana_linear_attention(q, k[:, :5], v, 3), ValueError, r"k must have shape \(2, 37, 96\)"),
    (lambda q, k, v: sana_linear_attention(q, k, v.half(), 3), TypeError, "v must have dtype"),
    (lambda q, k, v: sana_linear_attention(q.int(), k, v, 3), TypeError, "q must have dtype"),
    (lambda q, k, v: sana_linear_attention(q, k.to("meta"), v, 3), ValueError, "k must be on device"),
    (lambda q, k, v: sana_linear_attention(q.mT.mT[..., ::2], k[..., ::2], v[..., ::2], 3), ValueError,
     "q must be contiguous in its last dimension"),
    (lambda q, k, v: sana_linear_attention(q[:, :0], k[:, :0], v[:, :0], 3), ValueError, "non-empty"),
    (lambda q, k, v: sana_linear_attention(q, k, v, 5), ValueError, "heads must be a positive divisor"),
    (lambda q, k, v: sana_linear_attention(q, k, v, 0), ValueError, "heads must be a positive divisor"),
    (lambda q, k, v: sana_linear_attention(q, k, v, 3.0), TypeError, "heads must be an int"),
    (lambda q, k, v: sana_linear_attention(q, k, v, True), TypeError, "heads must be an int"),
    (lambda q, k, v: sana_linear_attention(q, k, v, 3, eps=True), ValueError, "eps must be a non-negative"),
    (lambda q, k, v: sana_linear_attention(q, k, v, 3, eps=-1e-15), ValueError, "eps must be a non-negative"),
    (lambda q, k, v: sana_linear_attention(q, k, v, 3, eps=float("inf")), ValueError, "eps must be a non-neg"),
    (lambda q, k, v: sana_linear_attention(q, k, v, 3, backend="gpu"), ValueError, "backend must be one of"),
    (lambda q, k, v: sana_linear_attention("q", k, v, 3), TypeError, "q must be a torch.Tensor"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*make_inputs())


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: sana_multiscale_linear_attention(q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: sana_multiscale_linear_attention(q, k[..., 1:], v), ValueError, "k must have shape"),
    (lambda q, k, v: sana_multiscale_linear_attention(q, k, v.float()), TypeError, "v must have dtype"),
    (lambda q, k, v: sana_multiscale_linear_attention(q, k, v, eps=None), ValueError, "eps must be"),
    (lambda q, k, v: sana_multiscale_linear_attention(q, k, v, backend=None), TypeError, "backend must be"),
])
def test_multiscale_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*make_multiscale_inputs())


def test_explicit_backend_falls_back_with_one_warning():
    q, k, v = make_inputs(N=9, H=1, D=160, dtype=torch.float32)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="triton backend cannot serve.*head_dim 160"):
        out = sana_linear_attention(q, k, v, 1, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sana_linear_attention(q, k, v, 1, backend="triton")  # second call: silent
    assert rel_l2(out, sana_linear_attention_reference(q, k, v, 1)) < 1e-6


def test_cuda_backend_request_falls_back():
    q, k, v = make_multiscale_inputs(dtype=torch.float32)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="has no cuda backend"):
        out = sana_multiscale_linear_attention(q, k, v, backend="cuda")
    assert rel_l2(out, sana_multiscale_linear_attention_reference(q, k, v)) < 1e-6


# --------------------------------------------------------------------------------------------- autograd
def test_gradients_match_sana_processor():
    attn = sana_attention_module()
    x = torch.randn(2, 21, 96, requires_grad=True)
    grad = torch.randn(2, 21, 96)
    params = [x, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]
    theirs = torch.autograd.grad(attn(x), params, grad)
    out = sana_linear_attention(attn.to_q(x), attn.to_k(x), attn.to_v(x), attn.heads, backend="triton")
    ours = torch.autograd.grad(attn.to_out[0](out), params, grad)
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(ours, theirs))


def test_multiscale_gradients_match_apply_linear_attention():
    attn = multiscale_module()
    q, k, v = (t.contiguous().requires_grad_(True) for t in make_multiscale_inputs(dtype=torch.float32))
    grad = torch.randn(q.shape)
    relu = attn.nonlinearity
    theirs = torch.autograd.grad(attn.apply_linear_attention(relu(q), relu(k), v), [q, k, v], grad)
    ours = torch.autograd.grad(sana_multiscale_linear_attention(q, k, v, backend="triton"), [q, k, v], grad)
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(ours, theirs))


# --------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_custom_ops_trace_in_torch_compile_without_graph_breaks(dynamic):
    """dynamic=True traces the eps floats as symbols: the argument checks must only compare them."""

    def both(q, k, v, mq, mk, mv):
        return (sana_linear_attention(q, k, v, 3, backend="triton") * 2,
                sana_multiscale_linear_attention(mq, mk, mv, backend="triton") + 1)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for N in (19, 23):
        q, k, v = make_inputs(N=N, dtype=torch.float32)
        mq, mk, mv = make_multiscale_inputs(N=N, dtype=torch.float32)
        token_major, channel_first = compiled(q, k, v, mq, mk, mv)
        assert rel_l2(token_major, 2 * sana_linear_attention_reference(q, k, v, 3)) < 1e-6
        assert rel_l2(channel_first, 1 + sana_multiscale_linear_attention_reference(mq, mk, mv)) < 1e-6


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = sana_linear_attention(*make_inputs(), 3)
        ms = sana_multiscale_linear_attention(*make_multiscale_inputs())
    assert out.shape == (2, 37, 96) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert ms.shape == (2, 4, 32, 35) and ms.is_contiguous()


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N", [4096, 16384])
def test_gpu_sana_shapes(N, dtype):
    """SANA-1.6B self-attention: 70 heads × 32 at 1K/2K latents (32², 64²... tokens 4096, 16384)."""
    q, k, v = make_inputs(B=1, N=N, H=70, D=32, dtype=dtype, device="cuda")
    out = torch.full((1, N, 2240), float("nan"), dtype=dtype, device="cuda")
    sana_linear_attention_into(q, k, v, 70, 1e-15, out)
    assert rel_l2(out, sana_linear_attention_reference(q, k, v, 70)) <= TOLERANCE[dtype] / 2
    again = sana_linear_attention(q, k, v, 70, backend="triton")
    assert torch.equal(out, again)  # fixed-order reduction: bitwise deterministic


@pytest.mark.gpu
def test_gpu_every_pass_config():
    """Each config of either pass, paired with a different-slicing config of the other (the tuner may pick any)."""
    from dcgen_kernels.triton_kernels.sana_linear_attention import (linear_attention_kv_kernel,
                                                                    linear_attention_out_kernel)

    q, k, v = make_inputs(B=1, N=16384, H=70, D=32, device="cuda")
    expected = sana_linear_attention_reference(q, k, v, 70)
    kv_configs, out_configs = linear_attention_kv_kernel.configs, linear_attention_out_kernel.configs
    for i in range(max(len(kv_configs), len(out_configs))):  # every config of both lists
        pair = (kv_configs[i % len(kv_configs)], out_configs[(i + 1) % len(out_configs)])
        out = torch.full((1, 16384, 2240), float("nan"), dtype=torch.bfloat16, device="cuda")
        by_head = [t.unflatten(-1, (70, 32)).transpose(1, 2) for t in (q, k, v, out)]
        _launch_triton(*by_head[:3], 1e-15, by_head[3], pair)
        assert rel_l2(out, expected) <= TOLERANCE[torch.bfloat16] / 2, pair


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["sana", "dc_ae"])
def test_gpu_fused_every_config_and_repeatable(layout):
    """Every fused config, then 20 back-to-back launches of one: the programs of a launch order themselves through
    counters and wait on each other's partials, so a missing ordering would show as a wrong or varying result."""
    from dcgen_kernels.ops import _common
    from dcgen_kernels.triton_kernels.sana_linear_attention import linear_attention_fused_kernel

    if layout == "sana":
        q, k, v = (t.unflatten(-1, (70, 32)).transpose(1, 2)
                   for t in make_inputs(B=1, N=16384, H=70, D=32, device="cuda"))
    else:
        q, k, v = (t.transpose(2, 3) for t in make_multiscale_inputs(B=1, heads=64, D=32, N=16384, device="cuda"))
    expected = relu_linear_attention_fp32(q, k, v, 1e-15)
    out = torch.empty_like(q)
    for config in linear_attention_fused_kernel.configs:
        out.fill_(float("nan"))
        _launch_triton(q, k, v, 1e-15, out, config, strategy="fused")
        assert rel_l2(out, expected) <= TOLERANCE[torch.bfloat16] / 2, config
    first = out.clone()
    for _ in range(20):
        _launch_triton(q, k, v, 1e-15, out, linear_attention_fused_kernel.configs[-1], strategy="fused")
        assert torch.equal(out, first)
    torch.cuda.synchronize()
    assert not any(counters.any() for counters in _common._ARRIVAL_COUNTERS.values())  # each launch resets them


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 72, 112])
def test_gpu_other_head_dims(D):
    q, k, v = make_inputs(B=2, N=3000, H=4, D=D, dtype=torch.bfloat16, device="cuda")
    out = sana_linear_attention(q, k, v, 4, backend="triton")
    assert rel_l2(out, sana_linear_attention_reference(q, k, v, 4)) <= TOLERANCE[torch.bfloat16] / 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,N", [(64, 16384), (32, 65536)])
def test_gpu_dc_ae_shapes(heads, N, dtype):
    """DC-AE f32c32 decoder at 4096²: 1024 ch at 128² (2 × 32 heads × 32), 512 ch at 256² (2 × 16 heads)."""
    q, k, v = make_multiscale_inputs(B=1, heads=heads, D=32, N=N, dtype=dtype, device="cuda")
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    sana_multiscale_linear_attention_into(q, k, v, 1e-15, out)
    assert rel_l2(out, sana_multiscale_linear_attention_reference(q, k, v)) <= max(TOLERANCE[dtype] / 2, 1e-6)
