"""dcgen_kernels benchmark suite: `python -m benchmarks.run [--tiny] [--suite kernels|dcgen|e2e|all |
--sections a,b,...] [--out results.json]`.

With a CUDA GPU it runs at real sizes; without one (or with --tiny) it runs a tiny CPU configuration that only
proves the code paths work: its timings are not meaningful.

How to read the numbers
- Every time is a median (CUDA events per call after warm-up; perf_counter on the CPU) in milliseconds, and
  every comparison is within this run: "stock" is diffusers' eager path, timed in the same process. Single small
  ops (patch_embed, sana_ops, quant_linear layers) are timed as GPU time with the host's launch overhead hidden
  (timing.time_kernel_ms; their host cost per call is recorded as host_ms); model steps and decodes include it.
- Ceilings are measured in the same run (1 GiB device copy counting read + write bytes; bf16 8192³ GEMM) and
  shown beside the anchor values of an H100 measured on 2026-11-27 (benchmarks/anchors/). "%GEMM" is a
  variant's attention TFLOP/s (4·B·H·N²·D / t, matmuls only) over this run's measured GEMM TFLOP/s.
- flux_attention: B1 H24 D128 bf16, 512 text + 4096 / 16384 image tokens. "stock" includes the q/k RMSNorms,
  the [text, image] concat, RoPE and layout copies; "sdpa_cudnn" / "sdpa_flash" are SDPA alone on prepared
  inputs (a bound for attention without that work); "dcgen_*" are the fused op on the raw projection views.
  "x stock" = stock ms / variant ms. rel-L2 is against an fp32 reference of the same inputs; above max(1e-2, 1.5x
  stock's own rel-L2 up to 3e-2) the check says FAILED.
- flux_step: one FluxTransformer2DModel forward, FLUX.1-dev 12B config, random bf16 weights (latency does not
  depend on them), stock vs dcgen_kernels.patch(model) on the same model. Its check allows max(1e-2, twice the
  deviation of the fp32 reference backend from stock), since bf16 noise grows through the 57 blocks.
- sana_ops: each SANA / DC-AE op vs the stock diffusers math it replaces (bench_sana_ops.py names it), bf16, B=1,
  at SANA-1.6B shapes (C 2240, 70x32 heads, FFN 5600, cross 20x112 over 300 text tokens) for N = 4096 / 16384,
  and the DC-AE multi-scale linear attention at the 4K decoder's stage shapes. "dcgen" is backend auto (what
  patch() uses), "dcgen_triton"/"dcgen_cuda" force a backend (skipped when it would fall back). GB/s counts
  inputs read once + output written once (memory-bound ops), "%copy" is that over this run's copy ceiling;
  TFLOP/s for glumbconv (its GEMMs + depthwise conv) and the cross-attention. Checks against an fp32 reference at
  rel-L2 max(1e-2, 1.5x stock's own up to 3e-2).
- host_overhead: host microseconds per call of five common ops at 64 tokens (bench_host_overhead.py): the public
  function, the custom op through torch's dispatcher, and the bare implementation.
- sana_step: one SanaTransformer2DModel forward, SANA-1.6B config, random bf16 weights, 300 text tokens with a
  mask of ones, at c32_128x128 (SANA 4K) and c128_64x64 (DC-Gen-SANA 4K): stock eager vs patch(model); checks
  allow max(2e-2, twice the fp32-reference-backend deviation); one profiled step of stock and patched gives the
  kernel time by class (profile_step.py's classes). sana_step_compile: torch.compile of the stock
  model (Inductor, mode default) at the same shapes, run last; "compile s" is its first call in wall seconds; its
  "x stock" is over a stock step timed in that section.
- dcae_decode: AutoencoderDC.decode of a 1x32x128x128 latent (a 4096^2 image), stock vs patched, for the SANA 1.0
  f32c32 decoder (EfficientViT stages) and for AutoencoderDC()'s defaults (all ResBlocks, the anchor's config).
- targets: fused attention faster than stock at both N; fused attention ≥ 650 TFLOP/s (a goal); the patched
  4096-token step faster than stock; the patched SANA step ≤ 0.5x stock eager and faster than torch.compile of
  stock at both shapes; sana_linear_attention ≥ 80% of the copy ceiling at 16384 tokens; the patched SANA 1.0
  DC-AE 4K decode faster than stock. A target counts only variants whose correctness check is ok.
- e2e (bench_e2e.py): per-image latency = steps x transformer step + decode for FLUX.1-Krea (28 steps) vs
  DC-Gen-FLUX (20) and SANA-1.6B vs DC-Gen-SANA (20) at 1K/2K/4K, stock / patched, beside the paper's H100 figures;
  steps are medians of a few timed steps, extrapolated. e2e_compile adds torch.compile of the stock transformer
  where the budget allows. The markdown table and a log-scale PNG chart are written beside --out
  (<stem>-e2e.md, <stem>-e2e.png). --quick: 1K only. Text encoders are excluded unless --text-encoders FAMILY=DIR
  names a local pipeline folder holding them (timed per image, added, shown in their own column).
- projection (projection.py): RTX 5090 latency PROJECTED from op counts of the same configurations, datasheet peaks
  and the efficiencies measured in this run (or the H100 anchors); never a measurement.
- targets (e2e): DC-Gen-FLUX vs FLUX.1-Krea stock speed-up within +-20% of the paper's at each resolution; the
  patched DC-Gen-FLUX 4K step faster than stock.
- patch_embed (bench_patch_embed.py): the fused patch (un)embedding ops vs the bare GEMM on packed input, fwd and
  fwd+bwd, every variant checked against the fp32 reference. quant_linear (bench_quant_linear.py): FP8 / NVFP4
  linears vs cuBLAS bf16 at FLUX shapes, and the FLUX-12B step stock / patched / fp8 / nvfp4.
- targets (dcgen): patch_embed/unembed >= 0.9x the bare GEMM (fwd and fwd+bwd, worst case); FP8 linear including
  the activation quantization >= 1.4x cuBLAS bf16 per layer; W4A16 >= 0.9x cuBLAS bf16 per layer; FLUX-12B step
  patched fp8 <= 0.6x stock.
- Suites: kernels (ops, model steps, decodes), dcgen (ceilings, patch_embed, quant_linear), e2e (ceilings, e2e,
  projection, e2e_compile), all (default); or
  --sections a,b. A new section is one line in SECTIONS. compare.py diffs two of these JSONs (perf regressions).
- --budget-s (gpu_check passes what is left of its 8 minutes): a section that would not fit is recorded as
  skipped instead of being killed with the suite; the torch.compile sections need the most.
- problems: every section that raised (its "error" is in the JSON), every FAILED check, and failed GPU tests;
  the exit status is 1 when there are any.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first, not the repository root
    sys.path.insert(0, str(REPO))

ANCHOR_FILE = REPO / "benchmarks" / "anchors" / "h100-2026-11-27.json"
ATTENTION_GOAL_TFLOPS = 650
SANA_STEP_MAX_FRACTION_OF_STOCK = 0.5
LINEAR_ATTENTION_MIN_FRACTION_OF_COPY = 0.8
E2E_PAPER_RATIO_TOLERANCE = 0.2  # ours / paper DC-Gen-FLUX speed-up within +-20%
PATCH_EMBED_MIN_FRACTION_OF_GEMM = 0.9  # fused (un)packing + GEMM vs the bare GEMM on packed input
FP8_LAYER_MIN_SPEEDUP = 1.4  # FP8 linear incl. activation quantization vs cuBLAS bf16
FP8_STEP_MAX_FRACTION_OF_STOCK = 0.6
W4A16_LAYER_MIN_FRACTION_OF_BF16 = 0.9  # NVFP4 weights with bf16 activations vs cuBLAS bf16, per FLUX layer
TINY_NOTE = "tiny CPU mode, timings are not meaningful"


def _command_output(*cmd: str):
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    import torch
    import triton

    import dcgen_kernels

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    cuda = device.type == "cuda"
    nvcc = _command_output("nvcc", "--version")
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "diffusers": diffusers_version, "dcgen_kernels": dcgen_kernels.__version__,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
                     "nvcc": nvcc.splitlines()[-1] if nvcc else None},
        "git": _git_record(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "dcgen_kernels_info": dcgen_kernels.info(),
    }


# What `tree_sha256` covers: the code that runs and is measured.
_TREE_GLOBS = ("dcgen_kernels/**/*.py", "csrc/**/*", "benchmarks/*.py", "benchmarks/*.sh", "tests/*.py", "setup.py",
               "CMakeLists.txt")


def tree_digest(root: Path = REPO) -> str:
    """sha256 over the paths and bytes of the files in _TREE_GLOBS: the same on the GPU machine's copy of the work
    tree (which may carry another .git, or none) as on the developer's checkout of the commit it was made from."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted({f for pattern in _TREE_GLOBS for f in root.glob(pattern) if f.is_file()})
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def _git_record() -> dict:
    """The commit measured: DCGEN_GIT_COMMIT where gpu_check's caller passes it in (the GPU machine's .git, if any,
    is not the tree's: `dirty` is then unknown), else the local HEAD; `tree_sha256` identifies the tree either way."""
    given = os.environ.get("DCGEN_GIT_COMMIT")
    if given:
        return {"commit": given, "commit_source": "DCGEN_GIT_COMMIT", "dirty": None, "tree_sha256": tree_digest()}
    status = _command_output("git", "status", "--porcelain")
    return {"commit": _command_output("git", "rev-parse", "HEAD"), "commit_source": "git HEAD",
            "dirty": None if status is None else bool(status), "tree_sha256": tree_digest()}


