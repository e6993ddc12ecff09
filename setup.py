"""Build for dcgen-kernels.

The compiled module `dcgen_kernels._C` (pybind11 + CUDA runtime, no torch headers) is built with CMake + Ninja
when nvcc is found (CUDA_HOME/bin, CUDA_PATH/bin, PATH, /usr/local/cuda/bin); otherwise, or when that build fails
(with a warning, and no earlier in-tree _C left behind), the package installs as pure Python (Triton and torch paths
only). Environment:
  DCGEN_BUILD_CUDA=0   never build _C          DCGEN_BUILD_CUDA=1   build _C or fail
  DCGEN_CUDA_ARCHS     CUDA archs, default "90a" (e.g. "90a;100a;120a"); archs given here are a request: a failed
                       build then fails the install (pip hides a fallback's warning unless run with -v)
This file must not import torch: build isolation would bring a different torch into the build environment.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    """Path of nvcc, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def build_request():
    """'auto', 'on' or 'off' from DCGEN_BUILD_CUDA."""
    raw = os.environ.get("DCGEN_BUILD_CUDA", "").strip().lower()
    if raw == "":
        return "auto"
    if raw in ("0", "false", "off", "no"):
        return "off"
    if raw in ("1", "true", "on", "yes"):
        return "on"
    sys.exit(f"dcgen-kernels: DCGEN_BUILD_CUDA must be 0 or 1 (or unset), got {raw!r}")


class CMakeExtension(Extension):
    def __init__(self, name, nvcc, required):
        # No sources for setuptools to compile (MANIFEST.in puts csrc/ and CMakeLists.txt into sdists). Optional:
        # an editable install then copies no module into the tree when the build failed, instead of failing.
        super().__init__(name, sources=[], optional=not required)
        self.nvcc = nvcc
        self.required = required  # DCGEN_BUILD_CUDA=1 or DCGEN_CUDA_ARCHS given: a failed build fails the install


class CMakeBuild(build_ext):
    """Configure and build with CMake, then put the module at get_ext_fullpath (in-tree for editable installs)."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError) as exc:
            if ext.required:
                raise RuntimeError(f"dcgen-kernels: building {ext.name} with CMake failed ({exc}). Fix the CUDA "
                                   "toolchain or DCGEN_CUDA_ARCHS (explicit archs such as '90a;120a'), or set "
                                   "DCGEN_BUILD_CUDA=0 to install without it.") from exc
            # nvcc was found but the build failed: install the pure-Python package (Triton and torch paths), with
            # no module left over from an earlier build that would not match these sources (in the build tree, and
            # in the source tree, where an editable install imports it from)
            stale = [Path(self.get_ext_fullpath(ext.name))]
            stale += [*(ROOT / "dcgen_kernels").glob("_C*.so"), *(ROOT / "dcgen_kernels").glob("_C*.pyd")]
            for module in stale:
                module.unlink(missing_ok=True)
            print(f"dcgen-kernels: WARNING: building {ext.name} with CMake failed ({exc}); installing without it "
                  "(set DCGEN_BUILD_CUDA=1 to make this an error)", file=sys.stderr, flush=True)

    def _cmake_build(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found on PATH (pip install cmake)")
        try:
            import pybind11  # noqa: PLC0415  (a build requirement, not a runtime one)
        except ImportError as exc:
            raise OSError("pybind11 is not installed in the build environment (pip install pybind11)") from exc

        archs = os.environ.get("DCGEN_CUDA_ARCHS", "").strip() or "90a"
        # A persistent tree per Python (incremental rebuilds; pip's build_temp is a fresh temp dir each time).
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and _stale(cache.read_text(errors="replace")):
            shutil.rmtree(build_dir)  # start over
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDCGEN_CUDA_ARCHS={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
        ]
        if not cache.exists():  # the generator cannot change after the first configure
            ninja = shutil.which("ninja")
            if ninja is None:
                try:
                    import ninja as ninja_pkg  # noqa: PLC0415

                    ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
                except ImportError:
                    ninja = None
            cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        jobs = self.parallel or os.cpu_count() or 1
        print(f"dcgen-kernels: building {ext.name} for CUDA archs {archs} with {ext.nvcc}", flush=True)
        subprocess.run(cfg, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], check=True)

        built = sorted(build_dir.glob("_C*.so")) + sorted(build_dir.glob("_C*.pyd"))
        if not built:
            raise OSError(f"CMake finished but no _C module was found in {build_dir}")
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)
        os.chmod(dest, 0o755)


def _stale(cache_text: str) -> bool:
    """A CMake tree configured for another source dir (a copied tree), or with a make program that is gone (pip's
    build isolation puts ninja in a temporary environment that it deletes after the install)."""
    if f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}\n" not in cache_text:
        return True
    make_program = next((line.split("=", 1)[1] for line in cache_text.splitlines()
                         if line.startswith("CMAKE_MAKE_PROGRAM:")), "")
    return bool(make_program) and not Path(make_program).exists()


def extensions():
    request = build_request()
    if request == "off":
        print("dcgen-kernels: skipping the CUDA extension dcgen_kernels._C (DCGEN_BUILD_CUDA=0)", flush=True)
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if request == "on":
            sys.exit("dcgen-kernels: DCGEN_BUILD_CUDA=1 but nvcc was not found (looked in CUDA_HOME/bin, "
                     "CUDA_PATH/bin, PATH, /usr/local/cuda/bin)")
        print("dcgen-kernels: skipping the CUDA extension dcgen_kernels._C (nvcc not found; "
              "set CUDA_HOME or DCGEN_BUILD_CUDA=1 to require it)", flush=True)
        return []
    requested_archs = bool(os.environ.get("DCGEN_CUDA_ARCHS", "").strip())
    return [CMakeExtension("dcgen_kernels._C", nvcc, required=request == "on" or requested_archs)]


readme = ROOT / "README.md"
ext_modules = extensions()

setup(
    name="dcgen-kernels",
    version="0.1.0",
    description="Fused CUDA/Triton kernels for diffusers FLUX and SANA models (DC-Gen)",
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dcgen_kernels", "dcgen_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        'triton>=3.4; platform_system=="Linux"',
        "numpy",
    ],
    extras_require={
        "diffusers": ["diffusers>=0.35"],
        "test": ["pytest", "pytest-benchmark", "diffusers>=0.35"],
        "cuda": ["cuda-python"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild} if ext_modules else {},
    zip_safe=False,
)
