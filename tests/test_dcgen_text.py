"""`encode-text`: prompts -> the --text-embeds file, by tiny random FLUX / SANA pipelines' text encoders (CPU)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dcgen_kernels.dcgen import data, text

from .helpers import tiny_sana, tiny_text_pipeline
from .test_dcgen_cli import _run, _tiny_base_flux

PROMPTS = ["a red cat on the mat", "a photo of a small dog", "the cat " * 6]  # the last one outruns 8 tokens


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: (str(root / kind), tiny_text_pipeline(kind, str(root / kind))) for kind in ("flux", "sana")}


def _prompts_file(tmp_path, prompts):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(path)


def test_flux_embeddings_are_the_text_encoders_outputs_and_train(pipelines, tmp_path, capsys):
    path, pipe = pipelines["flux"]
    out = str(tmp_path / "text.safetensors")
    code, stdout, err = _run(["encode-text", "--pipeline", path, "--prompts", _prompts_file(tmp_path, PROMPTS),
                              "--max-sequence-length", "8", "--batch-size", "2", "--out", out, "--device", "cpu"],
                             capsys)
    assert code == 0, err
    assert "encode-text: 3 prompt(s) by FluxPipeline" in stdout
    saved = load_file(out)
    assert set(saved) == {"encoder_hidden_states", "pooled_projections", "null_encoder_hidden_states",
                          "null_pooled_projections"}

    def expected(prompts):  # T5 tokens padded / truncated to 8, CLIP's pooled vector over its 12 positions
        t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=8, truncation=True,
                                  return_tensors="pt").input_ids
        clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=12, truncation=True,
                                  return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder_2(t5_ids).last_hidden_state, pipe.text_encoder(clip_ids).pooler_output

    tokens, pooled = expected(PROMPTS)
    null_tokens, null_pooled = expected([""])
    torch.testing.assert_close(saved["encoder_hidden_states"], tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved["pooled_projections"], pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved["null_encoder_hidden_states"], null_tokens[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved["null_pooled_projections"], null_pooled[0], rtol=1e-5, atol=1e-6)
    with safe_open(out, framework="pt") as f:
        meta = json.loads(f.metadata()["dcgen"])
    assert meta["pipeline_class"] == "FluxPipeline" and meta["count"] == 3 and meta["tokens"] == 8

    # align-head reads the file: one row per cached image
    torch.manual_seed(0)
    flux_dir = str(tmp_path / "flux")
    _tiny_base_flux().save_pretrained(flux_dir)
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(3, 16, 8, 8), torch.randn(3, 16, 4, 4), dict(source="synthetic"))
    code, stdout, err = _run(["align-head", "--transformer", flux_dir, "--cache", cache, "--text-embeds", out,
                              "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "stage2"), "--quiet",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    assert "align-head: 1 steps" in stdout


def test_sana_embeddings_follow_the_pipeline_instruction_and_masks(pipelines, tmp_path, capsys):
    path, pipe = pipelines["sana"]
    bare, instructed = str(tmp_path / "bare.safetensors"), str(tmp_path / "instructed.safetensors")
    prompts = _prompts_file(tmp_path, PROMPTS[:2])
    common = ["encode-text", "--pipeline", path, "--prompts", prompts, "--max-sequence-length", "10",
              "--device", "cpu"]
    code, _, err = _run(common + ["--out", bare, "--no-complex-human-instruction"], capsys)
    assert code == 0, err
    code, _, err = _run(common + ["--out", instructed], capsys)
    assert code == 0, err

    def gemma(prompts):  # Gemma's tokens over the padded (right) prompt, with the attention mask
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0], ids.attention_mask

    saved = load_file(bare)
    tokens, mask = gemma(PROMPTS[:2])
    null_tokens, null_mask = gemma([""])
    torch.testing.assert_close(saved["encoder_hidden_states"], tokens, rtol=1e-5, atol=1e-6)
    assert torch.equal(saved["encoder_attention_mask"], mask) and mask[:, -1].eq(0).all()  # padding is masked
    torch.testing.assert_close(saved["null_encoder_hidden_states"], null_tokens[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(saved["null_encoder_attention_mask"], null_mask[0])

    # by default the prompts get the instruction SanaPipeline prepends when called; the null prompt never does
    with_instruction = load_file(instructed)
    assert with_instruction["encoder_hidden_states"].shape == tokens.shape
    assert not torch.allclose(with_instruction["encoder_hidden_states"], tokens)
    torch.testing.assert_close(with_instruction["null_encoder_hidden_states"], null_tokens[0], rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    sana_dir = str(tmp_path / "sana")
    tiny_sana().save_pretrained(sana_dir)
    cache = str(tmp_path / "cache.safetensors")
    data.save_latent_cache(cache, torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8), dict(source="synthetic"))
    code, stdout, err = _run(["align-head", "--transformer", sana_dir, "--cache", cache, "--text-embeds",
                              instructed, "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "stage2"),
                              "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "every text token counts" not in err  # the masks are in the file


def test_one_prompt_for_all_images_and_batching_agree(pipelines, tmp_path):
    _, pipe = pipelines["flux"]
    together = text.encode_prompts(pipe, PROMPTS, max_sequence_length=8, batch_size=8)
    one_by_one = text.encode_prompts(pipe, PROMPTS, max_sequence_length=8, batch_size=1)
    for key in together:
        torch.testing.assert_close(together[key], one_by_one[key], rtol=1e-5, atol=1e-6)
    single = text.encode_prompts(pipe, PROMPTS[:1], max_sequence_length=8)
    assert single["encoder_hidden_states"].shape == (1, 8, 32)
    torch.testing.assert_close(single["encoder_hidden_states"][0], together["encoder_hidden_states"][0],
                               rtol=1e-5, atol=1e-6)


def test_bad_inputs_exit_2_naming_the_problem(pipelines, tmp_path, capsys):
    flux = pipelines["flux"][0]
    out = str(tmp_path / "text.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cases = [
        (["--pipeline", str(tmp_path), "--prompt", "a cat"], "no model_index.json"),
        (["--pipeline", str(other), "--prompt", "a cat"], "supported: FluxPipeline, SanaPipeline"),
        (["--pipeline", flux, "--prompts", _prompts_file(tmp_path, ["a cat", " ", "a dog"])], "line(s) [2] are empty"),
        (["--pipeline", flux, "--prompts", str(tmp_path / "missing.txt")], "does not exist"),
        (["--pipeline", flux, "--prompt", "a cat", "--max-sequence-length", "0"], "--max-sequence-length must be"),
        (["--pipeline", flux, "--prompt", "a cat", "--max-sequence-length", "1024"], "must be <= 512 for FLUX"),
        (["--pipeline", flux, "--prompt", "  "], "--prompt is blank"),
    ]
    for argv, message in cases:
        code, _, err = _run(["encode-text", *argv, "--out", out, "--device", "cpu"], capsys)
        assert code == 2 and message in err, (argv, err)
    code, _, err = _run(["encode-text", "--pipeline", flux, "--prompt", "a cat", "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err
    # the library functions name the argument
    flux_pipeline = pipelines["flux"][1]
    for kwargs, error, match in ((dict(prompts="a cat"), TypeError, "non-empty sequence of str"),
                                 (dict(prompts=["a cat"], batch_size=0), ValueError, "batch_size must be"),
                                 (dict(prompts=["a cat"], max_sequence_length=600), ValueError, "<= 512 for FLUX"),
                                 (dict(prompts=["a cat", " "]), ValueError, r"prompts \[1\] are blank")):
        with pytest.raises(error, match=match):
            text.encode_prompts(flux_pipeline, **kwargs)
    with pytest.raises(TypeError, match="pipeline must be one of FluxPipeline, SanaPipeline"):
        text.encode_prompts(object(), ["a cat"])
    with pytest.raises(TypeError, match="dtype must be torch.float32"):
        text.load_text_pipeline(flux, torch.device("cpu"), torch.int8)


def test_prompts_file_lines_are_the_prompts(tmp_path):
    """A byte-order mark (Windows editors) is not part of the first prompt; CRLF ends lines; separators that
    str.splitlines would also split at (form feed, U+2028) stay inside a prompt."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red cat\r\non the\u2028mat\x0c\r\nthe dog".encode("utf-8"))
    assert text.read_prompts(str(path)) == ["a red cat", "on the\u2028mat\x0c", "the dog"]
    path.write_text("a cat\n\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"line\(s\) \[2\] are empty"):
        text.read_prompts(str(path))
    path.write_text("", encoding="utf-8")
    with pytest.raises(data.DataError, match="holds no prompts"):
        text.read_prompts(str(path))


def test_pipeline_folders_that_cannot_load_and_bad_lengths_are_named(pipelines, tmp_path, capsys, monkeypatch):
    """A pipeline folder missing a text encoder's files, a pipeline that loads without one, a bad batch size or
    sequence length: errors naming the folder / argument; encode-text writes no --out."""
    import shutil

    import diffusers

    flux, flux_pipeline = pipelines["flux"]
    broken = tmp_path / "no_text_encoder"
    shutil.copytree(flux, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match="FluxPipeline: could not load the text encoders from local directory "
                                                "'.*no_text_encoder'"):
        text.load_text_pipeline(str(broken), torch.device("cpu"))
    no_tokenizer = tmp_path / "no_tokenizer"  # transformers raises ValueError for this one, not OSError
    shutil.copytree(flux, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(FileNotFoundError, match="could not load the text encoders from local directory "
                                                "'.*no_tokenizer'"):
        text.load_text_pipeline(str(no_tokenizer), torch.device("cpu"))
    (no_tokenizer / "model_index.json").write_text("{", encoding="utf-8")
    with pytest.raises(data.DataError, match="model_index.json is not valid JSON"):
        text.load_text_pipeline(str(no_tokenizer), torch.device("cpu"))
    out = tmp_path / "text.safetensors"
    code, _, err = _run(["encode-text", "--pipeline", flux, "--prompt", "a cat", "--batch-size", "0", "--out",
                         str(out), "--device", "cpu"], capsys)
    assert code == 2 and "--batch-size must be >= 1, got 0" in err and not out.exists()
    for length, error in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"max_sequence_length must be a positive int, got .*{length}"):
            text.encode_prompts(flux_pipeline, ["a cat"], max_sequence_length=length)
    with pytest.raises(TypeError, match="batch_size must be a positive int, got bool True"):
        text.encode_prompts(flux_pipeline, ["a cat"], batch_size=True)
    # diffusers 0.42 itself refuses a model_index.json without a text encoder; a pipeline loaded without one
    # (as from a diffusers that allows it) is refused by name
    from types import SimpleNamespace

    stub = SimpleNamespace(text_encoder=object(), tokenizer=object(), text_encoder_2=None, tokenizer_2=None)
    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", lambda *a, **k: stub)
    with pytest.raises(data.DataError, match="the pipeline has no text_encoder_2, tokenizer_2 "
                                             r"\(needed to encode prompts\)"):
        text.load_text_pipeline(flux, torch.device("cpu"))
