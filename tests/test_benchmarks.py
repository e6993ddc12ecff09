"""The benchmark harness on the CPU: regression-check logic with planted regressions, the projection's op counts
and time model on hand-countable cases, and the end-to-end section in tiny mode (structure, JSON, table, chart).
No timing is asserted."""

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_e2e, compare, projection, run

REPO = Path(__file__).resolve().parents[1]
H100_RESULT = REPO / "benchmarks" / "results" / "baseline-nvidia-h100-80gb-hbm3.json"
FLUX_STEP_SPEEDUP = ("flux_step", "sizes", "4096", "patched", "speedup_vs_stock")


def _get(d, path):
    for key in path:
        d = d[key]
    return d


def _set(d, path, value):
    _get(d, path[:-1])[path[-1]] = value


def _write(tmp_path, name, report):
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return str(path)


@pytest.fixture(scope="module")
def h100():
    return json.loads(H100_RESULT.read_text())


# ------------------------------------------------------------------------------------------------ compare
def test_compare_identical_h100_result_passes(h100, tmp_path, capsys):
    old = _write(tmp_path, "old.json", h100)
    assert compare.main([old, old]) == 0
    out = capsys.readouterr().out
    assert "verdict: OK" in out
    assert "flux_step/sizes/4096/patched/speedup_vs_stock" in out


def test_compare_warns_on_different_text_encoder_settings(h100):
    with_encoders = copy.deepcopy(h100)
    with_encoders.setdefault("e2e", {}).setdefault("config", {})["text_encoders"] = {"flux": "/models/flux"}
    warning = "different e2e text-encoder settings"
    assert warning in compare.render(compare.compare(h100, with_encoders, 0.1), h100, with_encoders, 0.1)
    assert warning not in compare.render(compare.compare(h100, h100, 0.1), h100, h100, 0.1)


@pytest.mark.parametrize("factor, threshold, expected", [
    (0.85, 0.10, 1),   # 15% drop of a tracked ratio: regression
    (0.95, 0.10, 0),   # 5% drop: within the default threshold
    (0.85, 0.20, 0),   # the same drop under a looser threshold
    (1.30, 0.10, 0),   # improvement
])
def test_compare_planted_tracked_change(h100, tmp_path, factor, threshold, expected):
    new = copy.deepcopy(h100)
    _set(new, FLUX_STEP_SPEEDUP, _get(h100, FLUX_STEP_SPEEDUP) * factor)
    args = [_write(tmp_path, "old.json", h100), _write(tmp_path, "new.json", new), "--threshold", str(threshold)]
    assert compare.main(args) == expected


def test_compare_absolute_times_are_not_gated(h100, tmp_path):
    new = copy.deepcopy(h100)
    new["flux_step"]["sizes"]["4096"]["stock"]["ms"] *= 3  # a slower machine: shown, not a regression
    new["ceilings"]["gemm_tflops"] /= 2
    result = compare.compare(h100, new, 0.10)
    assert result["regressions"] == []
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["flux_step/sizes/4096/stock/ms"]["change"] == pytest.approx(2.0)
    assert not rows["flux_step/sizes/4096/stock/ms"]["tracked"]


def test_compare_gemm_fraction_and_failed_check_are_regressions(h100):
    new = copy.deepcopy(h100)
    att = new["flux_attention"]["sizes"]["N=4608"]["variants"]
    att["dcgen_cuda"]["frac_of_measured_gemm"] *= 0.5
    new["flux_step"]["sizes"]["16384"]["patched"]["check"] = "FAILED"
    result = compare.compare(h100, new, 0.10)
    assert set(result["regressions"]) == {
        "flux_attention/sizes/N=4608/variants/dcgen_cuda/frac_of_measured_gemm",
        "flux_step/sizes/16384/patched/speedup_vs_stock"}


def test_compare_missing_metrics_listed_not_gated(h100):
    new = copy.deepcopy(h100)
    del new["flux_step"]
    result = compare.compare(h100, new, 0.10)
    assert result["regressions"] == []
    assert "flux_step/sizes/4096/patched/speedup_vs_stock" in result["only_old"]


def test_compare_unreadable_file_exits_2(h100, tmp_path):
    assert compare.main([_write(tmp_path, "old.json", h100), str(tmp_path / "missing.json")]) == 2


def test_git_record_names_its_source_and_the_tree(monkeypatch, tmp_path):
    (tmp_path / "dcgen_kernels").mkdir()
    (tmp_path / "dcgen_kernels" / "op.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("not measured code\n")
    digest = run.tree_digest(tmp_path)
    (tmp_path / "README.md").write_text("changed\n")
    assert run.tree_digest(tmp_path) == digest  # only the code that runs is hashed
    (tmp_path / "dcgen_kernels" / "op.py").write_text("x = 2\n")
    assert run.tree_digest(tmp_path) != digest
    monkeypatch.setenv("DCGEN_GIT_COMMIT", "abc1234")
    record = run._git_record()
    assert record["commit"] == "abc1234" and record["commit_source"] == "DCGEN_GIT_COMMIT" and record["dirty"] is None
    assert record["tree_sha256"] == run.tree_digest()


@pytest.mark.parametrize("change", ["other_device", "other_mode"])  # ("gpu" as an id would mark it GPU-only)
def test_compare_other_gpu_or_mode_exits_2(h100, tmp_path, capsys, change):
    new = copy.deepcopy(h100)
    if change == "other_device":
        new["environment"]["gpu"] = "NVIDIA H200"
    else:
        new["mode"] = "tiny-cpu"
    assert compare.main([_write(tmp_path, "old.json", h100), _write(tmp_path, "new.json", new)]) == 2
    assert "not comparable" in capsys.readouterr().err


def test_compare_does_not_gate_against_a_failed_baseline_record(h100):
    old = copy.deepcopy(h100)
    old["flux_step"]["sizes"]["16384"]["patched"]["check"] = "FAILED"
    new = copy.deepcopy(h100)
    path = ("flux_step", "sizes", "16384", "patched", "speedup_vs_stock")
    _set(new, path, _get(h100, path) / 2)
    rows = {r["metric"]: r for r in compare.compare(old, new, 0.10)["rows"]}
    row = rows["flux_step/sizes/16384/patched/speedup_vs_stock"]
    assert not row["tracked"] and row["status"] == "baseline check FAILED: not gated"
    new["flux_step"]["sizes"]["16384"]["patched"]["check"] = "FAILED"  # failing in the new run stays a regression
    assert "flux_step/sizes/16384/patched/speedup_vs_stock" in compare.compare(old, new, 0.10)["regressions"]


def test_compare_ignores_anchors_and_projection(h100):
    new = copy.deepcopy(h100)
    new["projection"] = {"steps": {"x": {"speedup_vs_stock": 0.1}}}
    new["ceilings"]["anchor (H100, 2026-11-27)"]["gemm_tflops"] = 1.0
    assert not [p for p in compare.metrics(new) if "anchor" in p or p.startswith("projection")]


# ------------------------------------------------------------------------------------------------ projection
def test_count_linear_is_one_gemm_of_2mkn_flops():
    m, k, n = 48, 64, 80
    layer = torch.nn.Linear(k, n, device="meta", dtype=torch.bfloat16)
    x = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
    counts = projection.count(lambda: layer(x))
    (key, times), = counts.gemm.items()
    flops, nbytes, dtype_bytes, linear, gm, gk, gn = key
    assert (flops, times, dtype_bytes, linear, gm, gk, gn) == (2 * m * k * n, 1, 2, True, m, k, n)
    assert nbytes == 2 * (m * k + k * n + n + m * n)  # x, W, bias read; y written
    assert counts.attention_flops == 0 and counts.elementwise_bytes == 0


def test_count_attention_and_elementwise():
    b, h, s, d = 1, 3, 40, 16
    q = torch.empty(b, h, s, d, device="meta", dtype=torch.bfloat16)

    def fn():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return torch.nn.functional.gelu(out.transpose(1, 2).reshape(b, s, h * d))

    counts = projection.count(fn)
    assert counts.attention_flops == 4 * b * h * s * s * d
    assert not counts.gemm  # attention is counted whole, not as its internal bmms
    # transpose + reshape copies once (read + write), gelu reads and writes: 4 tensors of b*s*h*d bf16
    assert counts.elementwise_bytes == 4 * 2 * b * s * h * d


def test_count_depthwise_conv_is_memory_bound():
    x = torch.empty(1, 8, 16, 16, device="meta", dtype=torch.bfloat16)
    depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, device="meta", dtype=torch.bfloat16)
    dense = torch.nn.Conv2d(8, 4, 3, padding=1, device="meta", dtype=torch.bfloat16)
    assert not projection.count(lambda: depthwise(x)).gemm
    (key, _), = projection.count(lambda: dense(x)).gemm.items()
    assert key[0] == 2 * (4 * 16 * 16) * 8 * 9


