import inspect
import json
import math

import pytest
import torch
from torch import nn

from dcgen_kernels import dcgen
from tests.helpers import flux_pipeline_static, tiny_flux, tiny_flux_inputs, tiny_sana, tiny_sana_inputs

FLUX_REPLACED = ("x_embedder.", "proj_out.")
SANA_REPLACED = ("patch_embed.", "proj_out.")


# ----------------------------------------------------------------------------------------------- helpers
def untouched(before: dict, after: dict, replaced_prefixes) -> None:
    keep_before = {k: v for k, v in before.items() if not k.startswith(replaced_prefixes)}
    keep_after = {k: v for k, v in after.items() if not k.startswith(replaced_prefixes)}
    assert keep_before.keys() == keep_after.keys()
    for k in keep_before:
        assert torch.equal(keep_before[k], keep_after[k]), k


def check_xavier(weight: torch.Tensor, bias: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    w = weight.detach().float()
    assert torch.count_nonzero(bias) == 0
    assert w.abs().max() <= bound * (1 + 1e-6)
    # U(-a, a): std a/sqrt(3), mean 0; the tiny layers have >= 2048 entries, so 10% is several sigma.
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert abs(w.mean().item()) < 0.1 * bound
    assert w.abs().max() > 0.9 * bound


def state_clone(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def public_config(config) -> dict:
    """Config without diffusers' bookkeeping keys, JSON-normalised (tuples -> lists) as save_pretrained writes it."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def roundtrip(model, tmp_path, cls):
    # from_config(model.config) must rebuild the converted architecture too (honours _use_default_values)
    rebuilt = cls.from_config(model.config)
    assert public_config(rebuilt.config) == public_config(model.config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert public_config(loaded.config) == public_config(model.config)
    sd, sd_loaded = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd_loaded.keys()
    for k in sd:
        assert sd[k].shape == sd_loaded[k].shape and torch.equal(sd[k], sd_loaded[k]), k
    return loaded


# ----------------------------------------------------------------------------------------------- FLUX
def test_flux_convert_shapes_init_forward_roundtrip(tmp_path):
    from diffusers import FluxTransformer2DModel

    model = tiny_flux()
    before = state_clone(model)
    inner = model.inner_dim
    out = dcgen.convert(model, latent_channels=32, patch_size=1)
    assert out is model

    assert isinstance(model.x_embedder, nn.Linear) and isinstance(model.proj_out, nn.Linear)
    assert (model.x_embedder.in_features, model.x_embedder.out_features) == (32, inner)
    assert (model.proj_out.in_features, model.proj_out.out_features) == (inner, 32)
    assert (model.config.in_channels, model.config.out_channels, model.config.patch_size) == (32, 32, 1)
    assert model.out_channels == 32
    check_xavier(model.x_embedder.weight, model.x_embedder.bias, 32, inner)
    check_xavier(model.proj_out.weight, model.proj_out.bias, inner, 32)
    assert model.x_embedder.weight.requires_grad and model.proj_out.weight.requires_grad
    untouched(before, model.state_dict(), FLUX_REPLACED)

    h, w = 6, 10  # a non-square latent grid: catches row/column mix-ups in the ids
    latents = torch.randn(1, 32, h, w)
    inputs = tiny_flux_inputs(grid=1)
    inputs.update(hidden_states=dcgen.pack_latents(latents, 1), img_ids=dcgen.latent_image_ids(h, w, 1))
    with torch.no_grad():
        pred = model(**inputs)[0]
    assert pred.shape == (1, h * w, 32)
    assert torch.isfinite(pred).all()
    assert dcgen.unpack_latents(pred, h, w, 1).shape == latents.shape

    loaded = roundtrip(model, tmp_path, FluxTransformer2DModel)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], pred)


def test_flux_convert_patch2_128ch():
    model = tiny_flux()
    inner = model.inner_dim
    dcgen.convert(model, latent_channels=128, patch_size=2)
    assert model.x_embedder.in_features == 512 and model.proj_out.out_features == 512
    assert (model.config.in_channels, model.config.out_channels, model.config.patch_size) == (512, 512, 1)
    check_xavier(model.x_embedder.weight, model.x_embedder.bias, 512, inner)
    latents = torch.randn(1, 128, 4, 6)
    inputs = tiny_flux_inputs(grid=1)
    inputs.update(hidden_states=dcgen.pack_latents(latents, 2), img_ids=dcgen.latent_image_ids(4, 6, 2))
    with torch.no_grad():
        assert model(**inputs)[0].shape == (1, 6, 512)


# ----------------------------------------------------------------------------------------------- SANA
def test_sana_convert_shapes_init_forward_roundtrip(tmp_path):
    from diffusers import SanaTransformer2DModel
    from diffusers.models.embeddings import PatchEmbed

    model = tiny_sana(in_channels=8)
    before = state_clone(model)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    assert dcgen.convert(model, 32, 1) is model

    conv = model.patch_embed.proj
    assert isinstance(model.patch_embed, PatchEmbed)
    assert tuple(conv.weight.shape) == (inner, 32, 1, 1) and conv.stride == (1, 1)
    assert (model.proj_out.in_features, model.proj_out.out_features) == (inner, 32)
    assert (model.config.in_channels, model.config.out_channels, model.config.patch_size) == (32, 32, 1)
    check_xavier(conv.weight, conv.bias, 32, inner)
    check_xavier(model.proj_out.weight, model.proj_out.bias, inner, 32)
    untouched(before, model.state_dict(), SANA_REPLACED)

    inputs = tiny_sana_inputs(in_channels=32, height=6, width=7)
    with torch.no_grad():
        pred = model(**inputs)[0]
    assert pred.shape == (2, 32, 6, 7) and torch.isfinite(pred).all()

    loaded = roundtrip(model, tmp_path, SanaTransformer2DModel)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], pred)


def test_sana_convert_keeps_a_bf16_models_dtype_for_its_new_embedder_and_pos_embed():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, num_layers=1, num_cross_attention_heads=2,
        cross_attention_head_dim=16, cross_attention_dim=64, caption_channels=24, sample_size=8, interpolation_scale=1,
    ).to(torch.bfloat16).eval()
    dcgen.convert(model, latent_channels=16, patch_size=2)
    assert model.patch_embed.pos_embed.dtype == model.patch_embed.proj.weight.dtype == torch.bfloat16
    assert model.proj_out.weight.dtype == torch.bfloat16


def test_sana_convert_patch2_with_sincos_pos_embed(tmp_path):
    """interpolation_scale set: PatchEmbed carries a non-persistent pos_embed that must match a fresh build."""
    from diffusers import SanaTransformer2DModel

    # in/out_channels left at their defaults (32): diffusers lists them in config._use_default_values, which
    # from_config honours, so convert must take them out of that list or the rebuilt head would be 32-wide.
    model = SanaTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=64, caption_channels=24,
        sample_size=8, interpolation_scale=1,
    ).eval()
    before = state_clone(model)
    inner = 64
    dcgen.convert(model, latent_channels=16, patch_size=2)
    conv = model.patch_embed.proj
    assert tuple(conv.weight.shape) == (inner, 16, 2, 2) and conv.stride == (2, 2)
    assert model.proj_out.out_features == 4 * 16
    assert model.patch_embed.pos_embed.shape == (1, 16, inner)  # (8/2)^2 tokens
    check_xavier(conv.weight, conv.bias, 16 * 4, inner)
    untouched(before, model.state_dict(), SANA_REPLACED)

    inputs = tiny_sana_inputs(in_channels=16, height=8, width=8)
    with torch.no_grad():
        pred = model(**inputs)[0]
    assert pred.shape == (2, 16, 8, 8)
    loaded = roundtrip(model, tmp_path, SanaTransformer2DModel)
    assert torch.equal(loaded.patch_embed.pos_embed, model.patch_embed.pos_embed)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], pred)


# ----------------------------------------------------------------------------------------------- dtype / repeat
@pytest.mark.parametrize("builder,replaced", [(tiny_flux, FLUX_REPLACED), (tiny_sana, SANA_REPLACED)])
def test_convert_keeps_dtype(builder, replaced):
    model = builder(dtype=torch.bfloat16)
    before = state_clone(model)
    dcgen.convert(model, 32)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
    untouched(before, model.state_dict(), replaced)


@pytest.mark.parametrize("builder,replaced", [(tiny_flux, FLUX_REPLACED), (tiny_sana, SANA_REPLACED)])
def test_convert_twice_reinitialises_but_is_otherwise_idempotent(builder, replaced):
    """Documented choice: every call draws fresh layers (a shape match is no proof the latent space matches)."""
    once, twice = builder(), builder()
    twice.load_state_dict(once.state_dict())
    torch.manual_seed(1)
    dcgen.convert(once, 32)
    dcgen.convert(twice, 32)
    first = state_clone(twice)
    torch.manual_seed(1)
    dcgen.convert(twice, 32)  # same target shape again, same RNG state as `once` had
    assert public_config(twice.config) == public_config(once.config)
    sd_once, sd_twice = once.state_dict(), twice.state_dict()
    assert sd_once.keys() == sd_twice.keys()
    for k in sd_once:
        assert torch.equal(sd_once[k], sd_twice[k]), k
    untouched(first, sd_twice, replaced)
    changed = [k for k in first if k.startswith(replaced) and k.endswith("weight")]
    assert changed and all(not torch.equal(first[k], sd_twice[k]) for k in changed)


# ----------------------------------------------------------------------------------------------- pack / ids
@pytest.mark.parametrize("p", [1, 2, 4])
def test_pack_unpack_roundtrip(p):
    latents = torch.randn(2, 5, 8, 12)
    tokens = dcgen.pack_latents(latents, p)
    assert tokens.shape == (2, (8 // p) * (12 // p), 5 * p * p)
    assert torch.equal(dcgen.unpack_latents(tokens, 8, 12, p), latents)
    # feature = c*p*p + i*p + j of token (row r, col s) = latents[c, r*p + i, s*p + j]
    c, i, j, r, s = 3, p - 1, 0, 1, 2
    assert tokens[1, r * (12 // p) + s, c * p * p + i * p + j] == latents[1, c, r * p + i, s * p + j]


def test_pack_unpack_ids_match_diffusers_flux_pipeline():
    pack, unpack, prepare_ids = (flux_pipeline_static(n) for n in ("_pack_latents", "_unpack_latents",
                                                                     "_prepare_latent_image_ids"))
    for c, h, w in [(16, 8, 12), (4, 2, 2), (32, 16, 6)]:
        latents = torch.randn(2, c, h, w)
        ours = dcgen.pack_latents(latents, 2)
        assert torch.equal(ours, pack(latents, 2, c, h, w))
        vae_scale_factor = 8  # diffusers' unpack takes image pixel sizes
        assert torch.equal(dcgen.unpack_latents(ours, h, w, 2), unpack(ours, h * 8, w * 8, vae_scale_factor))
        for dtype in (torch.float32, torch.bfloat16):
            ids = dcgen.latent_image_ids(h, w, 2, device="cpu", dtype=dtype)
            ref = prepare_ids(2, h // 2, w // 2, "cpu", dtype)
            assert ids.dtype == dtype and torch.equal(ids, ref)
    assert torch.equal(dcgen.latent_image_ids(5, 3, 1), prepare_ids(1, 5, 3, "cpu", torch.float32))


# ----------------------------------------------------------------------------------------------- errors
def test_convert_rejects_unsupported_model():
    with pytest.raises(TypeError, match="FluxTransformer2DModel, SanaTransformer2DModel.*Linear"):
        dcgen.convert(nn.Linear(4, 4), 32)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(latent_channels=0), ValueError, "latent_channels must be a positive int, got 0"),
    (dict(latent_channels=-3), ValueError, "latent_channels"),
    (dict(latent_channels=32.0), TypeError, "latent_channels must be a positive int, got float"),
    (dict(latent_channels=True), TypeError, "latent_channels.*bool"),
    (dict(latent_channels=32, patch_size=0), ValueError, "patch_size must be a positive int"),
    (dict(latent_channels=32, patch_size="2"), TypeError, "patch_size"),
])
def test_convert_rejects_bad_sizes(kwargs, exc, match):
    model = tiny_flux()
    before = state_clone(model)
    config = dict(model.config)
    with pytest.raises(exc, match=match):
        dcgen.convert(model, **kwargs)
    assert dict(model.config) == config  # validation happens before anything is touched
    untouched(before, model.state_dict(), ())


def test_convert_rejects_wrapped_embedder():
    model = tiny_flux()
    model.x_embedder = nn.Sequential(model.x_embedder)
    with pytest.raises(TypeError, match="x_embedder must be a plain Linear.*Sequential"):
        dcgen.convert(model, 32)
    from tests.helpers import add_lora

    adapted = add_lora(tiny_flux(), ["x_embedder"])  # peft's layer is also named Linear: the message says whose
    with pytest.raises(TypeError, match=r"x_embedder must be a plain Linear to be replaced, got peft\.tuners\.lora"):
        dcgen.convert(adapted, 32)


def test_sana_patch_larger_than_sample_size():
    with pytest.raises(ValueError, match="patch_size .16. must not exceed.*sample_size .8."):
        dcgen.convert(tiny_sana(), 32, patch_size=16)
    assert dcgen.convert(tiny_sana(), 4, patch_size=8).config.patch_size == 8  # equal to the sample size: fine


def test_pack_helpers_reject_bad_inputs():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="multiples of patch_size .4."):
        dcgen.pack_latents(x, 4)
    with pytest.raises(ValueError, match="latents must have 4 dimensions"):
        dcgen.pack_latents(x[0], 2)
    with pytest.raises(TypeError, match="latents must be a torch.Tensor"):
        dcgen.pack_latents(x.numpy(), 2)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        dcgen.pack_latents(x, 0)
    tokens = dcgen.pack_latents(x, 2)
    with pytest.raises(ValueError, match="tokens has 9 tokens but a 6x8 latent"):
        dcgen.unpack_latents(tokens, 6, 8, 2)
    with pytest.raises(ValueError, match="multiple of patch_size\\*\\*2"):
        dcgen.unpack_latents(tokens[..., :15], 6, 6, 2)
    with pytest.raises(ValueError, match="tokens must have 3 dimensions"):
        dcgen.unpack_latents(x, 6, 6, 2)
    for height, width in ((5, 4), (4, 5)):
        with pytest.raises(ValueError, match="multiples of patch_size .2."):
            dcgen.latent_image_ids(height, width, 2)
        with pytest.raises(ValueError, match="multiples of patch_size .2."):
            dcgen.pack_latents(torch.zeros(1, 1, height, width), 2)
    with pytest.raises(TypeError, match="height must be a positive int"):
        dcgen.latent_image_ids(4.0, 4, 2)


def test_public_signature():
    assert list(inspect.signature(dcgen.convert).parameters) == ["transformer", "latent_channels", "patch_size"]


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_convert_failing_part_way_leaves_the_model_as_it_was(family, monkeypatch):
    import sys

    convert_module = sys.modules["dcgen_kernels.dcgen.convert"]  # the package's `convert` is the function
    model = tiny_flux() if family == "flux" else tiny_sana()
    modules, config = dict(model.named_modules()), dict(model.config)
    new_linear, calls = convert_module._new_linear, []

    def out_of_memory_at_the_head(*args):
        calls.append(1)
        if len(calls) == (2 if family == "flux" else 1):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return new_linear(*args)

    monkeypatch.setattr(convert_module, "_new_linear", out_of_memory_at_the_head)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        dcgen.convert(model, latent_channels=32)
    assert dict(model.named_modules()) == modules and dict(model.config) == config
