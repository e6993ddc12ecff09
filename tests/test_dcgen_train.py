"""DC-Gen training stages (dcgen_kernels.dcgen.train): losses, alignment, guidance distillation, LoRA, resume."""

import copy
import inspect
import math
import os
import warnings

import pytest
import torch

from dcgen_kernels.dcgen import convert, data, latent_image_ids, pack_latents
from dcgen_kernels.dcgen import train as T

from .helpers import rel_l2, tiny_sana, tiny_sana_patched_latents
from .test_dcgen_cli import _tiny_dc, _tiny_kl


def flux_p2(guidance=True, head_dim=32, heads=2):
    """Tiny guidance-distilled FLUX on base-AE tokens (16 channels packed 2x2 -> 64 features)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    third = head_dim // 8 * 2
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(head_dim - 2 * third, third, third),
    )
    return model.eval()


def text_data(n, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, tokens, 32, generator=g), torch.randn(n, 16, generator=g),
            torch.randn(tokens, 32, generator=g), torch.randn(16, generator=g))


# ----------------------------------------------------------------------------------------------- (b) loss values
def test_embedding_alignment_loss_hand_computed():
    teacher = torch.arange(8.0).reshape(1, 8, 1)  # 2x4 grid [[0,1,2,3],[4,5,6,7]], row-major
    student = torch.tensor([0.0, 10.0]).reshape(1, 2, 1)  # 1x2 grid
    # pool: blocks {0,1,4,5} -> 2.5, {2,3,6,7} -> 4.5: ((0-2.5)^2 + (10-4.5)^2) / 2
    assert T.embedding_alignment_loss(student, teacher, (1, 2), (2, 4), "pool").item() == pytest.approx(18.25)
    # upsample: [[0,0,10,10],[0,0,10,10]] vs teacher: (0+1+64+49+16+25+16+9) / 8
    assert T.embedding_alignment_loss(student, teacher, (1, 2), (2, 4), "upsample").item() == pytest.approx(22.5)
    # hidden dimension kept apart; equal grids -> plain MSE
    a, b = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    for mode in ("pool", "upsample"):
        torch.testing.assert_close(T.embedding_alignment_loss(a, b, (2, 3), (2, 3), mode), ((a - b) ** 2).mean())


# ----------------------------------------------------------------------------------------------- (a) alignment
@pytest.fixture(scope="module")
def image_latents():
    """Real images through tiny random-init autoencoders: 64 px crops (stride 32) of scikit-image's samples at
    256 px, encoded by an AutoencoderKL (FLUX's layout: 8x down, 16 ch), an AutoencoderDC as SANA's base (8x down,
    8 ch) and the deeper DC-AE both models are converted to (16x down, 32 ch: 4x the channels for 2x the
    compression, as f32c32 -> f64c128; with 8 channels, random encoders share too little for a 5x fit on some
    inits). Returns (latents by autoencoder, train mask, held-out mask): held out are all crops of the last image.
    """
    torch.manual_seed(0)
    images = data.images_to_tensor(data.sample_images(), 256)
    corners = range(0, 256 - 64 + 1, 32)
    crops = torch.cat([images[:, :, i:i + 64, j:j + 64] for i in corners for j in corners])  # crop k: image k % N
    held_out = torch.arange(crops.shape[0]) % images.shape[0] == images.shape[0] - 1
    autoencoders = dict(kl=_tiny_kl(), dc_f8=_tiny_dc(8, (8, 8, 8, 16)), dc_f16=_tiny_dc(32, (16, 16, 32, 32, 32)))
    latents = {name: data.encode_latents(crops, ae, 64) for name, ae in autoencoders.items()}
    n = crops.shape[0]
    assert {k: v.shape for k, v in latents.items()} == dict(kl=(n, 16, 8, 8), dc_f8=(n, 8, 8, 8),
                                                             dc_f16=(n, 32, 4, 4))
    return latents, ~held_out, held_out


def assert_alignment_learns(teacher, student, base, dcae, train, held_out_loss, teacher_patch_size):
    before = held_out_loss()
    out = T.align_embedding(teacher, student, base[train], dcae[train], teacher_patch_size=teacher_patch_size,
                            student_patch_size=1, steps=300, lr=1e-2, batch_size=16, seed=0, progress=False)
    after = held_out_loss()
    assert len(out["history"]) == 300
    assert after <= before / 5, (before, after)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_align_embedding_learns_tiny_flux(image_latents):
    """FLUX on AutoencoderKL latents packed 2x2 -> DC-Gen-FLUX on 16x DC-AE latents (p = 1): both 4x4 tokens."""
    latents, train, held_out = image_latents
    base, dcae = latents["kl"], latents["dc_f16"]
    model = flux_p2()
    teacher = copy.deepcopy(model.x_embedder)
    convert(model, latent_channels=32, patch_size=1)
    student = model.x_embedder

    def held_out_loss():
        with torch.no_grad():
            t = teacher(pack_latents(base[held_out], 2))
            s = student(pack_latents(dcae[held_out], 1))
            return T.embedding_alignment_loss(s, t, (4, 4), (4, 4)).item()

    assert_alignment_learns(teacher, student, base, dcae, train, held_out_loss, teacher_patch_size=2)


def test_align_embedding_learns_tiny_sana(image_latents):
    """SANA on 8x DC-AE latents (8x8 tokens) -> DC-Gen-SANA on the 16x DC-AE latents (4x4 tokens)."""
    latents, train, held_out = image_latents
    base, dcae = latents["dc_f8"], latents["dc_f16"]
    torch.manual_seed(0)
    model = tiny_sana()
    teacher = copy.deepcopy(model.patch_embed)
    convert(model, latent_channels=32, patch_size=1)
    student = model.patch_embed

    def held_out_loss():
        with torch.no_grad():
            return T.embedding_alignment_loss(student(dcae[held_out]), teacher(base[held_out]), (4, 4),
                                              (8, 8)).item()

    assert_alignment_learns(teacher, student, base, dcae, train, held_out_loss, teacher_patch_size=1)


def test_align_embedding_through_the_fused_patch_embed_equals_stock():
    """A patched x_embedder takes the unpacked latents (fused packing + fast backward): same run as stock."""
    from dcgen_kernels.patching import latents

    g = torch.Generator().manual_seed(2)
    base, dc = torch.randn(6, 16, 8, 8, generator=g), torch.randn(6, 8, 4, 4, generator=g)
    runs = []
    for fused in (False, True):
        model = flux_p2()
        teacher = copy.deepcopy(model.x_embedder)
        torch.manual_seed(3)
        convert(model, latent_channels=8, patch_size=1)
        if fused:
            latents.patch_latent_io(model, "triton")
            assert latents.takes_unpacked_latents(model.x_embedder)
        out = T.align_embedding(teacher, model.x_embedder, base, dc, teacher_patch_size=2, student_patch_size=1,
                                steps=3, lr=1e-2, batch_size=2, seed=0, progress=False)
        runs.append((out["history"], model.x_embedder.weight.detach().clone()))
    (h0, w0), (h1, w1) = runs
    assert max(abs(a - b) / abs(a) for a, b in zip(h0, h1)) < 1e-5 and rel_l2(w1, w0) < 1e-5


# ----------------------------------------------------------------------------------------------- (c) guidance
def test_flow_matching_and_guidance_closed_form():
    x0, noise = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    x_t, target = T.flow_matching_pair(x0, noise, torch.tensor([0.0, 0.25]))
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], torch.full((3, 4), 0.75 * 2 - 0.25))
    torch.testing.assert_close(target, torch.full((2, 3, 4), -3.0))

    v_u, v_g = torch.ones(2, 3), torch.full((2, 3), 3.0)
    v = T.guidance_distilled_velocity(v_g, v_u, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(v[0], v_g[0])  # w = 1: the guided prediction itself
    torch.testing.assert_close(v[1], torch.full((3,), 2.0))  # (3 - (1 - 2) * 1) / 2
    torch.testing.assert_close(T.guidance_distilled_velocity(v_g, v_u, 4.0), torch.full((2, 3), 1.5))

    w = T.sample_guidance(5000, torch.Generator().manual_seed(0))
    assert w.min() >= 1 and w.max() <= 14 and abs(w.mean().item() - 7.5) < 0.2


def head_loss_case(guidance=True):
    """A converted tiny FLUX and one batch of align_head_loss inputs (4x4 latent grid, p = 1, 8 channels)."""
    model = flux_p2(guidance=guidance)
    convert(model, latent_channels=8, patch_size=1)
    text, pooled, null_text, null_pooled = text_data(2)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    t, w = torch.tensor([0.3, 0.8]), torch.tensor([2.0, 9.0])
    img_ids, txt_ids = latent_image_ids(4, 4), torch.zeros(5, 3)
    return model, text, pooled, null_text, null_pooled, x0, noise, t, w, img_ids, txt_ids


def test_align_head_loss_matches_manual_and_unguided_has_no_grad():
    model, text, pooled, null_text, null_pooled, x0, noise, t, w, img_ids, txt_ids = head_loss_case()

    calls = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((torch.is_grad_enabled(), kwargs["guidance"].clone(),
                                                   kwargs["encoder_hidden_states"].clone(), out[0].requires_grad)),
        with_kwargs=True)
    loss = T.align_head_loss(model, x0, text, pooled, img_ids, txt_ids, t, noise, w, null_text, null_pooled)
    hook.remove()
    assert [(c[0], c[3]) for c in calls] == [(True, True), (False, False)]  # v_g with grad, v_u without
    torch.testing.assert_close(calls[0][1], w)
    torch.testing.assert_close(calls[1][1], torch.ones(2))
    torch.testing.assert_close(calls[1][2], null_text.expand(2, -1, -1))

    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    kw = dict(hidden_states=x_t, timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    with torch.no_grad():
        v_g = model(encoder_hidden_states=text, pooled_projections=pooled, guidance=w, **kw)[0]
        v_u = model(encoder_hidden_states=null_text.expand(2, -1, -1), pooled_projections=null_pooled.expand(2, -1),
                    guidance=torch.ones(2), **kw)[0]
    v_hat = (v_g - (1 - w[:, None, None]) * v_u) / w[:, None, None]
    torch.testing.assert_close(loss.detach(), ((v_hat - (noise - x0)) ** 2).mean())


def test_align_head_loss_without_guidance_embedding_is_plain_flow_matching():
    # FLUX.1-schnell-like: not guidance-distilled
    model, text, pooled, null_text, null_pooled, x0, noise, t, w, img_ids, txt_ids = head_loss_case(guidance=False)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(1))
    loss = T.align_head_loss(model, x0, text, pooled, img_ids, txt_ids, t, noise, w, null_text, null_pooled)
    hook.remove()
    assert len(calls) == 1  # no unconditional pass
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    with torch.no_grad():
        v = model(hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    torch.testing.assert_close(loss.detach(), ((v - (noise - x0)) ** 2).mean())


def test_align_head_trains_only_embedder_and_head():
    model = flux_p2()
    convert(model, latent_channels=8, patch_size=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    text, pooled, null_text, null_pooled = text_data(4)
    latents = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    model.train()  # the frozen backbone trains as inference runs it (no dropout)
    out = T.align_head(model, latents, text, pooled, null_text, null_pooled, steps=2, lr=1e-3, batch_size=2,
                       seed=0, progress=False)
    assert not any(m.training for m in model.modules())
    assert len(out["history"]) == 2 and all(torch.isfinite(torch.tensor(out["history"])))
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n.startswith("x_embedder.") or n.startswith("proj_out.")), n


def test_align_head_on_patched_flux_equals_stock():
    """With the latent I/O patched, align_head feeds unpacked latents through the fused ops: same losses."""
    from dcgen_kernels.patching import latents

    runs = []
    for fused in (False, True):
        model = flux_p2()
        torch.manual_seed(1)
        convert(model, latent_channels=4, patch_size=2)
        if fused:
            latents.patch_latent_io(model, "triton")
        text, pooled, null_text, null_pooled = text_data(3)
        lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = T.align_head(model, lat, text, pooled, null_text, null_pooled, patch_size=2, steps=2, lr=1e-3,
                           batch_size=2, seed=0, progress=False)
        runs.append((out["history"], model.proj_out.weight.detach().clone(), model.x_embedder.weight.detach().clone()))
    (h0, *w0), (h1, *w1) = runs
    assert max(abs(a - b) / abs(a) for a, b in zip(h0, h1)) < 1e-5
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(w1, w0))


def sana_text(n, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, tokens)
    mask[::2, 3:] = 0  # every other prompt is padded
    return torch.randn(n, tokens, 24, generator=g), mask, torch.randn(tokens, 24, generator=g)


@pytest.mark.parametrize("timestep_scale,out_channels", [(1.0, 8), (0.25, 8), (1.0, 16)])
def test_sana_flow_matching_loss_matches_manual(timestep_scale, out_channels):
    """The model sees t * 1000 * config.timestep_scale, as SANA's pipelines feed it (SANA-Sprint sets the scale); a
    learned-sigma head (out_channels = 2 x in_channels: velocity, then variance) is scored on its first half."""
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=8, out_channels=out_channels, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=64, caption_channels=24,
        mlp_ratio=2.5, sample_size=8, timestep_scale=timestep_scale).eval()
    text, mask, _ = sana_text(2)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 8, 4, 6, generator=g), torch.randn(2, 8, 4, 6, generator=g)
    t = torch.tensor([0.3, 0.8])
    loss = T.sana_flow_matching_loss(model, x0, text, t, noise, mask)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    with torch.no_grad():
        out = model(hidden_states=x_t, encoder_hidden_states=text, encoder_attention_mask=mask,
                    timestep=1000 * timestep_scale * t, return_dict=False)[0]
    assert out.shape[1] == out_channels
    torch.testing.assert_close(loss.detach(), ((out[:, :8] - (noise - x0)) ** 2).mean())
    assert loss.requires_grad


@pytest.mark.parametrize("patch_size", [1, 2])
def test_align_head_sana_trains_embedder_and_head_and_loss_decreases(patch_size):
    model = tiny_sana_patched_latents(patch_size=patch_size)
    convert(model, latent_channels=4, patch_size=patch_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    text, mask, null_text = sana_text(8)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(8, 4, 4, 4, generator=g)
    fixed = dict(x0=lat[:4], encoder_hidden_states=text[:4], encoder_attention_mask=mask[:4],
                 t=torch.tensor([0.2, 0.4, 0.6, 0.8]), noise=torch.randn(4, 4, 4, 4, generator=g))

    def held_loss():
        with torch.no_grad():
            return T.sana_flow_matching_loss(model, **fixed).item()

    start = held_loss()
    out = T.align_head(model, lat, text, None, null_text, None, encoder_attention_mask=mask, steps=40, lr=1e-2,
                       batch_size=4, seed=0, progress=False)
    assert len(out["history"]) == 40 and all(torch.isfinite(torch.tensor(out["history"])))
    assert held_loss() < 0.7 * start, (start, held_loss())
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.startswith(("patch_embed.", "proj_out.")), n


def test_align_head_on_patched_sana_equals_stock():
    from dcgen_kernels.patching import latents

    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = tiny_sana_patched_latents(patch_size=2)
        if fused:
            latents.patch_latent_io(model, "triton")
        text, mask, null_text = sana_text(3)
        lat = torch.randn(3, 8, 4, 6, generator=torch.Generator().manual_seed(0))
        out = T.align_head(model, lat, text, None, null_text, None, encoder_attention_mask=mask, steps=2, lr=1e-3,
                           batch_size=2, seed=0, progress=False)
        runs.append((out["history"], model.proj_out.weight.detach().clone(),
                     model.patch_embed.proj.weight.detach().clone()))
    (h0, *w0), (h1, *w1) = runs
    assert max(abs(a - b) / abs(a) for a, b in zip(h0, h1)) < 1e-5
    assert all(rel_l2(a, b) < 1e-5 for a, b in zip(w1, w0))


# ----------------------------------------------------------------------------------------------- (d) text dropout
def test_drop_text_rate_and_rows():
    n = 10_000
    text, pooled = torch.randn(n, 2, 3), torch.randn(n, 4)
    null_text, null_pooled = torch.randn(2, 3), torch.randn(4)
    out_text, out_pooled, dropped = T.drop_text(text, pooled, null_text, null_pooled, p=0.1,
                                                generator=torch.Generator().manual_seed(0))
    frac = dropped.float().mean().item()
    assert abs(frac - 0.1) <= 4 * (0.1 * 0.9 / n) ** 0.5, frac
    assert torch.equal(out_text[dropped], null_text.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(out_pooled[dropped], null_pooled.expand(int(dropped.sum()), -1))
    assert torch.equal(out_text[~dropped], text[~dropped]) and torch.equal(out_pooled[~dropped], pooled[~dropped])
    t0, _, d0 = T.drop_text(text[:5], pooled[:5], null_text[None], null_pooled[None], p=0.0)
    assert not d0.any() and torch.equal(t0, text[:5])
    _, _, by_default = T.drop_text(text, pooled, null_text, null_pooled, generator=torch.Generator().manual_seed(1))
    assert abs(by_default.float().mean().item() - 0.1) <= 4 * (0.1 * 0.9 / n) ** 0.5  # the paper's 10%
    assert inspect.signature(T.align_head).parameters["p_drop"].default == 0.1


@pytest.mark.parametrize("family", ["flux", "sana"])
@pytest.mark.parametrize("p_drop", [0.0, 1.0])
def test_align_head_drops_text_at_p_drop(family, p_drop):
    """align_head hands p_drop to the text dropout: the conditioned forward sees only the null prompt (and, for
    SANA, the null attention mask) at p_drop = 1 and only the samples' own prompts at p_drop = 0."""
    n = 4
    latents = torch.randn(n, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    if family == "flux":
        model = flux_p2()
        convert(model, latent_channels=8, patch_size=1)
        text, cond, null_text, null_cond = text_data(n)  # cond: the pooled projections
        args, kwargs, cond_key = (text, cond, null_text, null_cond), {}, "pooled_projections"
    else:
        torch.manual_seed(0)
        model = tiny_sana()
        text, cond, null_text = sana_text(n)  # cond: the attention mask, rows with and without padding
        null_cond = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])  # unlike every sample's mask
        args, cond_key = (text, None, null_text, None), "encoder_attention_mask"
        kwargs = dict(encoder_attention_mask=cond, null_encoder_attention_mask=null_cond)
    seen = []

    def record(module, hook_args, hook_kwargs):
        if torch.is_grad_enabled():  # FLUX's unguided pass (no grad) always takes the null prompt
            seen.extend(zip(hook_kwargs["encoder_hidden_states"].clone(), hook_kwargs[cond_key].clone()))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    T.align_head(model, latents, *args, steps=2, lr=1e-3, batch_size=n, seed=0, p_drop=p_drop, progress=False,
                 **kwargs)
    hook.remove()
    assert len(seen) == 2 * n

    def is_one_of(row, texts, conds):
        return any(torch.equal(row[0], t) and torch.equal(row[1], c) for t, c in zip(texts, conds))

    if p_drop == 1.0:
        assert all(is_one_of(row, [null_text], [null_cond]) for row in seen)
    else:
        assert all(is_one_of(row, text, cond) for row in seen)


