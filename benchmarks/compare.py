"""Perf-regression check between two results JSONs written by benchmarks/run.py:

    python benchmarks/compare.py OLD.json NEW.json [--threshold 0.10]

Prints every metric found in both files as old / new / change and exits 1 when a tracked metric dropped by more
than the threshold (default 10%), 0 otherwise, 2 when a file cannot be read or the two runs are not comparable
(another GPU model, or a GPU run against a tiny CPU one).

Tracked (gated) metrics are ratios measured within one run, so two runs on different days or machines of the same
GPU model compare fairly; all are higher-is-better:
  speedup_vs_stock       a patched / compiled variant over stock diffusers in the same run (ops, steps, decodes,
                         per-image latency);
  speedup_vs_base        DC-Gen model over its base model, per image, same variant (e2e);
  frac_of_measured_gemm  an op's TFLOP/s over the bf16 GEMM ceiling measured in the same run;
  frac_of_copy           an op's GB/s over the device-copy ceiling measured in the same run;
  vs_gemm                a patch (un)embedding variant over the bare GEMM on packed input, same run (patch_embed);
  speedup_vs_bf16        a quantized linear over cuBLAS bf16 on the same layer, same run (quant_linear);
  speedup_vs_bf16_with_producer  the same with the kernel producing its input on both sides (the FP8 target).
These ratios of the baselines' own records (BASELINE_RECORDS: stock, the bare GEMM, torch's SDPA backends) are
shown, not gated. Absolute times and throughputs (ms, s, TFLOP/s, GB/s, compile seconds) and fractions of stock (the
eager quant_linear steps') are shown, not gated: they move with clocks, drivers and the machine. So are the e2e
ratios that involve an eager transformer step under HOST_BOUND_STEP_MS (in either run), and quant_linear's FLUX-12B
step ratios when its eager stock step is: such steps are paced by the host's kernel launches, which vary between
machines (two H100 runs of the same code 20 minutes apart, 2026-11-27: DC-Gen-FLUX 1K stock step 89.6 vs 60.9 ms,
such ratios moving by -47% to +73%); decodes, ops and steps of HOST_BOUND_STEP_MS or more stay gated. Likewise the
model-step ratios of sana_step whose steps the run's own kernel profile found host-paced (GPU busy under
GPU_BUSY_MIN, in either run): all of a size's ratios when its stock step was, its eager (non-graph) variants' when
its patched step was (the 64x64 SANA step across six H100 runs of 2026-11-27: stock 45.0-60.8 ms, patched eager
32.4-65.8 ms for ~22 ms of kernels, patched GPU busy 19-45% against 93-98% at 128x128). A tracked metric whose
record failed its correctness check in the new run, or whose new value is not finite (NaN, inf), counts as a
regression, host-paced or not; one whose baseline record failed its check or is not finite is shown, not gated (it
is no reference). Tracked metrics in only one file are listed, not gated (a section skipped for time is not a
regression; the run's own `problems` list reports errors). Modelled numbers (the projection section) and anchor
copies are not compared.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Records that are the baselines themselves (stock diffusers, torch.compile of stock, bare GEMMs, torch's SDPA backends):
# their ratios are shown, not gated, since they move with torch and cuDNN, not with this library.
BASELINE_RECORDS = ("stock", "stock_conv", "stock_graph", "gemm", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient",
                    "torch_compile", "bf16_cublas", "bf16_with_producer", "scaled_mm_core", "scaled_mm_core_fast_accum")
TRACKED = ("speedup_vs_stock", "speedup_vs_base", "frac_of_measured_gemm", "frac_of_copy", "vs_gemm",
           "speedup_vs_bf16", "speedup_vs_bf16_with_producer")
SHOWN = ("ms", "s", "compile_s", "tflops", "GBps", "copy_GBps", "gemm_tflops", "attention_tflops", "fp8_gemm_tflops",
         "fraction_of_stock")  # the eager FLUX-12B quant_linear steps' (the FP8 step target), lower is better
NOT_COMPARED = ("environment", "anchors", "gpu_check", "targets", "problems", "projection", "config", "sections")
HOST_BOUND_STEP_MS = 250.0  # eager FLUX-12B steps at <= 4608 tokens (130-190 ms on an H100) are host-paced
SCHEMA_PREFIX = "dcgen_kernels-benchmarks/"  # run.py's report["schema"]: other JSONs (profiles, anchors) are refused
GPU_BUSY_MIN = 0.8  # a profiled step whose kernels fill less of its wall time is paced by the host


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics(report: dict) -> dict:
    """{path: (value, tracked, failed_check)} for every tracked or shown number of a run.py report."""
    found = {}

    def walk(node, path, tracked, failed):
        if not isinstance(node, dict):
            return
        failed = failed or node.get("check") == "FAILED"
        for key, value in node.items():
            if "anchor" in key or (not path and key in NOT_COMPARED) or key == "config":
                continue
            sub = f"{path}/{key}" if path else key
            baseline_record = path.rsplit("/", 1)[-1] in BASELINE_RECORDS
            is_tracked = tracked or (key in TRACKED and not baseline_record)
            if _is_number(value) and (is_tracked or key in SHOWN or key in TRACKED):
                found[sub] = (float(value), is_tracked, failed)
            elif isinstance(value, dict):
                walk(value, sub, is_tracked, failed)

    walk(report, "", False, False)
    return found


def _host_paced_step_paths(report: dict) -> set:
    """sana_step ratio paths whose stock step, or (for eager variants) patched step, kept the GPU busy less than
    GPU_BUSY_MIN of its wall time in this run's kernel profile."""
    paths = set()
    for size, rec in report.get("sana_step", {}).get("sizes", {}).items():
        profile = rec.get("kernel_profile", {}) if isinstance(rec, dict) else {}
        busy = {name: profile.get(name, {}).get("gpu_busy", 1.0) for name in ("stock", "patched")}
        for variant, value in rec.items():
            if isinstance(value, dict) and "speedup_vs_stock" in value and (
                    busy["stock"] < GPU_BUSY_MIN or (busy["patched"] < GPU_BUSY_MIN and not variant.endswith("_graph"))):
                paths.add(f"sana_step/sizes/{size}/{variant}/speedup_vs_stock")
    return paths


