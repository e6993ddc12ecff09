import warnings

import pytest
import torch

import dcgen_kernels
from dcgen_kernels.patching.flux import DCGenFluxAttnProcessor
from tests.helpers import (TOLERANCE, assert_freed_once_dropped, assert_patch_keeps_gradients,
                           assert_patched_modules_return_stock_dtypes, rel_l2, rope_tables, tiny_flux, tiny_flux_inputs)


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


@pytest.mark.parametrize("quant", [None, "fp8", "nvfp4"])
def test_patched_modules_return_stock_dtypes_under_autocast(quant):
    inputs = tiny_flux_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_patched_modules_return_stock_dtypes(tiny_flux(), lambda model: model(**inputs), quant)


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


def test_patch_failing_part_way_leaves_the_model_as_it_was(monkeypatch):
    from dcgen_kernels.patching import flux

    model = tiny_flux()
    processors = {name: p for name, p in model.attn_processors.items()}
    patch_module = flux.patch_module

    def fails_at_the_single_block(module, backend):
        if type(module).__name__ == "FluxSingleTransformerBlock":
            raise RuntimeError("cannot patch this one")
        return patch_module(module, backend)

    monkeypatch.setattr(flux, "patch_module", fails_at_the_single_block)
    with pytest.raises(RuntimeError, match="cannot patch this one"):
        dcgen_kernels.patch(model, backend="reference")
    assert not dcgen_kernels.is_patched(model) and not any("forward" in vars(m) for m in model.modules())
    assert model.attn_processors == processors


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
    assert attn.processor._unsupported(attn, torch.randn(1, 3, 128), None, None) == "context parallelism is configured"
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
    with pytest.raises(TypeError, match=r"backend must be one of .* \(a str\), got int 3"):
        dcgen_kernels.patch(tiny_flux(), backend=3)


def test_patched_model_compiles_without_graph_breaks_and_matches():
    model = tiny_flux()
    inputs = tiny_flux_inputs()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert rel_l2(run(compiled, inputs), expected) < 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_patched_model_gradients_match_stock(checkpointing):
    assert_patch_keeps_gradients(tiny_flux(), tiny_flux_inputs(), checkpointing)


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
    assert torch.equal(_joined(base[:, 3:], base[:, :3]), torch.cat([base[:, 3:], base[:, :3]], dim=1))  # swapped
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


def test_patched_quantized_model_is_freed_by_the_garbage_collector():
    """With FP8 layers, kept originals (held off the module tree) and CUDA graphs requested."""
    inputs = tiny_flux_inputs()
    assert_freed_once_dropped(dcgen_kernels.patch(tiny_flux(), backend="reference", quant="fp8", keep_original=True,
                                                  cuda_graph=True), lambda model: run(model, inputs))


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


@pytest.mark.parametrize("layer,gates", [
    ("single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.norm"),
    ("transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1_context")])
def test_fp16_fp8_blocks_clip_to_the_fp16_range(layer, gates):
    """The same with FP8 linears, whose epilogue adds the gated residual in fp32: the gates are scaled too, so that
    the sum overflows. Finite, but not stock's values: stock's fp16 product overflows to inf before the gate and
    saturates elements the fp32 epilogue does not."""
    model, inputs = tiny_flux(dtype=torch.float16), tiny_flux_inputs(dtype=torch.float16)
    with torch.no_grad():
        model.get_submodule(layer).weight.mul_(1e5)
        model.get_submodule(gates).linear.weight.mul_(100)
    expected, got = _quantized_stock_and_patched(model, inputs)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()


