"""patch() on the latent I/O of FLUX and SANA: unpacked (B, C, h, w) latents through patch_embed / patch_unembed."""

import re
import warnings

import pytest
import torch

import dcgen_kernels
from dcgen_kernels.patching import latents
from dcgen_kernels.dcgen import latent_image_ids, pack_latents, unpack_latents
from tests.helpers import (RecordDcgenOps, add_lora, rel_l2, tiny_flux, tiny_flux_inputs, tiny_sana_inputs,
                           tiny_sana_patched_latents)

pytest.importorskip("diffusers")


def patch_latents_only(model, backend):
    """This family alone (the rest of the model stays stock)."""
    replaced = latents.patch_latent_io(model, backend)
    assert replaced and all(n in ("", "x_embedder", "patch_embed", "proj_out") for n in replaced), replaced
    return model


def flux_case(p, grid=4):
    """tiny FLUX (in_channels 16) with an unpacked latent of 16 / p**2 channels on a (grid*p)^2 map."""
    model = tiny_flux()
    inputs = tiny_flux_inputs(grid=grid)
    latent = torch.randn(1, 16 // (p * p), grid * p, grid * p)
    inputs["hidden_states"] = pack_latents(latent, p)
    return model, inputs, latent


def flux_forward(model, inputs, hidden_states):
    return model(**{**inputs, "hidden_states": hidden_states})[0]


# ----------------------------------------------------------------------------------------------- FLUX
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("p", [1, 2])
def test_flux_unpacked_latents_equal_stock_on_packed(p, backend):
    model, inputs, latent = flux_case(p)
    with torch.no_grad():
        expected = unpack_latents(flux_forward(model, inputs, inputs["hidden_states"]), *latent.shape[2:], p)
        patch_latents_only(model, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback: embedder and head run the requested backend
            got = flux_forward(model, inputs, latent)
    assert got.shape == latent.shape
    assert rel_l2(got, expected) < 1e-5


def test_flux_packed_input_keeps_stock_embedder_and_head():
    model, inputs, _ = flux_case(2)
    x = inputs["hidden_states"]
    hidden = torch.randn(1, x.shape[1], model.inner_dim)
    expected_in, expected_out = model.x_embedder(x), model.proj_out(hidden)
    dcgen_kernels.patch(model, backend="reference")
    assert torch.equal(model.x_embedder(x), expected_in) and torch.equal(model.proj_out(hidden), expected_out)
    assert flux_forward(model, inputs, x).shape == x.shape


def test_flux_unpacked_gradients_equal_stock():
    model, inputs, latent = flux_case(2)
    names = ["x_embedder.weight", "x_embedder.bias", "proj_out.weight", "proj_out.bias",
             "transformer_blocks.0.attn.to_q.weight"]
    params = dict(model.named_parameters())

    def grads(hidden_states, unpack):
        x = hidden_states.clone().requires_grad_()
        out = flux_forward(model, inputs, x)
        (unpack(out).square().mean()).backward()
        result = {n: params[n].grad.clone() for n in names}
        model.zero_grad()
        return result, x.grad

    expected, expected_x = grads(inputs["hidden_states"], lambda t: unpack_latents(t, 8, 8, 2))
    patch_latents_only(model, "triton")
    got, got_x = grads(latent, lambda t: t)
    for n in names:
        assert rel_l2(got[n], expected[n]) < 1e-4, n
    assert rel_l2(got_x, unpack_latents(expected_x, 8, 8, 2)) < 1e-4


def test_flux_bad_unpacked_input_raises_clear_error():
    model, inputs, latent = flux_case(2)
    dcgen_kernels.patch(model, backend="reference")
    with pytest.raises(ValueError, match=r"img_ids must have one row per image token: .* has 16 tokens"):
        flux_forward(model, {**inputs, "img_ids": latent_image_ids(8, 8, 1)}, latent)
    with pytest.raises(ValueError, match="hidden_states has 3 channels, but x_embedder takes 16 features"):
        flux_forward(model, inputs, latent[:, :3])
    with pytest.raises(ValueError, match="height and width must be multiples of patch_size 2, got 7x8"):
        flux_forward(model, inputs, latent[:, :, :7])
    assert dcgen_kernels.patch_report(model).backend == "reference"


def test_flux_report_idempotent_unpatch_and_state_dict():
    model, inputs, latent = flux_case(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dcgen_kernels.patch(model, backend="triton")
    dcgen_kernels.patch(model, backend="reference")  # idempotent: only the backend changes
    report = dcgen_kernels.patch_report(model)
    ours = {name: cls for name, family, cls in report.replaced if family == "latents"}
    assert ours == {"": "FluxTransformer2DModel", "x_embedder": "Linear", "proj_out": "Linear"}
    assert model.x_embedder._dcgen_latents["backend"] == "reference"
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    dcgen_kernels.unpatch(model)
    assert not any("forward" in vars(m) or "_dcgen_latents" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError):  # stock FLUX does not take unpacked latents: its Linear sees (B, C, h, w)
        flux_forward(model, inputs, latent)


def test_flux_embedder_under_autocast_and_fp64_fallback():
    """Under autocast the fused embedder casts like nn.Linear; fp64 (no fused kernel) takes the stock path."""
    from dcgen_kernels import _backend

    model, inputs, latent = flux_case(2)
    stock = torch.nn.Linear.forward
    patch_latents_only(model, "triton")
    _backend._warned.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused op takes the cast operands: no stock-path warning
        got, expected = model.x_embedder(latent), stock(model.x_embedder, inputs["hidden_states"])
    assert got.dtype == expected.dtype == torch.bfloat16 and rel_l2(got, expected) < 1e-2
    model = model.double()
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="runs the stock path for input dtype torch.float64"):
        got = model.x_embedder(latent.double())
    assert torch.equal(got, stock(model.x_embedder, inputs["hidden_states"].double()))


def flux_non_square_case(dtype=torch.float32, h=8, w=12, p=2):
    """tiny FLUX on an h x w latent (h != w) with its RoPE ids, model and inputs in `dtype`."""
    model = tiny_flux().to(dtype)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in tiny_flux_inputs(grid=1).items()}
    latent = torch.randn(1, 16 // (p * p), h, w, dtype=dtype)
    inputs["img_ids"] = latent_image_ids(h, w, p, dtype=dtype)
    return model, inputs, latent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp64: the stock path's unpack of the output
def test_flux_non_square_latent_and_a_packed_call_after_it(dtype):
    """An h x w latent comes back h x w (not w x h), on the fused path and on the stock fallback; the call's grid
    does not outlive it: a packed call afterwards gets stock's packed output."""
    model, inputs, latent = flux_non_square_case(dtype)
    packed = pack_latents(latent, 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp64: the stock path, warned once
        expected = flux_forward(model, inputs, packed)
        patch_latents_only(model, "reference")
        got = flux_forward(model, inputs, latent)
        assert got.shape == latent.shape and rel_l2(got, unpack_latents(expected, 8, 12, 2)) < 1e-5
        again = flux_forward(model, inputs, packed)
    assert again.shape == expected.shape and rel_l2(again, expected) < 1e-5


def test_patch_latent_io_alone_and_unpatch():
    model, inputs, latent = flux_case(2)
    assert latents.patch_latent_io(model, "reference") == ["", "x_embedder", "proj_out"]
    assert not dcgen_kernels.is_patched(model) and latents.takes_unpacked_latents(model)
    assert flux_forward(model, inputs, latent).shape == latent.shape
    latents.unpatch_latent_io(model)
    assert not any("forward" in vars(m) or "_dcgen_latents" in vars(m) for m in model.modules())


def test_unpatch_latent_io_under_cuda_graph_leaves_a_stock_graphed_forward():
    from dcgen_kernels.patching import cuda_graph

    model, inputs, latent = flux_case(2)
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    latents.unpatch_latent_io(model)
    wrapper = cuda_graph.graphed(model)
    assert wrapper is not None and not latents.takes_unpacked_latents(model)
    assert wrapper.forward.func is type(model).forward and wrapper.forward.args == (model,)  # not ours
    dcgen_kernels.unpatch(model)
    assert not any("forward" in vars(m) or "_dcgen_latents" in vars(m) for m in model.modules())


def test_flux_non_linear_embedder_is_skipped_with_reason():
    model, _, _ = flux_case(2)
    model.x_embedder = torch.nn.Sequential(model.x_embedder)
    report = dcgen_kernels.patch_report(dcgen_kernels.patch(model, backend="reference"))
    assert ("", "latents", "x_embedder is torch.nn.modules.container.Sequential, not a plain torch.nn.Linear") \
        in report.skipped


@pytest.mark.parametrize("return_dict", [False, True])
@pytest.mark.parametrize("target", ["x_embedder", "proj_out"])
def test_flux_adapter_added_after_patch_runs_stock_on_packed_latents(target, return_dict):
    # peft replaces the patched Linear by its LoRA layer: the model can no longer hand it the latent itself
    model, inputs, latent = flux_case(2)
    dcgen_kernels.patch(model, backend="reference")
    add_lora(model, [target])
    inputs["return_dict"] = return_dict
    dcgen_kernels._backend._warned.clear()
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=f"x_embedder / proj_out runs diffusers' code because {target} is "
                                                f"peft.tuners.lora.layer.Linear, not the module patch\\(\\) fused "
                                                f"\\(merging the adapters into the weights"):
            got = model(**{**inputs, "hidden_states": latent})
        got = got.sample if return_dict else got[0]
        expected = unpack_latents(flux_forward(dcgen_kernels.unpatch(model), {**inputs, "return_dict": False},
                                               inputs["hidden_states"]), *latent.shape[2:], 2)
    assert got.shape == latent.shape
    assert rel_l2(got, expected) < 1e-5


@pytest.mark.parametrize("target", ["x_embedder", "proj_out"])
def test_flux_adapter_added_before_patch_takes_unpacked_latents_until_merged(target):
    from dcgen_kernels.dcgen import merge_lora

    model, inputs, latent = flux_case(2)
    add_lora(model, [target])
    with torch.no_grad():
        expected = unpack_latents(flux_forward(model, inputs, inputs["hidden_states"]), *latent.shape[2:], 2)
    report = dcgen_kernels.patch_report(dcgen_kernels.patch(model, backend="reference"))
    merge_then_patch = (r"\(merge the adapters into the weights, e.g. with dcgen_kernels.dcgen.merge_lora, then "
                        r"dcgen_kernels.patch\(model\) again to fuse it\)")
    skipped = [(name, reason) for name, family, reason in report.skipped if family == "latents"]
    assert len(skipped) == 1 and skipped[0][0] == target
    assert re.fullmatch(f"{target} is peft.tuners.lora.layer.Linear, a peft adapter layer {merge_then_patch}",
                        skipped[0][1])
    dcgen_kernels._backend._warned.clear()
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=f"because {target} is peft.tuners.lora.layer.Linear, not the module "
                                                f"patch\\(\\) fused {merge_then_patch}"):
            got = flux_forward(model, inputs, latent)
    assert got.shape == latent.shape and rel_l2(got, expected) < 1e-5
    merge_lora(model)
    dcgen_kernels.patch(model, backend="reference")
    with torch.no_grad(), warnings.catch_warnings(), RecordDcgenOps() as recorded:
        warnings.simplefilter("error", RuntimeWarning)
        got = flux_forward(model, inputs, latent)
    assert {"patch_embed", "patch_unembed"} <= recorded.names and rel_l2(got, expected) < 1e-5


def test_flux_embedder_replaced_after_patch_by_no_linear_refuses_unpacked_latents():
    model, inputs, latent = flux_case(2)
    dcgen_kernels.patch(model, backend="reference")
    model.x_embedder = torch.nn.Sequential(model.x_embedder)
    with torch.no_grad():
        with pytest.raises(TypeError, match="unpacked .* latent, which needs FLUX's x_embedder and proj_out to be "
                                            "nn.Linear layers, but x_embedder is torch.nn.modules.container."
                                            "Sequential, not a plain torch.nn.Linear: pass packed tokens"):
            flux_forward(model, inputs, latent)
        flux_forward(model, inputs, inputs["hidden_states"])  # packed tokens still run


def test_flux_converted_after_patch_runs_stock_until_patched_again(monkeypatch):
    from dcgen_kernels import dcgen

    model, inputs, _ = flux_case(1)
    dcgen_kernels.patch(model, backend="reference")
    dcgen.convert(model, 32, patch_size=1)  # new x_embedder / proj_out modules
    latent = torch.randn(1, 32, 4, 4)
    dcgen_kernels._backend._warned.clear()
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="x_embedder is torch.nn.modules.linear.Linear, not the module "
                                                "patch\\(\\) fused \\(dcgen_kernels.patch\\(model\\) again"):
            expected = flux_forward(model, inputs, latent)
        dcgen_kernels.patch(model, backend="reference")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = flux_forward(model, inputs, latent)
    assert got.shape == latent.shape and rel_l2(got, expected) < 1e-5


