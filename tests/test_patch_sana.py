import warnings

import pytest
import torch

import dcgen_kernels
from tests.helpers import (TOLERANCE, add_lora, assert_freed_once_dropped, assert_patch_keeps_gradients,
                           assert_patched_modules_return_stock_dtypes, rel_l2, tiny_dcae, tiny_sana, tiny_sana_inputs)


def run_sana(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def decode(model, latent):
    with torch.no_grad():
        return model.decode(latent).sample


def to_dtype(inputs, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "encoder_attention_mask"
                else v) for k, v in inputs.items()}


def test_sana_patched_reference_equals_stock():
    model, inputs = tiny_sana(), tiny_sana_inputs()
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert rel_l2(run_sana(model, inputs), expected) < 1e-5


def test_sana_cross_attention_keeps_rescale_output_factor():
    model, inputs = tiny_sana(), tiny_sana_inputs()
    for block in model.transformer_blocks:
        block.attn2.rescale_output_factor = 2.0  # a config value stock divides the output by
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert rel_l2(run_sana(model, inputs), expected) < 1e-5


def test_sana_and_dcae_patched_under_autocast_match_stock():
    # fp32 weights under bf16 autocast: projections give bf16, the fp32-weight qk RMSNorms fp32 (SANA 1.5's
    # qk_norm), DC-AE's convs bf16 next to an fp32 residual. Stock promotes; the patched forwards must too.
    # The fp32 gates (scale_shift_table) make the residual stream fp32 from the first block on, after the bf16 patch
    # embedding: the patched blocks return what stock's do.
    model, inputs, dcae = tiny_sana(qk_norm="rms_norm_across_heads"), tiny_sana_inputs(), tiny_dcae()
    latent = torch.randn(1, 8, 4, 4)
    block_dtypes = []
    for block in model.transformer_blocks:
        block.register_forward_hook(lambda module, args, out: block_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_image = run_sana(model, inputs), decode(dcae, latent)
        assert block_dtypes == [torch.float32, torch.float32]
        dcgen_kernels.patch(model, backend="reference")
        dcgen_kernels.patch(dcae, backend="reference")
        out = run_sana(model, inputs)
        assert block_dtypes[2:] == [torch.float32, torch.float32]
        dcgen_kernels._backend._warned.clear()
        with pytest.warns(RuntimeWarning, match="ResBlock runs diffusers' norm \\+ residual .* different dtypes"):
            image = decode(dcae, latent)  # the fused tail would round the fp32 result: stock's runs, said once
    assert out.dtype == expected.dtype and rel_l2(out, expected) < TOLERANCE[torch.bfloat16]
    assert image.dtype == expected_image.dtype and rel_l2(image, expected_image) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("model,quant", [("sana", None), ("sana", "fp8"), ("sana", "nvfp4"), ("dcae_decode", None),
                                         ("dcae_encode", None)])
def test_patched_modules_return_stock_dtypes_under_autocast(model, quant):
    calls = {"sana": (lambda: tiny_sana(qk_norm="rms_norm_across_heads"), lambda m: m(**tiny_sana_inputs())),
             "dcae_decode": (tiny_dcae, lambda m: m.decode(torch.randn(1, 8, 4, 4))),
             "dcae_encode": (tiny_dcae, lambda m: m.encode(torch.randn(1, 3, 16, 16)))}
    make, call = calls[model]
    fused_epilogues = ("ff.conv_point.linear",) if quant == "fp8" else ()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DC-AE's fallback for its mixed-dtype tail, tested above
        assert_patched_modules_return_stock_dtypes(make(), call, quant, fused_epilogues)


def test_sana_patched_triton_bf16_close_to_fp32_stock():
    model, inputs = tiny_sana(), tiny_sana_inputs()
    expected = run_sana(model, inputs)
    model = model.to(torch.bfloat16)
    bf16_inputs = to_dtype(inputs, torch.bfloat16)
    stock_error = rel_l2(run_sana(model, bf16_inputs), expected)
    dcgen_kernels.patch(model, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op must run its Triton kernel, not fall back
        patched_error = rel_l2(run_sana(model, bf16_inputs), expected)
    assert patched_error <= max(1.5 * stock_error, 2 * TOLERANCE[torch.bfloat16]), (patched_error, stock_error)


def test_sana_report_unpatch_and_state_dict():
    model = tiny_sana()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    dcgen_kernels.patch(model)
    dcgen_kernels.patch(model)  # idempotent
    report = dcgen_kernels.patch_report(model)
    kinds = sorted({cls for _, _, cls in report.replaced})
    assert kinds == ["GLUMBConv", "Linear", "PatchEmbed", "SanaAttnProcessor2_0", "SanaLinearAttnProcessor2_0",
                     "SanaModulatedNorm", "SanaTransformer2DModel", "SanaTransformerBlock"]
    # 2 blocks x (block, attn1, attn2, ff) + norm_out, and the latent I/O: model, patch_embed, proj_out
    assert len(report.replaced) == 12 and report.skipped == []
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    dcgen_kernels.unpatch(model)
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert not any("forward" in vars(m) for m in model.modules())


def test_sana_dc_gen_latent_channels():
    """DC-Gen-SANA runs on 128-channel f64c128 latents: same blocks, wider patch embedding."""
    model, inputs = tiny_sana(in_channels=32), tiny_sana_inputs(in_channels=32)
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert rel_l2(run_sana(model, inputs), expected) < 1e-5


def test_sana_patched_model_compiles_without_graph_breaks():
    model, inputs = tiny_sana(), tiny_sana_inputs()
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert rel_l2(run_sana(compiled, inputs), expected) < 1e-5


def test_sana_fallback_compiles_fullgraph_and_warns_while_traced(monkeypatch):
    """Dynamo cannot trace warnings.warn: a fallback (here a LoRA on the Mix-FFN's conv) warns at trace time."""
    from dcgen_kernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    model, inputs = add_lora(tiny_sana(), ["conv_inverted"]), tiny_sana_inputs()
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert rel_l2(run_sana(compiled, inputs), expected) < 1e-5
        run_sana(compiled, inputs)
    messages = [str(w.message) for w in caught if "conv_inverted is peft" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]


def test_patched_sana_and_dcae_run_on_the_meta_device():
    """Shape inference on meta tensors, as with stock diffusers (meta has no autocast state to ask)."""
    inputs = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in tiny_sana_inputs().items()}
    stock = run_sana(tiny_sana().to("meta"), inputs)
    patched = run_sana(dcgen_kernels.patch(tiny_sana(), backend="reference").to("meta"), inputs)
    assert patched.is_meta and patched.shape == stock.shape
    latent = torch.empty(1, 8, 5, 6, device="meta")
    stock = decode(tiny_dcae().to("meta"), latent)
    patched = decode(dcgen_kernels.patch(tiny_dcae(), backend="reference").to("meta"), latent)
    assert patched.is_meta and patched.shape == stock.shape


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sana_gradients_match_stock(checkpointing):
    assert_patch_keeps_gradients(tiny_sana(), tiny_sana_inputs(), checkpointing)


def test_dcae_decode_patched_reference_equals_stock():
    model = tiny_dcae()
    latent = torch.randn(1, 8, 5, 6)  # 30 tokens > head_dim 8: the multiscale attention's linear branch
    expected = decode(model, latent)
    dcgen_kernels.patch(model, backend="reference")
    report = dcgen_kernels.patch_report(model)
    kinds = sorted({cls for _, _, cls in report.replaced})
    assert kinds == ["GLUMBConv", "ResBlock", "SanaMultiscaleAttnProcessor2_0"]
    assert rel_l2(decode(model, latent), expected) < 1e-5


def test_dcae_decode_patched_triton_bf16_close_to_fp32_stock():
    model = tiny_dcae()
    latent = torch.randn(1, 8, 5, 6)
    expected = decode(model, latent)
    model = model.to(torch.bfloat16)
    stock_error = rel_l2(decode(model, latent.bfloat16()), expected)
    dcgen_kernels.patch(model, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched_error = rel_l2(decode(model, latent.bfloat16()), expected)
    assert patched_error <= max(1.5 * stock_error, 2 * TOLERANCE[torch.bfloat16]), (patched_error, stock_error)


# The DC-Gen LoRA stage adapts SANA's Mix-FFN 1x1 convs (dcgen.lora_target_modules); DC-AE's GLUMBConv is the same
# module. The fused Mix-FFN reads the conv weights, so an unmerged adapter must send it back to diffusers' code.
_MIX_FFN_CASES = {
    "sana": (tiny_sana, tiny_sana_inputs, run_sana, "SANA's Mix-FFN \\(GLUMBConv\\)"),
    "dcae": (tiny_dcae, lambda: torch.randn(1, 8, 5, 6), decode, "GLUMBConv"),
}


@pytest.mark.parametrize("family", sorted(_MIX_FFN_CASES))
@pytest.mark.parametrize("adapters_first", [True, False])
@pytest.mark.parametrize("target", ["conv_inverted", "conv_point"])
def test_lora_adapters_on_the_mix_ffn_convs_are_applied(family, adapters_first, target):
    make, make_inputs, run, where = _MIX_FFN_CASES[family]
    model, inputs = make(), make_inputs()
    without_adapter = run(model, inputs)
    if adapters_first:
        expected = run(add_lora(model, [target]), inputs)
        dcgen_kernels.patch(model, backend="reference")
    else:
        dcgen_kernels.patch(model, backend="reference")
        add_lora(model, [target])  # peft wraps the convs of the patched model
    dcgen_kernels._backend._warned.clear()
    with pytest.warns(RuntimeWarning, match=f"{where} runs diffusers' code because {target} is peft"):
        got = run(model, inputs)
    if not adapters_first:
        expected = run(dcgen_kernels.unpatch(model), inputs)
    assert rel_l2(expected, without_adapter) > 1e-3  # the adapter changes the output: the check below can fail
    assert rel_l2(got, expected) < 1e-5


@pytest.mark.parametrize("family", sorted(_MIX_FFN_CASES))
def test_patched_model_survives_torch_save_load(family):
    import io

    make, make_inputs, run, _ = _MIX_FFN_CASES[family]
    model, inputs = make(), make_inputs()
    dcgen_kernels.patch(model, backend="reference")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(vars(m)["forward"].args[0] is m for m in loaded.modules() if "forward" in vars(m))
    assert torch.equal(run(loaded, inputs), run(model, inputs))


@pytest.mark.parametrize("family", sorted(_MIX_FFN_CASES))
def test_patched_model_is_freed_by_the_garbage_collector(family):
    make, make_inputs, run, _ = _MIX_FFN_CASES[family]
    inputs = make_inputs()
    assert_freed_once_dropped(dcgen_kernels.patch(make(), backend="reference", cuda_graph=family == "sana"),
                              lambda model: run(model, inputs))


@pytest.mark.gpu
def test_sana_and_dcae_patched_on_gpu():
    model, inputs = tiny_sana(device="cuda"), tiny_sana_inputs(device="cuda")
    expected = run_sana(model, inputs)
    model = model.to(torch.bfloat16)
    dcgen_kernels.patch(model)
    assert rel_l2(run_sana(model, to_dtype(inputs, torch.bfloat16)), expected) <= 2 * TOLERANCE[torch.bfloat16]
    vae, latent = tiny_dcae(device="cuda"), torch.randn(1, 8, 16, 16, device="cuda")
    expected = decode(vae, latent)
    vae = vae.to(torch.bfloat16)
    dcgen_kernels.patch(vae)
    assert rel_l2(decode(vae, latent.bfloat16()), expected) <= 2 * TOLERANCE[torch.bfloat16]


def test_sana_cross_attention_skips_the_division_by_one():
    """`x / 1.0` is exact but one more pass over the activations on a GPU (~1 ms of a SANA 4K step): skipped."""
    from torch.overrides import TorchFunctionMode

    class Divisors(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide):
                self.seen.append(args[1])
            return func(*args, **(kwargs or {}))

    model = tiny_sana()
    dcgen_kernels.patch(model, backend="reference")
    attn = model.transformer_blocks[0].attn2
    hidden, text = torch.randn(2, 42, attn.query_dim), torch.randn(2, 5, attn.cross_attention_dim)
    with torch.no_grad():
        expected = attn.processor.original(attn, hidden, text)
        with Divisors() as divisors:
            out = attn(hidden, encoder_hidden_states=text)
    assert attn.rescale_output_factor == 1.0 and 1.0 not in divisors.seen, divisors.seen
    assert rel_l2(out, expected) < 1e-6


def _counting_norm1(monkeypatch):
    from dcgen_kernels.patching import sana

    calls = []
    norm1 = sana._norm1
    monkeypatch.setattr(sana, "_norm1", lambda *a: calls.append(1) or norm1(*a))
    return calls


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "reference"), (torch.bfloat16, "triton")])
def test_sana_blocks_hand_norm1_to_their_successor(monkeypatch, dtype, backend):
    """In inference each block computes its successor's norm1 with its Mix-FFN residual in one pass: only the first
    block normalises its own input, and the output is bit-equal to the blocks run apart (the fused op rounds
    exactly as the two ops, in the interpreter and in the reference). The hand-over's bookkeeping (unpatch,
    re-patch, grad and inference modes) does not depend on the backend: checked on the reference only (each bf16
    run in the interpreter takes ~5 s)."""
    from dcgen_kernels.patching import sana

    calls = _counting_norm1(monkeypatch)
    model, inputs = tiny_sana(dtype=dtype), tiny_sana_inputs(dtype=dtype)
    dcgen_kernels.patch(model, backend=backend)
    handed = run_sana(model, inputs)
    assert len(calls) == 1
    sana._unlink_blocks(model.transformer_blocks)
    apart = run_sana(model, inputs)
    assert len(calls) == 1 + len(model.transformer_blocks) and torch.equal(handed, apart)
    if backend != "reference":
        return
    dcgen_kernels.unpatch(model)
    assert not any(sana._SUCCESSOR_ATTR in vars(block) for block in model.transformer_blocks)
    dcgen_kernels.patch(model, backend=backend)  # re-patching links the blocks again
    assert torch.equal(run_sana(model, inputs), handed) and len(calls) == 2 + len(model.transformer_blocks)
    model(**inputs)  # grad mode on: every block normalises its own input
    assert len(calls) == 2 + 2 * len(model.transformer_blocks)
    with torch.inference_mode():  # no version counters to check the hand-over against: none
        assert torch.equal(model(**inputs)[0], handed) and len(calls) == 2 + 3 * len(model.transformer_blocks)