@pytest.mark.parametrize("norm_class", ["AdaLayerNormZero", "AdaLayerNormZeroSingle"])
def test_ada_zero_norms_promote_to_the_modulation_dtype_as_stock(norm_class):
    """Under autocast the adaLN linear gives bf16 scale / shift for a float32 input; stock's result is float32 with
    `1 + scale` rounded in bf16: the patched norm computes exactly that."""
    from diffusers.models import normalization

    norm = getattr(normalization, norm_class)(32).eval()
    x, emb = torch.randn(2, 7, 32), torch.randn(2, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = norm(x, emb=emb)
        dcgen_kernels.patch(norm, backend="reference")
        got = norm(x, emb=emb)
    assert got[0].dtype == expected[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def _one_prompt_two_images():
    """FluxPipeline hands given prompt_embeds over unrepeated for num_images_per_prompt > 1: text batch 1, image
    batch 2, which stock broadcasts in the first block."""
    inputs = tiny_flux_inputs()
    inputs.update(hidden_states=torch.randn(2, *inputs["hidden_states"].shape[1:]),
                  pooled_projections=torch.randn(2, 16), timestep=torch.tensor([0.5, 0.25]))
    return inputs


# triton: the attention takes 16 bits (fp32 falls back, warned); the adaLN and residual kernels run
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.allow_fallback)])
def test_one_prompt_for_a_batch_of_images_broadcasts_as_stock(backend):
    model, inputs = tiny_flux(), _one_prompt_two_images()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend=backend)  # it raised on the modulation's batch
    assert expected.shape[0] == 2 and rel_l2(run(model, inputs), expected) < 1e-5
    norm = model.transformer_blocks[0].norm1_context
    x = torch.randn(1, 7, norm.linear.in_features)
    emb = torch.randn(2, norm.linear.in_features)
    got, want = norm(x, emb=emb), type(norm).forward(norm, x, emb=emb)  # a patched norm called alone
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_one_prompt_for_a_batch_of_images_in_fp8_blocks():
    expected, got = _quantized_stock_and_patched(tiny_flux(), _one_prompt_two_images())
    assert expected.shape[0] == 2 and rel_l2(got, expected) < 1e-5


def test_text_given_to_an_attention_without_text_projections_gets_diffusers_error():
    attn = tiny_flux().single_transformer_blocks[0].attn
    hidden, text = torch.randn(1, 10, 128), torch.randn(1, 3, 128)
    with pytest.raises(AttributeError) as stock_error:
        attn(hidden, text)
    dcgen_kernels.patch(attn, backend="reference")
    dcgen_kernels._backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="without added KV projections"), \
            pytest.raises(AttributeError, match=str(stock_error.value)):
        attn(hidden, text)


def _layer_norm_q(attn):
    attn.norm_q = torch.nn.LayerNorm(attn.head_dim, eps=1e-6)


def _other_eps_k(attn):
    attn.norm_k.eps = 1.0


@pytest.mark.parametrize("change,reason", [(_layer_norm_q, "its q/k norms are not torch.nn.RMSNorm"),
                                           (_other_eps_k, "its q/k norms use different eps")],
                         ids=["layer_norm_q", "other_eps_k"])
def test_attention_with_norms_the_fused_op_does_not_compute_is_skipped(change, reason):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    change(model.transformer_blocks[0].attn)
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    report = dcgen_kernels.patch_report(model)
    assert report.skipped == [("transformer_blocks.0.attn", "flux", reason)]
    assert "transformer_blocks.0.attn" not in [name for name, *_ in report.replaced]
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"
    assert rel_l2(run(model, inputs), expected) < 1e-5


def test_odd_head_dim_attention_is_skipped_and_named_in_the_error():
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxTransformerBlock

    block = FluxTransformerBlock(dim=30, num_attention_heads=2, attention_head_dim=15).eval()
    hidden, text, temb = torch.randn(1, 6, 30), torch.randn(1, 3, 30), torch.randn(1, 30)
    with torch.no_grad():
        expected = block(hidden, text, temb)
        dcgen_kernels.patch(block, backend="reference")
        got = block(hidden, text, temb)
    odd = "odd head_dim 15 (RoPE rotates pairs)"
    assert dcgen_kernels.patch_report(block).skipped == [("attn", "flux", odd)]
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(got, expected))
    with pytest.raises(ValueError, match=r"no supported module in FluxAttention \(skipped: FluxAttention \(the "
                                         r"model\): odd head_dim 15"):
        dcgen_kernels.patch(FluxAttention(query_dim=30, heads=2, dim_head=15, added_kv_proj_dim=30, out_dim=30))


def test_training_blocks_apply_the_feed_forward_dropout_as_stock():
    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.train()
    for ff in (model.transformer_blocks[0].ff, model.transformer_blocks[0].ff_context):
        ff.net[1].p = 0.5
    torch.manual_seed(0)
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    torch.manual_seed(0)
    assert rel_l2(run(model, inputs), expected) < 1e-5


def test_blocks_with_an_erf_gelu_run_it_as_stock():
    """The fused GELU is the tanh form FLUX builds; a block given the erf form computes that one."""
    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.transformer_blocks[0].ff.net[0].approximate = "none"
    model.single_transformer_blocks[0].act_mlp = torch.nn.GELU()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert rel_l2(run(model, inputs), expected) < 1e-6
    # the check above can fail: the tanh form (checked per call, so fused again) moves this output by ~9e-6
    model.single_transformer_blocks[0].act_mlp.approximate = "tanh"
    model.transformer_blocks[0].ff.net[0].approximate = "tanh"
    assert rel_l2(run(model, inputs), expected) > 4e-6


