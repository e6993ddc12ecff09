import warnings

import pytest
import torch

import dcgen_kernels
from dcgen_kernels.patching.flux import DCGenFluxAttnProcessor
from tests.helpers import TOLERANCE, assert_patch_keeps_gradients, rel_l2, tiny_flux, tiny_flux_inputs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("fused", [False, True], ids=["separate_qkv", "fused_qkv"])
def test_patched_reference_equals_stock(fused):
    model = tiny_flux()
    if fused:
        model.fuse_qkv_projections()
    inputs = tiny_flux_inputs()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert rel_l2(run(model, inputs), expected) < 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["separate_qkv", "fused_qkv"])
def test_patched_triton_bf16_matches_fp32_stock(fused):
    model = tiny_flux()
    inputs = tiny_flux_inputs()
    expected = run(model, inputs)
    model = model.to(torch.bfloat16)
    if fused:
        model.fuse_qkv_projections()
    bf16_inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and "ids" not in k
                       else v) for k, v in inputs.items()}
    stock_error = rel_l2(run(model, bf16_inputs), expected)
    dcgen_kernels.patch(model, backend="triton")
    patched_error = rel_l2(run(model, bf16_inputs), expected)
    # The fused op runs its norm/RoPE in fp32, so it is no less accurate than stock bf16 diffusers.
    assert patched_error <= max(1.5 * stock_error, TOLERANCE[torch.bfloat16]), (patched_error, stock_error)


def test_patch_replaces_every_flux_attention_and_reports_it():
    model = dcgen_kernels.patch(tiny_flux())
    report = dcgen_kernels.patch_report(model)
    assert dcgen_kernels.is_patched(model)
    replaced = {name: cls for name, _, cls in report.replaced}
    assert replaced == {"transformer_blocks.0.attn": "FluxAttnProcessor",
                        "transformer_blocks.0.norm1": "AdaLayerNormZero",
                        "transformer_blocks.0.norm1_context": "AdaLayerNormZero",
                        "single_transformer_blocks.0.attn": "FluxAttnProcessor",
                        "single_transformer_blocks.0.norm": "AdaLayerNormZeroSingle",
                        "norm_out": "AdaLayerNormContinuous", "transformer_blocks.0": "FluxTransformerBlock",
                        "single_transformer_blocks.0": "FluxSingleTransformerBlock",
                        # latent I/O: the model takes unpacked latents through the fused patch (un)embedding
                        "": "FluxTransformer2DModel", "x_embedder": "Linear", "proj_out": "Linear"}
    assert report.skipped == []
    assert "11 replaced" in str(report) and "2 x FluxAttnProcessor" in str(report)
    for name, cls in replaced.items():
        module = model.get_submodule(name)
        if cls == "FluxAttnProcessor":
            assert isinstance(module.processor, DCGenFluxAttnProcessor)
        else:
            assert vars(module)["forward"].func is not type(module).forward  # per instance; class untouched


