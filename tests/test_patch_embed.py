import sys
import warnings

import pytest
import torch

from dcgen_kernels import _backend
from dcgen_kernels.ops.patch_embed import patch_embed, patch_embed_reference, patch_unembed, patch_unembed_reference
from tests.helpers import TOLERANCE, compile_launchers_for_sm90, flux_pipeline_static, rel_l2

patch_embed_module = sys.modules["dcgen_kernels.ops.patch_embed"]

# (B, C, h, w, patch_size, D): none of them block multiples; the third has K = C*p*p = 12, not a power of two; the
# fourth and fifth have token rows longer than the interpreter's 16-token block (a full and a partial block per row);
# the last has D = 70: the narrow embed kernel streams two output tiles in one program and a partial one in the next.
SHAPES = [(2, 16, 6, 10, 2, 40), (1, 32, 5, 7, 1, 48), (2, 3, 4, 6, 2, 20), (1, 4, 4, 36, 2, 24), (2, 8, 3, 40, 1, 24),
          (1, 4, 4, 6, 2, 70)]


@pytest.fixture
def cublas_on_cpu(monkeypatch):
    """Let the cuda (cuBLAS) backend serve CPU tensors: its code is torch.mm/addmm on views, the same on any device."""
    monkeypatch.setattr(patch_embed_module, "_cublas_device_error", lambda device: None)


def embed_inputs(B, C, h, w, p, D, dtype=torch.float32, device="cpu"):
    latent = torch.randn(B, C, h, w, device=device).to(dtype)
    weight = (torch.randn(D, C * p * p, device=device) / (C * p * p) ** 0.5).to(dtype)
    bias = torch.randn(D, device=device).to(dtype)
    return latent, weight, bias


