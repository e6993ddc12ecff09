"""patch() serves the projections that read one input with one GEMM (patching/_fused_projections.py): the weights
side by side in one buffer, parameters, values and state_dict unchanged."""

import tempfile

import pytest
import torch
import torch.nn.functional as F

import dcgen_kernels
from dcgen_kernels.patching import _fused_projections
from tests.helpers import rel_l2, tiny_dcae, tiny_flux, tiny_flux_inputs, tiny_sana, tiny_sana_inputs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def groups(model):
    """{attention name: [[linears of one group], ...]} of every attention patch() handles in the tiny models."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "to_q") and hasattr(module, "to_k"):
            if getattr(module, "is_cross_attention", False):
                found[name] = [[module.to_k, module.to_v]]
            else:
                found[name] = [[module.to_q, module.to_k, module.to_v]]
                if getattr(module, "added_kv_proj_dim", None) is not None:
                    found[name].append([module.add_q_proj, module.add_k_proj, module.add_v_proj])
    return found


def side_by_side(linears) -> bool:
    return _fused_projections.as_one_linear(linears) is not None


def owns_storage(linear) -> bool:
    return all(_fused_projections._owns_storage(p) for p in linear.parameters())


def record_linear_weights(monkeypatch) -> list:
    """(data_ptr, rows) of the weight of every F.linear call from now on."""
    weights, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: (weights.append((w.data_ptr(), w.shape[0])),
                                                           linear(x, w, b))[1])
    return weights


def joined(*linears) -> tuple:
    return linears[0].weight.data_ptr(), sum(linear.out_features for linear in linears)


CASES = {
    "sana": (tiny_sana, tiny_sana_inputs),
    "flux": (tiny_flux, tiny_flux_inputs),
}


@pytest.mark.parametrize("family", CASES)
def test_patch_places_projections_side_by_side_keeping_parameters_and_values(family):
    model, inputs = CASES[family][0](), CASES[family][1]()
    expected = run(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    dcgen_kernels.patch(model, backend="reference")
    found = groups(model)
    assert found and all(side_by_side(group) for attn in found.values() for group in attn)
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert rel_l2(run(model, inputs), expected) < 1e-5
    dcgen_kernels.unpatch(model)
    assert all(owns_storage(linear) for attn in found.values() for group in attn for linear in group)
    restored = model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in before.items())


def test_one_gemm_per_group(monkeypatch):
    model, inputs = tiny_sana(), tiny_sana_inputs()
    dcgen_kernels.patch(model, backend="reference")
    weights = record_linear_weights(monkeypatch)
    run(model, inputs)
    for block in model.transformer_blocks:
        attn1, attn2 = block.attn1, block.attn2
        assert weights.count(joined(attn1.to_q, attn1.to_k, attn1.to_v)) == 1
        assert weights.count(joined(attn2.to_k, attn2.to_v)) == 1
        assert not {joined(attn1.to_k), joined(attn1.to_v), joined(attn2.to_v)} & set(weights)


def test_patched_model_saves_and_loads():
    from diffusers import SanaTransformer2DModel

    model, inputs = tiny_sana(), tiny_sana_inputs()
    dcgen_kernels.patch(model, backend="reference")
    expected = run(model, inputs)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # safetensors: the views do not overlap
        loaded = SanaTransformer2DModel.from_pretrained(folder)
    assert rel_l2(run(loaded, inputs), expected) < 1e-6


def test_moved_model_is_placed_side_by_side_again_on_the_next_call():
    model, inputs = tiny_sana(), tiny_sana_inputs()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    model.to(torch.float16).to(torch.float32)  # every parameter a new tensor
    attn = model.transformer_blocks[0].attn1
    assert not side_by_side([attn.to_q, attn.to_k, attn.to_v])
    with torch.inference_mode():  # the new buffer must still be a normal tensor
        out = model(**inputs)[0]
    assert side_by_side([attn.to_q, attn.to_k, attn.to_v]) and not attn.to_q.weight.is_inference()
    assert rel_l2(out, expected) < 2e-3  # the fp16 round trip of the weights
    model(**inputs)[0].sum().backward()  # usable by autograd


def test_grad_enabled_runs_the_modules(monkeypatch):
    model, inputs = tiny_sana(), tiny_sana_inputs()
    dcgen_kernels.patch(model, backend="reference")
    weights = record_linear_weights(monkeypatch)
    model(**inputs)[0].sum().backward()
    attn1 = model.transformer_blocks[0].attn1
    assert joined(attn1.to_q, attn1.to_k, attn1.to_v) not in weights and joined(attn1.to_k) in weights
    assert all(p.grad is not None for p in model.transformer_blocks[0].attn1.to_k.parameters())


def test_tied_weights_stay_tied():
    model, inputs = tiny_sana(), tiny_sana_inputs()
    first, second = (block.attn1 for block in model.transformer_blocks)
    second.to_q.weight = first.to_q.weight  # one Parameter in two attentions
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert second.to_q.weight is first.to_q.weight
    placed = [side_by_side([a.to_q, a.to_k, a.to_v]) for a in (first, second)]
    assert placed == [True, False]  # the second group's Q is a view of the first's buffer: never moved again
    assert rel_l2(run(model, inputs), expected) < 1e-5
    assert placed == [side_by_side([a.to_q, a.to_k, a.to_v]) for a in (first, second)]


def test_weights_shared_with_another_model_stay_shared(monkeypatch):
    """Parameters aliasing another model's storage (load_state_dict(..., assign=True)) are not moved into one buffer:
    in-place updates of the other model still show in the patched one, as in stock (warned once)."""
    from dcgen_kernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    source, inputs = tiny_sana(), tiny_sana_inputs()
    model = tiny_sana()
    model.load_state_dict(source.state_dict(), assign=True)
    with pytest.warns(RuntimeWarning, match="share their storage"):
        dcgen_kernels.patch(model, backend="reference")
        run(model, inputs)
    attn = model.transformer_blocks[0].attn1
    assert not side_by_side([attn.to_q, attn.to_k, attn.to_v])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert rel_l2(run(model, inputs), run(source, inputs)) < 1e-5


def test_hooked_projection_runs_as_a_module():
    model, inputs = tiny_sana(), tiny_sana_inputs()
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    calls = []
    model.transformer_blocks[0].attn1.to_k.register_forward_hook(lambda *args: calls.append(1))
    assert rel_l2(run(model, inputs), expected) < 1e-5
    assert calls == [1]


class _DoubledLinear(torch.nn.Linear):
    """A Linear whose forward is not F.linear of its weights (as an adapter wrapper's is not)."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("family", CASES)
def test_linear_subclass_with_its_own_forward_runs_as_a_module(family):
    """A projection of a subclass is called, never read as weights by the group's GEMM. It is to_v: FLUX's Q/K
    RMSNorms and SANA's ReLU linear attention cancel a scaled K (and Q), so only V shows a bypass."""
    make_model, make_inputs = CASES[family]
    model, inputs = make_model(), make_inputs()
    attn = model.transformer_blocks[0].attn if family == "flux" else model.transformer_blocks[0].attn1
    doubled = _DoubledLinear(attn.to_v.in_features, attn.to_v.out_features, bias=attn.to_v.bias is not None)
    doubled.load_state_dict(attn.to_v.state_dict())
    undoubled = run(model, inputs)
    attn.to_v = doubled
    expected = run(model, inputs)
    assert rel_l2(expected, undoubled) > 1e-3
    dcgen_kernels.patch(model, backend="reference")
    assert owns_storage(attn.to_v) and not side_by_side([attn.to_q, attn.to_k, attn.to_v])  # its group left as is
    assert rel_l2(run(model, inputs), expected) < 1e-5


def test_self_attention_with_the_sdpa_processor_keeps_its_own_storage():
    """Our SDPA processor projects only a cross-attention's K/V as one group; for a self-attention it calls
    diffusers' processor, so its projections are not moved."""
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    model, inputs = tiny_sana(), tiny_sana_inputs()
    attn = model.transformer_blocks[0].attn1
    attn.set_processor(SanaAttnProcessor2_0())
    expected = run(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert type(attn.processor).__name__ == "DCGenSanaCrossAttnProcessor"
    assert all(owns_storage(linear) for linear in (attn.to_q, attn.to_k, attn.to_v))
    assert rel_l2(run(model, inputs), expected) < 1e-5


def test_dcae_multiscale_projections_side_by_side():
    model = tiny_dcae()
    latent = torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        expected = model.decode(latent).sample
    dcgen_kernels.patch(model, backend="reference")
    found = groups(model)
    assert found and all(side_by_side(group) for attn in found.values() for group in attn)
    with torch.no_grad():
        assert rel_l2(model.decode(latent).sample, expected) < 1e-5


def test_place_side_by_side_refuses_mismatched_groups():
    wide = [torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)]  # different input sizes
    mixed = [torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)]
    half = [torch.nn.Linear(8, 4), torch.nn.Linear(8, 4).half()]
    fp32_bias = [torch.nn.Linear(8, 4, dtype=torch.bfloat16), torch.nn.Linear(8, 4, dtype=torch.bfloat16)]
    fp32_bias[1].bias.data = fp32_bias[1].bias.data.float()  # weights agree, one bias in another dtype
    view = torch.nn.Linear(8, 4)
    view.weight.data = torch.randn(8, 8)[:4]  # a view of a bigger tensor: not ours to move
    tied = [torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)]
    tied[1].weight = tied[0].weight  # one tensor twice in the group
    for group in (wide, mixed, half, fp32_bias, [view, torch.nn.Linear(8, 4)], tied):
        storages = [p.untyped_storage().data_ptr() for linear in group for p in linear.parameters()]
        assert not _fused_projections.place_side_by_side(group)
        assert storages == [p.untyped_storage().data_ptr() for linear in group for p in linear.parameters()]


@pytest.mark.gpu
def test_moved_to_the_gpu_after_patch_then_captured_in_a_cuda_graph(monkeypatch):
    from tests.helpers import TOLERANCE

    model, inputs = tiny_sana(), tiny_sana_inputs()
    expected = run(model, inputs)
    dcgen_kernels.patch(model)
    model.to("cuda", torch.bfloat16)  # each parameter a new tensor: placed side by side again on the first call
    inputs = {k: v if not torch.is_tensor(v) else v.cuda().to(torch.bfloat16)
              if v.is_floating_point() and k != "encoder_attention_mask" else v.cuda() for k, v in inputs.items()}
    weights = record_linear_weights(monkeypatch)
    eager = run(model, inputs)
    attn = model.transformer_blocks[0].attn1
    assert attn.to_q.weight.is_cuda and side_by_side([attn.to_q, attn.to_k, attn.to_v])
    assert joined(attn.to_q, attn.to_k, attn.to_v) in weights
    dcgen_kernels.patch(model, cuda_graph=True)
    captured, replayed = run(model, inputs), run(model, inputs)
    for out in (eager, captured, replayed):
        assert rel_l2(out.float().cpu(), expected) <= 2 * TOLERANCE[torch.bfloat16]
