"""End-to-end per-image latency of FLUX.1-Krea vs DC-Gen-FLUX and SANA-1.6B vs DC-Gen-SANA, beside the paper.

Per-image latency = steps x transformer step + autoencoder decode, batch 1. Text encoders are excluded by default
(their cost does not depend on the latent space; the paper's speed-ups are dominated by the transformer and
decoder). With text_encoders={family: DIR} (run.py --text-encoders flux=DIR) a family's encoders are loaded from
a local diffusers pipeline folder (local_files_only, never downloaded), one fixed prompt is tokenized and encoded
per image, timed like the rest, and added to the per-image latency of that family's pipelines; the table and JSON
say per row whether they are included and what they measured. Expected layout, diffusers' component names, each
folder written by save_pretrained (a downloaded FLUX.1-dev / SANA pipeline folder has it):
  flux: text_encoder/ (CLIPTextModel) + tokenizer/, text_encoder_2/ (T5EncoderModel) + tokenizer_2/
  sana: text_encoder/ (Gemma2Model) + tokenizer/
Every other model is the real diffusers architecture with random bf16 weights built on the GPU: latency does not
depend on weight values, and nothing is downloaded.

Models (resolution -> latent, image tokens):
  FLUX.1-Krea   FLUX-12B transformer (FLUX.1-dev config; Krea is a fine-tune of the same architecture), f8c16
                latent packed 2x2 (64 channels per token), FLUX VAE decoder; 28 steps. 1K/2K/4K = 4096 / 16384 /
                65536 tokens.
  DC-Gen-FLUX   the same transformer through dcgen_kernels.dcgen.convert(transformer, C, patch_size=1) (a 1x1
                patch embedder and head): DC-AE f32c32 at 1K and 2K (1024 / 4096 tokens), DC-AE-1.5 f64c128 at 4K
                (4096 tokens), with the matching AutoencoderDC decoder; 20 steps (the paper's).
  SANA-1.6B     SANA-1.6B transformer, DC-AE f32c32 (SANA 1.0 decoder); 20 steps.
  DC-Gen-SANA   the same transformer on DC-AE-1.5 f64c128 latents (in/out channels 128, patch 1); 20 steps.
Text tokens: 512 for FLUX, 300 for SANA (a mask of ones).

The DC-AE-1.5 f64c128 decoder is not published as a diffusers config. Assumption, stated in the output: the DC-AE
1.0 f64c128 macro-architecture as diffusers' converter defines it (7 stages 128..2048 channels, ResBlocks with
batch norm + ReLU in stages 0-2, EfficientViT blocks with RMSNorm + SiLU in stages 3-6, decoder layers
[0, 5, 10, 2, 2, 2, 2], pixel-shuffle upsampling); DC-AE 1.5 describes a structured latent space (channel-wise
training) on that kind of network, which changes weights, not per-decode cost.

Variants (per transformer step and per decode, all in the same process, stock first):
  stock          diffusers eager.
  patched        dcgen_kernels.patch(model) (backend auto), checked against the stock output (rel-L2 <= 2e-2);
                 a decoder patch() does not support (AutoencoderKL) keeps its stock decode, said in the record.
  patched_graph  transformer steps below graph_max_tokens image tokens: patch(model, cuda_graph=True), the step
                 replayed as a CUDA graph (the first, checked call captures it; a step that ran eagerly instead is
                 an error), with the patched decode. Eager FLUX steps at 1024-4096 tokens are host-paced on an H100
                 (benchmarks/profile_step.py).
  torch_compile  torch.compile(transformer) of stock (Inductor, mode default) in a later section (run_compile),
                 only for the configurations the time budget allows (FLUX compiles for ~2 min per shape on an
                 H100); compile seconds are reported apart; the decode stays stock eager.
Step times are medians of a few steps after warm-up, extrapolated to the step count (said in the table).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .common import (ProgressBar, build_module, error_record, flux_ids, free_device_memory, measure_patched,
                     rel_l2, check_record)
from .bench_dcae_decode import DCAE_F32C32_SANA_1_0
from .bench_flux_step import FLUX_DEV_12B
from .bench_sana_step import SANA_1600M
from .timing import time_ms, wall_s

E2E_TOL = 2e-2  # whole model or decoder, bf16, patched vs stock
# torch.compile of stock vs eager stock. Inductor keeps the bf16 intermediates of fused pointwise chains in fp32
# (torch._inductor.config.emulate_precision_casts is False by default), so over FLUX's deep random-weight stack it
# departs from eager stock far more than bf16 rounding order does (0.13 at DC-Gen-FLUX 4K, H100) while computing the
# same function: on a 6-layer FLUX on the CPU, compiled is 5.5e-3 from fp32 and eager 4.0e-2, and with the casts
# emulated compiled is 1.7e-3 from eager (PERF_NOTES). This check guards against timing a wrong graph (unrelated
# outputs are ~1.4 apart), not against rounding.
COMPILE_TOL = 0.25
WEIGHTS_NOTE = ("random bf16 weights built on the GPU (diffusers' default init) for transformers and decoders: latency "
                "does not depend on weight values")
F64C128_ASSUMPTION = ("DC-AE-1.5 f64c128 decoder assumed = the DC-AE 1.0 f64c128 architecture (diffusers converter "
                      "config); DC-AE 1.5 changes the latent structure and training, not the per-decode cost")

# The paper's H100 per-image latencies in seconds (DC-Gen, arXiv 2509.25180) and speed-ups.
PAPER_H100_S = {"FLUX.1-Krea": {"1K": 4.65, "2K": 23.76, "4K": 213.8},
                "DC-Gen-FLUX": {"1K": 1.10, "2K": 1.41, "4K": 4.04}}
PAPER_SPEEDUP = {"DC-Gen-FLUX": {"1K": 4.2, "2K": 16.9, "4K": 52.9}}

# ------------------------------------------------------------------------------------------------ configs
# The model configs of the step benchmarks (FLUX.1-dev 12B, SANA-1.6B) and the SANA 1.0 f32c32 DC-AE.
FLUX_12B = FLUX_DEV_12B
# FLUX.1's VAE (black-forest-labs/FLUX.1-dev vae/config.json), written out: no download.
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
DCAE_F32C32 = DCAE_F32C32_SANA_1_0  # the decoder SANA and DC-Gen-FLUX 1K/2K decode with
_DC7 = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 4
DCAE_F64C128 = dict(in_channels=3, latent_channels=128, attention_head_dim=32, encoder_block_types=_DC7,
                    decoder_block_types=_DC7, encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024, 2048),
                    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024, 2048),
                    encoder_layers_per_block=(0, 4, 8, 2, 2, 2, 2), decoder_layers_per_block=(0, 5, 10, 2, 2, 2, 2),
                    encoder_qkv_multiscales=((),) * 7, decoder_qkv_multiscales=((),) * 7,
                    decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 4,
                    decoder_act_fns=("relu",) * 3 + ("silu",) * 4, scaling_factor=0.2889)

FLUX_TINY = dict(FLUX_12B, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(8, 12, 12))
SANA_TINY = dict(SANA_1600M, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_cross_attention_heads=2,
                 cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24)
FLUX_VAE_TINY = dict(FLUX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
# Tiny DC-AEs keep the stage count (the compression) and shrink channels; the decoder's input shortcut repeats the
# latent to the last stage's width, so the latent may not be wider than that stage.
DCAE_F32C32_TINY = dict(DCAE_F32C32, latent_channels=16, attention_head_dim=8,
                        encoder_block_out_channels=(8, 8, 8, 16, 16, 16),
                        decoder_block_out_channels=(8, 8, 8, 16, 16, 16), encoder_layers_per_block=(1,) * 6,
                        decoder_layers_per_block=(1,) * 6)
DCAE_F64C128_TINY = dict(DCAE_F64C128, latent_channels=32, attention_head_dim=8,
                         encoder_block_out_channels=(8, 8, 8, 16, 16, 32, 32),
                         decoder_block_out_channels=(8, 8, 8, 16, 16, 32, 32),
                         encoder_layers_per_block=(0, 1, 1, 1, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1, 1, 1, 1))


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    key: str
    cls: str  # diffusers class name
    kwargs: dict
    compression: int  # spatial
    note: str = ""

    @property
    def latent_channels(self) -> int:
        return self.kwargs["latent_channels"]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    name: str
    family: str  # "flux" | "sana"
    autoencoder: dict  # resolution -> Autoencoder.key
    patch: int  # transformer tokens are p x p latent patches (FLUX.1's 2x2 packing)
    steps: int
    base: str = ""  # the model a DC-Gen model accelerates
    paper: str = ""  # the paper's row it is compared with (default: its own name)


@dataclasses.dataclass(frozen=True)
class Config:
    flux: dict
    sana: dict
    autoencoders: tuple
    resolutions: dict  # label -> image side in pixels
    pipelines: tuple
    dtype: torch.dtype
    text_tokens: dict  # family -> tokens
    timing: tuple  # ((max image tokens, warm-up, timed calls), ...) in increasing token order
    compile_backend: str
    compile_plan: tuple  # (pipeline, resolution) in priority order
    compile_min_s: dict  # family -> seconds a compile needs at least (GPU)
    patch_backend: str  # what the patched variant passes to dcgen_kernels.patch
    # Steps below this many image tokens also run patched with CUDA graphs (patched_graph); above it a FLUX step
    # is seconds of GPU work and the capture's extra warm-up steps cost more than the host's launches
    graph_max_tokens: int


def _pipelines(steps_flux: int = 28, steps_dcgen: int = 20) -> tuple:
    return (Pipeline("FLUX.1-Krea", "flux", {r: "flux_vae" for r in ("1K", "2K", "4K")}, 2, steps_flux),
            Pipeline("DC-Gen-FLUX", "flux", {"1K": "dcae_f32c32", "2K": "dcae_f32c32", "4K": "dcae_f64c128"}, 1,
                     steps_dcgen, "FLUX.1-Krea"),
            # The same model on f64c128 at 1K and 2K too (at 4K it is DC-Gen-FLUX): the paper's 2K latency (1.41 s,
            # 20 steps + decode) is below 20 steps at f32c32's 4096 tokens on an H100; this row measures the
            # alternative.
            Pipeline("DC-Gen-FLUX-f64c128", "flux", {"1K": "dcae_f64c128", "2K": "dcae_f64c128"}, 1, steps_dcgen,
                     "FLUX.1-Krea", "DC-Gen-FLUX"),
            Pipeline("SANA-1.6B", "sana", {r: "dcae_f32c32" for r in ("1K", "2K", "4K")}, 1, 20),
            Pipeline("DC-Gen-SANA", "sana", {r: "dcae_f64c128" for r in ("1K", "2K", "4K")}, 1, 20, "SANA-1.6B"))


_AE_NOTES = {"flux_vae": "FLUX.1 VAE (AutoencoderKL, 16 latent channels)",
             "dcae_f32c32": "DC-AE f32c32, SANA 1.0 config",
             "dcae_f64c128": F64C128_ASSUMPTION}
REAL = Config(
    flux=FLUX_12B, sana=SANA_1600M,
    autoencoders=(Autoencoder("flux_vae", "AutoencoderKL", FLUX_VAE, 8, _AE_NOTES["flux_vae"]),
                  Autoencoder("dcae_f32c32", "AutoencoderDC", DCAE_F32C32, 32, _AE_NOTES["dcae_f32c32"]),
                  Autoencoder("dcae_f64c128", "AutoencoderDC", DCAE_F64C128, 64, _AE_NOTES["dcae_f64c128"])),
    resolutions={"1K": 1024, "2K": 2048, "4K": 4096}, pipelines=_pipelines(), dtype=torch.bfloat16,
    text_tokens={"flux": 512, "sana": 300},
    # A 65536-token FLUX step takes ~7 s: its first (checked) call is the only warm-up.
    timing=((4096, 2, 5), (16384, 1, 3), (math.inf, 0, 2)),
    compile_backend="inductor",
    compile_plan=(("DC-Gen-FLUX", "4K"), ("SANA-1.6B", "4K"), ("DC-Gen-SANA", "4K"), ("DC-Gen-FLUX", "1K"),
                  ("FLUX.1-Krea", "1K")),
    compile_min_s={"flux": 180, "sana": 75}, patch_backend="auto", graph_max_tokens=65536)
TINY = Config(
    flux=FLUX_TINY, sana=SANA_TINY,
    autoencoders=(Autoencoder("flux_vae", "AutoencoderKL", FLUX_VAE_TINY, 8, "tiny " + _AE_NOTES["flux_vae"]),
                  Autoencoder("dcae_f32c32", "AutoencoderDC", DCAE_F32C32_TINY, 32, "tiny f32 (16 latent channels)"),
                  Autoencoder("dcae_f64c128", "AutoencoderDC", DCAE_F64C128_TINY, 64, "tiny f64 (32 latent channels)")),
    resolutions={"1K": 64, "2K": 128, "4K": 256}, pipelines=_pipelines(), dtype=torch.float32,
    text_tokens={"flux": 8, "sana": 8}, timing=((math.inf, 0, 1),), compile_backend="eager",
    compile_plan=(("DC-Gen-FLUX", "4K"), ("DC-Gen-SANA", "4K")), compile_min_s={"flux": 0, "sana": 0},
    # The kernel sections run the Triton kernels in the interpreter; here the patched code paths (processors,
    # block forwards) run on the fp32 reference ops, so the tiny harness stays fast.
    patch_backend="reference", graph_max_tokens=65536)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _timing(cfg: Config, tokens: int):
    return next((w, i) for limit, w, i in cfg.timing if tokens <= limit)


def _key(pipeline: str, resolution: str) -> str:
    return f"{pipeline}/{resolution}"


def latent_shape(cfg: Config, pipe: Pipeline, resolution: str):
    """(channels, side) of the pipeline's latent at `resolution`, and its image-token count."""
    ae = next(a for a in cfg.autoencoders if a.key == pipe.autoencoder[resolution])
    side = cfg.resolutions[resolution] // ae.compression
    return ae.latent_channels, side, (side // pipe.patch) ** 2


# ------------------------------------------------------------------------------------------------ text encoders
@dataclasses.dataclass(frozen=True)
class TextEncoder:
    folder: str  # sub-folder of the pipeline folder (the diffusers component name)
    cls: str  # transformers class
    tokenizer: str  # the tokenizer's sub-folder
    max_length: int | None  # tokens the prompt is padded to; None: the config's text tokens of the family
    attention_mask: bool  # whether the pipeline passes the mask to the encoder


# What the diffusers pipelines run per prompt: FluxPipeline.encode_prompt (CLIP pooled output at 77 tokens, T5 at
# max_sequence_length 512, no masks); SanaPipeline.encode_prompt (Gemma-2 at 300 tokens with the mask; its
# optional "complex human instruction" prefix is not added).
TEXT_ENCODERS = {
    "flux": (TextEncoder("text_encoder", "CLIPTextModel", "tokenizer", 77, False),
             TextEncoder("text_encoder_2", "T5EncoderModel", "tokenizer_2", None, False)),
    "sana": (TextEncoder("text_encoder", "Gemma2Model", "tokenizer", None, True),),
}
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json")


def _layout(family: str) -> str:
    return ", ".join(f"{e.folder}/ ({e.cls}) + {e.tokenizer}/" for e in TEXT_ENCODERS[family])


def parse_text_encoder_dirs(values) -> dict:
    """["flux=DIR", "sana=DIR"] (run.py's --text-encoders) -> {family: DIR}; every folder and transformers checked
    (ValueError, FileNotFoundError, RuntimeError)."""
    dirs = {}
    for value in values or ():
        family, sep, directory = value.partition("=")
        if not sep or family not in TEXT_ENCODERS or not directory:
            raise ValueError(f"--text-encoders: expected FAMILY=DIR with FAMILY one of {', '.join(TEXT_ENCODERS)}, "
                             f"got {value!r}")
        if family in dirs:
            raise ValueError(f"--text-encoders: {family} given twice")
        dirs[family] = directory
    for family, directory in dirs.items():
        check_text_encoder_dir(family, directory)
    if dirs:
        _transformers()
    return dirs


def check_text_encoder_dir(family: str, directory) -> None:
    """FileNotFoundError naming every file or folder missing from a family's local pipeline folder."""
    from pathlib import Path

    root = Path(directory)
    missing = []
    if not root.is_dir():
        missing.append(f"the folder {root} itself")
    else:
        for enc in TEXT_ENCODERS[family]:
            model, tok = root / enc.folder, root / enc.tokenizer
            if not (model / "config.json").is_file():
                missing.append(f"{enc.folder}/config.json ({enc.cls})")
            if not any(any(model.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
                missing.append(f"{enc.folder}/ weights ({' or '.join(_WEIGHT_PATTERNS)})")
            if not any((tok / name).is_file() for name in _TOKENIZER_FILES):
                missing.append(f"{enc.tokenizer}/ (a tokenizer saved with save_pretrained)")
    if missing:
        raise FileNotFoundError(
            f"text encoders for {family} in {root}: missing {'; '.join(missing)}. Expected a local diffusers pipeline "
            f"folder with {_layout(family)}, each written by save_pretrained; nothing is downloaded")


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError("--text-encoders needs the transformers package (not a dependency of dcgen_kernels): "
                           f"pip install transformers ({err})") from err
    return transformers


def _load_text_encoders(cfg: Config, family: str, directory: str, device, rec: dict) -> list:
    """[(tokenizer, encoder on the device, max length, pass the mask)] of a family, described in rec["encoders"]."""
    transformers = _transformers()
    stages = []
    for enc in TEXT_ENCODERS[family]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(f"{directory}/{enc.tokenizer}", local_files_only=True)
        model = getattr(transformers, enc.cls).from_pretrained(f"{directory}/{enc.folder}", local_files_only=True,
                                                               dtype=cfg.dtype).to(device).eval()
        length = enc.max_length or cfg.text_tokens[family]
        rec["encoders"][enc.folder] = {"class": enc.cls, "tokenizer": enc.tokenizer, "max_length": length,
                                       "params": sum(p.numel() for p in model.parameters())}
        stages.append((tokenizer, model, length, enc.attention_mask))
    return stages


def _run_text_encoders(cfg: Config, family: str, directory: str, device, result: dict) -> None:
    """Load a family's encoders and tokenizers from `directory` and time tokenize + encode of PROMPT per image."""
    warmup, iters = cfg.timing[0][1:]
    rec = result["text_encoders"][family] = {"dir": str(directory), "prompt": PROMPT, "encoders": {}}
    stages = []

    def encode():
        outs = []
        for tokenizer, model, length, with_mask in stages:
            tokens = tokenizer(PROMPT, padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").to(device)
            outs.append(model(input_ids=tokens["input_ids"],
                              attention_mask=tokens["attention_mask"] if with_mask else None)[0])
        return outs

    try:
        stages += _load_text_encoders(cfg, family, directory, device, rec)
        with torch.no_grad():
            encode()  # first call: lazy initialisation, not timed
            rec.update({"ms": time_ms(encode, device, warmup, iters), "warmup": warmup, "iters": iters,
                        "dtype": str(cfg.dtype).removeprefix("torch.")})
    except Exception as err:  # noqa: BLE001 - recorded; the per-image latency then says the encoders are excluded
        rec.update(error_record(err))
    finally:
        stages.clear()  # the encoders leave the device before the next item
        free_device_memory(device)


# ------------------------------------------------------------------------------------------------ models
def build_flux(cfg: Config, device):
    from diffusers import FluxTransformer2DModel

    return build_module(lambda: FluxTransformer2DModel(**cfg.flux), device, cfg.dtype)


def set_flux_latent(model, channels: int, patch: int) -> None:
    """FLUX.1-Krea keeps its 2x2-packed 16-channel embedder; DC-Gen-FLUX gets dcgen.convert's 1x1 embedder.
    convert re-draws the layers on every call, so it is called only when the token width changes."""
    from dcgen_kernels import dcgen

    if model.config.in_channels != channels * patch * patch:
        dcgen.convert(model, latent_channels=channels, patch_size=patch)


def flux_inputs(cfg: Config, model, tokens: int, device) -> dict:
    g = torch.Generator().manual_seed(tokens)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=cfg.dtype)  # noqa: E731
    txt_ids, img_ids = flux_ids(cfg.text_tokens["flux"], tokens, device)
    return dict(hidden_states=randn(1, tokens, model.config.in_channels),
                encoder_hidden_states=randn(1, cfg.text_tokens["flux"], cfg.flux["joint_attention_dim"]),
                pooled_projections=randn(1, cfg.flux["pooled_projection_dim"]),
                timestep=torch.tensor([0.5], device=device, dtype=cfg.dtype),
                guidance=torch.tensor([3.5], device=device, dtype=cfg.dtype),
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def build_sana(cfg: Config, channels: int, side: int, device):
    """Rebuilt per resolution: SANA's sin-cos position table is made for its sample_size (recomputed every call
    otherwise). DC-Gen-SANA = the same config with in/out channels 128, which is what dcgen.convert produces."""
    from diffusers import SanaTransformer2DModel

    kwargs = dict(cfg.sana, in_channels=channels, out_channels=channels, sample_size=side)
    return build_module(lambda: SanaTransformer2DModel(**kwargs), device, cfg.dtype, seed=channels)


def sana_inputs(cfg: Config, channels: int, side: int, device) -> dict:
    g = torch.Generator().manual_seed(side)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=cfg.dtype)  # noqa: E731
    text = cfg.text_tokens["sana"]
    return dict(hidden_states=randn(1, channels, side, side),
                encoder_hidden_states=randn(1, text, cfg.sana["caption_channels"]),
                timestep=torch.tensor([500.0], device=device, dtype=cfg.dtype),
                encoder_attention_mask=torch.ones(1, text, device=device, dtype=torch.int64), return_dict=False)


def build_autoencoder(cfg: Config, ae: Autoencoder, device):
    import diffusers

    cls = getattr(diffusers, ae.cls)
    return build_module(lambda: cls(**ae.kwargs), device, cfg.dtype, seed=ae.latent_channels)


# ------------------------------------------------------------------------------------------------ measuring
def _measure(cfg: Config, model, fn, device, warmup: int, iters: int, graph: bool = False) -> dict:
    """stock (first call = output for the check, then warm-up and timing), then patched on the same model, and
    patched with CUDA graphs when `graph`."""
    rec = {"warmup": warmup, "iters": iters}
    with torch.no_grad():
        stock_out = fn()
        rec["stock"] = {"ms": time_ms(fn, device, warmup, iters)}
        for name in ("patched", "patched_graph") if graph else ("patched",):
            try:
                rec[name] = measure_patched(model, fn, device, warmup, iters, stock_out, E2E_TOL, cfg.patch_backend,
                                            cuda_graph=name == "patched_graph")
                if "ms" in rec[name]:
                    rec[name]["speedup_vs_stock"] = rec["stock"]["ms"] / rec[name]["ms"]
                    rec[name].pop("report", None)  # patch_report text per step is long; counts stay
            except Exception as err:  # noqa: BLE001 - recorded; stock stays
                rec[name] = error_record(err)
    return rec


def plan(cfg: Config, resolutions) -> list:
    """Work items in the order they run: transformer steps per family, then decodes (shared by pipelines)."""
    steps = [(p, r) for fam in ("flux", "sana") for p in cfg.pipelines if p.family == fam for r in resolutions
             if r in p.autoencoder]
    ae_order, res_order = [a.key for a in cfg.autoencoders], list(cfg.resolutions)
    decodes = sorted({(p.autoencoder[r], r) for p, r in steps},
                     key=lambda ar: (ae_order.index(ar[0]), res_order.index(ar[1])))
    return [("step", p, r) for p, r in steps] + [("decode", a, r) for a, r in decodes]


# Seconds an item needs at least on an H100 (stock + patched, warm-up included), for the budget check; the
# 65536-token FLUX step and the FLUX VAE 4K decode dominate.
ITEM_MIN_S = {"step": 15, "step_65536": 60, "decode": 10, "decode_4K": 25, "encode": 30}
BUDGET_RESERVE_S = 20  # left for the summary, the table and the chart


def _item_min_s(cfg: Config, kind: str, what, res: str) -> float:
    if kind == "encode":  # loading T5-XXL (9.5 GB) dominates
        return ITEM_MIN_S["encode"]
    if kind == "step":
        return ITEM_MIN_S["step_65536" if latent_shape(cfg, what, res)[2] >= 65536 else "step"]
    return ITEM_MIN_S["decode_4K" if res == "4K" else "decode"]


def run(device: torch.device, tiny: bool, quick: bool = False, progress=None, time_left=None,
        pipelines=None, text_encoders=None) -> dict:
    """Eager stock and patched transformer steps and decodes. quick: 1K only. time_left(): seconds left of the
    run's budget or None; an item that would not fit is recorded as skipped. pipelines: names to run (all).
    text_encoders: {family: local pipeline folder} whose encoders are timed and included (default: excluded)."""
    cfg = TINY if tiny else REAL
    resolutions = list(cfg.resolutions)[:1] if quick else list(cfg.resolutions)
    pipes = [p for p in cfg.pipelines if pipelines is None or p.name in pipelines]
    cfg = dataclasses.replace(cfg, pipelines=tuple(pipes))
    text_encoders = dict(text_encoders or {})
    for family, directory in text_encoders.items():  # fail before the long work, not after it
        if family not in TEXT_ENCODERS:
            raise ValueError(f"text_encoders: unknown family {family!r}; expected one of {', '.join(TEXT_ENCODERS)}")
        check_text_encoder_dir(family, directory)
    if text_encoders:
        _transformers()
    result = {"config": {"dtype": str(cfg.dtype).removeprefix("torch."), "device": str(device), "batch": 1,
                         "weights": WEIGHTS_NOTE, "text_tokens": cfg.text_tokens,
                         "resolutions": {r: cfg.resolutions[r] for r in resolutions},
                         "pipelines": {p.name: {"family": p.family, "steps": p.steps, "patch": p.patch,
                                                "autoencoder": {r: p.autoencoder[r] for r in resolutions
                                                                if r in p.autoencoder},
                                                "paper": p.paper or p.name,
                                                "base": p.base or None} for p in pipes},
                         "autoencoders": {a.key: {"class": a.cls, "note": a.note, "compression": a.compression,
                                                  "latent_channels": a.latent_channels, "kwargs": _jsonable(a.kwargs)}
                                          for a in cfg.autoencoders},
                         "transformers": {"flux": _jsonable(cfg.flux), "sana": _jsonable(cfg.sana)},
                         "text_encoders": {f: {"dir": str(d), "layout": _layout(f)} for f, d in text_encoders.items()},
                         "tolerance": E2E_TOL, "quick": quick, "patch_backend": cfg.patch_backend,
                         "graph_max_tokens": cfg.graph_max_tokens,
                         "timing": "median of the timed calls after warm-up; per-image = steps x median step + "
                                   "decode (steps extrapolated, not all run)"},
              "steps": {}, "decodes": {}, "text_encoders": {}}
    work = plan(cfg, resolutions) + [("encode", f, None) for f in text_encoders if any(p.family == f for p in pipes)]
    bar = ProgressBar(len(work), "e2e")
    flux = None
    try:
        for kind, what, res in work:
            name = what if isinstance(what, str) else what.name
            bar.describe(f"{kind} {name} {res or ''}".rstrip())
            if flux is not None and not (kind == "step" and what.family == "flux"):
                flux = None  # the 12B model goes before SANA and the decoders need the memory
                free_device_memory(device)
            left = time_left() if time_left and not tiny else None
            need = _item_min_s(cfg, kind, what, res) + BUDGET_RESERVE_S
            if left is not None and left < need:
                skipped = {"skipped": f"{left:.0f} s left of the run's budget, this item needs about {need:.0f} s"}
                if kind == "encode":
                    result["text_encoders"][name] = skipped
                else:
                    result["steps" if kind == "step" else "decodes"][_key(name, res)] = skipped
            elif kind == "encode":
                _run_text_encoders(cfg, name, text_encoders[name], device, result)
            elif kind == "step":
                if what.family == "flux" and flux is None:
                    flux = build_flux(cfg, device)
                _run_step(cfg, what, res, device, flux, result)
            else:
                _run_decode(cfg, what, res, device, result)
            bar.update()
            if progress:
                progress(result)
    finally:
        bar.close()
        del flux
        free_device_memory(device)
    return result


def _run_step(cfg: Config, pipe: Pipeline, res: str, device, flux, result: dict) -> None:
    channels, side, tokens = latent_shape(cfg, pipe, res)
    warmup, iters = _timing(cfg, tokens)
    rec = result["steps"][_key(pipe.name, res)] = {"image_tokens": tokens, "latent": [channels, side, side],
                                                   "text_tokens": cfg.text_tokens[pipe.family]}
    model = None
    try:
        if pipe.family == "flux":
            model = flux
            set_flux_latent(model, channels, pipe.patch)
            x = flux_inputs(cfg, model, tokens, device)
        else:
            model = build_sana(cfg, channels, side, device)
            x = sana_inputs(cfg, channels, side, device)
        rec["in_channels"] = model.config.in_channels
        rec.update(_measure(cfg, model, lambda: model(**x)[0], device, warmup, iters,
                            graph=tokens < cfg.graph_max_tokens))
    except Exception as err:  # noqa: BLE001
        rec.update(error_record(err))
    finally:
        if pipe.family == "sana":
            del model
        free_device_memory(device)


def _run_decode(cfg: Config, ae_key: str, res: str, device, result: dict) -> None:
    ae = next(a for a in cfg.autoencoders if a.key == ae_key)
    side = cfg.resolutions[res] // ae.compression
    # Decode cost grows with the image like FLUX.1's token count for it (16 x 16 pixels per token): same timing.
    warmup, iters = _timing(cfg, (cfg.resolutions[res] // 16) ** 2)
    rec = result["decodes"][_key(ae_key, res)] = {"latent": [ae.latent_channels, side, side],
                                                  "image": [cfg.resolutions[res]] * 2}
    model = None
    try:
        model = build_autoencoder(cfg, ae, device)
        g = torch.Generator().manual_seed(side)
        z = torch.randn(1, ae.latent_channels, side, side, generator=g).to(device, cfg.dtype)
        rec.update(_measure(cfg, model, lambda: model.decode(z, return_dict=False)[0], device, warmup, iters))
    except Exception as err:  # noqa: BLE001
        rec.update(error_record(err))
    finally:
        del model
        free_device_memory(device)


# ------------------------------------------------------------------------------------------------ torch.compile
def run_compile(device: torch.device, tiny: bool, eager: dict, progress=None, time_left=None) -> dict:
    """torch.compile of the stock transformer for the configurations of the compile plan, as far as the budget
    allows (time_left(): seconds left or None): those run() measured when it ran (`eager` has steps), else the
    whole plan.
    The stock eager step is timed here too, on the same model and inputs, for the speed-up."""
    cfg = TINY if tiny else REAL
    ran = {key for key, rec in (eager or {}).get("steps", {}).items() if "ms" in rec.get("stock", {})}
    result = {"config": {"backend": cfg.compile_backend, "mode": "default",
                         "note": "compile_s = wall seconds of the first call (compilation + one step); stock_ms = "
                                 "the stock eager step timed in this section; the rest of the pipeline (decode) "
                                 "stays eager"},
              "steps": {}}
    try:
        import torch._dynamo as dynamo
    except ImportError as err:
        return {"unavailable": f"torch._dynamo: {err}"}
    eager_ran = "steps" in (eager or {})  # not when the e2e section was left out, skipped or failed
    targets = [(name, res) for name, res in cfg.compile_plan if not eager_ran or _key(name, res) in ran]
    bar = ProgressBar(len(targets), "e2e compile")
    try:
        for name, res in targets:
            pipe = next(p for p in cfg.pipelines if p.name == name)
            key = _key(name, res)
            bar.describe(f"compile {key}")
            left = time_left() if time_left else None
            need = cfg.compile_min_s[pipe.family]
            if left is not None and left < need:
                result["steps"][key] = {"torch_compile": {"skipped": f"{left:.0f} s left of the run's budget, a "
                                                                     f"{pipe.family} compile needs about {need} s"}}
            else:
                result["steps"][key] = {"torch_compile": _compile_one(cfg, pipe, res, device, dynamo)}
            bar.update()
            if progress:
                progress(result)
    finally:
        bar.close()
    return result


def _compile_one(cfg: Config, pipe: Pipeline, res: str, device, dynamo) -> dict:
    channels, side, tokens = latent_shape(cfg, pipe, res)
    warmup, iters = _timing(cfg, tokens)
    model = compiled = None
    try:
        if pipe.family == "flux":
            model = build_flux(cfg, device)
            set_flux_latent(model, channels, pipe.patch)
            x = flux_inputs(cfg, model, tokens, device)
        else:
            model = build_sana(cfg, channels, side, device)
            x = sana_inputs(cfg, channels, side, device)
        dynamo.reset()
        compiled = torch.compile(model, backend=cfg.compile_backend)
        with torch.no_grad():
            stock_out = model(**x)[0]
            out, seconds = wall_s(lambda: compiled(**x)[0], device)
            rec = {"compile_s": seconds, **check_record(rel_l2(out, stock_out), COMPILE_TOL)}
            del out, stock_out
            rec["ms"] = time_ms(lambda: compiled(**x)[0], device, warmup, iters)
            rec["stock_ms"] = time_ms(lambda: model(**x)[0], device, warmup, iters)
        rec["speedup_vs_stock"] = rec["stock_ms"] / rec["ms"]
        return rec
    except Exception as err:  # noqa: BLE001
        return error_record(err)
    finally:
        del model, compiled
        dynamo.reset()
        free_device_memory(device)


# ------------------------------------------------------------------------------------------------ summary
VARIANTS = ("stock", "patched", "patched_graph", "torch_compile")


def text_encoder_status(eager: dict) -> dict:
    """family -> (ms per image or None, "included (measured X ms)" / "excluded ...") for every family that runs."""
    asked = eager.get("config", {}).get("text_encoders", {})
    measured = eager.get("text_encoders", {})
    out = {}
    for family in dict.fromkeys(p["family"] for p in eager.get("config", {}).get("pipelines", {}).values()):
        rec = measured.get(family, {})
        if family not in asked:
            out[family] = (None, "excluded")
        elif "ms" in rec:
            out[family] = (rec["ms"], f"included (measured {rec['ms']:.1f} ms)")
        else:
            why = rec.get("error") or rec.get("skipped") or "no pipeline of this family ran"
            out[family] = (None, f"excluded: not measured ({str(why).splitlines()[0][:120]})")
    return out


def summarize(eager: dict, compiled: dict = None) -> dict:
    """Per-image latency per pipeline, resolution and variant, and the DC-Gen speed-ups beside the paper's."""
    cfg_pipes = eager.get("config", {}).get("pipelines", {})
    steps, decodes = eager.get("steps", {}), eager.get("decodes", {})
    comp_steps = (compiled or {}).get("steps", {})
    encoders = text_encoder_status(eager)
    images, speedups = {}, {}
    for name, pcfg in cfg_pipes.items():
        encode_ms, encode_status = encoders[pcfg["family"]]
        for res, ae_key in pcfg["autoencoder"].items():
            key = _key(name, res)
            step, dec = steps.get(key, {}), decodes.get(_key(ae_key, res), {})
            rec = images[key] = {"steps": pcfg["steps"], "autoencoder": ae_key, "text_encoders": encode_status,
                                 "variants": {}}
            paper = PAPER_H100_S.get(pcfg.get("paper", name), {}).get(res)
            if paper is not None:
                rec["paper_h100_s"] = paper
            if "error" in dec.get("patched", {}):
                rec["patched_decode_error"] = dec["patched"]["error"].splitlines()[0][:160]
            for variant in VARIANTS:
                step_rec = comp_steps.get(key, {}).get(variant) if variant == "torch_compile" else step.get(variant)
                if not step_rec or "ms" not in step_rec:
                    continue
                # A decoder that patch() does not support (or a compiled transformer) decodes stock; a patched
                # decode that raised leaves the patched pipelines unmeasured, not stock-decoded.
                patched_decode = variant in ("patched", "patched_graph") and "unavailable" not in dec.get("patched", {})
                dec_variant = "patched" if patched_decode else "stock"
                dec_rec = dec.get(dec_variant)
                if not dec_rec or "ms" not in dec_rec:
                    continue
                # The encoders are the same (stock) in every variant.
                seconds = (pcfg["steps"] * step_rec["ms"] + dec_rec["ms"] + (encode_ms or 0)) / 1e3
                v = rec["variants"][variant] = {"s": seconds, "step_ms": step_rec["ms"], "decode_ms": dec_rec["ms"],
                                                "decode_variant": dec_variant}
                if encode_ms is not None:
                    v["text_encoder_ms"] = encode_ms
                if step_rec.get("check") == "FAILED" or dec_rec.get("check") == "FAILED":
                    v["check"] = "FAILED"
                if paper is not None:
                    v["ours_over_paper"] = seconds / paper
                if variant == "torch_compile":  # against the stock step timed beside it (same model and inputs)
                    v["stock_step_ms"] = step_rec["stock_ms"]
            stock_s = rec["variants"].get("stock", {}).get("s")
            for variant, v in rec["variants"].items():
                reference_s = stock_s
                if "stock_step_ms" in v:
                    reference_s = (pcfg["steps"] * v["stock_step_ms"] + v["decode_ms"] + (encode_ms or 0)) / 1e3
                if variant != "stock" and reference_s:
                    v["speedup_vs_stock"] = reference_s / v["s"]
    for name, pcfg in cfg_pipes.items():
        base = pcfg.get("base")
        for res in pcfg["autoencoder"]:
            ours, theirs = images.get(_key(name, res), {}), images.get(_key(base, res), {}) if base else {}
            if not base or not ours or not theirs:
                continue
            rec = speedups[_key(name, res)] = {"base": base, "speedup_vs_base": {}}
            for variant, v in ours["variants"].items():
                base_v = theirs["variants"].get(variant)
                # Base and DC-Gen model in the same variant, both checked; the stock base is the paper's reference.
                if base_v is not None and "FAILED" not in (v.get("check"), base_v.get("check")):
                    rec["speedup_vs_base"][variant] = base_v["s"] / v["s"]
            paper = PAPER_SPEEDUP.get(pcfg.get("paper", name), {}).get(res)
            if paper is not None:
                rec["paper"] = paper
                if "stock" in rec["speedup_vs_base"]:
                    rec["ours_stock_over_paper"] = rec["speedup_vs_base"]["stock"] / paper
            checked = [v for v in ours["variants"].values() if v.get("check") != "FAILED"]
            if "stock" in theirs["variants"] and checked:
                rec["best_over_stock_base"] = max(theirs["variants"]["stock"]["s"] / v["s"] for v in checked)
    encoders_note = "; ".join(f"{family} {status}" for family, (_, status) in encoders.items())
    return {"images": images, "speedups": speedups,
            "text_encoders": {family: status for family, (_, status) in encoders.items()},
            "note": "per-image = steps x median step + decode (+ text encoders where included); steps extrapolated "
                    f"from a few timed steps; text encoders: {encoders_note}; " + WEIGHTS_NOTE}


def _fmt(value, spec, suffix=""):
    return format(value, spec) + suffix if isinstance(value, (int, float)) else "-"


def markdown(summary: dict, eager: dict, env: str) -> str:
    """The per-image table beside the paper, the speed-up table, and the notes that say how it was made."""
    images, speedups = summary.get("images", {}), summary.get("speedups", {})
    steps = eager.get("steps", {})
    lines = [f"### End-to-end latency per image ({env})", "",
             "| model | res | steps | step ms stock / patched / graph / compile | decode ms stock / patched | "
             "text enc ms | per image s stock | patched | graph | compile | paper H100 s | stock / paper |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, rec in images.items():
        name, res = key.split("/")
        v = rec["variants"]
        step = steps.get(key, {})
        step_ms = " / ".join(_fmt(v.get(n, {}).get("step_ms"), ".1f") for n in VARIANTS)
        patched = v.get("patched", {})
        dec_patched = _fmt(patched.get("decode_ms"), ".0f") if patched.get("decode_variant") == "patched" else "stock"
        if "patched_decode_error" in rec:
            dec_patched = "error"
        dec = f"{_fmt(v.get('stock', {}).get('decode_ms'), '.0f')} / {dec_patched}"
        err = step.get("error") or step.get("stock", {}).get("error")
        if err and not v:
            error = str(err).splitlines()[0][:80]
            lines.append(f"| {name} | {res} | {rec['steps']} | error: {error} | | | | | | | | |")
            continue
        fails = " (check FAILED)" if any(x.get("check") == "FAILED" for x in v.values()) else ""
        seconds = " | ".join(_fmt(v.get(n, {}).get("s"), ".2f") for n in VARIANTS)
        ratio = _fmt(v.get("stock", {}).get("ours_over_paper"), ".2f")
        encode = next((x["text_encoder_ms"] for x in v.values() if "text_encoder_ms" in x), None)
        encode = _fmt(encode, ".1f") if encode is not None else "excl."
        lines.append(f"| {name} | {res} | {rec['steps']} | {step_ms} | {dec} | {encode} | {seconds}{fails} | "
                     f"{_fmt(rec.get('paper_h100_s'), '.2f')} | {ratio} |")
    lines += ["", "| speed-up vs base | res | ours stock | ours patched | ours graph | ours compile | "
                  "best vs stock base | paper | ours stock / paper |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, rec in speedups.items():
        name, res = key.split("/")
        s = rec["speedup_vs_base"]
        lines.append(f"| {name} vs {rec['base']} | {res} | {_fmt(s.get('stock'), '.1f', 'x')} | "
                     f"{_fmt(s.get('patched'), '.1f', 'x')} | {_fmt(s.get('patched_graph'), '.1f', 'x')} | "
                     f"{_fmt(s.get('torch_compile'), '.1f', 'x')} | "
                     f"{_fmt(rec.get('best_over_stock_base'), '.1f', 'x')} | {_fmt(rec.get('paper'), '.1f', 'x')} | "
                     f"{_fmt(rec.get('ours_stock_over_paper'), '.2f')} |")
    cfg = eager.get("config", {})
    lines += [""] + text_encoder_lines(eager)
    lines += ["", f"Per image = steps x median transformer step + one decode (+ the text encoders where 'text enc ms' "
                  f"has a time), batch 1. Step times are medians of a "
                  f"few steps after warm-up (per row in the JSON), extrapolated to the step count, not all steps run. "
                  f"{cfg.get('weights', WEIGHTS_NOTE)}. 'graph' = patched with CUDA graphs (patch(cuda_graph=True), "
                  f"below {cfg.get('graph_max_tokens', '?')} image tokens; the same model's patched decode). "
                  f"'compile' = torch.compile of the stock transformer with a "
                  f"stock decode (compile seconds in the JSON; its speed-up is over the stock step timed beside it), "
                  f"'-' = not run in this budget. The patched decode is 'stock' where patch() does not support the "
                  f"decoder (AutoencoderKL), 'error' where it raised (no patched per-image time then). "
                  f"{F64C128_ASSUMPTION}. "
                  f"Paper: DC-Gen (arXiv 2509.25180), H100."]
    return "\n".join(lines) + "\n"


def text_encoder_lines(eager: dict) -> list:
    """One line per model family: text encoders included (what was measured, from where) or excluded."""
    asked, measured = eager.get("config", {}).get("text_encoders", {}), eager.get("text_encoders", {})
    lines = []
    for family, (ms, status) in text_encoder_status(eager).items():
        if ms is None:
            hint = f"; include them with --text-encoders {family}=DIR" if family not in asked else ""
            lines.append(f"Text encoders ({family}): {status}{hint}.")
            continue
        rec = measured[family]
        models = " + ".join(f"{e['class']} ({e['max_length']} tokens)" for e in rec["encoders"].values())
        lines.append(f"Text encoders ({family}): {status} per image and added to it: {models}, {rec['dtype']}, "
                     f"their own weights loaded from {rec['dir']}, tokenize + encode of one fixed prompt, median of "
                     f"{rec['iters']} after {rec['warmup']} warm-up calls.")
    return lines


def write_chart(summary: dict, path, title: str, sizes: dict = None) -> str:
    """Log-scale per-image latency per resolution, one bar per model x variant (a colour per model, a hatch per
    variant), the paper's H100 figures as lines. PNG, Agg backend. sizes: resolution label -> pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = summary.get("images", {})
    resolutions = sorted({k.split("/")[1] for k in images}, key=lambda r: int(r.rstrip("K")))
    models = list(dict.fromkeys(k.split("/")[0] for k in images))
    bars = [(name, variant) for name in models for variant in VARIANTS
            if any(variant in images[k]["variants"] for k in images if k.startswith(name + "/"))]
    fig, ax = plt.subplots(figsize=(4 + 0.35 * len(resolutions) * max(1, len(bars)), 4.8))
    width = 0.8 / max(1, len(bars))
    colors = plt.get_cmap("tab10").colors
    hatches = {"stock": "", "patched": "//", "patched_graph": "xx", "torch_compile": ".."}
    for i, (name, variant) in enumerate(bars):
        xs, ys = [], []
        for j, res in enumerate(resolutions):
            s = images.get(_key(name, res), {}).get("variants", {}).get(variant, {}).get("s")
            if s:
                xs.append(j + (i - (len(bars) - 1) / 2) * width)
                ys.append(s)
        ax.bar(xs, ys, width=width, label=f"{name} {variant}", color=colors[models.index(name) % len(colors)],
               hatch=hatches[variant], edgecolor="white" if variant == "stock" else "black", linewidth=0.3)
    for name, by_res in PAPER_H100_S.items():
        pts = [(j, by_res[r]) for j, r in enumerate(resolutions) if r in by_res]
        if pts and name in models:
            ax.plot(*zip(*pts), marker="x", linestyle="--", color=colors[models.index(name) % len(colors)],
                    label=f"{name}: paper, H100")
    ax.set_yscale("log")
    ax.set_xticks(range(len(resolutions)))
    ax.set_xticklabels([f"{r} ({(sizes or {}).get(r, '?')}$^2$ px)" for r in resolutions])
    ax.set_ylabel("seconds per image (log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