# ----------------------------------------------------------------------------------------------- SANA
SANA_CASES = [(1, None, 6, 7), (2, None, 6, 10), (2, 1, 8, 8), (1, 1, 6, 4)]  # (p, interpolation_scale, h, w)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("p,scale,h,w", SANA_CASES)
def test_sana_patched_equals_stock(p, scale, h, w, backend):
    model = tiny_sana_patched_latents(patch_size=p, interpolation_scale=scale)
    inputs = tiny_sana_inputs(height=h, width=w)
    with torch.no_grad():
        expected = model(**inputs)[0]
        patch_latents_only(model, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = model(**inputs)[0]
    assert got.shape == expected.shape == inputs["hidden_states"].shape
    assert rel_l2(got, expected) < 1e-5


def test_sana_ragged_latent_and_bf16_pos_embed_equal_stock():
    """A latent not divisible by the patch size runs diffusers' own embedder (as stock: it crops), and in bf16 the
    added sin-cos position embedding keeps the tokens bf16 (an fp32 table would promote them)."""
    model = tiny_sana_patched_latents(patch_size=2)
    inputs = tiny_sana_inputs(height=6, width=9)
    with torch.no_grad():
        expected = model(**inputs)[0]
        patch_latents_only(model, "reference")
        assert rel_l2(model(**inputs)[0], expected) < 1e-5
    model = tiny_sana_patched_latents(patch_size=2, interpolation_scale=1, dtype=torch.bfloat16)
    inputs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in tiny_sana_inputs(height=6, width=10).items()}
    with torch.no_grad():
        expected = model(**inputs)[0]
        patch_latents_only(model, "reference")
        assert model.patch_embed(inputs["hidden_states"]).dtype == torch.bfloat16
        got = model(**inputs)[0]
    assert got.dtype == torch.bfloat16 and rel_l2(got.float(), expected.float()) < 1e-2  # bf16 budget