def load_anchors() -> dict:
    data = json.loads(ANCHOR_FILE.read_text())
    keys = ("gpu", "date", "stack", "note", "ceilings", "attention_B1_H24_D128_bf16",
            "plain_triton_flash_attention_fwd", "flux12b_step_ms_by_image_tokens", "flux12b_step_ms_4096_torch_compile",
            "sana1600m_step_ms", "sana1600m_step_ms_second_run", "autoencoder_decode_ms", "autoencoder_decode_note")
    return {"file": str(ANCHOR_FILE.relative_to(REPO)), **{k: data.get(k) for k in keys}}


def gpu_check_record(junit: str | None, phases: str | None) -> dict:
    """Phases gpu_check.sh ran before this suite (a TSV: name, status, seconds) and the GPU tests' counts."""
    rec = {}
    if phases and Path(phases).exists():
        rows = [line.split("\t") for line in Path(phases).read_text().splitlines() if line]
        rec["phases"] = [{"phase": name, "status": status, "seconds": float(seconds)} for name, status, seconds in rows]
    if junit:
        if not Path(junit).exists():
            rec["pytest"] = {"error": f"no pytest report at {junit} (pytest did not run or crashed)"}
        else:
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
            counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            rec["pytest"] = counts
    return rec


def _target(name: str, passed, detail: str) -> dict:
    return {"target": name, "pass": passed, "detail": detail}


def _patched_dcgen(variants: dict):
    """The variant of what patch() runs (backend auto), as (name, record), or None when it did not pass its check:
    `dcgen` where the section times auto, else the first forced backend in auto's order (cuda, triton) that ran.
    Not the fastest of them: a target holds for what users get."""
    for name in ("dcgen", "dcgen_cuda", "dcgen_triton"):
        rec = variants.get(name, {})
        if "ms" in rec:
            return (name, rec) if rec.get("check") == "ok" else None
    return None


def targets(report: dict, tiny: bool) -> list:
    """The performance targets of the sections that ran, at the real sizes; in tiny mode listed, not evaluated."""
    ran = set(report.get("sections", []))
    out = flux_targets(report, ran) + sana_targets(report, ran) + dcgen_targets(report, ran)
    if "e2e" in ran:
        out += e2e_targets(report)
    if tiny:
        for t in out:
            t.update({"pass": None, "detail": f"not evaluated: {TINY_NOTE}"})
    return out


def flux_targets(report: dict, ran: set) -> list:
    from benchmarks import bench_flux_attention, bench_flux_step

    att_cfg, step_key = bench_flux_attention.REAL, str(bench_flux_step.REAL.sizes[0][0])
    out = []
    for image_tokens in att_cfg.image_tokens if "flux_attention" in ran else ():
        key = f"N={att_cfg.text_tokens + image_tokens}"
        variants = report.get("flux_attention", {}).get("sizes", {}).get(key, {}).get("variants", {})
        ours, stock_ms = _patched_dcgen(variants), variants.get("stock", {}).get("ms")
        why = _why_not(variants.get("dcgen") or report.get("flux_attention"))
        speed = tflops = (False, f"no checked dcgen result or no stock time ({why})")
        if ours and stock_ms:
            name, rec = ours
            speed = (rec["ms"] < stock_ms, f"{name} {rec['ms']:.3f} ms vs stock {stock_ms:.3f} ms")
            tflops = (rec["tflops"] >= ATTENTION_GOAL_TFLOPS, f"{name} {rec['tflops']:.0f} TFLOP/s")
        out += [_target(f"fused attention faster than stock at {key}", *speed),
                _target(f"fused attention >= {ATTENTION_GOAL_TFLOPS} TFLOP/s at {key} (goal)", *tflops)]

    if "flux_step" in ran:
        size = report.get("flux_step", {}).get("sizes", {}).get(step_key) or report.get("flux_step", {})
        stock_ms, patched = size.get("stock", {}).get("ms"), size.get("patched", {})
        step = (False, f"no checked result ({_why_not(patched or size)})")
        if stock_ms and "ms" in patched and patched.get("check") == "ok":
            step = (patched["ms"] < stock_ms, f"patched {patched['ms']:.1f} ms vs stock {stock_ms:.1f} ms")
        out.append(_target(f"FLUX step at {step_key} image tokens: patched faster than stock", *step))
    return out


