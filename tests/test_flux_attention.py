import math
import sys
import warnings

import pytest
import torch

from dcgen_kernels import _backend, _cext
from dcgen_kernels.ops import flux_attention, flux_attention_reference
from tests.helpers import TOLERANCE, rel_l2, rope_tables

flux_attention_module = sys.modules["dcgen_kernels.ops.flux_attention"]


def make_inputs(B=2, S=45, S_txt=7, H=2, D=64, dtype=torch.bfloat16, device="cpu", weights=True, rope=True):
    """Strided Q/K/V views of fused projections, as FluxAttnProcessor sees them after fuse_qkv_projections."""
    def qkv(seq):
        return torch.randn(B, seq, 3 * H * D, device=device).to(dtype).unflatten(-1, (3 * H, D)).chunk(3, dim=-2)

    q, k, v = qkv(S)
    args = dict(q=q, k=k, v=v)
    if S_txt:
        args["txt_q"], args["txt_k"], args["txt_v"] = qkv(S_txt)
    if weights:
        names = ["norm_q_weight", "norm_k_weight"] + (["norm_txt_q_weight", "norm_txt_k_weight"] if S_txt else [])
        args.update({n: torch.rand(D, device=device).add(0.5).to(dtype) for n in names})
    if rope:
        args["cos"], args["sin"] = rope_tables(S_txt + S, D, device)
    return args


# --------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("double", [True, False], ids=["double", "single"])
def test_reference_equals_diffusers_processor(double):
    """Same projections through diffusers' FluxAttnProcessor (norm -> cat -> RoPE -> SDPA) and our reference."""
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    D, H, S, S_txt = 64, 2, 24, 5
    attn = FluxAttention(query_dim=H * D, heads=H, dim_head=D, added_kv_proj_dim=32 if double else None,
                         bias=True, eps=1e-6, pre_only=not double, processor=FluxAttnProcessor()).eval()
    for name, p in attn.named_parameters():
        if "norm" in name:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    hidden = torch.randn(1, S if double else S + S_txt, H * D)
    enc = torch.randn(1, S_txt, 32) if double else None
    cos, sin = rope_tables(S + S_txt, D)
    heads = lambda t: t.unflatten(-1, (H, D))  # noqa: E731
    kwargs = dict(cos=cos, sin=sin, norm_q_weight=attn.norm_q.weight, norm_k_weight=attn.norm_k.weight, eps=1e-6)
    with torch.no_grad():
        expected = attn(hidden, enc, image_rotary_emb=(cos, sin))
        if double:
            kwargs.update(txt_q=heads(attn.add_q_proj(enc)), txt_k=heads(attn.add_k_proj(enc)),
                          txt_v=heads(attn.add_v_proj(enc)), norm_txt_q_weight=attn.norm_added_q.weight,
                          norm_txt_k_weight=attn.norm_added_k.weight)
        out = flux_attention_reference(heads(attn.to_q(hidden)), heads(attn.to_k(hidden)),
                                       heads(attn.to_v(hidden)), **kwargs)
        if double:  # diffusers applies the output projections inside the processor
            assert rel_l2(attn.to_out[0](out[:, S_txt:]), expected[0]) < 1e-6
            assert rel_l2(attn.to_add_out(out[:, :S_txt]), expected[1]) < 1e-6
        else:
            assert rel_l2(out, expected) < 1e-6