def test_sana_gradients_flow_and_equal_stock():
    model = tiny_sana_patched_latents(patch_size=2)
    inputs = tiny_sana_inputs(height=6, width=10)
    names = ["patch_embed.proj.weight", "patch_embed.proj.bias", "proj_out.weight", "proj_out.bias",
             "transformer_blocks.0.attn1.to_q.weight"]
    params = dict(model.named_parameters())

    def grads():
        x = inputs["hidden_states"].clone().requires_grad_()
        model(**{**inputs, "hidden_states": x})[0].square().mean().backward()
        result = {n: params[n].grad.clone() for n in names}
        model.zero_grad()
        return result, x.grad

    expected, expected_x = grads()
    patch_latents_only(model, "triton")
    got, got_x = grads()
    for n in names:
        assert rel_l2(got[n], expected[n]) < 1e-4, n
    assert rel_l2(got_x, expected_x) < 1e-4


@pytest.mark.parametrize("target,where", [("patch_embed.proj", "patch_embed"), ("proj_out", "proj_out")])
def test_sana_adapter_added_after_patch_is_applied(target, where):
    model, inputs = tiny_sana_patched_latents(patch_size=2), tiny_sana_inputs(height=6, width=10)
    with torch.no_grad():
        without_adapter = model(**inputs)[0]
        dcgen_kernels.patch(model, backend="reference")
        add_lora(model, [target])
        dcgen_kernels._backend._warned.clear()
        with pytest.warns(RuntimeWarning, match=f"SANA's {where} runs diffusers' code because {target}"):
            got = model(**inputs)[0]
        expected = dcgen_kernels.unpatch(model)(**inputs)[0]
    assert rel_l2(expected, without_adapter) > 1e-3
    assert rel_l2(got, expected) < 1e-5