# ----------------------------------------------------------------------------------------------- (e) LoRA
def test_lora_targets_and_merge_matches_unmerged():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = flux_p2()
    convert(model, latent_channels=8, patch_size=1)
    T.add_lora(model, rank=4, alpha=8)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)
    assert model.single_transformer_blocks[0].proj_mlp.lora_A["default"].weight.shape[0] == 4
    defaults = inspect.signature(T.add_lora).parameters
    assert (defaults["rank"].default, defaults["alpha"].default) == (256, 256)  # the paper's rank and alpha
    lora = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert "proj_out" not in lora and "x_embedder" not in lora
    assert {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp",
            "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff_context.net.2",
            "transformer_blocks.0.attn.to_out.0"} <= lora
    assert not any("norm" in n for n in lora) and len(lora) == 12 + 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"x_embedder.weight", "proj_out.weight", "proj_out.bias"} <= trainable
    assert all("lora_" in n or n.startswith(("x_embedder.", "proj_out.")) for n in trainable)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 1000))
    text, pooled, _, _ = text_data(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.tensor([0.4]), guidance=torch.tensor([3.5]), img_ids=latent_image_ids(4, 4),
                  txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        unmerged = model(**inputs)[0]
        model.disable_adapters()
        base = model(**inputs)[0]
        model.enable_adapters()
    assert rel_l2(unmerged, base) > 1e-3  # the adapters do something
    T.merge_lora(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert type(model.single_transformer_blocks[0].proj_out) is torch.nn.Linear
    with torch.no_grad():
        merged = model(**inputs)[0]
    assert rel_l2(merged, unmerged) < 1e-5


def test_lora_sana_targets():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_sana()
    T.add_lora(model, rank=2, alpha=2)
    lora = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert "proj_out" not in lora and "transformer_blocks.0.ff.conv_point" in lora
    assert "transformer_blocks.1.attn2.to_out.0" in lora


def test_merge_lora_merges_adapters_injected_with_peft_directly():
    """quantize() refuses unmerged adapters and names merge_lora: it must merge those diffusers does not track."""
    import dcgen_kernels
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .helpers import add_lora, tiny_flux, tiny_flux_inputs

    model = add_lora(tiny_flux(), ["to_q", "ff.net.2", "x_embedder"])
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        unmerged = model(**inputs)[0]
    with pytest.raises(ValueError, match="merge_lora"):
        dcgen_kernels.quantize(model, "fp8", backend="reference")
    T.merge_lora(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert rel_l2(model(**inputs)[0], unmerged) < 1e-5
    dcgen_kernels.quantize(model, "fp8", backend="reference")


# ----------------------------------------------------------------------------------------------- (f) resume
def _embedding_run(tmp, steps, every, seed=7, base_fill=None):
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(64, 24), torch.nn.Linear(32, 24)
    g = torch.Generator().manual_seed(5)
    base, dc = torch.randn(10, 16, 8, 8, generator=g), torch.randn(10, 32, 2, 2, generator=g)
    if base_fill is not None:
        base.fill_(base_fill)
    out = T.align_embedding(teacher, student, base, dc, teacher_patch_size=2, student_patch_size=1, steps=steps,
                            lr=1e-2, batch_size=3, seed=seed, checkpoint_dir=tmp, checkpoint_every=every,
                            progress=False)
    return student, out["history"]


def test_seed_checkpoint_schedule_incomplete_checkpoints_and_a_nan_loss(tmp_path):
    assert _embedding_run(None, 3, 0, seed=0)[1] != _embedding_run(None, 3, 0, seed=1)[1]  # the seed draws batches
    _embedding_run(str(tmp_path / "a"), 5, 2)
    assert sorted(os.listdir(tmp_path / "a")) == ["step-00000002", "step-00000004", "step-00000005"]  # and the end
    (tmp_path / "a" / "step-00000009").mkdir()  # interrupted while writing: its weights only
    (tmp_path / "a" / "step-00000009" / "trainable.safetensors").write_bytes(b"")
    assert T.latest_checkpoint(str(tmp_path / "a")).endswith("step-00000005")
    with pytest.raises(ValueError, match=r"other settings \(seed: 7 there, 8 here\): rerun with those, or use "
                                         r"another checkpoint directory \(--checkpoint-dir"):  # names what differs
        _embedding_run(str(tmp_path / "a"), 6, 2, seed=8)
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        _embedding_run(None, 2, 0, base_fill=float("nan"))


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, hist_full = _embedding_run(str(tmp_path / "a"), 6, 0)
    _, hist_half = _embedding_run(str(tmp_path / "b"), 3, 3)
    assert T.latest_checkpoint(str(tmp_path / "b")).endswith("step-00000003")
    resumed, hist_resumed = _embedding_run(str(tmp_path / "b"), 6, 3)
    assert hist_resumed == hist_full and hist_half == hist_full[:3]
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "b" / "step-00000006" / "trainable.safetensors"))
    assert torch.equal(saved["weight"], full.weight)
    import shutil

    shutil.copytree(tmp_path / "b" / "step-00000003", tmp_path / "b" / "step-00000001")  # an older one sorts first
    assert T.latest_checkpoint(str(tmp_path / "b")).endswith("step-00000006")
    again, hist_again = _embedding_run(str(tmp_path / "b"), 6, 3)  # a finished run again: its result, no training
    assert hist_again == hist_full and torch.equal(again.weight, full.weight)


def test_timesteps_are_logit_normal_or_uniform():
    """sigmoid(N(0, 1)): 68.3% of t within sigmoid(+-1) = [0.269, 0.731] (uniform: 46.2%)."""
    g = torch.Generator().manual_seed(0)
    for sampling, share in (("logit_normal", 0.683), ("uniform", 0.462)):
        t = T._sample_t(20000, g, sampling)
        inside = ((t > 0.2689) & (t < 0.7311)).float().mean().item()
        assert abs(inside - share) < 0.015 and 0 < t.min() and t.max() < 1, (sampling, inside)


def test_timestep_shift_is_the_flow_schedulers():
    """shift_timesteps(t, exp(mu)) is FlowMatchEulerDiscreteScheduler's exponential time shift at sigma 1, and
    flux_time_shift is FluxPipeline's calculate_shift with FLUX.1-dev's scheduler settings (the defaults)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    for tokens in (256, 1024, 4096, 16384):
        shift = T.flux_time_shift(tokens)
        torch.testing.assert_close(T.shift_timesteps(t, shift), scheduler.time_shift(math.log(shift), 1.0, t))
    assert T.flux_time_shift(256) == pytest.approx(math.exp(0.5)) and T.flux_time_shift(4096) == pytest.approx(
        math.exp(1.15))
    assert T.shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # SANA's flow shift 3
    for bad in (0, -1.5, float("nan"), "3"):
        with pytest.raises(ValueError, match="shift must be a positive finite number"):
            T.shift_timesteps(t, bad)
    for bad in (0, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="image_tokens"):
            T.flux_time_shift(bad)
    pytest.importorskip("transformers")  # FluxPipeline's module imports it
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (256, 1024, 4096, 16384):
        assert T.flux_time_shift(tokens) == pytest.approx(math.exp(calculate_shift(tokens)))


@pytest.mark.parametrize("family", ["flux", "flux_patch2", "flux_schnell", "sana"])
def test_align_head_trains_at_the_pipelines_shifted_timesteps(family):
    """t_shift="auto": guidance-distilled FLUX at FluxPipeline's shift for the latents' token count (patches, not
    latent pixels), schnell-like FLUX (whose scheduler does not shift) at 1, SANA at 3; the same draws as t_shift=1
    otherwise."""
    patch = 2 if family == "flux_patch2" else 1
    latents = torch.randn(2, 8 // patch**2, 4, 6, generator=torch.Generator().manual_seed(0))
    if family.startswith("flux"):
        distilled = family != "flux_schnell"
        model = flux_p2(guidance=distilled)
        convert(model, latent_channels=8 // patch**2, patch_size=patch)
        args, kwargs, scale = text_data(2), dict(patch_size=patch), 1.0
        auto = T.flux_time_shift((4 // patch) * (6 // patch)) if distilled else 1.0
    else:
        torch.manual_seed(0)
        model = tiny_sana()
        text, mask, null_text = sana_text(2)
        args, scale, auto = (text, None, null_text, None), 1000.0, T.SANA_FLOW_SHIFT
        kwargs = dict(encoder_attention_mask=mask, null_encoder_attention_mask=torch.ones(5))
    seen = {}

    def run(t_shift):
        seen[t_shift] = []
        hook = model.register_forward_pre_hook(
            lambda m, a, kw: seen[t_shift].append(kw["timestep"].clone() / scale), with_kwargs=True)
        T.align_head(model, latents, *args, steps=1, lr=1e-9, batch_size=2, seed=0, t_shift=t_shift,
                     progress=False, **kwargs)
        hook.remove()
        return seen[t_shift][0]

    plain, shifted, fixed = run(1.0), run("auto"), run(2.0)
    assert auto > 1.5 or family == "flux_schnell"
    torch.testing.assert_close(shifted, T.shift_timesteps(plain, auto))
    torch.testing.assert_close(fixed, T.shift_timesteps(plain, 2.0))
    for bad in (0, -1.0, float("nan"), float("inf"), "none", True):
        with pytest.raises(ValueError, match="t_shift"):
            T.align_head(model, latents, *args, steps=1, lr=1e-3, batch_size=2, seed=0, t_shift=bad,
                         progress=False, **kwargs)


def test_training_refuses_low_precision_parameters():
    """AdamW on bf16 weights loses most updates to rounding (a third of a Xavier-initialised Linear never moves in
    10 steps at lr 1e-4): refused, naming the parameters."""
    model = flux_p2()
    convert(model, latent_channels=8, patch_size=1)
    model.proj_out.to(torch.bfloat16)
    latents = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"float32.*torch.bfloat16.*proj_out"):
        T.align_head(model, latents, *text_data(2), steps=1, lr=1e-3, batch_size=2, seed=0, progress=False)


def test_align_head_sana_warns_when_masks_are_missing():
    torch.manual_seed(0)
    model = tiny_sana()
    text, mask, null_text = sana_text(2)
    latents = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    common = dict(steps=1, lr=1e-3, batch_size=2, seed=0, progress=False)
    with pytest.warns(UserWarning, match="null_encoder_attention_mask: every text token counts as real"):
        T.align_head(model, latents, text, None, null_text, None, encoder_attention_mask=mask, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.align_head(model, latents, text, None, null_text, None, encoder_attention_mask=mask,
                     null_encoder_attention_mask=torch.ones(5), **common)


def test_resume_align_head(tmp_path):
    def run(d, steps):
        model = flux_p2()
        torch.manual_seed(1)
        convert(model, latent_channels=8, patch_size=1)
        text, pooled, null_text, null_pooled = text_data(4)
        latents = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(0))
        out = T.align_head(model, latents, text, pooled, null_text, null_pooled, steps=steps, lr=1e-3,
                           batch_size=2, seed=0, checkpoint_dir=d, checkpoint_every=1, progress=False)
        return model, out["history"]

    full, h_full = run(str(tmp_path / "a"), 3)
    run(str(tmp_path / "b"), 2)
    resumed, h_res = run(str(tmp_path / "b"), 3)
    assert h_res == h_full
    assert torch.equal(full.proj_out.weight, resumed.proj_out.weight)
    assert torch.equal(full.x_embedder.weight, resumed.x_embedder.weight)


def test_checkpoints_from_before_the_timestep_shift_resume_as_unshifted(tmp_path):
    """A checkpoint written before `t_shift` existed (no key in its settings) trained unshifted: t_shift=1 resumes
    it, the new default (a shift) refuses it as other settings."""
    model = flux_p2()
    convert(model, latent_channels=8, patch_size=1)
    latents = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    common = dict(steps=2, lr=1e-3, batch_size=2, seed=0, checkpoint_dir=str(tmp_path), progress=False)
    T.align_head(model, latents, *text_data(2), t_shift=1.0, **{**common, "steps": 1})
    state_path = tmp_path / "step-00000001" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["meta"]["t_shift"]
    torch.save(state, state_path)
    with pytest.raises(ValueError, match="other settings"):
        T.align_head(model, latents, *text_data(2), **common)
    assert len(T.align_head(model, latents, *text_data(2), t_shift=1.0, **common)["history"]) == 2


# ----------------------------------------------------------------------------------------------- (g) errors
def _patch_embed(in_channels, patch_size=1):
    from diffusers.models.embeddings import PatchEmbed

    return PatchEmbed(height=8, width=8, patch_size=patch_size, in_channels=in_channels, embed_dim=8,
                      pos_embed_type=None)


@pytest.mark.parametrize("teacher, student, t_shape, s_shape, sp, message", [
    pytest.param(lambda: torch.nn.Linear(64, 8), lambda: torch.nn.Linear(32, 8), (16, 8, 8), (16, 2, 2), 1,
                 r"student_latents with 16 channels and patch size 1 give 16 features, student_embedder takes 32 "
                 r"\(expected 32 channels\)", id="linear-student"),
    pytest.param(lambda: torch.nn.Linear(64, 8), lambda: torch.nn.Linear(32, 8), (8, 8, 8), (32, 2, 2), 1,
                 r"teacher_latents with 8 channels and patch size 2 give 32 features, teacher_embedder takes 64 "
                 r"\(expected 16 channels\)", id="linear-teacher"),
    pytest.param(lambda: torch.nn.Linear(64, 8), lambda: torch.nn.Linear(30, 8), (16, 8, 8), (8, 4, 4), 2,
                 r"student_latents with 8 channels and patch size 2 give 32 features, student_embedder takes 30$",
                 id="linear-no-channel-count-fits"),
    pytest.param(lambda: _patch_embed(8), lambda: _patch_embed(32), (8, 8, 8), (16, 4, 4), 1,
                 "student_latents have 16 channels, student_embedder takes 32", id="patch-embed-student"),
    pytest.param(lambda: _patch_embed(8), lambda: _patch_embed(32), (4, 8, 8), (32, 4, 4), 1,
                 "teacher_latents have 4 channels, teacher_embedder takes 8", id="patch-embed-teacher"),
    pytest.param(lambda: _patch_embed(8), lambda: _patch_embed(32), (8, 8, 8), (32, 4, 4), 2,
                 "student_embedder is a PatchEmbed with patch size 1, got student_patch_size 2",
                 id="patch-embed-patch-size"),
])
def test_align_embedding_checks_latent_channels_up_front(teacher, student, t_shape, s_shape, sp, message):
    teacher = teacher()
    tp = 2 if isinstance(teacher, torch.nn.Linear) else 1
    with pytest.raises(ValueError, match=message):
        T.align_embedding(teacher, student(), torch.randn(2, *t_shape), torch.randn(2, *s_shape),
                          teacher_patch_size=tp, student_patch_size=sp, steps=1, lr=1e-3, batch_size=2, seed=0,
                          progress=False)


def test_bad_arguments(tmp_path):
    s, t = torch.randn(1, 6, 4), torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="integer multiple"):
        T.embedding_alignment_loss(s, t, (2, 3), (4, 4))
    with pytest.raises(ValueError, match="tokens"):
        T.embedding_alignment_loss(s, t, (2, 2), (4, 4))
    with pytest.raises(ValueError, match="mode"):
        T.embedding_alignment_loss(torch.randn(1, 4, 4), t, (2, 2), (4, 4), mode="bilinear")
    with pytest.raises(TypeError, match="student_grid"):
        T.embedding_alignment_loss(torch.randn(1, 4, 4), t, 2, (4, 4))
    lin = torch.nn.Linear(64, 8), torch.nn.Linear(32, 8)
    kw = dict(teacher_patch_size=2, student_patch_size=1, lr=1e-3, batch_size=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="same images"):
        T.align_embedding(*lin, torch.randn(3, 16, 8, 8), torch.randn(2, 32, 2, 2), steps=1, **kw)
    with pytest.raises(ValueError, match="integer multiple"):
        T.align_embedding(*lin, torch.randn(2, 16, 8, 8), torch.randn(2, 32, 3, 3), steps=1, **kw)
    with pytest.raises(ValueError, match="steps"):
        T.align_embedding(*lin, torch.randn(2, 16, 8, 8), torch.randn(2, 32, 2, 2), steps=0, **kw)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        T.align_embedding(*lin, torch.randn(2, 16, 8, 8), torch.randn(2, 32, 2, 2), steps=1, checkpoint_every=1,
                          **kw)
    d = str(tmp_path)
    data = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 2, 2)
    T.align_embedding(*lin, *data, steps=2, checkpoint_dir=d, **kw)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0\.001 there, 0\.01 here\)"):
        T.align_embedding(*lin, *data, steps=3, checkpoint_dir=d, **dict(kw, lr=1e-2))
    with pytest.raises(ValueError, match="other settings"):  # another latent cache
        T.align_embedding(*lin, data[0], data[1] + 1, steps=3, checkpoint_dir=d, **kw)
    with pytest.raises(ValueError, match="past steps"):
        T.align_embedding(*lin, *data, steps=1, checkpoint_dir=d, **kw)
    with pytest.raises(ValueError, match="probability"):
        T.drop_text(torch.randn(2, 3, 4), torch.randn(2, 5), torch.randn(3, 4), torch.randn(5), p=1.5)
    with pytest.raises(ValueError, match="null_text"):
        T.drop_text(torch.randn(2, 3, 4), torch.randn(2, 5), torch.randn(2, 4), torch.randn(5))
    with pytest.raises(ValueError, match="non-zero"):
        T.guidance_distilled_velocity(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        T.flow_matching_pair(torch.ones(2, 3), torch.ones(2, 4), torch.tensor(0.5))
    with pytest.raises(ValueError, match="SanaTransformer2DModel takes no pooled projections"):
        T.align_head(tiny_sana(), torch.randn(1, 8, 4, 4), torch.randn(1, 2, 24), torch.randn(1, 4),
                     torch.randn(2, 24), torch.randn(4), steps=1, lr=1e-3, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="latents have 4 channels, the model's patch_embed takes 8"):
        T.align_head(tiny_sana(), torch.randn(1, 4, 4, 4), torch.randn(1, 2, 24), None, torch.randn(2, 24), None,
                     steps=1, lr=1e-3, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="encoder_attention_mask must have shape"):
        T.align_head(tiny_sana(), torch.randn(1, 8, 4, 4), torch.randn(1, 2, 24), None, torch.randn(2, 24), None,
                     encoder_attention_mask=torch.ones(1, 3), steps=1, lr=1e-3, batch_size=1, seed=0)
    with pytest.raises(TypeError, match="sana_flow_matching_loss"):
        T.align_head_loss(tiny_sana(), *([None] * 10))
    with pytest.raises(TypeError, match="align_head_loss"):
        T.sana_flow_matching_loss(flux_p2(), torch.randn(1, 16, 64), torch.randn(1, 2, 32), torch.rand(1),
                                  torch.randn(1, 16, 64))
    model = flux_p2()
    with pytest.raises(ValueError, match="x_embedder takes 64"):
        T.align_head(model, torch.randn(1, 8, 4, 4), *text_data(1), steps=1, lr=1e-3, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="no LoRA"):
        T.merge_lora(model)
    T.add_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has adapters"):
        T.add_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="rank"):
        T.add_lora(flux_p2(), rank=0)


# ----------------------------------------------------------------------------------------------- (h) argument checks
_RUN = dict(steps=1, lr=1e-3, batch_size=2, seed=0, progress=False)


def _embedding_args(teacher=None, student=None, base=(2, 16, 8, 8), dc=(2, 32, 2, 2), **kwargs):
    """align_embedding's arguments: Linear teacher (16 channels packed 2x2) / student (32 channels, p = 1)."""
    teacher = torch.nn.Linear(64, 8) if teacher is None else teacher
    student = torch.nn.Linear(32, 8) if student is None else student
    g = torch.Generator().manual_seed(0)  # the same data every call: a rerun can resume
    return (teacher, student, torch.randn(*base, generator=g), torch.randn(*dc, generator=g)), dict(
        dict(teacher_patch_size=2, student_patch_size=1, **_RUN), **kwargs)


def _align_embedding(**kwargs):
    args, kw = _embedding_args(**kwargs)
    return T.align_embedding(*args, **kw)


def _flux_head(latents=(2, 8, 4, 4), text=None, **kwargs):
    """align_head on a converted tiny FLUX (8 channels, p = 1) with 2 samples' text unless overridden."""
    model = flux_p2()
    convert(model, latent_channels=8, patch_size=1)
    return T.align_head(model, torch.randn(*latents), *(text_data(2) if text is None else text), **dict(_RUN, **kwargs))


def _sana_head(model=None, latents=(2, 8, 4, 4), rows=2, **kwargs):
    text, mask, null_text = sana_text(rows)
    masks = dict(encoder_attention_mask=mask, null_encoder_attention_mask=torch.ones(5))
    return T.align_head(tiny_sana() if model is None else model, torch.randn(*latents), text, None, null_text, None,
                        **dict(_RUN, **masks, **kwargs))


def _guided_sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                  cross_attention_dim=64, caption_channels=24, mlp_ratio=2.5, sample_size=8,
                                  guidance_embeds=True)


