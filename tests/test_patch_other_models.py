"""patch() on other diffusers models built from the modules it replaces: ControlNets (FLUX's and SANA's blocks), SD3
and HunyuanVideo (the adaLN norms), Chroma (FLUX's attention, which it calls with an attention mask). patch() replaces
module instances wherever they are; in these models they must give stock's results too, from whatever inputs those
models hand them (HunyuanVideo's conv patch embedding feeds its first block channel-strided tokens)."""

import warnings

import pytest
import torch

import dcgen_kernels
from tests.helpers import TOLERANCE, RecordDcgenOps, rel_l2

diffusers = pytest.importorskip("diffusers")


def _flux_grid_ids(height, width):
    ids = torch.zeros(height * width, 3)
    ids[:, 1], ids[:, 2] = torch.arange(height * width) // width, torch.arange(height * width) % width
    return ids


def _flux_like(cls, **config):
    model = cls(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(16, 24, 24), **config)
    inputs = dict(hidden_states=torch.randn(1, 24, 16), encoder_hidden_states=torch.randn(1, 5, 32),
                  timestep=torch.tensor([0.4]), img_ids=_flux_grid_ids(4, 6), txt_ids=torch.zeros(5, 3))
    return model, inputs


def flux_controlnet():
    model, inputs = _flux_like(diffusers.FluxControlNetModel, pooled_projection_dim=8)
    return model, dict(inputs, pooled_projections=torch.randn(1, 8), controlnet_cond=torch.randn(1, 24, 16))


def chroma():
    model, inputs = _flux_like(diffusers.ChromaTransformer2DModel, approximator_num_channels=8,
                               approximator_hidden_dim=32, approximator_layers=1)
    text_mask = torch.tensor([[True, True, True, False, False]])  # ChromaPipeline's: text padding, then the image
    return model, dict(inputs, attention_mask=torch.cat([text_mask, torch.ones(1, 24, dtype=torch.bool)], dim=1))


def sana_controlnet():
    model = diffusers.SanaControlNetModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
        sample_size=8)
    return model, dict(hidden_states=torch.randn(1, 8, 6, 7), encoder_hidden_states=torch.randn(1, 5, 16),
                       timestep=torch.tensor([500]), controlnet_cond=torch.randn(1, 8, 6, 7))


def sd3():
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16)
    return model, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                       pooled_projections=torch.randn(1, 8), timestep=torch.tensor([500]))


def hunyuan_video():
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6))
    return model, dict(hidden_states=torch.randn(1, 4, 2, 4, 4), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 5, 16),
                       encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0]]), pooled_projections=torch.randn(1, 8),
                       guidance=torch.tensor([3.0]))


# model -> (the classes patch() replaces in it, the dcgen ops its forward then runs)
CASES = {
    flux_controlnet: ({"FluxTransformerBlock", "FluxSingleTransformerBlock", "FluxAttnProcessor", "AdaLayerNormZero",
                       "AdaLayerNormZeroSingle"}, {"ada_layer_norm_modulate", "gated_residual", "flux_attention"}),
    chroma: ({"FluxAttnProcessor"}, set()),
    sana_controlnet: ({"SanaTransformerBlock", "GLUMBConv", "SanaLinearAttnProcessor2_0", "SanaAttnProcessor2_0"},
                      {"ada_layer_norm_modulate", "gated_residual", "glumbconv", "sana_linear_attention"}),
    sd3: ({"AdaLayerNormZero", "AdaLayerNormContinuous"}, {"ada_layer_norm_modulate"}),
    hunyuan_video: ({"AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"},
                    {"ada_layer_norm_modulate"}),
}


def build(make, dtype=torch.float32):
    torch.manual_seed(0)
    model, inputs = make()
    with torch.no_grad():  # ControlNets zero-initialise their output projections: randomise them
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    inputs = {k: v.to(dtype) if v.is_floating_point() and k not in ("timestep", "guidance") else v
              for k, v in inputs.items()}
    return model.to(dtype).eval(), inputs


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out if isinstance(out, torch.Tensor) else torch.cat([t.flatten() for t in out])


@pytest.mark.parametrize("make", list(CASES), ids=lambda make: make.__name__)
def test_patch_replaces_the_modules_and_keeps_stock_results(make):
    classes, ops = CASES[make]
    model, inputs = build(make)
    expected = outputs(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert {cls for _, _, cls in dcgen_kernels.patch_report(model).replaced} >= classes
    with RecordDcgenOps() as recorded, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = outputs(model, inputs)
    assert rel_l2(got, expected) < TOLERANCE[torch.float32]
    assert recorded.names >= ops
    if make is chroma:  # every call masked: diffusers' processor ran, not flux_attention
        assert "flux_attention" not in recorded.names
        assert any("because an attention_mask was passed" in str(w.message) for w in said)


def test_chroma_without_an_attention_mask_runs_the_fused_attention():
    model, inputs = build(chroma)
    del inputs["attention_mask"]
    expected = outputs(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    with RecordDcgenOps() as recorded, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = outputs(model, inputs)
    assert "flux_attention" in recorded.names and rel_l2(got, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("make", list(CASES), ids=lambda make: make.__name__)
def test_patched_bf16_stays_as_near_fp32_as_stock(make):
    model, inputs = build(make)
    expected = outputs(model, inputs)
    model, bf16_inputs = build(make, torch.bfloat16)
    stock_error = rel_l2(outputs(model, bf16_inputs), expected)
    dcgen_kernels.patch(model)  # Triton kernels (interpreted) where they take the call, else the reference
    patched_error = rel_l2(outputs(model, bf16_inputs), expected)
    assert patched_error <= max(1.5 * stock_error, 2 * TOLERANCE[torch.bfloat16]), (patched_error, stock_error)
