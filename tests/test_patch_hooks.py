"""patch() next to hooks that also wrap module forwards: diffusers' (enable_cache, layerwise casting, group
offloading) and accelerate's, registered before or after patch(); and unpatch() with them still in place."""

import copy
import warnings

import pytest
import torch

import dcgen_kernels
from dcgen_kernels.patching import flux as flux_family
from dcgen_kernels.patching._instance import restore_forward
from tests.helpers import rel_l2, tiny_dcae, tiny_flux, tiny_flux_inputs, tiny_sana, tiny_sana_inputs

pytest.importorskip("diffusers")


def flux_steps(model, inputs, steps=3):
    """A few denoising-like calls (the timestep moves) inside one cache context."""
    outputs = []
    with torch.no_grad(), model.cache_context("cond"):
        for step in range(steps):
            outputs.append(model(**{**inputs, "timestep": inputs["timestep"] * (1 - 0.01 * step)})[0])
    return outputs


def count_block_calls(monkeypatch):
    """Counts the patched FLUX blocks' gated residual op: nonzero only if our forwards ran."""
    calls = []
    original = flux_family.gated_residual
    monkeypatch.setattr(flux_family, "gated_residual", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("cache_first", [True, False])
def test_flux_first_block_cache_wraps_the_patched_blocks(monkeypatch, cache_first):
    from diffusers import FirstBlockCacheConfig

    model, inputs = tiny_flux(), tiny_flux_inputs()
    uncached = flux_steps(copy.deepcopy(model), inputs)
    stock = copy.deepcopy(model)
    stock.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    expected = flux_steps(stock, inputs)
    assert rel_l2(expected[2], uncached[2]) > 1e-3  # the cache skipped blocks: the outputs tell it apart

    if cache_first:
        model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        dcgen_kernels.patch(model, backend="reference")
    else:
        dcgen_kernels.patch(model, backend="reference")
        model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    calls = count_block_calls(monkeypatch)
    got = flux_steps(model, inputs)
    assert calls  # the blocks the cache ran were the patched ones
    assert all(rel_l2(g, e) < 1e-6 for g, e in zip(got, expected))

    dcgen_kernels.unpatch(model)  # the cache stays: its wrappers now end in the stock forwards
    calls.clear()
    assert all(rel_l2(g, e) < 1e-6 for g, e in zip(flux_steps(model, inputs), expected)) and not calls
    model.disable_cache()
    assert all(rel_l2(g, e) < 1e-6 for g, e in zip(flux_steps(model, inputs), uncached))
    # what is left on the instances is the class's forward (diffusers' hook removal sets it), nothing of ours
    assert all(getattr(vars(m)["forward"], "__func__", None) is type(m).forward
               for m in model.modules() if "forward" in vars(m))


def decode(model, latent):
    with torch.no_grad():
        return model.decode(latent).sample


def run_sana(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


_CASES = {"sana": (tiny_sana, tiny_sana_inputs, run_sana), "dcae": (tiny_dcae, lambda: torch.randn(1, 8, 5, 6), decode)}


@pytest.mark.parametrize("family", sorted(_CASES))
@pytest.mark.parametrize("hooks_first", [True, False])
def test_layerwise_casting_keeps_the_mix_ffn_correct(family, hooks_first):
    # fp8-stored conv weights, cast per call by hooks on the convs: the fused Mix-FFN, which would read the stored
    # weights, hands over to diffusers' code (said once)
    make, make_inputs, run = _CASES[family]
    model, inputs = make(), make_inputs()
    stock = copy.deepcopy(model)
    cast = dict(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    stock.enable_layerwise_casting(**cast)
    expected = run(stock, inputs)
    if hooks_first:
        model.enable_layerwise_casting(**cast)
    dcgen_kernels.patch(model, backend="reference")
    if not hooks_first:
        model.enable_layerwise_casting(**cast)
    dcgen_kernels._backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="GLUMBConv\\)? runs diffusers' code because conv_\\w+ has diffusers hooks "
                                            "\\(layerwise_casting"):
        got = run(model, inputs)
    assert rel_l2(got, expected) < 1e-5
    assert rel_l2(run(dcgen_kernels.unpatch(model), inputs), expected) < 1e-5


def counting(base):
    """An accelerate or diffusers ModelHook (base) that counts its pre_forward calls."""
    class Counting(base):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs
    return Counting()


@pytest.mark.parametrize("order", ["accelerate, diffusers, patch", "diffusers, patch, accelerate",
                                   "patch, accelerate, diffusers"])
def test_accelerate_and_diffusers_hooks_keep_wrapping_the_patched_forward(monkeypatch, order):
    # accelerate's hook and a diffusers hook on the same block, each registered before or after patch(): the
    # patched forward ends up innermost, runs without a fallback, and unpatch() swaps only it
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from diffusers.hooks import HookRegistry, ModelHook as DiffusersHook

    model, inputs = tiny_flux(), tiny_flux_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
    block, accelerate_hook, diffusers_hook = model.transformer_blocks[0], counting(ModelHook), counting(DiffusersHook)
    steps = {"accelerate": lambda: add_hook_to_module(block, accelerate_hook),
             "diffusers": lambda: HookRegistry.check_if_exists_or_initialize(block).register_hook(diffusers_hook,
                                                                                                   "count"),
             "patch": lambda: dcgen_kernels.patch(model, backend="reference")}
    for step in order.split(", "):
        steps[step]()
    calls = count_block_calls(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(model(**inputs)[0], expected)
    assert calls and accelerate_hook.calls == diffusers_hook.calls == 1
    dcgen_kernels.unpatch(model)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], expected)
    assert not calls and accelerate_hook.calls == diffusers_hook.calls == 2
    removals = {"accelerate": lambda: remove_hook_from_module(block),
                "diffusers": lambda: block._diffusers_hook.remove_hook("count")}
    for step in reversed([step for step in order.split(", ") if step in removals]):  # last registered, first out
        removals[step]()
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], expected)
    assert accelerate_hook.calls == diffusers_hook.calls == 2