def host_bound_paths(report: dict) -> set:
    """Metric paths of e2e and quantized FLUX-step ratios involving an eager step faster than HOST_BOUND_STEP_MS, and
    of model-step ratios whose steps the run's profile found host-paced."""
    steps = report.get("e2e", {}).get("steps", {})
    fast = {key for key, rec in steps.items()
            if any(isinstance(v, dict) and v.get("ms", HOST_BOUND_STEP_MS) < HOST_BOUND_STEP_MS
                   for name, v in rec.items() if name != "patched_graph")}
    fast |= {key for key, rec in report.get("e2e_compile", {}).get("steps", {}).items()
             if rec.get("torch_compile", {}).get("stock_ms", HOST_BOUND_STEP_MS) < HOST_BOUND_STEP_MS}
    speedups = report.get("e2e_summary", {}).get("speedups", {})
    paths = set()
    for path in metrics(report):
        parts = path.split("/")
        if parts[0] in ("e2e", "e2e_compile") and parts[1] == "steps" or parts[:2] == ["e2e_summary", "images"]:
            if "/".join(parts[2:4]) in fast:
                paths.add(path)
        elif parts[:2] == ["e2e_summary", "speedups"]:
            key = "/".join(parts[2:4])
            base = speedups.get(key, {}).get("base")
            if key in fast or (base and f"{base}/{parts[3]}" in fast):
                paths.add(path)
    quant_steps = report.get("quant_linear", {}).get("flux_step", {})
    if quant_steps.get("stock", {}).get("ms", HOST_BOUND_STEP_MS) < HOST_BOUND_STEP_MS:  # its ratios' numerator
        paths |= {f"quant_linear/flux_step/{name}/speedup_vs_stock" for name, rec in quant_steps.items()
                  if isinstance(rec, dict) and "speedup_vs_stock" in rec}
    return paths | _host_paced_step_paths(report)


def compare(old: dict, new: dict, threshold: float) -> dict:
    """Rows of the comparison and the regressions among the tracked metrics."""
    a, b = metrics(old), metrics(new)
    host_bound = host_bound_paths(old) | host_bound_paths(new)
    rows, regressions = [], []
    for path in sorted(set(a) & set(b)):
        (old_v, tracked_old, failed_old), (new_v, tracked_new, failed) = a[path], b[path]
        comparable = tracked_old and tracked_new
        # A failed check or a non-finite value says the result is wrong, not slow: gated even where host-paced.
        broken = failed or not math.isfinite(new_v)
        baseline_ok = not failed_old and math.isfinite(old_v)
        tracked = comparable and (broken or (baseline_ok and path not in host_bound))
        change = (new_v - old_v) / old_v if old_v and math.isfinite(old_v) and math.isfinite(new_v) else None
        status = ""
        if comparable and not broken and not baseline_ok:
            status = "baseline check FAILED: not gated" if failed_old else "baseline not finite: not gated"
        if tracked:
            if failed:
                status = "REGRESSION (check FAILED)"
            elif broken:
                status = "REGRESSION (not finite)"
            elif change is not None and change < -threshold:
                status = "REGRESSION"
            elif change is not None and change > threshold:
                status = "improved"
            else:
                status = "ok"
            if status.startswith("REGRESSION"):
                regressions.append(path)
        rows.append({"metric": path, "old": old_v, "new": new_v, "change": change, "tracked": tracked,
                     "host_bound": path in host_bound and comparable and not tracked, "status": status})
    only_old = sorted(p for p in a if p not in b and a[p][1])
    only_new = sorted(p for p in b if p not in a and b[p][1])
    return {"rows": rows, "regressions": regressions, "only_old": only_old, "only_new": only_new}