# --------------------------------------------------------------------------------------------- triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("S_txt", [7, 0], ids=["double", "single"])
def test_triton_matches_reference(dtype, D, S_txt):
    # 45 image tokens: two query blocks (one partial), two full key blocks and a partial one per segment.
    args = make_inputs(S_txt=S_txt, D=D, dtype=dtype)
    out = torch.full((2, S_txt + 45, 2 * D), float("nan"), dtype=dtype)  # poisoned: every row must be written
    flux_attention_module._launch_triton(**args, eps=1e-6, out=out)
    assert rel_l2(out, flux_attention_reference(**args)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("weights,rope", [(False, True), (True, False), (False, False)])
def test_triton_without_weights_or_rope(weights, rope):
    args = make_inputs(S=20, S_txt=3, weights=weights, rope=rope)
    out = flux_attention(**args, backend="triton")
    assert out.shape == (2, 23, 128)
    assert rel_l2(out, flux_attention_reference(**args)) <= TOLERANCE[torch.bfloat16]


def test_triton_reads_strided_norm_weights():
    args = make_inputs(S=20, S_txt=3)
    strided = {k: torch.stack([t, -t], 1)[:, 0] if k.startswith("norm_") else t for k, t in args.items()}
    assert all(strided[k].stride() == (2,) for k in strided if k.startswith("norm_"))
    assert torch.equal(flux_attention(**strided, backend="triton"), flux_attention(**args, backend="triton"))


def test_triton_batch_rows_do_not_mix():
    """Each batch element alone gives the same rows as in the batch (descriptors clip at segment ends)."""
    args = make_inputs(B=3, S=17, S_txt=5)
    batched = flux_attention(**args, backend="triton")
    single = {k: (t[1:2] if k.startswith(("q", "k", "v", "txt_")) else t) for k, t in args.items()}
    assert torch.equal(flux_attention(**single, backend="triton"), batched[1:2])


# --------------------------------------------------------------------------------------------- backends
def test_explicit_backend_falls_back_with_one_warning():
    args = make_inputs(S=9, S_txt=2, dtype=torch.float32)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="triton backend cannot serve.*float32"):
        out = flux_attention(**args, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flux_attention(**args, backend="triton")  # second call: silent
    assert rel_l2(out, flux_attention_reference(**args)) < 1e-6


@pytest.mark.allow_fallback  # cuda -> triton (no _C device here) -> reference (fp32): two warnings
def test_cuda_backend_request_falls_back_on_cpu():
    args = make_inputs(S=9, S_txt=2, dtype=torch.float32)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning) as caught:  # no _C on CPU; then Triton takes no fp32
        out = flux_attention(**args, backend="cuda")
    messages = [str(w.message) for w in caught]
    assert any("cuda backend cannot serve" in m for m in messages), messages
    assert any("triton backend cannot serve" in m and "float32" in m for m in messages), messages
    assert rel_l2(out, flux_attention_reference(**args)) < 1e-6


def test_backend_env_override(monkeypatch):
    args = make_inputs(S=9, S_txt=2)
    monkeypatch.setenv("DCGEN_BACKEND", "reference")
    assert flux_attention_module.select_backend(args["q"], args["v"], args["txt_q"], args["txt_v"], "auto") == \
        "reference"
    assert flux_attention_module.select_backend(args["q"], args["v"], args["txt_q"], args["txt_v"], "triton") == \
        "triton"
    monkeypatch.setenv("DCGEN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DCGEN_BACKEND must be one of"):
        flux_attention(**args)