def dcgen_targets(report: dict, ran: set) -> list:
    """Issue 4: fused patch (un)embedding >= 0.9x the bare GEMM, forward and forward+backward. Issue 6: FP8 linear
    incl. activation quantization >= 1.4x cuBLAS bf16 per FLUX layer; W4A16 >= 0.9x cuBLAS bf16 per FLUX layer;
    FLUX-12B step patched fp8 <= 0.6x stock."""
    out = []
    if "patch_embed" in ran:
        summary = report.get("patch_embed", {}).get("summary", {})
        for mode in ("fwd", "fwd_bwd"):
            rec = summary.get(mode, {})
            result = (False, f"no checked result ({_why_not(report.get('patch_embed'))})")
            if rec.get("measured"):
                missing = rec.get("failed_check", []) + rec.get("unmeasured", [])
                detail = (f"worst {rec['worst_case']}: {rec['min_vs_gemm']:.2f}x the bare GEMM over {rec['measured']} "
                          f"cases" + (f"; failed or unmeasured: {', '.join(missing)}" if missing else ""))
                result = (bool(rec.get("met")), detail)
            out.append(_target(f"patch_embed/unembed {mode} >= {PATCH_EMBED_MIN_FRACTION_OF_GEMM}x bare GEMM",
                               *result))
    if "quant_linear" not in ran:
        return out
    quant = report.get("quant_linear", {})
    if not quant.get("layers"):
        out.append(_target(f"FP8 linear incl. its fused activation quantization >= {FP8_LAYER_MIN_SPEEDUP}x bf16",
                           False, f"no layer measured ({_why_not(quant)})"))
    for key, layer in quant.get("layers", {}).items():
        # The quantization counted where the model pays it: inside the producer kernel (adaLN-modulate, GELU,
        # concat), against the same producer + cuBLAS bf16 GEMM.
        rec = layer.get("fp8_fused_producer", {}) if isinstance(layer, dict) else {}
        result = (False, f"no checked result ({_why_not(rec)})")
        if _checked_ms(rec) and rec.get("speedup_vs_bf16_with_producer"):
            result = (rec["speedup_vs_bf16_with_producer"] >= FP8_LAYER_MIN_SPEEDUP,
                      f"{layer.get('producer')} + fp8 GEMM {rec['ms']:.3f} ms = "
                      f"{rec['speedup_vs_bf16_with_producer']:.2f}x its bf16 producer + cuBLAS bf16")
        out.append(_target(f"FP8 linear incl. its fused activation quantization >= {FP8_LAYER_MIN_SPEEDUP}x bf16 at "
                           f"{key}", *result))
        rec = layer.get("w4a16", {}) if isinstance(layer, dict) else {}
        result = (False, f"no checked result ({_why_not(rec)})")
        if _checked_ms(rec) and rec.get("speedup_vs_bf16"):
            result = (rec["speedup_vs_bf16"] >= W4A16_LAYER_MIN_FRACTION_OF_BF16,
                      f"{rec['ms']:.3f} ms = {rec['speedup_vs_bf16']:.3f}x cuBLAS bf16")
        out.append(_target(f"W4A16 linear >= {W4A16_LAYER_MIN_FRACTION_OF_BF16}x cuBLAS bf16 at {key}", *result))
    step = quant.get("flux_step", {})
    for name, how in (("patched_fp8", "eager"), ("patched_fp8_graph", "CUDA graph")):
        fp8 = step.get(name, {})
        result = (False, f"no checked result ({_why_not(fp8 or step or quant)})")
        if _checked_ms(fp8) and step.get("stock", {}).get("ms"):
            result = (fp8["fraction_of_stock"] <= FP8_STEP_MAX_FRACTION_OF_STOCK,
                      f"{fp8['ms']:.1f} ms = {fp8['fraction_of_stock']:.2f}x stock {step['stock']['ms']:.1f} ms")
        tokens = step.get("image_tokens") or _bench("bench_quant_linear").REAL.step_image_tokens
        out.append(_target(f"FLUX-12B step at {tokens} image tokens: patched fp8 ({how}) <= "
                           f"{FP8_STEP_MAX_FRACTION_OF_STOCK}x stock", *result))
    return out


def e2e_targets(report: dict) -> list:
    """DC-Gen-FLUX vs FLUX.1-Krea stock per-image speed-up within +-20% of the paper's, and the patched DC-Gen-FLUX
    4K step faster than stock."""
    if _status(report.get("e2e", {})):  # skipped for time, failed or unavailable: its targets are not measured
        return [_target("e2e per-image latency (DC-Gen-FLUX vs FLUX.1-Krea)", False, _why_not(report["e2e"]))]
    out = []
    speedups = report.get("e2e_summary", {}).get("speedups", {})
    for res in report.get("e2e", {}).get("config", {}).get("resolutions", {}):
        rec = speedups.get(f"DC-Gen-FLUX/{res}", {})
        ours, paper = rec.get("speedup_vs_base", {}).get("stock"), rec.get("paper")
        result = (False, "no stock per-image latency for both models")
        if ours and paper:
            ratio = ours / paper
            result = (abs(ratio - 1) <= E2E_PAPER_RATIO_TOLERANCE,
                      f"ours {ours:.1f}x vs paper {paper:.1f}x (ratio {ratio:.2f})")
        out.append(_target(f"DC-Gen-FLUX vs FLUX.1-Krea at {res}: stock speed-up within "
                           f"+-{E2E_PAPER_RATIO_TOLERANCE * 100:.0f}% of the paper's", *result))
    if "4K" in report.get("e2e", {}).get("config", {}).get("resolutions", {}):
        step = report.get("e2e", {}).get("steps", {}).get("DC-Gen-FLUX/4K") or report.get("e2e", {})
        stock_ms, patched_ms = step.get("stock", {}).get("ms"), _checked_ms(step.get("patched", {}))
        result = (False, f"no checked patched result ({_why_not(step.get('patched') or step)})")
        if stock_ms and patched_ms:
            result = (patched_ms < stock_ms, f"patched {patched_ms:.1f} ms vs stock {stock_ms:.1f} ms")
        out.append(_target("DC-Gen-FLUX 4K step: patched faster than stock", *result))
    return out


def _checked_rel_l2(rec: dict):
    """The rel-L2 a quant_linear variant's check was made on."""
    for key in ("rel_l2_vs_reference_backend", "rel_l2_dequantized_vs_x", "rel_l2_dequantized_vs_fp32",
                "rel_l2_vs_fp32_linear", "rel_l2_vs_fp32"):
        if key in rec:
            return rec[key]
    return None


def _checked_ms(rec: dict):
    from benchmarks.common import checked_ms  # late, like every benchmarks import here: they import torch

    return checked_ms(rec)


def _why_not(rec) -> str:
    if not isinstance(rec, dict) or not rec:
        return "not run"
    for key in ("error", "unavailable", "skipped"):
        if rec.get(key):
            return f"{key}: {str(rec[key]).splitlines()[0][:100]}"
    return f"check {rec.get('check')}" if "check" in rec else "no time"