def _describe(report: dict) -> str:
    env = report.get("environment", {})
    commit = (env.get("git") or {}).get("commit") or "?"
    return f"{env.get('gpu') or report.get('mode', '?')}, {env.get('date', '?')}, commit {commit[:9]}"


def render(result: dict, old: dict, new: dict, threshold: float) -> str:
    lines = [f"old: {_describe(old)}", f"new: {_describe(new)}"]
    old_enc, new_enc = (r.get("e2e", {}).get("config", {}).get("text_encoders") for r in (old, new))
    if old_enc != new_enc:
        lines.append(f"WARNING: different e2e text-encoder settings ({old_enc} vs {new_enc}): per-image speed-ups "
                     "include the encoders only where they were measured")
    width = max([len(r["metric"]) for r in result["rows"]] + [20])
    header = f"  {'metric':<{width}}{'old':>12}{'new':>12}{'change':>9}  status"
    for tracked, host_bound, title in (
            (True, False, f"tracked (higher is better; a drop > {threshold:.0%} is a regression)"),
            (False, True, f"host-paced ratios (e2e and quant_linear FLUX-step ratios with eager steps under "
                          f"{HOST_BOUND_STEP_MS:.0f} ms, profiled steps with the GPU busy < {GPU_BUSY_MIN:.0%}), "
                          f"not gated"),
            (False, False, "absolute, not gated")):
        rows = [r for r in result["rows"] if r["tracked"] is tracked and r["host_bound"] is host_bound]
        lines += [f"{title}: {len(rows)}", header]
        for r in rows:
            change = f"{r['change']:+.1%}" if r["change"] is not None else "-"
            lines.append(f"  {r['metric']:<{width}}{r['old']:>12.4g}{r['new']:>12.4g}{change:>9}  {r['status']}")
    for key, title in (("only_old", "tracked, only in old (not gated)"), ("only_new", "tracked, only in new")):
        if result[key]:
            lines.append(f"{title}: {len(result[key])}")
            lines += [f"  {p}" for p in result[key]]
    compared = sum(r["tracked"] for r in result["rows"])
    if result["regressions"]:
        lines.append(f"verdict: REGRESSION in {len(result['regressions'])} of {compared} tracked metrics: "
                     + ", ".join(result["regressions"]))
    else:
        lines.append(f"verdict: OK, no tracked metric dropped by more than {threshold:.0%} ({compared} compared)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="baseline results JSON")
    parser.add_argument("new", help="results JSON to check")
    parser.add_argument("--threshold", type=float, default=0.10, help="relative drop that fails (default 0.10)")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    reports = []
    for name in (args.old, args.new):
        try:
            report = json.loads(Path(name).read_text())
        except (OSError, ValueError) as err:
            print(f"compare: cannot read {name}: {err}", file=sys.stderr)
            return 2
        if not (isinstance(report, dict) and str(report.get("schema")).startswith(SCHEMA_PREFIX)
                and isinstance(report.get("environment"), dict)):
            print(f"compare: {name} is not a benchmarks/run.py results JSON (an object with a 'schema' "
                  f"{SCHEMA_PREFIX}... and an 'environment' object)", file=sys.stderr)
            return 2
        reports.append(report)
    devices = [r.get("environment", {}).get("gpu") or r.get("mode") for r in reports]
    if devices[0] != devices[1] or reports[0].get("mode") != reports[1].get("mode"):
        print(f"compare: not comparable: {args.old} ran on {devices[0]!r}, {args.new} on {devices[1]!r} (within-run "
              "ratios compare only on the same GPU model and mode)", file=sys.stderr)
        return 2
    result = compare(*reports, args.threshold)
    print(render(result, *reports, args.threshold))
    return 1 if result["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
