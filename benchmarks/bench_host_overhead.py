"""Host cost per op call: the Python side of dcgen_kernels' op layer, before a kernel is queued.

Eager model steps issue hundreds of op calls; where the GPU finishes each kernel faster than the host queues the
next (FLUX fp8 and SANA 64x64 eager steps on an H100, 2026-11-27), this cost sets the step time. Per op (adaLN,
gated residual, the two fused, an FP8 linear with its gated-residual epilogue, the SANA linear attention), at a
small shape so the GPU never holds the host back, host microseconds per call (time.perf_counter over back-to-back calls,
the minimum over rounds of the mean, the variants taking turns; one synchronize before each timed loop) of:
  public      the public function as patch() calls it: validation, backend choice, launch (in eager inference it
              skips the dispatcher: ops/_common.call_op);
  dispatcher  the registered custom op through torch's dispatcher (torch.ops.dcgen.*), no validation: what each
              call paid for the dispatch before call_op;
  impl        the op's implementation called directly: backend choice and launch only.
dispatcher - impl is what call_op saves per call; public - impl is the validation. Real mode: bf16, FLUX/SANA
widths, 64 tokens, backend auto. Tiny mode (CPU): backend "reference" (the interpreter's Triton would dwarf the
host cost), whose math is in every variant; the numbers are this CPU's.
"""

from __future__ import annotations

import dataclasses
import importlib
import time

import torch

from .common import error_record


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int
    flux_width: int
    sana_width: int
    sana_heads: int
    dtype: torch.dtype
    backend: str
    warmup: int
    calls: int
    rounds: int


REAL = Config(64, 3072, 2240, 70, torch.bfloat16, "auto", warmup=50, calls=100, rounds=15)
TINY = Config(4, 64, 64, 2, torch.float32, "reference", warmup=100, calls=100, rounds=15)


def host_us_per_call(variants: dict, device: torch.device, cfg: Config) -> dict:
    """name -> host microseconds per call of each zero-argument callable, the minimum over rounds of the mean over
    `cfg.calls` back-to-back calls; the variants take turns within each round, so a slow spell of the machine
    hits them alike (timing.time_kernel_ms's host_ms is one pass per variant, and None on the CPU)."""
    for fn in variants.values():
        for _ in range(cfg.warmup):
            fn()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(cfg.rounds):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(cfg.calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / cfg.calls * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return best


def _cases(cfg: Config, device: torch.device) -> dict:
    """op name -> (public call, its custom op, the op's positional arguments)."""
    adaln = importlib.import_module("dcgen_kernels.ops.ada_layer_norm")
    fp8 = importlib.import_module("dcgen_kernels.ops.fp8_linear")
    # the package exports the function under the module's name: import the module itself
    linear_attention = importlib.import_module("dcgen_kernels.ops.sana_linear_attention")

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=cfg.dtype)

    backend, flux = cfg.backend, (1, cfg.tokens, cfg.flux_width)
    x, residual = rand(*flux), rand(*flux)
    scale, shift, gate = (t.squeeze(1) for t in rand(1, 3, cfg.flux_width).chunk(3, dim=1))  # FLUX's (B, C) chunks
    q, k, v = (rand(1, cfg.tokens, cfg.sana_width) for _ in range(3))
    act = fp8.quantize_fp8(x, backend=backend)  # an FP8 linear's input as its producer hands it over
    weight, weight_scale = fp8.quantize_weight_fp8(rand(cfg.flux_width, cfg.flux_width))
    bias = rand(cfg.flux_width)
    return {
        "ada_layer_norm_modulate": (
            lambda: adaln.ada_layer_norm_modulate(x, scale, shift, backend=backend),
            adaln._ada_layer_norm_modulate_op, (x, scale, shift, None, None, 1e-6, backend)),
        "gated_residual": (
            lambda: adaln.gated_residual(residual, gate, x, backend=backend),
            adaln._gated_residual_op, (residual, gate, x, backend)),
        "gated_residual_ada_layer_norm_modulate": (
            lambda: adaln.gated_residual_ada_layer_norm_modulate(residual, gate, x, scale, shift, backend=backend),
            adaln._gated_residual_modulate_op, (residual, gate, x, scale, shift, None, None, 1e-6, backend)),
        "fp8_linear": (
            lambda: fp8.fp8_linear(act, weight, weight_scale, bias, gate=gate, residual=residual, backend=backend),
            fp8._fp8_linear_op, (act.data, act.scale, weight, weight_scale, bias, gate, residual, False, act.dtype,
                                 backend)),
        "sana_linear_attention": (
            lambda: linear_attention.sana_linear_attention(q, k, v, cfg.sana_heads, backend=backend),
            linear_attention._sana_linear_attention_op, (q, k, v, cfg.sana_heads, 1e-15, backend)),
    }


def run(device: torch.device, tiny: bool, progress=None) -> dict:
    cfg = TINY if tiny else REAL
    result = {"config": {"dtype": str(cfg.dtype).removeprefix("torch."), "backend": cfg.backend, "tokens": cfg.tokens,
                         "flux_width": cfg.flux_width, "sana_width": cfg.sana_width, "calls": cfg.calls,
                         "rounds": cfg.rounds, "unit": "host microseconds per call"},
              "ops": {}}
    with torch.no_grad():
        try:
            cases = _cases(cfg, device)
        except Exception as err:  # noqa: BLE001 - recorded; nothing to time
            return {**result, **error_record(err)}
        for name, (public, op, args) in cases.items():
            try:
                us = host_us_per_call({"public": public, "dispatcher": lambda op=op, args=args: op(*args),
                                       "impl": lambda op=op, args=args: op.eager_impl(*args)}, device, cfg)
                rec = {f"{name}_us": value for name, value in us.items()}
                rec["saved_by_call_op_us"] = rec["dispatcher_us"] - rec["impl_us"]
                result["ops"][name] = rec
            except Exception as err:  # noqa: BLE001 - the other ops still run
                result["ops"][name] = error_record(err)
            if progress:
                progress(result)
    return result