def test_two_diffusers_hooks_registered_before_patch_both_keep_running(monkeypatch):
    """Hooks stack: the patched forward replaces the innermost (diffusers' own forward), so both hooks still run,
    the patched block with them, and unpatch() restores the stock forward beneath both."""
    from diffusers.hooks import HookRegistry, ModelHook

    model, inputs = tiny_flux(), tiny_flux_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
    registry = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0])
    first, second = counting(ModelHook), counting(ModelHook)
    registry.register_hook(first, "first")
    registry.register_hook(second, "second")
    dcgen_kernels.patch(model, backend="reference")
    calls = count_block_calls(monkeypatch)
    with torch.no_grad():
        assert rel_l2(model(**inputs)[0], expected) < 1e-5
    assert calls and first.calls == second.calls == 1
    dcgen_kernels.unpatch(model)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], expected)
    assert not calls and first.calls == second.calls == 2


@pytest.mark.parametrize("kind", ["backward", "accelerate"])
def test_backward_and_accelerate_hooks_on_submodules_the_fused_code_computes_run(kind):
    """A backward hook or an accelerate hook on a submodule a patched FLUX block computes itself (its FeedForwards):
    diffusers' code runs there (warned), so the hook runs as in the stock model. One kind per model: either sends
    the whole block to diffusers' code, which would run the other's submodule too."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, backend="reference")
    block, backward_calls, accelerate_hook = model.transformer_blocks[0], [], counting(ModelHook)
    if kind == "backward":
        block.ff.register_full_backward_hook(lambda module, grad_in, grad_out: backward_calls.append(1))
    else:
        add_hook_to_module(block.ff_context, accelerate_hook)
    hidden = inputs["hidden_states"].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**{**inputs, "hidden_states": hidden})[0].sum().backward()
    assert (backward_calls, accelerate_hook.calls) == (([1], 0) if kind == "backward" else ([], 1))
    assert any("runs diffusers' code" in str(w.message) for w in caught)


def _hooked_run(model, inputs, register):
    """(output, hook calls) of `model` with the hooks `register(model, calls)` adds."""
    calls = []
    register(model, calls)
    with torch.no_grad():
        return model(**inputs)[0], calls


def _scale_output(calls, name):
    return lambda module, args, out: calls.append(name) or out * 0.5


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_hooks_on_submodules_the_fused_code_computes_run(family):
    """A patched block or processor computes some submodules itself (norms, FeedForward / GLUMBConv, FLUX's Q/K
    RMSNorms): where one of them has hooks, diffusers' code runs that call, so the hooks run and change the output
    exactly as in the stock model (warned once)."""
    if family == "flux":
        model, inputs = tiny_flux(), tiny_flux_inputs()

        def register(m, calls):
            m.transformer_blocks[0].ff.register_forward_hook(_scale_output(calls, "ff"))
            m.transformer_blocks[0].attn.norm_q.register_forward_hook(_scale_output(calls, "norm_q"))
            m.single_transformer_blocks[0].act_mlp.register_forward_hook(_scale_output(calls, "act_mlp"))
    else:
        model, inputs = tiny_sana(), tiny_sana_inputs()

        def register(m, calls):
            m.transformer_blocks[0].ff.register_forward_hook(_scale_output(calls, "ff"))
            m.transformer_blocks[1].norm2.register_forward_hook(_scale_output(calls, "norm2"))

    stock, stock_calls = _hooked_run(copy.deepcopy(model), inputs, register)
    dcgen_kernels.patch(model, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched, patched_calls = _hooked_run(model, inputs, register)
    assert sorted(patched_calls) == sorted(stock_calls) and len(stock_calls) >= 2
    assert rel_l2(patched, stock) < 1e-5
    assert any("has torch forward hooks" in str(w.message) for w in caught)


def test_diffusers_feed_forward_layer_skip_applies_to_patched_flux():
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    model, inputs = tiny_flux(), tiny_flux_inputs()
    stock = copy.deepcopy(model)
    dcgen_kernels.patch(model, backend="reference")
    config = LayerSkipConfig(indices=[0], fqn="transformer_blocks", skip_ff=True, skip_attention=False)
    for m in (model, stock):
        apply_layer_skip(m, config)
    with torch.no_grad():
        assert rel_l2(model(**inputs)[0], stock(**inputs)[0]) < 1e-5


class _ScaledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 1.5


class _ScaledRMSNorm(torch.nn.RMSNorm):
    def forward(self, x):
        return super().forward(x) * 1.5


def _retyped(module, cls):
    """A copy of `module` (same configuration and weights) of the subclass `cls`."""
    copied = copy.deepcopy(module)
    copied.__class__ = cls
    return copied


def _dcae_scaled_res_norm(model):
    from diffusers.models.normalization import RMSNorm

    class ScaledRMSNorm(RMSNorm):
        def forward(self, x):
            return super().forward(x) * 1.5

    block = next(m for m in model.decoder.modules() if type(m).__name__ == "ResBlock")
    block.norm = _retyped(block.norm, ScaledRMSNorm)


def _scaled_output_subclass(module):
    """A new module like `module` (its weights, not the forward patch() gave it) of a subclass with its own forward,
    which scales the first output by 1.5."""
    class Scaled(type(module)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            return (out[0] * 1.5, *out[1:]) if isinstance(out, tuple) else out * 1.5

    copied = _retyped(module, Scaled)
    for submodule in copied.modules():
        restore_forward(submodule)
    return copied


def _tiny_flux_fp8():
    model = tiny_flux()
    dcgen_kernels.quantize(model, quant="fp8", backend="reference")
    return model


def _each(model, class_name, attribute, make):
    for module in model.modules():
        if type(module).__name__ == class_name:
            setattr(module, attribute, make())


_FLUX_SWAPS = {
    "attn.norm_q": lambda m: setattr(m.transformer_blocks[0].attn, "norm_q",
                                     _retyped(m.transformer_blocks[0].attn.norm_q, _ScaledRMSNorm)),
    "norm2": lambda m: setattr(m.transformer_blocks[0], "norm2", _retyped(m.transformer_blocks[0].norm2,
                                                                          _ScaledLayerNorm)),
    "norm1.norm": lambda m: setattr(m.transformer_blocks[0].norm1, "norm",
                                    _retyped(m.transformer_blocks[0].norm1.norm, _ScaledLayerNorm)),
    "norm_out.norm": lambda m: setattr(m.norm_out, "norm", _retyped(m.norm_out.norm, _ScaledLayerNorm)),
    "ff": lambda m: setattr(m.transformer_blocks[0], "ff", _scaled_output_subclass(m.transformer_blocks[0].ff)),
}
_FLUX_FP8_SWAPS = {  # the FP8 blocks compute their adaLN modulation and FeedForward themselves
    "norm1": lambda m: setattr(m.transformer_blocks[0], "norm1",
                               _scaled_output_subclass(m.transformer_blocks[0].norm1)),
    "single.norm": lambda m: setattr(m.single_transformer_blocks[0], "norm",
                                     _scaled_output_subclass(m.single_transformer_blocks[0].norm)),
    "ff": lambda m: setattr(m.transformer_blocks[0], "ff", _scaled_output_subclass(m.transformer_blocks[0].ff)),
}
# After these the block calls the new module (the FP8 blocks then take their bf16 path for it): nothing falls back
# to diffusers' code, nothing warns.
_CALLED_AS_MODULES = {"flux:ff"} | {f"flux_fp8:{name}" for name in _FLUX_FP8_SWAPS}
_SANA_SWAPS = {
    "ff.nonlinearity": lambda m: setattr(m.transformer_blocks[0].ff, "nonlinearity", torch.nn.GELU()),
    "norm2": lambda m: setattr(m.transformer_blocks[1], "norm2", _retyped(m.transformer_blocks[1].norm2,
                                                                          _ScaledLayerNorm)),
    "norm_out.norm": lambda m: setattr(m.norm_out, "norm", _retyped(m.norm_out.norm, _ScaledLayerNorm)),
    "ff": lambda m: setattr(m.transformer_blocks[0], "ff", _scaled_output_subclass(m.transformer_blocks[0].ff)),
}
_DCAE_SWAPS = {
    "attn.nonlinearity": lambda m: _each(m, "SanaMultiscaleLinearAttention", "nonlinearity", torch.nn.GELU),
    "conv_out.nonlinearity": lambda m: _each(m, "GLUMBConv", "nonlinearity", torch.nn.GELU),
    "ResBlock.norm": _dcae_scaled_res_norm,
}
_SWAP_CASES = {
    "flux": (tiny_flux, tiny_flux_inputs, lambda m, i: run_sana(m, i), _FLUX_SWAPS),
    "flux_fp8": (_tiny_flux_fp8, tiny_flux_inputs, lambda m, i: run_sana(m, i), _FLUX_FP8_SWAPS),
    "sana": (tiny_sana, tiny_sana_inputs, run_sana, _SANA_SWAPS),
    "dcae": (tiny_dcae, lambda: torch.randn(1, 8, 5, 6), decode, _DCAE_SWAPS),
}


@pytest.mark.parametrize("swap", [f"{family}:{name}" for family, case in _SWAP_CASES.items() for name in case[3]])
@pytest.mark.parametrize("after_patch", [True, False], ids=["after_patch", "before_patch"])
def test_submodules_the_fused_code_stands_for_are_followed_when_replaced(swap, after_patch):
    """A norm, activation, adaLN module or feed-forward that the fused code computes itself, replaced by another
    module (another class, or a subclass with its own forward; before patch(), or after it, which patch() cannot see):
    the new module's code runs, as in stock."""
    family, name = swap.split(":")
    make, make_inputs, run, swaps = _SWAP_CASES[family]
    model, inputs = make(), make_inputs()
    stock = copy.deepcopy(model)
    swaps[name](stock)
    expected = run(stock, inputs)
    assert rel_l2(expected, run(copy.deepcopy(model), inputs)) > 1e-3  # the swap changes the output
    if not after_patch:
        swaps[name](model)
    dcgen_kernels.patch(model, backend="reference")
    if after_patch:
        swaps[name](model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(model, inputs)
    assert rel_l2(got, expected) < 1e-5
    # before patch(), patch() may have left the module stock (reported skipped)
    assert caught or not after_patch or swap in _CALLED_AS_MODULES


def test_hooks_on_dcae_attention_nonlinearity_run():
    """The multiscale linear attention applies ReLU itself: a hook on `attn.nonlinearity` makes diffusers'
    processor serve the call, so the hook runs and changes the output as in stock."""
    model, latent = tiny_dcae(), torch.randn(1, 8, 5, 6)

    def hooked(m):
        calls = []
        for module in m.modules():
            if type(module).__name__ == "SanaMultiscaleLinearAttention":
                module.nonlinearity.register_forward_hook(_scale_output(calls, "relu"))
        return decode(m, latent), calls

    expected, stock_calls = hooked(copy.deepcopy(model))
    dcgen_kernels.patch(model, backend="reference")
    with pytest.warns(RuntimeWarning, match="nonlinearity has torch forward hooks"):
        got, calls = hooked(model)
    assert len(calls) == len(stock_calls) >= 2 and rel_l2(got, expected) < 1e-5
