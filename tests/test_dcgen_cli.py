"""DC-Gen CLI end to end on tiny models (CPU): encode -> align-embedding -> align-head -> lora -> merge."""

import os
import re

import numpy as np
import pytest
import torch

from dcgen_kernels.dcgen import data
from dcgen_kernels.dcgen.__main__ import main


def _tiny_kl():
    """AutoencoderKL with FLUX's latent layout: 16 channels, 8x down (4 blocks = 3 downsamples)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=4,
                         layers_per_block=1, mid_block_add_attention=False, sample_size=64,
                         scaling_factor=0.3611, shift_factor=0.1159).eval()


def _tiny_dc(latent_channels=8, widths=(8, 8, 8, 16, 16)):
    """AutoencoderDC, one ResBlock stage per width = 2**(len(widths) - 1)x down; by default 16x down with 8 latent
    channels: 64 px -> (8, 4, 4)."""
    from diffusers import AutoencoderDC

    stages = len(widths)
    blocks = ("ResBlock",) * stages
    return AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
                         encoder_block_types=blocks, decoder_block_types=blocks, encoder_block_out_channels=widths,
                         decoder_block_out_channels=widths, encoder_layers_per_block=(1,) * stages,
                         decoder_layers_per_block=(1,) * stages, encoder_qkv_multiscales=((),) * stages,
                         decoder_qkv_multiscales=((),) * stages, scaling_factor=0.5).eval()


def _tiny_base_flux():
    """Base FLUX layout: 16-channel latents packed 2x2 -> in_channels 64; guidance-distilled."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, build in (("kl", _tiny_kl), ("dc", _tiny_dc), ("flux", _tiny_base_flux)):
        paths[name] = str(root / name)
        build().save_pretrained(paths[name])
    return paths


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_end_to_end(models, tmp_path, capsys):
    from diffusers import FluxTransformer2DModel

    cache = str(tmp_path / "cache.safetensors")
    code, out, err = _run(["encode", "--sample-images", "--base-ae", models["kl"], "--dc-ae", models["dc"],
                           "--size", "64", "--batch-size", "3", "--out", cache], capsys)
    assert code == 0, err
    assert "encode:" in out
    base, dc, meta = data.load_latent_cache(cache)
    n = len(data.sample_images())
    assert base.shape == (n, 16, 8, 8) and dc.shape == (n, 8, 4, 4) and meta["count"] == n

    stage1 = str(tmp_path / "stage1")
    code, out, err = _run(["align-embedding", "--transformer", models["flux"], "--cache", cache,
                           "--latent-channels", "8", "--patch-size", "1", "--steps", "30", "--lr", "3e-2",
                           "--batch-size", "4", "--seed", "0", "--checkpoint-dir", str(tmp_path / "ck1"),
                           "--checkpoint-every", "10", "--out", stage1, "--quiet"], capsys)
    assert code == 0, err
    first, last = (float(v) for v in out.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < 0.5 * first, out
    converted = FluxTransformer2DModel.from_pretrained(stage1)
    assert converted.x_embedder.in_features == 8 and converted.proj_out.out_features == 8
    base_model = FluxTransformer2DModel.from_pretrained(models["flux"])
    torch.testing.assert_close(converted.transformer_blocks[0].attn.to_q.weight,
                               base_model.transformer_blocks[0].attn.to_q.weight, rtol=0, atol=0)
    assert os.path.isdir(tmp_path / "ck1" / "step-00000030")

    stage2 = str(tmp_path / "stage2")
    code, out, err = _run(["align-head", "--transformer", stage1, "--cache", cache, "--random-text", "--steps", "2",
                           "--lr", "1e-3", "--batch-size", "2", "--out", stage2, "--quiet"], capsys)
    assert code == 0, err
    assert "random text" in out and "smoke" in err
    head = FluxTransformer2DModel.from_pretrained(stage2)
    assert not torch.equal(head.proj_out.weight, converted.proj_out.weight)
    torch.testing.assert_close(head.transformer_blocks[0].ff.net[2].weight,
                               converted.transformer_blocks[0].ff.net[2].weight, rtol=0, atol=0)

    # text embeddings from a file (one shared row) work as well
    from safetensors.torch import save_file

    text = str(tmp_path / "text.safetensors")
    save_file(dict(encoder_hidden_states=torch.randn(1, 5, 32), pooled_projections=torch.randn(1, 16),
                   null_encoder_hidden_states=torch.zeros(5, 32), null_pooled_projections=torch.zeros(16)), text)
    stage3 = str(tmp_path / "stage3")
    code, out, err = _run(["lora", "--transformer", stage2, "--cache", cache, "--text-embeds", text, "--rank", "4",
                           "--alpha", "8", "--steps", "2", "--lr", "1e-2", "--batch-size", "2", "--out", stage3,
                           "--quiet"], capsys)
    assert code == 0, err
    assert os.path.isdir(os.path.join(stage3, "lora"))

    merged_dir = str(tmp_path / "merged")
    code, out, err = _run(["merge", "--transformer", stage3, "--out", merged_dir], capsys)
    assert code == 0, err
    merged = FluxTransformer2DModel.from_pretrained(merged_dir).eval()
    assert not any("lora" in k for k in merged.state_dict())
    # merged == unmerged base + adapter, and the trained LoRA changed the blocks
    unmerged = FluxTransformer2DModel.from_pretrained(stage3).eval()
    before = unmerged.transformer_blocks[0].attn.to_q.weight.clone()
    unmerged.load_lora_adapter(os.path.join(stage3, "lora"), weight_name="pytorch_lora_weights.safetensors",
                               prefix=None)
    inputs = dict(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 5, 32),
                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]),
                  img_ids=data_ids(4), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.0]), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs)[0], unmerged(**inputs)[0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(merged.transformer_blocks[0].attn.to_q.weight, before)
    # the merge applies the trained scale alpha / rank (= 8 / 4), read back from the adapter's metadata
    from safetensors.torch import load_file

    lora = load_file(os.path.join(stage3, "lora", "pytorch_lora_weights.safetensors"))
    a = next(v for k, v in lora.items() if k.startswith("transformer_blocks.0.attn.to_q.lora_A"))
    b = next(v for k, v in lora.items() if k.startswith("transformer_blocks.0.attn.to_q.lora_B"))
    torch.testing.assert_close(merged.transformer_blocks[0].attn.to_q.weight - before, 2.0 * b @ a,
                               rtol=1e-4, atol=1e-6)


def data_ids(grid):
    from dcgen_kernels.dcgen import latent_image_ids

    return latent_image_ids(grid, grid, 1)


def test_missing_local_model_names_path(models, tmp_path, capsys):
    missing = str(tmp_path / "no-such-vae")
    code, _, err = _run(["encode", "--sample-images", "--base-ae", missing, "--dc-ae", models["dc"], "--size", "64",
                         "--out", str(tmp_path / "c.safetensors")], capsys)
    assert code == 2 and missing in err and "save_pretrained" in err
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        data.load_local_model(type(_tiny_kl()), missing)
    code, _, err = _run(["merge", "--transformer", missing, "--out", str(tmp_path / "merged")], capsys)
    assert code == 2 and f"--transformer: directory {missing!r} does not exist" in err


def test_empty_or_bad_image_folder(models, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["encode", "--images", str(empty), "--base-ae", models["kl"], "--dc-ae", models["dc"],
                         "--size", "64", "--out", str(tmp_path / "c.safetensors")], capsys)
    assert code == 2 and "no image files" in err and str(empty) in err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(str(tmp_path / "missing"), 32)
    (empty / "broken.png").write_bytes(b"not an image")
    with pytest.raises(data.DataError, match="broken.png"):
        data.load_image_folder(str(empty), 32)


def test_image_folder_and_sample_images(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(folder / "gray.png")  # gray -> RGB
    Image.fromarray(np.zeros((50, 30, 4), np.uint8)).save(folder / "rgba.png")  # RGBA -> RGB, transparent: white
    opaque = np.zeros((50, 30, 4), np.uint8)
    opaque[..., 3] = 255
    Image.fromarray(opaque).save(folder / "rgba_opaque.png")
    x = data.load_image_folder(str(folder), 16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(3, 16, 16)) and torch.allclose(x[1], torch.ones(3, 16, 16))
    assert torch.allclose(x[2], -torch.ones(3, 16, 16))
    images = data.sample_images()
    assert len(images) >= 5 and all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in images)
    assert data.sample_images(["coffee"])[0].shape == (400, 600, 3)


def test_image_files_are_read_as_they_display(tmp_path):
    """EXIF orientation applied, transparency over white, 16-bit gray scaled (PIL's convert clips it at 255)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    halves = np.zeros((16, 32, 3), np.uint8)
    halves[:, :16, 0] = 255  # red left half, blue right half as stored
    halves[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(halves).save(folder / "a_rotated.jpg", exif=exif, quality=100)
    half_alpha = np.zeros((8, 8, 4), np.uint8)
    half_alpha[..., 0], half_alpha[..., 3] = 255, 128  # red at alpha 128 over white
    Image.fromarray(half_alpha).save(folder / "b_alpha.png")
    ramp = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(folder / "c_gray16.png")
    assert Image.open(folder / "c_gray16.png").mode.startswith("I")  # a 16-bit file, which convert("RGB") clips
    x = data.load_image_folder(str(folder), 8)
    rotated = x[0].mean(dim=2)  # displayed: red on top, blue below (stored: left / right)
    assert rotated[0, 0] > 0.9 and rotated[2, 0] < -0.9 and rotated[0, -1] < -0.9 and rotated[2, -1] > 0.9
    torch.testing.assert_close(x[1][:, 4, 4], torch.tensor([1.0, 127 / 127.5 - 1, 127 / 127.5 - 1]), atol=1 / 127.5,
                               rtol=0)
    assert torch.equal(x[2], data.images_to_tensor([ramp / 65535.0], 8)[0])  # as the array in [0, 1]
    assert x[2][0, 0, 0] == -1 and x[2][0, 0, -1] == 1


def test_image_folder_warns_what_it_leaves_out_and_refuses_what_it_cannot_read(tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "more" / "nested.png")
    (folder / "notes.txt").write_text("captions")
    (folder / ".DS_Store").write_bytes(b"")
    frames = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (255, 0)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning) as caught:
        x = data.load_image_folder(str(folder), 8)
    messages = [str(w.message) for w in caught]
    assert any("2 entries are not image files and are left out" in m and "more, notes.txt" in m for m in messages)
    assert any("only the first frame of 1 multi-frame images is read: anim.gif" in m for m in messages)
    assert x.shape == (1, 3, 8, 8) and x.min() > 0.9  # the white first frame

    float_folder = tmp_path / "float"
    float_folder.mkdir()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(float_folder / "f.tiff")
    with pytest.raises(data.DataError, match=r"f.tiff' has mode F \(32-bit float samples"):
        data.load_image_folder(str(float_folder), 8)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # a 64-pixel image counts as a decompression bomb
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(big / "bomb.png")
    with pytest.raises(data.DataError, match="could not read image .*bomb.png.*decompression bomb"):
        data.load_image_folder(str(big), 8)


@pytest.mark.parametrize("image, match", [
    (np.zeros((0, 5, 3), np.uint8), r"image '#0' is empty \(shape \(0, 5, 3\)\)"),
    (np.full((4, 4, 3), 200.0), r"image '#0' is float64 with values in \[200, 200\]; float images must be in"),
    (np.full((4, 4, 3), -1.0), r"values in \[-1, -1\]"),
    (np.full((4, 4, 3), np.nan), r"values in \[nan, nan\]"),
])
def test_images_to_tensor_refuses_empty_or_out_of_range_images(image, match):
    with pytest.raises(data.DataError, match=match):
        data.images_to_tensor([image], 4)


def test_encode_refuses_an_unwritable_out_before_work_and_reports_host_memory(models, tmp_path, capsys,
                                                                              monkeypatch):
    from dcgen_kernels.dcgen import data as data_module

    args = ["encode", "--sample-images", "--base-ae", models["kl"], "--dc-ae", models["dc"], "--size", "64"]
    read = []
    monkeypatch.setattr(data_module, "sample_images", lambda: read.append(1) or [np.zeros((8, 8, 3), np.uint8)])
    code, _, err = _run([*args, "--out", "/proc/cache.safetensors"], capsys)
    assert code == 2 and "--out '/proc/cache.safetensors' cannot be written: creating a file in '/proc'" in err
    assert not read
    monkeypatch.setattr(data_module, "images_to_tensor", lambda *a: (_ for _ in ()).throw(MemoryError()))
    code, _, err = _run([*args, "--out", str(tmp_path / "c.safetensors")], capsys)
    assert code == 1 and "error: out of host memory: a smaller --size" in err


def test_encode_records_the_folder_row_order(models, tmp_path, capsys):
    """encode-text's --prompts follow the cache's rows: the cache names the files in that order."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, value in (("b.png", 255), ("a.bmp", 0), ("c.PNG", 128)):
        Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(folder / name)
    (folder / "captions.txt").write_text("not an image\n")
    cache = str(tmp_path / "cache.safetensors")
    code, _, err = _run(["encode", "--images", str(folder), "--base-ae", models["kl"], "--dc-ae", models["dc"],
                         "--size", "64", "--out", cache, "--device", "cpu"], capsys)
    assert code == 0, err
    base, _, meta = data.load_latent_cache(cache)
    assert meta["images"] == ["a.bmp", "b.png", "c.PNG"] and base.shape[0] == 3
    # rows follow that order: the black image's latents first, the white one's second
    from diffusers import AutoencoderKL

    kl = AutoencoderKL.from_pretrained(models["kl"])
    black = data.encode_latents(-torch.ones(1, 3, 64, 64), kl)
    # CPU convolutions differ by ~1e-3 between batch sizes here; the three images' latents differ by > 0.3
    torch.testing.assert_close(base[:1], black, rtol=0, atol=5e-3)


def test_images_are_center_cropped_and_resized_without_transposing():
    """A non-square image with a gradient along each axis: the cache must hold the centre square, rows as rows."""
    from PIL import Image

    height, width = 40, 70
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([rows * 6, cols * 3, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    x = data.images_to_tensor([image], 20)
    left = (width - height) // 2
    expected = Image.fromarray(image).crop((left, 0, left + height, height)).resize((20, 20), Image.BICUBIC)
    expected = torch.from_numpy(np.asarray(expected)).permute(2, 0, 1).float() / 127.5 - 1.0
    assert x.shape == (1, 3, 20, 20) and torch.equal(x[0], expected)


def test_encode_latents_scaling():
    torch.manual_seed(0)
    kl, dc = _tiny_kl(), _tiny_dc()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = kl.encode(x).latent_dist.mean
        zdc = dc.encode(x).latent
    torch.testing.assert_close(data.encode_latents(x, kl, 1), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(data.encode_latents(x, dc, 1), zdc * 0.5)


def test_cache_round_trip(tmp_path):
    base, dc = torch.randn(3, 16, 8, 8), torch.randn(3, 8, 4, 4)
    path = str(tmp_path / "sub" / "cache.safetensors")
    data.save_latent_cache(path, base, dc, dict(size=64, source="x"))
    b2, d2, meta = data.load_latent_cache(path)
    assert torch.equal(b2, base) and torch.equal(d2, dc) and meta == dict(size=64, source="x")
    with pytest.raises(FileNotFoundError, match="encode"):
        data.load_latent_cache(str(tmp_path / "nope.safetensors"))


def test_bad_arguments_exit_2(models, tmp_path, capsys):
    code, _, err = _run(["align-head", "--transformer", models["flux"], "--cache", "x"], capsys)  # no text / out
    assert code == 2 and "error" in err
    code, _, err = _run(["merge", "--transformer", models["flux"], "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "lora/" in err
    code, _, err = _run(["frobnicate"], capsys)
    assert code == 2
    if not torch.cuda.is_available():
        code, _, err = _run(["encode", "--sample-images", "--base-ae", models["kl"], "--dc-ae", models["dc"],
                             "--size", "64", "--out", str(tmp_path / "c.safetensors"), "--device", "cuda"], capsys)
        assert code == 2 and "no CUDA GPU" in err


def test_outputs_and_values_that_would_fail_late_exit_2_before_any_work(models, tmp_path, capsys, monkeypatch):
    """An --out that is a file (save_pretrained only logs and returns: the trained model was lost), a file as
    --checkpoint-dir, no text tokens, a size the autoencoders cannot downsample, a transformer as --dc-ae, an
    unsupported device, a seed torch cannot take, a patch size the latent grid cannot take: exit 2 with the flag
    named, before training or encoding."""
    from dcgen_kernels import dcgen

    monkeypatch.setattr(dcgen, "align_head", lambda *a, **k: pytest.fail("trained despite a bad argument"))
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), dict(source="synthetic"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    head = ["align-head", "--transformer", models["flux"], "--cache", cache, "--random-text", "--steps", "1",
            "--quiet", "--device", "cpu"]
    encode = ["encode", "--sample-images", "--base-ae", models["kl"], "--dc-ae", models["dc"], "--device", "cpu"]
    out_dir = ["--out", str(tmp_path / "out")]
    for argv, message in (
            (head + ["--out", str(a_file)], "--out"),
            (head + out_dir + ["--checkpoint-dir", str(a_file)], "--checkpoint-dir"),
            (head + out_dir + ["--random-text-tokens", "0"], "--random-text-tokens must be >= 1"),
            (head + out_dir + ["--seed", "99999999999999999999"], "argument --seed: must be an int in [0, 2**63)"),
            (head + out_dir + ["--t-shift", "0"], "argument --t-shift: must be 'auto' or a positive number"),
            (head + out_dir + ["--t-shift", "inf"], "argument --t-shift: must be 'auto' or a positive number"),
            (["merge", "--transformer", models["flux"], "--out", str(a_file)], "--out"),
            (encode + ["--size", "63", "--out", cache], "multiples of AutoencoderKL's downsampling factor 8"),
            (encode + ["--size", "64", "--out", str(tmp_path)], "--out"),
            (encode[:5] + [models["flux"], "--size", "64", "--out", cache],
             "names autoencoder class 'FluxTransformer2DModel'"),
            (encode[:-1] + ["meta", "--size", "64", "--out", cache], "--device must be cpu or cuda"),
            (["align-embedding", "--transformer", models["flux"], "--cache", cache, "--patch-size", "3", "--steps",
              "1", "--quiet", "--device", "cpu"] + out_dir,
             "--patch-size 3: must be >= 1 and divide the cache's DC latent grid 4x4")):
        code, _, err = _run(argv, capsys)
        assert code == 2 and message in err, (argv, err)
    assert a_file.read_text() == ""


def test_t_shift_reaches_align_head(models, tmp_path, capsys, monkeypatch):
    from dcgen_kernels import dcgen

    seen = []
    monkeypatch.setattr(dcgen, "align_head", lambda *a, **k: seen.append(k["t_shift"]) or {"history": [1.0]})
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), dict(source="synthetic"))
    head = ["align-head", "--transformer", models["flux"], "--cache", cache, "--random-text", "--steps", "1",
            "--quiet", "--device", "cpu"]
    for extra, out in (([], "a"), (["--t-shift", "2.5"], "b")):
        code, _, err = _run(head + extra + ["--out", str(tmp_path / out)], capsys)
        assert code == 0, err
    assert seen == ["auto", 2.5]


def test_bad_text_embeddings_exit_2(models, tmp_path, capsys):
    from safetensors.torch import save_file

    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), dict(source="synthetic"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    short_null = str(tmp_path / "short_null.safetensors")
    save_file(dict(encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 16),
                   null_encoder_hidden_states=torch.randn(7, 32), null_pooled_projections=torch.randn(16)), short_null)
    for path, message in ((str(corrupt), "not a readable safetensors file"),
                          (short_null, r"null_encoder_hidden_states must have shape (5, 32)")):
        code, _, err = _run(["align-head", "--transformer", models["flux"], "--cache", cache, "--text-embeds", path,
                             "--steps", "1", "--out", str(tmp_path / "x"), "--quiet", "--device", "cpu"], capsys)
        assert code == 2 and message in err, err


def test_encode_with_a_dc_ae_as_base_autoencoder(models, tmp_path, capsys):
    """SANA's base autoencoder is DC-AE f32c32: `encode` takes an AutoencoderDC as --base-ae too."""
    cache = str(tmp_path / "cache.safetensors")
    code, out, err = _run(["encode", "--sample-images", "--base-ae", models["dc"], "--dc-ae", models["dc"],
                           "--size", "64", "--out", cache, "--device", "cpu"], capsys)
    assert code == 0, err
    base, dc, _ = data.load_latent_cache(cache)
    assert base.shape == dc.shape == (len(data.sample_images()), 8, 4, 4)


def test_cli_sana_end_to_end(tmp_path, capsys):
    """The stages route by the model directory's class: a tiny SANA through align-embedding -> merge."""
    from diffusers import SanaTransformer2DModel
    from safetensors.torch import save_file

    from .helpers import tiny_sana

    torch.manual_seed(0)
    base_dir = str(tmp_path / "sana")
    tiny_sana().save_pretrained(base_dir)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, 4, 4, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    dc = torch.einsum("oc,nchw->nohw", torch.randn(16, 8, generator=g) / 3, torch.nn.functional.avg_pool2d(base, 2))
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, base, dc, dict(source="synthetic"))

    stage1 = str(tmp_path / "stage1")
    code, out, err = _run(["align-embedding", "--transformer", base_dir, "--cache", cache, "--steps", "30",
                           "--lr", "3e-2", "--batch-size", "3", "--out", stage1, "--quiet"], capsys)
    assert code == 0, err
    first, last = (float(v) for v in out.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < 0.5 * first, out
    converted = SanaTransformer2DModel.from_pretrained(stage1)
    assert converted.config.in_channels == 16 and converted.proj_out.out_features == 16

    stage2 = str(tmp_path / "stage2")
    code, out, err = _run(["align-head", "--transformer", stage1, "--cache", cache, "--random-text", "--steps", "2",
                           "--lr", "1e-3", "--batch-size", "2", "--out", stage2, "--quiet"], capsys)
    assert code == 0, err
    head = SanaTransformer2DModel.from_pretrained(stage2)
    assert not torch.equal(head.proj_out.weight, converted.proj_out.weight)
    assert not torch.equal(head.patch_embed.proj.weight, converted.patch_embed.proj.weight)
    torch.testing.assert_close(head.transformer_blocks[0].ff.conv_point.weight,
                               converted.transformer_blocks[0].ff.conv_point.weight, rtol=0, atol=0)

    text = str(tmp_path / "text.safetensors")
    mask = torch.ones(1, 5)
    mask[0, 3:] = 0
    save_file(dict(encoder_hidden_states=torch.randn(1, 5, 24), encoder_attention_mask=mask,
                   null_encoder_hidden_states=torch.zeros(5, 24)), text)
    stage3 = str(tmp_path / "stage3")
    code, out, err = _run(["lora", "--transformer", stage2, "--cache", cache, "--text-embeds", text, "--rank", "4",
                           "--alpha", "8", "--steps", "2", "--lr", "1e-2", "--batch-size", "2", "--out", stage3,
                           "--quiet"], capsys)
    assert code == 0, err
    assert "has no null_encoder_attention_mask: every text token counts as real" in err  # the file lacks it
    merged_dir = str(tmp_path / "merged")
    code, out, err = _run(["merge", "--transformer", stage3, "--out", merged_dir], capsys)
    assert code == 0, err
    merged = SanaTransformer2DModel.from_pretrained(merged_dir).eval()
    unmerged = SanaTransformer2DModel.from_pretrained(stage3).eval()
    unmerged.load_lora_adapter(os.path.join(stage3, "lora"), weight_name="pytorch_lora_weights.safetensors",
                               prefix=None)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, 4), encoder_hidden_states=torch.randn(1, 5, 24),
                  encoder_attention_mask=mask, timestep=torch.tensor([500.0]), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs)[0], unmerged(**inputs)[0], rtol=1e-4, atol=1e-5)

    bad = str(tmp_path / "bad.safetensors")
    save_file(dict(encoder_hidden_states=torch.randn(1, 5, 24)), bad)
    code, _, err = _run(["align-head", "--transformer", stage1, "--cache", cache, "--text-embeds", bad, "--steps",
                         "1", "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert code == 2 and "null_encoder_hidden_states" in err


def test_cli_fused_latent_io_trains_the_same(models, tmp_path, capsys):
    """--fused-latent-io runs the embedder / head through the fused ops (p = 2 packing here): same weights."""
    from diffusers import FluxTransformer2DModel

    g = torch.Generator().manual_seed(0)
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 4, 4, generator=g))
    outs = []
    for flags in ([], ["--fused-latent-io", "--backend", "triton"]):
        out_dir = str(tmp_path / f"out{len(outs)}")
        code, _, err = _run(["align-head", "--transformer", models["flux"], "--cache", cache, "--random-text",
                             "--steps", "2", "--lr", "1e-2", "--batch-size", "2", "--out", out_dir, "--quiet", *flags],
                            capsys)
        assert code == 0, err
        outs.append(FluxTransformer2DModel.from_pretrained(out_dir))
    base = FluxTransformer2DModel.from_pretrained(models["flux"])
    assert not torch.equal(outs[1].proj_out.weight, base.proj_out.weight)
    for name in ("proj_out.weight", "proj_out.bias", "x_embedder.weight", "x_embedder.bias"):
        a, b = outs[0].get_parameter(name), outs[1].get_parameter(name)
        assert (a - b).norm() <= 1e-5 * a.norm(), name


