"""RTX 5090 projection of the end-to-end configurations: a PROJECTION from op counts, never a measurement.

How it is made
1. Count, per transformer step and per decode, the work of every op the stock diffusers model dispatches: the
   model runs on the `meta` device (shapes only, nothing computed or allocated) under a dispatch mode that sorts
   ops into classes:
     gemm         addmm / mm / bmm / convolution (not depthwise) with bf16 or fp16 operands: FLOPs 2*M*N*K
                  (convolution: 2 * output elements * Cin/groups * kh * kw) and bytes read + written;
     gemm_fp32    the same with fp32 operands (SANA's and DC-AE's linear attention upcast to fp32);
     attention    scaled_dot_product_attention, intercepted whole: FLOPs 4*B*H*Sq*Sk*D;
     elementwise  every other op that moves data (norms, activations, copies, casts, cat, depthwise conv, ...):
                  bytes of its tensor inputs and outputs (views are free). This is the eager, unfused traffic.
2. Time of a class on a device = work / (datasheet peak x efficiency); a GEMM takes the larger of its compute and
   memory time. Efficiencies are what this run measured on its GPU against that GPU's datasheet (bf16 GEMM
   TFLOP/s, attention TFLOP/s of SDPA's default backend at B1 H24 N4608 D128, device-copy GB/s, FP8 GEMM TFLOP/s
   for the 4-bit GEMMs), each from the H100 anchors over the H100 datasheet where the run has no such measurement
   (CPU tiny mode, an unknown GPU, a ceiling that failed); `efficiency.source.from` says which. Assumed, not
   measured: fp32 GEMMs run at the non-tensor FP32 peak x the bf16 GEMM efficiency.
3. "calibrated" multiplies the 5090 model by measured / modelled of the stock bf16 configuration on the GPU of this
   run (what the roofline misses: launch gaps, small kernels, host overhead), when the e2e section measured it.
   The NVFP4 projection takes the bf16 stock step's calibration (nothing here runs NVFP4): it assumes the same
   unmodelled share.
NVFP4: the transformer's Linear GEMMs (addmm / mm) run at the FP4 peak on 4.5-bit operands (E2M1 + an E4M3 scale
per 16), plus SVDQuant's rank-32 bf16 low-rank branch and one activation-quantization pass (read bf16, write
4.5 bits); attention, decoder and everything else stay bf16. Not modelled: memory capacity (FLUX.1-Krea's bf16
weights take ~24 GB of the 5090's 32 GB), PCIe offload, clocks under the 575 W limit.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

# ------------------------------------------------------------------------------------------------ datasheets
@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str
    bf16_tflops: float  # dense tensor-core BF16/FP16 with FP32 accumulate
    fp8_tflops: float  # dense FP8 tensor, FP32 accumulate
    fp4_tflops: float  # dense NVFP4 tensor (0 = none)
    fp32_tflops: float  # non-tensor FP32
    bandwidth_GBps: float
    source: str


# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (the "with sparsity" figures halved to dense):
# BF16 1,979 / 2 = 989.5, FP8 3,958 / 2 = 1,979, FP32 67 TFLOPS, HBM3 3.35 TB/s. No 4-bit tensor cores.
H100_SXM = DeviceSpec("NVIDIA H100 SXM", 989.5, 1979.0, 0.0, 67.0, 3350.0,
                      "NVIDIA H100 Tensor Core GPU datasheet, SXM column, dense")
# NVIDIA H200 datasheet: same Hopper tensor peaks as H100 SXM, HBM3e 4.8 TB/s.
H200 = DeviceSpec("NVIDIA H200", 989.5, 1979.0, 0.0, 67.0, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet, dense")
# NVIDIA RTX Blackwell GPU Architecture whitepaper, appendix table for the GeForce RTX 5090 (dense / sparse):
# Peak FP16/BF16 Tensor TFLOPS with FP32 Accumulate 209.5 / 419; Peak FP8 Tensor TFLOPS with FP32 Accumulate
# 419 / 838; Peak FP4 Tensor TFLOPS 1,676 / 3,352; Peak FP32 TFLOPS (non-Tensor) 104.8; memory bandwidth
# 1,792 GB/s (GDDR7, 512-bit, 28 Gbps). (Independent mma micro-benchmarks report bf16 above the 209.5 figure,
# so the bf16 parts of this projection may be pessimistic.)
RTX_5090 = DeviceSpec("NVIDIA GeForce RTX 5090", 209.5, 419.0, 1676.0, 104.8, 1792.0,
                      "NVIDIA RTX Blackwell GPU Architecture whitepaper, GeForce RTX 5090, dense")
KNOWN_SPECS = (("H100", H100_SXM), ("H200", H200))

NVFP4_BYTES_PER_ELEMENT = 0.5 + 1 / 16  # E2M1 nibble + one E4M3 scale per 16 values
SVDQUANT_RANK = 32
PAPER_5090_NOTE = "paper: DC-Gen-FLUX 4K in 3.5 s on one RTX 5090 with NVFP4 SVDQuant (20 steps), 138x FLUX.1-Krea"


def spec_for(gpu_name):
    """The datasheet of an SXM part by its nvidia-smi name; None for others (the PCIe, NVL and Grace Hopper boards of
    the same chips run at other clocks, power and bandwidth, so the SXM figures would misstate them)."""
    if not gpu_name or any(board in gpu_name.lower() for board in ("pcie", "nvl", "gh200", "gb200")):
        return None
    return next((spec for key, spec in KNOWN_SPECS if key in gpu_name), None)


# ------------------------------------------------------------------------------------------------ counting
GEMM_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution"}
LINEAR_OPS = {"aten.mm", "aten.addmm"}  # transformer Linear layers: what NVFP4 quantizes
FREE_OPS = {"aten._unsafe_view", "aten.lift_fresh", "aten.detach", "aten.empty", "aten.empty_like",
            "aten.empty_strided"}  # no data moved


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes an op touches in `t`: its elements, but no more than its storage (an expanded view is read once)."""
    logical = t.numel() * t.element_size()
    try:
        return min(logical, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return logical


@dataclasses.dataclass
class Counts:
    gemm: Counter = dataclasses.field(default_factory=Counter)  # (flops, bytes, dtype bytes, is linear, M, K, N) -> n
    attention_flops: float = 0.0
    attention_bytes: float = 0.0
    elementwise_bytes: float = 0.0
    ops: Counter = dataclasses.field(default_factory=Counter)

    def totals(self) -> dict:
        def gemm_sum(fp32: bool, field: int):
            return float(sum(k[field] * n for k, n in self.gemm.items() if (k[2] == 4) == fp32))

        return {"gemm_tflop": gemm_sum(False, 0) / 1e12, "gemm_GB": gemm_sum(False, 1) / 1e9,
                "gemm_fp32_tflop": gemm_sum(True, 0) / 1e12, "attention_tflop": self.attention_flops / 1e12,
                "attention_GB": self.attention_bytes / 1e9, "elementwise_GB": self.elementwise_bytes / 1e9}


def _gemm_shape(name: str, args, out: torch.Tensor):
    """(flops, M, K, N) of a GEMM-class op, or None for a depthwise convolution (memory-bound)."""
    if name == "aten.convolution":
        x, w, groups = args[0], args[1], args[8]
        if groups > 1 and groups == x.shape[1]:
            return None
        k = w.shape[1] * w[0, 0].numel()  # Cin/groups * kernel elements
        m, n = out.numel() // out.shape[1], out.shape[1]
        return 2 * out.numel() * k, m, k, n
    a, b = (args[1], args[2]) if name in ("aten.addmm", "aten.baddbmm") else (args[0], args[1])
    batch = a.shape[0] if a.dim() == 3 else 1
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return 2 * batch * m * k * n, batch * m, k, n


class OpCounter:
    """Context manager counting the ops of a forward on meta tensors into a Counts."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts = Counts()
        counts = self.counts

        class _Attention(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.nn.functional.scaled_dot_product_attention:
                    q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
                    b_h = q.numel() // (q.shape[-2] * q.shape[-1])
                    counts.attention_flops += 4 * b_h * q.shape[-2] * k.shape[-2] * q.shape[-1]
                    out_shape = (*q.shape[:-1], v.shape[-1])
                    out_bytes = q.element_size() * torch.Size(out_shape).numel()
                    counts.attention_bytes += sum(_nbytes(t) for t in (q, k, v)) + out_bytes
                    counts.ops["attention"] += 1
                    return torch.empty(out_shape, dtype=q.dtype, device=q.device)
                return func(*args, **kwargs)

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = str(func.overloadpacket)
                if func.is_view or name in FREE_OPS:
                    return out
                counts.ops[name] += 1
                touched = sum(_nbytes(t) for t in _tensors(args)) + sum(_nbytes(t) for t in _tensors(kwargs))
                touched += 0 if _aliases_input(func) else sum(_nbytes(t) for t in _tensors(out))
                if name in GEMM_OPS:
                    shape = _gemm_shape(name, args, out)
                    if shape is not None:
                        flops, m, k, n = shape
                        dtype_bytes = args[0].element_size() if name != "aten.addmm" else args[1].element_size()
                        counts.gemm[(flops, touched, dtype_bytes, name in LINEAR_OPS, m, k, n)] += 1
                        return out
                counts.elementwise_bytes += touched
                return out

        self._modes = (_Attention(), _Dispatch())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self.counts

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _aliases_input(func) -> bool:
    """In-place and out= ops write into an argument already counted."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def count(fn) -> Counts:
    with torch.no_grad(), OpCounter() as counts:
        fn()
    return counts


# ------------------------------------------------------------------------------------------------ time model
@dataclasses.dataclass(frozen=True)
class Efficiency:
    gemm: float  # measured bf16 GEMM TFLOP/s / peak
    attention: float
    bandwidth: float  # measured copy GB/s / peak
    fp8: float  # measured FP8 GEMM / peak: the stand-in for 4-bit GEMM efficiency (no 4-bit tensor cores here)
    source: dict


def model_seconds(counts: Counts, spec: DeviceSpec, eff: Efficiency, nvfp4: bool = False) -> dict:
    """Seconds per class on `spec` at efficiencies `eff`; nvfp4 quantizes the Linear GEMMs (needs an FP4 peak)."""
    bw = spec.bandwidth_GBps * 1e9 * eff.bandwidth
    bf16 = spec.bf16_tflops * 1e12 * eff.gemm
    gemm = gemm_fp32 = quant_elementwise = 0.0
    for (flops, nbytes, dtype_bytes, linear, m, k, n), times in counts.gemm.items():
        if dtype_bytes == 4:
            gemm_fp32 += times * max(flops / (spec.fp32_tflops * 1e12 * eff.gemm), nbytes / bw)
        elif nvfp4 and linear:
            q_bytes = (m * k + k * n) * NVFP4_BYTES_PER_ELEMENT + m * n * dtype_bytes
            low_rank = 2 * m * SVDQUANT_RANK * (k + n)
            gemm += times * (max(flops / (spec.fp4_tflops * 1e12 * eff.fp8), q_bytes / bw) + low_rank / bf16)
            quant_elementwise += times * m * k * (dtype_bytes + NVFP4_BYTES_PER_ELEMENT)
        else:
            gemm += times * max(flops / bf16, nbytes / bw)
    attention = counts.attention_flops / (spec.bf16_tflops * 1e12 * eff.attention)
    elementwise = (counts.elementwise_bytes + quant_elementwise) / bw
    parts = {"gemm": gemm, "gemm_fp32": gemm_fp32, "attention": attention, "elementwise": elementwise}
    return {**parts, "total": sum(parts.values())}


def efficiencies(report: dict, anchors: dict) -> Efficiency:
    """Per ceiling, from this run on a GPU whose datasheet is known, else from the H100 anchors; each divided by the
    datasheet of the GPU it was measured on. source["from"] says which, per ceiling."""
    env, ceil = report.get("environment", {}), report.get("ceilings", {})
    spec = spec_for(env.get("gpu")) if report.get("mode") == "gpu" else None
    anchor_ceil = (anchors or {}).get("ceilings") or {}
    # the shape and backend timing.measure_ceilings times: SDPA's default backend at FLUX's 1K shape
    anchor_att = ((anchors or {}).get("attention_B1_H24_D128_bf16") or {}).get("N=4608", {}).get("default", {})
    here = ceil if spec is not None and ceil.get("gemm_tflops") else {}
    measured = {"bf16_gemm_tflops": here.get("gemm_tflops"), "attention_tflops": here.get("attention_tflops"),
                "copy_GBps": here.get("copy_GBps"), "fp8_gemm_tflops": here.get("fp8_gemm_tflops")}
    anchored = {"bf16_gemm_tflops": anchor_ceil.get("bf16_gemm_tflops"), "attention_tflops": anchor_att.get("tflops"),
                "copy_GBps": (anchor_ceil.get("copy_TBps") or 0) * 1e3 or None,
                "fp8_gemm_tflops": anchor_ceil.get("fp8_gemm_tflops")}

    def peaks(device: DeviceSpec) -> dict:
        return {"bf16_gemm_tflops": device.bf16_tflops, "attention_tflops": device.bf16_tflops,
                "copy_GBps": device.bandwidth_GBps, "fp8_gemm_tflops": device.fp8_tflops}

    values, fractions, origin = {}, {}, {}
    for key, anchor_value in anchored.items():
        if measured[key]:
            values[key], device, origin[key] = measured[key], spec, f"this run on {env.get('gpu')}"
        else:
            values[key], device = anchor_value, H100_SXM
            origin[key] = f"H100 anchors ({(anchors or {}).get('date')})"
        fractions[key] = values[key] / peaks(device)[key]
        origin[key] += f", over the {device.name} datasheet"
    return Efficiency(gemm=fractions["bf16_gemm_tflops"], attention=fractions["attention_tflops"],
                      bandwidth=fractions["copy_GBps"], fp8=fractions["fp8_gemm_tflops"],
                      source={**values, "from": origin,
                              "attention_measured_as": "SDPA default backend, B1 H24 N4608 D128 bf16"})


# ------------------------------------------------------------------------------------------------ configurations
def _count_configs(tiny: bool, e2e_config: dict):
    """Counts per e2e step and decode key, from the same configs and shapes the e2e section uses (meta device)."""
    from . import bench_e2e as e2e

    # bf16 as deployed, also for the tiny (fp32-on-CPU) models, so every op class is exercised.
    cfg = dataclasses.replace(e2e.TINY if tiny else e2e.REAL, dtype=torch.bfloat16)
    meta = torch.device("meta")
    resolutions = list((e2e_config or {}).get("resolutions") or cfg.resolutions)
    pipes = [p for p in cfg.pipelines if not e2e_config or p.name in e2e_config.get("pipelines", {})]
    steps, decodes = {}, {}
    flux = None
    for pipe in pipes:
        for res in (r for r in resolutions if r in pipe.autoencoder):
            channels, side, tokens = e2e.latent_shape(cfg, pipe, res)
            if pipe.family == "flux":
                flux = flux or e2e.build_flux(cfg, meta)
                e2e.set_flux_latent(flux, channels, pipe.patch)
                x = e2e.flux_inputs(cfg, flux, tokens, meta)
                steps[e2e._key(pipe.name, res)] = count(lambda: flux(**x))
            else:
                model = e2e.build_sana(cfg, channels, side, meta)
                x = e2e.sana_inputs(cfg, channels, side, meta)
                steps[e2e._key(pipe.name, res)] = count(lambda: model(**x))
            ae_key = pipe.autoencoder[res]
            if e2e._key(ae_key, res) not in decodes:
                ae = next(a for a in cfg.autoencoders if a.key == ae_key)
                model = e2e.build_autoencoder(cfg, ae, meta)
                lat = cfg.resolutions[res] // ae.compression
                z = torch.empty(1, ae.latent_channels, lat, lat, device=meta, dtype=cfg.dtype)
                decodes[e2e._key(ae_key, res)] = count(lambda: model.decode(z, return_dict=False))
    return cfg, pipes, resolutions, steps, decodes


def run(report: dict, tiny: bool, anchors: dict, device=None) -> dict:
    """Project the e2e configurations to the RTX 5090 (bf16, and NVFP4 for the FLUX-family transformers)."""
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 12:
        return {"skipped": "this is an sm_120 GPU (GeForce RTX 50 series): the e2e section measures it instead"}
    e2e_rec = report.get("e2e", {})
    cfg, pipes, resolutions, steps, decodes = _count_configs(tiny, e2e_rec.get("config"))
    eff = efficiencies(report, anchors)
    here = spec_for(report.get("environment", {}).get("gpu")) if report.get("mode") == "gpu" else None
    measured_steps, measured_decodes = e2e_rec.get("steps", {}), e2e_rec.get("decodes", {})
    result = {"note": "PROJECTION from op counts, datasheet peaks and measured efficiencies; not a measurement",
              "target": RTX_5090.name, "datasheet": dataclasses.asdict(RTX_5090),
              "efficiency": dataclasses.asdict(eff), "paper": PAPER_5090_NOTE,
              "counts": {}, "steps": {}, "decodes": {}, "images": {}}

    def project(counts, measured, nvfp4=False):
        parts = model_seconds(counts, RTX_5090, eff, nvfp4)
        rec = {"rtx5090_ms": parts["total"] * 1e3, "rtx5090_parts_ms": {k: v * 1e3 for k, v in parts.items()}}
        if here is not None and measured:  # the stock bf16 configuration, for the NVFP4 projection too
            modelled = model_seconds(counts, here, eff)["total"] * 1e3
            rec.update(stock_bf16_modelled_here_ms=modelled, stock_bf16_measured_here_ms=measured,
                       calibration=measured / modelled)
            rec["rtx5090_calibrated_ms"] = rec["rtx5090_ms"] * rec["calibration"]
        return rec

    for key, counts in steps.items():
        result["counts"][key] = counts.totals()
        measured = measured_steps.get(key, {}).get("stock", {}).get("ms")
        result["steps"][key] = {"bf16": project(counts, measured)}
        if key.startswith(("FLUX.1-Krea/", "DC-Gen-FLUX")):
            result["steps"][key]["nvfp4"] = project(counts, measured, nvfp4=True)
    for key, counts in decodes.items():
        result["counts"][key] = counts.totals()
        result["decodes"][key] = project(counts, measured_decodes.get(key, {}).get("stock", {}).get("ms"))
    for pipe in pipes:
        for res in (r for r in resolutions if r in pipe.autoencoder):
            key = f"{pipe.name}/{res}"
            dec = result["decodes"][f"{pipe.autoencoder[res]}/{res}"]
            rec = result["images"][key] = {"steps": pipe.steps}
            for precision, step in result["steps"][key].items():
                for field in ("rtx5090_ms", "rtx5090_calibrated_ms"):
                    dec_ms = dec.get(field)
                    if field in step and dec_ms is not None:
                        rec[f"{precision}_{field.removesuffix('_ms')}_s"] = (pipe.steps * step[field] + dec_ms) / 1e3
    headline = {}
    base, ours = result["images"].get("FLUX.1-Krea/4K", {}), result["images"].get("DC-Gen-FLUX/4K", {})
    for kind in ("rtx5090", "rtx5090_calibrated"):
        if f"nvfp4_{kind}_s" in ours:
            headline[f"DC-Gen-FLUX 4K nvfp4 {kind} s"] = ours[f"nvfp4_{kind}_s"]
            if f"bf16_{kind}_s" in base:
                headline[f"FLUX.1-Krea 4K bf16 {kind} s"] = base[f"bf16_{kind}_s"]
                headline[f"speedup {kind}"] = base[f"bf16_{kind}_s"] / ours[f"nvfp4_{kind}_s"]
    result["headline"] = headline
    return result


def table_lines(proj: dict) -> list:
    if not proj or "images" not in proj:
        return []
    eff = proj["efficiency"]
    origins = sorted(set(eff["source"]["from"].values()))
    lines = [f"RTX 5090 PROJECTION (not a measurement): {proj['datasheet']['source']}; efficiencies from "
             f"{' and '.join(origins)}: GEMM {eff['gemm']:.2f}, attention {eff['attention']:.2f}, "
             f"bandwidth {eff['bandwidth']:.2f}, 4-bit GEMM = FP8 {eff['fp8']:.2f}",
             f"  {'config':<24}{'steps':>6}{'bf16 s':>9}{'calib.':>9}{'nvfp4 s':>9}{'calib.':>9}"]
    for key, rec in proj["images"].items():
        def f(name):
            v = rec.get(name)
            return f"{v:9.3g}" if isinstance(v, (int, float)) else f"{'-':>9}"
        lines.append(f"  {key:<24}{rec['steps']:>6}{f('bf16_rtx5090_s')}{f('bf16_rtx5090_calibrated_s')}"
                     f"{f('nvfp4_rtx5090_s')}{f('nvfp4_rtx5090_calibrated_s')}")
    for name, value in proj.get("headline", {}).items():
        lines.append(f"  {name}: {value:.3g}" + ("x" if name.startswith("speedup") else ""))
    lines.append(f"  {proj['paper']}")
    return lines


def main() -> int:
    """The projection of the real configurations from the H100 anchors alone (no GPU, no calibration)."""
    import json
    from pathlib import Path

    anchors = json.loads((Path(__file__).parent / "anchors" / "h100-2026-11-27.json").read_text())
    print("\n".join(table_lines(run({"mode": "none"}, tiny=False, anchors=anchors))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
