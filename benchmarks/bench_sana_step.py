"""One SANA transformer step (SanaTransformer2DModel.forward): stock eager vs dcgen_kernels.patch vs torch.compile.

Real mode: the SANA-1.6B config (Sana_1600M_*_diffusers: 20 layers, 70 heads x 32 = 2240, cross-attention
20 x 112 over 2240, caption_channels 2304 (Gemma-2 2B), mlp_ratio 2.5, patch_size 1, no attention bias, LayerNorm
eps 1e-6 without affine; interpolation_scale 2.0 and sample_size = the latent side as diffusers' converter sets
them for the 4K checkpoint), random bf16 weights built directly on the GPU, B=1, 300 text tokens with an
encoder_attention_mask of ones (the stock path still hands SDPA the float bias built from it), at
  c32_128x128  SANA 4K: DC-AE f32c32 latent of a 4096^2 image (16384 tokens), in/out channels 32;
  c128_64x64   DC-Gen-SANA 4K: f64c128 latent of a 4096^2 image (4096 tokens), in/out channels 128.
Tiny mode: a 2-layer fp32 model on the CPU at toy shapes.

`run` (eager section): stock, the noise floor (patch(model, backend="reference") vs stock: bf16 noise of the
stock path grown through the blocks), stock_graph (the unpatched step replayed as a CUDA graph: a reference row for
what graphs alone save), patched (backend auto, what users get), patched_triton, patched_graph
(patch(cuda_graph=True): the step replayed as one CUDA graph) and patched_fp8_graph (also quant="fp8": the block
linears in FP8). The check allows max(2e-2, twice the noise floor), for fp8 common.QUANT_STEP_TOL. Then one
profiled step of stock and of patched (kernel_profile: GPU kernel ms by class, the costliest kernels, the costliest
GEMMs by input shapes).
`run_compile` (a later section, since it is slow: ~40 s of compilation per shape on an H100): rebuilds the same
seeded model, runs torch.compile(model) (mode default, Inductor) and reports its first-call seconds (compilation
plus one execution) apart from its steady-state ms, and its speed-up over the stock step timed beside it (same model
and inputs). Tiny mode uses torch.compile(backend="eager") instead:
Dynamo traces the model (the same capture path) without Inductor code generation.
"""

from __future__ import annotations

import dataclasses

import torch


from .common import (ANCHOR_LABEL, build_module, check_record, error_record, free_device_memory,
                     measure_stock_graph, noise_floor_tolerance, STEP_VARIANTS, record_patched_variants,
                     reference_noise_floor, rel_l2)
from .timing import profile_gemm_shapes, profile_kernels, time_ms, wall_s

STEP_TOL = 2e-2
# The bf16 GEMMs alone are 44.5 / 11.2 TFLOP per step (benchmarks/projection.py's counter): at an assumed
# 650 TFLOP/s 68 / 17 ms against the 0.5x-of-stock targets' 84 / 22 ms (README: with the other ops' minimal traffic
# an estimated bf16 floor of ~81 ms at 128x128); FP8 linears (quant="fp8") run the GEMMs ~1.8x faster.
SANA_STEP_VARIANTS = STEP_VARIANTS + (("patched_fp8_graph", "auto", True, "fp8"),)
SANA_1600M = dict(num_attention_heads=70, attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
                  cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5,
                  attention_bias=False, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
                  interpolation_scale=2.0)
SANA_TINY = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, num_cross_attention_heads=2,
                 cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=48, mlp_ratio=2.5,
                 attention_bias=False, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
                 interpolation_scale=2.0)


@dataclasses.dataclass(frozen=True)
class Shape:
    key: str
    in_channels: int
    grid: int
    warmup: int
    iters: int
    anchor_key: str = ""  # in the anchor file's "sana1600m_step_ms"
    compile_anchor_key: str = ""  # in its "sana1600m_step_ms_second_run"


@dataclasses.dataclass(frozen=True)
class Config:
    model: dict
    dtype: torch.dtype
    text_tokens: int
    shapes: tuple
    compile_backend: str
    weights: str