def test_spec_for_knows_only_the_sxm_boards():
    assert projection.spec_for("NVIDIA H100 80GB HBM3") is projection.H100_SXM
    assert projection.spec_for("NVIDIA H200") is projection.H200
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA H100 PCIE",
                 "NVIDIA A100-SXM4-80GB", None):
        assert projection.spec_for(name) is None


def test_model_seconds_roofline_arithmetic():
    spec = projection.DeviceSpec("test", bf16_tflops=100.0, fp8_tflops=200.0, fp4_tflops=400.0, fp32_tflops=10.0,
                                 bandwidth_GBps=1000.0, source="test")
    eff = projection.Efficiency(gemm=0.5, attention=0.25, bandwidth=0.5, fp8=0.5, source={})
    counts = projection.Counts()
    m = k = n = 4096
    counts.gemm[(2 * m * k * n, 3 * m * k * 2, 2, True, m, k, n)] = 2
    counts.attention_flops = 1e12
    counts.elementwise_bytes = 1e9
    t = projection.model_seconds(counts, spec, eff)
    assert t["gemm"] == pytest.approx(2 * 2 * m * k * n / (100e12 * 0.5))  # compute-bound
    assert t["attention"] == pytest.approx(1e12 / (100e12 * 0.25))
    assert t["elementwise"] == pytest.approx(1e9 / (1000e9 * 0.5))
    assert t["total"] == pytest.approx(t["gemm"] + t["attention"] + t["elementwise"])
    q = projection.model_seconds(counts, spec, eff, nvfp4=True)
    low_rank = 2 * m * projection.SVDQUANT_RANK * (k + n) / (100e12 * 0.5)
    assert q["gemm"] == pytest.approx(2 * (2 * m * k * n / (400e12 * 0.5) + low_rank))
    quant_pass = 2 * m * k * (2 + projection.NVFP4_BYTES_PER_ELEMENT) / (1000e9 * 0.5)
    assert q["elementwise"] == pytest.approx(t["elementwise"] + quant_pass)


def test_efficiencies_from_run_or_anchors(h100):
    anchors = json.loads((REPO / "benchmarks" / "anchors" / "h100-2026-11-27.json").read_text())
    measured = projection.efficiencies(h100, anchors)  # this H100 run's ceilings, anchors where it has none
    assert measured.gemm == pytest.approx(h100["ceilings"]["gemm_tflops"] / projection.H100_SXM.bf16_tflops)
    from_this_run = {key: origin.startswith("this run") for key, origin in measured.source["from"].items()}
    assert from_this_run == {"bf16_gemm_tflops": True, "copy_GBps": True, "attention_tflops": False,
                             "fp8_gemm_tflops": False}  # that run measured no attention or FP8 ceiling
    fallback = projection.efficiencies({"mode": "tiny-cpu"}, anchors)
    assert fallback.gemm == pytest.approx(anchors["ceilings"]["bf16_gemm_tflops"] / projection.H100_SXM.bf16_tflops)
    assert 0 < fallback.attention < 1 and 0 < fallback.bandwidth < 1
    # the anchors' attention is the shape and backend a run's ceilings time (SDPA default at N = 4608)
    default_4608 = anchors["attention_B1_H24_D128_bf16"]["N=4608"]["default"]["tflops"]
    assert fallback.attention == pytest.approx(default_4608 / projection.H100_SXM.bf16_tflops)
    # an H200 run without an FP8 ceiling: that one comes from the anchors, over the H100's datasheet, and says so
    h200 = copy.deepcopy(h100)
    h200["environment"]["gpu"], h200["ceilings"]["fp8_gemm_tflops"] = "NVIDIA H200", None
    mixed = projection.efficiencies(h200, anchors)
    assert mixed.bandwidth == pytest.approx(h100["ceilings"]["copy_GBps"] / projection.H200.bandwidth_GBps)
    assert mixed.fp8 == pytest.approx(anchors["ceilings"]["fp8_gemm_tflops"] / projection.H100_SXM.fp8_tflops)
    assert mixed.source["from"]["fp8_gemm_tflops"].startswith("H100 anchors")
    assert mixed.source["from"]["copy_GBps"] == "this run on NVIDIA H200, over the NVIDIA H200 datasheet"


# ------------------------------------------------------------------------------------------------ suite
def test_suite_selection():
    kernels = [s.name for s in run.select_sections("kernels", None)]
    e2e = [s.name for s in run.select_sections("e2e", None)]
    assert "flux_step" in kernels and "e2e" not in kernels
    assert e2e == ["ceilings", "e2e", "projection", "e2e_compile"]
    assert [s.name for s in run.select_sections("all", "e2e,ceilings")] == ["ceilings", "e2e"]
    with pytest.raises(SystemExit, match="unknown"):
        run.select_sections("all", "nope")