def test_sana_successor_normalises_a_changed_input_itself(monkeypatch):
    """The handed-over rows are used only on the very tensor (and version) and timestep they were made from, and
    while the successor's modulation table is the one they were made with (a hook or a weight load in between may
    change or replace it)."""
    model = tiny_sana()
    dcgen_kernels.patch(model, backend="reference")
    calls = _counting_norm1(monkeypatch)
    first, second = model.transformer_blocks
    stock = type(second).forward  # diffusers' block forward, for the expected output
    tokens, step = torch.randn(2, 42, 64), torch.randn(2, 6 * 64)
    args = dict(encoder_hidden_states=torch.randn(2, 5, 64), height=6, width=7)
    same = lambda t: t  # noqa: E731

    def new_table(block):
        block.scale_shift_table = torch.nn.Parameter(block.scale_shift_table + 0.5)

    cases = [(same, step, 0, same), (lambda t: t.clone(), step, 1, same), (lambda t: t.add_(0.5), step, 1, same),
             (same, step + 1, 1, same), (same, step, 1, lambda block: block.scale_shift_table.add_(0.5)),
             (same, step, 1, new_table)]
    with torch.no_grad():
        for change, second_step, own_norm1, change_table in cases:
            x = change(first(tokens, timestep=step, **args))
            change_table(second)
            calls.clear()
            got = second(x, timestep=second_step, **args)
            assert len(calls) == own_norm1
            assert rel_l2(got, stock(second, x, timestep=second_step, **args)) < 1e-5


