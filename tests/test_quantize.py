"""Model-level quantization: patch(model, quant=...), dcgen_kernels.quantize, save/load, unpatch.

Tolerances (tiny fp32 models on the CPU, rel-L2 of the model output against stock): fp8 measured 0.25% (FLUX)
and 1.6-2.6% (SANA, attention + Mix-FFN, seeds 0-4), nvfp4 (rank 16) 0.75% (FLUX) and 2.6-4.7% (SANA); bound 5%
(E4M3 rows carry ~2.5% per quantization), 10% for SANA nvfp4: its Mix-FFN's W4A4 1x1 convs on random Gaussian
weights and activations err 14% (rank 0) / 10.5% (rank 16) per layer (svdquant_error_report), the whole fp32
Mix-FFN 14% (fp8: 4.9%), diluted by the blocks' gates and residuals."""

import copy
import warnings

import pytest
import torch

import dcgen_kernels
from dcgen_kernels.ops import (ada_layer_norm_modulate_fp8, gated_residual_ada_layer_norm_modulate_fp8, quantize_fp8,
                               quantize_nvfp4_activations)
from dcgen_kernels.ops.fp8_linear import FP8Activation
from dcgen_kernels.ops.glumbconv import glumbconv_reference
from dcgen_kernels.patching.quant import QuantizedPointwiseConv, quant_report
from dcgen_kernels.patching.sana import _glumbconv_tokens
from dcgen_kernels.quant import FP8Linear
from tests.helpers import add_lora, rel_l2, tiny_dcae, tiny_flux, tiny_flux_inputs, tiny_sana, tiny_sana_inputs

MODEL_TOL = 0.05
SANA_NVFP4_TOL = 0.10

SANA_MIX_FFN_CONVS = [f"transformer_blocks.{i}.ff.{n}" for i in range(2) for n in ("conv_inverted", "conv_point")]

FLUX_BLOCK_LINEARS = [f"transformer_blocks.0.{n}" for n in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj", "attn.add_q_proj",
    "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")] + \
    [f"single_transformer_blocks.0.{n}" for n in ("proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")]


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# --------------------------------------------------------------------------------------------- FLUX fp8
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_flux_fp8_close_to_stock_and_report(backend):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    stock = _run(model, inputs)
    dcgen_kernels.quantize(model, quant="fp8", backend=backend, keep_original=True)
    quantized_stock = _run(model, inputs)  # diffusers' block forwards around the same FP8 layers
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
    with warnings.catch_warnings():  # only the attention may fall back: the fp32 tiny model's has no Triton kernel
        warnings.filterwarnings("ignore", message=r"dcgen_kernels\.flux_attention: triton backend cannot serve",
                                category=RuntimeWarning)
        got = _run(model, inputs)
    assert torch.isfinite(got).all()
    err = rel_l2(got, stock)
    assert 0 < err < MODEL_TOL  # quantized (not the stock path by accident) and close
    # The fused blocks (adaLN producers quantizing for the FP8 GEMMs, GELU / gate / residual epilogues) compute what
    # diffusers' blocks compute with the same layers: measured 6e-8 (fp32; a code may round the other way)
    assert rel_l2(got, quantized_stock) < 1e-5


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


def test_keep_original_restores_onto_the_device_the_model_moved_to():
    model = tiny_flux()
    dcgen_kernels.patch(model, quant="fp8", keep_original=True, backend="reference")
    model.to("meta")  # moves the quantized layers; the kept originals are off the module tree
    dcgen_kernels.unpatch(model)
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_keep_original_restores_in_the_dtype_the_model_was_cast_to(quant):
    # The kept originals are off the module tree: model.to(torch.bfloat16) does not reach them, restore casts them.
    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.transformer_blocks[0].attn.to_q.bias = None  # a layer without 16-bit tensors of its own once in FP8
    stock = copy.deepcopy(model).to(torch.bfloat16)
    dcgen_kernels.quantize(model, quant=quant, keep_original=True, backend="reference",
                           rank=8 if quant == "nvfp4" else None)
    model.to(torch.bfloat16)
    dcgen_kernels.unpatch(model)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    restored, expected = model.state_dict(), stock.state_dict()
    assert restored.keys() == expected.keys() and all(torch.equal(restored[k], expected[k]) for k in expected)
    cast = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    assert torch.equal(_run(model, cast), _run(stock, cast))


def test_requantizing_to_the_same_format_refuses_another_rank_or_keep_original():
    model = tiny_flux()
    dcgen_kernels.quantize(model, quant="nvfp4", rank=8, backend="reference")
    layer = model.transformer_blocks[0].attn.to_q
    with pytest.raises(ValueError, match=r"with rank=8; .* cannot apply rank=32\. To change rank, reload the model"):
        dcgen_kernels.quantize(model, quant="nvfp4", rank=32, keep_original=True, backend="triton")
    with pytest.raises(ValueError, match="cannot apply keep_original=True"):
        dcgen_kernels.patch(model, quant="nvfp4", rank=8, keep_original=True)
    assert layer.backend == "reference" and not dcgen_kernels.is_patched(model)  # refused before any change
    dcgen_kernels.quantize(model, quant="nvfp4", rank=8, keep_original=False, backend="triton")  # the same: fine
    dcgen_kernels.quantize(model, quant="nvfp4", backend="reference")  # not given: the model's
    assert model.transformer_blocks[0].attn.to_q is layer and layer.backend == "reference" and layer.rank == 8
    kept = tiny_flux()
    dcgen_kernels.quantize(kept, quant="fp8", keep_original=True, backend="reference")
    with pytest.raises(ValueError, match=r"keep_original=False\. To change keep_original, restore .*unpatch\(model\)"):
        dcgen_kernels.quantize(kept, quant="fp8", keep_original=False)
    with pytest.raises(ValueError, match=r"rank applies to quant='nvfp4' only, got rank=64 with quant='fp8'"):
        dcgen_kernels.quantize(kept, quant="fp8", rank=64, keep_original=True)
    assert quant_report(kept).keep_original


