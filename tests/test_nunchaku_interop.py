import sys
import types
import warnings

import pytest
import torch

from dcgen_kernels.quant.nunchaku import (
    import_nunchaku_state_dict, nunchaku_backend_error, pack_nunchaku_lowrank, pack_nunchaku_qweight,
    pack_nunchaku_vector, pack_nunchaku_wscales, svdquant_linear_from_nunchaku, svdquant_linear_to_nunchaku,
    to_nunchaku_module, unpack_nunchaku_lowrank, unpack_nunchaku_qweight, unpack_nunchaku_vector,
    unpack_nunchaku_wscales,
)
from dcgen_kernels.ops.nvfp4_quantize import dequantize_nvfp4_reference
from dcgen_kernels.quant.svdquant import SVDQuantLinear
from tests.helpers import rel_l2

K, N, R = 256, 128, 32


def words(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1, 4)


def test_wscales_store_order_matches_nunchaku_table():
    # nunchaku's pack_micro_scale comment (warp_n 128): lane 0 loads the words of rows 0 32 64 96, lane 1 rows
    # 8 40 72 104, lane 4 rows 1 33 65 97, lane 31 rows 31 63 95 127; one word = the 4 scales of one 64-K block.
    scales = torch.arange(N, dtype=torch.uint8)[:, None].repeat(1, K // 16)  # every byte = its row
    tiled = words(pack_nunchaku_wscales(scales.view(torch.float8_e4m3fn)))
    first_block = tiled[:32 * 4, 0].reshape(32, 4)  # [lane, s]
    assert first_block[0].tolist() == [0, 32, 64, 96]
    assert first_block[1].tolist() == [8, 40, 72, 104]
    assert first_block[4].tolist() == [1, 33, 65, 97]
    assert first_block[31].tolist() == [31, 63, 95, 127]
    assert pack_nunchaku_wscales(scales.view(torch.float8_e4m3fn)).shape == (K // 16, N)


def test_qweight_store_order_matches_mma_fragments():
    # Word w of a tile = (n_packs 8, n_lanes 8, k_lanes 4, n_pack 2, k_pack 2): lane n_lane * 4 + k_lane holds the
    # m16n8k64 B fragment of row n_pack * 8 + n_lane, K = k_pack * 32 + k_lane * 8 .. + 7.
    n_idx = torch.arange(N)[:, None].expand(N, K // 8)
    k_idx = torch.arange(K // 8)[None, :].expand(N, K // 8)
    codes = torch.stack([n_idx, k_idx, torch.zeros_like(n_idx), torch.zeros_like(n_idx)], dim=-1)
    packed = codes.to(torch.uint8).reshape(N, K // 2)  # word (n, k/8) = bytes [n, k/8, 0, 0]
    tiled = words(pack_nunchaku_qweight(packed))

    def expect(w, n, k8):
        assert tiled[w, :2].tolist() == [n, k8], (w, tiled[w].tolist(), n, k8)

    expect(0, 0, 0)
    expect(1, 0, 4)      # k_pack 1: K 32..39
    expect(2, 8, 0)      # n_pack 1: row 8
    expect(4, 0, 1)      # k_lane 1: K 8..15
    expect(16, 1, 0)     # n_lane 1: row 1
    expect(128, 16, 0)   # next n pack: rows 16..31
    expect(128 * 8, 0, 8)  # next 64-K tile of the same 128 rows


def test_layouts_round_trip():
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    assert torch.equal(unpack_nunchaku_qweight(pack_nunchaku_qweight(packed)), packed)
    scales = torch.randint(0, 127, (N, K // 16), dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(unpack_nunchaku_wscales(pack_nunchaku_wscales(scales)).view(torch.uint8),
                       scales.view(torch.uint8))
    down, up = torch.randn(R, K).bfloat16(), torch.randn(N, R).bfloat16()
    assert torch.equal(unpack_nunchaku_lowrank(pack_nunchaku_lowrank(down, True), True), down)
    assert torch.equal(unpack_nunchaku_lowrank(pack_nunchaku_lowrank(up, False), False), up)
    assert pack_nunchaku_lowrank(down, True).shape == (K, R)
    assert not torch.equal(pack_nunchaku_lowrank(down, True), down.t())  # really tiled


def synthetic_checkpoint(raw_names=False):
    """A layer quantized by us, written in nunchaku's layout under two module prefixes."""
    lin = torch.nn.Linear(K, N).bfloat16()
    layer = SVDQuantLinear.from_linear(lin, rank=R, backend="reference")  # no calibration: input_scale 1
    with torch.no_grad():  # nunchaku keeps these in bf16: make them exactly representable for the round trip
        layer.smooth.copy_(layer.smooth.bfloat16().float())
        layer.wtscale.copy_(layer.wtscale.bfloat16().float())
    tensors = svdquant_linear_to_nunchaku(layer)
    if raw_names:  # nunchaku's C++ / raw safetensors names
        rename = {"proj_down": "lora_down", "proj_up": "lora_up", "smooth_factor": "smooth",
                  "smooth_factor_orig": "smooth_orig"}
        tensors = {rename.get(k, k): v for k, v in tensors.items()}
    return lin, layer, tensors


@pytest.mark.parametrize("raw_names", [False, True])
def test_import_reproduces_the_layer(raw_names):
    lin, layer, tensors = synthetic_checkpoint(raw_names)
    state = {f"transformer_blocks.0.ff.net.0.proj.{k}": v for k, v in tensors.items()}
    state.update({f"single_transformer_blocks.3.proj_mlp.{k}": v for k, v in tensors.items()})
    state["norm_out.linear.weight"] = torch.randn(4, 4)
    layers = import_nunchaku_state_dict(state, backend="reference")
    assert sorted(layers) == ["single_transformer_blocks.3.proj_mlp", "transformer_blocks.0.ff.net.0.proj"]
    imported = layers["transformer_blocks.0.ff.net.0.proj"]
    assert (imported.in_features, imported.out_features, imported.rank) == (K, N, R)
    for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "wtscale", "input_scale"):
        a, b = getattr(imported, name), getattr(layer, name)
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a.float(),
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b.float()), name
    x = torch.randn(3, K).bfloat16()
    assert torch.equal(imported(x), layer(x))
    assert rel_l2(imported(x), lin(x).float()) < 0.2


def test_import_matches_nunchaku_math_written_by_hand():
    # Independent of our exporter: tensors built directly in nunchaku's conventions (proj_up [N, R] un-transposed,
    # wscales [K/16, N]) from known codes; the imported layer must compute
    # alpha * Q(x / smooth) Q(W)^T + bias + (x @ proj_down) @ proj_up^T.
    codes = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    scales = torch.rand(N, K // 16).mul(2).add(0.25).to(torch.float8_e4m3fn)
    smooth = (torch.rand(K) + 0.5).bfloat16()
    down, up = (torch.randn(K, R) * 0.05).bfloat16(), (torch.randn(N, R) * 0.05).bfloat16()
    bias, alpha = torch.randn(N).bfloat16(), 0.03
    tensors = {"qweight": pack_nunchaku_qweight(codes), "wscales": pack_nunchaku_wscales(scales),
               "wtscale": torch.tensor([alpha]).bfloat16(), "smooth_factor": pack_nunchaku_vector(smooth),
               "proj_down": pack_nunchaku_lowrank(down.t(), True), "proj_up": pack_nunchaku_lowrank(up, False),
               "bias": pack_nunchaku_vector(bias)}
    layer = svdquant_linear_from_nunchaku(tensors, backend="reference")
    from dcgen_kernels.ops.nvfp4_quantize import quantize_nvfp4_reference

    x = torch.randn(5, K).bfloat16()
    xq = quantize_nvfp4_reference(x.float() / smooth.float(), torch.tensor(1.0))
    w = dequantize_nvfp4_reference(codes, scales, torch.tensor(float(torch.tensor(alpha).bfloat16())))
    expected = dequantize_nvfp4_reference(*xq) @ w.t() + bias.float() + (x.float() @ down.float()) @ up.float().t()
    assert rel_l2(layer(x), expected) < 1e-2


def test_non_unit_wcscales_fold_without_saturating():
    # nunchaku's y = alpha * wcscales * (...): max(wcscales) goes into our tensor scale, wcscales / max into the group
    # scales. The layer's group scales reach 448, so folding all of wcscales > 1 into them would saturate.
    _, layer, tensors = synthetic_checkpoint()
    assert layer.wscales.float().max() == 448 and layer.wscales.float().min() >= 2 ** -5

    def fold(wcscales):
        wcscales = wcscales.bfloat16()  # as nunchaku stores them
        imported = svdquant_linear_from_nunchaku(dict(tensors, wcscales=pack_nunchaku_vector(wcscales)),
                                                 backend="reference")
        got = dequantize_nvfp4_reference(imported.qweight, imported.wscales, imported.wtscale)
        exact = dequantize_nvfp4_reference(layer.qweight, layer.wscales, layer.wtscale) * wcscales.float()[:, None]
        return got, exact

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, exact = fold(torch.randint(1, 3, (N,)).float())  # ratios 1 and 1/2 to the max: exact in E4M3
    assert any("wcscales" in str(w.message) and "underflow" in str(w.message) for w in caught)
    assert torch.equal(got, exact)
    got, exact = fold(torch.rand(N) + 1)  # wcscales in [1, 2]: one E4M3 rounding per group scale, <= 1/16 relative
    assert ((got - exact).abs() <= exact.abs() * (1 / 16 + 1e-6)).all()
    assert rel_l2(got, exact) < 0.035  # measured 0.026 (saturating at 448 instead: 0.085)


def test_bad_checkpoints_raise_clear_errors():
    _, _, tensors = synthetic_checkpoint()
    with pytest.raises(KeyError, match="proj_down or lora_down"):
        svdquant_linear_from_nunchaku({k: v for k, v in tensors.items() if k != "proj_down"})
    bad = dict(tensors, wscales=tensors["wscales"].float())
    with pytest.raises(TypeError, match="INT4 checkpoints are not supported"):
        svdquant_linear_from_nunchaku(bad)
    with pytest.raises(ValueError, match="in_features % 128"):
        unpack_nunchaku_qweight(torch.zeros(128, 40, dtype=torch.int8))
    with pytest.raises(ValueError, match="in_features % 128"):  # K = 64: a multiple of 64 is not enough
        unpack_nunchaku_qweight(torch.zeros(128, 32, dtype=torch.int8))
    negative = torch.ones(N).bfloat16().index_fill(0, torch.tensor([5]), -1.0)
    with pytest.raises(ValueError, match="wcscales must be finite and non-negative"):
        svdquant_linear_from_nunchaku(dict(tensors, wcscales=pack_nunchaku_vector(negative)))
    with pytest.raises(ValueError, match=r"wcscales must have shape \(128,\)"):
        svdquant_linear_from_nunchaku(dict(tensors, wcscales=torch.ones(2 * N).bfloat16()))
    with pytest.raises(ValueError, match=r"bias must have shape \(128,\)"):
        svdquant_linear_from_nunchaku(dict(tensors, bias=torch.zeros(2 * N).bfloat16()))
    with pytest.raises(ValueError, match="wtscale must be one value"):
        svdquant_linear_from_nunchaku(dict(tensors, wtscale=torch.rand(N).bfloat16()))
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        svdquant_linear_from_nunchaku(dict(tensors, qweight=tensors["qweight"].reshape(-1)))
    with pytest.raises(ValueError, match="nunchaku_kernels must be 'auto', 'never' or 'require', got 'always'"):
        svdquant_linear_from_nunchaku(tensors, nunchaku_kernels="always")
    for convert in (pack_nunchaku_lowrank, unpack_nunchaku_lowrank):
        with pytest.raises(ValueError, match=r"low-rank weights need both dims multiples of 16, got \(24, 32\)"):
            convert(torch.zeros(24, 32, dtype=torch.bfloat16), down=True)
    w4a16 = SVDQuantLinear.from_linear(torch.nn.Linear(K, N), rank=R, activations="bf16", backend="reference")
    with pytest.raises(ValueError, match="only W4A4 layers \\(activations='nvfp4'\\) have a nunchaku equivalent"):
        svdquant_linear_to_nunchaku(w4a16)


def test_nunchaku_backend_detection_without_a_gpu():
    reason = nunchaku_backend_error(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    _, _, tensors = synthetic_checkpoint()
    with pytest.raises(RuntimeError, match="cannot use nunchaku's kernels"):
        to_nunchaku_module(tensors)
    with pytest.raises(RuntimeError, match="cannot use nunchaku's kernels"):
        svdquant_linear_from_nunchaku(tensors, nunchaku_kernels="require")
    assert svdquant_linear_from_nunchaku(tensors).external_kernel is None  # "auto" falls back quietly


class FakeSVDQW4A4Linear(torch.nn.Module):
    """nunchaku's NVFP4 SVDQW4A4Linear as far as loading goes: its tensors' names, shapes and dtypes, no kernels.
    FLOAT_WTSCALE: wtscale a plain float (nunchaku since 092e01e, 2025-08-28) or, before, a Parameter [1]."""

    FLOAT_WTSCALE = True

    def __init__(self, in_features, out_features, rank=32, bias=True, precision="int4", torch_dtype=torch.bfloat16,
                 device=None):
        super().__init__()
        assert precision == "nvfp4"

        def param(*shape, dtype=torch_dtype, fill=0.0):
            return torch.nn.Parameter(torch.full(shape, fill, device=device).to(dtype), requires_grad=False)

        self.qweight = param(out_features, in_features // 2, dtype=torch.int8)
        self.wscales = param(in_features // 16, out_features, dtype=torch.float8_e4m3fn)
        self.smooth_factor, self.smooth_factor_orig = param(in_features), param(in_features)
        self.proj_down, self.proj_up = param(in_features, rank), param(out_features, rank)
        self.bias = param(out_features) if bias else None
        self.wcscales = param(out_features, fill=1.0)
        self.wtscale = 1.0 if self.FLOAT_WTSCALE else param(1, fill=1.0)


@pytest.fixture
def fake_nunchaku(monkeypatch):
    """Installs a fake nunchaku whose SVDQW4A4Linear keeps wtscale as a float (True) or a Parameter (False), and
    makes the backend check pass, as the real nunchaku on an sm_120 GPU would."""
    from dcgen_kernels.quant import nunchaku

    def install(float_wtscale: bool):
        cls = type("SVDQW4A4Linear", (FakeSVDQW4A4Linear,), {"FLOAT_WTSCALE": float_wtscale})
        linear = types.ModuleType("nunchaku.models.linear")
        linear.SVDQW4A4Linear = cls
        for name in ("nunchaku", "nunchaku.models"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "nunchaku.models.linear", linear)
        monkeypatch.setattr(nunchaku, "nunchaku_backend_error", lambda device: None)
        return cls

    return install


@pytest.mark.parametrize("float_wtscale", [True, False], ids=["wtscale-float", "wtscale-parameter"])
def test_to_nunchaku_module_loads_either_kind_of_wtscale(fake_nunchaku, float_wtscale):
    cls = fake_nunchaku(float_wtscale)
    _, _, tensors = synthetic_checkpoint()
    tensors["wtscale"] = torch.tensor([0.375]).bfloat16()
    tensors["wcscales"] = pack_nunchaku_vector(torch.rand(N).add(0.5).bfloat16())
    module = to_nunchaku_module(tensors)
    assert type(module) is cls
    for name in ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up", "bias",
                 "wcscales"):
        assert torch.equal(getattr(module, name).view(torch.uint8), tensors[name].view(torch.uint8)), name
    if float_wtscale:
        assert type(module.wtscale) is float and module.wtscale == 0.375
    else:
        assert isinstance(module.wtscale, torch.nn.Parameter) and module.wtscale.tolist() == [0.375]
    defaults = to_nunchaku_module({k: v for k, v in tensors.items()
                                   if k not in ("wtscale", "wcscales", "smooth_factor_orig")})
    assert float(defaults.wtscale) == 1.0 and torch.equal(defaults.wcscales, torch.ones(N).bfloat16())
    assert torch.equal(defaults.smooth_factor_orig, tensors["smooth_factor"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*wcscales")  # the fold's one-time warning
        layer = svdquant_linear_from_nunchaku(tensors, backend="reference", nunchaku_kernels="require")
    assert type(layer.external_kernel.module) is cls


@pytest.mark.gpu
def test_nunchaku_kernels_agree_when_available():
    reason = nunchaku_backend_error(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    _, layer, tensors = synthetic_checkpoint()
    tensors = {k: v.cuda() for k, v in tensors.items()}
    ours = svdquant_linear_from_nunchaku(tensors, nunchaku_kernels="never")
    theirs = svdquant_linear_from_nunchaku(tensors, nunchaku_kernels="require")
    assert theirs.external_kernel is not None
    x = torch.randn(1, 256, K, device="cuda").bfloat16()
    assert rel_l2(theirs(x), ours(x).float()) < 5e-2


def test_vector_tiling_follows_nunchaku_pack_scale_order():
    # nunchaku's pack_scale(group_size=-1) for bias / smooth / wcscales: per 128-tile, value a*16 + b*8 + c*2 + d
    # (a < 8, b < 2, c < 4, d < 2) is stored at a*16 + c*4 + b*2 + d.
    v = torch.arange(256.0)
    packed = pack_nunchaku_vector(v)
    for a, b, c, d in ((0, 1, 0, 0), (3, 0, 2, 1), (7, 1, 3, 1)):
        assert packed[128 + a * 16 + c * 4 + b * 2 + d] == 128 + a * 16 + b * 8 + c * 2 + d
    assert torch.equal(unpack_nunchaku_vector(packed), v)
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_nunchaku_vector(torch.zeros(100))


def test_import_leaves_awq_w4a16_layers_to_the_caller():
    _, _, tensors = synthetic_checkpoint()
    state = {f"blocks.0.attn.to_q.{k}": v for k, v in tensors.items()}
    state.update({"blocks.0.norm1.linear.qweight": torch.zeros(64, 16, dtype=torch.int32),  # AWQ W4A16 adaLN
                  "blocks.0.norm1.linear.wscales": torch.ones(2, 64).bfloat16(),
                  "blocks.0.norm1.linear.wzeros": torch.zeros(2, 64).bfloat16()})
    assert set(import_nunchaku_state_dict(state, backend="reference")) == {"blocks.0.attn.to_q"}


def test_nunchaku_kernel_wrapper_takes_any_leading_shape():
    """nunchaku's module takes (B, S, K): the wrapper flattens the leading dims in and restores them out."""
    from dcgen_kernels.quant.nunchaku import _NunchakuKernel

    seen = []

    def module(x):
        seen.append(tuple(x.shape))
        return x[..., :3] * 2

    wrapper = _NunchakuKernel(module)
    for shape in ((5, 8), (2, 3, 8), (8,)):
        x = torch.randn(*shape)
        assert torch.equal(wrapper(x), x[..., :3] * 2)
    assert seen == [(1, 5, 8), (1, 6, 8), (1, 1, 8)]