def test_forward_stopped_between_blocks_leaves_a_picklable_model():
    """A block called alone (or a forward interrupted after it) leaves its hand-over unused: off the module state,
    so torch.save and deepcopy still work and the successor's next call normalises its input itself."""
    import copy
    import io

    model = dcgen_kernels.patch(tiny_sana(), backend="reference")
    first, second = model.transformer_blocks
    args = dict(encoder_hidden_states=torch.randn(2, 5, 64), timestep=torch.randn(2, 6 * 64), height=6, width=7)
    with torch.no_grad():
        first(torch.randn(2, 42, 64), **args)
    torch.save(model, io.BytesIO())
    copy.deepcopy(model)
    x = torch.randn(2, 42, 64)
    with torch.no_grad():
        assert rel_l2(second(x, **args), type(second).forward(second, x, **args)) < 1e-5


def test_processors_give_diffusers_their_own_call_signature(monkeypatch):
    """diffusers' attention modules filter keyword arguments by inspect.signature(processor.__call__) on every call;
    the signature the processors store is their method's own parameters (self dropped), so that filtering and its
    warning about unexpected arguments are unchanged."""
    import inspect

    from diffusers.models import attention_processor

    from dcgen_kernels.patching.flux import DCGenFluxAttnProcessor
    from dcgen_kernels.patching.sana import (DCGenSanaCrossAttnProcessor, DCGenSanaLinearAttnProcessor,
                                             DCGenSanaMultiscaleAttnProcessor)

    for cls in (DCGenSanaLinearAttnProcessor, DCGenSanaCrossAttnProcessor, DCGenSanaMultiscaleAttnProcessor,
                DCGenFluxAttnProcessor):
        code = inspect.unwrap(cls.__call__).__code__
        assert list(inspect.signature(cls.__new__(cls).__call__).parameters) == \
            list(code.co_varnames[1:code.co_argcount]), cls
    model = tiny_sana()
    x = torch.randn(1, 2 * 8, model.config.num_attention_heads * model.config.attention_head_dim)
    dcgen_kernels.patch(model)
    attn = model.transformer_blocks[0].attn1
    warned = []
    monkeypatch.setattr(attention_processor.logger, "warning", warned.append)
    out = attn(x, scale=2.0)  # not a parameter of the processor: diffusers warns and drops it
    assert len(warned) == 1 and "['scale'] are not expected by DCGenSanaLinearAttnProcessor" in warned[0]
    assert torch.equal(out, attn(x))