def sana_targets(report: dict, ran: set) -> list:
    from benchmarks import bench_dcae_decode, bench_sana_ops, bench_sana_step

    out = []
    steps = report.get("sana_step", {}).get("sizes", {})
    compiled = report.get("sana_step_compile", {}).get("sizes", {})
    for shape in bench_sana_step.REAL.shapes if "sana_step" in ran else ():
        size = steps.get(shape.key) or report.get("sana_step", {})
        comp = (compiled.get(shape.key, {}).get("torch_compile") or compiled.get(shape.key)
                or report.get("sana_step_compile", {}))
        comp_ms = _checked_ms(comp)
        for variant, how in (("patched", "patched"), ("patched_graph", "patched with CUDA graphs"),
                             ("patched_fp8_graph", "patched with FP8 linears + CUDA graphs")):
            stock_ms, patched = size.get("stock", {}).get("ms"), size.get(variant, {})
            patched_ms = _checked_ms(patched)
            half = fast = (False, f"no checked result ({_why_not(patched or size)})" if not patched_ms else
                           "no stock time")
            if patched_ms and stock_ms:
                ratio = patched_ms / stock_ms
                half = (ratio <= SANA_STEP_MAX_FRACTION_OF_STOCK,
                        f"{patched_ms:.1f} ms = {ratio:.2f}x stock {stock_ms:.1f} ms")
            if patched_ms:
                fast = ((patched_ms < comp_ms, f"{patched_ms:.1f} ms vs torch.compile {comp_ms:.1f} ms")
                        if comp_ms else (False, f"no checked torch.compile result ({_why_not(comp)})"))
            out.append(_target(f"SANA step {shape.key}: {how} <= {SANA_STEP_MAX_FRACTION_OF_STOCK}x stock eager", *half))
            if "sana_step_compile" in ran:  # compared within one run only
                out.append(_target(f"SANA step {shape.key}: {how} faster than torch.compile of stock", *fast))

    if "sana_ops" in ran:
        n = bench_sana_ops.REAL.grids[-1] ** 2
        variants = (report.get("sana_ops", {}).get("ops", {}).get("sana_linear_attention", {}).get("sizes", {})
                    .get(f"N={n}", {}).get("variants", {}))
        ours = _patched_dcgen(variants)
        frac = (False, f"no checked dcgen result ({_why_not(variants.get('dcgen') or report.get('sana_ops'))})")
        if ours and ours[1].get("frac_of_copy") is not None:
            name, rec = ours
            frac = (rec["frac_of_copy"] >= LINEAR_ATTENTION_MIN_FRACTION_OF_COPY,
                    f"{name} {rec['GBps']:.0f} GB/s = {rec['frac_of_copy'] * 100:.0f}% of copy")
        out.append(_target(f"sana_linear_attention >= {LINEAR_ATTENTION_MIN_FRACTION_OF_COPY * 100:.0f}% of the copy "
                           f"ceiling at N={n}", *frac))
    if "dcae_decode" not in ran:
        return out
    key = bench_dcae_decode.REAL.models[0].key
    size = report.get("dcae_decode", {}).get("sizes", {}).get(key) or report.get("dcae_decode", {})
    stock_ms, patched = size.get("stock", {}).get("ms"), size.get("patched", {})
    patched_ms = _checked_ms(patched)
    dec = (False, f"no checked patched result ({_why_not(patched or size)})")
    if patched_ms and stock_ms:
        dec = (patched_ms < stock_ms, f"patched {patched_ms:.0f} ms vs stock {stock_ms:.0f} ms")
    out.append(_target(f"DC-AE {key} 4K decode: patched faster than stock", *dec))
    return out


def problems(node, path="") -> list:
    """Paths of every recorded error and FAILED check, plus failed GPU tests. The environment section is
    descriptive (dcgen_kernels.info() names why `_C` is absent under "error") and the e2e summary repeats the e2e
    section's checks (for compare.py): neither is searched."""
    found = []
    if isinstance(node, dict) and path not in ("/environment", "/e2e_summary"):
        if node.get("error"):
            found.append(f"{path}: {node['error']}")
        if node.get("check") == "FAILED":
            rel_l2 = next((v for k, v in node.items() if k.startswith("rel_l2")), None)
            found.append(f"{path}: rel-L2 {rel_l2} > {node.get('tolerance')}")
        if path == "/gpu_check/pytest" and (node.get("failures") or node.get("errors")):
            found.append(f"{path}: {node.get('failures')} failed, {node.get('errors')} errors")
        for key, value in node.items():
            found += problems(value, f"{path}/{key}")
    return found


# ----------------------------------------------------------------------------------------------- table
def _fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _status(rec: dict):
    """A non-timing outcome of a variant, shortened for the table, or None when it has a time."""
    for key in ("error", "unavailable", "skipped"):
        if key in rec:
            return f"{key}: {str(rec[key]).splitlines()[0][:90]}"
    return None


def ceiling_lines(ceil: dict) -> list:
    from benchmarks.common import ANCHOR_LABEL

    anchor = ceil.get(ANCHOR_LABEL, {})
    lines = [f"{'ceilings':34}{'this run':>10}  {ANCHOR_LABEL}"]
    if "error" in ceil or "skipped" in ceil:
        return lines + [f"  {_status(ceil)}"]
    return lines + [
        f"  {'device copy GB/s':32}{_fmt(ceil.get('copy_GBps'), '.0f', 10)}  "
        f"{_fmt(anchor.get('copy_GBps'), '.0f', 10)}",
        f"  {ceil.get('gemm_dtype')} GEMM {ceil.get('gemm_n')}^3 TFLOP/s".ljust(34)
        + f"{_fmt(ceil.get('gemm_tflops'), '.1f', 10)}  {_fmt(anchor.get('gemm_tflops'), '.1f', 10)}",
        f"  {'fp8 GEMM TFLOP/s':32}{_fmt(ceil.get('fp8_gemm_tflops'), '.1f', 10)}  "
        f"{_fmt(anchor.get('fp8_gemm_tflops'), '.1f', 10)}",
        f"  {'attention TFLOP/s (' + str(ceil.get('attention_shape', '')).split(',')[0] + ')':32}"
        f"{_fmt(ceil.get('attention_tflops'), '.1f', 10)}"]


def table(report: dict) -> str:
    env = report.get("environment", {})
    versions = env.get("versions", {})
    where = f"{env['gpu']} (capability {env.get('capability')})" if env.get("gpu") else "CPU"
    lines = [f"== dcgen_kernels benchmarks: {report['mode']} on {where}, torch {versions.get('torch')}, "
             f"triton {versions.get('triton')}, diffusers {versions.get('diffusers')}"]
    if report["mode"] != "gpu":
        lines.append(f"   {TINY_NOTE}")

    ran = set(report.get("sections", []))
    if "ceilings" in ran:
        lines += ceiling_lines(report.get("ceilings", {}))
    lines += kernel_tables(report, ran)
    lines += e2e_tables(report, ran)
    for name in report.get("sections", []):  # sections without a table of their own: their outcome
        if name not in TABLED_SECTIONS:
            rec = report.get(name, {})
            lines.append(f"{name}: {_status(rec) or 'results in the JSON'} ({_fmt(rec.get('section_s'), '.0f', 0)} s)")

    for op, choices in report.get("autotuned", {}).get("timed_choices", {}).items():
        for key, choice in choices.items():
            times = ", ".join(f"{name[:-3]} {ms * 1e3:.1f} us" for name, ms in choice.items() if name.endswith("_ms"))
            lines.append(f"timed choice {op} {key}: {choice['picked']} ({times})")
    pytest_counts = report.get("gpu_check", {}).get("pytest")
    if pytest_counts:
        lines.append("pytest -m gpu: " + (pytest_counts.get("error") or ", ".join(
            f"{pytest_counts[k]} {k}" for k in ("passed", "failures", "errors", "skipped"))))
    lines.append("targets")
    for t in report.get("targets", []):
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        lines.append(f"  {mark}  {t['target']}: {t['detail']}")
    found = report.get("problems", [])
    lines.append(f"problems: {len(found)}" + "".join(f"\n  {p.splitlines()[0][:160]}" for p in found))
    return "\n".join(lines)


def e2e_tables(report: dict, ran: set) -> list:
    from benchmarks import bench_e2e, projection

    lines = []
    if "e2e" in ran:
        eager, summary = report.get("e2e", {}), report.get("e2e_summary", {})
        if "images" in summary:
            where = report.get("environment", {}).get("gpu") or f"CPU, {TINY_NOTE}"
            lines += bench_e2e.markdown(summary, eager, where).rstrip("\n").splitlines()
            for key in ("markdown", "chart", "chart_error"):
                if key in summary:
                    lines.append(f"e2e {key}: {summary[key]}")
        else:
            lines.append(f"e2e: {_status(eager) or _status(summary) or 'no result'}")
    if "e2e_compile" in ran:
        comp = report.get("e2e_compile", {})
        lines.append("e2e_compile (torch.compile of the stock transformer step)")
        for key, rec in comp.get("steps", {}).items():
            rec = rec.get("torch_compile", {})
            lines.append(f"  {key}: " + (_status(rec) or f"compile {rec['compile_s']:.0f} s, step {rec['ms']:.1f} ms "
                                         f"vs stock eager {rec['stock_ms']:.1f} ms: {rec['speedup_vs_stock']:.2f}x"))
        if _status(comp):
            lines.append(f"  {_status(comp)}")
    if "projection" in ran:
        proj = report.get("projection", {})
        lines += projection.table_lines(proj) or [f"projection: {_status(proj) or 'no result'}"]
    return lines


