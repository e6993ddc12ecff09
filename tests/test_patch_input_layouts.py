"""Patched modules take every input layout their stock forwards take. The fused ops read channels with stride 1;
callers may hand a module channel-strided views (a conv patch embedding's flatten(2).transpose(1, 2) feeds the first
block so, in SANA and HunyuanVideo). Each module patch() replaced is called, as the stock model calls it, with every
tensor argument (and rotary table) made channel-strided: same values, the same result as for stock's layouts, and
(fp32) stock's result."""

import copy

import pytest
import torch

import dcgen_kernels
from tests.helpers import (TOLERANCE, RecordDcgenOps, rel_l2, tiny_dcae, tiny_flux, tiny_flux_inputs, tiny_sana,
                           tiny_sana_inputs)

pytest.importorskip("diffusers")


def channel_strided(value):
    """value with the same values and a channel stride other than 1, where it has two dims of size > 1."""
    if isinstance(value, tuple):
        return tuple(channel_strided(v) for v in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2 \
            and value.shape[-1] > 1 and value.shape[-2] > 1:
        strided = value.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert strided.stride(-1) != 1
        return strided
    return value


def tensors(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    return [output.sample]


def record_calls(model, run) -> dict:
    """{module name: (args, kwargs)} of each module's first call in `run(model)`."""
    calls, handles = {}, []
    for name, module in model.named_modules():
        def record(_, args, kwargs, name=name):
            calls.setdefault(name, (args, kwargs))
        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    with torch.no_grad():
        run(model)
    for handle in handles:
        handle.remove()
    return calls


def _flux(dtype):
    inputs = tiny_flux_inputs(dtype=dtype)
    return tiny_flux(dtype=dtype).eval(), lambda model: model(**inputs)


def _sana(dtype):
    inputs = tiny_sana_inputs(height=3, width=4, dtype=dtype)
    return tiny_sana(dtype=dtype).eval(), lambda model: model(**inputs)


def _dcae(dtype):
    image, latent = torch.randn(1, 3, 10, 12, dtype=dtype), torch.randn(1, 8, 5, 6, dtype=dtype)
    return tiny_dcae(dtype=dtype), lambda model: (model.encode(image), model.decode(latent))


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "reference"), (torch.bfloat16, "triton")])
@pytest.mark.parametrize("make", [_flux, _sana, _dcae], ids=["flux", "sana", "dcae"])
def test_patched_modules_take_channel_strided_inputs(make, dtype, backend):
    stock, run = make(dtype)
    calls = record_calls(stock, run)
    patched = dcgen_kernels.patch(copy.deepcopy(stock), backend=backend)
    replaced = {name for name, _, _ in dcgen_kernels.patch_report(patched).replaced}
    if dtype != torch.float32:
        replaced.discard("")  # the whole model (latent I/O): fp32 only, its blocks take ~20 s in the interpreter
    modules, stock_modules = dict(patched.named_modules()), dict(stock.named_modules())
    assert replaced <= calls.keys()
    for name in sorted(replaced):
        args, kwargs = calls[name]
        strided_args = tuple(channel_strided(a) for a in args)
        strided_kwargs = {k: channel_strided(v) for k, v in kwargs.items()}
        with torch.no_grad():
            expected = tensors(stock_modules[name](*args, **kwargs))
            with RecordDcgenOps() as fused:
                unstrided = tensors(modules[name](*args, **kwargs))
            with RecordDcgenOps() as fused_strided:
                got = tensors(modules[name](*strided_args, **strided_kwargs))
        assert len(got) == len(unstrided) == len(expected), name
        # token layouts take the same fused path, not a fallback; DC-AE's NCHW maps in neither NCHW nor channels-last
        # layout run stock's ResBlock tail (warned, as the README says)
        assert fused_strided.names == fused.names or make is _dcae, name
        for g, u, e in zip(got, unstrided, expected):
            assert rel_l2(g, u) < TOLERANCE[dtype], name  # the layout changes at most the GEMMs' rounding
            if dtype == torch.float32:  # bf16 against stock: the model tests, with their tolerance for a model
                assert rel_l2(g, e) < TOLERANCE[dtype], name