def test_subclasses_keep_their_own_forward():
    """A FLUX block or adaLN norm subclass with its own forward is skipped (replacing it would drop that code), as in
    the SANA family; a subclass without one is replaced like its class."""
    from diffusers.models.normalization import AdaLayerNormZeroSingle
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    def halving(cls):
        def forward(self, *args, **kwargs):
            out = cls.forward(self, *args, **kwargs)
            return tuple(t / 2 for t in out) if isinstance(out, tuple) else out / 2
        return type(f"Halving{cls.__name__}", (cls,), {"forward": forward})

    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.transformer_blocks[0].__class__ = halving(FluxTransformerBlock)
    model.single_transformer_blocks[0].norm.__class__ = halving(AdaLayerNormZeroSingle)
    model.single_transformer_blocks[0].__class__ = type("PlainSubclass", (FluxSingleTransformerBlock,), {})
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    report = dcgen_kernels.patch_report(model)
    assert sorted(report.skipped) == [
        ("single_transformer_blocks.0.norm", "flux", "HalvingAdaLayerNormZeroSingle overrides "
                                                     "AdaLayerNormZeroSingle.forward"),
        ("transformer_blocks.0", "flux", "HalvingFluxTransformerBlock overrides FluxTransformerBlock.forward")]
    assert ("single_transformer_blocks.0", "flux", "PlainSubclass") in report.replaced
    assert rel_l2(run(model, inputs), expected) < 1e-5