def test_patch_is_idempotent_and_unpatch_restores_the_original_processors():
    model = tiny_flux()
    originals = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    class_forwards = {type(m): type(m).forward for m in model.modules()}
    dcgen_kernels.patch(model, backend="reference")
    dcgen_kernels.patch(model, backend="triton")  # re-patching only switches the backend
    for name, module in model.named_modules():
        if name in originals:
            assert module.processor.original is originals[name] and module.processor.backend == "triton"
    dcgen_kernels.unpatch(model)
    assert not dcgen_kernels.is_patched(model)
    assert {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")} == originals
    assert not any("forward" in vars(m) for m in model.modules())
    assert {type(m): type(m).forward for m in model.modules()} == class_forwards
    with pytest.raises(ValueError, match="not patched"):
        dcgen_kernels.patch_report(model)


def test_patch_leaves_parameters_and_state_dict_untouched():
    model = tiny_flux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dcgen_kernels.patch(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_attention_mask_falls_back_to_diffusers_with_a_warning():
    model = tiny_flux()
    attn = model.transformer_blocks[0].attn
    hidden, enc = torch.randn(1, 10, 128), torch.randn(1, 3, 128)
    mask = torch.ones(1, 1, 13, 13, dtype=torch.bool)
    with torch.no_grad():
        expected = attn(hidden, enc, attention_mask=mask)
        dcgen_kernels.patch(model)
        dcgen_kernels._backend._warned.clear()
        with pytest.warns(RuntimeWarning, match="attention_mask"):
            out = attn(hidden, enc, attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_context_parallelism_configured_after_patch_reaches_the_fallback():
    """diffusers' enable_parallelism sets `_parallel_config` on every processor that has the attribute (0.42:
    ModelMixin.enable_parallelism); set after patch() it reaches the kept processor and the fused op steps aside."""
    model = dcgen_kernels.patch(tiny_flux())
    config = object()
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):  # diffusers' own test
            processor._parallel_config = config
    attn = model.transformer_blocks[0].attn
    assert isinstance(attn.processor, DCGenFluxAttnProcessor) and attn.processor.original._parallel_config is config
    assert attn.processor._unsupported(attn, torch.randn(1, 3, 128), None) == "context parallelism is configured"
    dcgen_kernels.unpatch(model)
    assert model.transformer_blocks[0].attn.processor._parallel_config is config


def test_model_without_supported_modules_is_rejected():
    with pytest.raises(ValueError, match="no supported module in Sequential.*FluxTransformer2DModel"):
        dcgen_kernels.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dcgen_kernels.patch("flux")

    from diffusers import DiffusionPipeline

    class TinyPipeline(DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    with pytest.raises(TypeError, match="got TinyPipeline: patch its models, e.g. pipe.transformer$"):
        dcgen_kernels.patch(TinyPipeline(tiny_flux()))
    with pytest.raises(ValueError, match="backend must be one of"):
        dcgen_kernels.patch(tiny_flux(), backend="fastest")


def test_patched_model_compiles_without_graph_breaks_and_matches():
    model = tiny_flux()
    inputs = tiny_flux_inputs()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert rel_l2(run(compiled, inputs), expected) < 1e-5


def test_patched_model_gradients_match_stock():
    assert_patch_keeps_gradients(tiny_flux(), tiny_flux_inputs())


@pytest.mark.gpu
def test_patched_tiny_flux_on_gpu():
    model = tiny_flux(dtype=torch.bfloat16, device="cuda")
    inputs = tiny_flux_inputs(dtype=torch.bfloat16, device="cuda")
    reference = tiny_flux(device="cuda")
    reference.load_state_dict(model.state_dict())
    expected = run(reference, {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                               for k, v in inputs.items()})
    dcgen_kernels.patch(model)
    assert rel_l2(run(model, inputs), expected) <= 2 * TOLERANCE[torch.bfloat16]


class _DoubledLinear(torch.nn.Linear):
    """A Linear whose forward is not F.linear (as a LoRA wrapper's is not): must never be bypassed."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_gelu_tanh_linear_is_stock_off_the_gpu():
    """On the CPU torch._addmm_activation's GELU is the erf form: the tanh MLPs must keep stock's two ops there."""
    from dcgen_kernels.patching.flux import _gelu_tanh_linear

    linear, x = torch.nn.Linear(32, 48), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(_gelu_tanh_linear(linear, x),
                                   torch.nn.functional.gelu(linear(x), approximate="tanh"), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_gelu_tanh_linear_fuses_only_plain_linears(dtype):
    from dcgen_kernels.patching.flux import _gelu_tanh_linear

    x = torch.randn(3, 77, 320, device="cuda", dtype=dtype)
    for linear, factor in ((torch.nn.Linear(320, 1280), 1), (_DoubledLinear(320, 1280), 2)):
        linear = linear.to("cuda", dtype)
        pre = factor * torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        expected = torch.nn.functional.gelu(pre, approximate="tanh")
        with torch.no_grad():
            out = _gelu_tanh_linear(linear, x)
        assert out.shape == (3, 77, 1280) and out.dtype == dtype
        assert rel_l2(out, expected) <= TOLERANCE[dtype] / 2, type(linear).__name__
    x.requires_grad_(True)  # with gradients: stock's ops, differentiable
    _gelu_tanh_linear(torch.nn.Linear(320, 1280).to("cuda", dtype), x).sum().backward()
    assert x.grad is not None


def test_single_blocks_join_their_inputs_without_a_copy():
    """A patched single block returns its output as two views of one tensor; the next one joins them back as a view
    (stock concatenates them again), with the same result as stock."""
    from diffusers import FluxTransformer2DModel

    from dcgen_kernels.patching.flux import _joined

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=3,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    inputs = tiny_flux_inputs()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    joined = []
    block = model.single_transformer_blocks[1]
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: joined.append(_joined(kwargs["encoder_hidden_states"], kwargs["hidden_states"])
                                                   .data_ptr() == kwargs["encoder_hidden_states"].data_ptr()),
        with_kwargs=True)
    out = run(model, inputs)
    handle.remove()
    assert joined == [True] and rel_l2(out, expected) < 1e-5
    first, second = torch.randn(2, 3, 8), torch.randn(2, 5, 8)  # separate tensors: a real concatenation
    torch.testing.assert_close(_joined(first, second), torch.cat([first, second], dim=1), rtol=0, atol=0)
    base = torch.randn(2, 8, 8)
    assert torch.equal(_joined(base[:, :3], base[:, 3:]), base)
    assert torch.equal(_joined(base[:, :3], base[:, 4:]), torch.cat([base[:, :3], base[:, 4:]], dim=1))  # a gap
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # fake and meta tensors have no storage to compare: concatenated as stock does
        fake = torch.randn(2, 8, 8)
        assert _joined(fake[:, :3], fake[:, 3:]).shape == (2, 8, 8)
    meta = torch.randn(2, 8, 8, device="meta")
    assert _joined(meta[:, :3], meta[:, 3:]).shape == (2, 8, 8)


@pytest.mark.parametrize("quant", [None, "fp8"])
def test_patched_model_survives_torch_save_load_and_deepcopy(quant):
    import copy
    import io

    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, backend="reference", quant=quant, keep_original=True)
    expected = run(model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        # the twin's patched forwards are bound to the twin's modules, not to the model it came from
        assert all(vars(m)["forward"].args[0] is m for m in twin.modules() if "forward" in vars(m))
        assert dcgen_kernels.is_patched(twin) and torch.equal(run(twin, inputs), expected)
        dcgen_kernels.unpatch(twin)
        assert not any("forward" in vars(m) for m in twin.modules())
    assert torch.equal(run(model, inputs), expected)


def test_float64_model_runs_diffusers_code_with_one_warning_per_module_kind():
    model = tiny_flux().double()
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in tiny_flux_inputs().items()}
    expected = run(model, inputs)
    dcgen_kernels.patch(model)
    dcgen_kernels._backend._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(model, inputs)
    said = [str(w.message) for w in caught]
    assert "dcgen_kernels: FluxTransformerBlock runs diffusers' code because its input is float64 (the fused ops " \
           "take float32, bfloat16 and float16)" in said and len(said) == len(set(said)), said
    assert out.dtype == torch.float64 and torch.equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        run(model, inputs)


class _ImagePromptProcessor:
    """Like diffusers' FluxIPAdapterAttnProcessor: a third output the block adds to the image stream."""

    def __init__(self):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.inner = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        image, context = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return image, context, 0.5 * hidden_states.flip(-1)


def test_double_block_adds_the_image_prompt_output_of_a_three_output_processor():
    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.transformer_blocks[0].attn.set_processor(_ImagePromptProcessor())
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert isinstance(model.transformer_blocks[0].attn.processor, _ImagePromptProcessor)  # a user's: kept
    assert rel_l2(run(model, inputs), expected) < 1e-5


@pytest.mark.parametrize("layer", ["single_transformer_blocks.0.proj_out", "transformer_blocks.0.ff_context.net.2"])
def test_fp16_blocks_clip_to_the_fp16_range_as_diffusers(layer):
    """diffusers clips fp16 block outputs to +-65504: a layer scaled to overflow must give stock's finite output."""
    model, inputs = tiny_flux(dtype=torch.float16), tiny_flux_inputs(dtype=torch.float16)
    with torch.no_grad():
        model.get_submodule(layer).weight.mul_(1e5)
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    got = run(model, inputs)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    assert rel_l2(got.float(), expected.float()) < 5e-3