def _flux_loss(t=(2,), w=(2,)):
    model, text, pooled, null_text, null_pooled, x0, noise, _, _, img_ids, txt_ids = head_loss_case()
    return T.align_head_loss(model, x0, text, pooled, img_ids, txt_ids, torch.rand(*t), noise, 1 + torch.rand(*w),
                             null_text, null_pooled)


def _sana_loss(t=(2,), mask=(2, 5)):
    x0, text = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 24)
    return T.sana_flow_matching_loss(tiny_sana(), x0, text, torch.rand(*t), torch.randn_like(x0), torch.ones(*mask))


def _frozen_flux_head():
    model = flux_p2()
    convert(model, latent_channels=8, patch_size=1)
    model.requires_grad_(False)
    return T.align_head(model, torch.randn(2, 8, 4, 4), *text_data(2), train_head_only=False, **_RUN)


_z = torch.zeros
_ARGUMENT_ERRORS = [
    ("tensor-type", lambda: T.flow_matching_pair([0.0], _z(1), torch.tensor(0.5)), TypeError,
     "x0 must be a torch.Tensor, got list"),
    ("tensor-ndim", lambda: T.embedding_alignment_loss(_z(2, 3), _z(1, 4, 3), (1, 2), (2, 2)), ValueError,
     r"student_tokens must have 3 dimensions, got shape \(2, 3\)"),
    ("loss-batch-or-hidden", lambda: T.embedding_alignment_loss(_z(2, 4, 3), _z(1, 16, 3), (2, 2), (4, 4)),
     ValueError, r"student_tokens \(2, 4, 3\) and teacher_tokens \(1, 16, 3\) must agree in batch size and hidden"),
    ("loss-teacher-tokens", lambda: T.embedding_alignment_loss(_z(1, 4, 3), _z(1, 15, 3), (2, 2), (4, 4)),
     ValueError, "teacher_tokens has 15 tokens, teacher_grid 4x4 has 16"),
    ("checkpoint-every-negative", lambda: _align_embedding(checkpoint_every=-1), ValueError,
     "checkpoint_every must be a non-negative int, got -1"),
    ("checkpoint-every-bool", lambda: _align_embedding(checkpoint_every=True), ValueError,
     "checkpoint_every must be a non-negative int, got True"),
    ("embedding-patch-multiple", lambda: _align_embedding(teacher_patch_size=3), ValueError,
     r"teacher_latents spatial size \(8, 8\) must be a multiple of teacher_patch_size \(3\)"),
    ("embedding-mode", lambda: _align_embedding(mode="bilinear"), ValueError,
     "mode must be 'pool' or 'upsample', got 'bilinear'"),
    ("embedding-no-parameters", lambda: _align_embedding(student=torch.nn.Identity()), ValueError,
     "student_embedder has no parameters to train"),
    ("seed-float", lambda: _align_embedding(seed=1.5), TypeError, "seed must be an int, got 1.5"),
    ("seed-bool", lambda: _align_embedding(seed=True), TypeError, "seed must be an int, got True"),
    ("flow-t-length", lambda: T.flow_matching_pair(_z(2, 3), _z(2, 3), _z(3)), ValueError,
     r"t must be a scalar or have shape \(2,\), got \(3,\)"),
    ("flow-t-2d", lambda: T.flow_matching_pair(_z(2, 3), _z(2, 3), _z(2, 1)), ValueError,
     r"t must be a scalar or have shape \(2,\), got \(2, 1\)"),
    ("velocity-shapes", lambda: T.guidance_distilled_velocity(_z(2, 3), _z(2, 4), 2.0), ValueError,
     r"v_guided \(2, 3\) and v_unguided \(2, 4\) differ in shape"),
    ("velocity-w-length", lambda: T.guidance_distilled_velocity(_z(2, 3), _z(2, 3), torch.ones(3)), ValueError,
     r"w must be a scalar or have shape \(2,\), got \(3,\)"),
    ("velocity-w-zero", lambda: T.guidance_distilled_velocity(_z(2, 3), _z(2, 3), 0), ValueError,
     "w must be a non-zero number or tensor, got 0"),
    ("velocity-w-bool", lambda: T.guidance_distilled_velocity(_z(2, 3), _z(2, 3), True), ValueError,
     "w must be a non-zero number or tensor, got True"),
    ("velocity-w-str", lambda: T.guidance_distilled_velocity(_z(2, 3), _z(2, 3), "2"), ValueError,
     "w must be a non-zero number or tensor, got '2'"),
    ("guidance-range", lambda: T.sample_guidance(4, low=5.0, high=2.0), ValueError, "need low < high, got 5.0, 2.0"),
    ("drop-text-batch", lambda: T.drop_text(_z(2, 3, 4), _z(3, 5), _z(3, 4), _z(5)), ValueError,
     "text_embeds and pooled must have the same batch size, got 2 and 3"),
    ("drop-text-null-pooled", lambda: T.drop_text(_z(2, 3, 4), _z(2, 5), _z(3, 4), _z(4)), ValueError,
     r"null_pooled must have shape \(5,\) \(or with a leading 1\), got \(4,\)"),
    ("drop-text-null-pooled-2d", lambda: T.drop_text(_z(2, 3, 4), _z(2, 5), _z(3, 4), _z(5, 1)), ValueError,
     r"null_pooled must have shape \(5,\) \(or with a leading 1\), got \(5, 1\)"),
    ("drop-text-null-text", lambda: T.drop_text(_z(2, 3, 4), _z(2, 5), _z(4, 4), _z(5)), ValueError,
     r"null_text must have shape \(3, 4\) \(or with a leading 1\), got \(4, 4\)"),
    ("flux-loss-w", lambda: _flux_loss(w=(3,)), ValueError, r"t and w must have shape \(2,\), got \(2,\) and \(3,\)"),
    ("flux-loss-t", lambda: _flux_loss(t=(1,)), ValueError, r"t and w must have shape \(2,\), got \(1,\) and \(2,\)"),
    ("sana-loss-t", lambda: _sana_loss(t=(3,)), ValueError,
     r"t must have shape \(2,\) and encoder_hidden_states 2 rows, got \(3,\) and \(2, 5, 24\)"),
    ("sana-loss-mask", lambda: _sana_loss(mask=(2, 4)), ValueError,
     r"encoder_attention_mask must have shape \(2, 5\), got \(2, 4\)"),
    ("flux-head-pooled", lambda: _flux_head(text=text_data(2)[:1] + (None,) + text_data(2)[2:]), ValueError,
     "pooled_projections is required for FLUX"),
    ("flux-head-null-pooled", lambda: _flux_head(text=text_data(2)[:3] + (None,)), ValueError,
     "null_pooled_projections is required for FLUX"),
    ("flux-head-samples", lambda: _flux_head(latents=(3, 8, 4, 4)), ValueError,
     "latents, encoder_hidden_states and pooled_projections must have the same number of samples, got 3, 2, 2"),
    ("flux-head-guidance-low", lambda: _flux_head(guidance_range=(0.0, 5.0)), ValueError,
     r"guidance_range must be \(low, high\) with 0 < low < high, got \(0\.0, 5\.0\)"),
    ("flux-head-guidance-order", lambda: _flux_head(guidance_range=(5.0, 2.0)), ValueError,
     r"guidance_range must be \(low, high\) with 0 < low < high, got \(5\.0, 2\.0\)"),
    ("flux-head-t-sampling", lambda: _flux_head(t_sampling="gaussian"), ValueError,
     "t_sampling must be 'logit_normal' or 'uniform', got 'gaussian'"),
    ("sana-head-guidance-embeds", lambda: _sana_head(model=_guided_sana()), ValueError,
     r"guidance-embedded SANA \(SANA-Sprint\) is not supported by align_head"),
    ("sana-head-patch-size", lambda: _sana_head(patch_size=2), ValueError,
     "patch_size 2 differs from the model's config.patch_size 1"),
    ("sana-head-patch-multiple", lambda: _sana_head(model=tiny_sana_patched_latents(patch_size=2),
                                                    latents=(2, 8, 5, 4)), ValueError,
     r"latents spatial size \(5, 4\) must be a multiple of the patch size 2"),
    ("sana-head-samples", lambda: _sana_head(rows=3), ValueError,
     "latents and encoder_hidden_states must have the same number of samples, got 2 and 3"),
    ("sana-head-t-sampling", lambda: _sana_head(t_sampling="gaussian"), ValueError,
     "t_sampling must be 'logit_normal' or 'uniform', got 'gaussian'"),
    ("head-no-trainable-parameters", _frozen_flux_head, ValueError, "transformer has no trainable parameters"),
]


