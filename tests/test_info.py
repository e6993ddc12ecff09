import os

import pytest
import torch

import dcgen_kernels


def test_info_reports_versions_gpu_extension_and_backends():
    report = dcgen_kernels.info()
    assert report["dcgen_kernels"] == dcgen_kernels.__version__
    assert report["torch"] and report["python"]
    assert set(report["backends"]) == {"reference", "triton", "cuda"}
    assert report["backends"]["reference"]["available"] is True
    for name in ("triton", "cuda"):
        entry = report["backends"][name]
        assert entry["available"] == (entry["reason"] is None)
    assert set(report["gpu"]) == {"name", "capability", "source"}
    ext = report["extension"]
    assert ext["built"] == (ext["error"] is None)
    if ext["built"]:
        assert ext["archs"], "a built _C must say which archs it holds"


@pytest.mark.skipif(os.environ.get("DCGEN_REQUIRE_C") != "1", reason="only where the build must have produced _C")
def test_extension_is_built_where_required():
    ext = dcgen_kernels.info()["extension"]
    assert ext["built"], ext["error"]
    from dcgen_kernels import _C

    assert _C.device_count() >= 0


def test_cuda_backend_declines_a_runtime_that_sees_no_gpu(monkeypatch):
    """_C links its own CUDA runtime: where that runtime finds no device (a driver older than it), the cuda backend
    says so and is not chosen, whatever torch sees."""
    import types

    from dcgen_kernels import _cext

    fake = types.SimpleNamespace(device_count=lambda: 0, cuda_runtime_version=lambda: 13000,
                                 compiled_archs=lambda: ["90a"])
    monkeypatch.setattr(_cext, "_C", fake)
    _cext._runtime_error.cache_clear()
    try:
        assert "runtime 13.0 finds no usable GPU" in _cext.cuda_device_error(torch.device("cuda"))
    finally:
        _cext._runtime_error.cache_clear()


def test_info_reports_the_interpreter_switch_and_the_backend_variable(monkeypatch):
    """Without TRITON_INTERPRET=1 a CPU machine has no Triton backend (info says so, `auto` picks the reference),
    and DCGEN_BACKEND is reported as the default the ops will take."""
    from dcgen_kernels import _backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("DCGEN_BACKEND", "reference")
    report = dcgen_kernels.info()
    assert report["default_backend_env"] == "reference"
    if not torch.cuda.is_available():
        assert report["backends"]["triton"]["available"] is False and report["backends"]["triton"]["reason"]
        assert _backend.triton_device_error(torch.device("cpu")) is not None
    monkeypatch.delenv("DCGEN_BACKEND")
    assert _backend.select("op", "auto", {"triton": lambda: _backend.triton_device_error(torch.device("cpu"))},
                           {}) == "reference"