@pytest.mark.parametrize("first,second", [("nvfp4", "fp8"), ("fp8", "nvfp4")])
def test_switching_format_keeps_the_originals_unless_told_otherwise(first, second):
    """A model quantized with keep_original=True stays reversible through a format switch that does not repeat the
    flag (it lost its originals there, so unpatch and any further switch raised); keep_original=False drops them."""
    model = tiny_flux()
    stock = copy.deepcopy(model.state_dict())
    dcgen_kernels.patch(model, quant=first, keep_original=True, backend="reference")
    dcgen_kernels.patch(model, quant=second, backend="reference")
    assert quant_report(model).quant == second and quant_report(model).keep_original
    dcgen_kernels.quantize(model, first, backend="reference")  # a second switch: the originals are still there
    dcgen_kernels.unpatch(model)
    restored = model.state_dict()
    assert restored.keys() == stock.keys() and all(torch.equal(restored[k], stock[k]) for k in stock)
    dcgen_kernels.quantize(model, first, keep_original=True, backend="reference")
    dcgen_kernels.quantize(model, second, keep_original=False, backend="reference")
    assert not quant_report(model).keep_original
    with pytest.raises(RuntimeError, match="without keep_original=True"):
        dcgen_kernels.unpatch(model)


@pytest.mark.parametrize("kwargs", [dict(rank=8), dict(nvfp4_activations="bf16"), dict(quant="fp8", rank=8),
                                    dict(quant="fp8", nvfp4_activations="nvfp4")])
def test_nvfp4_settings_with_another_quant_are_refused_not_ignored(kwargs):
    model = tiny_flux()
    name = "rank" if "rank" in kwargs else "nvfp4_activations"
    with pytest.raises(ValueError, match=f"{name} applies to quant='nvfp4' only"):
        dcgen_kernels.patch(model, **kwargs)
    assert not dcgen_kernels.is_patched(model)
    if "quant" in kwargs:
        with pytest.raises(ValueError, match=f"{name} applies to quant='nvfp4' only"):
            dcgen_kernels.quantize(model, **kwargs)
        assert quant_report(model) is None


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_kept_originals_of_reloaded_quantized_weights_are_refused_not_restored(quant):
    """Another model's quantized weights loaded into the quantized layers (load_state_dict, load_quantized) make the
    kept 16-bit originals stale: unpatch and a format switch raise, leaving the model as it is, rather than put back
    weights that mix the two models."""
    settings = dict(quant=quant, keep_original=True, backend="reference", rank=8 if quant == "nvfp4" else None)
    model, inputs = tiny_flux(), tiny_flux_inputs()
    other = dcgen_kernels.patch(tiny_flux(), **settings)
    dcgen_kernels.patch(model, **settings)
    model.to(torch.bfloat16).float()  # casts and moves keep the codes: no false alarm
    model.load_state_dict(other.state_dict())
    before = _run(model, inputs)
    for call, args in ((dcgen_kernels.unpatch, {}), (dcgen_kernels.patch, {"quant": "fp8" if quant == "nvfp4"
                                                                                   else "nvfp4"})):
        with pytest.raises(RuntimeError, match=r"quantized weights of \d+ layer\(s\) \(e.g. transformer_blocks"):
            call(model, **args)
        assert dcgen_kernels.is_patched(model) and quant_report(model).quant == quant
        assert torch.equal(_run(model, inputs), before)
    dcgen_kernels.unpatch(other)  # its own weights: restores
    assert not dcgen_kernels.is_patched(other)
    # the same codes with other scales are other weights too
    scaled = dcgen_kernels.patch(tiny_flux(), **settings)
    state = scaled.state_dict()
    scale = "weight_scale" if quant == "fp8" else "wtscale"
    state[f"transformer_blocks.0.ff.net.2.{scale}"] = state[f"transformer_blocks.0.ff.net.2.{scale}"] * 2
    scaled.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"1 layer\(s\) \(e.g. transformer_blocks.0.ff.net.2\)"):
        dcgen_kernels.unpatch(scaled)


def test_restored_originals_follow_the_models_mode_and_requires_grad():
    """model.eval()/.train() and requires_grad_() after quantization do not reach the kept originals (off the
    module tree): restoring applies the mode, and the requires_grad every other parameter has where they agree."""
    def restored(model, after_quantization):
        dcgen_kernels.patch(model, quant="fp8", keep_original=True, backend="reference")
        after_quantization(model)
        dcgen_kernels.unpatch(model)
        return model, model.transformer_blocks[0].attn.to_q

    model, to_q = restored(tiny_flux().train(), lambda m: m.eval().requires_grad_(False))
    assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())
    model, to_q = restored(tiny_flux().eval().requires_grad_(False), lambda m: m.train().requires_grad_(True))
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    # partly frozen (only the head trains): no common setting, the originals keep theirs
    model, to_q = restored(tiny_flux().requires_grad_(False), lambda m: m.proj_out.requires_grad_(True))
    assert not to_q.weight.requires_grad and model.proj_out.weight.requires_grad


def test_keep_original_on_a_meta_model_is_refused_before_anything_changes():
    """A meta skeleton has no weights to keep: keep_original=True would leave unpatch nothing to restore."""
    model = tiny_flux().to("meta")
    for call in (dcgen_kernels.patch, dcgen_kernels.quantize):
        with pytest.raises(ValueError, match="on the meta device, with no weights to keep"):
            call(model, quant="fp8", keep_original=True, backend="reference")
        assert not dcgen_kernels.is_patched(model) and quant_report(model) is None


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
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        dcgen_kernels.quantize(model, quant="nvfp4")
    assert isinstance(model.transformer_blocks[0].attn.to_q, FP8Linear)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(quant="nvfp4", rank=-3), ValueError, "rank must be a non-negative int"),
    (dict(quant="nvfp4", keep_original="yes"), TypeError, "keep_original must be a bool"),
    (dict(quant="nvfp4", nvfp4_activations="fp4"), ValueError, "nvfp4_activations must be None or one of"),
    (dict(keep_original="yes"), TypeError, "keep_original must be a bool")])
def test_patch_checks_the_quantization_arguments_before_replacing_anything(kwargs, error, match):
    model = tiny_flux()
    processors = {name: type(p) for name, p in model.attn_processors.items()}
    with pytest.raises(error, match=match):
        dcgen_kernels.patch(model, **kwargs)
    assert {name: type(p) for name, p in model.attn_processors.items()} == processors
    assert not dcgen_kernels.is_patched(model) and quant_report(model) is None