@pytest.mark.parametrize("call, error, match", [pytest.param(*case[1:], id=case[0]) for case in _ARGUMENT_ERRORS])
def test_argument_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _modes(*modules):
    return [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for module in modules
            for m in module.modules()]


def test_a_refused_argument_leaves_the_models_as_they_were():
    """An argument refused in the training loop (seed, checkpoint_every, lr): the models keep their weights, their
    train / eval modes and requires_grad flags (the stages set those before the loop checks its settings)."""
    for bad in (dict(seed=1.5), dict(checkpoint_every=-1)):
        args, kw = _embedding_args(**bad)
        args[0].requires_grad_(True).train()
        args[1].requires_grad_(False).eval()
        before, modes = {n: p.clone() for n, p in args[1].named_parameters()}, _modes(*args[:2])
        with pytest.raises((TypeError, ValueError)):
            T.align_embedding(*args, **kw)
        assert all(torch.equal(p, before[n]) for n, p in args[1].named_parameters())
        assert _modes(*args[:2]) == modes
    model = flux_p2()
    convert(model, latent_channels=8, patch_size=1)
    model.requires_grad_(True).train()
    modes = _modes(model)
    with pytest.raises(ValueError, match="lr must be a positive"):
        T.align_head(model, torch.randn(2, 8, 4, 4), *text_data(2), **dict(_RUN, lr=-1.0))
    assert _modes(model) == modes