def kernel_tables(report: dict, ran: set) -> list:
    lines = []
    if "flux_attention" in ran:
        lines += flux_attention_table(report)
    if "flux_step" in ran:
        lines += flux_step_table(report)
    return lines + sana_tables(report, ran) + dcgen_tables(report, ran)


def dcgen_tables(report: dict, ran: set) -> list:
    """patch_embed: each fused op vs the bare GEMM on packed input; quant_linear: per-layer and FLUX-step rows."""
    lines = []
    if "patch_embed" in ran:
        rec = report.get("patch_embed", {})
        lines.append(f"patch_embed ({rec.get('config', {}).get('dtype')}; 'x GEMM' = bare GEMM ms / variant ms; rel-L2 "
                     f"vs the fp32 reference)\n  {'case':<26}{'mode':<9}"
                     f"{'variant':<14}{'ms':>9}{'TFLOP/s':>9}{'x GEMM':>8}{'rel-L2':>9}{'check':>7}")
        if _status(rec):
            lines.append(f"  {_status(rec)}")
        for shape, ops in rec.get("cases", {}).items():
            for op, modes in ops.items():
                for mode, case in modes.items():
                    for name, v in case.get("variants", {}).items():
                        row = f"  {shape + '/' + op:<26}{mode:<9}{name:<14}"
                        lines.append(row + (_status(v) or f"{_fmt(v.get('ms'), '.3f', 9)}{_fmt(v.get('tflops'), '.0f', 9)}"
                                            f"{_fmt(v.get('vs_gemm'), '.2f', 8)}"
                                            f"{_fmt(v.get('rel_l2_vs_reference'), '.1e', 9)}{v.get('check', ''):>7}"))
    if "quant_linear" in ran:
        rec = report.get("quant_linear", {})
        lines.append(f"quant_linear (per layer: 'x bf16' = cuBLAS bf16 ms / variant ms, for fp8_fused_producer "
                     f"bf16_with_producer ms / its ms; rel-L2 vs the fp32 linear, NVFP4 vs the same layer on the "
                     f"reference backend, quantize_only / fp8_producer_only dequantized vs their bf16 input / "
                     f"output)\n  {'layer':<24}"
                     f"{'variant':<20}{'ms':>9}{'TFLOP/s':>9}{'x bf16':>8}{'rel-L2':>9}{'check':>7}")
        if _status(rec):
            lines.append(f"  {_status(rec)}")
        for key, layer in rec.get("layers", {}).items():
            for name, v in layer.items():
                if isinstance(v, dict):
                    lines.append(f"  {key:<24}{name:<20}" + (_status(v) or (
                        f"{_fmt(v.get('ms'), '.3f', 9)}{_fmt(v.get('tflops'), '.0f', 9)}"
                        f"{_fmt(v.get('speedup_vs_bf16', v.get('speedup_vs_bf16_with_producer')), '.2f', 8)}"
                        f"{_fmt(_checked_rel_l2(v), '.1e', 9)}"
                        f"{v.get('check', ''):>7}")))
        step = rec.get("flux_step", {})
        lines.append(f"  FLUX-12B step, {step.get('image_tokens')} image tokens ('_graph': patch(cuda_graph=True))\n"
                     f"    {'variant':<22}{'ms':>9}{'x stock':>9}{'weights GiB':>12}{'rel-L2':>9}{'check':>7}")
        for name in ("stock", "stock_graph", "patched", "patched_graph", "patched_fp8", "patched_fp8_graph",
                     "patched_nvfp4", "patched_nvfp4_graph"):
            v = step.get(name)
            if isinstance(v, dict):
                frac = v.get("fraction_of_stock")
                lines.append(f"    {name:<22}" + (_status(v) or (
                    f"{_fmt(v.get('ms'), '.1f', 9)}{_fmt(1 / frac if frac else None, '.2f', 9)}"
                    f"{_fmt(v.get('weight_bytes', 0) / 2**30, '.2f', 12)}{_fmt(v.get('rel_l2_vs_stock'), '.1e', 9)}"
                    f"{v.get('check', ''):>7}")))
    return lines


def flux_attention_table(report: dict) -> list:
    from benchmarks.common import ANCHOR_LABEL

    lines = []
    att = report.get("flux_attention", {})
    cfg = att.get("config", {})
    lines.append(f"flux_attention B{cfg.get('B')} H{cfg.get('H')} D{cfg.get('D')} {cfg.get('dtype')}")
    lines.append(f"  {'N':<8}{'variant':<14}{'ms':>9}{'TFLOP/s':>9}{'%GEMM':>7}{'x stock':>9}{'L2 fp32':>9}"
                 f"{'check':>7}{'anchor ms':>11}")
    if _status(att):  # the section failed, was skipped for time or is unavailable
        lines.append(f"  {_status(att)}")
    for key, size in att.get("sizes", {}).items():
        if "error" in size:
            lines.append(f"  {key[2:]:<8}{_status(size)}")
        for name, rec in size.get("variants", {}).items():
            status = _status(rec)
            row = f"  {key[2:]:<8}{name:<14}"
            if status:
                lines.append(row + status)
                continue
            frac = rec.get("frac_of_measured_gemm")
            lines.append(row + f"{_fmt(rec['ms'], '.3f', 9)}{_fmt(rec['tflops'], '.1f', 9)}"
                         f"{_fmt(frac * 100 if frac else None, '.0f', 7)}{_fmt(rec.get('speedup_vs_stock'), '.2f', 9)}"
                         f"{_fmt(rec.get('rel_l2_vs_fp32'), '.1e', 9)}{rec.get('check', ''):>7}"
                         f"{_fmt(rec.get(ANCHOR_LABEL, {}).get('ms'), '.3f', 11)}")
    return lines


def flux_step_table(report: dict) -> list:
    lines = []
    step = report.get("flux_step", {})
    lines.append(f"flux_step ({step.get('config', {}).get('weights', 'not run')})")
    lines.append(f"  {'tokens':<8}{'variant':<14}{'ms':>9}{'x stock':>9}{'rel-L2':>9}{'check':>7}{'anchor ms':>11}")
    if _status(step):  # the section failed, was skipped for time or is unavailable
        lines.append(f"  {_status(step)}")
    for key, size in step.get("sizes", {}).items():
        if "error" in size:
            lines.append(f"  {key:<8}{_status(size)}")
        for name in ("stock", "patched", "patched_triton", "patched_graph"):
            rec = size.get(name)
            if rec is None:
                continue
            lines.append(_variant_row(f"  {key:<8}{name:<14}", rec, ".2f"))
    return lines


OP_LABELS = {"sana_linear_attention": "linear_attn", "sana_multiscale_linear_attention": "dcae_linear_attn",
             "glumbconv": "glumbconv", "depthwise_glu": "depthwise_glu", "ada_layer_norm_modulate": "adaln_modulate",
             "gated_residual": "gated_residual",
             "gated_residual_ada_layer_norm_modulate": "residual_adaln", "key_padding_attention": "cross_attn"}


