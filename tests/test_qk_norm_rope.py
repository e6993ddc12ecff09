import os

import pytest
import torch

from dcgen_kernels import _cext
from dcgen_kernels.ops import qk_norm_rope, qk_norm_rope_reference
from dcgen_kernels.ops.qk_norm_rope import qk_norm_rope_into
from tests.helpers import TOLERANCE, rel_l2, rope_tables


def make_inputs(B=2, S=19, H=3, D=64, dtype=torch.bfloat16, device="cpu", rope_rows=None):
    x = torch.randn(B, S, 3 * H * D, device=device).to(dtype).unflatten(-1, (3 * H, D)).chunk(3, dim=-2)[1]
    w = torch.rand(D, device=device).add(0.5).to(dtype)
    cos, sin = rope_tables(rope_rows or S, D, device)
    return x, w, cos, sin


def test_reference_equals_diffusers_modules():
    from diffusers.models.embeddings import apply_rotary_emb

    x, w, cos, sin = make_inputs(dtype=torch.float32, rope_rows=25)
    norm = torch.nn.RMSNorm(64, eps=1e-6)
    norm.weight.data.copy_(w)
    expected = apply_rotary_emb(norm(x), (cos[4:23], sin[4:23]), sequence_dim=1)
    assert rel_l2(qk_norm_rope_reference(x, w, cos, sin, 1e-6, rope_offset=4), expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [16, 32, 64, 128, 256])  # every head dim the Triton kernel takes
def test_triton_matches_reference(dtype, D):
    x, w, cos, sin = make_inputs(D=D, dtype=dtype, rope_rows=30)
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    qk_norm_rope_into(x, w, cos, sin, 1e-6, 11, out, "triton")
    assert rel_l2(out, qk_norm_rope_reference(x, w, cos, sin, 1e-6, 11)) <= max(TOLERANCE[dtype], 1e-6)


def test_triton_applies_any_table_as_diffusers_does():
    """Tables whose pair entries differ (not FLUX's, whose cos / sin repeat per pair): each element takes its own
    cos and sin, as diffusers' apply_rotary_emb does; a kernel that swapped them within a pair would pass on
    pair-equal tables only."""
    from diffusers.models.embeddings import apply_rotary_emb

    x, w, _, _ = make_inputs(dtype=torch.float32)
    cos, sin = torch.randn(19, 64), torch.randn(19, 64)
    expected = apply_rotary_emb(torch.nn.functional.rms_norm(x, (64,), w, 1e-6), (cos, sin), sequence_dim=1)
    assert rel_l2(qk_norm_rope_reference(x, w, cos, sin, 1e-6), expected) < 1e-6
    assert rel_l2(qk_norm_rope(x, w, cos, sin, backend="triton"), expected) < 1e-6


def test_triton_without_weight_or_rope():
    x, _, _, _ = make_inputs()
    assert rel_l2(qk_norm_rope(x, backend="triton"), qk_norm_rope_reference(x)) <= TOLERANCE[torch.bfloat16]


def test_triton_reads_a_strided_weight():
    x, w, cos, sin = make_inputs(dtype=torch.float32)
    strided = torch.stack([w, -w], 1)[:, 0]  # stride-2 view of the same values
    assert strided.stride() == (2,)
    out = qk_norm_rope(x, strided, cos, sin, backend="triton")
    assert rel_l2(out, qk_norm_rope_reference(x, w, cos, sin)) <= 1e-6


needs_c = pytest.mark.skipif(_cext._C is None and os.environ.get("DCGEN_REQUIRE_C") != "1",
                             reason="dcgen_kernels._C not built")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("with_weight,with_rope", [(True, True), (False, True), (True, False)])