def test_float64_models_run_diffusers_code():
    """The fused ops take fp32/bf16/fp16: a float64 model runs stock code (said per module kind), never an error."""
    model = tiny_sana().double()
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() and k != "encoder_attention_mask" else v
              for k, v in tiny_sana_inputs().items()}
    dcae, latent = tiny_dcae().double(), torch.randn(1, 8, 5, 6, dtype=torch.float64)
    expected, expected_image = run_sana(model, inputs), decode(dcae, latent)
    dcgen_kernels.patch(model)
    dcgen_kernels.patch(dcae)
    dcgen_kernels._backend._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, image = run_sana(model, inputs), decode(dcae, latent)
    said = [str(w.message) for w in caught]
    for kind in ("SanaLinearAttnProcessor2_0", "SanaTransformerBlock", "ResBlock"):
        assert f"dcgen_kernels: {kind} runs diffusers' code because its input is float64 (the fused ops take " \
               "float32, bfloat16 and float16)" in said, said
    assert out.dtype == torch.float64 and rel_l2(out, expected) < 1e-12
    assert image.dtype == torch.float64 and rel_l2(image, expected_image) < 1e-12



def test_fp16_self_attention_clips_to_the_fp16_range_as_diffusers():
    """SanaLinearAttnProcessor2_0 clips its fp16 output to +-65504: an output projection scaled to overflow must give
    stock's finite output."""
    model, inputs = tiny_sana(dtype=torch.float16), tiny_sana_inputs(dtype=torch.float16)
    with torch.no_grad():
        model.transformer_blocks[0].attn1.to_out[0].weight.mul_(1e5)  # outputs up to ~5e4
        model.transformer_blocks[0].attn1.to_out[0].bias.fill_(6e4)
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    got = run_sana(model, inputs)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    assert rel_l2(got.float(), expected.float()) < 5e-3


