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


def test_info_without_the_extension(monkeypatch):
    from dcgen_kernels import _cext

    monkeypatch.setattr(_cext, "_C", None)
    monkeypatch.setattr(_cext, "C_IMPORT_ERROR", "no _C module for this Python")
    report = dcgen_kernels.info()
    assert report["extension"] == {"built": False, "archs": [], "error": "no _C module for this Python"}
    cuda = report["backends"]["cuda"]
    assert cuda["available"] is False and "_C is not built (no _C module for this Python)" in cuda["reason"]


def _fake_cuda_runtime(count_error: bool):
    import types

    success, failure = types.SimpleNamespace(name="cudaSuccess"), types.SimpleNamespace(name="cudaErrorNoDevice")
    props = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\x00\x00", major=9, minor=0)
    return types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=success),
        cudaGetDeviceCount=lambda: (failure, 0) if count_error else (success, 1),
        cudaGetDeviceProperties=lambda index: (success, props))


@pytest.mark.parametrize("count_error", [False, True], ids=["device", "no_device"])
def test_info_reads_the_gpu_through_cuda_python_when_torch_has_no_cuda(monkeypatch, count_error):
    bindings = pytest.importorskip("cuda.bindings")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bindings, "runtime", _fake_cuda_runtime(count_error), raising=False)
    expected = ({"name": None, "capability": None, "source": "cuda-python (cudaErrorNoDevice)"} if count_error else
                {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "source": "cuda-python"})
    assert dcgen_kernels.info()["gpu"] == expected


def test_sdist_holds_the_cuda_sources_where_nothing_builds_them(tmp_path):
    """The sdist must let a GPU machine build _C even when it was made where _C is not built (no nvcc,
    DCGEN_BUILD_CUDA=0): csrc/ and CMakeLists.txt came in only with the extension before MANIFEST.in."""
    import shutil
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "Makefile", "CMakeLists.txt"):
        shutil.copy(repo / name, tree / name)
    for name in ("csrc", "dcgen_kernels"):
        shutil.copytree(repo / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "DCGEN_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=tree,
                   env=env, check=True, capture_output=True)
    [sdist] = (tmp_path / "dist").glob("*.tar.gz")
    names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tarfile.open(sdist).getnames()
             if len(Path(n).parts) > 1}
    expected = {"CMakeLists.txt", *(f"csrc/{p.name}" for p in (repo / "csrc").iterdir())}
    assert expected <= names, expected - names
