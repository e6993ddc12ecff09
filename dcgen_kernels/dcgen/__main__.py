"""DC-Gen command line: ``python -m dcgen_kernels.dcgen <command> ...`` (FLUX or SANA), a thin layer over the library.

    encode           images (folder or scikit-image samples) -> base-AE and DC-AE latents in one safetensors cache
    encode-text      prompts -> the --text-embeds file, by a local FluxPipeline / SanaPipeline's text encoders
    align-embedding  stage 1: convert a copy of a base model, align its new embedder to the base one, save it
    align-head       stage 2: train embedder + output head of a converted model (flow matching; guidance
                     distilled for FLUX)
    lora             stage 3: LoRA on the blocks + embedder/head; saves the model and its adapter (unmerged)
    merge            fold the adapter saved by `lora` into the weights, save a plain diffusers model

Every model path is a local directory written by ``save_pretrained`` (nothing downloads); the model class
(FluxTransformer2DModel or SanaTransformer2DModel) is read from its config.json. Text conditioning for
align-head / lora comes from ``--text-embeds file.safetensors``, one row per cached image (or one row for all):
FLUX needs ``encoder_hidden_states`` (N or 1, L, D), ``pooled_projections`` (N or 1, P),
``null_encoder_hidden_states`` (L, D) and ``null_pooled_projections`` (P,); SANA needs ``encoder_hidden_states``
and ``null_encoder_hidden_states`` and takes ``encoder_attention_mask`` (N or 1, L) and
``null_encoder_attention_mask`` (L,) (default, with a warning: all tokens real). The null embeddings are the text
encoders' outputs for the empty prompt "" (padded to the same L; for FLUX also CLIP's pooled vector), not zeros.
``encode-text`` writes such a file. ``--random-text`` draws random embeddings instead, for smoke tests only.
``--fused-latent-io`` trains through dcgen_kernels' fused patch_embed / patch_unembed (embedder and head only;
``--backend`` picks their backend). Bad arguments, missing files and invalid inputs exit with code 2 and a message on
stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import List, Optional

import torch

LORA_SUBDIR = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class CLIError(Exception):
    """A user error: printed as ``error: ...`` and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 itself; raise instead so main(argv) returns 2 in-process
        self.print_usage(sys.stderr)
        raise CLIError(message)


# ----------------------------------------------------------------------------------------------- helpers
def _class_from_config(path: str, candidates: tuple, kind: str):
    """The class of `candidates` that the directory's config.json names (the first when there is no config.json:
    loading then reports what is missing)."""
    from .data import read_json

    classes = {cls.__name__: cls for cls in candidates}
    config = os.path.join(path or "", "config.json")
    if not os.path.isfile(config):
        return candidates[0]
    name = read_json(config).get("_class_name")
    if name not in classes:
        raise CLIError(f"{path}: config.json names {kind} class {name!r}; supported: {', '.join(classes)}")
    return classes[name]


def _transformer_cls(path: str):
    """FluxTransformer2DModel or SanaTransformer2DModel."""
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

    return _class_from_config(path, (FluxTransformer2DModel, SanaTransformer2DModel), "model")


def _load_transformer(path: str, device: torch.device):
    from .data import load_local_model

    return load_local_model(_transformer_cls(path), path).to(device)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu or cuda[:index], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA GPU is visible (use --device cpu)")
    return device


def _autoencoder_cls(path: str):
    """AutoencoderKL (FLUX's VAE) or AutoencoderDC (SANA's base autoencoder is DC-AE f32c32)."""
    from diffusers import AutoencoderDC, AutoencoderKL

    return _class_from_config(path, (AutoencoderKL, AutoencoderDC), "autoencoder")


def _load_embeddings(path: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"text embeddings file {path!r} does not exist")
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CLIError(f"text embeddings file {path!r} is not a readable safetensors file: {err}") from None


def _check_output_path(path: str, flag: str, directory: bool) -> None:
    """Refuse, before any work, an output the run could not write at its end (training would be lost)."""
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is an existing file; give a directory (created if missing)")
    if not directory and os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest existing folder above it, where it or its parents are created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path!r} is below {parent!r}, an existing file: it cannot be created")
    try:  # a file created and removed where the outputs go: permissions, read-only or immutable places
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {path!r} cannot be written: creating a file in {parent!r} failed ({e})") from e
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"{flag} {path!r} exists and cannot be overwritten")