def test_cuda_kernel_math_on_host(dtype, D, with_weight, with_rope):
    """The CUDA kernel's row function, run on host memory by `_C.qk_norm_rope_host` (CI has no GPU)."""
    assert _cext._C is not None, "DCGEN_REQUIRE_C=1 but dcgen_kernels._C did not import: " + str(_cext.C_IMPORT_ERROR)
    x, _, cos, sin = make_inputs(D=D, dtype=dtype, rope_rows=30)
    # The kernel takes the weight in fp32 (the launcher upcasts): values a 16-bit x's dtype cannot hold.
    w = torch.rand(D).add(0.5) if with_weight else None
    cos, sin = (cos, sin) if with_rope else (None, None)
    out = torch.full((2, 3, 19, D), float("nan"), dtype=dtype).transpose(1, 2)  # (B, S, H, D) view, H-major
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    _cext._C.qk_norm_rope_host(
        x.data_ptr(), ptr(w), ptr(cos), ptr(sin), out.data_ptr(), 2, 19, 3, D,
        *x.stride()[:3], *out.stride()[:3], 7, 1e-6, _cext.DTYPE_CODES[dtype])
    expected = qk_norm_rope_reference(x, w, cos, sin, 1e-6, 7)
    assert rel_l2(out, expected) <= max(TOLERANCE[dtype] / 2, 1e-6)
    if dtype != torch.float32:  # the reference rounded once: a weight rounded to x's dtype would move ~1/3 of them
        assert (out != expected.to(dtype)).float().mean() <= 1e-3


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, c, s: qk_norm_rope(x[0], w, c, s), ValueError, "x must have 4 dimensions"),
    (lambda x, w, c, s: qk_norm_rope(x, w[:-1], c, s), ValueError, r"weight must have shape \(64,\)"),
    (lambda x, w, c, s: qk_norm_rope(x, w, c, None), ValueError, "cos and sin must be given together"),
    (lambda x, w, c, s: qk_norm_rope(x[..., :63], w[:63], c[:, :63], s[:, :63]), ValueError,
     r"RoPE rotates pairs: head_dim \(x.shape\[-1\]\) must be even, got 63"),
    (lambda x, w, c, s: qk_norm_rope(x, w, c[:5], s[:5]), ValueError, "cos must have shape"),
    (lambda x, w, c, s: qk_norm_rope(x, w, c, s, rope_offset=-1), ValueError, "rope_offset"),
    # 19 table rows for S = 19 from offset 1: the last token would read past the table
    (lambda x, w, c, s: qk_norm_rope(x, w, c, s, rope_offset=1), ValueError, r"cos must have shape \(>= rope_offset"),
    (lambda x, w, c, s: qk_norm_rope(x, w, torch.cat([c, c], 1)[:, :64], s), ValueError, "cos must be contiguous"),
    (lambda x, w, c, s: qk_norm_rope(x, w, c, s, eps=-1.0), ValueError, "eps must be a positive float"),
    (lambda x, w, c, s: qk_norm_rope(x, w, c, s, eps=float("nan")), ValueError, "eps must be a positive float"),
    (lambda x, w, c, s: qk_norm_rope(x, w, c, s, rope_offset=True), ValueError, "rope_offset must be a non-neg"),
    (lambda x, w, c, s: qk_norm_rope(x.int(), None, c, s), TypeError, "x must have dtype"),
    (lambda x, w, c, s: qk_norm_rope(x, w.to("meta"), c, s), ValueError, "weight must be on device"),
    (lambda x, w, c, s: qk_norm_rope(x, w, c, s, backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*make_inputs())


def test_gradients_match_diffusers_modules():
    from diffusers.models.embeddings import apply_rotary_emb

    x, w, cos, sin = make_inputs(dtype=torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    grad = torch.randn(x.shape)
    ours = torch.autograd.grad(qk_norm_rope(x, w, cos, sin), [x, w], grad)
    stock = apply_rotary_emb(torch.nn.functional.rms_norm(x, (64,), w, 1e-6), (cos, sin), sequence_dim=1)
    theirs = torch.autograd.grad(stock, [x, w], grad)
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(ours, theirs))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backends(backend, dtype):
    x, w, cos, sin = make_inputs(B=1, S=4608, H=24, D=128, dtype=dtype, device="cuda", rope_rows=4700)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device="cuda")
    qk_norm_rope_into(x, w, cos, sin, 1e-6, 92, out, backend)
    assert rel_l2(out, qk_norm_rope_reference(x, w, cos, sin, 1e-6, 92)) <= TOLERANCE[dtype] / 2


def test_reference_output_is_contiguous_like_the_fake():
    x = torch.randn(19, 2, 3, 64).transpose(0, 1)  # (B, S, H, D) view, batch-minor
    _, w, cos, sin = make_inputs(dtype=torch.float32)
    torch.library.opcheck(torch.ops.dcgen.qk_norm_rope.default, (x, w, cos, sin, 1e-6, 0, "reference"),
                          test_utils=("test_faketensor",))


def test_unavailable_backend_warns_once_and_falls_back():
    x, w, cos, sin = make_inputs(dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="cuda backend cannot serve") as caught:
        outs = [qk_norm_rope(x, w, cos, sin, backend="cuda") for _ in range(2)]  # a CPU tensor
    assert len(caught) == 1  # one-time
    assert all(rel_l2(o, qk_norm_rope_reference(x, w, cos, sin)) <= 1e-6 for o in outs)


def test_triton_uses_the_given_eps():
    """eps matters where the mean square is of its order: inputs ~1e-2 (mean square 1e-4) with eps 1e-3."""
    x, w, cos, sin = make_inputs(dtype=torch.float32)
    x = x * 1e-2
    out = qk_norm_rope(x, w, cos, sin, eps=1e-3, backend="triton")
    assert rel_l2(out, qk_norm_rope_reference(x, w, cos, sin, eps=1e-3)) < 1e-5
    assert rel_l2(out, qk_norm_rope_reference(x, w, cos, sin, eps=1e-6)) > 0.1