def test_a_learning_rate_that_overflows_is_refused_and_a_diverged_last_step_is_not_saved(tmp_path):
    """lr past float32 in AdamW's first step size: a ValueError naming lr (torch's AdamW raised a bare RuntimeError).
    A last step that makes the weights non-finite (its loss is never computed) raises, and writes no checkpoint."""
    args, kw = _embedding_args(lr=1e38)
    before = {n: p.clone() for n, p in args[1].named_parameters()}
    with pytest.raises(ValueError, match=r"lr=1e\+38 is too large: AdamW's first step size"):
        T.align_embedding(*args, **kw)
    assert all(torch.equal(p, before[n]) for n, p in args[1].named_parameters())
    def large_student():  # weight decay's first step, w * (1 - lr * 0.01), overflows float32 at |w| = 1e4
        student = torch.nn.Linear(32, 8)
        with torch.no_grad():
            student.weight.fill_(1e4)
        return student

    with pytest.raises(FloatingPointError, match=r"align embedding: 2 trained parameter\(s\) not finite after "
                                                 r"step 1, e\.g\. \['weight', 'bias'\] \(lr too large\?\)"):
        _align_embedding(student=large_student(), lr=3e37)
    with pytest.raises(FloatingPointError, match="not finite after step 1"):
        _align_embedding(student=large_student(), lr=3e37, checkpoint_dir=str(tmp_path))
    assert T.latest_checkpoint(str(tmp_path)) is None
    assert _align_embedding(lr=1e-3)["history"]  # a sane lr trains