def _check_training_args(args) -> None:
    _check_output_path(args.out, "--out", directory=True)
    if args.checkpoint_dir is not None:
        _check_output_path(args.checkpoint_dir, "--checkpoint-dir", directory=True)
    if getattr(args, "random_text_tokens", 1) < 1:
        raise CLIError(f"--random-text-tokens must be >= 1, got {args.random_text_tokens}")


def _null_like(path: str, name: str, null: torch.Tensor, shape) -> torch.Tensor:
    """The null prompt's tensor as `shape` (one row, with or without a leading 1), else a clear error."""
    if tuple(null.shape) not in (tuple(shape), (1, *shape)):
        raise CLIError(f"{path}: {name} must have shape {tuple(shape)} (the prompts' per-row shape), got "
                       f"{tuple(null.shape)}")
    return null.reshape(shape)


def _is_sana(transformer) -> bool:
    return type(transformer).__name__ == "SanaTransformer2DModel"


def _patch_size(features: int, channels: int, what: str) -> int:
    p = math.isqrt(features // channels) if features % channels == 0 else 0
    if p == 0 or channels * p * p != features:
        raise CLIError(f"{what}: the model's embedder takes {features} features, which is not {channels} latent "
                       f"channels times a square patch")
    return p


def _load_sana_text(args, n: int, transformer):
    """(encoder_hidden_states (N, L, D), mask (N, L), null (L, D), null mask (L,)) from the arguments."""
    d = transformer.config.caption_channels
    if args.random_text:
        print("WARNING: --random-text: random text embeddings, for smoke tests only; the result is not a usable "
              "text-to-image model", file=sys.stderr)
        g = torch.Generator().manual_seed(args.seed)
        length = args.random_text_tokens
        return (torch.randn(n, length, d, generator=g), torch.ones(n, length), torch.randn(length, d, generator=g),
                torch.ones(length))
    path = args.text_embeds
    tensors = _load_embeddings(path)
    keys = ("encoder_hidden_states", "null_encoder_hidden_states")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CLIError(f"text embeddings file {path!r} lacks {missing}; a SANA model needs {', '.join(keys)} (and "
                       f"takes encoder_attention_mask, null_encoder_attention_mask)")
    text, null_text = (tensors[k].float() for k in keys)
    if text.dim() != 3 or text.shape[2] != d:
        raise CLIError(f"{path}: encoder_hidden_states must be (N, L, {d}) (the model's caption_channels), got "
                       f"{tuple(text.shape)}")
    absent = [k for k in ("encoder_attention_mask", "null_encoder_attention_mask") if k not in tensors]
    if absent:
        print(f"WARNING: {path} has no {' / '.join(absent)}: every text token counts as real, padding included "
              "(SanaPipeline masks the padding of its prompts: save the tokenizer's attention masks too)",
              file=sys.stderr)
    mask = tensors.get("encoder_attention_mask", torch.ones(text.shape[:2])).float()
    null_mask = tensors.get("null_encoder_attention_mask", torch.ones(text.shape[1])).float().reshape(-1)
    null_text = _null_like(path, "null_encoder_hidden_states", null_text, text.shape[1:])
    if mask.shape != text.shape[:2] or null_mask.shape[0] != text.shape[1]:
        raise CLIError(f"{path}: encoder_attention_mask must be {tuple(text.shape[:2])} and "
                       f"null_encoder_attention_mask ({text.shape[1]},), got {tuple(mask.shape)} and "
                       f"{tuple(null_mask.shape)}")
    if text.shape[0] not in (1, n):
        raise CLIError(f"{path}: encoder_hidden_states has {text.shape[0]} rows, the cache holds {n} images (need "
                       f"{n} or 1)")
    if text.shape[0] == 1:
        text, mask = text.expand(n, -1, -1), mask.expand(n, -1)
    return text.contiguous(), mask.contiguous(), null_text, null_mask


def _load_text(args, n: int, transformer):
    """(encoder_hidden_states (N, L, D), pooled (N, P), null (L, D), null_pooled (P,)) from the arguments."""
    cfg = transformer.config
    if args.random_text:
        print("WARNING: --random-text: random text embeddings, for smoke tests only; the result is not a usable "
              "text-to-image model", file=sys.stderr)
        g = torch.Generator().manual_seed(args.seed)
        d, pdim, length = cfg.joint_attention_dim, cfg.pooled_projection_dim, args.random_text_tokens
        return (torch.randn(n, length, d, generator=g), torch.randn(n, pdim, generator=g),
                torch.randn(length, d, generator=g), torch.randn(pdim, generator=g))
    path = args.text_embeds
    tensors = _load_embeddings(path)
    keys = ("encoder_hidden_states", "pooled_projections", "null_encoder_hidden_states", "null_pooled_projections")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CLIError(f"text embeddings file {path!r} lacks {missing}; it needs {', '.join(keys)}")
    text, pooled, null_text, null_pooled = (tensors[k].float() for k in keys)
    if text.dim() != 3 or pooled.dim() != 2:
        raise CLIError(f"{path}: encoder_hidden_states must be (N, L, D) and pooled_projections (N, P), got "
                       f"{tuple(text.shape)} and {tuple(pooled.shape)}")
    if text.shape[2] != cfg.joint_attention_dim or pooled.shape[1] != cfg.pooled_projection_dim:
        raise CLIError(f"{path}: embedding sizes {text.shape[2]} / {pooled.shape[1]} do not match the model's "
                       f"joint_attention_dim {cfg.joint_attention_dim} / pooled_projection_dim "
                       f"{cfg.pooled_projection_dim}")
    for name, t in (("encoder_hidden_states", text), ("pooled_projections", pooled)):
        if t.shape[0] not in (1, n):
            raise CLIError(f"{path}: {name} has {t.shape[0]} rows, the cache holds {n} images (need {n} or 1)")
    null_text = _null_like(path, "null_encoder_hidden_states", null_text, text.shape[1:])
    null_pooled = _null_like(path, "null_pooled_projections", null_pooled, pooled.shape[1:])
    text = text.expand(n, -1, -1) if text.shape[0] == 1 else text
    pooled = pooled.expand(n, -1) if pooled.shape[0] == 1 else pooled
    return text.contiguous(), pooled.contiguous(), null_text, null_pooled


def _summary(name: str, history: List[float], out: str) -> None:
    first, last = history[0], history[-1]
    print(f"{name}: {len(history)} steps, loss {first:.4g} -> {last:.4g}; saved to {out}")


# ----------------------------------------------------------------------------------------------- commands
def cmd_encode(args) -> None:
    from diffusers import AutoencoderDC

    from .data import (
        encode_latents,
        image_files,
        images_to_tensor,
        load_image_folder,
        load_local_model,
        sample_images,
    )

    _check_output_path(args.out, "--out", directory=False)
    if args.sample_images:
        images = images_to_tensor(sample_images(), args.size)
        source, names = "scikit-image samples", None
    else:
        images = load_image_folder(args.images, args.size)
        source, names = os.path.abspath(args.images), image_files(args.images)
    device = _device(args.device)
    base_ae = load_local_model(_autoencoder_cls(args.base_ae), args.base_ae).to(device)
    dc_ae = load_local_model(_class_from_config(args.dc_ae, (AutoencoderDC,), "autoencoder"), args.dc_ae).to(device)
    base = encode_latents(images, base_ae, args.batch_size)
    dc = encode_latents(images, dc_ae, args.batch_size)
    from .data import save_latent_cache

    meta = dict(source=source, size=args.size, count=int(images.shape[0]), base_ae=os.path.abspath(args.base_ae),
                dc_ae=os.path.abspath(args.dc_ae))
    if names is not None:  # the row order, for encode-text's --prompts
        meta["images"] = names
    save_latent_cache(args.out, base, dc, meta)
    print(f"encode: {images.shape[0]} images ({source}) at {args.size}px -> base latents {tuple(base.shape)}, "
          f"DC latents {tuple(dc.shape)}; saved to {args.out}")


def cmd_encode_text(args) -> None:
    from .text import encode_prompts, load_text_pipeline, read_prompts, save_text_embeddings

    _check_output_path(args.out, "--out", directory=False)
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise CLIError(f"--max-sequence-length must be >= 1, got {args.max_sequence_length}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError("--prompt is blank: every image would train on the null prompt (give a prompt)")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    device = _device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    pipeline = load_text_pipeline(args.pipeline, device, dtype)
    tensors = encode_prompts(pipeline, prompts, max_sequence_length=args.max_sequence_length,
                             complex_human_instruction=not args.no_complex_human_instruction,
                             batch_size=args.batch_size)
    meta = dict(pipeline=os.path.abspath(args.pipeline), pipeline_class=type(pipeline).__name__,
                count=len(prompts), tokens=int(tensors["encoder_hidden_states"].shape[1]), dtype=str(dtype))
    if type(pipeline).__name__ == "SanaPipeline":
        meta["complex_human_instruction"] = not args.no_complex_human_instruction
    save_text_embeddings(args.out, tensors, meta)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    print(f"encode-text: {len(prompts)} prompt(s) by {type(pipeline).__name__} -> {shapes}; saved to {args.out}")


def cmd_align_embedding(args) -> None:
    import copy

    from . import align_embedding, convert
    from .data import load_latent_cache

    _check_training_args(args)
    base_lat, dc_lat, _ = load_latent_cache(args.cache)
    channels = args.latent_channels if args.latent_channels is not None else dc_lat.shape[1]
    if channels != dc_lat.shape[1]:
        raise CLIError(f"--latent-channels {channels} does not match the cache's DC latents ({dc_lat.shape[1]} "
                       f"channels)")
    if args.patch_size < 1 or dc_lat.shape[2] % args.patch_size or dc_lat.shape[3] % args.patch_size:
        raise CLIError(f"--patch-size {args.patch_size}: must be >= 1 and divide the cache's DC latent grid "
                       f"{dc_lat.shape[2]}x{dc_lat.shape[3]}")
    student = _load_transformer(args.transformer, _device(args.device))
    if _is_sana(student):
        if base_lat.shape[1] != student.config.in_channels:
            raise CLIError(f"base model: its patch_embed takes {student.config.in_channels} channels, the cache's "
                           f"base latents have {base_lat.shape[1]}")
        teacher_p = student.config.patch_size
    else:
        teacher_p = _patch_size(student.x_embedder.in_features, base_lat.shape[1], "base model")
    # only the base embedder is kept as the teacher (not a second copy of the whole model); the loaded model is
    # converted in place and becomes the student
    teacher_embedder = copy.deepcopy(_embedder(student))
    # convert draws the new embedder / head from torch's global RNG: --seed makes them reproducible, and a run
    # resumed in a new process gets the same untrained head back
    torch.manual_seed(args.seed)
    convert(student, channels, args.patch_size)
    _maybe_fuse(args, student)
    result = align_embedding(teacher_embedder, _embedder(student), base_lat, dc_lat,
                             teacher_patch_size=teacher_p, student_patch_size=args.patch_size, steps=args.steps,
                             lr=args.lr, batch_size=args.batch_size, seed=args.seed, mode=args.mode,
                             checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                             progress=not args.quiet)
    student.requires_grad_(True)
    student.save_pretrained(args.out)
    _summary("align-embedding", result["history"], args.out)


def _maybe_fuse(args, transformer) -> None:
    """--fused-latent-io: the embedder and head run as dcgen_kernels' patch_embed / patch_unembed (fused backward
    included); the blocks stay stock. Parameters and state_dict are untouched, so saving is unaffected."""
    if args.fused_latent_io:
        from ..patching.latents import patch_latent_io

        patch_latent_io(transformer, args.backend)


def _embedder(transformer):
    return transformer.patch_embed if _is_sana(transformer) else transformer.x_embedder


def _head_or_lora(args, lora: bool) -> None:
    from . import add_lora, align_head
    from .data import load_latent_cache

    _check_training_args(args)
    _, dc_lat, _ = load_latent_cache(args.cache)
    transformer = _load_transformer(args.transformer, _device(args.device))
    if _is_sana(transformer):
        p = transformer.config.patch_size
        if dc_lat.shape[1] != transformer.config.in_channels:
            raise CLIError(f"converted model: its patch_embed takes {transformer.config.in_channels} channels, the "
                           f"cache's DC latents have {dc_lat.shape[1]}")
    else:
        p = _patch_size(transformer.x_embedder.in_features, dc_lat.shape[1], "converted model")
    if args.patch_size is not None and args.patch_size != p:
        raise CLIError(f"--patch-size {args.patch_size} does not match the model ({p} for {dc_lat.shape[1]} "
                       f"latent channels)")
    if _is_sana(transformer):
        text, mask, null_text, null_mask = _load_sana_text(args, dc_lat.shape[0], transformer)
        pooled = null_pooled = None
        masks = dict(encoder_attention_mask=mask, null_encoder_attention_mask=null_mask)
    else:
        text, pooled, null_text, null_pooled = _load_text(args, dc_lat.shape[0], transformer)
        masks = {}
    if lora:
        torch.manual_seed(args.seed)  # peft draws LoRA A from torch's global RNG
        add_lora(transformer, rank=args.rank, alpha=args.alpha)
    _maybe_fuse(args, transformer)
    result = align_head(transformer, dc_lat, text, pooled, null_text, null_pooled, patch_size=p, steps=args.steps,
                        lr=args.lr, batch_size=args.batch_size, seed=args.seed, p_drop=args.p_drop,
                        t_shift=args.t_shift, train_head_only=not lora, checkpoint_dir=args.checkpoint_dir,
                        checkpoint_every=args.checkpoint_every, progress=not args.quiet, **masks)
    if lora:  # adapter in out/lora, base weights (with the trained embedder / head) in out; `merge` joins them
        transformer.save_lora_adapter(os.path.join(args.out, LORA_SUBDIR), weight_name=LORA_WEIGHTS)
        transformer.unload_lora()
    transformer.requires_grad_(True)
    transformer.save_pretrained(args.out)
    label = ("lora" if lora else "align-head") + (" (random text, smoke test only)" if args.random_text else "")
    _summary(label, result["history"], args.out)


def cmd_align_head(args) -> None:
    _head_or_lora(args, lora=False)


def cmd_lora(args) -> None:
    _head_or_lora(args, lora=True)


def cmd_merge(args) -> None:
    from . import merge_lora

    _check_output_path(args.out, "--out", directory=True)
    if not os.path.isdir(args.transformer):
        raise FileNotFoundError(f"--transformer: directory {args.transformer!r} does not exist; pass the output "
                                f"directory of the `lora` command")
    adapter = os.path.join(args.transformer, LORA_SUBDIR)
    if not os.path.isfile(os.path.join(adapter, LORA_WEIGHTS)):
        raise FileNotFoundError(f"{args.transformer!r} has no {LORA_SUBDIR}/{LORA_WEIGHTS} adapter; pass the output "
                                f"directory of the `lora` command")
    transformer = _load_transformer(args.transformer, torch.device("cpu"))
    transformer.load_lora_adapter(adapter, weight_name=LORA_WEIGHTS, prefix=None, adapter_name="default",
                                  use_safetensors=True)
    merge_lora(transformer)
    transformer.save_pretrained(args.out)
    print(f"merge: LoRA from {adapter} folded into the weights; saved to {args.out}")


# ----------------------------------------------------------------------------------------------- parser
def _add_training(p, default_lr: float) -> None:
    p.add_argument("--cache", required=True, help="latent cache written by `encode`")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=default_lr)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=_seed, default=0,
                   help="seeds the new weights (convert / LoRA), the training draws and --random-text")
    p.add_argument("--checkpoint-dir", default=None, help="periodic checkpoints; a rerun resumes from the latest")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (save_pretrained)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fused-latent-io", action="store_true",
                   help="train through dcgen_kernels' fused patch_embed / patch_unembed (embedder and head only)")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                   help="backend of the fused ops with --fused-latent-io")
    _add_device(p)


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:  # torch.manual_seed's range
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**63), got {text!r}")
    return seed


