import os
import warnings

import pytest
import torch

# Triton kernels run under the interpreter on CPU tensors; must be set before the first @triton.jit runs.
# Never on a GPU machine: there the same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _short_timed_choices(monkeypatch):
    """`auto`'s first-call timing of its implementations: short windows in tests, which check the choice works,
    not which one wins."""
    from dcgen_kernels.ops import _common

    monkeypatch.setattr(_common, "TIMED_CHOICE_BENCH", {"warmup": 1, "rep": 5})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fallbacks_are_errors(request):
    """A backend that cannot serve a call falls back with a one-time warning; in a test that is an error, so a
    test of a kernel cannot silently compare the reference with itself. Tests of the fallback itself catch it
    with pytest.warns (or are marked allow_fallback); the one-time memory starts empty in every test."""
    from dcgen_kernels import _backend

    _backend._warned.clear()
    if request.node.get_closest_marker("allow_fallback"):
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"dcgen_kernels\..*backend cannot serve this call",
                                category=RuntimeWarning)
        yield