def test_cli_seed_fixes_the_new_weights(models, tmp_path, capsys):
    """convert (align-embedding) and add_lora (lora) draw new weights: --seed alone decides them, whatever torch's
    global RNG state was before the run (as in a fresh process, or a resumed one)."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 8, 4, 4, generator=g))
    runs = []

    def run(command, transformer, seed, *extra):
        out = str(tmp_path / f"run{len(runs)}")
        torch.manual_seed(100 + len(runs))  # a different global RNG state before every run
        code, _, err = _run([command, "--transformer", transformer, "--cache", cache, "--seed", str(seed), "--steps",
                             "1", "--batch-size", "2", "--out", out, "--quiet", "--device", "cpu", *extra], capsys)
        assert code == 0, err
        runs.append(out)
        return load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))

    def assert_equal(a, b):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name

    first = run("align-embedding", models["flux"], 0)
    assert_equal(first, run("align-embedding", models["flux"], 0))
    # proj_out is not trained by align-embedding: it is exactly what convert drew
    assert not torch.equal(first["proj_out.weight"], run("align-embedding", models["flux"], 1)["proj_out.weight"])

    stage1, lora = runs[0], ("--random-text", "--rank", "2", "--alpha", "2")

    def adapter(seed):
        model = run("lora", stage1, seed, *lora)
        return model, load_file(os.path.join(runs[-1], "lora", "pytorch_lora_weights.safetensors"))

    (model0, adapter0), (model1, adapter1) = adapter(0), adapter(0)
    assert_equal(model0, model1)
    assert_equal(adapter0, adapter1)
    # lora_A gets no gradient in the first step (lora_B starts at zero): it differs only by its initialisation
    other = adapter(1)[1]
    a_names = [n for n in adapter0 if "lora_A" in n]
    assert a_names and not any(torch.equal(adapter0[n], other[n]) for n in a_names)


# ----------------------------------------------------------------------------------------------- argument checks
def test_sample_images_of_other_dtypes_and_channel_counts_become_rgb():
    """skimage float images in [0, 1] (clipped), gray (H, W) / (H, W, 1) and RGBA (alpha dropped) -> RGB uint8."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    expected = data.images_to_tensor([rgb], 8)
    assert torch.equal(data.images_to_tensor([rgb / 255.0], 8), expected)
    assert torch.equal(data.images_to_tensor([np.full((4, 4, 3), 1.5)], 4), torch.ones(1, 3, 4, 4))
    assert torch.equal(data.images_to_tensor([np.dstack([rgb, rgb[..., :1]])], 8), expected)
    gray = data.images_to_tensor([rgb[..., 0]], 8)
    assert torch.equal(data.images_to_tensor([rgb[..., :1]], 8), gray)
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 0], gray[0, 2])
    assert torch.equal(gray[0, 0], data.images_to_tensor([np.dstack([rgb[..., 0]] * 3)], 8)[0, 0])


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: data.images_to_tensor([np.zeros((4, 4, 3), np.int16)], 4), data.DataError,
                 "image '#0' has unsupported dtype int16", id="image-dtype"),
    pytest.param(lambda: data.images_to_tensor([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 2), np.uint8)], 4),
                 data.DataError, r"image '#1' has shape \(4, 4, 2\), expected \(H, W\), \(H, W, 3\) or \(H, W, 4\)",
                 id="image-channels"),
    pytest.param(lambda: data.images_to_tensor([np.zeros((1, 4, 4, 3), np.uint8)], 4), data.DataError,
                 r"image '#0' has shape \(1, 4, 4, 3\), expected", id="image-ndim"),
    pytest.param(lambda: data.images_to_tensor([np.zeros((4, 4, 3), np.uint8)], 0), ValueError,
                 "size must be a positive int, got 0", id="size-zero"),
    pytest.param(lambda: data.images_to_tensor([np.zeros((4, 4, 3), np.uint8)], True), ValueError,
                 "size must be a positive int, got True", id="size-bool"),
    pytest.param(lambda: data.images_to_tensor([np.zeros((4, 4, 3), np.uint8)], 2.5), ValueError,
                 "size must be a positive int, got 2.5", id="size-float"),
    pytest.param(lambda: data.images_to_tensor([], 4), data.DataError, "no images given", id="no-images"),
    pytest.param(lambda: data.sample_images(["nope"]), data.DataError,
                 "scikit-image has no sample image 'nope'; known: astronaut, coffee", id="sample-unknown"),
    pytest.param(lambda: data.encode_latents(torch.zeros(3, 8, 8), None), ValueError,
                 r"images must be a \(N, 3, H, W\) tensor, got \(3, 8, 8\)", id="encode-ndim"),
    pytest.param(lambda: data.encode_latents(np.zeros((1, 3, 8, 8)), None), ValueError,
                 r"images must be a \(N, 3, H, W\) tensor, got ndarray", id="encode-not-tensor"),
    pytest.param(lambda: data.encode_latents(torch.zeros(1, 3, 8, 8), None, 0), ValueError,
                 "batch_size must be a positive int, got 0", id="encode-batch-size"),
    pytest.param(lambda: data.encode_latents(torch.zeros(1, 3, 8, 8), torch.nn.Linear(1, 1)), TypeError,
                 "encode_latents supports diffusers AutoencoderKL and AutoencoderDC, got Linear", id="encode-model"),
])
def test_data_argument_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_sample_images_that_cannot_load_offline(monkeypatch):
    """An explicitly requested image that skimage cannot load is an error; by default it is skipped, and none at
    all is an error too."""
    import skimage.data

    def needs_download():
        raise OSError("would download")

    monkeypatch.setattr(skimage.data, "coffee", needs_download)
    with pytest.raises(data.DataError, match="scikit-image sample image 'coffee' could not be loaded offline: would"):
        data.sample_images(["coffee"])
    monkeypatch.setattr(data, "SAMPLE_IMAGE_NAMES", ("not_a_sample", "coffee"))
    with pytest.raises(data.DataError, match="no scikit-image sample image could be loaded"):
        data.sample_images()