@pytest.mark.parametrize("call", ["quantize", "patch"])
@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_non_finite_weights_are_refused_before_any_layer_is_replaced(quant, call):
    model = tiny_flux()
    with torch.no_grad():
        model.single_transformer_blocks[0].proj_mlp.weight[3, 5] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    with pytest.raises(ValueError, match=r"single_transformer_blocks.0.proj_mlp.weight holds non-finite values"):
        getattr(dcgen_kernels, call)(model, quant=quant, backend="reference")
    assert all(model.get_submodule(name) is m for name, m in layers.items())
    assert quant_report(model) is None and not dcgen_kernels.is_patched(model)
    assert not any("forward" in vars(m) for m in model.modules())  # patch() put the forwards it replaced back
    assert all(type(m.processor).__name__ == "FluxAttnProcessor" for m in model.modules() if hasattr(m, "processor"))
    torch.testing.assert_close(dict(model.state_dict()), state, rtol=0, atol=0, equal_nan=True)


def test_non_finite_weights_leave_an_earlier_patch_as_it_was():
    model = tiny_flux()
    dcgen_kernels.patch(model, backend="reference")
    report, state = dcgen_kernels.patch_report(model), {id(m): dict(vars(m)) for m in model.modules()}
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_k.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"transformer_blocks.0.attn.to_k.weight holds non-finite values"):
        dcgen_kernels.patch(model, backend="triton", quant="fp8")
    assert dcgen_kernels.patch_report(model) is report and quant_report(model) is None
    assert {id(m): dict(vars(m)) for m in model.modules()} == state  # the forwards keep their backend


def _out_of_memory_at_layer(monkeypatch, n: int) -> None:
    """Quantizing the n-th layer fails as a GPU out of memory would (monkeypatch.undo() lifts it)."""
    from dcgen_kernels.patching import quant as quant_module

    quantize_layer, calls = quant_module._quantized_module, []

    def fail_at_the_nth(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return quantize_layer(*args, **kwargs)

    monkeypatch.setattr(quant_module, "_quantized_module", fail_at_the_nth)


def test_a_quantization_failing_midway_puts_the_replaced_layers_back(monkeypatch):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    expected = _run(model, inputs)
    layers = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    _out_of_memory_at_layer(monkeypatch, 3)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        dcgen_kernels.quantize(model, quant="fp8", backend="reference")
    assert all(model.get_submodule(name) is m for name, m in layers.items()) and quant_report(model) is None
    assert torch.equal(_run(model, inputs), expected)
    monkeypatch.undo()
    dcgen_kernels.quantize(model, quant="fp8", backend="reference")  # and it can be quantized afterwards
    assert quant_report(model).quant == "fp8"


def test_a_quantization_failing_on_a_patched_model_leaves_its_patch_as_it_was(monkeypatch):
    """patch(quant=..., backend=other) of a patched model, out of memory midway: the forwards keep the earlier
    patch's backend and CUDA graphs (patch() had switched them first), and its report."""
    from dcgen_kernels.patching import cuda_graph
    from dcgen_kernels.patching._instance import _BACKEND_ATTR

    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    expected, report = _run(model, inputs), dcgen_kernels.patch_report(model)

    def backends():
        return ({name: vars(m).get(_BACKEND_ATTR) for name, m in model.named_modules()},
                {name: p.backend for name, p in model.attn_processors.items()})

    before = backends()
    assert set(before[1].values()) == {"reference"}
    _out_of_memory_at_layer(monkeypatch, 2)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        dcgen_kernels.patch(model, quant="fp8", backend="triton")
    assert backends() == before and cuda_graph.graphed(model) is not None
    assert dcgen_kernels.patch_report(model) is report and quant_report(model) is None
    assert torch.equal(_run(model, inputs), expected)


@pytest.mark.parametrize("call", ["quantize", "patch"])
def test_a_format_switch_failing_midway_keeps_the_current_format(monkeypatch, call):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, quant="fp8", keep_original=True, backend="reference")
    expected, layers = _run(model, inputs), {name: model.get_submodule(name) for name, *_ in quant_report(model).layers}
    _out_of_memory_at_layer(monkeypatch, 2)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        getattr(dcgen_kernels, call)(model, quant="nvfp4", rank=4, backend="reference")
    assert all(model.get_submodule(name) is layer for name, layer in layers.items())
    assert quant_report(model).quant == dcgen_kernels.patch_report(model).quantization.quant == "fp8"
    assert torch.equal(_run(model, inputs), expected)
    monkeypatch.undo()
    dcgen_kernels.unpatch(model)  # the kept originals are still there
    assert all(type(model.get_submodule(name)) is torch.nn.Linear for name in layers)


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
    with pytest.raises(ValueError, match="no transformer-block nn.Linear"):
        dcgen_kernels.quantize(torch.nn.Sequential(), quant="nvfp4")  # no parameters at all
    with pytest.raises(TypeError, match="model must be a torch.nn.Module .a diffusers model., got dict"):
        dcgen_kernels.quantize({}, quant="fp8")
    with pytest.raises(ValueError, match="quant must be one of .*got None .use unpatch/restore"):
        dcgen_kernels.quantize(model, quant=None)
    dcae = tiny_dcae()  # patch() supports it, quantization does not: refused before anything is replaced
    with pytest.raises(ValueError, match=r"patch\(quant='fp8'\) found no transformer-block nn.Linear in AutoencoderDC"):
        dcgen_kernels.patch(dcae, quant="fp8")
    assert not dcgen_kernels.is_patched(dcae)


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
@pytest.mark.parametrize("make,targets", [(tiny_flux, ["to_q", "proj_mlp"]), (tiny_sana, ["conv_inverted"])])
def test_unmerged_lora_adapters_are_refused_before_anything_changes(make, targets, quant):
    model = add_lora(make(), targets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="carry peft adapters \\(LoRA\\). Merge them"):
        dcgen_kernels.patch(model, quant=quant, backend="reference")
    with pytest.raises(ValueError, match="carry peft adapters"):
        dcgen_kernels.quantize(model, quant=quant, backend="reference")
    assert not dcgen_kernels.is_patched(model) and quant_report(model) is None
    assert not any("forward" in vars(m) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
@pytest.mark.parametrize("make,make_inputs", [(tiny_flux, tiny_flux_inputs), (tiny_sana, tiny_sana_inputs)])
def test_model_dtype_casts_leave_the_quantized_storage_alone(make, make_inputs, quant):
    # pipe.to(torch.bfloat16) / model.half() after quantizing: FP8 codes and fp32 scales keep their dtype and bytes,
    # the 16-bit parts (bias, low-rank branch) follow the model
    model, inputs = make(), make_inputs()
    dcgen_kernels.patch(model, quant=quant, backend="reference")
    expected = _run(model, inputs)
    layers = [model.get_submodule(name) for name, *_ in quant_report(model).layers]
    layer = next(layer for layer in (getattr(m, "linear", m) for m in layers) if layer.bias is not None)
    kept = {"fp8": ("weight", "weight_scale"), "nvfp4": ("qweight", "wscales", "wtscale", "input_scale", "smooth")}
    stored = {name: getattr(layer, name).clone() for name in kept[quant]}
    for cast in (lambda m: m.type(torch.float16), lambda m: m.to(torch.bfloat16)):  # .type casts integers too
        cast(model)
        for name, before in stored.items():
            after = getattr(layer, name)
            assert after.dtype == before.dtype and after.shape == before.shape, name
            assert torch.equal(after.reshape(-1).view(torch.uint8), before.reshape(-1).view(torch.uint8)), name
    assert layer.bias.dtype == torch.bfloat16
    cast_inputs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "encoder_attention_mask"
                   else v for k, v in inputs.items()}
    assert rel_l2(_run(model, cast_inputs).float(), expected) < 0.05  # bf16 activations on the same quantized weights
    model.to("meta").to_empty(device="cpu")  # device moves still apply to them
    assert all(getattr(layer, name).dtype == before.dtype and getattr(layer, name).device.type == "cpu"
               for name, before in stored.items())


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
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dcgen_kernels.save_quantized([1], tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dcgen_kernels.load_quantized("model", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="is not quantized"):
        dcgen_kernels.save_quantized(tiny_flux(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        dcgen_kernels.load_quantized(tiny_flux(), tmp_path / "missing.safetensors")
    model = tiny_flux()
    dcgen_kernels.quantize(model, quant="fp8")
    dcgen_kernels.save_quantized(model, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="needs an unquantized"):
        dcgen_kernels.load_quantized(model, tmp_path / "q.safetensors")
    for bad in (tmp_path, tmp_path / "missing" / "q.safetensors"):  # a directory; a file in a missing one
        with pytest.raises(ValueError, match="must name a file in an existing directory"):
            dcgen_kernels.save_quantized(model, bad)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1)}, tmp_path / "other.safetensors")  # a safetensors file, but not ours
    with pytest.raises(ValueError, match="was not written by dcgen_kernels.save_quantized"):
        dcgen_kernels.load_quantized(tiny_flux(), tmp_path / "other.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tmp_path / "q.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(tmp_path / "q.safetensors"))
    for damage in ({"layers": None}, {"layers": "[not json"}, {"rank": "x"}, {"quant": "int8"}, {"layers": "{}"}):
        damaged = {k: v for k, v in {**metadata, **damage}.items() if v is not None}
        save_file(tensors, tmp_path / "damaged.safetensors", metadata=damaged)
        target = tiny_flux()
        with pytest.raises(ValueError, match="damaged.safetensors': damaged save_quantized metadata"):
            dcgen_kernels.load_quantized(target, tmp_path / "damaged.safetensors")
        assert quant_report(target) is None


