"""Model-level quantization: patch(model, quant=...), dcgen_kernels.quantize, save/load, unpatch.

Tolerances (tiny fp32 models on the CPU, rel-L2 of the model output against stock): fp8 measured 0.25% (FLUX)
and 2.5% (SANA), nvfp4 0.75% / 0.36%; bound 5% for both formats (E4M3 rows carry ~2.5% per quantization)."""

import pytest
import torch

import dcgen_kernels
from dcgen_kernels.ops.fp8_linear import FP8Activation
from dcgen_kernels.quant import FP8Linear
from tests.helpers import rel_l2, tiny_flux, tiny_flux_inputs, tiny_sana, tiny_sana_inputs

MODEL_TOL = 0.05

FLUX_BLOCK_LINEARS = [f"transformer_blocks.0.{n}" for n in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj", "attn.add_q_proj",
    "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")] + \
    [f"single_transformer_blocks.0.{n}" for n in ("proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")]


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _has_svdquant() -> bool:
    try:
        from dcgen_kernels.quant.svdquant import SVDQuantLinear  # noqa: F401
    except ImportError:
        return False
    return True


needs_svdquant = pytest.mark.skipif(not _has_svdquant(), reason="dcgen_kernels.quant.svdquant not importable")


# --------------------------------------------------------------------------------------------- FLUX fp8
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_flux_fp8_close_to_stock_and_report(backend):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    stock = _run(model, inputs)
    dcgen_kernels.patch(model, quant="fp8", backend=backend, keep_original=True)
    report = dcgen_kernels.patch_report(model).quantization
    assert report.quant == "fp8" and report.keep_original
    assert sorted(name for name, *_ in report.layers) == sorted(FLUX_BLOCK_LINEARS)
    assert all(cls == "FP8Linear" for *_, cls in report.layers)
    assert report.weight_bytes_after < report.weight_bytes_before
    # What stays 16-bit: embedders, adaLN linears, the output head.
    for name in ("x_embedder", "context_embedder", "proj_out", "transformer_blocks.0.norm1.linear",
                 "single_transformer_blocks.0.norm.linear", "norm_out.linear"):
        assert type(model.get_submodule(name)) is torch.nn.Linear, name
    assert "quantized 17 linears to fp8" in str(dcgen_kernels.patch_report(model))
    got = _run(model, inputs)
    assert torch.isfinite(got).all()
    err = rel_l2(got, stock)
    assert 0 < err < MODEL_TOL  # quantized (not the stock path by accident) and close


def test_flux_fp8_blocks_feed_producer_quantized_activations(monkeypatch):
    """Q/K/V, the single blocks' MLP, both FFN linears and proj_out get FP8Activation from their producer; only the
    attention output projections (to_out, to_add_out) quantize their input themselves."""
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, quant="fp8", backend="reference")
    names = {module: name for name, module in model.named_modules()}
    seen = {}
    original = FP8Linear.forward

    def spy(self, x, **kwargs):
        seen[names[self]] = (isinstance(x, FP8Activation), sorted(kwargs))
        return original(self, x, **kwargs)

    monkeypatch.setattr(FP8Linear, "forward", spy)
    _run(model, inputs)
    assert sorted(seen) == sorted(FLUX_BLOCK_LINEARS)
    standalone = {"transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out"}
    assert {n for n, (pre, _) in seen.items() if not pre} == standalone
    epilogue = {n for n, (_, kw) in seen.items() if kw == ["gate", "residual"]}
    assert epilogue == {"transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2",
                        "single_transformer_blocks.0.proj_out"}


def test_keep_original_unpatch_restores_exactly():
    model, inputs = tiny_flux(), tiny_flux_inputs()
    stock = _run(model, inputs)
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dcgen_kernels.patch(model, quant="fp8", keep_original=True, backend="reference")
    assert "transformer_blocks.0.attn.to_q.weight_scale" in model.state_dict()
    dcgen_kernels.unpatch(model)
    assert not dcgen_kernels.is_patched(model)
    assert all(model.get_submodule(name) is m for name, m in linears.items())
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(_run(model, inputs), stock)


def test_unpatch_without_originals_raises_and_leaves_model_patched():
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, quant="fp8", backend="reference")
    before = _run(model, inputs)
    with pytest.raises(RuntimeError, match="keep_original=True"):
        dcgen_kernels.unpatch(model)
    assert dcgen_kernels.is_patched(model)
    assert isinstance(model.transformer_blocks[0].attn.to_q, FP8Linear)
    assert torch.equal(_run(model, inputs), before)
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        dcgen_kernels.patch(model, quant="nvfp4")


def test_repatch_same_quant_is_idempotent_and_switches_backend():
    model = tiny_flux()
    dcgen_kernels.patch(model, quant="fp8", backend="reference")
    q = model.transformer_blocks[0].attn.to_q
    dcgen_kernels.patch(model, quant="fp8", backend="triton")
    assert model.transformer_blocks[0].attn.to_q is q and q.backend == "triton"
    dcgen_kernels.patch(model)  # quant=None leaves the quantization as it is
    assert dcgen_kernels.patch_report(model).quantization.quant == "fp8"