def test_latent_cache_and_model_directory_errors(models, tmp_path):
    """A refused cache writes nothing (not even its folder); a cache without both latent sets, a corrupt one, a
    model folder without config.json or without weights: errors naming the path."""
    import shutil

    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    path = tmp_path / "sub" / "cache.safetensors"
    for base, dc, match in ((torch.zeros(2, 4, 4), torch.zeros(2, 4, 2, 2), "base_latents must be a"),
                            (torch.zeros(2, 4, 4, 4), None, r"dc_latents must be a \(N, C, h, w\) tensor"),
                            (torch.zeros(2, 4, 4, 4), torch.zeros(3, 4, 2, 2),
                             "base_latents and dc_latents must hold the same images, got 2 and 3")):
        with pytest.raises(ValueError, match=match):
            data.save_latent_cache(str(path), base, dc)
    assert not path.parent.exists()
    save_file(dict(base_latents=torch.zeros(1, 4, 4, 4)), str(tmp_path / "half.safetensors"))
    with pytest.raises(data.DataError, match=r"half.safetensors' lacks \['dc_latents'\]; was it written by `encode`"):
        data.load_latent_cache(str(tmp_path / "half.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x07" * 32)
    with pytest.raises(data.DataError, match="could not read latent cache '.*corrupt.safetensors'"):
        data.load_latent_cache(str(tmp_path / "corrupt.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"AutoencoderKL: '.*' has no config.json"):
        data.load_local_model(AutoencoderKL, str(tmp_path))
    (tmp_path / "config_only").mkdir()
    shutil.copy(os.path.join(models["kl"], "config.json"), tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match="AutoencoderKL: could not load a model from local directory "
                                                "'.*config_only'"):
        data.load_local_model(AutoencoderKL, str(tmp_path / "config_only"))


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    from .helpers import tiny_sana

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("sana") / "sana")
    tiny_sana().save_pretrained(path)  # in_channels 8, caption_channels 24, patch size 1
    return path


def _save(path, **tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_text_embeddings_that_do_not_fit_exit_2_before_training(models, sana_dir, tmp_path, capsys, monkeypatch):
    """FLUX / SANA --text-embeds with missing tensors, wrong ranks or sizes, masks or row counts that do not fit:
    exit 2 naming the tensor and the expected shape; nothing trained, no --out written."""
    from dcgen_kernels import dcgen

    monkeypatch.setattr(dcgen, "align_head", lambda *a, **k: pytest.fail("trained despite bad text embeddings"))
    flux_cache, sana_cache = str(tmp_path / "flux.safetensors"), str(tmp_path / "sana.safetensors")
    data.save_latent_cache(flux_cache, torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4))
    data.save_latent_cache(sana_cache, torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4))
    r = torch.randn
    flux = dict(encoder_hidden_states=r(2, 5, 32), pooled_projections=r(2, 16), null_encoder_hidden_states=r(5, 32),
                null_pooled_projections=r(16))
    sana = dict(encoder_hidden_states=r(2, 5, 24), encoder_attention_mask=torch.ones(2, 5),
                null_encoder_hidden_states=r(5, 24), null_encoder_attention_mask=torch.ones(5))
    cases = [
        ("flux", None, r"text embeddings file '.*missing.safetensors' does not exist"),
        ("flux", dict(encoder_hidden_states=r(2, 5, 32)), "lacks ['pooled_projections', 'null_encoder_hidden_states', "
                                                          "'null_pooled_projections']; it needs encoder_hidden_states"),
        ("flux", dict(flux, encoder_hidden_states=r(2, 32)), "encoder_hidden_states must be (N, L, D) and "
                                                             "pooled_projections (N, P), got (2, 32) and (2, 16)"),
        ("flux", dict(flux, pooled_projections=r(2, 1, 16)), "got (2, 5, 32) and (2, 1, 16)"),
        ("flux", dict(flux, encoder_hidden_states=r(2, 5, 24)),
         "embedding sizes 24 / 16 do not match the model's joint_attention_dim 32 / pooled_projection_dim 16"),
        ("flux", dict(flux, encoder_hidden_states=r(3, 5, 32)),
         "encoder_hidden_states has 3 rows, the cache holds 2 images (need 2 or 1)"),
        ("flux", dict(flux, pooled_projections=r(3, 16)),
         "pooled_projections has 3 rows, the cache holds 2 images (need 2 or 1)"),
        ("sana", dict(sana, encoder_hidden_states=r(2, 5, 32)),
         "encoder_hidden_states must be (N, L, 24) (the model's caption_channels), got (2, 5, 32)"),
        ("sana", dict(sana, encoder_attention_mask=torch.ones(2, 4)),
         "encoder_attention_mask must be (2, 5) and null_encoder_attention_mask (5,), got (2, 4) and (5,)"),
        ("sana", dict(sana, null_encoder_attention_mask=torch.ones(4)), "got (2, 5) and (4,)"),
        ("sana", dict(sana, encoder_hidden_states=r(3, 5, 24), encoder_attention_mask=torch.ones(3, 5)),
         "encoder_hidden_states has 3 rows, the cache holds 2 images (need 2 or 1)"),
    ]
    out = tmp_path / "out"
    for i, (family, tensors, message) in enumerate(cases):
        embeds = tmp_path / "missing.safetensors" if tensors is None else _save(tmp_path / f"t{i}.safetensors",
                                                                                **tensors)
        transformer, cache = (models["flux"], flux_cache) if family == "flux" else (sana_dir, sana_cache)
        code, _, err = _run(["align-head", "--transformer", transformer, "--cache", cache, "--text-embeds",
                             str(embeds), "--steps", "1", "--out", str(out), "--quiet", "--device", "cpu"], capsys)
        assert code == 2 and (message in err if tensors else re.search(message, err)), (i, err)
        assert not out.exists()


def test_model_directory_with_an_unreadable_config_is_named(tmp_path, capsys):
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4))
    for content, message in (("{", "config.json is not valid JSON"), ("[]", "config.json must hold a JSON object")):
        (tmp_path / "config.json").write_text(content, encoding="utf-8")
        code, _, err = _run(["align-head", "--transformer", str(tmp_path), "--cache", cache,
                             "--random-text", "--steps", "1", "--out", str(tmp_path / "out"), "--quiet"], capsys)
        assert code == 2 and str(tmp_path) in err and message in err, err