def _wider_embedder_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(  # tiny_flux but in_channels 64: same blocks, another x_embedder
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(16, 24, 24))


def _deeper_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(  # tiny_flux with a second double-stream block
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(16, 24, 24))


def _retyped(name, dtype):
    """The saved file with one tensor stored in another dtype (same shape): a hand-made or corrupted checkpoint."""
    def change(path):
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        tensors[name] = tensors[name].view(dtype) if dtype.itemsize == 1 else tensors[name].to(dtype)
        save_file(tensors, str(path), metadata=metadata)
    return change


@pytest.mark.parametrize("other,change,match", [
    (_wider_embedder_flux, None, "3 tensors differ: .*x_embedder.weight: \\(128, 16\\) float in the file"),
    (_deeper_flux, None, r"17 layers, this FluxTransformer2DModel has 29 quantizable layers \(only here: "
                         r"transformer_blocks\.1\.attn\.to_q, transformer_blocks\.1\.attn\.to_k, "
                         r"transformer_blocks\.1\.attn\.to_v and 9 more\): not the same architecture"),
    (tiny_sana, None, r"\(only in the file: transformer_blocks\.0\.attn\.to_q, .* and 14 more; only here: "
                      r"transformer_blocks\.0\.attn1\.to_q, .*\): not the same architecture"),
    (tiny_flux, _retyped("x_embedder.weight", torch.int32), r"x_embedder.weight: \(128, 16\) int32 in the file, "
                                                            r"\(128, 16\) float here"),
    (tiny_flux, _retyped("transformer_blocks.0.attn.to_q.wscales", torch.uint8), r"to_q.wscales: \(128, 8\) uint8 "
                                                                                 r"in the file, \(128, 8\) float8")],
    ids=["wider_embedder", "deeper", "sana", "int_embedder", "uint8_scales"])
def test_load_quantized_refuses_another_architecture_before_changing_the_model(tmp_path, other, change, match):
    model = tiny_flux()
    dcgen_kernels.quantize(model, quant="nvfp4", rank=8)
    dcgen_kernels.save_quantized(model, tmp_path / "q.safetensors")
    if change is not None:
        change(tmp_path / "q.safetensors")
    target = other()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        dcgen_kernels.load_quantized(target, tmp_path / "q.safetensors")
    assert quant_report(target) is None and not any(isinstance(m, QuantizedPointwiseConv) for m in target.modules())
    after = target.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("make,make_inputs,quant", [(tiny_flux, tiny_flux_inputs, "nvfp4"),
                                                     (tiny_sana, tiny_sana_inputs, "fp8")])
