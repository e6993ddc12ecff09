"""The regression gate (benchmarks/compare.py) and the shared benchmark helpers (benchmarks/common.py) on cases a
mutation review found untested: which e2e ratios count as host-paced, failed checks of enclosing records, the CLI's
threshold and input handling, and the helpers' numbers (rel-L2, checks, tolerances, speed-ups). CPU only, no timing."""

import copy
import json
import math

import pytest
import torch

from benchmarks import common, compare
from tests.test_benchmarks import REPO, _get, _set, _write, h100, tiny_sana_step  # noqa: F401 - h100 is a fixture

DCGEN_RESULT = REPO / "benchmarks" / "results" / "baseline-nvidia-h100-80gb-hbm3-dcgen.json"


# ------------------------------------------------------------------------------------------------ compare: metrics
def test_compare_metrics_skip_booleans_and_nested_configs():
    report = {"op": {"dcgen": {"ms": 1.0, "speedup_vs_stock": True, "check": "ok"},
                     "speedup_vs_base": {"stock": 2.0, "fused": False}}}
    assert compare.metrics(report) == {"op/dcgen/ms": (1.0, False, False),
                                       "op/speedup_vs_base/stock": (2.0, True, False)}
    # a section's config repeats the run's ceilings (copy_GBps, gemm_tflops): not metrics of their own
    dcgen = json.loads(DCGEN_RESULT.read_text())
    assert "copy_GBps" in json.dumps(dcgen["sana_ops"]["config"])
    assert not [p for p in compare.metrics(dcgen) if "/config/" in p]


def test_compare_failed_check_of_an_enclosing_record_fails_its_nested_ratios():
    def report(check):
        return {"op": {"dcgen": {"ms": 1.0, "check": check, "per_size": {"N=1": {"speedup_vs_stock": 1.5}}}}}

    path = "op/dcgen/per_size/N=1/speedup_vs_stock"
    assert compare.metrics(report("FAILED"))[path] == (1.5, True, True)
    assert compare.compare(report("ok"), report("FAILED"), 0.10)["regressions"] == [path]
    assert compare.compare(report("ok"), report("ok"), 0.10)["regressions"] == []


# ------------------------------------------------------------------------------------------------ compare: host-paced
def _sana_step(eager, graph, profile):
    size = {"stock": {"ms": 50.0}, "patched": {"ms": 50.0 / eager, "speedup_vs_stock": eager},
            "patched_graph": {"ms": 50.0 / graph, "speedup_vs_stock": graph}}
    if profile is not None:
        size["kernel_profile"] = profile
    return {"sana_step": {"sizes": {"c128_64x64": size}}}


@pytest.mark.parametrize("profile", [
    None,  # no kernel profile
    {"error": "RuntimeError: CUPTI unavailable", "traceback": ""},  # the profiler raised (kernel_profiles' record)
    {"stock": {"kernel_ms_per_step": 20.0}, "patched": {"kernel_ms_per_step": 10.0}},  # no wall time, no gpu_busy
])
def test_compare_sana_step_without_a_busy_fraction_stays_gated(profile):
    # nothing says the step was host-paced: its ratios stay gated
    result = compare.compare(_sana_step(1.2, 2.0, profile), _sana_step(0.9, 1.5, profile), 0.10)
    assert result["regressions"] == ["sana_step/sizes/c128_64x64/patched/speedup_vs_stock",
                                     "sana_step/sizes/c128_64x64/patched_graph/speedup_vs_stock"]
    assert not any(r["host_bound"] for r in result["rows"])


def _e2e(steps, compile_stock_ms=None, speedups=None, images=None):
    report = {"e2e": {"steps": steps}}
    if compile_stock_ms is not None:
        report["e2e_compile"] = {"steps": {key: {"torch_compile": {
            "ms": compile_stock_ms / 1.2, "stock_ms": compile_stock_ms, "speedup_vs_stock": 1.2, "check": "ok"}}
            for key in steps}}
    if speedups is not None or images is not None:
        report["e2e_summary"] = {"speedups": speedups or {}, "images": images or {}}
    return report