def _variant_row(row: str, rec: dict, ms_spec: str) -> str:
    """A model variant's table row after its `row` label: ms, x stock, rel-L2, check, anchor ms (or its status)."""
    from benchmarks.common import ANCHOR_LABEL

    status = _status(rec)
    return row + status if status else (
        row + f"{_fmt(rec.get('ms'), ms_spec, 9)}{_fmt(rec.get('speedup_vs_stock'), '.2f', 9)}"
        f"{_fmt(rec.get('rel_l2_vs_stock'), '.1e', 9)}{rec.get('check', ''):>7}{_fmt(rec.get(ANCHOR_LABEL), '.1f', 11)}")


def _step_row(key: str, name: str, rec: dict, width: int) -> str:
    from benchmarks.common import ANCHOR_LABEL

    row = f"  {key:<{width}}{name:<18}"
    status = _status(rec)
    if status:
        return row + status
    anchor = rec.get(ANCHOR_LABEL)
    anchor_ms = anchor.get("ms") if isinstance(anchor, dict) else anchor
    speedup = rec.get("speedup_vs_stock") or (1 / rec["fraction_of_stock"] if rec.get("fraction_of_stock") else None)
    return (row + f"{_fmt(rec.get('ms'), '.2f', 9)}{_fmt(speedup, '.2f', 9)}"
            f"{_fmt(rec.get('rel_l2_vs_stock'), '.1e', 9)}{rec.get('check', ''):>7}"
            f"{_fmt(rec.get('compile_s'), '.1f', 11)}{_fmt(anchor_ms, '.1f', 11)}")


def host_overhead_table(report: dict) -> list:
    rec = report.get("host_overhead", {})
    lines = [f"host_overhead (host us per call, {rec.get('config', {}).get('dtype')}; dispatcher - impl = what "
             f"skipping the dispatcher saves)\n  {'op':<40}{'public':>9}{'dispatcher':>11}{'impl':>9}{'saved':>9}"]
    if _status(rec):
        lines.append(f"  {_status(rec)}")
    for op, op_rec in rec.get("ops", {}).items():
        status = _status(op_rec)
        lines.append(f"  {op:<40}" + (status or f"{_fmt(op_rec.get('public_us'), '.1f', 9)}"
                                               f"{_fmt(op_rec.get('dispatcher_us'), '.1f', 11)}"
                                               f"{_fmt(op_rec.get('impl_us'), '.1f', 9)}"
                                               f"{_fmt(op_rec.get('saved_by_call_op_us'), '.1f', 9)}"))
    return lines


def sana_tables(report: dict, ran: set) -> list:
    lines = []
    if "sana_ops" in ran:
        lines += sana_ops_table(report)
    if "host_overhead" in ran:
        lines += host_overhead_table(report)
    if ran & {"sana_step", "sana_step_compile"}:
        lines += sana_step_table(report)
    if "dcae_decode" in ran:
        lines += dcae_decode_table(report)
    return lines


def sana_ops_table(report: dict) -> list:
    lines = []
    ops = report.get("sana_ops", {})
    cfg = ops.get("config", {})
    lines.append(f"sana_ops {cfg.get('dtype')} (C {cfg.get('hidden')}, {cfg.get('heads')}x{cfg.get('head_dim')} heads, "
                 f"FFN {cfg.get('ffn_hidden')}, cross {cfg.get('cross_heads')}x{cfg.get('cross_head_dim')} over "
                 f"{cfg.get('text_tokens')} text tokens)")
    lines.append(f"  {'op':<17}{'size':<12}{'variant':<13}{'ms':>9}{'GB/s':>7}{'%copy':>6}{'TFLOP/s':>8}{'x stock':>8}"
                 f"{'L2 fp32':>9}{'check':>7}")
    if _status(ops):  # the section failed, was skipped for time or is unavailable
        lines.append(f"  {_status(ops)}")
    skipped = {}
    for op, op_rec in ops.get("ops", {}).items():
        label = OP_LABELS.get(op, op)
        if op_rec.get("error"):
            lines.append(f"  {label:<17}{_status(op_rec)}")
        if op_rec.get("unavailable"):
            lines.append(f"  {label:<17}{'':<12}{'dcgen':<13}{_status({'unavailable': op_rec['unavailable']})}")
        for key, size in op_rec.get("sizes", {}).items():
            if "error" in size:
                lines.append(f"  {label:<17}{key:<12}{_status(size)}")
            for name, rec in size.get("variants", {}).items():
                if "skipped" in rec:  # listed once per variant below, not once per row
                    first, count = skipped.get(name, (str(rec["skipped"]).splitlines()[0][:100], 0))
                    skipped[name] = (first, count + 1)
                    continue
                if "unavailable" in rec and op_rec.get("unavailable"):
                    continue  # said once per op above
                row = f"  {label:<17}{key:<12}{name:<13}"
                status = _status(rec)
                if status:
                    lines.append(row + status)
                    continue
                frac = rec.get("frac_of_copy")
                pct = frac * 100 if frac is not None else None
                lines.append(row + f"{_fmt(rec['ms'], '.3f', 9)}{_fmt(rec.get('GBps'), '.0f', 7)}{_fmt(pct, '.0f', 6)}"
                             f"{_fmt(rec.get('tflops'), '.1f', 8)}{_fmt(rec.get('speedup_vs_stock'), '.2f', 8)}"
                             f"{_fmt(rec.get('rel_l2_vs_fp32'), '.1e', 9)}{rec.get('check', ''):>7}")
    lines += [f"  ({name} skipped in {count} rows, e.g. {why})" for name, (why, count) in skipped.items()]
    lines.append("  ('L2 fp32': rel-L2 vs the stock math on fp32 copies of the inputs, stock's own included)")

    return lines


def sana_step_table(report: dict) -> list:
    lines = []
    step, comp = report.get("sana_step", {}), report.get("sana_step_compile", {})
    model = step.get("config", {}).get("model", {})
    lines.append(f"sana_step {model.get('num_layers')} layers, {model.get('num_attention_heads')}x"
                 f"{model.get('attention_head_dim')} heads, {step.get('config', {}).get('text_tokens')} text tokens "
                 f"(mask of ones), {step.get('config', {}).get('weights', 'not run')}")
    lines.append(f"  {'shape':<14}{'variant':<18}{'ms':>9}{'x stock':>9}{'rel-L2':>9}{'check':>7}{'compile s':>11}"
                 f"{'anchor ms':>11}")
    for sec in (step, comp):
        if "error" in sec or "unavailable" in sec or "skipped" in sec:
            lines.append(f"  {'':<14}{'torch_compile' if sec is comp else '':<18}{_status(sec)}")
    keys = list(step.get("sizes", {})) + [k for k in comp.get("sizes", {}) if k not in step.get("sizes", {})]
    for key in keys:
        size, csize = step.get("sizes", {}).get(key, {}), comp.get("sizes", {}).get(key, {})
        if "error" in size:
            lines.append(f"  {key:<14}{_status(size)}")
        floor = size.get("noise_floor", {}).get("rel_l2_reference_backend_vs_stock")
        for name in ("stock", "stock_graph", "patched", "patched_triton", "patched_graph", "patched_fp8_graph"):
            if name in size:
                lines.append(_step_row(key, name, size[name], 14))
        if "torch_compile" in csize:
            lines.append(_step_row(key, "torch_compile", csize["torch_compile"], 14))
        elif "error" in csize or "skipped" in csize:
            lines.append(f"  {key:<14}{'torch_compile':<18}{_status(csize)}")
        if floor is not None:
            lines.append(f"  {key:<14}(noise floor: fp32 reference backend vs stock rel-L2 {floor:.1e})")
        for name, prof in size.get("kernel_profile", {}).items():
            if isinstance(prof, dict) and "by_class_ms" in prof:
                lines.append(f"  {key:<14}{name} kernel ms by class: " + ", ".join(
                    f"{label} {ms:.1f}" for label, ms in prof["by_class_ms"].items()))
        if "error" in size.get("kernel_profile", {}):
            lines.append(f"  {key:<14}kernel profile {_status(size['kernel_profile'])}")
    return lines