@pytest.fixture(scope="module")
def tiny_e2e(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    rc = run.main(["--tiny", "--suite", "e2e", "--out", str(out)])
    return rc, out, json.loads(out.read_text())


def test_tiny_e2e_run_writes_json_table_and_chart(tiny_e2e):
    rc, out, report = tiny_e2e
    assert rc == 0, report["problems"]
    assert report["mode"] == "tiny-cpu" and report["sections"] == ["ceilings", "e2e", "projection", "e2e_compile"]
    steps = report["e2e"]["steps"]
    assert set(steps) == {f"{m}/{r}" for m in ("FLUX.1-Krea", "DC-Gen-FLUX", "SANA-1.6B", "DC-Gen-SANA")
                          for r in ("1K", "2K", "4K")} | {"DC-Gen-FLUX-f64c128/1K", "DC-Gen-FLUX-f64c128/2K"}
    for key, rec in steps.items():
        assert rec["stock"]["ms"] > 0 and rec["patched"]["check"] == "ok", key
    # DC-Gen-FLUX: 1x1 patches of f32c32 at 1K/2K and of f64c128 at 4K; FLUX.1-Krea: 2x2-packed 16 channels
    assert steps["FLUX.1-Krea/1K"]["in_channels"] == 64
    assert steps["DC-Gen-FLUX/1K"]["latent"][1] == report["e2e"]["config"]["resolutions"]["1K"] // 32
    assert steps["DC-Gen-FLUX/4K"]["latent"][1] == report["e2e"]["config"]["resolutions"]["4K"] // 64
    summary = report["e2e_summary"]
    krea, dcgen = summary["images"]["FLUX.1-Krea/4K"], summary["images"]["DC-Gen-FLUX/4K"]
    assert (krea["steps"], dcgen["steps"]) == (28, 20)
    v = dcgen["variants"]["stock"]
    assert v["s"] == pytest.approx((20 * v["step_ms"] + v["decode_ms"]) / 1e3)
    assert "torch_compile" in dcgen["variants"]
    speedup = summary["speedups"]["DC-Gen-FLUX/4K"]
    assert speedup["paper"] == 52.9
    assert speedup["speedup_vs_base"]["stock"] == pytest.approx(krea["variants"]["stock"]["s"] / v["s"])
    assert summary["speedups"]["DC-Gen-FLUX-f64c128/2K"]["paper"] == 16.9  # compared with the paper's DC-Gen-FLUX
    assert Path(summary["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(summary["markdown"]).read_text()
    assert "| DC-Gen-FLUX | 4K | 20 |" in md and "4.04" in md and "52.9x" in md
    assert [t["pass"] for t in report["targets"]] == [None] * len(report["targets"])  # tiny: not evaluated


def test_e2e_summary_compile_speedup_uses_its_own_stock_step(tiny_e2e):
    _, _, report = tiny_e2e
    v = report["e2e_summary"]["images"]["DC-Gen-FLUX/4K"]["variants"]["torch_compile"]
    step = report["e2e_compile"]["steps"]["DC-Gen-FLUX/4K"]["torch_compile"]
    assert v["decode_variant"] == "stock" and "text_encoder_ms" not in v
    assert v["speedup_vs_stock"] == pytest.approx((20 * step["stock_ms"] + v["decode_ms"]) / 1e3 / v["s"])
    eager = copy.deepcopy(report["e2e"])
    eager["steps"]["DC-Gen-FLUX/4K"]["stock"]["ms"] *= 3  # the eager section's stock step does not enter it
    again = bench_e2e.summarize(eager, report["e2e_compile"])["images"]["DC-Gen-FLUX/4K"]["variants"]
    assert again["torch_compile"]["speedup_vs_stock"] == pytest.approx(v["speedup_vs_stock"])


def test_e2e_summary_patched_decode_that_raised_is_not_replaced_by_stock(tiny_e2e):
    _, _, report = tiny_e2e
    eager = copy.deepcopy(report["e2e"])
    ae_key = eager["config"]["pipelines"]["DC-Gen-SANA"]["autoencoder"]["1K"]
    assert "ms" in eager["decodes"][f"{ae_key}/1K"]["patched"]  # a decoder patch() supports
    eager["decodes"][f"{ae_key}/1K"]["patched"] = {"error": "RuntimeError: boom", "traceback": ""}
    summary = bench_e2e.summarize(eager)
    rec = summary["images"]["DC-Gen-SANA/1K"]
    assert set(rec["variants"]) == {"stock"} and rec["patched_decode_error"] == "RuntimeError: boom"
    row = next(line for line in bench_e2e.markdown(summary, eager, "cpu").splitlines()
               if line.startswith("| DC-Gen-SANA | 1K |"))
    assert " / error |" in row
    # a decoder patch() does not support (AutoencoderKL) still decodes stock in the patched pipeline
    krea = summary["images"]["FLUX.1-Krea/1K"]["variants"]["patched"]
    assert krea["decode_variant"] == "stock"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_gpu_check_where_torch_sees_no_gpu_fails_and_keeps_its_phases(tmp_path):
    """A lent machine whose torch sees no GPU would skip every GPU test and run the suite tiny, all "ok": gpu_check
    fails instead, runs neither, and still writes its phases to the results JSON."""
    import shutil
    import subprocess

    tree = tmp_path / "tree"  # the scripts alone: no CMakeLists.txt, no .whl/ (nothing to build or install)
    shutil.copytree(REPO / "benchmarks", tree / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh"), "--suite", "dcgen", "--budget-s", "60"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED phases: cuda_visible" in proc.stdout
    [result] = (tmp_path / "out").glob("gpu_check-*.json")
    report = json.loads(result.read_text())
    phases = {p["phase"]: p["status"] for p in report["gpu_check"]["phases"]}
    assert phases["cuda_visible"].startswith("failed")
    assert phases["pytest_gpu"].startswith("skipped (torch sees no GPU") and phases["suite"] == phases["pytest_gpu"]
    assert report["gpu_check"]["failed_phases"] == ["cuda_visible"] and report["problems"]


def test_gpu_check_hard_limit_cuts_the_phase_floors(tmp_path):
    """The GPU tests' 150 s floor would run past a device call's end when install and build were slow: no phase runs
    past --hard-limit-s (15 s kept for the JSON), and one with no time left is skipped and fails the call."""
    import shutil
    import stat
    import subprocess
    import time

    tree = tmp_path / "tree"
    shutil.copytree(REPO / "benchmarks", tree / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    python = tmp_path / "python_whose_gpu_tests_hang"
    python.write_text('#!/usr/bin/env bash\n[[ " $* " == *" -m gpu "* ]] && exec sleep 300\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python)}
    hard_limit = 35
    started = time.monotonic()
    proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh"), "--dry-run", "--suite", "dcgen",
                           "--budget-s", "0", "--hard-limit-s", str(hard_limit)],
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert elapsed < hard_limit, proc.stdout
    [result] = (tmp_path / "out").glob("gpu_check-*.json")
    report = json.loads(result.read_text())
    phases = {p["phase"]: p["status"] for p in report["gpu_check"]["phases"]}
    pytest_limit = int(phases["pytest_gpu"].removeprefix("timeout after ").split("s")[0])
    assert pytest_limit <= hard_limit - 15, phases  # not the 150 s floor
    assert phases["suite"].startswith("skipped (") and "left before --hard-limit-s 35" in phases["suite"]
    assert report["gpu_check"]["failed_phases"] == ["pytest_gpu", "suite"]
    bad = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh"), "--dry-run", "--hard-limit-s", "soon"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--hard-limit-s: expected whole seconds, got 'soon'" in bad.stderr


def test_tiny_e2e_compile_runs_without_the_eager_section(tmp_path):
    # One GPU call may run e2e_compile alone: it then takes the whole compile plan and times stock itself.
    out = tmp_path / "results.json"
    assert run.main(["--tiny", "--sections", "e2e_compile", "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["e2e_compile"]["steps"]
    assert set(steps) == {"DC-Gen-FLUX/4K", "DC-Gen-SANA/4K"}
    skipped = bench_e2e.run_compile(torch.device("cpu"), True, {"skipped": "10 s left"})
    assert set(skipped["steps"]) == set(steps)
    for key, rec in steps.items():
        rec = rec["torch_compile"]
        assert rec["check"] == "ok" and rec["stock_ms"] > 0, key
        assert rec["speedup_vs_stock"] == pytest.approx(rec["stock_ms"] / rec["ms"])


def test_tiny_projection_is_labelled_and_finite(tiny_e2e):
    _, _, report = tiny_e2e
    proj = report["projection"]
    assert "PROJECTION" in proj["note"] and proj["datasheet"]["bandwidth_GBps"] == 1792.0
    image = proj["images"]["DC-Gen-FLUX/4K"]
    assert math.isfinite(image["nvfp4_rtx5090_s"]) and image["nvfp4_rtx5090_s"] < image["bf16_rtx5090_s"]
    assert "nvfp4" not in proj["steps"]["SANA-1.6B/1K"]  # only the FLUX-family transformers are quantized


def test_compare_on_e2e_results(tiny_e2e, tmp_path):
    _, out, report = tiny_e2e
    new = copy.deepcopy(report)
    new["e2e_summary"]["speedups"]["DC-Gen-FLUX/4K"]["speedup_vs_base"]["stock"] *= 0.5
    new["e2e"]["decodes"]["dcae_f32c32/1K"]["patched"]["speedup_vs_stock"] *= 0.5
    result = compare.compare(report, new, 0.10)
    # tiny CPU steps take milliseconds: their ratios count as host-paced; the decode's is gated
    assert result["regressions"] == ["e2e/decodes/dcae_f32c32/1K/patched/speedup_vs_stock"]
    assert any(r["host_bound"] for r in result["rows"]
               if r["metric"] == "e2e_summary/speedups/DC-Gen-FLUX/4K/speedup_vs_base/stock")


# ------------------------------------------------------------------------------------------------ dcgen suite
def test_dcgen_suite_selection():
    assert [s.name for s in run.select_sections("dcgen", None)] == ["ceilings", "patch_embed", "quant_linear"]


def test_time_samples_warm_up_then_time_each_call(monkeypatch):
    from benchmarks import timing

    clock, calls = iter([0.0, 0.001, 0.001, 0.004, 0.004, 0.010]), []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    samples = timing.time_samples(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=3)
    assert len(calls) == 5 and samples == pytest.approx([1.0, 3.0, 6.0])
    clock = iter([0.0, 0.001, 0.001, 0.004, 0.004, 0.010])
    assert timing.time_ms(lambda: None, torch.device("cpu"), warmup=0, iters=3) == pytest.approx(3.0)


@pytest.mark.parametrize("name, label", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),  # cuDNN conv, before "gemm"
    ("depthwise_glu_kernel", "conv"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("linear_attention_fused_kernel", "attention"),  # before "linear_kernel"
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "gemm"),
    ("fp8_linear_kernel", "gemm"),
    ("nvfp4_gemm_sm120_kernel", "gemm"),
    ("patch_embed_narrow_kernel", "gemm"),
    ("patch_unembed_kernel", "gemm"),
    ("aten::addmm", "gemm"),
    ("aten::mm_backward", "other"),  # CPU ops: only the GEMM itself
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("patch_unpack_kernel", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("ada_layer_norm_modulate_kernel", "elementwise"),
    ("nvfp4_effective_weight_kernel", "elementwise"),
    ("quantize_fp8_rows_one_pass_kernel", "elementwise"),
    ("aten::linear", "other"),
])
def test_kernel_classes(name, label):
    from benchmarks.timing import classify

    assert classify(name) == label


def test_profile_kernels_and_gemm_shapes_on_cpu():
    from benchmarks.timing import profile_gemm_shapes, profile_kernels

    a, b, c = torch.randn(64, 32), torch.randn(32, 48), torch.randn(16, 32)
    calls = []

    def step():
        calls.append(1)
        return torch.mm(a, b), torch.mm(c, b), torch.mm(c, b), torch.relu(a)

    rec = profile_kernels(step, torch.device("cpu"), steps=3, top=2)
    assert len(calls) == 4  # a warm-up, then the profiled steps
    assert len(rec["top_kernels_ms"]) == 2 and rec["top_kernels_ms"][0][1] >= rec["top_kernels_ms"][1][1]
    assert rec["by_class_ms"]["gemm"] > 0
    assert sum(rec["by_class_ms"].values()) == pytest.approx(rec["kernel_ms_per_step"])
    assert "wall_ms_per_step" not in rec
    rows = profile_gemm_shapes(step, torch.device("cpu"), top=5)
    assert len(calls) == 6
    shapes = {row[1]: row[3] for row in rows if row[0] == "aten::mm"}
    assert shapes == {"[[64, 32], [32, 48]]": 1, "[[16, 32], [32, 48]]": 2}
    times = [row[2] for row in rows]
    assert all(ms > 0 for ms in times) and times == sorted(times, reverse=True)


def test_cpu_ceilings_are_labelled_stand_ins():
    from benchmarks.timing import measure_ceilings

    rec = measure_ceilings(torch.device("cpu"))
    assert rec["gemm_n"] == 512 and rec["gemm_dtype"] == "float32" and rec["fp8_gemm_tflops"] is None
    assert rec["copy_GBps"] == pytest.approx(2 * rec["copy_bytes"] / rec["copy_ms"] / 1e6)
    assert rec["gemm_tflops"] == pytest.approx(2 * 512**3 / rec["gemm_ms"] / 1e9)
    assert rec["attention_shape"].startswith("B1 H2 N256 D128 float32")


def test_time_kernel_ms_on_cpu_is_time_ms_without_host_split():
    from benchmarks.timing import time_kernel_ms

    calls = []
    ms, host_ms = time_kernel_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=3)
    assert ms >= 0 and host_ms is None and len(calls) == 5


def test_patch_embed_target_ignores_failed_checks():
    from benchmarks import bench_patch_embed

    def case(vs_gemm, check):
        return {"fwd": {"variants": {"dcgen": {"ms": 1.0, "vs_gemm": vs_gemm, "check": check}}},
                "fwd_bwd": {"variants": {"dcgen": {"ms": 1.0, "vs_gemm": vs_gemm, "check": "ok"}}}}

    summary = bench_patch_embed._summary({"a": {"embed": case(1.2, "ok")}, "b": {"embed": case(5.0, "FAILED")}})
    assert summary["fwd"]["failed_check"] == ["b/embed"] and summary["fwd"]["measured"] == 1
    assert summary["fwd"]["met"] is False  # a fast but wrong kernel does not meet the target
    assert summary["fwd_bwd"]["met"] is True and summary["fwd_bwd"]["min_vs_gemm"] == pytest.approx(1.2)


def test_patch_embed_records_the_backend_auto_timed_and_ran(monkeypatch):
    from benchmarks import bench_patch_embed
    from dcgen_kernels.ops import _common
    from dcgen_kernels.ops.patch_embed import _call_key, select_backend

    latent, weight, bias = torch.zeros(1, 4, 4, 4), torch.zeros(8, 16), torch.zeros(8)
    untimed = select_backend("patch_embed", "auto", latent, weight)  # on the CPU nothing is timed
    assert bench_patch_embed._auto_backend("patch_embed", latent, weight, bias, 2) == untimed != "cuda"
    key = _call_key(latent, weight, bias, 2)
    monkeypatch.setitem(_common.TIMED_CHOICES, "patch_embed", {key: {"picked": "cuda"}})
    assert bench_patch_embed._auto_backend("patch_embed", latent, weight, bias, 2) == "cuda"


def test_patch_embed_target_not_met_when_a_case_is_unmeasured():
    from benchmarks import bench_patch_embed

    ok = {"fwd": {"variants": {"dcgen": {"ms": 1.0, "vs_gemm": 1.2, "check": "ok"}}},
          "fwd_bwd": {"variants": {"dcgen": {"ms": 1.0, "vs_gemm": 1.2, "check": "ok"}}}}
    errored = {"fwd": {"variants": {"dcgen": {"error": "RuntimeError: x"}}}, "fwd_bwd": {"variants": {}}}
    summary = bench_patch_embed._summary({"a": {"embed": ok, "unembed": {"error": "OOM"}}, "b": {"embed": errored}})
    for mode in ("fwd", "fwd_bwd"):
        assert summary[mode]["measured"] == 1 and summary[mode]["met"] is False
        assert summary[mode]["unmeasured"] == ["a/unembed", "b/embed"]


class _FakeAutotuner:
    """Triton's Autotuner as AutotuneTimings sees it: `run` tunes an unseen key (a new `configs_timings` dict of
    [median, p20, p80] per config, the winner in `cache`), or with one config takes it untimed."""

    def __init__(self, configs):
        self.configs, self.cache, self.configs_timings = configs, {}, {}

    def run(self, key):
        if key not in self.cache:
            if len(self.configs) > 1:
                self.configs_timings = {config: [ms, ms * 0.9, ms * 1.1] for config, ms in self.configs.items()}
            self.cache[key] = min(self.configs, key=self.configs.get)
        return key


def test_autotune_timings_records_each_tuning_once_and_nothing_untimed():
    tuned, single = _FakeAutotuner({"a": 2.0, "b": 1.5}), _FakeAutotuner({"only": 1.0})
    single.configs_timings = {"left by another kernel's tuning": [9.0]}  # stale: not this call's
    recorder = run.AutotuneTimings({"tuned": tuned, "single": single})
    assert tuned.run((16, "bf16")) == (16, "bf16")  # the wrapped run passes the result through
    tuned.run((16, "bf16"))  # cached: no new tuning
    tuned.configs = {"a": 3.0, "b": 4.0}
    tuned.run((32, "bf16"))
    single.run((16, "bf16"))
    assert recorder.timings == {"tuned": {"(16, 'bf16')": {"a": 2.0, "b": 1.5}, "(32, 'bf16')": {"a": 3.0, "b": 4.0}}}


def test_table_lists_each_timed_choice_with_its_candidates_times():
    choice = {"picked": "fused", "two_pass_ms": 0.127, "fused_ms": 0.1215}
    report = {"mode": "gpu", "sections": [],
              "autotuned": {"timed_choices": {"sana_linear_attention": {"(1, 70)": choice}}}}
    assert "timed choice sana_linear_attention (1, 70): fused (two_pass 127.0 us, fused 121.5 us)" in run.table(report)


def test_w4a16_target_per_layer_needs_a_checked_result():
    from benchmarks import run

    layer = lambda w4a16: {"fp8_fused_producer": {}, "w4a16": w4a16}  # noqa: E731
    report = {"quant_linear": {"layers": {
        "fast": layer({"ms": 1.0, "check": "ok", "speedup_vs_bf16": 0.95}),
        "slow": layer({"ms": 1.0, "check": "ok", "speedup_vs_bf16": 0.85}),
        "wrong": layer({"ms": 1.0, "check": "FAILED", "speedup_vs_bf16": 2.0})}}}
    verdicts = {t["target"].rsplit(" at ", 1)[1]: t["pass"] for t in run.dcgen_targets(report, {"quant_linear"})
                if t["target"].startswith("W4A16")}
    assert verdicts == {"fast": True, "slow": False, "wrong": False}


def test_linear_attention_target_counts_what_patch_runs_not_the_fastest_backend():
    from benchmarks import bench_sana_ops, run

    def verdict(variants):
        n = bench_sana_ops.REAL.grids[-1] ** 2
        report = {"sana_ops": {"ops": {"sana_linear_attention": {"sizes": {f"N={n}": {"variants": variants}}}}}}
        target, = [t for t in run.sana_targets(report, {"sana_ops"}) if t["target"].startswith("sana_linear")]
        return target["pass"], target["detail"]

    slow_auto = {"ms": 2.0, "check": "ok", "GBps": 1500.0, "frac_of_copy": 0.5}
    fast_forced = {"ms": 1.0, "check": "ok", "GBps": 3000.0, "frac_of_copy": 0.9}
    passed, detail = verdict({"dcgen": slow_auto, "dcgen_triton": fast_forced})
    assert passed is False and detail.startswith("dcgen ")
    assert verdict({"dcgen": {**fast_forced, "check": "FAILED"}, "dcgen_triton": fast_forced})[0] is False
    # no auto variant: auto's own order (cuda, then triton) among the forced ones that ran
    assert verdict({"dcgen_cuda": {"skipped": "no _C"}, "dcgen_triton": fast_forced}) == (True, "dcgen_triton "
                                                                                           "3000 GB/s = 90% of copy")


def test_sana_compile_targets_only_when_compiled_in_the_same_run():
    from benchmarks import bench_sana_step, run

    sizes = {shape.key: {"stock": {"ms": 100.0}, "patched": {"ms": 40.0, "check": "ok"}}
             for shape in bench_sana_step.REAL.shapes}
    report = {"sana_step": {"sizes": sizes}}
    names = lambda ran: [t["target"] for t in run.sana_targets(report, ran)]  # noqa: E731
    assert not any("torch.compile" in n for n in names({"sana_step"}))
    with_compile = [t for t in run.sana_targets(report, {"sana_step", "sana_step_compile"})
                    if "torch.compile" in t["target"]]
    assert with_compile and all(t["pass"] is False for t in with_compile)  # requested but no compiled result


def test_sana_compile_speedup_is_over_the_stock_step_timed_beside_it():
    from benchmarks import bench_sana_step

    # the eager section's stock time (another build, minutes earlier) does not enter the ratio
    eager = {"sizes": {shape.key: {"stock": {"ms": 1e6}} for shape in bench_sana_step.TINY.shapes}}
    result = bench_sana_step.run_compile(torch.device("cpu"), True, eager)
    for key, rec in result["sizes"].items():
        rec = rec["torch_compile"]
        assert rec["check"] == "ok" and rec["stock_ms"] > 0, key
        assert rec["speedup_vs_stock"] == pytest.approx(rec["stock_ms"] / rec["ms"])


def test_noise_floor_is_capped_and_checked():
    from benchmarks import common

    assert common.noise_floor_tolerance({"rel_l2_reference_backend_vs_stock": 0.01}, 0.02) == pytest.approx(0.02)
    assert common.noise_floor_tolerance({"rel_l2_reference_backend_vs_stock": 0.4}, 0.02) == pytest.approx(
        2 * common.NOISE_FLOOR_MAX)  # a wiring error shared by every backend does not loosen the check


def test_quant_step_skipped_when_the_budget_is_spent():
    from benchmarks import bench_quant_linear

    # Real (12B) configuration: the budget check comes before the model is built.
    rec = bench_quant_linear._bench_step(bench_quant_linear.REAL, torch.device("cpu"), tiny=False, rec={},
                                         time_left=lambda: 5.0)
    assert "skipped" in rec["stock"] and rec["image_tokens"] == 4096


def test_tiny_dcgen_suite_checks_every_timed_variant(tmp_path):
    out = tmp_path / "dcgen.json"
    rc = run.main(["--tiny", "--sections", "patch_embed", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["problems"]
    for shape, ops in report["patch_embed"]["cases"].items():
        for op, modes in ops.items():
            for mode, case in modes.items():
                for name, rec in case["variants"].items():
                    assert "skipped" in rec or rec["check"] == "ok", (shape, op, mode, name, rec)
    assert report["patch_embed"]["cases"]["c4_p2_D32_N16"]["unembed"]["fwd"]["variants"]["gemm"]["check"] == "ok"


def test_tiny_quant_linear_layers_check_every_timed_variant_and_use_only_measured_ceilings(tmp_path, monkeypatch):
    from benchmarks import bench_quant_linear

    monkeypatch.setattr(bench_quant_linear, "_bench_step", lambda cfg, device, tiny, rec, *args, **kwargs: rec)
    out = tmp_path / "quant.json"
    rc = run.main(["--tiny", "--sections", "quant_linear", "--out", str(out)])  # no ceilings section: none measured
    report = json.loads(out.read_text())
    assert rc == 0, report["problems"]
    layers = report["quant_linear"]["layers"]
    assert len(layers) == len(bench_quant_linear.TINY.shapes)
    for key, rec in layers.items():
        variants = {name: v for name, v in rec.items() if isinstance(v, dict)}
        assert {"bf16_cublas", "fp8_fused_producer", "w4a16", "w4a4_triton"} <= set(variants), key
        for name, v in variants.items():
            assert v["check"] == "ok" and v["ms"] > 0 and "fraction_of_ceiling" not in v, (key, name, v)


@pytest.mark.parametrize("producer,input_elements", [("adaln", 8 * 64 + 2 * 64), ("gelu", 8 * 64),
                                                      ("concat_gelu", 8 * 64)])
def test_quant_linear_producer_only_is_the_fp8_pass_alone(producer, input_elements):
    """fp8_producer_only times the producer emitting FP8 rows by itself, counts the bytes it reads and writes, and is
    checked dequantized against stock fp32 math of the producer."""
    from benchmarks import bench_quant_linear
    from tests.helpers import rel_l2

    x, linear = torch.randn(8, 64), torch.nn.Linear(64, 16)
    build = bench_quant_linear._producer_variants(x, linear, producer, 32)["fp8_producer_only"]
    fn, moved, (reference, tolerance) = build()
    out = fn()
    assert out.data.dtype == torch.float8_e4m3fn and out.shape == reference.shape and out.shape[-2:] == (8, 64)
    assert moved == 4 * input_elements + 8 * 64 + 4 * 8  # fp32 inputs; E4M3 rows and their fp32 scales
    assert rel_l2(out.dequantize(), reference) < tolerance


def test_quant_linear_producer_checks_do_not_trust_the_shared_adaln_kernel(monkeypatch):
    """bf16_with_producer, fp8_fused_producer and fp8_producer_only at K = 3072 all run our adaLN-modulate kernel: a
    bug it shares between its bf16 and FP8 forms fails all three checks (they compare with stock fp32 math)."""
    from benchmarks import bench_quant_linear
    from dcgen_kernels.ops import ada_layer_norm
    from tests.helpers import rel_l2

    for name in ("ada_layer_norm_modulate", "ada_layer_norm_modulate_fp8"):
        op = getattr(ada_layer_norm, name)
        monkeypatch.setattr(ada_layer_norm, name, lambda hidden, scale, shift, _op=op: _op(hidden, scale, -shift))
    torch.manual_seed(0)
    x, linear = torch.randn(8, 64), torch.nn.Linear(64, 16)
    for name, build in bench_quant_linear._producer_variants(x, linear, "adaln", 32).items():
        fn, _, (expected, tolerance) = build()
        out = fn()
        out = out.dequantize() if name == "fp8_producer_only" else out
        assert rel_l2(out.reshape(expected.shape), expected) > tolerance, name


def test_quant_linear_nvfp4_layers_are_skipped_where_their_kernels_cannot_run(monkeypatch):
    from benchmarks import bench_quant_linear
    from dcgen_kernels import _backend

    monkeypatch.setattr(_backend, "triton_device_error", lambda device: "Triton unavailable (test)")
    rec = bench_quant_linear._bench_layer(bench_quant_linear.TINY, torch.device("cpu"), 64, 64, "adaln", None, None)
    # the NVFP4 layers are checked against the reference backend: not timed as that backend
    for name in ("w4a16", "w4a4_triton"):
        assert set(rec[name]) == {"skipped"} and "Triton unavailable (test)" in rec[name]["skipped"], name
    assert rec["fp8_with_quantize"]["check"] == "ok" and "speedup_vs_bf16" in rec["fp8_with_quantize"]


@pytest.mark.allow_fallback
@pytest.mark.filterwarnings("ignore:dcgen_kernels.fp8_linear.*\\(test\\)")  # the stand-in's timed calls warn again
def test_quant_linear_variant_that_falls_back_is_skipped_when_forced_else_labelled(monkeypatch):
    import warnings

    from benchmarks import bench_quant_linear

    real = bench_quant_linear._layer_variants

    def with_fallbacks(cfg, device, x, linear, producer):
        def falling_back():
            warnings.warn("dcgen_kernels.fp8_linear: triton backend cannot serve this call (test); falling back to "
                          "reference", RuntimeWarning)
            return torch.nn.functional.linear(x, linear.weight, linear.bias)

        build = lambda: (falling_back, 0, bench_quant_linear.BF16_LAYER_TOL)  # noqa: E731
        return {"bf16_cublas": real(cfg, device, x, linear, producer)["bf16_cublas"], "fp8_prequantized_triton": build,
                "fp8_prequantized": build}

    monkeypatch.setattr(bench_quant_linear, "_layer_variants", with_fallbacks)
    rec = bench_quant_linear._bench_layer(bench_quant_linear.TINY, torch.device("cpu"), 64, 64, "adaln", None, None)
    assert set(rec["fp8_prequantized_triton"]) == {"skipped"} and "(test)" in rec["fp8_prequantized_triton"]["skipped"]
    assert rec["fp8_prequantized"]["check"] == "ok" and "(test)" in rec["fp8_prequantized"]["fallbacks"][0]


def test_quant_linear_speedups_need_a_checked_baseline(monkeypatch):
    from benchmarks import bench_quant_linear

    real = bench_quant_linear._producer_variants

    def broken_bf16(*args):
        variants = real(*args)
        build = variants["bf16_with_producer"]

        def wrong():
            fn, weight_bytes, (expected, tolerance) = build()
            return (lambda: fn() * 2), weight_bytes, (expected, tolerance)
        variants["bf16_with_producer"] = wrong
        return variants

    monkeypatch.setattr(bench_quant_linear, "_producer_variants", broken_bf16)
    rec = bench_quant_linear._bench_layer(bench_quant_linear.TINY, torch.device("cpu"), 64, 64, "adaln", None, None)
    assert rec["bf16_with_producer"]["check"] == "FAILED" and rec["fp8_fused_producer"]["check"] == "ok"
    assert "speedup_vs_bf16_with_producer" not in rec["fp8_fused_producer"]


def test_compare_gates_dcgen_ratios():
    def report(vs_gemm, speedup):
        return {"patch_embed": {"cases": {"s": {"embed": {"fwd": {"variants": {"dcgen_triton": {
                    "ms": 1.0, "vs_gemm": vs_gemm, "check": "ok"}}}}}}},
                "quant_linear": {"layers": {"M=1,K=1,N=1": {"fp8_with_quantize": {
                    "ms": 1.0, "speedup_vs_bf16": speedup, "check": "ok"}}}}}

    result = compare.compare(report(1.0, 1.5), report(0.8, 1.5), 0.10)
    assert result["regressions"] == ["patch_embed/cases/s/embed/fwd/variants/dcgen_triton/vs_gemm"]
    result = compare.compare(report(1.0, 1.5), report(1.0, 1.2), 0.10)
    assert result["regressions"] == ["quant_linear/layers/M=1,K=1,N=1/fp8_with_quantize/speedup_vs_bf16"]


def test_compare_does_not_gate_e2e_ratios_of_host_paced_steps():
    def report(fast_speedup, slow_speedup, fast_ms=100.0):
        steps = {"DC-Gen-FLUX/1K": {"stock": {"ms": fast_ms}, "patched": {"ms": fast_ms / fast_speedup,
                                                                          "speedup_vs_stock": fast_speedup}},
                 "FLUX.1-Krea/1K": {"stock": {"ms": 400.0}, "patched": {"ms": 400.0 / slow_speedup,
                                                                        "speedup_vs_stock": slow_speedup}}}
        speedups = {"DC-Gen-FLUX/1K": {"base": "FLUX.1-Krea", "speedup_vs_base": {"stock": 4.0 * fast_speedup}}}
        return {"e2e": {"steps": steps}, "e2e_summary": {"speedups": speedups}}

    result = compare.compare(report(1.2, 1.3), report(0.6, 1.3), 0.10)  # eager 100 ms steps: host-paced
    assert result["regressions"] == []
    paced = {r["metric"] for r in result["rows"] if r["host_bound"]}
    assert paced == {"e2e/steps/DC-Gen-FLUX/1K/patched/speedup_vs_stock",
                     "e2e_summary/speedups/DC-Gen-FLUX/1K/speedup_vs_base/stock"}
    result = compare.compare(report(1.2, 1.3), report(1.2, 1.0), 0.10)  # a 400 ms step stays gated
    assert result["regressions"] == ["e2e/steps/FLUX.1-Krea/1K/patched/speedup_vs_stock"]
    result = compare.compare(report(1.2, 1.3, 300.0), report(0.6, 1.3, 300.0), 0.10)
    assert "e2e/steps/DC-Gen-FLUX/1K/patched/speedup_vs_stock" in result["regressions"]

    def compiled(speedup, stock_ms):
        return {"e2e_compile": {"steps": {"DC-Gen-FLUX/4K": {"torch_compile": {
            "ms": stock_ms / speedup, "stock_ms": stock_ms, "speedup_vs_stock": speedup, "check": "ok"}}}}}

    def quantized(speedup, stock_ms):
        return {"quant_linear": {"flux_step": {"stock": {"ms": stock_ms}, "patched_fp8_graph": {
            "ms": stock_ms / speedup, "speedup_vs_stock": speedup, "check": "ok"}}}}

    assert compare.compare(quantized(2.0, 180.0), quantized(1.5, 180.0), 0.10)["regressions"] == []
    assert compare.compare(quantized(2.0, 400.0), quantized(1.5, 400.0), 0.10)["regressions"] == [
        "quant_linear/flux_step/patched_fp8_graph/speedup_vs_stock"]

    path = "e2e_compile/steps/DC-Gen-FLUX/4K/torch_compile/speedup_vs_stock"
    for stock_ms in (180.0, 900.0):  # torch.compile of stock is a baseline: shown, never gated
        result = compare.compare(compiled(1.4, stock_ms), compiled(1.0, stock_ms), 0.10)
        assert result["regressions"] == [] and {r["metric"]: r["tracked"] for r in result["rows"]}[path] is False


def test_compare_shows_but_does_not_gate_the_baselines_own_ratios():
    def report(stock_frac, ours_frac):
        variants = {"stock": {"frac_of_copy": stock_frac, "speedup_vs_stock": 1.0},
                    "dcgen": {"frac_of_copy": ours_frac, "speedup_vs_stock": ours_frac / stock_frac}}
        return {"sana_ops": {"ops": {"op": {"sizes": {"N=1": {"variants": variants}}}}}}

    result = compare.compare(report(0.5, 0.8), report(0.3, 0.8), 0.10)  # stock slower, ours unchanged
    rows = {r["metric"]: r for r in result["rows"]}
    assert not rows["sana_ops/ops/op/sizes/N=1/variants/stock/frac_of_copy"]["tracked"]
    assert rows["sana_ops/ops/op/sizes/N=1/variants/dcgen/frac_of_copy"]["tracked"]
    assert result["regressions"] == []
    result = compare.compare(report(0.5, 0.8), report(0.5, 0.6), 0.10)
    assert result["regressions"] == ["sana_ops/ops/op/sizes/N=1/variants/dcgen/frac_of_copy",
                                     "sana_ops/ops/op/sizes/N=1/variants/dcgen/speedup_vs_stock"]


# ------------------------------------------------------------------------------------------------ e2e text encoders
def _tiny_text_encoder_folder(root: Path, family: str) -> Path:
    """A local diffusers-style pipeline folder with tiny random-init encoders of the family's classes and word-level
    tokenizers built in code (no download), in the sub-folders bench_e2e.TEXT_ENCODERS names."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")

    words = ["<pad>", "<unk>", "<s>", "</s>"] + bench_e2e.PROMPT.replace(",", " ").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    configs = {"CLIPTextModel": transformers.CLIPTextConfig(
                   vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=77, projection_dim=16, pad_token_id=0,
                   bos_token_id=2, eos_token_id=3),
               "T5EncoderModel": transformers.T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32,
                                                       num_layers=1, num_heads=2),
               "Gemma2Model": transformers.Gemma2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        num_key_value_heads=1, head_dim=8)}
    folder = root / family
    for enc in bench_e2e.TEXT_ENCODERS[family]:
        word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
        word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>",
                                             bos_token="<s>", eos_token="</s>").save_pretrained(folder / enc.tokenizer)
        getattr(transformers, enc.cls)(configs[enc.cls]).save_pretrained(folder / enc.folder)
    return folder


def test_tiny_e2e_text_encoders_excluded_by_default(tiny_e2e):
    _, _, report = tiny_e2e
    summary = report["e2e_summary"]
    assert summary["text_encoders"] == {"flux": "excluded", "sana": "excluded"}
    for key, rec in summary["images"].items():
        assert rec["text_encoders"] == "excluded", key
        assert all("text_encoder_ms" not in v for v in rec["variants"].values()), key
    md = Path(summary["markdown"]).read_text()
    assert "| text enc ms |" in md and "| excl. |" in md
    assert "Text encoders (flux): excluded; include them with --text-encoders flux=DIR." in md


def test_tiny_e2e_with_text_encoders_adds_their_measured_time(tmp_path):
    flux_dir = _tiny_text_encoder_folder(tmp_path, "flux")
    sana_dir = _tiny_text_encoder_folder(tmp_path, "sana")
    out = tmp_path / "results.json"
    rc = run.main(["--tiny", "--sections", "e2e", "--quick", "--out", str(out),
                   "--text-encoders", f"flux={flux_dir}", "--text-encoders", f"sana={sana_dir}"])
    report = json.loads(out.read_text())
    assert rc == 0, report["problems"]
    measured = report["e2e"]["text_encoders"]
    assert {k: v["class"] for k, v in measured["flux"]["encoders"].items()} == {
        "text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
    assert measured["flux"]["encoders"]["text_encoder"]["max_length"] == 77
    assert measured["flux"]["encoders"]["text_encoder_2"]["max_length"] == report["e2e"]["config"]["text_tokens"]["flux"]
    assert measured["sana"]["encoders"]["text_encoder"]["class"] == "Gemma2Model"
    summary = report["e2e_summary"]
    md = Path(summary["markdown"]).read_text()
    for family in ("flux", "sana"):
        ms = measured[family]["ms"]
        assert ms > 0
        assert summary["text_encoders"][family] == f"included (measured {ms:.1f} ms)"
        assert f"Text encoders ({family}): included (measured {ms:.1f} ms) per image" in md
    pipelines = report["e2e"]["config"]["pipelines"]
    for key, rec in summary["images"].items():
        name = key.split("/")[0]
        ms = measured[pipelines[name]["family"]]["ms"]
        assert rec["variants"], key
        for variant, v in rec["variants"].items():
            assert v["text_encoder_ms"] == ms, (key, variant)
            assert v["s"] == pytest.approx((rec["steps"] * v["step_ms"] + v["decode_ms"] + ms) / 1e3), (key, variant)
    dcgen_row = next(line for line in md.splitlines() if line.startswith("| DC-Gen-FLUX | 1K |"))
    assert f"| {measured['flux']['ms']:.1f} |" in dcgen_row


def test_text_encoders_missing_files_are_a_clear_error(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        run.main(["--tiny", "--sections", "e2e", "--text-encoders", f"flux={tmp_path / 'nowhere'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "text encoders for flux" in err and "text_encoder_2/ (T5EncoderModel) + tokenizer_2/" in err
    # A folder with SANA's components lacks FLUX's second encoder: each missing piece is named.
    sana_dir = _tiny_text_encoder_folder(tmp_path, "sana")
    with pytest.raises(FileNotFoundError, match=r"missing text_encoder_2/config.json \(T5EncoderModel\); "
                                                r"text_encoder_2/ weights .*; tokenizer_2/"):
        bench_e2e.check_text_encoder_dir("flux", sana_dir)
    with pytest.raises(FileNotFoundError, match="text encoders for flux"):
        bench_e2e.run(torch.device("cpu"), tiny=True, text_encoders={"flux": sana_dir})
    for bad in ("flux", "clip=/x", "flux="):
        with pytest.raises(ValueError, match="--text-encoders: expected FAMILY=DIR"):
            bench_e2e.parse_text_encoder_dirs([bad])
    assert bench_e2e.parse_text_encoder_dirs([f"sana={sana_dir}"]) == {"sana": str(sana_dir)}
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed: said before any work starts
    with pytest.raises(RuntimeError, match="needs the transformers package"):
        bench_e2e.parse_text_encoder_dirs([f"sana={sana_dir}"])


@pytest.mark.parametrize("argv, match", [(["--variants", "stock,int8"], "unknown int8"),
                                         (["--steps", "0"], "--steps must be >= 1"),
                                         (["--image-tokens", "4000"], "positive square token counts"),
                                         (["--image-tokens", "1k"], "comma-separated integers"),
                                         (["--model", "sana", "--sizes", "c32_64x64"], "unknown c32_64x64"),
                                         (["--model", "sd3"], "invalid choice")])
def test_profile_step_rejects_bad_arguments(argv, match, capsys):
    from benchmarks import profile_step

    with pytest.raises(SystemExit):
        profile_step.main(argv)
    assert match in capsys.readouterr().err


def test_profile_step_tiny_sana_runs_each_variant():
    from benchmarks import profile_step

    result = profile_step.run(torch.device("cpu"), tiny=True, variants=("stock", "patched"), steps=1, top=3,
                              model_name="sana", sizes=("c128_64x64",))
    assert result["config"]["model"] == "SANA tiny"
    for key in ("c128_64x64/stock", "c128_64x64/patched"):
        rec = result["profiles"][key]
        assert "error" not in rec and rec["kernel_ms_per_step"] > 0 and len(rec["top_kernels_ms"]) == 3, rec


def test_sana_step_kernel_profiles_leave_the_model_unpatched(monkeypatch):
    import dcgen_kernels

    monkeypatch.setenv("DCGEN_BACKEND", "reference")  # the harness: interpreted Triton takes ~13 s per patched step
    from benchmarks import bench_sana_step

    cfg = bench_sana_step.TINY
    model = bench_sana_step.build_model(cfg, cfg.shapes[0], torch.device("cpu"))
    x = bench_sana_step.make_inputs(cfg, cfg.shapes[0], torch.device("cpu"))
    with torch.no_grad():
        profiles = bench_sana_step.kernel_profiles(model, lambda: model(**x)[0], torch.device("cpu"))
    assert set(profiles) == {"stock", "patched"}
    assert all(p["kernel_ms_per_step"] > 0 and len(p["top_kernels_ms"]) == 8 for p in profiles.values())
    assert not dcgen_kernels.is_patched(model)
    # The patched step projects Q/K/V with one GEMM of 3 x the width (tiny SANA: 2 heads x 32), whose second
    # operand is the (width, 3 * width) transposed weight.
    width = cfg.model["num_attention_heads"] * cfg.model["attention_head_dim"]
    shapes = {shape for _, shape, _, _ in profiles["patched"]["gemm_by_shape"]}
    assert any(f"[{width}, {3 * width}]]" in shape for shape in shapes), shapes
    assert all(ms > 0 and calls >= 1 for p in profiles.values() for _, _, ms, calls in p["gemm_by_shape"])


def tiny_sana_step():
    """(model, step) of bench_sana_step's tiny CPU configuration: step() runs the model on fixed inputs."""
    from benchmarks import bench_sana_step

    cfg = bench_sana_step.TINY
    model = bench_sana_step.build_model(cfg, cfg.shapes[0], torch.device("cpu"))
    x = bench_sana_step.make_inputs(cfg, cfg.shapes[0], torch.device("cpu"))
    return model, lambda: model(**x)[0]


def test_stock_graph_row_checks_stock_and_restores_the_forward():
    from benchmarks.common import measure_stock_graph
    from dcgen_kernels.patching import cuda_graph

    model, step = tiny_sana_step()
    with torch.no_grad():
        stock_out = step()
        rec = measure_stock_graph(model, step, torch.device("cpu"), 0, 1, stock_out, 1e-5, 2.0)
        assert rec["check"] == "ok" and rec["fraction_of_stock"] == pytest.approx(rec["ms"] / 2.0), rec
        assert any("without CUDA graphs" in m for m in rec["fallbacks"]), rec  # on the CPU it runs eagerly
        assert cuda_graph.graphed(model) is None and "forward" not in model.__dict__
        wrong = measure_stock_graph(model, step, torch.device("cpu"), 0, 1, stock_out + 1, 1e-5, 2.0)
    assert wrong["check"] == "FAILED", wrong
    # the table's "x stock" of the row (a fixed time: the table prints two decimals, a measured one would round)
    timed = {**rec, "ms": 0.8, "fraction_of_stock": 0.4}
    row = run.sana_step_table({"sana_step": {"sizes": {"s": {"stock": {"ms": 2.0}, "stock_graph": timed}}}})[-1]
    assert row.split()[:2] == ["s", "stock_graph"] and float(row.split()[3]) == pytest.approx(2.5)


def test_tiny_host_overhead_times_each_route_of_each_op(tmp_path):
    out = tmp_path / "host.json"
    rc = run.main(["--tiny", "--sections", "host_overhead", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["problems"]
    ops = report["host_overhead"]["ops"]
    assert set(ops) == {"ada_layer_norm_modulate", "gated_residual", "gated_residual_ada_layer_norm_modulate",
                        "fp8_linear", "sana_linear_attention"}
    for rec in ops.values():
        assert all(rec[key] > 0 for key in ("public_us", "dispatcher_us", "impl_us")), rec
        assert rec["saved_by_call_op_us"] == pytest.approx(rec["dispatcher_us"] - rec["impl_us"])
    assert "host_overhead" in run.table(report)


def test_ncu_targets_run_on_cpu_through_the_public_ops(monkeypatch):
    import importlib

    from benchmarks import ncu_targets

    called = []
    patch_embed_module = importlib.import_module("dcgen_kernels.ops.patch_embed")
    launch = patch_embed_module._launch_embed_triton
    monkeypatch.setattr(patch_embed_module, "_launch_embed_triton", lambda *a: called.append("embed") or launch(*a))
    fp8_module = importlib.import_module("dcgen_kernels.ops.fp8_linear")
    quantize = fp8_module._launch_quantize
    monkeypatch.setattr(fp8_module, "_launch_quantize",
                        lambda x, p, gelu, *a: called.append(f"quantize gelu={gelu}") or quantize(x, p, gelu, *a))
    ncu_targets.run(torch.device("cpu"))
    # warm-up pass and measured pass, through the public ops
    assert called == ["embed", "quantize gelu=True"] * 2


def test_profile_host_tiny_profiles_stock_then_patched(monkeypatch):
    from benchmarks import profile_host

    monkeypatch.setenv("DCGEN_BACKEND", "reference")  # the harness: interpreted Triton takes ~13 s per patched step

    result = profile_host.run(torch.device("cpu"), tiny=True, size="c8_8x8", steps=1, top=5)
    assert result["stock"]["ms_per_step"] > 0 and result["patched"]["calls_per_step"] > 0
    assert "dcgen_kernels" not in result["stock"]["listing"] and "dcgen_kernels" in result["patched"]["listing"]
    with pytest.raises(ValueError, match="--size must be one of"):
        profile_host.run(torch.device("cpu"), tiny=True, size="c32_128x128", steps=1, top=5)


def test_sustained_step_tiny_times_each_variant_alone_and_back_to_back(monkeypatch):
    from benchmarks import sustained_step

    monkeypatch.setenv("DCGEN_BACKEND", "reference")  # the harness: interpreted Triton takes ~13 s per patched step

    result = sustained_step.run(torch.device("cpu"), tiny=True, size="c8_8x8", steps=1, pause_s=0.0)
    assert list(result["variants"]) == ["stock", "patched", "patched_graph"]
    for rec in result["variants"].values():
        assert len(rec["per_step_ms"]) == 1 and all(ms > 0 for ms in rec["per_step_ms"]) and rec["alone_ms"] > 0
        assert rec["clocks_loop"] == {} and "_windows" not in rec  # no nvidia-smi on a CPU run
    with pytest.raises(ValueError, match="--size must be one of"):
        sustained_step.run(torch.device("cpu"), tiny=True, size="c32_128x128", steps=1)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "two"]])
def test_sustained_step_rejects_bad_arguments(argv, capsys):
    from benchmarks import sustained_step

    with pytest.raises(SystemExit):
        sustained_step.main(argv)
    assert "--steps" in capsys.readouterr().err


def test_sustained_step_clock_sampler_summarises_a_window():
    import datetime
    import types

    from benchmarks import sustained_step

    sampler = sustained_step.ClockSampler(enabled=False)
    sampler.fields = sustained_step._FIELDS
    lines = ["2026/11/27 22:40:01.000, 1980, 650.5, 0x0000000000000000",
             "2026/11/27 22:40:01.020, 1755, 699.8, 0x0000000000000004",
             "2026/11/27 22:40:01.040, 1830, 700.1, 0x0000000000000004",
             "garbled line", "2026/11/27 22:40:01.060, [N/A], 1.0, 0x0"]
    sampler.process = types.SimpleNamespace(terminate=lambda: None, communicate=lambda timeout: ("\n".join(lines), ""))
    sampler.stop()
    assert len(sampler.rows) == 3  # the garbled and the [N/A] sample are dropped
    t = lambda ms: datetime.datetime(2026, 11, 27, 22, 40, 1, ms * 1000)  # noqa: E731
    summary = sampler.summary(t(10), t(50))
    assert summary == {"samples": 2, "sm_mhz_median": 1792.5, "sm_mhz_min": 1755.0, "sm_mhz_max": 1830.0,
                       "power_w_median": 699.95, "power_w_max": 700.1, "reasons": ["0x0000000000000004"]}
    assert sampler.summary(t(100), t(200)) == {}


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--top", "0"], ["--steps", "two"]])
def test_profile_host_rejects_bad_arguments(argv, capsys):
    from benchmarks import profile_host

    with pytest.raises(SystemExit):
        profile_host.main(argv)
    assert "--steps" in capsys.readouterr().err


def test_compare_does_not_gate_step_ratios_the_profile_found_host_paced():
    def report(eager, graph, stock_busy=0.97, patched_busy=0.95):
        size = {"stock": {"ms": 50.0}, "patched": {"ms": 50.0 / eager, "speedup_vs_stock": eager},
                "patched_graph": {"ms": 50.0 / graph, "speedup_vs_stock": graph},
                "kernel_profile": {"stock": {"gpu_busy": stock_busy}, "patched": {"gpu_busy": patched_busy}}}
        return {"sana_step": {"sizes": {"c128_64x64": size}}}

    eager = "sana_step/sizes/c128_64x64/patched/speedup_vs_stock"
    graph = "sana_step/sizes/c128_64x64/patched_graph/speedup_vs_stock"
    assert compare.compare(report(1.2, 2.0), report(0.9, 1.5), 0.10)["regressions"] == [eager, graph]
    # the patched step host-paced (in either run): its eager ratio is listed, not gated; the graph one stays gated
    result = compare.compare(report(1.2, 2.0), report(0.9, 1.5, patched_busy=0.4), 0.10)
    assert result["regressions"] == [graph]
    assert {r["metric"] for r in result["rows"] if r["host_bound"]} == {eager}
    assert compare.compare(report(1.2, 2.0, patched_busy=0.4), report(0.9, 1.5), 0.10)["regressions"] == [graph]
    # a host-paced stock step makes every ratio of that size incomparable
    assert compare.compare(report(1.2, 2.0), report(0.9, 1.5, stock_busy=0.6), 0.10)["regressions"] == []