# ~170 ms and ~45 ms per stock step on an H100: ~10 s eager in all, plus ~2 x 40 s torch.compile.
REAL = Config(SANA_1600M, torch.bfloat16, 300,
              (Shape("c32_128x128", 32, 128, 2, 5, "c32_128x128", "sana_c32_128"),
               Shape("c128_64x64", 128, 64, 2, 5, "c128_64x64", "sana_c128_64")),
              "inductor", "random (diffusers' default init, built on the GPU in bf16); latency does not depend on them")
TINY = Config(SANA_TINY, torch.float32, 8, (Shape("c8_8x8", 8, 8, 0, 1), Shape("c16_4x4", 16, 4, 0, 1)),
              "eager", "random (diffusers' default init), fp32 on the CPU")


def build_model(cfg: Config, shape: Shape, device: torch.device):
    from diffusers import SanaTransformer2DModel

    kwargs = dict(cfg.model, in_channels=shape.in_channels, out_channels=shape.in_channels, sample_size=shape.grid)
    return build_module(lambda: SanaTransformer2DModel(**kwargs), device, cfg.dtype, seed=shape.in_channels)


def model_and_inputs(device: torch.device, tiny: bool, size: str) -> tuple:
    """(model, inputs) of the named shape of the tiny or the real config, for the diagnostics that run these steps."""
    cfg = TINY if tiny else REAL
    shapes = {shape.key: shape for shape in cfg.shapes}
    if size not in shapes:
        raise ValueError(f"--size must be one of {sorted(shapes)} in this mode, got {size!r}")
    return build_model(cfg, shapes[size], device), make_inputs(cfg, shapes[size], device)


def make_inputs(cfg: Config, shape: Shape, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(shape.grid)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=cfg.dtype)  # noqa: E731
    return dict(
        hidden_states=randn(1, shape.in_channels, shape.grid, shape.grid),
        encoder_hidden_states=randn(1, cfg.text_tokens, cfg.model["caption_channels"]),
        timestep=torch.tensor([500.0], device=device, dtype=cfg.dtype),
        # A tokenizer's attention mask, all ones: SanaTransformer2DModel turns it into a zero float bias.
        encoder_attention_mask=torch.ones(1, cfg.text_tokens, device=device, dtype=torch.int64),
        return_dict=False,
    )


def _config_record(cfg: Config, device) -> dict:
    return {"model": dict(cfg.model), "dtype": str(cfg.dtype).removeprefix("torch."), "device": str(device),
            "batch": 1, "text_tokens": cfg.text_tokens,
            "encoder_attention_mask": f"all ones ({cfg.text_tokens} valid tokens)",
            "shapes": {s.key: {"in_channels": s.in_channels, "latent": [s.grid, s.grid], "image_tokens": s.grid**2}
                       for s in cfg.shapes},
            "weights": cfg.weights, "tolerance": f"max({STEP_TOL}, 2 x noise floor)"}


def run(device: torch.device, tiny: bool, anchors=None, progress=None) -> dict:
    """Eager variants. anchors: the anchor file's "sana1600m_step_ms" block (or None)."""
    cfg = TINY if tiny else REAL
    result = {"config": _config_record(cfg, device), "sizes": {}}
    for shape in cfg.shapes:
        rec = result["sizes"][shape.key] = {"warmup": shape.warmup, "iters": shape.iters}
        model = None
        try:
            model = build_model(cfg, shape, device)
            x = make_inputs(cfg, shape, device)
            step = lambda: model(**x)[0]  # noqa: E731
            with torch.no_grad():
                stock_out = step()
                rec["stock"] = {"ms": time_ms(step, device, shape.warmup, shape.iters)}
                if (anchors or {}).get(shape.anchor_key):
                    rec["stock"][ANCHOR_LABEL] = anchors[shape.anchor_key]
                rec["noise_floor"] = reference_noise_floor(model, step, stock_out)
                tolerance = noise_floor_tolerance(rec["noise_floor"], STEP_TOL)
                rec["stock_graph"] = measure_stock_graph(model, step, device, shape.warmup, shape.iters, stock_out,
                                                         tolerance, rec["stock"]["ms"])
                record_patched_variants(rec, model, step, device, shape.warmup, shape.iters, stock_out, tolerance,
                                        SANA_STEP_VARIANTS)
                rec["kernel_profile"] = kernel_profiles(model, step, device)
        except Exception as err:  # noqa: BLE001
            rec.update(error_record(err))
        finally:
            del model
            free_device_memory(device)
        if progress:
            progress(result)
    return result