def _affine_layer_norm() -> torch.nn.LayerNorm:
    norm = torch.nn.LayerNorm(128, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize("where,skipped", [
    ("transformer_blocks.0.norm2", ("transformer_blocks.0", "norm2 is not a LayerNorm without affine")),
    ("transformer_blocks.0.norm1.norm", ("transformer_blocks.0.norm1", "its LayerNorm has an affine weight"))])
def test_layer_norms_with_affine_weights_are_skipped_and_stay_stock(where, skipped):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    parent, _, child = where.rpartition(".")
    setattr(model.get_submodule(parent), child, _affine_layer_norm())
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    report = dcgen_kernels.patch_report(model)
    assert report.skipped == [(skipped[0], "flux", skipped[1])]
    assert skipped[0] not in [name for name, *_ in report.replaced]
    assert rel_l2(run(model, inputs), expected) < 1e-5


def test_report_names_a_skipped_root_module_as_the_model():
    block = tiny_flux().transformer_blocks[0]
    block.norm2 = _affine_layer_norm()
    dcgen_kernels.patch(block, backend="reference")
    assert "skipped FluxTransformerBlock (the model): norm2 is not a LayerNorm without affine" in \
        str(dcgen_kernels.patch_report(block))


def test_continuous_norm_applies_its_affine_weights():
    from diffusers.models.normalization import AdaLayerNormContinuous

    norm = AdaLayerNormContinuous(32, 16, elementwise_affine=True, eps=1e-6).eval()
    with torch.no_grad():
        norm.norm.weight.uniform_(0.5, 1.5)
        norm.norm.bias.normal_()
    x, condition = torch.randn(2, 7, 32), torch.randn(2, 16)
    with torch.no_grad():
        expected = norm(x, condition)
        dcgen_kernels.patch(norm, backend="reference")
        assert dcgen_kernels.patch_report(norm).replaced == [("", "flux", "AdaLayerNormContinuous")]
        assert rel_l2(norm(x, condition), expected) < 1e-5


def _quantized_stock_and_patched(model, inputs):
    """(diffusers' blocks around FP8 linears, patch(quant="fp8")'s fused blocks) on the same layers."""
    dcgen_kernels.quantize(model, quant="fp8", backend="reference", keep_original=True)
    expected = run(model, inputs)
    dcgen_kernels.patch(model, quant="fp8", backend="reference", keep_original=True)
    return expected, run(model, inputs)


def test_fp8_blocks_hand_16_bit_activations_to_a_users_processor():
    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.transformer_blocks[0].attn.set_processor(_ImagePromptProcessor())  # reads hidden_states itself
    expected, got = _quantized_stock_and_patched(model, inputs)
    assert rel_l2(got, expected) < 1e-5


def test_fp8_blocks_apply_an_affine_ada_norm():
    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.transformer_blocks[0].norm1.norm = _affine_layer_norm()
    expected, got = _quantized_stock_and_patched(model, inputs)
    assert rel_l2(got, expected) < 1e-5


def test_fp8_blocks_do_not_ignore_an_ada_norm_with_its_own_embedding():
    """An AdaLayerNormZero with its own timestep embedding cannot run inside a FLUX block (it has no timestep):
    the patched FP8 block fails as stock does rather than skip the embedding."""
    from diffusers.models.normalization import AdaLayerNormZero

    model, inputs = tiny_flux(), tiny_flux_inputs()
    model.transformer_blocks[0].norm1 = AdaLayerNormZero(128, num_embeddings=10)
    dcgen_kernels.quantize(model, quant="fp8", backend="reference", keep_original=True)
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'shape'"):
        run(model, inputs)
    dcgen_kernels.patch(model, quant="fp8", backend="reference", keep_original=True)
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'shape'"):
        run(model, inputs)


@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.0"])
def test_blocks_given_a_temb_of_another_dtype_run_stock_code(block, monkeypatch):
    """Under autocast the time embedding is bf16 while a caller's hidden states may be float32: stock's ops promote,
    and the patched blocks run stock's code."""
    model = tiny_flux()
    hidden, text, temb = torch.randn(1, 10, 128), torch.randn(1, 3, 128), torch.randn(1, 128, dtype=torch.bfloat16)
    block = model.get_submodule(block)
    stock_forward, stock_calls = type(block).forward, []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(hidden, text, temb)
        dcgen_kernels.patch(model, backend="reference")
        monkeypatch.setattr(type(block), "forward", lambda *args: (stock_calls.append(1), stock_forward(*args))[1])
        got = block(hidden, text, temb)
    assert stock_calls == [1]
    assert all(a.dtype == b.dtype and rel_l2(a, b) < TOLERANCE[torch.bfloat16] for a, b in zip(got, expected))


def _batch_2_timesteps(model):
    inputs = tiny_flux_inputs()
    return model(**{**inputs, "timestep": torch.tensor([0.5, 0.7]), "pooled_projections": torch.randn(2, 16)})


# Calls whose arithmetic stock promotes or broadcasts (a stream or the modulation in another dtype or batch):
# patched modules must run them as stock does, not raise.
_STOCK_ARITHMETIC_CALLS = {
    "block: bf16 text stream in an fp32 model": lambda m, h, t, e, rope: m.transformer_blocks[0](
        h[:1], t[:1].bfloat16(), e[:1], rope),
    "block: image b1, text and temb b2": lambda m, h, t, e, rope: m.transformer_blocks[0](h[:1], t, e, rope),
    "block: image and text b1, temb b2": lambda m, h, t, e, rope: m.transformer_blocks[0](h[:1], t[:1], e, rope),
    "single block: image and text b1, temb b2": lambda m, h, t, e, rope: m.single_transformer_blocks[0](
        h[:1], t[:1], e, rope),
    "norm_out: x b1, conditioning b2": lambda m, h, t, e, rope: m.norm_out(h[:1], e),
    "model: one latent, two timesteps": lambda m, h, t, e, rope: _batch_2_timesteps(m),
    "model: unbatched packed latent": lambda m, h, t, e, rope: m(**{**tiny_flux_inputs(),
                                                                    "hidden_states": torch.randn(64, 16)}),
}


@pytest.mark.parametrize("call", list(_STOCK_ARITHMETIC_CALLS))
def test_calls_stock_promotes_or_broadcasts_give_stock_results(call):
    model = tiny_flux()
    hidden, text, temb, rope = torch.randn(2, 64, 128), torch.randn(2, 7, 128), torch.randn(2, 128), rope_tables(71, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = _STOCK_ARITHMETIC_CALLS[call](model, hidden, text, temb, rope)
        dcgen_kernels.patch(model, backend="reference")
        torch.manual_seed(1)
        got = _STOCK_ARITHMETIC_CALLS[call](model, hidden, text, temb, rope)
    expected, got = (expected, got) if isinstance(expected, tuple) else ((expected,), (got,))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and rel_l2(g, e) < 1e-6


def test_float64_rotary_tables_run_diffusers_processor():
    model = tiny_flux()
    hidden, text, temb = torch.randn(1, 64, 128), torch.randn(1, 7, 128), torch.randn(1, 128)
    rope = tuple(t.double() for t in rope_tables(71, 64))  # stock's RoPE then computes in float64
    with torch.no_grad():
        expected = model.transformer_blocks[0](hidden, text, temb, rope)
        dcgen_kernels.patch(model, backend="reference")
        with pytest.warns(RuntimeWarning, match="its rotary tables are torch.float64"):
            got = model.transformer_blocks[0](hidden, text, temb, rope)
    assert all(rel_l2(g, e) < 1e-6 for g, e in zip(got, expected))