def unembed_inputs(B, C, h, w, p, D, dtype=torch.float32, device="cpu"):
    tokens = torch.randn(B, (h // p) * (w // p), D, device=device).to(dtype)
    weight = (torch.randn(C * p * p, D, device=device) / D ** 0.5).to(dtype)
    bias = torch.randn(C * p * p, device=device).to(dtype)
    return tokens, weight, bias


# ----------------------------------------------------------------------------------------------- reference
def test_reference_equals_flux_pack_and_linear():
    pytest.importorskip("diffusers")
    pack, unpack = flux_pipeline_static("_pack_latents"), flux_pipeline_static("_unpack_latents")
    B, C, h, w, D = 2, 16, 6, 10, 40
    latent, _, _ = embed_inputs(B, C, h, w, 2, D)
    x_embedder, proj_out = torch.nn.Linear(C * 4, D), torch.nn.Linear(D, C * 4)
    expected = x_embedder(pack(latent, B, C, h, w))
    assert rel_l2(patch_embed_reference(latent, x_embedder.weight, x_embedder.bias, 2), expected) < 1e-6

    tokens, _, _ = unembed_inputs(B, C, h, w, 2, D)
    expected = unpack(proj_out(tokens), h * 8, w * 8, 8)  # the pipeline takes pixel sizes and the VAE factor
    assert rel_l2(patch_unembed_reference(tokens, proj_out.weight, proj_out.bias, 2, h, w), expected) < 1e-6


def test_reference_p1_equals_diffusers_1x1_patch_embed():
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import PatchEmbed

    B, C, h, w, D = 2, 32, 5, 7, 48
    module = PatchEmbed(height=h, width=w, patch_size=1, in_channels=C, embed_dim=D, pos_embed_type=None)
    latent, _, _ = embed_inputs(B, C, h, w, 1, D)
    weight = module.proj.weight.flatten(1)  # (D, C, 1, 1) conv == Linear(C, D) on channels
    assert rel_l2(patch_embed_reference(latent, weight, module.proj.bias, 1), module(latent)) < 1e-6

    tokens, weight, bias = unembed_inputs(B, C, h, w, 1, D)
    expected = torch.nn.functional.linear(tokens, weight, bias).transpose(1, 2).reshape(B, C, h, w)
    assert rel_l2(patch_unembed_reference(tokens, weight, bias, 1, h, w), expected) < 1e-6


# ----------------------------------------------------------------------------------------------- Triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_embed_matches_reference(dtype, shape, with_bias):
    B, _, h, w, p, D = shape
    latent, weight, bias = embed_inputs(*shape, dtype=dtype)
    bias = bias if with_bias else None
    out = torch.full((B, (h // p) * (w // p), D), float("nan"), dtype=dtype)
    patch_embed_module._launch_embed_triton(latent, weight, bias, p, out)
    assert rel_l2(out, patch_embed_reference(latent, weight, bias, p)) <= max(TOLERANCE[dtype], 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_unembed_matches_reference(dtype, shape, with_bias):
    B, C, h, w, p, _ = shape
    tokens, weight, bias = unembed_inputs(*shape, dtype=dtype)
    bias = bias if with_bias else None
    out = torch.full((B, C, h, w), float("nan"), dtype=dtype)
    patch_embed_module._launch_unembed_triton(tokens, weight, bias, p, out)
    assert rel_l2(out, patch_unembed_reference(tokens, weight, bias, p, h, w)) <= max(TOLERANCE[dtype], 1e-6)


class _RecordLaunches:
    """Stands in for a Triton kernel object: records each launch's constexprs, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_triton_unembed_split_k_sums_slices_and_leaves_counters_zero(monkeypatch):
    """Under the interpreter the test shapes take one and two token rows per program and one, two and three slices
    of D; each matches the reference, is the same on a second call, and leaves the arrival counters at zero."""
    import dcgen_kernels.triton_kernels.patch_embed as kernels
    from dcgen_kernels.ops import _common

    recorder = _RecordLaunches(kernels.patch_unembed_kernel)
    monkeypatch.setattr(kernels, "patch_unembed_kernel", recorder)
    for shape in SHAPES:
        B, C, h, w, p, _ = shape
        tokens, weight, bias = unembed_inputs(*shape, dtype=torch.bfloat16)
        outs = [torch.full((B, C, h, w), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
        for out in outs:
            patch_embed_module._launch_unembed_triton(tokens, weight, bias, p, out)
        assert rel_l2(outs[0], patch_unembed_reference(tokens, weight, bias, p, h, w)) <= TOLERANCE[torch.bfloat16]
        assert torch.equal(outs[0], outs[1])
    forms = {(launch["TOKEN_ROWS"], launch["SPLIT_K"]) for launch in recorder.launches}
    assert {(2, 2), (1, 3), (1, 1), (2, 1)} <= forms, forms
    assert not _common._ARRIVAL_COUNTERS[("cpu", None)].any()


@pytest.mark.parametrize("B,C,side,p,D,plan", [
    (1, 16, 128, 2, 3072, (64, 2, 4)),  # FLUX 1024^2: 32 blocks of 2 x 64 tokens, D in 4 slices of 768
    (2, 16, 128, 2, 3072, (64, 2, 2)),
    (1, 128, 64, 1, 3072, (64, 1, 2)),  # DC-AE f64c128 at 2048^2: 64 x 128 accumulators per program
    (1, 32, 64, 1, 2240, (64, 2, 4)),  # SANA width, f32c32 at 2048^2
    (1, 16, 256, 2, 3072, None),  # FLUX 2048^2: 16384 tokens fill the GPU in one pass
    (1, 16, 128, 2, 768, None),  # D too shallow to split
])
def test_unembed_split_plan(B, C, side, p, D, plan):
    grid = side // p
    block_r = min(128 // p, max(16, patch_embed_module._next_pow2(C * p)))
    assert patch_embed_module._unembed_split_plan(B, grid, grid, C * p, D, block_r, p, sms=132) == plan


def test_arrival_counters_are_kept_per_device_and_grown_zeroed(monkeypatch):
    from dcgen_kernels.ops import _common

    monkeypatch.setattr(_common, "_ARRIVAL_COUNTERS", {})
    first = _common.arrival_counters(torch.device("cpu"), 8)
    assert first.dtype == torch.int32 and first.shape == (8,) and not first.any()
    assert _common.arrival_counters(torch.device("cpu"), 5).data_ptr() == first.data_ptr()  # kept, not re-zeroed
    grown = _common.arrival_counters(torch.device("cpu"), 100_000)
    assert grown.shape == (100_000,) and not grown.any() and grown.data_ptr() != first.data_ptr()
    assert _common.arrival_counters(torch.device("cpu"), 8).data_ptr() == grown.data_ptr()


def test_triton_embed_shapes_cover_both_kernels(monkeypatch):
    """Under the interpreter latents of up to 16 rows per token row take the narrow kernel (128 on a GPU)."""
    narrow = []
    launch = patch_embed_module._launch_embed_narrow_triton
    monkeypatch.setattr(patch_embed_module, "_launch_embed_narrow_triton",
                        lambda *args: narrow.append(args[0].shape) or launch(*args))
    for shape in SHAPES:
        B, _, h, w, p, D = shape
        latent, weight, bias = embed_inputs(*shape)
        patch_embed_module._launch_embed_triton(latent, weight, bias, p, torch.empty(B, (h // p) * (w // p), D))
    expected = [s for s in SHAPES if s[1] * s[4] <= patch_embed_module._INTERPRETER_NARROW_MAX_ROWS]
    assert 0 < len(expected) < len(SHAPES) and narrow == [s[:4] for s in expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tma_store", [False, True], ids=["pointer_store", "tma_store"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 32, 2, 72), (1, 8, 3, 32, 1, 40)])
def test_triton_narrow_embed_stores_by_tma_or_pointer(shape, tma_store, dtype):
    """Token rows of whole 16-token blocks (the interpreter's block): both stores of the narrow embedding, a partial
    last feature tile (72 = 2 x 32 + 8) and two batch items, into NaN-poisoned outputs."""
    B, C, h, w, p, D = shape
    latent, weight, bias = embed_inputs(*shape, dtype=dtype)
    out = torch.full((B, (h // p) * (w // p), D), float("nan"), dtype=dtype)
    assert patch_embed_module._embed_tma_store_possible(out, w // p, patch_embed_module._INTERPRETER_TILES["BLOCK_M"])
    patch_embed_module._launch_embed_narrow_triton(latent, weight, bias, p, out, tma_store=tma_store)
    assert rel_l2(out, patch_embed_reference(latent, weight, bias, p)) <= max(TOLERANCE[dtype], 1e-6)


def test_narrow_embed_grids_fill_one_wave_per_store_form(monkeypatch):
    """GPU launch heuristics (132 SMs), FLUX 2048^2 (16384 tokens, 128 x 128 tiles, 8 warps): per-thread stores run
    one program per SM, so 3 waves of 384 programs x 8 tiles; TMA stores two, so 256 programs x 12 tiles."""
    from types import SimpleNamespace

    import dcgen_kernels.triton_kernels.patch_embed as kernels

    grids = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append((grid, kwargs["N_TILES"], kwargs["num_warps"]))

    monkeypatch.setattr(kernels, "patch_embed_narrow_kernel", Record())
    monkeypatch.setattr(_backend, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    E = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)  # noqa: E731
    for tma_store in (False, True):
        patch_embed_module._launch_embed_narrow_triton(E(1, 16, 256, 256), E(3072, 64), E(3072), 2,
                                                       E(1, 128 * 128, 3072), tma_store=tma_store)
    assert grids == [((128, 3, 1), 8, 8), ((128, 2, 1), 12, 8)]


def test_narrow_embed_tma_store_needs_whole_blocks_and_aligned_rows():
    possible = patch_embed_module._embed_tma_store_possible
    out = torch.empty(1, 64 * 64, 3072, dtype=torch.bfloat16)
    assert possible(out, 64, 64) and possible(out[..., :3000], 64, 64)  # a narrower view keeps aligned rows
    assert not possible(out, 48, 32)  # a 32-token block would cross into the next token row
    assert not possible(out[..., 1:3001], 64, 64)  # base 2 bytes past alignment
    assert not possible(torch.empty(1, 64 * 64, 3004, dtype=torch.bfloat16), 64, 64)  # 6008-byte rows
    assert not possible(torch.empty(1, 3072, 64 * 64, dtype=torch.bfloat16).transpose(1, 2), 64, 64)  # strided D


@pytest.mark.parametrize("p", [1, 2])
def test_triton_strided_inputs(p):
    """channels_last latents, a sliced token tensor, a transposed weight view and strided biases are read right."""
    B, C, h, w, D = 2, 8, 6, 4, 24
    latent, weight, bias = embed_inputs(B, C, h, w, p, D, dtype=torch.float16)
    latent = latent.to(memory_format=torch.channels_last)
    bias = torch.stack([bias, -bias], -1)[..., 0]  # stride 2
    assert rel_l2(patch_embed(latent, weight, bias, patch_size=p, backend="triton"),
                  patch_embed_reference(latent, weight, bias, p)) <= TOLERANCE[torch.float16]
    tokens = torch.randn(B, (h // p) * (w // p), 2 * D).to(torch.float16)[..., 1::2]
    weight_t = torch.randn(D, C * p * p).to(torch.float16).t()
    bias_s = torch.randn(C * p * p, 2).to(torch.float16)[:, 0]
    for b_ in (None, bias_s):
        assert rel_l2(patch_unembed(tokens, weight_t, b_, patch_size=p, height=h, width=w, backend="triton"),
                      patch_unembed_reference(tokens, weight_t, b_, p, h, w)) <= TOLERANCE[torch.float16]



def test_triton_general_embed_kernel_reads_a_strided_bias():
    """K = 64 takes the general embed kernel (the strided-bias case above, K <= 32, the narrow one)."""
    latent, weight, bias = embed_inputs(2, 16, 6, 10, 2, 40)
    bias = torch.stack([bias, -bias], -1)[..., 0]
    assert rel_l2(patch_embed(latent, weight, bias, patch_size=2, backend="triton"),
                  patch_embed_reference(latent, weight, bias, 2)) < 1e-5


_PATCH_LAUNCHES = r'''
pe = importlib.import_module("dcgen_kernels.ops.patch_embed")
E = lambda *shape, dtype: torch.empty(*shape, dtype=dtype)
# FLUX 1K, DC-AE-1.5, SANA in bf16 (the narrow embed kernel) and fp32; FLUX Fill's 96 x 2 rows in bf16 (the general)
cases = [(dtype, *case) for dtype in (torch.bfloat16, torch.float32)
         for case in ((16, 2, 3072, 128), (128, 1, 3072, 64), (32, 1, 2240, 128))] + [(torch.bfloat16, 96, 2, 3072, 128)]
for dtype, C, p, D, side in cases:
    N, F = (side // p) ** 2, C * p * p
    pe._launch_embed_triton(E(1, C, side, side, dtype=dtype), E(D, F, dtype=dtype), E(D, dtype=dtype), p,
                            E(1, N, D, dtype=dtype))
    pe._launch_unembed_triton(E(1, N, D, dtype=dtype), E(F, D, dtype=dtype), E(F, dtype=dtype), p,
                              pe._unembed_output(E(1, N, D, dtype=dtype), C, p, side, side))
print(json.dumps(stats))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_triton_launch_configs_compile_for_sm90_with_whole_runs():
    """At the benchmark shapes, for sm_90a: no spills; every global->shared copy is 16 bytes and every store a
    vector (the latent is read and written in whole pixel runs); the bf16 embedding GEMMs are wgmma."""
    stats = compile_launchers_for_sm90(_PATCH_LAUNCHES)
    embed = ["patch_embed_narrow_kernel"] * 3 + ["patch_embed_kernel"] * 4  # fp32 keeps the general kernel
    assert [s["kernel"] for s in stats] == [k for e in embed for k in (e, "patch_unembed_kernel")]
    assert all(s["spills"] == 0 and s["narrow_copies"] == 0 and s["async_copies"] > 0 for s in stats), stats
    assert all(s["scalar_stores"] == 0 for s in stats), stats
    assert all(s["wgmma"] > 0 for s in stats[0:6:2] + stats[12:13]), stats
    # the bf16 unembeddings of 4096 tokens (FLUX, DC-AE-1.5) take the split-K form: 8 warps, 16384 (SANA) one pass
    assert [s["warps"] for s in stats[1:6:2]] == [8, 8, 4], stats


_NARROW_STORE_LAUNCHES = r"""
pe = importlib.import_module("dcgen_kernels.ops.patch_embed")
E = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
for side in (128, 256):  # FLUX 1024^2 and 2048^2
    N = (side // 2) ** 2
    for tma_store in (False, True):
        pe._launch_embed_narrow_triton(E(1, 16, side, side), E(3072, 64), E(3072), 2, E(1, N, 3072),
                                       tma_store=tma_store)
print(json.dumps(stats))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_narrow_embed_store_forms_compile_for_sm90():
    """Both stores of the narrow embedding at FLUX shapes, sm_90a: no spills; the TMA store needs fewer registers
    (the tile leaves shared memory in one bulk copy), which at 16384 tokens (8 warps) lets two programs share an SM
    (<= 128 registers) instead of one."""
    pointer_4096, tma_4096, pointer_16384, tma_16384 = compile_launchers_for_sm90(_NARROW_STORE_LAUNCHES)
    assert all(s["spills"] == 0 and s["wgmma"] > 0 for s in (pointer_4096, tma_4096, pointer_16384, tma_16384))
    assert tma_4096["registers"] < pointer_4096["registers"]
    assert tma_16384["warps"] == 8 and tma_16384["registers"] <= 128 < pointer_16384["registers"]


_PACK_LAUNCHES = r"""
pe = importlib.import_module("dcgen_kernels.ops.patch_embed")
E = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
for C, p, side in ((16, 2, 128), (16, 2, 256), (32, 1, 64)):  # FLUX 1024^2 and 2048^2; an NCHW batch of DC-AE f32c32
    B = 1 if p == 2 else 2
    latent, packed = E(B, C, side, side), E(B * (side // p) ** 2, C * p * p)
    pe._launch_pack(latent, packed, p, unpack=False)
    pe._launch_pack(latent, packed, p, unpack=True)
    width = pe._ones_column_width(C * p * p)  # patch_embed's backward: the packed latent with its ones column
    pe._launch_pack(latent, E(B * (side // p) ** 2, width), p, unpack=False, tail_cols=width - C * p * p)
print(json.dumps(stats))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_triton_pack_kernels_compile_for_sm90_with_vector_stores():
    stats = compile_launchers_for_sm90(_PACK_LAUNCHES)
    assert [s["kernel"] for s in stats] == ["patch_pack_kernel", "patch_unpack_kernel", "patch_pack_kernel"] * 3, stats
    assert all(s["spills"] == 0 and s["scalar_stores"] == 0 for s in stats), stats


_TRANSPOSED_WEIGHT_LAUNCHES = r"""
pe = importlib.import_module("dcgen_kernels.ops.patch_embed")
E = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
tokens = E(1, 64 * 64, 3072)
pe._launch_unembed_triton(tokens, E(64, 3072), None, 2, pe._unembed_output(tokens, 16, 2, 128, 128))
# patch_embed's backward: the input gradient is the unembedding by weight.t() (strides (1, 64))
pe._launch_unembed_triton(tokens, E(3072, 64).t(), None, 2, pe._unembed_output(tokens, 16, 2, 128, 128))
print(json.dumps(stats))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves (pytest -m gpu)")
def test_triton_unembed_of_a_transposed_weight_compiles_as_the_forward():
    """A K-strided weight would compile another, slower unembed kernel (sm_90a: 40 KB of shared memory and a third of
    the 16-byte copies, 231 registers instead of 96): the launcher makes it contiguous, so the embed backward runs
    the forward's kernel."""
    stats = compile_launchers_for_sm90(_TRANSPOSED_WEIGHT_LAUNCHES)
    assert len(stats) == 2 and stats[0] == stats[1], stats


# ----------------------------------------------------------------------------------------------- cuda (cuBLAS)
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("p", [1, 2])
def test_empty_batch_no_tokens_and_no_features_on_every_backend(backend, p, cublas_on_cpu):
    latent, weight, bias = embed_inputs(0, 4, 6, 6, p, 32)
    assert patch_embed(latent, weight, bias, patch_size=p, backend=backend).shape == (0, (6 // p) ** 2, 32)
    latent, weight, bias = embed_inputs(1, 4, 6, 0, p, 32)  # a zero-width latent: no tokens
    assert patch_embed(latent, weight, bias, patch_size=p, backend=backend).shape == (1, 0, 32)
    tokens, weight_u, bias_u = unembed_inputs(0, 4, 6, 6, p, 32)
    out = patch_unembed(tokens, weight_u, bias_u, patch_size=p, height=6, width=6, backend=backend)
    assert out.shape == (0, 4, 6, 6)
    tokens, weight_u, bias_u = unembed_inputs(1, 4, 6, 6, p, 0)  # no features: the bias alone
    out = patch_unembed(tokens, weight_u, bias_u, patch_size=p, height=6, width=6, backend=backend)
    assert torch.equal(out, patch_unembed_reference(tokens, weight_u, bias_u, p, 6, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cublas_matches_reference(dtype, shape, with_bias, channels_last, cublas_on_cpu):
    B, C, h, w, p, D = shape
    latent, weight, bias = embed_inputs(*shape, dtype=dtype)
    latent = latent.to(memory_format=torch.channels_last) if channels_last else latent
    bias = bias if with_bias else None
    assert patch_embed_module.select_backend("patch_embed", "cuda", latent, weight) == "cuda"
    out = patch_embed(latent, weight, bias, patch_size=p, backend="cuda")
    assert rel_l2(out, patch_embed_reference(latent, weight, bias, p)) <= max(TOLERANCE[dtype], 1e-6)
    tokens, weight, bias = unembed_inputs(*shape, dtype=dtype)
    bias = bias if with_bias else None
    out = patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w, backend="cuda")
    assert rel_l2(out, patch_unembed_reference(tokens, weight, bias, p, h, w)) <= max(TOLERANCE[dtype], 1e-6)


def test_cublas_p1_moves_no_data(cublas_on_cpu):
    """p = 1: the GEMM reads an NCHW latent of one image, or a channels-last batch, in place; patch_unembed's result
    is the GEMM's (B*N, C) output itself, viewed channels-last."""
    for latent in (torch.randn(1, 8, 4, 6), torch.randn(2, 8, 4, 6).to(memory_format=torch.channels_last)):
        tokens = patch_embed_module._token_matrix(latent, 1)
        assert tokens.shape == (latent.shape[0] * 24, 8) and tokens.data_ptr() == latent.data_ptr()
    tokens, weight, bias = unembed_inputs(2, 8, 4, 6, 1, 16)
    out = patch_unembed(tokens, weight, bias, patch_size=1, height=4, width=6, backend="cuda")
    assert out.is_contiguous(memory_format=torch.channels_last) and out._base is not None
    assert out._base.shape == (2 * 24, 8) and out._base.data_ptr() == out.data_ptr()


def test_cublas_single_token_row_is_packed_not_viewed(cublas_on_cpu):
    """One row of 2x2 patches (h = p): the patch axes merge over the rows but not over the patch's own pixels."""
    latent, weight, bias = embed_inputs(1, 4, 2, 6, 2, 24)
    assert rel_l2(patch_embed(latent, weight, bias, patch_size=2, backend="cuda"),
                  patch_embed_reference(latent, weight, bias, 2)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_triton_pack_and_unpack_kernels_match_diffusers_layout(dtype, shape, layout):
    """The cuBLAS path's layout copies: latent -> token matrix -> latent, against _pack / _unpack, into poisoned
    outputs, for any latent strides (partial token, row and pixel blocks under the interpreter's 16 x 16 tiles)."""
    B, C, h, w, p, _ = shape
    latent = torch.randn(B, C, h, 2 * w).to(dtype)
    latent = latent[..., ::2] if layout == "sliced" else latent[..., :w]
    if layout == "channels_last":
        latent = latent.contiguous(memory_format=torch.channels_last)
    N, F = (h // p) * (w // p), C * p * p
    packed = torch.full((B * N, F), float("nan"), dtype=dtype)
    patch_embed_module._launch_pack(latent, packed, p, unpack=False)
    assert torch.equal(packed, patch_embed_module._pack(latent, p).reshape(B * N, F))
    back = torch.full((B, C, h, w), float("nan"), dtype=dtype)
    if layout == "channels_last":
        back = back.contiguous(memory_format=torch.channels_last)
    patch_embed_module._launch_pack(back, packed, p, unpack=True)
    assert torch.equal(back, latent)
    width = patch_embed_module._ones_column_width(F)
    with_ones = torch.full((B * N, width), float("nan"), dtype=dtype)
    patch_embed_module._launch_pack(latent, with_ones, p, unpack=False, tail_cols=width - F)
    tail = torch.zeros(B * N, width - F, dtype=dtype)
    tail[:, 0] = 1
    assert torch.equal(with_ones, torch.cat([packed, tail], dim=1))


@pytest.mark.parametrize("p", [1, 2])
def test_cublas_path_with_triton_layout_copies(p, cublas_on_cpu, monkeypatch):
    """Where Triton serves the device the cuBLAS path packs and unpacks with the Triton kernels: forward and
    backward of both ops as the reference (p = 1 copies only for NCHW batches; views stay views)."""
    monkeypatch.setattr(patch_embed_module, "_triton_packs", lambda x, span: x.numel() > 0)
    copies = []
    launch = patch_embed_module._launch_pack
    monkeypatch.setattr(patch_embed_module, "_launch_pack",
                        lambda *args, **kw: copies.append(kw) or launch(*args, **kw))
    B, C, h, w, D = 2, 4, 6, 10, 24
    inputs = [t.requires_grad_() for t in embed_inputs(B, C, h, w, p, D)]
    grad = torch.randn(B, (h // p) * (w // p), D)
    got = torch.autograd.grad(patch_embed(*inputs, patch_size=p, backend="cuda"), inputs, grad)
    expected = _fp32_reference_grads(patch_embed_reference, [t.detach() for t in inputs], (p,), grad, [True] * 3)
    assert all(rel_l2(a, b) <= 1e-6 for a, b in zip(got, expected))
    inputs = [t.requires_grad_() for t in unembed_inputs(B, C, h, w, p, D)]
    grad = torch.randn(B, C, h, w)
    got = torch.autograd.grad(patch_unembed(*inputs, patch_size=p, height=h, width=w, backend="cuda"), inputs, grad)
    expected = _fp32_reference_grads(patch_unembed_reference, [t.detach() for t in inputs], (p, h, w), grad,
                                     [True] * 3)
    assert all(rel_l2(a, b) <= 1e-6 for a, b in zip(got, expected))
    # embed: pack the latent; backward: d(latent) unpacks (p = 2), d(weight) packs the latent. unembed: unpack (p = 2);
    # backward: the gradient packed once for d(weight) and, at p = 2, d(tokens) (p = 1 packs it again inside the
    # op call for d(tokens), which may take Triton's gather instead). p = 1 copies only because the batch is NCHW.
    unpacks = [True] * (p == 2)
    assert [c["unpack"] for c in copies] == [False, *unpacks, False, *unpacks, False, *[False] * (p == 1)]


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("p", [1, 2])
def test_custom_ops_pass_opcheck(backend, p, cublas_on_cpu):
    """Schema, autograd registration and the fake implementations (shapes and strides: channels-last for p = 1)
    against the real outputs, per backend."""
    B, C, h, w, D = 2, 4, 4, 6, 20
    latent, weight, bias = embed_inputs(B, C, h, w, p, D)
    torch.library.opcheck(patch_embed_module._patch_embed_op, (latent.requires_grad_(), weight, bias, p, backend))
    tokens, weight, bias = unembed_inputs(B, C, h, w, p, D)
    out = patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last if p == 1 else torch.contiguous_format)
    torch.library.opcheck(patch_embed_module._patch_unembed_op,
                          (tokens, weight.requires_grad_(), bias, p, h, w, backend))


@pytest.mark.parametrize("triton_copies", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("p", [1, 2])
def test_layout_copy_ops_pass_opcheck(p, triton_copies, monkeypatch):
    """The cuBLAS path's pack / unpack custom ops (the backward calls them, so torch.compile must trace them)."""
    monkeypatch.setattr(patch_embed_module, "_triton_packs", lambda x, span: triton_copies and x.numel() > 0)
    latent = torch.randn(2, 4, 6, 10)
    torch.library.opcheck(patch_embed_module._patch_pack_op, (latent, p))
    packed = patch_embed_module._patch_pack_op(latent, p)
    assert torch.equal(packed, patch_embed_module._pack(latent, p).reshape(packed.shape))
    torch.library.opcheck(patch_embed_module._patch_unpack_op, (packed, 2, p, 6, 10))
    assert torch.equal(patch_embed_module._patch_unpack_op(packed, 2, p, 6, 10), latent)
    torch.library.opcheck(patch_embed_module._patch_pack_op, (latent, p, True))
    with_ones = patch_embed_module._patch_pack_op(latent, p, True)
    features = packed.shape[1]
    assert with_ones.shape == (packed.shape[0], 16 if p == 1 else 32)  # 4 / 16 features + 1, rounded up to 16
    assert torch.equal(with_ones[:, :features], packed) and torch.equal(with_ones[:, features], torch.ones(len(packed)))
    assert not with_ones[:, features + 1:].any()


# ----------------------------------------------------------------------------------------------- validation
def _embed(latent, weight, bias, **kw):
    return patch_embed(latent, weight, bias, **{"patch_size": 2, **kw})


def _unembed(tokens, weight, bias, **kw):
    return patch_unembed(tokens, weight, bias, **{"patch_size": 2, "height": 6, "width": 10, **kw})


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, b: _embed(x[0], w, b), ValueError, "latent must have 4 dimensions"),
    (lambda x, w, b: _embed(x, w, b, patch_size=4), ValueError, r"patch_size must be one of \(1, 2\)"),
    (lambda x, w, b: _embed(x, w, b, patch_size=True), ValueError, "patch_size must be one of"),
    (lambda x, w, b: _embed(x, w, b, patch_size=2.0), ValueError, r"patch_size must be one of \(1, 2\), got 2.0"),
    (lambda x, w, b: _embed(x[..., :5], w, b), ValueError, "divisible by patch_size=2, got 6x5"),
    (lambda x, w, b: _embed(x, w[:, :-1], b), ValueError, r"weight must have shape \(D, C\*patch_size\*\*2 = 64\)"),
    (lambda x, w, b: _embed(x, w[0], b), ValueError, "weight must have 2 dimensions"),
    (lambda x, w, b: _embed(x, w.half(), b), TypeError, "weight must have the input's dtype"),
    (lambda x, w, b: _embed(x, w, b[:-1]), ValueError, r"bias must have shape \(40,\)"),
    (lambda x, w, b: _embed(x, w, b.half()), TypeError, "bias must have the input's dtype"),
    (lambda x, w, b: _embed(x.int(), w, b), TypeError, "latent must have dtype"),
    (lambda x, w, b: _embed(x, w.to("meta"), b), ValueError, "weight must be on device"),
    (lambda x, w, b: _embed(x, w, b.to("meta")), ValueError, "bias must be on device"),
    (lambda x, w, b: _embed(x.tolist(), w, b), TypeError, "latent must be a torch.Tensor"),
    (lambda x, w, b: _embed(x, w, b, backend="gpu"), ValueError, "backend must be one of"),
])
def test_embed_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*embed_inputs(*SHAPES[0]))


@pytest.mark.parametrize("call,error,match", [
    (lambda t, w, b: _unembed(t[0], w, b), ValueError, "tokens must have 3 dimensions"),
    (lambda t, w, b: _unembed(t, w, b, patch_size=3), ValueError, "patch_size must be one of"),
    (lambda t, w, b: _unembed(t, w, b, height=5), ValueError, "height must be a positive int divisible by"),
    (lambda t, w, b: _unembed(t, w, b, width=10.0), ValueError, "width must be a positive int"),
    (lambda t, w, b: _unembed(t, w, b, height=8), ValueError, "tokens must have .* = 20 tokens"),
    (lambda t, w, b: _unembed(t, w[:, :-1], b), ValueError, r"weight must have shape \(C\*patch_size\*\*2, D = 40\)"),
    (lambda t, w, b: _unembed(t, w[:-1], b[:-1]), ValueError, "must be divisible by 4, got 63"),
    (lambda t, w, b: _unembed(t, w.bfloat16(), b), TypeError, "weight must have the input's dtype"),
    (lambda t, w, b: _unembed(t, w, b[:-1]), ValueError, r"bias must have shape \(64,\)"),
    (lambda t, w, b: _unembed(t.double(), w.double(), b.double()), TypeError, "tokens must have dtype"),
])
def test_unembed_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*unembed_inputs(*SHAPES[0]))


# ----------------------------------------------------------------------------------------------- backends
def test_explicit_cuda_backend_falls_back_with_one_warning():
    latent, weight, bias = embed_inputs(*SHAPES[1])
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="cuda backend cannot serve.*cuBLAS needs a CUDA tensor"):
        out = patch_embed(latent, weight, bias, patch_size=1, backend="cuda")
    with warnings.catch_warnings():
        # Fallback warnings only: triton 3.6's interpreter warns (numpy DeprecationWarning) on runtime-bound loops.
        warnings.simplefilter("error", RuntimeWarning)
        patch_embed(latent, weight, bias, patch_size=1, backend="cuda")  # second call: silent
    assert rel_l2(out, patch_embed_reference(latent, weight, bias, 1)) < 1e-6


def test_oversized_call_falls_back_from_triton_with_one_warning(monkeypatch):
    monkeypatch.setattr(patch_embed_module, "_INT32_LIMIT", 100)  # stands in for a > 2**31-element item
    tokens, weight, bias = unembed_inputs(*SHAPES[0])
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="triton backend cannot serve.*spans more than 2\\*\\*31"):
        out = patch_unembed(tokens, weight, bias, patch_size=2, height=6, width=10, backend="triton")
    with warnings.catch_warnings():
        # Fallback warnings only: triton 3.6's interpreter warns (numpy DeprecationWarning) on runtime-bound loops.
        warnings.simplefilter("error", RuntimeWarning)
        patch_unembed(tokens, weight, bias, patch_size=2, height=6, width=10, backend="triton")
    assert torch.equal(out, patch_unembed_reference(tokens, weight, bias, 2, 6, 10))


def test_backend_env_override(monkeypatch):
    latent, weight, _ = embed_inputs(*SHAPES[0])
    monkeypatch.setenv("DCGEN_BACKEND", "reference")
    assert patch_embed_module.select_backend("patch_embed", "auto", latent, weight) == "reference"
    assert patch_embed_module.select_backend("patch_embed", "triton", latent, weight) == "triton"


@pytest.mark.parametrize("p", [2, 1])
def test_auto_times_cublas_and_triton_once_per_call_key(p, cublas_on_cpu, monkeypatch):
    """auto with both backends there: each op's first call per key (the forward, then the input gradient, a call of
    the other op with the weight transposed) runs both once under the timer and keeps the faster; later calls run
    only the kept one, and the result is that backend's."""
    import triton.testing

    from dcgen_kernels.ops import _common

    runs = []
    for name in ("_launch_embed_triton", "_launch_unembed_triton", "_embed_cublas", "_unembed_cublas"):
        original = getattr(patch_embed_module, name)
        label = name.removeprefix("_launch_").removeprefix("_")
        monkeypatch.setattr(patch_embed_module, name,
                            lambda *a, _f=original, _l=label: (runs.append(_l), _f(*a))[1])
    times = {"embed_cublas": 1.0, "embed_triton": 2.0, "unembed_cublas": 2.0, "unembed_triton": 1.0}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode, warmup, rep: (fn(), times[runs[-1]])[1])
    monkeypatch.setattr(_common, "TIMED_CHOICES", {})
    B, C, h, w, D = 1, 4, 4, 6, 20
    latent, weight, bias = (t.requires_grad_() for t in embed_inputs(B, C, h, w, p, D))
    for first in (True, False):
        runs.clear()
        out = patch_embed(latent, weight, bias, patch_size=p)
        d_latent, _ = torch.autograd.grad(out.sum(), [latent, weight])
        timing = ["embed_cublas", "embed_triton"] if first else []
        assert runs == timing + ["embed_cublas"] + (["unembed_cublas", "unembed_triton"] if first else []) + [
            "unembed_triton"]
        assert rel_l2(out, patch_embed_reference(latent, weight, bias, p)) < 1e-5
    assert [choice["picked"] for op in ("patch_embed", "patch_unembed")
            for choice in _common.TIMED_CHOICES[op].values()] == ["cuda", "triton"]


def test_explicit_backend_is_not_timed(cublas_on_cpu, monkeypatch):
    from dcgen_kernels.ops import _common

    monkeypatch.setattr(_common, "TIMED_CHOICES", {})
    latent, weight, bias = embed_inputs(1, 4, 4, 6, 2, 20)
    for backend in ("cuda", "triton"):
        patch_embed(latent, weight, bias, patch_size=2, backend=backend)
    assert _common.TIMED_CHOICES == {}


# ----------------------------------------------------------------------------------------------- autograd
def test_reference_gradcheck_float64():
    B, C, h, w, p, D = 1, 3, 4, 2, 2, 5
    latent, weight, bias = (t.double().requires_grad_() for t in embed_inputs(B, C, h, w, p, D))
    assert torch.autograd.gradcheck(lambda *a: patch_embed_reference(*a, p), (latent, weight, bias))
    tokens, weight, bias = (t.double().requires_grad_() for t in unembed_inputs(B, C, h, w, p, D))
    assert torch.autograd.gradcheck(lambda *a: patch_unembed_reference(*a, p, h, w), (tokens, weight, bias))


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gradients_match_diffusers_math(shape):
    B, C, h, w, p, D = shape
    latent, weight, bias = (t.requires_grad_() for t in embed_inputs(*shape))
    packed = latent.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    grad = torch.randn(B, (h // p) * (w // p), D)
    ours = torch.autograd.grad(patch_embed(latent, weight, bias, patch_size=p), [latent, weight, bias], grad)
    theirs = torch.autograd.grad(torch.nn.functional.linear(packed, weight, bias), [latent, weight, bias], grad)
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(ours, theirs))

    tokens, weight, bias = (t.requires_grad_() for t in unembed_inputs(*shape))
    grad = torch.randn(B, C, h, w)
    ours = torch.autograd.grad(patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w),
                               [tokens, weight, bias], grad)
    stock = torch.nn.functional.linear(tokens, weight, bias)
    stock = stock.reshape(B, h // p, w // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)
    theirs = torch.autograd.grad(stock, [tokens, weight, bias], grad)
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(ours, theirs))


def _no_reference_vjp(monkeypatch):
    """Make a silent fall back of the backward to the reference vjp fail the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the backward ran the reference vjp, not the fused backward")
    monkeypatch.setattr(patch_embed_module, "reference_vjp", fail)


def _fp32_reference_grads(reference, tensors, args, grad, wanted):
    leaves = [t.detach().float().requires_grad_(w) if t is not None else None for t, w in zip(tensors, wanted)]
    out = reference(*leaves, *args)
    return torch.autograd.grad(out, [t for t, w in zip(leaves, wanted) if w], grad.float())


def _assert_grads_match_reference(backend, op, op_kwargs, reference, reference_args, tensors, grad, names):
    """Gradients of op(*tensors, **op_kwargs, backend=backend) (its fused backward) vs those of
    reference(*tensors, *reference_args) in fp32, for every tensor given (None: no gradient asked)."""
    dtype = grad.dtype
    leaves = [t.requires_grad_() if t is not None else None for t in tensors]
    out = op(*leaves, **op_kwargs, backend=backend)
    wanted = [t is not None for t in leaves]
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
    expected = _fp32_reference_grads(reference, tensors, reference_args, grad, wanted)
    for name, a, b in zip(names, got, expected):
        assert a.dtype == dtype and a.shape == b.shape
        assert rel_l2(a, b) <= max(TOLERANCE[dtype], 1e-6), name


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_embed_backward_matches_reference(backend, dtype, shape, with_bias, monkeypatch, cublas_on_cpu):
    _no_reference_vjp(monkeypatch)
    B, _, h, w, p, D = shape
    latent, weight, bias = embed_inputs(*shape, dtype=dtype)
    grad = torch.randn(B, (h // p) * (w // p), D).to(dtype)
    _assert_grads_match_reference(backend, patch_embed, dict(patch_size=p), patch_embed_reference, (p,),
                                  [latent, weight, bias if with_bias else None], grad, ("latent", "weight", "bias"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_unembed_backward_matches_reference(backend, dtype, shape, with_bias, monkeypatch, cublas_on_cpu):
    _no_reference_vjp(monkeypatch)
    B, C, h, w, p, _ = shape
    tokens, weight, bias = unembed_inputs(*shape, dtype=dtype)
    grad = torch.randn(B, C, h, w).to(dtype)
    _assert_grads_match_reference(backend, patch_unembed, dict(patch_size=p, height=h, width=w),
                                  patch_unembed_reference, (p, h, w), [tokens, weight, bias if with_bias else None],
                                  grad, ("tokens", "weight", "bias"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 6, 10, 2, 136), (1, 3, 5, 7, 1, 72)])
@pytest.mark.parametrize("triton_copies", [False, True], ids=["torch", "triton"])
def test_embed_bias_gradient_rides_in_the_weight_gradient_gemm(backend, dtype, shape, triton_copies, monkeypatch,
                                                               cublas_on_cpu):
    """Where the tokens are at least 4x wider than the packed latent with its ones column (K = 16 -> 32 columns for
    D = 136; K = 3 -> 16 for D = 72), d(weight) and d(bias) come out of one GEMM (one buffer) and equal the
    reference's; with triton_copies the ones column comes from the pack kernel, as on a GPU."""
    _no_reference_vjp(monkeypatch)
    monkeypatch.setattr(patch_embed_module, "_triton_packs", lambda x, span: triton_copies and x.numel() > 0)
    B, _, h, w, p, D = shape
    latent, weight, bias = (t.requires_grad_() for t in embed_inputs(*shape, dtype=dtype))
    grad = torch.randn(B, (h // p) * (w // p), D).to(dtype)
    got = torch.autograd.grad(patch_embed(latent, weight, bias, patch_size=p, backend=backend),
                              [latent, weight, bias], grad)
    expected = _fp32_reference_grads(patch_embed_reference, [latent, weight, bias], (p,), grad, [True] * 3)
    assert all(rel_l2(a, b) <= max(TOLERANCE[dtype], 1e-6) for a, b in zip(got, expected))
    assert got[1].untyped_storage().data_ptr() == got[2].untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_second_order_gradients_through_the_reference_vjp(backend, cublas_on_cpu):
    """create_graph=True: the backward must itself be differentiable (the fused one packs through ops without
    autograd formulas), so it is the reference vjp; a gradient of the weight gradient reaches the latent."""
    latent, weight, bias = embed_inputs(2, 4, 4, 6, 2, 24)

    def second_order(embed):
        leaves = [t.detach().clone().requires_grad_() for t in (latent, weight, bias)]
        (grad_weight,) = torch.autograd.grad(embed(*leaves).square().sum(), leaves[1], create_graph=True)
        return torch.autograd.grad(grad_weight.square().sum(), leaves[0])[0]

    got = second_order(lambda x, w, b: patch_embed(x, w, b, patch_size=2, backend=backend))
    assert rel_l2(got, second_order(lambda x, w, b: patch_embed_reference(x, w, b, 2))) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_channels_last_latent_and_grad(backend, monkeypatch, cublas_on_cpu):
    """A channels-last batch (the token-matrix view of the cuda path) and, through out.square(), the channels-last
    gradient of p = 1's channels-last output."""
    _no_reference_vjp(monkeypatch)
    B, C, h, w, D = 2, 8, 3, 5, 24
    latent, weight, bias = embed_inputs(B, C, h, w, 1, D)
    latent = latent.to(memory_format=torch.channels_last)
    grad = torch.randn(B, h * w, D)
    _assert_grads_match_reference(backend, patch_embed, dict(patch_size=1), patch_embed_reference, (1,),
                                  [latent, weight, bias], grad, ("latent", "weight", "bias"))
    tokens, weight, bias = (t.requires_grad_() for t in unembed_inputs(B, C, h, w, 1, D))
    got = torch.autograd.grad(patch_unembed(tokens, weight, bias, patch_size=1, height=h, width=w,
                                            backend=backend).square().sum(), [tokens, weight, bias])
    expected = torch.autograd.grad(patch_unembed_reference(tokens, weight, bias, 1, h, w).square().sum(),
                                   [tokens, weight, bias])
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(got, expected))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("wanted", [(False, False, True), (False, True, False), (True, False, False)])
def test_backward_partial_requires_grad_and_expanded_grad(backend, wanted, monkeypatch, cublas_on_cpu):
    """Each gradient alone; sum() hands the backward a stride-0 grad."""
    _no_reference_vjp(monkeypatch)
    _, _, h, w, p, _ = SHAPES[0]
    for op, reference, inputs, args in (
        (lambda *t: patch_embed(*t, patch_size=p, backend=backend), patch_embed_reference,
         embed_inputs(*SHAPES[0]), (p,)),
        (lambda *t: patch_unembed(*t, patch_size=p, height=h, width=w, backend=backend), patch_unembed_reference,
         unembed_inputs(*SHAPES[0]), (p, h, w)),
    ):
        leaves = [t.requires_grad_(r) for t, r in zip(inputs, wanted)]
        got = torch.autograd.grad(op(*leaves).sum(), [t for t in leaves if t.requires_grad])
        expected = _fp32_reference_grads(reference, inputs, args, torch.ones_like(reference(*inputs, *args)),
                                         list(wanted))
        assert all(rel_l2(a, b) < 1e-5 for a, b in zip(got, expected))


def test_reference_backend_backward_is_reference_vjp():
    B, _, h, w, p, D = SHAPES[1]
    latent, weight, bias = (t.requires_grad_() for t in embed_inputs(*SHAPES[1]))
    grad = torch.randn(B, h * w, D)
    got = torch.autograd.grad(patch_embed(latent, weight, bias, patch_size=p, backend="reference"),
                              [latent, weight, bias], grad)
    expected = torch.autograd.grad(patch_embed_reference(latent, weight, bias, p), [latent, weight, bias], grad)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_torch_compile_fullgraph():
    _, _, h, w, p, _ = SHAPES[0]
    latent, weight, bias = embed_inputs(*SHAPES[0])
    _, weight_out, bias_out = unembed_inputs(*SHAPES[0])

    def roundtrip(latent):
        tokens = patch_embed(latent, weight, bias, patch_size=p)
        return patch_unembed(tokens * 2, weight_out, bias_out, patch_size=p, height=h, width=w)

    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(latent), roundtrip(latent))


@pytest.mark.parametrize("backend,triton_copies", [("triton", False), ("cuda", False), ("cuda", True)])
@pytest.mark.parametrize("shape", [SHAPES[0], (2, 4, 6, 10, 2, 136)], ids=["narrow", "bias_column"])
def test_torch_compile_traces_the_fused_backward(backend, triton_copies, shape, cublas_on_cpu, monkeypatch):
    """The fused backward is built from custom ops and aten calls, so AOTAutograd traces it; gradients equal eager
    ones. With triton_copies the cuBLAS path's layout copies are the Triton kernels, as on a GPU; bias_column's
    tokens are wide enough for patch_embed's bias gradient to ride in the weight gradient's GEMM."""
    monkeypatch.setattr(patch_embed_module, "_triton_packs", lambda x, span: triton_copies and x.numel() > 0)
    _, _, h, w, p, _ = shape
    latent, weight, bias = (t.requires_grad_() for t in embed_inputs(*shape))
    _, weight_out, _ = unembed_inputs(*shape)
    weight_out.requires_grad_()

    def loss(latent, weight, bias, weight_out):
        tokens = patch_embed(latent, weight, bias, patch_size=p, backend=backend)
        return patch_unembed(tokens, weight_out, None, patch_size=p, height=h, width=w, backend=backend).square().sum()

    inputs = (latent, weight, bias, weight_out)
    expected = torch.autograd.grad(loss(*inputs), inputs)
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*inputs), inputs)
    assert all(rel_l2(a, b) < 1e-6 for a, b in zip(got, expected))


def test_benchmark_tiny_mode_runs_and_checks():
    """benchmarks/bench_patch_embed.py end to end at toy sizes: every variant ran, every check passed."""
    from benchmarks import bench_patch_embed

    result = bench_patch_embed.run(torch.device("cpu"), tiny=True)
    for shape, directions in result["cases"].items():
        for direction, passes in directions.items():
            for pass_name, rec in passes.items():
                for name, variant in rec["variants"].items():
                    assert "ms" in variant or name == "dcgen_cuda" and "skipped" in variant, (shape, name, variant)
                    assert variant.get("check", "ok") == "ok", (shape, direction, pass_name, name, variant)
    assert result["summary"]["fwd"]["measured"] == result["summary"]["fwd_bwd"]["measured"] == 4


# ----------------------------------------------------------------------------------------------- GPU
# FLUX f8c16 p2 at 1024^2 (4096 tokens), DC-Gen f32c32 p1 at 1024^2 (1024 tokens), DC-AE-1.5 f64c128 p1 at 4K;
# then grids and widths that are no multiple of the GPU tiles (45 x 37 tokens, D 3000 / 2232).
GPU_SHAPES = [(1, 16, 128, 128, 2, 3072), (2, 32, 32, 32, 1, 3072), (1, 128, 64, 64, 1, 3072),
              (1, 16, 90, 74, 2, 3000), (2, 32, 45, 37, 1, 2232)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_triton_at_dcgen_shapes(dtype, shape):
    B, C, h, w, p, D = shape
    latent, weight, bias = embed_inputs(*shape, dtype=dtype, device="cuda")
    out = torch.full((B, (h // p) * (w // p), D), float("nan"), dtype=dtype, device="cuda")
    patch_embed_module._launch_embed_triton(latent, weight, bias, p, out)
    assert rel_l2(out, patch_embed_reference(latent, weight, bias, p)) <= TOLERANCE[dtype] / 2

    tokens, weight, bias = unembed_inputs(*shape, dtype=dtype, device="cuda")
    out = torch.full((B, C, h, w), float("nan"), dtype=dtype, device="cuda")
    patch_embed_module._launch_unembed_triton(tokens, weight, bias, p, out)
    assert rel_l2(out, patch_unembed_reference(tokens, weight, bias, p, h, w)) <= TOLERANCE[dtype] / 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_auto_at_dcgen_shapes(dtype, shape):
    B, C, h, w, p, D = shape
    latent, weight, bias = embed_inputs(*shape, dtype=dtype, device="cuda")
    assert patch_embed_module.select_backend("patch_embed", "auto", latent, weight) == "cuda"
    out = patch_embed(latent, weight, bias, patch_size=p)
    assert rel_l2(out, patch_embed_reference(latent, weight, bias, p)) <= TOLERANCE[dtype] / 2
    tokens, weight, bias = unembed_inputs(*shape, dtype=dtype, device="cuda")
    out = patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w)
    assert rel_l2(out, patch_unembed_reference(tokens, weight, bias, p, h, w)) <= TOLERANCE[dtype] / 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backward_at_dcgen_shapes(backend, dtype, shape, monkeypatch):
    _no_reference_vjp(monkeypatch)
    B, C, h, w, p, D = shape
    inputs = embed_inputs(*shape, dtype=dtype, device="cuda")
    leaves = [t.clone().requires_grad_() for t in inputs]
    grad = torch.randn(B, (h // p) * (w // p), D, device="cuda").to(dtype)
    got = torch.autograd.grad(patch_embed(*leaves, patch_size=p, backend=backend), leaves, grad)
    expected = _fp32_reference_grads(patch_embed_reference, inputs, (p,), grad, [True] * 3)
    assert all(rel_l2(a, b) <= TOLERANCE[dtype] / 2 for a, b in zip(got, expected))

    inputs = unembed_inputs(*shape, dtype=dtype, device="cuda")
    leaves = [t.clone().requires_grad_() for t in inputs]
    grad = torch.randn(B, C, h, w, device="cuda").to(dtype)
    got = torch.autograd.grad(patch_unembed(*leaves, patch_size=p, height=h, width=w, backend=backend), leaves, grad)
    expected = _fp32_reference_grads(patch_unembed_reference, inputs, (p, h, w), grad, [True] * 3)
    assert all(rel_l2(a, b) <= TOLERANCE[dtype] / 2 for a, b in zip(got, expected))


@pytest.mark.gpu
def test_gpu_unembed_split_k_repeatable_on_streams_and_in_graphs():
    """The split-K unembedding (FLUX 1024^2): bitwise the same over back-to-back calls, on a side stream and in CUDA
    graph replays (an ordering or counter-reset bug would show as a differing or wrong result), counters zero after."""
    from dcgen_kernels.ops import _common

    shape = (1, 16, 128, 128, 2, 3072)
    B, C, h, w, p, D = shape
    tokens, weight, bias = unembed_inputs(*shape, dtype=torch.bfloat16, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert patch_embed_module._unembed_split_plan(B, h // p, w // p, C * p, D, 32, p, sms) is not None
    expected = patch_unembed_reference(tokens, weight, bias, p, h, w)
    first = patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w, backend="triton")
    assert rel_l2(first, expected) <= TOLERANCE[torch.bfloat16] / 2
    outs = [patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w, backend="triton") for _ in range(20)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outs += [patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w, backend="triton")
                 for _ in range(3)]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = patch_unembed(tokens, weight, bias, patch_size=p, height=h, width=w, backend="triton")
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        outs.append(captured.clone())
    torch.cuda.synchronize()
    assert all(torch.equal(out, first) for out in outs)
    assert not any(counters.any() for counters in _common._ARRIVAL_COUNTERS.values())


@pytest.mark.gpu
def test_gpu_cublas_path_packs_with_triton():
    latent = torch.randn(1, 16, 128, 128, device="cuda").to(torch.bfloat16)
    assert patch_embed_module._triton_packs(latent, patch_embed_module._span(latent))
    assert torch.equal(patch_embed_module._token_matrix(latent, 2), patch_embed_module._pack(latent, 2)[0])
    tokens_2d = torch.randn(64 * 64, 64, device="cuda").to(torch.bfloat16)
    assert torch.equal(patch_embed_module._latent_of(tokens_2d, 1, 2, 128, 128),
                       patch_embed_module._unpack(tokens_2d[None], 2, 128, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("side", [128, 256])
def test_gpu_narrow_embed_both_stores_and_timed_choice(side):
    """FLUX f8c16 at 4096 / 16384 tokens: both stores of the narrow embedding equal the reference; the default
    launch times them once per call key and records the pick."""
    from dcgen_kernels.ops import _common

    latent, weight, bias = embed_inputs(1, 16, side, side, 2, 3072, dtype=torch.bfloat16, device="cuda")
    expected = patch_embed_reference(latent, weight, bias, 2)
    for tma_store in (False, True, None):
        out = torch.full((1, (side // 2) ** 2, 3072), float("nan"), dtype=torch.bfloat16, device="cuda")
        patch_embed_module._launch_embed_narrow_triton(latent, weight, bias, 2, out, tma_store=tma_store)
        assert rel_l2(out, expected) <= TOLERANCE[torch.bfloat16] / 2, tma_store
    picks = _common.TIMED_CHOICES["patch_embed_narrow_store"].values()
    assert any(set(pick) == {"picked", "pointer_store_ms", "tma_store_ms"} for pick in picks)
