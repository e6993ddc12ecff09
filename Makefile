# Two commands do all the set-up on a fresh machine:
#   make bench   install what is missing, then run the benchmark suite (tiny CPU mode without a GPU)
#   make test    install what is missing, then run the tests
# On a CPU machine the pins below take the wheels already on disk (torch 2.13.0+cpu, triton 3.8.0).
# On a GPU machine keep your CUDA torch:  make test TORCH_PINS=
PYTHON ?= python3
TORCH_PINS ?= torch==2.13.0 triton==3.8.0 numpy<2.4
DEPS = diffusers==0.42.1 peft==0.21.2 scikit-image==0.26.0 matplotlib==3.11.2 cuda-python pybind11>=2.12 ninja \
	pytest pytest-benchmark pytest-xdist==3.8.0 execnet==2.1.2
# pytest-xdist workers of `make test`: the CPU suite takes ~10 min in one process on a 2-core machine, ~6.5 on two
TEST_WORKERS ?= 2
# The install re-runs when its build inputs or its settings (Python, DCGEN_CUDA_ARCHS, DCGEN_BUILD_CUDA) change:
# .installed-config holds the settings of the last install and is rewritten only when they differ.
STAMP = .installed
SETTINGS := $(shell $(PYTHON) -c "import sys; print(sys.executable, '%d.%d' % sys.version_info[:2])") \
	archs=$(DCGEN_CUDA_ARCHS) build_cuda=$(DCGEN_BUILD_CUDA)
$(shell printf '%s\n' '$(SETTINGS)' | cmp -s - .installed-config || printf '%s\n' '$(SETTINGS)' > .installed-config)

.PHONY: install bench test gpu-wheels clean

install: $(STAMP)

# Re-run the install only when the build inputs change (a plain `make test` then costs nothing extra).
$(STAMP): .installed-config Makefile setup.py pyproject.toml MANIFEST.in CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m pip install -q $(foreach p,$(TORCH_PINS) $(DEPS),"$(p)")
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Results JSON, e2e table (-e2e.md) and chart (-e2e.png) under the git-ignored build/bench/.
bench: install
	$(PYTHON) -m benchmarks.run --out build/bench/results.json

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) tests

# Pure-Python wheels that benchmarks/gpu_check.sh installs on the GPU machine (Python 3.12, no network there):
# diffusers, and pytest-xdist for its parallel GPU tests.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		diffusers==0.42.1 importlib_metadata pytest-xdist==3.8.0 execnet==2.1.2

clean:
	rm -rf build build-* .installed .installed-config dcgen_kernels/_C*.so *.egg-info