def _t_shift(text: str):
    if text == "auto":
        return text
    try:
        shift = float(text)
    except ValueError:
        shift = math.nan
    if not 0 < shift < math.inf:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive number, got {text!r}")
    return shift


def _add_device(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the models run (default: cuda when a GPU is visible, else cpu; bf16 autocast on cuda)")


def _add_text(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text-embeds", help="safetensors written by encode-text (FLUX: encoder_hidden_states, "
                                         "pooled_projections and their null_ versions; SANA: encoder_hidden_states, "
                                         "encoder_attention_mask and their null_ versions)")
    g.add_argument("--random-text", action="store_true", help="random text embeddings (SMOKE TESTS ONLY)")
    p.add_argument("--random-text-tokens", type=int, default=8)
    p.add_argument("--p-drop", type=float, default=0.1, help="probability of replacing a prompt by the null one")
    p.add_argument("--patch-size", type=int, default=None, help="checked against the model if given")
    p.add_argument("--t-shift", type=_t_shift, default="auto",
                   help="timestep shift of training (default auto: guidance-distilled FLUX's for the latents' token "
                        "count, none for schnell-like FLUX, SANA's 3.0; 1 = none)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dcgen_kernels.dcgen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("encode", help="encode images with the base AE and the DC-AE into a latent cache")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images")
    src.add_argument("--sample-images", action="store_true", help="scikit-image's bundled sample images")
    p.add_argument("--base-ae", required=True, help="local base autoencoder directory: AutoencoderKL (FLUX vae/) "
                                                    "or AutoencoderDC (SANA's DC-AE f32c32), read from config.json")
    p.add_argument("--dc-ae", required=True, help="local AutoencoderDC directory")
    p.add_argument("--size", type=int, required=True, help="square image side in pixels")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="cache file (.safetensors)")
    _add_device(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("encode-text", help="encode prompts with a local FLUX / SANA pipeline's text encoders into "
                                           "a --text-embeds file")
    p.add_argument("--pipeline", required=True, help="local FluxPipeline or SanaPipeline directory (model_index.json "
                                                     "+ text encoders and tokenizers; transformer and vae not loaded)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="UTF-8 text file, one prompt per line, in the cache's image order (a folder "
                                       "is encoded in file-name order: the cache's metadata `images`)")
    src.add_argument("--prompt", help="one prompt for every image")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens (default: the pipeline's, FLUX 512 / SANA 300; 256 for FLUX schnell)")
    p.add_argument("--no-complex-human-instruction", action="store_true",
                   help="SANA: encode the bare prompts, without the instruction SanaPipeline prepends by default")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="text encoders' dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="text embeddings file (.safetensors)")
    _add_device(p)
    p.set_defaults(func=cmd_encode_text)

    p = sub.add_parser("align-embedding", help="stage 1: convert a base FLUX / SANA and align the new embedder")
    p.add_argument("--transformer", required=True, help="local base FluxTransformer2DModel or "
                                                        "SanaTransformer2DModel directory")
    p.add_argument("--latent-channels", type=int, default=None, help="DC-AE latent channels (default: cache's)")
    p.add_argument("--patch-size", type=int, default=1)
    p.add_argument("--mode", choices=("pool", "upsample"), default="pool")
    _add_training(p, 1e-3)
    p.set_defaults(func=cmd_align_embedding)

    p = sub.add_parser("align-head", help="stage 2: train embedder + output head of a converted FLUX / SANA")
    p.add_argument("--transformer", required=True, help="local converted FLUX or SANA directory (align-embedding "
                                                        "output)")
    _add_text(p)
    _add_training(p, 1e-4)
    p.set_defaults(func=cmd_align_head)

    p = sub.add_parser("lora", help="stage 3: LoRA on the blocks plus embedder / head")
    p.add_argument("--transformer", required=True, help="local converted FLUX or SANA directory (align-head output)")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--alpha", type=float, default=256.0)
    _add_text(p)
    _add_training(p, 1e-4)
    p.set_defaults(func=cmd_lora)

    p = sub.add_parser("merge", help="fold the LoRA saved by `lora` into the weights")
    p.add_argument("--transformer", required=True, help="output directory of the `lora` command")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad arguments / missing files / invalid inputs, 1 a training run
    stopped by a non-finite loss, or host memory exhausted)."""
    from .data import DataError

    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (CLIError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:  # the library's argument checks (steps, lr, shapes, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the loss diverged: the checkpoints written so far stay
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError:  # host memory (e.g. encode's images at a huge --size); a GPU's is torch's OutOfMemoryError
        print("error: out of host memory: a smaller --size or --batch-size, or fewer images, needs less",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