def test_sana_adapter_added_before_patch_is_skipped_with_how_to_fuse_it():
    model, inputs = tiny_sana_patched_latents(patch_size=2), tiny_sana_inputs(height=6, width=10)
    add_lora(model, ["patch_embed.proj", "proj_out"])
    with torch.no_grad():
        expected = model(**inputs)[0]
        report = dcgen_kernels.patch_report(dcgen_kernels.patch(model, backend="reference"))
        got = model(**inputs)[0]
    hint = ("(merge the adapters into the weights, e.g. with dcgen_kernels.dcgen.merge_lora, then "
            "dcgen_kernels.patch(model) again to fuse it)")
    assert ("", "latents", f"patch_embed: its proj is peft.tuners.lora.layer.Conv2d, not a plain torch.nn.Conv2d "
                           f"{hint}; proj_out: proj_out is peft.tuners.lora.layer.Linear, not a plain torch.nn.Linear "
                           f"{hint}") in report.skipped
    assert rel_l2(got, expected) < 1e-5


def test_sana_report_unpatch_and_state_dict():
    model = tiny_sana_patched_latents(patch_size=2, interpolation_scale=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dcgen_kernels.patch(model, backend="reference")
    dcgen_kernels.patch(model, backend="reference")
    ours = {name: cls for name, family, cls in dcgen_kernels.patch_report(model).replaced if family == "latents"}
    assert ours == {"": "SanaTransformer2DModel", "patch_embed": "PatchEmbed", "proj_out": "Linear"}
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    dcgen_kernels.unpatch(model)
    assert not any("forward" in vars(m) or "_dcgen_latents" in vars(m) for m in model.modules())


class _Conv2dSubclass(torch.nn.Conv2d):
    pass


def _swap_proj(model, conv_class, p):
    """The patch embedding's projection as a `conv_class` p x p patch projection (its weights where p fits them)."""
    proj = model.patch_embed.proj
    conv = conv_class(proj.in_channels, proj.out_channels, p, stride=p)
    if p == proj.kernel_size[0]:
        conv.load_state_dict(proj.state_dict())
    model.patch_embed.proj, model.patch_embed.patch_size = conv, p


# (change, the skipped module, its reason, whether the model still runs as stock does after the change)
SANA_UNSUPPORTED_IO = [
    (lambda m: setattr(m.patch_embed.proj, "padding", (1, 1)), "patch_embed",
     "its conv is not a p x p, stride p, unpadded, ungrouped patch projection", False),
    (lambda m: setattr(m, "patch_embed", torch.nn.Sequential(m.patch_embed)), "patch_embed",
     "patch_embed is torch.nn.modules.container.Sequential, not diffusers' PatchEmbed", True),
    (lambda m: _swap_proj(m, _Conv2dSubclass, 1), "patch_embed",
     "its proj is tests.test_patch_latents._Conv2dSubclass, not a plain torch.nn.Conv2d", True),
    (lambda m: setattr(m.patch_embed, "flatten", False), "patch_embed", "it does not flatten to tokens", False),
    (lambda m: _swap_proj(m, torch.nn.Conv2d, 2), "patch_embed", "its patch size 2 differs from config.patch_size 1",
     False),
    (lambda m: setattr(m, "proj_out", torch.nn.Sequential(m.proj_out)), "proj_out",
     "proj_out is torch.nn.modules.container.Sequential, not a plain torch.nn.Linear", True),
]


@pytest.mark.parametrize("change,name,reason,runs", SANA_UNSUPPORTED_IO)
def test_sana_unsupported_embedder_or_head_is_skipped_with_reason(change, name, reason, runs):
    model, inputs = tiny_sana_patched_latents(patch_size=1), tiny_sana_inputs()
    change(model)
    with torch.no_grad():
        expected = model(**inputs)[0] if runs else None
        report = dcgen_kernels.patch_report(dcgen_kernels.patch(model, backend="reference"))
        assert (name, "latents", reason) in report.skipped
        other = "proj_out" if name == "patch_embed" else "patch_embed"
        assert (other, "latents", "Linear" if other == "proj_out" else "PatchEmbed") in report.replaced
        if runs:
            assert rel_l2(model(**inputs)[0], expected) < 1e-5


def test_sana_head_not_unpackable_is_skipped_with_reason():
    model = tiny_sana_patched_latents(patch_size=2)
    model.proj_out = torch.nn.Linear(model.proj_out.in_features, 6)  # 6 features: not a multiple of 2 * 2
    report = dcgen_kernels.patch_report(dcgen_kernels.patch(model, backend="reference"))
    assert ("proj_out", "latents", "proj_out's 6 features are not a multiple of patch_size**2 = 4") in report.skipped


def test_sana_patched_compiles_without_graph_breaks():
    model, inputs = tiny_sana_patched_latents(patch_size=2), tiny_sana_inputs(height=6, width=10)
    with torch.no_grad():
        expected = model(**inputs)[0]
        dcgen_kernels.patch(model, backend="reference")
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert rel_l2(compiled(**inputs)[0], expected) < 1e-5


# ----------------------------------------------------------------------------------------------- GPU
def _bf16_cuda(inputs, skip=()):
    return {k: (v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k not in skip
                else v.to("cuda") if torch.is_tensor(v) else v) for k, v in inputs.items()}


@pytest.mark.gpu
def test_gpu_flux_unpacked_bf16_close_to_stock():
    model, inputs, latent = flux_case(2)
    model, inputs, latent = model.to("cuda", torch.bfloat16), _bf16_cuda(inputs), latent.to("cuda", torch.bfloat16)
    with torch.no_grad():
        expected = unpack_latents(flux_forward(model, inputs, inputs["hidden_states"]), 8, 8, 2)
        patch_latents_only(model, "auto")
        got = flux_forward(model, inputs, latent)
    assert rel_l2(got, expected) < 2e-2


@pytest.mark.gpu
def test_gpu_sana_bf16_close_to_stock():
    model = tiny_sana_patched_latents(patch_size=2, dtype=torch.bfloat16, device="cuda")
    inputs = _bf16_cuda(tiny_sana_inputs(height=8, width=12), skip=("encoder_attention_mask",))
    with torch.no_grad():
        expected = model(**inputs)[0]
        patch_latents_only(model, "auto")
        got = model(**inputs)[0]
    assert rel_l2(got, expected) < 2e-2


def test_sana_model_skipped_whole_is_named_in_the_report():
    """Embedder and head both unsupported (patch size 3): the model's own entry reads as the model, not a blank."""
    model = tiny_sana_patched_latents(patch_size=3)
    report = dcgen_kernels.patch_report(dcgen_kernels.patch(model, backend="reference"))
    assert any(name == "" and family == "latents" for name, family, _ in report.skipped)
    assert "  skipped SanaTransformer2DModel (the model): patch_embed: " in str(report)