def test_bad_quant_name_and_unsupported_model():
    model = tiny_flux()
    with pytest.raises(ValueError, match="quant must be one of"):
        dcgen_kernels.patch(model, quant="int8")
    with pytest.raises(ValueError, match="quant must be one of"):
        dcgen_kernels.quantize(model, quant="fp16")
    assert not dcgen_kernels.is_patched(model)
    assert type(model.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    with pytest.raises(ValueError, match="no transformer-block nn.Linear"):
        dcgen_kernels.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), quant="fp8")


# --------------------------------------------------------------------------------------------- save / load
def test_fp8_save_load_round_trip_bit_exact(tmp_path):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.quantize(model, quant="fp8", backend="reference")  # quantize alone: stock forwards, FP8 linears
    expected = _run(model, inputs)
    path = tmp_path / "flux-fp8.safetensors"
    dcgen_kernels.save_quantized(model, path)

    fresh = tiny_flux()  # other random weights: everything must come from the file
    dcgen_kernels.load_quantized(fresh, path, backend="reference")
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert saved[k].dtype == loaded[k].dtype, k
        assert torch.equal(saved[k].view(torch.uint8), loaded[k].view(torch.uint8)), k
    assert torch.equal(_run(fresh, inputs), expected)


def test_save_load_errors(tmp_path):
    with pytest.raises(ValueError, match="is not quantized"):
        dcgen_kernels.save_quantized(tiny_flux(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        dcgen_kernels.load_quantized(tiny_flux(), tmp_path / "missing.safetensors")
    model = tiny_flux()
    dcgen_kernels.quantize(model, quant="fp8")
    dcgen_kernels.save_quantized(model, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="needs an unquantized"):
        dcgen_kernels.load_quantized(model, tmp_path / "q.safetensors")


# --------------------------------------------------------------------------------------------- SANA
def test_sana_fp8_close_to_stock_with_shared_qkv_input(monkeypatch):
    model, inputs = tiny_sana(), tiny_sana_inputs()
    stock = _run(model, inputs)
    dcgen_kernels.patch(model, quant="fp8", backend="triton", keep_original=True)
    report = dcgen_kernels.patch_report(model).quantization
    # 2 layers x (self-attention q/k/v/out + cross-attention q/k/v/out); GLUMBConv's 1x1 convs stay 16-bit
    assert len(report.layers) == 16 and all(".attn" in name for name, *_ in report.layers)
    seen = []
    original = FP8Linear.forward
    monkeypatch.setattr(FP8Linear, "forward", lambda self, x, **kw: seen.append(isinstance(x, FP8Activation))
                        or original(self, x, **kw))
    err = rel_l2(_run(model, inputs), stock)
    assert 0 < err < MODEL_TOL
    assert sum(seen) == 2 * 3  # each block's self-attention Q, K, V share the adaLN producer's FP8 rows
    dcgen_kernels.unpatch(model)
    assert torch.equal(_run(model, inputs), stock)


# --------------------------------------------------------------------------------------------- nvfp4
@needs_svdquant
@pytest.mark.parametrize("make, make_inputs, n_layers", [(tiny_flux, tiny_flux_inputs, 17),
                                                         (tiny_sana, tiny_sana_inputs, 16)])
def test_nvfp4_close_to_stock_and_reversible(make, make_inputs, n_layers):
    model, inputs = make(), make_inputs()
    stock = _run(model, inputs)
    dcgen_kernels.patch(model, quant="nvfp4", backend="reference", keep_original=True, rank=16)
    report = dcgen_kernels.patch_report(model).quantization
    assert len(report.layers) == n_layers and {cls for *_, cls in report.layers} == {"SVDQuantLinear"}
    err = rel_l2(_run(model, inputs), stock)
    assert 0 < err < MODEL_TOL
    dcgen_kernels.patch(model, quant="fp8", backend="reference", keep_original=True)  # switch via the originals
    assert dcgen_kernels.patch_report(model).quantization.quant == "fp8"
    dcgen_kernels.unpatch(model)
    assert torch.equal(_run(model, inputs), stock)


@needs_svdquant
def test_nvfp4_save_load_round_trip_bit_exact(tmp_path):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.quantize(model, quant="nvfp4", rank=8, backend="reference")
    expected = _run(model, inputs)
    dcgen_kernels.save_quantized(model, tmp_path / "flux-nvfp4.safetensors")
    fresh = tiny_flux()
    dcgen_kernels.load_quantized(fresh, tmp_path / "flux-nvfp4.safetensors", backend="reference")
    assert fresh.transformer_blocks[0].attn.to_q.rank == 8
    assert torch.equal(_run(fresh, inputs), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_flux_bf16_gpu_quantized_close_to_stock(quant):
    if quant == "nvfp4" and not _has_svdquant():
        pytest.skip("dcgen_kernels.quant.svdquant not importable")
    model = tiny_flux(dtype=torch.bfloat16, device="cuda")
    inputs = tiny_flux_inputs(dtype=torch.bfloat16, device="cuda")
    stock = _run(model, inputs)
    dcgen_kernels.patch(model, quant=quant, keep_original=True)
    err = rel_l2(_run(model, inputs), stock)
    assert 0 < err < MODEL_TOL
    dcgen_kernels.unpatch(model)
    assert torch.equal(_run(model, inputs), stock)