def _affine_layer_norm(channels: int) -> torch.nn.LayerNorm:
    norm = torch.nn.LayerNorm(channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


def _affine_norm1(block):
    block.norm1 = _affine_layer_norm(64)


def _mix_ffn_residual(block):
    block.ff.residual_connection = True


@pytest.mark.parametrize("change,reason", [
    (_affine_norm1, "norm1 is not a LayerNorm without affine"),
    (_mix_ffn_residual, "its GLUMBConv has a norm or residual (SANA blocks have neither)")],
    ids=["affine_norm1", "mix_ffn_residual"])
def test_sana_blocks_the_fused_forward_does_not_compute_are_skipped(change, reason):
    model, inputs = tiny_sana(), tiny_sana_inputs()
    change(model.transformer_blocks[0])
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    report = dcgen_kernels.patch_report(model)
    assert report.skipped == [("transformer_blocks.0", "sana", reason)]
    assert "transformer_blocks.0" not in [name for name, *_ in report.replaced]
    assert rel_l2(run_sana(model, inputs), expected) < 1e-5


def test_cross_attention_output_of_a_wider_dtype_promotes_the_residual_as_stock():
    """A hook that returns the cross-attention's output in float32 from a bf16 model: stock's add promotes the
    residual stream to float32, and so do the patched blocks."""
    model, inputs = tiny_sana(dtype=torch.bfloat16), to_dtype(tiny_sana_inputs(), torch.bfloat16)
    model.transformer_blocks[0].attn2.register_forward_hook(lambda module, args, out: out.float())
    block_dtypes = []
    model.transformer_blocks[0].register_forward_hook(lambda module, args, out: block_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stock's Mix-FFN convs then take the float32 norm
        expected = run_sana(model, inputs)
        dcgen_kernels.patch(model, backend="reference")
        got = run_sana(model, inputs)
    assert block_dtypes == [torch.float32, torch.float32]
    assert got.dtype == expected.dtype and rel_l2(got, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("norm_type", ["rms_norm", "batch_norm"])  # batch_norm: diffusers' default, NCHW
@pytest.mark.parametrize("residual_connection", [False, True])
def test_multiscale_attention_with_and_without_its_residual_matches_stock(residual_connection, norm_type):
    from diffusers.models.attention_processor import SanaMultiscaleLinearAttention

    attn = SanaMultiscaleLinearAttention(16, 16, attention_head_dim=8, norm_type=norm_type, kernel_sizes=(5,),
                                         residual_connection=residual_connection).eval()
    if norm_type == "batch_norm":  # running statistics away from (0, 1), so that the norm's layout matters
        attn.norm_out.running_mean.normal_()
        attn.norm_out.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        expected = attn(x)
        dcgen_kernels.patch(attn, backend="reference")
        assert rel_l2(attn(x), expected) < 1e-5


def _res_block(dtype=torch.float32):
    from diffusers.models.autoencoders.autoencoder_dc import ResBlock

    block = ResBlock(16, 16, norm_type="rms_norm", act_fn="silu").eval()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_()
    return block.to(dtype)


def test_res_block_with_a_residual_in_another_layout_runs_the_stock_tail():
    block = _res_block()
    x = torch.randn(2, 16, 7, 5).transpose(2, 3)  # the conv output is contiguous NCHW, the residual is not
    with torch.no_grad():
        expected = block(x)
        dcgen_kernels.patch(block, backend="triton")
        dcgen_kernels._backend._warned.clear()
        with pytest.warns(RuntimeWarning, match="ResBlock runs diffusers' norm \\+ residual because its conv output "
                                                "and residual are not both contiguous NCHW or both channels-last"):
            got = block(x)
    assert torch.equal(got, expected)


def test_res_block_with_float32_norm_weights_in_a_bf16_block_promotes_as_stock():
    block = _res_block(torch.bfloat16)
    block.norm.float()  # kept in float32, as diffusers' _keep_in_fp32_modules does
    x = torch.randn(2, 16, 5, 7, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = block(x)
        dcgen_kernels.patch(block, backend="reference")
        dcgen_kernels._backend._warned.clear()
        with pytest.warns(RuntimeWarning, match="different dtypes"):
            got = block(x)
    assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)


def test_res_block_with_another_norm_class_is_skipped():
    model = tiny_dcae()
    block = model.get_submodule("encoder.down_blocks.0.0")
    block.norm = torch.nn.RMSNorm(block.conv1.in_channels, eps=1e-5)
    x = torch.randn(1, block.conv1.in_channels, 6, 5)
    with torch.no_grad():
        expected = block(x)
        dcgen_kernels.patch(model, backend="reference")
        got = block(x)
    reason = "its norm is torch.nn.modules.normalization.RMSNorm, not diffusers' RMSNorm"
    assert ("encoder.down_blocks.0.0", "dcae", reason) in dcgen_kernels.patch_report(model).skipped
    assert torch.equal(got, expected)


def test_subclasses_keep_their_own_forward():
    """A SanaTransformerBlock / GLUMBConv / SanaModulatedNorm subclass with its own forward is skipped (replacing it
    would drop that code); a subclass without one is replaced like its class."""
    from diffusers.models.transformers.sana_transformer import GLUMBConv, SanaModulatedNorm, SanaTransformerBlock

    def halving(cls):
        return type(f"Halving{cls.__name__}", (cls,), {"forward": lambda self, *a, **k: cls.forward(self, *a, **k) / 2})

    model, inputs = tiny_sana(), tiny_sana_inputs()
    model.transformer_blocks[0].__class__ = halving(SanaTransformerBlock)
    model.transformer_blocks[1].ff.__class__ = halving(GLUMBConv)
    model.norm_out.__class__ = halving(SanaModulatedNorm)
    model.transformer_blocks[1].__class__ = type("PlainSubclass", (SanaTransformerBlock,), {})
    expected = run_sana(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    report = dcgen_kernels.patch_report(model)
    assert sorted(report.skipped) == [
        ("norm_out", "sana", "HalvingSanaModulatedNorm overrides SanaModulatedNorm.forward"),
        ("transformer_blocks.0", "sana", "HalvingSanaTransformerBlock overrides SanaTransformerBlock.forward"),
        ("transformer_blocks.1.ff", "sana", "HalvingGLUMBConv overrides GLUMBConv.forward")]
    assert ("transformer_blocks.1", "sana", "PlainSubclass") in report.replaced
    with pytest.warns(RuntimeWarning, match="HalvingGLUMBConv overrides GLUMBConv.forward"):  # block 1's Mix-FFN
        assert rel_l2(run_sana(model, inputs), expected) < 1e-5


_PADDING_BIAS = torch.tensor([[0.0, 0, 0, 0, 0], [0, 0, 0, -1e4, -1e4]])[:, None]  # (2, 1, 5): SANA's own form
# Cross-attention calls that are not SANA's key-padding form (diffusers' processor takes them, with its meaning):
# (image batch, caption batch, mask)
_OTHER_CROSS_ATTENTION_CALLS = {
    "2-D float mask": (2, 2, _PADDING_BIAS[:, 0]),
    "bool mask, a caption without kept tokens": (2, 2, torch.tensor([[True] * 5, [False] * 5])),
    "mask batch 2 for batch 1": (1, 1, _PADDING_BIAS),
    "caption batch 2 for image batch 1": (1, 2, _PADDING_BIAS),
    "caption batch 1 for image batch 2": (2, 1, None),
}


@pytest.mark.parametrize("call", list(_OTHER_CROSS_ATTENTION_CALLS))
def test_cross_attention_calls_in_other_forms_run_diffusers_processor(call):
    image_batch, caption_batch, mask = _OTHER_CROSS_ATTENTION_CALLS[call]
    model = tiny_sana()
    x, caption = torch.randn(image_batch, 42, 64), torch.randn(caption_batch, 5, 64)
    with torch.no_grad():
        expected = model.transformer_blocks[0].attn2(x, encoder_hidden_states=caption, attention_mask=mask)
        dcgen_kernels.patch(model, backend="reference")
        with pytest.warns(RuntimeWarning, match="SANA attention falls back to diffusers' processor"):
            got = model.transformer_blocks[0].attn2(x, encoder_hidden_states=caption, attention_mask=mask)
    assert got.shape == expected.shape and rel_l2(got, expected) < 1e-6


def test_linear_self_attention_given_encoder_hidden_states_runs_diffusers_processor():
    model = tiny_sana()
    x, context = torch.randn(2, 42, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = model.transformer_blocks[0].attn1(x, encoder_hidden_states=context)
        dcgen_kernels.patch(model, backend="reference")
        with pytest.warns(RuntimeWarning, match="linear attention was given encoder_hidden_states"):
            got = model.transformer_blocks[0].attn1(x, encoder_hidden_states=context)
    assert got.shape == expected.shape and rel_l2(got, expected) < 1e-6


def test_glumbconv_with_a_norm_type_stock_ignores_is_skipped():
    from diffusers.models.transformers.sana_transformer import GLUMBConv

    ff = GLUMBConv(16, 16, norm_type="layer_norm").eval()  # stock builds no norm for it, the fused forward neither
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        expected = ff(x)
        with pytest.raises(ValueError, match=r"no supported module in GLUMBConv \(skipped: GLUMBConv \(the model\): "
                                             r"norm_type 'layer_norm'\)"):
            dcgen_kernels.patch(ff, backend="reference")
        assert not dcgen_kernels.is_patched(ff) and torch.equal(ff(x), expected)


def test_norm_out_broadcasts_a_batch_1_input_as_stock():
    model = tiny_sana()
    hidden, temb = torch.randn(1, 42, 64), torch.randn(2, 64)
    with torch.no_grad():
        expected = model.norm_out(hidden, temb, model.scale_shift_table)
        dcgen_kernels.patch(model, backend="reference")
        got = model.norm_out(hidden, temb, model.scale_shift_table)
    assert got.shape == expected.shape == (2, 42, 64) and rel_l2(got, expected) < 1e-6


def test_blocks_built_without_cross_attention_are_skipped_not_a_crash():
    from diffusers import SanaTransformer2DModel

    # diffusers builds it (no norm2 / attn2), though its stock forward then fails on the missing attn2
    model = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32,
                                   num_layers=1, num_cross_attention_heads=None, cross_attention_head_dim=None,
                                   cross_attention_dim=None, caption_channels=24, sample_size=8)
    dcgen_kernels.patch(model, backend="reference")
    assert [name for name, _, _ in dcgen_kernels.patch_report(model).skipped] == ["transformer_blocks.0"]