def test_misaligned_views_fall_back():
    """A view whose head stride is not a multiple of 16 bytes cannot go through TMA: reference, with a warning."""
    args = make_inputs(S=9, S_txt=0, D=64)
    wide = torch.randn(2, 9, 2, 68).to(torch.bfloat16)
    args["v"] = wide[..., 1:65]  # last dim contiguous, 2-byte offset base
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="16-byte"):
        out = flux_attention(**args, backend="triton")
    assert rel_l2(out, flux_attention_reference(**args)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(_cext._C is None, reason="dcgen_kernels._C not built")
def test_cuda_path_plumbing_with_host_kernel(monkeypatch):
    """The cuda path's buffers, row offsets and SDPA call, on CPU: `_C`'s CUDA launch is swapped for its host
    entry point, which runs the same row function on host memory (the launcher's argument preparation runs)."""
    def host_launch(*args):
        *pointers_and_sizes, _stream = args
        _cext._C.qk_norm_rope_host(*pointers_and_sizes)

    monkeypatch.setattr(_cext._C, "qk_norm_rope", host_launch)
    monkeypatch.setattr(_cext, "stream_handle", lambda device: 0)
    for S_txt in (7, 0):
        args = make_inputs(S_txt=S_txt, dtype=torch.float16)
        out = flux_attention_module._launch_cuda(**args)
        assert out.shape == (2, S_txt + 45, 128)
        assert rel_l2(out, flux_attention_reference(**args)) <= TOLERANCE[torch.float16]


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
    (lambda a: a.update(k=a["k"][:, :-1]), ValueError, "k must have shape"),
    (lambda a: a.update(v=a["v"].half()), TypeError, "v must have dtype"),
    (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, "q must have dtype"),
    (lambda a: a.update(k=a["k"].to("meta")), ValueError, "k must be on device cpu"),
    (lambda a: a.update(v=a["v"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "v must be contiguous in its last dimension"),
    (lambda a: a.pop("txt_v"), ValueError, "txt_q, txt_k and txt_v must be given together"),
    (lambda a: a.update(txt_q=a["txt_q"][:, :, :1], txt_k=a["txt_k"][:, :, :1], txt_v=a["txt_v"][:, :, :1]),
     ValueError, "txt_q must have shape"),
    (lambda a: a.update(norm_q_weight=a["norm_q_weight"][:-1]), ValueError, "norm_q_weight must have shape"),
    (lambda a: a.update(cos=a["cos"][:-1]), ValueError, r"cos must have shape \(52, 64\)"),
    (lambda a: a.pop("sin"), ValueError, "cos and sin must be given together"),
    (lambda a: a.update(cos=a["cos"].t().contiguous().t()), ValueError, "cos must be contiguous"),
    (lambda a: a.update(eps=0.0), ValueError, "eps must be a positive float"),
    (lambda a: a.update(eps=float("nan")), ValueError, "eps must be a positive float"),
    (lambda a: a.update(backend="fast"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_clear_error(mutate, error, match):
    args = make_inputs()
    mutate(args)
    with pytest.raises(error, match=match):
        flux_attention(**args)


def test_text_weights_without_text_rejected():
    args = make_inputs(S_txt=0)
    with pytest.raises(ValueError, match="given without txt_q"):
        flux_attention(**args, norm_txt_q_weight=args["norm_q_weight"])


def test_odd_head_dim_with_rope_rejected():
    args = make_inputs(S=5, S_txt=0, D=64, rope=False)
    args = {k: (t[..., :63] if k in ("q", "k", "v") else t[:63]) for k, t in args.items()}
    with pytest.raises(ValueError, match="head_dim must be even"):
        flux_attention(**args, cos=torch.zeros(5, 63), sin=torch.zeros(5, 63))


# --------------------------------------------------------------------------------------------- autograd
def _diffusers_attention(args):
    """Stock diffusers math, differentiable: RMSNorm modules, apply_rotary_emb, SDPA."""
    from diffusers.models.embeddings import apply_rotary_emb

    def norm(x, w):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6)

    q = torch.cat([norm(args["txt_q"], args["norm_txt_q_weight"]), norm(args["q"], args["norm_q_weight"])], 1)
    k = torch.cat([norm(args["txt_k"], args["norm_txt_k_weight"]), norm(args["k"], args["norm_k_weight"])], 1)
    v = torch.cat([args["txt_v"], args["v"]], 1)
    rope = (args["cos"], args["sin"])
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def test_gradients_match_diffusers_math():
    args = make_inputs(S=13, S_txt=4, dtype=torch.float32)
    names = ["q", "k", "v", "txt_q", "txt_k", "txt_v", "norm_q_weight", "norm_k_weight", "norm_txt_q_weight",
             "norm_txt_k_weight"]
    for n in names:
        args[n] = args[n].detach().clone().requires_grad_(True)
    grad_out = torch.randn(2, 17, 128)
    ours = torch.autograd.grad(flux_attention(**args, backend="reference"), [args[n] for n in names], grad_out)
    theirs = torch.autograd.grad(_diffusers_attention(args), [args[n] for n in names], grad_out)
    for n, a, b in zip(names, ours, theirs):
        assert rel_l2(a, b) < 1e-5, n


def test_gradients_flow_from_triton_forward_in_bf16():
    args = make_inputs(S=13, S_txt=4, dtype=torch.bfloat16)
    leaf = args["q"].detach().clone().requires_grad_(True)
    args["q"] = leaf
    flux_attention(**args, backend="triton").float().square().sum().backward()
    expected, = torch.autograd.grad(flux_attention_reference(**{**args, "q": leaf}).float().square().sum(), leaf)
    assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16
    assert rel_l2(leaf.grad, expected) < 0.05  # the loss itself sees the bf16-level forward difference


# --------------------------------------------------------------------------------------------- compile
def test_custom_op_traces_in_torch_compile_without_graph_breaks():
    args = make_inputs(S=13, S_txt=4, dtype=torch.float32)
    compiled = torch.compile(lambda a: flux_attention(**a, backend="reference") * 2, fullgraph=True,
                             backend="aot_eager")
    assert rel_l2(compiled(args), 2 * flux_attention_reference(**args)) < 1e-6


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = make_inputs(S=13, S_txt=4)
        out = flux_attention(**args)
    assert out.shape == (2, 17, 128) and out.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S,S_txt,D", [(4096, 512, 128), (1000, 77, 128), (333, 0, 64), (700, 33, 256)])
def test_backends_on_gpu(backend, dtype, S, S_txt, D):
    args = make_inputs(B=2, S=S, S_txt=S_txt, H=4, D=D, dtype=dtype, device="cuda")
    if backend == "triton":  # poisoned output: every row must be written
        out = torch.full((2, S_txt + S, 4 * D), float("nan"), dtype=dtype, device="cuda")
        flux_attention_module._launch_triton(**args, eps=1e-6, out=out)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would not test the cuda path
            out = flux_attention(**args, backend="cuda")
    assert rel_l2(out, flux_attention_reference(**args)) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_flux_shape_softmax_scale_on_gpu():
    """FLUX-size problem (24 heads x 128, 512 + 4096 tokens): auto picks a GPU backend and stays accurate."""
    args = make_inputs(B=1, S=4096, S_txt=512, H=24, D=128, device="cuda")
    expected = "cuda" if _cext._C is not None else "triton"
    assert flux_attention_module.select_backend(args["q"], args["v"], args["txt_q"], args["txt_v"], "auto") == \
        expected
    err = rel_l2(flux_attention(**args), flux_attention_reference(**args))
    assert err <= TOLERANCE[torch.bfloat16] and math.isfinite(err)


def test_reference_output_is_contiguous_like_the_fake():
    q, k, v = (torch.randn(20, 2, 2, 64).transpose(0, 1) for _ in range(3))  # (B, S, H, D) views, batch-minor
    torch.library.opcheck(torch.ops.dcgen.flux_attention.default,  # single stream, no norm weights, no RoPE
                          (q, k, v, None, None, None, None, None, None, None, None, None, 1e-6, "reference"),
                          test_utils=("test_faketensor",))


def test_triton_uses_the_given_eps():
    """The Q/K RMSNorm's eps matters where the mean square is of its order: inputs ~1e-2 with eps 1e-3."""
    args = make_inputs(S=20, S_txt=3)
    for name in ("q", "k", "txt_q", "txt_k"):
        args[name] = args[name] * 1e-2
    out = flux_attention(**args, eps=1e-3, backend="triton")
    assert rel_l2(out, flux_attention_reference(**args, eps=1e-3)) <= TOLERANCE[torch.bfloat16]
    assert rel_l2(out, flux_attention_reference(**args, eps=1e-6)) > 0.1  # measured 0.76


# --------------------------------------------------------------------------------------------- from a mutation review
def test_text_stream_errors_and_head_dim_256():
    inputs = make_inputs(S=9, S_txt=2)
    with pytest.raises(ValueError, match="txt_k must have shape"):
        flux_attention(**{**inputs, "txt_k": inputs["txt_k"][:, :1]})
    plain = make_inputs(S=9, S_txt=2, rope=False)
    with pytest.raises(ValueError, match="non-empty"):
        flux_attention(**{**plain, **{name: plain[name][:, :0] for name in ("q", "k", "v")}})
    with pytest.raises(ValueError, match="S_txt>0"):
        flux_attention(**{**plain, **{name: plain[name][:, :0] for name in ("txt_q", "txt_k", "txt_v")}})
    wide = make_inputs(S=9, S_txt=2, D=256)
    assert flux_attention_module.select_backend(wide["q"], wide["v"], wide["txt_q"], wide["txt_v"], "auto") == "triton"


def test_misaligned_text_values_fall_back_and_image_only_norm_weights():
    inputs = make_inputs(S=9, S_txt=3, D=64)
    inputs["txt_v"] = torch.randn(2, 3, 2, 68).to(torch.bfloat16)[..., 1:65]  # rows not 16-byte aligned
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="16-byte"):
        out = flux_attention(**inputs, backend="triton")
    assert rel_l2(out, flux_attention_reference(**inputs)) <= TOLERANCE[torch.bfloat16]
    inputs = make_inputs(S=20, S_txt=3)
    inputs["norm_txt_q_weight"] = inputs["norm_txt_k_weight"] = None  # the text stream unnormalised-weighted
    assert rel_l2(flux_attention(**inputs, backend="triton"), flux_attention_reference(**inputs)) <= \
        TOLERANCE[torch.bfloat16]