def test_load_quantized_fills_a_meta_skeleton_in_the_files_dtype(tmp_path, monkeypatch, make, make_inputs, quant):
    from dcgen_kernels.quant import fp8, svdquant

    model, inputs = make(dtype=torch.bfloat16), make_inputs(dtype=torch.bfloat16)
    dcgen_kernels.quantize(model, quant=quant, rank=8 if quant == "nvfp4" else None, backend="reference")
    dcgen_kernels.save_quantized(model, tmp_path / "q.safetensors")
    for name in ("svdquant_decompose", "quantize_nvfp4"):
        monkeypatch.setattr(svdquant, name, lambda *a, **k: pytest.fail("load_quantized quantized a layer"))
    monkeypatch.setattr(fp8, "quantize_weight_fp8", lambda *a, **k: pytest.fail("load_quantized quantized a layer"))

    skeleton = make(device="meta")  # float32 as built: the file's bf16 comes with its tensors
    assert dcgen_kernels.load_quantized(skeleton, tmp_path / "q.safetensors", device="cpu",
                                        backend="reference") is skeleton
    saved, loaded = model.state_dict(), skeleton.state_dict()
    assert list(loaded) == list(saved)
    for k in saved:
        assert loaded[k].device.type == "cpu" and loaded[k].dtype == saved[k].dtype, k
        assert torch.equal(loaded[k].reshape(-1).view(torch.uint8), saved[k].reshape(-1).view(torch.uint8)), k
    assert all(t.device.type == "cpu" for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert str(quant_report(skeleton)) == str(quant_report(model))  # memory before in bf16, as the saved model's
    expected = _run(model, inputs)
    assert torch.equal(_run(skeleton, inputs), expected)
    # the loaded tensors own their memory: not the file's mapped pages (some were not 16-byte aligned)
    assert all(t.data_ptr() % 16 == 0 for t in skeleton.state_dict().values() if t.numel())
    path = tmp_path / "q.safetensors"
    with open(path, "r+b") as f:
        f.write(b"\0" * path.stat().st_size)
    assert torch.equal(_run(skeleton, inputs), expected)


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_load_quantized_refuses_a_float64_model_by_name_before_changing_it(tmp_path, quant):
    """A float64 model, or a float64 skeleton of an fp32 file (no 16-bit dtype to take): refused naming the weight.
    FP8 had blamed a bias dtype; NVFP4 loaded a model that then refused its own float64 inputs. A float64 skeleton
    of a bf16 file takes the file's dtype and loads."""
    kw = dict(rank=4) if quant == "nvfp4" else {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_flux(dtype=dtype)
        dcgen_kernels.quantize(model, quant=quant, backend="reference", **kw)
        dcgen_kernels.save_quantized(model, tmp_path / f"{dtype}.safetensors")
    for target in (tiny_flux().double(), tiny_flux(device="meta").double()):
        before = {k: (v.dtype, v.device) for k, v in target.state_dict().items()}
        with pytest.raises(TypeError, match=r"transformer_blocks\.0\.attn\.to_q\.weight has dtype torch\.float64"):
            dcgen_kernels.load_quantized(target, tmp_path / "torch.float32.safetensors", device="cpu")
        assert quant_report(target) is None
        assert {k: (v.dtype, v.device) for k, v in target.state_dict().items()} == before
    skeleton = tiny_flux(device="meta").double()
    dcgen_kernels.load_quantized(skeleton, tmp_path / "torch.bfloat16.safetensors", device="cpu", backend="reference")
    assert quant_report(skeleton).quant == quant and skeleton.x_embedder.weight.dtype == torch.bfloat16


def test_load_quantized_device_errors_and_skeletons_a_file_cannot_fill(tmp_path):
    model = tiny_flux()
    dcgen_kernels.quantize(model, quant="fp8", backend="reference")
    path = tmp_path / "q.safetensors"
    dcgen_kernels.save_quantized(model, path)
    cases = [({}, "on the meta device: pass device="), ({"device": "meta"}, "real device"),
             ({"device": 3.5}, "device must be a torch.device or a device string")]
    if not torch.cuda.is_available():  # torch's own error spoke of pin_memory
        cases.append(({"device": "cuda"}, "this machine has no CUDA GPU"))
    if not torch.backends.mps.is_available():  # loading failed only after the skeleton was quantized
        cases.append(({"device": "mps"}, "device='mps' is not usable here"))
    for kwargs, match in cases:
        skeleton = tiny_flux(device="meta")
        with pytest.raises(ValueError, match=match):
            dcgen_kernels.load_quantized(skeleton, path, **kwargs)
        assert quant_report(skeleton) is None
    with pytest.raises(ValueError, match="differs from the model's device 'cpu'"):
        dcgen_kernels.load_quantized(tiny_flux(), path, device=torch.device("cuda", 1))

    with_buffer = tiny_flux(device="meta")
    with_buffer.register_buffer("table", torch.zeros(3, device="meta"), persistent=False)
    tied = tiny_flux(device="meta")
    attn = tied.transformer_blocks[0].attn
    attn.norm_k.weight = attn.norm_q.weight
    for skeleton, match in ((with_buffer, "buffers outside its state_dict \\(table\\)"),
                            (tied, "shared under several names \\(transformer_blocks.0.attn.norm_q.weight, "
                                   "transformer_blocks.0.attn.norm_k.weight\\)")):
        with pytest.raises(ValueError, match=match):
            dcgen_kernels.load_quantized(skeleton, path, device="cpu")
        assert quant_report(skeleton) is None
        assert all(t.device.type == "meta" for t in [*skeleton.parameters(), *skeleton.buffers()])


def test_save_quantized_writes_tied_tensors_and_load_refuses_adapters(tmp_path):
    """safetensors refuses two names for one tensor: a tie is saved as a copy, and loads back with the same values.
    A model with LoRA adapters on its block layers is refused before it changes."""
    model, inputs = tiny_flux(), tiny_flux_inputs()
    attn = model.transformer_blocks[0].attn
    attn.norm_k.weight = attn.norm_q.weight
    dcgen_kernels.quantize(model, quant="fp8", backend="reference")
    dcgen_kernels.save_quantized(model, tmp_path / "q.safetensors")
    fresh = dcgen_kernels.load_quantized(tiny_flux(), tmp_path / "q.safetensors", backend="reference")
    assert torch.equal(_run(fresh, inputs), _run(model, inputs))
    adapted = add_lora(tiny_flux(), ["to_q"])
    with pytest.raises(ValueError, match="carry peft adapters"):
        dcgen_kernels.load_quantized(adapted, tmp_path / "q.safetensors")
    assert quant_report(adapted) is None


def test_load_quantized_allocates_the_layers_instead_of_quantizing_them(tmp_path, monkeypatch):
    from dcgen_kernels.quant import svdquant

    model = tiny_sana()
    dcgen_kernels.quantize(model, quant="nvfp4", rank=8)
    dcgen_kernels.save_quantized(model, tmp_path / "q.safetensors")
    monkeypatch.setattr(svdquant, "svdquant_decompose", lambda *a, **k: pytest.fail("load_quantized ran an SVD"))
    loaded = dcgen_kernels.load_quantized(tiny_sana(), tmp_path / "q.safetensors")
    saved, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(saved) and all(torch.equal(got[k], v) for k, v in saved.items())


# --------------------------------------------------------------------------------------------- SANA
def test_sana_fp8_close_to_stock_fused_inputs_and_exact_unpatch(monkeypatch):
    model, inputs = tiny_sana(), tiny_sana_inputs()
    stock = _run(model, inputs)
    originals = {name: m for name, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dcgen_kernels.quantize(model, quant="fp8", backend="triton", keep_original=True)
    quantized_stock = _run(model, inputs)  # diffusers' block forwards around the same FP8 layers
    dcgen_kernels.patch(model, quant="fp8", backend="triton", keep_original=True)
    report = dcgen_kernels.patch_report(model).quantization
    # 2 layers x (self-attention q/k/v/out + cross-attention q/k/v/out + Mix-FFN conv_inverted/conv_point)
    names = [name for name, *_ in report.layers]
    assert len(names) == 20 and report.pointwise_convs == 4
    assert sorted(n for n in names if ".ff." in n) == sorted(SANA_MIX_FFN_CONVS)
    assert all(".attn" in n for n in names if ".ff." not in n)
    assert {cls for *_, cls in report.layers} == {"FP8Linear"}
    assert ("transformer_blocks.0.ff.conv_inverted", 64, 320, "FP8Linear") in report.layers
    assert "quantized 20 linears (4 of them 1x1 convs) to fp8" in str(report)
    assert report.weight_bytes_after < report.weight_bytes_before
    assert type(model.transformer_blocks[0].ff.conv_depth) is torch.nn.Conv2d  # the depthwise conv stays 16-bit
    seen = {}
    module_names = {m: n for n, m in model.named_modules()}
    original = FP8Linear.forward

    def spy(self, x, **kwargs):
        seen[module_names[self]] = (isinstance(x, FP8Activation), sorted(kwargs))
        return original(self, x, **kwargs)

    monkeypatch.setattr(FP8Linear, "forward", spy)
    got = _run(model, inputs)
    assert 0 < rel_l2(got, stock) < MODEL_TOL
    assert rel_l2(got, quantized_stock) < 1e-5  # fused blocks compute what diffusers' do with these layers: 1.6e-7
    # Self-attention Q, K, V and conv_inverted read the adaLN producers' FP8 rows; conv_point adds the gated residual.
    assert {n for n, (fp8, _) in seen.items() if fp8} == {
        f"transformer_blocks.{i}.{n}" for i in range(2)
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.conv_inverted.linear")}
    assert {n for n, (_, kw) in seen.items() if kw == ["gate", "residual"]} == {
        f"transformer_blocks.{i}.ff.conv_point.linear" for i in range(2)}
    dcgen_kernels.unpatch(model)
    assert all(model.get_submodule(name) is m for name, m in originals.items())
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(_run(model, inputs), stock)


def test_sana_unfused_mix_ffn_hands_fp8_rows_to_an_fp8_successor(monkeypatch):
    """A block whose Mix-FFN runs diffusers' code (here: another activation) still fuses its residual with the
    successor's norm1; with the successor's Q/K/V in FP8 that pass writes the FP8 rows they read."""
    from dcgen_kernels.patching import sana

    model, inputs = tiny_sana(), tiny_sana_inputs()
    model.transformer_blocks[0].ff.nonlinearity = torch.nn.GELU()
    dcgen_kernels.quantize(model, quant="fp8", backend="reference")
    quantized_stock = _run(model, inputs)
    dcgen_kernels.patch(model, quant="fp8", backend="reference")
    own_norm1, fp8_sums = [], []
    norm1, fused = sana._norm1, sana.gated_residual_ada_layer_norm_modulate_fp8
    monkeypatch.setattr(sana, "_norm1", lambda block, *args: own_norm1.append(block) or norm1(block, *args))
    monkeypatch.setattr(sana, "gated_residual_ada_layer_norm_modulate_fp8",
                        lambda *args, **kwargs: fp8_sums.append(kwargs["eps"]) or fused(*args, **kwargs))
    seen = []
    original = FP8Linear.forward
    monkeypatch.setattr(FP8Linear, "forward", lambda self, x, **kwargs: seen.append(
        (self, isinstance(x, FP8Activation))) or original(self, x, **kwargs))
    with pytest.warns(RuntimeWarning, match="nonlinearity is torch.nn.modules.activation.GELU, not torch.nn.SiLU"):
        got = _run(model, inputs)
    assert rel_l2(got, quantized_stock) < 1e-5
    second = model.transformer_blocks[1].attn1
    assert {fp8 for layer, fp8 in seen if layer in (second.to_q, second.to_k, second.to_v)} == {True}
    # Only the first block normalises its own input; FP8 sums: block 0's hand-over and block 1's norm2 for its FP8
    # Mix-FFN (block 0's norm2 feeds diffusers' Mix-FFN: 16-bit).
    assert own_norm1 == [model.transformer_blocks[0]] and len(fp8_sums) == 2


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_sana_quantized_mix_ffn_backends_agree_and_close_to_fp32(quant):
    """The quantized Mix-FFN on tokens: glumbconv's Triton depthwise + GLU kernel against the fp32 torch fallback
    (same quantized GEMMs around them), and both against the fp32 GLUMBConv."""
    model = tiny_sana()
    ff = model.transformer_blocks[0].ff
    x = torch.randn(2, 6 * 7, 64)
    expected = glumbconv_reference(x, 6, 7, ff.conv_inverted.weight, ff.conv_inverted.bias, ff.conv_depth.weight,
                                   ff.conv_depth.bias, ff.conv_point.weight)
    dcgen_kernels.quantize(model, quant=quant, backend="reference", rank=16 if quant == "nvfp4" else None)
    assert isinstance(ff.conv_inverted, QuantizedPointwiseConv) and isinstance(ff.conv_point, QuantizedPointwiseConv)
    fallback = _glumbconv_tokens(ff, x, 6, 7, "reference")
    fused = _glumbconv_tokens(ff, x, 6, 7, "triton")
    assert rel_l2(fused, fallback) < 1e-5
    # measured 4.9% (fp8) and 14.4% (nvfp4, rank 16) on these random Gaussian weights and inputs
    assert 0 < rel_l2(fallback, expected) < (0.08 if quant == "fp8" else 0.2)


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_sana_quantize_alone_stock_forward_and_save_load_bit_exact(quant, tmp_path):
    """quantize() without patch: diffusers' own GLUMBConv forward feeds the quantized 1x1 convs NCHW maps."""
    model, inputs = tiny_sana(), tiny_sana_inputs()
    stock = _run(model, inputs)
    dcgen_kernels.quantize(model, quant=quant, backend="reference", rank=16 if quant == "nvfp4" else None)
    expected = _run(model, inputs)
    assert 0 < rel_l2(expected, stock) < (MODEL_TOL if quant == "fp8" else SANA_NVFP4_TOL)
    path = tmp_path / f"sana-{quant}.safetensors"
    dcgen_kernels.save_quantized(model, path)
    fresh = tiny_sana()  # other random weights: everything must come from the file
    dcgen_kernels.load_quantized(fresh, path, backend="reference")
    assert quant_report(fresh).pointwise_convs == 4
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    assert any(k.startswith("transformer_blocks.0.ff.conv_point.linear.") for k in saved)
    for k in saved:
        assert saved[k].dtype == loaded[k].dtype, k
        assert torch.equal(saved[k].reshape(-1).view(torch.uint8), loaded[k].reshape(-1).view(torch.uint8)), k
    assert torch.equal(_run(fresh, inputs), expected)
    conv = fresh.transformer_blocks[0].ff.conv_point  # a 1x1 conv's backend is its quantized linear's
    assert conv.backend == conv.linear.backend == "reference"
    conv.backend = "triton"
    assert conv.linear.backend == "triton"


def test_dcae_glumbconvs_stay_16_bit():
    with pytest.raises(ValueError, match="no transformer-block nn.Linear"):
        dcgen_kernels.quantize(tiny_dcae(), quant="fp8")


# --------------------------------------------------------------------------------------------- nvfp4
@pytest.mark.parametrize("make, make_inputs, n_layers, tol", [(tiny_flux, tiny_flux_inputs, 17, MODEL_TOL),
                                                              (tiny_sana, tiny_sana_inputs, 20, SANA_NVFP4_TOL)])
@pytest.mark.parametrize("activations", ["nvfp4", "bf16"])
def test_nvfp4_close_to_stock_and_reversible(make, make_inputs, n_layers, tol, activations):
    model, inputs = make(), make_inputs()
    stock = _run(model, inputs)
    dcgen_kernels.patch(model, quant="nvfp4", backend="reference", keep_original=True, rank=16,
                        nvfp4_activations=activations)
    report = dcgen_kernels.patch_report(model).quantization
    assert len(report.layers) == n_layers and {cls for *_, cls in report.layers} == {"SVDQuantLinear"}
    assert report.activations == activations and ("W4A4" if activations == "nvfp4" else "W4A16") in str(report)
    err = rel_l2(_run(model, inputs), stock)
    assert 0 < err < tol
    dcgen_kernels.patch(model, quant="fp8", backend="reference", keep_original=True)  # switch via the originals
    assert dcgen_kernels.patch_report(model).quantization.quant == "fp8"
    dcgen_kernels.unpatch(model)
    assert torch.equal(_run(model, inputs), stock)


def test_nvfp4_rank_default_cap_and_zero():
    """rank defaults to 32, is capped per layer at min(K, N) (reported as asked), and 0 (no branch) runs; fp8 layers
    report none."""
    from dcgen_kernels.quant.svdquant import SVDQuantLinear

    def ranks(model):
        return {(m.in_features, m.out_features, m.lora_down.shape[1])
                for m in model.modules() if isinstance(m, SVDQuantLinear)}

    inputs = tiny_flux_inputs()
    default = dcgen_kernels.quantize(tiny_flux(), "nvfp4", backend="reference")
    assert quant_report(default).rank == 32 and {r for *_, r in ranks(default)} == {32}
    full = dcgen_kernels.quantize(tiny_flux(), "nvfp4", rank=4096, backend="reference")
    assert quant_report(full).rank == 4096 and all(r == min(k, n) for k, n, r in ranks(full))
    none = dcgen_kernels.quantize(tiny_flux(), "nvfp4", rank=0, backend="reference")
    assert {r for *_, r in ranks(none)} == {0} and torch.isfinite(_run(none, inputs)).all()
    assert quant_report(dcgen_kernels.quantize(tiny_flux(), "fp8", backend="reference")).rank == 0


@pytest.mark.parametrize("capability,expected", [((12, 0), "nvfp4"), ((12, 1), "bf16"), ((10, 0), "bf16"),
                                                 ((9, 0), "bf16")])
def test_nvfp4_activations_auto_picks_w4a4_only_where_the_native_kernel_is_built(monkeypatch, capability,
                                                                                 expected):
    """The native FP4 MMA kernel is compiled for sm_120a alone (csrc/), so only that GPU gets 4-bit activations."""
    from dcgen_kernels.patching.quant import resolve_nvfp4_activations

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_nvfp4_activations(None, torch.device("cuda")) == expected
    assert resolve_nvfp4_activations("bf16", torch.device("cuda")) == "bf16"


def test_weight_bytes_counts_shared_tensors_once_and_strided_convs_stay_16_bit():
    from dcgen_kernels.patching.quant import _is_pointwise_conv, weight_bytes

    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = torch.nn.Parameter(tied[0].weight.data)  # two parameters, one tensor (as assign-loads make)
    assert weight_bytes(tied) == 4 * (16 + 4 + 4)
    assert _is_pointwise_conv(torch.nn.Conv2d(4, 4, 1))
    assert not _is_pointwise_conv(torch.nn.Conv2d(4, 4, 1, stride=2))  # a 1x1 conv that subsamples: not a linear


def test_nvfp4_activations_auto_is_w4a16_without_native_fp4_and_switchable():
    model = tiny_flux()
    with pytest.raises(ValueError, match="nvfp4_activations must be None or one of"):
        dcgen_kernels.patch(model, quant="nvfp4", nvfp4_activations="fp4")
    assert not dcgen_kernels.is_patched(model)  # rejected before anything was replaced
    with pytest.raises(ValueError, match="nvfp4_activations must be None or one of"):
        dcgen_kernels.quantize(model, "nvfp4", nvfp4_activations="int4")
    dcgen_kernels.patch(model, quant="nvfp4", backend="reference", rank=8)  # CPU: no native FP4 MMA
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.activations == "bf16" and quant_report(model).activations == "bf16"
    dcgen_kernels.patch(model, quant="nvfp4", backend="reference", nvfp4_activations="nvfp4")  # same weights
    assert model.transformer_blocks[0].attn.to_q is layer and layer.activations == "nvfp4"
    assert quant_report(model).activations == "nvfp4"


@pytest.mark.parametrize("activations", ["auto", "nvfp4"])  # W4A16 on a CPU by default; W4A4 saved explicitly
def test_nvfp4_save_load_round_trip_bit_exact(tmp_path, activations):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.quantize(model, quant="nvfp4", rank=8, backend="reference", nvfp4_activations=activations)
    expected = _run(model, inputs)
    dcgen_kernels.save_quantized(model, tmp_path / "flux-nvfp4.safetensors")
    fresh = tiny_flux()
    dcgen_kernels.load_quantized(fresh, tmp_path / "flux-nvfp4.safetensors", backend="reference")
    assert fresh.transformer_blocks[0].attn.to_q.rank == 8
    assert quant_report(fresh).activations == quant_report(model).activations
    assert torch.equal(_run(fresh, inputs), expected)
    # patching or quantizing again without nvfp4_activations keeps the file's mode (only the backend switches)
    dcgen_kernels.patch(fresh, quant="nvfp4", backend="reference")
    dcgen_kernels.quantize(fresh, "nvfp4", backend="reference")
    assert quant_report(fresh).activations == quant_report(model).activations
    assert torch.equal(_run(fresh, inputs), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sana"])
@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_bf16_gpu_quantized_close_to_stock(family, quant):
    """Compiled kernels in bf16 (for SANA also the quantized Mix-FFN around glumbconv's depthwise + GLU kernel);
    keep_original unpatch restores the stock output exactly."""
    build, make_inputs = (tiny_flux, tiny_flux_inputs) if family == "flux" else (tiny_sana, tiny_sana_inputs)
    model = build(dtype=torch.bfloat16, device="cuda")
    inputs = make_inputs(dtype=torch.bfloat16, device="cuda")
    stock = _run(model, inputs)
    dcgen_kernels.patch(model, quant=quant, keep_original=True, rank=16 if quant == "nvfp4" else None)
    if family == "sana":
        assert dcgen_kernels.patch_report(model).quantization.pointwise_convs == 4
    err = rel_l2(_run(model, inputs), stock)
    assert 0 < err < (SANA_NVFP4_TOL if (family, quant) == ("sana", "nvfp4") else MODEL_TOL)
    dcgen_kernels.unpatch(model)
    assert torch.equal(_run(model, inputs), stock)


@pytest.mark.parametrize("family", ["flux", "sana"])
@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_quantized_model_compiles_fullgraph(family, quant):
    """Every quantized step (FP8 / NVFP4 linears, SANA's depthwise+GLU) is a custom op torch.compile traces."""
    torch.manual_seed(0)
    build, make_inputs = (tiny_flux, tiny_flux_inputs) if family == "flux" else (tiny_sana, tiny_sana_inputs)
    model = dcgen_kernels.patch(build(), quant=quant, backend="reference")
    inputs = make_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs)[0]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)[0]
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_quantized_pointwise_conv_keeps_the_conv_output_layout(memory_format):
    from dcgen_kernels.patching.quant import _conv_as_linear
    from dcgen_kernels.quant import FP8Linear

    conv = torch.nn.Conv2d(32, 48, 1)
    wrapped = QuantizedPointwiseConv(FP8Linear.from_linear(_conv_as_linear(conv), backend="reference"))
    x = torch.randn(2, 32, 5, 7).to(memory_format=memory_format)
    out, expected = wrapped(x), conv(x).detach()
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert rel_l2(out, expected) < MODEL_TOL


def test_quantized_pointwise_conv_takes_unbatched_maps_as_the_conv():
    from dcgen_kernels.patching.quant import _conv_as_linear
    from dcgen_kernels.quant import FP8Linear

    conv = torch.nn.Conv2d(16, 32, 1)
    wrapped = QuantizedPointwiseConv(FP8Linear.from_linear(_conv_as_linear(conv), backend="reference"))
    x = torch.randn(16, 5, 16)  # (C, H, W) whose width equals the channel count: not to be read as tokens
    out, expected = wrapped(x), conv(x).detach()
    assert out.shape == expected.shape == (32, 5, 16) and rel_l2(out, expected) < MODEL_TOL
    with pytest.raises(ValueError, match="NCHW map"):
        wrapped(torch.randn(5, 16))


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_backward_through_quantized_layers_says_they_are_inference_only(quant):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, quant=quant, backend="reference")
    out = model(**inputs)[0]  # grad mode on: the forward runs as before
    with pytest.raises(RuntimeError, match="quantized layers \\(FP8, NVFP4\\) are inference only"):
        out.square().mean().backward()


@pytest.mark.parametrize("name,produce", [
    ("quantize_fp8", lambda x: quantize_fp8(x).scale),
    ("quantize_nvfp4 / quantize_nvfp4_activations",
     lambda x: quantize_nvfp4_activations(x, None, torch.ones(32, 2))[2]),
    ("ada_layer_norm_modulate_fp8",
     lambda x: ada_layer_norm_modulate_fp8(x, torch.ones(2, 32), torch.ones(2, 32)).scale),
    ("gated_residual_ada_layer_norm_modulate_fp8", lambda x: gated_residual_ada_layer_norm_modulate_fp8(
        x, torch.ones(2, 32), x, torch.ones(2, 32), torch.ones(2, 32))[0]),
], ids=["quantize_fp8", "quantize_nvfp4_activations", "modulate_fp8", "gated_residual_modulate_fp8"])
def test_backward_through_the_quantizing_producers_says_they_are_inference_only(name, produce):
    """The public ops that produce quantized activations (torch's "no autograd formula was registered" before)."""
    out = produce(torch.randn(2, 3, 32, requires_grad=True))
    with pytest.raises(RuntimeError, match=f"{name} has no backward: quantized layers .* are inference only"):
        out.sum().backward()


@pytest.mark.parametrize("family", ["flux", "sana"])
@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_a_float64_model_is_refused_by_name_before_anything_changes(quant, family):
    """Both formats refuse float64 block weights up front (FP8 blamed a bias dtype; NVFP4 quantized the model, which
    then refused its own float64 inputs)."""
    model = (tiny_flux if family == "flux" else tiny_sana)().double()
    layers = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    for call in (dcgen_kernels.patch, dcgen_kernels.quantize):
        with pytest.raises(TypeError, match=r"transformer_blocks\.0\.\S+\.weight has dtype torch\.float64; "
                                            r"quantization takes torch.float32, torch.bfloat16, torch.float16 weights: "
                                            r"cast the model first"):
            call(model, quant=quant, backend="reference")
        assert all(model.get_submodule(name) is m for name, m in layers.items())
        assert quant_report(model) is None and not dcgen_kernels.is_patched(model)
    dcgen_kernels.patch(model, backend="reference")  # unquantized, it runs diffusers' code in float64 (README)