def _step(stock_ms, **variants):
    """An e2e step record: stock at stock_ms, each variant=(ms) with its speed-up over stock."""
    rec = {"stock": {"ms": stock_ms}}
    for name, ms in variants.items():
        rec[name] = {"ms": ms, "speedup_vs_stock": stock_ms / ms, "check": "ok"}
    return rec


def test_compare_fast_graph_replay_does_not_make_a_slow_eager_step_host_paced():
    # eager steps of 400 / 300 ms are not launch-bound; the 100 ms graph replay is not an eager step
    old = _e2e({"FLUX.1-Krea/4K": _step(400.0, patched=300.0, patched_graph=100.0)})
    new = _e2e({"FLUX.1-Krea/4K": _step(400.0, patched=300.0, patched_graph=200.0)})
    result = compare.compare(old, new, 0.10)
    assert result["regressions"] == ["e2e/steps/FLUX.1-Krea/4K/patched_graph/speedup_vs_stock"]
    assert not any(r["host_bound"] for r in result["rows"])


def test_compare_one_fast_eager_variant_makes_the_steps_ratios_host_paced():
    # stock 300 ms is gated on its own, but the patched eager step of 200 ms is host-paced: its ratio is not gated
    old = _e2e({"DC-Gen-FLUX/1K": _step(300.0, patched=200.0)})
    new = _e2e({"DC-Gen-FLUX/1K": _step(300.0, patched=280.0)})
    result = compare.compare(old, new, 0.10)
    assert result["regressions"] == []
    assert {r["metric"] for r in result["rows"] if r["host_bound"]} == {
        "e2e/steps/DC-Gen-FLUX/1K/patched/speedup_vs_stock"}


def test_compare_e2e_compile_stock_step_decides_host_paced_too():
    slow = {"DC-Gen-FLUX/4K": _step(400.0, patched=300.0)}
    slower = {"DC-Gen-FLUX/4K": _step(400.0, patched=390.0)}
    path = "e2e/steps/DC-Gen-FLUX/4K/patched/speedup_vs_stock"
    # a slow compiled section's stock step does not make the eager ratio host-paced
    assert compare.compare(_e2e(slow, 900.0), _e2e(slower, 900.0), 0.10)["regressions"] == [path]
    # its stock step under HOST_BOUND_STEP_MS does (in either run)
    assert compare.compare(_e2e(slow, 180.0), _e2e(slower, 900.0), 0.10)["regressions"] == []
    assert compare.compare(_e2e(slow, 900.0), _e2e(slower, 180.0), 0.10)["regressions"] == []


def test_compare_per_image_ratios_follow_their_steps_host_pacing():
    def report(fast_ratio, slow_ratio):
        steps = {"DC-Gen-FLUX/1K": _step(100.0, patched=80.0), "FLUX.1-Krea/4K": _step(900.0, patched=600.0)}
        images = {"DC-Gen-FLUX/1K": {"variants": {"patched": {"s": 1.0, "speedup_vs_stock": fast_ratio}}},
                  "FLUX.1-Krea/4K": {"variants": {"patched": {"s": 9.0, "speedup_vs_stock": slow_ratio}}}}
        return _e2e(steps, images=images)

    fast = "e2e_summary/images/DC-Gen-FLUX/1K/variants/patched/speedup_vs_stock"
    slow = "e2e_summary/images/FLUX.1-Krea/4K/variants/patched/speedup_vs_stock"
    result = compare.compare(report(1.3, 1.5), report(0.9, 1.0), 0.10)
    assert result["regressions"] == [slow]
    assert {r["metric"] for r in result["rows"] if r["host_bound"]} == {
        fast, "e2e/steps/DC-Gen-FLUX/1K/patched/speedup_vs_stock"}