def dcae_decode_table(report: dict) -> list:
    lines = []
    dec = report.get("dcae_decode", {})
    lat = dec.get("config", {}).get("latent")
    lat = "x".join(map(str, lat)) if lat else "-"
    lines.append(f"dcae_decode latent {lat} {dec.get('config', {}).get('dtype', '')}")
    lines.append(f"  {'config':<18}{'variant':<12}{'ms':>9}{'x stock':>9}{'rel-L2':>9}{'check':>7}{'anchor ms':>11}")
    if _status(dec):  # the section failed, was skipped for time or is unavailable
        lines.append(f"  {_status(dec)}")
    for key, size in dec.get("sizes", {}).items():
        if "error" in size:
            lines.append(f"  {key:<18}{_status(size)}")
        for name in ("stock", "patched"):
            rec = size.get(name)
            if rec is None:
                continue
            lines.append(_variant_row(f"  {key:<18}{name:<12}", rec, ".1f"))
    return lines


# ----------------------------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the suite. fn(ctx, progress) -> dict; progress(partial) records and saves a partial result.
    min_s: seconds it needs at least on a GPU; with --budget-s it is recorded as skipped when less is left."""
    name: str
    suites: tuple
    fn: Callable
    min_s: float = 0


def _bench(module: str):
    """Imported when its section runs, so a module that does not import fails only its own section."""
    return importlib.import_module(f"benchmarks.{module}")


def _ceilings(ctx, progress):
    from benchmarks.common import ANCHOR_LABEL
    from benchmarks.timing import measure_ceilings

    rec = measure_ceilings(ctx.device)
    anchor = ctx.anchors.get("ceilings") or {}
    rec[ANCHOR_LABEL] = {"copy_GBps": anchor.get("copy_TBps", 0) * 1e3 or None,
                         "gemm_tflops": anchor.get("bf16_gemm_tflops"),
                         "fp8_gemm_tflops": anchor.get("fp8_gemm_tflops")}
    return rec


def _ceiling(ctx, key):
    return ctx.report.get("ceilings", {}).get(key)


# Kernel and model-step sections first, end-to-end after them, the slow torch.compile sections last (a budget that
# runs out loses little). A new benchmark is one line here; its suites say which `--suite` runs it.
SECTIONS = (
    Section("ceilings", ("kernels", "dcgen", "e2e"), _ceilings),
    Section("flux_attention", ("kernels",), lambda ctx, progress: _bench("bench_flux_attention").run(
        ctx.device, ctx.tiny, _ceiling(ctx, "gemm_tflops"), ctx.anchors.get("attention_B1_H24_D128_bf16")), min_s=20),
    Section("flux_step", ("kernels",), lambda ctx, progress: _bench("bench_flux_step").run(
        ctx.device, ctx.tiny, ctx.anchors.get("flux12b_step_ms_by_image_tokens"), progress), min_s=40),
    Section("sana_ops", ("kernels",), lambda ctx, progress: _bench("bench_sana_ops").run(
        ctx.device, ctx.tiny, _ceiling(ctx, "copy_GBps"), progress), min_s=45),
    Section("host_overhead", ("kernels",), lambda ctx, progress: _bench("bench_host_overhead").run(
        ctx.device, ctx.tiny, progress), min_s=10),
    Section("sana_step", ("kernels",), lambda ctx, progress: _bench("bench_sana_step").run(
        ctx.device, ctx.tiny, ctx.anchors.get("sana1600m_step_ms"), progress), min_s=45),
    Section("dcae_decode", ("kernels",), lambda ctx, progress: _bench("bench_dcae_decode").run(
        ctx.device, ctx.tiny, ctx.anchors.get("autoencoder_decode_ms"), progress), min_s=40),
    Section("patch_embed", ("dcgen",), lambda ctx, progress: _bench("bench_patch_embed").run(
        ctx.device, ctx.tiny, _ceiling(ctx, "gemm_tflops"), progress), min_s=30),
    Section("quant_linear", ("dcgen",), lambda ctx, progress: _bench("bench_quant_linear").run(
        ctx.device, ctx.tiny, _ceiling(ctx, "gemm_tflops"), _ceiling(ctx, "fp8_gemm_tflops"), progress,
        ctx.time_left), min_s=45),
    Section("e2e", ("e2e",), lambda ctx, progress: _bench("bench_e2e").run(
        ctx.device, ctx.tiny, ctx.quick, progress, ctx.time_left, text_encoders=ctx.text_encoders), min_s=120),
    Section("projection", ("e2e",), lambda ctx, progress: _bench("projection").run(
        ctx.report, ctx.tiny, ctx.anchors, ctx.device), min_s=20),
    Section("sana_step_compile", ("kernels",), lambda ctx, progress: _bench("bench_sana_step").run_compile(
        ctx.device, ctx.tiny, ctx.report.get("sana_step"), ctx.anchors.get("sana1600m_step_ms_second_run"), progress,
        ctx.time_left), min_s=120),
    Section("e2e_compile", ("e2e",), lambda ctx, progress: _bench("bench_e2e").run_compile(
        ctx.device, ctx.tiny, ctx.report.get("e2e"), progress, ctx.time_left), min_s=90),
)
SUITES = ("kernels", "dcgen", "e2e", "all")
TABLED_SECTIONS = ("ceilings", "flux_attention", "flux_step", "sana_ops", "host_overhead", "sana_step", "dcae_decode",
                   "patch_embed", "quant_linear", "e2e", "projection", "sana_step_compile", "e2e_compile")
DESCRIPTIVE = ("environment", "anchors", "gpu_check")  # records, not timed sections

AUTOTUNED_KERNELS = ("dcgen_kernels.triton_kernels.glumbconv:depthwise_glu_kernel",
                     "dcgen_kernels.triton_kernels.nvfp4_gemm:nvfp4_effective_weight_kernel",
                     "dcgen_kernels.triton_kernels.sana_linear_attention:linear_attention_kv_kernel",
                     "dcgen_kernels.triton_kernels.sana_linear_attention:linear_attention_out_kernel",
                     "dcgen_kernels.triton_kernels.sana_linear_attention:linear_attention_fused_kernel")


def _autotuned_kernel(path: str):
    import importlib

    module, name = path.split(":")
    return name, getattr(importlib.import_module(module), name)


def autotuned_configs() -> dict:
    """The config each autotuned Triton kernel picked per tuning key in this run (none before its first call), and
    per op the implementation its first call per key timed fastest, with every candidate's time (`timed_choices`:
    the linear attention's one or two launches, the patch ops' cuBLAS or Triton)."""
    from dcgen_kernels.ops._common import TIMED_CHOICES

    picked = {}
    for path in AUTOTUNED_KERNELS:
        name, kernel = _autotuned_kernel(path)
        picked[name] = {str(key): str(config) for key, config in getattr(kernel, "cache", {}).items()}
    picked["timed_choices"] = {op: {str(key): choice for key, choice in choices.items()}
                               for op, choices in TIMED_CHOICES.items()}
    return picked


class AutotuneTimings:
    """Every config's median time (ms) in each tuning of the given autotuned kernels in this process, by kernel and
    tuning key: how far the configs that lost were from the winner, which `autotuned_configs` does not say (an
    autotune A/B otherwise reads as a bare yes or no). Wraps each kernel's `run`; a call that tunes leaves a new
    `configs_timings` dict on the autotuner (triton 3.6 and 3.8), a call that does not (cached key, one config)
    leaves the old one and records nothing."""

    def __init__(self, kernels: dict):
        self.timings = {}
        for name, kernel in kernels.items():
            kernel.run = self._recording(name, kernel, kernel.run)

    def _recording(self, name, kernel, run):
        def recorded(*args, **kwargs):
            tuned, before = set(kernel.cache), getattr(kernel, "configs_timings", None)
            result = run(*args, **kwargs)
            timings = getattr(kernel, "configs_timings", None)
            if timings is not before and timings:
                for key in set(kernel.cache) - tuned:
                    self.timings.setdefault(name, {})[str(key)] = {
                        str(config): ms[0] if isinstance(ms, (list, tuple)) else ms for config, ms in timings.items()}
            return result

        return recorded


def select_sections(suite: str, names: str | None) -> list:
    known = [s.name for s in SECTIONS]
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise SystemExit(f"--sections: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        return [s for s in SECTIONS if s.name in wanted]
    return [s for s in SECTIONS if suite == "all" or suite in s.suites]


def e2e_outputs(report: dict, out: str | None) -> dict:
    """The e2e summary (per-image latency, speed-ups), its markdown table and PNG chart beside the JSON."""
    from benchmarks import bench_e2e

    eager = report.get("e2e")
    if not isinstance(eager, dict) or "steps" not in eager:
        return {}
    summary = bench_e2e.summarize(eager, report.get("e2e_compile"))
    env = report.get("environment", {})
    where = env.get("gpu") or f"CPU, {TINY_NOTE}"
    if out:
        stem = Path(out).with_suffix("")
        md = Path(f"{stem}-e2e.md")
        md.write_text(bench_e2e.markdown(summary, eager, where))
        summary["markdown"] = str(md)
        try:
            summary["chart"] = bench_e2e.write_chart(summary, f"{stem}-e2e.png", f"per-image latency, {where}",
                                                     eager.get("config", {}).get("resolutions"))
        except Exception as err:  # noqa: BLE001 - e.g. matplotlib missing: the numbers stay
            summary["chart_error"] = f"{type(err).__name__}: {err}"
    return summary


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--tiny", action="store_true", help="force the tiny CPU configuration")
    parser.add_argument("--out", help="write the results JSON here (rewritten after every section); the e2e "
                        "table and chart go beside it as <stem>-e2e.md / <stem>-e2e.png")
    parser.add_argument("--suite", choices=SUITES, default="all",
                        help="kernels: op and model-step benchmarks; dcgen: patch-embedding ops and low-precision "
                             "linears; e2e: per-image latency, RTX 5090 projection; all (default): every section")
    parser.add_argument("--sections", help="comma-separated section names instead of a suite: "
                        + ", ".join(s.name for s in SECTIONS))
    parser.add_argument("--quick", action="store_true", help="e2e at 1K only")
    parser.add_argument("--text-encoders", action="append", metavar="FAMILY=DIR",
                        help="e2e: include a family's text encoders in the per-image latency (default: excluded), "
                             "loaded from a local diffusers pipeline folder, never downloaded; repeatable. "
                             "flux=DIR: DIR/text_encoder (CLIPTextModel) + DIR/tokenizer, DIR/text_encoder_2 "
                             "(T5EncoderModel) + DIR/tokenizer_2; sana=DIR: DIR/text_encoder (Gemma2Model) + "
                             "DIR/tokenizer. Needs transformers")
    parser.add_argument("--pytest-junit", help="junit XML of the GPU test run, to record its counts")
    parser.add_argument("--phases", help="TSV of gpu_check.sh phases (name, status, seconds), to record")
    parser.add_argument("--budget-s", type=float, help="seconds this run may take (GPU mode): a section that would "
                        "not fit in what is left is recorded as skipped")
    args = parser.parse_args(argv)
    started = time.monotonic()
    selected = select_sections(args.suite, args.sections)

    import torch

    torch.manual_seed(0)  # same random inputs and weights on every run
    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu:
        # Run the Triton kernels through the interpreter on CPU tensors; must precede the first @triton.jit.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(f"{'--tiny' if args.tiny else 'no CUDA GPU'}: {TINY_NOTE}", flush=True)
    device = torch.device("cuda" if gpu else "cpu")
    tuning = AutotuneTimings(dict(_autotuned_kernel(path) for path in AUTOTUNED_KERNELS))
    from benchmarks import bench_e2e
    try:  # a missing folder ends the run here, before the long sections
        text_encoders = bench_e2e.parse_text_encoder_dirs(args.text_encoders)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))

    from benchmarks.common import error_record

    report = {"schema": "dcgen_kernels-benchmarks/1", "mode": "gpu" if gpu else "tiny-cpu",
              "sections": [s.name for s in selected]}

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")

    def time_left():
        return None if args.budget_s is None else args.budget_s - (time.monotonic() - started)

    ctx = types.SimpleNamespace(device=device, tiny=not gpu, quick=args.quick, report=report, time_left=time_left,
                                anchors={}, text_encoders=text_encoders)

    def record(name, fn, min_s=0):
        left = time_left()
        if gpu and left is not None and left < min_s:
            print(f"[run] {name} skipped: {left:.0f} s left of --budget-s", flush=True)
            report[name] = {"skipped": f"{left:.0f} s left of the {args.budget_s:.0f} s budget, "
                                       f"this section needs about {min_s:.0f} s"}
            save()
            return report[name]
        print(f"[run] {name} ...", flush=True)
        t0 = time.monotonic()

        def progress(partial):
            report[name] = partial
            save()

        try:
            report[name] = fn(progress)
        except Exception as err:  # noqa: BLE001 - recorded; the suite goes on
            report[name] = error_record(err)
        if isinstance(report[name], dict) and name not in DESCRIPTIVE:
            report[name]["section_s"] = time.monotonic() - t0
        save()
        return report[name]

    record("environment", lambda progress: environment(device))
    ctx.anchors = record("anchors", lambda progress: load_anchors())
    if args.pytest_junit or args.phases:
        record("gpu_check", lambda progress: gpu_check_record(args.pytest_junit, args.phases))
    def conclude():
        """The e2e summary (table, chart), targets and problems of what has run so far, saved: rewritten after every
        section, so a suite killed by gpu_check's timeout (e.g. in a long torch.compile) keeps them."""
        try:
            summary = e2e_outputs(report, args.out)
        except Exception as err:  # noqa: BLE001
            summary = error_record(err)
        if summary:
            report["e2e_summary"] = summary
        try:
            report["targets"] = targets(report, tiny=not gpu)
        except Exception as err:  # noqa: BLE001 - a bug here must not end a one-shot GPU run early
            report["targets"] = [_target("evaluate the targets", False, f"{type(err).__name__}: {err}")]
        report["problems"] = problems(report)
        report["autotuned"] = autotuned_configs()
        report["autotune_timings"] = tuning.timings
        save()

    for sec in selected:
        record(sec.name, lambda progress, sec=sec: sec.fn(ctx, progress), sec.min_s)
        conclude()
    if not selected:
        conclude()
    if args.out:
        print(f"[run] wrote {args.out}", flush=True)
    print(table(report), flush=True)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