def kernel_profiles(model, step, device: torch.device) -> dict:
    """One profiled step each of stock and patch(model): GPU kernel ms by class and the costliest kernels, i.e. where
    the patched step's time goes against its floor (README), and the costliest GEMMs by shape (`gemm_by_shape`:
    [op, input shapes, ms, calls] per step). Costs about eight steps."""
    import dcgen_kernels

    profiles = {}
    try:
        profiles["stock"] = profile_kernels(step, device, steps=1, top=8)
        profiles["stock"]["gemm_by_shape"] = profile_gemm_shapes(step, device, top=8)
        dcgen_kernels.patch(model)
        try:
            profiles["patched"] = profile_kernels(step, device, steps=1, top=8)
            profiles["patched"]["gemm_by_shape"] = profile_gemm_shapes(step, device, top=8)
        finally:
            dcgen_kernels.unpatch(model)
    except Exception as err:  # noqa: BLE001 - a diagnostic: the timed variants stay
        profiles.update(error_record(err))
    return profiles


COMPILE_MIN_S_PER_SHAPE = 60  # H100: ~40 s of Inductor compilation + build and timing


def run_compile(device: torch.device, tiny: bool, eager: dict = None, anchors=None, progress=None,
                time_left=None) -> dict:
    """torch.compile of the stock model, per shape, against the stock step timed here. eager: the `run` section's
    result, for the tolerance; anchors: the anchor file's "sana1600m_step_ms_second_run" block (or None);
    time_left(): seconds left of the run's budget or None (a shape that would not fit is skipped)."""
    cfg = TINY if tiny else REAL
    result = {"config": {"backend": cfg.compile_backend, "mode": "default", "dtype": str(cfg.dtype),
                         "note": "compile_s = wall seconds of the first call (compilation + one execution); "
                                 "same seeded weights and inputs as the eager section"},
              "sizes": {}}
    try:
        import torch._dynamo as dynamo
    except ImportError as err:
        return {"unavailable": f"torch._dynamo: {err}"}
    for shape in cfg.shapes:
        eager_size = ((eager or {}).get("sizes") or {}).get(shape.key, {})
        rec = result["sizes"][shape.key] = {"warmup": shape.warmup, "iters": shape.iters}
        left = time_left() if time_left and not tiny else None
        if left is not None and left < COMPILE_MIN_S_PER_SHAPE:
            rec["skipped"] = f"{left:.0f} s left of the run's budget, a shape needs about {COMPILE_MIN_S_PER_SHAPE} s"
            if progress:
                progress(result)
            continue
        model = compiled = None
        try:
            model = build_model(cfg, shape, device)
            x = make_inputs(cfg, shape, device)
            dynamo.reset()
            compiled = torch.compile(model, backend=cfg.compile_backend)
            with torch.no_grad():
                stock_out = model(**x)[0]
                out, seconds = wall_s(lambda: compiled(**x)[0], device)
                tolerance = noise_floor_tolerance(eager_size.get("noise_floor", {}), STEP_TOL)
                rec["torch_compile"] = {"compile_s": seconds, **check_record(rel_l2(out, stock_out), tolerance)}
                del out, stock_out
                rec["torch_compile"]["ms"] = time_ms(lambda: compiled(**x)[0], device, shape.warmup, shape.iters)
                rec["torch_compile"]["stock_ms"] = time_ms(lambda: model(**x)[0], device, shape.warmup, shape.iters)
            rec["torch_compile"]["speedup_vs_stock"] = rec["torch_compile"]["stock_ms"] / rec["torch_compile"]["ms"]
            anchor = (anchors or {}).get(shape.compile_anchor_key)
            if anchor:
                rec["torch_compile"][ANCHOR_LABEL] = {"ms": anchor.get("torch_compile"),
                                                      "compile_s": anchor.get("compile_s")}
        except Exception as err:  # noqa: BLE001
            rec.update(error_record(err))
        finally:
            del model, compiled
            dynamo.reset()
            free_device_memory(device)
        if progress:
            progress(result)
    return result