def test_compare_speedup_vs_base_is_host_paced_when_the_base_step_is():
    # the DC-Gen step is slow enough to be gated, but its base model's step (the ratio's numerator) is host-paced
    def report(ratio):
        steps = {"DC-Gen-SANA/1K": _step(300.0, patched=260.0), "SANA-1.6B/1K": _step(120.0, patched=100.0)}
        speedups = {"DC-Gen-SANA/1K": {"base": "SANA-1.6B", "speedup_vs_base": {"stock": ratio}}}
        return _e2e(steps, speedups=speedups)

    result = compare.compare(report(2.0), report(1.0), 0.10)
    assert result["regressions"] == []
    assert "e2e_summary/speedups/DC-Gen-SANA/1K/speedup_vs_base/stock" in {
        r["metric"] for r in result["rows"] if r["host_bound"]}


def test_compare_failed_check_on_a_host_paced_path_is_a_regression():
    # host pacing exempts a ratio from the drop test only: a wrong result is wrong however the step was paced
    def e2e(check):
        step = _step(100.0, patched=80.0)
        step["patched"]["check"] = check
        return _e2e({"DC-Gen-FLUX/1K": step})

    path = "e2e/steps/DC-Gen-FLUX/1K/patched/speedup_vs_stock"
    result = compare.compare(e2e("ok"), e2e("FAILED"), 0.10)
    assert result["regressions"] == [path]
    row = next(r for r in result["rows"] if r["metric"] == path)
    assert row["tracked"] and not row["host_bound"] and row["status"] == "REGRESSION (check FAILED)"
    assert compare.compare(e2e("ok"), e2e("ok"), 0.10)["regressions"] == []
    # the same for a sana_step size the profile found host-paced
    busy = {"stock": {"gpu_busy": 0.3}, "patched": {"gpu_busy": 0.3}}
    old, new = _sana_step(1.2, 2.0, busy), _sana_step(1.2, 2.0, busy)
    new["sana_step"]["sizes"]["c128_64x64"]["patched_graph"]["check"] = "FAILED"
    assert compare.compare(old, new, 0.10)["regressions"] == [
        "sana_step/sizes/c128_64x64/patched_graph/speedup_vs_stock"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_compare_non_finite_new_ratio_is_a_regression(value):
    def report(ratio, stock_ms=400.0):
        return _e2e({"FLUX.1-Krea/4K": {"stock": {"ms": stock_ms},
                                        "patched": {"ms": 300.0, "speedup_vs_stock": ratio, "check": "ok"}}})

    path = "e2e/steps/FLUX.1-Krea/4K/patched/speedup_vs_stock"
    for stock_ms in (400.0, 100.0):  # gated and host-paced
        result = compare.compare(report(1.3, stock_ms), report(value, stock_ms), 0.10)
        assert result["regressions"] == [path]
        row = next(r for r in result["rows"] if r["metric"] == path)
        assert row["status"] == "REGRESSION (not finite)" and row["change"] is None
    # a non-finite baseline is no reference: shown, not gated
    result = compare.compare(report(value), report(1.3), 0.10)
    assert result["regressions"] == []
    row = next(r for r in result["rows"] if r["metric"] == path)
    assert not row["tracked"] and row["status"] == "baseline not finite: not gated"
    assert "verdict: OK" in compare.render(result, report(value), report(1.3), 0.10)


# ------------------------------------------------------------------------------------------------ compare: verdict
def test_compare_drop_of_exactly_the_threshold_is_not_a_regression():
    def report(ratio):
        return {"op": {"dcgen": {"ms": 1.0, "speedup_vs_stock": ratio, "check": "ok"}}}

    assert compare.compare(report(2.0), report(1.5), 0.25)["regressions"] == []  # exactly -25%: not "more than"
    assert compare.compare(report(2.0), report(1.49), 0.25)["regressions"] == ["op/dcgen/speedup_vs_stock"]


def test_compare_shows_the_eager_fp8_step_fraction_of_stock_without_gating_it():
    def report(fraction):
        return {"quant_linear": {"flux_step": {"stock": {"ms": 180.0},
                                               "patched_fp8": {"ms": 180.0 * fraction, "fraction_of_stock": fraction}}}}

    result = compare.compare(report(0.6), report(0.9), 0.10)  # 50% slower relative to stock: shown, not gated
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["quant_linear/flux_step/patched_fp8/fraction_of_stock"]["change"] == pytest.approx(0.5)
    assert not rows["quant_linear/flux_step/patched_fp8/fraction_of_stock"]["tracked"] and not result["regressions"]


def test_compare_lists_tracked_metrics_present_in_one_run_only():
    old = {"a": {"dcgen": {"ms": 1.0, "speedup_vs_stock": 1.5}}, "both": {"dcgen": {"speedup_vs_stock": 1.1}}}
    new = {"b": {"dcgen": {"ms": 1.0, "speedup_vs_stock": 1.5}}, "both": {"dcgen": {"speedup_vs_stock": 1.1}}}
    result = compare.compare(old, new, 0.10)
    assert result["only_old"] == ["a/dcgen/speedup_vs_stock"]  # the absolute ms is not listed
    assert result["only_new"] == ["b/dcgen/speedup_vs_stock"]
    assert result["regressions"] == []


def test_compare_cli_default_threshold_is_ten_percent(h100, tmp_path):
    path = ("flux_step", "sizes", "4096", "patched", "speedup_vs_stock")
    old = _write(tmp_path, "old.json", h100)
    for factor, expected in ((0.85, 1), (0.92, 0)):
        new = copy.deepcopy(h100)
        _set(new, path, _get(h100, path) * factor)
        assert compare.main([old, _write(tmp_path, "new.json", new)]) == expected, factor


@pytest.mark.parametrize("threshold", ["0", "1", "-0.1", "10"])
def test_compare_cli_rejects_a_threshold_outside_0_1(h100, tmp_path, capsys, threshold):
    old = _write(tmp_path, "old.json", h100)
    with pytest.raises(SystemExit) as exc:
        compare.main([old, old, "--threshold", threshold])
    assert exc.value.code == 2 and "--threshold must be in (0, 1)" in capsys.readouterr().err


def test_compare_cli_malformed_json_exits_2(h100, tmp_path, capsys):
    bad = tmp_path / "truncated.json"
    bad.write_text(json.dumps(h100)[:100])
    assert compare.main([_write(tmp_path, "old.json", h100), str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_compare_render_counts_tracked_metrics(h100):
    result = compare.compare(h100, h100, 0.10)
    text = compare.render(result, h100, h100, 0.10)
    tracked = sum(r["tracked"] for r in result["rows"])
    assert 0 < tracked < len(result["rows"])
    assert f"({tracked} compared)" in text.splitlines()[-1]


@pytest.mark.parametrize("content", ["[1, 2]", "{}", '{"schema": "dcgen_kernels-benchmarks/1", "environment": []}',
                                     '{"environment": {}, "config": {}, "profiles": []}'])
def test_compare_refuses_json_that_is_no_results_file(tmp_path, capsys, h100, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert compare.main([_write(tmp_path, "old.json", h100), str(bad)]) == 2  # not 1, the regression status
    assert "is not a benchmarks/run.py results JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ common
def test_rel_l2_is_relative_to_the_expected_tensor():
    expected = torch.tensor([3.0, 4.0])  # norm 5
    assert common.rel_l2(torch.tensor([3.0, 4.0]), expected) == 0.0
    assert common.rel_l2(torch.tensor([6.0, 8.0]), expected) == pytest.approx(1.0)  # |diff| 5 over |expected| 5
    assert common.rel_l2(torch.tensor([0.0, 4.0]), expected) == pytest.approx(3.0 / 5.0)


def test_check_record_passes_at_the_tolerance_and_fails_nan():
    assert common.check_record(0.01, 0.01) == {"rel_l2_vs_stock": 0.01, "tolerance": 0.01, "check": "ok"}
    assert common.check_record(0.0100001, 0.01)["check"] == "FAILED"
    assert common.check_record(math.nan, 0.01)["check"] == "FAILED"
    assert common.check_record(math.inf, 0.01)["check"] == "FAILED"


def test_error_record_names_the_exception_type():
    try:
        raise KeyError("stock")
    except KeyError as err:
        rec = common.error_record(err)
    assert rec["error"] == "KeyError: 'stock'" and "KeyError" in rec["traceback"]


def test_first_call_records_runtime_errors_and_every_warning():
    import warnings

    def warn_twice():
        for _ in range(2):
            warnings.warn("dcgen_kernels: op falls back", RuntimeWarning)
        return 7

    def fail(exc):
        def fn():
            warnings.warn("SDPA backend unavailable: reason", UserWarning)
            raise exc
        return fn

    assert common.first_call(warn_twice) == (7, None, ["dcgen_kernels: op falls back"] * 2)
    out, exc, messages = common.first_call(fail(RuntimeError("no kernel")))
    assert out is None and str(exc) == "no kernel" and messages == ["SDPA backend unavailable: reason"]
    with pytest.raises(ValueError):  # only RuntimeErrors are a variant's failure to run; others propagate
        common.first_call(fail(ValueError("bug")))
    assert common.dcgen_fallbacks(["dcgen_kernels: x", "torch: y"]) == ["dcgen_kernels: x"]


def test_reset_dcgen_warnings_forgets_the_shown_ones():
    from dcgen_kernels import _backend

    _backend._warned.add(("op", "cuda", "reason"))
    common.reset_dcgen_warnings()
    assert _backend._warned == set()


def test_load_op_and_accepts_backend(monkeypatch):
    import importlib

    ops = importlib.import_module("dcgen_kernels.ops")
    glumbconv_module = importlib.import_module("dcgen_kernels.ops.glumbconv")  # the attribute is the function

    assert common.load_op("glumbconv") == (ops.glumbconv, None)
    monkeypatch.delattr(ops, "glumbconv")  # not re-exported: taken from the submodule OP_MODULES names
    assert common.load_op("glumbconv") == (glumbconv_module.glumbconv, None)
    fn, why = common.load_op("no_such_op")
    assert fn is None and why == "dcgen_kernels.ops has no no_such_op"
    assert common.accepts_backend(lambda x, backend="auto": x) is True
    assert common.accepts_backend(lambda x: x) is False
    assert common.accepts_backend(object()) is True  # no Python signature: a library op, which takes backend=


def test_build_module_is_seeded_in_the_dtype_and_restores_the_default():
    factory = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))  # noqa: E731
    torch.manual_seed(123)
    first = common.build_module(factory, torch.device("cpu"), torch.bfloat16, seed=5)
    torch.rand(100)  # other draws in between do not change the weights
    second = common.build_module(factory, torch.device("cpu"), torch.bfloat16, seed=5)
    assert torch.get_default_dtype() == torch.float32
    assert first[0].weight.dtype == torch.bfloat16 and torch.equal(first[0].weight, second[0].weight)
    assert not first.training and not any(p.requires_grad for p in first.parameters())


def test_image_grid_and_flux_ids():
    assert common.image_grid(16) == 4
    with pytest.raises(ValueError, match="square grid"):
        common.image_grid(15)
    txt_ids, img_ids = common.flux_ids(3, 6 * 6, torch.device("cpu"))
    assert txt_ids.shape == (3, 3) and not txt_ids.any()
    # (0, row, col), row-major: token k is at row k // 6, column k % 6
    k = torch.arange(36)
    assert torch.equal(img_ids, torch.stack([torch.zeros(36), k // 6, k % 6], dim=-1).float())


def test_rope_tables_without_diffusers_keep_the_interleaved_layout(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers.models.transformers.transformer_flux", None)
    cos, sin, note = common.rope_tables(2, 4, (4, 6, 6), torch.device("cpu"))
    assert note.startswith("random angles") and cos.shape == sin.shape == (6, 16)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.allclose(cos**2 + sin**2, torch.ones(6, 16))


def test_checked_first_calls_checks_the_graph_replay_too(monkeypatch):
    """On a GPU with CUDA graphs the capturing call returns its eager warm-up: the replay is checked as well and the
    larger error decides. A stand-in for the graph wrapper lets this run without a GPU (no CUDA call is made)."""
    import types

    from dcgen_kernels.patching import cuda_graph

    stock = torch.ones(8)
    outputs = []
    fn = lambda: outputs.pop(0)  # noqa: E731
    captured = types.SimpleNamespace(graphs={"sig": object()})
    monkeypatch.setattr(cuda_graph, "graphed", lambda model: captured)
    cuda = torch.device("cuda")

    outputs[:] = [stock.clone(), stock * 1.5]  # first (eager) call right, the replay wrong
    rec, _ = common.checked_first_calls(None, fn, cuda, stock, 1e-3, cuda_graph=True)
    assert rec["check"] == "FAILED" and rec["rel_l2_vs_stock"] == pytest.approx(0.5)
    assert rec["rel_l2_first_call"] == 0.0 and rec["rel_l2_replay"] == pytest.approx(0.5)
    outputs[:] = [stock.clone(), stock * math.nan]  # a replay reading garbage: NaN fails however the errors are ordered
    rec, _ = common.checked_first_calls(None, fn, cuda, stock, 1e-3, cuda_graph=True)
    assert rec["check"] == "FAILED" and math.isnan(rec["rel_l2_vs_stock"])

    outputs[:] = [stock.clone()]
    rec, _ = common.checked_first_calls(None, fn, torch.device("cpu"), stock, 1e-3, cuda_graph=True)
    assert rec == common.check_record(0.0, 1e-3)  # on the CPU: one call, no per-call errors

    captured.graphs = {"sig": None}  # every signature ran eagerly: no graph to time
    outputs[:] = [stock.clone()]
    with pytest.raises(RuntimeError, match="no CUDA graph was captured"):
        common.checked_first_calls(None, fn, cuda, stock, 1e-3, cuda_graph=True)


@pytest.mark.parametrize("errors", [[0.0, math.nan], [math.nan, 0.0], [0.1, 0.3, math.nan, 0.2]])
def test_worst_error_is_nan_wherever_a_nan_is(errors):
    assert math.isnan(common.worst_error(errors)) and math.isnan(common.worst_error(iter(errors)))
    assert common.worst_error([0.1, 0.3, 0.2]) == 0.3


def test_op_checks_fail_a_nan_in_any_gradient_or_output():
    from benchmarks import bench_patch_embed, bench_sana_ops

    truth = (torch.ones(4), torch.ones(4))
    bad = (torch.ones(4), torch.full((4,), math.nan))  # the first tensor right, a later one NaN
    assert bench_patch_embed._check(bad, truth, 1e-2)["check"] == "FAILED"
    assert bench_patch_embed._check(truth, truth, 1e-2)["check"] == "ok"
    assert math.isnan(bench_sana_ops._worst_rel_l2(bad, truth))
    assert bench_sana_ops._worst_rel_l2(truth, truth) == 0.0


def test_op_checks_widen_with_stock_error_only_up_to_the_cap():
    from benchmarks import bench_sana_ops

    assert common.stock_error_tolerance(1e-2, 4e-3) == 1e-2
    assert common.stock_error_tolerance(1e-2, 1e-2) == pytest.approx(1.5e-2)
    assert common.stock_error_tolerance(1e-2, 0.5) == common.NOISE_FLOOR_MAX
    assert common.stock_error_tolerance(1e-2, math.nan) == 1e-2
    # a stock path far from fp32 does not let a variant as far off pass
    truth = torch.ones(64)
    case = bench_sana_ops.Case("k", stock=lambda: truth * 2, dcgen=lambda: truth * 1.5, reference=lambda: truth)
    rec = bench_sana_ops._bench_case(case, {"dcgen": None}, torch.device("cpu"), bench_sana_ops.TINY, None, {}, None)
    assert rec["variants"]["dcgen"]["tolerance"] == common.NOISE_FLOOR_MAX
    assert rec["variants"]["dcgen"]["check"] == "FAILED"


def test_checked_first_calls_raises_the_first_calls_error():
    def broken():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        common.checked_first_calls(None, broken, torch.device("cpu"), torch.ones(2), 1e-3, cuda_graph=False)


def test_record_patched_variants_speedups_tolerances_and_errors(monkeypatch):
    import dcgen_kernels

    calls = []

    def measure(model, fn, device, warmup, iters, stock_out, tolerance, backend, cuda_graph=False, quant=None):
        calls.append((backend, tolerance, cuda_graph, quant))
        if backend == "broken":
            raise RuntimeError("no kernel")
        return {"ms": 4.0 if quant else 2.0, "check": "ok"}

    monkeypatch.setattr(common, "measure_patched", measure)
    monkeypatch.setattr(dcgen_kernels, "is_patched", lambda model: model == "still patched")
    rec = {"stock": {"ms": 10.0}}
    variants = (("patched", "auto"), ("patched_graph", "auto", True), ("fp8", "auto", False, "fp8"),
                ("bad", "broken"))
    common.record_patched_variants(rec, "model", None, torch.device("cpu"), 0, 1, None, 0.02, variants)
    assert calls == [("auto", 0.02, False, None), ("auto", 0.02, True, None),
                     ("auto", common.QUANT_STEP_TOL["fp8"], False, "fp8"), ("broken", 0.02, False, None)]
    assert rec["patched"]["speedup_vs_stock"] == pytest.approx(5.0)  # stock ms over the variant's
    assert rec["fp8"]["speedup_vs_stock"] == pytest.approx(2.5)
    assert rec["bad"]["error"] == "RuntimeError: no kernel" and "speedup_vs_stock" not in rec["bad"]
    assert rec["unpatched_after"] is True
    rec = {"stock": {"ms": 1.0}}
    common.record_patched_variants(rec, "still patched", None, torch.device("cpu"), 0, 1, None, 0.02, ())
    assert rec["unpatched_after"] is False


def test_reference_noise_floor_checks_and_unpatches():
    import dcgen_kernels

    model, step = tiny_sana_step()
    with torch.no_grad():
        stock_out = step()
        floor = common.reference_noise_floor(model, step, stock_out)
        assert floor["check"] == "ok" and floor["rel_l2_reference_backend_vs_stock"] < common.NOISE_FLOOR_MAX
        assert not dcgen_kernels.is_patched(model)
        wrong = common.reference_noise_floor(model, step, stock_out * 1.5)
    assert wrong["check"] == "FAILED" and wrong["rel_l2_reference_backend_vs_stock"] > common.NOISE_FLOOR_MAX
    assert not dcgen_kernels.is_patched(model)


def test_noise_floor_tolerance_never_below_the_minimum():
    assert common.noise_floor_tolerance({"rel_l2_reference_backend_vs_stock": 0.001}, 0.02) == pytest.approx(0.02)
    assert common.noise_floor_tolerance({"rel_l2_reference_backend_vs_stock": 0.015}, 0.02) == pytest.approx(0.03)
    assert common.noise_floor_tolerance({"unavailable": "ValueError: nothing to patch"}, 0.02) == pytest.approx(0.02)


def test_measure_patched_records_the_patch_and_always_unpatches(monkeypatch):
    import types

    import dcgen_kernels
    from benchmarks import timing

    calls = []
    report = types.SimpleNamespace(replaced=["a", "b", "c"], skipped=["d"])
    monkeypatch.setattr(dcgen_kernels, "patch", lambda model, **kw: calls.append(("patch", kw)))
    monkeypatch.setattr(dcgen_kernels, "patch_report", lambda model: report)
    monkeypatch.setattr(dcgen_kernels, "unpatch", lambda model: calls.append(("unpatch",)))
    monkeypatch.setattr(timing, "time_ms", lambda fn, device, warmup, iters: 3.5)
    messages = ["dcgen_kernels: glumbconv falls back to triton", "torch: unrelated"]
    monkeypatch.setattr(common, "checked_first_calls",
                        lambda *a: ({"rel_l2_vs_stock": 0.0, "tolerance": 0.1, "check": "ok"}, messages))
    rec = common.measure_patched("model", None, torch.device("cpu"), 0, 1, None, 0.1, backend="triton")
    assert calls == [("patch", {"backend": "triton", "cuda_graph": False, "quant": None, "keep_original": False}),
                     ("unpatch",)]
    assert (rec["ms"], rec["modules_replaced"], rec["modules_skipped"]) == (3.5, 3, 1)
    assert rec["fallbacks"] == ["dcgen_kernels: glumbconv falls back to triton"] and rec["check"] == "ok"
    calls.clear()  # a quantized variant keeps the 16-bit linears, so that unpatch can restore them
    common.measure_patched("model", None, torch.device("cpu"), 0, 1, None, 0.1, quant="fp8", cuda_graph=True)
    assert calls[0] == ("patch", {"backend": "auto", "cuda_graph": True, "quant": "fp8", "keep_original": True})

    def wrong_output(*a):
        raise RuntimeError("no CUDA graph was captured")

    calls.clear()
    monkeypatch.setattr(common, "checked_first_calls", wrong_output)
    with pytest.raises(RuntimeError, match="no CUDA graph"):
        common.measure_patched("model", None, torch.device("cpu"), 0, 1, None, 0.1)
    assert calls[-1] == ("unpatch",)  # the model is left unpatched for the next variant

    def nothing_to_patch(model, **kw):
        raise ValueError("no supported module")

    monkeypatch.setattr(dcgen_kernels, "patch", nothing_to_patch)
    assert common.measure_patched("model", None, torch.device("cpu"), 0, 1, None, 0.1) == {
        "unavailable": "ValueError: no supported module"}


def test_progress_bar_prints_one_line_per_finished_item(capsys):
    bar = common.ProgressBar(2, "e2e")  # stderr is captured, not a terminal: plain lines
    for item in ("DC-Gen-FLUX/1K", "DC-Gen-FLUX/2K"):
        bar.describe(item)
        bar.update()
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["[e2e] 1/2 DC-Gen-FLUX/1K", "[e2e] 2/2 DC-Gen-FLUX/2K"]


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "results").glob("gpu_check-*.json")),
                         ids=lambda path: path.stem.rsplit("-", 2)[-2] + "-" + path.stem.rsplit("-", 1)[-1])
def test_committed_gpu_reports_render_with_todays_code(path):
    """The tables, targets and problems of real H100 reports (what a tiny CPU run never fills: measured times,
    autotuning, host profiles): what turns the next GPU run's numbers into its summary must not fail on them."""
    from benchmarks import run

    report = json.loads(path.read_text())
    source = report.get("projection", {}).get("efficiency", {}).get("source", {})
    if source and "from" not in source:  # run B's projection, written before each ceiling named its origin
        del report["projection"]
    targets = run.targets(report, tiny=False)
    assert [t for t in targets if t["target"] == "evaluate the targets"] == []
    assert all(isinstance(t["pass"], bool) and t["detail"] for t in targets)
    lines = run.table(report).splitlines()
    assert lines[0].startswith("== dcgen_kernels benchmarks: ") and len(lines) > 5
    run.problems(report)
