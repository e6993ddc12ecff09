"""Does a SANA-1.6B step run slower back to back than alone? Per-step GPU times with the SM clock and power alongside.

    python -m benchmarks.sustained_step [--size c32_128x128] [--steps 20] [--out FILE.json]

Run L timed the patched 128x128 step 4.7 ms above its profiled kernel time even with CUDA graphs (no launch gaps),
and stock not at all (benchmarks/PERF_NOTES.md, session 13). For stock, `patch(model)` and
`patch(model, cuda_graph=True)`: two warm-up steps, one step alone after a 2 s pause, then `--steps` steps back to
back, each between CUDA events, while `nvidia-smi -lms 20` samples the SM clock, the power draw and the active
clock-event reasons (power cap, thermal, ...). Sizes and weights are those of benchmarks/bench_sana_step.py. CPU (no
GPU): the tiny config, host times, no clocks. A diagnostic, not a gated benchmark; a run's output is kept in
`benchmarks/results/sustained_step-*.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import time

import torch

from . import bench_sana_step
from .timing import time_samples

PAUSE_S = 2.0
SAMPLE_MS = 20
_FIELDS = ("timestamp", "clocks.sm", "power.draw", "clocks_event_reasons.active")
_TIMESTAMP = "%Y/%m/%d %H:%M:%S.%f"


class ClockSampler:
    """nvidia-smi sampling the GPU every SAMPLE_MS in the background; `summary(start, end)` of a time window.
    Without nvidia-smi (or on a CPU run) it records nothing."""

    def __init__(self, enabled: bool):
        self.fields = self._working_fields() if enabled and shutil.which("nvidia-smi") else None
        self.process = None
        if self.fields:
            # Line-buffered: run M lost the last window's samples, still in nvidia-smi's pipe buffer when it stopped.
            line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
            self.process = subprocess.Popen(
                [*line_buffered, "nvidia-smi", f"--query-gpu={','.join(self.fields)}", "--format=csv,noheader,nounits",
                 "-lms", str(SAMPLE_MS)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.rows: list = []

    @staticmethod
    def _working_fields():
        # Older drivers call the reasons field clocks_throttle_reasons.active; an unknown field fails the whole query.
        for fields in (_FIELDS, _FIELDS[:3] + ("clocks_throttle_reasons.active",), _FIELDS[:3]):
            probe = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                return fields
        return None

    def stop(self) -> None:
        if self.process is None:
            return
        time.sleep(PAUSE_S)  # samples past the last window push its own out of a block-buffered pipe
        self.process.terminate()
        output, _ = self.process.communicate(timeout=10)
        for line in output.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != len(self.fields):
                continue
            try:
                row = {"t": datetime.datetime.strptime(parts[0], _TIMESTAMP), "sm_mhz": float(parts[1]),
                       "power_w": float(parts[2])}
            except ValueError:
                continue
            if len(parts) > 3:
                row["reasons"] = parts[3]
            self.rows.append(row)

    def summary(self, start: datetime.datetime, end: datetime.datetime) -> dict:
        window = [r for r in self.rows if start <= r["t"] <= end]
        if not window:
            return {}
        clocks = [r["sm_mhz"] for r in window]
        power = [r["power_w"] for r in window]
        return {"samples": len(window), "sm_mhz_median": statistics.median(clocks), "sm_mhz_min": min(clocks),
                "sm_mhz_max": max(clocks), "power_w_median": statistics.median(power), "power_w_max": max(power),
                "reasons": sorted({r["reasons"] for r in window if "reasons" in r})}


def _measure(step, device: torch.device, steps: int, sampler: ClockSampler, pause_s: float) -> dict:
    time_samples(step, device, warmup=2, iters=0)  # warm-up (autotuning, JIT, graph capture), synchronised
    time.sleep(pause_s)
    alone_start = datetime.datetime.now()
    alone_ms = time_samples(step, device, warmup=0, iters=1)[0]
    alone_end = datetime.datetime.now()
    loop_start = datetime.datetime.now()
    per_step = time_samples(step, device, warmup=0, iters=steps)
    loop_end = datetime.datetime.now()
    return {"alone_ms": alone_ms, "per_step_ms": per_step, "median_ms": statistics.median(per_step),
            "first_ms": per_step[0], "last_ms": per_step[-1], "_windows": ((alone_start, alone_end),
                                                                          (loop_start, loop_end))}


def run(device: torch.device, tiny: bool, size: str, steps: int, pause_s: float = PAUSE_S) -> dict:
    import dcgen_kernels

    model, inputs = bench_sana_step.model_and_inputs(device, tiny, size)
    step = lambda: model(**inputs)[0]  # noqa: E731
    sampler = ClockSampler(enabled=device.type == "cuda")
    result = {"size": size, "steps": steps, "pause_s": pause_s, "clock_fields": sampler.fields, "variants": {}}
    try:
        with torch.no_grad():
            for variant, options in (("stock", None), ("patched", {}), ("patched_graph", {"cuda_graph": True})):
                if options is not None:
                    dcgen_kernels.unpatch(model)
                    dcgen_kernels.patch(model, **options)
                result["variants"][variant] = _measure(step, device, steps, sampler, pause_s)
    finally:
        sampler.stop()
        dcgen_kernels.unpatch(model)
    for rec in result["variants"].values():
        alone, loop = rec.pop("_windows")
        rec["clocks_alone"] = sampler.summary(*alone)
        rec["clocks_loop"] = sampler.summary(*loop)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="a bench_sana_step size (default: c32_128x128; tiny: c8_8x8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device.type != "cuda"
    size = args.size or ("c8_8x8" if tiny else "c32_128x128")
    result = run(device, tiny, size, args.steps, PAUSE_S if not tiny else 0.0)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{size}, {args.steps} steps back to back after one alone ({result['clock_fields'] or 'no clocks'})")
    print(f"  {'variant':<14} {'alone ms':>9} {'first':>8} {'median':>8} {'last':>8}  {'SM MHz alone':>12} "
          f"{'SM MHz loop (min)':>18} {'W loop':>7}  reasons")
    for variant, rec in result["variants"].items():
        alone, loop = rec["clocks_alone"], rec["clocks_loop"]
        print(f"  {variant:<14} {rec['alone_ms']:9.2f} {rec['first_ms']:8.2f} {rec['median_ms']:8.2f} "
              f"{rec['last_ms']:8.2f}  {alone.get('sm_mhz_median', float('nan')):12.0f} "
              f"{loop.get('sm_mhz_median', float('nan')):11.0f} ({loop.get('sm_mhz_min', float('nan')):4.0f}) "
              f"{loop.get('power_w_median', float('nan')):7.0f}  {' '.join(loop.get('reasons', []))}")


if __name__ == "__main__":
    main()