def test_models_that_do_not_fit_the_cache_exit_2_before_training(models, sana_dir, tmp_path, capsys, monkeypatch):
    """Latent channels / patch sizes the model or cache cannot take, a device torch cannot parse, a seed or
    t-shift that is no number: exit 2 naming the flag or model, before any training; no --out written."""
    from dcgen_kernels import dcgen

    for stage in ("align_head", "align_embedding"):
        monkeypatch.setattr(dcgen, stage, lambda *a, **k: pytest.fail("trained despite a bad argument"))
    caches = {}
    for name, base, dc in (("flux", 16, 16), ("flux_dc8", 16, 8), ("sana_base16", 16, 8), ("sana_dc16", 8, 16)):
        caches[name] = str(tmp_path / f"{name}.safetensors")
        data.save_latent_cache(caches[name], torch.randn(2, base, 8, 8), torch.randn(2, dc, 4, 4))
    out = tmp_path / "out"
    tail = ["--steps", "1", "--out", str(out), "--quiet"]

    def head(transformer, cache, *extra):
        return ["align-head", "--transformer", transformer, "--cache", caches[cache], "--random-text", *extra, *tail]

    def embedding(transformer, cache, *extra):
        return ["align-embedding", "--transformer", transformer, "--cache", caches[cache], *extra, *tail]

    for argv, message in (
            (head(models["flux"], "flux_dc8", "--device", "cpu"),
             "converted model: the model's embedder takes 64 features, which is not 8 latent channels times a square "
             "patch"),
            (embedding(models["flux"], "flux", "--latent-channels", "4", "--device", "cpu"),
             "--latent-channels 4 does not match the cache's DC latents (16 channels)"),
            (embedding(sana_dir, "sana_base16", "--device", "cpu"),
             "base model: its patch_embed takes 8 channels, the cache's base latents have 16"),
            (head(sana_dir, "sana_dc16", "--device", "cpu"),
             "converted model: its patch_embed takes 8 channels, the cache's DC latents have 16"),
            (head(models["flux"], "flux", "--patch-size", "1", "--device", "cpu"),
             "--patch-size 1 does not match the model (2 for 16 latent channels)"),
            (head(models["flux"], "flux", "--device", "tpu0"), "error: --device: Invalid device string: 'tpu0'"),
            (head(models["flux"], "flux", "--seed", "abc"), "argument --seed: must be an int in [0, 2**63), got 'abc'"),
            (head(models["flux"], "flux", "--t-shift", "abc"),
             "argument --t-shift: must be 'auto' or a positive number, got 'abc'")):
        code, _, err = _run(argv, capsys)
        assert code == 2 and message in err, (argv, err)
        assert not out.exists()


def test_outputs_below_a_file_exit_2_and_a_diverged_loss_exits_1(models, tmp_path, capsys, monkeypatch):
    from dcgen_kernels import dcgen

    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4))
    (tmp_path / "a_file").write_text("x")
    head = ["align-head", "--transformer", models["flux"], "--cache", cache, "--random-text", "--steps", "1",
            "--quiet", "--device", "cpu"]
    monkeypatch.setattr(dcgen, "align_head", lambda *a, **k: pytest.fail("trained despite an unwritable output"))
    for flag in ("--out", "--checkpoint-dir"):
        path = str(tmp_path / "a_file" / "sub")
        extra = [flag, path] if flag == "--out" else ["--out", str(tmp_path / "out"), flag, path]
        code, _, err = _run(head + extra, capsys)
        assert code == 2 and f"{flag} '{path}' is below '{tmp_path / 'a_file'}', an existing file" in err, err

    def diverges(*args, **kwargs):
        raise FloatingPointError("align head: loss is nan at step 3")

    monkeypatch.setattr(dcgen, "align_head", diverges)
    code, _, err = _run(head + ["--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "error: align head: loss is nan at step 3" in err