def test_checkpoints_that_do_not_fit_the_run_are_refused_before_loading(tmp_path):
    """A checkpoint whose weights name other parameters (an edited or foreign trainable.safetensors: the settings
    already name the parameters) or hold other shapes (a student of another width): refused, the student unchanged,
    no checkpoint written."""
    from safetensors.torch import load_file, save_file

    d = str(tmp_path)
    args, kw = _embedding_args(checkpoint_dir=d)
    T.align_embedding(*args, **kw)
    weights = tmp_path / "step-00000001" / "trainable.safetensors"
    original = load_file(str(weights))
    save_file(dict(original, extra=torch.zeros(1)), str(weights))
    args, kw = _embedding_args(checkpoint_dir=d, steps=2)
    before = args[1].weight.clone()
    with pytest.raises(ValueError, match=r"holds parameters \['extra'\] that do not match the trainable parameters"):
        T.align_embedding(*args, **kw)
    assert torch.equal(args[1].weight, before)
    # a two-layer student whose second layer is narrower: its first layer fits, and must not be loaded either
    d = str(tmp_path / "two_layers")
    args, kw = _embedding_args(student=torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 8)),
                               checkpoint_dir=d)
    T.align_embedding(*args, **kw)
    args, kw = _embedding_args(teacher=torch.nn.Linear(64, 4), checkpoint_dir=d, steps=2,
                               student=torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 4)))
    before = [p.clone() for p in args[1].parameters()]
    with pytest.raises(ValueError, match=r"step-00000001: 1.weight has shape \(8, 8\), the model \(4, 8\)"):
        T.align_embedding(*args, **kw)
    assert all(torch.equal(p, b) for p, b in zip(args[1].parameters(), before, strict=True))
    assert os.listdir(d) == ["step-00000001"]


def test_add_lora_refuses_what_peft_would_break_and_leaves_the_model_as_it_was():
    """A quantized model (peft cannot wrap its layers), adapters already injected by peft directly (peft would
    re-initialise a trained one of the same name), a bad adapter name: refused, flags and modules unchanged."""
    import dcgen_kernels
    from tests.helpers import add_lora as inject_lora

    quantized = flux_p2()
    dcgen_kernels.quantize(quantized, quant="fp8", backend="reference")
    injected = inject_lora(flux_p2(), ["to_q"])
    for model, error, match in ((quantized, ValueError, "transformer is quantized to fp8: peft cannot wrap"),
                                (injected, ValueError, r"already has adapters \(transformer_blocks.0.attn.to_q"),
                                (flux_p2(), TypeError, "adapter_name must be a non-empty str, got 5")):
        flags, modules = _modes(model), dict(model.named_modules())
        with pytest.raises(error, match=match):
            T.add_lora(model, rank=2, alpha=2, **({"adapter_name": 5} if error is TypeError else {}))
        assert _modes(model) == flags and dict(model.named_modules()) == modules
        assert not getattr(model, "_hf_peft_config_loaded", False)
